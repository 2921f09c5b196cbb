//! Project tasks: `cargo xtask setup | build | run | test`.
//!
//! Everything a fresh machine lacks is installed by `setup`, which every other task runs
//! first: the nightly `rust-src` component, a bpf-linker built against the nightly's own
//! LLVM (into `.tools/`, inside the project), and the Debian packages the tests use.

mod bench;

use std::{
    env,
    ffi::OsString,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail, ensure};
use clap::{Parser, Subcommand};

const BPF_LINKER_VERSION: &str = "0.13.0";
/// Debian packages the end-to-end tests call: `ip`/`ss` (iproute2), `bpftool`, `setpriv`.
const DEBIAN_PACKAGES: &[(&str, &str)] = &[
    ("iproute2", "ip"),
    ("bpftool", "bpftool"),
    ("util-linux", "setpriv"),
];

#[derive(Parser)]
#[command(about = "tcprtt's build, run and test tasks")]
struct Args {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what is missing (nightly rust-src, bpf-linker, Debian packages)
    Setup,
    /// Set up, then build target/release/tcprtt with its eBPF program embedded
    Build,
    /// Set up, build, and run tcprtt as root with the given arguments
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Set up, then fmt, clippy, unit tests and end-to-end tests (as root)
    Test,
    /// Set up, build, and measure what tcprtt costs the host into BENCHMARKS.md (as root)
    Bench,
}

fn main() {
    if let Err(err) = run(Args::parse()) {
        eprintln!("xtask: error: {err:#}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<()> {
    let project = Project::new()?;
    match args.task {
        Task::Setup => project.setup(),
        Task::Build => {
            project.setup()?;
            project.build_release()
        }
        Task::Run { args } => {
            project.setup()?;
            project.build_release()?;
            ensure!(
                is_root(),
                "tcprtt loads an eBPF program and needs root: run `cargo xtask run` as root"
            );
            let status = Command::new(project.root.join("target/release/tcprtt"))
                .args(args)
                .status()
                .context("running target/release/tcprtt")?;
            std::process::exit(status.code().unwrap_or(1));
        }
        Task::Test => project.test(),
        Task::Bench => {
            project.setup()?;
            project.build_release()?;
            ensure!(
                is_root(),
                "the benchmark loads eBPF programs: run `cargo xtask bench` as root"
            );
            bench::run(&project.root)
        }
    }
}

fn is_root() -> bool {
    // /proc/self belongs to the effective user.
    fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1).map(|euid| euid == "0"))
            .unwrap_or(false)
    })
}

struct Project {
    root: PathBuf,
    tools: PathBuf,
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Project {
    fn new() -> Result<Self> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .context("xtask has no parent folder")?
            .to_path_buf();
        let tools = root.join(".tools");
        Ok(Self { root, tools })
    }

    /// PATH with the project's tools first, so cargo and rustc find bpf-linker.
    fn path_env(&self) -> Result<OsString> {
        let mut paths = vec![self.tools.join("bin")];
        paths.extend(env::split_paths(&env::var_os("PATH").unwrap_or_default()));
        env::join_paths(paths).context("building PATH")
    }

    fn cargo(&self, toolchain: Option<&str>) -> Result<Command> {
        let mut cmd = match toolchain {
            Some(tc) => {
                let mut c = Command::new("rustup");
                c.args(["run", tc, "cargo"]);
                c
            }
            None => Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into())),
        };
        cmd.current_dir(&self.root).env("PATH", self.path_env()?);
        Ok(cmd)
    }

    fn step(&self, what: &str, mut cmd: Command) -> Result<()> {
        eprintln!("xtask: {what}");
        let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
        ensure!(status.success(), "{what} failed ({status})");
        Ok(())
    }

    fn setup(&self) -> Result<()> {
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
                Command::new("sh")
                    .args(["-c", &format!("command -v {command}")])
                    .output()
                    .is_ok_and(|o| o.status.success()),
                "package {pkg} installed but `{command}` is not on PATH"
            );
        }
        Ok(())
    }

    fn build_release(&self) -> Result<()> {
        let mut cmd = self.cargo(None)?;
        cmd.args(["build", "--release", "--package", "tcprtt"]);
        self.step("building target/release/tcprtt", cmd)
    }

    fn test(&self) -> Result<()> {
        self.setup()?;
        let mut fmt = self.cargo(None)?;
        fmt.args(["fmt", "--all", "--check"]);
        self.step("cargo fmt --check", fmt)?;

        // Userspace lint and unit tests do not need the eBPF object.
        let mut clippy = self.cargo(None)?;
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
        self.step("clippy (userspace, host)", clippy)?;

        let mut bpf_clippy = self.cargo(Some("nightly"))?;
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
        self.step("clippy (eBPF crate, bpf target)", bpf_clippy)?;

        let mut unit = self.cargo(None)?;
        unit.args([
            "test",
            "--workspace",
            "--exclude",
            "tcprtt-tests",
            "--exclude",
            "tcprtt-ebpf",
        ])
        .env("AYA_BUILD_SKIP", "1");
        self.step("unit tests", unit)?;

        // The end-to-end tests check what such a binary says when run; it reuses the
        // unit tests' build, so this costs a link.
        let mut no_ebpf = self.cargo(None)?;
        no_ebpf
            .args(["build", "--package", "tcprtt"])
            .env("AYA_BUILD_SKIP", "1");
        self.step("building a tcprtt without its eBPF program", no_ebpf)?;
        let no_ebpf_bin = self.root.join("target/tcprtt-without-ebpf");
        fs::copy(self.root.join("target/debug/tcprtt"), &no_ebpf_bin)
            .context("copying target/debug/tcprtt to target/tcprtt-without-ebpf")?;

        self.build_release()?;
        ensure!(
            is_root(),
            "the end-to-end tests load eBPF programs into the running kernel and create network \
             namespaces, so they need root: run `cargo xtask test` as root (they are never skipped)"
        );
        let mut e2e = self.cargo(None)?;
        e2e.args([
            "test",
            "--release",
            "--package",
            "tcprtt-tests",
            "--",
            "--test-threads=1",
        ])
        .env("TCPRTT_BIN", self.root.join("target/release/tcprtt"))
        .env("TCPRTT_NO_EBPF_BIN", no_ebpf_bin);
        self.step("end-to-end tests (real kernel, as root)", e2e)
    }
}
