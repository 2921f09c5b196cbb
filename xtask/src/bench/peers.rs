//! The benchmark's moving parts: the echo servers, the ping-pong and many-key clients, and
//! a tracer (tcprtt, the C peer or bpftrace) as a child process.

use std::{
    collections::BTreeSet,
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::{Child, ChildStdout, Command, Stdio},
    sync::{
        Mutex,
        mpsc::{self, Receiver},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail, ensure};
use rustix::{
    process::{Pid, Signal, kill_process},
    thread::{CpuSet, sched_setaffinity},
};
use socket2::{Domain, Socket, Type};

use super::SETTLE;

/// Keeps the calling thread on one CPU: a ping-pong whose two ends migrate between CPUs
/// varies by tens of percent from run to run on a 2-core VM; pinned, it is steady.
fn pin_to(cpu: usize) {
    let mut set = CpuSet::new();
    set.set(cpu);
    // Unpinned, the figures are only noisier; the benchmark still means something.
    let _ = sched_setaffinity(None, &set);
}

/// A one-byte echo server on 127.0.0.1, one thread per connection pinned to CPU 1, so
/// that every message of a ping-pong from CPU 0 is a cross-CPU wake-up, as between a
/// client and a server on a real host.
pub fn echo_server(cpu: usize) -> Result<SocketAddr> {
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

/// An echo server for short connections: two threads that each accept, answer one byte
/// and wait for the client's reset. A thread per connection could not keep up with
/// thousands of connections a second.
pub fn one_shot_server(ip: Ipv4Addr) -> Result<SocketAddr> {
    let listener = TcpListener::bind((ip, 0)).context("binding the one-shot server")?;
    let addr = listener.local_addr()?;
    for _ in 0..2 {
        let listener = listener
            .try_clone()
            .context("sharing the one-shot listener")?;
        thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { break };
                let mut byte = [0u8; 1];
                if conn.read_exact(&mut byte).is_ok() && conn.write_all(&byte).is_ok() {
                    let _ = conn.read(&mut byte);
                }
            }
        });
    }
    Ok(addr)
}

fn connect(local: Ipv4Addr, server: SocketAddr) -> Result<TcpStream> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).context("client socket")?;
    socket.set_tcp_nodelay(true)?;
    // Closing with a reset leaves no TIME_WAIT socket behind, however many connections.
    socket.set_linger(Some(Duration::ZERO))?;
    socket
        .bind(&SocketAddr::new(local.into(), 0).into())
        .with_context(|| format!("binding the client to {local}"))?;
    socket
        .connect(&server.into())
        .with_context(|| format!("connecting to {server}"))?;
    Ok(socket.into())
}

/// One-byte ping-pong from a thread on CPU 0: `count` round trips.
pub fn ping_pong(server: SocketAddr, count: usize) -> Result<()> {
    thread::spawn(move || -> Result<()> {
        pin_to(0);
        let mut stream = connect(Ipv4Addr::LOCALHOST, server)?;
        let mut byte = [1u8];
        for _ in 0..count {
            stream.write_all(&byte)?;
            stream.read_exact(&mut byte)?;
        }
        Ok(())
    })
    .join()
    .map_err(|_| anyhow!("ping-pong thread panicked"))?
}

/// The address of the `i`-th distinct client, from 127.1.0.1 on (client 9,000,000 is
/// 127.145.0.1), avoiding the .0 and .255 host parts.
fn client_addr(i: u32) -> Ipv4Addr {
    let [a, b, c] = [1 + i / 62_500, (i / 250) % 250, i % 250 + 1];
    Ipv4Addr::new(127, a as u8, b as u8, c as u8)
}

/// Connections from clients `first..first + count` (each its own address), one round trip
/// each, from two threads, at most `rate` connections a second in all (`None`: as fast as
/// they go). Returns the connections made per second.
pub fn clients(server: SocketAddr, first: u32, count: u32, rate: Option<f64>) -> Result<f64> {
    let start = Instant::now();
    let workers: Vec<_> = (0..2)
        .map(|worker| {
            thread::spawn(move || -> Result<()> {
                let gap = rate.map(|r| Duration::from_secs_f64(2.0 / r));
                let mut next = Instant::now();
                for i in (first + worker..first + count).step_by(2) {
                    if let Some(gap) = gap {
                        let now = Instant::now();
                        if next > now {
                            thread::sleep(next - now);
                        }
                        // A worker that falls behind catches up by at most 5 ms, so no
                        // one second ever sees much more than `rate` new keys.
                        let floor = now.checked_sub(Duration::from_millis(5)).unwrap_or(now);
                        next = next.max(floor) + gap;
                    }
                    let mut s = connect(client_addr(i), server)?;
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
    Ok(f64::from(count) / start.elapsed().as_secs_f64())
}

/// Ids of the programs every stopped tracer held, to check at the end that the kernel
/// freed them all.
static HELD: Mutex<BTreeSet<u32>> = Mutex::new(BTreeSet::new());

pub fn held_programs() -> BTreeSet<u32> {
    HELD.lock().map(|h| h.clone()).unwrap_or_default()
}

/// How a tracer says it is attached: the start of a line on stderr, or on stdout.
pub struct Ready {
    pub line: &'static str,
    pub on_stdout: bool,
}

/// A running tracer, attached.
pub struct Tracer {
    child: Child,
    /// Time from exec to its ready line.
    pub startup: Duration,
    /// Its program on the hook, as the kernel numbers it.
    pub prog_id: u32,
    /// Its standard output, a line at a time.
    pub lines: Receiver<String>,
    stderr: Option<JoinHandle<String>>,
}

impl Tracer {
    pub fn start(bin: &Path, args: &[String], ready: &Ready) -> Result<Self> {
        let started = Instant::now();
        let mut child = Command::new(bin)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let name = bin.file_name().unwrap_or_default().to_string_lossy();
        match attached(&mut child, ready, &name) {
            Ok((lines, stderr)) => {
                let mut tracer = Self {
                    child,
                    startup: started.elapsed(),
                    prog_id: 0,
                    lines,
                    stderr: Some(stderr),
                };
                // On an error the tracer is dropped, which ends the child.
                tracer.prog_id = tracing_program(tracer.child.id())?;
                thread::sleep(SETTLE);
                Ok(tracer)
            }
            Err(e) => {
                // A child that never attached would otherwise live on after us.
                let _ = child.kill();
                let _ = child.wait();
                Err(e)
            }
        }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A `/proc/PID/status` memory field in KiB: `VmHWM` (peak resident set size so
    /// far) or `VmRSS` (resident now).
    pub fn status_kib(&self, field: &str) -> Result<u64> {
        let path = format!("/proc/{}/status", self.child.id());
        let status = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("no {field} in {path}"))
    }

    /// SIGINT, then what it printed on stdout since `lines` was last read.
    pub fn stop(mut self) -> Result<String> {
        if let Ok(mut held) = HELD.lock() {
            held.insert(self.prog_id);
        }
        interrupt_and_wait(&mut self.child, self.stderr.take(), "the tracer")?;
        let mut out = String::new();
        for line in self.lines.iter() {
            out.push_str(&line);
            out.push('\n');
        }
        Ok(out)
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

/// Waits for the ready line, then keeps reading both streams: stdout a line at a time,
/// stderr into one string.
pub fn attached(
    child: &mut Child,
    ready: &Ready,
    name: &str,
) -> Result<(Receiver<String>, JoinHandle<String>)> {
    let mut stdout = BufReader::new(child.stdout.take().context("the tracer's stdout")?);
    let mut stderr = BufReader::new(child.stderr.take().context("the tracer's stderr")?);
    if ready.on_stdout {
        wait_for(&mut stdout, ready.line, name)?;
    } else {
        wait_for(&mut stderr, ready.line, name)?;
    }
    let (tx, lines) = mpsc::channel();
    forward(stdout, tx);
    Ok((lines, thread::spawn(move || read_all(stderr))))
}

/// Reads lines until one starts with `ready`; what came before it is the error if the
/// stream ends first.
fn wait_for(stream: &mut impl BufRead, ready: &str, name: &str) -> Result<()> {
    let mut seen = Vec::new();
    loop {
        let mut line = String::new();
        if stream.read_line(&mut line)? == 0 {
            bail!("{name} exited before attaching: {}", seen.join(" / "));
        }
        if line.starts_with(ready) {
            return Ok(());
        }
        seen.push(line.trim().to_string());
    }
}

fn read_all(mut stream: impl Read) -> String {
    let mut s = String::new();
    let _ = stream.read_to_string(&mut s);
    s
}

/// Keeps reading stdout so the tracer never blocks on a full pipe.
fn forward(stdout: BufReader<ChildStdout>, tx: mpsc::Sender<String>) {
    thread::spawn(move || {
        for line in stdout.lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
}

/// The id of the one tracing program (tp_btf, fentry or classic tracepoint) that process
/// `pid` holds, waiting up to 5 s for it to appear. Found through the process's file
/// descriptors, so other tracers running on the host do not matter.
fn tracing_program(pid: u32) -> Result<u32> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let ids = program_ids(pid, &TRACING_TYPES)?;
        match ids.as_slice() {
            [id] => return Ok(*id),
            [] if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
            [] => bail!("process {pid} holds no tracing program after 5 s"),
            more => bail!("process {pid} holds several tracing programs: {more:?}"),
        }
    }
}

/// BPF_PROG_TYPE_TRACEPOINT, BPF_PROG_TYPE_RAW_TRACEPOINT, BPF_PROG_TYPE_TRACING.
const TRACING_TYPES: [&str; 3] = ["5", "17", "26"];

/// Ids of the programs of these types (`prog_type` in fdinfo) among a process's file
/// descriptors.
pub fn program_ids(pid: u32, types: &[&str]) -> Result<Vec<u32>> {
    let dir = format!("/proc/{pid}/fd");
    let mut ids = Vec::new();
    for entry in fs::read_dir(&dir).with_context(|| format!("listing {dir}"))? {
        let entry = entry?;
        if fs::read_link(entry.path()).is_ok_and(|l| l.as_os_str() == "anon_inode:bpf-prog") {
            let info = format!("/proc/{pid}/fdinfo/{}", entry.file_name().to_string_lossy());
            let text = fs::read_to_string(&info).with_context(|| format!("reading {info}"))?;
            let field = |name: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(name))
                    .map(str::trim)
            };
            if field("prog_type:").is_some_and(|t| types.contains(&t))
                && let Some(id) = field("prog_id:").and_then(|i| i.parse().ok())
                && !ids.contains(&id)
            {
                ids.push(id);
            }
        }
    }
    Ok(ids)
}

/// Clock ticks per second of `/proc/PID/stat`'s CPU times (`USER_HZ`, 100 on Linux).
const USER_HZ: f64 = 100.0;

/// CPU seconds (user and system) process `pid` has used so far, in 10 ms ticks.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let stat = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // Fields after the command name, which may hold spaces: state is the first, utime
    // the twelfth and stime the thirteenth.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| -> Result<f64> {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .map(|t| t as f64 / USER_HZ)
            .with_context(|| format!("no CPU times in {path}"))
    };
    Ok(ticks(11)? + ticks(12)?)
}

/// How long a tracer may take to print its report and detach after SIGINT. bpftrace has
/// been seen to hang there; a benchmark that waits forever reports nothing.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// SIGINT to `child`, our own and not yet waited for (so the pid is still its), then its
/// exit within [`STOP_TIMEOUT`]; one other than success is an error carrying what it said
/// on stderr.
pub fn interrupt_and_wait(
    child: &mut Child,
    stderr: Option<thread::JoinHandle<String>>,
    what: &str,
) -> Result<()> {
    kill_process(Pid::from_child(child), Signal::INT)
        .with_context(|| format!("sending SIGINT to {what}"))?;
    let deadline = Instant::now() + STOP_TIMEOUT;
    let status = loop {
        if let Some(status) = child
            .try_wait()
            .with_context(|| format!("waiting for {what}"))?
        {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{what} did not exit within {STOP_TIMEOUT:?} of SIGINT; killed it");
        }
        thread::sleep(Duration::from_millis(10));
    };
    let stderr = stderr.and_then(|t| t.join().ok()).unwrap_or_default();
    ensure!(
        status.success(),
        "{what} exited with {status}: {}",
        stderr.trim()
    );
    Ok(())
}
