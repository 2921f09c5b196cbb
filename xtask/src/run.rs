//! `cargo xtask run -- ARGS`: build, then run tcprtt as root with ARGS.

use std::{ffi::OsString, process::Command};

use anyhow::{Context, Result, ensure};

use crate::{Project, is_root};

pub fn run(project: &Project, args: &[OsString]) -> Result<()> {
    project.setup()?;
    project.build_release()?;
    ensure!(
        is_root(),
        "tcprtt loads an eBPF program and needs root: run `cargo xtask run` as root"
    );
    let status = Command::new(project.release_bin())
        .args(args)
        .status()
        .context("running target/release/tcprtt")?;
    std::process::exit(status.code().unwrap_or(1));
}
