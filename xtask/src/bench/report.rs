//! Samples into medians and ranges, and those into BENCHMARKS.md, with each figure held
//! against its target.

use std::{fmt::Write as _, fs};

use anyhow::{Context, Result};

use super::{
    COST_ROUND_TRIPS, EMPTY_PROGRAM, MODES, ROUNDS, SCALE_KEYS, SCALE_ROUNDS, Stat, TPS_PAIRS,
    TPS_WINDOW,
    runs::{CostSamples, ScaleSamples, TpsSamples},
    stat,
};

pub struct CostStat {
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

pub struct TpsStat {
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

pub struct ScaleStat {
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

pub struct Results {
    pub load_average: String,
    pub placements: Vec<&'static str>,
    /// Per mode, per placement.
    pub cost: Vec<Vec<CostStat>>,
    /// Per mode: instructions and calls after verification.
    pub verified: Vec<(usize, Vec<String>)>,
    /// Per placement.
    pub tps: Vec<TpsStat>,
    pub startup: Stat,
    pub shutdown: Stat,
    pub rss: Stat,
    pub memory: (u64, Vec<(String, u64)>),
    pub scale: ScaleStat,
}

/// N of a report's `WARNING: N samples dropped: <reason>` line, 0 without one.
pub fn warning_count(report: &str, reason: &str) -> u64 {
    report
        .lines()
        .filter(|l| l.contains(reason))
        .find_map(|l| l.strip_prefix("WARNING: ")?.split(' ').next()?.parse().ok())
        .unwrap_or(0)
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "**missed**" }
}

pub fn render(r: &Results) -> Result<String> {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").context("reading /proc/cpuinfo")?;
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("an unknown CPU", |(_, m)| m.trim());
    let cores = std::thread::available_parallelism().context("counting the CPUs")?;
    let uname = rustix::system::uname();
    let release = uname.release().to_string_lossy();
    let now = jiff::Timestamp::now().strftime("%Y-%m-%d %H:%M");
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
        cores, release, now, r.load_average,
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
