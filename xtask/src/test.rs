//! `cargo xtask test` (what CI runs): fmt, clippy, unit tests, the end-to-end tests
//! against the running kernel, then `vm-test` on Debian's 6.1 and 6.12 kernels.

use std::fs;

use anyhow::{Context, Result, ensure};

use crate::{Project, is_root};

/// A cargo command run from the workspace root.
struct Step {
    what: &'static str,
    /// `None` for the toolchain xtask runs under.
    toolchain: Option<&'static str>,
    args: &'static [&'static str],
    env: &'static [(&'static str, &'static str)],
}

/// Userspace lint and unit tests do not need the eBPF object, so they build without it.
const NO_EBPF: (&str, &str) = ("AYA_BUILD_SKIP", "1");

/// What runs before the end-to-end tests, in order. The last builds the tcprtt those
/// tests check for what a binary without its eBPF program says; it reuses the unit
/// tests' build, so it costs a link.
const STEPS: &[Step] = &[
    Step {
        what: "cargo fmt --check",
        toolchain: None,
        args: &["fmt", "--all", "--check"],
        env: &[],
    },
    Step {
        what: "clippy (userspace, host)",
        toolchain: None,
        args: &[
            "clippy",
            "--workspace",
            "--exclude",
            "tcprtt-ebpf",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
        env: &[NO_EBPF],
    },
    Step {
        what: "clippy (eBPF crate, bpf target)",
        toolchain: Some("nightly"),
        args: &[
            "clippy",
            "--package",
            "tcprtt-ebpf",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--target-dir",
            "target/bpf-clippy",
            "--",
            "-D",
            "warnings",
        ],
        env: &[(
            "CARGO_ENCODED_RUSTFLAGS",
            "--cfg=bpf_target_arch=\"x86_64\"",
        )],
    },
    Step {
        what: "unit tests",
        toolchain: None,
        args: &[
            "test",
            "--workspace",
            "--exclude",
            "tcprtt-tests",
            "--exclude",
            "tcprtt-ebpf",
        ],
        env: &[NO_EBPF],
    },
    Step {
        what: "building a tcprtt without its eBPF program",
        toolchain: None,
        args: &["build", "--package", "tcprtt"],
        env: &[NO_EBPF],
    },
];

pub fn run(project: &Project) -> Result<()> {
    project.setup()?;
    for step in STEPS {
        let mut cmd = project.cargo(step.toolchain)?;
        cmd.args(step.args).envs(step.env.iter().copied());
        project.step(step.what, cmd)?;
    }
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
    project.step("end-to-end tests (real kernel, as root)", e2e)?;

    eprintln!("xtask: the same checks on other kernels, in QEMU (vm-test)");
    crate::vm_test::run_built(project)
}
