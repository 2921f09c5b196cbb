//! --json: one NDJSON object per report, agreeing with the text report, with
//! percentiles checked on a delay line against the kernel's own srtt.

use std::{collections::BTreeMap, net::SocketAddr, thread, time::Duration};

use serde_json::Value;
use tcprtt_tests::{
    kit::{
        EchoServer, Tracer, ip, parse_histograms, ping_pong, ping_pong_parallel, round_trips_each,
        sock_addr,
    },
    testbed::{Delay, TestBed},
};

/// A JSON tracer and a text tracer watch the same traffic: every JSON line parses, has
/// the documented fields, and the per-address counts add up to the text report's.
#[test]
fn json_reports_parse_and_agree_with_the_text_report() {
    let a = EchoServer::on("127.4.0.1");
    let b = EchoServer::on("127.4.0.2");
    let text = Tracer::start(&["-B", "-A", "127.4.0.0/29", "-e"]);
    let json = Tracer::start(&[
        "-B",
        "-A",
        "127.4.0.0/29",
        "--json",
        "-i",
        "0.5",
        "-d",
        "2.5",
    ]);
    thread::scope(|s| {
        s.spawn(|| ping_pong_parallel(sock_addr("127.4.0.5", 0), a.addr, 2, 300));
        s.spawn(|| ping_pong(sock_addr("127.4.0.6", 0), b.addr, 500));
    });
    let json = json.wait();
    let text = text.stop_with(libc::SIGINT);
    assert!(json.status.success(), "{json:?}");

    let mut json_counts: BTreeMap<String, u64> = BTreeMap::new();
    let lines: Vec<&str> = json.stdout.lines().collect();
    assert_eq!(lines.len(), 5, "one line per report: {}", json.stdout);
    for line in lines {
        let report: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(report["time"].as_str().unwrap().ends_with('Z'), "{line}");
        let interval = report["interval_s"].as_f64().unwrap();
        assert!((0.4..0.8).contains(&interval), "{line}");
        assert_eq!(report["unit"], "us");
        assert!(["fentry", "tp_btf"].contains(&report["attach"].as_str().unwrap()));
        assert_eq!(report["group_by"], "raddr");
        assert_eq!(report["dropped"], 0);
        assert!(report["missed"].is_u64(), "{line}");
        for h in report["histograms"].as_array().unwrap() {
            assert_eq!(h["key"]["family"], "ipv4");
            let count = h["count"].as_u64().unwrap();
            let buckets: u64 = h["buckets"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| {
                    assert!(b["low"].as_u64().unwrap() <= b["high"].as_u64().unwrap());
                    b["count"].as_u64().unwrap()
                })
                .sum();
            assert_eq!(buckets, count, "{line}");
            let (min, max) = (h["min"].as_u64().unwrap(), h["max"].as_u64().unwrap());
            let avg = h["avg"].as_f64().unwrap();
            assert!(min as f64 <= avg && avg <= max as f64, "{line}");
            for p in ["p50", "p90", "p99"] {
                let v = h[p].as_u64().unwrap();
                assert!(min <= v && v <= max, "{p} {line}");
            }
            let addr = h["key"]["addr"].as_str().unwrap().to_string();
            *json_counts.entry(addr).or_default() += count;
        }
    }
    let text_counts: BTreeMap<String, u64> = parse_histograms(&text.stdout)
        .iter()
        .map(|h| {
            (
                h.label.trim_start_matches("Remote Address = ").to_string(),
                h.count(),
            )
        })
        .collect();
    assert_eq!(json_counts, text_counts, "{}\n{}", json.stdout, text.stdout);
    assert_eq!(
        json_counts.len(),
        4,
        "two servers and two clients: {}",
        text.stdout
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
    bed.link(&client, &server, Delay::each_way(Duration::from_millis(20)));
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
