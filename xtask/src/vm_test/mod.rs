//! `cargo xtask vm-test`: tcprtt on the long-term kernels users run, each booted in QEMU
//! with a minimal initramfs. The newest Debian 6.1 and 6.12 cloud kernels are fetched
//! (once, into `.tools/vm`), the guest runs the checks of `vm_guest::checks` and reports
//! on the serial console, and this prints one line per kernel and check. Any failed
//! check, boot timeout or kernel that cannot be fetched fails the task; nothing is
//! skipped.

mod initramfs;
mod kernels;
mod qemu;

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Result, ensure};

use crate::{Project, is_root, vm_guest::CHECKS};
use qemu::{Accel, NoStart};

/// From the start marker to the end marker, under software emulation.
const GUEST_TIMEOUT: Duration = Duration::from_secs(360);

pub fn run(project: &Project) -> Result<()> {
    project.setup()?;
    project.build_release()?;
    run_built(project)
}

/// The kernel checks against the release binary already built.
pub fn run_built(project: &Project) -> Result<()> {
    let started = Instant::now();
    ensure!(
        is_root(),
        "vm-test creates device nodes for the guest's initramfs: run it as root"
    );
    let kernels = kernels::fetch(project)?;
    let initrd = initramfs::build(&project.root.join("target/vm-test"), &project.release_bin())?;
    let mut accel = if Path::new("/dev/kvm").exists() {
        Accel::Kvm
    } else {
        Accel::Tcg
    };
    let mut failures = Vec::new();
    for kernel in &kernels {
        let booted = Instant::now();
        eprintln!("vm-test: booting {} ({accel:?})", kernel.package);
        let mut lines = qemu::boot(&kernel.vmlinuz, &initrd, accel, GUEST_TIMEOUT);
        if accel == Accel::Kvm
            && let Err(err) = &lines
            && let Some(no_start) = err.downcast_ref::<NoStart>()
        {
            eprintln!(
                "vm-test: KVM does not work here ({no_start}); software emulation (TCG) from now on"
            );
            accel = Accel::Tcg;
            lines = qemu::boot(&kernel.vmlinuz, &initrd, accel, GUEST_TIMEOUT);
        }
        let name = format!("Linux {} ({})", kernel.series, kernel.package);
        match lines {
            Ok(lines) => failures.extend(report(&name, &lines)),
            Err(err) => {
                println!("vm-test: {name}: boot: FAIL: {err:#}");
                failures.push(format!("{name}: boot"));
            }
        }
        eprintln!(
            "vm-test: {} done in {:.0} s",
            kernel.package,
            booted.elapsed().as_secs_f64()
        );
    }
    eprintln!(
        "vm-test: {} kernels, {} checks each, {:.0} s in all",
        kernels.len(),
        CHECKS.len(),
        started.elapsed().as_secs_f64()
    );
    ensure!(
        failures.is_empty(),
        "{} of {} kernel checks failed (FAIL lines above)",
        failures.len(),
        kernels.len() * CHECKS.len()
    );
    Ok(())
}

/// Prints one line per check of one kernel and returns the failed ones. A check the guest
/// did not report counts as failed.
fn report(kernel: &str, lines: &[String]) -> Vec<String> {
    let mut name = kernel.to_string();
    if let Some(start) = lines.first().and_then(|l| l.strip_prefix("VMTEST-START ")) {
        // "<uname -r> <Debian version>"
        if let Some((release, debian)) = start.split_once(' ') {
            name = format!("Linux {debian} ({release})");
        }
    }
    let mut failures = Vec::new();
    for line in lines {
        if let Some(fail) = line.strip_prefix("VMTEST FAIL ") {
            println!("vm-test: {name}: {}", fail.replacen(": ", ": FAIL: ", 1));
            failures.push(format!(
                "{name}: {}",
                fail.split(": ").next().unwrap_or(fail)
            ));
        } else if let Some(ok) = line.strip_prefix("VMTEST ok ") {
            println!("vm-test: {name}: {}", ok.replacen(": ", ": ok: ", 1));
        }
    }
    for check in CHECKS {
        let reported = lines.iter().any(|l| {
            l.strip_prefix("VMTEST ")
                .and_then(|l| l.split_once(' '))
                .is_some_and(|(_, rest)| rest.starts_with(&format!("{}: ", check.name)))
        });
        if !reported {
            println!(
                "vm-test: {name}: {}: FAIL: not reported by the guest",
                check.name
            );
            failures.push(format!("{name}: {}", check.name));
        }
    }
    failures
}
