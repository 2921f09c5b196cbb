//! The guest's initramfs (cpio, newc): busybox, the release tcprtt, this xtask binary
//! (whose hidden `vm-guest` task runs the checks and makes the traffic), the shared
//! libraries those two load, and an `/init` that runs the checks and powers off.

use std::{
    fs,
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, ensure};
use rustix::fs::{CWD, FileType, Mode, makedev, mknodat};

use crate::output;

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
pub fn build(dir: &Path, tcprtt: &Path) -> Result<PathBuf> {
    let root = dir.join("root");
    let _ = fs::remove_dir_all(&root);
    for sub in ["bin", "dev", "proc", "sys", "tmp"] {
        fs::create_dir_all(root.join(sub))
            .with_context(|| format!("creating {sub} in {}", root.display()))?;
    }
    let xtask = std::env::current_exe().context("finding the xtask binary")?;
    for (from, to) in [
        (Path::new("/bin/busybox"), "bin/busybox"),
        (tcprtt, "bin/tcprtt"),
        (xtask.as_path(), "bin/xtask"),
    ] {
        fs::copy(from, root.join(to)).with_context(|| format!("copying {}", from.display()))?;
    }
    for binary in [tcprtt, xtask.as_path()] {
        for lib in shared_libraries(binary)? {
            let to = root.join(lib.strip_prefix("/").unwrap_or(&lib));
            fs::create_dir_all(to.parent().context("a library without a folder")?)?;
            fs::copy(&lib, &to).with_context(|| format!("copying {}", lib.display()))?;
        }
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
