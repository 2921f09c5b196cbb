//! The phases about keys: what the first event of a new key costs (tcprtt and the C peer),
//! the maps' kernel memory at the default `--max-keys`, and tcprtt under a sustained
//! stream of new keys.

use std::{
    net::Ipv4Addr,
    sync::mpsc::RecvTimeoutError,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow};
use serde_json::Value;

use super::{
    Tool, Tools,
    kernel::{self, MapMemory},
    peers::{clients, one_shot_server},
};

/// tcprtt's default `--max-keys`, and the C peer's map size: the phase fills the map.
pub const NEW_KEYS: u32 = 10_240;
const KEY_ROUNDS: usize = 3;
/// Connections a second in the sustained phase; each makes two new `--by-flow` keys (the
/// client's socket and the server's).
pub const SUSTAINED_RATE: u32 = 5_000;
pub const SUSTAINED: Duration = Duration::from_secs(60);
/// Clients of the sustained phase start at 127.145.0.1, its server is 127.200.0.1, and
/// tcprtt watches only remote addresses in 127.128.0.0/9: other loopback traffic on the
/// host makes no keys.
const SUSTAINED_FIRST_CLIENT: u32 = 9_000_000;
const SUSTAINED_SERVER: Ipv4Addr = Ipv4Addr::new(127, 200, 0, 1);
const SUSTAINED_FILTER: &str = "127.128.0.0/9";

/// One tracer's samples, a sample per round.
#[derive(Default)]
pub struct KeyCost {
    /// ns per event once every key exists.
    pub existing: Vec<f64>,
    /// ns a new key adds to the event that creates it.
    pub extra: Vec<f64>,
    /// Events in pass 1.
    pub events: Vec<f64>,
    /// Keys in the map after pass 1 and after pass 2.
    pub keys_pass1: Vec<f64>,
    pub keys_pass2: Vec<f64>,
    /// Samples tcprtt reported dropped for want of memory for a new key (0 for the C peer,
    /// whose map is preallocated).
    pub no_memory: Vec<f64>,
    /// Every map of the program before the first pass and after the second.
    pub maps_empty: Vec<MapMemory>,
    pub maps_full: Vec<MapMemory>,
}

/// Elements in a map that allocates them as keys arrive, from the growth of its
/// `bytes_memlock`; `None` for a map whose memory does not follow its keys.
pub fn elements(empty: &MapMemory, now: &MapMemory, possible: u64) -> Option<u64> {
    let per = kernel::element_bytes(now, possible)?;
    Some(now.bytes.saturating_sub(empty.bytes) / per)
}

/// Keys the program's grouping map holds: counted where the map allocates per key, else
/// (a preallocated map, whose memory says nothing) every key the clients made.
fn keys_in(empty: &[MapMemory], now: &[MapMemory], possible: u64) -> u64 {
    let counted: Vec<u64> = now
        .iter()
        .filter_map(|m| elements(empty.iter().find(|e| e.name == m.name)?, m, possible))
        .collect();
    if counted.is_empty() {
        u64::from(NEW_KEYS)
    } else {
        counted.iter().sum()
    }
}

/// Each tracer with `-B -p <port>`: `NEW_KEYS` clients, each from its own address, connect
/// once (the server's sockets make one key each), then the same clients again (the keys
/// exist, but for those the kernel could not allocate the first time). The difference is
/// what creating the keys cost.
pub fn new_keys(tools: &Tools) -> Result<Vec<(Tool, KeyCost)>> {
    let server = one_shot_server(Ipv4Addr::LOCALHOST)?;
    let args: Vec<String> = ["-B", "-p", &server.port().to_string()]
        .iter()
        .map(|a| a.to_string())
        .collect();
    let order = [Tool::Tcprtt, Tool::C];
    let mut results: Vec<(Tool, KeyCost)> =
        order.iter().map(|t| (*t, KeyCost::default())).collect();
    let possible = kernel::possible_cpus()?;
    let _stats = kernel::run_time_stats()?;
    for round in 0..KEY_ROUNDS {
        let mut turn = order;
        turn.rotate_left(round % 2);
        for tool in turn {
            let tracer = tools.start(tool, &args)?;
            let maps_empty = kernel::program_maps(tracer.prog_id)?;
            let s0 = kernel::program_stats(tracer.prog_id)?;
            clients(server, 0, NEW_KEYS, None)?;
            let s1 = kernel::program_stats(tracer.prog_id)?;
            let maps_pass1 = kernel::program_maps(tracer.prog_id)?;
            clients(server, 0, NEW_KEYS, None)?;
            let s2 = kernel::program_stats(tracer.prog_id)?;
            let maps_full = kernel::program_maps(tracer.prog_id)?;
            let report = tracer.stop()?;
            let k1 = keys_in(&maps_empty, &maps_pass1, possible) as f64;
            let k2 = keys_in(&maps_empty, &maps_full, possible) as f64;
            // Keys the kernel could not allocate in pass 1 are made in pass 2, so each
            // pass is events at one cost plus new keys at another: two equations.
            let (t1, e1) = ((s1.0 - s0.0) as f64, (s1.1 - s0.1) as f64);
            let (t2, e2) = ((s2.0 - s1.0) as f64, (s2.1 - s1.1) as f64);
            let late = k2 - k1;
            let existing = (t2 * k1 - t1 * late) / (e2 * k1 - e1 * late);
            let k = results
                .iter_mut()
                .find(|(t, _)| *t == tool)
                .map(|(_, k)| k)
                .context("a tracer without samples")?;
            k.existing.push(existing);
            k.extra.push((t1 - e1 * existing) / k1.max(1.0));
            k.events.push(e1);
            k.keys_pass1.push(k1);
            k.keys_pass2.push(k2);
            k.no_memory
                .push(warning_count(&report, "new keys arrived faster") as f64);
            if round == 0 {
                k.maps_empty = maps_empty;
                k.maps_full = maps_full;
            }
        }
    }
    Ok(results)
}

/// One report of the sustained phase.
pub struct Interval {
    pub seconds: f64,
    pub keys: u64,
    pub dropped: u64,
    pub no_memory: u64,
    pub missed: u64,
}

pub struct Sustained {
    /// Connections a second the clients managed.
    pub rate: f64,
    pub intervals: Vec<Interval>,
}

/// `tcprtt --by-flow -i 1 --json` while clients make `SUSTAINED_RATE` connections a
/// second for `SUSTAINED`, each from a new address.
pub fn sustained(tools: &Tools) -> Result<Sustained> {
    let server = one_shot_server(SUSTAINED_SERVER)?;
    let args: Vec<String> = ["--by-flow", "-i", "1", "--json", "-A", SUSTAINED_FILTER]
        .iter()
        .map(|a| a.to_string())
        .collect();
    let tracer = tools.start(Tool::Tcprtt, &args)?;
    let count = SUSTAINED_RATE * SUSTAINED.as_secs() as u32;
    let traffic = thread::spawn(move || {
        clients(
            server,
            SUSTAINED_FIRST_CLIENT,
            count,
            Some(f64::from(SUSTAINED_RATE)),
        )
    });
    let mut intervals = Vec::new();
    // Read the reports as they come: they are megabytes each and must not pile up.
    let deadline = Instant::now() + SUSTAINED * 2;
    while !traffic.is_finished() && Instant::now() < deadline {
        match tracer.lines.recv_timeout(Duration::from_millis(100)) {
            Ok(line) => intervals.push(interval(&line)?),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    let rate = traffic
        .join()
        .map_err(|_| anyhow!("the client threads panicked"))??;
    for line in tracer.stop()?.lines() {
        intervals.push(interval(line)?);
    }
    Ok(Sustained { rate, intervals })
}

/// N of a report's `WARNING: N samples dropped: <reason>` line, 0 without one.
fn warning_count(report: &str, reason: &str) -> u64 {
    report
        .lines()
        .filter(|l| l.contains(reason))
        .find_map(|l| l.strip_prefix("WARNING: ")?.split(' ').next()?.parse().ok())
        .unwrap_or(0)
}

fn interval(line: &str) -> Result<Interval> {
    let v: Value = serde_json::from_str(line).context("parsing a --json report")?;
    let number = |field: &str| {
        v[field]
            .as_u64()
            .with_context(|| format!("no {field} in a --json report"))
    };
    Ok(Interval {
        seconds: v["interval_s"]
            .as_f64()
            .context("no interval_s in a --json report")?,
        keys: v["histograms"]
            .as_array()
            .context("no histograms in a --json report")?
            .len() as u64,
        dropped: number("dropped")?,
        no_memory: number("dropped_no_memory")?,
        missed: number("missed")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warning_counts() {
        let report = "Remote Address = 127.0.0.1\n\
                      WARNING: 7 samples dropped: new keys arrived faster than the kernel could \
                      allocate their histograms\n";
        assert_eq!(warning_count(report, "new keys arrived faster"), 7);
        assert_eq!(warning_count(report, "distinct keys"), 0);
    }

    #[test]
    fn json_reports() {
        let line = r#"{"interval_s":1.001,"dropped":3,"dropped_no_memory":2,"missed":1,"histograms":[{},{}]}"#;
        let i = interval(line).unwrap();
        assert_eq!((i.keys, i.dropped, i.no_memory, i.missed), (2, 3, 2, 1));
        assert!(interval(r#"{"interval_s":1.0}"#).is_err());
    }
}
