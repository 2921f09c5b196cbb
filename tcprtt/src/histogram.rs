//! One histogram as userspace sees it: the per-CPU shares added up, plus the statistics
//! derived from it.

use tcprtt_common::{
    FINE_BUCKETS, HistValue, LOG2_SLOTS, bucket_high, bucket_low, log2_slot_of_bucket,
};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Histogram {
    pub buckets: [u64; FINE_BUCKETS],
    pub count: u64,
    pub sum: u64,
    pub min: u64,
    pub max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            buckets: [0; FINE_BUCKETS],
            count: 0,
            sum: 0,
            min: 0,
            max: 0,
        }
    }
}

impl Histogram {
    /// Adds up the per-CPU shares of one key. A CPU that saw no sample has count 0 and its
    /// min/max mean nothing.
    pub fn merge<'a>(shares: impl IntoIterator<Item = &'a HistValue>) -> Self {
        let mut h = Self::default();
        for share in shares {
            h.add(
                share.buckets.iter().map(|n| u64::from(*n)),
                [share.count, share.sum, share.min, share.max],
            );
        }
        h
    }

    /// Adds `other` to this histogram (one drain of the kernel's maps to the next).
    pub fn absorb(&mut self, other: &Histogram) {
        self.add(
            other.buckets.iter().copied(),
            [other.count, other.sum, other.min, other.max],
        );
    }

    fn add(&mut self, buckets: impl Iterator<Item = u64>, [count, sum, min, max]: [u64; 4]) {
        if count == 0 {
            return;
        }
        for (total, part) in self.buckets.iter_mut().zip(buckets) {
            *total += part;
        }
        self.min = if self.count == 0 {
            min
        } else {
            self.min.min(min)
        };
        self.max = self.max.max(max);
        self.count += count;
        self.sum += sum;
    }

    /// Builds a histogram from raw samples, as the kernel would (a reference for tests).
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

    /// Counts per classic log2 slot (bcc's layout).
    pub fn log2_slots(&self) -> [u64; LOG2_SLOTS] {
        let mut slots = [0; LOG2_SLOTS];
        for (bucket, n) in self.buckets.iter().enumerate() {
            slots[log2_slot_of_bucket(bucket)] += n;
        }
        slots
    }

    pub fn average(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum as f64 / self.count as f64
        }
    }

    /// Estimated `q`-quantile (0 < q <= 1): the middle of the fine bucket holding the rank
    /// (the part of it between the exact min and max). A fine bucket spans at most 1/8 of its values, so
    /// the estimate is within 1/16 (6.25 %) of a value in that bucket.
    pub fn percentile(&self, q: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let rank = ((q * self.count as f64).ceil() as u64).clamp(1, self.count);
        // The extremes are known exactly.
        if rank == 1 {
            return self.min;
        }
        if rank == self.count {
            return self.max;
        }
        let mut seen = 0;
        for (bucket, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                let low = bucket_low(bucket).max(self.min);
                let high = bucket_high(bucket).min(self.max);
                return low + (high - low) / 2;
            }
        }
        self.max
    }

    /// Non-empty fine buckets as (low, high, count).
    pub fn nonempty_buckets(&self) -> impl Iterator<Item = (u64, u64, u64)> + '_ {
        self.buckets
            .iter()
            .enumerate()
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
        let to_value = |h: &Histogram| HistValue {
            buckets: h.buckets.map(|n| n as u32),
            reserved: 0,
            count: h.count,
            sum: h.sum,
            min: h.min,
            max: h.max,
        };
        let idle = HistValue::ZERO;
        let merged = Histogram::merge([&idle, &to_value(&a), &idle, &to_value(&b)]);
        assert_eq!(merged, Histogram::from_samples([5, 9, 300, 2, 40]));
        assert_eq!(
            (merged.count, merged.sum, merged.min, merged.max),
            (5, 356, 2, 300)
        );
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
        let slots = h.log2_slots();
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
            let est = h.percentile(q) as f64;
            assert!(
                (est - exact).abs() / exact <= 0.125,
                "p{q}: {est} vs {exact}"
            );
        }
        assert_eq!(h.percentile(1.0), 100_000);
        let single = Histogram::from_samples([40_000]);
        assert_eq!(single.percentile(0.5), 40_000);
        assert_eq!(Histogram::default().percentile(0.5), 0);
    }
}
