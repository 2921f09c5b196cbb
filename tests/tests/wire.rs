//! The wire source (`--passive IFACE`): round trips timed from TCP timestamps at an
//! interface, checked against ICMP ping and the srtt source on the test bed's delay lines
//! (real kernel, real sockets, TUN devices in network namespaces), on a host and on a
//! router that forwards between two others.
//!
//! Percentiles come from fine buckets an eighth of a power of two wide, so a percentile
//! is checked through its bucket: the true value lies in it, and the check is that the
//! bucket reaches within the tolerance of the expected value. Averages are exact.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    process::Command,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant, SystemTime},
};

use serde_json::Value;
use tcprtt_tests::{
    kit::{Load, Tracer, bin, ip, run_command, sock_addr},
    testbed::{
        Delay, Host, TestBed,
        router::{in_ns, ip_cmd, set_link, sysctl, tcx_programs},
    },
};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// tcprtt run inside `host`'s namespace, where its interfaces are.
fn command(host: &Host, args: &[&str]) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", host.name()])
        .arg(bin())
        .args(args);
    cmd
}

fn wire_tracer(host: &Host, args: &[&str]) -> Tracer {
    let tracer = Tracer::start_command(command(host, args));
    assert!(
        tracer
            .attach_line
            .starts_with("Tracing TCP RTT on the wire at "),
        "{}",
        tracer.attach_line
    );
    tracer
}

/// A client and a server joined by a path of `one_way` each way.
fn path(bed: &mut TestBed, client: &[&str], server: &[&str], one_way: u64) -> (Host, Host) {
    let c = bed.host("client", client);
    let s = bed.host("server", server);
    bed.link(&c, &s, Delay::each_way(ms(one_way)));
    (c, s)
}

/// The median RTT (µs) of `count` pings from `host` to `dst`, 0.2 s apart. The median,
/// not the average: one ping held up by a busy machine moves an average a lot.
fn ping_median_us(host: &Host, dst: &str, count: u32) -> f64 {
    let out = Command::new("ip")
        .args(["netns", "exec", host.name(), "ping", "-n", "-i", "0.2"])
        .args(["-c", &count.to_string(), dst])
        .output()
        .expect("running ping (iputils-ping, installed by `cargo xtask setup`)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "ping {dst}: {text}");
    // 64 bytes from 203.0.113.70: icmp_seq=1 ttl=64 time=40.5 ms
    let mut times: Vec<f64> = text
        .lines()
        .filter_map(|l| l.split_once(" time=")?.1.split(' ').next()?.parse().ok())
        .collect();
    assert!(times.len() as u32 >= count / 2, "ping {dst}: {text}");
    times.sort_by(f64::total_cmp);
    times[times.len() / 2] * 1000.0
}

/// Tests that compare times run one at a time: a bulk transfer next to them would slow
/// the delay lines' threads on a small machine.
static TIMING: Mutex<()> = Mutex::new(());

fn timing() -> MutexGuard<'static, ()> {
    TIMING.lock().unwrap_or_else(|e| e.into_inner())
}

/// The JSON reports tcprtt printed, one per line.
fn reports(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// The histogram rows of a report.
fn rows(report: &Value) -> &Vec<Value> {
    report["histograms"].as_array().expect("histograms")
}

/// The row whose key's local address is `laddr` (`--by-laddr`, `--by-flow`).
fn row_of<'a>(report: &'a Value, laddr: &str) -> &'a Value {
    rows(report)
        .iter()
        .find(|r| {
            let k = &r["key"];
            // --by-laddr keys carry the address alone in `addr`.
            k["laddr"].as_str().or(k["addr"].as_str()) == Some(laddr)
        })
        .unwrap_or_else(|| panic!("no row for {laddr} in {report}"))
}

fn num(v: &Value, field: &str) -> f64 {
    v[field]
        .as_f64()
        .unwrap_or_else(|| panic!("no {field} in {v}"))
}

/// The fine bucket (inclusive bounds) that holds the median sample of a JSON row.
fn median_bucket(row: &Value) -> (f64, f64) {
    let count = num(row, "count");
    let mut seen = 0.0;
    for b in row["buckets"].as_array().expect("buckets") {
        seen += num(b, "count");
        if seen >= count / 2.0 {
            return (num(b, "low"), b["high"].as_f64().unwrap_or(f64::INFINITY));
        }
    }
    panic!("no median in {row}")
}

/// Whether a bucket reaches within `share` of `value`.
fn near(bucket: (f64, f64), value: f64, share: f64) -> bool {
    bucket.0 <= value * (1.0 + share) && bucket.1 >= value * (1.0 - share)
}

#[test]
fn host_path_median_agrees_with_ping_and_with_srtt_side_by_side() {
    let _one_at_a_time = timing();
    let mut bed = TestBed::new();
    let (client, server) = path(&mut bed, &["198.51.100.70"], &["203.0.113.70"], 20);
    let srv = bed.serve(&server, sock_addr("203.0.113.70", 0));
    let conn = client.connect(ip("198.51.100.70"), srv);

    // The client's TSvals: its round trips through the delay line and back.
    let wire = wire_tracer(
        &client,
        &["--passive", "tun0", "-a", "198.51.100.70", "--json"],
    );
    let srtt = Tracer::start(&["-A", "203.0.113.70", "--json"]);
    let load = Load::start(vec![conn]);
    let ping = ping_median_us(&client, "203.0.113.70", 20);
    load.stop();
    let wire = wire.stop_with(libc::SIGINT);
    let srtt = srtt.stop_with(libc::SIGINT);
    assert!(wire.status.success(), "{wire:?}");
    assert!(srtt.status.success(), "{srtt:?}");

    let w = &reports(&wire.stdout)[0];
    let s = &reports(&srtt.stdout)[0];
    assert_eq!(rows(w).len(), 1, "{w}");
    let (w, s) = (&rows(w)[0], &rows(s)[0]);
    assert_eq!(w["source"], "wire");
    assert_eq!(s["source"], "srtt");
    assert!(num(w, "count") >= 50.0, "{w}");
    // No round trip through the line can be shorter than its 40 ms.
    assert!(num(w, "min") >= 40_000.0, "{w}");
    let median = median_bucket(w);
    assert!(
        near(median, ping, 0.05),
        "wire median in {median:?} µs, ping {ping} µs"
    );
    let srtt_median = median_bucket(s);
    assert!(
        near(median, srtt_median.0, 0.05) || near(median, srtt_median.1, 0.05),
        "wire median in {median:?} µs, srtt median in {srtt_median:?} µs"
    );
}

/// A server in `host` on `addr` that writes one byte on each connection every second:
/// the client only acknowledges, and the server's next byte echoes the TSval of that
/// acknowledgement a second later (the trap of seed 003).
fn push_every_second(host: &Host, addr: SocketAddr, stop: Arc<AtomicBool>) -> SocketAddr {
    let listener = in_ns(host, || TcpListener::bind(addr)).expect("binding the push server");
    let addr = listener.local_addr().expect("push server address");
    thread::spawn(move || {
        let Ok((mut conn, _)) = listener.accept() else {
            return;
        };
        let _ = conn.set_nodelay(true);
        while !stop.load(Ordering::Relaxed) && conn.write_all(b"!").is_ok() {
            thread::sleep(Duration::from_secs(1));
        }
    });
    addr
}

#[test]
fn idle_interactive_flows_give_no_sample_above_twice_the_path() {
    let _one_at_a_time = timing();
    let mut bed = TestBed::new();
    // 100 ms round trips: long enough that a thread of the delay line held up for a few
    // ms on a busy machine changes little, short against the 1 s idle time.
    let (client, server) = path(&mut bed, &["198.51.100.71"], &["203.0.113.71"], 50);
    let srv = bed.serve(&server, sock_addr("203.0.113.71", 0));
    let stop = Arc::new(AtomicBool::new(false));
    let push = push_every_second(&server, sock_addr("203.0.113.71", 0), stop.clone());
    let mut conn = client.connect(ip("198.51.100.71"), srv);

    let tracer = wire_tracer(
        &client,
        &["--passive", "tun0", "--by-laddr", "--json", "-v"],
    );
    let mut pushed = in_ns(&client, || TcpStream::connect(push)).expect("connecting");
    let reader = thread::spawn(move || {
        let mut buf = [0u8; 16];
        let mut got = 0;
        while got < 6 {
            match pushed.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
        got
    });
    // One small request a second, its reply, then silence.
    for _ in 0..6 {
        conn.round_trip().expect("round trip");
        thread::sleep(Duration::from_secs(1));
    }
    assert_eq!(reader.join().expect("reader"), 6, "pushed bytes");
    stop.store(true, Ordering::Relaxed);
    let out = tracer.stop_with(libc::SIGINT);
    assert!(out.status.success(), "{out:?}");

    let report = &reports(&out.stdout)[0];
    let client_side = row_of(report, "198.51.100.71");
    assert!(num(client_side, "count") >= 6.0, "{report}");
    assert!(num(client_side, "min") >= 100_000.0, "{report}");
    for row in rows(report) {
        assert!(num(row, "max") <= 200_000.0, "a sample above 200 ms: {row}");
    }
}

#[test]
fn interval_medians_follow_a_delay_change_within_two_intervals() {
    let _one_at_a_time = timing();
    let mut bed = TestBed::new();
    let c = bed.host("client", &["198.51.100.72"]);
    let s = bed.host("server", &["203.0.113.72"]);
    let link = bed.link(&c, &s, Delay::each_way(ms(5)));
    let srv = bed.serve(&s, sock_addr("203.0.113.72", 0));
    let conn = c.connect(ip("198.51.100.72"), srv);

    let tracer = wire_tracer(
        &c,
        &[
            "--passive",
            "tun0",
            "-a",
            "198.51.100.72",
            "-i",
            "1",
            "--json",
        ],
    );
    let load = Load::start(vec![conn]);
    // Path round trips 10 -> 50 -> 10 ms, each held for 5 s.
    let mut steps = Vec::new();
    for (one_way, rtt_us) in [(5, 10_000.0), (25, 50_000.0), (5, 10_000.0)] {
        link.set_delay(Delay::each_way(ms(one_way)));
        steps.push((SystemTime::now(), rtt_us));
        thread::sleep(Duration::from_secs(5));
    }
    load.stop();
    let out = tracer.stop_with(libc::SIGINT);
    assert!(out.status.success(), "{out:?}");

    let mut checked = 0;
    for report in reports(&out.stdout) {
        let end: SystemTime = parse_time(report["time"].as_str().expect("time"));
        // The step in force over this interval, and when it began.
        let Some(&(since, rtt)) = steps.iter().rev().find(|(at, _)| *at <= end) else {
            continue;
        };
        let Some(row) = rows(&report).first() else {
            continue;
        };
        let next = steps.iter().find(|(at, _)| *at > since).map(|s| s.0);
        // Within two intervals of the change, and not yet overtaken by the next one.
        if end.duration_since(since).unwrap_or_default() < Duration::from_secs(2)
            || next.is_some_and(|n| n <= end)
        {
            continue;
        }
        let median = median_bucket(row);
        assert!(
            near(median, rtt, 0.25),
            "median in {median:?} µs, path {rtt} µs: {report}"
        );
        checked += 1;
    }
    assert!(
        checked >= 6,
        "only {checked} intervals checked:\n{}",
        out.stdout
    );
}

/// RFC 3339 UTC with milliseconds, as tcprtt prints it: `2026-11-22T23:05:01.123Z`.
fn parse_time(text: &str) -> SystemTime {
    let num = |r: std::ops::Range<usize>| -> i64 { text[r].parse().expect("time field") };
    let (y, mo, d) = (num(0..4), num(5..7), num(8..10));
    let (h, mi, s, milli) = (num(11..13), num(14..16), num(17..19), num(20..23));
    // Days since 1970-01-01 (Howard Hinnant's days_from_civil).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (mo + if mo > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + mi * 60 + s;
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs as u64) + Duration::from_millis(milli as u64)
}

/// The row timed at `iface` whose local address is `laddr` (`--by-flow`).
fn row_at<'a>(report: &'a Value, iface: &str, laddr: &str) -> &'a Value {
    rows(report)
        .iter()
        .find(|r| r["key"]["iface"] == iface && r["key"]["laddr"] == laddr)
        .unwrap_or_else(|| panic!("no row for {laddr} at {iface} in {report}"))
}

/// `/metrics` of a tcprtt serving on `port` of `host`'s loopback.
fn scrape_in(host: &Host, port: u16) -> String {
    in_ns(host, || {
        let mut conn = TcpStream::connect(("127.0.0.1", port))?;
        conn.write_all(b"GET /metrics HTTP/1.0\r\nHost: tcprtt\r\n\r\n")?;
        let mut text = String::new();
        conn.read_to_string(&mut text)?;
        Ok::<_, std::io::Error>(text)
    })
    .expect("scraping tcprtt")
}

/// Watching both of the router's interfaces: each times the flow on its own, and says
/// which way each side's TSvals crossed it, in JSON and in Prometheus labels. A's TSvals come in through the interface
/// facing A (`ingress`: their round trip is of the path on the router's side of it, on to
/// B) and leave through the one facing B (`egress`: the path beyond it), and B's the
/// other way round.
#[test]
fn a_router_sees_both_sides_of_a_forwarded_flow_and_their_sum_is_the_path() {
    let _one_at_a_time = timing();
    let mut bed = TestBed::new();
    let a = bed.host("a", &["198.51.100.73"]);
    let b = bed.host("b", &["203.0.113.73"]);
    let routed = bed.router(
        "r",
        &a,
        &b,
        Delay::each_way(ms(10)),
        Delay::each_way(ms(30)),
    );
    let srv = bed.serve(&b, sock_addr("203.0.113.73", 0));
    let conn = a.connect(ip("198.51.100.73"), srv);

    let (a_iface, b_iface) = (routed.a_iface.as_str(), routed.b_iface.as_str());
    assert_ne!(a_iface, b_iface);
    let tracer = wire_tracer(
        &routed.router,
        &[
            "--passive",
            a_iface,
            "--passive",
            b_iface,
            "--by-flow",
            "--json",
            "--prometheus",
            "127.0.0.1:9464",
        ],
    );
    let load = Load::start(vec![conn]);
    let ping = ping_median_us(&a, "203.0.113.73", 20);
    load.stop();
    // The exposition follows the kernel's maps within a drain (every second).
    thread::sleep(ms(1500));
    let scrape = scrape_in(&routed.router, 9464);
    let out = tracer.stop_with(libc::SIGINT);
    assert!(out.status.success(), "{out:?}");

    let report = &reports(&out.stdout)[0];
    assert_eq!(rows(report).len(), 4, "{report}");
    // A's TSvals come back from B: router -> B -> router, 2 x 30 ms; B's come back from
    // A: 2 x 10 ms.
    let (a_addr, b_addr) = ("198.51.100.73", "203.0.113.73");
    for (iface, laddr, side, path) in [
        (a_iface, a_addr, "ingress", 60_000.0),
        (a_iface, b_addr, "egress", 20_000.0),
        (b_iface, a_addr, "egress", 60_000.0),
        (b_iface, b_addr, "ingress", 20_000.0),
    ] {
        let row = row_at(report, iface, laddr);
        assert_eq!(row["key"]["side"], side, "{row}");
        let k = &row["key"];
        let series = format!(
            "tcprtt_wire_rtt_seconds_count{{iface=\"{iface}\",side=\"{side}\",family=\"ipv4\",\
             laddr=\"{laddr}\",lport=\"{}\",raddr=\"{}\",rport=\"{}\"}} ",
            k["lport"],
            k["addr"].as_str().expect("addr"),
            k["port"],
        );
        let scraped: f64 = scrape
            .lines()
            .find_map(|l| l.strip_prefix(series.as_str()))
            .unwrap_or_else(|| panic!("no {series} in {scrape}"))
            .parse()
            .expect("a count");
        // The scrape came before the end of the run, whose report counts every sample.
        assert!(
            scraped >= 1.0 && scraped <= num(row, "count"),
            "{series}{scraped}, JSON {row}"
        );
        let median = median_bucket(row);
        assert!(
            near(median, path, 0.10),
            "{iface} {laddr}: median {median:?}, path {path}: {row}"
        );
        assert!(num(row, "min") >= path, "{row}");
    }
    let flows = report["flows"].as_array().expect("flows");
    assert_eq!(flows.len(), 2, "{report}");
    for iface in [a_iface, b_iface] {
        let flow = flows
            .iter()
            .find(|f| f["iface"] == iface)
            .unwrap_or_else(|| panic!("no flow at {iface}: {report}"));
        assert_eq!(flow["a"]["addr"], a_addr);
        let sum = num(flow, "avg");
        let sides = num(flow, "a_avg") + num(flow, "b_avg");
        // Each printed with six decimals.
        assert!((sum - sides).abs() < 1e-5, "{sum} vs {sides}");
        assert!(
            (sum - ping).abs() <= 0.10 * ping,
            "{iface}: sum {sum} µs, ping {ping} µs"
        );
        let p50 = num(flow, "p50");
        assert!(
            (p50 - ping).abs() <= 0.10 * ping,
            "{iface}: p50 sum {p50} µs, ping {ping} µs"
        );
    }
}

/// Writes `chunk`-sized blocks to the echo server as fast as it takes them and reads the
/// echo back at the same time, until stopped: bulk data both ways on one connection.
fn bulk_both_ways(host: &Host, local: &str, server: SocketAddr, stop: Arc<AtomicBool>) -> u64 {
    let stream = in_ns(host, || {
        TcpStream::connect_timeout(&server, Duration::from_secs(5)).and_then(|s| {
            let ours: SocketAddr = sock_addr(local, 0);
            assert_eq!(s.local_addr()?.ip(), ours.ip(), "source address");
            Ok(s)
        })
    })
    .expect("connecting");
    let mut reader = stream.try_clone().expect("clone");
    reader
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let writer = thread::spawn(move || {
        let mut stream = stream;
        let block = [7u8; 16 * 1024];
        let mut sent = 0u64;
        while !stop.load(Ordering::Relaxed) && stream.write_all(&block).is_ok() {
            sent += block.len() as u64;
        }
        let _ = stream.shutdown(std::net::Shutdown::Write);
        sent
    });
    let mut buf = vec![0u8; 64 * 1024];
    let mut echoed = 0u64;
    while let Ok(n @ 1..) = reader.read(&mut buf) {
        echoed += n as u64;
    }
    writer.join().expect("writer");
    echoed
}

#[test]
fn bulk_transfers_both_ways_ipv4_and_ipv6() {
    let _one_at_a_time = timing();
    let mut bed = TestBed::new();
    let (client, server) = path(
        &mut bed,
        &["198.51.100.74", "2001:db8:74::1"],
        &["203.0.113.74", "2001:db8:75::1"],
        20,
    );
    let srv4 = bed.serve(&server, sock_addr("203.0.113.74", 0));
    let srv6 = bed.serve(&server, sock_addr("2001:db8:75::1", 0));

    let tracer = wire_tracer(
        &client,
        &["--passive", "tun0", "--by-laddr", "--json", "-v"],
    );
    let stop = Arc::new(AtomicBool::new(false));
    let bulk = [("198.51.100.74", srv4), ("2001:db8:74::1", srv6)].map(|(local, srv)| {
        let (client, stop) = (client.clone(), stop.clone());
        thread::spawn(move || bulk_both_ways(&client, local, srv, stop))
    });
    thread::sleep(Duration::from_secs(5));
    stop.store(true, Ordering::Relaxed);
    for b in bulk {
        assert!(b.join().expect("bulk") > 1 << 20, "less than 1 MiB echoed");
    }
    let out = tracer.stop_with(libc::SIGINT);
    assert!(out.status.success(), "{out:?}");

    let report = &reports(&out.stdout)[0];
    for addr in ["198.51.100.74", "2001:db8:74::1"] {
        // The client's data comes back acknowledged through the 40 ms line.
        let row = row_of(report, addr);
        assert!(num(row, "count") >= 20.0, "{row}");
        assert!(num(row, "min") >= 40_000.0, "{row}");
    }
    for addr in ["203.0.113.74", "2001:db8:75::1"] {
        // The server's data, acknowledged by the client right here: mostly at once (some
        // acknowledgements wait for the delayed-ACK timer or a busy CPU).
        let row = row_of(report, addr);
        assert!(num(row, "count") >= 20.0, "{row}");
        assert!(median_bucket(row).1 < 40_000.0, "{row}");
    }
    let verbose = out.stderr.lines().last().unwrap_or_default();
    assert!(verbose.contains("malformed 0"), "{verbose}");
    assert!(verbose.contains("pending map full 0"), "{verbose}");
}

#[test]
fn without_tcp_timestamps_nothing_is_timed_and_the_run_says_why() {
    let mut bed = TestBed::new();
    let (client, server) = path(&mut bed, &["198.51.100.75"], &["203.0.113.75"], 5);
    sysctl(client.name(), "net.ipv4.tcp_timestamps=0");
    let srv = bed.serve(&server, sock_addr("203.0.113.75", 0));

    let tracer = wire_tracer(&client, &["--passive", "tun0"]);
    client.connect(ip("198.51.100.75"), srv).round_trips(20);
    let out = tracer.stop_with(libc::SIGINT);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.stdout, "No TCP RTT samples matched.\n");
    assert!(
        out.stderr
            .contains("tcprtt: nothing was timed: none of the")
            && out.stderr.contains("net.ipv4.tcp_timestamps=0"),
        "{}",
        out.stderr
    );
}

#[test]
fn udp_and_icmp_are_ignored() {
    let mut bed = TestBed::new();
    let (client, _server) = path(&mut bed, &["198.51.100.76"], &["203.0.113.76"], 5);
    let tracer = wire_tracer(&client, &["--passive", "tun0", "-v"]);
    ping_median_us(&client, "203.0.113.76", 5);
    in_ns(&client, || {
        let udp = std::net::UdpSocket::bind("198.51.100.76:0").expect("udp");
        for _ in 0..10 {
            udp.send_to(b"not tcp", "203.0.113.76:9").expect("send");
        }
    });
    let out = tracer.stop_with(libc::SIGINT);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.stdout, "No TCP RTT samples matched.\n");
    assert!(
        out.stderr
            .contains("tcprtt: nothing was timed: no TCP segment crossed tun0"),
        "{}",
        out.stderr
    );
    // 5 echo requests and replies, 10 datagrams (and whatever ICMP errors they draw).
    let verbose = out.stderr.lines().last().unwrap_or_default();
    let others: u64 = verbose
        .split("other IP protocols ")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{verbose}"));
    assert!(others >= 20, "{verbose}");
    assert!(verbose.contains("TCP segments 0 "), "{verbose}");
}

/// Crafted frames on a veth pair, for what real stacks rarely send: VLAN tags in the
/// frame, IPv6 extension headers, option layouts, broken headers. The frames carry a
/// destination MAC address nobody has, so both kernels drop them after the TC hooks and
/// answer nothing.
mod frames {
    use std::net::IpAddr;

    pub const SYN: u8 = 0x02;
    pub const ACK: u8 = 0x10;
    pub const PSH: u8 = 0x08;

    /// One TCP segment to build.
    pub struct Seg {
        pub src: (IpAddr, u16),
        pub dst: (IpAddr, u16),
        pub seq: u32,
        pub ack: u32,
        pub flags: u8,
        /// (TSval, TSecr); `None`: no timestamps option.
        pub ts: Option<(u32, u32)>,
        pub payload: usize,
    }

    impl Seg {
        /// A segment carrying the timestamps option `ts` (TSval, TSecr).
        pub fn timed(
            src: (IpAddr, u16),
            dst: (IpAddr, u16),
            seq: u32,
            ack: u32,
            flags: u8,
            ts: (u32, u32),
            payload: usize,
        ) -> Self {
            Self {
                src,
                dst,
                seq,
                ack,
                flags,
                ts: Some(ts),
                payload,
            }
        }
    }

    /// An Ethernet frame holding `seg`, tagged with `(tpid, vlan id)` when given. A SYN
    /// gets Linux's SYN option layout (MSS, SACK permitted, TS, NOP, window scale), other
    /// segments NOP, NOP, TS. `ipv6_hop_by_hop` inserts an extension header.
    pub fn frame(seg: &Seg, tag: Option<(u16, u16)>, ipv6_hop_by_hop: bool) -> Vec<u8> {
        let mut tcp = Vec::new();
        tcp.extend(seg.src.1.to_be_bytes());
        tcp.extend(seg.dst.1.to_be_bytes());
        tcp.extend(seg.seq.to_be_bytes());
        tcp.extend(seg.ack.to_be_bytes());
        let mut options = Vec::new();
        if let Some((tsval, tsecr)) = seg.ts {
            let ts = [&[8u8, 10][..], &tsval.to_be_bytes(), &tsecr.to_be_bytes()].concat();
            if seg.flags & SYN != 0 {
                options.extend([2, 4, 0x05, 0xb4, 4, 2]);
                options.extend(ts);
                options.extend([1, 3, 3, 7]);
            } else {
                options.extend([1, 1]);
                options.extend(ts);
            }
        }
        tcp.push((((20 + options.len()) / 4) << 4) as u8);
        tcp.push(seg.flags);
        tcp.extend([0xff, 0xff, 0, 0, 0, 0]);
        tcp.extend(options);
        tcp.extend(std::iter::repeat_n(b'x', seg.payload));

        let mut ip = Vec::new();
        let ethertype: u16 = match (seg.src.0, seg.dst.0) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                ip.extend([0x45, 0]);
                ip.extend(((20 + tcp.len()) as u16).to_be_bytes());
                ip.extend([0, 0, 0x40, 0, 64, 6, 0, 0]);
                ip.extend(s.octets());
                ip.extend(d.octets());
                0x0800
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let ext = if ipv6_hop_by_hop { 8 } else { 0 };
                ip.extend([0x60, 0, 0, 0]);
                ip.extend(((ext + tcp.len()) as u16).to_be_bytes());
                ip.extend([if ipv6_hop_by_hop { 0 } else { 6 }, 64]);
                ip.extend(s.octets());
                ip.extend(d.octets());
                if ipv6_hop_by_hop {
                    // Next header TCP, length 0, a PadN option filling the 8 bytes.
                    ip.extend([6, 0, 1, 4, 0, 0, 0, 0]);
                }
                0x86dd
            }
            _ => panic!("mixed families"),
        };
        let mut out = vec![0x02, 0, 0, 0, 0, 0x99, 0x02, 0, 0, 0, 0, 0x01];
        if let Some((tpid, id)) = tag {
            out.extend(tpid.to_be_bytes());
            out.extend(id.to_be_bytes());
        }
        out.extend(ethertype.to_be_bytes());
        out.extend(ip);
        out.extend(tcp);
        out
    }

    /// Sends raw frames out of the device `dev` of the calling thread's namespace.
    pub fn send(dev: &str, frames: &[Vec<u8>]) {
        let name = std::ffi::CString::new(dev).expect("device name");
        // SAFETY: a NUL-terminated name.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert_ne!(index, 0, "no device {dev}");
        // SAFETY: plain socket(2); closed below. Protocol 0: it receives nothing.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        assert!(
            fd >= 0,
            "packet socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: an all-zero sockaddr_ll is valid.
        let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        to.sll_family = libc::AF_PACKET as u16;
        to.sll_ifindex = index as i32;
        to.sll_halen = 6;
        for frame in frames {
            // SAFETY: the frame and the address are live for the call.
            let sent = unsafe {
                libc::sendto(
                    fd,
                    frame.as_ptr().cast(),
                    frame.len(),
                    0,
                    (&raw const to).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            assert_eq!(
                sent,
                frame.len() as isize,
                "{}",
                std::io::Error::last_os_error()
            );
        }
        // SAFETY: our own descriptor.
        unsafe { libc::close(fd) };
    }
}

/// A client and a server joined by a veth pair (both ends called `veth0`), no addresses.
fn veth_pair(bed: &mut TestBed) -> (Host, Host) {
    let client = bed.host("client", &[]);
    let server = bed.host("server", &[]);
    let (c, s) = (client.name(), server.name());
    ip_cmd(&[
        "-n", c, "link", "add", "veth0", "type", "veth", "peer", "name", "veth0", "netns", s,
    ]);
    for ns in [c, s] {
        ip_cmd(&["-n", ns, "link", "set", "veth0", "up"]);
    }
    (client, server)
}

#[test]
fn crafted_frames_vlan_tags_option_layouts_and_the_timing_rules() {
    use frames::{ACK, PSH, SYN, Seg, frame, send};
    let mut bed = TestBed::new();
    let (client, server) = veth_pair(&mut bed);
    let tracer = wire_tracer(
        &client,
        &["--passive", "veth0", "--by-laddr", "--json", "-v"],
    );
    // Frames the client sends leave through its veth0 (egress, tags in the frame); what
    // the server sends arrives there (ingress, the kernel has moved the tag out).
    let out = |frames: &[Vec<u8>]| in_ns(&client, || send("veth0", frames));
    let back = |frames: &[Vec<u8>]| in_ns(&server, || send("veth0", frames));

    for (c, s, tag) in [
        ("198.51.100.90", "203.0.113.90", Some((0x8100, 100))),
        ("2001:db8:90::1", "2001:db8:91::1", Some((0x88a8, 200))),
        ("198.51.100.91", "203.0.113.91", None),
    ] {
        let (c, s) = ((ip(c), 40_000), (ip(s), 80));
        let seg = Seg::timed;
        // Handshake: the SYN's TSval comes back on the SYN-ACK 20 ms later.
        out(&[frame(&seg(c, s, 0, 0, SYN, (100, 0), 0), tag, false)]);
        thread::sleep(ms(20));
        back(&[frame(
            &seg(s, c, 0, 1, SYN | ACK, (900, 100), 0),
            tag,
            false,
        )]);
        out(&[frame(&seg(c, s, 1, 1, ACK, (101, 900), 0), tag, false)]);
        // A request and, 30 ms later, its acknowledgement: one sample. The echo repeated
        // is no first echo. The pure ACK's TSval (101) was not recorded.
        out(&[frame(
            &seg(c, s, 1, 1, ACK | PSH, (102, 900), 10),
            tag,
            false,
        )]);
        thread::sleep(ms(30));
        back(&[
            frame(&seg(s, c, 1, 11, ACK, (901, 102), 0), tag, false),
            frame(&seg(s, c, 1, 11, ACK, (902, 102), 0), tag, false),
        ]);
        // Data whose first echo acknowledges nothing new (RTTM rule): not timed.
        out(&[frame(
            &seg(c, s, 11, 1, ACK | PSH, (103, 902), 10),
            tag,
            false,
        )]);
        back(&[frame(&seg(s, c, 1, 11, ACK, (903, 103), 0), tag, false)]);
    }
    // Skipped and counted: an IPv6 extension header, a TCP header shorter than 20 bytes.
    let odd = Seg {
        src: (ip("2001:db8:92::1"), 1),
        dst: (ip("2001:db8:93::1"), 2),
        seq: 0,
        ack: 0,
        flags: SYN,
        ts: Some((1, 0)),
        payload: 0,
    };
    let mut short = frame(&odd, None, false);
    short[14 + 40 + 12] = 4 << 4;
    out(&[frame(&odd, None, true), short]);

    let done = tracer.stop_with(libc::SIGINT);
    assert!(done.status.success(), "{done:?}");
    let report = &reports(&done.stdout)[0];
    for (client_addr, server_addr) in [
        ("198.51.100.90", "203.0.113.90"),
        ("2001:db8:90::1", "2001:db8:91::1"),
        ("198.51.100.91", "203.0.113.91"),
    ] {
        let c = row_of(report, client_addr);
        // The SYN (>= 20 ms) and the request (>= 30 ms), nothing else.
        assert_eq!(num(c, "count"), 2.0, "{c}");
        assert!(
            num(c, "min") >= 20_000.0 && num(c, "max") >= 30_000.0,
            "{c}"
        );
        assert!(num(c, "max") < 1_000_000.0, "{c}");
        // The SYN-ACK's TSval, echoed by the client's ACK.
        assert_eq!(num(row_of(report, server_addr), "count"), 1.0, "{report}");
    }
    let verbose = done.stderr.lines().last().unwrap_or_default();
    // Per flow: the SYN, the SYN-ACK and two requests; no pure ACK.
    for needle in [
        "TSvals recorded 12,",
        "not advancing the ACK 3,",
        "malformed 1)",
        "samples 9,",
    ] {
        assert!(verbose.contains(needle), "{needle}: {verbose}");
    }
    // Ours, and any multicast listener report the kernel sends with a hop-by-hop header.
    let ext: u64 = verbose
        .split("IPv6 extension headers ")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{verbose}"));
    assert!(ext >= 1, "{verbose}");
}

#[test]
fn filters_apply_to_the_side_that_sent_the_tsval_and_max_rtt_ages_out() {
    use frames::{ACK, PSH, SYN, Seg, frame, send};
    let mut bed = TestBed::new();
    let (client, server) = veth_pair(&mut bed);
    let tracer = wire_tracer(
        &client,
        &[
            "--passive",
            "veth0",
            "-6",
            "-P",
            "80",
            "--max-rtt",
            "0.5",
            "--by-flow",
            "--json",
            "-v",
        ],
    );
    let out = |frames: &[Vec<u8>]| in_ns(&client, || send("veth0", frames));
    let back = |frames: &[Vec<u8>]| in_ns(&server, || send("veth0", frames));
    let seg = Seg::timed;
    let f = |seg: &Seg| frame(seg, None, false);

    // IPv4: both samples (the client's SYN, the server's SYN-ACK) fall to -6.
    let (c, s) = ((ip("198.51.100.95"), 40_000), (ip("203.0.113.95"), 80));
    out(&[f(&seg(c, s, 0, 0, SYN, (100, 0), 0))]);
    back(&[f(&seg(s, c, 0, 1, SYN | ACK, (900, 100), 0))]);
    out(&[f(&seg(c, s, 1, 1, ACK, (101, 900), 0))]);

    // IPv6: the SYN-ACK comes after --max-rtt (aged); the server's TSval, timed on the
    // client's side, falls to -P 80 (its remote port is the client's).
    let (c, s) = ((ip("2001:db8:95::1"), 40_000), (ip("2001:db8:96::1"), 80));
    out(&[f(&seg(c, s, 0, 0, SYN, (100, 0), 0))]);
    thread::sleep(ms(700));
    back(&[f(&seg(s, c, 0, 1, SYN | ACK, (900, 100), 0))]);
    out(&[f(&seg(c, s, 1, 1, ACK, (101, 900), 0))]);
    // A request answered in 30 ms: the one sample of the run.
    out(&[f(&seg(c, s, 1, 1, ACK | PSH, (102, 900), 10))]);
    thread::sleep(ms(30));
    back(&[f(&seg(s, c, 1, 11, ACK, (901, 102), 0))]);
    // A request never answered: removed once older than --max-rtt.
    out(&[f(&seg(c, s, 11, 1, ACK | PSH, (103, 901), 10))]);
    thread::sleep(Duration::from_millis(2500));

    let done = tracer.stop_with(libc::SIGINT);
    assert!(done.status.success(), "{done:?}");
    let report = &reports(&done.stdout)[0];
    assert_eq!(rows(report).len(), 1, "{report}");
    let row = row_of(report, "2001:db8:95::1");
    assert_eq!(row["key"]["port"], 80);
    assert_eq!(num(row, "count"), 1.0, "{row}");
    assert!(num(row, "min") >= 30_000.0, "{row}");
    let verbose = done.stderr.lines().last().unwrap_or_default();
    for needle in ["later than --max-rtt 2)", "samples 1,", "filtered out 3,"] {
        assert!(verbose.contains(needle), "{needle}: {verbose}");
    }
}

/// TC filters `bpftool net show` lists on `dev` in `host` (clsact only).
fn tc_filters(host: &Host, dev: &str) -> String {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            host.name(),
            "bpftool",
            "net",
            "show",
            "dev",
            dev,
        ])
        .output()
        .expect("running bpftool");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("clsact/"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn qdiscs(host: &Host, dev: &str) -> String {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            host.name(),
            "tc",
            "qdisc",
            "show",
            "dev",
            dev,
        ])
        .output()
        .expect("running tc");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn nothing_stays_on_the_interface_after_any_end_with_tcx() {
    let mut bed = TestBed::new();
    let (client, _server) = path(&mut bed, &["198.51.100.77"], &["203.0.113.77"], 1);
    for end in ["SIGINT", "SIGTERM", "SIGHUP", "-d", "SIGKILL"] {
        let mut args = vec!["--passive", "tun0", "--attach", "tcx"];
        if end == "-d" {
            args.extend(["-d", "1"]);
        }
        let tracer = wire_tracer(&client, &args);
        assert_eq!(
            tcx_programs(&client, "tun0"),
            2,
            "{end}: ingress and egress"
        );
        let loaded = tracer.loaded();
        let out = match end {
            "SIGINT" => tracer.stop_with(libc::SIGINT),
            "SIGTERM" => tracer.stop_with(libc::SIGTERM),
            "SIGHUP" => tracer.stop_with(libc::SIGHUP),
            "SIGKILL" => tracer.stop_with(libc::SIGKILL),
            _ => tracer.wait(),
        };
        if end != "SIGKILL" {
            assert!(out.status.success(), "{end}: {out:?}");
        }
        loaded.assert_gone();
        assert_eq!(tcx_programs(&client, "tun0"), 0, "{end}");
        assert_eq!(tc_filters(&client, "tun0"), "", "{end}");
    }
}

#[test]
fn clsact_filters_go_at_the_end_and_a_killed_runs_filters_at_the_next_start() {
    let mut bed = TestBed::new();
    let (client, _server) = path(&mut bed, &["198.51.100.78"], &["203.0.113.78"], 1);
    let args = ["--passive", "tun0", "--attach", "clsact"];

    let tracer = wire_tracer(&client, &args);
    assert_eq!(tc_filters(&client, "tun0").lines().count(), 2);
    let out = tracer.stop_with(libc::SIGTERM);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(tc_filters(&client, "tun0"), "");
    assert!(!qdiscs(&client, "tun0").contains("clsact"));

    let tracer = wire_tracer(&client, &args);
    tracer.stop_with(libc::SIGKILL);
    // What a kill leaves on a kernel without TCX: the filters, holding their program.
    assert_eq!(tc_filters(&client, "tun0").lines().count(), 2);
    let mut again: Vec<&str> = args.to_vec();
    again.extend(["-d", "0.5"]);
    let out = run_command(command(&client, &again));
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        out.stderr
            .lines()
            .filter(|l| l.starts_with("tcprtt: removed a stale filter of an earlier tcprtt"))
            .count(),
        2,
        "{}",
        out.stderr
    );
    assert_eq!(tc_filters(&client, "tun0"), "");
    assert!(!qdiscs(&client, "tun0").contains("clsact"));
}

#[test]
fn bad_interfaces_are_one_line_usage_errors_and_attach_nothing() {
    let mut bed = TestBed::new();
    let (client, _server) = path(&mut bed, &["198.51.100.79"], &["203.0.113.79"], 1);
    set_link(client.name(), "tun0", false);
    for (iface, needle) in [
        ("tcprtt-none0", "--passive tcprtt-none0: no such interface"),
        ("tun0", "--passive tun0: the interface is down"),
        (
            "lo",
            "--passive lo: a loopback device carries no wire traffic",
        ),
        (
            "a-name-of-16-byt",
            "--passive a-name-of-16-byt: interface names are at most 15 bytes",
        ),
    ] {
        let out = run_command(command(&client, &["--passive", iface, "-d", "1"]));
        out.assert_one_line_error(iface, 2, needle);
        assert_eq!(tcx_programs(&client, "tun0"), 0, "{iface}");
        assert_eq!(tc_filters(&client, "tun0"), "", "{iface}");
    }
    set_link(client.name(), "tun0", true);
    let started = Instant::now();
    let out = run_command(command(&client, &["--passive", "tun0", "-d", "0.2"]));
    assert!(out.status.success(), "{out:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
}
