//! tcprtt against real round-trip times: test hosts in network namespaces joined by the
//! test bed's delay lines (`tcprtt_tests::testbed`), checked against the kernel's own view
//! (`ss -ti`, the namespaces' SNMP counters); and exact counts under parallel load. Each
//! test has its own addresses, so traffic of other tests or of the host cannot match its
//! filters.
//!
//! A path's delays are minimums (the delay line never delivers early) and the kernel's
//! srtt is a weighted average of RTT samples, so the srtt of a path with one-way delays
//! summing to D ms never reads below D ms: those lower bounds are exact, not tolerances.

use std::{thread, time::Duration};

use tcprtt_tests::{
    kit::{
        EchoServer, Load, Tracer, ip, parse_histograms, ping_pong, ping_pong_parallel,
        round_trips_each, sock_addr,
    },
    testbed::{Delay, Host, QUIET, RTT_40MS, TestBed},
};

/// A client and a server joined by a path of 20 ms each way.
fn twenty_ms_path(bed: &mut TestBed, client: &[&str], server: &[&str]) -> (Host, Host) {
    let c = bed.host("client", client);
    let s = bed.host("server", server);
    bed.link(&c, &s, Delay::each_way(Duration::from_millis(20)));
    (c, s)
}

#[test]
fn twenty_ms_each_way_lands_in_32768_to_65535_and_agrees_with_ss() {
    let mut bed = TestBed::new();
    let (client, server) = twenty_ms_path(&mut bed, &["198.51.100.17"], &["203.0.113.17"]);
    let srv = bed.serve(&server, sock_addr("203.0.113.17", 0));
    let mut conn = client.connect(ip("198.51.100.17"), srv);
    let before = client.socket(conn.local, conn.peer).segs_in;

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
    assert!(h.share(RTT_40MS) >= 0.95, "{}", out.stdout);
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
    let srv = bed.serve(&server, sock_addr("2001:db8:2:2::1", 0));
    let mut conn = client.connect(ip("2001:db8:2:1::1"), srv);
    let before = client.socket(conn.local, conn.peer).segs_in;

    let tracer = Tracer::start(&["--raddr", "2001:db8:2:2::1", "-m", "-e"]);
    conn.round_trips(40);
    let after = client.socket(conn.local, conn.peer).segs_in;
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

/// Two tracers see the same segments: the -m one must hold each µs sample divided by 1000.
#[test]
fn milliseconds_are_the_same_samples_divided_by_1000() {
    let srv = EchoServer::on("127.3.3.1");
    let us = Tracer::start(&["-A", "127.3.3.1", "-e"]);
    let ms = Tracer::start(&["-A", "127.3.3.1", "-e", "-m"]);
    ping_pong(sock_addr("127.3.3.2", 0), srv.addr, 300);
    let ms_out = ms.stop_with(libc::SIGINT);
    let us_out = us.stop_with(libc::SIGINT);
    let (us_h, ms_h) = (
        &parse_histograms(&us_out.stdout)[0],
        &parse_histograms(&ms_out.stdout)[0],
    );
    assert!(
        ms_out
            .stdout
            .contains("        ms               : count    distribution")
    );
    assert!(ms_h.extension.as_ref().unwrap().ends_with("(ms)"));
    assert_eq!(
        ms_h.count(),
        us_h.count(),
        "{}\n{}",
        us_out.stdout,
        ms_out.stdout
    );
    for field in ["min", "max"] {
        assert_eq!(
            ms_h.extension_field(field),
            us_h.extension_field(field).map(|v| v / 1000),
            "{field}"
        );
    }
}

#[test]
fn parallel_traffic_on_both_cpus_is_counted_exactly() {
    let srv = EchoServer::on("127.3.5.1");
    let tracer = Tracer::start(&["-A", "127.3.5.1", "-e"]);
    ping_pong_parallel(sock_addr("127.3.5.2", 0), srv.addr, 8, 1000);
    let out = tracer.stop_with(libc::SIGINT);
    let h = &parse_histograms(&out.stdout)[0];
    assert!(h.count() >= 8000, "{}", out.stdout);
    assert_eq!(
        h.extension_field("count"),
        Some(h.count()),
        "{}",
        out.stdout
    );
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
    bed.link(
        &client,
        &s1,
        Delay::each_way(Duration::from_millis(1)).with_jitter(Duration::from_millis(1)),
    );
    bed.link(
        &client,
        &s2,
        Delay::each_way(Duration::from_millis(2)).with_jitter(Duration::from_millis(1)),
    );
    let mut conns = Vec::new();
    for (server, local, remote) in [
        (&s1, "198.51.100.97", "203.0.113.97"),
        (&s1, "2001:db8:6:1::1", "2001:db8:6:2::1"),
        (&s2, "198.51.100.97", "203.0.113.98"),
        (&s2, "2001:db8:6:1::1", "2001:db8:6:2::2"),
    ] {
        let srv = bed.serve(server, sock_addr(remote, 0));
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
