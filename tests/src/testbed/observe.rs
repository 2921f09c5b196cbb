//! The kernel's own view of the traffic in test hosts (`ss -ti`, the namespace's SNMP
//! counters) to check tcprtt against.

use std::{fs, net::SocketAddr, process::Command};

use super::netns::enter;

/// What the kernel says about one established socket (`ss -ti`).
#[derive(Debug, Clone, PartialEq)]
pub struct TcpInfo {
    pub local: SocketAddr,
    pub peer: SocketAddr,
    /// The smoothed RTT, in µs (ss prints it in ms with three decimals).
    pub srtt_us: f64,
    /// Segments the socket has received, its handshake included.
    pub segs_in: u64,
}

pub(crate) fn established_sockets(ns: &str) -> Vec<TcpInfo> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "ss", "-tinHO", "state", "established"])
        .output()
        .expect("running ss in a namespace");
    assert!(
        out.status.success(),
        "ss in {ns}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|line| parse_ss_line(line).unwrap_or_else(|| panic!("unexpected ss line {line:?}")))
        .collect()
}

/// One line of `ss -tinHO state established`: `Recv-Q Send-Q local peer <info fields>`.
fn parse_ss_line(line: &str) -> Option<TcpInfo> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let field = |name: &str| {
        words
            .iter()
            .find_map(|w| w.strip_prefix(name)?.strip_prefix(':'))
    };
    let srtt_ms: f64 = field("rtt")?.split('/').next()?.parse().ok()?;
    Some(TcpInfo {
        local: words.get(2)?.parse().ok()?,
        peer: words.get(3)?.parse().ok()?,
        srtt_us: srtt_ms * 1000.0,
        segs_in: field("segs_in").map_or(Some(0), |n| n.parse().ok())?,
    })
}

/// A counter of the namespace's `/proc/net/snmp` or `/proc/net/netstat`, e.g.
/// (`Tcp`, `InSegs`) or (`TcpExt`, `TCPBacklogCoalesce`).
pub(crate) fn counter(ns: &str, group: &str, name: &str) -> u64 {
    // /proc/thread-self/net is the calling thread's namespace (/proc/self/net would be the
    // main thread's).
    let text = enter(ns, || {
        ["snmp", "netstat"]
            .map(|f| fs::read_to_string(format!("/proc/thread-self/net/{f}")).expect(f))
            .concat()
    });
    let prefix = format!("{group}:");
    let mut lines = text.lines().filter(|l| l.starts_with(&prefix));
    while let (Some(names), Some(values)) = (lines.next(), lines.next()) {
        if let Some((_, value)) = names
            .split_whitespace()
            .zip(values.split_whitespace())
            .find(|(n, _)| *n == name)
        {
            return value.parse().expect("counter value");
        }
    }
    panic!("no counter {group} {name} in {ns}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ss_lines_of_both_families_parse() {
        let v6 = "0      0      [2001:db8:1::1]:44594 [2001:db8:2::1]:40219 bbr wscale:10,10 \
                  rto:204 rtt:40.125/0.014 ato:40 mss:1448 segs_out:4 segs_in:3 \
                  data_segs_out:1 data_segs_in:1 minrtt:0.007";
        assert_eq!(
            parse_ss_line(v6),
            Some(TcpInfo {
                local: "[2001:db8:1::1]:44594".parse().unwrap(),
                peer: "[2001:db8:2::1]:40219".parse().unwrap(),
                srtt_us: 40125.0,
                segs_in: 3,
            })
        );
        let v4 = "0 0 198.51.100.1:5000 203.0.113.1:41000 cubic rtt:10.5/2 mss:1448";
        let got = parse_ss_line(v4).unwrap();
        assert_eq!((got.srtt_us, got.segs_in), (10500.0, 0));
        assert_eq!(parse_ss_line("0 0 junk"), None);
    }
}
