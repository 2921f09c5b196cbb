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

use aya_ebpf::{
    Global,
    bindings::{BPF_F_NO_PREALLOC, BPF_NOEXIST},
    helpers::bpf_probe_read_kernel,
    macros::{btf_tracepoint, fentry, map},
    maps::{Array, HashMap, LpmTrie, PerCpuArray, PerCpuHashMap, lpm_trie::Key},
    programs::{BtfTracePointContext, FEntryContext},
};
use tcprtt_common::{
    AF_INET, AF_INET6, HistKey, HistValue, ProbeConfig, filter, fine_bucket, group, stat,
};

#[unsafe(no_mangle)]
static CONFIG: Global<ProbeConfig> = Global::new(ProbeConfig::ZERO);

/// Two histogram maps, written alternately: userspace flips `ACTIVE`, waits until every
/// program that might still use the old map has returned, then reads and empties it. This
/// is what makes interval reports exact without locking.
#[map]
static HIST0: PerCpuHashMap<HistKey, HistValue> =
    PerCpuHashMap::with_max_entries(1, BPF_F_NO_PREALLOC);
#[map]
static HIST1: PerCpuHashMap<HistKey, HistValue> =
    PerCpuHashMap::with_max_entries(1, BPF_F_NO_PREALLOC);
/// Index (0 or 1) of the histogram map being written.
#[map]
static ACTIVE: Array<u32> = Array::with_max_entries(1, 0);
/// An all-zero histogram to insert new keys with: a `HistValue` is too big for the stack.
#[map]
static ZERO: PerCpuArray<HistValue> = PerCpuArray::with_max_entries(1, 0);
/// Event counters, indexed by `tcprtt_common::stat`; cumulative over the whole run.
#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::COUNT, 0);

/// Address filters: a segment passes when its address lies in any stored prefix.
#[map]
static LADDRS: LpmTrie<[u8; 16], u8> = LpmTrie::with_max_entries(1, 0);
#[map]
static RADDRS: LpmTrie<[u8; 16], u8> = LpmTrie::with_max_entries(1, 0);
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

/// Why a segment was not added to a histogram.
enum Skip {
    /// It did not pass a filter: not an error, nothing to count.
    Filtered,
    /// Its socket could not be read or has an unknown family.
    Unreadable,
    /// The histogram map is full.
    MapFull,
}

#[inline(always)]
fn count_failure(result: Result<(), Skip>) {
    match result {
        Ok(()) | Err(Skip::Filtered) => {}
        Err(Skip::Unreadable) => bump(stat::UNREADABLE),
        Err(Skip::MapFull) => bump(stat::DROPPED),
    }
}

#[inline(always)]
fn bump(index: u32) {
    if let Some(counter) = STATS.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot, only ever touched by this CPU with preemption disabled.
        unsafe { *counter += 1 };
    }
}

#[inline(always)]
fn read<T>(sk: *const u8, offset: u32) -> Result<T, Skip> {
    // SAFETY: probe-read copes with any address; a bad one is an error, not a fault.
    unsafe { bpf_probe_read_kernel(sk.wrapping_add(offset as usize).cast::<T>()) }
        .map_err(|_| Skip::Unreadable)
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

#[inline(always)]
fn in_prefixes(trie: &LpmTrie<[u8; 16], u8>, addr: [u8; 16]) -> bool {
    trie.get(Key::new(128, addr)).is_some()
}

#[inline(always)]
fn try_record(sk: *const u8) -> Result<(), Skip> {
    bump(stat::SEEN);
    let cfg = CONFIG.load();

    let family: u16 = read(sk, cfg.off_family)?;
    let wants_addr = cfg.filters & (filter::LADDR | filter::RADDR) != 0
        || cfg.group_by != group::NONE
        || (cfg.family != 0 && family == AF_INET6);
    let mut key = HistKey::default();
    if wants_addr {
        let (laddr, raddr) = match family {
            AF_INET => (
                mapped_v4(read(sk, cfg.off_v4_laddr)?),
                mapped_v4(read(sk, cfg.off_v4_raddr)?),
            ),
            AF_INET6 => (read(sk, cfg.off_v6_laddr)?, read(sk, cfg.off_v6_raddr)?),
            _ => return Err(Skip::Unreadable),
        };
        // An IPv6 socket talking to an IPv4 peer is IPv4 traffic to the user.
        let shown_family = if is_v4_mapped(&raddr) {
            AF_INET
        } else {
            AF_INET6
        };
        let family_ok = match cfg.family {
            4 => shown_family == AF_INET,
            6 => shown_family == AF_INET6,
            _ => true,
        };
        if !family_ok
            || (cfg.filters & filter::LADDR != 0 && !in_prefixes(&LADDRS, laddr))
            || (cfg.filters & filter::RADDR != 0 && !in_prefixes(&RADDRS, raddr))
        {
            return Err(Skip::Filtered);
        }
        match cfg.group_by {
            group::LADDR => key.addr = laddr,
            group::RADDR => key.addr = raddr,
            _ => {}
        }
        if cfg.group_by != group::NONE {
            key.family = shown_family;
        }
    } else if family != AF_INET && family != AF_INET6 {
        return Err(Skip::Unreadable);
    } else if cfg.family == 6 && family == AF_INET {
        return Err(Skip::Filtered);
    }

    if cfg.filters & filter::LPORT != 0 {
        let lport: u16 = read(sk, cfg.off_lport)?;
        // SAFETY: the map holds plain u8 flags.
        if unsafe { LPORTS.get(lport) }.is_none() {
            return Err(Skip::Filtered);
        }
    }
    if cfg.filters & filter::RPORT != 0 {
        let rport: u16 = read(sk, cfg.off_rport)?;
        // SAFETY: the map holds plain u8 flags.
        if unsafe { RPORTS.get(u16::from_be(rport)) }.is_none() {
            return Err(Skip::Filtered);
        }
    }
    bump(stat::MATCHED);

    let srtt_us_x8: u32 = read(sk, cfg.off_srtt_us)?;
    let mut value = u64::from(srtt_us_x8 >> 3);
    if cfg.milliseconds != 0 {
        value /= 1000;
    }
    add_sample(&key, value)
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
            let _ = hist.insert(key, zero, u64::from(BPF_NOEXIST));
            hist.get_ptr_mut(key).ok_or(Skip::MapFull)?
        }
    };
    // SAFETY: this CPU's own copy of a per-CPU value; programs run with migration disabled
    // and do not nest on one CPU for this hook, so nothing else writes it meanwhile.
    let hist = unsafe { &mut *slot };
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
    Ok(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
