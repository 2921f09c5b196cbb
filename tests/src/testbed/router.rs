//! Routed paths: two hosts joined through a third that forwards between them, each side
//! its own delay line. A program watching one of the router's devices sees every packet
//! of the flows between the two ends, none of them its own.
//!
//! ```text
//!   a ns                 router ns (forwarding on)                 b ns
//!   tunN <= a_side => tun0 (routes to a)   tun1 (routes to b) <= b_side => tunM
//! ```

use std::process::Command;

use super::{Delay, Forwarder, Host, Link, TestBed, netns::ip};

/// A router between two hosts, with its devices and links.
pub struct Routed {
    pub router: Host,
    /// The router's device towards `a` and towards `b`.
    pub a_iface: String,
    pub b_iface: String,
    /// The delay lines between `a` and the router, and between the router and `b`.
    pub a_link: Link,
    pub b_link: Link,
}

impl TestBed {
    /// A new host `role` that forwards between `a` and `b` (IPv4 and IPv6): `a` reaches
    /// `b`'s addresses through it over a path with `a_side` delays, then on to `b` with
    /// `b_side` delays (each `Delay` counted from the router's neighbour towards it first:
    /// `a_side.a_to_b` is a -> router, `b_side.a_to_b` is router -> b).
    pub fn router(
        &mut self,
        role: &str,
        a: &Host,
        b: &Host,
        a_side: Delay,
        b_side: Delay,
    ) -> Routed {
        let router = self.host(role, &[]);
        for key in ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"] {
            sysctl(router.name(), key);
        }
        let (tun_a, file_a) = a.new_tun();
        let (a_iface, file_ra) = router.new_tun();
        let (forwarder, a_link) = Forwarder::start(file_a, file_ra, a_side);
        self.forwarders.push(forwarder);
        let (b_iface, file_rb) = router.new_tun();
        let (tun_b, file_b) = b.new_tun();
        let (forwarder, b_link) = Forwarder::start(file_rb, file_b, b_side);
        self.forwarders.push(forwarder);

        a.route_via(&tun_a, &b.addrs);
        router.route_via(&a_iface, &a.addrs);
        router.route_via(&b_iface, &b.addrs);
        b.route_via(&tun_b, &a.addrs);
        Routed {
            router,
            a_iface,
            b_iface,
            a_link,
            b_link,
        }
    }
}

/// Sets a sysctl inside namespace `ns`; panics when it fails.
pub fn sysctl(ns: &str, key: &str) {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "sysctl", "-qw", key])
        .output()
        .expect("running sysctl in a namespace");
    assert!(
        out.status.success(),
        "sysctl {key} in {ns}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// Sets a device of namespace `ns` down or up (for the bad-input tests).
pub fn set_link(ns: &str, dev: &str, up: bool) {
    ip(&["-n", ns, "link", "set", dev, if up { "up" } else { "down" }]);
}
