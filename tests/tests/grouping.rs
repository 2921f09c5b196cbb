//! One histogram per address, port or connection, and --top. Loopback traffic on
//! 127.4.1.x; delay lines where the keys' RTTs must differ.

use std::{net::SocketAddr, time::Duration};

use tcprtt_tests::{
    kit::{
        Conn, EchoServer, Tracer, ip, labels, parse_histograms, ping_pong, round_trips_each,
        sock_addr,
    },
    testbed::{Delay, RTT_10MS, RTT_80MS, TestBed},
};

#[test]
fn ports_and_connections_get_a_histogram_each() {
    let srv = EchoServer::on("127.4.1.1");
    let port = srv.addr.port();
    let traffic = || ping_pong(sock_addr("127.4.1.2", 0), srv.addr, 200);

    let t = Tracer::start(&["--by-lport", "-a", "127.4.1.1"]);
    traffic();
    let out = t.stop_with(libc::SIGINT);
    assert_eq!(
        labels(&out.stdout),
        [format!("Local Port = {port}")],
        "{}",
        out.stdout
    );

    let t = Tracer::start(&["--by-rport", "-a", "127.4.1.2"]);
    traffic();
    let out = t.stop_with(libc::SIGINT);
    assert_eq!(
        labels(&out.stdout),
        [format!("Remote Port = {port}")],
        "{}",
        out.stdout
    );

    // Two connections from the same client address: one histogram per connection.
    let t = Tracer::start(&["--by-flow", "-A", "127.4.1.1"]);
    traffic();
    traffic();
    let out = t.stop_with(libc::SIGINT);
    let got = labels(&out.stdout);
    assert_eq!(got.len(), 2, "{}", out.stdout);
    for label in &got {
        let rest = label.strip_prefix("Connection = 127.4.1.2:").expect(label);
        let (client_port, server) = rest.split_once(" -> ").expect(label);
        assert!(client_port.parse::<u16>().is_ok(), "{label}");
        assert_eq!(server, format!("127.4.1.1:{port}"));
    }
    assert_ne!(got[0], got[1]);
    for h in parse_histograms(&out.stdout) {
        assert!(h.count() >= 200, "{}", out.stdout);
    }
}

/// A client with paths of 2, 10 and 40 ms each way to three servers, one connection each.
fn three_servers(bed: &mut TestBed) -> Vec<Conn> {
    let client = bed.host("client", &["198.51.100.81"]);
    let servers = [
        ("203.0.113.81", 2),
        ("203.0.113.82", 10),
        ("203.0.113.83", 40),
    ];
    servers
        .iter()
        .map(|(addr, delay)| {
            let server = bed.host("server", &[addr]);
            bed.link(
                &client,
                &server,
                Delay::each_way(Duration::from_millis(*delay)),
            );
            let srv = bed.serve(&server, SocketAddr::new(ip(addr), 0));
            client.connect(ip("198.51.100.81"), srv)
        })
        .collect()
}

#[test]
fn top_keeps_the_slowest_peers_slowest_first() {
    let mut bed = TestBed::new();
    let mut conns = three_servers(&mut bed);
    let by_raddr = Tracer::start(&["-B", "-A", "203.0.113.80/29", "--top", "2"]);
    let by_flow = Tracer::start(&["--by-flow", "-A", "203.0.113.80/29", "--top", "1"]);
    round_trips_each(&mut conns, 20);
    let by_flow = by_flow.stop_with(libc::SIGINT);
    let by_raddr = by_raddr.stop_with(libc::SIGINT);

    let hists = parse_histograms(&by_raddr.stdout);
    let labels: Vec<&str> = hists.iter().map(|h| h.label.as_str()).collect();
    assert_eq!(
        labels,
        [
            "Remote Address = 203.0.113.83",
            "Remote Address = 203.0.113.82"
        ],
        "{}",
        by_raddr.stdout
    );
    assert!(
        hists[0].avg >= 80_000.0 && hists[1].avg >= 20_000.0,
        "{}",
        by_raddr.stdout
    );
    assert!(hists[1].avg < 80_000.0, "{}", by_raddr.stdout);

    let far = &conns[2];
    assert_eq!(
        parse_histograms(&by_flow.stdout)
            .iter()
            .map(|h| h.label.clone())
            .collect::<Vec<_>>(),
        [format!("Connection = {} -> {}", far.local, far.peer)],
        "{}",
        by_flow.stdout
    );
}

#[test]
fn by_raddr_gives_a_5ms_and_a_40ms_server_their_own_histograms_in_both_families() {
    let mut bed = TestBed::new();
    let client = bed.host("client", &["198.51.100.49", "2001:db8:3:1::1"]);
    let near = bed.host("near", &["203.0.113.49", "2001:db8:3:2::1"]);
    let far = bed.host("far", &["203.0.113.50", "2001:db8:3:2::2"]);
    bed.link(&client, &near, Delay::each_way(Duration::from_millis(5)));
    bed.link(&client, &far, Delay::each_way(Duration::from_millis(40)));
    let mut conns: Vec<Conn> = [
        (&near, "198.51.100.49", "203.0.113.49"),
        (&far, "198.51.100.49", "203.0.113.50"),
        (&near, "2001:db8:3:1::1", "2001:db8:3:2::1"),
        (&far, "2001:db8:3:1::1", "2001:db8:3:2::2"),
    ]
    .into_iter()
    .map(|(server, local, remote)| {
        let srv = bed.serve(server, sock_addr(remote, 0));
        client.connect(ip(local), srv)
    })
    .collect();
    let before: Vec<u64> = conns
        .iter()
        .map(|c| client.socket(c.local, c.peer).segs_in)
        .collect();

    let tracer = Tracer::start(&["-B", "-A", "203.0.113.48/30", "-A", "2001:db8:3:2::/64"]);
    round_trips_each(&mut conns, 25);
    let after: Vec<u64> = conns
        .iter()
        .map(|c| client.socket(c.local, c.peer).segs_in)
        .collect();
    let out = tracer.stop_with(libc::SIGINT);

    assert!(out.status.success(), "{out:?}");
    let hists = parse_histograms(&out.stdout);
    let labels: Vec<&str> = hists.iter().map(|h| h.label.as_str()).collect();
    assert_eq!(
        labels,
        [
            "Remote Address = 203.0.113.49",
            "Remote Address = 203.0.113.50",
            "Remote Address = 2001:db8:3:2::1",
            "Remote Address = 2001:db8:3:2::2",
        ],
        "{}",
        out.stdout
    );
    // IPv4 near, IPv4 far, IPv6 near, IPv6 far, as the connections.
    let expected = [(RTT_10MS, 10_000.0), (RTT_80MS, 80_000.0)].repeat(2);
    for (i, (h, (slot, floor))) in hists.iter().zip(expected).enumerate() {
        assert!(
            (25..=after[i] - before[i]).contains(&h.count()),
            "{}: {}..{}\n{}",
            h.label,
            before[i],
            after[i],
            out.stdout
        );
        assert!(h.share(slot) >= 0.95, "{}\n{}", h.label, out.stdout);
        assert!(h.avg >= floor, "{}\n{}", h.label, out.stdout);
    }
}

/// Without `-e`, JSON or fine Prometheus buckets the kernel keeps only bcc's log2 rows and
/// the sum per key (smaller maps); with `-e` it keeps fine buckets, min and max. Either way
/// each CPU adds the samples of the key it saw last to a copy of its own (no cache line
/// shared between CPUs) until another key comes, or, with fine buckets, a sample needs a
/// fifth bucket. Tracers of each kind on the same traffic, where a CPU sees one key many
/// times in a row and also keys taking turns, print the same histograms, and short
/// intervals of each kind add up to the same counts.
#[test]
fn log2_only_and_fine_histograms_print_the_same_rows() {
    let srv = EchoServer::on("127.4.1.7");
    let filter = ["-b", "-a", "127.4.1.7", "-a", "127.4.1.8"];
    let with = |extra: &[&'static str]| [&filter[..], extra].concat();
    let log2 = Tracer::start(&filter);
    let fine = Tracer::start(&with(&["-e"]));
    // These end well after the traffic and its delayed acknowledgements, before the others.
    let log2_parts = Tracer::start(&with(&["-i", "0.05", "-d", "2"]));
    let fine_parts = Tracer::start(&with(&["-e", "-i", "0.05", "-d", "2"]));
    // Both ends of the first connection have the server's address, and so one key: a CPU
    // sees it again and again. The second's ends have a key each, taking turns.
    let mut conns: Vec<Conn> = ["127.4.1.7", "127.4.1.8"]
        .into_iter()
        .map(|client| Conn::open(sock_addr(client, 0), srv.addr))
        .collect();
    round_trips_each(&mut conns, 20_000);
    let (log2_parts, fine_parts) = (log2_parts.wait(), fine_parts.wait());
    let (log2, fine) = (log2.stop_with(libc::SIGINT), fine.stop_with(libc::SIGINT));

    let [log2, fine, log2_parts, fine_parts] =
        [log2, fine, log2_parts, fine_parts].map(|out| parse_histograms(&out.stdout));
    let labels: Vec<&str> = log2.iter().map(|h| h.label.as_str()).collect();
    assert_eq!(
        labels,
        ["Local Address = 127.4.1.7", "Local Address = 127.4.1.8"],
        "{log2:?}"
    );
    assert_eq!(fine.len(), log2.len());
    for (l, f) in log2.iter().zip(&fine) {
        assert!(l.count() >= 20_000, "{l:?}");
        assert_eq!((&l.label, l.avg, &l.rows), (&f.label, f.avg, &f.rows));
        assert_eq!(l.extension, None);
        assert_eq!(f.extension_field("count"), Some(f.count()), "{f:?}");
        let (min, max) = (f.extension_field("min"), f.extension_field("max"));
        assert!(
            min.zip(max)
                .is_some_and(|(min, max)| min as f64 <= f.avg && f.avg <= max as f64),
            "{f:?}"
        );
        for parts in [&log2_parts, &fine_parts] {
            let counts: Vec<u64> = parts
                .iter()
                .filter(|i| i.label == l.label)
                .map(|i| i.count())
                .collect();
            assert!(counts.len() >= 2, "{counts:?}");
            assert_eq!(
                counts.iter().sum::<u64>(),
                l.count(),
                "{}: {counts:?}",
                l.label
            );
        }
    }
}
