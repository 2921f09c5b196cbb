//! Bad input and refused resources: exit code 2 for usage errors and 1 for runtime
//! errors, each with one line on stderr that names the value and the fix.

use std::time::Duration;

use tcprtt_tests::kit::{assert_one_line_error, bin, no_ebpf_bin, run, try_run_within};

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

/// A binary built with AYA_BUILD_SKIP=1 (as `cargo xtask test` does for its unit tests)
/// has no eBPF program: it must say so and how to build a real one.
#[test]
fn a_binary_built_without_its_ebpf_program_says_how_to_build_one() {
    let path = no_ebpf_bin();
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

/// Values clap parses but tcprtt cannot honour, and prefixes whose family contradicts
/// -4/-6: usage errors naming the value and the accepted range or the conflict.
#[test]
fn out_of_range_values_and_family_conflicts_exit_2_naming_them() {
    let secs = "from 0.001 to 31536000";
    let keys = "from 1 to 1000000";
    let wrong: Vec<String> = [
        (&["-i", "1e-10"][..], vec!["'1e-10'", secs]),
        (&["-d", "1e-10"], vec!["'1e-10'", secs]),
        (&["-i", "0.0000001"], vec!["'0.0000001'", secs]),
        (&["-d", "1e9"], vec!["'1e9'", secs]),
        (&["-i", "1e300"], vec!["'1e300'", secs]),
        (&["--max-keys", "100000000"], vec!["'100000000'", keys]),
        (&["--max-keys", "4294967295"], vec!["'4294967295'", keys]),
        (&["-A", "::/0", "-4"], vec!["::/0", "IPv6 but -4"]),
        (
            &["-A", "::ffff:1.2.3.4", "-6"],
            vec!["1.2.3.4", "IPv4 but -6"],
        ),
    ]
    .iter()
    .filter_map(|(args, needles)| {
        // A value accepted by mistake would start a run that never ends.
        let mut command = std::process::Command::new(bin());
        command.args(*args);
        match try_run_within(command, Duration::from_secs(5)) {
            Ok(out) => needles
                .iter()
                .find_map(|needle| out.one_line_error_mismatch(2, needle))
                .map(|why| format!("{args:?}: {why}")),
            Err(why) => Some(why),
        }
    })
    .collect();
    assert!(wrong.is_empty(), "{wrong:#?}");
}
