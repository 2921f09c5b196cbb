//! tcprtt against real round-trip times: test hosts in network namespaces joined by the
//! test bed's delay lines (`tcprtt_tests::testbed`), checked against the kernel's own view
//! (`ss -ti`, the namespaces' SNMP counters). Each test has its own addresses, so traffic
//! of other tests or of the host cannot match its filters.
//!
//! A path's delays are minimums (the delay line never delivers early) and the kernel's
//! srtt is a weighted average of RTT samples, so the srtt of a path with one-way delays
//! summing to D ms never reads below D ms: those lower bounds are exact, not tolerances.

use std::{
    net::{IpAddr, SocketAddr},
    thread,
    time::Duration,
};

use tcprtt_tests::{
    Printed, Tracer, parse_histograms,
    testbed::{Conn, Delay, Host, Load, TestBed, round_trips_each},
};

/// The log2 slots (µs) that paths of 5, 20 and 40 ms each way fall in.
const RTT_10MS: (u64, u64) = (8192, 16383);
const RTT_40MS: (u64, u64) = (32768, 65535);
const RTT_80MS: (u64, u64) = (65536, 131071);

/// Longer than a delayed ACK waits (200 ms at most) plus the slowest one-way delay here:
/// after it, idle connections have nothing left in flight.
const QUIET: Duration = Duration::from_millis(400);

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn sa(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Share of a histogram's samples in `slot`.
fn share(h: &Printed, slot: (u64, u64)) -> f64 {
    h.count_within(slot.0, slot.1) as f64 / h.count() as f64
}

/// Segments the socket `local` -> `peer` in `host` has received so far.
fn segs_in(host: &Host, local: SocketAddr, peer: SocketAddr) -> u64 {
    host.socket(local, peer).segs_in
}

/// A client and a server joined by a path of 20 ms each way.
fn twenty_ms_path(bed: &mut TestBed, client: &[&str], server: &[&str]) -> (Host, Host) {
    let c = bed.host("client", client);
    let s = bed.host("server", server);
    bed.link(&c, &s, Delay::each_way(ms(20)));
    (c, s)
}

#[test]
fn twenty_ms_each_way_lands_in_32768_to_65535_and_agrees_with_ss() {
    let mut bed = TestBed::new();
    let (client, server) = twenty_ms_path(&mut bed, &["198.51.100.17"], &["203.0.113.17"]);
    let srv = bed.serve(&server, sa("203.0.113.17", 0));
    let mut conn = client.connect(ip("198.51.100.17"), srv);
    let before = segs_in(&client, conn.local, conn.peer);

    let tracer = Tracer::start(&["--raddr", "203.0.113.17", "-e"]);
    conn.round_trips(50);
    let kernel = client.socket(conn.local, conn.peer);
    let out = tracer.stop_with(libc::SIGINT);

    assert!(out.status.success(), "{out:?}");
    let hists = parse_histograms(&out.stdout);
    assert_eq!(hists.len(), 1, "{}", out.stdout);
    let h = &hists[0];
    assert_eq!(h.label, "All Addresses = ******");
    // Every response, and nothing the client socket did not receive (the server's
    // socket, whose remote address is the client, is filtered out).
    assert!(
        (50..=kernel.segs_in - before).contains(&h.count()),
        "{kernel:?}, {before} before\n{}",
        out.stdout
    );
    assert_eq!(h.extension_field("count"), Some(h.count()));
    assert!(share(h, RTT_40MS) >= 0.95, "{}", out.stdout);
    assert!(h.extension_field("min") >= Some(40_000), "{}", out.stdout);
    assert!(
        (h.avg - kernel.srtt_us).abs() <= 0.10 * kernel.srtt_us,
        "AVG {} vs ss srtt {} µs\n{}",
        h.avg,
        kernel.srtt_us,
        out.stdout
    );
}

#[test]
fn milliseconds_on_the_same_path_land_in_32_to_63() {
    let mut bed = TestBed::new();
    let (client, server) = twenty_ms_path(&mut bed, &["2001:db8:2:1::1"], &["2001:db8:2:2::1"]);
    let srv = bed.serve(&server, sa("2001:db8:2:2::1", 0));
    let mut conn = client.connect(ip("2001:db8:2:1::1"), srv);
    let before = segs_in(&client, conn.local, conn.peer);

    let tracer = Tracer::start(&["--raddr", "2001:db8:2:2::1", "-m", "-e"]);
    conn.round_trips(40);
    let after = segs_in(&client, conn.local, conn.peer);
    let out = tracer.stop_with(libc::SIGINT);

    assert!(out.status.success(), "{out:?}");
    assert!(
        out.stdout
            .contains("        ms               : count    distribution"),
        "{}",
        out.stdout
    );
    let hists = parse_histograms(&out.stdout);
    assert_eq!(hists.len(), 1, "{}", out.stdout);
    let h = &hists[0];
    assert!(
        (40..=after - before).contains(&h.count()),
        "{before}..{after}\n{}",
        out.stdout
    );
    assert_eq!(h.count_within(32, 63), h.count(), "{}", out.stdout);
    assert!(h.extension_field("min") >= Some(40), "{}", out.stdout);
    assert!(h.extension.as_ref().unwrap().ends_with("(ms)"));
}

#[test]
fn by_raddr_gives_a_5ms_and_a_40ms_server_their_own_histograms_in_both_families() {
    let mut bed = TestBed::new();
    let client = bed.host("client", &["198.51.100.49", "2001:db8:3:1::1"]);
    let near = bed.host("near", &["203.0.113.49", "2001:db8:3:2::1"]);
    let far = bed.host("far", &["203.0.113.50", "2001:db8:3:2::2"]);
    bed.link(&client, &near, Delay::each_way(ms(5)));
    bed.link(&client, &far, Delay::each_way(ms(40)));
    let mut conns: Vec<Conn> = [
        (&near, "198.51.100.49", "203.0.113.49"),
        (&far, "198.51.100.49", "203.0.113.50"),
        (&near, "2001:db8:3:1::1", "2001:db8:3:2::1"),
        (&far, "2001:db8:3:1::1", "2001:db8:3:2::2"),
    ]
    .into_iter()
    .map(|(server, local, remote)| {
        let srv = bed.serve(server, sa(remote, 0));
        client.connect(ip(local), srv)
    })
    .collect();
    let before: Vec<u64> = conns
        .iter()
        .map(|c| segs_in(&client, c.local, c.peer))
        .collect();

    let tracer = Tracer::start(&["-B", "-A", "203.0.113.48/30", "-A", "2001:db8:3:2::/64"]);
    round_trips_each(&mut conns, 25);
    let after: Vec<u64> = conns
        .iter()
        .map(|c| segs_in(&client, c.local, c.peer))
        .collect();
    let out = tracer.stop_with(libc::SIGINT);

    assert!(out.status.success(), "{out:?}");
    let hists = parse_histograms(&out.stdout);
    let labels: Vec<&str> = hists.iter().map(|h| h.label.as_str()).collect();
    assert_eq!(
        labels,
        [
            "Remote Address = 203.0.113.49",
            "Remote Address = 203.0.113.50",
            "Remote Address = 2001:db8:3:2::1",
            "Remote Address = 2001:db8:3:2::2",
        ],
        "{}",
        out.stdout
    );
    // IPv4 near, IPv4 far, IPv6 near, IPv6 far, as the connections.
    let expected = [(RTT_10MS, 10_000.0), (RTT_80MS, 80_000.0)].repeat(2);
    for (i, (h, (slot, floor))) in hists.iter().zip(expected).enumerate() {
        assert!(
            (25..=after[i] - before[i]).contains(&h.count()),
            "{}: {}..{}\n{}",
            h.label,
            before[i],
            after[i],
            out.stdout
        );
        assert!(share(h, slot) >= 0.95, "{}\n{}", h.label, out.stdout);
        assert!(h.avg >= floor, "{}\n{}", h.label, out.stdout);
    }
}

/// A histogram a filter must keep, and the socket its samples must come from.
struct Kept<'a> {
    label: &'static str,
    host: &'a Host,
    local: SocketAddr,
    peer: SocketAddr,
    slot: (u64, u64),
}

impl Kept<'_> {
    fn segs_in(&self) -> u64 {
        segs_in(self.host, self.local, self.peer)
    }
}

/// Six connections at once over two delayed paths; each filter must keep exactly the
/// socket(s) it names. The kept socket's bucket tells paths apart; its count, between the
/// round trips it did and the segments it received, shows that no other socket on the
/// same path (differing only by address or port) got through.
#[test]
fn cidr_and_port_filters_keep_exactly_the_intended_delayed_connection() {
    let mut bed = TestBed::new();
    let client = bed.host(
        "client",
        &["198.51.100.65", "198.51.100.73", "2001:db8:4:1::1"],
    );
    let a = bed.host("a", &["203.0.113.65", "2001:db8:4:2::1"]);
    let b = bed.host("b", &["203.0.113.73"]);
    bed.link(&client, &a, Delay::each_way(ms(5)));
    bed.link(&client, &b, Delay::each_way(ms(20)));
    let a1 = bed.serve(&a, sa("203.0.113.65", 0));
    let a2 = bed.serve(&a, sa("203.0.113.65", 0));
    let a1_v6 = bed.serve(&a, sa("2001:db8:4:2::1", a1.port()));
    let b1 = bed.serve(&b, sa("203.0.113.73", 0));
    let mut conns = vec![
        client.connect(ip("198.51.100.65"), a1),
        client.connect(ip("198.51.100.65"), a2),
        client.connect(ip("198.51.100.73"), a1),
        client.connect(ip("198.51.100.65"), b1),
        client.connect(ip("198.51.100.73"), b1),
        client.connect(ip("2001:db8:4:1::1"), a1_v6),
    ];
    let (p_a1, p_a2, p_b1) = (a1.port(), a2.port(), b1.port());
    let p_k5 = conns[4].local.port();

    let client_side = |k: usize, label, slot| Kept {
        label,
        host: &client,
        local: conns[k].local,
        peer: conns[k].peer,
        slot,
    };
    let cases = [
        (
            format!("-B -A 203.0.113.64/29 -P {p_a2}"),
            vec![client_side(1, "Remote Address = 203.0.113.65", RTT_10MS)],
        ),
        (
            "-b -a 198.51.100.72/29 -A 203.0.113.72/29".into(),
            vec![client_side(4, "Local Address = 198.51.100.73", RTT_40MS)],
        ),
        (
            format!("-b -a 203.0.113.64/29 -p {p_a1} -A 198.51.100.72/29"),
            vec![Kept {
                label: "Local Address = 203.0.113.65",
                host: &a,
                local: a1,
                peer: conns[2].local,
                slot: RTT_10MS,
            }],
        ),
        (
            format!("-B -a 198.51.100.64/29 -P {p_a1} -P {p_b1}"),
            vec![
                client_side(0, "Remote Address = 203.0.113.65", RTT_10MS),
                client_side(3, "Remote Address = 203.0.113.73", RTT_40MS),
            ],
        ),
        (
            format!("-B -A 2001:db8:4::/48 -P {p_a1}"),
            vec![client_side(5, "Remote Address = 2001:db8:4:2::1", RTT_10MS)],
        ),
        (
            format!("-b -a 198.51.100.64/28 -p {p_k5}"),
            vec![client_side(4, "Local Address = 198.51.100.73", RTT_40MS)],
        ),
    ];

    const ROUND_TRIPS: u64 = 15;
    for (args, expected) in &cases {
        let args: Vec<&str> = args.split(' ').collect();
        let tracer = Tracer::start(&args);
        let before: Vec<u64> = expected.iter().map(Kept::segs_in).collect();
        round_trips_each(&mut conns, ROUND_TRIPS as usize);
        thread::sleep(QUIET);
        let after: Vec<u64> = expected.iter().map(Kept::segs_in).collect();
        let out = tracer.stop_with(libc::SIGINT);

        assert!(out.status.success(), "{args:?}: {out:?}");
        let hists = parse_histograms(&out.stdout);
        let labels: Vec<&str> = hists.iter().map(|h| h.label.as_str()).collect();
        let wanted: Vec<&str> = expected.iter().map(|k| k.label).collect();
        assert_eq!(labels, wanted, "{args:?}\n{}", out.stdout);
        for (i, (h, kept)) in hists.iter().zip(expected).enumerate() {
            assert!(
                (ROUND_TRIPS..=after[i] - before[i]).contains(&h.count()),
                "{args:?} {}: {}..{} segments\n{}",
                h.label,
                before[i],
                after[i],
                out.stdout
            );
            // Which connection it is shows in the label and the count; the samples only
            // have to say which path. The 20 ms-each-way path never reads below 40 ms, and
            // the 5 ms one stays far below that even when a delayed ACK or a busy machine
            // pushes a few smoothed samples over the 16383 µs edge; so the check is on the
            // side of 32768 µs every sample lies, with most in the path's own row.
            let (below, above) = (h.count_within(0, 32767), h.count_within(32768, u64::MAX));
            if kept.slot == RTT_40MS {
                assert_eq!(below, 0, "{args:?}\n{}", out.stdout);
            } else {
                assert_eq!(above, 0, "{args:?}\n{}", out.stdout);
            }
            assert!(share(h, kept.slot) >= 0.5, "{args:?}\n{}", out.stdout);
        }
    }
}

#[test]
fn interval_reports_follow_a_delay_change_from_5_to_40_ms() {
    let mut bed = TestBed::new();
    let client = bed.host("client", &["198.51.100.81"]);
    let server = bed.host("server", &["203.0.113.81"]);
    let link = bed.link(&client, &server, Delay::each_way(ms(5)));
    let srv = bed.serve(&server, sa("203.0.113.81", 0));
    let conns = (0..4)
        .map(|_| client.connect(ip("198.51.100.81"), srv))
        .collect();

    let tracer = Tracer::start(&["-A", "203.0.113.81", "-i", "1", "-d", "5"]);
    let load = Load::start(conns);
    // Halfway through the second interval.
    thread::sleep(ms(1500));
    link.set_delay(Delay::each_way(ms(40)));
    let out = tracer.wait();
    load.stop();

    assert!(out.status.success(), "{out:?}");
    let hists = parse_histograms(&out.stdout);
    assert_eq!(hists.len(), 5, "{}", out.stdout);
    assert!(hists[0].count() >= 100, "{}", out.stdout);
    assert!(share(&hists[0], RTT_10MS) >= 0.95, "{}", out.stdout);
    // The kernel's srtt moves 1/8 of the way to each new 80 ms sample, so it is past
    // 64 ms about 1.2 s after the change: from the fourth interval on.
    for h in &hists[3..] {
        assert!(share(h, RTT_80MS) >= 0.95, "{}", out.stdout);
    }
    // After the change every sample is longer than srtt, so srtt only rises.
    for pair in hists[..4].windows(2) {
        assert!(pair[1].avg > pair[0].avg, "{}", out.stdout);
    }
}

/// Many connections on two paths and both families for 10 s: nothing lost between the
/// kernel and the printed report. Connections are established (and past their first
/// exchange) before tcprtt attaches, so every TCP segment the namespaces receive in the
/// window reaches tcp_rcv_established on an established socket, except those the kernel
/// merges or drops in a busy socket's backlog, which it counts separately.
#[test]
fn ten_seconds_of_parallel_connections_lose_no_segment() {
    let mut bed = TestBed::new();
    let client = bed.host("client", &["198.51.100.97", "2001:db8:6:1::1"]);
    let s1 = bed.host("s1", &["203.0.113.97", "2001:db8:6:2::1"]);
    let s2 = bed.host("s2", &["203.0.113.98", "2001:db8:6:2::2"]);
    bed.link(&client, &s1, Delay::each_way(ms(1)).with_jitter(ms(1)));
    bed.link(&client, &s2, Delay::each_way(ms(2)).with_jitter(ms(1)));
    let mut conns = Vec::new();
    for (server, local, remote) in [
        (&s1, "198.51.100.97", "203.0.113.97"),
        (&s1, "2001:db8:6:1::1", "2001:db8:6:2::1"),
        (&s2, "198.51.100.97", "203.0.113.98"),
        (&s2, "2001:db8:6:1::1", "2001:db8:6:2::2"),
    ] {
        let srv = bed.serve(server, sa(remote, 0));
        conns.extend((0..8).map(|_| client.connect(ip(local), srv)));
    }
    round_trips_each(&mut conns, 3);
    thread::sleep(QUIET);
    let hosts = [&client, &s1, &s2];
    let counters = || {
        let sum = |group, name| hosts.iter().map(|h| h.counter(group, name)).sum::<u64>();
        [
            sum("Tcp", "InSegs"),
            sum("TcpExt", "TCPBacklogCoalesce"),
            sum("TcpExt", "TCPBacklogDrop"),
        ]
    };

    let tracer = Tracer::start(&[
        "-a",
        "198.51.100.96/28",
        "-a",
        "203.0.113.96/28",
        "-a",
        "2001:db8:6::/48",
        "-e",
    ]);
    let before = counters();
    let load = Load::start(conns);
    thread::sleep(Duration::from_secs(10));
    // Kept open: closing would add segments that arrive in other states.
    let idle = load.stop();
    let done: u64 = idle.iter().map(|(_, n)| n).sum();
    thread::sleep(QUIET);
    let after = counters();
    let out = tracer.stop_with(libc::SIGINT);

    assert!(out.status.success(), "{out:?}");
    let hists = parse_histograms(&out.stdout);
    assert_eq!(hists.len(), 1, "{}", out.stdout);
    let h = &hists[0];
    assert_eq!(
        h.extension_field("count"),
        Some(h.count()),
        "{}",
        out.stdout
    );
    let [in_segs, coalesced, dropped] = [0, 1, 2].map(|i| after[i] - before[i]);
    assert_eq!(
        h.count(),
        in_segs - coalesced - dropped,
        "InSegs +{in_segs}, backlog coalesced +{coalesced}, dropped +{dropped}\n{}",
        out.stdout
    );
    // A request at the server and a response at the client per round trip.
    assert!(done >= 10_000, "only {done} round trips");
    assert!(
        h.count() >= 2 * done - coalesced,
        "{done} round trips\n{}",
        out.stdout
    );
}
