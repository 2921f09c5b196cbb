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
#![feature(core_intrinsics)]
#![allow(internal_features)]

use core::intrinsics::{AtomicOrdering, atomic_cxchg, atomic_xadd};

mod wire;

use aya_ebpf::{
    Global,
    bindings::{BPF_F_NO_PREALLOC, BPF_NOEXIST},
    btf_maps::{self, ArrayOfMaps},
    helpers::bpf_probe_read_kernel,
    macros::{btf_map, btf_tracepoint, fentry, map},
    maps::{Array, HashMap, LpmTrie, PerCpuArray, lpm_trie::Key},
    programs::{BtfTracePointContext, FEntryContext},
};
use tcprtt_common::{
    AF_INET, AF_INET6, FILTER_KEY_LEN, HOT_BUCKETS, HistKey, HistValue, HotFine, HotKey,
    LOG2_SLOTS, Log2Value, ProbeConfig, family, filter, fine_bucket, group, log2_slot, stat,
};

/// `-E2BIG`: what inserting into a full hash map returns.
const E2BIG: i32 = -7;

#[unsafe(no_mangle)]
static CONFIG: Global<ProbeConfig> = Global::new(ProbeConfig::ZERO);

/// Two histogram maps (and two `ALL` arrays), written alternately: userspace flips
/// `ACTIVE`, waits until every program that might still use the old one has returned, then
/// reads and empties it. This is what makes interval reports exact without locking.
///
/// The grouped maps hold one histogram per key shared by all CPUs, updated with atomic
/// adds: memory does not grow with the CPU count. They allocate per key rather than
/// preallocate: a run holds the memory of the keys it sees, not of `--max-keys` twice
/// over, and the map just drained is empty. A burst of 10,240 new keys allocated every
/// one of them, at under 1 µs for a key's first event (BENCHMARKS.md); an allocation that
/// does fail is counted as `no_memory`.
#[map]
static HIST0: HashMap<HistKey, HistValue> = HashMap::with_max_entries(1, BPF_F_NO_PREALLOC);
#[map]
static HIST1: HashMap<HistKey, HistValue> = HashMap::with_max_entries(1, BPF_F_NO_PREALLOC);
/// Each CPU's hot key of `HIST0`/`HIST1` (see `HotFine`), drained with its map; only the
/// srtt programs use them (see `add_sample`).
#[map]
static HOT0: PerCpuArray<HotFine> = PerCpuArray::with_max_entries(1, 0);
#[map]
static HOT1: PerCpuArray<HotFine> = PerCpuArray::with_max_entries(1, 0);
/// The grouped maps when no output needs fine buckets, min or max (`CONFIG.log2_only`);
/// userspace sizes the pair it does not use to one entry.
#[map]
static LOG2_HIST0: HashMap<HistKey, Log2Value> = HashMap::with_max_entries(1, BPF_F_NO_PREALLOC);
#[map]
static LOG2_HIST1: HashMap<HistKey, Log2Value> = HashMap::with_max_entries(1, BPF_F_NO_PREALLOC);
/// Each CPU's hot key of `LOG2_HIST0`/`LOG2_HIST1` (see `HotKey`), drained with its map.
#[map]
static LOG2_HOT0: PerCpuArray<HotKey> = PerCpuArray::with_max_entries(1, 0);
#[map]
static LOG2_HOT1: PerCpuArray<HotKey> = PerCpuArray::with_max_entries(1, 0);
/// The single histogram of the srtt programs when not grouping (the wire programs key even
/// that by interface and side): a per-CPU array needs no key hashing and
/// no atomic operation.
#[map]
static ALL0: PerCpuArray<HistValue> = PerCpuArray::with_max_entries(1, 0);
#[map]
static ALL1: PerCpuArray<HistValue> = PerCpuArray::with_max_entries(1, 0);
/// Index (0 or 1) of the histogram maps being written.
#[map]
static ACTIVE: Array<u32> = Array::with_max_entries(1, 0);
/// The value a new key starts from: empty, with `min` at `u64::MAX` so the first sample
/// sets it (written by userspace; a `HistValue` is too big for the stack).
#[map]
static NEW_HIST: Array<HistValue> = Array::with_max_entries(1, 0);
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
    /// The kernel could not add the key to the histogram map for another reason.
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
    bump_in(&STATS, index);
}

/// Adds `n` to counter `index` of `STATS`.
#[inline(always)]
fn add_to_stat(index: u32, n: u64) {
    if let Some(counter) = STATS.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot, only ever touched by this CPU with preemption disabled.
        unsafe { *counter += n };
    }
}

/// Adds one to counter `index` of a per-CPU counter array.
#[inline(always)]
fn bump_in(counters: &PerCpuArray<u64>, index: u32) {
    if let Some(counter) = counters.get_ptr_mut(index) {
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

/// Sixteen address bytes from four 32-bit words, kept in memory order (no copy loop).
#[inline(always)]
fn addr_from_words(words: [u32; 4]) -> [u8; 16] {
    // SAFETY: both types are 16 plain bytes.
    unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(words) }
}

/// An IPv6 address read as four 32-bit loads, the widest that match `in6_addr`'s members.
#[inline(always)]
fn read_in6(sk: *const u8, offset: u32) -> [u8; 16] {
    addr_from_words([
        read(sk, offset),
        read(sk, offset + 4),
        read(sk, offset + 8),
        read(sk, offset + 12),
    ])
}

/// The third word of an IPv4-mapped address (`::ffff:a.b.c.d`), as stored in memory.
const MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// An IPv4 address in the IPv4-mapped IPv6 form used by every key and filter.
#[inline(always)]
fn mapped_v4(v4: [u8; 4]) -> [u8; 16] {
    addr_from_words([0, 0, MAPPED_WORD, u32::from_ne_bytes(v4)])
}

#[inline(always)]
fn is_v4_mapped(addr: &[u8; 16]) -> bool {
    // SAFETY: 16 plain bytes read as four words.
    let words = unsafe { core::mem::transmute::<[u8; 16], [u32; 4]>(*addr) };
    words[0] == 0 && words[1] == 0 && words[2] == MAPPED_WORD
}

/// Whether `addr` of family `tag` (`family::V4` or `family::V6`) lies in a prefix of `trie`.
/// The key is the tag's word, then the address (see `FILTER_KEY_LEN`), built from words.
#[inline(always)]
fn in_prefixes(trie: &LpmTrie<[u8; FILTER_KEY_LEN], u8>, tag: u32, addr: &[u8; 16]) -> bool {
    // SAFETY: 16 plain bytes read as four words.
    let a = unsafe { core::mem::transmute::<[u8; 16], [u32; 4]>(*addr) };
    let tag_word = u32::from_ne_bytes([tag as u8, 0, 0, 0]);
    // SAFETY: 20 plain bytes either way.
    let data = unsafe {
        core::mem::transmute::<[u32; 5], [u8; FILTER_KEY_LEN]>([tag_word, a[0], a[1], a[2], a[3]])
    };
    trie.get(Key::new(32 + 128, data)).is_some()
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
    let key = select(sk, &cfg)?;
    let value = read_srtt(sk, &cfg)?;
    if cfg.group_by == group::NONE {
        return add_to_all(value);
    }
    add_sample(&key, value, true)
}

/// The socket's smoothed RTT in the unit asked for.
#[inline(always)]
fn read_srtt(sk: *const u8, cfg: &ProbeConfig) -> Result<u64, Skip> {
    // srtt_us lies beyond `struct sock`, the type the verifier knows `sk` by, so a direct
    // load is refused; bpf_skc_to_tcp_sock would allow one but costs the same here
    // (measured), so one probe-read it is.
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
    // SAFETY: this CPU's own copy of a per-CPU value. Programs run with migration disabled
    // and the kernel does not re-enter a program on a CPU where it is already running, so
    // nothing else writes this copy meanwhile.
    add_to(unsafe { &mut *slot }, value);
    Ok(())
}

const NO_ADDR: [u8; 16] = [0; 16];

/// Applies the filters to the socket and returns its histogram key, built in one piece
/// (no zeroing pass): fields the grouping does not use are zero.
#[inline(always)]
fn select(sk: *const u8, cfg: &ProbeConfig) -> Result<HistKey, Skip> {
    let sk_family: u16 = read(sk, cfg.off_family);
    let grouped_by_addr = matches!(cfg.group_by, group::LADDR | group::RADDR | group::FLOW);
    let wants_addr = cfg.filters & (filter::LADDR | filter::RADDR) != 0
        || grouped_by_addr
        || (cfg.family != family::ANY && sk_family == AF_INET6);
    let (mut key_family, mut key_laddr, mut key_raddr) = (0, NO_ADDR, NO_ADDR);
    if wants_addr {
        // Only the addresses a filter or the grouping uses are read, except that an IPv6
        // socket's peer address always is: it says whether the socket talks IPv4.
        let needs_laddr =
            cfg.filters & filter::LADDR != 0 || matches!(cfg.group_by, group::LADDR | group::FLOW);
        let needs_raddr =
            cfg.filters & filter::RADDR != 0 || matches!(cfg.group_by, group::RADDR | group::FLOW);
        let (laddr, raddr, tag) = match sk_family {
            AF_INET => (
                if needs_laddr {
                    mapped_v4(read(sk, cfg.off_v4_laddr))
                } else {
                    NO_ADDR
                },
                if needs_raddr {
                    mapped_v4(read(sk, cfg.off_v4_raddr))
                } else {
                    NO_ADDR
                },
                family::V4,
            ),
            AF_INET6 => {
                let raddr = read_in6(sk, cfg.off_v6_raddr);
                let laddr = if needs_laddr {
                    read_in6(sk, cfg.off_v6_laddr)
                } else {
                    NO_ADDR
                };
                // An IPv6 socket talking to an IPv4 peer is IPv4 traffic to the user.
                let tag = if is_v4_mapped(&raddr) {
                    family::V4
                } else {
                    family::V6
                };
                (laddr, raddr, tag)
            }
            _ => return Err(Skip::Unreadable),
        };
        let shown_family = if tag == family::V4 { AF_INET } else { AF_INET6 };
        if (cfg.family != family::ANY && cfg.family != tag)
            || (cfg.filters & filter::LADDR != 0 && !in_prefixes(&LADDRS, tag, &laddr))
            || (cfg.filters & filter::RADDR != 0 && !in_prefixes(&RADDRS, tag, &raddr))
        {
            return Err(Skip::Filtered);
        }
        if grouped_by_addr {
            key_family = shown_family;
            if cfg.group_by != group::RADDR {
                key_laddr = laddr;
            }
            if cfg.group_by != group::LADDR {
                key_raddr = raddr;
            }
        }
    } else if sk_family != AF_INET && sk_family != AF_INET6 {
        return Err(Skip::Unreadable);
    } else if cfg.family == family::V6 && sk_family == AF_INET {
        return Err(Skip::Filtered);
    }

    let mut key_lport = 0;
    let by_lport = matches!(cfg.group_by, group::LPORT | group::FLOW);
    if cfg.filters & filter::LPORT != 0 || by_lport {
        let lport: u16 = read(sk, cfg.off_lport);
        // SAFETY: the map holds plain u8 flags.
        if cfg.filters & filter::LPORT != 0 && unsafe { LPORTS.get(lport) }.is_none() {
            return Err(Skip::Filtered);
        }
        if by_lport {
            key_lport = lport;
        }
    }
    let mut key_rport = 0;
    let by_rport = matches!(cfg.group_by, group::RPORT | group::FLOW);
    if cfg.filters & filter::RPORT != 0 || by_rport {
        let rport = u16::from_be(read(sk, cfg.off_rport));
        // SAFETY: the map holds plain u8 flags.
        if cfg.filters & filter::RPORT != 0 && unsafe { RPORTS.get(rport) }.is_none() {
            return Err(Skip::Filtered);
        }
        if by_rport {
            key_rport = rport;
        }
    }
    Ok(HistKey {
        family: key_family,
        lport: key_lport,
        rport: key_rport,
        side: 0,
        laddr: key_laddr,
        raddr: key_raddr,
        ifindex: 0,
    })
}

/// Adds a sample to the histogram of `key` in the active grouped map, creating it if new,
/// through this CPU's hot key if `hot_copies`. Each map has a call site of its own so the
/// kernel inlines its lookups.
///
/// Only the srtt programs use hot copies: the kernel never runs a tracing program on a CPU
/// where it is already running, so a CPU's copy is never written twice at once. The wire
/// programs are four, and on a kernel whose softirqs can be preempted one could run while
/// another is halfway through an update.
#[inline(always)]
fn add_sample(key: &HistKey, value: u64, hot_copies: bool) -> Result<(), Skip> {
    let second = matches!(ACTIVE.get(0), Some(1));
    match (CONFIG.load().log2_only != 0, hot_copies, second) {
        (true, true, false) => add_log2_hot(&LOG2_HOT0, &LOG2_HIST0, key, value),
        (true, true, true) => add_log2_hot(&LOG2_HOT1, &LOG2_HIST1, key, value),
        (true, false, false) => add_log2(histogram_of(&LOG2_HIST0, key, new_log2)?, value),
        (true, false, true) => add_log2(histogram_of(&LOG2_HIST1, key, new_log2)?, value),
        (false, true, false) => add_fine_hot(&HOT0, &HIST0, key, value),
        (false, true, true) => add_fine_hot(&HOT1, &HIST1, key, value),
        (false, false, false) => add_shared(histogram_of(&HIST0, key, new_fine)?, value),
        (false, false, true) => add_shared(histogram_of(&HIST1, key, new_fine)?, value),
    }
}

/// Result of a map insert, as the kernel returns it.
type Inserted = Result<(), i32>;

/// The histogram of `key` in `hist`, inserted by `insert` if the key is not there yet.
/// The empty value is only built on that path: zeroing it on every sample would cost more
/// than the rest of the update.
#[inline(always)]
fn histogram_of<V>(
    hist: &HashMap<HistKey, V>,
    key: &HistKey,
    insert: fn(&HashMap<HistKey, V>, &HistKey) -> Inserted,
) -> Result<*mut V, Skip> {
    if let Some(slot) = hist.get_ptr_mut(key) {
        return Ok(slot);
    }
    // EEXIST (another CPU inserted the key first) is fine: the lookup finds it.
    let failure = match insert(hist, key) {
        Err(E2BIG) => Skip::MapFull,
        _ => Skip::NoMemory,
    };
    hist.get_ptr_mut(key).ok_or(failure)
}

/// Inserts an empty log2 histogram (small enough for the stack).
#[inline(always)]
fn new_log2(hist: &HashMap<HistKey, Log2Value>, key: &HistKey) -> Inserted {
    hist.insert(key, Log2Value::ZERO, u64::from(BPF_NOEXIST))
}

/// Inserts an empty fine histogram, copied from `NEW_HIST`: the 808-byte value does not
/// fit the 512-byte BPF stack.
#[inline(always)]
fn new_fine(hist: &HashMap<HistKey, HistValue>, key: &HistKey) -> Inserted {
    let new = NEW_HIST.get_ptr(0).ok_or(E2BIG)?;
    // SAFETY: `new` points at a live map value of the right type.
    let new: &HistValue = unsafe { &*new };
    hist.insert(key, new, u64::from(BPF_NOEXIST))
}

/// The fine bucket of `value`, bounded where the verifier can see it.
#[inline(always)]
fn bucket_of(value: u64) -> usize {
    let bucket = fine_bucket(value);
    // The verifier cannot follow the bit maths that bound `bucket`, and the compiler, which
    // can, would delete the range check at the use. Reading it back through a volatile
    // load hides the bound from the compiler, so the check stays for the verifier to see.
    // SAFETY: a plain read of a local.
    unsafe { core::ptr::read_volatile(&bucket) }
}

/// The log2 slot of `value`, bounded where the verifier can see it (see `bucket_of`).
#[inline(always)]
fn slot_of(value: u64) -> usize {
    let slot = log2_slot(value);
    // SAFETY: a plain read of a local.
    unsafe { core::ptr::read_volatile(&slot) }
}

/// Adds a sample to this CPU's own copy of a per-CPU histogram: plain adds.
#[inline(always)]
fn add_to(hist: &mut HistValue, value: u64) {
    if let Some(bucket) = hist.buckets.get_mut(bucket_of(value)) {
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

/// Retries of a min/max compare-and-swap that another CPU keeps beating; each retry means
/// another CPU stored a new extreme in between, so running out of them needs that many
/// new extremes at once.
const CAS_TRIES: usize = 8;

/// Lowers (`lower`) or raises the value at `p` to `value` with compare-and-swap.
#[inline(always)]
fn cas_extreme(p: *mut u64, value: u64, lower: bool) {
    // SAFETY: `p` points into a live map value; the kernel performs the atomic operations.
    let mut current = unsafe { core::ptr::read_volatile(p) };
    for _ in 0..CAS_TRIES {
        let improves = if lower {
            value < current
        } else {
            value > current
        };
        if !improves {
            return;
        }
        // SAFETY: as above.
        let (seen, swapped) = unsafe {
            atomic_cxchg::<u64, { AtomicOrdering::Relaxed }, { AtomicOrdering::Relaxed }>(
                p, current, value,
            )
        };
        if swapped {
            return;
        }
        current = seen;
    }
    bump(stat::EXTREME_CONTENDED);
}

/// Adds a sample to a histogram shared by all CPUs: atomic adds for the bucket and the sum,
/// and compare-and-swap for min and max, only when the sample is a new extreme. `count` is
/// left alone: it is the buckets' total, which userspace adds up, so every sample costs one
/// atomic add fewer on a cache line all CPUs share.
#[inline(always)]
fn add_shared(hist: *mut HistValue, value: u64) -> Result<(), Skip> {
    // SAFETY: `hist` points at a live map value; every write to it is atomic.
    unsafe {
        if let Some(bucket) = (*hist).buckets.get_mut(bucket_of(value)) {
            atomic_xadd::<u32, u32, { AtomicOrdering::Relaxed }>(bucket, 1);
        }
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*hist).sum, value);
        cas_extreme(&raw mut (*hist).min, value, true);
        cas_extreme(&raw mut (*hist).max, value, false);
    }
    Ok(())
}

/// Adds a sample to a shared log2 histogram: two atomic adds.
#[inline(always)]
fn add_log2(hist: *mut Log2Value, value: u64) -> Result<(), Skip> {
    // SAFETY: `hist` points at a live map value; every write to it is atomic.
    unsafe {
        if let Some(count) = (*hist).slots.get_mut(slot_of(value)) {
            atomic_xadd::<u32, u32, { AtomicOrdering::Relaxed }>(count, 1);
        }
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*hist).sum, value);
    }
    Ok(())
}

/// Makes `key` the CPU's hot key, written word by word for the reason `same_key` gives.
#[inline(always)]
fn set_hot_key(hot_key: &mut HistKey, key: &HistKey) {
    let words = key_words(key);
    // SAFETY: the hot key's storage viewed as its words, written in place.
    let hot_words = unsafe { &mut *(&raw mut *hot_key).cast::<[u32; KEY_WORDS]>() };
    for (to, from) in hot_words.iter_mut().zip(words) {
        *to = from;
    }
}

/// Adds a sample to the fine histogram of `key` through this CPU's hot key (`HotFine`), as
/// `add_log2_hot` does for log2 histograms; a sample whose bucket finds no pair of the copy
/// free moves the copy's samples into the shared map first.
#[inline(always)]
fn add_fine_hot(
    hot: &PerCpuArray<HotFine>,
    hist: &HashMap<HistKey, HistValue>,
    key: &HistKey,
    value: u64,
) -> Result<(), Skip> {
    let hot = hot.get_ptr_mut(0).ok_or(Skip::Unreadable)?;
    // SAFETY: this CPU's own copy of a per-CPU value (see `add_sample`).
    let hot = unsafe { &mut *hot };
    if hot.held != 0 && same_key(&hot.key, key) {
        let bucket = bucket_of(value) as u32 + 1;
        if !hold(hot, bucket, value) {
            move_fine_to_map(hot, hist);
            hold(hot, bucket, value);
        }
        return Ok(());
    }
    add_shared(histogram_of(hist, key, new_fine)?, value)?;
    // Either leaves the copy empty: a copy not held may be as userspace emptied it, with
    // min 0.
    if hot.held != 0 {
        move_fine_to_map(hot, hist);
    } else {
        empty_fine(hot);
    }
    set_hot_key(&mut hot.key, key);
    hot.held = 1;
    Ok(())
}

/// Adds a sample to a hot copy's pair for `bucket` (fine bucket index plus one), or to a
/// free pair; false when every pair holds another bucket.
#[inline(always)]
fn hold(hot: &mut HotFine, bucket: u32, value: u64) -> bool {
    let mut free = HOT_BUCKETS;
    for i in 0..HOT_BUCKETS {
        if hot.buckets[i] == bucket {
            free = i;
            break;
        }
        if hot.buckets[i] == 0 && free == HOT_BUCKETS {
            free = i;
        }
    }
    let (Some(held), Some(count)) = (hot.buckets.get_mut(free), hot.counts.get_mut(free)) else {
        return false;
    };
    *held = bucket;
    *count += 1;
    hot.sum += value;
    hot.min = hot.min.min(value);
    hot.max = hot.max.max(value);
    true
}

/// Moves a fine hot copy's samples into the shared map, as `move_to_map` does for log2
/// copies, leaving the copy's pairs free.
#[inline(always)]
fn move_fine_to_map(hot: &mut HotFine, hist: &HashMap<HistKey, HistValue>) {
    let key = hot.key;
    let Some(shared) = hist.get_ptr_mut(key) else {
        let lost: u32 = hot.counts.iter().sum();
        add_to_stat(stat::DROPPED, u64::from(lost));
        empty_fine(hot);
        return;
    };
    for i in 0..HOT_BUCKETS {
        let n = hot.counts[i];
        let bucket = (hot.buckets[i] as usize).wrapping_sub(1);
        // SAFETY: `shared` points at a live map value; every write to it is atomic.
        unsafe {
            if let Some(total) = (*shared).buckets.get_mut(bucket)
                && n != 0
            {
                atomic_xadd::<u32, u32, { AtomicOrdering::Relaxed }>(total, n);
            }
        }
    }
    // SAFETY: as above.
    unsafe {
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*shared).sum, hot.sum);
        if hot.min != u64::MAX {
            cas_extreme(&raw mut (*shared).min, hot.min, true);
            cas_extreme(&raw mut (*shared).max, hot.max, false);
        }
    }
    empty_fine(hot);
}

/// Frees a fine hot copy's pairs and forgets its samples.
#[inline(always)]
fn empty_fine(hot: &mut HotFine) {
    for i in 0..HOT_BUCKETS {
        hot.buckets[i] = 0;
        hot.counts[i] = 0;
    }
    hot.sum = 0;
    hot.min = u64::MAX;
    hot.max = 0;
}

/// A key as 32-bit words, the widest loads its 4-byte alignment allows on the stack.
const KEY_WORDS: usize = size_of::<HistKey>() / 4;

#[inline(always)]
fn key_words(key: &HistKey) -> [u32; KEY_WORDS] {
    // SAFETY: a padding-free struct of 4-byte alignment read as its words.
    unsafe { core::mem::transmute::<HistKey, [u32; KEY_WORDS]>(*key) }
}

/// Whether two keys are equal, compared word by word with no early exit, which the
/// compiler keeps as plain loads (a `==` on the struct may become a byte-loop `memcmp`).
#[inline(always)]
fn same_key(a: &HistKey, b: &HistKey) -> bool {
    let (a, b) = (key_words(a), key_words(b));
    let mut diff = 0;
    for i in 0..KEY_WORDS {
        diff |= a[i] ^ b[i];
    }
    diff == 0
}

/// Adds a sample to the log2 histogram of `key`, through this CPU's hot key (`HotKey`):
/// to the CPU's own copy when `key` is hot, else straight to the shared map, after which
/// `key` becomes hot and the previous hot key's samples move into the map.
#[inline(always)]
fn add_log2_hot(
    hot: &PerCpuArray<HotKey>,
    hist: &HashMap<HistKey, Log2Value>,
    key: &HistKey,
    value: u64,
) -> Result<(), Skip> {
    let hot = hot.get_ptr_mut(0).ok_or(Skip::Unreadable)?;
    // SAFETY: this CPU's own copy of a per-CPU value (see `add_sample`).
    let hot = unsafe { &mut *hot };
    if hot.held != 0 && same_key(&hot.key, key) {
        if let Some(count) = hot.value.slots.get_mut(slot_of(value)) {
            *count += 1;
        }
        hot.value.sum += value;
        return Ok(());
    }
    add_log2(histogram_of(hist, key, new_log2)?, value)?;
    if hot.held != 0 {
        move_to_map(hot, hist);
    }
    set_hot_key(&mut hot.key, key);
    hot.held = 1;
    Ok(())
}

/// Moves the samples a CPU holds for its hot key into the shared map, leaving the CPU's
/// copy empty. The key is in the map (it became hot only once it was, and userspace
/// deletes keys only from the map it drains, emptying that map's hot copies with it);
/// should it be missing, its samples count as dropped.
#[inline(always)]
fn move_to_map(hot: &mut HotKey, hist: &HashMap<HistKey, Log2Value>) {
    let key = hot.key;
    let Some(shared) = hist.get_ptr_mut(key) else {
        let held: u32 = hot.value.slots.iter().sum();
        add_to_stat(stat::DROPPED, u64::from(held));
        hot.value.slots = [0; LOG2_SLOTS];
        hot.value.sum = 0;
        return;
    };
    for i in 0..LOG2_SLOTS {
        let n = hot.value.slots[i];
        if n != 0 {
            // SAFETY: `shared` points at a live map value; every write to it is atomic.
            unsafe {
                atomic_xadd::<u32, u32, { AtomicOrdering::Relaxed }>(&raw mut (*shared).slots[i], n)
            };
            hot.value.slots[i] = 0;
        }
    }
    // SAFETY: as above.
    unsafe {
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*shared).sum, hot.value.sum)
    };
    hot.value.sum = 0;
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
