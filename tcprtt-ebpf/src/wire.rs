//! The wire source: round trips timed from TCP timestamps by TC programs on an interface,
//! for every TCP flow that passes it, local or forwarded.
//!
//! A TSval is recorded (with the time) the first time its direction carries it, on a
//! segment with payload, SYN or FIN. The first segment of the other direction that echoes
//! it in TSecr ends the round trip, which is timed only if that segment's ACK moves past
//! every ACK its direction sent before (RFC 7323's RTTM rule): an echo on a segment that
//! acknowledges nothing new is an old TS.Recent sent after an idle time, not a round trip.
//! The sample belongs to the side that sent the TSval (`laddr`/`lport`), measured from
//! this interface to the echoing side (`raddr`/`rport`) and back; its key also holds the
//! interface and the direction the TSval crossed it in (its side: egress, the path beyond
//! the interface; ingress, the path on this side of it). Each direction of an interface
//! has a program of its own, as nothing in an skb tells a TC program where it runs.
//!
//! Samples go into the same histograms as the srtt programs (see the crate root), so
//! filters, groupings and exact intervals work the same way.

use core::ptr::read_unaligned;

use aya_ebpf::{
    Global,
    bindings::BPF_NOEXIST,
    helpers::{bpf_ktime_get_ns, bpf_skb_load_bytes},
    macros::{classifier, map},
    maps::{HashMap, LruHashMap, PerCpuArray},
    programs::TcContext,
};
use tcprtt_common::{
    AF_INET, AF_INET6, HistKey, family, filter, group, side,
    wire::{FlowKey, FlowState, Pending, PendingKey, WireConfig, flow, wstat},
};

use super::{
    CONFIG, E2BIG, LADDRS, LPORTS, RADDRS, RPORTS, add_sample, bump_in, count_failure, in_prefixes,
    mapped_v4,
};

/// "No verdict": the packet goes on to the next program or filter, then on its way.
const TC_ACT_UNSPEC: i32 = -1;

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPPROTO_TCP: u8 = 6;

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

#[unsafe(no_mangle)]
static WIRE_CONFIG: Global<WireConfig> = Global::new(WireConfig::ZERO);

/// Per direction of each connection seen: newest TSval, TSecr and ACK. An LRU map: when
/// it is full the least recently active direction is forgotten, and the rules below only
/// time what they can prove again once a direction is new (see `track`). The loader sets
/// the real sizes; the srtt programs leave these maps at one entry.
#[map]
static WIRE_FLOWS: LruHashMap<FlowKey, FlowState> = LruHashMap::with_max_entries(1, 0);
/// TSvals waiting for their first echo, with the time they were first seen and their
/// side. A plain hash map so that a full map fails the insert and is counted; echoes
/// delete their entry, userspace deletes (and counts) entries older than the age limit.
#[map]
static WIRE_PENDING: HashMap<PendingKey, Pending> = HashMap::with_max_entries(1, 0);
/// Counters indexed by `tcprtt_common::wire::wstat`.
#[map]
static WIRE_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(wstat::COUNT, 0);

/// For the ingress of interfaces whose frames start with an Ethernet header (veth, eth,
/// bridges). Names stay within the kernel's 15 bytes, so tools show them whole.
#[classifier]
pub fn tcprtt_eth_in(ctx: TcContext) -> i32 {
    on_packet(&ctx, true, side::INGRESS);
    TC_ACT_UNSPEC
}

/// For the egress of Ethernet interfaces.
#[classifier]
pub fn tcprtt_eth_out(ctx: TcContext) -> i32 {
    on_packet(&ctx, true, side::EGRESS);
    TC_ACT_UNSPEC
}

/// For the ingress of interfaces without a link-layer header (TUN, PPP, WireGuard, IP
/// tunnels): the packet starts at the IP header.
#[classifier]
pub fn tcprtt_ip_in(ctx: TcContext) -> i32 {
    on_packet(&ctx, false, side::INGRESS);
    TC_ACT_UNSPEC
}

/// For the egress of interfaces without a link-layer header.
#[classifier]
pub fn tcprtt_ip_out(ctx: TcContext) -> i32 {
    on_packet(&ctx, false, side::EGRESS);
    TC_ACT_UNSPEC
}

/// Does nothing: `cargo xtask bench` attaches it as the cost floor of a TC program.
#[classifier]
pub fn tcprtt_wire_empty(_ctx: TcContext) -> i32 {
    TC_ACT_UNSPEC
}

#[inline(always)]
fn bump(index: u32) {
    bump_in(&WIRE_STATS, index);
}

/// `a` is later than `b` in 32-bit sequence space (TCP sequence numbers and timestamps
/// wrap).
#[inline(always)]
fn after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

/// A TCP segment's fields the timing needs.
struct Segment {
    flow: FlowKey,
    ack: u32,
    tsval: u32,
    tsecr: u32,
    flags: u8,
    /// It carries payload bytes.
    payload: bool,
    /// It has the timestamps option (`tsval`, `tsecr` are valid).
    has_ts: bool,
}

/// Bytes of IP and TCP headers copied out of a packet: an IPv4 header with options and a
/// TCP header with options take at most 120.
const HEADERS_LEN: usize = 128;

/// The IP and TCP headers of a packet, copied so that the IP header starts on a 4-byte
/// boundary: every field the program reads then lies in an aligned 32-bit word (IP
/// headers and TCP headers are multiples of 4 bytes), one load each.
#[repr(C, align(8))]
struct Headers([u8; HEADERS_LEN]);

impl Headers {
    /// The big-endian 32-bit word at byte `at`, a multiple of 4 within the copy. The
    /// mask changes no such offset; it shows the verifier the bound.
    #[inline(always)]
    fn word(&self, at: usize) -> u32 {
        let at = at & (HEADERS_LEN - 4);
        // SAFETY: `at` is a multiple of 4 and `at + 4 <= HEADERS_LEN`, and the buffer is
        // 8-byte aligned: an aligned read inside it.
        u32::from_be(unsafe { self.0.as_ptr().add(at).cast::<u32>().read() })
    }
}

/// Working memory of one program run. The keys are too big for the 512-byte BPF stack
/// once the compiler has inlined everything, so they live in a per-CPU slot. Runs on one
/// CPU never overlap: egress runs with bottom halves disabled and ingress in a bottom
/// half, and a program finishes before the packet moves on.
struct Scratch {
    headers: Headers,
    seg: Segment,
    pending: PendingKey,
    /// The side of the program run, which a TSval recorded now is on.
    side: u16,
    hist: HistKey,
}

#[map]
static WIRE_SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
fn on_packet(ctx: &TcContext, has_l2: bool, side: u16) {
    let Some(scratch) = WIRE_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's own slot; see `Scratch`.
    let scratch = unsafe { &mut *scratch };
    scratch.side = side;
    // SAFETY: the program's own context.
    scratch.seg.flow.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    match parse(ctx, has_l2, scratch) {
        Ok(()) => {
            bump(wstat::TCP);
            track(scratch);
        }
        Err(stat) => bump(stat),
    }
}

/// The big-endian 16-bit word at `offset` of the packet's linear part (link-layer
/// headers always lie there).
#[inline(always)]
fn be16(ctx: &TcContext, offset: usize) -> Result<u16, u32> {
    let start = ctx.data();
    // The comparison against `data_end` is what lets the verifier accept the load.
    if start + offset + 2 > ctx.data_end() {
        return Err(wstat::MALFORMED);
    }
    // SAFETY: inside the packet (checked); packet data has no alignment guarantee.
    Ok(u16::from_be(unsafe {
        read_unaligned((start + offset) as *const u16)
    }))
}

/// Copies `want` (1..=HEADERS_LEN) bytes of the packet from `l3` on into `h`; returns how
/// many it copied. It reads paged packets too and leaves the packet as it is (no pull into
/// the linear part). A copy within the linear part is a plain memcpy; one that reaches
/// into the pages costs a walk of them.
#[inline(always)]
fn copy_headers(ctx: &TcContext, l3: usize, want: usize, h: &mut Headers) -> Result<usize, u32> {
    // The verifier must see the length within 1..=HEADERS_LEN on its own; the compiler
    // knows it already and would drop a clamp, so the clamp works on a copy it cannot see
    // through. For 1..=128 it changes nothing.
    // SAFETY: a plain read of a local.
    let n = unsafe { core::ptr::read_volatile(&want) };
    let n = (n.wrapping_sub(1) & (HEADERS_LEN - 1)) + 1;
    // SAFETY: the destination is a live buffer of HEADERS_LEN bytes, `n` at most that.
    let copied = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb.cast(),
            l3 as u32,
            h.0.as_mut_ptr().cast(),
            n as u32,
        )
    };
    if copied != 0 {
        return Err(wstat::MALFORMED);
    }
    Ok(n)
}

/// Makes sure the first `need` bytes of the headers are in `h`, copying all `available`
/// ones when they are not.
#[inline(always)]
fn copy_more(
    ctx: &TcContext,
    l3: usize,
    need: usize,
    available: usize,
    h: &mut Headers,
) -> Result<usize, u32> {
    if need > available {
        return Err(wstat::MALFORMED);
    }
    copy_headers(ctx, l3, available, h)
}

/// Parses a frame down to the TCP timestamps option into `scratch.seg`. `Err` carries
/// the counter of the reason it is not a usable TCP segment.
#[inline(always)]
fn parse(ctx: &TcContext, has_l2: bool, scratch: &mut Scratch) -> Result<(), u32> {
    let (l3, ethertype) = if has_l2 {
        match be16(ctx, 12)? {
            ETH_P_8021Q | ETH_P_8021AD => (18, be16(ctx, 16)?),
            other => (14, other),
        }
    } else {
        // `protocol` holds the big-endian EtherType in its low 16 bits.
        (0, u16::from_be(ctx.skb.protocol() as u16))
    };
    if ethertype != ETH_P_IP && ethertype != ETH_P_IPV6 {
        return Err(wstat::OTHER_L3);
    }
    // The IP and TCP headers are copied out (`copy_headers`): usually only the bytes in
    // the packet's linear part, where drivers and the stack put the headers; all of them
    // when the headers turn out to reach further. Bytes past `n` are left from earlier
    // packets: every read below is checked against `n`.
    let available = (ctx.len() as usize).saturating_sub(l3).min(HEADERS_LEN);
    if available < 20 {
        return Err(wstat::MALFORMED);
    }
    let linear = ctx.data_end().saturating_sub(ctx.data() + l3);
    let h = &mut scratch.headers;
    let mut n = copy_headers(ctx, l3, available.min(linear.max(40)), h)?;
    let seg = &mut scratch.seg;
    let flow = &mut seg.flow;
    let first = h.word(0);
    let (l4, ip_payload) = if ethertype == ETH_P_IP {
        let ihl = ((first >> 24) & 0x0f) as usize * 4;
        if first >> 28 != 4 || ihl < 20 {
            return Err(wstat::MALFORMED);
        }
        if h.word(4) & 0x3fff != 0 {
            return Err(wstat::FRAGMENT);
        }
        if (h.word(8) >> 16) as u8 != IPPROTO_TCP {
            return Err(wstat::NOT_TCP);
        }
        let total = (first & 0xffff) as usize;
        // A zero total length marks a BIG TCP super-packet: its length is the skb's.
        let total = if total == 0 {
            (ctx.len() as usize).saturating_sub(l3)
        } else {
            total
        };
        if total < ihl {
            return Err(wstat::MALFORMED);
        }
        flow.family = AF_INET;
        flow.saddr = mapped_v4(h.word(12).to_be_bytes());
        flow.daddr = mapped_v4(h.word(16).to_be_bytes());
        (ihl, total - ihl)
    } else {
        if first >> 28 != 6 || available < 40 {
            return Err(wstat::MALFORMED);
        }
        let second = h.word(4);
        match (second >> 8) as u8 {
            IPPROTO_TCP => {}
            // Hop-by-hop, routing, fragment, destination options, AH, mobility, HIP,
            // shim6 and the two experimental values: a header we do not walk.
            0 | 43 | 44 | 60 | 51 | 135 | 139 | 140 | 253 | 254 => {
                return Err(wstat::IPV6_EXT);
            }
            _ => return Err(wstat::NOT_TCP),
        }
        let payload = (second >> 16) as usize;
        let payload = if payload == 0 {
            (ctx.len() as usize).saturating_sub(l3 + 40)
        } else {
            payload
        };
        flow.family = AF_INET6;
        for (i, chunk) in flow.saddr.chunks_exact_mut(4).enumerate() {
            chunk.copy_from_slice(&h.word(8 + 4 * i).to_be_bytes());
        }
        for (i, chunk) in flow.daddr.chunks_exact_mut(4).enumerate() {
            chunk.copy_from_slice(&h.word(24 + 4 * i).to_be_bytes());
        }
        (40, payload)
    };

    if l4 + 20 > n {
        n = copy_more(ctx, l3, l4 + 20, available, h)?;
    }
    let ports = h.word(l4);
    flow.sport = (ports >> 16) as u16;
    flow.dport = ports as u16;
    flow.reserved = 0;
    seg.ack = h.word(l4 + 8);
    let doff_flags = h.word(l4 + 12);
    let doff = ((doff_flags >> 28) as usize) * 4;
    seg.flags = (doff_flags >> 16) as u8;
    if doff < 20 || ip_payload < doff {
        return Err(wstat::MALFORMED);
    }
    if l4 + doff > n {
        copy_more(ctx, l3, l4 + doff, available, h)?;
    }
    seg.payload = ip_payload > doff;
    timestamps(h, l4 + 20, doff - 20, seg)
}

/// Finds the timestamps option (kind 8, length 10) among the `len` bytes of options at
/// byte `start` of the copied headers.
#[inline(always)]
fn timestamps(h: &Headers, start: usize, len: usize, seg: &mut Segment) -> Result<(), u32> {
    seg.has_ts = false;
    // Linux and most stacks put NOP, NOP, TS first on every segment but the SYN.
    if len >= 12 && h.word(start) == 0x0101_080a {
        seg.tsval = h.word(start + 4);
        seg.tsecr = h.word(start + 8);
        seg.has_ts = true;
        return Ok(());
    }
    // Bounded by `len` alone: every step moves `i` forward by at least one byte, so the
    // walk ends within `len` (at most 40) steps. A separate step counter would differ in
    // every state and keep the verifier from pruning any. The verifier must see `len`
    // bounded itself: read back where the compiler cannot follow, the mask stays (and
    // changes nothing for 0..=40), and so do the bounds checks of each read below.
    // SAFETY: a plain read of a local.
    let len = unsafe { core::ptr::read_volatile(&len) } & 63;
    let opts = &h.0;
    let mut i = 0;
    let mut found = None;
    while i < len {
        let Some(&kind) = opts.get(start + i) else {
            break;
        };
        match kind {
            0 => break,
            1 => i += 1,
            _ => {
                let size = usize::from(*opts.get(start + i + 1).ok_or(wstat::MALFORMED)?);
                if kind == 8 && size == 10 {
                    found = Some(start + i);
                    break;
                }
                if size < 2 {
                    return Err(wstat::MALFORMED);
                }
                i += size;
            }
        }
    }
    let Some(at) = found else {
        return Ok(());
    };
    if at + 10 > start + len {
        return Err(wstat::MALFORMED);
    }
    let value = opts.get(at + 2..at + 10).ok_or(wstat::MALFORMED)?;
    seg.tsval = u32::from_be_bytes([value[0], value[1], value[2], value[3]]);
    seg.tsecr = u32::from_be_bytes([value[4], value[5], value[6], value[7]]);
    seg.has_ts = true;
    Ok(())
}

/// Applies the recording and echo rules to one segment.
#[inline(always)]
fn track(scratch: &mut Scratch) {
    let seg = &scratch.seg;
    let direction = &seg.flow;
    let syn = seg.flags & TCP_SYN != 0;
    if !seg.has_ts {
        bump(wstat::NO_TS_SEGMENTS);
        // Resets often carry no options even on connections with timestamps.
        if seg.flags & TCP_RST == 0 && WIRE_FLOWS.get_ptr(direction).is_none() {
            let state = &FlowState {
                flags: flow::NO_TS,
                ..FlowState::default()
            };
            if WIRE_FLOWS
                .insert(direction, state, u64::from(BPF_NOEXIST))
                .is_ok()
            {
                bump(wstat::NO_TS_FLOWS);
            }
        }
        return;
    }

    let state = match WIRE_FLOWS.get_ptr_mut(direction) {
        Some(state) if !syn => state,
        // A new direction, or a SYN (re)starting one: nothing earlier counts.
        _ => {
            let fresh = &FlowState {
                flags: if syn { flow::SAW_SYN } else { 0 },
                ..FlowState::default()
            };
            if WIRE_FLOWS.insert(direction, fresh, 0).is_err() {
                bump(wstat::FLOW_FULL);
                return;
            }
            match WIRE_FLOWS.get_ptr_mut(direction) {
                Some(state) => state,
                None => {
                    bump(wstat::FLOW_FULL);
                    return;
                }
            }
        }
    };
    // SAFETY: a live map value. Another CPU handling the same direction at the same
    // moment may race on these words; the pending map's delete (in `echo`) still makes
    // every TSval give at most one sample.
    let state = unsafe { &mut *state };

    if seg.flags & TCP_ACK != 0 {
        // The RTTM rule needs every earlier ACK of this direction: known once it has sent
        // one while we watched, or when we saw its SYN (so nothing came before).
        let advances = if state.flags & flow::HAS_ACK != 0 {
            after(seg.ack, state.max_ack)
        } else {
            state.flags & flow::SAW_SYN != 0
        };
        if advances || state.flags & flow::HAS_ACK == 0 {
            state.max_ack = seg.ack;
            state.flags |= flow::HAS_ACK;
        }
        // TSecr is meaningful only with ACK. A value this direction has not echoed
        // before is the first echo of that TSval of the other direction.
        if state.flags & flow::HAS_TSECR == 0 || after(seg.tsecr, state.last_tsecr) {
            state.last_tsecr = seg.tsecr;
            state.flags |= flow::HAS_TSECR;
            echo(scratch, advances);
        }
    }

    // Record a TSval only where we can tell it is new: after an earlier one of this
    // direction, or on its SYN. The first TSval of a direction met mid-flow may have been
    // on the wire before we started, which would shorten its round trip.
    let seg = &scratch.seg;
    let known = state.flags & flow::HAS_TSVAL != 0;
    let newer = known && after(seg.tsval, state.last_tsval);
    if (newer || (!known && syn)) && (seg.payload || syn || seg.flags & TCP_FIN != 0) {
        record(scratch);
    }
    if newer || !known {
        state.last_tsval = scratch.seg.tsval;
        state.flags |= flow::HAS_TSVAL;
    }
}

#[inline(always)]
fn record(scratch: &mut Scratch) {
    let key = &mut scratch.pending;
    key.flow = scratch.seg.flow;
    key.tsval = scratch.seg.tsval;
    let key: &PendingKey = key;
    let pending = Pending {
        // SAFETY: a plain helper call.
        sent_ns: unsafe { bpf_ktime_get_ns() },
        side: scratch.side,
        reserved: [0; 3],
    };
    match WIRE_PENDING.insert(key, pending, u64::from(BPF_NOEXIST)) {
        Ok(()) => bump(wstat::RECORDED),
        Err(E2BIG) => bump(wstat::PENDING_FULL),
        // EEXIST: another CPU recorded the same TSval first.
        Err(_) => {}
    }
}

/// The segment in `scratch` carries the first echo of its TSecr; `advances` tells
/// whether its ACK is new. The sample is on the side its TSval was recorded on.
#[inline(always)]
fn echo(scratch: &mut Scratch, advances: bool) {
    let seg = &scratch.seg;
    let key = &mut scratch.pending;
    key.flow = seg.flow.reversed();
    key.tsval = seg.tsecr;
    let key: &PendingKey = key;
    let Some(pending) = WIRE_PENDING.get_ptr(key) else {
        return;
    };
    // SAFETY: a live map value, read before the delete below decides who owns it.
    let (sent, side) = unsafe { ((*pending).sent_ns, (*pending).side) };
    // The delete succeeds for exactly one caller: that one owns the sample.
    if WIRE_PENDING.remove(key).is_err() {
        return;
    }
    bump(wstat::ECHOED);
    if !advances {
        bump(wstat::NOT_ADVANCING);
        return;
    }
    // SAFETY: a plain helper call.
    let rtt_ns = unsafe { bpf_ktime_get_ns() }.wrapping_sub(sent);
    if rtt_ns > WIRE_CONFIG.load().max_age_ns {
        bump(wstat::AGED);
        return;
    }
    add(scratch, rtt_ns, side);
}

#[inline(always)]
fn has_port(ports: &HashMap<u16, u8>, port: u16) -> bool {
    // SAFETY: the port maps hold plain u8 flags, never removed while programs run.
    unsafe { ports.get(port) }.is_some()
}

/// Adds a round trip of the side that sent the TSval (`pending.flow.s*`) to the
/// histograms, through the same filters and grouping as the srtt programs. Every key
/// holds the interface and the side, so even without a grouping the samples go into the
/// shared map, one histogram per interface and side (userspace sizes it for that).
#[inline(always)]
fn add(scratch: &mut Scratch, rtt_ns: u64, side: u16) {
    let flow = &scratch.pending.flow;
    let cfg = CONFIG.load();
    let tag = if flow.family == AF_INET {
        family::V4
    } else {
        family::V6
    };
    if (cfg.family != family::ANY && cfg.family != tag)
        || (cfg.filters & filter::LADDR != 0 && !in_prefixes(&LADDRS, tag, &flow.saddr))
        || (cfg.filters & filter::RADDR != 0 && !in_prefixes(&RADDRS, tag, &flow.daddr))
        || (cfg.filters & filter::LPORT != 0 && !has_port(&LPORTS, flow.sport))
        || (cfg.filters & filter::RPORT != 0 && !has_port(&RPORTS, flow.dport))
    {
        bump(wstat::FILTERED);
        return;
    }
    let value = if cfg.milliseconds != 0 {
        rtt_ns / 1_000_000
    } else {
        rtt_ns / 1_000
    };
    let key = &mut scratch.hist;
    *key = HistKey {
        side,
        ifindex: flow.ifindex,
        ..HistKey::default()
    };
    match cfg.group_by {
        group::NONE => {}
        group::LADDR => {
            key.family = flow.family;
            key.laddr = flow.saddr;
        }
        group::RADDR => {
            key.family = flow.family;
            key.raddr = flow.daddr;
        }
        group::LPORT => key.lport = flow.sport,
        group::RPORT => key.rport = flow.dport,
        _ => {
            key.family = flow.family;
            key.laddr = flow.saddr;
            key.raddr = flow.daddr;
            key.lport = flow.sport;
            key.rport = flow.dport;
        }
    }
    count_failure(add_sample(key, value, false));
}
