//! Routed paths: two hosts joined through a third that forwards between them, each side
//! its own delay line. A program watching one of the router's devices sees every packet
//! of the flows between the two ends, none of them its own.
//!
//! ```text
//!   a ns                 router ns (forwarding on)                 b ns
//!   tunN <= a_side => tun0 (routes to a)   tun1 (routes to b) <= b_side => tunM
//! ```

use super::{
    Delay, Forwarder, Host, Link, TestBed,
    netns::{enter, ip},
};

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

/// Sets a network sysctl (`net.ipv4.ip_forward=1`) inside namespace `ns`; panics when it
/// fails. /proc/sys/net belongs to the namespace of the thread that opens it.
pub fn sysctl(ns: &str, setting: &str) {
    let (key, value) = setting
        .split_once('=')
        .unwrap_or_else(|| panic!("{setting}: not key=value"));
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    enter(ns, || std::fs::write(&path, value))
        .unwrap_or_else(|e| panic!("setting {setting} in {ns}: {e}"));
}

/// Sets a device of namespace `ns` down or up (for the bad-input tests).
pub fn set_link(ns: &str, dev: &str, up: bool) {
    ip(&["-n", ns, "link", "set", dev, if up { "up" } else { "down" }]);
}

/// Runs `f` on a thread inside `host`'s namespace: sockets it creates stay there.
pub fn in_ns<R: Send>(host: &Host, f: impl FnOnce() -> R + Send) -> R {
    enter(host.name(), f)
}

/// Programs attached with TCX to device `dev` of `host`, ingress and egress together
/// (`bpftool net show` of Debian's bpftool does not list TCX links).
pub fn tcx_programs(host: &Host, dev: &str) -> u32 {
    const BPF_PROG_QUERY: libc::c_long = 16;
    const BPF_TCX_INGRESS: u32 = 46;
    const BPF_TCX_EGRESS: u32 = 47;
    in_ns(host, || {
        let name = std::ffi::CString::new(dev).expect("device name");
        // SAFETY: a NUL-terminated name.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert_ne!(index, 0, "no device {dev} in {}", host.name());
        [BPF_TCX_INGRESS, BPF_TCX_EGRESS]
            .iter()
            .map(|&attach_type| {
                // The query part of `union bpf_attr`: target_ifindex, attach_type,
                // query_flags, attach_flags, prog_ids (u64), prog_cnt, then zeros.
                let mut attr = [0u32; 32];
                attr[0] = index;
                attr[1] = attach_type;
                // SAFETY: `attr` is a zeroed bpf_attr prefix of the size passed; with no
                // id buffer the kernel only writes the count back into it.
                let rc = unsafe {
                    libc::syscall(
                        libc::SYS_bpf,
                        BPF_PROG_QUERY,
                        attr.as_mut_ptr(),
                        std::mem::size_of_val(&attr),
                    )
                };
                assert_eq!(
                    rc,
                    0,
                    "BPF_PROG_QUERY on {dev}: {}",
                    std::io::Error::last_os_error()
                );
                attr[6]
            })
            .sum()
    })
}

/// Runs `ip` with `args` (e.g. `-n NS link add ...`); panics with its error output when
/// it fails. For set-ups the bed has no helper for, in namespaces the bed owns.
pub fn ip_cmd(args: &[&str]) {
    ip(args);
}
