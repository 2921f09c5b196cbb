//! tcprtt's output streams when their reader goes away or they cannot be written.

use std::{
    fs::File,
    io::{BufRead, BufReader, Read},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use tcprtt_tests::kit::{EchoServer, bin, ping_pong, sock_addr, wait_for};

/// Waits for a tcprtt whose output goes where no reader could tell when it is done.
fn exit_within(mut child: Child, limit: Duration) -> ExitStatus {
    wait_for(&mut child, limit).unwrap_or_else(|| {
        let _ = child.kill();
        let _ = child.wait();
        panic!("tcprtt did not exit within {limit:?}")
    })
}

fn dev_full() -> File {
    File::options()
        .write(true)
        .open("/dev/full")
        .expect("/dev/full")
}

#[test]
fn a_closed_pipe_ends_the_run_quietly() {
    let srv = EchoServer::on("127.3.6.1");
    let mut child = Command::new(bin())
        .args(["-i", "0.2", "-d", "20"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    ping_pong(sock_addr("127.3.6.2", 0), srv.addr, 50);
    // Read one line, then close our end, as `| head -1` does.
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 1];
    std::io::Read::read_exact(&mut stdout, &mut first).unwrap();
    drop(stdout);
    let started = Instant::now();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("panicked") && !stderr.contains("error"),
        "{stderr}"
    );
}

/// A usage error is still exit 2 when the message cannot be written (ENOSPC), for
/// errors found by the argument parser and by tcprtt's own checks alike.
#[test]
fn a_usage_error_with_stderr_on_a_full_device_still_exits_2() {
    let wrong: Vec<String> = [
        &["--no-such-flag"][..],
        &["--top", "3"],
        &["--raddr", "1.1.1"],
    ]
    .iter()
    .filter_map(|args| {
        let child = Command::new(bin())
            .args(*args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(dev_full())
            .spawn()
            .expect("starting tcprtt");
        let status = exit_within(child, Duration::from_secs(5));
        (status.code() != Some(2)).then(|| format!("{args:?}: {status:?}"))
    })
    .collect();
    assert!(wrong.is_empty(), "{wrong:#?}");
}

/// `tcprtt -v -d 2 2>&1 | head -1`: the reader takes the "Tracing" line and goes away;
/// the report and the -v line then meet a closed pipe, which ends the run quietly.
#[test]
fn stdout_and_stderr_on_one_pipe_closed_after_one_line_exit_0() {
    let (reader, writer) = std::io::pipe().expect("a pipe");
    let mut command = Command::new(bin());
    command
        .args(["-v", "-d", "2"])
        .stdin(Stdio::null())
        .stdout(writer.try_clone().expect("cloning the pipe"))
        .stderr(writer);
    let child = command.spawn().expect("starting tcprtt");
    // Only tcprtt may hold the write end, or the reader never sees its end.
    drop(command);
    let mut first = String::new();
    BufReader::new(reader)
        .read_line(&mut first)
        .expect("reading the first line");
    assert!(first.starts_with("Tracing TCP RTT"), "{first:?}");
    let status = exit_within(child, Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "{status:?}");
}

#[test]
fn stdout_on_a_full_device_is_a_runtime_error() {
    let mut child = Command::new(bin())
        .args(["-d", "0.5"])
        .stdin(Stdio::null())
        .stdout(dev_full())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting tcprtt");
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .expect("reading stderr");
    let status = exit_within(child, Duration::from_secs(10));
    assert_eq!(status.code(), Some(1), "{status:?}: {stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(last.starts_with("tcprtt: error: "), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
