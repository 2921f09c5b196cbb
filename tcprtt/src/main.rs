//! tcprtt: TCP round-trip-time histograms, measured in the kernel with eBPF.

mod btf;
mod cli;
mod collect;
mod grace;
mod histogram;
mod json;
mod loader;
mod render;

use std::{
    io::{self, Write},
    process::ExitCode,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail};
use clap::{Parser, error::ErrorKind};
use tokio::{
    signal::unix::{SignalKind, signal},
    time::{Instant, MissedTickBehavior, interval_at, sleep_until},
};

use crate::{
    cli::{Cli, Options},
    collect::Collector,
    render::{Report, order, render_text},
};

/// The eBPF object, built by build.rs; empty when built with `AYA_BUILD_SKIP=1`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tcprtt"));

/// How a run ended.
enum End {
    /// Signal or duration: print the last report.
    Finished,
    /// Stdout was closed by its reader: stop quietly.
    OutputClosed,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err)
            if matches!(
                err.kind(),
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
            ) =>
        {
            let _ = err.print();
            return ExitCode::SUCCESS;
        }
        Err(err) => {
            let text = err.render().to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            eprintln!("tcprtt: {first} (see --help)");
            return ExitCode::from(2);
        }
    };
    let opts = match cli::validate(cli) {
        Ok(opts) => opts,
        Err(msg) => {
            eprintln!("tcprtt: error: {msg}");
            return ExitCode::from(2);
        }
    };
    match run(opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // Verifier logs run to many lines; the first one says what failed.
            let text = format!("{err:#}");
            let first = text.lines().next().unwrap_or_default();
            eprintln!("tcprtt: error: {first}");
            ExitCode::from(1)
        }
    }
}

fn run(opts: Options) -> Result<()> {
    if OBJECT.is_empty() {
        bail!(
            "this tcprtt was built without its eBPF program (AYA_BUILD_SKIP was set): \
             rebuild with `cargo xtask build`"
        );
    }
    loader::check_privileges()?;
    raise_memlock_limit();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(trace(opts))
}

async fn trace(opts: Options) -> Result<()> {
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    // Run-time statistics cost every BPF program a clock read, so only -v turns them on,
    // and only while tcprtt runs (the kernel keeps them on while this fd is open).
    let stats = opts
        .verbose
        .then(|| aya::sys::enable_stats(aya::sys::Stats::RunTime))
        .transpose()
        .context("enabling BPF run-time statistics for -v")?;
    let mut probe = loader::load(&opts, OBJECT)?;
    let mut collector = Collector::new(&mut probe)?;
    match &probe.fallback_reason {
        Some(why) => eprintln!(
            "Tracing TCP RTT via {} ({why}). Hit Ctrl-C to end.",
            probe.attach_point
        ),
        None => eprintln!(
            "Tracing TCP RTT via {}. Hit Ctrl-C to end.",
            probe.attach_point
        ),
    }

    let start = Instant::now();
    let mut reporter = Reporter {
        opts: &opts,
        attach: probe.attach_point,
        since: start,
    };
    let deadline = opts.duration.map(|d| start + d);
    // Without -i the ticker never fires before the deadline or a signal.
    let period = opts
        .interval
        .unwrap_or(Duration::from_secs(u32::MAX.into()));
    let mut ticker = interval_at(start + period, period);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let drain_period = Duration::from_secs(tcprtt_common::DRAIN_PERIOD_SECS);
    let mut drainer = interval_at(start + drain_period, drain_period);
    drainer.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let end = loop {
        tokio::select! {
            biased;
            _ = sigint.recv() => break End::Finished,
            _ = sigterm.recv() => break End::Finished,
            _ = sleep_until(deadline.unwrap_or(start)), if deadline.is_some() => break End::Finished,
            _ = drainer.tick() => collector.drain()?,
            _ = ticker.tick(), if opts.interval.is_some() => {
                if let End::OutputClosed = reporter.report(&mut collector)? {
                    break End::OutputClosed;
                }
            }
        }
    };
    if let End::Finished = end {
        reporter.report(&mut collector)?;
    }
    if stats.is_some() {
        eprintln!("{}", self_report(probe.attach_point, &collector)?);
    }
    // Dropping the probe detaches the program and frees its maps.
    drop(collector);
    drop(probe);
    Ok(())
}

/// The -v summary: what the program saw and what it cost per event.
fn self_report(attach: loader::AttachPoint, collector: &Collector) -> Result<String> {
    let runs = collector.program_stat("run_cnt")?;
    let ns = collector.program_stat("run_time_ns")?;
    let per_event = if runs == 0 {
        "no runs".to_string()
    } else {
        format!("{:.1} ns per event", ns as f64 / runs as f64)
    };
    let c = collector.totals();
    Ok(format!(
        "tcprtt: attach point {attach}; events seen {}, matched {}, dropped {}, \
         dropped for lack of memory {}, unreadable {}, missed {}; in-kernel cost {per_event} \
         ({ns} ns over {runs} runs)",
        c.seen, c.matched, c.dropped, c.no_memory, c.unreadable, c.missed
    ))
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; newer ones charge the memory
/// cgroup and ignore it. Raising it is best effort: where it fails (no CAP_SYS_RESOURCE),
/// a new kernel does not need it and an old one reports the shortage when loading.
fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit only reads the struct passed.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
}

/// Local wall-clock time as HH:MM:SS.
fn clock(now: SystemTime) -> String {
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let now = libc::time_t::try_from(secs).unwrap_or_default();
    // SAFETY: an all-zero `tm` is valid, and localtime_r writes only into it.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are to live locals.
    unsafe { libc::localtime_r(&now, &mut tm) };
    format!("{:02}:{:02}:{:02}", tm.tm_hour, tm.tm_min, tm.tm_sec)
}

struct Reporter<'a> {
    opts: &'a Options,
    attach: loader::AttachPoint,
    /// Start of the interval the next report covers.
    since: Instant,
}

impl Reporter<'_> {
    fn report(&mut self, collector: &mut Collector) -> Result<End> {
        let interval = collector.take_interval()?;
        let now = Instant::now();
        let wall = SystemTime::now();
        let interval_s = (now - self.since).as_secs_f64();
        self.since = now;
        let opts = self.opts;
        let mut histograms = interval.histograms;
        order(&mut histograms, opts.group_by, opts.top);
        let report = Report {
            timestamp: opts.timestamp.then(|| clock(wall)),
            milliseconds: opts.milliseconds,
            group_by: opts.group_by,
            extension: opts.extension,
            histograms,
            dropped: interval.counters.dropped,
            no_memory: interval.counters.no_memory,
            missed: interval.counters.missed,
            max_keys: opts.max_keys,
        };
        let text = if opts.json {
            let since_epoch = wall.duration_since(UNIX_EPOCH).unwrap_or_default();
            let meta = json::JsonMeta {
                time: json::rfc3339_utc(since_epoch.as_secs(), since_epoch.subsec_millis()),
                interval_s,
                attach: self.attach.short_name(),
            };
            json::render_json(&report, &meta)
        } else if opts.interval.is_some() {
            render_text(&report) + "\n"
        } else {
            render_text(&report)
        };
        let mut out = io::stdout().lock();
        match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
            Ok(()) => Ok(End::Finished),
            Err(err) if err.kind() == io::ErrorKind::BrokenPipe => Ok(End::OutputClosed),
            Err(err) => Err(err).context("writing the report to stdout"),
        }
    }
}
