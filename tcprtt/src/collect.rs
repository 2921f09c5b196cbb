//! Reading the kernel's histograms, one interval at a time, without losing a sample.
//!
//! The program writes into one of two sets of maps (`ACTIVE` says which): a per-CPU hash
//! map for grouped histograms and a per-CPU array for the all-traffic one. To take an interval,
//! userspace points `ACTIVE` at the other map, waits until every program run that may
//! have read the old index has finished ([`GracePeriod`]), then reads and empties the old
//! map, which by then nothing writes. Every sample lands in exactly one interval.

use anyhow::{Context, Result, anyhow};
use aya::maps::{Array, MapData, PerCpuArray, PerCpuHashMap, PerCpuValues};
use tcprtt_common::{HistKey, HistValue, stat};

use crate::{grace::GracePeriod, histogram::Histogram, loader::Probe};

/// Event counters over one interval.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub seen: u64,
    pub matched: u64,
    pub dropped: u64,
    pub unreadable: u64,
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
        Ok(Self {
            hists: [take(probe, "HIST0")?, take(probe, "HIST1")?],
            alls: [take(probe, "ALL0")?, take(probe, "ALL1")?],
            active: take(probe, "ACTIVE")?,
            active_index: 0,
            stats: take(probe, "STATS")?,
            totals: Counters::default(),
            grace: GracePeriod::new()?,
        })
    }

    fn read_totals(&self) -> Result<Counters> {
        let sum = |index: u32| -> Result<u64> {
            let per_cpu = self
                .stats
                .get(&index, 0)
                .with_context(|| format!("reading event counter {index}"))?;
            Ok(per_cpu.iter().sum())
        };
        Ok(Counters {
            seen: sum(stat::SEEN)?,
            matched: sum(stat::MATCHED)?,
            dropped: sum(stat::DROPPED)?,
            unreadable: sum(stat::UNREADABLE)?,
        })
    }

    /// Event counters over the whole run, as of the last [`Self::take_interval`].
    pub fn totals(&self) -> Counters {
        self.totals
    }

    /// Everything recorded since the previous call, and the map emptied for the next one.
    pub fn take_interval(&mut self) -> Result<Interval> {
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
        let mut histograms = Vec::with_capacity(keys.len());
        for key in keys {
            let shares = map.get(&key, 0).context("reading a histogram")?;
            histograms.push((key, Histogram::merge(shares.iter())));
            map.remove(&key).context("emptying the histogram map")?;
        }

        let all = &mut self.alls[old];
        let shares = all
            .get(&0, 0)
            .context("reading the all-traffic histogram")?;
        let hist = Histogram::merge(shares.iter());
        if hist.count > 0 {
            histograms.push((HistKey::default(), hist));
            let zeros = vec![HistValue::ZERO; shares.len()];
            all.set(0, PerCpuValues::try_from(zeros)?, 0)
                .context("emptying the all-traffic histogram")?;
        }

        let totals = self.read_totals()?;
        let counters = Counters {
            seen: totals.seen - self.totals.seen,
            matched: totals.matched - self.totals.matched,
            dropped: totals.dropped - self.totals.dropped,
            unreadable: totals.unreadable - self.totals.unreadable,
        };
        self.totals = totals;
        Ok(Interval {
            histograms,
            counters,
        })
    }
}
