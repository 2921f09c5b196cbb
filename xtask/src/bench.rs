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
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail, ensure};
use aya::{
    Btf, Ebpf, EbpfLoader,
    programs::{BtfTracePoint, loaded_programs},
};
use socket2::{Domain, Socket, Type};

const ROUNDS: usize = 5;
/// Round trips per cost sample: enough events (two per round trip) to average out the
/// clock reads, little enough to keep a round near a second.
const COST_ROUND_TRIPS: usize = 20_000;
/// Length of one transactions-per-second sample, and how many pairs of samples: the
/// per-window noise is a few percent, so it takes many short pairs for the median to
/// settle within a fraction of the 2 % target.
const TPS_WINDOW: Duration = Duration::from_millis(500);
const TPS_PAIRS: usize = 20;
/// tcprtt is idle once attached, but its start-up work (page faults, freeing the BTF it
/// parsed) may still be settling when the attached line arrives.
const SETTLE: Duration = Duration::from_millis(50);
const SCALE_ROUNDS: usize = 3;
const SCALE_KEYS: u32 = 10_000;
const TCPRTT_PROGRAM: &str = "tcprtt_tp_btf";
const EMPTY_PROGRAM: &str = "tcprtt_empty";

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

/// Where the two ends of the ping-pong run. The client is always on CPU 0.
struct Placement {
    name: &'static str,
    server: SocketAddr,
}

/// Across CPUs every message is a cross-CPU wake-up, and the receiving socket was last
/// written on the other CPU, so the program's first read of it misses the cache. On one
/// CPU the socket is cached and a transaction takes a few microseconds: the worst case
/// for the relative overhead.
fn placements() -> Result<[Placement; 2]> {
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
fn ping_pong(server: SocketAddr, count: usize, window: Duration) -> Result<f64> {
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
        let path = format!("/proc/{}/status", self.pid());
        let status = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("no VmHWM in {path}"))
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
        // SAFETY: signalling our own child, not yet waited for, by pid.
        if unsafe { libc::kill(self.pid() as i32, libc::SIGINT) } != 0 {
            return Err(std::io::Error::last_os_error()).context("sending SIGINT to tcprtt");
        }
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

/// Nanoseconds per run between two readings of `program_stats`.
fn per_run(before: (u64, u64), after: (u64, u64)) -> Result<f64> {
    let runs = after.1 - before.1;
    ensure!(runs > 0, "the program did not run");
    Ok((after.0 - before.0) as f64 / runs as f64)
}

/// Names of tcprtt's programs still loaded (by this or an earlier run).
fn tcprtt_programs() -> Vec<String> {
    loaded_programs()
        .filter_map(Result::ok)
        .filter_map(|p| {
            let name = p.name_as_str()?;
            name.starts_with("tcprtt_")
                .then(|| format!("{name} (id {})", p.id()))
        })
        .collect()
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
/// Dropping the returned object detaches and unloads it.
fn attach_empty(object: &Path) -> Result<Ebpf> {
    let btf = Btf::from_sys_fs().context("reading the kernel's BTF")?;
    let bytes = fs::read(object).with_context(|| format!("reading {}", object.display()))?;
    let mut ebpf = EbpfLoader::new()
        .btf(Some(&btf))
        .load(&bytes)
        .context("loading the eBPF object")?;
    let prog: &mut BtfTracePoint = ebpf
        .program_mut(EMPTY_PROGRAM)
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
    /// Most the per-event cost may be, as a multiple of the empty program's.
    target: f64,
}

const MODES: [Mode; 3] = [
    Mode {
        name: "default (all traffic)",
        args: &[],
        target: 1.5,
    },
    Mode {
        name: "`--by-raddr`",
        args: &["--by-raddr"],
        target: 2.0,
    },
    Mode {
        name: "filters rejecting the traffic (`-A 203.0.113.0/24 -p 9`)",
        args: &["-A", "203.0.113.0/24", "-p", "9"],
        target: 2.0,
    },
];

/// One mode in one placement, over the rounds.
#[derive(Default)]
struct CostSamples {
    /// tcprtt's program, ns per event.
    ours: Vec<f64>,
    /// The empty program, ns per event.
    floor: Vec<f64>,
    ratio: Vec<f64>,
    /// tcprtt's program, ns per round trip (all the events one transaction causes).
    per_round_trip: Vec<f64>,
}

/// Per-event cost of tcprtt's program and of the empty one over the same events, in each
/// placement, with the placements' order alternating from round to round.
fn cost_round(
    bin: &Path,
    args: &[&str],
    placements: &[Placement],
    round: usize,
    samples: &mut [CostSamples],
) -> Result<()> {
    let tracer = Tracer::start(bin, args)?;
    let mut order: Vec<usize> = (0..placements.len()).collect();
    if round % 2 == 1 {
        order.reverse();
    }
    for i in order {
        let (ours0, floor0) = (
            program_stats(TCPRTT_PROGRAM)?,
            program_stats(EMPTY_PROGRAM)?,
        );
        ping_pong(
            placements[i].server,
            COST_ROUND_TRIPS,
            Duration::from_secs(30),
        )?;
        let (ours1, floor1) = (
            program_stats(TCPRTT_PROGRAM)?,
            program_stats(EMPTY_PROGRAM)?,
        );
        let (ours, floor) = (per_run(ours0, ours1)?, per_run(floor0, floor1)?);
        let s = &mut samples[i];
        s.ours.push(ours);
        s.floor.push(floor);
        s.ratio.push(ours / floor);
        s.per_round_trip
            .push((ours1.0 - ours0.0) as f64 / COST_ROUND_TRIPS as f64);
    }
    tracer.stop()?;
    Ok(())
}

/// tcprtt's program as the verifier left it for a mode's settings (it removes the code
/// that the read-only configuration rules out): instruction count and the calls it makes.
fn verified_program(prog_name: &str) -> Result<(usize, Vec<String>)> {
    let xlated = output("bpftool", &["prog", "dump", "xlated", "name", prog_name])?;
    let mut instructions = 0;
    let mut calls = Vec::new();
    for line in xlated.lines() {
        let Some((index, insn)) = line.trim_start().split_once(": (") else {
            continue;
        };
        if index.parse::<u32>().is_err() {
            continue;
        }
        instructions += 1;
        let Some(target) = insn.split_once(" call ").map(|(_, t)| t) else {
            continue;
        };
        // "bpf_probe_read_kernel#-69024", or "pc+161#bpf_prog_<16 hex digits>_memset"
        // for a BPF-to-BPF call.
        let call = match target.split_once('#') {
            Some((pc, name)) if pc.starts_with("pc") => {
                let name = name
                    .strip_prefix("bpf_prog_")
                    .and_then(|n| n.get(17..))
                    .unwrap_or(name);
                format!("`{name}` (subprogram)")
            }
            Some((helper, _)) => format!("`{helper}`"),
            None => format!("`{target}`"),
        };
        calls.push(call);
    }
    ensure!(instructions > 0, "bpftool printed no instructions");
    Ok((instructions, calls))
}

/// Transactions per second without and with tcprtt, in one placement.
#[derive(Default)]
struct TpsSamples {
    without: Vec<f64>,
    with: Vec<f64>,
    /// Per pair, in %.
    overhead: Vec<f64>,
}

/// `bytes_memlock` of every map tcprtt's program uses, per bpftool.
fn map_memory(prog_name: &str) -> Result<(u64, Vec<(String, u64)>)> {
    let text = output("bpftool", &["prog", "show", "name", prog_name])?;
    let ids = text
        .split("map_ids ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .context("no map_ids in bpftool's output")?;
    let mut total = 0;
    let mut maps = Vec::new();
    for id in ids.split(',') {
        let text = output("bpftool", &["map", "show", "id", id])?;
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

/// One connection and one round trip from each of `keys` distinct client addresses in
/// 127.1.0.0/16.
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
        w.join().map_err(|_| anyhow!("client thread panicked"))??;
    }
    Ok(())
}

/// Standard output of a command that must succeed, trimmed.
fn output(cmd: &str, args: &[&str]) -> Result<String> {
    Ok(crate::output(Command::new(cmd).args(args))?
        .trim()
        .to_string())
}

/// The kernel's BPF run-time statistics, on while this lives. They are system-wide and
/// put a clock read around every BPF program run, so they stay off while transactions per
/// second and start-up are timed.
fn run_time_stats() -> Result<OwnedFd> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime).context("enabling BPF run-time statistics")
}

pub fn run(root: &Path) -> Result<()> {
    let bin = root.join("target/release/tcprtt");
    let object = newest_object(root)?;
    let stale = tcprtt_programs();
    if !stale.is_empty() {
        bail!(
            "tcprtt programs are already loaded ({}); stop them before benchmarking",
            stale.join(", ")
        );
    }
    let placements = placements()?;
    let load_average = fs::read_to_string("/proc/loadavg").context("reading /proc/loadavg")?;

    eprintln!("bench: in-kernel cost per event ({ROUNDS} rounds per mode, alternating)");
    let mut cost: Vec<Vec<CostSamples>> = MODES
        .iter()
        .map(|_| placements.iter().map(|_| CostSamples::default()).collect())
        .collect();
    let mut verified = Vec::new();
    {
        let _stats = run_time_stats()?;
        let _empty = attach_empty(&object)?;
        for round in 0..ROUNDS {
            for (mode, samples) in MODES.iter().zip(cost.iter_mut()) {
                cost_round(&bin, mode.args, &placements, round, samples)?;
            }
        }
        for mode in &MODES {
            let tracer = Tracer::start(&bin, mode.args)?;
            verified.push(verified_program(TCPRTT_PROGRAM)?);
            tracer.stop()?;
        }
    }

    eprintln!("bench: transactions per second with and without tcprtt ({TPS_PAIRS} pairs)");
    let mut tps: Vec<TpsSamples> = placements.iter().map(|_| TpsSamples::default()).collect();
    for pair in 0..TPS_PAIRS {
        for (placement, samples) in placements.iter().zip(tps.iter_mut()) {
            // Alternate which run goes first, so a drift in the machine's speed does not
            // always count against the same side.
            let (mut base, mut traced) = (0.0, 0.0);
            for traced_run in [pair % 2 == 1, pair % 2 == 0] {
                if traced_run {
                    let tracer = Tracer::start(&bin, &[])?;
                    thread::sleep(SETTLE);
                    traced = ping_pong(placement.server, usize::MAX, TPS_WINDOW)?;
                    tracer.stop()?;
                } else {
                    thread::sleep(SETTLE);
                    base = ping_pong(placement.server, usize::MAX, TPS_WINDOW)?;
                }
            }
            samples.without.push(base);
            samples.with.push(traced);
            samples.overhead.push((base - traced) / base * 100.0);
        }
    }

    eprintln!("bench: start-up, shut-down and memory ({ROUNDS} rounds)");
    let (mut startup, mut shutdown, mut rss) = (Vec::new(), Vec::new(), Vec::new());
    let mut memory = (0, Vec::new());
    for round in 0..ROUNDS {
        let tracer = Tracer::start(&bin, &["--by-raddr"])?;
        startup.push(tracer.startup.as_secs_f64() * 1000.0);
        ping_pong(placements[0].server, 1000, Duration::from_secs(10))?;
        rss.push(tracer.peak_rss_kib()? as f64);
        if round == 0 {
            memory = map_memory(TCPRTT_PROGRAM)?;
        }
        let (_, took) = tracer.stop()?;
        shutdown.push(took.as_secs_f64() * 1000.0);
    }

    eprintln!("bench: {SCALE_KEYS} remote addresses with --by-raddr ({SCALE_ROUNDS} rounds)");
    let mut scale = ScaleSamples::default();
    {
        let _stats = run_time_stats()?;
        for round in 0..SCALE_ROUNDS {
            let tracer = Tracer::start(&bin, &["--by-raddr"])?;
            let s0 = program_stats(TCPRTT_PROGRAM)?;
            many_clients(placements[0].server, SCALE_KEYS)?;
            let s1 = program_stats(TCPRTT_PROGRAM)?;
            // The same addresses again: every key now exists.
            many_clients(placements[0].server, SCALE_KEYS)?;
            let s2 = program_stats(TCPRTT_PROGRAM)?;
            if round == 0 {
                scale.memory = map_memory(TCPRTT_PROGRAM)?.0;
            }
            let (report, took) = tracer.stop()?;
            scale
                .full
                .push(warning_count(&report, "distinct keys (raise --max-keys)") as f64);
            scale
                .no_memory
                .push(warning_count(&report, "new keys arrived faster") as f64);
            scale.keys = report.matches("Remote Address = ").count();
            scale.events_per_pass = s1.1 - s0.1;
            scale.new_keys_cost.push(per_run(s0, s1)?);
            scale.existing_keys_cost.push(per_run(s1, s2)?);
            scale.report.push(took.as_secs_f64() * 1000.0);
        }
    }

    // The kernel frees an unloaded program after an RCU grace period.
    let deadline = Instant::now() + Duration::from_secs(2);
    while !tcprtt_programs().is_empty() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    let left = tcprtt_programs();
    ensure!(
        left.is_empty(),
        "programs left loaded after the benchmark: {}",
        left.join(", ")
    );

    let markdown = render(&Results {
        load_average: load_average
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        placements: placements.iter().map(|p| p.name).collect(),
        cost: cost
            .into_iter()
            .map(|per_placement| per_placement.into_iter().map(CostStat::from).collect())
            .collect(),
        verified,
        tps: tps.into_iter().map(TpsStat::from).collect(),
        startup: stat(startup),
        shutdown: stat(shutdown),
        rss: stat(rss),
        memory,
        scale: ScaleStat::from(scale),
    })?;
    fs::write(root.join("BENCHMARKS.md"), &markdown).context("writing BENCHMARKS.md")?;
    print!("{markdown}");
    Ok(())
}

#[derive(Default)]
struct ScaleSamples {
    /// ns per event while each address connects for the first time.
    new_keys_cost: Vec<f64>,
    /// ns per event while the same addresses connect again.
    existing_keys_cost: Vec<f64>,
    events_per_pass: u64,
    /// SIGINT to exit, ms.
    report: Vec<f64>,
    /// Samples dropped for a full map / for want of memory for a new key.
    full: Vec<f64>,
    no_memory: Vec<f64>,
    keys: usize,
    memory: u64,
}

struct CostStat {
    ours: Stat,
    floor: Stat,
    ratio: Stat,
    per_round_trip: Stat,
}

impl From<CostSamples> for CostStat {
    fn from(s: CostSamples) -> Self {
        Self {
            ours: stat(s.ours),
            floor: stat(s.floor),
            ratio: stat(s.ratio),
            per_round_trip: stat(s.per_round_trip),
        }
    }
}

struct TpsStat {
    without: Stat,
    with: Stat,
    overhead: Stat,
    /// Change between consecutive runs without tcprtt, in %: what nothing changing does.
    noise: Stat,
}

impl From<TpsSamples> for TpsStat {
    fn from(s: TpsSamples) -> Self {
        let noise = s
            .without
            .windows(2)
            .map(|w| (w[1] - w[0]).abs() / w[0] * 100.0)
            .collect();
        Self {
            without: stat(s.without),
            with: stat(s.with),
            overhead: stat(s.overhead),
            noise: stat(noise),
        }
    }
}

struct ScaleStat {
    new_keys_cost: Stat,
    existing_keys_cost: Stat,
    events_per_pass: u64,
    report: Stat,
    full: Stat,
    no_memory: Stat,
    keys: usize,
    memory: u64,
}

impl From<ScaleSamples> for ScaleStat {
    fn from(s: ScaleSamples) -> Self {
        Self {
            new_keys_cost: stat(s.new_keys_cost),
            existing_keys_cost: stat(s.existing_keys_cost),
            events_per_pass: s.events_per_pass,
            report: stat(s.report),
            full: stat(s.full),
            no_memory: stat(s.no_memory),
            keys: s.keys,
            memory: s.memory,
        }
    }
}

struct Results {
    load_average: String,
    placements: Vec<&'static str>,
    /// Per mode, per placement.
    cost: Vec<Vec<CostStat>>,
    /// Per mode: instructions and calls after verification.
    verified: Vec<(usize, Vec<String>)>,
    /// Per placement.
    tps: Vec<TpsStat>,
    startup: Stat,
    shutdown: Stat,
    rss: Stat,
    memory: (u64, Vec<(String, u64)>),
    scale: ScaleStat,
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

fn render(r: &Results) -> Result<String> {
    let cpu = output("grep", &["-m1", "model name", "/proc/cpuinfo"])?;
    let cpu = cpu.split_once(':').map_or(cpu.as_str(), |(_, m)| m.trim());
    let mut md = String::from("# Benchmarks\n\n");
    let _ = writeln!(
        md,
        "Measured by `cargo xtask bench` (as root) on {cpu} ({} cores), Linux {}, {} UTC; \
         load average {} at the start.\n\
         Every figure is the median of its rounds, with the range (min–max) in \
         parentheses. Rounds alternate between the things compared.\n\
         Reproduce: `cargo xtask bench` (it rewrites this file).\n\n\
         Traffic is a one-byte request/response (ping-pong) on one loopback connection, the \
         client on CPU 0 and the server on CPU 1 (**two CPUs**) or on CPU 0 too (**one \
         CPU**). Across CPUs every message wakes the other CPU and the receiving socket was \
         last written there, so the program's first read of it misses the cache; on one \
         CPU the socket is cached and a transaction takes a few microseconds, the worst case \
         for the relative overhead.\n",
        output("nproc", &[])?,
        output("uname", &["-r"])?,
        output("date", &["-u", "+%Y-%m-%d %H:%M"])?,
        r.load_average,
    );
    let mut missed = Vec::new();

    md.push_str("## In-kernel cost per event\n\n");
    let _ = writeln!(
        md,
        "tcprtt's program and an empty program (`{EMPTY_PROGRAM}`, which returns at once) are \
         attached to `tp_btf/tcp_probe` at the same time, so both run on the same segments; \
         the kernel's run-time statistics give each one's time per run. {ROUNDS} rounds per \
         mode, {COST_ROUND_TRIPS} round trips per placement and round. The empty program's \
         time is the hook's fixed cost as the statistics see it, mostly the clock reads that \
         bracket every run.\n\n\
         | mode | ends on | tcprtt ns/event | empty ns/event | ratio | target | |\n\
         |---|---|---|---|---|---|---|"
    );
    for (mode, per_placement) in MODES.iter().zip(&r.cost) {
        for (placement, c) in r.placements.iter().zip(per_placement) {
            let ok = c.ratio.median <= mode.target;
            let _ = writeln!(
                md,
                "| {} | {placement} | {} | {} | {}× | ≤ {}× | {} |",
                mode.name,
                c.ours.show(1),
                c.floor.show(1),
                c.ratio.show(2),
                mode.target,
                verdict(ok)
            );
            if !ok {
                missed.push(format!(
                    "In-kernel cost, {}, ends on {placement}: {:.2}× the empty program where \
                     the target is ≤ {}× ({:.1} times over). tcprtt's program takes {:.0} ns \
                     per event more than the empty one; the target allows {:.0} ns.",
                    mode.name,
                    c.ratio.median,
                    mode.target,
                    c.ratio.median / mode.target,
                    c.ours.median - c.floor.median,
                    c.floor.median * (mode.target - 1.0),
                ));
            }
        }
    }
    md.push_str(
        "\ntcprtt's program as the verifier left it for each mode (it drops the code the \
         read-only configuration rules out):\n\n\
         | mode | instructions | calls |\n|---|---|---|\n",
    );
    for (mode, (instructions, calls)) in MODES.iter().zip(&r.verified) {
        let _ = writeln!(
            md,
            "| {} | {instructions} | {} |",
            mode.name,
            calls.join(", ")
        );
    }

    md.push_str("\n## Overhead on traffic\n\n");
    let _ = writeln!(
        md,
        "Transactions per second in {} ms windows, without tcprtt and with `tcprtt` (default \
         mode) attached, {TPS_PAIRS} pairs per placement, the order alternating. The kernel's \
         run-time statistics are off here, as they are when tcprtt runs without `-v`.\n\n\
         | ends on | without tcprtt | with tcprtt | overhead (per pair) | noise: change between consecutive runs without tcprtt | tcprtt's in-kernel time per transaction | target | |\n\
         |---|---|---|---|---|---|---|---|",
        TPS_WINDOW.as_millis(),
    );
    for ((placement, t), c) in r.placements.iter().zip(&r.tps).zip(&r.cost[0]) {
        // What the program's own run time takes out of a transaction, from the cost
        // rounds: the part of the overhead that does not depend on this noisy figure.
        let share = c.per_round_trip.median * t.without.median / 1e9 * 100.0;
        let ok = t.overhead.median < 2.0;
        // A median under the target means little when consecutive runs of the same thing
        // differ by more than the target.
        let shown = match (ok, t.noise.median < 2.0) {
            (true, false) => "met, within the noise",
            _ => verdict(ok),
        };
        let _ = writeln!(
            md,
            "| {placement} | {} /s | {} /s | {} % | {} % | {:.0} ns, {share:.2} % of a transaction | < 2 % | {shown} |",
            t.without.show(0),
            t.with.show(0),
            t.overhead.show(2),
            t.noise.show(2),
            c.per_round_trip.median,
        );
        if !ok {
            missed.push(format!(
                "Transactions per second, ends on {placement}: {:.2} % fewer with tcprtt \
                 attached where the target is under 2 % (the median change between \
                 consecutive runs without tcprtt is {:.2} %). tcprtt's program alone \
                 accounts for about {share:.2} % of a {:.1} µs transaction.",
                t.overhead.median,
                t.noise.median,
                1e6 / t.without.median,
            ));
        }
    }

    md.push_str("\n## Start-up, shut-down, memory\n\n");
    let _ = writeln!(
        md,
        "`tcprtt --by-raddr`, {ROUNDS} rounds, 1,000 round trips each.\n\n\
         | | value | target | |\n|---|---|---|---|\n\
         | exec → \"Tracing TCP RTT via\" on stderr | {} ms | < 150 ms | {} |\n\
         | SIGINT → exit (final report printed) | {} ms | | |\n\
         | userspace peak RSS (VmHWM just before SIGINT) | {} KiB | | |\n\
         | kernel memory of tcprtt's maps, default `--max-keys` 10240, one key in use | {} bytes | | |\n",
        r.startup.show(1),
        verdict(r.startup.median < 150.0),
        r.shutdown.show(1),
        r.rss.show(0),
        r.memory.0,
    );
    if r.startup.median >= 150.0 {
        missed.push(format!(
            "Start-up: {:.1} ms from exec to attached where the target is under 150 ms.",
            r.startup.median
        ));
    }
    md.push_str("Per map (bytes, as `bpftool map show` reports): ");
    let maps: Vec<String> = r.memory.1.iter().map(|(n, b)| format!("{n} {b}")).collect();
    md.push_str(&maps.join(", "));
    md.push_str(
        ". The histogram hash maps are created with `BPF_F_NO_PREALLOC`, so their memory \
         grows with the keys actually seen rather than with `--max-keys`.\n\n",
    );

    let s = &r.scale;
    md.push_str("## Scale: 10,000 remote addresses\n\n");
    let _ = writeln!(
        md,
        "`tcprtt --by-raddr`, {SCALE_ROUNDS} rounds. In each, {SCALE_KEYS} clients, each bound \
         to its own address in 127.1.0.0/16, make one connection and one round trip to a \
         loopback server (about {} events, the first from each address creating its key), \
         then the same {SCALE_KEYS} addresses do it again (every key exists).\n\n\
         | | value | target | |\n|---|---|---|---|\n\
         | histograms reported (clients plus the server address) | {} | | |\n\
         | samples dropped for a full map (default `--max-keys` 10240) | {} | 0 | {} |\n\
         | samples dropped because the kernel's allocator for new keys ran dry | {} | 0 | {} |\n\
         | in-kernel cost per event, first pass (new keys) | {} ns | | |\n\
         | in-kernel cost per event, second pass (keys exist) | {} ns | | |\n\
         | hence the extra cost of creating a key, per key | {:.1} µs | | |\n\
         | SIGINT → exit: read, sort and print {} histograms | {} ms | < 1000 ms | {} |\n\
         | kernel memory of the maps with those keys | {} bytes | | |\n",
        s.events_per_pass,
        s.keys,
        s.full.show(0),
        verdict(s.full.max == 0.0),
        s.no_memory.show(0),
        verdict(s.no_memory.max == 0.0),
        s.new_keys_cost.show(1),
        s.existing_keys_cost.show(1),
        (s.new_keys_cost.median - s.existing_keys_cost.median) * s.events_per_pass as f64
            / f64::from(SCALE_KEYS)
            / 1000.0,
        s.keys,
        s.report.show(1),
        verdict(s.report.median < 1000.0),
        s.memory,
    );
    if s.full.max > 0.0 {
        missed.push(format!(
            "Scale: up to {:.0} samples dropped for a full map with {SCALE_KEYS} addresses, \
             below the default `--max-keys` of 10240.",
            s.full.max
        ));
    }
    if s.no_memory.max > 0.0 {
        missed.push(format!(
            "Scale: up to {:.0} samples of new keys dropped because the kernel could not \
             allocate their histograms at that moment.",
            s.no_memory.max
        ));
    }
    if s.report.median >= 1000.0 {
        missed.push(format!(
            "Scale: {:.0} ms from SIGINT to exit with {} histograms where the target is under \
             1 s.",
            s.report.median, s.keys
        ));
    }

    md.push_str("## Targets missed\n\n");
    if missed.is_empty() {
        md.push_str("None.\n");
    }
    for m in missed {
        let _ = writeln!(md, "- {m}");
    }
    Ok(md)
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

    #[test]
    fn warning_counts() {
        let report = "Remote Address = 127.0.0.1\n\
                      WARNING: 7 samples dropped: more than 10240 distinct keys (raise --max-keys)\n";
        assert_eq!(warning_count(report, "distinct keys (raise --max-keys)"), 7);
        assert_eq!(warning_count(report, "new keys arrived faster"), 0);
    }
}
