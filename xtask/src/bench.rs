//! `cargo xtask bench`: what tcprtt costs the host, measured side by side with the floor
//! (an empty program on the same hook) in the same run, and written to BENCHMARKS.md.
//!
//! Absolute times on a shared 2-core VM drift from minute to minute, so every headline
//! figure is a ratio of two things measured together, and each is the median of rounds
//! that alternate between the things compared.

use std::{
    fmt::Write as _,
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use aya::{
    Btf, Ebpf, EbpfLoader,
    programs::{BtfTracePoint, loaded_programs},
};
use socket2::{Domain, Socket, Type};

const ROUNDS: usize = 5;
/// Round trips per cost sample: enough events (two per round trip) to average out the
/// clock reads, little enough to keep a round near a second.
const COST_ROUND_TRIPS: usize = 20_000;
/// Length of one transactions-per-second sample, and how many pairs of samples.
const TPS_WINDOW: Duration = Duration::from_secs(1);
const TPS_PAIRS: usize = 15;
const SCALE_KEYS: u32 = 10_000;

/// Median and spread of a set of samples.
#[derive(Clone, Copy, Debug)]
struct Stat {
    median: f64,
    min: f64,
    max: f64,
}

fn stat(mut samples: Vec<f64>) -> Stat {
    samples.sort_by(f64::total_cmp);
    let n = samples.len();
    let median = if n % 2 == 1 {
        samples[n / 2]
    } else {
        (samples[n / 2 - 1] + samples[n / 2]) / 2.0
    };
    Stat {
        median,
        min: samples[0],
        max: samples[n - 1],
    }
}

impl Stat {
    fn show(&self, decimals: usize) -> String {
        format!(
            "{:.d$} ({:.d$}–{:.d$})",
            self.median,
            self.min,
            self.max,
            d = decimals
        )
    }
}

/// Keeps the calling thread on one CPU: a ping-pong whose two ends migrate between CPUs
/// varies by tens of percent from run to run on a 2-core VM; pinned, it is steady.
fn pin_to(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is empty; CPU_SET and sched_setaffinity only touch it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// A one-byte echo server on loopback, one thread per connection, on the second CPU.
fn echo_server(ip: Ipv4Addr) -> Result<SocketAddr> {
    let listener = TcpListener::bind((ip, 0)).context("binding the echo server")?;
    let addr = listener.local_addr()?;
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { break };
            thread::spawn(move || {
                pin_to(1);
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

/// One-byte ping-pong from a thread on the first CPU: `count` round trips, or as many as
/// fit in `window`. Returns the round trips done and the time they took.
fn ping_pong(server: SocketAddr, count: usize, window: Duration) -> Result<(usize, Duration)> {
    thread::spawn(move || ping_pong_here(server, count, window))
        .join()
        .map_err(|_| anyhow::anyhow!("ping-pong thread panicked"))?
}

fn ping_pong_here(server: SocketAddr, count: usize, window: Duration) -> Result<(usize, Duration)> {
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
    Ok((done, start.elapsed()))
}

/// A running tcprtt, attached.
struct Tracer {
    child: Child,
    /// Time from exec to the "Tracing TCP RTT via" line.
    startup: Duration,
}

impl Tracer {
    fn start(bin: &Path, args: &[&str]) -> Result<Self> {
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

    /// Peak resident set size so far, in KiB.
    fn peak_rss_kib(&self) -> Result<u64> {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .context("no VmHWM in /proc/<pid>/status")
    }

    /// SIGINT, then the report and the time from the signal to exit.
    fn stop(mut self) -> Result<(String, Duration)> {
        let mut stdout = self.child.stdout.take().context("tcprtt's stdout")?;
        let reader = thread::spawn(move || {
            let mut s = String::new();
            let _ = stdout.read_to_string(&mut s);
            s
        });
        let signalled = Instant::now();
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(self.pid() as i32, libc::SIGINT) };
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

/// Cumulative (run time in ns, run count) of the loaded program with this name.
fn program_stats(name: &str) -> Result<(u64, u64)> {
    let mut found = None;
    for info in loaded_programs() {
        let info = info.context("listing loaded BPF programs")?;
        if info.name_as_str() == Some(name) {
            ensure!(
                found.is_none(),
                "more than one program named {name} is loaded"
            );
            found = Some((info.run_time().as_nanos() as u64, info.run_count()));
        }
    }
    found.with_context(|| format!("no program named {name} is loaded"))
}

/// The eBPF object of the newest release build.
fn newest_object(root: &Path) -> Result<PathBuf> {
    let build = root.join("target/release/build");
    let mut newest: Option<(std::time::SystemTime, PathBuf)> = None;
    for entry in fs::read_dir(&build).with_context(|| format!("listing {}", build.display()))? {
        let path = entry?.path().join("out/tcprtt");
        if let Ok(modified) = fs::metadata(&path).and_then(|m| m.modified())
            && newest.as_ref().is_none_or(|(t, _)| modified > *t)
        {
            newest = Some((modified, path));
        }
    }
    newest
        .map(|(_, p)| p)
        .context("no eBPF object under target/release/build: run `cargo xtask build`")
}

/// The empty program, attached to tp_btf/tcp_probe: the cost floor of any program there.
fn attach_empty(object: &Path) -> Result<Ebpf> {
    let btf = Btf::from_sys_fs().context("reading the kernel's BTF")?;
    let bytes = fs::read(object).with_context(|| format!("reading {}", object.display()))?;
    let mut ebpf = EbpfLoader::new()
        .btf(Some(&btf))
        .load(&bytes)
        .context("loading the eBPF object")?;
    let prog: &mut BtfTracePoint = ebpf
        .program_mut("tcprtt_empty")
        .context("no tcprtt_empty program in the object")?
        .try_into()?;
    prog.load("tcp_probe", &btf)
        .context("loading tcprtt_empty")?;
    prog.attach().context("attaching tcprtt_empty")?;
    Ok(ebpf)
}

struct Mode {
    name: &'static str,
    args: &'static [&'static str],
}

const MODES: [Mode; 3] = [
    Mode {
        name: "default (all traffic)",
        args: &[],
    },
    Mode {
        name: "`--by-raddr`",
        args: &["--by-raddr"],
    },
    Mode {
        name: "filters rejecting the traffic (`-A 203.0.113.0/24 -p 9`)",
        args: &["-A", "203.0.113.0/24", "-p", "9"],
    },
];

/// Per-event cost of tcprtt's program and of the empty one over the same events.
fn cost_round(bin: &Path, args: &[&str], server: SocketAddr) -> Result<(f64, f64)> {
    let tracer = Tracer::start(bin, args)?;
    let (t0, n0) = program_stats("tcprtt_tp_btf")?;
    let (e0, m0) = program_stats("tcprtt_empty")?;
    ping_pong(server, COST_ROUND_TRIPS, Duration::from_secs(30))?;
    let (t1, n1) = program_stats("tcprtt_tp_btf")?;
    let (e1, m1) = program_stats("tcprtt_empty")?;
    tracer.stop()?;
    ensure!(n1 > n0 && m1 > m0, "no events seen");
    Ok((
        (t1 - t0) as f64 / (n1 - n0) as f64,
        (e1 - e0) as f64 / (m1 - m0) as f64,
    ))
}

/// `bytes_memlock` of every map tcprtt's program uses, per bpftool.
fn map_memory(prog_name: &str) -> Result<(u64, Vec<(String, u64)>)> {
    let out = Command::new("bpftool")
        .args(["prog", "show", "name", prog_name])
        .output()
        .context("running bpftool prog show")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let ids = text
        .split("map_ids ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .context("no map_ids in bpftool's output")?;
    let mut total = 0;
    let mut maps = Vec::new();
    for id in ids.split(',') {
        let out = Command::new("bpftool")
            .args(["map", "show", "id", id])
            .output()
            .context("running bpftool map show")?;
        let text = String::from_utf8_lossy(&out.stdout);
        let name = text
            .split(" name ")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .unwrap_or("?")
            .to_string();
        let bytes: u64 = text
            .split("memlock ")
            .nth(1)
            .and_then(|s| s.trim_start().split('B').next())
            .and_then(|s| s.trim().parse().ok())
            .with_context(|| format!("no memlock for map {id}: {text}"))?;
        total += bytes;
        maps.push((name, bytes));
    }
    Ok((total, maps))
}

/// One round trip from each of `keys` distinct client addresses in 127.1.0.0/16.
fn many_clients(server: SocketAddr, keys: u32) -> Result<()> {
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
        w.join()
            .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
    }
    Ok(())
}

fn sh(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

pub fn run(root: &Path) -> Result<()> {
    let bin = root.join("target/release/tcprtt");
    let object = newest_object(root)?;
    if let Some(stale) = loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.name_as_str().is_some_and(|n| n.starts_with("tcprtt_")))
    {
        bail!(
            "a tcprtt program (id {}) is already loaded; stop it before benchmarking",
            stale.id()
        );
    }
    let server = echo_server(Ipv4Addr::LOCALHOST)?;
    // Run-time statistics stay on while this fd is open.
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .context("enabling BPF run-time statistics")?;

    eprintln!("bench: in-kernel cost per event ({ROUNDS} rounds per mode, alternating)");
    let mut cost: Vec<(Vec<f64>, Vec<f64>, Vec<f64>)> = vec![Default::default(); MODES.len()];
    {
        let _empty = attach_empty(&object)?;
        for _ in 0..ROUNDS {
            for (mode, samples) in MODES.iter().zip(cost.iter_mut()) {
                let (ours, floor) = cost_round(&bin, mode.args, server)?;
                samples.0.push(ours);
                samples.1.push(floor);
                samples.2.push(ours / floor);
            }
        }
    }

    eprintln!("bench: transactions per second with and without tcprtt ({TPS_PAIRS} pairs)");
    let (mut without, mut with, mut overhead) = (Vec::new(), Vec::new(), Vec::new());
    for pair in 0..TPS_PAIRS {
        // Alternate which run goes first, so a drift in the machine's speed does not
        // always count against the same side.
        let mut base = 0.0;
        let mut traced = 0.0;
        for traced_run in [pair % 2 == 1, pair % 2 == 0] {
            if traced_run {
                let tracer = Tracer::start(&bin, &[])?;
                let (n, t) = ping_pong(server, usize::MAX, TPS_WINDOW)?;
                tracer.stop()?;
                traced = n as f64 / t.as_secs_f64();
            } else {
                let (n, t) = ping_pong(server, usize::MAX, TPS_WINDOW)?;
                base = n as f64 / t.as_secs_f64();
            }
        }
        without.push(base);
        with.push(traced);
        overhead.push((base - traced) / base * 100.0);
    }
    let noise: Vec<f64> = without
        .windows(2)
        .map(|w| (w[1] - w[0]).abs() / w[0] * 100.0)
        .collect();

    eprintln!("bench: start-up, shut-down and memory ({ROUNDS} rounds)");
    let (mut startup, mut shutdown, mut rss) = (Vec::new(), Vec::new(), Vec::new());
    let mut memory = (0, Vec::new());
    for round in 0..ROUNDS {
        let tracer = Tracer::start(&bin, &["--by-raddr"])?;
        startup.push(tracer.startup.as_secs_f64() * 1000.0);
        ping_pong(server, 1000, Duration::from_secs(10))?;
        rss.push(tracer.peak_rss_kib()? as f64);
        if round == 0 {
            memory = map_memory("tcprtt_tp_btf")?;
        }
        let (_, took) = tracer.stop()?;
        shutdown.push(took.as_secs_f64() * 1000.0);
    }

    eprintln!("bench: {SCALE_KEYS} remote addresses with --by-raddr");
    let (mut scale_cost, mut scale_report, mut scale_memory) = (Vec::new(), Vec::new(), 0);
    let mut scale_no_memory = Vec::new();
    let mut scale_keys = 0;
    for round in 0..3 {
        let tracer = Tracer::start(&bin, &["--by-raddr"])?;
        let (t0, n0) = program_stats("tcprtt_tp_btf")?;
        many_clients(server, SCALE_KEYS)?;
        let (t1, n1) = program_stats("tcprtt_tp_btf")?;
        if round == 0 {
            scale_memory = map_memory("tcprtt_tp_btf")?.0;
        }
        let (report, took) = tracer.stop()?;
        ensure!(
            !report.contains("distinct keys (raise --max-keys)"),
            "samples dropped below --max-keys: {}",
            report.lines().last().unwrap_or_default()
        );
        scale_no_memory.push(warning_count(&report, "new keys arrived faster") as f64);
        // Clients plus the server's own address, less any key whose only samples the
        // kernel's allocator could not take (reported in the row below).
        scale_keys = report.matches("Remote Address = ").count();
        scale_cost.push((t1 - t0) as f64 / (n1 - n0) as f64);
        scale_report.push(took.as_secs_f64() * 1000.0);
    }

    let markdown = render(&Results {
        cost: cost
            .into_iter()
            .map(|(a, b, c)| (stat(a), stat(b), stat(c)))
            .collect(),
        tps_without: stat(without),
        tps_with: stat(with),
        overhead: stat(overhead),
        noise: stat(noise),
        startup: stat(startup),
        shutdown: stat(shutdown),
        rss: stat(rss),
        memory,
        scale_cost: stat(scale_cost),
        scale_report: stat(scale_report),
        scale_memory,
        scale_keys,
        scale_no_memory: stat(scale_no_memory),
    });
    fs::write(root.join("BENCHMARKS.md"), &markdown).context("writing BENCHMARKS.md")?;
    print!("{markdown}");
    Ok(())
}

struct Results {
    cost: Vec<(Stat, Stat, Stat)>,
    tps_without: Stat,
    tps_with: Stat,
    overhead: Stat,
    noise: Stat,
    startup: Stat,
    shutdown: Stat,
    rss: Stat,
    memory: (u64, Vec<(String, u64)>),
    scale_cost: Stat,
    scale_report: Stat,
    scale_memory: u64,
    scale_keys: usize,
    scale_no_memory: Stat,
}

/// N of a report's `WARNING: N samples dropped: <reason>` line, 0 without one.
fn warning_count(report: &str, reason: &str) -> u64 {
    report
        .lines()
        .filter(|l| l.contains(reason))
        .find_map(|l| l.strip_prefix("WARNING: ")?.split(' ').next()?.parse().ok())
        .unwrap_or(0)
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "**missed**" }
}

fn render(r: &Results) -> String {
    let cpu = sh(
        "sh",
        &["-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"],
    );
    let mut md = String::from("# Benchmarks\n\n");
    let _ = writeln!(
        md,
        "Measured by `cargo xtask bench` (as root) on {} ({} cores), Linux {}, {} UTC.\n\
         Every figure is the median of {ROUNDS} rounds (3 for the scale test), with the \
         range (min–max) in parentheses. Rounds alternate between the things compared.\n\
         Reproduce: `cargo xtask bench` (it rewrites this file).\n",
        cpu.trim(),
        sh("nproc", &[]),
        sh("uname", &["-r"]),
        sh("date", &["-u", "+%Y-%m-%d %H:%M"]),
    );
    md.push_str("## In-kernel cost per event\n\n");
    md.push_str(
        "tcprtt's program and an empty program (`tcprtt_empty`, which returns at once) are \
         attached to `tp_btf/tcp_probe` at the same time, so both run on the same segments; \
         the kernel's run-time statistics give each one's time per run. Traffic: \
         one-byte ping-pong on loopback, 20,000 round trips per round.\n\n",
    );
    md.push_str("| mode | tcprtt ns/event | empty ns/event | ratio | target | |\n|---|---|---|---|---|---|\n");
    for (i, (mode, (ours, floor, ratio))) in MODES.iter().zip(&r.cost).enumerate() {
        let target = if i == 0 { 1.5 } else { 2.0 };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {}× | ≤ {target}× | {} |",
            mode.name,
            ours.show(1),
            floor.show(1),
            ratio.show(2),
            verdict(ratio.median <= target)
        );
    }
    md.push_str("\n## Overhead on traffic\n\n");
    let _ = writeln!(
        md,
        "One-byte request/response on one loopback connection for {} s, without tcprtt and \
         with `tcprtt` (default mode) attached, {TPS_PAIRS} pairs, the order alternating.\n\n\
         | | transactions/s |\n|---|---|\n\
         | without tcprtt | {} |\n| with tcprtt | {} |\n\
         | overhead (per pair) | {} % |\n\
         | noise: change between consecutive runs without tcprtt | {} % |\n\n\
         Target: overhead under 2 % — {}.\n",
        TPS_WINDOW.as_secs(),
        r.tps_without.show(0),
        r.tps_with.show(0),
        r.overhead.show(2),
        r.noise.show(2),
        verdict(r.overhead.median < 2.0),
    );
    md.push_str("## Start-up, shut-down, memory\n\n");
    let _ = writeln!(
        md,
        "| | value | target | |\n|---|---|---|---|\n\
         | exec → \"Tracing TCP RTT via\" on stderr | {} ms | < 150 ms | {} |\n\
         | SIGINT → exit (final report printed) | {} ms | | |\n\
         | userspace peak RSS (VmHWM), `--by-raddr` | {} KiB | | |\n\
         | kernel memory of tcprtt's maps, `--by-raddr`, default `--max-keys` 10240, one key in use | {} bytes | | |\n",
        r.startup.show(1),
        verdict(r.startup.median < 150.0),
        r.shutdown.show(1),
        r.rss.show(0),
        r.memory.0,
    );
    md.push_str("Per map (bytes, as `bpftool map show` reports): ");
    let maps: Vec<String> = r.memory.1.iter().map(|(n, b)| format!("{n} {b}")).collect();
    md.push_str(&maps.join(", "));
    md.push_str(
        ". The histogram hash maps are created with `BPF_F_NO_PREALLOC`, so their memory \
         grows with the keys actually seen rather than with `--max-keys`.\n\n",
    );
    md.push_str("## Scale: 10,000 remote addresses\n\n");
    let _ = writeln!(
        md,
        "`tcprtt --by-raddr` while {SCALE_KEYS} clients, each bound to its own address in \
         127.1.0.0/16, make one connection and one round trip to a loopback server.\n\n\
         | | value | target | |\n|---|---|---|---|\n\
         | histograms reported (clients plus the server address) | {} | | |\n\
         | samples dropped for a full map (default `--max-keys` 10240) | 0 | 0 | met |\n\
         | samples dropped because the kernel's allocator for new keys ran dry | {} of about {} | 0 | {} |\n\
         | in-kernel cost per event | {} ns | | |\n\
         | SIGINT → exit: read, sort and print {} histograms | {} ms | < 1000 ms | {} |\n\
         | kernel memory of the maps with those keys | {} bytes | | |\n",
        r.scale_keys,
        r.scale_no_memory.show(0),
        2 * SCALE_KEYS,
        verdict(r.scale_no_memory.max == 0.0),
        r.scale_cost.show(1),
        r.scale_keys,
        r.scale_report.show(1),
        verdict(r.scale_report.median < 1000.0),
        r.scale_memory,
    );
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_spread() {
        let s = stat(vec![3.0, 1.0, 2.0]);
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        let s = stat(vec![4.0, 1.0, 2.0, 3.0]);
        assert_eq!(s.median, 2.5);
        assert_eq!(s.show(1), "2.5 (1.0–4.0)");
    }
}
