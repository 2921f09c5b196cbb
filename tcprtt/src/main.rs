//! tcprtt: TCP round-trip-time histograms, measured in the kernel with eBPF.

mod btf;
mod cli;
mod collect;
mod grace;
mod histogram;
mod loader;
mod render;

use std::{
    io::{self, Write},
    process::ExitCode,
    time::Duration,
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
    render::{Report, render_text, sort_by_address},
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
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(trace(opts))
}

async fn trace(opts: Options) -> Result<()> {
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
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
    let deadline = opts.duration.map(|d| start + d);
    // Without -i the ticker never fires before the deadline or a signal.
    let period = opts
        .interval
        .unwrap_or(Duration::from_secs(u32::MAX.into()));
    let mut ticker = interval_at(start + period, period);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let end = loop {
        tokio::select! {
            biased;
            _ = sigint.recv() => break End::Finished,
            _ = sigterm.recv() => break End::Finished,
            _ = sleep_until(deadline.unwrap_or(start)), if deadline.is_some() => break End::Finished,
            _ = ticker.tick(), if opts.interval.is_some() => {
                if let End::OutputClosed = report(&opts, &mut collector)? {
                    break End::OutputClosed;
                }
            }
        }
    };
    if let End::Finished = end {
        report(&opts, &mut collector)?;
    }
    // Dropping the probe detaches the program and frees its maps.
    drop(collector);
    drop(probe);
    Ok(())
}

/// Local wall-clock time as HH:MM:SS.
fn clock() -> String {
    let now = libc::time_t::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    )
    .unwrap_or_default();
    // SAFETY: localtime_r writes only into `tm`.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    unsafe { libc::localtime_r(&now, &mut tm) };
    format!("{:02}:{:02}:{:02}", tm.tm_hour, tm.tm_min, tm.tm_sec)
}

fn report(opts: &Options, collector: &mut Collector) -> Result<End> {
    let interval = collector.take_interval()?;
    let mut histograms = interval.histograms;
    sort_by_address(&mut histograms);
    let report = Report {
        timestamp: opts.timestamp.then(clock),
        milliseconds: opts.milliseconds,
        group_by: opts.group_by,
        extension: opts.extension,
        histograms,
        dropped: interval.counters.dropped,
        max_keys: opts.max_keys,
    };
    let mut text = render_text(&report);
    if opts.interval.is_some() {
        text.push('\n');
    }
    let mut out = io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(End::Finished),
        Err(err) if err.kind() == io::ErrorKind::BrokenPipe => Ok(End::OutputClosed),
        Err(err) => Err(err).context("writing the report to stdout"),
    }
}
