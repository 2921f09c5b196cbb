//! `cargo xtask bench`: what tcprtt costs the host, measured side by side with the floor
//! (an empty program on the same hook) in the same run, and written to BENCHMARKS.md.
//!
//! Absolute times on a shared 2-core VM drift from minute to minute, so every headline
//! figure is a ratio of two things measured together, and each is the median of rounds
//! that alternate between the things compared.
//!
//! `peers` holds the traffic and the tcprtt child, `runs` the phases that sample, and
//! `report` turns the samples into BENCHMARKS.md.

mod peers;
mod report;
mod runs;

use std::{fs, time::Duration};

use anyhow::{Context, Result, bail, ensure};

use crate::{Project, is_root};

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

pub fn run(project: &Project) -> Result<()> {
    project.setup()?;
    project.build_release()?;
    ensure!(
        is_root(),
        "the benchmark loads eBPF programs: run `cargo xtask bench` as root"
    );
    let bin = project.release_bin();
    let object = runs::newest_object(&project.root)?;
    let stale = crate::tcprtt_programs();
    if !stale.is_empty() {
        bail!(
            "tcprtt programs are already loaded ({}); stop them before benchmarking",
            stale.join(", ")
        );
    }
    let placements = peers::placements()?;
    let load_average = fs::read_to_string("/proc/loadavg").context("reading /proc/loadavg")?;

    eprintln!("bench: in-kernel cost per event ({ROUNDS} rounds per mode, alternating)");
    let (cost, verified) = runs::cost(&bin, &object, &placements)?;
    eprintln!("bench: transactions per second with and without tcprtt ({TPS_PAIRS} pairs)");
    let tps = runs::tps(&bin, &placements)?;
    eprintln!("bench: start-up, shut-down and memory ({ROUNDS} rounds)");
    let lifecycle = runs::lifecycle(&bin, &placements[0])?;
    eprintln!("bench: {SCALE_KEYS} remote addresses with --by-raddr ({SCALE_ROUNDS} rounds)");
    let scale = runs::scale(&bin, &placements[0])?;
    runs::ensure_unloaded()?;

    let markdown = report::render(&report::Results {
        load_average: load_average
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        placements: placements.iter().map(|p| p.name).collect(),
        cost: cost
            .into_iter()
            .map(|per_placement| per_placement.into_iter().map(Into::into).collect())
            .collect(),
        verified,
        tps: tps.into_iter().map(Into::into).collect(),
        startup: stat(lifecycle.startup),
        shutdown: stat(lifecycle.shutdown),
        rss: stat(lifecycle.rss),
        memory: lifecycle.memory,
        scale: scale.into(),
    })?;
    fs::write(project.root.join("BENCHMARKS.md"), &markdown).context("writing BENCHMARKS.md")?;
    print!("{markdown}");
    Ok(())
}
