//! `cargo xtask build`: the release binary with its eBPF program embedded.

use anyhow::Result;

use crate::Project;

impl Project {
    pub fn build_release(&self) -> Result<()> {
        let mut cmd = self.cargo(None)?;
        cmd.args(["build", "--release", "--package", "tcprtt"]);
        self.step("building target/release/tcprtt", cmd)
    }
}
