//! Project tasks: `cargo xtask setup | build | run | test | bench | vm-test`.
//!
//! Everything a fresh machine lacks is installed by `setup`, which every other task runs
//! first: the nightly `rust-src` component, a bpf-linker built against the nightly's own
//! LLVM (into `.tools/`, inside the project), and the Debian packages the tests use.

mod bench;
mod build;
mod run;
mod setup;
mod test;
mod vm_guest;
mod vm_test;

use std::{
    env,
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, ensure};
use clap::{Parser, Subcommand};

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
    /// Set up, then fmt, clippy, unit tests, end-to-end tests and vm-test (as root)
    Test,
    /// Set up, build, and measure what tcprtt costs the host into BENCHMARKS.md (as root)
    Bench,
    /// Set up, build, and run the kernel checks in QEMU on Debian's 6.1 and 6.12 (as root)
    VmTest,
    /// Inside a test kernel: run the checks against this tcprtt binary
    #[command(hide = true)]
    VmGuest { tcprtt: PathBuf },
}

fn main() {
    if let Err(err) = dispatch(Args::parse()) {
        eprintln!("xtask: error: {err:#}");
        std::process::exit(1);
    }
}

fn dispatch(args: Args) -> Result<()> {
    if let Task::VmGuest { tcprtt } = &args.task {
        // In the guest there is no project tree, only this binary.
        vm_guest::run(tcprtt);
        return Ok(());
    }
    let project = Project::new()?;
    match args.task {
        Task::Setup => project.setup(),
        Task::Build => {
            project.setup()?;
            project.build_release()
        }
        Task::Run { args } => run::run(&project, &args),
        Task::Test => test::run(&project),
        Task::Bench => bench::run(&project),
        Task::VmTest => vm_test::run(&project),
        Task::VmGuest { .. } => unreachable!("handled above"),
    }
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Standard output of a command that must succeed.
fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether an executable of this name is in one of PATH's folders.
fn on_path(command: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    env::var_os("PATH").is_some_and(|path| {
        env::split_paths(&path).any(|dir| {
            std::fs::metadata(dir.join(command))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    })
}

/// tcprtt's programs loaded now (by any process), named with their ids.
fn tcprtt_programs() -> Vec<String> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter_map(|p| {
            let name = p.name_as_str()?;
            name.starts_with("tcprtt_")
                .then(|| format!("{name} (id {})", p.id()))
        })
        .collect()
}

struct Project {
    root: PathBuf,
    tools: PathBuf,
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

    fn release_bin(&self) -> PathBuf {
        self.root.join("target/release/tcprtt")
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
}
