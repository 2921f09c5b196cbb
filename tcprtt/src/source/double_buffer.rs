//! Reading the kernel's histograms, one interval at a time, without losing a sample.
//!
//! The program writes into one of two sets of maps (`ACTIVE` says which): a hash map of
//! histograms shared by all CPUs for grouped histograms (with fine buckets, or log2 slots
//! only) and a per-CPU array for the all-traffic one. To drain, userspace
//! points `ACTIVE` at the other set, waits until every program run that may have read the
//! old index has finished, then reads and empties the old set, which by then nothing
//! writes. Every sample lands in exactly one interval.

use anyhow::{Context, Result};
use aya::{
    Ebpf, Pod,
    maps::{Array, ArrayOfMaps, HashMap, Map, MapData, PerCpuArray, PerCpuValues},
};
use std::collections::HashMap as StdHashMap;

use tcprtt_common::{FINE_BUCKETS, HistKey, HistValue, HotFine, HotKey, Log2Value};

use super::take_map;
use crate::{
    histogram::Histogram,
    report::{Grouping, IfaceNames, Key, Row, Source},
};

/// Waits for running BPF programs: updating a slot of an ARRAY_OF_MAPS makes the
/// `bpf(BPF_MAP_UPDATE_ELEM)` call return only after an RCU grace period, and programs on
/// these hooks run inside RCU read-side sections.
struct GracePeriod {
    outer: ArrayOfMaps<MapData, MapData>,
    inner: MapData,
}

impl GracePeriod {
    fn new(ebpf: &mut Ebpf) -> Result<Self> {
        let inner = match ebpf.take_map("GRACE_INNER") {
            Some(Map::Array(data)) => data,
            _ => anyhow::bail!("map GRACE_INNER missing from the eBPF object"),
        };
        Ok(Self {
            outer: take_map(ebpf, "GRACE")?,
            inner,
        })
    }

    fn wait(&mut self) -> Result<()> {
        self.outer
            .set(0, &self.inner, 0)
            .context("waiting for running BPF programs (array-of-maps update)")
    }
}

/// The pair of grouped maps the program was configured to write, each with the CPUs' hot
/// keys that go with it (see `HotFine`, `HotKey`).
enum Grouped {
    Fine {
        maps: [HashMap<MapData, HistKey, HistValue>; 2],
        hot: Box<[PerCpuArray<MapData, HotFine>; 2]>,
    },
    Log2 {
        maps: [HashMap<MapData, HistKey, Log2Value>; 2],
        hot: Box<[PerCpuArray<MapData, HotKey>; 2]>,
    },
}

/// The samples a CPU holds for its hot key in the fine maps, as a histogram.
fn held_fine(hot: &HotFine) -> Histogram {
    let mut value = HistValue {
        count: hot.counts.iter().map(|n| u64::from(*n)).sum(),
        sum: hot.sum,
        min: hot.min,
        max: hot.max,
        ..HistValue::ZERO
    };
    for (&bucket, &n) in hot.buckets.iter().zip(&hot.counts) {
        if let Some(total) = (bucket as usize)
            .checked_sub(1)
            .filter(|b| *b < FINE_BUCKETS)
            .map(|b| &mut value.buckets[b])
        {
            *total += n;
        }
    }
    Histogram::merge([&value])
}

/// Adds the samples CPUs held for their hot keys (`(key, samples)` of each copy in use) to
/// the histograms drained from the map.
fn add_held(
    taken: &mut Vec<(HistKey, Histogram)>,
    hot: impl IntoIterator<Item = (HistKey, Histogram)>,
) {
    let mut held: StdHashMap<HistKey, Histogram> = StdHashMap::new();
    for (key, hist) in hot {
        held.entry(key).or_default().absorb(&hist);
    }
    held.retain(|_, hist| hist.count > 0);
    for (key, hist) in taken.iter_mut() {
        if let Some(part) = held.remove(key) {
            hist.absorb(&part);
        }
    }
    let mut rest: Vec<_> = held.into_iter().collect();
    rest.sort_by_key(|(key, _)| *key);
    taken.extend(rest);
}

/// Reads the CPUs' hot copies in `hot`, adds the samples of those `in_use` says hold a
/// key to `taken`, and empties them all.
fn take_hot<V: Pod>(
    hot: &mut PerCpuArray<MapData, V>,
    empty: V,
    in_use: impl Fn(&V) -> Option<(HistKey, Histogram)>,
    taken: &mut Vec<(HistKey, Histogram)>,
) -> Result<()> {
    let shares = hot.get(&0, 0).context("reading the CPUs' hot keys")?;
    add_held(taken, shares.iter().filter_map(in_use));
    empty_per_cpu(hot, empty, shares.len()).context("emptying the CPUs' hot keys")
}

/// Writes `empty` into every CPU's copy of the one slot of `array`.
fn empty_per_cpu<V: Pod>(array: &mut PerCpuArray<MapData, V>, empty: V, cpus: usize) -> Result<()> {
    array.set(0, PerCpuValues::try_from(vec![empty; cpus])?, 0)?;
    Ok(())
}

/// Reads every histogram of `map` and empties it.
fn drain<V: Pod>(
    map: &mut HashMap<MapData, HistKey, V>,
    to_hist: impl Fn(&V) -> Histogram,
    taken: &mut Vec<(HistKey, Histogram)>,
) -> Result<()> {
    let keys = map
        .keys()
        .collect::<Result<Vec<_>, _>>()
        .context("listing histogram keys")?;
    taken.reserve(keys.len());
    for key in keys {
        let value = map.get(&key, 0).context("reading a histogram")?;
        taken.push((key, to_hist(&value)));
        map.remove(&key).context("emptying the histogram map")?;
    }
    Ok(())
}

/// Two sets of histogram maps the program writes alternately.
pub struct DoubleBuffer {
    grouped: Grouped,
    alls: [PerCpuArray<MapData, HistValue>; 2],
    active: Array<MapData, u32>,
    active_index: u32,
    grace: GracePeriod,
    /// The interfaces wire keys may name.
    ifaces: IfaceNames,
    /// Held so that the programs, which may be loaded after this is built, find it.
    _new_hist: Array<MapData, HistValue>,
}

impl DoubleBuffer {
    /// Takes the maps named `{prefix}HIST0/1` and `{prefix}HOT0/1` (`{prefix}LOG2_HIST0/1`
    /// and `{prefix}LOG2_HOT0/1` if `log2_only`, as the program's configuration says),
    /// `{prefix}ALL0/1` and `{prefix}ACTIVE`, and writes the value new keys start from
    /// into `{prefix}NEW_HIST`.
    pub fn new(ebpf: &mut Ebpf, prefix: &str, log2_only: bool) -> Result<Self> {
        let take = |name: &str| format!("{prefix}{name}");
        let mut new_hist: Array<MapData, HistValue> = take_map(ebpf, &take("NEW_HIST"))?;
        let empty = HistValue {
            min: u64::MAX,
            ..HistValue::ZERO
        };
        new_hist
            .set(0, empty, 0)
            .context("writing the value new histograms start from")?;
        let grouped = if log2_only {
            Grouped::Log2 {
                maps: [
                    take_map(ebpf, &take("LOG2_HIST0"))?,
                    take_map(ebpf, &take("LOG2_HIST1"))?,
                ],
                hot: Box::new([
                    take_map(ebpf, &take("LOG2_HOT0"))?,
                    take_map(ebpf, &take("LOG2_HOT1"))?,
                ]),
            }
        } else {
            Grouped::Fine {
                maps: [
                    take_map(ebpf, &take("HIST0"))?,
                    take_map(ebpf, &take("HIST1"))?,
                ],
                hot: Box::new([
                    take_map(ebpf, &take("HOT0"))?,
                    take_map(ebpf, &take("HOT1"))?,
                ]),
            }
        };
        Ok(Self {
            grouped,
            alls: [
                take_map(ebpf, &take("ALL0"))?,
                take_map(ebpf, &take("ALL1"))?,
            ],
            active: take_map(ebpf, &take("ACTIVE"))?,
            active_index: 0,
            grace: GracePeriod::new(ebpf)?,
            ifaces: IfaceNames::default(),
            _new_hist: new_hist,
        })
    }

    /// Names the interfaces the wire programs' keys hold the index of.
    pub fn name_ifaces(&mut self, ifaces: IfaceNames) {
        self.ifaces = ifaces;
    }

    /// Everything the kernel recorded since the previous call, with the maps emptied. Must
    /// run at least every `DRAIN_PERIOD_SECS` so that no 32-bit kernel bucket can wrap.
    pub fn take(&mut self) -> Result<Vec<(HistKey, Histogram)>> {
        let old = self.active_index as usize;
        let next = 1 - self.active_index;
        self.active
            .set(0, next, 0)
            .context("switching the program to the other histogram map")?;
        self.active_index = next;
        self.grace.wait()?;

        let mut taken = Vec::new();
        match &mut self.grouped {
            Grouped::Fine { maps, hot } => {
                drain(
                    &mut maps[old],
                    |value| {
                        // The program leaves `count` to userspace in shared histograms.
                        let count = value.buckets.iter().map(|n| u64::from(*n)).sum();
                        Histogram::merge([&HistValue { count, ..*value }])
                    },
                    &mut taken,
                )?;
                take_hot(
                    &mut hot[old],
                    HotFine::ZERO,
                    |h| (h.held != 0).then(|| (h.key, held_fine(h))),
                    &mut taken,
                )?;
            }
            Grouped::Log2 { maps, hot } => {
                drain(&mut maps[old], Histogram::from_log2, &mut taken)?;
                take_hot(
                    &mut hot[old],
                    HotKey::ZERO,
                    |h| (h.held != 0).then(|| (h.key, Histogram::from_log2(&h.value))),
                    &mut taken,
                )?;
            }
        }

        let all = &mut self.alls[old];
        let shares = all
            .get(&0, 0)
            .context("reading the all-traffic histogram")?;
        let hist = Histogram::merge(shares.iter());
        if hist.count > 0 {
            taken.push((HistKey::default(), hist));
            empty_per_cpu(all, HistValue::ZERO, shares.len())
                .context("emptying the all-traffic histogram")?;
        }
        Ok(taken)
    }

    /// [`Self::take`], decoded into report rows measured by `source`.
    pub fn take_rows(&mut self, source: Source, grouping: Grouping) -> Result<Vec<Row>> {
        Ok(self
            .take()?
            .into_iter()
            .map(|(raw, hist)| Row {
                source,
                key: Key::decode(grouping, &raw, &self.ifaces),
                hist,
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use tcprtt_common::LOG2_SLOTS;

    use super::*;

    fn key(rport: u16) -> HistKey {
        HistKey {
            rport,
            ..HistKey::default()
        }
    }

    fn hot(rport: u16, slot: usize, n: u32, sum: u64) -> HotKey {
        let mut slots = [0; LOG2_SLOTS];
        slots[slot] = n;
        HotKey {
            key: key(rport),
            held: 1,
            value: Log2Value {
                sum,
                slots,
                reserved: 0,
            },
        }
    }

    #[test]
    fn held_samples_join_their_key_or_make_a_row_and_empty_copies_add_nothing() {
        let log2 = |h: &HotKey| (h.held != 0).then(|| (h.key, Histogram::from_log2(&h.value)));
        let mut taken = vec![(key(1), Histogram::from_log2(&hot(1, 3, 5, 50).value))];
        let cpus = [
            hot(1, 3, 2, 20),
            hot(2, 4, 1, 17),
            HotKey::ZERO,
            HotKey {
                held: 0,
                ..hot(3, 1, 9, 9)
            },
            hot(1, 5, 1, 40),
        ];
        add_held(&mut taken, cpus.iter().filter_map(log2));
        assert_eq!(taken.len(), 2);
        let (k, h) = &taken[0];
        assert_eq!(
            (*k, h.count, h.sum, h.slots[3], h.slots[5]),
            (key(1), 8, 110, 7, 1)
        );
        let (k, h) = &taken[1];
        assert_eq!((*k, h.count, h.sum, h.slots[4]), (key(2), 1, 17, 1));
    }

    #[test]
    fn a_fine_hot_copy_is_the_histogram_of_its_samples() {
        let samples = [40, 41, 47, 300, 40];
        let mut copy = HotFine {
            key: key(7),
            held: 1,
            min: u64::MAX,
            ..HotFine::ZERO
        };
        for s in samples {
            let b = tcprtt_common::fine_bucket(s) as u32 + 1;
            let i = copy
                .buckets
                .iter()
                .position(|x| *x == b || *x == 0)
                .unwrap();
            copy.buckets[i] = b;
            copy.counts[i] += 1;
            copy.sum += s;
            copy.min = copy.min.min(s);
            copy.max = copy.max.max(s);
        }
        assert_eq!(held_fine(&copy), Histogram::from_samples(samples));
    }
}
