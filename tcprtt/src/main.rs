//! tcprtt: TCP round-trip-time histograms, measured in the kernel with eBPF.

mod btf;
mod cli;
mod histogram;
mod output;
mod privileges;
mod report;
mod signals;
mod source;

use std::{
    fmt::Display,
    io::{self, Write},
    process::ExitCode,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use clap::{Parser, error::ErrorKind};
use jiff::Timestamp;
use tokio::time::{Instant, MissedTickBehavior, interval_at, sleep_until};

use crate::{
    cli::{Cli, Options},
    output::{Format, Written, prometheus::Exposition},
    report::{ALL_TRAFFIC, Meta, Pending, Report},
    signals::Signals,
    source::{Source, srtt::Srtt, wire::Wire},
};

/// Writes one line to stderr. A closed or full stderr is no reason to fail, let alone
/// panic: the line is lost and the run goes on.
fn say(line: impl Display) {
    let _ = writeln!(io::stderr().lock(), "{line}");
}

/// The eBPF object, built by build.rs; empty when built with `AYA_BUILD_SKIP=1`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tcprtt"));

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
            say(format_args!("tcprtt: {first} (see --help)"));
            return ExitCode::from(2);
        }
    };
    let opts = match cli::validate(cli) {
        Ok(opts) => opts,
        Err(msg) => {
            say(format_args!("tcprtt: error: {msg}"));
            return ExitCode::from(2);
        }
    };
    let verbose = opts.verbose;
    match run(opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) if verbose => {
            // The whole chain, one cause a line, and any verifier log after it.
            say(format_args!("tcprtt: error: {err}"));
            for cause in err.chain().skip(1) {
                say(format_args!("  caused by: {cause}"));
            }
            ExitCode::from(1)
        }
        Err(err) => {
            let text = format!("{err:#}");
            let first = text.lines().next().unwrap_or_default();
            say(format_args!("tcprtt: error: {first}"));
            ExitCode::from(1)
        }
    }
}

fn run(opts: Options) -> Result<()> {
    let signals = Signals::install()?;
    if OBJECT.is_empty() {
        bail!(
            "this tcprtt was built without its eBPF program (AYA_BUILD_SKIP was set): \
             rebuild with `cargo xtask build`"
        );
    }
    privileges::check()?;
    raise_memlock_limit();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(trace(opts, signals))
}

/// Run-time statistics cost every BPF program a clock read, so only -v turns them on, and
/// only while tcprtt runs (the kernel keeps them on while the returned fd is open). They
/// need CAP_SYS_ADMIN; without it -v reports everything else.
fn enable_run_time_stats() -> Result<Option<std::os::fd::OwnedFd>> {
    match aya::sys::enable_stats(aya::sys::Stats::RunTime) {
        Ok(fd) => Ok(Some(fd)),
        Err(err) if err.io_error.raw_os_error() == Some(libc::EPERM) => {
            say(
                "tcprtt: -v: run-time statistics need CAP_SYS_ADMIN, so events seen and the \
                 in-kernel cost are not measured",
            );
            Ok(None)
        }
        Err(err) => Err(err).context("enabling BPF run-time statistics for -v"),
    }
}

/// Kernel memory the grouped histogram maps can take, when it is worth a word.
fn large_map_memory(opts: &Options) -> Option<String> {
    const WORTH_SAYING: u64 = 256 << 20;
    if opts.grouping == ALL_TRAFFIC {
        return None;
    }
    // Two maps, allocated per key; per key its hash-table element (about 48 bytes of
    // header and 8 of free-list link), the key and the value, each rounded to 8 bytes.
    let value = if opts.keeps_detail() {
        size_of::<tcprtt_common::HistValue>()
    } else {
        size_of::<tcprtt_common::Log2Value>()
    };
    let per_key = 56
        + size_of::<tcprtt_common::HistKey>().next_multiple_of(8) as u64
        + value.next_multiple_of(8) as u64;
    let bytes = 2 * u64::from(opts.max_keys) * per_key;
    (bytes >= WORTH_SAYING).then(|| {
        format!(
            "tcprtt: the histogram maps can take up to {} MiB of kernel memory (--max-keys {})",
            bytes >> 20,
            opts.max_keys
        )
    })
}

/// How often the kernel's maps are drained: often enough for scrapes to be current with
/// `--prometheus`, and otherwise just often enough that no 32-bit kernel bucket can wrap.
fn drain_period(opts: &Options) -> Duration {
    if opts.prometheus.is_some() {
        Duration::from_secs(1)
    } else {
        Duration::from_secs(tcprtt_common::DRAIN_PERIOD_SECS)
    }
}

async fn trace(opts: Options, mut signals: Signals) -> Result<()> {
    let listener = match &opts.prometheus {
        Some(prom) => Some(output::prometheus::bind(prom.addr).await?),
        None => None,
    };
    let source: Box<dyn Source> = if opts.passive.is_empty() {
        Box::new(Srtt::load(&opts, OBJECT)?)
    } else {
        Box::new(Wire::load(&opts, OBJECT)?)
    };
    // From the moment the program is attached, a signal asks for the report.
    signals.tracing();
    say(source.banner());
    let exposition = match (listener, &opts.prometheus) {
        (Some(listener), Some(prom)) => {
            let exposition = Exposition::start(listener, prom, source.hook(), opts.unit())?;
            say(format_args!(
                "Serving Prometheus metrics at {}",
                exposition.url()
            ));
            Some(exposition)
        }
        _ => None,
    };
    if let Some(line) = large_map_memory(&opts) {
        say(line);
    }
    let stats = if opts.verbose {
        enable_run_time_stats()?
    } else {
        None
    };

    let start = Instant::now();
    let mut run = Run {
        opts: &opts,
        source,
        pending: Pending::default(),
        exposition,
        since: start,
    };
    let deadline = opts.duration.map(|d| start + d);
    // Without -i the ticker never fires before the deadline or a signal.
    let period = opts
        .interval
        .unwrap_or(Duration::from_secs(u32::MAX.into()));
    let mut ticker = interval_at(start + period, period);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let drain_period = drain_period(&opts);
    let mut drainer = interval_at(start + drain_period, drain_period);
    drainer.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let finished = loop {
        tokio::select! {
            biased;
            _ = signals.recv() => break true,
            _ = sleep_until(deadline.unwrap_or(start)), if deadline.is_some() => break true,
            _ = drainer.tick() => run.collect()?,
            _ = ticker.tick(), if opts.interval.is_some() => {
                if run.report()? == Written::Closed {
                    break false;
                }
            }
        }
    };
    if finished {
        run.report()?;
    }
    if let Some(line) = run.source.farewell()? {
        say(line);
    }
    if opts.verbose {
        say(run.source.self_report(stats.is_some())?);
    }
    // Dropping the source detaches its programs and frees its maps.
    drop(run);
    Ok(())
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

/// The state of a run: the source, what it measured since the last report, and the
/// cumulative exposition.
struct Run<'a> {
    opts: &'a Options,
    source: Box<dyn Source>,
    pending: Pending,
    exposition: Option<Exposition>,
    /// Start of the interval the next report covers.
    since: Instant,
}

impl Run<'_> {
    /// Takes what the kernel recorded into the next report and the exposition.
    fn collect(&mut self) -> Result<()> {
        let taken = self.source.take()?;
        if let Some(exposition) = &mut self.exposition {
            exposition.add(&taken.rows, taken.losses);
        }
        self.pending.add(&taken.rows, taken.losses);
        Ok(())
    }

    fn report(&mut self) -> Result<Written> {
        self.collect()?;
        let (rows, losses) = self.pending.take();
        let now = Instant::now();
        let opts = self.opts;
        let mut report = Report {
            meta: Meta {
                hook: self.source.hook(),
                grouping: opts.grouping,
                unit: opts.unit(),
                end: Timestamp::now(),
                length: now - self.since,
                losses,
                max_keys: opts.max_keys,
            },
            rows,
        };
        self.since = now;
        report.order(opts.top);
        let format = if opts.json {
            Format::Json
        } else {
            Format::Text {
                timestamp: opts.timestamp,
                extension: opts.extension,
                separated: opts.interval.is_some(),
            }
        };
        output::write_stdout(&output::render(&report, format))
    }
}
