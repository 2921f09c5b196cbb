//! Builds the C libbpf peer (`xtask/bench/c_peer`) into `target/bench-c/`: the kernel's
//! types as `vmlinux.h`, the BPF object, its skeleton, then the loader. Everything
//! generated stays under `target/`, so nothing machine-specific is ever committed.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, ensure};

use crate::{on_path, output};

/// The peer's loader, built from the sources in the repository.
pub fn build(root: &Path) -> Result<PathBuf> {
    for tool in ["clang", "bpftool"] {
        ensure!(
            on_path(tool),
            "`{tool}` is not on PATH: run `cargo xtask setup` as root"
        );
    }
    let src = root.join("xtask/bench/c_peer");
    let out = root.join("target/bench-c");
    fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    eprintln!("bench: building the C peer into {}", out.display());

    // CO-RE relocations resolve the offsets against the running kernel at load time; the
    // header only has to declare the types.
    let vmlinux = output(Command::new("bpftool").args([
        "btf",
        "dump",
        "file",
        "/sys/kernel/btf/vmlinux",
        "format",
        "c",
    ]))?;
    write(&out.join("vmlinux.h"), &vmlinux)?;

    let object = out.join("tcprtt_c.bpf.o");
    run(Command::new("clang")
        .args(["-g", "-O2", "-target", "bpf", "-D__TARGET_ARCH_x86"])
        .arg(format!("-I{}", out.display()))
        .arg(format!("-I{}", src.display()))
        .arg("-c")
        .arg(src.join("tcprtt_c.bpf.c"))
        .arg("-o")
        .arg(&object))?;

    let skeleton = output(
        Command::new("bpftool")
            .args(["gen", "skeleton"])
            .arg(&object),
    )?;
    write(&out.join("tcprtt_c.skel.h"), &skeleton)?;

    let loader = out.join("tcprtt_c");
    run(Command::new("clang")
        .args(["-O2", "-Wall", "-Werror"])
        .arg(format!("-I{}", out.display()))
        .arg(format!("-I{}", src.display()))
        .arg(src.join("tcprtt_c.c"))
        .args(["-lbpf", "-lelf", "-lz", "-o"])
        .arg(&loader))?;
    Ok(loader)
}

fn write(path: &Path, text: &str) -> Result<()> {
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// Runs a compiler; its diagnostics go to our stderr, so a failure is shown in full.
fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    ensure!(status.success(), "{cmd:?} failed ({status})");
    Ok(())
}
