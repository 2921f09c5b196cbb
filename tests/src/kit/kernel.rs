//! What tcprtt holds in the kernel, and whether it is gone after tcprtt ends. Other
//! processes on the machine may run tcprtt at the same time, so a test looks only at the
//! programs and maps its own tracer holds, found through the tracer's file descriptors.

use std::{
    collections::BTreeSet,
    fs,
    process::Command,
    thread,
    time::{Duration, Instant},
};

/// The kernel frees a detached program and its maps after an RCU grace period, not at
/// once; on a busy machine that can take a while.
const FREE_LIMIT: Duration = Duration::from_secs(5);

/// BPF programs and maps, by kernel id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Loaded {
    pub programs: BTreeSet<u32>,
    pub maps: BTreeSet<u32>,
}

impl Loaded {
    /// What process `pid` holds through its file descriptors (programs directly or
    /// through links, maps directly).
    pub fn held_by(pid: i32) -> Self {
        let mut loaded = Self::default();
        let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
            return loaded;
        };
        for fd in fds.flatten() {
            let Ok(info) = fs::read_to_string(fd.path()) else {
                continue;
            };
            for line in info.lines() {
                let id = |key| line.strip_prefix(key).and_then(|v| v.trim().parse().ok());
                if let Some(id) = id("prog_id:") {
                    loaded.programs.insert(id);
                } else if let Some(id) = id("map_id:") {
                    loaded.maps.insert(id);
                }
            }
        }
        loaded
    }

    /// Everything loaded in the kernel now.
    pub fn in_kernel() -> Self {
        Self {
            programs: bpftool_ids("prog"),
            maps: bpftool_ids("map"),
        }
    }

    /// Waits until none of these programs and maps exists any more; panics naming those
    /// still there after a few seconds.
    pub fn assert_gone(&self) {
        assert!(
            !self.programs.is_empty(),
            "no program to check: was tcprtt attached?"
        );
        let deadline = Instant::now() + FREE_LIMIT;
        loop {
            let now = Self::in_kernel();
            let left = Self {
                programs: self.programs.intersection(&now.programs).copied().collect(),
                maps: self.maps.intersection(&now.maps).copied().collect(),
            };
            if left == Self::default() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "left loaded {FREE_LIMIT:?} after tcprtt ended: {left:?}"
            );
            thread::sleep(Duration::from_millis(50));
        }
    }
}

/// tcprtt programs (named `tcprtt_*`) that no process holds open now: left behind, or
/// about to be freed by the kernel.
pub fn orphans() -> BTreeSet<u32> {
    let held = held_by_anyone();
    tcprtt_programs()
        .into_iter()
        .filter(|id| !held.contains(id))
        .collect()
}

/// Orphans (see [`orphans`]) not in `known` that are still there after the few
/// seconds the kernel may take to free a program: tcprtt programs left behind.
pub fn new_orphans(known: &BTreeSet<u32>) -> BTreeSet<u32> {
    let deadline = Instant::now() + FREE_LIMIT;
    loop {
        let new: BTreeSet<u32> = orphans().difference(known).copied().collect();
        if new.is_empty() || Instant::now() > deadline {
            return new;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Ids of the tcprtt programs loaded now, held or not.
fn tcprtt_programs() -> BTreeSet<u32> {
    bpftool_list("prog")
        .iter()
        .filter(|p| p["name"].as_str().is_some_and(|n| n.starts_with("tcprtt_")))
        .filter_map(|p| p["id"].as_u64()?.try_into().ok())
        .collect()
}

/// Programs some process holds open, directly or through a link.
fn held_by_anyone() -> BTreeSet<u32> {
    let Ok(procs) = fs::read_dir("/proc") else {
        return BTreeSet::new();
    };
    procs
        .flatten()
        .filter_map(|p| p.file_name().to_str()?.parse::<i32>().ok())
        .flat_map(|pid| Loaded::held_by(pid).programs)
        .collect()
}

fn bpftool_ids(kind: &str) -> BTreeSet<u32> {
    bpftool_list(kind)
        .iter()
        .filter_map(|p| p["id"].as_u64()?.try_into().ok())
        .collect()
}

/// `bpftool -j <kind> show`, parsed.
fn bpftool_list(kind: &str) -> Vec<serde_json::Value> {
    let out = Command::new("bpftool")
        .args(["-j", kind, "show"])
        .output()
        .expect("bpftool is installed by `cargo xtask setup`");
    assert!(
        out.status.success(),
        "bpftool {kind} show: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("bpftool -j {kind} show: {e}"))
}
