//! Helpers for tcprtt's end-to-end tests: run the built binary, drive real TCP traffic,
//! and read what it printed.
//!
//! Every process a helper starts is owned by a guard that ends it (by pid) when dropped,
//! so a failing or panicking test leaves nothing running.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    os::unix::process::CommandExt,
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use socket2::{Domain, Socket, Type};

pub mod testbed;

/// The binary under test: `$TCPRTT_BIN` (set by `cargo xtask test`), else the release build.
pub fn bin() -> PathBuf {
    let path = std::env::var_os("TCPRTT_BIN").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/tcprtt"),
        PathBuf::from,
    );
    assert!(
        path.exists(),
        "{} does not exist: build it with `cargo xtask build`",
        path.display()
    );
    path
}

/// What a finished tcprtt run left behind.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs tcprtt to completion (for runs that end by themselves: errors, `-d`).
pub fn run(args: &[&str]) -> Finished {
    let out = Command::new(bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running tcprtt");
    Finished {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A running tcprtt, attached and tracing. Killed on drop unless it was waited for.
pub struct Tracer {
    child: Option<Child>,
    stderr_lines: mpsc::Receiver<String>,
    pub attach_line: String,
    stdout: thread::JoinHandle<String>,
}

impl Tracer {
    /// Starts tcprtt with `args` and returns once it says it is tracing.
    pub fn start(args: &[&str]) -> Self {
        let mut command = Command::new(bin());
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
        let mut child = command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting tcprtt");
        let mut out = child.stdout.take().expect("stdout");
        let stdout = thread::spawn(move || {
            let mut s = String::new();
            let _ = out.read_to_string(&mut s);
            s
        });
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
            attach_line: String::new(),
            stdout,
        };
        match tracer.stderr_lines.recv_timeout(Duration::from_secs(20)) {
            Ok(line) if line.starts_with("Tracing TCP RTT via ") => {
                tracer.attach_line = line;
                tracer
            }
            Ok(line) => panic!("tcprtt {args:?} said {line:?} instead of attaching"),
            Err(_) => panic!("tcprtt {args:?} did not attach within 20 s"),
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    /// Sends `signal` and waits for tcprtt to exit.
    pub fn stop_with(self, signal: i32) -> Finished {
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(self.pid(), signal) };
        self.wait()
    }

    /// Waits (at most 30 s) for tcprtt to exit by itself.
    pub fn wait(mut self) -> Finished {
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = child.try_wait().expect("waiting for tcprtt") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("tcprtt did not exit within 30 s");
            }
            thread::sleep(Duration::from_millis(20));
        };
        let stdout = std::mem::replace(&mut self.stdout, thread::spawn(String::new))
            .join()
            .expect("stdout reader");
        let stderr: Vec<String> = self.stderr_lines.try_iter().collect();
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

/// A one-byte echo server on `addr` (port 0: any free port), in a thread of its own.
pub struct EchoServer {
    pub addr: SocketAddr,
}

impl EchoServer {
    pub fn start(ip: IpAddr, port: u16) -> Self {
        let listener = TcpListener::bind((ip, port)).expect("binding the echo server");
        let addr = listener.local_addr().expect("server address");
        thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { break };
                thread::spawn(move || {
                    let mut byte = [0u8; 1];
                    while conn.read_exact(&mut byte).is_ok() {
                        if conn.write_all(&byte).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        Self { addr }
    }
}

/// Opens a connection from `local` (port 0: any) to `server` and does `round_trips`
/// one-byte request/response exchanges, then closes it.
pub fn ping_pong(local: SocketAddr, server: SocketAddr, round_trips: usize) {
    let domain = if server.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let socket = Socket::new(domain, Type::STREAM, None).expect("client socket");
    socket.set_tcp_nodelay(true).expect("TCP_NODELAY");
    socket.bind(&local.into()).expect("binding the client");
    socket
        .connect(&server.into())
        .expect("connecting to the echo server");
    let mut stream: TcpStream = socket.into();
    let mut byte = [7u8; 1];
    for _ in 0..round_trips {
        stream.write_all(&byte).expect("request");
        stream.read_exact(&mut byte).expect("response");
    }
}

/// The same as [`ping_pong`] on `connections` parallel connections.
pub fn ping_pong_parallel(
    local: SocketAddr,
    server: SocketAddr,
    connections: usize,
    round_trips: usize,
) {
    let workers: Vec<_> = (0..connections)
        .map(|_| thread::spawn(move || ping_pong(local, server, round_trips)))
        .collect();
    for w in workers {
        w.join().expect("traffic thread");
    }
}

/// `ip` (IPv4 or IPv6 text) and `port` as a socket address.
pub fn sock_addr(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().expect("an IP address"), port)
}

/// The labels of the histograms in tcprtt's text output, in order.
pub fn labels(text: &str) -> Vec<String> {
    parse_histograms(text)
        .into_iter()
        .map(|h| h.label)
        .collect()
}

/// One histogram as printed: its label, average, and `low -> high : count` rows.
#[derive(Debug, Clone, PartialEq)]
pub struct Printed {
    pub label: String,
    pub avg: f64,
    pub rows: Vec<(u64, u64, u64)>,
    /// The `-e` line, when present.
    pub extension: Option<String>,
}

impl Printed {
    pub fn count(&self) -> u64 {
        self.rows.iter().map(|r| r.2).sum()
    }

    /// Samples in rows whose range lies within `low..=high`.
    pub fn count_within(&self, low: u64, high: u64) -> u64 {
        self.rows
            .iter()
            .filter(|r| r.0 >= low && r.1 <= high)
            .map(|r| r.2)
            .sum()
    }

    /// A `name value` field of the `-e` line, e.g. `count` or `max`.
    pub fn extension_field(&self, name: &str) -> Option<u64> {
        let ext = self.extension.as_ref()?;
        let mut words = ext.split_whitespace();
        while let Some(w) = words.next() {
            if w == name {
                return words.next()?.trim_start_matches('~').parse().ok();
            }
        }
        None
    }
}

/// Parses every histogram in tcprtt's text output.
pub fn parse_histograms(text: &str) -> Vec<Printed> {
    let mut out: Vec<Printed> = Vec::new();
    for line in text.lines() {
        if let Some((label, rest)) = line.split_once(" [AVG ") {
            out.push(Printed {
                label: label.to_string(),
                avg: rest.trim_end_matches(']').parse().expect("AVG value"),
                rows: Vec::new(),
                extension: None,
            });
        } else if line.starts_with("count ") {
            out.last_mut().expect("-e line after a histogram").extension = Some(line.to_string());
        } else if let Some((range, rest)) = line.split_once(" : ")
            && let Some((low, high)) = range.split_once(" -> ")
        {
            let count = rest.split_whitespace().next().expect("count column");
            out.last_mut().expect("row after a label").rows.push((
                low.trim().parse().expect("low"),
                high.trim().parse().expect("high"),
                count.parse().expect("count"),
            ));
        }
    }
    out
}
