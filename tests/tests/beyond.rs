//! What the reference tools lack: JSON reports, port and connection groupings, and the
//! -v self-report. Loopback traffic on addresses of this file's own (127.4.x.x).

use std::{collections::BTreeMap, thread};

use serde_json::Value;
use tcprtt_tests::{
    EchoServer, Tracer, labels, parse_histograms, ping_pong, ping_pong_parallel, sock_addr,
};

/// A JSON tracer and a text tracer watch the same traffic: every JSON line parses, has
/// the documented fields, and the per-address counts add up to the text report's.
#[test]
fn json_reports_parse_and_agree_with_the_text_report() {
    let a = EchoServer::start("127.4.0.1".parse().unwrap(), 0);
    let b = EchoServer::start("127.4.0.2".parse().unwrap(), 0);
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

#[test]
fn ports_and_connections_get_a_histogram_each() {
    let srv = EchoServer::start("127.4.1.1".parse().unwrap(), 0);
    let port = srv.addr.port();
    let traffic = || ping_pong(sock_addr("127.4.1.2", 0), srv.addr, 200);

    let t = Tracer::start(&["--by-lport", "-a", "127.4.1.1"]);
    traffic();
    let out = t.stop_with(libc::SIGINT);
    assert_eq!(
        labels(&out.stdout),
        [format!("Local Port = {port}")],
        "{}",
        out.stdout
    );

    let t = Tracer::start(&["--by-rport", "-a", "127.4.1.2"]);
    traffic();
    let out = t.stop_with(libc::SIGINT);
    assert_eq!(
        labels(&out.stdout),
        [format!("Remote Port = {port}")],
        "{}",
        out.stdout
    );

    // Two connections from the same client address: one histogram per connection.
    let t = Tracer::start(&["--by-flow", "-A", "127.4.1.1"]);
    traffic();
    traffic();
    let out = t.stop_with(libc::SIGINT);
    let got = labels(&out.stdout);
    assert_eq!(got.len(), 2, "{}", out.stdout);
    for label in &got {
        let rest = label.strip_prefix("Connection = 127.4.1.2:").expect(label);
        let (client_port, server) = rest.split_once(" -> ").expect(label);
        assert!(client_port.parse::<u16>().is_ok(), "{label}");
        assert_eq!(server, format!("127.4.1.1:{port}"));
    }
    assert_ne!(got[0], got[1]);
    for h in parse_histograms(&out.stdout) {
        assert!(h.count() >= 200, "{}", out.stdout);
    }
}

#[test]
fn verbose_reports_events_and_in_kernel_cost() {
    let srv = EchoServer::start("127.4.2.1".parse().unwrap(), 0);
    let t = Tracer::start(&["-v", "-A", "127.4.2.1", "-e"]);
    ping_pong(sock_addr("127.4.2.2", 0), srv.addr, 500);
    let out = t.stop_with(libc::SIGINT);
    assert!(out.status.success(), "{out:?}");
    let count = parse_histograms(&out.stdout)[0].count();
    let line = out
        .stderr
        .lines()
        .find(|l| l.starts_with("tcprtt: attach point "))
        .unwrap_or_else(|| panic!("no -v line: {}", out.stderr));
    let number_after = |word: &str| -> f64 {
        line.split(word)
            .nth(1)
            .and_then(|s| s.split([',', ';', ' ']).find(|s| !s.is_empty()))
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("{word} in {line}"))
    };
    let (seen, matched) = (number_after("events seen "), number_after("matched "));
    assert_eq!(matched as u64, count, "{line}");
    assert!(seen >= matched, "{line}");
    assert_eq!(number_after("dropped "), 0.0, "{line}");
    let cost = number_after("in-kernel cost ");
    assert!(cost > 0.0 && cost < 100_000.0, "{line}");
}
