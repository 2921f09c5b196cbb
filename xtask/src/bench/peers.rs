//! The benchmark's moving parts: the echo server and its placements on the CPUs, the
//! ping-pong and many-address clients, and tcprtt itself as a child process.

use std::{
    collections::BTreeSet,
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    sync::Mutex,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, ensure};
use rustix::{
    process::{Pid, Signal, kill_process},
    thread::{CpuSet, sched_setaffinity},
};
use socket2::{Domain, Socket, Type};

/// Keeps the calling thread on one CPU: a ping-pong whose two ends migrate between CPUs
/// varies by tens of percent from run to run on a 2-core VM; pinned, it is steady.
fn pin_to(cpu: usize) {
    let mut set = CpuSet::new();
    set.set(cpu);
    // Unpinned, the figures are only noisier; the benchmark still means something.
    let _ = sched_setaffinity(None, &set);
}

/// Where the two ends of the ping-pong run. The client is always on CPU 0.
pub struct Placement {
    pub name: &'static str,
    pub server: SocketAddr,
}

/// Across CPUs every message is a cross-CPU wake-up, and the receiving socket was last
/// written on the other CPU, so the program's first read of it misses the cache. On one
/// CPU the socket is cached and a transaction takes a few microseconds: the worst case
/// for the relative overhead.
pub fn placements() -> Result<[Placement; 2]> {
    Ok([
        Placement {
            name: "two CPUs",
            server: echo_server(1)?,
        },
        Placement {
            name: "one CPU",
            server: echo_server(0)?,
        },
    ])
}

/// A one-byte echo server on 127.0.0.1, one thread per connection, on the given CPU.
fn echo_server(cpu: usize) -> Result<SocketAddr> {
    let listener =
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding the echo server")?;
    let addr = listener.local_addr()?;
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { break };
            thread::spawn(move || {
                pin_to(cpu);
                let _ = conn.set_nodelay(true);
                let mut byte = [0u8; 1];
                while conn.read_exact(&mut byte).is_ok() && conn.write_all(&byte).is_ok() {}
            });
        }
    });
    Ok(addr)
}

fn connect(local: Ipv4Addr, server: SocketAddr) -> Result<TcpStream> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).context("client socket")?;
    socket.set_tcp_nodelay(true)?;
    socket
        .bind(&SocketAddr::new(local.into(), 0).into())
        .with_context(|| format!("binding the client to {local}"))?;
    socket
        .connect(&server.into())
        .with_context(|| format!("connecting to {server}"))?;
    Ok(socket.into())
}

/// One-byte ping-pong from a thread on CPU 0: `count` round trips, or as many as fit in
/// `window`. Returns the round trips done per second.
pub fn ping_pong(server: SocketAddr, count: usize, window: Duration) -> Result<f64> {
    thread::spawn(move || ping_pong_here(server, count, window))
        .join()
        .map_err(|_| anyhow!("ping-pong thread panicked"))?
}

fn ping_pong_here(server: SocketAddr, count: usize, window: Duration) -> Result<f64> {
    pin_to(0);
    let mut stream = connect(Ipv4Addr::LOCALHOST, server)?;
    let mut byte = [1u8];
    let start = Instant::now();
    let mut done = 0;
    while done < count && start.elapsed() < window {
        stream.write_all(&byte)?;
        stream.read_exact(&mut byte)?;
        done += 1;
    }
    Ok(done as f64 / start.elapsed().as_secs_f64())
}

/// One connection and one round trip from each of `keys` distinct client addresses in
/// 127.1.0.0/16.
pub fn many_clients(server: SocketAddr, keys: u32) -> Result<()> {
    let workers: Vec<_> = (0..2)
        .map(|worker| {
            thread::spawn(move || -> Result<()> {
                for i in (worker..keys).step_by(2) {
                    let local = Ipv4Addr::new(127, 1, (i / 250) as u8, (i % 250 + 1) as u8);
                    let mut s = connect(local, server)?;
                    let mut byte = [1u8];
                    s.write_all(&byte)?;
                    s.read_exact(&mut byte)?;
                }
                Ok(())
            })
        })
        .collect();
    for w in workers {
        w.join().map_err(|_| anyhow!("client thread panicked"))??;
    }
    Ok(())
}

/// Ids of the BPF programs every stopped tracer held, to check at the end that the kernel
/// freed them all.
static HELD: Mutex<BTreeSet<u32>> = Mutex::new(BTreeSet::new());

pub fn held_programs() -> BTreeSet<u32> {
    HELD.lock().map(|h| h.clone()).unwrap_or_default()
}

/// A running tcprtt, attached.
pub struct Tracer {
    child: Child,
    /// Time from exec to the "Tracing TCP RTT via" line.
    pub startup: Duration,
}

impl Tracer {
    pub fn start(bin: &Path, args: &[&str]) -> Result<Self> {
        let started = Instant::now();
        let mut child = Command::new(bin)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stderr = child.stderr.take().context("tcprtt's stderr")?;
        let mut lines = BufReader::new(stderr).lines();
        let line = lines.next().context("tcprtt exited before attaching")??;
        let startup = started.elapsed();
        ensure!(
            line.starts_with("Tracing TCP RTT via "),
            "tcprtt said: {line}"
        );
        // Keep draining stderr so tcprtt never blocks on it.
        thread::spawn(move || lines.for_each(drop));
        Ok(Self { child, startup })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Ids of the BPF programs it holds (its program and link file descriptors say),
    /// which tell its programs from those of any other tcprtt running on the host.
    pub fn program_ids(&self) -> Result<BTreeSet<u32>> {
        let dir = format!("/proc/{}/fdinfo", self.pid());
        let mut ids = BTreeSet::new();
        for entry in fs::read_dir(&dir).with_context(|| format!("listing {dir}"))? {
            // A descriptor closed meanwhile has nothing to say.
            let Ok(info) = fs::read_to_string(entry?.path()) else {
                continue;
            };
            ids.extend(
                info.lines()
                    .filter_map(|l| l.strip_prefix("prog_id:"))
                    .filter_map(|id| id.trim().parse::<u32>().ok()),
            );
        }
        Ok(ids)
    }

    /// Peak resident set size so far, in KiB.
    pub fn peak_rss_kib(&self) -> Result<u64> {
        let path = format!("/proc/{}/status", self.pid());
        let status = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("no VmHWM in {path}"))
    }

    /// SIGINT, then the report and the time from the signal to exit.
    pub fn stop(mut self) -> Result<(String, Duration)> {
        let mut stdout = self.child.stdout.take().context("tcprtt's stdout")?;
        let reader = thread::spawn(move || {
            let mut s = String::new();
            let _ = stdout.read_to_string(&mut s);
            s
        });
        let ids = self.program_ids()?;
        if let Ok(mut held) = HELD.lock() {
            held.extend(ids);
        }
        let signalled = Instant::now();
        // Our own child, not yet waited for, so the pid is still its.
        kill_process(Pid::from_child(&self.child), Signal::INT)
            .context("sending SIGINT to tcprtt")?;
        let status = self.child.wait().context("waiting for tcprtt")?;
        let took = signalled.elapsed();
        ensure!(status.success(), "tcprtt exited with {status}");
        Ok((reader.join().unwrap_or_default(), took))
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
