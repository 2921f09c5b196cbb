//! Text reports in the layout bcc and libbpf-tools users know.

use std::{
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
};

use crate::{
    histogram::Histogram,
    report::{Key, Report, Row, Source, Unit},
};

const BAR_WIDTH: u64 = 40;

/// What the text output adds on request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TextOptions {
    /// `HH:MM:SS` (local time) above the report, with `-T`.
    pub timestamp: Option<String>,
    /// The `-e` line under each histogram.
    pub extension: bool,
}

fn unit(unit: Unit) -> &'static str {
    match unit {
        Unit::Micros => "µs",
        Unit::Millis => "ms",
    }
}

fn endpoint(ip: Option<IpAddr>, port: Option<u16>) -> String {
    match (ip, port) {
        (Some(ip), port) => SocketAddr::new(ip, port.unwrap_or(0)).to_string(),
        (None, _) => "?".to_string(),
    }
}

/// A row's header: its label, and for wire rows the source, interface and side, e.g.
/// `Remote Address = 10.0.0.1 (wire, eth0 egress)` (srtt rows keep bcc's labels).
fn header(row: &Row) -> String {
    match row.source {
        Source::Srtt => label(&row.key),
        Source::Wire => format!(
            "{} ({}, {} {})",
            label(&row.key),
            row.source.name(),
            row.key.iface.as_deref().unwrap_or("?"),
            row.key.side.map_or("?", |s| s.name())
        ),
    }
}

/// A histogram's label, e.g. `Remote Address = 10.0.0.1`.
fn label(key: &Key) -> String {
    if key.laddr.is_some() && key.raddr.is_some() {
        return format!(
            "Connection = {} -> {}",
            endpoint(key.laddr, key.lport),
            endpoint(key.raddr, key.rport)
        );
    }
    let parts: Vec<String> = [
        key.laddr.map(|a| format!("Local Address = {a}")),
        key.raddr.map(|a| format!("Remote Address = {a}")),
        key.lport.map(|p| format!("Local Port = {p}")),
        key.rport.map(|p| format!("Remote Port = {p}")),
    ]
    .into_iter()
    .flatten()
    .collect();
    if parts.is_empty() {
        "All Addresses = ******".to_string()
    } else {
        parts.join(", ")
    }
}

/// The classic log2 table: slot 0 through the last non-empty slot, bars scaled to the
/// largest count.
fn log2_table(hist: &Histogram, unit: &str) -> String {
    let slots = &hist.slots;
    let last = slots.iter().rposition(|n| *n > 0).unwrap_or(0);
    let peak = slots.iter().copied().max().unwrap_or(0).max(1);
    let mut out = format!("{:8}{:<17}: count    distribution\n", "", unit);
    for (slot, &n) in slots.iter().enumerate().take(last + 1) {
        let low: u64 = if slot == 0 { 0 } else { 1 << slot };
        let high: u64 = (1 << (slot + 1)) - 1;
        let stars = (n * BAR_WIDTH / peak) as usize;
        let _ = writeln!(
            out,
            "{low:>10} -> {high:<10} : {n:<8} |{:<width$}|",
            "*".repeat(stars),
            width = BAR_WIDTH as usize
        );
    }
    out
}

/// An estimate as printed: `~N`, or `?` where the kernel kept no fine buckets.
fn approx(value: Option<u64>) -> String {
    value.map_or_else(|| "?".to_string(), |v| format!("~{v}"))
}

/// An exact figure as printed, `?` where the kernel did not keep it.
fn exact(value: Option<u64>) -> String {
    value.map_or_else(|| "?".to_string(), |v| v.to_string())
}

/// The `-e` line: exact count/min/max, percentiles estimated from the fine buckets.
fn extension_line(hist: &Histogram, unit: &str) -> String {
    format!(
        "count {}  min {}  max {}  p50 {}  p90 {}  p99 {} ({unit})\n",
        hist.count,
        exact(hist.min()),
        exact(hist.max()),
        approx(hist.percentile(0.50)),
        approx(hist.percentile(0.90)),
        approx(hist.percentile(0.99)),
    )
}

pub fn render(report: &Report, opts: &TextOptions) -> String {
    let meta = &report.meta;
    let unit = unit(meta.unit);
    let mut out = String::new();
    if let Some(ts) = &opts.timestamp {
        let _ = writeln!(out, "{ts}");
    }
    for (i, row) in report.rows.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let _ = writeln!(out, "{} [AVG {:.6}]", header(row), row.hist.average());
        out.push_str(&log2_table(&row.hist, unit));
        if opts.extension {
            out.push_str(&extension_line(&row.hist, unit));
        }
    }
    if report.rows.is_empty() {
        out.push_str("No TCP RTT samples matched.\n");
    }
    let flows = report.flow_sides();
    if !flows.is_empty() {
        out.push('\n');
    }
    for flow in flows {
        let (a, b) = (&flow.a.hist, &flow.b.hist);
        let _ = writeln!(
            out,
            "Flow {} <-> {} (wire, {}) end-to-end AVG {:.6} = {:.6} + {:.6}, p50 {} = {} + {} ({unit})",
            endpoint(flow.a.key.laddr, flow.a.key.lport),
            endpoint(flow.a.key.raddr, flow.a.key.rport),
            flow.a.key.iface.as_deref().unwrap_or("?"),
            flow.average(),
            a.average(),
            b.average(),
            approx(flow.percentile(0.50)),
            approx(a.percentile(0.50)),
            approx(b.percentile(0.50)),
        );
    }
    let losses = &meta.losses;
    if losses.dropped > 0 {
        let _ = writeln!(
            out,
            "WARNING: {} samples dropped: more than {} distinct keys (raise --max-keys)",
            losses.dropped, meta.max_keys
        );
    }
    if losses.no_memory > 0 {
        let _ = writeln!(
            out,
            "WARNING: {} samples dropped: new keys arrived faster than the kernel could \
             allocate their histograms",
            losses.no_memory
        );
    }
    if losses.missed > 0 {
        let _ = writeln!(
            out,
            "WARNING: {} segments missed: the kernel skipped the program while it was already \
             running on the same CPU",
            losses.missed
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use tcprtt_common::HistKey;

    use super::*;
    use crate::report::{fixtures::*, *};

    /// The layout of bcc's tcprtt: 114 samples in 8..15 and 397 in 16..31.
    #[test]
    fn all_addresses_matches_the_classic_layout() {
        let mut samples = vec![8u64; 114];
        samples.extend(std::iter::repeat_n(16, 396));
        samples.push(31);
        let report = Report {
            meta: meta(ALL_TRAFFIC),
            rows: vec![row(ALL_TRAFFIC, HistKey::default(), &samples)],
        };
        assert_eq!(
            render(&report, &TextOptions::default()),
            golden("all_addresses.txt")
        );
    }

    #[test]
    fn grouped_reports_label_each_address_and_add_the_extension_line() {
        let mut report = Report {
            meta: meta(BY_RADDR),
            rows: vec![
                row(BY_RADDR, v4([127, 0, 0, 2]), &[40_000, 40_000, 50_000]),
                row(BY_RADDR, v6("2001:db8::1"), &[3]),
            ],
        };
        report.meta.unit = Unit::Millis;
        let opts = TextOptions {
            timestamp: Some("12:34:56".into()),
            extension: true,
        };
        assert_eq!(render(&report, &opts), golden("by_raddr_ms_extension.txt"));
    }

    #[test]
    fn empty_report_and_losses_are_stated() {
        let mut report = Report {
            meta: meta(ALL_TRAFFIC),
            rows: vec![],
        };
        report.meta.losses = Losses {
            dropped: 7,
            no_memory: 3,
            missed: 2,
        };
        assert_eq!(
            render(&report, &TextOptions::default()),
            golden("empty_with_losses.txt")
        );
    }

    #[test]
    fn wire_rows_say_so_and_flows_show_both_sides_and_their_sum() {
        use tcprtt_common::side::{EGRESS, INGRESS};
        let (a, b) = ([198, 51, 100, 1], [203, 0, 113, 1]);
        let mut report = Report {
            meta: meta(BY_FLOW),
            rows: vec![
                wire_row(
                    BY_FLOW,
                    wire_v4(a, 4000, b, 80, 2, INGRESS),
                    &[60_000, 60_000],
                ),
                wire_row(BY_FLOW, wire_v4(b, 80, a, 4000, 2, EGRESS), &[20_000]),
                // The same direction timed at another interface: a row of its own, and
                // no flow without its other side there.
                wire_row(BY_FLOW, wire_v4(b, 80, a, 4000, 3, EGRESS), &[5]),
            ],
        };
        report.meta.unit = Unit::Millis;
        report.order(None);
        let text = render(&report, &TextOptions::default());
        assert!(
            text.starts_with(
                "Connection = 203.0.113.1:80 -> 198.51.100.1:4000 (wire, eth0 egress) \
                 [AVG 20000.000000]\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "\nConnection = 198.51.100.1:4000 -> 203.0.113.1:80 (wire, eth0 ingress) \
                 [AVG 60000.000000]\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "\nConnection = 203.0.113.1:80 -> 198.51.100.1:4000 (wire, eth1 egress) \
                 [AVG 5.000000]\n"
            ),
            "{text}"
        );
        assert!(
            text.ends_with(
                "\nFlow 198.51.100.1:4000 <-> 203.0.113.1:80 (wire, eth0) end-to-end AVG \
                 80000.000000 = 60000.000000 + 20000.000000, p50 ~80000 = ~60000 + ~20000 (ms)\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn port_and_flow_labels() {
        let shown =
            |g: Grouping, raw: &HistKey| label(&Key::decode(g, raw, &IfaceNames::default()));
        let raw = flow_v6();
        assert_eq!(shown(BY_LPORT, &raw), "Local Port = 443");
        assert_eq!(shown(BY_RPORT, &raw), "Remote Port = 51000");
        assert_eq!(shown(BY_LADDR, &raw), "Local Address = 2001:db8::1");
        assert_eq!(
            shown(BY_FLOW, &raw),
            "Connection = [2001:db8::1]:443 -> [2001:db8::2]:51000"
        );
        assert_eq!(
            shown(BY_FLOW, &flow_v4()),
            "Connection = 127.0.0.1:80 -> 127.0.0.2:4000"
        );
    }
}
