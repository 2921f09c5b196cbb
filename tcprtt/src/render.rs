//! Text reports in the layout bcc and libbpf-tools users know.

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use tcprtt_common::{AF_INET, AF_INET6, HistKey};

use crate::{cli::GroupBy, histogram::Histogram};

const BAR_WIDTH: u64 = 40;

/// One report: what was collected over one interval (or the whole run).
#[derive(Debug)]
pub struct Report {
    /// `HH:MM:SS` to print above the report, with `-T`.
    pub timestamp: Option<String>,
    pub milliseconds: bool,
    pub group_by: GroupBy,
    pub extension: bool,
    /// In the order to print them (see [`order`]).
    pub histograms: Vec<(HistKey, Histogram)>,
    /// Matched samples that found no room in the histogram map.
    pub dropped: u64,
    /// Matched samples of new keys the kernel could not allocate a histogram for in time.
    pub no_memory: u64,
    /// Segments the kernel skipped the program for (it was already running on that CPU).
    pub missed: u64,
    pub max_keys: u32,
}

/// An address of a key (IPv4-mapped addresses are IPv4).
pub fn key_ip(family: u16, addr: &[u8; 16]) -> Option<IpAddr> {
    match family {
        AF_INET => Some(Ipv4Addr::new(addr[12], addr[13], addr[14], addr[15]).into()),
        AF_INET6 => Some(Ipv6Addr::from(*addr).into()),
        _ => None,
    }
}

/// What a key stands for, in the order histograms are listed.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Shown {
    All,
    Addr(Option<IpAddr>),
    Port(u16),
    Flow(Option<SocketAddr>, Option<SocketAddr>),
}

fn shown(group_by: GroupBy, key: &HistKey) -> Shown {
    let sock = |addr: &[u8; 16], port| key_ip(key.family, addr).map(|ip| SocketAddr::new(ip, port));
    match group_by {
        GroupBy::None => Shown::All,
        GroupBy::LocalAddr => Shown::Addr(key_ip(key.family, &key.laddr)),
        GroupBy::RemoteAddr => Shown::Addr(key_ip(key.family, &key.raddr)),
        GroupBy::LocalPort => Shown::Port(key.lport),
        GroupBy::RemotePort => Shown::Port(key.rport),
        GroupBy::Flow => Shown::Flow(sock(&key.laddr, key.lport), sock(&key.raddr, key.rport)),
    }
}

/// Orders histograms by what they stand for (addresses numerically, IPv4 first), or with
/// `top`, keeps the `top` highest averages, highest first.
pub fn order(histograms: &mut Vec<(HistKey, Histogram)>, group_by: GroupBy, top: Option<usize>) {
    match top {
        Some(n) => {
            histograms.sort_by(|a, b| b.1.average().total_cmp(&a.1.average()));
            histograms.truncate(n);
        }
        None => histograms.sort_by_key(|(key, _)| shown(group_by, key)),
    }
}

fn unit(milliseconds: bool) -> &'static str {
    if milliseconds { "ms" } else { "µs" }
}

fn label(group_by: GroupBy, key: &HistKey) -> String {
    let text = |a: Option<SocketAddr>| a.map_or_else(|| "?".to_string(), |a| a.to_string());
    match (group_by, shown(group_by, key)) {
        (_, Shown::All) => "All Addresses = ******".to_string(),
        (GroupBy::LocalAddr, Shown::Addr(ip)) => format!("Local Address = {}", ip_text(ip)),
        (_, Shown::Addr(ip)) => format!("Remote Address = {}", ip_text(ip)),
        (GroupBy::LocalPort, Shown::Port(p)) => format!("Local Port = {p}"),
        (_, Shown::Port(p)) => format!("Remote Port = {p}"),
        (_, Shown::Flow(l, r)) => format!("Connection = {} -> {}", text(l), text(r)),
    }
}

fn ip_text(ip: Option<IpAddr>) -> String {
    ip.map_or_else(|| "?".to_string(), |ip| ip.to_string())
}

/// The classic log2 table: slot 0 through the last non-empty slot, bars scaled to the
/// largest count.
pub fn log2_table(hist: &Histogram, unit: &str) -> String {
    let slots = hist.log2_slots();
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

/// The `-e` line: exact count/min/max, percentiles estimated from the fine buckets.
pub fn extension_line(hist: &Histogram, unit: &str) -> String {
    format!(
        "count {}  min {}  max {}  p50 ~{}  p90 ~{}  p99 ~{} ({unit})\n",
        hist.count,
        hist.min,
        hist.max,
        hist.percentile(0.50),
        hist.percentile(0.90),
        hist.percentile(0.99),
    )
}

pub fn render_text(report: &Report) -> String {
    let unit = unit(report.milliseconds);
    let mut out = String::new();
    if let Some(ts) = &report.timestamp {
        let _ = writeln!(out, "{ts}");
    }
    let mut any = false;
    for (key, hist) in report.histograms.iter().filter(|(_, h)| h.count > 0) {
        if any {
            out.push('\n');
        }
        any = true;
        let _ = writeln!(
            out,
            "{} [AVG {:.6}]",
            label(report.group_by, key),
            hist.average()
        );
        out.push_str(&log2_table(hist, unit));
        if report.extension {
            out.push_str(&extension_line(hist, unit));
        }
    }
    if !any {
        out.push_str("No TCP RTT samples matched.\n");
    }
    if report.dropped > 0 {
        let _ = writeln!(
            out,
            "WARNING: {} samples dropped: more than {} distinct keys (raise --max-keys)",
            report.dropped, report.max_keys
        );
    }
    if report.no_memory > 0 {
        let _ = writeln!(
            out,
            "WARNING: {} samples dropped: new keys arrived faster than the kernel could \
             allocate their histograms",
            report.no_memory
        );
    }
    if report.missed > 0 {
        let _ = writeln!(
            out,
            "WARNING: {} segments missed: the kernel skipped the program while it was already \
             running on the same CPU",
            report.missed
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(histograms: Vec<(HistKey, Histogram)>) -> Report {
        Report {
            timestamp: None,
            milliseconds: false,
            group_by: GroupBy::None,
            extension: false,
            histograms,
            dropped: 0,
            no_memory: 0,
            missed: 0,
            max_keys: 10240,
        }
    }

    fn mapped(a: [u8; 4]) -> [u8; 16] {
        let mut addr = [0; 16];
        addr[10] = 0xff;
        addr[11] = 0xff;
        addr[12..].copy_from_slice(&a);
        addr
    }

    fn key_v4(a: [u8; 4]) -> HistKey {
        HistKey {
            family: AF_INET,
            raddr: mapped(a),
            ..HistKey::default()
        }
    }

    fn key_v6(a: &str) -> HistKey {
        HistKey {
            family: AF_INET6,
            raddr: a.parse::<Ipv6Addr>().unwrap().octets(),
            ..HistKey::default()
        }
    }

    /// The layout from the issue: 114 samples in 8..15 and 397 in 16..31.
    #[test]
    fn all_addresses_matches_the_classic_layout() {
        let mut samples = vec![8u64; 114];
        samples.extend(std::iter::repeat_n(16, 396));
        samples.push(31);
        let hist = Histogram::from_samples(samples);
        let text = render_text(&report(vec![(HistKey::default(), hist)]));
        let expected = "\
All Addresses = ****** [AVG 14.244618]
        µs               : count    distribution
         0 -> 1          : 0        |                                        |
         2 -> 3          : 0        |                                        |
         4 -> 7          : 0        |                                        |
         8 -> 15         : 114      |***********                             |
        16 -> 31         : 397      |****************************************|
";
        assert_eq!(text, expected);
    }

    #[test]
    fn grouped_reports_label_each_address_and_add_the_extension_line() {
        let mut r = report(vec![
            (
                key_v4([127, 0, 0, 2]),
                Histogram::from_samples([40_000, 40_000, 50_000]),
            ),
            (key_v6("2001:db8::1"), Histogram::from_samples([3])),
        ]);
        r.group_by = GroupBy::RemoteAddr;
        r.extension = true;
        r.milliseconds = true;
        r.timestamp = Some("12:34:56".into());
        let text = render_text(&r);
        let expected = "\
12:34:56
Remote Address = 127.0.0.2 [AVG 43333.333333]
        ms               : count    distribution
         0 -> 1          : 0        |                                        |
         2 -> 3          : 0        |                                        |
         4 -> 7          : 0        |                                        |
         8 -> 15         : 0        |                                        |
        16 -> 31         : 0        |                                        |
        32 -> 63         : 0        |                                        |
        64 -> 127        : 0        |                                        |
       128 -> 255        : 0        |                                        |
       256 -> 511        : 0        |                                        |
       512 -> 1023       : 0        |                                        |
      1024 -> 2047       : 0        |                                        |
      2048 -> 4095       : 0        |                                        |
      4096 -> 8191       : 0        |                                        |
      8192 -> 16383      : 0        |                                        |
     16384 -> 32767      : 0        |                                        |
     32768 -> 65535      : 3        |****************************************|
count 3  min 40000  max 50000  p50 ~40479  p90 ~50000  p99 ~50000 (ms)

Remote Address = 2001:db8::1 [AVG 3.000000]
        ms               : count    distribution
         0 -> 1          : 0        |                                        |
         2 -> 3          : 1        |****************************************|
count 1  min 3  max 3  p50 ~3  p90 ~3  p99 ~3 (ms)
";
        assert_eq!(text, expected);
    }

    #[test]
    fn empty_report_and_drops_are_stated() {
        let mut r = report(vec![]);
        r.dropped = 7;
        r.no_memory = 3;
        r.missed = 2;
        assert_eq!(
            render_text(&r),
            "No TCP RTT samples matched.\n\
             WARNING: 7 samples dropped: more than 10240 distinct keys (raise --max-keys)\n\
             WARNING: 3 samples dropped: new keys arrived faster than the kernel could \
             allocate their histograms\n\
             WARNING: 2 segments missed: the kernel skipped the program while it was already \
             running on the same CPU\n"
        );
    }

    #[test]
    fn addresses_sort_numerically_v4_first_and_top_keeps_the_slowest() {
        let mut hs = vec![
            (key_v4([127, 0, 0, 10]), Histogram::from_samples([50])),
            (key_v6("::1"), Histogram::from_samples([10])),
            (key_v4([127, 0, 0, 9]), Histogram::from_samples([900])),
        ];
        let shown = |hs: &[(HistKey, Histogram)]| -> Vec<String> {
            hs.iter()
                .map(|(k, _)| label(GroupBy::RemoteAddr, k))
                .collect()
        };
        order(&mut hs, GroupBy::RemoteAddr, None);
        assert_eq!(
            shown(&hs),
            [
                "Remote Address = 127.0.0.9",
                "Remote Address = 127.0.0.10",
                "Remote Address = ::1"
            ]
        );
        order(&mut hs, GroupBy::RemoteAddr, Some(2));
        assert_eq!(
            shown(&hs),
            ["Remote Address = 127.0.0.9", "Remote Address = 127.0.0.10"]
        );
    }

    #[test]
    fn port_and_flow_labels() {
        let key = HistKey {
            family: AF_INET6,
            lport: 443,
            rport: 51000,
            laddr: "2001:db8::1".parse::<Ipv6Addr>().unwrap().octets(),
            raddr: "2001:db8::2".parse::<Ipv6Addr>().unwrap().octets(),
            ..HistKey::default()
        };
        assert_eq!(label(GroupBy::LocalPort, &key), "Local Port = 443");
        assert_eq!(label(GroupBy::RemotePort, &key), "Remote Port = 51000");
        assert_eq!(
            label(GroupBy::Flow, &key),
            "Connection = [2001:db8::1]:443 -> [2001:db8::2]:51000"
        );
        let v4 = HistKey {
            family: AF_INET,
            lport: 80,
            rport: 4000,
            laddr: mapped([127, 0, 0, 1]),
            raddr: mapped([127, 0, 0, 2]),
            ..HistKey::default()
        };
        assert_eq!(
            label(GroupBy::Flow, &v4),
            "Connection = 127.0.0.1:80 -> 127.0.0.2:4000"
        );
    }
}
