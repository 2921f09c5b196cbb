//! BENCHMARKS.md's section on the maps' kernel memory: measured at this machine's CPU
//! count, computed for 16 and 128 with the kernel's own accounting.

use std::fmt::Write as _;

use anyhow::Result;

use super::{
    Tool,
    kernel::{self, MapMemory, element_bytes, round8},
    keys::{KeyCost, NEW_KEYS, elements},
    report_keys::{DEFAULT_MAX_KEYS, get},
};

/// Bytes one more possible CPU adds to a map beyond its elements that are allocated per
/// key, from how the kernel sizes it (`htab_map_mem_usage`, `array_map_mem_usage`):
/// every hash map keeps eight `int` lock counters per CPU; a preallocated per-CPU hash
/// map keeps each element's value per CPU; a preallocated shared hash map keeps one
/// spare element and a pointer to it per CPU; a per-CPU array keeps each value per CPU.
fn fixed_per_cpu(map: &MapMemory) -> u64 {
    let value = round8(map.value);
    match (map.is_hash(), map.is_percpu(), map.preallocated()) {
        (true, true, true) => 32 + value * map.max_entries,
        (true, false, true) => 32 + 48 + round8(map.key) + value + 8,
        (true, _, false) => 32,
        (false, true, _) => value * map.max_entries,
        (false, false, _) => 0,
    }
}

/// A program's maps with `NEW_KEYS` keys, at `cpus` CPUs: measured at `possible` CPUs,
/// plus what each further CPU adds, plus the elements still missing to `NEW_KEYS` in maps
/// that allocate per key.
fn memory_at(k: &KeyCost, possible: u64, cpus: u64) -> u64 {
    k.maps_full
        .iter()
        .map(|m| {
            let fixed = m.bytes + (cpus - possible.min(cpus)) * fixed_per_cpu(m);
            let empty = k.maps_empty.iter().find(|e| e.name == m.name);
            match (
                empty.and_then(|e| elements(e, m, possible)),
                element_bytes(m, cpus),
            ) {
                (Some(n), Some(per)) if n > 0 => {
                    let now = n * element_bytes(m, possible).unwrap_or(per);
                    fixed - now + u64::from(NEW_KEYS) * per
                }
                _ => fixed,
            }
        })
        .sum()
}

pub fn memory(md: &mut String, keys: &[(Tool, KeyCost)], missed: &mut Vec<String>) -> Result<()> {
    let possible = kernel::possible_cpus()?;
    md.push_str("\n## Kernel memory of the maps\n\n");
    let _ = writeln!(
        md,
        "`bytes_memlock` of every map the program uses, as `bpftool -j map show` reports it, \
         after the passes of the previous section with the default `--max-keys` \
         ({NEW_KEYS}), measured with {possible} possible CPUs, and computed for N CPUs with \
         the kernel's own accounting (`htab_map_mem_usage`, `array_map_mem_usage`): \
         M(N) = M({possible}) + (N − {possible}) × F + K × E(N) − k × E({possible}), where \
         F is what a CPU adds to each map besides per-key elements (hash maps: 32 bytes of \
         lock counters; a preallocated shared hash map also one spare element of \
         48 + round8(key) + round8(value) bytes and an 8-byte pointer; per-CPU arrays and \
         preallocated per-CPU hash maps: round8(value) × entries), and for a map that \
         allocates per key, E(N) is one element (48 + round8(key) + 8 + 8, plus 16 + \
         round8(value) × N when per-CPU), k the elements it holds (counted from its growth \
         since start) and K = {NEW_KEYS}.\n\n\
         | tracer | histogram value bytes (map kind) | {possible} CPUs (measured) | 16 CPUs | 128 CPUs |\n\
         |---|---|---|---|---|"
    );
    let mut totals = Vec::new();
    for (tool, k) in keys {
        let at = |n: u64| memory_at(k, possible, n);
        let hist = k
            .maps_full
            .iter()
            .filter(|m| m.is_hash() && m.max_entries >= DEFAULT_MAX_KEYS)
            .map(|m| format!("{} ({})", m.value, m.kind))
            .next()
            .unwrap_or_default();
        let mib = |b: u64| format!("{:.2} MiB", b as f64 / (1 << 20) as f64);
        let _ = writeln!(
            md,
            "| {} | {hist} | {} | {} | {} |",
            tool.name(),
            mib(at(possible)),
            mib(at(16)),
            mib(at(128))
        );
        totals.push((*tool, [at(possible), at(16), at(128)]));
    }
    md.push_str("\nPer map, measured (bytes): ");
    for (tool, k) in keys {
        let maps: Vec<String> = k
            .maps_full
            .iter()
            .map(|m| format!("{} {}", m.name, m.bytes))
            .collect();
        let _ = write!(md, "{}: {}. ", tool.name(), maps.join(", "));
    }
    md.push('\n');
    let total = |tool| totals.iter().find(|(t, _)| *t == tool).map(|(_, v)| *v);
    if let (Some(ours), Some(theirs)) = (total(Tool::Tcprtt), total(Tool::C)) {
        let why = format!(
            "tcprtt's maps of {DEFAULT_MAX_KEYS} or more keys: {}; the C design's: {}",
            key_maps(keys, Tool::Tcprtt),
            key_maps(keys, Tool::C)
        ) + ". The difference, by the same accounting: tcprtt keeps two maps so that \
             intervals are exact, and the one just drained, empty, still holds its bucket \
             array (16 bytes for each of the power of two of buckets at or above \
             `--max-keys`); each element of a map that allocates per key carries an \
             8-byte free-list link a preallocated one does not; and tcprtt's key is 4 bytes \
             longer (the wire source's interface index), 8 once rounded";
        for ((cpus, o), t) in [possible, 16, 128].iter().zip(ours).zip(theirs) {
            if o > t {
                missed.push(format!(
                    "Kernel memory at {cpus} CPUs with {NEW_KEYS} keys: tcprtt {:.1} MiB \
                     against the C design's {:.1} MiB ({:.1}×) where the target is no more. \
                     {why}.",
                    o as f64 / (1 << 20) as f64,
                    t as f64 / (1 << 20) as f64,
                    o as f64 / t as f64,
                ));
            }
        }
    }
    Ok(())
}

/// The maps sized by `--max-keys`, each with its value size, kind and memory.
fn key_maps(keys: &[(Tool, KeyCost)], tool: Tool) -> String {
    let Some(k) = get(keys, tool) else {
        return String::new();
    };
    let maps: Vec<String> = k
        .maps_full
        .iter()
        .filter(|m| m.max_entries >= DEFAULT_MAX_KEYS)
        .map(|m| {
            format!(
                "{} ({}, {}-byte values{}, {:.1} MiB)",
                m.name,
                m.kind,
                m.value,
                if m.preallocated() {
                    ", preallocated"
                } else {
                    ""
                },
                m.bytes as f64 / (1 << 20) as f64
            )
        })
        .collect();
    maps.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(kind: &str, flags: u64, value: u64, max_entries: u64, bytes: u64) -> MapMemory {
        MapMemory {
            name: "HIST".into(),
            kind: kind.into(),
            flags,
            key: 40,
            value,
            max_entries,
            bytes,
        }
    }

    /// Bytes this machine's kernel reported for tcprtt's `BPF_F_NO_PREALLOC` per-CPU
    /// histogram map, empty and with 10240 keys, 2 possible CPUs.
    #[test]
    fn elements_follow_the_kernels_accounting() {
        let empty = map("percpu_hash", 1, 808, 10240, 263_040);
        let full = map("percpu_hash", 1, 808, 10240, 18_039_680);
        assert_eq!(element_bytes(&full, 2), Some(1736));
        assert_eq!(elements(&empty, &full, 2), Some(10240));
        assert_eq!(element_bytes(&map("hash", 0, 128, 10240, 0), 2), None);
    }

    #[test]
    fn memory_grows_with_cpus_only_where_values_are_per_cpu() {
        let k = KeyCost {
            maps_empty: vec![map("percpu_hash", 1, 808, 10240, 263_040)],
            maps_full: vec![map("percpu_hash", 1, 808, 10240, 18_039_680)],
            ..KeyCost::default()
        };
        assert_eq!(memory_at(&k, 2, 2), 18_039_680);
        assert_eq!(memory_at(&k, 2, 3), 18_039_680 + 32 + 10240 * 808);
        let shared = KeyCost {
            maps_empty: vec![map("hash", 0, 128, 10240, 2_475_328)],
            maps_full: vec![map("hash", 0, 128, 10240, 2_475_328)],
            ..KeyCost::default()
        };
        assert_eq!(memory_at(&shared, 2, 3), 2_475_328 + 32 + 48 + 40 + 128 + 8);
    }
}
