//! The per-event cost phase and the start-up phase, each returning raw samples.

use std::{net::SocketAddr, path::Path, process::Command};

use anyhow::{Context, Result};

use super::{
    BPFTRACE_ALL, COST_ROUND_TRIPS, Mode, ROUNDS, Tool, Tools,
    kernel::{self, Verified},
    peers::ping_pong,
};

/// One tracer's samples in one mode, a sample per round.
#[derive(Default)]
pub struct ToolCost {
    /// Its program, ns per event.
    pub ns: Vec<f64>,
    /// The empty program over the same events, ns per event.
    pub floor: Vec<f64>,
}

/// One mode: each tracer's samples (tcprtt first, then the C peer, then bpftrace where it
/// takes part), and each tracer's program as the verifier left it.
pub struct ModeCost {
    pub tools: Vec<(Tool, ToolCost)>,
    pub verified: Vec<(Tool, Verified)>,
}

impl ModeCost {
    pub fn of(&self, tool: Tool) -> Option<&ToolCost> {
        self.tools.iter().find(|(t, _)| *t == tool).map(|(_, c)| c)
    }
}

/// The arguments that run `tool` in `mode`, or `None` where it has no equivalent.
pub fn args_for(tool: Tool, mode: &Mode) -> Option<Vec<String>> {
    match tool {
        Tool::Tcprtt => Some([&mode.args[..], &mode.tcprtt_extra[..]].concat()),
        Tool::C => Some(mode.args.clone()),
        Tool::Bpftrace => mode.bpftrace.map(|s| vec!["-e".to_string(), s.to_string()]),
    }
}

/// `items` rotated by `round`, so no tracer always runs first or last in a round.
fn rotated<T: Copy>(items: &[T], round: usize) -> Vec<T> {
    let mut v = items.to_vec();
    if !v.is_empty() {
        v.rotate_left(round % items.len());
    }
    v
}

/// Each mode, each round, each tracer in turn: the tracer alone on the hook beside the
/// empty program, over the same ping-pong.
pub fn cost(tools: &Tools, object: &Path, modes: &[Mode]) -> Result<Vec<ModeCost>> {
    let mut results: Vec<ModeCost> = modes
        .iter()
        .map(|mode| ModeCost {
            tools: [Tool::Tcprtt, Tool::C, Tool::Bpftrace]
                .into_iter()
                .filter(|t| args_for(*t, mode).is_some())
                .map(|t| (t, ToolCost::default()))
                .collect(),
            verified: Vec::new(),
        })
        .collect();
    let _stats = kernel::run_time_stats()?;
    let (_empty, empty_id) = kernel::attach_empty(object)?;
    for round in 0..ROUNDS {
        for (mode, result) in modes.iter().zip(results.iter_mut()) {
            let order: Vec<Tool> = result.tools.iter().map(|(t, _)| *t).collect();
            for tool in rotated(&order, round) {
                let args = args_for(tool, mode).unwrap_or_default();
                let tracer = tools.start(tool, &args)?;
                let (ours0, floor0) = (
                    kernel::program_stats(tracer.prog_id)?,
                    kernel::program_stats(empty_id)?,
                );
                ping_pong(mode.server, COST_ROUND_TRIPS)?;
                let (ours1, floor1) = (
                    kernel::program_stats(tracer.prog_id)?,
                    kernel::program_stats(empty_id)?,
                );
                if round == 0 {
                    result
                        .verified
                        .push((tool, kernel::verified_program(tracer.prog_id)?));
                }
                tracer.stop()?;
                let samples = result
                    .tools
                    .iter_mut()
                    .find(|(t, _)| *t == tool)
                    .map(|(_, c)| c)
                    .context("a tracer without samples")?;
                samples.ns.push(kernel::per_run(ours0, ours1)?);
                samples.floor.push(kernel::per_run(floor0, floor1)?);
            }
        }
    }
    Ok(results)
}

/// Start-up (ms), peak RSS and RSS while tracing (KiB) per round, for one tracer.
#[derive(Default)]
pub struct Lifecycle {
    pub startup: Vec<f64>,
    pub rss: Vec<f64>,
    pub rss_now: Vec<f64>,
    /// tcprtt only: its own account of the start-up (`-v`): reading the kernel's BTF,
    /// aya's loader, attaching; ms.
    pub phases: Vec<[f64; 3]>,
}

/// Each tracer in its default mode, started in turn: exec to its ready line, then peak and
/// current RSS after 1,000 round trips. The run-time statistics are off, as on a host.
pub fn lifecycle(tools: &Tools, server: SocketAddr) -> Result<Vec<(Tool, Lifecycle)>> {
    let order = [Tool::Tcprtt, Tool::C, Tool::Bpftrace];
    let mut results: Vec<(Tool, Lifecycle)> =
        order.iter().map(|t| (*t, Lifecycle::default())).collect();
    for round in 0..ROUNDS {
        for tool in rotated(&order, round) {
            let args = match tool {
                Tool::Bpftrace => vec!["-e".to_string(), BPFTRACE_ALL.to_string()],
                _ => Vec::new(),
            };
            let tracer = tools.start(tool, &args)?;
            let startup = tracer.startup.as_secs_f64() * 1000.0;
            ping_pong(server, 1000)?;
            let rss = tracer.status_kib("VmHWM")? as f64;
            let rss_now = tracer.status_kib("VmRSS")? as f64;
            tracer.stop()?;
            if let Some((_, l)) = results.iter_mut().find(|(t, _)| *t == tool) {
                l.startup.push(startup);
                l.rss.push(rss);
                l.rss_now.push(rss_now);
            }
        }
    }
    if let Some((_, l)) = results.iter_mut().find(|(t, _)| *t == Tool::Tcprtt) {
        l.phases = startup_phases(&tools.tcprtt)?;
    }
    Ok(results)
}

/// `tcprtt -v` run briefly, [`ROUNDS`] times: the parts of the start-up it reports.
fn startup_phases(tcprtt: &Path) -> Result<Vec<[f64; 3]>> {
    (0..ROUNDS)
        .map(|_| {
            let out = Command::new(tcprtt)
                .args(["-v", "-d", "0.05"])
                .output()
                .with_context(|| format!("running {} -v", tcprtt.display()))?;
            let stderr = String::from_utf8_lossy(&out.stderr);
            let line = stderr
                .lines()
                .find(|l| l.contains("start-up "))
                .with_context(|| format!("no start-up in tcprtt -v's report: {stderr}"))?;
            let ms_after = |word: &str| -> Result<f64> {
                line.split(word)
                    .nth(1)
                    .and_then(|rest| rest.split(' ').next()?.parse().ok())
                    .with_context(|| format!("no {word:?} in {line}"))
            };
            Ok([
                ms_after("kernel BTF ")?,
                ms_after("aya's loader ")?,
                ms_after(", attach ")?,
            ])
        })
        .collect()
}
