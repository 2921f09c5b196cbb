//! Reading the kernel's histograms, one interval at a time, without losing a sample.
//!
//! The program writes into one of two sets of maps (`ACTIVE` says which): a per-CPU hash
//! map for grouped histograms and a per-CPU array for the all-traffic one. To take an interval,
//! userspace points `ACTIVE` at the other map, waits until every program run that may
//! have read the old index has finished ([`GracePeriod`]), then reads and empties the old
//! map, which by then nothing writes. Every sample lands in exactly one interval.

use std::{
    collections::HashMap,
    os::fd::{AsFd, AsRawFd},
    path::PathBuf,
};

use anyhow::{Context, Result, anyhow};
use aya::maps::{Array, MapData, PerCpuArray, PerCpuHashMap, PerCpuValues};
use tcprtt_common::{HistKey, HistValue, stat};

use crate::{grace::GracePeriod, histogram::Histogram, loader::Probe};

/// Event counters over one interval.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Times the hook fired: program runs (counted only while run-time statistics are on,
    /// i.e. with -v) plus misses.
    pub seen: u64,
    /// Segments that passed every filter: counted in a histogram or dropped.
    pub matched: u64,
    /// Matched segments with no room left in the histogram map.
    pub dropped: u64,
    /// Matched segments of a new key the kernel could not allocate a histogram for.
    pub no_memory: u64,
    /// Segments whose srtt could not be read, or of an unknown family.
    pub unreadable: u64,
    /// Segments the kernel did not run the program for because it was already running on
    /// that CPU (a softirq interrupting process-context receive processing).
    pub missed: u64,
}

pub struct Interval {
    pub histograms: Vec<(HistKey, Histogram)>,
    pub counters: Counters,
}

pub struct Collector {
    hists: [PerCpuHashMap<MapData, HistKey, HistValue>; 2],
    alls: [PerCpuArray<MapData, HistValue>; 2],
    active: Array<MapData, u32>,
    active_index: u32,
    stats: PerCpuArray<MapData, u64>,
    totals: Counters,
    grace: GracePeriod,
    /// `/proc/self/fdinfo/<program fd>`: where the kernel reports the program's misses.
    fdinfo: PathBuf,
    /// What earlier drains took from the kernel since the last interval.
    pending: HashMap<HistKey, Histogram>,
}

/// A `name:\tvalue` field of a BPF program's fdinfo.
pub fn fdinfo_field(fdinfo: &str, name: &str) -> Option<u64> {
    fdinfo
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|v| v.trim().parse().ok())
}

fn take<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
    probe: &mut Probe,
    name: &str,
) -> Result<T> {
    let map = probe
        .ebpf
        .take_map(name)
        .ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))?;
    T::try_from(map).with_context(|| format!("opening map {name}"))
}

impl Collector {
    pub fn new(probe: &mut Probe) -> Result<Self> {
        let fd = probe
            .ebpf
            .program(probe.attach_point.program_name())
            .context("tcprtt's program vanished from the object")?
            .fd()
            .context("getting the program's file descriptor")?
            .as_fd()
            .as_raw_fd();
        Ok(Self {
            fdinfo: PathBuf::from(format!("/proc/self/fdinfo/{fd}")),
            hists: [take(probe, "HIST0")?, take(probe, "HIST1")?],
            alls: [take(probe, "ALL0")?, take(probe, "ALL1")?],
            active: take(probe, "ACTIVE")?,
            active_index: 0,
            stats: take(probe, "STATS")?,
            totals: Counters::default(),
            grace: GracePeriod::new()?,
            pending: HashMap::new(),
        })
    }

    /// Cumulative counters, except `matched`, which [`Self::take_interval`] adds up.
    fn read_totals(&self) -> Result<Counters> {
        let sum = |index: u32| -> Result<u64> {
            let per_cpu = self
                .stats
                .get(&index, 0)
                .with_context(|| format!("reading event counter {index}"))?;
            Ok(per_cpu.iter().sum())
        };
        let info = self.read_fdinfo()?;
        let field = |name: &str| {
            fdinfo_field(&info, name)
                .with_context(|| format!("no {name} in {}", self.fdinfo.display()))
        };
        // Kernels before 5.12 do not count misses.
        let missed = fdinfo_field(&info, "recursion_misses").unwrap_or(0);
        Ok(Counters {
            // run_cnt only moves while run-time statistics are on (-v).
            seen: field("run_cnt")? + missed,
            matched: 0,
            dropped: sum(stat::DROPPED)?,
            no_memory: sum(stat::NO_MEMORY)?,
            unreadable: sum(stat::UNREADABLE)?,
            missed,
        })
    }

    fn read_fdinfo(&self) -> Result<String> {
        std::fs::read_to_string(&self.fdinfo)
            .with_context(|| format!("reading {}", self.fdinfo.display()))
    }

    /// A counter the kernel keeps for the program (`run_time_ns`, `run_cnt`, ...).
    pub fn program_stat(&self, name: &str) -> Result<u64> {
        fdinfo_field(&self.read_fdinfo()?, name)
            .with_context(|| format!("no {name} in {}", self.fdinfo.display()))
    }

    /// Event counters over the whole run, as of the last [`Self::take_interval`].
    pub fn totals(&self) -> Counters {
        self.totals
    }

    /// Moves everything the kernel recorded so far into userspace's 64-bit totals and
    /// empties the maps. Must run at least every `DRAIN_PERIOD_SECS` so that no 32-bit
    /// kernel bucket can wrap.
    pub fn drain(&mut self) -> Result<()> {
        let old = self.active_index as usize;
        let next = 1 - self.active_index;
        self.active
            .set(0, next, 0)
            .context("switching the program to the other histogram map")?;
        self.active_index = next;
        self.grace.wait()?;

        let map = &mut self.hists[old];
        let keys = map
            .keys()
            .collect::<Result<Vec<_>, _>>()
            .context("listing histogram keys")?;
        for key in keys {
            let shares = map.get(&key, 0).context("reading a histogram")?;
            self.pending
                .entry(key)
                .or_default()
                .absorb(&Histogram::merge(shares.iter()));
            map.remove(&key).context("emptying the histogram map")?;
        }

        let all = &mut self.alls[old];
        let shares = all
            .get(&0, 0)
            .context("reading the all-traffic histogram")?;
        let hist = Histogram::merge(shares.iter());
        if hist.count > 0 {
            self.pending
                .entry(HistKey::default())
                .or_default()
                .absorb(&hist);
            let zeros = vec![HistValue::ZERO; shares.len()];
            all.set(0, PerCpuValues::try_from(zeros)?, 0)
                .context("emptying the all-traffic histogram")?;
        }
        Ok(())
    }

    /// Everything recorded since the previous call, and the maps emptied for the next one.
    pub fn take_interval(&mut self) -> Result<Interval> {
        self.drain()?;
        let histograms: Vec<(HistKey, Histogram)> = self.pending.drain().collect();

        let totals = self.read_totals()?;
        let dropped = totals.dropped - self.totals.dropped;
        let no_memory = totals.no_memory - self.totals.no_memory;
        let counters = Counters {
            seen: totals.seen - self.totals.seen,
            matched: histograms.iter().map(|(_, h)| h.count).sum::<u64>() + dropped + no_memory,
            dropped,
            no_memory,
            unreadable: totals.unreadable - self.totals.unreadable,
            missed: totals.missed - self.totals.missed,
        };
        self.totals = Counters {
            matched: self.totals.matched + counters.matched,
            ..totals
        };
        Ok(Interval {
            histograms,
            counters,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::fdinfo_field;

    #[test]
    fn reads_program_counters_from_fdinfo() {
        let info =
            "pos:\t0\nprog_id:\t794\nrun_time_ns:\t1234\nrun_cnt:\t10\nrecursion_misses:\t3\n";
        assert_eq!(fdinfo_field(info, "run_time_ns"), Some(1234));
        assert_eq!(fdinfo_field(info, "recursion_misses"), Some(3));
        assert_eq!(fdinfo_field(info, "run_cnt"), Some(10));
        assert_eq!(fdinfo_field(info, "missing"), None);
    }
}
