//! The in-kernel half of tcprtt: on every segment an established TCP connection receives,
//! read the socket's smoothed RTT and add it to a per-CPU log-linear histogram.
//!
//! Two entry points share one body: `fentry/tcp_rcv_established` where the kernel allows
//! fentry, and `tp_btf/tcp_probe`, which the kernel fires as the first statement of
//! `tcp_rcv_established` with the same `(sk, skb)` arguments.
//!
//! Every struct field is read at an offset the loader resolved from the running kernel's
//! BTF and wrote into `CONFIG`, so this object carries no kernel struct layout.
#![no_std]
#![no_main]

mod wire;

use aya_ebpf::{
    Global,
    bindings::{BPF_F_NO_PREALLOC, BPF_NOEXIST},
    btf_maps::{self, ArrayOfMaps},
    helpers::bpf_probe_read_kernel,
    macros::{btf_map, btf_tracepoint, fentry, map},
    maps::{Array, HashMap, LpmTrie, PerCpuArray, PerCpuHashMap, lpm_trie::Key},
    programs::{BtfTracePointContext, FEntryContext},
};
use tcprtt_common::{
    AF_INET, AF_INET6, FILTER_KEY_LEN, HistKey, HistValue, ProbeConfig, family, filter,
    fine_bucket, group, stat,
};

/// `-E2BIG`: what inserting into a full hash map returns.
const E2BIG: i32 = -7;

#[unsafe(no_mangle)]
static CONFIG: Global<ProbeConfig> = Global::new(ProbeConfig::ZERO);

/// Two histogram maps (and two `ALL` arrays), written alternately: userspace flips
/// `ACTIVE`, waits until every program that might still use the old one has returned, then
/// reads and empties it. This is what makes interval reports exact without locking.
#[map]
static HIST0: PerCpuHashMap<HistKey, HistValue> =
    PerCpuHashMap::with_max_entries(1, BPF_F_NO_PREALLOC);
#[map]
static HIST1: PerCpuHashMap<HistKey, HistValue> =
    PerCpuHashMap::with_max_entries(1, BPF_F_NO_PREALLOC);
/// The single histogram used when not grouping: a per-CPU array needs no key hashing.
#[map]
static ALL0: PerCpuArray<HistValue> = PerCpuArray::with_max_entries(1, 0);
#[map]
static ALL1: PerCpuArray<HistValue> = PerCpuArray::with_max_entries(1, 0);
/// Index (0 or 1) of the histogram maps being written.
#[map]
static ACTIVE: Array<u32> = Array::with_max_entries(1, 0);
/// An all-zero histogram to insert new keys with: a `HistValue` is too big for the stack.
#[map]
static ZERO: PerCpuArray<HistValue> = PerCpuArray::with_max_entries(1, 0);
/// Counters of the rare outcomes, indexed by `tcprtt_common::stat`; cumulative.
#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::COUNT, 0);

/// Never used by the program. Updating its slot from userspace returns only once every BPF
/// program running at that moment has finished (the kernel waits for an RCU grace period
/// so callers know programs see the new inner map); tcprtt uses that wait to know the
/// histogram set it just switched away from is no longer written.
#[btf_map]
static GRACE: ArrayOfMaps<btf_maps::Array<u32, 1>, 1> = ArrayOfMaps::new();
/// The inner map userspace stores in `GRACE`.
#[btf_map]
static GRACE_INNER: btf_maps::Array<u32, 1> = btf_maps::Array::new();

/// Address filters: a segment passes when its family-tagged address lies in any stored
/// prefix (see `FILTER_KEY_LEN`).
#[map]
static LADDRS: LpmTrie<[u8; FILTER_KEY_LEN], u8> = LpmTrie::with_max_entries(1, 0);
#[map]
static RADDRS: LpmTrie<[u8; FILTER_KEY_LEN], u8> = LpmTrie::with_max_entries(1, 0);
/// Port filters, host order.
#[map]
static LPORTS: HashMap<u16, u8> = HashMap::with_max_entries(1, 0);
#[map]
static RPORTS: HashMap<u16, u8> = HashMap::with_max_entries(1, 0);

#[btf_tracepoint(function = "tcp_probe")]
pub fn tcprtt_tp_btf(ctx: BtfTracePointContext) -> i32 {
    let sk: *const u8 = ctx.arg(0);
    count_failure(try_record(sk));
    0
}

#[fentry(function = "tcp_rcv_established")]
pub fn tcprtt_fentry(ctx: FEntryContext) -> i32 {
    let sk: *const u8 = ctx.arg(0);
    count_failure(try_record(sk));
    0
}

/// Does nothing: `cargo xtask bench` attaches it beside tcprtt's program as the cost floor
/// of a program on this hook. tcprtt itself never loads it.
#[btf_tracepoint(function = "tcp_probe")]
pub fn tcprtt_empty(_ctx: BtfTracePointContext) -> i32 {
    0
}

/// Why a segment was not added to a histogram.
enum Skip {
    /// It did not pass a filter: not an error, nothing to count.
    Filtered,
    /// A field could not be read, or the family is neither IPv4 nor IPv6.
    Unreadable,
    /// The histogram map is full.
    MapFull,
    /// The kernel could not allocate a histogram for a new key just now.
    NoMemory,
}

#[inline(always)]
fn count_failure(result: Result<(), Skip>) {
    match result {
        Ok(()) | Err(Skip::Filtered) => {}
        Err(Skip::Unreadable) => bump(stat::UNREADABLE),
        Err(Skip::MapFull) => bump(stat::DROPPED),
        Err(Skip::NoMemory) => bump(stat::NO_MEMORY),
    }
}

#[inline(always)]
fn bump(index: u32) {
    if let Some(counter) = STATS.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot, only ever touched by this CPU with preemption disabled.
        unsafe { *counter += 1 };
    }
}

/// Reads a field of the socket. `sk` is a BTF-typed pointer and `offset` a known constant
/// to the verifier (it comes from frozen read-only data), so this is a plain load that the
/// kernel guards against faults: no helper call.
#[inline(always)]
fn read<T: Copy>(sk: *const u8, offset: u32) -> T {
    // SAFETY: the verifier checks the access against the kernel's struct layout and turns
    // it into a fault-tolerant load.
    unsafe { core::ptr::read_volatile(sk.wrapping_add(offset as usize).cast::<T>()) }
}

/// An IPv6 address read as four 32-bit loads, the widest that match `in6_addr`'s members.
#[inline(always)]
fn read_in6(sk: *const u8, offset: u32) -> [u8; 16] {
    let mut addr = [0u8; 16];
    for (i, chunk) in addr.chunks_exact_mut(4).enumerate() {
        let word: u32 = read(sk, offset + 4 * i as u32);
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    addr
}

/// An IPv4 address in the IPv4-mapped IPv6 form used by every key and filter.
#[inline(always)]
fn mapped_v4(v4: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, v4[0], v4[1], v4[2], v4[3],
    ]
}

#[inline(always)]
fn is_v4_mapped(addr: &[u8; 16]) -> bool {
    addr[..10].iter().all(|b| *b == 0) && addr[10] == 0xff && addr[11] == 0xff
}

/// Whether `addr` of family `tag` (`family::V4` or `family::V6`) lies in a prefix of `trie`.
#[inline(always)]
fn in_prefixes(trie: &LpmTrie<[u8; FILTER_KEY_LEN], u8>, tag: u32, addr: &[u8; 16]) -> bool {
    let mut data = [0u8; FILTER_KEY_LEN];
    data[0] = tag as u8;
    data[1..17].copy_from_slice(addr);
    trie.get(Key::new(8 + 128, data)).is_some()
}

#[inline(always)]
fn try_record(sk: *const u8) -> Result<(), Skip> {
    let cfg = CONFIG.load();
    // With no filter and no grouping every segment counts and no key is needed: this hook
    // only sees TCP sockets, which are always IPv4 or IPv6, so nothing else needs reading.
    let plain = cfg.filters == 0 && cfg.group_by == group::NONE && cfg.family == family::ANY;
    if plain {
        return add_to_all(read_srtt(sk, &cfg)?);
    }
    let mut key = HistKey::default();
    select(sk, &cfg, &mut key)?;
    let value = read_srtt(sk, &cfg)?;
    if cfg.group_by == group::NONE {
        return add_to_all(value);
    }
    add_sample(&key, value)
}

/// The socket's smoothed RTT in the unit asked for.
#[inline(always)]
fn read_srtt(sk: *const u8, cfg: &ProbeConfig) -> Result<u64, Skip> {
    // srtt_us lies beyond `struct sock`, the type the verifier knows `sk` by, so a direct
    // load is refused; bpf_skc_to_tcp_sock would allow one but needs Linux 5.9, and this
    // probe-read costs the same here (measured) while keeping Linux 5.5 supported.
    // SAFETY: probe-read copes with any address; a bad one is an error, not a fault.
    let srtt_us_x8: u32 =
        unsafe { bpf_probe_read_kernel(sk.wrapping_add(cfg.off_srtt_us as usize).cast::<u32>()) }
            .map_err(|_| Skip::Unreadable)?;
    let value = u64::from(srtt_us_x8 >> 3);
    Ok(if cfg.milliseconds != 0 {
        value / 1000
    } else {
        value
    })
}

/// Adds a sample to the all-traffic histogram. Each array is looked up at a call site of
/// its own: a lookup whose map is known at verification time is inlined by the kernel,
/// one that picks the map at run time stays a helper call.
#[inline(always)]
fn add_to_all(value: u64) -> Result<(), Skip> {
    let slot = if matches!(ACTIVE.get(0), Some(1)) {
        ALL1.get_ptr_mut(0)
    } else {
        ALL0.get_ptr_mut(0)
    }
    .ok_or(Skip::Unreadable)?;
    // SAFETY: this CPU's own copy of a per-CPU value (see `add_sample`).
    add_to(unsafe { &mut *slot }, value);
    Ok(())
}

/// Applies the filters to the socket and fills in its histogram key.
#[inline(always)]
fn select(sk: *const u8, cfg: &ProbeConfig, key: &mut HistKey) -> Result<(), Skip> {
    let sk_family: u16 = read(sk, cfg.off_family);
    let grouped_by_addr = matches!(cfg.group_by, group::LADDR | group::RADDR | group::FLOW);
    let wants_addr = cfg.filters & (filter::LADDR | filter::RADDR) != 0
        || grouped_by_addr
        || (cfg.family != family::ANY && sk_family == AF_INET6);
    if wants_addr {
        let (laddr, raddr) = match sk_family {
            AF_INET => (
                mapped_v4(read(sk, cfg.off_v4_laddr)),
                mapped_v4(read(sk, cfg.off_v4_raddr)),
            ),
            AF_INET6 => (
                read_in6(sk, cfg.off_v6_laddr),
                read_in6(sk, cfg.off_v6_raddr),
            ),
            _ => return Err(Skip::Unreadable),
        };
        // An IPv6 socket talking to an IPv4 peer is IPv4 traffic to the user.
        let shown_family = if is_v4_mapped(&raddr) {
            AF_INET
        } else {
            AF_INET6
        };
        let tag = if shown_family == AF_INET {
            family::V4
        } else {
            family::V6
        };
        if (cfg.family != family::ANY && cfg.family != tag)
            || (cfg.filters & filter::LADDR != 0 && !in_prefixes(&LADDRS, tag, &laddr))
            || (cfg.filters & filter::RADDR != 0 && !in_prefixes(&RADDRS, tag, &raddr))
        {
            return Err(Skip::Filtered);
        }
        if grouped_by_addr {
            key.family = shown_family;
            if cfg.group_by != group::RADDR {
                key.laddr = laddr;
            }
            if cfg.group_by != group::LADDR {
                key.raddr = raddr;
            }
        }
    } else if sk_family != AF_INET && sk_family != AF_INET6 {
        return Err(Skip::Unreadable);
    } else if cfg.family == family::V6 && sk_family == AF_INET {
        return Err(Skip::Filtered);
    }

    let by_lport = matches!(cfg.group_by, group::LPORT | group::FLOW);
    if cfg.filters & filter::LPORT != 0 || by_lport {
        let lport: u16 = read(sk, cfg.off_lport);
        // SAFETY: the map holds plain u8 flags.
        if cfg.filters & filter::LPORT != 0 && unsafe { LPORTS.get(lport) }.is_none() {
            return Err(Skip::Filtered);
        }
        if by_lport {
            key.lport = lport;
        }
    }
    let by_rport = matches!(cfg.group_by, group::RPORT | group::FLOW);
    if cfg.filters & filter::RPORT != 0 || by_rport {
        let rport = u16::from_be(read(sk, cfg.off_rport));
        // SAFETY: the map holds plain u8 flags.
        if cfg.filters & filter::RPORT != 0 && unsafe { RPORTS.get(rport) }.is_none() {
            return Err(Skip::Filtered);
        }
        if by_rport {
            key.rport = rport;
        }
    }
    Ok(())
}

#[inline(always)]
fn add_sample(key: &HistKey, value: u64) -> Result<(), Skip> {
    let hist = match ACTIVE.get(0) {
        Some(1) => &HIST1,
        _ => &HIST0,
    };
    let slot = match hist.get_ptr_mut(key) {
        Some(slot) => slot,
        None => {
            let zero = ZERO.get_ptr(0).ok_or(Skip::MapFull)?;
            // SAFETY: `zero` points at a live map value of the right type. Passing it by
            // reference keeps the 1.5 KiB value off the 512-byte BPF stack.
            let zero: &HistValue = unsafe { &*zero };
            // EEXIST (another CPU inserted the key first) is fine: the lookup finds it.
            let failure = match hist.insert(key, zero, u64::from(BPF_NOEXIST)) {
                Err(E2BIG) => Skip::MapFull,
                _ => Skip::NoMemory,
            };
            hist.get_ptr_mut(key).ok_or(failure)?
        }
    };
    // SAFETY: this CPU's own copy of a per-CPU value. Programs run with migration disabled
    // and the kernel does not re-enter a program on a CPU where it is already running, so
    // nothing else writes this copy meanwhile.
    add_to(unsafe { &mut *slot }, value);
    Ok(())
}

#[inline(always)]
fn add_to(hist: &mut HistValue, value: u64) {
    let bucket = fine_bucket(value);
    // The verifier cannot follow the bit maths that bound `bucket`, and the compiler, which
    // can, would delete the range check. Reading it back through a volatile load hides the
    // bound from the compiler, so the check stays for the verifier to see.
    // SAFETY: a plain read of a local.
    let bucket = unsafe { core::ptr::read_volatile(&bucket) };
    if let Some(bucket) = hist.buckets.get_mut(bucket) {
        *bucket += 1;
    }
    if hist.count == 0 || value < hist.min {
        hist.min = value;
    }
    if value > hist.max {
        hist.max = value;
    }
    hist.count += 1;
    hist.sum += value;
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
