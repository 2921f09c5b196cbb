//! The guest's initramfs (cpio, newc): busybox, the release tcprtt, this xtask binary
//! (whose hidden `vm-guest` task runs the checks and makes the traffic), iproute2's `ip`
//! and `tc` for the wire checks' veth pair, the shared libraries these load, each test
//! kernel's modules that the wire source needs, and an `/init` that runs the checks and
//! powers off.

use std::{
    fs,
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, ensure};
use rustix::fs::{CWD, FileType, Mode, makedev, mknodat};

use super::kernels::Kernel;
use crate::{
    output,
    vm_guest::{LOAD_ORDER, MODULES},
};

/// What the wire checks need that a kernel may build as a module: veth for the pair,
/// and the clsact qdisc (`sch_ingress`) and BPF classifier (`cls_bpf`) tcprtt attaches
/// through where there is no TCX. Loaded on every kernel, so that a TCX kernel shows it
/// prefers TCX with clsact at hand.
const WIRE_MODULES: [&str; 3] = ["veth", "sch_ingress", "cls_bpf"];
/// iproute2's tools, for what busybox's `ip` lacks (veth pairs, namespaces) and to list
/// clsact filters.
const IPROUTE2: [&str; 2] = ["ip", "tc"];

const INIT: &str = "#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
/bin/busybox ip link set lo up
/bin/xtask vm-guest /bin/tcprtt
echo o > /proc/sysrq-trigger
# Power-off is asynchronous; init must not exit before it happens.
/bin/busybox sleep 60
";

/// Builds `<dir>/initramfs.cpio` from a fresh `<dir>/root` and returns its path.
pub fn build(dir: &Path, tcprtt: &Path, kernels: &[Kernel]) -> Result<PathBuf> {
    let root = dir.join("root");
    let _ = fs::remove_dir_all(&root);
    // `ip netns` keeps its namespaces in /run/netns.
    for sub in ["bin", "dev", "proc", "run", "sys", "tmp"] {
        fs::create_dir_all(root.join(sub))
            .with_context(|| format!("creating {sub} in {}", root.display()))?;
    }
    let xtask = std::env::current_exe().context("finding the xtask binary")?;
    let iproute2 = IPROUTE2
        .iter()
        .map(|tool| {
            ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
                .iter()
                .map(|d| Path::new(d).join(tool))
                .find(|p| p.is_file())
                .with_context(|| format!("no `{tool}` (Debian package iproute2) on this machine"))
                .map(|p| (p, format!("bin/{tool}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut binaries = vec![
        (PathBuf::from("/bin/busybox"), "bin/busybox".to_string()),
        (tcprtt.to_path_buf(), "bin/tcprtt".to_string()),
        (xtask.clone(), "bin/xtask".to_string()),
    ];
    binaries.extend(iproute2);
    for (from, to) in &binaries {
        fs::copy(from, root.join(to)).with_context(|| format!("copying {}", from.display()))?;
    }
    for (binary, _) in binaries.iter().skip(1) {
        for lib in shared_libraries(binary)? {
            let to = root.join(lib.strip_prefix("/").unwrap_or(&lib));
            fs::create_dir_all(to.parent().context("a library without a folder")?)?;
            fs::copy(&lib, &to).with_context(|| format!("copying {}", lib.display()))?;
        }
    }
    for kernel in kernels {
        modules(kernel, &root).with_context(|| format!("{}'s modules", kernel.package))?;
    }
    let init = root.join("init");
    fs::write(&init, INIT).context("writing /init")?;
    fs::set_permissions(&init, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    // The kernel opens /dev/console for init before anything could mount devtmpfs.
    mknodat(
        CWD,
        root.join("dev/console"),
        FileType::CharacterDevice,
        Mode::from_raw_mode(0o600),
        makedev(5, 1),
    )
    .context("creating /dev/console")?;
    let cpio = dir.join("initramfs.cpio");
    archive(&root, &cpio)?;
    Ok(cpio)
}

/// Copies the `WIRE_MODULES` the kernel builds as modules, and those they depend on,
/// uncompressed into `<root>/lib/modules/<release>/`, with `load.order` listing them
/// dependencies first.
fn modules(kernel: &Kernel, root: &Path) -> Result<()> {
    for release in fs::read_dir(&kernel.modules)
        .with_context(|| format!("listing {}", kernel.modules.display()))?
    {
        let tree = release?.path();
        let read = |name: &str| {
            fs::read_to_string(tree.join(name))
                .with_context(|| format!("reading {}", tree.join(name).display()))
        };
        let list = |text: String| -> Vec<(String, String)> {
            text.lines()
                .map(|path| (module_name(path), path.to_string()))
                .collect()
        };
        let modules = Modules {
            tree: tree.clone(),
            builtin: list(read("modules.builtin")?),
            built: list(read("modules.order")?),
            into: root
                .join(MODULES.trim_start_matches('/'))
                .join(tree.file_name().context("a release without a name")?),
        };
        fs::create_dir_all(&modules.into)?;
        let mut order = Vec::new();
        for name in WIRE_MODULES {
            modules.add(name, &mut order)?;
        }
        fs::write(modules.into.join(LOAD_ORDER), order.join("\n") + "\n")?;
    }
    Ok(())
}

/// "kernel/net/sched/cls_bpf.ko" -> "cls_bpf"; the kernel treats `-` and `_` alike.
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    file.split(".ko").next().unwrap_or(file).replace('-', "_")
}

struct Modules {
    tree: PathBuf,
    /// (name, path) of the modules built into the kernel, and of those built as modules.
    builtin: Vec<(String, String)>,
    built: Vec<(String, String)>,
    into: PathBuf,
}

impl Modules {
    fn add(&self, name: &str, order: &mut Vec<String>) -> Result<()> {
        let name = name.replace('-', "_");
        if order.contains(&name) || self.builtin.iter().any(|(n, _)| *n == name) {
            return Ok(());
        }
        let path = self
            .built
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, p)| self.tree.join(p))
            .with_context(|| format!("no module {name}, built in or not"))?;
        let image = read_module(&path)?;
        for dep in depends(&image) {
            self.add(&dep, order)?;
        }
        fs::write(self.into.join(format!("{name}.ko")), image)?;
        order.push(name);
        Ok(())
    }
}

/// A module's image, decompressed: modules.order names `x.ko` where Debian ships
/// `x.ko.xz` (6.12) or `x.ko` (6.1).
fn read_module(path: &Path) -> Result<Vec<u8>> {
    if path.is_file() {
        return fs::read(path).with_context(|| format!("reading {}", path.display()));
    }
    let xz = PathBuf::from(format!("{}.xz", path.display()));
    let out = Command::new("xz")
        .arg("-dc")
        .arg(&xz)
        .output()
        .with_context(|| format!("running xz -dc {}", xz.display()))?;
    ensure!(
        out.status.success(),
        "xz -dc {}: {}",
        xz.display(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(out.stdout)
}

/// The `depends=` entry of a module's `.modinfo` section: NUL-separated `key=value`
/// strings that nothing else in the image spells so.
fn depends(image: &[u8]) -> Vec<String> {
    image
        .split(|&b| b == 0)
        .find_map(|s| s.strip_prefix(b"depends="))
        .map(|list| {
            String::from_utf8_lossy(list)
                .split(',')
                .filter(|d| !d.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// The libraries `ldd` says a binary loads, the dynamic loader included.
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let listed = output(Command::new("ldd").arg(binary))?;
    // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)", "/lib64/ld-linux-x86-64.so.2 (0x...)"
    Ok(listed
        .lines()
        .filter_map(|l| {
            let path = l
                .split_once("=>")
                .map_or(l, |(_, p)| p)
                .split_whitespace()
                .next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

fn archive(root: &Path, cpio: &Path) -> Result<()> {
    let mut names = Vec::new();
    walk(root, root, &mut names)?;
    let out = fs::File::create(cpio).with_context(|| format!("creating {}", cpio.display()))?;
    let mut child = Command::new("cpio")
        .args(["-o", "-H", "newc", "--quiet"])
        .current_dir(root)
        .stdin(Stdio::piped())
        .stdout(out)
        .spawn()
        .context("running cpio")?;
    child
        .stdin
        .take()
        .context("cpio's stdin")?
        .write_all(names.join("\n").as_bytes())
        .context("listing files for cpio")?;
    let status = child.wait().context("waiting for cpio")?;
    ensure!(status.success(), "cpio failed ({status})");
    Ok(())
}

/// Every path under `dir`, relative to `root`, parents before children.
fn walk(root: &Path, dir: &Path, names: &mut Vec<String>) -> Result<()> {
    let mut entries: Vec<_> = fs::read_dir(dir)?.filter_map(|e| e.ok()).collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = e.path();
        let relative = path.strip_prefix(root)?.to_string_lossy().into_owned();
        names.push(relative);
        if e.file_type()?.is_dir() {
            walk(root, &path, names)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_names_and_their_dependencies() {
        assert_eq!(module_name("kernel/net/sched/cls_bpf.ko"), "cls_bpf");
        assert_eq!(module_name("kernel/drivers/net/veth.ko.xz"), "veth");
        assert_eq!(
            module_name("kernel/arch/x86/events/amd/amd-uncore.ko"),
            "amd_uncore"
        );
        let image = b"\x7fELF\0license=GPL\0depends=nf_conntrack,libcrc32c\0intree=Y\0";
        assert_eq!(depends(image), ["nf_conntrack", "libcrc32c"]);
        assert!(depends(b"\0depends=\0vermagic=6.1\0").is_empty());
        assert!(depends(b"no modinfo").is_empty());
    }
}
