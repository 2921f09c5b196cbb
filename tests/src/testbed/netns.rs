//! Test hosts: network namespaces named after the test process, so that leftovers of a
//! crashed run can be told from namespaces another live process is using.

use std::{
    fs::File,
    os::fd::AsRawFd,
    panic,
    path::Path,
    process::{self, Command},
    sync::{
        Once,
        atomic::{AtomicU32, Ordering},
    },
    thread,
};

/// Every namespace the test bed creates is called `tcprtt-<pid>-<n>-<role>`.
const PREFIX: &str = "tcprtt-";

/// Where `ip netns add` mounts a namespace so that it outlives its processes.
const RUN_DIR: &str = "/var/run/netns";

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Runs `ip` and panics with its error output when it fails.
pub(crate) fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("running ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// Deletes the namespaces of earlier test processes that no longer exist (a run killed
/// before its guards could drop). Runs once per process, before its first namespace, so
/// names with this process's own pid are leftovers of an earlier process with that pid.
pub(crate) fn remove_stale() {
    static ONCE: Once = Once::new();
    ONCE.call_once(remove_stale_now);
}

fn remove_stale_now() {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("running ip netns list");
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == process::id() || !Path::new(&format!("/proc/{pid}")).exists() {
            ip(&["netns", "del", name]);
        }
    }
}

/// A network namespace, deleted on drop.
pub(crate) struct Netns {
    name: String,
}

impl Netns {
    pub(crate) fn create(role: &str) -> Self {
        let name = format!(
            "{PREFIX}{}-{}-{role}",
            process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &name]);
        // Owned from here on, so a failing step below still deletes it.
        let ns = Self { name };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // No panic here: this may run while a failed test unwinds.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Runs `f` on a thread of its own that has joined namespace `name`. setns() moves only
/// the calling thread, so the test's other threads stay where they are; sockets and TUN
/// devices that `f` creates belong to the namespace and stay there whichever thread
/// uses them later.
pub(crate) fn enter<R: Send>(name: &str, f: impl FnOnce() -> R + Send) -> R {
    let path = format!("{RUN_DIR}/{name}");
    let file = File::open(&path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
    thread::scope(|s| {
        let joined = s.spawn(|| {
            // SAFETY: a valid namespace descriptor; affects only this thread.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(
                rc,
                0,
                "setns into {name}: {}",
                std::io::Error::last_os_error()
            );
            f()
        });
        joined.join().unwrap_or_else(|p| panic::resume_unwind(p))
    })
}
