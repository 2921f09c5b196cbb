//! A test bed with real round-trip times: hosts are network namespaces, and paths between
//! them are delay lines (a TUN device in each namespace, packets copied across by threads
//! of the test process after a configurable one-way delay). This kernel has no netem.
//!
//! ```text
//!   client ns                      test process                      server ns
//!   lo: 198.51.100.1          +----------------------+          lo: 203.0.113.1
//!       2001:db8:1::1         | a->b: sleep(delay)   |              2001:db8:2::1
//!   tun0 (routes to server) <=| b->a: sleep(delay)   |=> tun0 (routes to client)
//!                             +----------------------+
//! ```
//!
//! A host's addresses sit on its loopback device, so a host with paths to several peers
//! (one TUN each) keeps one address per family, and IPv4 and IPv6 take the same path.
//! Use only documentation ranges: 198.51.100.0/24, 203.0.113.0/24, 2001:db8::/32.
//!
//! Everything belongs to a [`TestBed`]; dropping it (also when a test panics) stops the
//! servers and forwarders and deletes the namespaces, which removes their TUN devices.
//! Namespaces left by a test process that was killed are deleted by the next `TestBed`.

mod delay;
mod netns;
mod observe;
pub mod router;

use std::{
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
};

pub use delay::{Delay, Link};
pub use observe::TcpInfo;

use crate::kit::{Conn, EchoServer};
use delay::{Forwarder, open_tun};
use netns::{Netns, enter, ip};

/// The log2 rows (µs) that paths of 5, 20 and 40 ms each way fall in.
pub const RTT_10MS: (u64, u64) = (8192, 16383);
pub const RTT_40MS: (u64, u64) = (32768, 65535);
pub const RTT_80MS: (u64, u64) = (65536, 131071);

/// Longer than a delayed ACK waits (200 ms at most) plus the slowest one-way delay of a
/// test: after it, idle connections have nothing left in flight.
pub const QUIET: std::time::Duration = std::time::Duration::from_millis(400);

/// Owns the hosts, paths and servers of one test.
pub struct TestBed {
    servers: Vec<EchoServer>,
    forwarders: Vec<Forwarder>,
    namespaces: Vec<Netns>,
}

impl Default for TestBed {
    fn default() -> Self {
        Self::new()
    }
}

impl TestBed {
    pub fn new() -> Self {
        netns::remove_stale();
        Self {
            servers: Vec::new(),
            forwarders: Vec::new(),
            namespaces: Vec::new(),
        }
    }

    /// A new host (namespace) with `addrs` (IPv4 and/or IPv6) on its loopback device.
    pub fn host(&mut self, role: &str, addrs: &[&str]) -> Host {
        let ns = Netns::create(role);
        let name: Arc<str> = ns.name().into();
        self.namespaces.push(ns);
        let addrs: Vec<IpAddr> = addrs
            .iter()
            .map(|a| a.parse().unwrap_or_else(|e| panic!("{a}: {e}")))
            .collect();
        for addr in &addrs {
            let (prefix, extra): (&str, &[&str]) = match addr {
                IpAddr::V4(_) => ("/32", &[]),
                // No duplicate address detection: the address is usable at once.
                IpAddr::V6(_) => ("/128", &["nodad"]),
            };
            let cidr = format!("{addr}{prefix}");
            let mut args = vec!["-n", &name, "addr", "add", &cidr, "dev", "lo"];
            args.extend_from_slice(extra);
            ip(&args);
        }
        Host {
            ns: name,
            addrs,
            tuns: Arc::default(),
        }
    }

    /// A delay line between `a` and `b`: each routes the other's addresses through a new
    /// TUN device of its own.
    pub fn link(&mut self, a: &Host, b: &Host, delay: Delay) -> Link {
        let (tun_a, file_a) = a.new_tun();
        let (tun_b, file_b) = b.new_tun();
        let (forwarder, link) = Forwarder::start(file_a, file_b, delay);
        self.forwarders.push(forwarder);
        a.route_via(&tun_a, &b.addrs);
        b.route_via(&tun_b, &a.addrs);
        link
    }

    /// Starts an echo server in `host` on `addr` (port 0: any free port); returns the
    /// address it listens on.
    pub fn serve(&mut self, host: &Host, addr: SocketAddr) -> SocketAddr {
        let server = enter(&host.ns, || EchoServer::bind(addr))
            .unwrap_or_else(|e| panic!("binding the echo server to {addr} in {}: {e}", host.ns));
        let addr = server.addr;
        self.servers.push(server);
        addr
    }
}

impl Drop for TestBed {
    /// Traffic first, then the links it runs over, then the hosts: no thread is left
    /// using a namespace that is gone.
    fn drop(&mut self) {
        self.servers.clear();
        self.forwarders.clear();
        self.namespaces.clear();
    }
}

/// A test host: a handle on one of the bed's namespaces.
#[derive(Clone)]
pub struct Host {
    ns: Arc<str>,
    pub addrs: Vec<IpAddr>,
    tuns: Arc<AtomicU32>,
}

impl Host {
    pub fn name(&self) -> &str {
        &self.ns
    }

    /// A connection from `local` (any port) to `server`, made inside this host.
    pub fn connect(&self, local: IpAddr, server: SocketAddr) -> Conn {
        enter(&self.ns, || {
            Conn::connect(SocketAddr::new(local, 0), server)
        })
        .unwrap_or_else(|e| panic!("connecting {local} -> {server} in {}: {e}", self.ns))
    }

    /// The kernel's view of this host's established TCP sockets.
    pub fn established_sockets(&self) -> Vec<TcpInfo> {
        observe::established_sockets(&self.ns)
    }

    /// The established socket from `local` to `peer`.
    pub fn socket(&self, local: SocketAddr, peer: SocketAddr) -> TcpInfo {
        let all = self.established_sockets();
        all.iter()
            .find(|s| s.local == local && s.peer == peer)
            .cloned()
            .unwrap_or_else(|| panic!("no socket {local} -> {peer} in {}: {all:?}", self.ns))
    }

    /// A counter of this host's `/proc/net/snmp` or `/proc/net/netstat`, e.g.
    /// (`Tcp`, `InSegs`).
    pub fn counter(&self, group: &str, name: &str) -> u64 {
        observe::counter(&self.ns, group, name)
    }

    fn new_tun(&self) -> (String, std::fs::File) {
        let tun = format!("tun{}", self.tuns.fetch_add(1, Ordering::Relaxed));
        let file = netns::enter(&self.ns, || open_tun(&tun));
        ip(&["-n", &self.ns, "link", "set", &tun, "up"]);
        (tun, file)
    }

    fn route_via(&self, tun: &str, peers: &[IpAddr]) {
        for peer in peers {
            let dst = match peer {
                IpAddr::V4(_) => format!("{peer}/32"),
                IpAddr::V6(_) => format!("{peer}/128"),
            };
            ip(&["-n", &self.ns, "route", "add", &dst, "dev", tun]);
        }
    }
}
