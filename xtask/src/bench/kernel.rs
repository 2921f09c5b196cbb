//! What the benchmark asks of the kernel: run-time statistics, the empty program, tracefs
//! for bpftrace, and what bpftool says of a program and its maps.

use std::{
    collections::BTreeSet,
    fs,
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use aya::{
    Btf, Ebpf, EbpfLoader,
    programs::{BtfTracePoint, loaded_programs},
};
use serde_json::Value;

use super::EMPTY_PROGRAM;

/// The kernel's BPF run-time statistics, on while this lives. They are system-wide and
/// put a clock read around every BPF program run, so they stay off while start-up is
/// timed.
pub fn run_time_stats() -> Result<OwnedFd> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime).context("enabling BPF run-time statistics")
}

/// Cumulative (run time in ns, run count) of the loaded program with this id.
pub fn program_stats(id: u32) -> Result<(u64, u64)> {
    for info in loaded_programs() {
        let info = info.context("listing loaded BPF programs")?;
        if info.id() == id {
            return Ok((info.run_time().as_nanos() as u64, info.run_count()));
        }
    }
    anyhow::bail!("BPF program {id} is no longer loaded")
}

/// Nanoseconds per run between two readings of `program_stats`.
pub fn per_run(before: (u64, u64), after: (u64, u64)) -> Result<f64> {
    let runs = after.1 - before.1;
    ensure!(runs > 0, "the program did not run");
    Ok((after.0 - before.0) as f64 / runs as f64)
}

/// The empty program attached to tp_btf/tcp_probe (the cost floor of any program there)
/// and its id. Dropping the object detaches and unloads it.
pub fn attach_empty(object: &Path) -> Result<(Ebpf, u32)> {
    let btf = Btf::from_sys_fs().context("reading the kernel's BTF")?;
    let bytes = fs::read(object).with_context(|| format!("reading {}", object.display()))?;
    let mut ebpf = EbpfLoader::new()
        .btf(Some(&btf))
        .load(&bytes)
        .context("loading the eBPF object")?;
    let prog: &mut BtfTracePoint = ebpf
        .program_mut(EMPTY_PROGRAM)
        .context("no tcprtt_empty program in the object")?
        .try_into()?;
    prog.load("tcp_probe", &btf)
        .context("loading tcprtt_empty")?;
    prog.attach().context("attaching tcprtt_empty")?;
    let id = prog.info().context("reading tcprtt_empty's id")?.id();
    Ok((ebpf, id))
}

/// Waits for the kernel to free unloaded programs (after an RCU grace period), then
/// fails if any of these is still loaded.
pub fn ensure_unloaded(ids: &BTreeSet<u32>) -> Result<()> {
    ensure!(!ids.is_empty(), "no tracer held a program");
    let left = || -> Vec<String> {
        loaded_programs()
            .filter_map(Result::ok)
            .filter(|p| ids.contains(&p.id()))
            .map(|p| format!("{} (id {})", p.name_as_str().unwrap_or("?"), p.id()))
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(2);
    while !left().is_empty() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    let left = left();
    ensure!(
        left.is_empty(),
        "programs left loaded after the benchmark: {}",
        left.join(", ")
    );
    Ok(())
}

/// The eBPF object of the newest release build.
pub fn newest_object(root: &Path) -> Result<PathBuf> {
    let build = root.join("target/release/build");
    let mut newest: Option<(std::time::SystemTime, PathBuf)> = None;
    for entry in fs::read_dir(&build).with_context(|| format!("listing {}", build.display()))? {
        let path = entry?.path().join("out/tcprtt");
        if let Ok(modified) = fs::metadata(&path).and_then(|m| m.modified())
            && newest.as_ref().is_none_or(|(t, _)| modified > *t)
        {
            newest = Some((modified, path));
        }
    }
    newest
        .map(|(_, p)| p)
        .context("no eBPF object under target/release/build: run `cargo xtask build`")
}

/// tracefs mounted for bpftrace's classic tracepoint; unmounted again on drop when this
/// run mounted it.
pub struct Tracefs {
    mounted_here: bool,
}

const TRACEFS: &str = "/sys/kernel/tracing";

impl Tracefs {
    pub fn ensure() -> Result<Self> {
        if Path::new(TRACEFS).join("events").is_dir() {
            return Ok(Self {
                mounted_here: false,
            });
        }
        crate::output(Command::new("mount").args(["-t", "tracefs", "tracefs", TRACEFS]))
            .context("mounting tracefs for bpftrace")?;
        Ok(Self { mounted_here: true })
    }
}

impl Drop for Tracefs {
    fn drop(&mut self) {
        if self.mounted_here {
            let _ = Command::new("umount").arg(TRACEFS).status();
        }
    }
}

/// What `bpftool -j ARGS` prints, parsed.
fn bpftool(args: &[&str]) -> Result<Value> {
    let text = crate::output(Command::new("bpftool").arg("-j").args(args))?;
    serde_json::from_str(&text).with_context(|| format!("parsing `bpftool -j {}`", args.join(" ")))
}

/// A program after verification: its instruction count and the calls it makes.
pub type Verified = (usize, Vec<String>);

/// A program as the verifier left it for a mode's settings (it removes the code that
/// read-only configuration rules out): instruction count and the calls it makes.
pub fn verified_program(id: u32) -> Result<Verified> {
    let xlated = bpftool(&["prog", "dump", "xlated", "id", &id.to_string()])?;
    let insns = xlated
        .as_array()
        .context("bpftool's xlated dump is not a list")?;
    let mut instructions = 0;
    let mut calls = Vec::new();
    for disasm in insns.iter().filter_map(|i| i["disasm"].as_str()) {
        instructions += 1;
        if let Some((_, target)) = disasm.split_once(" call ") {
            calls.push(call_name(target));
        }
    }
    ensure!(instructions > 0, "bpftool printed no instructions");
    Ok((instructions, calls))
}

/// "bpf_probe_read_kernel#-69024" for a helper, or "pc+161#bpf_prog_<16 hex digits>_memset"
/// for a BPF-to-BPF call.
fn call_name(target: &str) -> String {
    match target.split_once('#') {
        Some((pc, name)) if pc.starts_with("pc") => {
            let name = name
                .strip_prefix("bpf_prog_")
                .and_then(|n| n.get(17..))
                .unwrap_or(name);
            format!("`{name}` (subprogram)")
        }
        Some((helper, _)) => format!("`{helper}`"),
        None => format!("`{target}`"),
    }
}

/// One map of a program, as `bpftool map show` describes it.
pub struct MapMemory {
    pub name: String,
    pub kind: String,
    pub flags: u64,
    pub key: u64,
    pub value: u64,
    pub max_entries: u64,
    /// `bytes_memlock`: the kernel's own count of the map's memory.
    pub bytes: u64,
}

/// Every map a program uses.
pub fn program_maps(id: u32) -> Result<Vec<MapMemory>> {
    let prog = bpftool(&["prog", "show", "id", &id.to_string()])?;
    let ids = prog["map_ids"]
        .as_array()
        .context("no map_ids in bpftool's output")?;
    let mut maps = Vec::new();
    for id in ids {
        let id = id.as_u64().context("a map id that is not a number")?;
        let map = bpftool(&["map", "show", "id", &id.to_string()])?;
        let number = |field: &str| {
            map[field]
                .as_u64()
                .with_context(|| format!("no {field} for map {id}: {map}"))
        };
        maps.push(MapMemory {
            name: map["name"].as_str().unwrap_or("?").to_string(),
            kind: map["type"].as_str().unwrap_or("?").to_string(),
            flags: number("flags")?,
            key: number("bytes_key")?,
            value: number("bytes_value")?,
            max_entries: number("max_entries")?,
            bytes: number("bytes_memlock")?,
        });
    }
    Ok(maps)
}

impl MapMemory {
    pub fn is_hash(&self) -> bool {
        self.kind.contains("hash")
    }

    pub fn is_percpu(&self) -> bool {
        self.kind.starts_with("percpu") || self.kind.starts_with("lru_percpu")
    }

    pub fn preallocated(&self) -> bool {
        // BPF_F_NO_PREALLOC in the kernel's uapi.
        self.flags & 1 == 0
    }
}

pub fn round8(n: u64) -> u64 {
    n.div_ceil(8) * 8
}

/// What one element of a hash map that allocates as keys arrive adds to `bytes_memlock`
/// with `cpus` possible CPUs, as `htab_map_mem_usage` (kernel/bpf/hashtab.c) counts it:
/// the element (48-byte header, key, value or a pointer to the per-CPU value) and its
/// free-list node, plus for a per-CPU map two more words and the value once per CPU.
/// `None` for other maps.
pub fn element_bytes(map: &MapMemory, cpus: u64) -> Option<u64> {
    if !map.is_hash() || map.preallocated() {
        return None;
    }
    let value = round8(map.value);
    Some(if map.is_percpu() {
        48 + round8(map.key) + 8 + 8 + 16 + value * cpus
    } else {
        48 + round8(map.key) + value + 8
    })
}

/// The number of possible CPUs: what per-CPU map values are allocated for.
pub fn possible_cpus() -> Result<u64> {
    let path = "/sys/devices/system/cpu/possible";
    let text = fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    let mut count = 0;
    for range in text.trim().split(',') {
        let (low, high) = range.split_once('-').unwrap_or((range, range));
        let (low, high): (u64, u64) = (low.parse()?, high.parse()?);
        count += high - low + 1;
    }
    Ok(count)
}
