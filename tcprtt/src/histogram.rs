//! One histogram as userspace sees it: the per-CPU shares added up, plus the statistics
//! derived from it.

use tcprtt_common::{
    FINE_BUCKETS, HistValue, LOG2_SLOTS, Log2Value, bucket_high, bucket_low, log2_slot_of_bucket,
};

/// What the kernel keeps beyond bcc's rows and the average when an output shows it: the
/// fine buckets and the exact extremes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Detail {
    pub buckets: [u64; FINE_BUCKETS],
    pub min: u64,
    pub max: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Histogram {
    /// Samples per classic log2 slot (bcc's layout).
    pub slots: [u64; LOG2_SLOTS],
    pub count: u64,
    pub sum: u64,
    /// `None` when the kernel kept log2 slots only, or nothing was counted.
    pub detail: Option<Detail>,
}

impl Histogram {
    /// Adds up the per-CPU shares of one key. A CPU that saw no sample has count 0 and its
    /// min/max mean nothing.
    pub fn merge<'a>(shares: impl IntoIterator<Item = &'a HistValue>) -> Self {
        let mut h = Self::default();
        for share in shares {
            h.absorb(&Self::from_fine(share));
        }
        h
    }

    /// One kernel histogram with fine buckets.
    fn from_fine(value: &HistValue) -> Self {
        let buckets = value.buckets.map(u64::from);
        let mut slots = [0; LOG2_SLOTS];
        for (bucket, n) in buckets.iter().enumerate() {
            slots[log2_slot_of_bucket(bucket)] += n;
        }
        Self {
            slots,
            count: value.count,
            sum: value.sum,
            detail: (value.count > 0).then_some(Detail {
                buckets,
                min: value.min,
                max: value.max,
            }),
        }
    }

    /// One kernel histogram of log2 slots only; its count is the slots' total.
    pub fn from_log2(value: &Log2Value) -> Self {
        let slots = value.slots.map(u64::from);
        Self {
            slots,
            count: slots.iter().sum(),
            sum: value.sum,
            detail: None,
        }
    }

    /// Adds `other` to this histogram (another CPU's share, or the next drain). The detail
    /// survives only if both sides have it.
    pub fn absorb(&mut self, other: &Histogram) {
        if other.count == 0 {
            return;
        }
        if self.count == 0 {
            *self = other.clone();
            return;
        }
        for (total, part) in self.slots.iter_mut().zip(other.slots) {
            *total += part;
        }
        self.count += other.count;
        self.sum += other.sum;
        self.detail = match (self.detail.take(), &other.detail) {
            (Some(mut mine), Some(theirs)) => {
                for (total, part) in mine.buckets.iter_mut().zip(theirs.buckets) {
                    *total += part;
                }
                mine.min = mine.min.min(theirs.min);
                mine.max = mine.max.max(theirs.max);
                Some(mine)
            }
            _ => None,
        };
    }

    /// Builds a histogram from raw samples, as the kernel would with fine buckets (a
    /// reference for tests).
    #[cfg(test)]
    pub fn from_samples(samples: impl IntoIterator<Item = u64>) -> Self {
        let mut v = HistValue::ZERO;
        for s in samples {
            v.buckets[tcprtt_common::fine_bucket(s)] += 1;
            v.min = if v.count == 0 { s } else { v.min.min(s) };
            v.max = v.max.max(s);
            v.count += 1;
            v.sum += s;
        }
        Self::merge([&v])
    }

    pub fn average(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum as f64 / self.count as f64
        }
    }

    /// Smallest sample: `None` without the detail, 0 for an empty histogram.
    pub fn min(&self) -> Option<u64> {
        self.extreme(|d| d.min)
    }

    /// Largest sample, as [`Self::min`].
    pub fn max(&self) -> Option<u64> {
        self.extreme(|d| d.max)
    }

    fn extreme(&self, pick: impl Fn(&Detail) -> u64) -> Option<u64> {
        if self.count == 0 {
            Some(0)
        } else {
            self.detail.as_ref().map(pick)
        }
    }

    /// Estimated `q`-quantile (0 < q <= 1): the middle of the fine bucket holding the rank
    /// (the part of it between the exact min and max). A fine bucket spans at most 1/8 of
    /// its values, so the estimate is within 1/16 (6.25 %) of a value in that bucket.
    /// `None` without fine buckets; 0 for an empty histogram.
    pub fn percentile(&self, q: f64) -> Option<u64> {
        if self.count == 0 {
            return Some(0);
        }
        let detail = self.detail.as_ref()?;
        let rank = ((q * self.count as f64).ceil() as u64).clamp(1, self.count);
        // The extremes are known exactly.
        if rank == 1 {
            return Some(detail.min);
        }
        if rank == self.count {
            return Some(detail.max);
        }
        let mut seen = 0;
        for (bucket, n) in detail.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                let low = bucket_low(bucket).max(detail.min);
                let high = bucket_high(bucket).min(detail.max);
                return Some(low + (high - low) / 2);
            }
        }
        Some(detail.max)
    }

    /// Non-empty fine buckets as (low, high, count); none without fine buckets.
    pub fn nonempty_buckets(&self) -> impl Iterator<Item = (u64, u64, u64)> + '_ {
        self.detail
            .iter()
            .flat_map(|d| d.buckets.iter().enumerate())
            .filter(|(_, n)| **n > 0)
            .map(|(b, n)| (bucket_low(b), bucket_high(b), *n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merging_cpus_keeps_exact_min_max_and_skips_idle_cpus() {
        let a = Histogram::from_samples([5, 9, 300]);
        let b = Histogram::from_samples([2, 40]);
        let to_value = |h: &Histogram| {
            let d = h.detail.as_ref().unwrap();
            HistValue {
                buckets: d.buckets.map(|n| n as u32),
                reserved: 0,
                count: h.count,
                sum: h.sum,
                min: d.min,
                max: d.max,
            }
        };
        let idle = HistValue::ZERO;
        let merged = Histogram::merge([&idle, &to_value(&a), &idle, &to_value(&b)]);
        assert_eq!(merged, Histogram::from_samples([5, 9, 300, 2, 40]));
        let d = merged.detail.as_ref().unwrap();
        assert_eq!((merged.count, merged.sum, d.min, d.max), (5, 356, 2, 300));
    }

    #[test]
    fn absorbing_drains_equals_one_histogram_of_all_samples() {
        let mut total = Histogram::default();
        total.absorb(&Histogram::from_samples([7, 900]));
        total.absorb(&Histogram::default());
        total.absorb(&Histogram::from_samples([3, 40_000]));
        assert_eq!(total, Histogram::from_samples([7, 900, 3, 40_000]));
    }

    #[test]
    fn log2_slots_sum_the_fine_buckets() {
        let h = Histogram::from_samples([0, 1, 2, 3, 8, 15, 16, 40_000, 65_535, 1 << 40]);
        let slots = h.slots;
        assert_eq!(slots[0], 2);
        assert_eq!(slots[1], 2);
        assert_eq!(slots[3], 2);
        assert_eq!(slots[4], 1);
        assert_eq!(slots[15], 2);
        assert_eq!(slots[26], 1);
        assert_eq!(slots.iter().sum::<u64>(), h.count);
    }

    #[test]
    fn percentiles_are_within_an_eighth_and_clamped_to_min_max() {
        let samples: Vec<u64> = (1..=1000).map(|i| i * 100).collect();
        let h = Histogram::from_samples(samples.iter().copied());
        for (q, exact) in [(0.5, 50_000.0), (0.9, 90_000.0), (0.99, 99_000.0)] {
            let est = h.percentile(q).unwrap() as f64;
            assert!(
                (est - exact).abs() / exact <= 0.125,
                "p{q}: {est} vs {exact}"
            );
        }
        assert_eq!(h.percentile(1.0), Some(100_000));
        let single = Histogram::from_samples([40_000]);
        assert_eq!(single.percentile(0.5), Some(40_000));
        assert_eq!(Histogram::default().percentile(0.5), Some(0));
    }

    #[test]
    fn log2_values_give_slots_count_and_sum_but_no_detail() {
        let samples = [0, 1, 5, 40, 40_000, 1 << 30];
        let mut value = Log2Value::ZERO;
        for s in samples {
            value.slots[tcprtt_common::log2_slot(s)] += 1;
            value.sum += s;
        }
        let h = Histogram::from_log2(&value);
        let fine = Histogram::from_samples(samples);
        assert_eq!((h.slots, h.count, h.sum), (fine.slots, 6, fine.sum));
        assert_eq!(h.detail, None);
        assert_eq!(h.percentile(0.5), None);
        assert_eq!(h.nonempty_buckets().count(), 0);
    }

    #[test]
    fn absorbing_a_log2_histogram_keeps_the_totals_and_drops_the_detail() {
        let mut value = Log2Value::ZERO;
        value.slots[5] = 2;
        value.sum = 70;
        let mut total = Histogram::from_samples([7, 900]);
        total.absorb(&Histogram::from_log2(&value));
        assert_eq!((total.count, total.sum, total.slots[5]), (4, 977, 2));
        assert_eq!(total.detail, None);
        let mut empty_first = Histogram::default();
        empty_first.absorb(&Histogram::from_samples([7]));
        assert_eq!(empty_first, Histogram::from_samples([7]));
    }
}
