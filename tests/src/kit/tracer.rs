//! The binary under test, run to completion ([`run`]) or in the background while a test
//! drives traffic ([`Tracer`]).

use std::{
    io::{BufRead, BufReader, Read},
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::PathBuf,
    process::{Child, ChildStdout, Command, ExitStatus, Stdio},
    sync::mpsc::{self, RecvTimeoutError},
    thread,
    time::{Duration, Instant},
};

use super::kernel::Loaded;

/// What every tcprtt source prints on stderr once it is attached and measuring, e.g.
/// "Tracing TCP RTT via tp_btf/tcp_probe. Hit Ctrl-C to end."
const TRACING: &str = "Tracing TCP RTT";

/// How long a tracer may take to attach, and a finished one to exit.
const START_LIMIT: Duration = Duration::from_secs(20);
const EXIT_LIMIT: Duration = Duration::from_secs(30);

/// A binary the tests run: `$var` (set by `cargo xtask test`), else `default` under the
/// workspace's target folder.
fn built(var: &str, default: &str, how: &str) -> PathBuf {
    let path = std::env::var_os(var).map_or_else(
        || {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../target")
                .join(default)
        },
        PathBuf::from,
    );
    assert!(path.exists(), "{} does not exist: {how}", path.display());
    path
}

/// The binary under test: `$TCPRTT_BIN`, else the release build.
pub fn bin() -> PathBuf {
    built(
        "TCPRTT_BIN",
        "release/tcprtt",
        "build it with `cargo xtask build`",
    )
}

/// A command running tcprtt `args` as nobody (65534), with no groups and with `caps`
/// (setpriv syntax, e.g. "+bpf,+perfmon" or "-all") inheritable and ambient: the
/// capabilities tcprtt then has.
pub fn as_nobody(caps: &str, args: &[&str]) -> Command {
    let mut command = Command::new("setpriv");
    command
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            &format!("--inh-caps={caps}"),
        ])
        .args(
            caps.starts_with('+')
                .then(|| format!("--ambient-caps={caps}")),
        )
        .arg(bin())
        .args(args);
    command
}

/// A tcprtt built with AYA_BUILD_SKIP=1, without its eBPF program: `$TCPRTT_NO_EBPF_BIN`,
/// else where `cargo xtask test` leaves it.
pub fn no_ebpf_bin() -> PathBuf {
    built(
        "TCPRTT_NO_EBPF_BIN",
        "tcprtt-without-ebpf",
        "`cargo xtask test` builds it",
    )
}

/// What a finished tcprtt run left behind.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    /// Every line tcprtt wrote to stderr, in order.
    pub stderr: String,
}

impl Finished {
    /// Asserts the run failed with exit `code` and one stderr line holding `needle`,
    /// nothing on stdout and no panic.
    pub fn assert_one_line_error(&self, what: &str, code: i32, needle: &str) {
        if let Some(why) = self.one_line_error_mismatch(code, needle) {
            panic!("{what}: {why}");
        }
    }

    /// What differs from a failure with exit `code` and one stderr line holding
    /// `needle` (and nothing on stdout, no panic); None if nothing does.
    pub fn one_line_error_mismatch(&self, code: i32, needle: &str) -> Option<String> {
        let lines: Vec<&str> = self.stderr.lines().collect();
        if self.status.code() != Some(code) {
            Some(format!("exit {:?}, not {code}: {self:?}", self.status))
        } else if !self.stdout.is_empty() {
            Some(format!("printed to stdout: {self:?}"))
        } else if lines.len() != 1 {
            Some(format!("not one line: {:?}", self.stderr))
        } else if !lines[0].contains(needle) {
            Some(format!("{:?} lacks {needle:?}", lines[0]))
        } else if self.stderr.contains("panicked") {
            Some(format!("panicked: {self:?}"))
        } else {
            None
        }
    }
}

/// Runs tcprtt with `args` to completion and checks it failed as
/// [`Finished::assert_one_line_error`] says.
pub fn assert_one_line_error(args: &[&str], code: i32, needle: &str) {
    run(args).assert_one_line_error(&format!("{args:?}"), code, needle);
}

/// Runs tcprtt to completion (for runs that end by themselves: errors, `-d`).
pub fn run(args: &[&str]) -> Finished {
    let mut command = Command::new(bin());
    command.args(args);
    run_command(command)
}

/// Runs a prepared command (tcprtt, or a wrapper such as setpriv that execs it) to
/// completion, stdin closed, stdout and stderr captured.
pub fn run_command(command: Command) -> Finished {
    run_within(command, EXIT_LIMIT)
}

/// The same, failing the test (after killing the process) when it has not ended
/// within `limit`: for runs that must not hang.
pub fn run_within(command: Command, limit: Duration) -> Finished {
    try_run_within(command, limit).unwrap_or_else(|why| panic!("{why}"))
}

/// Starts `command` with no stdin and stdout and stderr on pipes; returns it and how it
/// reads in messages.
fn spawn_piped(command: &mut Command) -> (Child, String) {
    let what = format!("{command:?}");
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {what}: {e}"));
    (child, what)
}

/// The same, saying so (after killing the process) when it has not ended within `limit`.
pub fn try_run_within(mut command: Command, limit: Duration) -> Result<Finished, String> {
    let (mut child, what) = spawn_piped(&mut command);
    let readers = [
        child.stdout.take().map(read_all),
        child.stderr.take().map(read_all),
    ];
    let Some(status) = wait_for(&mut child, limit) else {
        let _ = child.kill();
        let _ = child.wait();
        return Err(format!("{what} did not exit within {limit:?}"));
    };
    let [stdout, stderr] =
        readers.map(|r| r.map_or_else(String::new, |r| r.join().expect("reader")));
    Ok(Finished {
        status,
        stdout,
        stderr,
    })
}

fn read_all(mut pipe: impl Read + Send + 'static) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// The child's exit status, or None if it is still running after `limit`.
pub fn wait_for(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("waiting for tcprtt") {
            return Some(status);
        }
        if Instant::now() > deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// A running tcprtt, attached and tracing. Killed on drop unless it was waited for.
pub struct Tracer {
    child: Option<Child>,
    stderr_lines: mpsc::Receiver<String>,
    /// Lines tcprtt printed before its "Tracing TCP RTT" line.
    pub before_attach: Vec<String>,
    /// The "Tracing TCP RTT ..." line.
    pub attach_line: String,
    /// Reads stdout to its end, or holds it unread.
    stdout: Stdout,
}

enum Stdout {
    Read(thread::JoinHandle<String>),
    Unread(ChildStdout),
}

impl Tracer {
    /// Starts tcprtt with `args` and returns once it says it is tracing.
    pub fn start(args: &[&str]) -> Self {
        let mut command = Command::new(bin());
        command.args(args);
        Self::start_command(command)
    }

    /// The same for a prepared command (e.g. setpriv running tcprtt).
    pub fn start_command(command: Command) -> Self {
        Self::spawn(command, true)
    }

    /// Starts tcprtt with `args` with nobody reading its stdout, a pipe of one page:
    /// once that is full, its writes block.
    pub fn start_unread(args: &[&str]) -> Self {
        let mut command = Command::new(bin());
        command.args(args);
        Self::spawn(command, false)
    }

    fn spawn(mut command: Command, read_stdout: bool) -> Self {
        // SAFETY: prctl is async-signal-safe; it makes the kernel end tcprtt (which then
        // detaches its program) if this test process is killed before its guards run.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        let (mut child, what) = spawn_piped(&mut command);
        let mut out = child.stdout.take().expect("stdout");
        let stdout = if read_stdout {
            Stdout::Read(thread::spawn(move || {
                let mut s = String::new();
                let _ = out.read_to_string(&mut s);
                s
            }))
        } else {
            // The smallest pipe (one page): a single long report fills it, however
            // slowly a busy machine lets tcprtt produce them.
            // SAFETY: F_SETPIPE_SZ takes an int and changes only this pipe.
            let rc = unsafe { libc::fcntl(out.as_raw_fd(), libc::F_SETPIPE_SZ, 4096) };
            assert!(rc > 0, "F_SETPIPE_SZ: {}", std::io::Error::last_os_error());
            Stdout::Unread(out)
        };
        let (tx, rx) = mpsc::channel();
        let err = child.stderr.take().expect("stderr");
        thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut tracer = Self {
            child: Some(child),
            stderr_lines: rx,
            before_attach: Vec::new(),
            attach_line: String::new(),
            stdout,
        };
        let deadline = Instant::now() + START_LIMIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tracer.stderr_lines.recv_timeout(left) {
                Ok(line) if line.starts_with(TRACING) => {
                    tracer.attach_line = line;
                    return tracer;
                }
                Ok(line) => tracer.before_attach.push(line),
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("{what} ended without attaching: {:?}", tracer.before_attach)
                }
                Err(RecvTimeoutError::Timeout) => panic!(
                    "{what} did not attach within {START_LIMIT:?}: {:?}",
                    tracer.before_attach
                ),
            }
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    /// The BPF programs and maps tcprtt holds open now.
    pub fn loaded(&self) -> Loaded {
        Loaded::held_by(self.pid())
    }

    /// Whether one of tcprtt's threads sleeps in a write to a pipe that has no room
    /// (its kernel wait channel is `pipe_write`, `anon_pipe_write` on newer kernels).
    pub fn blocked_writing_a_pipe(&self) -> bool {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{}/task", self.pid())) else {
            return false;
        };
        tasks.flatten().any(|task| {
            std::fs::read_to_string(task.path().join("wchan"))
                .is_ok_and(|wchan| wchan.trim().ends_with("pipe_write"))
        })
    }

    /// Whether tcprtt is still running (not yet exited).
    pub fn is_running(&mut self) -> bool {
        let child = self.child.as_mut().expect("not waited for");
        child.try_wait().expect("waiting for tcprtt").is_none()
    }

    /// Sends `signal` without waiting.
    pub fn signal(&self, signal: i32) {
        // SAFETY: signalling our own child by pid.
        let rc = unsafe { libc::kill(self.pid(), signal) };
        assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
    }

    /// Sends `signal` and waits for tcprtt to exit.
    pub fn stop_with(self, signal: i32) -> Finished {
        self.signal(signal);
        self.wait()
    }

    /// Waits (at most 30 s) for tcprtt to exit by itself.
    pub fn wait(self) -> Finished {
        self.wait_within(EXIT_LIMIT)
    }

    /// Waits for tcprtt to exit; fails the test (and kills it) after `limit`.
    pub fn wait_within(mut self, limit: Duration) -> Finished {
        let mut child = self.child.take().expect("running");
        let Some(status) = wait_for(&mut child, limit) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("tcprtt did not exit within {limit:?}");
        };
        let stdout =
            match std::mem::replace(&mut self.stdout, Stdout::Read(thread::spawn(String::new))) {
                Stdout::Read(reader) => reader.join().expect("stdout reader"),
                Stdout::Unread(mut pipe) => {
                    let mut s = String::new();
                    let _ = pipe.read_to_string(&mut s);
                    s
                }
            };
        // The reader thread may still hold lines written just before the exit: take them
        // all, up to the end of the pipe.
        let mut stderr = std::mem::take(&mut self.before_attach);
        stderr.push(std::mem::take(&mut self.attach_line));
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr_lines.recv_timeout(left) {
                Ok(line) => stderr.push(line),
                Err(_) => break,
            }
        }
        Finished {
            status,
            stdout,
            stderr: stderr.join("\n"),
        }
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
