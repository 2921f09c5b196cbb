//! `--json`: one JSON object per report, on one line (NDJSON).

use std::net::IpAddr;

use serde::Serialize;
use serde_json::value::RawValue;

use crate::{
    histogram::Histogram,
    report::{FlowSides, Key, Report, Row, Unit},
};

/// A number printed with a fixed count of decimals, as the documented schema shows them.
fn fixed(value: f64, decimals: usize) -> Box<RawValue> {
    let text = if value.is_finite() {
        format!("{value:.decimals$}")
    } else {
        "null".to_string()
    };
    RawValue::from_string(text).expect("a finite float is a JSON number")
}

#[derive(Serialize)]
struct JsonReport {
    /// End of the interval, RFC 3339 UTC with milliseconds.
    time: String,
    interval_s: Box<RawValue>,
    unit: &'static str,
    attach: &'static str,
    group_by: &'static str,
    dropped: u64,
    dropped_no_memory: u64,
    missed: u64,
    histograms: Vec<JsonRow>,
    /// Wire flows with both sides measured (`--passive --by-flow`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    flows: Vec<JsonFlow>,
}

/// Both sides of a wire flow at one interface and the end-to-end round trip they add up
/// to.
#[derive(Serialize)]
struct JsonFlow {
    iface: Option<String>,
    /// The side whose TSvals `a_avg`/`a_p50` time, and the other side.
    a: JsonKey,
    b: JsonKey,
    avg: Box<RawValue>,
    p50: Option<u64>,
    a_avg: Box<RawValue>,
    b_avg: Box<RawValue>,
    a_p50: Option<u64>,
    b_p50: Option<u64>,
}

impl From<&FlowSides<'_>> for JsonFlow {
    fn from(f: &FlowSides<'_>) -> Self {
        let side = |k: &Key| JsonKey {
            iface: None,
            side: None,
            family: k.family.map(|f| f.name()),
            addr: k.laddr,
            port: k.lport,
            laddr: None,
            lport: None,
        };
        Self {
            iface: f.a.key.iface.as_deref().map(str::to_string),
            a: side(&f.a.key),
            b: side(&f.b.key),
            avg: fixed(f.average(), 6),
            p50: f.percentile(0.50),
            a_avg: fixed(f.a.hist.average(), 6),
            b_avg: fixed(f.b.hist.average(), 6),
            a_p50: f.a.hist.percentile(0.50),
            b_p50: f.b.hist.percentile(0.50),
        }
    }
}

/// The key: the remote side as `addr`/`port`, the local side as `laddr`/`lport`, or as
/// `addr`/`port` when it is the only side; wire keys also `iface` and `side`.
#[derive(Serialize)]
struct JsonKey {
    #[serde(skip_serializing_if = "Option::is_none")]
    iface: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    side: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    family: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    addr: Option<IpAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    laddr: Option<IpAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    lport: Option<u16>,
}

impl From<&Key> for JsonKey {
    fn from(k: &Key) -> Self {
        let remote = k.raddr.is_some() || k.rport.is_some();
        let (addr, port, laddr, lport) = if remote {
            (k.raddr, k.rport, k.laddr, k.lport)
        } else {
            (k.laddr, k.lport, None, None)
        };
        Self {
            iface: k.iface.as_deref().map(str::to_string),
            side: k.side.map(|s| s.name()),
            family: k.family.map(|f| f.name()),
            addr,
            port,
            laddr,
            lport,
        }
    }
}

#[derive(Serialize)]
struct JsonRow {
    /// `srtt` or `wire`.
    source: &'static str,
    key: JsonKey,
    count: u64,
    sum: u64,
    avg: Box<RawValue>,
    /// These four are null where the kernel kept no fine buckets (never with `--json`,
    /// which asks for them; see `Options::keeps_detail`).
    min: Option<u64>,
    max: Option<u64>,
    p50: Option<u64>,
    p90: Option<u64>,
    p99: Option<u64>,
    buckets: Vec<JsonBucket>,
}

/// A fine bucket with inclusive bounds; the last, unbounded one has `high: null`.
#[derive(Serialize)]
struct JsonBucket {
    low: u64,
    high: Option<u64>,
    count: u64,
}

fn buckets(h: &Histogram) -> Vec<JsonBucket> {
    h.nonempty_buckets()
        .map(|(low, high, count)| JsonBucket {
            low,
            high: (high != u64::MAX).then_some(high),
            count,
        })
        .collect()
}

impl From<&Row> for JsonRow {
    fn from(row: &Row) -> Self {
        let h = &row.hist;
        Self {
            source: row.source.name(),
            key: JsonKey::from(&row.key),
            count: h.count,
            sum: h.sum,
            avg: fixed(h.average(), 6),
            min: h.min(),
            max: h.max(),
            p50: h.percentile(0.50),
            p90: h.percentile(0.90),
            p99: h.percentile(0.99),
            buckets: buckets(h),
        }
    }
}

/// One report as one line of JSON (with its newline).
pub fn render(report: &Report) -> String {
    let meta = &report.meta;
    let json = JsonReport {
        time: format!("{:.3}", meta.end),
        interval_s: fixed(meta.length.as_secs_f64(), 3),
        unit: match meta.unit {
            Unit::Micros => "us",
            Unit::Millis => "ms",
        },
        attach: meta.hook,
        group_by: meta.grouping.name,
        dropped: meta.losses.dropped,
        dropped_no_memory: meta.losses.no_memory,
        missed: meta.losses.missed,
        histograms: report.rows.iter().map(JsonRow::from).collect(),
        flows: report.flow_sides().iter().map(JsonFlow::from).collect(),
    };
    serde_json::to_string(&json).expect("the report serializes") + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{fixtures::*, *};

    #[test]
    fn a_report_is_one_line_with_the_documented_schema() {
        let mut report = Report {
            meta: meta(BY_RADDR),
            rows: vec![row(BY_RADDR, v4([127, 0, 0, 2]), &[40, 41, 1 << 30])],
        };
        report.meta.losses.dropped = 2;
        assert_eq!(render(&report), golden("by_raddr.ndjson"));
    }

    #[test]
    fn flow_and_port_keys() {
        let raw = tcprtt_common::HistKey {
            family: tcprtt_common::AF_INET6,
            lport: 443,
            rport: 51000,
            laddr: "2001:db8::1"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
            raddr: "2001:db8::2"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
            ..Default::default()
        };
        let mut report = Report {
            meta: meta(BY_FLOW),
            rows: vec![row(BY_FLOW, raw, &[7])],
        };
        report.meta.unit = Unit::Millis;
        report.meta.length = std::time::Duration::from_millis(2507);
        let text = render(&report);
        assert!(text.contains(r#""interval_s":2.507,"unit":"ms""#), "{text}");
        assert!(
            text.contains(
                r#""key":{"family":"ipv6","addr":"2001:db8::2","port":51000,"laddr":"2001:db8::1","lport":443}"#
            ),
            "{text}"
        );
        report.meta.grouping = BY_LPORT;
        report.rows = vec![row(BY_LPORT, raw, &[7])];
        assert!(render(&report).contains(r#""key":{"port":443}"#));
        report.meta.grouping = ALL_TRAFFIC;
        report.rows = vec![row(ALL_TRAFFIC, raw, &[7])];
        assert!(render(&report).contains(r#""key":{}"#));
        let raw = tcprtt_common::HistKey {
            side: tcprtt_common::side::INGRESS,
            ifindex: 3,
            ..raw
        };
        report.rows = vec![wire_row(ALL_TRAFFIC, raw, &[7])];
        let text = render(&report);
        assert!(
            text.contains(r#""source":"wire","key":{"iface":"eth1","side":"ingress"}"#),
            "{text}"
        );
    }

    #[test]
    fn flows_name_their_interface() {
        use tcprtt_common::side::{EGRESS, INGRESS};
        let (a, b) = ([198, 51, 100, 1], [203, 0, 113, 1]);
        let mut report = Report {
            meta: meta(BY_FLOW),
            rows: vec![
                wire_row(BY_FLOW, wire_v4(a, 4000, b, 80, 2, INGRESS), &[60]),
                wire_row(BY_FLOW, wire_v4(b, 80, a, 4000, 2, EGRESS), &[20]),
            ],
        };
        report.order(None);
        let text = render(&report);
        assert!(
            text.contains(
                r#""key":{"iface":"eth0","side":"egress","family":"ipv4","addr":"198.51.100.1","port":4000,"laddr":"203.0.113.1","lport":80}"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#""flows":[{"iface":"eth0","a":{"family":"ipv4","addr":"198.51.100.1","port":4000},"#
            ),
            "{text}"
        );
    }

    #[test]
    fn time_is_rfc3339_utc_with_milliseconds_truncated() {
        let mut report = Report {
            meta: meta(ALL_TRAFFIC),
            rows: vec![],
        };
        report.meta.end = "2100-02-28T23:59:59.999999Z".parse().unwrap();
        assert!(render(&report).starts_with(r#"{"time":"2100-02-28T23:59:59.999Z","#));
    }
}
