//! The wire source: TC programs on interfaces time TCP round trips from the timestamps
//! option of every flow passing by (see `tcprtt-ebpf/src/wire.rs` for the rules).
//!
//! Attaching prefers TCX links (Linux 6.6+), which the kernel removes when the process
//! ends however it ends. Older kernels get a clsact qdisc with one filter per direction;
//! those outlive a SIGKILLed process, so each start first removes filters of ours whose
//! program no live process holds, and says so.

use std::{
    collections::HashSet,
    ffi::CStr,
    fmt::Write as _,
    fs, io,
    mem::{size_of, zeroed},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    thread,
    time::Duration,
};

use anyhow::{Context, Result, anyhow, bail};
use aya::{
    Ebpf,
    maps::{HashMap, MapData, PerCpuArray},
    programs::{
        LinkOrder, ProgramError, SchedClassifier, TcAttachType,
        links::Link,
        tc::{self, SchedClassifierLink, TcAttachOptions, TcError, TcHandle},
    },
};
use tcprtt_common::{
    ProbeConfig, stat,
    wire::{Pending, PendingKey, WireConfig, wstat},
};

use super::{
    Source, Taken, double_buffer::DoubleBuffer, load_with_filters, loader, srtt::probe_config,
    take_map,
};
use crate::{
    cli::{Attach, Options},
    report::{Grouping, IfaceNames, Losses, Source as RowSource},
};

/// Program names in the eBPF object, for Ethernet and raw-IP interfaces, at ingress and
/// egress: each direction has its own program, which sets the samples' side.
const PROG_ETH_IN: &str = "tcprtt_eth_in";
const PROG_ETH_OUT: &str = "tcprtt_eth_out";
const PROG_IP_IN: &str = "tcprtt_ip_in";
const PROG_IP_OUT: &str = "tcprtt_ip_out";
/// Every program (and so every filter name) tcprtt attaches to an interface.
const OUR_FILTERS: [&str; 4] = [PROG_ETH_IN, PROG_ETH_OUT, PROG_IP_IN, PROG_IP_OUT];

/// Map sizes. Pending TSvals: the newest of each direction that has not been echoed yet,
/// plus any never echoed (a delayed ACK echoes one of two), for at most the age limit.
pub const PENDING_ENTRIES: u32 = 65_536;
/// Directions of connections remembered (LRU).
pub const FLOW_ENTRIES: u32 = 65_536;

/// An interface to watch, checked before anything is loaded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Iface {
    pub name: String,
    pub index: u32,
    /// Frames start with an Ethernet header; otherwise with the IP header.
    pub has_l2: bool,
}

const ARPHRD_ETHER: u16 = 1;
/// Link types whose packets start at the IP header: PPP, raw IP (some modems), IPIP,
/// IP6IP6, SIT, GRE, IP6GRE, and "none" (TUN, WireGuard).
const ARPHRD_RAW_IP: [u16; 8] = [512, 519, 768, 769, 776, 778, 823, 0xfffe];

/// Checks that `name` is an interface the wire source can watch. The error is one line
/// for the user (a usage error: nothing has been loaded or attached).
pub fn check_interface(name: &str) -> Result<Iface, String> {
    if name.is_empty() {
        return Err("--passive needs an interface name".into());
    }
    if name.len() >= libc::IFNAMSIZ {
        return Err(format!(
            "--passive {name}: interface names are at most {} bytes",
            libc::IFNAMSIZ - 1
        ));
    }
    if name.contains('/') || name.contains('\0') || name.contains(char::is_whitespace) {
        return Err(format!("--passive {name}: not a valid interface name"));
    }
    let sock = ioctl_socket().map_err(|e| format!("--passive {name}: {e}"))?;
    let mut req = ifreq(name);
    // SAFETY: SIOCGIFINDEX reads the name and writes the index into `req`.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFINDEX, &mut req) } != 0 {
        return Err(format!("--passive {name}: no such interface"));
    }
    // SAFETY: the kernel filled in the index member.
    let index = unsafe { req.ifr_ifru.ifru_ifindex } as u32;
    let mut req = ifreq(name);
    // SAFETY: SIOCGIFFLAGS writes the flags into `req`.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } != 0 {
        return Err(format!(
            "--passive {name}: reading its flags: {}",
            io::Error::last_os_error()
        ));
    }
    // SAFETY: the kernel filled in the flags member.
    let flags = i32::from(unsafe { req.ifr_ifru.ifru_flags });
    if flags & libc::IFF_LOOPBACK != 0 {
        return Err(format!(
            "--passive {name}: a loopback device carries no wire traffic \
             (local connections are timed by the srtt source, without --passive)"
        ));
    }
    if flags & libc::IFF_UP == 0 {
        return Err(format!("--passive {name}: the interface is down"));
    }
    let mut req = ifreq(name);
    // SAFETY: SIOCGIFHWADDR writes the link type into the address family.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFHWADDR, &mut req) } != 0 {
        return Err(format!(
            "--passive {name}: reading its link type: {}",
            io::Error::last_os_error()
        ));
    }
    // SAFETY: the kernel filled in the hardware address member.
    let link_type = unsafe { req.ifr_ifru.ifru_hwaddr.sa_family };
    let has_l2 = match link_type {
        ARPHRD_ETHER => true,
        t if ARPHRD_RAW_IP.contains(&t) => false,
        t => {
            return Err(format!(
                "--passive {name}: link type {t} is not supported (Ethernet or raw IP only)"
            ));
        }
    };
    Ok(Iface {
        name: name.to_string(),
        index,
        has_l2,
    })
}

fn ioctl_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the descriptor is owned from here on.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: an all-zero ifreq is valid; the name is shorter than IFNAMSIZ (checked).
    let mut req: libc::ifreq = unsafe { zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    req
}

/// How the programs are attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcMode {
    /// TCX links where the kernel has them (6.6+), else clsact.
    Auto,
    /// TCX links only.
    Tcx,
    /// A clsact qdisc and filters, even where TCX exists.
    Clsact,
}

/// What the programs ended up attached with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attached {
    Tcx,
    Clsact,
}

/// Cumulative counters of the wire programs (see `tcprtt_common::wire::wstat`), plus
/// the pending TSvals userspace removed for age.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WireCounters {
    pub tcp: u64,
    pub not_tcp: u64,
    pub other_l3: u64,
    pub ipv6_ext: u64,
    pub fragment: u64,
    pub malformed: u64,
    pub no_ts_segments: u64,
    pub no_ts_flows: u64,
    pub recorded: u64,
    pub pending_full: u64,
    pub echoed: u64,
    pub not_advancing: u64,
    /// Echoes later than the age limit, and TSvals never echoed within it.
    pub aged: u64,
    pub filtered: u64,
    pub flow_full: u64,
}

impl WireCounters {
    /// Packets skipped because they could not be parsed (not counting other protocols,
    /// which are ignored on purpose).
    pub fn unparsed(&self) -> u64 {
        self.other_l3 + self.ipv6_ext + self.fragment + self.malformed
    }

    /// Why nothing was timed, for a run that ended without a sample.
    pub fn why_nothing(&self, ifaces: &str) -> String {
        if self.tcp == 0 {
            format!("no TCP segment crossed {ifaces}")
        } else if self.no_ts_segments == self.tcp {
            format!(
                "none of the {} TCP segments at {ifaces} carried timestamps \
                 (net.ipv4.tcp_timestamps=0 at an end of the connections?)",
                self.tcp
            )
        } else if self.recorded == 0 {
            format!(
                "no TCP segment at {ifaces} started a round trip (a new TSval on a segment \
                 with data, SYN or FIN; a connection met mid-flow needs one more)"
            )
        } else if self.echoed == 0 {
            format!(
                "{} TSvals were recorded at {ifaces} but none was echoed back through it \
                 (does the return path use another interface?)",
                self.recorded
            )
        } else {
            format!(
                "{} first echoes at {ifaces}, none timed: {} acknowledged no new data \
                 (RTTM rule), {} came later than --max-rtt, {} fell outside the filters",
                self.echoed, self.not_advancing, self.aged, self.filtered
            )
        }
    }
}

/// Where the programs ended up, and what attaching them took.
struct Attachment {
    attached: Attached,
    /// Why TCX was not used, when `--attach auto` fell back to clsact.
    fallback_reason: Option<String>,
    /// Stale filters of an earlier, killed tcprtt removed at start, one line each.
    removed_stale: Vec<String>,
    /// Interfaces (by index) this run added a clsact qdisc to, or found one holding only
    /// stale filters of ours; deleted at the end when nothing else uses it.
    added_clsact: Vec<u32>,
}

fn classifier<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut SchedClassifier> {
    Ok(ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("program {name} missing from the eBPF object"))?
        .try_into()?)
}

/// Loads the programs each interface needs (each once).
fn load_programs(ebpf: &mut Ebpf, ifaces: &[Iface]) -> Result<()> {
    for iface in ifaces {
        for direction in [TcAttachType::Ingress, TcAttachType::Egress] {
            let name = program_for(iface, direction);
            let prog = classifier(ebpf, name)?;
            if prog.fd().is_err() {
                prog.load()
                    .map_err(|e| anyhow!("the kernel refused {name}: {}", refusal(&e)))?;
            }
        }
    }
    Ok(())
}

/// Attaches the loaded program of each interface at ingress and egress.
fn attach_all(ebpf: &mut Ebpf, ifaces: &[Iface], mode: TcMode) -> Result<Attachment> {
    let mut out = Attachment {
        attached: match mode {
            TcMode::Clsact => Attached::Clsact,
            TcMode::Auto | TcMode::Tcx => Attached::Tcx,
        },
        fallback_reason: None,
        removed_stale: Vec::new(),
        added_clsact: Vec::new(),
    };
    for (n, iface) in ifaces.iter().enumerate() {
        for direction in [TcAttachType::Ingress, TcAttachType::Egress] {
            let name = program_for(iface, direction);
            let prog = classifier(ebpf, name)?;
            if out.attached == Attached::Tcx {
                // First, so that no other program can drop or redirect a packet before
                // it is seen.
                let order = TcAttachOptions::TcxOrder(LinkOrder::first());
                match prog.attach_with_options(&iface.name, direction, order) {
                    Ok(_) => continue,
                    // Only the very first attach may fall back: every interface of a run
                    // is attached the same way.
                    Err(e)
                        if mode == TcMode::Auto && n == 0 && direction == TcAttachType::Ingress =>
                    {
                        out.fallback_reason = Some(format!("TCX refused: {}", refusal(&e)));
                        out.attached = Attached::Clsact;
                    }
                    Err(e) => bail!(
                        "attaching {name} to {} {} with TCX: {}",
                        iface.name,
                        direction_name(direction),
                        refusal(&e)
                    ),
                }
            }
            if direction == TcAttachType::Ingress {
                let stale = remove_stale_filters(iface)?;
                // A qdisc that holds only tcprtt's filters (a killed run's, or another
                // running tcprtt's) is tcprtt's: whichever run ends last removes it.
                let ours = !stale.is_empty() || holds_only_our_filters(iface)?;
                out.removed_stale.extend(stale);
                match tc::qdisc_add_clsact(&iface.name) {
                    Ok(()) => out.added_clsact.push(iface.index),
                    Err(e) if is_exists(&e) => {
                        if ours {
                            out.added_clsact.push(iface.index);
                        }
                    }
                    Err(e) => {
                        return Err(e)
                            .with_context(|| format!("adding a clsact qdisc to {}", iface.name));
                    }
                }
            }
            prog.attach_with_options(
                &iface.name,
                direction,
                TcAttachOptions::Netlink(tc::NlOptions::default()),
            )
            .map_err(|e| {
                anyhow!(
                    "attaching {name} to {} {} with clsact: {}",
                    iface.name,
                    direction_name(direction),
                    refusal(&e)
                )
            })?;
        }
    }
    Ok(out)
}

fn program_for(iface: &Iface, direction: TcAttachType) -> &'static str {
    match (iface.has_l2, direction == TcAttachType::Ingress) {
        (true, true) => PROG_ETH_IN,
        (true, false) => PROG_ETH_OUT,
        (false, true) => PROG_IP_IN,
        (false, false) => PROG_IP_OUT,
    }
}

/// A thread that removes pending TSvals older than `--max-rtt` every second: they were
/// never echoed (a delayed ACK echoes one TSval of two), so they can no longer give a
/// sample, and would otherwise fill the map.
struct Sweeper {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
    swept: Arc<AtomicU64>,
}

const SWEEP_PERIOD: Duration = Duration::from_secs(1);

impl Sweeper {
    fn start(
        mut pending: HashMap<MapData, PendingKey, Pending>,
        max_age: Duration,
    ) -> Result<Self> {
        let (stop, stopped) = mpsc::channel::<()>();
        let swept = Arc::new(AtomicU64::new(0));
        let count = swept.clone();
        let limit = u64::try_from(max_age.as_nanos()).unwrap_or(u64::MAX);
        let thread = thread::Builder::new()
            .name("sweeper".into())
            .spawn(move || {
                while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(SWEEP_PERIOD)
                {
                    // A failed sweep is tried again a second later; the map's own full
                    // counter reports what it costs meanwhile.
                    if let Ok(n) = sweep(&mut pending, limit) {
                        count.fetch_add(n, Ordering::Relaxed);
                    }
                }
            })
            .context("starting the thread that ages out pending TSvals")?;
        Ok(Self {
            stop: Some(stop),
            thread: Some(thread),
            swept,
        })
    }

    fn swept(&self) -> u64 {
        self.swept.load(Ordering::Relaxed)
    }
}

impl Drop for Sweeper {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Removes the entries of `pending` older than `limit_ns`; returns how many it removed.
fn sweep(pending: &mut HashMap<MapData, PendingKey, Pending>, limit_ns: u64) -> Result<u64> {
    let now = monotonic_ns()?;
    let stale: Vec<PendingKey> = pending
        .iter()
        .take(PENDING_ENTRIES as usize)
        // An entry that vanished while listing was echoed meanwhile.
        .filter_map(Result::ok)
        .filter(|(_, pending)| now.saturating_sub(pending.sent_ns) > limit_ns)
        .map(|(key, _)| key)
        .collect();
    // A key already gone was taken by its echo, which the kernel counted.
    Ok(stale
        .iter()
        .filter(|key| pending.remove(key).is_ok())
        .count() as u64)
}

/// Counters the report needs, cumulative.
#[derive(Clone, Copy, Debug, Default)]
struct Totals {
    dropped: u64,
    no_memory: u64,
    /// Samples counted in a histogram or dropped.
    samples: u64,
}

/// The wire source.
pub struct Wire {
    /// Owns the programs, links and the maps not taken out of it.
    ebpf: Ebpf,
    ifaces: Vec<Iface>,
    attachment: Attachment,
    grouping: Grouping,
    buffers: DoubleBuffer,
    stats: PerCpuArray<MapData, u64>,
    wire_stats: PerCpuArray<MapData, u64>,
    sweeper: Sweeper,
    totals: Totals,
}

impl Wire {
    /// Loads the wire programs with the options' filters and grouping and attaches them to
    /// every `--passive` interface.
    pub fn load(opts: &Options, object: &[u8]) -> Result<Self> {
        let config = probe_config(opts, ProbeConfig::ZERO);
        let wire_config = WireConfig {
            max_age_ns: u64::try_from(opts.max_rtt.as_nanos()).unwrap_or(u64::MAX),
        };
        // No CO-RE relocations here either: the loader is better without the kernel's BTF
        // (see `loader`), and `.btf(None)` frees aya's parse of it where it could not be.
        let (mut loader, _) = loader::new();
        let mut ebpf = load_with_filters(
            loader
                .btf(None)
                .override_global("CONFIG", &config, true)
                .override_global("WIRE_CONFIG", &wire_config, true)
                .map_max_entries("WIRE_FLOWS", FLOW_ENTRIES)
                .map_max_entries("WIRE_PENDING", PENDING_ENTRIES),
            opts,
            object,
        )?;
        // Loaded (verified) before any map is taken out of the object: the programs then
        // hold every map they use, whatever userspace keeps or drops.
        load_programs(&mut ebpf, &opts.passive)?;
        let mut buffers = DoubleBuffer::new(&mut ebpf, "", !opts.keeps_detail())?;
        buffers.name_ifaces(IfaceNames::new(
            opts.passive.iter().map(|i| (i.index, i.name.as_str())),
        ));
        let stats = take_map(&mut ebpf, "STATS")?;
        let wire_stats = take_map(&mut ebpf, "WIRE_STATS")?;
        let sweeper = Sweeper::start(take_map(&mut ebpf, "WIRE_PENDING")?, opts.max_rtt)?;
        let mode = match opts.attach {
            Attach::Tcx => TcMode::Tcx,
            Attach::Clsact => TcMode::Clsact,
            _ => TcMode::Auto,
        };
        // From here on `Wire`'s drop undoes whatever attaching did, also when it fails
        // half-way.
        let mut wire = Self {
            ebpf,
            ifaces: opts.passive.clone(),
            attachment: Attachment {
                attached: Attached::Tcx,
                fallback_reason: None,
                removed_stale: Vec::new(),
                added_clsact: Vec::new(),
            },
            grouping: opts.grouping,
            buffers,
            stats,
            wire_stats,
            sweeper,
            totals: Totals::default(),
        };
        wire.attachment = attach_all(&mut wire.ebpf, &wire.ifaces, mode)?;
        Ok(wire)
    }

    /// The interfaces as one phrase: `eth0` or `eth0, eth1`.
    fn iface_names(&self) -> String {
        self.ifaces
            .iter()
            .map(|i| i.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The programs' counters since the start.
    fn counters(&self) -> Result<WireCounters> {
        let sum = |index: u32| -> Result<u64> {
            let per_cpu = self
                .wire_stats
                .get(&index, 0)
                .with_context(|| format!("reading wire counter {index}"))?;
            Ok(per_cpu.iter().sum())
        };
        Ok(WireCounters {
            tcp: sum(wstat::TCP)?,
            not_tcp: sum(wstat::NOT_TCP)?,
            other_l3: sum(wstat::OTHER_L3)?,
            ipv6_ext: sum(wstat::IPV6_EXT)?,
            fragment: sum(wstat::FRAGMENT)?,
            malformed: sum(wstat::MALFORMED)?,
            no_ts_segments: sum(wstat::NO_TS_SEGMENTS)?,
            no_ts_flows: sum(wstat::NO_TS_FLOWS)?,
            recorded: sum(wstat::RECORDED)?,
            pending_full: sum(wstat::PENDING_FULL)?,
            echoed: sum(wstat::ECHOED)?,
            not_advancing: sum(wstat::NOT_ADVANCING)?,
            aged: sum(wstat::AGED)? + self.sweeper.swept(),
            filtered: sum(wstat::FILTERED)?,
            flow_full: sum(wstat::FLOW_FULL)?,
        })
    }

    fn stat(&self, index: u32) -> Result<u64> {
        let per_cpu = self
            .stats
            .get(&index, 0)
            .with_context(|| format!("reading event counter {index}"))?;
        Ok(per_cpu.iter().sum())
    }

    /// Run count and run time of the loaded wire programs (both only move while run-time
    /// statistics are on).
    fn cost(&self) -> Result<(u64, u128)> {
        let mut runs = 0;
        let mut ns = 0;
        for name in OUR_FILTERS {
            let Some(prog) = self.ebpf.program(name) else {
                continue;
            };
            if prog.fd().is_err() {
                continue;
            }
            let info = prog
                .info()
                .context("reading the program's run-time statistics")?;
            runs += info.run_count();
            ns += info.run_time().as_nanos();
        }
        Ok((runs, ns))
    }
}

impl Source for Wire {
    fn banner(&self) -> String {
        let mut text = format!(
            "Tracing TCP RTT on the wire at {} (TCP timestamps). Hit Ctrl-C to end.",
            self.iface_names()
        );
        if let Some(why) = &self.attachment.fallback_reason {
            let _ = write!(text, "\ntcprtt: {why}: attached through a clsact qdisc");
        }
        for line in &self.attachment.removed_stale {
            let _ = write!(text, "\ntcprtt: {line}");
        }
        text
    }

    fn hook(&self) -> &'static str {
        match self.attachment.attached {
            Attached::Tcx => "tcx",
            Attached::Clsact => "clsact",
        }
    }

    fn take(&mut self) -> Result<Taken> {
        let rows = self.buffers.take_rows(RowSource::Wire, self.grouping)?;
        let dropped = self.stat(stat::DROPPED)?;
        let no_memory = self.stat(stat::NO_MEMORY)?;
        let losses = Losses {
            dropped: dropped - self.totals.dropped,
            no_memory: no_memory - self.totals.no_memory,
            // TC programs are not skipped for recursion: nothing runs them re-entrantly.
            missed: 0,
        };
        let counted: u64 = rows.iter().map(|r| r.hist.count).sum();
        self.totals = Totals {
            dropped,
            no_memory,
            samples: self.totals.samples + counted + losses.dropped + losses.no_memory,
        };
        Ok(Taken { rows, losses })
    }

    fn self_report(&self, stats_on: bool) -> Result<String> {
        let c = self.counters()?;
        let cost = if stats_on {
            match self.cost()? {
                (0, _) => "no runs".to_string(),
                (runs, ns) => format!(
                    "{:.1} ns per packet ({ns} ns over {runs} runs)",
                    ns as f64 / runs as f64
                ),
            }
        } else {
            "not measured (run-time statistics need CAP_SYS_ADMIN)".to_string()
        };
        Ok(format!(
            "tcprtt: wire at {} via {}; TCP segments {} ({} without timestamps, on {} \
             connection directions), other IP protocols {}, unparsed {} (not IP {}, IPv6 \
             extension headers {}, fragments {}, malformed {}); TSvals recorded {}, first echoes \
             {} (not advancing the ACK {}, later than --max-rtt {}), samples {}, filtered out {}, \
             dropped {}, pending map full {}, flow table full {}; in-kernel cost {cost}",
            self.iface_names(),
            self.hook(),
            c.tcp,
            c.no_ts_segments,
            c.no_ts_flows,
            c.not_tcp,
            c.unparsed(),
            c.other_l3,
            c.ipv6_ext,
            c.fragment,
            c.malformed,
            c.recorded,
            c.echoed,
            c.not_advancing,
            c.aged,
            self.totals.samples,
            c.filtered,
            self.totals.dropped + self.totals.no_memory,
            c.pending_full,
            c.flow_full,
        ))
    }

    fn farewell(&self) -> Result<Option<String>> {
        let c = self.counters()?;
        let mut lines = Vec::new();
        if self.totals.samples == 0 {
            lines.push(format!(
                "tcprtt: nothing was timed: {}",
                c.why_nothing(&self.iface_names())
            ));
        }
        if c.pending_full > 0 {
            lines.push(format!(
                "tcprtt: {} TSvals were not timed: the pending map ({PENDING_ENTRIES} entries) \
                 was full",
                c.pending_full
            ));
        }
        Ok((!lines.is_empty()).then(|| lines.join("\n")))
    }
}

impl Drop for Wire {
    /// Detaches the programs first (their links and filters), then deletes a clsact qdisc
    /// this run added, unless someone else's filters sit on it now.
    fn drop(&mut self) {
        for name in OUR_FILTERS {
            if let Some(prog) = self
                .ebpf
                .program_mut(name)
                .and_then(|p| <&mut SchedClassifier>::try_from(p).ok())
            {
                let _ = prog.unload();
            }
        }
        for &index in &self.attachment.added_clsact {
            let in_use = [TcAttachType::Ingress, TcAttachType::Egress]
                .iter()
                .any(|&d| list_filters(index, d).map_or(true, |f| !f.is_empty()));
            if !in_use {
                let _ = delete_clsact(index);
            }
        }
    }
}

fn direction_name(direction: TcAttachType) -> &'static str {
    match direction {
        TcAttachType::Egress => "egress",
        _ => "ingress",
    }
}

fn is_exists(err: &TcError) -> bool {
    match err {
        TcError::AlreadyAttached => true,
        TcError::NetlinkError(e) => e.raw_os_error() == Some(libc::EEXIST),
        TcError::IoError(e) => e.raw_os_error() == Some(libc::EEXIST),
        _ => false,
    }
}

/// The kernel's words for a refusal, in one short phrase.
fn refusal(err: &ProgramError) -> String {
    let text = match err {
        ProgramError::LoadError { io_error, .. } => io_error.to_string(),
        ProgramError::SyscallError(e) => e.io_error.to_string(),
        other => other.to_string(),
    };
    match text.find(" (os error") {
        Some(cut) => text[..cut].to_string(),
        None => text,
    }
}

fn monotonic_ns() -> Result<u64> {
    // SAFETY: an all-zero timespec is valid; clock_gettime writes into it.
    let mut ts: libc::timespec = unsafe { zeroed() };
    // SAFETY: a valid clock id and a live timespec. bpf_ktime_get_ns reads this clock.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) } != 0 {
        return Err(io::Error::last_os_error()).context("reading CLOCK_MONOTONIC");
    }
    Ok(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}

/// A filter on a clsact hook, as the kernel lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Filter {
    priority: u16,
    handle: u32,
    name: String,
    prog_id: u32,
}

/// Removes filters of ours whose program nothing holds any more: left by a tcprtt that
/// was killed before it could detach them. Filters of a tcprtt still running stay.
fn remove_stale_filters(iface: &Iface) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    let mut live = None;
    for direction in [TcAttachType::Ingress, TcAttachType::Egress] {
        let filters = list_filters(iface.index, direction)
            .with_context(|| format!("listing the TC filters of {}", iface.name))?;
        for filter in filters {
            if !OUR_FILTERS.contains(&filter.name.as_str()) {
                continue;
            }
            let live = live.get_or_insert_with(live_program_ids);
            if live.contains(&filter.prog_id) {
                continue;
            }
            let link = SchedClassifierLink::attached(
                &iface.name,
                direction,
                filter.priority,
                TcHandle::from(filter.handle),
                None,
            )?;
            link.detach().map_err(|e| {
                anyhow!(
                    "removing the stale filter {} from {} {}: {}",
                    filter.name,
                    iface.name,
                    direction_name(direction),
                    refusal(&e)
                )
            })?;
            removed.push(format!(
                "removed a stale filter of an earlier tcprtt from {} {} (program id {})",
                iface.name,
                direction_name(direction),
                filter.prog_id
            ));
        }
    }
    Ok(removed)
}

/// Whether every filter on the interface's clsact hooks is one of tcprtt's, and there is at
/// least one.
fn holds_only_our_filters(iface: &Iface) -> Result<bool> {
    let mut any = false;
    for direction in [TcAttachType::Ingress, TcAttachType::Egress] {
        let filters = list_filters(iface.index, direction)
            .with_context(|| format!("listing the TC filters of {}", iface.name))?;
        for filter in filters {
            if !OUR_FILTERS.contains(&filter.name.as_str()) {
                return Ok(false);
            }
            any = true;
        }
    }
    Ok(any)
}

/// Ids of the BPF programs some process holds a descriptor of.
fn live_program_ids() -> HashSet<u32> {
    let mut ids = HashSet::new();
    let Ok(procs) = fs::read_dir("/proc") else {
        return ids;
    };
    for proc in procs.flatten() {
        let Ok(fds) = fs::read_dir(proc.path().join("fdinfo")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(info) = fs::read_to_string(fd.path()) {
                ids.extend(
                    info.lines()
                        .filter_map(|l| l.strip_prefix("prog_id:"))
                        .filter_map(|v| v.trim().parse::<u32>().ok()),
                );
            }
        }
    }
    ids
}

// rtnetlink, just enough to list a clsact hook's filters and delete a qdisc.
const RTM_DELQDISC: u16 = 37;
const RTM_NEWTFILTER: u16 = 44;
const RTM_GETTFILTER: u16 = 46;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const TCA_KIND: u16 = 1;
const TCA_OPTIONS: u16 = 2;
const TCA_BPF_NAME: u16 = 7;
const TCA_BPF_ID: u16 = 11;
const NLA_TYPE_MASK: u16 = 0x3fff;
const TC_H_CLSACT: u32 = 0xffff_fff1;
const TC_H_MIN_INGRESS: u32 = 0xfff2;
const TC_H_MIN_EGRESS: u32 = 0xfff3;

#[repr(C)]
#[derive(Clone, Copy)]
struct NlMsgHdr {
    len: u32,
    kind: u16,
    flags: u16,
    seq: u32,
    pid: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct TcMsg {
    family: u8,
    pad1: u8,
    pad2: u16,
    ifindex: i32,
    handle: u32,
    parent: u32,
    info: u32,
}

#[repr(C)]
struct TcRequest {
    header: NlMsgHdr,
    tc: TcMsg,
}

fn netlink_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2).
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sends one request and collects the payloads of the answers until the dump (or the
/// acknowledgement) ends.
fn netlink_request(kind: u16, flags: u16, tc: TcMsg) -> io::Result<Vec<(u16, Vec<u8>)>> {
    let sock = netlink_socket()?;
    let req = TcRequest {
        header: NlMsgHdr {
            len: size_of::<TcRequest>() as u32,
            kind,
            flags: libc::NLM_F_REQUEST as u16 | libc::NLM_F_ACK as u16 | flags,
            seq: 1,
            pid: 0,
        },
        tc,
    };
    // SAFETY: `req` is plain old data of the length passed.
    let sent = unsafe {
        libc::send(
            sock.as_raw_fd(),
            (&req as *const TcRequest).cast(),
            size_of::<TcRequest>(),
            0,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut answers = Vec::new();
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        // SAFETY: the buffer is live and of the length passed.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut rest = &buf[..n as usize];
        while rest.len() >= size_of::<NlMsgHdr>() {
            // SAFETY: at least a header's worth of bytes; read without alignment needs.
            let header: NlMsgHdr = unsafe { std::ptr::read_unaligned(rest.as_ptr().cast()) };
            let len = header.len as usize;
            if len < size_of::<NlMsgHdr>() || len > rest.len() {
                return Err(io::Error::other("truncated netlink message"));
            }
            let body = &rest[size_of::<NlMsgHdr>()..len];
            match header.kind {
                NLMSG_DONE => return Ok(answers),
                NLMSG_ERROR => {
                    let code = body
                        .get(..4)
                        .map_or(0, |b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
                    if code == 0 {
                        return Ok(answers);
                    }
                    return Err(io::Error::from_raw_os_error(-code));
                }
                kind => answers.push((kind, body.to_vec())),
            }
            let next = ((len + 3) & !3).min(rest.len());
            rest = &rest[next..];
        }
    }
}

/// Attributes of a netlink message body: (type, payload).
fn attributes(mut data: &[u8]) -> Vec<(u16, &[u8])> {
    let mut attrs = Vec::new();
    while data.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([data[0], data[1]]));
        let kind = u16::from_ne_bytes([data[2], data[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > data.len() {
            break;
        }
        attrs.push((kind, &data[4..len]));
        data = &data[((len + 3) & !3).min(data.len())..];
    }
    attrs
}

fn clsact_parent(direction: TcAttachType) -> u32 {
    let minor = if direction == TcAttachType::Egress {
        TC_H_MIN_EGRESS
    } else {
        TC_H_MIN_INGRESS
    };
    (TC_H_CLSACT & 0xffff_0000) | minor
}

/// The BPF filters on one clsact hook of an interface; empty when it has no clsact.
fn list_filters(ifindex: u32, direction: TcAttachType) -> io::Result<Vec<Filter>> {
    let tc = TcMsg {
        family: libc::AF_UNSPEC as u8,
        pad1: 0,
        pad2: 0,
        ifindex: ifindex as i32,
        handle: 0,
        parent: clsact_parent(direction),
        info: 0,
    };
    let answers = match netlink_request(RTM_GETTFILTER, libc::NLM_F_DUMP as u16, tc) {
        Ok(answers) => answers,
        // No clsact qdisc: no filters.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut filters = Vec::new();
    for (kind, body) in answers {
        if kind != RTM_NEWTFILTER || body.len() < size_of::<TcMsg>() {
            continue;
        }
        // SAFETY: at least a tcmsg's worth of bytes; read without alignment needs.
        let msg: TcMsg = unsafe { std::ptr::read_unaligned(body.as_ptr().cast()) };
        let mut filter = Filter {
            priority: (msg.info >> 16) as u16,
            handle: msg.handle,
            name: String::new(),
            prog_id: 0,
        };
        let mut is_bpf = false;
        for (attr, data) in attributes(&body[size_of::<TcMsg>()..]) {
            match attr {
                TCA_KIND => is_bpf = data.starts_with(b"bpf\0"),
                TCA_OPTIONS => {
                    for (opt, value) in attributes(data) {
                        match opt {
                            TCA_BPF_NAME => {
                                filter.name = CStr::from_bytes_until_nul(value)
                                    .map(|s| s.to_string_lossy().into_owned())
                                    .unwrap_or_default();
                            }
                            TCA_BPF_ID if value.len() >= 4 => {
                                filter.prog_id =
                                    u32::from_ne_bytes([value[0], value[1], value[2], value[3]]);
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        // A filter's chain and priority also come as bodies without options: skip those.
        if is_bpf && filter.handle != 0 {
            filters.push(filter);
        }
    }
    Ok(filters)
}

fn delete_clsact(ifindex: u32) -> io::Result<()> {
    let tc = TcMsg {
        family: libc::AF_UNSPEC as u8,
        pad1: 0,
        pad2: 0,
        ifindex: ifindex as i32,
        handle: TC_H_CLSACT & 0xffff_0000,
        parent: TC_H_CLSACT,
        info: 0,
    };
    netlink_request(RTM_DELQDISC, 0, tc).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_interface_names_are_refused_before_any_syscall() {
        assert!(check_interface("").is_err());
        let long = check_interface("a-name-of-16-byt").unwrap_err();
        assert!(long.contains("at most 15 bytes"), "{long}");
        assert!(check_interface("a/b").is_err());
    }

    #[test]
    fn netlink_attributes_parse_with_padding() {
        // Two attributes: type 1 "bpf\0" (len 8), type 7 "ab\0" (len 7, padded to 8).
        let data = [
            8, 0, 1, 0, b'b', b'p', b'f', 0, 7, 0, 7, 0, b'a', b'b', 0, 0,
        ];
        let attrs = attributes(&data);
        assert_eq!(attrs, vec![(1, &b"bpf\0"[..]), (7, &b"ab\0"[..])]);
    }

    #[test]
    fn nothing_timed_says_why() {
        let none = WireCounters::default();
        assert!(
            none.why_nothing("eth0")
                .contains("no TCP segment crossed eth0")
        );
        let no_ts = WireCounters {
            tcp: 10,
            no_ts_segments: 10,
            ..WireCounters::default()
        };
        assert!(no_ts.why_nothing("eth0").contains("tcp_timestamps=0"));
    }
}
