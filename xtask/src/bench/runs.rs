//! The benchmark's phases, each returning its raw samples: in-kernel cost per event,
//! transactions per second, start-up and memory, and scale. Also what the kernel says
//! about tcprtt's programs and maps.

use std::{
    fs,
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use aya::{
    Btf, Ebpf, EbpfLoader,
    programs::{BtfTracePoint, loaded_programs},
};
use serde_json::Value;

use super::{
    COST_ROUND_TRIPS, EMPTY_PROGRAM, MODES, ROUNDS, SCALE_KEYS, SCALE_ROUNDS, SETTLE,
    TCPRTT_PROGRAM, TPS_PAIRS, TPS_WINDOW,
    peers::{Placement, Tracer, held_programs, many_clients, ping_pong},
    report::warning_count,
};

/// One mode in one placement, over the rounds.
#[derive(Default)]
pub struct CostSamples {
    /// tcprtt's program, ns per event.
    pub ours: Vec<f64>,
    /// The empty program, ns per event.
    pub floor: Vec<f64>,
    pub ratio: Vec<f64>,
    /// tcprtt's program, ns per round trip (all the events one transaction causes).
    pub per_round_trip: Vec<f64>,
}

/// Transactions per second without and with tcprtt, in one placement.
#[derive(Default)]
pub struct TpsSamples {
    pub without: Vec<f64>,
    pub with: Vec<f64>,
    /// Per pair, in %.
    pub overhead: Vec<f64>,
}

/// Start-up (ms), shut-down (ms) and peak RSS (KiB) per round, and map memory.
#[derive(Default)]
pub struct LifecycleSamples {
    pub startup: Vec<f64>,
    pub shutdown: Vec<f64>,
    pub rss: Vec<f64>,
    pub memory: (u64, Vec<(String, u64)>),
}

#[derive(Default)]
pub struct ScaleSamples {
    /// ns per event while each address connects for the first time.
    pub new_keys_cost: Vec<f64>,
    /// ns per event while the same addresses connect again.
    pub existing_keys_cost: Vec<f64>,
    pub events_per_pass: u64,
    /// SIGINT to exit, ms.
    pub report: Vec<f64>,
    /// Samples dropped for a full map / for want of memory for a new key.
    pub full: Vec<f64>,
    pub no_memory: Vec<f64>,
    pub keys: usize,
    pub memory: u64,
}

/// A program after verification: its instruction count and the calls it makes.
pub type Verified = (usize, Vec<String>);

/// Per mode and placement the cost samples, and per mode the verified program.
pub fn cost(
    bin: &Path,
    object: &Path,
    placements: &[Placement],
) -> Result<(Vec<Vec<CostSamples>>, Vec<Verified>)> {
    let mut cost: Vec<Vec<CostSamples>> = MODES
        .iter()
        .map(|_| placements.iter().map(|_| CostSamples::default()).collect())
        .collect();
    let mut verified = Vec::new();
    let _stats = run_time_stats()?;
    let (_empty, empty) = attach_empty(object)?;
    for round in 0..ROUNDS {
        for (mode, samples) in MODES.iter().zip(cost.iter_mut()) {
            cost_round(bin, mode.args, placements, round, empty, samples)?;
        }
    }
    for mode in &MODES {
        let tracer = Tracer::start(bin, mode.args)?;
        verified.push(verified_program(tracer_program(&tracer)?)?);
        tracer.stop()?;
    }
    Ok((cost, verified))
}

/// Per-event cost of tcprtt's program and of the empty one over the same events, in each
/// placement, with the placements' order alternating from round to round.
fn cost_round(
    bin: &Path,
    args: &[&str],
    placements: &[Placement],
    round: usize,
    empty: u32,
    samples: &mut [CostSamples],
) -> Result<()> {
    let tracer = Tracer::start(bin, args)?;
    let ours = tracer_program(&tracer)?;
    let mut order: Vec<usize> = (0..placements.len()).collect();
    if round % 2 == 1 {
        order.reverse();
    }
    for i in order {
        let (ours0, floor0) = (program_stats(ours)?, program_stats(empty)?);
        ping_pong(
            placements[i].server,
            COST_ROUND_TRIPS,
            Duration::from_secs(30),
        )?;
        let (ours1, floor1) = (program_stats(ours)?, program_stats(empty)?);
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

pub fn tps(bin: &Path, placements: &[Placement]) -> Result<Vec<TpsSamples>> {
    let mut tps: Vec<TpsSamples> = placements.iter().map(|_| TpsSamples::default()).collect();
    for pair in 0..TPS_PAIRS {
        for (placement, samples) in placements.iter().zip(tps.iter_mut()) {
            // Alternate which run goes first, so a drift in the machine's speed does not
            // always count against the same side.
            let (mut base, mut traced) = (0.0, 0.0);
            for traced_run in [pair % 2 == 1, pair % 2 == 0] {
                if traced_run {
                    let tracer = Tracer::start(bin, &[])?;
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
    Ok(tps)
}

pub fn lifecycle(bin: &Path, placement: &Placement) -> Result<LifecycleSamples> {
    let mut s = LifecycleSamples::default();
    for round in 0..ROUNDS {
        let tracer = Tracer::start(bin, &["--by-raddr"])?;
        s.startup.push(tracer.startup.as_secs_f64() * 1000.0);
        ping_pong(placement.server, 1000, Duration::from_secs(10))?;
        s.rss.push(tracer.peak_rss_kib()? as f64);
        if round == 0 {
            s.memory = map_memory(tracer_program(&tracer)?)?;
        }
        let (_, took) = tracer.stop()?;
        s.shutdown.push(took.as_secs_f64() * 1000.0);
    }
    Ok(s)
}

pub fn scale(bin: &Path, placement: &Placement) -> Result<ScaleSamples> {
    let mut scale = ScaleSamples::default();
    let _stats = run_time_stats()?;
    for round in 0..SCALE_ROUNDS {
        let tracer = Tracer::start(bin, &["--by-raddr"])?;
        let ours = tracer_program(&tracer)?;
        let s0 = program_stats(ours)?;
        many_clients(placement.server, SCALE_KEYS)?;
        let s1 = program_stats(ours)?;
        // The same addresses again: every key now exists.
        many_clients(placement.server, SCALE_KEYS)?;
        let s2 = program_stats(ours)?;
        if round == 0 {
            scale.memory = map_memory(ours)?.0;
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
    Ok(scale)
}

/// The id of a tracer's own `tcprtt_tp_btf` program.
fn tracer_program(tracer: &Tracer) -> Result<u32> {
    let held = tracer.program_ids()?;
    let mut found = Vec::new();
    for info in loaded_programs() {
        let info = info.context("listing loaded BPF programs")?;
        if held.contains(&info.id()) && info.name_as_str() == Some(TCPRTT_PROGRAM) {
            found.push(info.id());
        }
    }
    match found[..] {
        [id] => Ok(id),
        _ => bail!(
            "tcprtt holds {} programs named {TCPRTT_PROGRAM}",
            found.len()
        ),
    }
}

/// Cumulative (run time in ns, run count) of the loaded program with this id.
fn program_stats(id: u32) -> Result<(u64, u64)> {
    for info in loaded_programs() {
        let info = info.context("listing loaded BPF programs")?;
        if info.id() == id {
            return Ok((info.run_time().as_nanos() as u64, info.run_count()));
        }
    }
    bail!("program {id} is no longer loaded")
}

/// Nanoseconds per run between two readings of `program_stats`.
fn per_run(before: (u64, u64), after: (u64, u64)) -> Result<f64> {
    let runs = after.1 - before.1;
    ensure!(runs > 0, "the program did not run");
    Ok((after.0 - before.0) as f64 / runs as f64)
}

/// Waits for the kernel to free unloaded programs (after an RCU grace period), then
/// fails if any program a stopped tracer held is still loaded.
pub fn ensure_unloaded() -> Result<()> {
    let held = held_programs();
    ensure!(!held.is_empty(), "no tracer held a program");
    let left = || -> Vec<String> {
        loaded_programs()
            .filter_map(Result::ok)
            .filter(|p| held.contains(&p.id()))
            .map(|p| format!("{} (id {})", p.name_as_str().unwrap_or("?"), p.id()))
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(2);
    while !left().is_empty() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    let left = left();
    ensure!(
        left.is_empty(),
        "programs left loaded after the benchmark: {}",
        left.join(", ")
    );
    Ok(())
}

/// The eBPF object of the newest release build.
pub fn newest_object(root: &Path) -> Result<PathBuf> {
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
/// Dropping the returned object detaches and unloads it. Also returns its id.
fn attach_empty(object: &Path) -> Result<(Ebpf, u32)> {
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
    let id = prog.info().context("tcprtt_empty's id")?.id();
    Ok((ebpf, id))
}

/// The kernel's BPF run-time statistics, on while this lives. They are system-wide and
/// put a clock read around every BPF program run, so they stay off while transactions per
/// second and start-up are timed.
fn run_time_stats() -> Result<OwnedFd> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime).context("enabling BPF run-time statistics")
}

/// What `bpftool -j ARGS` prints, parsed.
fn bpftool(args: &[&str]) -> Result<Value> {
    let text = crate::output(Command::new("bpftool").arg("-j").args(args))?;
    serde_json::from_str(&text).with_context(|| format!("parsing `bpftool -j {}`", args.join(" ")))
}

/// tcprtt's program as the verifier left it for a mode's settings (it removes the code
/// that the read-only configuration rules out): instruction count and the calls it makes.
fn verified_program(id: u32) -> Result<Verified> {
    let xlated = bpftool(&["prog", "dump", "xlated", "id", &id.to_string()])?;
    let insns = xlated
        .as_array()
        .context("bpftool's xlated dump is not a list")?;
    let mut instructions = 0;
    let mut calls = Vec::new();
    for disasm in insns.iter().filter_map(|i| i["disasm"].as_str()) {
        instructions += 1;
        let Some(target) = disasm.split_once(" call ").map(|(_, t)| t) else {
            continue;
        };
        calls.push(call_name(target));
    }
    ensure!(instructions > 0, "bpftool printed no instructions");
    Ok((instructions, calls))
}

/// "bpf_probe_read_kernel#-69024" for a helper, or "pc+161#bpf_prog_<16 hex digits>_memset"
/// for a BPF-to-BPF call.
fn call_name(target: &str) -> String {
    match target.split_once('#') {
        Some((pc, name)) if pc.starts_with("pc") => {
            let name = name
                .strip_prefix("bpf_prog_")
                .and_then(|n| n.get(17..))
                .unwrap_or(name);
            format!("`{name}` (subprogram)")
        }
        Some((helper, _)) => format!("`{helper}`"),
        None => format!("`{target}`"),
    }
}

/// `bytes_memlock` of every map tcprtt's program uses, per bpftool.
fn map_memory(id: u32) -> Result<(u64, Vec<(String, u64)>)> {
    let prog = bpftool(&["prog", "show", "id", &id.to_string()])?;
    let ids = prog["map_ids"]
        .as_array()
        .context("no map_ids in bpftool's output")?;
    let mut total = 0;
    let mut maps = Vec::new();
    for id in ids {
        let id = id.as_u64().context("a map id that is not a number")?;
        let map = bpftool(&["map", "show", "id", &id.to_string()])?;
        let name = map["name"].as_str().unwrap_or("?").to_string();
        let bytes = map["bytes_memlock"]
            .as_u64()
            .with_context(|| format!("no bytes_memlock for map {id}: {map}"))?;
        total += bytes;
        maps.push((name, bytes));
    }
    Ok((total, maps))
}
