//! Samples into medians and ranges, and those into BENCHMARKS.md, each headline a ratio
//! to the C design measured in the same run and held against its target.

use std::{fmt::Write as _, fs, time::Duration};

use anyhow::{Context, Result};

use super::{
    COST_ROUND_TRIPS, EMPTY_PROGRAM, Mode, ROUNDS, Stat, Tool,
    keys::{KeyCost, Sustained},
    report_keys, report_memory, report_prometheus, report_wire,
    runs::{Lifecycle, ModeCost, ToolCost},
    stat,
};

pub struct Results<'a> {
    pub load_average: String,
    pub modes: &'a [Mode],
    /// Per mode, in the order of `modes`.
    pub cost: Vec<ModeCost>,
    pub lifecycle: Vec<(Tool, Lifecycle)>,
    pub new_keys: Vec<(Tool, KeyCost)>,
    pub sustained: Sustained,
    pub wire: super::wire::WireResults,
    pub prometheus: super::prometheus::PromResults,
    pub took: Duration,
}

pub fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "**missed**" }
}

/// A ratio's verdict against ≤ 1.0; a miss whose rounds reach 1.0 is within what this
/// machine's load moves a ratio from round to round.
fn ratio_verdict(ratio: Stat) -> &'static str {
    match (ratio.median <= 1.0, ratio.min <= 1.0) {
        (true, _) => "met",
        (false, true) => "**missed** (some rounds ≤ 1.0)",
        (false, false) => "**missed** (every round)",
    }
}

/// Per-round ratios of two tracers' samples taken in the same rounds.
pub fn ratios(ours: &[f64], theirs: &[f64]) -> Stat {
    stat(ours.iter().zip(theirs).map(|(a, b)| a / b).collect())
}

/// Per-round ratios of the time each program adds above the empty program.
fn net_ratios(ours: &ToolCost, theirs: &ToolCost) -> Stat {
    let net =
        |c: &ToolCost| -> Vec<f64> { c.ns.iter().zip(&c.floor).map(|(a, f)| a - f).collect() };
    ratios(&net(ours), &net(theirs))
}

pub fn render(r: &Results) -> Result<String> {
    let mut md = String::from("# Benchmarks\n\n");
    header(&mut md, r)?;
    let mut missed = Vec::new();
    cost(&mut md, r, &mut missed);
    report_keys::new_keys(&mut md, &r.new_keys, &mut missed);
    report_memory::memory(&mut md, &r.new_keys, &mut missed)?;
    report_keys::sustained(&mut md, &r.sustained, &mut missed);
    lifecycle(&mut md, &r.lifecycle, &mut missed);
    report_wire::wire(&mut md, &r.wire, &mut missed);
    report_prometheus::prometheus(&mut md, &r.prometheus, &mut missed);
    md.push_str("\n## Targets missed\n\n");
    if missed.is_empty() {
        md.push_str("None.\n");
    }
    for m in missed {
        let _ = writeln!(md, "- {m}");
    }
    Ok(md)
}

fn header(md: &mut String, r: &Results) -> Result<()> {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").context("reading /proc/cpuinfo")?;
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("an unknown CPU", |(_, m)| m.trim());
    let cores = std::thread::available_parallelism().context("counting the CPUs")?;
    let uname = rustix::system::uname();
    let release = uname.release().to_string_lossy();
    let now = jiff::Timestamp::now().strftime("%Y-%m-%d %H:%M");
    let _ = writeln!(
        md,
        "Measured by `cargo xtask bench` (as root; it rewrites this file) on {cpu} ({cores} \
         cores), Linux {release}, {now} UTC; load average {} at the start; the whole run took \
         {:.0} s. The machine is shared and loaded, so absolute times move from run to run: \
         every headline is a ratio of tracers measured in the same rounds, and every figure \
         the median of its rounds with the range (min–max) in parentheses.\n\n\
         The peers, built and run by the same command: a C libbpf program of tcprtt's design \
         (`xtask/bench/c_peer`: same hook `tp_btf/tcp_probe`, same filters, the key of \
         tcprtt's srtt source without the wire source's 4-byte interface index (40 bytes \
         against tcprtt's 44), a log2 histogram per key in a preallocated hash map shared by \
         all CPUs, updated with atomic adds, as libbpf-tools' tcprtt does), compiled with \
         clang and libbpf from \
         Debian; bpftrace's one-liner `{}`; and `{EMPTY_PROGRAM}`, an empty program on the \
         same hook, attached throughout as the floor.\n",
        r.load_average,
        r.took.as_secs_f64(),
        super::BPFTRACE_ALL,
    );
    Ok(())
}

fn cost(md: &mut String, r: &Results, missed: &mut Vec<String>) {
    md.push_str("## In-kernel cost per event\n\n");
    let _ = writeln!(
        md,
        "Traffic: a one-byte ping-pong on one loopback connection, client pinned to CPU 0, \
         server to CPU 1 (in the last mode also to CPU 0, so that no two CPUs ever update one \
         histogram at once: in the others, `-b` and `-B` give both ends' sockets the same \
         key), {COST_ROUND_TRIPS} round trips per sample. In each of {ROUNDS} \
         rounds every mode runs each tracer alone on the hook in turn (the order rotating \
         from round to round), beside the empty program; the kernel's run-time statistics \
         (`kernel.bpf_stats_enabled`) give each program's time per run. Other traffic on \
         the host runs through the same programs. The accepting filter passes every event's \
         address and the server's half of them on the port (the client's local port is \
         ephemeral), so half the events pass both filters. **tcprtt / C** is the median of the \
         per-round ratios; *net* is the same ratio after subtracting the empty program's \
         time from both (the hook's fixed cost as the statistics see it). In the grouped \
         modes tcprtt keeps per key what it prints, bcc's log2 rows and the sum; with `-e` \
         it also keeps fine buckets, min and max, which the C design has no equivalent of, \
         so that row has no target.\n\n\
         bpftrace attaches to the classic tracepoint `tracepoint:tcp:tcp_probe`: the kernel \
         fills the trace record (addresses, ports, `srtt_us >> 3` and more) before the \
         program runs, outside its measured time, so its figure leaves out work a \
         `tp_btf` program does itself. Its `-B` script groups by family and the IPv4 bytes \
         of `daddr` (a 5-byte key), the closest its tracepoint allows.\n\n\
         | mode | tcprtt ns | C peer ns | bpftrace ns | empty ns | **tcprtt / C** | net | \
         tcprtt / bpftrace | target tcprtt / C ≤ 1.0 |\n\
         |---|---|---|---|---|---|---|---|---|"
    );
    // The mode whose ping-pong stays on one CPU: what a grouped mode costs when no other
    // CPU writes the same histogram.
    let one_cpu = r
        .modes
        .iter()
        .zip(&r.cost)
        .find(|(m, _)| m.one_cpu)
        .and_then(|(_, c)| Some(ratios(&c.of(Tool::Tcprtt)?.ns, &c.of(Tool::C)?.ns)));
    for (mode, c) in r.modes.iter().zip(&r.cost) {
        let (Some(ours), Some(theirs)) = (c.of(Tool::Tcprtt), c.of(Tool::C)) else {
            continue;
        };
        let ratio = ratios(&ours.ns, &theirs.ns);
        let bpftrace = c.of(Tool::Bpftrace);
        let floor = stat(
            c.tools
                .iter()
                .flat_map(|(_, t)| t.floor.iter().copied())
                .collect(),
        );
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | **{}** | {} | {} | {} |",
            mode.name,
            stat(ours.ns.clone()).show(0),
            stat(theirs.ns.clone()).show(0),
            bpftrace.map_or("—".into(), |b| stat(b.ns.clone()).show(0)),
            floor.show(0),
            ratio.show(2),
            net_ratios(ours, theirs).show(2),
            bpftrace.map_or("—".into(), |b| ratios(&ours.ns, &b.ns).show(2)),
            if mode.tcprtt_extra.is_empty() {
                ratio_verdict(ratio)
            } else {
                "no target"
            },
        );
        if ratio.median > 1.0 && mode.tcprtt_extra.is_empty() {
            let ours_v = c.verified.iter().find(|(t, _)| *t == Tool::Tcprtt);
            let theirs_v = c.verified.iter().find(|(t, _)| *t == Tool::C);
            let shape = match (ours_v, theirs_v) {
                (Some((_, (oi, oc))), Some((_, (ti, tc)))) => format!(
                    " After verification tcprtt's program runs {oi} instructions and {} \
                     calls in this mode, the C peer's {ti} and {}.",
                    oc.len(),
                    tc.len()
                ),
                _ => String::new(),
            };
            let shared = match one_cpu {
                Some(one) if !mode.one_cpu && mode.args.iter().any(|a| a == "-b" || a == "-B") => {
                    format!(
                        " Both ends' sockets have the same key here, so two CPUs add to one \
                         histogram; with both ends on one CPU, `-B` runs at {:.2}× the C \
                         design.",
                        one.median
                    )
                }
                _ => String::new(),
            };
            missed.push(format!(
                "In-kernel cost, {}: tcprtt takes {:.2}× the C design's time per event \
                 ({:.0} ns against {:.0} ns, {:.0} ns more) where the target is ≤ 1.0.{shape}\
                 {shared}",
                mode.name,
                ratio.median,
                stat(ours.ns.clone()).median,
                stat(theirs.ns.clone()).median,
                stat(ours.ns.clone()).median - stat(theirs.ns.clone()).median,
            ));
        }
        if let Some(b) = bpftrace {
            let vs = ratios(&ours.ns, &b.ns);
            if vs.median >= 1.0 {
                missed.push(format!(
                    "In-kernel cost, {}: tcprtt takes {:.2}× bpftrace's time per event where \
                     the target is below it (and bpftrace's figure leaves out the trace record \
                     the kernel fills for it).",
                    mode.name, vs.median
                ));
            }
        }
    }
    md.push_str(
        "\nEach program as the verifier left it in each mode (the verifier drops the code \
         that read-only configuration rules out), from `bpftool -j prog dump xlated`:\n\n\
         | mode | tracer | instructions | calls |\n|---|---|---|---|\n",
    );
    for (mode, c) in r.modes.iter().zip(&r.cost) {
        for (tool, (instructions, calls)) in &c.verified {
            let _ = writeln!(
                md,
                "| {} | {} | {instructions} | {} |",
                mode.name,
                tool.name(),
                calls.join(", ")
            );
        }
    }
}

fn lifecycle(md: &mut String, lifecycle: &[(Tool, Lifecycle)], missed: &mut Vec<String>) {
    let get = |tool: Tool| lifecycle.iter().find(|(t, _)| *t == tool).map(|(_, l)| l);
    let (Some(ours), Some(theirs)) = (get(Tool::Tcprtt), get(Tool::C)) else {
        return;
    };
    md.push_str("\n## Start-up and memory of the process\n\n");
    let _ = writeln!(
        md,
        "Each tracer in its default mode, {ROUNDS} rounds, the order rotating, run-time \
         statistics off: exec to its ready line (tcprtt and the C peer: \"Tracing TCP RTT \
         via\" on stderr, printed once attached; bpftrace: \"Attaching 1 probe...\", printed \
         before it attaches), then peak RSS (`VmHWM`) and RSS (`VmRSS`) after 1,000 round \
         trips.\n\n\
         | | tcprtt | C peer | bpftrace | tcprtt / C | target | |\n|---|---|---|---|---|---|---|"
    );
    let bpftrace = get(Tool::Bpftrace);
    // Each figure, and for those with a target (at or below the C tool) why a miss is.
    for (what, unit, pick, why_missed) in [
        (
            "start-up to \"Tracing\"",
            "ms",
            (|l: &Lifecycle| l.startup.clone()) as fn(&Lifecycle) -> Vec<f64>,
            Some(AYA_TIME_WHY),
        ),
        (
            "peak RSS",
            "KiB",
            |l: &Lifecycle| l.rss.clone(),
            Some(AYA_RSS_WHY),
        ),
        (
            "RSS while tracing",
            "KiB",
            |l: &Lifecycle| l.rss_now.clone(),
            None,
        ),
    ] {
        let ratio = ratios(&pick(ours), &pick(theirs));
        let (o, t) = (stat(pick(ours)), stat(pick(theirs)));
        let (goal, met) = if why_missed.is_some() {
            ("≤ 1.0", verdict(ratio.median <= 1.0))
        } else {
            ("", "")
        };
        let _ = writeln!(
            md,
            "| {what} | {} {unit} | {} {unit} | {} | {} | {goal} | {met} |",
            o.show(1),
            t.show(1),
            bpftrace.map_or("—".into(), |b| format!(
                "{} {unit}",
                stat(pick(b)).show(1)
            )),
            ratio.show(2),
        );
        if let Some(why) = why_missed.filter(|_| ratio.median > 1.0) {
            missed.push(format!(
                "{what}: tcprtt {:.1} {unit} against the C tool's {:.1} {unit} ({:.2}×) where \
                 the target is at or below it.{why}",
                o.median, t.median, ratio.median,
            ));
        }
    }
    let phase = |i: usize| stat(ours.phases.iter().map(|p| p[i]).collect());
    let _ = writeln!(
        md,
        "\nWhere tcprtt's start-up goes, as `tcprtt -v -d 0.05` reports it ({ROUNDS} runs): \
         reading and indexing the kernel's BTF, with the socket offsets and attach targets \
         from it, {} ms; aya's loader {} ms; trying the hooks with a stand-in BTF each and \
         attaching, {} ms. aya 0.14's `EbpfLoader::new()` parses the whole kernel BTF into \
         its own types whatever the program needs; tcprtt's object has no CO-RE relocations, \
         so tcprtt makes that loader in a thread of its own that cannot read \
         /sys/kernel/btf/vmlinux (Landlock, or a chroot of that thread alone), and aya's \
         loader parses nothing. Trying a hook needs an aya `Btf` that holds its target at the \
         kernel's id, one entry for every type before it: for fentry/tcp_rcv_established \
         that is most of the kernel's types, so tcprtt first loads the smallest fentry \
         program there and builds that stand-in only if the kernel accepts it.",
        phase(0).show(1),
        phase(1).show(1),
        phase(2).show(1),
    );
}

/// Why start-up and peak RSS stay above the C tool's, from the start-up phases above.
const AYA_TIME_WHY: &str = " The largest parts are reading the kernel's BTF and attaching, \
     with a stand-in BTF as long as the kernel's list of types up to the hook's target (see \
     the start-up phases above).";
const AYA_RSS_WHY: &str = " The peak is reached while attaching, with a stand-in BTF that \
     holds an entry for every kernel type up to the hook's target; it is handed back to the \
     kernel once attached (RSS while tracing).";
