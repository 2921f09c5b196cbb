//! -v: the self-report of what the program saw and what it cost.

use tcprtt_tests::kit::{EchoServer, Tracer, parse_histograms, ping_pong, sock_addr};

#[test]
fn verbose_reports_events_and_in_kernel_cost() {
    let srv = EchoServer::on("127.4.2.1");
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
    // Its parts add up to the whole, to the 0.1 ms each is rounded to.
    let parts: f64 = ["kernel BTF ", "aya's loader ", ", attach "]
        .into_iter()
        .map(number_after)
        .sum();
    let startup = number_after("start-up ");
    assert!(startup > 0.0 && (startup - parts).abs() <= 0.2, "{line}");
}
