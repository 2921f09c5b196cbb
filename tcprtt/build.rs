//! Builds the eBPF program (`tcprtt-ebpf`) for the bpf target and leaves it in OUT_DIR,
//! where main.rs embeds it. With `AYA_BUILD_SKIP=1` an empty object is embedded instead,
//! so clippy and unit tests work on machines without the eBPF toolchain; such a binary
//! says so when run.
//!
//! bpf-linker is looked for in the workspace's `.tools/bin` (where `cargo xtask setup`
//! installs it) before PATH, so a plain `cargo build` works after setup.

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
    let tools_bin = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.tools/bin");
    if tools_bin.join("bpf-linker").is_file() {
        let mut paths = vec![tools_bin];
        paths.extend(env::split_paths(&env::var_os("PATH").unwrap_or_default()));
        let path = env::join_paths(paths).context("building PATH with .tools/bin")?;
        // SAFETY: the build script has started no threads, so nothing reads the
        // environment concurrently. aya-build's cargo and its linker inherit it.
        unsafe { env::set_var("PATH", path) };
    }
    if Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_err()
    {
        bail!(
            "bpf-linker is neither in .tools/bin nor on PATH: run `cargo xtask setup` (it \
             installs one into .tools/bin), or set AYA_BUILD_SKIP=1 to build without the eBPF program"
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
