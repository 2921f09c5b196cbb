//! Who may run tcprtt: root, or a user with the capabilities README lists; anyone else
//! is told what is missing in one line.

#[test]
fn unprivileged_user_is_told_to_use_root() {
    let out = std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(tcprtt_tests::kit::bin())
        .args(["-d", "1"])
        .output()
        .expect("setpriv (util-linux) is installed by `cargo xtask setup`");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(
        stderr.trim(),
        "tcprtt: error: tcprtt needs root (or CAP_BPF and CAP_PERFMON) to load its eBPF program: run it with sudo"
    );
}
