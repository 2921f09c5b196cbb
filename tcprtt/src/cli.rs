//! Command-line arguments and the checks clap cannot express.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Parser, ValueEnum};
use ipnet::IpNet;
use tcprtt_common::family;

use crate::{
    output::prometheus::PrometheusOptions,
    report::{ALL_TRAFFIC, BY_FLOW, BY_LADDR, BY_LPORT, BY_RADDR, BY_RPORT, Grouping, Unit},
    source::wire::{self, Iface},
};

const EXAMPLES: &str = "\
Examples:
  sudo tcprtt                       # one histogram of all TCP RTTs, until Ctrl-C
  sudo tcprtt -d 30                 # trace for 30 seconds, then print
  sudo tcprtt -i 1 -d 10 -T         # a timestamped histogram every second, 10 times
  sudo tcprtt -m                    # milliseconds instead of microseconds
  sudo tcprtt -A 1.1.1.1            # only connections to 1.1.1.1
  sudo tcprtt -A 10.0.0.0/8 -A 2001:db8::/32   # remote address in either prefix
  sudo tcprtt -p 443                # only connections whose local port is 443
  sudo tcprtt -b                    # one histogram per local address
  sudo tcprtt -B -6                 # one histogram per remote IPv6 address
  sudo tcprtt -e                    # add count, min, max and percentiles
  sudo tcprtt --by-flow --top 10    # the 10 connections with the highest average RTT
  sudo tcprtt --json -i 10          # one JSON object per line every 10 s, for scripts
  sudo tcprtt -B --prometheus 127.0.0.1:9464   # serve /metrics for Prometheus
  sudo tcprtt --passive eth0 -B     # RTTs on the wire at eth0 (TCP timestamps), also forwarded flows
  sudo tcprtt --passive eth1 --by-flow -m   # on a router: both sides of each flow and their sum";

/// Where to attach: a hook of `tcp_rcv_established` for the srtt source, or how the
/// wire source (`--passive`) attaches to interfaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Attach {
    /// fentry if the kernel allows it, else tp_btf; with --passive, TCX links if the
    /// kernel has them, else clsact.
    Auto,
    /// fentry/tcp_rcv_established only.
    Fentry,
    /// tp_btf/tcp_probe only.
    TpBtf,
    /// With --passive: TCX links only (Linux 6.6+).
    Tcx,
    /// With --passive: a clsact qdisc and TC filters, even where TCX exists.
    Clsact,
}

/// Summarize TCP round-trip times as histograms, measured in the kernel with eBPF.
#[derive(Debug, Parser)]
#[command(name = "tcprtt", version, after_help = EXAMPLES)]
pub struct Cli {
    /// Only local addresses in this IP or CIDR prefix (repeatable)
    #[arg(short = 'a', long = "laddr", value_name = "ADDR", value_parser = parse_net)]
    pub laddr: Vec<IpNet>,
    /// Only remote addresses in this IP or CIDR prefix (repeatable)
    #[arg(short = 'A', long = "raddr", value_name = "ADDR", value_parser = parse_net)]
    pub raddr: Vec<IpNet>,
    /// Only this local port (repeatable)
    #[arg(short = 'p', long = "lport", value_name = "PORT", value_parser = parse_port)]
    pub lport: Vec<u16>,
    /// Only this remote port (repeatable)
    #[arg(short = 'P', long = "rport", value_name = "PORT", value_parser = parse_port)]
    pub rport: Vec<u16>,
    /// One histogram per local address
    #[arg(short = 'b', long = "by-laddr", visible_alias = "byladdr")]
    pub by_laddr: bool,
    /// One histogram per remote address
    #[arg(short = 'B', long = "by-raddr", visible_alias = "byraddr")]
    pub by_raddr: bool,
    /// One histogram per local port
    #[arg(long = "by-lport")]
    pub by_lport: bool,
    /// One histogram per remote port
    #[arg(long = "by-rport")]
    pub by_rport: bool,
    /// One histogram per connection (local and remote address and port). Connections in
    /// different network namespaces with the same addresses and ports share one histogram
    #[arg(long = "by-flow")]
    pub by_flow: bool,
    /// With a grouping: only the N keys with the highest average, slowest first
    #[arg(long, value_name = "N", value_parser = parse_top)]
    pub top: Option<usize>,
    /// IPv4 only (IPv4-mapped IPv6 sockets included)
    #[arg(short = '4', long = "ipv4")]
    pub ipv4: bool,
    /// IPv6 only
    #[arg(short = '6', long = "ipv6")]
    pub ipv6: bool,
    /// Milliseconds instead of microseconds
    #[arg(short = 'm', long = "milliseconds")]
    pub milliseconds: bool,
    /// Print a report every SECS seconds (0.001 to 31536000), each counting only its own interval
    #[arg(short = 'i', long = "interval", value_name = "SECS", value_parser = parse_secs, allow_negative_numbers = true)]
    pub interval: Option<Duration>,
    /// Stop after SECS seconds (0.001 to 31536000)
    #[arg(short = 'd', long = "duration", value_name = "SECS", value_parser = parse_secs, allow_negative_numbers = true)]
    pub duration: Option<Duration>,
    /// Print a HH:MM:SS timestamp before each report
    #[arg(short = 'T', long = "timestamp")]
    pub timestamp: bool,
    /// Add count, min, max and estimated percentiles under each histogram
    #[arg(short = 'e', long = "extension")]
    pub extension: bool,
    /// One JSON object per report on stdout (NDJSON) instead of text
    #[arg(long)]
    pub json: bool,
    /// Serve cumulative histograms for Prometheus at http://ADDR/metrics (e.g. 127.0.0.1:9464
    /// or [::]:9464); reports on stdout go on as usual
    #[arg(long, value_name = "ADDR", value_parser = parse_listen)]
    pub prometheus: Option<SocketAddr>,
    /// With --prometheus: bucket edges at every fine bucket (193) instead of the 27 bcc rows
    #[arg(long)]
    pub prometheus_fine_buckets: bool,
    /// With --prometheus: series without a sample for SECS leave the exposition [default: 600]
    #[arg(long, value_name = "SECS", value_parser = parse_secs)]
    pub key_ttl: Option<Duration>,
    /// At the end, print event counts and the in-kernel cost per event on stderr
    #[arg(short = 'v', long)]
    pub verbose: bool,
    /// Hook to attach to
    #[arg(long, value_enum, default_value_t = Attach::Auto)]
    pub attach: Attach,
    /// Time the round trips that TCP timestamps show on this interface, for every flow
    /// crossing it (local or forwarded), instead of local sockets' srtt (repeatable)
    #[arg(long, value_name = "IFACE")]
    pub passive: Vec<String>,
    /// With --passive: round trips longer than SECS are not timed, only counted [default: 10]
    #[arg(long = "max-rtt", value_name = "SECS", value_parser = parse_secs, allow_negative_numbers = true)]
    pub max_rtt: Option<Duration>,
    /// Kernel BTF to resolve struct offsets from [default: /sys/kernel/btf/vmlinux]
    #[arg(long, value_name = "FILE")]
    pub btf: Option<PathBuf>,
    /// Most distinct keys kept when grouping (1 to 1000000); more are counted as dropped
    #[arg(long, value_name = "N", default_value_t = 10240, value_parser = parse_max_keys)]
    pub max_keys: u32,
}

fn parse_net(s: &str) -> Result<IpNet, String> {
    if let Ok(net) = s.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    s.parse::<std::net::IpAddr>().map(IpNet::from).map_err(|_| {
        format!(
            "'{s}' is not an IP address or CIDR prefix (e.g. 10.0.0.1, 10.0.0.0/8, 2001:db8::/32)"
        )
    })
}

fn parse_port(s: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(format!("'{s}' is not a port: use a number from 1 to 65535")),
    }
}

/// Shortest interval or duration: a timer that fires more often only reports noise.
const MIN_SECS: f64 = 0.001;
/// Longest interval or duration: one year, well within what the timers handle.
const MAX_SECS: f64 = 31_536_000.0;

fn parse_secs(s: &str) -> Result<Duration, String> {
    match s.parse::<f64>() {
        Ok(secs) if (MIN_SECS..=MAX_SECS).contains(&secs) => Ok(Duration::from_secs_f64(secs)),
        Ok(secs) if secs > 0.0 => Err(format!(
            "'{s}' is out of range: give seconds from {MIN_SECS} to {MAX_SECS}"
        )),
        _ => Err(format!(
            "'{s}' is not a positive number of seconds (e.g. 1, 0.5, 30)"
        )),
    }
}

fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    s.parse().map_err(|_| {
        format!("'{s}' is not a listen address: give IP:PORT, e.g. 127.0.0.1:9464 or [::]:9464")
    })
}

/// How long an idle series stays in the Prometheus exposition by default.
const DEFAULT_KEY_TTL: Duration = Duration::from_secs(600);

fn parse_top(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("'{s}' is not a positive number of keys (e.g. 10)")),
    }
}

/// Most keys a grouping may keep. A key takes about 220 bytes of kernel memory in each of
/// the two grouped maps (about 900 with fine buckets, see `Options::keeps_detail`), so a
/// million keys seen within one interval take 0.2 GiB (0.9 GiB), and twice that while one
/// map is drained as the other fills.
pub const MAX_KEYS: u32 = 1_000_000;

fn parse_max_keys(s: &str) -> Result<u32, String> {
    match s.parse::<u64>() {
        Ok(n) if (1..=u64::from(MAX_KEYS)).contains(&n) => Ok(n as u32),
        Ok(n) if n > 0 => Err(format!(
            "'{s}' is more keys than tcprtt keeps: give a key count from 1 to {MAX_KEYS}"
        )),
        _ => Err(format!("'{s}' is not a positive key count (e.g. 10240)")),
    }
}

/// The validated run configuration.
#[derive(Debug)]
pub struct Options {
    pub laddr: Vec<IpNet>,
    pub raddr: Vec<IpNet>,
    pub lport: Vec<u16>,
    pub rport: Vec<u16>,
    pub grouping: Grouping,
    /// One of the `tcprtt_common::family` constants.
    pub family: u32,
    pub milliseconds: bool,
    pub interval: Option<Duration>,
    pub duration: Option<Duration>,
    pub timestamp: bool,
    pub extension: bool,
    pub top: Option<usize>,
    pub json: bool,
    pub prometheus: Option<PrometheusOptions>,
    pub verbose: bool,
    pub attach: Attach,
    pub btf: Option<PathBuf>,
    pub max_keys: u32,
    /// Interfaces of the wire source; empty for the srtt source.
    pub passive: Vec<Iface>,
    /// Longest round trip the wire source times.
    pub max_rtt: Duration,
}

impl Options {
    /// Whether an output shows what only fine buckets give (percentiles, fine bucket
    /// edges) or min and max: `-e`, JSON, `--prometheus-fine-buckets`, and the wire
    /// source's flow lines. Otherwise the kernel keeps bcc's log2 rows and the sum only,
    /// which is cheaper per sample and per key.
    pub fn keeps_detail(&self) -> bool {
        self.extension
            || self.json
            || self.prometheus.as_ref().is_some_and(|p| p.fine_buckets)
            || !self.passive.is_empty()
    }
}

/// Default of `--max-rtt`.
pub const DEFAULT_MAX_RTT: Duration = Duration::from_secs(10);

/// Checks the wire source's flags and its interfaces.
fn validate_passive(cli: &Cli) -> Result<Vec<Iface>, String> {
    if cli.passive.is_empty() {
        return match (cli.attach, cli.max_rtt) {
            (Attach::Tcx | Attach::Clsact, _) => Err(format!(
                "--attach {} is for the wire source: add --passive IFACE",
                attach_name(cli.attach)
            )),
            (_, Some(_)) => Err("--max-rtt is for the wire source: add --passive IFACE".into()),
            _ => Ok(Vec::new()),
        };
    }
    if matches!(cli.attach, Attach::Fentry | Attach::TpBtf) {
        return Err(format!(
            "--attach {} is a hook of the srtt source: with --passive use auto, tcx or clsact",
            attach_name(cli.attach)
        ));
    }
    if cli.btf.is_some() {
        return Err("--btf is for the srtt source: the wire source reads no kernel struct".into());
    }
    let mut ifaces: Vec<Iface> = Vec::new();
    for name in &cli.passive {
        if ifaces.iter().any(|i| &i.name == name) {
            return Err(format!("--passive {name} is given twice"));
        }
        ifaces.push(wire::check_interface(name)?);
    }
    Ok(ifaces)
}

fn attach_name(attach: Attach) -> String {
    attach
        .to_possible_value()
        .map_or_else(String::new, |v| v.get_name().to_string())
}

/// Whether a prefix matches IPv4 sockets: an IPv4 prefix, or an IPv6 one that lies inside
/// the IPv4-mapped range `::ffff:0:0/96`. Every other IPv6 prefix, `::/0` included, matches
/// IPv6 sockets only.
pub fn is_ipv4_prefix(net: &IpNet) -> bool {
    match net {
        IpNet::V4(_) => true,
        IpNet::V6(v6) => v6.prefix_len() >= 96 && v6.addr().to_ipv4_mapped().is_some(),
    }
}

impl Options {
    /// The unit every recorded value is in.
    pub fn unit(&self) -> Unit {
        if self.milliseconds {
            Unit::Millis
        } else {
            Unit::Micros
        }
    }
}

/// Checks combinations of arguments; the error is one line naming the bad value and the fix.
pub fn validate(cli: Cli) -> Result<Options, String> {
    let passive = validate_passive(&cli)?;
    let groupings: Vec<(&str, Grouping)> = [
        (cli.by_laddr, "--by-laddr", BY_LADDR),
        (cli.by_raddr, "--by-raddr", BY_RADDR),
        (cli.by_lport, "--by-lport", BY_LPORT),
        (cli.by_rport, "--by-rport", BY_RPORT),
        (cli.by_flow, "--by-flow", BY_FLOW),
    ]
    .into_iter()
    .filter(|(set, _, _)| *set)
    .map(|(_, flag, group)| (flag, group))
    .collect();
    if let [(a, _), (b, _), ..] = groupings[..] {
        return Err(format!("{a} and {b} cannot be combined: pick one grouping"));
    }
    let grouping = groupings.first().map_or(ALL_TRAFFIC, |(_, g)| *g);
    if let (Some(n), ALL_TRAFFIC) = (cli.top, grouping) {
        return Err(format!(
            "--top {n} needs a grouping: add --by-laddr, --by-raddr, --by-lport, --by-rport or --by-flow"
        ));
    }
    if cli.prometheus.is_none() {
        if cli.prometheus_fine_buckets {
            return Err("--prometheus-fine-buckets needs --prometheus ADDR".into());
        }
        if cli.key_ttl.is_some() {
            return Err("--key-ttl needs --prometheus ADDR".into());
        }
    }
    if cli.ipv4 && cli.ipv6 {
        return Err("-4 and -6 cannot be combined: leave both out to trace both families".into());
    }
    let family = match (cli.ipv4, cli.ipv6) {
        (true, _) => family::V4,
        (_, true) => family::V6,
        _ => family::ANY,
    };
    for (flag, nets) in [("--laddr", &cli.laddr), ("--raddr", &cli.raddr)] {
        for net in nets.iter() {
            match (family, is_ipv4_prefix(net)) {
                (family::V4, false) => {
                    return Err(format!(
                        "{flag} {net} is IPv6 but -4 traces IPv4 only: drop -4 or the filter"
                    ));
                }
                (family::V6, true) => {
                    return Err(format!(
                        "{flag} {net} is IPv4 but -6 traces IPv6 only: drop -6 or the filter"
                    ));
                }
                _ => {}
            }
        }
    }
    Ok(Options {
        laddr: cli.laddr,
        raddr: cli.raddr,
        lport: cli.lport,
        rport: cli.rport,
        grouping,
        family,
        milliseconds: cli.milliseconds,
        interval: cli.interval,
        duration: cli.duration,
        timestamp: cli.timestamp,
        extension: cli.extension,
        top: cli.top,
        json: cli.json,
        prometheus: cli.prometheus.map(|addr| PrometheusOptions {
            addr,
            fine_buckets: cli.prometheus_fine_buckets,
            ttl: cli.key_ttl.unwrap_or(DEFAULT_KEY_TTL),
            max_series: cli.max_keys,
        }),
        verbose: cli.verbose,
        attach: cli.attach,
        btf: cli.btf,
        max_keys: cli.max_keys,
        passive,
        max_rtt: cli.max_rtt.unwrap_or(DEFAULT_MAX_RTT),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Options, String> {
        let cli = Cli::try_parse_from(std::iter::once("tcprtt").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        validate(cli)
    }

    #[test]
    fn accepts_the_everyday_invocations() {
        let o = parse(&[
            "-A",
            "1.1.1.1",
            "-A",
            "2001:db8::/32",
            "-p",
            "443",
            "-b",
            "-m",
            "-e",
        ])
        .unwrap();
        assert_eq!(o.raddr.len(), 2);
        assert_eq!(o.raddr[1].prefix_len(), 32);
        assert_eq!(o.lport, vec![443]);
        assert_eq!(o.grouping, BY_LADDR);
        let o = parse(&[
            "--byraddr",
            "-i",
            "0.5",
            "-d",
            "30",
            "-T",
            "--attach",
            "tp-btf",
        ])
        .unwrap();
        assert_eq!(o.grouping, BY_RADDR);
        assert_eq!(o.interval, Some(Duration::from_millis(500)));
        assert_eq!(o.attach, Attach::TpBtf);
        assert_eq!(o.max_keys, 10240);
        // Host bits in a prefix are cleared, so 10.1.2.3/8 means 10.0.0.0/8.
        let o = parse(&["-a", "10.1.2.3/8"]).unwrap();
        assert_eq!(o.laddr[0].to_string(), "10.0.0.0/8");
    }

    #[test]
    fn rejects_bad_values_naming_them() {
        for (args, needle) in [
            (&["-A", "1.2.3"][..], "'1.2.3' is not an IP address"),
            (&["-a", "10.0.0.0/33"], "'10.0.0.0/33' is not an IP address"),
            (&["-p", "0"], "'0' is not a port"),
            (&["-P", "65536"], "'65536' is not a port"),
            (&["-i", "0"], "'0' is not a positive number of seconds"),
            (&["-d", "-3"], "'-3' is not a positive number of seconds"),
            (&["-d", "soon"], "'soon' is not a positive number"),
            (&["--max-keys", "0"], "'0' is not a positive key count"),
            (
                &["-b", "-B"],
                "--by-laddr and --by-raddr cannot be combined",
            ),
            (
                &["--by-flow", "--by-lport"],
                "--by-lport and --by-flow cannot be combined",
            ),
            (&["--top", "5"], "--top 5 needs a grouping"),
            (&["--key-ttl", "5"], "--key-ttl needs --prometheus ADDR"),
            (
                &["--prometheus-fine-buckets"],
                "--prometheus-fine-buckets needs --prometheus",
            ),
            (&["--prometheus", "9464"], "'9464' is not a listen address"),
            (
                &["--by-flow", "--top", "0"],
                "'0' is not a positive number of keys",
            ),
            (&["-4", "-6"], "cannot be combined"),
            (
                &["-4", "-A", "2001:db8::1"],
                "--raddr 2001:db8::1/128 is IPv6 but -4",
            ),
            (
                &["-6", "-a", "127.0.0.1"],
                "--laddr 127.0.0.1/32 is IPv4 but -6",
            ),
        ] {
            let err = parse(args).unwrap_err();
            assert!(err.contains(needle), "{args:?}: {err}");
        }
    }

    #[test]
    fn wire_flags_go_with_passive_and_bad_interfaces_are_usage_errors() {
        for (args, needle) in [
            (
                &["--attach", "tcx"][..],
                "--attach tcx is for the wire source",
            ),
            (&["--max-rtt", "5"], "--max-rtt is for the wire source"),
            (
                &["--passive", "lo", "--attach", "fentry"],
                "--attach fentry is a hook of the srtt source",
            ),
            (
                &["--passive", "lo", "--btf", "/x"],
                "--btf is for the srtt source",
            ),
            (&["--passive", "lo"], "--passive lo: a loopback device"),
            (
                &["--passive", "tcprtt-no-such"],
                "--passive tcprtt-no-such: no such interface",
            ),
            (
                &["--passive", "a-name-of-16-byt"],
                "interface names are at most 15 bytes",
            ),
            (&["--passive", "lo", "--passive", "lo"], "--passive lo"),
        ] {
            let err = parse(args).unwrap_err();
            assert!(err.contains(needle), "{args:?}: {err}");
        }
        assert_eq!(parse(&[]).unwrap().max_rtt, DEFAULT_MAX_RTT);
    }

    #[test]
    fn ipv4_mapped_prefixes_are_ipv4_and_other_ipv6_prefixes_are_not() {
        assert!(parse(&["-4", "-A", "::ffff:127.0.0.1"]).is_ok());
        assert!(parse(&["-4", "-A", "::ffff:127.0.0.0/104"]).is_ok());
        let err = parse(&["-6", "-A", "::ffff:1.2.3.4"]).unwrap_err();
        assert!(err.contains("is IPv4 but -6"), "{err}");
        let err = parse(&["-4", "-A", "::/0"]).unwrap_err();
        assert!(err.contains("::/0 is IPv6 but -4"), "{err}");
        assert!(parse(&["-6", "-A", "::/0"]).is_ok());
        assert!(!is_ipv4_prefix(&"::ffff:0:0/95".parse().unwrap()));
        assert!(is_ipv4_prefix(&"::ffff:0:0/96".parse().unwrap()));
    }

    #[test]
    fn times_and_key_counts_have_stated_bounds() {
        for (args, needle) in [
            (
                &["-i", "1e-10"][..],
                "'1e-10' is out of range: give seconds from 0.001 to 31536000",
            ),
            (&["-d", "1e9"], "'1e9' is out of range"),
            (&["-i", "inf"], "'inf' is out of range"),
            (&["-d", "NaN"], "'NaN' is not a positive number"),
            (
                &["--max-keys", "4294967295"],
                "give a key count from 1 to 1000000",
            ),
            (
                &["--max-keys", "100000000"],
                "'100000000' is more keys than tcprtt keeps",
            ),
        ] {
            let err = parse(args).unwrap_err();
            assert!(err.contains(needle), "{args:?}: {err}");
        }
        assert_eq!(
            parse(&["-i", "0.001"]).unwrap().interval,
            Some(Duration::from_millis(1))
        );
        assert_eq!(
            parse(&["--max-keys", "1000000"]).unwrap().max_keys,
            MAX_KEYS
        );
    }
}
