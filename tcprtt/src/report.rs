//! The one report model every output reads: rows keyed by a decoded [`Key`], each with its
//! histogram, plus what the report covers and what could not be counted.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
    time::Duration,
};

use jiff::Timestamp;
use tcprtt_common::{AF_INET, AF_INET6, HistKey, group, side};

use crate::histogram::Histogram;

/// Where a row's samples were measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Source {
    /// The kernel's smoothed RTT of local sockets (`tcp_sock.srtt_us`).
    Srtt,
    /// Round trips timed from TCP timestamps on an interface (`--passive`).
    Wire,
}

impl Source {
    /// The name outputs show.
    pub fn name(self) -> &'static str {
        match self {
            Self::Srtt => "srtt",
            Self::Wire => "wire",
        }
    }
}

/// What histograms are keyed by: one entry per grouping. Adding a grouping means a constant
/// in `tcprtt_common::group`, its key builder in the eBPF program, an entry here, and its
/// flag in cli.rs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grouping {
    /// The `tcprtt_common::group` constant the eBPF program keys by.
    pub id: u32,
    /// The name in JSON output (`group_by`).
    pub name: &'static str,
    /// Which fields of the kernel's key are part of the grouping.
    pub fields: Fields,
}

/// The parts of a connection a grouping keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fields {
    pub laddr: bool,
    pub raddr: bool,
    pub lport: bool,
    pub rport: bool,
}

const fn fields(laddr: bool, raddr: bool, lport: bool, rport: bool) -> Fields {
    Fields {
        laddr,
        raddr,
        lport,
        rport,
    }
}

pub const ALL_TRAFFIC: Grouping = Grouping {
    id: group::NONE,
    name: "none",
    fields: fields(false, false, false, false),
};
pub const BY_LADDR: Grouping = Grouping {
    id: group::LADDR,
    name: "laddr",
    fields: fields(true, false, false, false),
};
pub const BY_RADDR: Grouping = Grouping {
    id: group::RADDR,
    name: "raddr",
    fields: fields(false, true, false, false),
};
pub const BY_LPORT: Grouping = Grouping {
    id: group::LPORT,
    name: "lport",
    fields: fields(false, false, true, false),
};
pub const BY_RPORT: Grouping = Grouping {
    id: group::RPORT,
    name: "rport",
    fields: fields(false, false, false, true),
};
pub const BY_FLOW: Grouping = Grouping {
    id: group::FLOW,
    name: "flow",
    fields: fields(true, true, true, true),
};

/// Address family of a key, as users name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    Ipv4,
    Ipv6,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Self::Ipv4 => "ipv4",
            Self::Ipv6 => "ipv6",
        }
    }
}

/// The direction in which a wire sample's TSval crossed its interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Side {
    /// It left through the interface: the round trip is of the path beyond it.
    Egress,
    /// It came in: the round trip is of the path on this side of the interface.
    Ingress,
}

impl Side {
    pub fn name(self) -> &'static str {
        match self {
            Self::Egress => "egress",
            Self::Ingress => "ingress",
        }
    }
}

/// The names of the interfaces wire keys hold the index of, known from the start (the
/// `--passive` interfaces).
#[derive(Clone, Debug, Default)]
pub struct IfaceNames(Vec<(u32, Arc<str>)>);

impl IfaceNames {
    pub fn new<'a>(ifaces: impl IntoIterator<Item = (u32, &'a str)>) -> Self {
        Self(
            ifaces
                .into_iter()
                .map(|(index, name)| (index, Arc::from(name)))
                .collect(),
        )
    }

    /// The interface's name; its index should the programs ever time one not listed.
    fn name(&self, index: u32) -> Arc<str> {
        self.0.iter().find(|(i, _)| *i == index).map_or_else(
            || Arc::from(index.to_string()),
            |(_, name)| Arc::clone(name),
        )
    }
}

/// A decoded histogram key: the parts of a connection its grouping keeps, `None` for the
/// rest, and for wire samples (whatever the grouping) the interface and side. The field
/// order is the listing order: by interface and side, then local before remote, IPv4
/// before IPv6, addresses and ports numerically.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    /// Wire samples: the interface they were timed at.
    pub iface: Option<Arc<str>>,
    /// Wire samples: which way their TSvals crossed it.
    pub side: Option<Side>,
    pub laddr: Option<IpAddr>,
    pub lport: Option<u16>,
    pub raddr: Option<IpAddr>,
    pub rport: Option<u16>,
    /// Set when the key has an address.
    pub family: Option<Family>,
}

/// An address of a kernel key: IPv4 (and IPv4-mapped IPv6) addresses are stored mapped.
fn ip(family: u16, addr: &[u8; 16]) -> IpAddr {
    if family == AF_INET {
        Ipv4Addr::new(addr[12], addr[13], addr[14], addr[15]).into()
    } else {
        Ipv6Addr::from(*addr).into()
    }
}

impl Key {
    /// Decodes the kernel's key: the one place that knows its layout.
    pub fn decode(grouping: Grouping, raw: &HistKey, ifaces: &IfaceNames) -> Self {
        let f = grouping.fields;
        let side = match raw.side {
            side::EGRESS => Some(Side::Egress),
            side::INGRESS => Some(Side::Ingress),
            _ => None,
        };
        let family = (f.laddr || f.raddr).then_some(if raw.family == AF_INET6 {
            Family::Ipv6
        } else {
            Family::Ipv4
        });
        Self {
            iface: side.map(|_| ifaces.name(raw.ifindex)),
            side,
            laddr: f.laddr.then(|| ip(raw.family, &raw.laddr)),
            lport: f.lport.then_some(raw.lport),
            raddr: f.raddr.then(|| ip(raw.family, &raw.raddr)),
            rport: f.rport.then_some(raw.rport),
            family,
        }
    }
}

/// One histogram of a report.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub source: Source,
    pub key: Key,
    pub hist: Histogram,
}

/// Samples and segments that did not make it into a histogram, over one report.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Losses {
    /// Matched samples that found no room in the histogram map (`--max-keys`).
    pub dropped: u64,
    /// Matched samples of new keys the kernel could not allocate a histogram for in time.
    pub no_memory: u64,
    /// Segments the kernel skipped the program for (it was already running on that CPU).
    pub missed: u64,
}

impl Losses {
    pub fn add(&mut self, other: Losses) {
        self.dropped += other.dropped;
        self.no_memory += other.no_memory;
        self.missed += other.missed;
    }
}

/// What the sources handed over since the last report: the kernel is drained more often
/// than reports are printed.
#[derive(Debug, Default)]
pub struct Pending {
    rows: HashMap<(Source, Key), Histogram>,
    losses: Losses,
}

impl Pending {
    pub fn add(&mut self, rows: &[Row], losses: Losses) {
        for row in rows {
            self.rows
                .entry((row.source, row.key.clone()))
                .or_default()
                .absorb(&row.hist);
        }
        self.losses.add(losses);
    }

    /// Everything added since the last call.
    pub fn take(&mut self) -> (Vec<Row>, Losses) {
        let rows = self
            .rows
            .drain()
            .map(|((source, key), hist)| Row { source, key, hist })
            .collect();
        (rows, std::mem::take(&mut self.losses))
    }
}

/// Unit of every value in a report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    Micros,
    Millis,
}

/// What one report covers.
#[derive(Clone, Debug, PartialEq)]
pub struct Meta {
    /// The hook the samples came from, e.g. `tp_btf`.
    pub hook: &'static str,
    pub grouping: Grouping,
    pub unit: Unit,
    /// End of the interval, wall clock.
    pub end: Timestamp,
    /// Length of the interval.
    pub length: Duration,
    pub losses: Losses,
    /// The `--max-keys` the maps were sized for.
    pub max_keys: u32,
}

/// Everything one interval (or the whole run) measured.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    pub meta: Meta,
    /// In listing order (see [`Report::order`]); only rows with samples.
    pub rows: Vec<Row>,
}

/// Both sides of one connection measured on the wire at one interface (`--passive
/// --by-flow`): `a` holds the round trips of the TSvals its local side sent (from the
/// interface to its remote side and back), `b` those of the other side. Together they
/// make the end-to-end round trip of a forwarded flow (a router sees each end on one side
/// of it).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FlowSides<'a> {
    pub a: &'a Row,
    pub b: &'a Row,
}

impl FlowSides<'_> {
    /// The end-to-end average: the two sides' averages added.
    pub fn average(&self) -> f64 {
        self.a.hist.average() + self.b.hist.average()
    }

    /// The two sides' `q` percentiles added (`None` without fine buckets).
    pub fn percentile(&self, q: f64) -> Option<u64> {
        Some(self.a.hist.percentile(q)? + self.b.hist.percentile(q)?)
    }
}

impl Report {
    /// The wire flows of a `--by-flow` report whose both sides have rows, in row order of
    /// their first side.
    pub fn flow_sides(&self) -> Vec<FlowSides<'_>> {
        if self.meta.grouping != BY_FLOW {
            return Vec::new();
        }
        let wire = |r: &&Row| r.source == Source::Wire;
        self.rows
            .iter()
            .filter(wire)
            .filter_map(|a| {
                let k = &a.key;
                // Each pair once: from the side that sorts first.
                if (k.laddr, k.lport) > (k.raddr, k.rport) {
                    return None;
                }
                let b = self.rows.iter().filter(wire).find(|b| {
                    b.key.iface == k.iface
                        && (b.key.laddr, b.key.lport, b.key.raddr, b.key.rport)
                            == (k.raddr, k.rport, k.laddr, k.lport)
                })?;
                Some(FlowSides { a, b })
            })
            .collect()
    }

    /// Lists rows by key, or with `top`, keeps the `top` highest averages, highest first.
    pub fn order(&mut self, top: Option<usize>) {
        self.rows.retain(|r| r.hist.count > 0);
        match top {
            Some(n) => {
                self.rows
                    .sort_by(|a, b| b.hist.average().total_cmp(&a.hist.average()));
                self.rows.truncate(n);
            }
            None => self
                .rows
                .sort_by(|a, b| (a.source, &a.key).cmp(&(b.source, &b.key))),
        }
    }
}

#[cfg(test)]
pub mod fixtures {
    //! Fixed reports for the outputs' golden tests.

    use super::*;

    pub fn mapped(a: [u8; 4]) -> [u8; 16] {
        let mut addr = [0; 16];
        addr[10] = 0xff;
        addr[11] = 0xff;
        addr[12..].copy_from_slice(&a);
        addr
    }

    pub fn meta(grouping: Grouping) -> Meta {
        Meta {
            hook: "tp_btf",
            grouping,
            unit: Unit::Micros,
            end: "2026-11-22T23:05:01.123Z".parse().unwrap(),
            length: Duration::from_secs(1),
            losses: Losses::default(),
            max_keys: 10240,
        }
    }

    pub fn row(grouping: Grouping, raw: HistKey, samples: &[u64]) -> Row {
        Row {
            source: Source::Srtt,
            key: Key::decode(grouping, &raw, &IfaceNames::default()),
            hist: Histogram::from_samples(samples.iter().copied()),
        }
    }

    /// A wire row, its key's interface index 2 named `eth0` and 3 `eth1`.
    pub fn wire_row(grouping: Grouping, raw: HistKey, samples: &[u64]) -> Row {
        let names = IfaceNames::new([(2, "eth0"), (3, "eth1")]);
        Row {
            source: Source::Wire,
            key: Key::decode(grouping, &raw, &names),
            hist: Histogram::from_samples(samples.iter().copied()),
        }
    }

    /// A wire key of a connection `l:lport -> r:rport` timed at interface `ifindex` on
    /// `side` (`tcprtt_common::side`).
    pub fn wire_v4(
        l: [u8; 4],
        lport: u16,
        r: [u8; 4],
        rport: u16,
        ifindex: u32,
        side: u16,
    ) -> HistKey {
        HistKey {
            family: AF_INET,
            lport,
            rport,
            side,
            laddr: mapped(l),
            raddr: mapped(r),
            ifindex,
        }
    }

    pub fn v4(raddr: [u8; 4]) -> HistKey {
        HistKey {
            family: AF_INET,
            raddr: mapped(raddr),
            ..HistKey::default()
        }
    }

    /// A connection 127.0.0.1:80 -> 127.0.0.2:4000.
    pub fn flow_v4() -> HistKey {
        HistKey {
            family: AF_INET,
            lport: 80,
            rport: 4000,
            laddr: mapped([127, 0, 0, 1]),
            raddr: mapped([127, 0, 0, 2]),
            ..HistKey::default()
        }
    }

    /// A connection [2001:db8::1]:443 -> [2001:db8::2]:51000.
    pub fn flow_v6() -> HistKey {
        HistKey {
            family: AF_INET6,
            lport: 443,
            rport: 51000,
            laddr: "2001:db8::1".parse::<Ipv6Addr>().unwrap().octets(),
            raddr: "2001:db8::2".parse::<Ipv6Addr>().unwrap().octets(),
            ..HistKey::default()
        }
    }

    /// An expected output, checked in under tcprtt/tests/golden.
    pub fn golden(name: &str) -> String {
        let path = format!("{}/tests/golden/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    pub fn v6(raddr: &str) -> HistKey {
        HistKey {
            family: AF_INET6,
            raddr: raddr.parse::<Ipv6Addr>().unwrap().octets(),
            ..HistKey::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{fixtures::*, *};

    #[test]
    fn decoding_keeps_only_the_grouped_fields_and_unmaps_ipv4() {
        let raw = flow_v4();
        let none = IfaceNames::default();
        let k = Key::decode(BY_RADDR, &raw, &none);
        assert_eq!(k.raddr, Some("127.0.0.2".parse().unwrap()));
        assert_eq!((k.laddr, k.lport, k.rport), (None, None, None));
        assert_eq!(k.family, Some(Family::Ipv4));
        let k = Key::decode(BY_LPORT, &raw, &none);
        assert_eq!((k.lport, k.family), (Some(80), None));
        assert_eq!(Key::decode(ALL_TRAFFIC, &raw, &none), Key::default());
        let k = Key::decode(BY_FLOW, &raw, &none);
        assert_eq!(k.laddr, Some("127.0.0.1".parse().unwrap()));
        assert_eq!((k.lport, k.rport), (Some(80), Some(4000)));
        assert_eq!((k.iface, k.side), (None, None));
    }

    #[test]
    fn wire_keys_name_their_interface_and_side_whatever_the_grouping() {
        let names = IfaceNames::new([(2, "eth0"), (3, "eth1")]);
        let raw = wire_v4([10, 0, 0, 1], 80, [10, 0, 0, 2], 4000, 3, side::INGRESS);
        let k = Key::decode(ALL_TRAFFIC, &raw, &names);
        assert_eq!(k.iface.as_deref(), Some("eth1"));
        assert_eq!(k.side, Some(Side::Ingress));
        assert_eq!((k.laddr, k.lport, k.family), (None, None, None));
        let raw = HistKey {
            side: side::EGRESS,
            ifindex: 9,
            ..raw
        };
        let k = Key::decode(BY_LPORT, &raw, &names);
        assert_eq!(
            (k.iface.as_deref(), k.side),
            (Some("9"), Some(Side::Egress))
        );
        assert_eq!(k.lport, Some(80));
    }

    #[test]
    fn wire_flows_pair_their_two_sides_once() {
        let side = |l: [u8; 4], lport, r: [u8; 4], rport, ifindex, samples: &[u64]| {
            // Seen at eth0 facing `a`: `a`'s TSvals come in, `b`'s leave.
            let dir = if l[0] == 198 {
                side::INGRESS
            } else {
                side::EGRESS
            };
            wire_row(BY_FLOW, wire_v4(l, lport, r, rport, ifindex, dir), samples)
        };
        let (a, b, c) = ([198, 51, 100, 1], [203, 0, 113, 1], [203, 0, 113, 2]);
        let mut report = Report {
            meta: meta(BY_FLOW),
            rows: vec![
                side(b, 80, a, 4000, 2, &[20_000, 20_000]),
                side(a, 4000, b, 80, 2, &[60_000]),
                side(a, 4001, c, 80, 2, &[5]),
                // The other half of 4001's flow, but timed at another interface.
                side(c, 80, a, 4001, 3, &[7]),
            ],
        };
        report.order(None);
        let pairs = report.flow_sides();
        assert_eq!(pairs.len(), 1, "{pairs:?}");
        assert_eq!(pairs[0].a.key.lport, Some(4000));
        assert_eq!(pairs[0].b.key.lport, Some(80));
        assert_eq!(pairs[0].average(), 80_000.0);
        report.rows[0].source = Source::Srtt;
        assert!(report.flow_sides().is_empty());
    }

    #[test]
    fn pending_rows_merge_by_key_until_taken() {
        let mut pending = Pending::default();
        let losses = Losses {
            dropped: 1,
            no_memory: 0,
            missed: 2,
        };
        pending.add(&[row(BY_RADDR, v4([127, 0, 0, 2]), &[5, 7])], losses);
        pending.add(
            &[
                row(BY_RADDR, v4([127, 0, 0, 2]), &[900]),
                row(BY_RADDR, v6("::1"), &[3]),
            ],
            losses,
        );
        let (mut rows, taken) = pending.take();
        rows.sort_by(|a, b| a.key.cmp(&b.key));
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].hist, Histogram::from_samples([5, 7, 900]));
        assert_eq!((taken.dropped, taken.missed), (2, 4));
        assert_eq!(pending.take().0, vec![]);
    }

    #[test]
    fn addresses_sort_numerically_v4_first_and_top_keeps_the_slowest() {
        let mut report = Report {
            meta: meta(BY_RADDR),
            rows: vec![
                row(BY_RADDR, v4([127, 0, 0, 10]), &[50]),
                row(BY_RADDR, v6("::1"), &[10]),
                row(BY_RADDR, v4([127, 0, 0, 9]), &[900]),
                row(BY_RADDR, v4([127, 0, 0, 8]), &[]),
            ],
        };
        let shown = |r: &Report| -> Vec<String> {
            r.rows
                .iter()
                .map(|r| r.key.raddr.unwrap().to_string())
                .collect()
        };
        report.order(None);
        assert_eq!(shown(&report), ["127.0.0.9", "127.0.0.10", "::1"]);
        report.order(Some(2));
        assert_eq!(shown(&report), ["127.0.0.9", "127.0.0.10"]);
    }
}
