//! `cargo xtask test` (what CI runs): fmt, clippy, unit tests, then the end-to-end tests
//! against the running kernel.

use std::fs;

use anyhow::{Context, Result, ensure};

use crate::{Project, is_root};

pub fn run(project: &Project) -> Result<()> {
    project.setup()?;
    let mut fmt = project.cargo(None)?;
    fmt.args(["fmt", "--all", "--check"]);
    project.step("cargo fmt --check", fmt)?;

    // Userspace lint and unit tests do not need the eBPF object.
    let mut clippy = project.cargo(None)?;
    clippy
        .args([
            "clippy",
            "--workspace",
            "--exclude",
            "tcprtt-ebpf",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ])
        .env("AYA_BUILD_SKIP", "1");
    project.step("clippy (userspace, host)", clippy)?;

    let mut bpf_clippy = project.cargo(Some("nightly"))?;
    bpf_clippy
        .args([
            "clippy",
            "--package",
            "tcprtt-ebpf",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
        ])
        .args(["--target-dir", "target/bpf-clippy", "--", "-D", "warnings"])
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            "--cfg=bpf_target_arch=\"x86_64\"",
        );
    project.step("clippy (eBPF crate, bpf target)", bpf_clippy)?;

    let mut unit = project.cargo(None)?;
    unit.args([
        "test",
        "--workspace",
        "--exclude",
        "tcprtt-tests",
        "--exclude",
        "tcprtt-ebpf",
    ])
    .env("AYA_BUILD_SKIP", "1");
    project.step("unit tests", unit)?;

    // The end-to-end tests check what such a binary says when run; it reuses the unit
    // tests' build, so this costs a link.
    let mut no_ebpf = project.cargo(None)?;
    no_ebpf
        .args(["build", "--package", "tcprtt"])
        .env("AYA_BUILD_SKIP", "1");
    project.step("building a tcprtt without its eBPF program", no_ebpf)?;
    let no_ebpf_bin = project.root.join("target/tcprtt-without-ebpf");
    fs::copy(project.root.join("target/debug/tcprtt"), &no_ebpf_bin)
        .context("copying target/debug/tcprtt to target/tcprtt-without-ebpf")?;

    project.build_release()?;
    ensure!(
        is_root(),
        "the end-to-end tests load eBPF programs into the running kernel and create network \
         namespaces, so they need root: run `cargo xtask test` as root (they are never skipped)"
    );
    let mut e2e = project.cargo(None)?;
    e2e.args([
        "test",
        "--release",
        "--package",
        "tcprtt-tests",
        "--",
        "--test-threads=1",
    ])
    .env("TCPRTT_BIN", project.release_bin())
    .env("TCPRTT_NO_EBPF_BIN", no_ebpf_bin);
    project.step("end-to-end tests (real kernel, as root)", e2e)
}
