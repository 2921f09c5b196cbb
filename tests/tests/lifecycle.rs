//! A run from start to end: attaching, the signals and --duration that end it with its
//! report, and the program and maps it leaves behind (none). Loopback traffic on
//! 127.3.0.x.

use std::{
    collections::BTreeSet,
    fs,
    io::Read,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use tcprtt_tests::kit::{
    Conn, EchoServer, Load, Tracer, bin, new_orphans, orphans, parse_histograms, ping_pong, run,
    sock_addr, wait_for,
};

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

#[test]
fn sighup_prints_the_report_exits_0_and_unloads() {
    let srv = EchoServer::on("127.3.0.13");
    let tracer = Tracer::start(&["-A", "127.3.0.13", "-e"]);
    let ours = tracer.loaded();
    ping_pong(sock_addr("127.3.0.14", 0), srv.addr, 100);
    let out = tracer.stop_with(libc::SIGHUP);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let hists = parse_histograms(&out.stdout);
    assert_eq!(hists.len(), 1, "{}", out.stdout);
    assert!(hists[0].count() >= 100, "{}", out.stdout);
    ours.assert_gone();
}

#[test]
fn sigkill_leaves_nothing_loaded() {
    let srv = EchoServer::on("127.3.0.17");
    let tracer = Tracer::start(&["-A", "127.3.0.17", "-B"]);
    ping_pong(sock_addr("127.3.0.18", 0), srv.addr, 50);
    let ours = tracer.loaded();
    let out = tracer.stop_with(libc::SIGKILL);
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&out.status),
        Some(libc::SIGKILL),
        "{out:?}"
    );
    ours.assert_gone();
}

/// A stopped tracer misses its interval ticks but not the segments: the kernel keeps
/// counting while it is stopped, and its reports together hold exactly what a tracer
/// that ran throughout saw.
#[test]
fn sigstop_and_sigcont_lose_nothing() {
    let srv = EchoServer::on("127.3.0.21");
    let mut conn = Conn::open(sock_addr("127.3.0.22", 0), srv.addr);
    let segs_before = conn.segs_in();
    let whole = Tracer::start(&["-A", "127.3.0.21", "-e"]);
    let stopped = Tracer::start(&["-A", "127.3.0.21", "-i", "0.2"]);
    conn.round_trips(200);
    stopped.signal(libc::SIGSTOP);
    conn.round_trips(300);
    // Several of its 0.2 s ticks pass while it is stopped.
    thread::sleep(Duration::from_secs(1));
    stopped.signal(libc::SIGCONT);
    conn.round_trips(200);
    thread::sleep(Duration::from_millis(300));
    let segs = conn.segs_in() - segs_before;
    let stopped = stopped.stop_with(libc::SIGINT);
    let whole = whole.stop_with(libc::SIGINT);
    assert!(
        stopped.status.success() && whole.status.success(),
        "{stopped:?}"
    );

    let total = parse_histograms(&whole.stdout)[0].count();
    assert!(
        (700..=segs).contains(&total),
        "{total} not within 700..={segs} (segments received)\n{}",
        whole.stdout
    );
    let per_interval: u64 = parse_histograms(&stopped.stdout)
        .iter()
        .map(|h| h.count())
        .sum();
    assert_eq!(per_interval, total, "{}\n{}", stopped.stdout, whole.stdout);
}

/// A tracer whose stdout nobody reads, so that its reports fill the pipe and its next
/// write blocks; many flows with traffic make each report long.
fn tracer_blocked_on_stdout(srv: &EchoServer, client: &str) -> (Tracer, Load) {
    let server = srv.addr.ip().to_string();
    let mut tracer = Tracer::start_unread(&["-i", "0.01", "--by-flow", "-A", &server]);
    let conns = (0..16)
        .map(|_| Conn::open(sock_addr(client, 0), srv.addr))
        .collect();
    let load = Load::start(conns);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !tracer.blocked_writing_a_pipe() {
        assert!(Instant::now() < deadline, "stdout never filled up");
        assert!(tracer.is_running(), "tcprtt ended on its own");
        thread::sleep(Duration::from_millis(20));
    }
    // Nobody reads: the pipe stays full and the write blocked.
    (tracer, load)
}

/// The first signal asks for the last report, which cannot be written while stdout
/// blocks; a second signal of any of the three kinds ends the run at once.
#[test]
fn a_second_signal_ends_a_run_blocked_on_stdout_at_once() {
    let srv = EchoServer::on("127.3.0.25");
    let mut wrong = Vec::new();
    for second in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        let (mut tracer, load) = tracer_blocked_on_stdout(&srv, "127.3.0.26");
        let ours = tracer.loaded();
        tracer.signal(libc::SIGTERM);
        thread::sleep(Duration::from_millis(300));
        assert!(
            tracer.is_running(),
            "ended on the first signal although its stdout was full"
        );
        tracer.signal(second);
        let ended = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            tracer.wait_within(Duration::from_secs(2))
        }));
        drop(load);
        match ended {
            Ok(out) if out.status.success() => {
                wrong.push(format!("second signal {second}: exit 0 ({out:?})"))
            }
            Ok(_) => ours.assert_gone(),
            Err(_) => wrong.push(format!("second signal {second}: still running 2 s later")),
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

/// Whether `pid` catches or blocks `signal` (its handler is in place).
fn handles(pid: u32, signal: i32) -> bool {
    let Ok(status) = fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    let bit = 1u64 << (signal - 1);
    status
        .lines()
        .filter_map(|l| l.strip_prefix("SigCgt:").or(l.strip_prefix("SigBlk:")))
        .filter_map(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .any(|mask| mask & bit != 0)
}

/// A signal as soon as tcprtt can take one, while it is still reading BTF and loading
/// its program: the run ends with exit 0 and leaves nothing loaded. Whether a signal
/// landed before tcprtt attached shows in its stderr (no "Tracing" line); at least one
/// of the three must have, or the test did not test start-up.
#[test]
fn a_signal_during_start_up_ends_the_run_with_nothing_loaded() {
    let known: BTreeSet<u32> = orphans();
    let mut wrong = Vec::new();
    let mut during_start_up = 0;
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        let mut child = Command::new(bin())
            .args(["-A", "127.3.0.29"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting tcprtt");
        let deadline = Instant::now() + Duration::from_secs(5);
        while !handles(child.id(), signal) && Instant::now() < deadline {
            thread::sleep(Duration::from_micros(200));
        }
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(child.id() as i32, signal) };
        match wait_for(&mut child, Duration::from_secs(5)) {
            Some(status) if status.success() => {
                let mut stderr = String::new();
                let _ = child
                    .stderr
                    .take()
                    .expect("stderr")
                    .read_to_string(&mut stderr);
                if !stderr.contains("Tracing TCP RTT") {
                    during_start_up += 1;
                }
            }
            Some(status) => wrong.push(format!("signal {signal}: {status:?}")),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                wrong.push(format!("signal {signal}: still running 5 s later"));
            }
        }
    }
    let left = new_orphans(&known);
    assert!(left.is_empty(), "programs left loaded: {left:?}");
    assert!(wrong.is_empty(), "{wrong:#?}");
    assert!(during_start_up > 0, "every signal came after start-up");
}
