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

/// Fails early, with the fix, when this process cannot load BPF programs.
pub fn check() -> Result<()> {
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
