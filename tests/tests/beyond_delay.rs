//! JSON percentiles, --top and --by-flow where round-trip times really differ: the
//! delay-line test bed (`tcprtt_tests::testbed`), with addresses of this file's own.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use serde_json::Value;
use tcprtt_tests::{
    Tracer, parse_histograms,
    testbed::{Conn, Delay, TestBed, round_trips_each},
};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// A client with paths of 2, 10 and 40 ms each way to three servers, one connection each.
fn three_servers(bed: &mut TestBed) -> Vec<Conn> {
    let client = bed.host("client", &["198.51.100.81"]);
    let servers = [
        ("203.0.113.81", 2),
        ("203.0.113.82", 10),
        ("203.0.113.83", 40),
    ];
    servers
        .iter()
        .map(|(addr, delay)| {
            let server = bed.host("server", &[addr]);
            bed.link(&client, &server, Delay::each_way(ms(*delay)));
            let srv = bed.serve(&server, SocketAddr::new(ip(addr), 0));
            client.connect(ip("198.51.100.81"), srv)
        })
        .collect()
}

#[test]
fn top_keeps_the_slowest_peers_slowest_first() {
    let mut bed = TestBed::new();
    let mut conns = three_servers(&mut bed);
    let by_raddr = Tracer::start(&["-B", "-A", "203.0.113.80/29", "--top", "2"]);
    let by_flow = Tracer::start(&["--by-flow", "-A", "203.0.113.80/29", "--top", "1"]);
    round_trips_each(&mut conns, 20);
    let by_flow = by_flow.stop_with(libc::SIGINT);
    let by_raddr = by_raddr.stop_with(libc::SIGINT);

    let hists = parse_histograms(&by_raddr.stdout);
    let labels: Vec<&str> = hists.iter().map(|h| h.label.as_str()).collect();
    assert_eq!(
        labels,
        [
            "Remote Address = 203.0.113.83",
            "Remote Address = 203.0.113.82"
        ],
        "{}",
        by_raddr.stdout
    );
    assert!(
        hists[0].avg >= 80_000.0 && hists[1].avg >= 20_000.0,
        "{}",
        by_raddr.stdout
    );
    assert!(hists[1].avg < 80_000.0, "{}", by_raddr.stdout);

    let far = &conns[2];
    assert_eq!(
        parse_histograms(&by_flow.stdout)
            .iter()
            .map(|h| h.label.clone())
            .collect::<Vec<_>>(),
        [format!("Connection = {} -> {}", far.local, far.peer)],
        "{}",
        by_flow.stdout
    );
}

/// On a fixed 20 ms path every sample is close to the kernel's final srtt, so the fine
/// buckets' percentiles must land within 6.25 % of it: far finer than the log2 row
/// (32768 -> 65535) a classic histogram gives.
#[test]
fn json_percentiles_are_within_a_sixteenth_of_the_kernels_srtt() {
    let mut bed = TestBed::new();
    let client = bed.host("client", &["198.51.100.91", "2001:db8:5:1::1"]);
    let server = bed.host("server", &["203.0.113.91", "2001:db8:5:2::1"]);
    bed.link(&client, &server, Delay::each_way(ms(20)));
    let v4 = bed.serve(&server, SocketAddr::new(ip("203.0.113.91"), 0));
    let v6 = bed.serve(&server, SocketAddr::new(ip("2001:db8:5:2::1"), 0));
    let mut conns = vec![
        client.connect(ip("198.51.100.91"), v4),
        client.connect(ip("2001:db8:5:1::1"), v6),
    ];
    let tracer = Tracer::start(&[
        "--by-flow",
        "-A",
        "203.0.113.91",
        "-A",
        "2001:db8:5:2::1",
        "--json",
    ]);
    round_trips_each(&mut conns, 40);
    let kernel: Vec<f64> = conns
        .iter()
        .map(|c| client.socket(c.local, c.peer).srtt_us)
        .collect();
    let out = tracer.stop_with(libc::SIGINT);
    assert!(out.status.success(), "{out:?}");

    let report: Value = serde_json::from_str(out.stdout.trim()).expect(&out.stdout);
    assert_eq!(report["group_by"], "flow");
    let hists = report["histograms"].as_array().unwrap();
    assert_eq!(hists.len(), 2, "{}", out.stdout);
    for (conn, srtt) in conns.iter().zip(kernel) {
        let h = hists
            .iter()
            .find(|h| h["key"]["lport"] == conn.local.port())
            .unwrap_or_else(|| panic!("no histogram for {}: {}", conn.local, out.stdout));
        assert_eq!(h["key"]["addr"], conn.peer.ip().to_string());
        assert_eq!(h["key"]["port"], conn.peer.port());
        assert_eq!(h["key"]["laddr"], conn.local.ip().to_string());
        assert_eq!(
            h["key"]["family"],
            if conn.peer.is_ipv4() { "ipv4" } else { "ipv6" }
        );
        assert!(h["count"].as_u64().unwrap() >= 40, "{}", out.stdout);
        assert!(h["min"].as_u64().unwrap() >= 40_000, "{}", out.stdout);
        let p50 = h["p50"].as_f64().unwrap();
        assert!(
            (p50 - srtt).abs() <= 0.0625 * srtt,
            "p50 {p50} vs ss srtt {srtt} µs: {}",
            out.stdout
        );
    }
}
