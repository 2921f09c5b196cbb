//! The profiler on the real kernel with real loopback TCP traffic. Each test uses its own
//! 127.x addresses so concurrent traffic from other tests or the host cannot match.

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use tcprtt_tests::{
    EchoServer, Tracer, labels, parse_histograms, ping_pong, ping_pong_parallel, run, sock_addr,
};

fn server(ip: &str) -> EchoServer {
    EchoServer::start(ip.parse().unwrap(), 0)
}

/// Ids of the tcprtt programs loaded in the kernel now.
fn tcprtt_program_ids() -> BTreeSet<u32> {
    let out = Command::new("bpftool")
        .args(["prog", "show"])
        .output()
        .expect("bpftool is installed by `cargo xtask setup`");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(" name tcprtt_"))
        .filter_map(|l| l.split(':').next()?.trim().parse().ok())
        .collect()
}

#[test]
fn sigint_prints_one_histogram_of_all_traffic_and_unloads() {
    let before = tcprtt_program_ids();
    let srv = server("127.3.0.1");
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
    let ours: Vec<u32> = tcprtt_program_ids().difference(&before).copied().collect();
    assert_eq!(ours.len(), 1, "one program attached");
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
    // The kernel frees a detached program after an RCU grace period, not at once.
    let deadline = Instant::now() + Duration::from_secs(5);
    while tcprtt_program_ids().contains(&ours[0]) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !tcprtt_program_ids().contains(&ours[0]),
        "program left behind"
    );
}

#[test]
fn sigterm_prints_the_report_and_exits_0() {
    let srv = server("127.3.0.5");
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

/// Two connections at once: client .11 -> server .1 and client .12 -> server .2.
/// Each filter (with grouping, so every key that got through is visible) must keep
/// exactly the sockets it names.
#[test]
fn each_filter_kind_keeps_matching_and_drops_concurrent_other_traffic() {
    let a = server("127.3.1.1");
    let b = server("127.3.1.2");
    let cases: Vec<(Vec<String>, Vec<&str>)> = vec![
        (
            vec!["-B".into(), "-A".into(), "127.3.1.1".into()],
            vec!["Remote Address = 127.3.1.1"],
        ),
        (
            vec!["-B".into(), "-A".into(), "127.3.1.0/31".into()],
            vec!["Remote Address = 127.3.1.1"],
        ),
        (
            vec![
                "-B".into(),
                "-A".into(),
                "127.3.1.2".into(),
                "-A".into(),
                "127.3.1.11".into(),
            ],
            vec!["Remote Address = 127.3.1.2", "Remote Address = 127.3.1.11"],
        ),
        (
            vec!["-b".into(), "-a".into(), "127.3.1.12".into()],
            vec!["Local Address = 127.3.1.12"],
        ),
        (
            vec!["-b".into(), "-a".into(), "::ffff:127.3.1.2".into()],
            vec!["Local Address = 127.3.1.2"],
        ),
        // Server B's sockets have B's port as local port; client A's have A's as remote.
        (
            vec!["-b".into(), "-p".into(), b.addr.port().to_string()],
            vec!["Local Address = 127.3.1.2"],
        ),
        (
            vec!["-b".into(), "-P".into(), a.addr.port().to_string()],
            vec!["Local Address = 127.3.1.11"],
        ),
        (
            vec![
                "-b".into(),
                "-a".into(),
                "127.3.1.0/24".into(),
                "-P".into(),
                b.addr.port().to_string(),
            ],
            vec!["Local Address = 127.3.1.12"],
        ),
    ];
    for (args, expected) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let tracer = Tracer::start(&args);
        thread::scope(|s| {
            s.spawn(|| ping_pong(sock_addr("127.3.1.11", 0), a.addr, 200));
            s.spawn(|| ping_pong(sock_addr("127.3.1.12", 0), b.addr, 200));
        });
        let out = tracer.stop_with(libc::SIGINT);
        assert!(out.status.success(), "{args:?}: {out:?}");
        assert_eq!(labels(&out.stdout), expected, "{args:?}: {}", out.stdout);
        for h in parse_histograms(&out.stdout) {
            assert!(h.count() >= 200, "{args:?}: {}", out.stdout);
        }
    }
}

#[test]
fn families_group_and_filter_separately_including_ipv4_mapped_sockets() {
    let v4 = server("127.3.2.1");
    let v6 = server("::1");
    let traffic = || {
        thread::scope(|s| {
            s.spawn(|| ping_pong(sock_addr("127.3.2.2", 0), v4.addr, 150));
            s.spawn(|| ping_pong(sock_addr("::1", 0), v6.addr, 150));
            // An IPv6 socket talking to an IPv4 server: shown and filtered as IPv4.
            s.spawn(|| {
                let mapped = SocketAddr::new(
                    "::ffff:127.3.2.1".parse::<IpAddr>().unwrap(),
                    v4.addr.port(),
                );
                ping_pong(sock_addr("::ffff:127.3.2.3", 0), mapped, 150)
            });
        })
    };

    let tracer = Tracer::start(&["-B", "-6", "-A", "::/0"]);
    traffic();
    let out = tracer.stop_with(libc::SIGINT);
    let got = labels(&out.stdout);
    assert!(
        got.contains(&"Remote Address = ::1".to_string()),
        "{}",
        out.stdout
    );
    assert!(
        got.iter().all(|l| l.contains(':')),
        "-6 let IPv4 through: {}",
        out.stdout
    );

    let tracer = Tracer::start(&["-B", "-4", "-A", "127.3.2.0/24"]);
    traffic();
    let out = tracer.stop_with(libc::SIGINT);
    assert_eq!(
        labels(&out.stdout),
        [
            "Remote Address = 127.3.2.1",
            "Remote Address = 127.3.2.2",
            "Remote Address = 127.3.2.3"
        ],
        "{}",
        out.stdout
    );
    let h = parse_histograms(&out.stdout);
    // Two clients (one of them IPv4-mapped) talk to .1.
    assert!(h[0].count() >= 300, "{}", out.stdout);

    let tracer = Tracer::start(&["-b", "-a", "::1"]);
    traffic();
    let out = tracer.stop_with(libc::SIGINT);
    assert_eq!(
        labels(&out.stdout),
        ["Local Address = ::1"],
        "{}",
        out.stdout
    );
}

/// Two tracers see the same segments: the -m one must hold each µs sample divided by 1000.
#[test]
fn milliseconds_are_the_same_samples_divided_by_1000() {
    let srv = server("127.3.3.1");
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
fn interval_reports_are_timestamped_and_exact_against_a_whole_run() {
    let srv = server("127.3.4.1");
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

#[test]
fn parallel_traffic_on_both_cpus_is_counted_exactly() {
    let srv = server("127.3.5.1");
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

#[test]
fn a_closed_pipe_ends_the_run_quietly() {
    let srv = server("127.3.6.1");
    let mut child = Command::new(tcprtt_tests::bin())
        .args(["-i", "0.2", "-d", "20"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    ping_pong(sock_addr("127.3.6.2", 0), srv.addr, 50);
    // Read one line, then close our end, as `| head -1` does.
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 1];
    std::io::Read::read_exact(&mut stdout, &mut first).unwrap();
    drop(stdout);
    let started = Instant::now();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("panicked") && !stderr.contains("error"),
        "{stderr}"
    );
}

/// More distinct keys than --max-keys: the extra samples are counted, not invented or
/// silently lost, and the report says how many.
#[test]
fn a_full_map_reports_exactly_how_many_samples_it_dropped() {
    let srv = server("127.3.7.1");
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

/// Past the 30 s at which tcprtt drains the kernel's 32-bit buckets into its own totals:
/// a whole-run report (one periodic drain plus the final one) must hold exactly the
/// samples of a tracer reporting every 4 s over the same traffic.
#[test]
fn runs_longer_than_the_drain_period_lose_nothing() {
    let srv = server("127.3.8.1");
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

/// The explicit hook, an explicit BTF file and bcc's spelling of the grouping flag.
#[test]
fn explicit_attach_btf_and_bcc_aliases_work() {
    let srv = server("127.3.9.1");
    let tracer = Tracer::start(&[
        "--attach",
        "tp-btf",
        "--btf",
        "/sys/kernel/btf/vmlinux",
        "--byladdr",
        "-a",
        "127.3.9.2",
    ]);
    assert_eq!(
        tracer.attach_line,
        "Tracing TCP RTT via tp_btf/tcp_probe. Hit Ctrl-C to end."
    );
    ping_pong(sock_addr("127.3.9.2", 0), srv.addr, 100);
    let out = tracer.stop_with(libc::SIGINT);
    assert_eq!(
        labels(&out.stdout),
        ["Local Address = 127.3.9.2"],
        "{}",
        out.stdout
    );
    assert!(
        parse_histograms(&out.stdout)[0].count() >= 100,
        "{}",
        out.stdout
    );
}
