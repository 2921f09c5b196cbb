//! Bad input and refused resources: exit code 2 for usage errors and 1 for runtime
//! errors, each with one line on stderr that names the value and the fix.

use tcprtt_tests::run;

fn assert_one_line_error(args: &[&str], code: i32, needle: &str) {
    let out = run(args);
    assert_eq!(out.status.code(), Some(code), "{args:?}: {out:?}");
    assert!(out.stdout.is_empty(), "{args:?} printed to stdout: {out:?}");
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{args:?}: not one line: {:?}", out.stderr);
    assert!(
        lines[0].contains(needle),
        "{args:?}: {:?} lacks {needle:?}",
        lines[0]
    );
    assert!(!out.stderr.contains("panicked"), "{args:?}: {out:?}");
}

#[test]
fn usage_errors_exit_2_naming_the_value() {
    for (args, needle) in [
        (
            &["--raddr", "1.1.1"][..],
            "'1.1.1' is not an IP address or CIDR prefix",
        ),
        (
            &["--laddr", "10.0.0.0/40"],
            "'10.0.0.0/40' is not an IP address or CIDR prefix",
        ),
        (&["--lport", "http"], "'http' is not a port"),
        (&["--rport", "70000"], "'70000' is not a port"),
        (
            &["-4", "--raddr", "2001:db8::1"],
            "--raddr 2001:db8::1/128 is IPv6 but -4 traces IPv4 only",
        ),
        (
            &["-6", "--laddr", "127.0.0.1"],
            "--laddr 127.0.0.1/32 is IPv4 but -6 traces IPv6 only",
        ),
        (
            &["--by-laddr", "--by-raddr"],
            "--by-laddr and --by-raddr cannot be combined",
        ),
        (
            &["--interval", "0"],
            "'0' is not a positive number of seconds",
        ),
        (
            &["--duration", "-1"],
            "'-1' is not a positive number of seconds",
        ),
        (&["--max-keys", "0"], "'0' is not a positive key count"),
        (
            &["--by-flow", "--by-rport"],
            "--by-rport and --by-flow cannot be combined",
        ),
        (&["--top", "3"], "--top 3 needs a grouping"),
        (&["--attach", "kprobe"], "invalid value 'kprobe'"),
        (&["--no-such-flag"], "--no-such-flag"),
    ] {
        assert_one_line_error(args, 2, needle);
    }
}

#[test]
fn missing_or_bad_btf_is_a_runtime_error_with_the_fix() {
    assert_one_line_error(
        &["--btf", "/nonexistent/vmlinux", "-d", "1"],
        1,
        "--btf /nonexistent/vmlinux: no such file",
    );
    let garbage = std::env::temp_dir().join(format!("tcprtt-not-btf-{}", std::process::id()));
    std::fs::write(&garbage, b"this is not BTF at all, not even close").unwrap();
    let path = garbage.to_str().unwrap().to_string();
    let out = run(&["--btf", &path, "-d", "1"]);
    std::fs::remove_file(&garbage).unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(out.stderr.contains("not a BTF file"), "{out:?}");
    assert_eq!(out.stderr.lines().count(), 1, "{out:?}");
}

#[test]
fn unprivileged_user_is_told_to_use_root() {
    let out = std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(tcprtt_tests::bin())
        .args(["-d", "1"])
        .output()
        .expect("setpriv (util-linux) is installed by `cargo xtask setup`");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(
        stderr.trim(),
        "tcprtt: error: tcprtt needs root (or CAP_BPF and CAP_PERFMON) to load its eBPF program: run it with sudo"
    );
}

#[test]
fn forced_fentry_either_attaches_or_names_the_refusal() {
    let out = run(&["--attach", "fentry", "-d", "0.2"]);
    if out.status.success() {
        assert!(
            out.stderr
                .contains("Tracing TCP RTT via fentry/tcp_rcv_established."),
            "{out:?}"
        );
    } else {
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        assert!(
            out.stderr
                .starts_with("tcprtt: error: the kernel refused fentry/tcp_rcv_established (")
                && out.stderr.trim_end().ends_with("): try --attach tp-btf"),
            "{out:?}"
        );
    }
}

#[test]
fn help_shows_examples() {
    let out = run(&["--help"]);
    assert!(out.status.success());
    assert!(out.stdout.contains("Examples:"), "{}", out.stdout);
    assert!(out.stdout.contains("--byraddr"), "{}", out.stdout);
}

/// A binary built with AYA_BUILD_SKIP=1 (as `cargo xtask test` does for its unit tests)
/// has no eBPF program: it must say so and how to build a real one.
#[test]
fn a_binary_built_without_its_ebpf_program_says_how_to_build_one() {
    let path = std::env::var_os("TCPRTT_NO_EBPF_BIN").map_or_else(
        || {
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../target/tcprtt-without-ebpf")
        },
        std::path::PathBuf::from,
    );
    assert!(
        path.exists(),
        "{} is built by `cargo xtask test`",
        path.display()
    );
    let out = std::process::Command::new(&path)
        .args(["-d", "1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "tcprtt: error: this tcprtt was built without its eBPF program (AYA_BUILD_SKIP was set): \
         rebuild with `cargo xtask build`\n"
    );
}
