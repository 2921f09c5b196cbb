//! Boots a kernel with the test initramfs in QEMU and returns the guest's `VMTEST` lines
//! from the serial console.

use std::{
    collections::VecDeque,
    io::{BufRead, BufReader, Read},
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc::{self, RecvTimeoutError},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    fn args(self) -> [&'static str; 4] {
        match self {
            Accel::Kvm => ["-accel", "kvm", "-cpu", "host"],
            Accel::Tcg => ["-accel", "tcg", "-cpu", "max"],
        }
    }

    /// How long the guest may take to print its start marker: a few seconds with KVM, a
    /// few more under software emulation unpacking a 50 MB initramfs.
    fn start_timeout(self) -> Duration {
        match self {
            Accel::Kvm => Duration::from_secs(15),
            Accel::Tcg => Duration::from_secs(90),
        }
    }
}

/// The guest never printed its start marker: with KVM, the sign to fall back to TCG.
#[derive(Debug)]
pub struct NoStart(pub String);

impl std::fmt::Display for NoStart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the guest did not start: {}", self.0)
    }
}

impl std::error::Error for NoStart {}

/// Ends QEMU, our child, if it is still running when dropped.
struct Vm(Child);

impl Drop for Vm {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Boots and returns the `VMTEST...` lines, from the start marker to the end marker.
pub fn boot(vmlinuz: &Path, initrd: &Path, accel: Accel, timeout: Duration) -> Result<Vec<String>> {
    let mut child = Command::new("qemu-system-x86_64")
        .args(accel.args())
        .args([
            "-m",
            "1024",
            "-smp",
            "2",
            "-nographic",
            "-no-reboot",
            "-nic",
            "none",
        ])
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 panic=-1 quiet loglevel=3"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting qemu-system-x86_64")?;
    let stdout = child.stdout.take().context("qemu's stdout")?;
    let mut stderr = child.stderr.take().context("qemu's stderr")?;
    let vm = Vm(child);
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).split(b'\n').map_while(Result::ok) {
            if tx
                .send(String::from_utf8_lossy(&line).trim_end().to_string())
                .is_err()
            {
                break;
            }
        }
    });
    let errors = thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });

    let started = Instant::now();
    let mut deadline = started + accel.start_timeout();
    let mut results = Vec::new();
    // The console's last lines, to say what happened when the guest fails.
    let mut tail = VecDeque::new();
    let last = |tail: &VecDeque<String>| tail.iter().cloned().collect::<Vec<_>>().join(" | ");
    loop {
        let line = match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => line,
            Err(RecvTimeoutError::Timeout) if results.is_empty() => {
                return Err(NoStart(format!(
                    "no start marker in {:?}; console: {}",
                    accel.start_timeout(),
                    last(&tail)
                ))
                .into());
            }
            Err(RecvTimeoutError::Timeout) => {
                bail!(
                    "boot timeout: no end marker after {timeout:?}; console: {}",
                    last(&tail)
                )
            }
            Err(RecvTimeoutError::Disconnected) => {
                drop(vm);
                let why = errors.join().unwrap_or_default();
                let err = format!(
                    "QEMU ended before the end marker: {} {}",
                    why.trim(),
                    last(&tail)
                );
                if results.is_empty() {
                    return Err(NoStart(err).into());
                }
                bail!(err);
            }
        };
        // Escape codes may precede a line's text on the console.
        if let Some(at) = line.find("VMTEST") {
            let marker = line[at..].to_string();
            if marker.starts_with("VMTEST-START") {
                deadline = started + timeout;
            }
            let end = marker.starts_with("VMTEST-END");
            results.push(marker);
            if end {
                return Ok(results);
            }
        }
        tail.push_back(line);
        if tail.len() > 20 {
            tail.pop_front();
        }
    }
}
