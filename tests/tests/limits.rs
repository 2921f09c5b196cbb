//! Limits and load: more keys than --max-keys are counted as dropped, exactly; large
//! maps say what they cost; many tracers at once each count exactly; a long run with
//! fast intervals does not grow. Loopback traffic on 127.3.7.x.

use std::{
    fs,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use tcprtt_tests::kit::{
    Conn, EchoServer, Tracer, labels, parse_histograms, ping_pong, round_trips_each, run, sock_addr,
};

/// The number of samples the report's warning says were dropped, and the warning.
fn dropped(stdout: &str) -> (u64, String) {
    let warning = stdout
        .lines()
        .find(|l| l.starts_with("WARNING: "))
        .unwrap_or_else(|| panic!("no warning: {stdout}"));
    let count = warning
        .trim_start_matches("WARNING: ")
        .split(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .expect("dropped count");
    (count, warning.to_string())
}

/// The "matched N" of the -v self-report.
fn matched(stderr: &str) -> u64 {
    stderr
        .split("matched ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{stderr}"))
}

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
    let (dropped, warning) = dropped(&out.stdout);
    assert!(
        warning.ends_with("samples dropped: more than 2 distinct keys (raise --max-keys)"),
        "{warning}"
    );
    assert!(dropped >= 100, "{warning}");
    assert_eq!(
        kept + dropped,
        matched(&out.stderr),
        "{}\n{}",
        out.stdout,
        out.stderr
    );
}

/// 5,100 connections, each its own flow, against a map of 100 flows: the samples of the
/// 5,000 that find no room are counted as dropped, to the sample, against a tracer
/// without a grouping that counts everything.
#[test]
fn five_thousand_connections_beyond_max_keys_are_counted_as_dropped_exactly() {
    const KEPT: usize = 100;
    const BEYOND: usize = 5_000;
    const THREADS: usize = 4;
    let srv = EchoServer::on("127.3.7.33");
    let all = Tracer::start(&["-A", "127.3.7.33", "-e"]);
    let limited = Tracer::start(&[
        "--by-flow",
        "-A",
        "127.3.7.33",
        "--max-keys",
        &KEPT.to_string(),
        "-v",
    ]);
    thread::scope(|s| {
        for _ in 0..THREADS {
            s.spawn(|| {
                for _ in 0..(KEPT + BEYOND) / THREADS {
                    ping_pong(sock_addr("127.3.7.34", 0), srv.addr, 1);
                }
            });
        }
    });
    let limited = limited.stop_with(libc::SIGINT);
    let all = all.stop_with(libc::SIGINT);
    assert!(
        limited.status.success() && all.status.success(),
        "{limited:?}"
    );

    let total = parse_histograms(&all.stdout)[0].count();
    assert!(total >= (KEPT + BEYOND) as u64, "{}", all.stdout);
    let flows = parse_histograms(&limited.stdout);
    assert_eq!(flows.len(), KEPT, "{}", limited.stdout);
    let kept: u64 = flows.iter().map(|h| h.count()).sum();
    let (dropped, warning) = dropped(&limited.stdout);
    assert!(dropped >= BEYOND as u64, "{warning}");
    assert_eq!(kept + dropped, total, "{warning}\n{}", all.stdout);
    assert_eq!(matched(&limited.stderr), total, "{}", limited.stderr);
}

/// Maps of a million keys can take memory the kernel charges to the user: tcprtt says how
/// much before it starts.
#[test]
fn a_large_max_keys_states_its_kernel_memory() {
    let out = run(&["--max-keys", "1000000", "-B", "-d", "0.5"]);
    assert!(out.status.success(), "{out:?}");
    let notes = out
        .stderr
        .lines()
        .filter(|l| l.contains("MiB of kernel memory"))
        .count();
    assert_eq!(notes, 1, "{}", out.stderr);
}

/// Thirty tracers attached at once to the same hook: each sees every segment of the
/// traffic, so all report the same count, between the round trips done and the
/// segments the client sockets received.
#[test]
fn thirty_concurrent_runs_each_count_exactly() {
    let srv = EchoServer::on("127.3.7.17");
    let mut conns: Vec<Conn> = (0..2)
        .map(|_| Conn::open(sock_addr("127.3.7.18", 0), srv.addr))
        .collect();
    let segs = |conns: &[Conn]| conns.iter().map(Conn::segs_in).sum::<u64>();
    let before = segs(&conns);
    let tracers: Vec<Tracer> = (0..30)
        .map(|_| Tracer::start(&["-A", "127.3.7.17", "-e"]))
        .collect();
    round_trips_each(&mut conns, 200);
    // Past any delayed ACK: nothing more arrives on these sockets.
    thread::sleep(Duration::from_millis(300));
    let received = segs(&conns) - before;
    let outs: Vec<_> = tracers
        .into_iter()
        .map(|t| t.stop_with(libc::SIGINT))
        .collect();
    let counts: Vec<u64> = outs
        .iter()
        .map(|out| {
            assert!(out.status.success(), "{out:?}");
            let h = &parse_histograms(&out.stdout)[0];
            assert_eq!(
                h.extension_field("count"),
                Some(h.count()),
                "{}",
                out.stdout
            );
            h.count()
        })
        .collect();
    assert!(
        counts.iter().all(|c| *c == counts[0]),
        "counts differ: {counts:?}"
    );
    assert!(
        (400..=received).contains(&counts[0]),
        "{} not within 400..={received} (segments received)",
        counts[0]
    );
}

/// tcprtt's resident memory (kB) and open descriptors now.
fn footprint(pid: i32) -> (u64, usize) {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    let fds = fs::read_dir(format!("/proc/{pid}/fd")).expect("fd").count();
    (rss, fds)
}

/// A minute of reports every 50 ms (1,200 map swaps and reports) with traffic in every
/// one: resident memory and open descriptors stay where they were after warm-up.
#[test]
fn a_minute_of_fast_intervals_keeps_memory_and_descriptors_flat() {
    const RUN: Duration = Duration::from_secs(60);
    const WARM_UP: Duration = Duration::from_secs(10);
    // A leak of 1 KiB per report would add about 1 MiB over the 1,000 reports after
    // warm-up; this leaves room for the allocator's own variation only.
    const RSS_SLACK_KB: u64 = 512;
    let srv = EchoServer::on("127.3.7.49");
    let tracer = Tracer::start(&["-i", "0.05", "-B", "-A", "127.3.7.49", "-e"]);
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = {
        let (stop, server) = (stop.clone(), srv.addr);
        thread::spawn(move || {
            let mut conn = Conn::open(sock_addr("127.3.7.50", 0), server);
            while !stop.load(Ordering::Relaxed) {
                conn.round_trips(5);
                thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let started = Instant::now();
    thread::sleep(WARM_UP);
    let (rss0, fds0) = footprint(tracer.pid());
    let mut samples = Vec::new();
    while started.elapsed() < RUN {
        thread::sleep(Duration::from_secs(5));
        samples.push(footprint(tracer.pid()));
    }
    stop.store(true, Ordering::Relaxed);
    traffic.join().expect("traffic thread");
    let out = tracer.stop_with(libc::SIGINT);
    assert!(out.status.success(), "{out:?}");
    let reports = labels(&out.stdout).len();
    assert!(reports >= 1000, "only {reports} reports with samples");
    for (rss, fds) in &samples {
        assert_eq!(*fds, fds0, "descriptors {fds0} -> {fds}: {samples:?}");
        assert!(
            *rss <= rss0 + RSS_SLACK_KB,
            "VmRSS {rss0} kB after warm-up, {rss} kB later: {samples:?}"
        );
    }
}
