//! The kernel-srtt source: on every segment an established connection receives, the eBPF
//! program adds the socket's smoothed RTT to a histogram.

use std::{
    fmt::Write as _,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use aya::{
    Btf, Ebpf,
    maps::{MapData, PerCpuArray},
    programs::{BtfTracePoint, FEntry, Program, ProgramError},
};
use aya_obj::generated::{bpf_attach_type, bpf_attr, bpf_cmd, bpf_prog_type};
use tcprtt_common::{ProbeConfig, filter, stat};

use super::{Source, Taken, double_buffer::DoubleBuffer, load_with_filters, loader};
use crate::{
    btf::{self, KernelBtf},
    cli::{Attach, Options},
    report::{Grouping, Losses, Source as RowSource},
};

/// A place in the kernel the program can run at, in the order `--attach auto` tries them.
struct Hook {
    /// What users and messages call it.
    name: &'static str,
    /// The name in JSON output.
    short: &'static str,
    /// The `--attach` value that asks for this hook alone.
    choice: Attach,
    /// The program's name in the eBPF object.
    program: &'static str,
    /// Added to the error when this hook was asked for alone and refused.
    hint: &'static str,
    /// The id of the program's target in the kernel's BTF, if it has one.
    target_id: fn(&KernelBtf) -> Option<u32>,
    /// A BTF naming the target at that id, for aya to resolve it in.
    stand_in: fn(u32) -> Result<Btf>,
    /// Whether the kernel accepts any program at the target's id, asked before a stand-in
    /// too costly to build for nothing.
    precheck: Option<fn(u32) -> Result<(), Refusal>>,
    load_and_attach: fn(&mut Program, &Btf) -> Result<(), ProgramError>,
}

/// The kernel function the fentry program runs at.
const FENTRY_TARGET: &str = "tcp_rcv_established";
/// The tracepoint the tp_btf program runs at, and the typedef the kernel's BTF names it by.
const TP_BTF_TARGET: &str = "tcp_probe";
const TP_BTF_TYPEDEF: &str = "btf_trace_tcp_probe";

fn fentry(prog: &mut Program, btf: &Btf) -> Result<(), ProgramError> {
    let p: &mut FEntry = prog.try_into()?;
    p.load(FENTRY_TARGET, btf)?;
    p.attach().map(drop)
}

fn tp_btf(prog: &mut Program, btf: &Btf) -> Result<(), ProgramError> {
    let p: &mut BtfTracePoint = prog.try_into()?;
    p.load(TP_BTF_TARGET, btf)?;
    p.attach().map(drop)
}

/// Whether the kernel loads an fentry program at BTF id `id`: the smallest one (`r0 = 0;
/// exit`), loaded and closed. aya's load needs a stand-in BTF with an entry for every
/// kernel type up to the target, several MiB and milliseconds for fentry's, all wasted on
/// a kernel that refuses fentry outright (EPERM on the development machines).
fn fentry_allowed(id: u32) -> Result<(), Refusal> {
    // `r0 = 0` (BPF_ALU64 | BPF_MOV | BPF_K) and `exit` (BPF_JMP | BPF_EXIT), registers 0.
    let insns: [[u8; 8]; 2] = [[0xb7, 0, 0, 0, 0, 0, 0, 0], [0x95, 0, 0, 0, 0, 0, 0, 0]];
    let mut log = [0u8; 1024];
    // SAFETY: bpf_attr is plain data, for which all zeroes is the kernel's "unset".
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    // SAFETY: the BPF_PROG_LOAD member of the union; the pointers outlive the call.
    let load = unsafe { &mut attr.__bindgen_anon_3 };
    load.prog_type = bpf_prog_type::BPF_PROG_TYPE_TRACING as u32;
    load.expected_attach_type = bpf_attach_type::BPF_TRACE_FENTRY as u32;
    load.attach_btf_id = id;
    load.insns = insns.as_ptr() as u64;
    load.insn_cnt = insns.len() as u32;
    load.license = c"GPL".as_ptr() as u64;
    load.log_level = 1;
    load.log_buf = log.as_mut_ptr() as u64;
    load.log_size = log.len() as u32;
    // SAFETY: BPF_PROG_LOAD with a whole, initialised attr.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            bpf_cmd::BPF_PROG_LOAD as libc::c_long,
            &raw mut attr,
            size_of::<bpf_attr>(),
        )
    };
    if let Ok(fd) = i32::try_from(fd)
        && fd >= 0
    {
        // SAFETY: a new descriptor the kernel just returned, owned by nothing else.
        drop(unsafe { OwnedFd::from_raw_fd(fd) });
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    let said = log.split(|b| *b == 0).next().unwrap_or_default();
    let log = String::from_utf8_lossy(said).trim().to_string();
    Err(Refusal {
        phrase: errno_text(&err),
        log: (!log.is_empty()).then_some(log),
    })
}

/// fentry first (the design's hook), then tp_btf/tcp_probe, which the kernel fires as the
/// first statement of `tcp_rcv_established()` with the same `(sk, skb)` arguments.
const HOOKS: [Hook; 2] = [
    Hook {
        name: "fentry/tcp_rcv_established",
        short: "fentry",
        choice: Attach::Fentry,
        program: "tcprtt_fentry",
        hint: ": try --attach tp-btf",
        target_id: |kernel| kernel.func_id(FENTRY_TARGET),
        stand_in: |id| Ok(btf::func_stand_in(FENTRY_TARGET, id)),
        precheck: Some(fentry_allowed),
        load_and_attach: fentry,
    },
    Hook {
        name: "tp_btf/tcp_probe",
        short: "tp_btf",
        choice: Attach::TpBtf,
        program: "tcprtt_tp_btf",
        hint: "",
        target_id: |kernel| kernel.typedef_id(TP_BTF_TYPEDEF),
        stand_in: |id| btf::typedef_stand_in(TP_BTF_TYPEDEF, id),
        precheck: None,
        load_and_attach: tp_btf,
    },
];

const DEFAULT_BTF: &str = "/sys/kernel/btf/vmlinux";

/// The kernel's words for an errno, without Rust's "(os error N)" suffix.
fn errno_text(err: &std::io::Error) -> String {
    let text = err.to_string();
    match text.find(" (os error") {
        Some(cut) => text[..cut].to_string(),
        None => text,
    }
}

/// Why the kernel refused a program.
struct Refusal {
    /// One phrase, e.g. "Operation not permitted".
    phrase: String,
    /// What the verifier said, when it ran and said something.
    log: Option<String>,
}

impl Refusal {
    fn new(err: &ProgramError) -> Self {
        let (phrase, log) = match err {
            ProgramError::LoadError {
                io_error,
                verifier_log,
            } => (errno_text(io_error), Some(verifier_log.to_string())),
            ProgramError::SyscallError(e) => (errno_text(&e.io_error), None),
            other => (other.to_string(), None),
        };
        let log = log.filter(|l| !l.trim().is_empty());
        Self { phrase, log }
    }

    /// The phrase, and with `verbose` the verifier log on the lines after it.
    fn describe(&self, verbose: bool) -> String {
        match &self.log {
            Some(log) if verbose => format!("{}; verifier log:\n{log}", self.phrase),
            _ => self.phrase.clone(),
        }
    }
}

/// Every socket field the probe reads, as offsets from the `struct sock *` it is given.
/// `tcp_sock` begins with `struct sock`, so both are measured from the same pointer.
pub fn socket_offsets(btf: &KernelBtf) -> Result<ProbeConfig> {
    let sock = btf.struct_named("sock")?;
    let skc = |field: &str| sock.offset_of(&format!("__sk_common.{field}"));
    Ok(ProbeConfig {
        off_srtt_us: btf.offset_of("tcp_sock", "srtt_us")?,
        off_family: skc("skc_family")?,
        off_v4_laddr: skc("skc_rcv_saddr")?,
        off_v4_raddr: skc("skc_daddr")?,
        off_v6_laddr: skc("skc_v6_rcv_saddr")?,
        off_v6_raddr: skc("skc_v6_daddr")?,
        off_lport: skc("skc_num")?,
        off_rport: skc("skc_dport")?,
        ..ProbeConfig::ZERO
    })
}

/// The program's read-only configuration for these options.
pub fn probe_config(opts: &Options, offsets: ProbeConfig) -> ProbeConfig {
    let filters = [
        (!opts.laddr.is_empty(), filter::LADDR),
        (!opts.raddr.is_empty(), filter::RADDR),
        (!opts.lport.is_empty(), filter::LPORT),
        (!opts.rport.is_empty(), filter::RPORT),
    ]
    .into_iter()
    .filter(|(set, _)| *set)
    .fold(0, |bits, (_, flag)| bits | flag);
    ProbeConfig {
        filters,
        family: opts.family,
        group_by: opts.grouping.id,
        milliseconds: u32::from(opts.milliseconds),
        log2_only: u32::from(!opts.keeps_detail()),
        ..offsets
    }
}

fn btf_path(opts: &Options) -> Result<PathBuf> {
    match &opts.btf {
        Some(path) if path.exists() => Ok(path.clone()),
        Some(path) => bail!("--btf {}: no such file", path.display()),
        None if std::path::Path::new(DEFAULT_BTF).exists() => Ok(DEFAULT_BTF.into()),
        None => bail!(
            "this kernel exposes no BTF ({DEFAULT_BTF} is missing; it needs CONFIG_DEBUG_INFO_BTF): \
             pass --btf FILE with the BTF of the running kernel"
        ),
    }
}

/// A `name:\tvalue` field of a BPF program's fdinfo.
fn fdinfo_field(fdinfo: &str, name: &str) -> Option<u64> {
    fdinfo
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|v| v.trim().parse().ok())
}

/// Event counters, cumulative or over one interval.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Counters {
    /// Times the hook fired: program runs (counted only while run-time statistics are on,
    /// i.e. with -v) plus misses.
    seen: u64,
    /// Segments that passed every filter: counted in a histogram or dropped.
    matched: u64,
    dropped: u64,
    no_memory: u64,
    /// Segments whose srtt could not be read, or of an unknown family.
    unreadable: u64,
    missed: u64,
    /// Samples whose histogram's min or max lost a race (see `stat::EXTREME_CONTENDED`).
    extreme_contended: u64,
}

/// Where the start-up went, for `-v`.
#[derive(Clone, Copy, Debug)]
struct StartUp {
    /// Reading and indexing the kernel's BTF, and the offsets and target ids from it.
    btf: Duration,
    /// aya's loader: the object, maps and filters, and its own parse of the kernel's BTF
    /// unless `kernel_btf` says it was kept from it.
    loader: Duration,
    kernel_btf: loader::KernelBtf,
    /// The hooks tried, each with its stand-in BTF, until one attached.
    attach: Duration,
}

impl StartUp {
    fn describe(&self) -> String {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        format!(
            "start-up {:.1} ms: kernel BTF {:.1} ms, aya's loader {:.1} ms ({}), attach {:.1} ms",
            ms(self.btf + self.loader + self.attach),
            ms(self.btf),
            ms(self.loader),
            self.kernel_btf.describe(),
            ms(self.attach)
        )
    }
}

pub struct Srtt {
    /// Owns the programs and the maps not taken out of it; dropping it detaches.
    ebpf: Ebpf,
    hook: &'static Hook,
    /// The hooks tried before `hook` with `--attach auto`, and why each was refused.
    refusals: Vec<(&'static Hook, Refusal)>,
    startup: StartUp,
    grouping: Grouping,
    buffers: DoubleBuffer,
    stats: PerCpuArray<MapData, u64>,
    totals: Counters,
    /// `/proc/self/fdinfo/<program fd>`: the kernel reports the program's misses only
    /// there (aya's program info does not carry them).
    fdinfo: PathBuf,
}

impl Srtt {
    /// Loads the program with its configuration, fills the filters and attaches at the first
    /// hook `opts.attach` allows that the kernel accepts.
    pub fn load(opts: &Options, object: &[u8]) -> Result<Self> {
        let began = Instant::now();
        let path = btf_path(opts)?;
        // The kernel's BTF is read and indexed once, and freed before aya's loader runs
        // (which, where `loader::new` cannot keep the file from it, parses it again), so
        // the two never hold memory at the same time.
        let (offsets, target_ids) = {
            let data = btf::read_file(&path)?;
            let kernel = KernelBtf::parse(&data)
                .with_context(|| format!("reading the BTF in {}", path.display()))?;
            let offsets = socket_offsets(&kernel).with_context(|| {
                format!("resolving socket field offsets from {}", path.display())
            })?;
            (offsets, HOOKS.map(|hook| (hook.target_id)(&kernel)))
        };
        let btf_read = began.elapsed();
        let config = probe_config(opts, offsets);
        // The object has no CO-RE relocations (the offsets travel in CONFIG), so the
        // loader needs no kernel BTF: `loader::new` keeps aya 0.14's `EbpfLoader::new()`
        // from parsing it where it can, and `.btf(None)` frees the parse where it cannot.
        let (mut loader, kernel_btf) = loader::new();
        let mut ebpf = load_with_filters(
            loader.btf(None).override_global("CONFIG", &config, true),
            opts,
            object,
        )?;
        let loaded = began.elapsed();
        let (hook, refusals) = attach(&mut ebpf, target_ids, opts)?;
        // What the loader and the stand-ins parsed is freed now, in pieces the allocator
        // would keep for the rest of the run: hand them back to the kernel.
        // SAFETY: malloc_trim only releases memory no allocation holds.
        unsafe { libc::malloc_trim(0) };
        let startup = StartUp {
            btf: btf_read,
            loader: loaded - btf_read,
            kernel_btf,
            attach: began.elapsed() - loaded,
        };
        let fd = ebpf
            .program(hook.program)
            .context("tcprtt's program vanished from the object")?
            .fd()
            .context("getting the program's file descriptor")?
            .as_fd()
            .as_raw_fd();
        Ok(Self {
            fdinfo: PathBuf::from(format!("/proc/self/fdinfo/{fd}")),
            buffers: DoubleBuffer::new(&mut ebpf, "", !opts.keeps_detail())?,
            stats: super::take_map(&mut ebpf, "STATS")?,
            ebpf,
            hook,
            refusals,
            startup,
            grouping: opts.grouping,
            totals: Counters::default(),
        })
    }

    fn read_fdinfo(&self) -> Result<String> {
        std::fs::read_to_string(&self.fdinfo)
            .with_context(|| format!("reading {}", self.fdinfo.display()))
    }

    /// Cumulative counters, except `matched`, which [`Source::take`] adds up.
    fn read_totals(&self) -> Result<Counters> {
        let sum = |index: u32| -> Result<u64> {
            let per_cpu = self
                .stats
                .get(&index, 0)
                .with_context(|| format!("reading event counter {index}"))?;
            Ok(per_cpu.iter().sum())
        };
        // Kernels before 5.12 do not count misses.
        let missed = fdinfo_field(&self.read_fdinfo()?, "recursion_misses").unwrap_or(0);
        Ok(Counters {
            // The run count only moves while run-time statistics are on (-v).
            seen: self.program_info()?.run_count() + missed,
            matched: 0,
            dropped: sum(stat::DROPPED)?,
            no_memory: sum(stat::NO_MEMORY)?,
            unreadable: sum(stat::UNREADABLE)?,
            missed,
            extreme_contended: sum(stat::EXTREME_CONTENDED)?,
        })
    }

    fn program_info(&self) -> Result<aya::programs::ProgramInfo> {
        self.ebpf
            .program(self.hook.program)
            .context("tcprtt's program vanished from the object")?
            .info()
            .context("reading the program's run-time statistics")
    }
}

/// Tries each hook `opts.attach` allows, in order; returns the one that attached and why
/// the ones before it did not.
fn attach(
    ebpf: &mut Ebpf,
    target_ids: [Option<u32>; HOOKS.len()],
    opts: &Options,
) -> Result<(&'static Hook, Vec<(&'static Hook, Refusal)>)> {
    let mut refusals = Vec::new();
    for (hook, target_id) in HOOKS
        .iter()
        .zip(target_ids)
        .filter(|(h, _)| opts.attach == Attach::Auto || opts.attach == h.choice)
    {
        if let (Some(id), Some(precheck)) = (target_id, hook.precheck)
            && let Err(why) = precheck(id)
        {
            refusals.push((hook, why));
            continue;
        }
        // Without its target the load fails naming it, which is the refusal to report.
        let btf = match target_id {
            Some(id) => (hook.stand_in)(id)?,
            None => Btf::new(),
        };
        let prog = ebpf
            .program_mut(hook.program)
            .ok_or_else(|| anyhow!("program {} missing from the eBPF object", hook.program))?;
        match (hook.load_and_attach)(prog, &btf) {
            Ok(()) => return Ok((hook, refusals)),
            Err(err) => refusals.push((hook, Refusal::new(&err))),
        }
    }
    match refusals.as_slice() {
        [(hook, why)] => bail!(
            "the kernel refused {} ({}){}",
            hook.name,
            why.describe(opts.verbose),
            hook.hint
        ),
        all => {
            let each: Vec<String> = all
                .iter()
                .map(|(hook, why)| format!("{} ({})", hook.name, why.describe(opts.verbose)))
                .collect();
            bail!("the kernel refused every hook: {}", each.join(" and "))
        }
    }
}

impl Source for Srtt {
    fn banner(&self) -> String {
        let mut line = format!("Tracing TCP RTT via {}", self.hook.name);
        if !self.refusals.is_empty() {
            let why: Vec<String> = self
                .refusals
                .iter()
                .map(|(hook, why)| format!("{} refused: {}", hook.short, why.phrase))
                .collect();
            let _ = write!(line, " ({})", why.join("; "));
        }
        line + ". Hit Ctrl-C to end."
    }

    fn hook(&self) -> &'static str {
        self.hook.short
    }

    fn take(&mut self) -> Result<Taken> {
        let rows = self.buffers.take_rows(RowSource::Srtt, self.grouping)?;
        let totals = self.read_totals()?;
        let dropped = totals.dropped - self.totals.dropped;
        let no_memory = totals.no_memory - self.totals.no_memory;
        let missed = totals.missed - self.totals.missed;
        let counted: u64 = rows.iter().map(|r| r.hist.count).sum();
        self.totals = Counters {
            matched: self.totals.matched + counted + dropped + no_memory,
            ..totals
        };
        Ok(Taken {
            rows,
            losses: Losses {
                dropped,
                no_memory,
                missed,
            },
        })
    }

    fn self_report(&self, stats_on: bool) -> Result<String> {
        let c = self.totals;
        let mut counts = format!(
            "matched {}, dropped {}, dropped for lack of memory {}, unreadable {}, missed {}",
            c.matched, c.dropped, c.no_memory, c.unreadable, c.missed
        );
        if c.extreme_contended > 0 {
            counts += &format!(
                ", min/max not stored under contention {}",
                c.extreme_contended
            );
        }
        // Without run-time statistics the kernel counts no runs: say nothing rather than 0.
        let startup = self.startup.describe();
        if !stats_on {
            return Ok(format!(
                "tcprtt: attach point {}; {counts}; {startup}",
                self.hook.name
            ));
        }
        let info = self.program_info()?;
        let runs = info.run_count();
        let ns = info.run_time().as_nanos();
        let per_event = if runs == 0 {
            "no runs".to_string()
        } else {
            format!("{:.1} ns per event", ns as f64 / runs as f64)
        };
        Ok(format!(
            "tcprtt: attach point {}; events seen {}, {counts}; in-kernel cost {per_event} \
             ({ns} ns over {runs} runs); {startup}",
            self.hook.name, c.seen
        ))
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn reads_program_counters_from_fdinfo() {
        let info = "pos:\t0\nprog_id:\t794\nrun_cnt:\t10\nrecursion_misses:\t3\n";
        assert_eq!(fdinfo_field(info, "recursion_misses"), Some(3));
        assert_eq!(fdinfo_field(info, "run_cnt"), Some(10));
        assert_eq!(fdinfo_field(info, "missing"), None);
    }

    #[test]
    fn errno_text_drops_the_os_error_suffix() {
        assert_eq!(
            errno_text(&std::io::Error::from_raw_os_error(1)),
            "Operation not permitted"
        );
    }

    /// The real kernel: every field resolves, and `srtt_us` agrees with bpftool's own
    /// reading of the same BTF (an independent parser), read from its JSON dump.
    #[test]
    fn resolves_every_socket_field_in_the_running_kernel() {
        let path = Path::new(DEFAULT_BTF);
        let data = btf::read_file(path).unwrap();
        let cfg = socket_offsets(&KernelBtf::parse(&data).unwrap()).unwrap();
        let dump = std::process::Command::new("bpftool")
            .args(["-j", "btf", "dump", "file", DEFAULT_BTF, "format", "raw"])
            .output()
            .expect("bpftool is installed by `cargo xtask setup`");
        assert!(dump.status.success());
        let dump: serde_json::Value = serde_json::from_slice(&dump.stdout).unwrap();
        let tcp_sock = dump["types"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["kind"] == "STRUCT" && t["name"] == "tcp_sock")
            .expect("tcp_sock in bpftool's dump");
        let srtt = tcp_sock["members"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == "srtt_us")
            .expect("srtt_us in tcp_sock");
        assert_eq!(
            u64::from(cfg.off_srtt_us),
            srtt["bits_offset"].as_u64().unwrap() / 8
        );
        let fields = [
            cfg.off_family,
            cfg.off_v4_laddr,
            cfg.off_v4_raddr,
            cfg.off_v6_laddr,
            cfg.off_v6_raddr,
            cfg.off_lport,
            cfg.off_rport,
        ];
        for (i, a) in fields.iter().enumerate() {
            assert!(*a < 256, "{a}");
            for b in &fields[i + 1..] {
                assert_ne!(a, b);
            }
        }
        assert_eq!(
            cfg.off_v4_raddr + 4,
            cfg.off_v4_laddr,
            "skc_addrpair layout"
        );
        assert!(cfg.off_srtt_us > 256);
    }
}
