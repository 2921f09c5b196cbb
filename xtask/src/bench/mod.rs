//! `cargo xtask bench`: what tcprtt costs the host, measured in the same run as a C libbpf
//! tool of the same design (`xtask/bench/c_peer`), bpftrace's one-liner and an empty
//! program on the same hook, and written to BENCHMARKS.md.
//!
//! Absolute times on a shared 2-core VM drift from minute to minute, so every headline
//! figure is a ratio of two things measured in the same round, and each is the median of
//! rounds that alternate between the things compared.
//!
//! `cpeer` builds the C peer, `peers` holds the traffic and the tracer children, `kernel`
//! what is read from the kernel, `runs`, `keys`, `wire` and `prometheus` the phases that
//! sample, and `report`, `report_keys`, `report_memory`, `report_wire` and
//! `report_prometheus` turn the samples into BENCHMARKS.md.

mod cpeer;
mod kernel;
mod keys;
mod peers;
mod prometheus;
mod report;
mod report_keys;
mod report_memory;
mod report_prometheus;
mod report_wire;
mod runs;
mod wire;

use std::{
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};

use crate::{Project, is_root, on_path};

const ROUNDS: usize = 7;
/// Round trips per cost sample: enough events (about two per round trip) to average out
/// the clock reads, little enough to keep a sample near a second.
const COST_ROUND_TRIPS: usize = 10_000;
/// A tracer is idle once attached, but its start-up work (page faults, freeing what it
/// parsed) may still be settling when it says so.
const SETTLE: Duration = Duration::from_millis(50);
const EMPTY_PROGRAM: &str = "tcprtt_empty";

/// Median and spread of a set of samples.
#[derive(Clone, Copy, Debug)]
struct Stat {
    median: f64,
    min: f64,
    max: f64,
}

fn stat(mut samples: Vec<f64>) -> Stat {
    samples.sort_by(f64::total_cmp);
    let n = samples.len();
    if n == 0 {
        return Stat {
            median: f64::NAN,
            min: f64::NAN,
            max: f64::NAN,
        };
    }
    let median = if n % 2 == 1 {
        samples[n / 2]
    } else {
        (samples[n / 2 - 1] + samples[n / 2]) / 2.0
    };
    Stat {
        median,
        min: samples[0],
        max: samples[n - 1],
    }
}

impl Stat {
    fn show(&self, decimals: usize) -> String {
        format!(
            "{:.d$} ({:.d$}–{:.d$})",
            self.median,
            self.min,
            self.max,
            d = decimals
        )
    }
}

/// The tracers compared.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Tool {
    Tcprtt,
    C,
    Bpftrace,
}

impl Tool {
    fn name(self) -> &'static str {
        match self {
            Tool::Tcprtt => "tcprtt",
            Tool::C => "C libbpf peer",
            Tool::Bpftrace => "bpftrace",
        }
    }

    fn ready(self) -> peers::Ready {
        match self {
            Tool::Tcprtt | Tool::C => peers::Ready {
                line: "Tracing TCP RTT via ",
                on_stdout: false,
            },
            Tool::Bpftrace => peers::Ready {
                line: "Attaching ",
                on_stdout: true,
            },
        }
    }
}

/// Where the tracers are.
struct Tools {
    tcprtt: PathBuf,
    c: PathBuf,
}

impl Tools {
    fn start(&self, tool: Tool, args: &[String]) -> Result<peers::Tracer> {
        let bin = match tool {
            Tool::Tcprtt => &self.tcprtt,
            Tool::C => &self.c,
            Tool::Bpftrace => Path::new("bpftrace"),
        };
        peers::Tracer::start(bin, args, &tool.ready())
    }
}

/// A mode: the same arguments for tcprtt and the C peer, bpftrace's script where it has
/// an equivalent, and the echo server its ping-pong talks to.
struct Mode {
    name: String,
    args: Vec<String>,
    bpftrace: Option<&'static str>,
    server: SocketAddr,
    /// Whether `server` serves on the client's CPU.
    one_cpu: bool,
    /// Arguments for tcprtt alone, asking for what the C design does not keep (its ratio
    /// then shows that price and has no target).
    tcprtt_extra: Vec<String>,
}

/// bpftrace's one-liner, and the same grouped by family and IPv4 remote address (the
/// closest its tracepoint's `daddr`, a `sockaddr` in bytes, allows).
const BPFTRACE_ALL: &str = "tracepoint:tcp:tcp_probe { @ = hist(args->srtt >> 3); }";
const BPFTRACE_BY_RADDR: &str = "tracepoint:tcp:tcp_probe { @[args->family, args->daddr[4], \
     args->daddr[5], args->daddr[6], args->daddr[7]] = hist(args->srtt >> 3); }";

/// The modes, their ping-pong with `server` (its connections served on CPU 1, the client
/// on CPU 0), `-B` with `-e` (fine buckets, which the C design has no equivalent of), and
/// last `-B` again with `same_cpu`, an echo server on the client's CPU: there no two CPUs
/// update one histogram at once.
fn modes(server: SocketAddr, same_cpu: SocketAddr) -> Vec<Mode> {
    let mode = |name: &str, args: &[&str], bpftrace| Mode {
        name: name.to_string(),
        args: args.iter().map(|a| a.to_string()).collect(),
        bpftrace,
        server,
        one_cpu: false,
        tcprtt_extra: Vec::new(),
    };
    let port = server.port().to_string();
    vec![
        mode("default (one histogram)", &[], Some(BPFTRACE_ALL)),
        mode("`-b` (by local address)", &["-b"], None),
        mode("`-B` (by remote address)", &["-B"], Some(BPFTRACE_BY_RADDR)),
        mode("`--by-flow`", &["--by-flow"], None),
        mode(
            "filter accepting (`-A 127.0.0.1 -p <server port>`)",
            &["-A", "127.0.0.1", "-p", &port],
            None,
        ),
        mode(
            "filter rejecting (`-A 203.0.113.0/24 -p 9`)",
            &["-A", "203.0.113.0/24", "-p", "9"],
            None,
        ),
        Mode {
            tcprtt_extra: vec!["-e".to_string()],
            ..mode(
                "`-B -e` (fine buckets, min and max; the C peer runs `-B`)",
                &["-B"],
                None,
            )
        },
        Mode {
            server: same_cpu,
            one_cpu: true,
            ..mode(
                "`-B`, client and server on one CPU",
                &["-B"],
                Some(BPFTRACE_BY_RADDR),
            )
        },
    ]
}

pub fn run(project: &Project) -> Result<()> {
    let began = Instant::now();
    project.setup()?;
    project.build_release()?;
    ensure!(
        is_root(),
        "the benchmark loads eBPF programs: run `cargo xtask bench` as root"
    );
    ensure!(
        on_path("bpftrace"),
        "`bpftrace` is not on PATH: run `cargo xtask setup` as root"
    );
    let tools = Tools {
        tcprtt: project.release_bin(),
        c: cpeer::build(&project.root)?,
    };
    let object = kernel::newest_object(&project.root)?;
    let _tracefs = kernel::Tracefs::ensure()?;
    let load_average = fs::read_to_string("/proc/loadavg").context("reading /proc/loadavg")?;
    let server = peers::echo_server(1)?;
    let same_cpu = peers::echo_server(0)?;
    let modes = modes(server, same_cpu);

    eprintln!("bench: in-kernel cost per event ({ROUNDS} rounds, tracers alternating)");
    let cost = runs::cost(&tools, &object, &modes)?;
    eprintln!("bench: start-up and peak RSS ({ROUNDS} rounds, alternating)");
    let lifecycle = runs::lifecycle(&tools, server)?;
    eprintln!(
        "bench: first event of a new key and map memory ({} keys)",
        keys::NEW_KEYS
    );
    let new_keys = keys::new_keys(&tools)?;
    eprintln!(
        "bench: {} new keys a second for {} s",
        keys::SUSTAINED_RATE * 2,
        keys::SUSTAINED.as_secs()
    );
    let sustained = keys::sustained(&tools)?;
    ensure!(
        on_path("iperf3"),
        "`iperf3` is not on PATH: run `cargo xtask setup` as root"
    );
    eprintln!("bench: wire source on a veth pair ({ROUNDS} rounds, iperf3)");
    let wire = wire::wire(&tools.tcprtt, &object)?;
    eprintln!(
        "bench: Prometheus exposition with {} series",
        prometheus::SERIES
    );
    let prometheus = prometheus::prometheus(&tools, server)?;
    kernel::ensure_unloaded(&peers::held_programs())?;

    let markdown = report::render(&report::Results {
        load_average: load_average
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        modes: &modes,
        cost,
        lifecycle,
        new_keys,
        sustained,
        wire,
        prometheus,
        took: began.elapsed(),
    })?;
    fs::write(project.root.join("BENCHMARKS.md"), &markdown).context("writing BENCHMARKS.md")?;
    print!("{markdown}");
    Ok(())
}
