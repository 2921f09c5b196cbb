//! The Prometheus exposition's phase: `tcprtt -B --prometheus` with `SERIES` series
//! exposed, the time a scrape takes (wall, and tcprtt's CPU), tcprtt's memory, and its
//! program's in-kernel cost per event with a scraper hammering `/metrics` and without.

use std::{
    fs,
    net::{Ipv4Addr, SocketAddr, TcpListener},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, ensure};

use super::{
    COST_ROUND_TRIPS, ROUNDS, Tool, Tools, kernel,
    peers::{clients, cpu_seconds, one_shot_server, ping_pong},
};

/// Series exposed: one per client address of `clients`, keyed by remote address.
pub const SERIES: u32 = 10_000;
/// Scrapes timed while no series has a new sample.
pub const IDLE_SCRAPES: usize = 11;
/// Scrapes timed right after every series had a new sample (each after a pass of
/// `SERIES` connections).
pub const FRESH_SCRAPES: usize = 5;
/// Longer than tcprtt's drain period (1 s while serving), so a scrape after it shows the
/// traffic before it.
const DRAIN_WAIT: Duration = Duration::from_millis(1500);

/// The phase's raw samples.
#[derive(Default)]
pub struct PromResults {
    /// `tcprtt_keys` as the first scrape reported it (the clients' series, and any that
    /// other traffic on the host made), and that scrape's size in bytes.
    pub series: u64,
    pub bytes: usize,
    /// Scrapes of series without a new sample since the previous scrape: wall time and
    /// tcprtt's CPU time, ms.
    pub idle_wall: Vec<f64>,
    pub idle_cpu: Vec<f64>,
    /// Scrapes right after a drain that brought every series a sample.
    pub fresh_wall: Vec<f64>,
    pub fresh_cpu: Vec<f64>,
    /// tcprtt's CPU time (utime + stime of /proc/PID/stat) over all idle scrapes, per
    /// scrape, ms: a cross-check of the per-scrape figures.
    pub idle_cpu_stat: f64,
    /// tcprtt's resident memory after the scrapes and its peak, KiB.
    pub rss_kib: f64,
    pub peak_rss_kib: f64,
    /// tcprtt's program, ns per event, without a scraper and with one, a sample per round.
    pub quiet_ns: Vec<f64>,
    pub scraped_ns: Vec<f64>,
    /// Scrapes the scraper made during the rounds with it.
    pub hammer_scrapes: Vec<f64>,
}

/// CPU time of every thread of `pid` so far, ns, from each thread's schedstat (the
/// scheduler's own accounting, to the nanosecond; /proc/PID/stat counts 10 ms ticks,
/// longer than an idle scrape). The runtime's threads outlive a scrape.
fn thread_cpu_ns(pid: u32) -> Result<u64> {
    let dir = format!("/proc/{pid}/task");
    let mut total = 0;
    for task in fs::read_dir(&dir).with_context(|| format!("listing {dir}"))? {
        let path = task?.path().join("schedstat");
        // A thread that ended since the listing took its time with it.
        let Ok(text) = fs::read_to_string(&path) else {
            continue;
        };
        total += text
            .split_whitespace()
            .next()
            .and_then(|n| n.parse::<u64>().ok())
            .with_context(|| format!("no run time in {}", path.display()))?;
    }
    Ok(total)
}

/// One GET of /metrics: the body.
fn scrape(addr: SocketAddr) -> Result<String> {
    crate::vm_guest::prometheus::scrape(&addr.to_string())
}

/// A scrape's wall time and tcprtt's CPU time in it, ms, and its body.
fn timed_scrape(addr: SocketAddr, pid: u32) -> Result<(f64, f64, String)> {
    let cpu = thread_cpu_ns(pid)?;
    let start = Instant::now();
    let body = scrape(addr)?;
    let wall = start.elapsed().as_secs_f64() * 1e3;
    let cpu = thread_cpu_ns(pid)?.saturating_sub(cpu) as f64 / 1e6;
    Ok((wall, cpu, body))
}

/// The value of the unlabelled sample `name` in a scrape.
fn sample(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// A port on 127.0.0.1 free a moment ago.
fn free_port() -> Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

/// Scrapes `addr` back to back until `stop`; joined, it says how many scrapes it made.
fn hammer(addr: SocketAddr, stop: Arc<AtomicBool>) -> thread::JoinHandle<Result<u64>> {
    thread::spawn(move || {
        let mut count = 0;
        while !stop.load(Ordering::Relaxed) {
            scrape(addr)?;
            count += 1;
        }
        Ok(count)
    })
}

pub fn prometheus(tools: &Tools, echo: SocketAddr) -> Result<PromResults> {
    let server = one_shot_server(Ipv4Addr::LOCALHOST)?;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
    // The one-shot server's sockets make one key per client address; the echo server's
    // the ping-pong's one more.
    let args: Vec<String> = [
        "-B",
        "-p",
        &server.port().to_string(),
        "-p",
        &echo.port().to_string(),
        "--prometheus",
        &addr.to_string(),
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    let tracer = tools.start(Tool::Tcprtt, &args)?;
    let pid = tracer.pid();
    let mut r = PromResults::default();

    clients(server, 0, SERIES, None)?;
    thread::sleep(DRAIN_WAIT);
    let body = scrape(addr)?;
    r.series = sample(&body, "tcprtt_keys").unwrap_or_default() as u64;
    r.bytes = body.len();
    // Other loopback traffic on the host that happens to use one of the two ports may add
    // a series or two beside the clients'.
    let clients_series = body
        .lines()
        .filter(|l| l.starts_with("tcprtt_srtt_seconds_count{") && l.contains("raddr=\"127.1."))
        .count();
    ensure!(
        clients_series == SERIES as usize,
        "{clients_series} series of the {SERIES} clients exposed"
    );

    let stat0 = cpu_seconds(pid)?;
    for _ in 0..IDLE_SCRAPES {
        let (wall, cpu, _) = timed_scrape(addr, pid)?;
        r.idle_wall.push(wall);
        r.idle_cpu.push(cpu);
    }
    r.idle_cpu_stat = (cpu_seconds(pid)? - stat0) * 1e3 / IDLE_SCRAPES as f64;

    for _ in 0..FRESH_SCRAPES {
        clients(server, 0, SERIES, None)?;
        thread::sleep(DRAIN_WAIT);
        let (wall, cpu, body) = timed_scrape(addr, pid)?;
        ensure!(
            sample(&body, "tcprtt_keys").is_some_and(|n| n >= f64::from(SERIES)),
            "series lost"
        );
        r.fresh_wall.push(wall);
        r.fresh_cpu.push(cpu);
    }
    r.rss_kib = tracer.status_kib("VmRSS")? as f64;
    r.peak_rss_kib = tracer.status_kib("VmHWM")? as f64;

    let _stats = kernel::run_time_stats()?;
    for round in 0..ROUNDS {
        // Alternating which goes first, so neither always follows the other.
        for scraped in [round % 2 == 0, round % 2 == 1] {
            let stop = Arc::new(AtomicBool::new(false));
            let scraper = scraped.then(|| hammer(addr, Arc::clone(&stop)));
            let before = kernel::program_stats(tracer.prog_id)?;
            ping_pong(echo, COST_ROUND_TRIPS)?;
            let after = kernel::program_stats(tracer.prog_id)?;
            stop.store(true, Ordering::Relaxed);
            let ns = kernel::per_run(before, after)?;
            match scraper {
                Some(scraper) => {
                    let count = scraper
                        .join()
                        .map_err(|_| anyhow!("the scraper thread panicked"))??;
                    r.scraped_ns.push(ns);
                    r.hammer_scrapes.push(count as f64);
                }
                None => r.quiet_ns.push(ns),
            }
        }
    }
    ensure!(
        r.hammer_scrapes.iter().all(|n| *n > 0.0),
        "a round with the scraper made no scrape"
    );
    tracer
        .stop()
        .map_err(|e| anyhow!("tcprtt --prometheus: {e}"))?;
    Ok(r)
}
