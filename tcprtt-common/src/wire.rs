//! Types shared by the wire programs (TC hooks timing TCP timestamps on an interface) and
//! their loader. Same rules as the crate root: `#[repr(C)]`, padding-free, fixed widths.

/// One direction of a TCP connection as seen on one interface: the side that sent a
/// segment (`s*`) and the side it is addressed to (`d*`). IPv4 addresses are stored
/// IPv4-mapped, like every address in [`crate::HistKey`]. The interface is part of the
/// key: a forwarded flow that crosses two watched interfaces is timed at each.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// Ports, host order.
    pub sport: u16,
    pub dport: u16,
    /// `AF_INET` or `AF_INET6`.
    pub family: u16,
    /// Explicit padding, always zero.
    pub reserved: u16,
    /// Index of the interface the segment crossed.
    pub ifindex: u32,
}

impl FlowKey {
    /// The other direction of the same connection.
    #[inline(always)]
    pub fn reversed(&self) -> Self {
        Self {
            saddr: self.daddr,
            daddr: self.saddr,
            sport: self.dport,
            dport: self.sport,
            family: self.family,
            reserved: 0,
            ifindex: self.ifindex,
        }
    }
}

/// What the program remembers about one direction of a connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowState {
    /// Newest TSval this direction carried (valid with [`flow::HAS_TSVAL`]).
    pub last_tsval: u32,
    /// Newest TSecr this direction carried (valid with [`flow::HAS_TSECR`]): a TSecr
    /// equal to it is not a first echo.
    pub last_tsecr: u32,
    /// Highest ACK this direction carried (valid with [`flow::HAS_ACK`]).
    pub max_ack: u32,
    /// Bit set of [`flow`] flags.
    pub flags: u32,
}

/// Bits of [`FlowState::flags`].
pub mod flow {
    pub const HAS_TSVAL: u32 = 1 << 0;
    pub const HAS_TSECR: u32 = 1 << 1;
    pub const HAS_ACK: u32 = 1 << 2;
    /// This direction's SYN went by: every ACK it sent since was seen, so its first ACK
    /// already moves past all earlier ones.
    pub const SAW_SYN: u32 = 1 << 3;
    /// Created by a segment without the timestamps option (counted once as such).
    pub const NO_TS: u32 = 1 << 4;
}

/// A TSval waiting for its first echo: the direction that sent it, and the value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PendingKey {
    pub flow: FlowKey,
    pub tsval: u32,
}

/// When and which way a pending TSval crossed the interface.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pending {
    /// `bpf_ktime_get_ns()` when it was first seen.
    pub sent_ns: u64,
    /// One of the [`crate::side`] constants.
    pub side: u16,
    /// Explicit padding, always zero.
    pub reserved: [u16; 3],
}

/// Read-only configuration of the wire programs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WireConfig {
    /// A TSval whose echo comes later than this is not timed (and is counted as aged).
    pub max_age_ns: u64,
}

impl WireConfig {
    pub const ZERO: Self = Self { max_age_ns: 0 };
}

/// Default for [`WireConfig::max_age_ns`]: 10 s.
pub const DEFAULT_MAX_AGE_NS: u64 = 10_000_000_000;

/// Indices into the per-CPU `WIRE_STATS` counters; all cumulative.
pub mod wstat {
    /// TCP segments parsed (with or without timestamps).
    pub const TCP: u32 = 0;
    /// IPv4/IPv6 packets of another protocol (UDP, ICMP, ...): ignored.
    pub const NOT_TCP: u32 = 1;
    /// Frames that are neither IPv4 nor IPv6 (ARP, LLDP, two VLAN tags, ...).
    pub const OTHER_L3: u32 = 2;
    /// IPv6 packets with extension headers, which the program does not walk.
    pub const IPV6_EXT: u32 = 3;
    /// IPv4 fragments.
    pub const FRAGMENT: u32 = 4;
    /// Headers cut short or inconsistent (lengths, version nibble).
    pub const MALFORMED: u32 = 5;
    /// TCP segments without the timestamps option.
    pub const NO_TS_SEGMENTS: u32 = 6;
    /// Connection directions first seen without the timestamps option.
    pub const NO_TS_FLOWS: u32 = 7;
    /// TSvals recorded, waiting for their echo.
    pub const RECORDED: u32 = 8;
    /// TSvals not recorded because the pending map was full.
    pub const PENDING_FULL: u32 = 9;
    /// First echoes of a recorded TSval.
    pub const ECHOED: u32 = 10;
    /// First echoes on a segment whose ACK did not move past earlier ACKs (RTTM rule):
    /// not timed.
    pub const NOT_ADVANCING: u32 = 11;
    /// First echoes later than the age limit: not timed.
    pub const AGED: u32 = 12;
    /// Timed samples outside the filters.
    pub const FILTERED: u32 = 13;
    /// New connection directions the kernel could not store.
    pub const FLOW_FULL: u32 = 14;
    pub const COUNT: u32 = 15;
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: repr(C), padding-free and valid for any bit pattern.
    unsafe impl aya::Pod for super::FlowKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FlowState {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PendingKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Pending {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::WireConfig {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn wire_types_have_no_padding() {
        assert_eq!(size_of::<FlowKey>(), 16 + 16 + 4 * 2 + 4);
        assert_eq!(size_of::<FlowState>(), 4 * 4);
        assert_eq!(size_of::<PendingKey>(), size_of::<FlowKey>() + 4);
        assert_eq!(size_of::<Pending>(), 8 + 2 * 4);
        assert_eq!(size_of::<WireConfig>(), 8);
    }

    #[test]
    fn reversing_twice_is_the_same_direction() {
        let k = FlowKey {
            saddr: [1; 16],
            daddr: [2; 16],
            sport: 3,
            dport: 4,
            family: crate::AF_INET6,
            reserved: 0,
            ifindex: 7,
        };
        let r = k.reversed();
        assert_eq!(
            (r.saddr, r.daddr, r.sport, r.dport, r.ifindex),
            ([2; 16], [1; 16], 4, 3, 7)
        );
        assert_eq!(r.reversed(), k);
    }
}
