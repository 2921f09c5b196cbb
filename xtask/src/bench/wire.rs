//! The wire source's phase: `tcprtt --passive` on one end of a veth pair between two
//! network namespaces of this run, its TC program's time per packet beside an empty TC
//! program on the same interface, and what it takes from an iperf3 bulk transfer.

use std::{
    fs::{self, File},
    os::fd::AsFd,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc::Receiver,
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail, ensure};
use aya::{
    Btf, Ebpf, EbpfLoader,
    programs::{LinkOrder, SchedClassifier, TcAttachType, tc::TcAttachOptions},
};
use rustix::thread::{LinkNameSpaceType, move_into_link_name_space};

use super::{ROUNDS, SETTLE, kernel, peers};

pub const IFACE: &str = "tcprtt-a";
const PEER_IFACE: &str = "tcprtt-b";
const ADDR: &str = "198.51.100.1";
const PEER_ADDR: &str = "198.51.100.2";
/// Inside a namespace of this run, so no other service can hold it.
const PORT: &str = "5201";
pub const EMPTY_TC_PROGRAM: &str = "tcprtt_wire_empty";
/// Seconds of bulk transfer per per-packet cost sample and per throughput sample.
pub const COST_SECONDS: u32 = 1;
pub const THROUGHPUT_SECONDS: u32 = 2;
/// Throughput pairs: more than the cost rounds, as a 2 s transfer on a shared machine
/// moves by tens of percent from one run to the next.
pub const THROUGHPUT_PAIRS: usize = 11;
/// BPF_PROG_TYPE_SCHED_CLS.
const SCHED_CLS: [&str; 1] = ["3"];

/// The phase's raw samples, one per round.
#[derive(Default)]
pub struct WireResults {
    /// tcprtt's TC program, ns per packet.
    pub ns: Vec<f64>,
    /// The empty TC program over the same packets, ns per packet.
    pub floor: Vec<f64>,
    /// Packets (program runs, ingress and egress) per cost sample.
    pub packets: Vec<f64>,
    /// Seconds between the two readings of a cost sample.
    pub seconds: Vec<f64>,
    /// iperf3's received bit rate without tcprtt, and with it, in bit/s.
    pub without: Vec<f64>,
    pub with: Vec<f64>,
    /// tcprtt's own CPU time (user and system) during each transfer with it, in percent of
    /// one CPU.
    pub tcprtt_cpu: Vec<f64>,
}

/// Two network namespaces joined by a veth pair; deleted on drop, which also deletes the
/// veth pair.
struct Namespaces {
    names: Vec<String>,
}

fn ip(args: &[&str]) -> Result<()> {
    crate::output(Command::new("ip").args(args)).map(|_| ())
}

impl Namespaces {
    fn create() -> Result<Self> {
        let pid = std::process::id();
        let mut ns = Self { names: Vec::new() };
        for side in ["a", "b"] {
            let name = format!("tcprtt-bench-{pid}-{side}");
            ip(&["netns", "add", &name])?;
            ns.names.push(name);
        }
        let (a, b) = (&ns.names[0], &ns.names[1]);
        ip(&[
            "-n", a, "link", "add", IFACE, "type", "veth", "peer", "name", PEER_IFACE, "netns", b,
        ])?;
        for (name, iface, addr) in [(a, IFACE, ADDR), (b, PEER_IFACE, PEER_ADDR)] {
            ip(&[
                "-n",
                name,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                iface,
            ])?;
            ip(&["-n", name, "link", "set", iface, "up"])?;
            ip(&["-n", name, "link", "set", "lo", "up"])?;
        }
        Ok(ns)
    }

    /// `program` run inside namespace `side` (0: tcprtt's, 1: the iperf3 server's).
    /// `ip netns exec` execs it, so the child's pid is the program's own.
    fn command(&self, side: usize, program: &Path) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.names[side]]).arg(program);
        cmd
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for name in &self.names {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

/// A child ended on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The iperf3 server, listening once `ss` in its namespace says so.
fn iperf_server(ns: &Namespaces) -> Result<Killed> {
    let child = ns
        .command(1, Path::new("iperf3"))
        .args(["-s", "-B", PEER_ADDR, "-p", PORT])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting the iperf3 server")?;
    let server = Killed(child);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let listening = crate::output(ns.command(1, Path::new("ss")).args([
            "-Hltn",
            "sport",
            "=",
            &format!(":{PORT}"),
        ]))?;
        if !listening.trim().is_empty() {
            return Ok(server);
        }
        ensure!(
            Instant::now() < deadline,
            "the iperf3 server does not listen after 5 s"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// An iperf3 bulk transfer from tcprtt's side for `seconds`: the bit rate received.
fn iperf(ns: &Namespaces, seconds: u32) -> Result<f64> {
    let out = ns
        .command(0, Path::new("iperf3"))
        .args([
            "-c",
            PEER_ADDR,
            "-p",
            PORT,
            "-t",
            &seconds.to_string(),
            "-J",
        ])
        .output()
        .context("running the iperf3 client")?;
    let json: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("parsing iperf3's JSON")?;
    if let Some(error) = json["error"].as_str() {
        bail!("iperf3: {error}");
    }
    json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("no end.sum_received.bits_per_second in iperf3's JSON")
}

/// `tcprtt --passive IFACE` inside tcprtt's namespace, attached.
struct Passive {
    child: Child,
    ids: Vec<u32>,
    _lines: Receiver<String>,
    stderr: Option<JoinHandle<String>>,
}

impl Passive {
    fn start(ns: &Namespaces, tcprtt: &Path) -> Result<Self> {
        let mut child = ns
            .command(0, tcprtt)
            .args(["--passive", IFACE])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting tcprtt --passive")?;
        let ready = peers::Ready {
            line: "Tracing TCP RTT on the wire at ",
            on_stdout: false,
        };
        let (lines, stderr) = match peers::attached(&mut child, &ready, "tcprtt") {
            Ok(streams) => streams,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e);
            }
        };
        let mut passive = Self {
            child,
            ids: Vec::new(),
            _lines: lines,
            stderr: Some(stderr),
        };
        // On an error `passive` is dropped, which ends the child.
        passive.ids = peers::program_ids(passive.child.id(), &SCHED_CLS)?;
        ensure!(
            !passive.ids.is_empty(),
            "tcprtt --passive said it was attached but holds no TC program"
        );
        thread::sleep(SETTLE);
        Ok(passive)
    }

    /// (run time, runs) summed over its TC programs.
    fn stats(&self) -> Result<(u64, u64)> {
        self.ids.iter().try_fold((0, 0), |(t, n), id| {
            let (dt, dn) = kernel::program_stats(*id)?;
            Ok((t + dt, n + dn))
        })
    }

    /// CPU seconds (user and system) the process has used so far.
    fn cpu_seconds(&self) -> Result<f64> {
        peers::cpu_seconds(self.child.id())
    }

    fn stop(mut self) -> Result<()> {
        peers::interrupt_and_wait(&mut self.child, self.stderr.take(), "tcprtt --passive")
    }
}

impl Drop for Passive {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The empty TC program attached with TCX at ingress and egress of IFACE, from a thread
/// that enters tcprtt's namespace (the interface exists only there). Dropping the object
/// detaches and unloads it.
fn attach_empty(object: &Path, ns: &Namespaces) -> Result<(Ebpf, u32)> {
    let object: PathBuf = object.to_path_buf();
    let netns = format!("/run/netns/{}", ns.names[0]);
    thread::spawn(move || -> Result<(Ebpf, u32)> {
        let file = File::open(&netns).with_context(|| format!("opening {netns}"))?;
        move_into_link_name_space(file.as_fd(), Some(LinkNameSpaceType::Network))
            .with_context(|| format!("entering {netns}"))?;
        let btf = Btf::from_sys_fs().context("reading the kernel's BTF")?;
        let bytes = fs::read(&object).with_context(|| format!("reading {}", object.display()))?;
        let mut ebpf = EbpfLoader::new()
            .btf(Some(&btf))
            .load(&bytes)
            .context("loading the eBPF object")?;
        let prog: &mut SchedClassifier = ebpf
            .program_mut(EMPTY_TC_PROGRAM)
            .with_context(|| format!("no {EMPTY_TC_PROGRAM} program in the object"))?
            .try_into()?;
        prog.load()
            .with_context(|| format!("loading {EMPTY_TC_PROGRAM}"))?;
        for direction in [TcAttachType::Ingress, TcAttachType::Egress] {
            prog.attach_with_options(
                IFACE,
                direction,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
            .with_context(|| format!("attaching {EMPTY_TC_PROGRAM} to {IFACE}"))?;
        }
        let id = prog
            .info()
            .with_context(|| format!("reading {EMPTY_TC_PROGRAM}'s id"))?
            .id();
        Ok((ebpf, id))
    })
    .join()
    .map_err(|_| anyhow!("the thread attaching {EMPTY_TC_PROGRAM} panicked"))?
}

/// Per-packet cost rounds (statistics on, the empty program beside tcprtt's, a fresh
/// tcprtt each round), then throughput pairs (statistics off, nothing else attached),
/// without and with tcprtt in an order that alternates from pair to pair.
pub fn wire(tcprtt: &Path, object: &Path) -> Result<WireResults> {
    let ns = Namespaces::create()?;
    let _server = iperf_server(&ns)?;
    let mut r = WireResults::default();
    let mut held = std::collections::BTreeSet::new();
    {
        let _stats = kernel::run_time_stats()?;
        let (_empty, empty_id) = attach_empty(object, &ns)?;
        held.insert(empty_id);
        for _ in 0..ROUNDS {
            let passive = Passive::start(&ns, tcprtt)?;
            held.extend(passive.ids.iter().copied());
            let (ours0, floor0) = (passive.stats()?, kernel::program_stats(empty_id)?);
            let began = Instant::now();
            iperf(&ns, COST_SECONDS)?;
            let (ours1, floor1) = (passive.stats()?, kernel::program_stats(empty_id)?);
            r.seconds.push(began.elapsed().as_secs_f64());
            passive.stop()?;
            r.ns.push(kernel::per_run(ours0, ours1)?);
            r.floor.push(kernel::per_run(floor0, floor1)?);
            r.packets.push((ours1.1 - ours0.1) as f64);
        }
    }
    for pair in 0..THROUGHPUT_PAIRS {
        for with in [pair % 2 == 1, pair % 2 == 0] {
            if with {
                let passive = Passive::start(&ns, tcprtt)?;
                held.extend(passive.ids.iter().copied());
                let (cpu0, began) = (passive.cpu_seconds()?, Instant::now());
                r.with.push(iperf(&ns, THROUGHPUT_SECONDS)?);
                let cpu = passive.cpu_seconds()? - cpu0;
                r.tcprtt_cpu
                    .push(cpu / began.elapsed().as_secs_f64() * 100.0);
                passive.stop()?;
            } else {
                r.without.push(iperf(&ns, THROUGHPUT_SECONDS)?);
            }
        }
    }
    kernel::ensure_unloaded(&held)?;
    Ok(r)
}
