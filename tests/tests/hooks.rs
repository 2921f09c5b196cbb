//! The hook choice (--attach) and where struct offsets come from (--btf).

use tcprtt_tests::kit::{EchoServer, Tracer, labels, parse_histograms, ping_pong, run, sock_addr};

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

/// The explicit hook, an explicit BTF file and bcc's spelling of the grouping flag.
#[test]
fn explicit_attach_btf_and_bcc_aliases_work() {
    let srv = EchoServer::on("127.3.9.1");
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
