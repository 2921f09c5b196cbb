//! `cargo xtask setup`: install what a fresh machine lacks; a second run installs nothing.

use std::{fs, path::Path, process::Command};

use anyhow::{Context, Result, bail, ensure};

use crate::{Project, is_root, on_path, output};

const BPF_LINKER_VERSION: &str = "0.13.0";
/// Debian packages the tests and the benchmark call, each with a command it provides:
/// `ip`/`ss` (iproute2), `bpftool`, `setpriv`; QEMU, a static busybox and cpio for
/// `vm-test`'s guests; `ping`, the wire source's ground truth; Prometheus and promtool for
/// the exposition tests; for the benchmark's peers
/// `clang`, `bpftrace`, `iperf3` (the wire source's bulk transfer), and libbpf and libelf for the C peer to link with (libraries, no
/// command of their own: they are checked through `clang`, which compiles against them).
const DEBIAN_PACKAGES: &[(&str, &str)] = &[
    ("iproute2", "ip"),
    ("bpftool", "bpftool"),
    ("util-linux", "setpriv"),
    ("qemu-system-x86", "qemu-system-x86_64"),
    ("busybox-static", "busybox"),
    ("cpio", "cpio"),
    ("iputils-ping", "ping"),
    ("clang", "clang"),
    ("libbpf-dev", "clang"),
    ("libelf-dev", "clang"),
    ("bpftrace", "bpftrace"),
    ("iperf3", "iperf3"),
    ("prometheus", "promtool"),
];

impl Project {
    pub fn setup(&self) -> Result<()> {
        self.ensure_nightly_components()?;
        self.ensure_bpf_linker()?;
        self.ensure_debian_packages()
    }

    fn ensure_nightly_components(&self) -> Result<()> {
        let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))?;
        if !toolchains.lines().any(|l| l.starts_with("nightly")) {
            eprintln!("setup: installing the nightly toolchain");
            output(Command::new("rustup").args([
                "toolchain",
                "install",
                "nightly",
                "--profile",
                "minimal",
            ]))?;
        }
        let installed = output(Command::new("rustup").args([
            "component",
            "list",
            "--toolchain",
            "nightly",
            "--installed",
        ]))?;
        for component in ["rust-src", "clippy"] {
            if installed.lines().any(|l| l.starts_with(component)) {
                eprintln!("setup: nightly {component}: present");
            } else {
                eprintln!("setup: nightly {component}: installing");
                output(Command::new("rustup").args([
                    "component",
                    "add",
                    component,
                    "--toolchain",
                    "nightly",
                ]))?;
            }
        }
        Ok(())
    }

    fn bpf_linker_ok(&self) -> bool {
        Command::new(self.tools.join("bin/bpf-linker"))
            .arg("--version")
            .output()
            .is_ok_and(|o| {
                o.status.success()
                    && String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION)
            })
    }

    /// bpf-linker must link against the very LLVM the nightly compiler uses, so it is
    /// built from source against the nightly's own libLLVM.
    fn ensure_bpf_linker(&self) -> Result<()> {
        if self.bpf_linker_ok() {
            eprintln!("setup: bpf-linker {BPF_LINKER_VERSION}: present in .tools/bin");
            return Ok(());
        }
        eprintln!(
            "setup: bpf-linker {BPF_LINKER_VERSION}: building against the nightly's LLVM (about 1-2 minutes)"
        );
        let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
        let lib = Path::new(sysroot.trim()).join("lib");
        let so = fs::read_dir(&lib)
            .with_context(|| format!("listing {}", lib.display()))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .find(|n| n.starts_with("libLLVM.so.") && n.contains("-rust-"))
            .with_context(|| format!("no libLLVM.so.*-rust-* in {}", lib.display()))?;
        // "libLLVM.so.22.1-rust-1.97.0-nightly" -> 22
        let major = so
            .trim_start_matches("libLLVM.so.")
            .split('.')
            .next()
            .unwrap_or_default()
            .to_string();
        let prefix = self.tools.join("llvm");
        let prefix_lib = prefix.join("lib");
        fs::create_dir_all(&prefix_lib).context("creating .tools/llvm/lib")?;
        for name in ["libLLVM.so", so.as_str()] {
            let link = prefix_lib.join(name);
            let _ = fs::remove_file(&link);
            std::os::unix::fs::symlink(lib.join(&so), &link)
                .with_context(|| format!("linking {}", link.display()))?;
        }
        let mut cmd = Command::new("cargo");
        cmd.args([
            "+nightly",
            "install",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            "--locked",
            "--no-default-features",
        ])
        .args(["--features", &format!("llvm-{major}")])
        .arg("--root")
        .arg(&self.tools)
        .env("LLVM_PREFIX", &prefix);
        self.step("building bpf-linker", cmd)?;
        ensure!(
            self.bpf_linker_ok(),
            "bpf-linker was built but does not run"
        );
        Ok(())
    }

    fn ensure_debian_packages(&self) -> Result<()> {
        let missing: Vec<&str> = DEBIAN_PACKAGES
            .iter()
            .filter(|(pkg, _)| {
                let status = Command::new("dpkg-query")
                    .args(["-W", "-f=${Status}", pkg])
                    .output();
                !status.is_ok_and(|o| {
                    String::from_utf8_lossy(&o.stdout).contains("install ok installed")
                })
            })
            .map(|(pkg, _)| *pkg)
            .collect();
        if missing.is_empty() {
            let names: Vec<_> = DEBIAN_PACKAGES.iter().map(|(p, _)| *p).collect();
            eprintln!("setup: Debian packages {}: present", names.join(", "));
            return Ok(());
        }
        if !is_root() {
            bail!(
                "Debian packages missing: {} (install them as root: apt-get install {})",
                missing.join(", "),
                missing.join(" ")
            );
        }
        eprintln!("setup: installing Debian packages: {}", missing.join(", "));
        let mut update = Command::new("apt-get");
        update.args(["update", "-q"]);
        self.step("apt-get update", update)?;
        let mut install = Command::new("apt-get");
        install
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive");
        self.step("apt-get install", install)?;
        for (pkg, command) in DEBIAN_PACKAGES {
            ensure!(
                on_path(command),
                "package {pkg} installed but `{command}` is not on PATH"
            );
        }
        Ok(())
    }
}
