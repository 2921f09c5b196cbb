//! tcprtt's output streams when their reader goes away or they cannot be written.

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use tcprtt_tests::kit::{EchoServer, ping_pong, sock_addr};

#[test]
fn a_closed_pipe_ends_the_run_quietly() {
    let srv = EchoServer::on("127.3.6.1");
    let mut child = Command::new(tcprtt_tests::kit::bin())
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
