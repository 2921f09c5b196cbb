//! A run from start to end: attaching, the signals and --duration that end it with its
//! report, and the program and maps it leaves behind (none). Loopback traffic on
//! 127.3.0.x.

use std::time::{Duration, Instant};

use tcprtt_tests::kit::{EchoServer, Tracer, parse_histograms, ping_pong, run, sock_addr};

#[test]
fn sigint_prints_one_histogram_of_all_traffic_and_unloads() {
    let srv = EchoServer::on("127.3.0.1");
    let tracer = Tracer::start(&["-A", "127.3.0.1", "-e"]);
    assert!(
        tracer
            .attach_line
            .starts_with("Tracing TCP RTT via fentry/tcp_rcv_established. Hit")
            || tracer
                .attach_line
                .starts_with("Tracing TCP RTT via tp_btf/tcp_probe (fentry refused: "),
        "{}",
        tracer.attach_line
    );
    assert!(
        tracer.before_attach.is_empty(),
        "{:?}",
        tracer.before_attach
    );
    let ours = tracer.loaded();
    assert_eq!(ours.programs.len(), 1, "one program attached: {ours:?}");
    ping_pong(sock_addr("127.3.0.2", 0), srv.addr, 300);
    let out = tracer.stop_with(libc::SIGINT);
    assert!(out.status.success(), "{out:?}");
    let hists = parse_histograms(&out.stdout);
    assert_eq!(hists.len(), 1, "{}", out.stdout);
    let h = &hists[0];
    assert_eq!(h.label, "All Addresses = ******");
    assert!(
        out.stdout
            .contains("        µs               : count    distribution")
    );
    // The client socket receives (at least) every response.
    assert!(h.count() >= 300, "{}", out.stdout);
    assert_eq!(h.extension_field("count"), Some(h.count()));
    assert!(h.avg > 0.0 && h.rows[0].0 == 0, "{}", out.stdout);
    ours.assert_gone();
}

#[test]
fn sigterm_prints_the_report_and_exits_0() {
    let srv = EchoServer::on("127.3.0.5");
    let tracer = Tracer::start(&["-A", "127.3.0.5"]);
    ping_pong(sock_addr("127.3.0.6", 0), srv.addr, 100);
    let out = tracer.stop_with(libc::SIGTERM);
    assert!(out.status.success(), "{out:?}");
    assert!(
        parse_histograms(&out.stdout)[0].count() >= 100,
        "{}",
        out.stdout
    );
}

#[test]
fn nothing_matched_says_so() {
    let out = run(&["-A", "127.3.0.9", "-d", "0.5"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.stdout, "No TCP RTT samples matched.\n");
}

#[test]
fn duration_ends_the_run_on_time_with_exit_0() {
    let started = Instant::now();
    let out = run(&["-d", "1"]);
    let elapsed = started.elapsed();
    assert!(out.status.success(), "{out:?}");
    assert!(
        elapsed >= Duration::from_secs(1) && elapsed < Duration::from_secs(3),
        "{elapsed:?}"
    );
}
