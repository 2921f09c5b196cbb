//! Types shared by the eBPF program (`tcprtt-ebpf`) and the loader (`tcprtt`).
//!
//! Everything here is `#[repr(C)]`, padding-free and made of fixed-width integers, so
//! both sides agree on the bytes without any serialisation. The bucket maths lives here
//! too, so the kernel and the renderer cannot disagree on which value lands where.
#![no_std]

pub mod wire;

/// Number of classic log2 slots in a printed histogram (bcc's layout): slot 0 holds 0
/// and 1, slot k holds 2^k..2^(k+1)-1, and the last slot holds everything larger.
pub const LOG2_SLOTS: usize = 27;

/// Linear sub-buckets per power of two in the kernel's log-linear histogram.
pub const SUB_BUCKETS: usize = 8;
const SUB_BITS: u32 = SUB_BUCKETS.trailing_zeros();

/// Fine buckets kept in the kernel: values 0..8 each get their own bucket, each power of
/// two from 2^3 up to 2^(LOG2_SLOTS-2) is split into `SUB_BUCKETS` linear parts, and one
/// overflow bucket holds everything from 2^(LOG2_SLOTS-1) up.
pub const FINE_BUCKETS: usize = SUB_BUCKETS + (LOG2_SLOTS - 1 - 3) * SUB_BUCKETS + 1;

/// Index of the overflow bucket in [`HistValue::buckets`].
pub const OVERFLOW_BUCKET: usize = FINE_BUCKETS - 1;

/// The fine bucket a value lands in. Exact below 8, then within 1/8 of a power of two.
#[inline(always)]
pub fn fine_bucket(value: u64) -> usize {
    if value < SUB_BUCKETS as u64 {
        return value as usize;
    }
    let log2 = 63 - value.leading_zeros();
    if log2 >= (LOG2_SLOTS - 1) as u32 {
        return OVERFLOW_BUCKET;
    }
    let sub = (value >> (log2 - SUB_BITS)) as usize & (SUB_BUCKETS - 1);
    SUB_BUCKETS + (log2 - SUB_BITS) as usize * SUB_BUCKETS + sub
}

/// The classic log2 slot of a value, computed directly (the kernel's [`Log2Value`] path).
#[inline(always)]
pub fn log2_slot(value: u64) -> usize {
    if value < 2 {
        return 0;
    }
    let log2 = (63 - value.leading_zeros()) as usize;
    if log2 >= LOG2_SLOTS - 1 {
        LOG2_SLOTS - 1
    } else {
        log2
    }
}

/// The classic log2 slot that a fine bucket belongs to.
pub const fn log2_slot_of_bucket(bucket: usize) -> usize {
    if bucket < 2 {
        0
    } else if bucket < SUB_BUCKETS {
        (usize::BITS - 1 - bucket.leading_zeros()) as usize
    } else if bucket >= OVERFLOW_BUCKET {
        LOG2_SLOTS - 1
    } else {
        SUB_BITS as usize + (bucket - SUB_BUCKETS) / SUB_BUCKETS
    }
}

/// Smallest value that lands in a fine bucket.
pub const fn bucket_low(bucket: usize) -> u64 {
    if bucket < SUB_BUCKETS {
        bucket as u64
    } else if bucket >= OVERFLOW_BUCKET {
        1 << (LOG2_SLOTS - 1)
    } else {
        let log2 = SUB_BITS as usize + (bucket - SUB_BUCKETS) / SUB_BUCKETS;
        let sub = ((bucket - SUB_BUCKETS) % SUB_BUCKETS) as u64;
        (1 << log2) + sub * (1 << (log2 - SUB_BITS as usize))
    }
}

/// Largest value that lands in a fine bucket (`u64::MAX` for the overflow bucket).
pub const fn bucket_high(bucket: usize) -> u64 {
    if bucket >= OVERFLOW_BUCKET {
        u64::MAX
    } else {
        bucket_low(bucket + 1) - 1
    }
}

/// `sock_common.skc_family` values the program understands.
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// What the histograms are keyed by ([`ProbeConfig::group_by`]).
pub mod group {
    /// One histogram for all traffic, kept in a per-CPU array rather than the hash map.
    pub const NONE: u32 = 0;
    /// One histogram per local address.
    pub const LADDR: u32 = 1;
    /// One histogram per remote address.
    pub const RADDR: u32 = 2;
    /// One histogram per local port.
    pub const LPORT: u32 = 3;
    /// One histogram per remote port.
    pub const RPORT: u32 = 4;
    /// One histogram per connection (both addresses and ports).
    pub const FLOW: u32 = 5;
}

/// Which address families to trace ([`ProbeConfig::family`]). IPv4-mapped IPv6 sockets
/// (an IPv6 socket talking to an IPv4 peer) count as IPv4.
pub mod family {
    /// Both IPv4 and IPv6.
    pub const ANY: u32 = 0;
    /// IPv4 only.
    pub const V4: u32 = 4;
    /// IPv6 only.
    pub const V6: u32 = 6;
}

/// Bytes of an address-filter key (the data of an LPM-trie key): a 4-byte family tag
/// ([`family::V4`] or [`family::V6`] in its first byte, three zero bytes), then the 16-byte
/// address (IPv4 in its IPv4-mapped form), so the program builds it from 32-bit words. The
/// tag keeps an IPv6 prefix such as `::/0` from ever matching an IPv4 socket.
pub const FILTER_KEY_LEN: usize = 20;

/// Bits of [`ProbeConfig::filters`]: which filter maps the program must consult.
pub mod filter {
    pub const LADDR: u32 = 1 << 0;
    pub const RADDR: u32 = 1 << 1;
    pub const LPORT: u32 = 1 << 2;
    pub const RPORT: u32 = 1 << 3;
}

/// Indices into the per-CPU `STATS` counters array. Only the rare outcomes are counted
/// here; segments seen come from the kernel's own run count, and matched ones are the
/// histogram counts plus the dropped ones, so the common path touches no counter.
pub mod stat {
    /// Matched segments that found no room in the histogram map (more keys than
    /// `--max-keys`).
    pub const DROPPED: u32 = 0;
    /// Segments whose srtt could not be read, or of a family other than IPv4/IPv6.
    pub const UNREADABLE: u32 = 1;
    /// Matched segments of a new key for which the kernel could not allocate a histogram
    /// at that moment.
    pub const NO_MEMORY: u32 = 2;
    /// Samples of a grouped histogram whose min or max could not be stored because other
    /// CPUs kept storing new extremes first (the compare-and-swap ran out of retries); the
    /// sample itself is counted, only that histogram's min or max may be off.
    pub const EXTREME_CONTENDED: u32 = 3;
    pub const COUNT: u32 = 4;
}

/// Read-only configuration, written into the program's `.rodata` by the loader before the
/// program is verified. Offsets are byte offsets resolved from the running kernel's BTF.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProbeConfig {
    /// `struct tcp_sock.srtt_us` (smoothed RTT in µs, shifted left by 3).
    pub off_srtt_us: u32,
    /// `struct sock_common.skc_family` (u16).
    pub off_family: u32,
    /// `struct sock_common.skc_rcv_saddr`: IPv4 local address, network order.
    pub off_v4_laddr: u32,
    /// `struct sock_common.skc_daddr`: IPv4 remote address, network order.
    pub off_v4_raddr: u32,
    /// `struct sock_common.skc_v6_rcv_saddr`: IPv6 local address.
    pub off_v6_laddr: u32,
    /// `struct sock_common.skc_v6_daddr`: IPv6 remote address.
    pub off_v6_raddr: u32,
    /// `struct sock_common.skc_num`: local port, host order.
    pub off_lport: u32,
    /// `struct sock_common.skc_dport`: remote port, network order.
    pub off_rport: u32,
    /// Bit set of [`filter`] flags.
    pub filters: u32,
    /// One of the [`family`] constants.
    pub family: u32,
    /// One of the [`group`] constants.
    pub group_by: u32,
    /// 1 to record milliseconds instead of microseconds.
    pub milliseconds: u32,
    /// 1 when no output shows fine buckets, min or max: grouped histograms then go to the
    /// [`Log2Value`] maps, 0 for the [`HistValue`] ones.
    pub log2_only: u32,
}

impl ProbeConfig {
    pub const ZERO: Self = Self {
        off_srtt_us: 0,
        off_family: 0,
        off_v4_laddr: 0,
        off_v4_raddr: 0,
        off_v6_laddr: 0,
        off_v6_raddr: 0,
        off_lport: 0,
        off_rport: 0,
        filters: 0,
        family: 0,
        group_by: 0,
        milliseconds: 0,
        log2_only: 0,
    };
}

/// Key of a histogram. Addresses are 16 bytes; IPv4 (and IPv4-mapped IPv6) addresses are
/// stored as IPv4-mapped IPv6 (`::ffff:a.b.c.d`) so one LPM trie serves both families.
/// Fields that the grouping does not use are zero; the srtt programs leave `side` and
/// `ifindex` at zero, the wire programs always set them (also without a grouping).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HistKey {
    /// `AF_INET` or `AF_INET6` when an address is part of the key, else 0.
    pub family: u16,
    /// Local port, host order.
    pub lport: u16,
    /// Remote port, host order.
    pub rport: u16,
    /// Wire samples: the direction in which the timed TSval crossed the interface, one of
    /// the [`side`] constants. 0 for the srtt source.
    pub side: u16,
    /// Local address, network order.
    pub laddr: [u8; 16],
    /// Remote address, network order.
    pub raddr: [u8; 16],
    /// Wire samples: the index of the interface the round trip was timed at (userspace
    /// names it). 0 for the srtt source (no interface has index 0).
    pub ifindex: u32,
}

/// Values of [`HistKey::side`].
pub mod side {
    /// The TSval left through the interface: the round trip is of the path beyond it.
    pub const EGRESS: u16 = 1;
    /// The TSval came in through the interface: the round trip is of the path on this
    /// side of it (through the host, or the router, to the echoing end).
    pub const INGRESS: u16 = 2;
}

/// How often userspace drains the histogram maps into its own 64-bit totals, at the
/// longest. A 32-bit bucket of one CPU would need over 140 million samples a second to
/// wrap within this time; a CPU handles a few million TCP segments a second at most.
pub const DRAIN_PERIOD_SECS: u64 = 30;

/// One histogram: in the grouped maps shared by all CPUs (atomic adds), in the all-traffic
/// array one CPU's share of it (userspace adds the CPUs up).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HistValue {
    /// Number of samples. Left at 0 in the grouped maps, where it is the buckets' total
    /// and userspace adds it up (one atomic add less per sample).
    pub count: u64,
    /// Sum of the samples, in the recorded unit. First with `min` and `max`, so that with
    /// the buckets of short round trips they share the value's first cache line: a shared
    /// histogram's sample then dirties one line that CPUs pass around, not two.
    pub sum: u64,
    /// Smallest sample (meaningless while `count` is 0).
    pub min: u64,
    /// Largest sample.
    pub max: u64,
    /// Samples per fine bucket (see [`fine_bucket`]). 32 bits halve the value (memory,
    /// cache lines, the copy of a new key); see [`DRAIN_PERIOD_SECS`].
    pub buckets: [u32; FINE_BUCKETS],
    /// Explicit padding, always zero: the value's size stays a multiple of 8.
    pub reserved: u32,
}

impl HistValue {
    pub const ZERO: Self = Self {
        buckets: [0; FINE_BUCKETS],
        reserved: 0,
        count: 0,
        sum: 0,
        min: 0,
        max: 0,
    };
}

/// A grouped histogram when no output needs more than bcc's rows and the average
/// ([`ProbeConfig::log2_only`]): the 27 log2 slots and the sum. A seventh of a
/// [`HistValue`], so a key costs the kernel about what the C design's does, and a sample
/// is two atomic adds with no min/max to compare.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Log2Value {
    /// Sum of the samples, in the recorded unit.
    pub sum: u64,
    /// Samples per classic log2 slot (see [`log2_slot`]); 32 bits for the reason
    /// [`HistValue::buckets`] gives.
    pub slots: [u32; LOG2_SLOTS],
    /// Explicit padding, always zero: the value's size stays a multiple of 8.
    pub reserved: u32,
}

impl Log2Value {
    pub const ZERO: Self = Self {
        sum: 0,
        slots: [0; LOG2_SLOTS],
        reserved: 0,
    };
}

/// A CPU's hot key in the log2 maps: the grouped key it saw last, and the samples of that
/// key it has added here rather than to the shared map. While a CPU keeps seeing one key, a
/// sample is a few plain adds to its own copy: no hashing, no cache line passed between
/// CPUs. When another key comes, the held samples move into the shared map. The key is
/// made hot only once it has its place in that map, so `--max-keys` holds as before.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HotKey {
    /// The key the samples below belong to.
    pub key: HistKey,
    /// 1 while `key` is set (userspace empties a drained copy to 0).
    pub held: u32,
    /// The samples of `key` not yet moved into the shared map.
    pub value: Log2Value,
}

impl HotKey {
    pub const ZERO: Self = Self {
        key: HistKey {
            family: 0,
            lport: 0,
            rport: 0,
            side: 0,
            laddr: [0; 16],
            raddr: [0; 16],
            ifindex: 0,
        },
        held: 0,
        value: Log2Value::ZERO,
    };
}

/// Fine buckets a [`HotFine`] copy holds samples of at once.
pub const HOT_BUCKETS: usize = 4;

/// A CPU's hot key in the fine maps, as [`HotKey`] is in the log2 maps. A key's round
/// trips seldom spread far within a streak of its segments, so the copy holds the counts of
/// a few fine buckets (not all 193, which moving would have to walk), and moves them into
/// the shared map also when a sample needs a fifth.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HotFine {
    /// The key the samples below belong to.
    pub key: HistKey,
    /// 1 while `key` is set (userspace empties a drained copy to 0).
    pub held: u32,
    /// Sum of the samples held.
    pub sum: u64,
    /// Smallest sample held (`u64::MAX` while none is).
    pub min: u64,
    /// Largest sample held.
    pub max: u64,
    /// Fine bucket index plus one of each pair below; 0 for a free pair.
    pub buckets: [u32; HOT_BUCKETS],
    /// Samples held in that bucket.
    pub counts: [u32; HOT_BUCKETS],
}

impl HotFine {
    pub const ZERO: Self = Self {
        key: HotKey::ZERO.key,
        held: 0,
        sum: 0,
        min: 0,
        max: 0,
        buckets: [0; HOT_BUCKETS],
        counts: [0; HOT_BUCKETS],
    };
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: repr(C), padding-free and valid for any bit pattern.
    unsafe impl aya::Pod for super::ProbeConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::HistKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::HistValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Log2Value {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::HotKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::HotFine {}
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    #[test]
    fn fine_buckets_are_contiguous_and_cover_every_value() {
        assert_eq!(bucket_low(0), 0);
        for b in 0..OVERFLOW_BUCKET {
            assert_eq!(bucket_high(b) + 1, bucket_low(b + 1), "bucket {b}");
            assert_eq!(fine_bucket(bucket_low(b)), b);
            assert_eq!(fine_bucket(bucket_high(b)), b);
        }
        assert_eq!(fine_bucket(u64::MAX), OVERFLOW_BUCKET);
    }

    #[test]
    fn log2_slots_follow_bcc_at_every_boundary() {
        let slot = |v: u64| log2_slot_of_bucket(fine_bucket(v));
        assert_eq!(slot(0), 0);
        assert_eq!(slot(1), 0);
        for k in 1..LOG2_SLOTS - 1 {
            assert_eq!(slot(1 << k), k, "2^{k}");
            assert_eq!(slot((1 << (k + 1)) - 1), k, "2^{}-1", k + 1);
        }
        assert_eq!(slot(1 << (LOG2_SLOTS - 1)), LOG2_SLOTS - 1);
        assert_eq!(slot(u64::MAX), LOG2_SLOTS - 1);
    }

    #[test]
    fn direct_log2_slot_agrees_with_the_fine_buckets_slot() {
        let mut values = std::vec![0, 1, u64::MAX];
        for k in 1..64 {
            values.extend([(1u64 << k) - 1, 1 << k, (1 << k) + 1]);
        }
        for v in values {
            assert_eq!(log2_slot(v), log2_slot_of_bucket(fine_bucket(v)), "{v}");
        }
    }

    #[test]
    fn sub_buckets_are_an_eighth_of_their_power_of_two() {
        assert_eq!(fine_bucket(8), 8);
        assert_eq!(fine_bucket(9), 9);
        assert_eq!(fine_bucket(16), 16);
        assert_eq!(fine_bucket(17), 16);
        assert_eq!(fine_bucket(18), 17);
        assert_eq!(bucket_low(fine_bucket(40_000)), 36_864);
        assert_eq!(bucket_high(fine_bucket(40_000)), 40_959);
    }

    #[test]
    fn shared_types_have_no_padding() {
        use core::mem::size_of;
        assert_eq!(size_of::<ProbeConfig>(), 13 * 4);
        assert_eq!(size_of::<HistKey>(), 4 * 2 + 16 + 16 + 4);
        assert_eq!(size_of::<HistValue>(), (FINE_BUCKETS + 1) * 4 + 4 * 8);
        assert_eq!(size_of::<Log2Value>(), 8 + (LOG2_SLOTS + 1) * 4);
        assert_eq!(
            size_of::<HotKey>(),
            size_of::<HistKey>() + 4 + size_of::<Log2Value>()
        );
        assert_eq!(
            size_of::<HotFine>(),
            size_of::<HistKey>() + 4 + 3 * 8 + 2 * 4 * HOT_BUCKETS
        );
    }
}
