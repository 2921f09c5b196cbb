//! Who may run tcprtt: root, or a user with only CAP_BPF and CAP_PERFMON (as README
//! says), with which every feature works; anyone else is told what is missing in one
//! line. The unprivileged user is nobody (65534), made with setpriv (util-linux).

use std::{process::Command, time::Duration};

use serde_json::Value;
use tcprtt_tests::kit::{
    EchoServer, Finished, Tracer, as_nobody, bin, labels, parse_histograms, ping_pong, run_within,
    sock_addr,
};

const BPF_AND_PERFMON: &str = "+bpf,+perfmon";

#[test]
fn unprivileged_user_is_told_to_use_root() {
    let out = as_nobody("-all", &["-d", "1"])
        .output()
        .expect("setpriv (util-linux) is installed by `cargo xtask setup`");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(
        stderr.trim(),
        "tcprtt: error: tcprtt needs root (or CAP_BPF and CAP_PERFMON) to load its eBPF program: run it with sudo"
    );
}

/// Starts tcprtt as nobody with CAP_BPF and CAP_PERFMON, checks it runs as that user
/// with those capabilities only, drives `round_trips` from 127.3.12.2 to `srv`, and
/// ends it with SIGINT.
fn trace_as_nobody(args: &[&str], srv: &EchoServer, round_trips: usize) -> Finished {
    trace_as_nobody_during(args, || {
        ping_pong(sock_addr("127.3.12.2", 0), srv.addr, round_trips)
    })
}

/// The same with the traffic `traffic` makes.
fn trace_as_nobody_during(args: &[&str], traffic: impl FnOnce()) -> Finished {
    let tracer = Tracer::start_command(as_nobody(BPF_AND_PERFMON, args));
    let status = std::fs::read_to_string(format!("/proc/{}/status", tracer.pid())).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.split_whitespace().collect::<Vec<_>>())
            .unwrap_or_default()
    };
    assert_eq!(field("Uid:"), ["65534"; 4], "{status}");
    // CAP_PERFMON (38) and CAP_BPF (39), nothing else.
    assert_eq!(field("CapEff:"), ["000000c000000000"], "{status}");
    traffic();
    tracer.stop_with(libc::SIGINT)
}

/// Each feature README says works with CAP_BPF and CAP_PERFMON: the default histogram,
/// every filter kind, every grouping, --top, --max-keys, -m, -e, -T, -i, --json, the
/// explicit hook and an explicit BTF file.
#[test]
fn every_feature_works_with_cap_bpf_and_cap_perfmon_only() {
    let srv = EchoServer::on("127.3.12.1");
    let port = srv.addr.port().to_string();
    let cases: Vec<(Vec<&str>, Vec<String>)> = vec![
        (
            vec!["-A", "127.3.12.1", "-e"],
            vec!["All Addresses = ******".into()],
        ),
        (
            vec!["-a", "127.3.12.2", "-m"],
            vec!["All Addresses = ******".into()],
        ),
        (
            vec!["-P", &port, "-4"],
            vec!["All Addresses = ******".into()],
        ),
        (
            vec!["-B", "-A", "127.3.12.0/30", "-p", &port],
            vec!["Remote Address = 127.3.12.2".into()],
        ),
        (
            vec!["-b", "-A", "127.3.12.1", "--top", "1"],
            vec!["Local Address = 127.3.12.2".into()],
        ),
        (
            vec!["--by-lport", "-a", "127.3.12.1", "--max-keys", "4"],
            vec![format!("Local Port = {port}")],
        ),
        (
            vec!["--by-rport", "-A", "127.3.12.1", "-T"],
            vec![format!("Remote Port = {port}")],
        ),
        (
            vec![
                "-A",
                "127.3.12.1",
                "--attach",
                "tp-btf",
                "--btf",
                "/sys/kernel/btf/vmlinux",
            ],
            vec!["All Addresses = ******".into()],
        ),
    ];
    for (args, expected) in cases {
        let out = trace_as_nobody(&args, &srv, 100);
        assert!(out.status.success(), "{args:?}: {out:?}");
        assert_eq!(labels(&out.stdout), expected, "{args:?}: {}", out.stdout);
        assert!(
            parse_histograms(&out.stdout)[0].count() >= 100,
            "{args:?}: {}",
            out.stdout
        );
    }

    let out = trace_as_nobody(&["--by-flow", "-A", "127.3.12.1"], &srv, 100);
    assert!(out.status.success(), "{out:?}");
    let flows = labels(&out.stdout);
    assert_eq!(flows.len(), 1, "{}", out.stdout);
    assert!(
        flows[0].starts_with("Connection = 127.3.12.2:"),
        "{}",
        out.stdout
    );

    // Traffic in two intervals at least.
    let out = trace_as_nobody_during(&["-A", "127.3.12.1", "-i", "0.2"], || {
        for _ in 0..2 {
            ping_pong(sock_addr("127.3.12.2", 0), srv.addr, 150);
            std::thread::sleep(Duration::from_millis(500));
        }
    });
    assert!(out.status.success(), "{out:?}");
    let reports = parse_histograms(&out.stdout);
    assert!(reports.len() >= 2, "{}", out.stdout);
    assert!(
        reports.iter().map(|h| h.count()).sum::<u64>() >= 300,
        "{}",
        out.stdout
    );

    let out = trace_as_nobody(&["-B", "-A", "127.3.12.1", "--json"], &srv, 100);
    assert!(out.status.success(), "{out:?}");
    let report: Value = serde_json::from_str(out.stdout.trim()).expect(&out.stdout);
    assert_eq!(report["group_by"], "raddr", "{}", out.stdout);
    let hists = report["histograms"].as_array().unwrap();
    assert_eq!(hists.len(), 1, "{}", out.stdout);
    assert_eq!(hists[0]["key"]["addr"], "127.3.12.1");
    assert!(hists[0]["count"].as_u64().unwrap() >= 100, "{}", out.stdout);
}

/// The kernel's run-time statistics need CAP_SYS_ADMIN: without it -v says so in one
/// line and still prints its self-report, without the cost figure.
#[test]
fn verbose_without_cap_sys_admin_says_so_and_reports_the_rest() {
    let srv = EchoServer::on("127.3.12.5");
    let out = trace_as_nobody(&["-v", "-A", "127.3.12.5", "-e"], &srv, 100);
    assert!(out.status.success(), "{out:?}");
    let count = parse_histograms(&out.stdout)[0].count();
    assert!(count >= 100, "{}", out.stdout);
    let report = out
        .stderr
        .lines()
        .find(|l| l.starts_with("tcprtt: attach point "))
        .unwrap_or_else(|| panic!("no self-report: {}", out.stderr));
    // One line says why, besides the self-report (which may repeat the reason where
    // its cost figure would be).
    let notes = out
        .stderr
        .lines()
        .filter(|l| *l != report && l.contains("run-time statistics need CAP_SYS_ADMIN"))
        .count();
    assert_eq!(notes, 1, "{}", out.stderr);
    assert!(
        report.contains(&format!("matched {count},")),
        "{report}\n{}",
        out.stdout
    );
    assert!(
        !report.contains("ns per event") && !report.contains(" ns over "),
        "{report}"
    );
}

/// Root inside a new user namespace has every capability there but none the kernel
/// honours for BPF: tcprtt must say that the user namespace is the reason.
#[test]
fn a_user_namespace_is_named_as_what_is_missing() {
    let mut command = Command::new("unshare");
    command
        .args(["--user", "--map-root-user"])
        .arg(bin())
        .args(["-d", "1"]);
    run_within(command, Duration::from_secs(10)).assert_one_line_error(
        "unshare --user --map-root-user tcprtt -d 1",
        1,
        "user namespace",
    );
}
