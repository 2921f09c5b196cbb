//! The wire source's section of BENCHMARKS.md.

use std::fmt::Write as _;

use super::{
    ROUNDS, report, stat,
    wire::{
        COST_SECONDS, EMPTY_TC_PROGRAM, IFACE, THROUGHPUT_PAIRS, THROUGHPUT_SECONDS, WireResults,
    },
};

/// Throughput cost target, in percent of the bit rate without tcprtt.
const TARGET_PERCENT: f64 = 3.0;

/// An overhead smaller than the run-to-run change without tcprtt is not resolved by this
/// run, whichever side of the target it falls.
fn verdict(met: bool, overhead: f64, noise: f64) -> &'static str {
    match (met, overhead.abs() <= noise) {
        (true, false) => report::verdict(true),
        (true, true) => "met, within the noise",
        (false, true) => "**missed**, within the noise",
        (false, false) => "**missed**, beyond the noise",
    }
}

pub fn wire(md: &mut String, w: &WireResults, missed: &mut Vec<String>) {
    md.push_str("\n## Wire source\n\n");
    let _ = writeln!(
        md,
        "Two network namespaces of the run joined by a veth pair (198.51.100.1/24 and \
         198.51.100.2/24); `ip netns exec <first> tcprtt --passive {IFACE}` on the first end, \
         an iperf3 server (`iperf3 -s`) in the other namespace and the client (`iperf3 -c \
         198.51.100.2 -t <s> -J`) beside tcprtt, so every packet of the transfer passes \
         tcprtt's TC programs at ingress or egress (TCX links).\n\n\
         **Per packet**: {ROUNDS} rounds, each a fresh tcprtt and a {COST_SECONDS} s \
         transfer, with `{EMPTY_TC_PROGRAM}` (an empty TC program from tcprtt's object) \
         attached with TCX at ingress and egress of the same interface throughout as the \
         floor, and the kernel's run-time statistics on. A packet here is a program run \
         (an skb): the veth carries GSO packets of many segments one way and ACKs the other.\n\n\
         | program | ns/packet | packets per round |\n|---|---|---|"
    );
    let packets = stat(w.packets.clone());
    let net: Vec<f64> = w.ns.iter().zip(&w.floor).map(|(a, f)| a - f).collect();
    for (name, samples) in [
        ("tcprtt (`tcprtt_eth_in`, `tcprtt_eth_out`)", w.ns.clone()),
        (EMPTY_TC_PROGRAM, w.floor.clone()),
        ("tcprtt − empty, per round", net),
    ] {
        let _ = writeln!(
            md,
            "| {name} | {} | {} |",
            stat(samples).show(0),
            packets.show(0)
        );
    }
    let share: Vec<f64> =
        w.ns.iter()
            .zip(&w.floor)
            .zip(w.packets.iter().zip(&w.seconds))
            .map(|((a, f), (n, s))| (a - f) * n / (s * 1e9) * 100.0)
            .collect();
    let _ = writeln!(
        md,
        "\nThe time tcprtt's program adds above the empty one, times the packets of a round, \
         per second of the round (iperf3's start included): {} % of one CPU.",
        stat(share).show(2)
    );
    let overhead: Vec<f64> = w
        .without
        .iter()
        .zip(&w.with)
        .map(|(without, with)| (without - with) / without * 100.0)
        .collect();
    let noise: Vec<f64> = w
        .without
        .windows(2)
        .map(|p| ((p[1] - p[0]) / p[0] * 100.0).abs())
        .collect();
    let overhead = stat(overhead);
    let noise = stat(noise);
    let gbit = |v: &[f64]| stat(v.iter().map(|b| b / 1e9).collect());
    let met = overhead.median < TARGET_PERCENT;
    let _ = writeln!(
        md,
        "\n**Throughput**: {THROUGHPUT_PAIRS} pairs of {THROUGHPUT_SECONDS} s transfers, without and \
         with tcprtt (the order alternating from pair to pair; statistics off, no empty \
         program), iperf3's received bit rate. *Overhead* is the median over pairs of \
         (without − with) / without; *noise* the median change between consecutive runs \
         without tcprtt, what the machine's load alone moves the figure; *tcprtt CPU* the \
         user and system time of the tcprtt process during each transfer with it \
         (`/proc/PID/stat`), in percent of one CPU.\n\n\
         | without Gbit/s | with Gbit/s | overhead % | noise % | tcprtt CPU % | target | |\n\
         |---|---|---|---|---|---|---|\n\
         | {} | {} | {} | {} | {} | < {TARGET_PERCENT:.0} % | {} |",
        gbit(&w.without).show(2),
        gbit(&w.with).show(2),
        overhead.show(1),
        noise.show(1),
        stat(w.tcprtt_cpu.clone()).show(1),
        verdict(met, overhead.median, noise.median),
    );
    if noise.median >= TARGET_PERCENT {
        let _ = writeln!(
            md,
            "\nThe noise ({:.1} %) is above the {TARGET_PERCENT:.0} % target: on this shared \
             machine the throughput pairs cannot resolve the target, and the program's CPU \
             share above is the steadier figure.",
            noise.median
        );
    }
    if !met {
        missed.push(format!(
            "Wire source throughput: tcprtt --passive takes {:.1} % of a veth bulk \
             transfer's bit rate where the target is under {TARGET_PERCENT:.0} % (run-to-run \
             noise without it: {:.1} %).",
            overhead.median, noise.median
        ));
    }
}
