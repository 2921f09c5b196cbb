//! What tcprtt printed: its text histograms, parsed back.

/// The labels of the histograms in tcprtt's text output, in order.
pub fn labels(text: &str) -> Vec<String> {
    parse_histograms(text)
        .into_iter()
        .map(|h| h.label)
        .collect()
}

/// One histogram as printed: its label, average, and `low -> high : count` rows.
#[derive(Debug, Clone, PartialEq)]
pub struct Printed {
    pub label: String,
    pub avg: f64,
    pub rows: Vec<(u64, u64, u64)>,
    /// The `-e` line, when present.
    pub extension: Option<String>,
}

impl Printed {
    pub fn count(&self) -> u64 {
        self.rows.iter().map(|r| r.2).sum()
    }

    /// Samples in rows whose range lies within `low..=high`.
    pub fn count_within(&self, low: u64, high: u64) -> u64 {
        self.rows
            .iter()
            .filter(|r| r.0 >= low && r.1 <= high)
            .map(|r| r.2)
            .sum()
    }

    /// Share of the samples in rows within `slot` (`low..=high`).
    pub fn share(&self, slot: (u64, u64)) -> f64 {
        self.count_within(slot.0, slot.1) as f64 / self.count() as f64
    }

    /// A `name value` field of the `-e` line, e.g. `count` or `max`.
    pub fn extension_field(&self, name: &str) -> Option<u64> {
        let ext = self.extension.as_ref()?;
        let mut words = ext.split_whitespace();
        while let Some(w) = words.next() {
            if w == name {
                return words.next()?.trim_start_matches('~').parse().ok();
            }
        }
        None
    }
}

/// Parses every histogram in tcprtt's text output.
pub fn parse_histograms(text: &str) -> Vec<Printed> {
    let mut out: Vec<Printed> = Vec::new();
    for line in text.lines() {
        if let Some((label, rest)) = line.split_once(" [AVG ") {
            out.push(Printed {
                label: label.to_string(),
                avg: rest.trim_end_matches(']').parse().expect("AVG value"),
                rows: Vec::new(),
                extension: None,
            });
        } else if line.starts_with("count ") {
            out.last_mut().expect("-e line after a histogram").extension = Some(line.to_string());
        } else if let Some((range, rest)) = line.split_once(" : ")
            && let Some((low, high)) = range.split_once(" -> ")
        {
            let count = rest.split_whitespace().next().expect("count column");
            out.last_mut().expect("row after a label").rows.push((
                low.trim().parse().expect("low"),
                high.trim().parse().expect("high"),
                count.parse().expect("count"),
            ));
        }
    }
    out
}
