//! `xtask vm-guest` (hidden): what runs inside each test kernel, started by the
//! initramfs's `/init`. In a few rounds, it starts the tracers the check table asks for
//! all at once, runs known traffic, stops them together, and judges each check against
//! a reference tracer that ran beside them. Results go to the serial console, one
//! `VMTEST ok|FAIL <check>: <detail>` line per check, between `VMTEST-START` and
//! `VMTEST-END` markers that `cargo xtask vm-test` reads on the host.

mod checks;
pub mod prometheus;
mod reports;
mod traffic;
mod wire;

use std::{
    fs,
    io::{BufRead, BufReader, Read},
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use rustix::process::{Pid, Signal, kill_process};

use crate::tcprtt_programs;
pub use checks::CHECKS;
use checks::Check;
use traffic::{Connection, FLOWS, WIRE_FLOWS};
pub use wire::{LOAD_ORDER, MODULES};

/// The tracer every check is judged against: fentry, one histogram per socket.
const REFERENCE: &[&str] = &["--attach", "fentry", "--by-flow", "--json"];
const GROUPED_PER_ROUND: usize = 4;
/// Attaching under software emulation, with every tracer parsing the kernel's BTF at once.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(240);
/// Time for the last delayed ACKs and FINs to arrive after the traffic ends, so that every
/// tracer, stopped a few milliseconds apart, has seen the same segments.
const QUIET: Duration = Duration::from_secs(1);
/// Between seeing a `-d` tracer's banner and the start of its own clock.
const DURATION_SLACK: Duration = Duration::from_secs(1);

/// What one tracer printed, once stopped.
pub struct Output {
    pub args: Vec<String>,
    /// What `--prometheus` served once the traffic was over.
    pub scraped: String,
    pub stdout: String,
    pub stderr: String,
}

/// What the checks judge: the traffic made, the reference's output, and what was loaded.
pub struct Run {
    pub connections: Vec<Connection>,
    pub reference: Output,
    pub tracers: usize,
    /// tcprtt's programs loaded while every tracer was attached.
    pub loaded_while_tracing: usize,
    /// tcprtt's programs still loaded after every tracer exited.
    pub left_after_exit: Vec<String>,
    /// In a round of wire tracers (`--passive`), what their interface's hooks held.
    pub wire: Option<WireRun>,
}

/// The guest's kernel and its veth pair, set up once for every round.
pub struct Bed {
    release: String,
    /// The kernel modules loaded for the wire source, or why the veth pair is missing.
    wire: Result<Vec<String>, String>,
}

pub struct WireRun {
    /// `tcx` or `clsact`: what tcprtt must attach with on this kernel.
    pub expected_hook: &'static str,
    /// How many wire tracers the round ran.
    pub tracers: usize,
    pub modules: Vec<String>,
    pub while_tracing: wire::Hooks,
    pub after_exit: wire::Hooks,
}

struct Tracer {
    args: Vec<String>,
    child: Child,
    stdout: Option<thread::JoinHandle<String>>,
    stderr: Option<thread::JoinHandle<String>>,
}

impl Tracer {
    fn spawn(
        bin: &Path,
        args: &[&str],
        attached: mpsc::Sender<(usize, String)>,
        i: usize,
    ) -> Result<Self> {
        let mut child = Command::new(bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting tcprtt {}", args.join(" ")))?;
        let mut out = child.stdout.take().context("tcprtt's stdout")?;
        let err = child.stderr.take().context("tcprtt's stderr")?;
        let stdout = thread::spawn(move || {
            let mut s = String::new();
            let _ = out.read_to_string(&mut s);
            s
        });
        let stderr = thread::spawn(move || {
            let mut all = String::new();
            for (n, line) in BufReader::new(err)
                .lines()
                .map_while(Result::ok)
                .enumerate()
            {
                if n == 0 {
                    let _ = attached.send((i, line.clone()));
                }
                all.push_str(&line);
                all.push('\n');
            }
            all
        });
        Ok(Self {
            args: args.iter().map(|a| a.to_string()).collect(),
            child,
            stdout: Some(stdout),
            stderr: Some(stderr),
        })
    }

    fn interrupt(&self) -> Result<()> {
        kill_process(Pid::from_child(&self.child), Signal::INT).context("sending SIGINT")
    }

    fn finish(mut self, scraped: String) -> Result<Output> {
        let status = self.child.wait().context("waiting for tcprtt")?;
        let joined = |h: Option<thread::JoinHandle<String>>| {
            h.and_then(|h| h.join().ok()).unwrap_or_default()
        };
        let stdout = joined(self.stdout.take());
        let stderr = joined(self.stderr.take());
        ensure!(
            status.success(),
            "tcprtt {} exited with {status}: {}",
            self.args.join(" "),
            stderr.trim()
        );
        Ok(Output {
            args: std::mem::take(&mut self.args),
            scraped,
            stdout,
            stderr,
        })
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A `-d` tracer's duration.
fn duration(args: &[&str]) -> Option<Duration> {
    let at = args.iter().position(|a| *a == "-d")?;
    args.get(at + 1)?.parse().ok().map(Duration::from_secs)
}

fn passive(args: &[&str]) -> bool {
    args.contains(&"--passive")
}

/// Every tracer of the table plus the reference, on one run of traffic: across the veth
/// pair when the round's tracers watch it, else on loopback.
fn trace(bin: &Path, checks: &[&Check], bed: &Bed) -> Result<(Run, Vec<Vec<Output>>)> {
    let mut arg_sets = vec![REFERENCE];
    for check in checks {
        arg_sets.extend(check.tracers);
    }
    let wire_round = arg_sets.iter().any(|a| passive(a));
    let modules = match (&bed.wire, wire_round) {
        (Err(e), true) => bail!("no veth pair for the wire tracers: {e}"),
        (Ok(m), _) => m.clone(),
        (Err(_), false) => Vec::new(),
    };
    let durations: Vec<Option<Duration>> = arg_sets.iter().map(|a| duration(a)).collect();
    let (tx, rx) = mpsc::channel();
    let mut started: Vec<Option<Tracer>> = arg_sets.iter().map(|_| None).collect();
    let deadline = Instant::now() + ATTACH_TIMEOUT;
    // `-d` tracers start once the others are attached, so that their time runs on the
    // traffic, not on the others' loading.
    for timed in [false, true] {
        let batch: Vec<usize> = (0..arg_sets.len())
            .filter(|&i| durations[i].is_some() == timed)
            .collect();
        for &i in &batch {
            started[i] = Some(Tracer::spawn(bin, arg_sets[i], tx.clone(), i)?);
        }
        for _ in &batch {
            let left = deadline.saturating_duration_since(Instant::now());
            let (i, line) = rx
                .recv_timeout(left)
                .context("tracers did not all attach in time")?;
            if !line.starts_with("Tracing TCP RTT ") {
                bail!("tcprtt {} said: {line}", arg_sets[i].join(" "));
            }
        }
    }
    drop(tx);
    let timed_from = Instant::now();
    let tracers: Vec<Tracer> = started.into_iter().flatten().collect();
    let loaded_while_tracing = tcprtt_programs().len();
    let while_tracing = wire_round.then(wire::Hooks::read).transpose()?;
    let connections = traffic::run(if wire_round { &WIRE_FLOWS } else { &FLOWS })?;
    thread::sleep(QUIET);
    if let Some(shortest) = durations.iter().flatten().min() {
        let took = timed_from.elapsed();
        ensure!(
            took + DURATION_SLACK < *shortest,
            "the traffic took {took:.1?}, too long for -d {}",
            shortest.as_secs()
        );
    }
    // A scrape is TCP traffic too, so every other tracer stops before it. `-d` tracers
    // end by themselves.
    let scrapes: Vec<Option<&str>> = arg_sets.iter().map(|a| prometheus::address(a)).collect();
    for (i, t) in tracers.iter().enumerate() {
        if scrapes[i].is_none() && durations[i].is_none() {
            t.interrupt()?;
        }
    }
    let mut scraped = vec![String::new(); tracers.len()];
    if scrapes.iter().any(Option::is_some) {
        thread::sleep(prometheus::DRAIN_PERIOD);
        for (i, address) in scrapes.iter().enumerate() {
            if let Some(address) = address {
                scraped[i] = prometheus::scrape(address)?;
                tracers[i].interrupt()?;
            }
        }
    }
    let mut outputs = tracers
        .into_iter()
        .zip(scraped)
        .map(|(t, scraped)| t.finish(scraped))
        .collect::<Result<Vec<_>>>()?
        .into_iter();
    let reference = outputs.next().context("no reference output")?;
    let per_check = checks
        .iter()
        .map(|c| outputs.by_ref().take(c.tracers.len()).collect())
        .collect();
    // The kernel frees an unloaded program after an RCU grace period.
    let settle = Instant::now() + Duration::from_secs(5);
    while !tcprtt_programs().is_empty() && Instant::now() < settle {
        thread::sleep(Duration::from_millis(50));
    }
    let wire = match while_tracing {
        Some(while_tracing) => Some(WireRun {
            expected_hook: wire::expected_hook(&bed.release),
            tracers: arg_sets.iter().filter(|a| passive(a)).count(),
            modules,
            while_tracing,
            after_exit: wire::Hooks::read()?,
        }),
        None => None,
    };
    let run = Run {
        connections,
        reference,
        tracers: arg_sets.len(),
        loaded_while_tracing,
        left_after_exit: tcprtt_programs(),
        wire,
    };
    Ok((run, per_check))
}

/// The guest's whole job; never fails itself, so the end marker always follows.
pub fn run(bin: &Path) {
    let release = rustix::system::uname()
        .release()
        .to_string_lossy()
        .into_owned();
    // "... #1 SMP PREEMPT_DYNAMIC Debian 6.1.192-2 (2026-..)": the upstream version.
    let version = fs::read_to_string("/proc/version").unwrap_or_default();
    let debian = version
        .split_once(" Debian ")
        .and_then(|(_, v)| v.split_whitespace().next())
        .unwrap_or("?");
    println!("VMTEST-START {release} {debian}");
    let bed = Bed {
        wire: wire::setup(&release).map_err(|e| format!("{e:#}")),
        release,
    };
    let mut failed = 0;
    for round in rounds() {
        match trace(bin, &round, &bed) {
            Ok((run, outputs)) => {
                for (check, outs) in round.iter().zip(&outputs) {
                    match (check.verify)(&run, outs) {
                        Ok(detail) => {
                            println!("VMTEST ok {}: {}", check.name, one_line(&detail))
                        }
                        Err(err) => {
                            failed += 1;
                            println!(
                                "VMTEST FAIL {}: {}",
                                check.name,
                                one_line(&format!("{err:#}"))
                            );
                        }
                    }
                }
            }
            Err(err) => {
                failed += 1;
                println!("VMTEST FAIL tracing: {}", one_line(&format!("{err:#}")));
            }
        }
    }
    println!("VMTEST-END {failed}");
}

/// Whether a tracer keeps one histogram per key, in a map that allocates as keys appear.
fn grouped(args: &[&str]) -> bool {
    args.iter()
        .any(|a| ["-b", "-B"].contains(a) || a.starts_with("--by-"))
}

/// The checks in table order, cut into rounds of traffic that each run at most
/// `GROUPED_PER_ROUND` grouped tracers (the reference included): a round's tracers all
/// load at once, each grouped one preallocating its two histogram maps whole (about
/// 18 MiB at the default `--max-keys`), which bounds the 1 GiB guest and the attach time,
/// while fewer rounds mean less traffic time. A check with a wire tracer
/// (`--passive`) gets a round of its own, on its own traffic: two tcprtt attached
/// through one clsact qdisc at once leave it behind when the one that added it ends
/// first. A check without tracers joins the round before it.
fn rounds() -> Vec<Vec<&'static Check>> {
    let mut rounds: Vec<Vec<&Check>> = vec![Vec::new()];
    let mut in_round = 1;
    // Whether the round so far has tracers, and whether they watch the wire.
    let mut round_kind = None;
    for check in CHECKS {
        let grouped = check.tracers.iter().filter(|t| grouped(t)).count();
        let wire = (!check.tracers.is_empty()).then(|| check.tracers.iter().any(|t| passive(t)));
        let apart = matches!(
            (wire, round_kind),
            (Some(true), Some(_)) | (Some(false), Some(true))
        );
        if in_round + grouped > GROUPED_PER_ROUND || apart {
            rounds.push(Vec::new());
            in_round = 1;
            round_kind = None;
        }
        in_round += grouped;
        round_kind = round_kind.or(wire);
        if let Some(round) = rounds.last_mut() {
            round.push(check);
        }
    }
    rounds
}

/// The console protocol is one line per check.
fn one_line(text: &str) -> String {
    text.trim().replace('\n', " | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_wire_check_has_a_round_of_its_own_and_every_check_a_round() {
        let rounds = rounds();
        assert_eq!(rounds.iter().map(Vec::len).sum::<usize>(), CHECKS.len());
        let mut wire_rounds = 0;
        for round in &rounds {
            let with_tracers: Vec<_> = round.iter().filter(|c| !c.tracers.is_empty()).collect();
            if with_tracers
                .iter()
                .any(|c| c.tracers.iter().any(|t| passive(t)))
            {
                wire_rounds += 1;
                assert_eq!(
                    with_tracers.len(),
                    1,
                    "{:?}",
                    round.iter().map(|c| c.name).collect::<Vec<_>>()
                );
            }
        }
        assert!(wire_rounds >= 2);
    }
}
