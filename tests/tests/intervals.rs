//! -i: each report counts only its own interval, and together they count everything;
//! past the 30 s drain period too; and they follow an RTT that changes.

use std::{
    thread,
    time::{Duration, Instant},
};

use tcprtt_tests::{
    kit::{
        EchoServer, Load, Tracer, ip, parse_histograms, ping_pong, ping_pong_parallel, sock_addr,
    },
    testbed::{Delay, RTT_10MS, RTT_80MS, TestBed},
};

#[test]
fn interval_reports_are_timestamped_and_exact_against_a_whole_run() {
    let srv = EchoServer::on("127.3.4.1");
    let whole = Tracer::start(&["-A", "127.3.4.1", "-e"]);
    let started = Instant::now();
    let intervals = Tracer::start(&["-A", "127.3.4.1", "-e", "-i", "0.5", "-d", "3", "-T"]);
    ping_pong_parallel(sock_addr("127.3.4.2", 0), srv.addr, 4, 400);
    let out = intervals.wait();
    let elapsed = started.elapsed();
    let whole = whole.stop_with(libc::SIGINT);
    assert!(out.status.success(), "{out:?}");
    assert!(
        elapsed >= Duration::from_millis(2900) && elapsed < Duration::from_secs(6),
        "{elapsed:?}"
    );
    let stamps = out
        .stdout
        .lines()
        .filter(|l| {
            l.len() == 8
                && l.bytes().enumerate().all(|(i, c)| {
                    if i == 2 || i == 5 {
                        c == b':'
                    } else {
                        c.is_ascii_digit()
                    }
                })
        })
        .count();
    assert_eq!(stamps, 6, "{}", out.stdout);
    // Every sample of the traffic falls in exactly one interval.
    let per_interval: u64 = parse_histograms(&out.stdout)
        .iter()
        .map(|h| h.count())
        .sum();
    let total = parse_histograms(&whole.stdout)[0].count();
    assert!(total >= 1600, "{}", whole.stdout);
    assert_eq!(per_interval, total, "{}\n{}", out.stdout, whole.stdout);
}

/// Past the 30 s at which tcprtt drains the kernel's 32-bit buckets into its own totals:
/// a whole-run report (one periodic drain plus the final one) must hold exactly the
/// samples of a tracer reporting every 4 s over the same traffic.
#[test]
fn runs_longer_than_the_drain_period_lose_nothing() {
    let srv = EchoServer::on("127.3.8.1");
    let whole = Tracer::start(&["-A", "127.3.8.1", "-e"]);
    let intervals = Tracer::start(&["-A", "127.3.8.1", "-i", "4", "-d", "34"]);
    let started = Instant::now();
    let mut round_trips = 0;
    while started.elapsed() < Duration::from_secs(32) {
        ping_pong(sock_addr("127.3.8.2", 0), srv.addr, 100);
        round_trips += 100;
        thread::sleep(Duration::from_millis(50));
    }
    let intervals = intervals.wait();
    let whole = whole.stop_with(libc::SIGINT);
    assert!(intervals.status.success() && whole.status.success());
    let total = parse_histograms(&whole.stdout)[0].count();
    let per_interval: u64 = parse_histograms(&intervals.stdout)
        .iter()
        .map(|h| h.count())
        .sum();
    assert!(
        total >= round_trips,
        "{total} < {round_trips}\n{}",
        whole.stdout
    );
    assert_eq!(
        per_interval, total,
        "{}\n{}",
        intervals.stdout, whole.stdout
    );
    assert_eq!(
        parse_histograms(&whole.stdout)[0].extension_field("count"),
        Some(total)
    );
}

#[test]
fn interval_reports_follow_a_delay_change_from_5_to_40_ms() {
    let mut bed = TestBed::new();
    let client = bed.host("client", &["198.51.100.81"]);
    let server = bed.host("server", &["203.0.113.81"]);
    let link = bed.link(&client, &server, Delay::each_way(Duration::from_millis(5)));
    let srv = bed.serve(&server, sock_addr("203.0.113.81", 0));
    let conns = (0..4)
        .map(|_| client.connect(ip("198.51.100.81"), srv))
        .collect();

    let tracer = Tracer::start(&["-A", "203.0.113.81", "-i", "1", "-d", "5"]);
    let load = Load::start(conns);
    // Halfway through the second interval.
    thread::sleep(Duration::from_millis(1500));
    link.set_delay(Delay::each_way(Duration::from_millis(40)));
    let out = tracer.wait();
    load.stop();

    assert!(out.status.success(), "{out:?}");
    let hists = parse_histograms(&out.stdout);
    assert_eq!(hists.len(), 5, "{}", out.stdout);
    assert!(hists[0].count() >= 100, "{}", out.stdout);
    assert!(hists[0].share(RTT_10MS) >= 0.95, "{}", out.stdout);
    // The kernel's srtt moves 1/8 of the way to each new 80 ms sample, so it is past
    // 64 ms about 1.2 s after the change: from the fourth interval on.
    for h in &hists[3..] {
        assert!(h.share(RTT_80MS) >= 0.95, "{}", out.stdout);
    }
    // After the change every sample is longer than srtt, so srtt only rises.
    for pair in hists[..4].windows(2) {
        assert!(pair[1].avg > pair[0].avg, "{}", out.stdout);
    }
}
