//! Whether this process may load BPF programs, checked before trying, so the user gets the
//! fix rather than a bare EPERM.

use anyhow::{Context, Result, anyhow, bail};

const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// The effective capability set, from `/proc/self/status`.
fn effective_capabilities() -> Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")
        .context("reading /proc/self/status to check capabilities")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .ok_or_else(|| anyhow!("no CapEff line in /proc/self/status"))
}

/// Whether a uid map is the initial user namespace's: every uid mapped to itself.
fn is_initial_uid_map(map: &str) -> bool {
    let fields: Vec<&str> = map.split_whitespace().collect();
    fields == ["0", "0", "4294967295"]
}

/// Fails early, with the fix, when this process cannot load BPF programs.
pub fn check() -> Result<()> {
    // Capabilities held inside a user namespace do not reach the kernel's BPF checks,
    // which look at the initial namespace: root there would still get EPERM.
    let uid_map = std::fs::read_to_string("/proc/self/uid_map")
        .context("reading /proc/self/uid_map to check the user namespace")?;
    if !is_initial_uid_map(&uid_map) {
        bail!(
            "tcprtt runs inside a user namespace (uid map {}), whose capabilities do not allow \
             loading BPF programs: run it as root (or with CAP_BPF and CAP_PERFMON) in the \
             host's initial user namespace",
            uid_map.split_whitespace().collect::<Vec<_>>().join(" ")
        );
    }
    let effective = effective_capabilities()?;
    let has = |cap: u32| effective & (1 << cap) != 0;
    if has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON)) {
        Ok(())
    } else {
        bail!(
            "tcprtt needs root (or CAP_BPF and CAP_PERFMON) to load its eBPF program: run it with sudo"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::is_initial_uid_map;

    #[test]
    fn only_the_identity_map_of_every_uid_is_the_initial_namespace() {
        assert!(is_initial_uid_map("         0          0 4294967295\n"));
        assert!(!is_initial_uid_map("         0       1000          1\n"));
        assert!(!is_initial_uid_map("0 0 4294967295\n1 1 1\n"));
        assert!(!is_initial_uid_map(""));
    }
}
