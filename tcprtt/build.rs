//! Builds the eBPF program (`tcprtt-ebpf`) for the bpf target and leaves it in OUT_DIR,
//! where main.rs embeds it. With `AYA_BUILD_SKIP=1` an empty object is embedded instead,
//! so clippy and unit tests work on machines without the eBPF toolchain; such a binary
//! says so when run.

use std::{env, fs, path::PathBuf, process::Command};

use anyhow::{Context, Result, bail};

fn main() -> Result<()> {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    let object = out_dir.join("tcprtt");
    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    println!("cargo:rerun-if-env-changed=PATH");
    if skip {
        fs::write(&object, []).context("writing the empty eBPF object")?;
        return Ok(());
    }
    if Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_err()
    {
        bail!(
            "bpf-linker is not on PATH: run `cargo xtask setup` (it installs one into .tools/bin), \
             or set AYA_BUILD_SKIP=1 to build without the eBPF program"
        );
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tcprtt-ebpf");
    let root = root.to_str().context("non-UTF-8 path to tcprtt-ebpf")?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "tcprtt-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
