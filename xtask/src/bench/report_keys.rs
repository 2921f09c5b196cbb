//! BENCHMARKS.md's sections about keys: the first event of a new key, the maps' kernel
//! memory at 2, 16 and 128 CPUs, and the sustained stream of new keys.

use std::fmt::Write as _;

use anyhow::Result;

use super::{
    Stat, Tool,
    kernel::{self, MapMemory, element_bytes, round8},
    keys::{KeyCost, NEW_KEYS, SUSTAINED, SUSTAINED_RATE, Sustained, elements},
    report::{ratios, verdict},
    stat,
};

const DEFAULT_MAX_KEYS: u64 = 10_240;
const NEW_KEY_TARGET_NS: f64 = 2000.0;

fn get(keys: &[(Tool, KeyCost)], tool: Tool) -> Option<&KeyCost> {
    keys.iter().find(|(t, _)| *t == tool).map(|(_, k)| k)
}

/// ns of the first event of a new key, per round: an event's cost once keys exist plus
/// what creating the key added.
fn first_event(k: &KeyCost) -> Vec<f64> {
    k.existing
        .iter()
        .zip(&k.extra)
        .map(|(e, x)| e + x)
        .collect()
}

pub fn new_keys(md: &mut String, keys: &[(Tool, KeyCost)], missed: &mut Vec<String>) {
    let (Some(ours), Some(theirs)) = (get(keys, Tool::Tcprtt), get(keys, Tool::C)) else {
        return;
    };
    md.push_str("\n## The first event of a new key\n\n");
    let _ = writeln!(
        md,
        "Each tracer with `-B -p <server port>`, {} rounds, alternating. In each, {NEW_KEYS} \
         clients, each bound to its own address in 127.1.0.0/16, connect once to a loopback \
         server, send a byte, read it back and reset (pass 1: the server's sockets make one \
         key per client, filling the default `--max-keys`); then the same clients again \
         (pass 2: the keys exist, but for those the kernel could not allocate in pass 1). \
         Keys in a map that allocates per key are counted from its `bytes_memlock` (see the \
         next section); a preallocated map is taken to hold all {NEW_KEYS}. Each pass's \
         program time is its events at one cost plus its new keys at another; the two \
         passes give both. The first event of a key costs the two added.\n\n\
         | | tcprtt | C peer | tcprtt / C | target | |\n|---|---|---|---|---|---|",
        ours.existing.len()
    );
    let row = |md: &mut String, what: &str, o: &[f64], t: &[f64], target: &str| {
        let _ = writeln!(
            md,
            "| {what} | {} | {} | {} | {target} |",
            stat(o.to_vec()).show(0),
            stat(t.to_vec()).show(0),
            ratios(o, t).show(2)
        );
    };
    row(md, "events in pass 1", &ours.events, &theirs.events, " |");
    row(
        md,
        "keys in the map after pass 1",
        &ours.keys_pass1,
        &theirs.keys_pass1,
        &format!("{NEW_KEYS} |"),
    );
    row(
        md,
        "keys in the map after pass 2",
        &ours.keys_pass2,
        &theirs.keys_pass2,
        &format!("{NEW_KEYS} |"),
    );
    row(
        md,
        "ns per event, keys existing (pass 2)",
        &ours.existing,
        &theirs.existing,
        " |",
    );
    row(
        md,
        "ns a new key adds to its first event",
        &ours.extra,
        &theirs.extra,
        " |",
    );
    let (o, t) = (first_event(ours), first_event(theirs));
    let first = stat(o.clone());
    let ok = first.median < NEW_KEY_TARGET_NS;
    row(
        md,
        "**ns of the first event of a new key**",
        &o,
        &t,
        &format!("< {NEW_KEY_TARGET_NS:.0} | {}", verdict(ok)),
    );
    let _ = writeln!(
        md,
        "| samples tcprtt reported dropped for want of memory for a new key | {} | | | 0 | \
         {} |",
        stat(ours.no_memory.clone()).show(0),
        verdict(ours.no_memory.iter().all(|n| *n == 0.0))
    );
    let no_memory = stat(ours.no_memory.clone()).max;
    if no_memory > 0.0 {
        missed.push(format!(
            "New keys as fast as loopback clients connect: tcprtt dropped up to {no_memory:.0} \
             samples of {NEW_KEYS} new keys because the kernel could not allocate their \
             histograms at that moment (a `BPF_F_NO_PREALLOC` map allocates from per-CPU \
             caches refilled asynchronously); the C design's preallocated map drops none."
        ));
    }
    if !ok {
        missed.push(format!(
            "First event of a new key: {:.1} µs for tcprtt ({:.1} µs for the C design) where \
             the target is under 2 µs, {:.1}× over. Creating a key in a \
             `BPF_F_NO_PREALLOC` per-CPU hash map allocates and zeroes a value for every \
             possible CPU; the C design's preallocated map takes a ready element from its \
             free list.",
            first.median / 1000.0,
            stat(t).median / 1000.0,
            first.median / NEW_KEY_TARGET_NS,
        ));
    }
}

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
        for ((cpus, o), t) in [possible, 16, 128].iter().zip(ours).zip(theirs) {
            if o > t {
                missed.push(format!(
                    "Kernel memory at {cpus} CPUs with {NEW_KEYS} keys: tcprtt {:.1} MiB \
                     against the C design's {:.1} MiB ({:.1}×) where the target is no more. \
                     tcprtt keeps every key's histogram once per CPU; the C design keeps one \
                     shared histogram per key.",
                    o as f64 / (1 << 20) as f64,
                    t as f64 / (1 << 20) as f64,
                    o as f64 / t as f64,
                ));
            }
        }
    }
    Ok(())
}

pub fn sustained(md: &mut String, s: &Sustained, missed: &mut Vec<String>) {
    let lost_below: u64 = s
        .intervals
        .iter()
        .filter(|i| i.keys < DEFAULT_MAX_KEYS)
        .map(|i| i.dropped + i.no_memory)
        .sum();
    let sum = |f: fn(&super::keys::Interval) -> u64| s.intervals.iter().map(f).sum::<u64>();
    let (dropped, no_memory, missed_segments) =
        (sum(|i| i.dropped), sum(|i| i.no_memory), sum(|i| i.missed));
    let per_second: Stat = stat(
        s.intervals
            .iter()
            .filter(|i| i.seconds >= 0.5)
            .map(|i| i.keys as f64 / i.seconds)
            .collect(),
    );
    md.push_str("\n## A sustained stream of new keys\n\n");
    let _ = writeln!(
        md,
        "`tcprtt --by-flow -i 1 --json -A 127.128.0.0/9` (default `--max-keys` 10240) for {} \
         s while clients, each from a new address in 127.145.0.0/16 and up, make {} \
         connections a second to a server on 127.200.0.1 (one round trip, then a reset): \
         every connection makes two new keys (the client's socket and the server's), so \
         about {} new keys a second, each interval's map emptied by the next report.\n\n\
         | | value | target | |\n|---|---|---|---|\n\
         | connections a second the clients made | {:.0} | {SUSTAINED_RATE} | |\n\
         | reports (intervals) | {} | | |\n\
         | keys per second, per interval | {} | | |\n\
         | samples dropped for a full map (`dropped`) | {dropped} | | |\n\
         | samples dropped because a new key's memory could not be allocated \
         (`dropped_no_memory`) | {no_memory} | 0 | {} |\n\
         | samples lost in intervals with fewer than 10240 keys | {lost_below} | 0 | {} |\n\
         | segments missed (the program was already running on that CPU) | {missed_segments} | | |\n",
        SUSTAINED.as_secs(),
        SUSTAINED_RATE,
        SUSTAINED_RATE * 2,
        s.rate,
        s.intervals.len(),
        per_second.show(0),
        verdict(no_memory == 0),
        verdict(lost_below == 0),
    );
    if no_memory > 0 {
        missed.push(format!(
            "Sustained new keys: {no_memory} samples dropped because the kernel could not \
             allocate a new key's histogram at that moment (no preallocated elements)."
        ));
    }
    if lost_below > 0 {
        missed.push(format!(
            "Sustained new keys: {lost_below} samples lost in intervals that held fewer \
             than 10240 keys."
        ));
    }
    if s.rate < f64::from(SUSTAINED_RATE) * 0.95 {
        let _ = writeln!(
            md,
            "\nThe clients made only {:.0} connections a second of the {SUSTAINED_RATE} asked: \
             the machine could not go faster while tcprtt ran.",
            s.rate
        );
    }
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

    #[test]
    fn median_and_spread() {
        let s = stat(vec![3.0, 1.0, 2.0]);
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(stat(vec![4.0, 1.0, 2.0, 3.0]).show(1), "2.5 (1.0–4.0)");
    }
}
