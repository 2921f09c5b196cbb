//! The test kernels: the newest Debian `cloud-amd64` image package of each series, found
//! with apt-cache, fetched with `apt-get download` and unpacked into `.tools/vm/<package>`
//! once; a later run finds it there and fetches nothing.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result};

use crate::{Project, output};

/// Each series and the apt-cache pattern of its image packages.
pub const SERIES: [(&str, &str); 2] = [
    ("6.1", r"^linux-image-6\.1\.0-[0-9]+-cloud-amd64$"),
    (
        "6.12",
        r"^linux-image-6\.12\.[0-9]+\+deb[0-9]+-cloud-amd64$",
    ),
];

pub struct Kernel {
    pub series: &'static str,
    pub package: String,
    pub vmlinuz: PathBuf,
}

/// The numbers in a package name, in order, to compare versions by:
/// "linux-image-6.12.117+deb12-cloud-amd64" -> [6, 12, 117, 12].
fn version_key(package: &str) -> Vec<u64> {
    package
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect()
}

fn newest(pattern: &str) -> Result<Option<String>> {
    let found = output(Command::new("apt-cache").args(["search", "--names-only", pattern]))?;
    Ok(found
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .max_by_key(|p| version_key(p))
        .map(str::to_string))
}

/// The newest package of each series, fetched and unpacked if not cached yet.
pub fn fetch(project: &Project) -> Result<Vec<Kernel>> {
    let cache = project.tools.join("vm");
    let mut kernels = Vec::new();
    for (series, pattern) in SERIES {
        let package = match newest(pattern)? {
            Some(p) => p,
            None => {
                // A fresh machine may not have read the package lists yet.
                let mut update = Command::new("apt-get");
                update.args(["update", "-q"]);
                project.step("apt-get update", update)?;
                newest(pattern)?.with_context(|| {
                    format!("no Linux {series} cloud-amd64 image package in the apt sources")
                })?
            }
        };
        let dir = cache.join(&package);
        let vmlinuz = dir.join("vmlinuz");
        if vmlinuz.is_file() {
            eprintln!("vm-test: {package}: cached in .tools/vm");
        } else {
            eprintln!("vm-test: {package}: fetching");
            unpack(&cache, &package).with_context(|| format!("fetching {package}"))?;
        }
        kernels.push(Kernel {
            series,
            package,
            vmlinuz,
        });
    }
    Ok(kernels)
}

/// Downloads and unpacks into a scratch folder, then renames it into place, so an
/// interrupted fetch never looks cached.
fn unpack(cache: &Path, package: &str) -> Result<()> {
    let scratch = cache.join(format!("{package}.partial-{}", std::process::id()));
    let _ = fs::remove_dir_all(&scratch);
    fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    output(
        Command::new("apt-get")
            .args(["download", "-q", package])
            .current_dir(&scratch),
    )?;
    let deb = entry(&scratch, |n| n.ends_with(".deb"))?;
    let tree = scratch.join("tree");
    output(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tree))?;
    let image = entry(&tree.join("boot"), |n| n.starts_with("vmlinuz-"))?;
    fs::rename(&image, scratch.join("vmlinuz"))?;
    // The modules stay for tests that need one loaded (none do yet); the rest goes.
    fs::rename(tree.join("lib/modules"), scratch.join("modules"))?;
    fs::remove_dir_all(&tree)?;
    fs::remove_file(&deb)?;
    let dir = cache.join(package);
    let _ = fs::remove_dir_all(&dir);
    fs::rename(&scratch, &dir).with_context(|| format!("moving into {}", dir.display()))
}

/// The entry of `dir` whose name `wanted` accepts.
fn entry(dir: &Path, wanted: impl Fn(&str) -> bool) -> Result<PathBuf> {
    fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|e| e.ok())
        .find(|e| wanted(&e.file_name().to_string_lossy()))
        .map(|e| e.path())
        .with_context(|| format!("not found in {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newer_abi_and_point_releases_sort_higher() {
        let mut names = [
            "linux-image-6.12.99+deb12-cloud-amd64",
            "linux-image-6.12.117+deb12-cloud-amd64",
            "linux-image-6.12.101+deb12-cloud-amd64",
        ];
        names.sort_by_key(|n| version_key(n));
        assert_eq!(names[2], "linux-image-6.12.117+deb12-cloud-amd64");
        assert!(
            version_key("linux-image-6.1.0-56-cloud-amd64")
                > version_key("linux-image-6.1.0-9-cloud-amd64")
        );
    }
}
