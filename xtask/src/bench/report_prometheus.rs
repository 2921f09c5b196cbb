//! The Prometheus exposition's section of BENCHMARKS.md.

use std::fmt::Write as _;

use super::{
    COST_ROUND_TRIPS, ROUNDS,
    prometheus::{FRESH_SCRAPES, IDLE_SCRAPES, PromResults, SERIES},
    report, stat,
};

/// Scrape time target, ms of tcprtt's CPU per scrape.
const TARGET_MS: f64 = 50.0;

pub fn prometheus(md: &mut String, p: &PromResults, missed: &mut Vec<String>) {
    md.push_str("\n## Prometheus exposition\n\n");
    let _ = writeln!(
        md,
        "`tcprtt -B -p <port> -p <port> --prometheus 127.0.0.1:<port>` while {SERIES} clients, \
         each from its own loopback address, connect once to a one-shot server: one series \
         per client address ({} exposed, `tcprtt_keys`), {:.1} MB a scrape in the Prometheus \
         text format (29 lines a series). A scrape is one HTTP/1.0 `GET /metrics` read to its \
         end; *wall* is that whole exchange, *tcprtt CPU* the run time of all of tcprtt's \
         threads over it (each thread's `/proc/PID/task/TID/schedstat`, to the nanosecond).\n\n\
         - *idle series*: {IDLE_SCRAPES} scrapes back to back, no series with a new sample \
         since the previous one: each series' text from the last scrape is reused. Over these \
         scrapes `/proc/PID/stat` (utime + stime, 10 ms ticks) says {:.1} ms of CPU per \
         scrape.\n\
         - *every series new*: {FRESH_SCRAPES} scrapes, each after another pass of the \
         {SERIES} clients and a drain (1.5 s), so every series has a sample the previous \
         scrape did not show and is encoded anew by prometheus-client.\n\n\
         | scrapes | wall ms | tcprtt CPU ms | target | |\n|---|---|---|---|---|",
        p.series,
        p.bytes as f64 / 1e6,
        p.idle_cpu_stat,
    );
    for (what, wall, cpu) in [
        ("idle series", &p.idle_wall, &p.idle_cpu),
        ("every series new", &p.fresh_wall, &p.fresh_cpu),
    ] {
        let cpu = stat(cpu.clone());
        let met = cpu.median < TARGET_MS;
        let _ = writeln!(
            md,
            "| {what} | {} | {} | < {TARGET_MS:.0} ms | {} |",
            stat(wall.clone()).show(1),
            cpu.show(1),
            report::verdict(met)
        );
        if !met {
            missed.push(format!(
                "Prometheus scrape with {SERIES} series ({what}): {:.1} ms of tcprtt's CPU \
                 where the target is under {TARGET_MS:.0} ms.",
                cpu.median
            ));
        }
    }
    let _ = writeln!(
        md,
        "\ntcprtt's resident memory after these scrapes: {:.1} MiB (peak {:.1} MiB, \
         `VmRSS`/`VmHWM`), with each series' text kept for the next scrape.",
        p.rss_kib / 1024.0,
        p.peak_rss_kib / 1024.0
    );
    let quiet = stat(p.quiet_ns.clone());
    let scraped = stat(p.scraped_ns.clone());
    let change: Vec<f64> = p
        .scraped_ns
        .iter()
        .zip(&p.quiet_ns)
        .map(|(s, q)| (s - q) / q * 100.0)
        .collect();
    let _ = writeln!(
        md,
        "\n**Per-event cost with a scraper**: {ROUNDS} rounds, each a {COST_ROUND_TRIPS}-round-trip \
         ping-pong to a port in tcprtt's filter without a scraper and one with a thread \
         scraping `/metrics` back to back ({} scrapes per round), the order alternating; \
         tcprtt's program's run time per event from the kernel's run-time statistics.\n\n\
         | | ns/event |\n|---|---|\n\
         | without a scraper | {} |\n| with a scraper | {} |\n\
         | change, per round | {} % |",
        stat(p.hammer_scrapes.clone()).show(0),
        quiet.show(0),
        scraped.show(0),
        stat(change).show(1),
    );
}
