//! The wire source's test bed in the guest: a veth pair whose far end sits in a network
//! namespace of its own, so that a connection between the two ends crosses `IFACE` as
//! real frames; and what the kernel says is attached to `IFACE`'s traffic-control hooks.
//! iproute2's `ip` and `tc` come with the initramfs (busybox's `ip` makes no veth).

use std::{
    fs,
    os::fd::AsFd,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, ensure};
use aya::programs::{SchedClassifier, TcAttachType};
use rustix::{
    io::Errno,
    thread::{LinkNameSpaceType, move_into_link_name_space},
};

/// The interface tcprtt watches, its peer, and the peer's namespace.
pub const IFACE: &str = "vmwire0";
const PEER: &str = "vmwire1";
const NETNS: &str = "vmpeer";
const LOCAL: &str = "198.51.100.1/24";
const REMOTE: &str = "198.51.100.2/24";
/// Where the initramfs keeps each kernel's modules and the order to load them in.
pub const MODULES: &str = "/lib/modules";
pub const LOAD_ORDER: &str = "load.order";

/// How tcprtt attaches on this kernel: TCX links from Linux 6.6, a clsact qdisc before.
pub fn expected_hook(release: &str) -> &'static str {
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse::<u32>().unwrap_or(0));
    let version = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
    if version >= (6, 6) { "tcx" } else { "clsact" }
}

/// Loads the kernel modules the initramfs carries for this kernel, in the order the host
/// wrote (dependencies first), and returns their names.
fn load_modules(release: &str) -> Result<Vec<String>> {
    let dir = Path::new(MODULES).join(release);
    let order = fs::read_to_string(dir.join(LOAD_ORDER))
        .with_context(|| format!("reading {}/{LOAD_ORDER}", dir.display()))?;
    let mut loaded = Vec::new();
    for name in order.split_whitespace() {
        let path = dir.join(format!("{name}.ko"));
        let file = fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        match rustix::system::finit_module(file.as_fd(), c"", 0) {
            Ok(()) | Err(Errno::EXIST) => loaded.push(name.to_string()),
            Err(e) => return Err(e).with_context(|| format!("loading the module {name}")),
        }
    }
    Ok(loaded)
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("/bin/ip")
        .args(args)
        .output()
        .context("running /bin/ip")?;
    ensure!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// Loads the modules, then makes the veth pair and addresses it; returns the modules
/// loaded.
pub fn setup(release: &str) -> Result<Vec<String>> {
    let modules = load_modules(release)?;
    for args in [
        &["netns", "add", NETNS][..],
        &[
            "link", "add", IFACE, "type", "veth", "peer", "name", PEER, "netns", NETNS,
        ],
        &["addr", "add", LOCAL, "dev", IFACE],
        &["link", "set", IFACE, "up"],
        &["-n", NETNS, "addr", "add", REMOTE, "dev", PEER],
        &["-n", NETNS, "link", "set", PEER, "up"],
    ] {
        ip(args)?;
    }
    Ok(modules)
}

/// Moves the calling thread (only it) into the peer's namespace, where the wire flow's
/// server listens.
pub fn enter_peer() -> Result<()> {
    let path = PathBuf::from("/run/netns").join(NETNS);
    let ns = fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    move_into_link_name_space(ns.as_fd(), Some(LinkNameSpaceType::Network))
        .with_context(|| format!("entering the network namespace {NETNS}"))
}

/// What the kernel has on `IFACE`'s traffic-control hooks.
#[derive(Clone, Debug)]
pub struct Hooks {
    /// Program names on the TCX ingress and egress hooks, or why the kernel would not
    /// list them (no TCX before Linux 6.6).
    pub tcx: Result<[Vec<String>; 2], String>,
    /// `tc qdisc show` lines naming a clsact qdisc.
    pub clsact: Vec<String>,
    /// `tc filter show` lines of the ingress and egress hooks that name a program.
    pub filters: [Vec<String>; 2],
}

impl Hooks {
    pub fn read() -> Result<Self> {
        let tcx = [TcAttachType::Ingress, TcAttachType::Egress].map(|direction| {
            SchedClassifier::query_tcx(IFACE, direction)
                .map(|(_, programs)| {
                    programs
                        .iter()
                        .map(|p| p.name_as_str().unwrap_or("?").to_string())
                        .collect::<Vec<_>>()
                })
                .map_err(|e| format!("{e:#}"))
        });
        let tcx = match tcx {
            [Ok(ingress), Ok(egress)] => Ok([ingress, egress]),
            [Err(e), _] | [_, Err(e)] => Err(e),
        };
        let clsact = tc(&["qdisc", "show", "dev", IFACE])?
            .into_iter()
            .filter(|l| l.contains("clsact"))
            .collect();
        let filters = ["ingress", "egress"].map(|hook| {
            tc(&["filter", "show", "dev", IFACE, hook]).map(|lines| {
                lines
                    .into_iter()
                    .filter(|l| l.contains(" bpf ") && l.contains(" id "))
                    .collect()
            })
        });
        let [ingress, egress] = filters;
        Ok(Self {
            tcx,
            clsact,
            filters: [ingress?, egress?],
        })
    }

    /// Nothing at all on either hook.
    pub fn empty(&self) -> bool {
        self.tcx
            .as_ref()
            .map_or(true, |t| t.iter().all(Vec::is_empty))
            && self.clsact.is_empty()
            && self.filters.iter().all(Vec::is_empty)
    }
}

fn tc(args: &[&str]) -> Result<Vec<String>> {
    let out = Command::new("/bin/tc")
        .args(args)
        .output()
        .context("running /bin/tc")?;
    ensure!(
        out.status.success(),
        "tc {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcx_from_6_6() {
        assert_eq!(expected_hook("6.1.0-56-cloud-amd64"), "clsact");
        assert_eq!(expected_hook("6.5.13"), "clsact");
        assert_eq!(expected_hook("6.6.0"), "tcx");
        assert_eq!(expected_hook("6.12.117+deb12-cloud-amd64"), "tcx");
        assert_eq!(expected_hook("7.0"), "tcx");
    }
}
