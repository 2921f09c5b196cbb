//! Address, port and family filters keep exactly the sockets they name: on loopback
//! (127.3.1.x, 127.3.2.x) and over delay lines whose RTT tells the paths apart.

use std::{
    net::{IpAddr, SocketAddr},
    thread,
    time::Duration,
};

use tcprtt_tests::{
    kit::{
        EchoServer, Tracer, ip, labels, parse_histograms, ping_pong, round_trips_each, sock_addr,
    },
    testbed::{Delay, Host, QUIET, RTT_10MS, RTT_40MS, TestBed},
};

/// Two connections at once: client .11 -> server .1 and client .12 -> server .2.
/// Each filter (with grouping, so every key that got through is visible) must keep
/// exactly the sockets it names.
#[test]
fn each_filter_kind_keeps_matching_and_drops_concurrent_other_traffic() {
    let a = EchoServer::on("127.3.1.1");
    let b = EchoServer::on("127.3.1.2");
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
    let v4 = EchoServer::on("127.3.2.1");
    let v6 = EchoServer::on("::1");
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

/// A histogram a filter must keep, and the socket its samples must come from.
struct Kept<'a> {
    label: &'static str,
    host: &'a Host,
    local: SocketAddr,
    peer: SocketAddr,
    slot: (u64, u64),
}

impl Kept<'_> {
    fn segs_in(&self) -> u64 {
        self.host.socket(self.local, self.peer).segs_in
    }
}

/// Six connections at once over two delayed paths; each filter must keep exactly the
/// socket(s) it names. The kept socket's bucket tells paths apart; its count, between the
/// round trips it did and the segments it received, shows that no other socket on the
/// same path (differing only by address or port) got through.
#[test]
fn cidr_and_port_filters_keep_exactly_the_intended_delayed_connection() {
    let mut bed = TestBed::new();
    let client = bed.host(
        "client",
        &["198.51.100.65", "198.51.100.73", "2001:db8:4:1::1"],
    );
    let a = bed.host("a", &["203.0.113.65", "2001:db8:4:2::1"]);
    let b = bed.host("b", &["203.0.113.73"]);
    bed.link(&client, &a, Delay::each_way(Duration::from_millis(5)));
    bed.link(&client, &b, Delay::each_way(Duration::from_millis(20)));
    let a1 = bed.serve(&a, sock_addr("203.0.113.65", 0));
    let a2 = bed.serve(&a, sock_addr("203.0.113.65", 0));
    let a1_v6 = bed.serve(&a, sock_addr("2001:db8:4:2::1", a1.port()));
    let b1 = bed.serve(&b, sock_addr("203.0.113.73", 0));
    let mut conns = vec![
        client.connect(ip("198.51.100.65"), a1),
        client.connect(ip("198.51.100.65"), a2),
        client.connect(ip("198.51.100.73"), a1),
        client.connect(ip("198.51.100.65"), b1),
        client.connect(ip("198.51.100.73"), b1),
        client.connect(ip("2001:db8:4:1::1"), a1_v6),
    ];
    let (p_a1, p_a2, p_b1) = (a1.port(), a2.port(), b1.port());
    let p_k5 = conns[4].local.port();

    let client_side = |k: usize, label, slot| Kept {
        label,
        host: &client,
        local: conns[k].local,
        peer: conns[k].peer,
        slot,
    };
    let cases = [
        (
            format!("-B -A 203.0.113.64/29 -P {p_a2}"),
            vec![client_side(1, "Remote Address = 203.0.113.65", RTT_10MS)],
        ),
        (
            "-b -a 198.51.100.72/29 -A 203.0.113.72/29".into(),
            vec![client_side(4, "Local Address = 198.51.100.73", RTT_40MS)],
        ),
        (
            format!("-b -a 203.0.113.64/29 -p {p_a1} -A 198.51.100.72/29"),
            vec![Kept {
                label: "Local Address = 203.0.113.65",
                host: &a,
                local: a1,
                peer: conns[2].local,
                slot: RTT_10MS,
            }],
        ),
        (
            format!("-B -a 198.51.100.64/29 -P {p_a1} -P {p_b1}"),
            vec![
                client_side(0, "Remote Address = 203.0.113.65", RTT_10MS),
                client_side(3, "Remote Address = 203.0.113.73", RTT_40MS),
            ],
        ),
        (
            format!("-B -A 2001:db8:4::/48 -P {p_a1}"),
            vec![client_side(5, "Remote Address = 2001:db8:4:2::1", RTT_10MS)],
        ),
        (
            format!("-b -a 198.51.100.64/28 -p {p_k5}"),
            vec![client_side(4, "Local Address = 198.51.100.73", RTT_40MS)],
        ),
    ];

    const ROUND_TRIPS: u64 = 15;
    for (args, expected) in &cases {
        let args: Vec<&str> = args.split(' ').collect();
        let tracer = Tracer::start(&args);
        let before: Vec<u64> = expected.iter().map(Kept::segs_in).collect();
        round_trips_each(&mut conns, ROUND_TRIPS as usize);
        thread::sleep(QUIET);
        let after: Vec<u64> = expected.iter().map(Kept::segs_in).collect();
        let out = tracer.stop_with(libc::SIGINT);

        assert!(out.status.success(), "{args:?}: {out:?}");
        let hists = parse_histograms(&out.stdout);
        let labels: Vec<&str> = hists.iter().map(|h| h.label.as_str()).collect();
        let wanted: Vec<&str> = expected.iter().map(|k| k.label).collect();
        assert_eq!(labels, wanted, "{args:?}\n{}", out.stdout);
        for (i, (h, kept)) in hists.iter().zip(expected).enumerate() {
            assert!(
                (ROUND_TRIPS..=after[i] - before[i]).contains(&h.count()),
                "{args:?} {}: {}..{} segments\n{}",
                h.label,
                before[i],
                after[i],
                out.stdout
            );
            // Which connection it is shows in the label and the count; the samples only
            // have to say which path. The 20 ms-each-way path never reads below 40 ms, and
            // the 5 ms one stays far below that even when a delayed ACK or a busy machine
            // pushes a few smoothed samples over the 16383 µs edge; so the check is on the
            // side of 32768 µs every sample lies, with most in the path's own row.
            let (below, above) = (h.count_within(0, 32767), h.count_within(32768, u64::MAX));
            if kept.slot == RTT_40MS {
                assert_eq!(below, 0, "{args:?}\n{}", out.stdout);
            } else {
                assert_eq!(above, 0, "{args:?}\n{}", out.stdout);
            }
            assert!(h.share(kept.slot) >= 0.5, "{args:?}\n{}", out.stdout);
        }
    }
}

/// One rule for prefixes: an IPv6 prefix matches IPv6 sockets only, unless it is an
/// IPv4-mapped prefix (within ::ffff:0:0/96), which matches the IPv4 addresses it maps;
/// IPv4-mapped sockets count as IPv4.
#[test]
fn an_ipv6_prefix_matches_ipv6_sockets_only_unless_it_maps_ipv4() {
    let v4 = EchoServer::on("127.3.2.17");
    let v6 = EchoServer::on("::1");
    let traffic = || {
        thread::scope(|s| {
            s.spawn(|| ping_pong(sock_addr("127.3.2.18", 0), v4.addr, 150));
            s.spawn(|| ping_pong(sock_addr("::1", 0), v6.addr, 150));
            s.spawn(|| {
                let mapped = SocketAddr::new(ip("::ffff:127.3.2.17"), v4.addr.port());
                ping_pong(sock_addr("::ffff:127.3.2.19", 0), mapped, 150)
            });
        })
    };

    let tracer = Tracer::start(&["-B", "-A", "::/0"]);
    traffic();
    let out = tracer.stop_with(libc::SIGINT);
    assert!(out.status.success(), "{out:?}");
    let hists = parse_histograms(&out.stdout);
    let loopback = hists
        .iter()
        .find(|h| h.label == "Remote Address = ::1")
        .unwrap_or_else(|| panic!("no ::1 histogram: {}", out.stdout));
    assert!(loopback.count() >= 150, "{}", out.stdout);
    assert!(
        hists.iter().all(|h| h.label.contains(':')),
        "::/0 let IPv4 through: {}",
        out.stdout
    );

    let tracer = Tracer::start(&["-B", "-4", "-A", "::ffff:127.3.2.16/126"]);
    traffic();
    let out = tracer.stop_with(libc::SIGINT);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        labels(&out.stdout),
        [
            "Remote Address = 127.3.2.17",
            "Remote Address = 127.3.2.18",
            "Remote Address = 127.3.2.19"
        ],
        "{}",
        out.stdout
    );
    // Two clients, one of them on an IPv4-mapped socket, talk to .17.
    assert!(
        parse_histograms(&out.stdout)[0].count() >= 300,
        "{}",
        out.stdout
    );

    // The contract's own example: all of 127.0.0.0/8, written as a mapped prefix.
    let tracer = Tracer::start(&["-A", "::ffff:127.0.0.0/104", "-4", "-B"]);
    ping_pong(sock_addr("127.3.2.18", 0), v4.addr, 150);
    let out = tracer.stop_with(libc::SIGINT);
    assert!(out.status.success(), "{out:?}");
    let hists = parse_histograms(&out.stdout);
    assert!(
        hists
            .iter()
            .any(|h| h.label == "Remote Address = 127.3.2.17" && h.count() >= 150),
        "{}",
        out.stdout
    );
    assert!(
        hists.iter().all(|h| !h.label.contains(':')),
        "rows must print as IPv4: {}",
        out.stdout
    );
}
