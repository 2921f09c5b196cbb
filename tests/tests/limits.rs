//! Limits: more keys than --max-keys are counted as dropped, exactly.

use tcprtt_tests::kit::{EchoServer, Tracer, parse_histograms, ping_pong, sock_addr};

/// More distinct keys than --max-keys: the extra samples are counted, not invented or
/// silently lost, and the report says how many.
#[test]
fn a_full_map_reports_exactly_how_many_samples_it_dropped() {
    let srv = EchoServer::on("127.3.7.1");
    let tracer = Tracer::start(&["-b", "-a", "127.3.7.0/24", "--max-keys", "2", "-v"]);
    for client in ["127.3.7.2", "127.3.7.3", "127.3.7.4"] {
        ping_pong(sock_addr(client, 0), srv.addr, 100);
    }
    let out = tracer.stop_with(libc::SIGINT);
    assert!(out.status.success(), "{out:?}");
    let kept: u64 = parse_histograms(&out.stdout)
        .iter()
        .map(|h| h.count())
        .sum();
    assert_eq!(parse_histograms(&out.stdout).len(), 2, "{}", out.stdout);
    let warning = out
        .stdout
        .lines()
        .find(|l| l.starts_with("WARNING: "))
        .unwrap_or_else(|| panic!("no warning: {}", out.stdout));
    let dropped: u64 = warning
        .trim_start_matches("WARNING: ")
        .split(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .expect("dropped count");
    assert!(
        warning.ends_with("samples dropped: more than 2 distinct keys (raise --max-keys)"),
        "{warning}"
    );
    assert!(dropped >= 100, "{warning}");
    let matched: u64 = out
        .stderr
        .split("matched ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{}", out.stderr));
    assert_eq!(kept + dropped, matched, "{}\n{}", out.stdout, out.stderr);
}
