//! The table of checks run inside each test kernel. Each entry names the tracers (tcprtt
//! argument lists) it needs, which run beside every other entry's on the same traffic,
//! and a judge that compares what they printed with the reference tracer
//! (`--attach fentry --by-flow --json`) and the connections made. Adding a check is
//! adding one entry.

use std::{collections::BTreeMap, net::SocketAddr};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};

use super::{
    Output, Run, WireRun,
    reports::{Flow, count, histograms, lines, reference, rows, total},
    traffic::family,
    wire::IFACE,
};

/// The wire tracers' `-d`: the wire traffic takes about 4 s under emulation.
const WIRE_SECS: &str = "10";
/// An RTT on the veth pair above this would be a timing error (seed 003's idle-time
/// echo gave 1 s): the slowest round trip here is the peer's delayed ACK.
const WIRE_MAX_US: u64 = 500_000;

pub struct Check {
    pub name: &'static str,
    pub tracers: &'static [&'static [&'static str]],
    pub verify: fn(&Run, &[Output]) -> Result<String>,
}

pub const CHECKS: &[Check] = &[
    Check {
        name: "--by-flow rows are the connections made",
        tracers: &[],
        verify: flows_are_the_traffic,
    },
    Check {
        name: "--attach auto picks fentry",
        tracers: &[&["--attach", "auto", "--json"]],
        verify: auto_is_fentry,
    },
    Check {
        name: "fentry and tp_btf agree (--json --by-flow)",
        tracers: &[&["--attach", "tp-btf", "--by-flow", "--json"]],
        verify: tp_btf_json_matches,
    },
    Check {
        name: "fentry and tp_btf agree (-e text)",
        tracers: &[&["--attach", "fentry", "-e"], &["--attach", "tp-btf", "-e"]],
        verify: same_text,
    },
    Check {
        name: "filter -A 127.0.0.2",
        tracers: &[&["-A", "127.0.0.2", "--json"]],
        verify: |run, outs| filtered(run, outs, |f| f.raddr.to_string() == "127.0.0.2"),
    },
    Check {
        name: "filter -a 127.0.0.3/32",
        tracers: &[&["-a", "127.0.0.3/32", "--json"]],
        verify: |run, outs| filtered(run, outs, |f| f.laddr.to_string() == "127.0.0.3"),
    },
    Check {
        name: "filter -p 5001",
        tracers: &[&["-p", "5001", "--json"]],
        verify: |run, outs| filtered(run, outs, |f| f.lport == 5001),
    },
    Check {
        name: "filter -P 5002 -P 5003",
        tracers: &[&["-P", "5002", "-P", "5003", "--json"]],
        verify: |run, outs| filtered(run, outs, |f| [5002, 5003].contains(&f.rport)),
    },
    Check {
        name: "filter -6",
        tracers: &[&["-6", "--json"]],
        verify: |run, outs| filtered(run, outs, |f| f.family == "ipv6"),
    },
    Check {
        name: "filter -A 127.0.0.0/8 -p 5001 -p 5002 (kinds combined)",
        tracers: &[&["-A", "127.0.0.0/8", "-p", "5001", "-p", "5002", "--json"]],
        verify: |run, outs| {
            filtered(run, outs, |f| {
                f.raddr.is_loopback() && f.raddr.is_ipv4() && [5001, 5002].contains(&f.lport)
            })
        },
    },
    Check {
        name: "grouping -b",
        tracers: &[&["-b", "--json"]],
        verify: |run, outs| grouped(run, outs, |f| json!({"family": f.family, "addr": f.laddr})),
    },
    Check {
        name: "grouping -B",
        tracers: &[&["-B", "--json"]],
        verify: |run, outs| grouped(run, outs, |f| json!({"family": f.family, "addr": f.raddr})),
    },
    Check {
        name: "grouping --by-lport",
        tracers: &[&["--by-lport", "--json"]],
        verify: |run, outs| grouped(run, outs, |f| json!({"port": f.lport})),
    },
    Check {
        name: "grouping --by-rport",
        tracers: &[&["--by-rport", "--json"]],
        verify: |run, outs| grouped(run, outs, |f| json!({"port": f.rport})),
    },
    Check {
        name: "-i 1 interval counts add up exactly",
        tracers: &[&["-i", "1", "--json"], &["--json"]],
        verify: intervals_add_up,
    },
    Check {
        name: "NDJSON fields",
        tracers: &[&["-P", "5001", "--json"]],
        verify: ndjson_fields,
    },
    Check {
        name: "Prometheus exposition (-B --prometheus)",
        tracers: &[&[
            "-B",
            "-p",
            "5001",
            "-p",
            "5002",
            "-p",
            "5003",
            "--prometheus",
            "127.0.0.1:9464",
        ]],
        verify: super::prometheus::matches_reference,
    },
    Check {
        name: "--passive attaches with TCX on 6.6+, clsact before",
        tracers: &[&["--passive", IFACE, "--json", "-v", "-d", WIRE_SECS]],
        verify: wire_attaches,
    },
    Check {
        name: "--passive times both sides of a flow across a veth pair",
        tracers: &[&["--passive", IFACE, "--by-flow", "--json", "-d", WIRE_SECS]],
        verify: wire_samples,
    },
    Check {
        name: "--passive leaves nothing on the interface after -d",
        tracers: &[],
        verify: wire_leaves_nothing,
    },
    Check {
        name: "nothing left loaded after exit",
        tracers: &[],
        verify: nothing_left,
    },
];

fn flows_are_the_traffic(run: &Run, _: &[Output]) -> Result<String> {
    let flows = reference(run)?;
    let mut expected = Vec::new();
    for c in &run.connections {
        // Each end receives one data segment per round trip, plus at most the FIN and a
        // few delayed ACKs.
        let range = c.round_trips as u64..=2 * c.round_trips as u64 + 3;
        expected.push((c.client, c.server, range.clone()));
        expected.push((c.server, c.client, range));
    }
    ensure!(
        flows.len() == expected.len(),
        "{} rows for {} sockets",
        flows.len(),
        expected.len()
    );
    for (local, remote, range) in &expected {
        let f = flows
            .iter()
            .find(|f| {
                (f.laddr, f.lport, f.raddr, f.rport)
                    == (local.ip(), local.port(), remote.ip(), remote.port())
            })
            .with_context(|| format!("no row for {local} -> {remote}"))?;
        ensure!(
            f.family == family(local.ip()),
            "{local} -> {remote} counted as {}",
            f.family
        );
        ensure!(
            range.contains(&f.count),
            "{local} -> {remote}: {} segments, expected {range:?}",
            f.count
        );
    }
    Ok(format!(
        "{} sockets, {} segments",
        flows.len(),
        flows.iter().map(|f| f.count).sum::<u64>()
    ))
}

fn auto_is_fentry(run: &Run, outs: &[Output]) -> Result<String> {
    let [out] = outs else {
        bail!("one tracer expected")
    };
    let said = out.stderr.lines().next().unwrap_or_default();
    ensure!(
        said.contains("Tracing TCP RTT via fentry/tcp_rcv_established"),
        "it said: {said}"
    );
    ensure!(
        lines(out)?.iter().all(|l| l["attach"] == "fentry"),
        "a report does not say \"attach\":\"fentry\""
    );
    let (got, want) = (total(out)?, total(&run.reference)?);
    ensure!(got == want, "{got} segments, the reference {want}");
    Ok(format!("{said:?}, {got} segments"))
}

fn tp_btf_json_matches(run: &Run, outs: &[Output]) -> Result<String> {
    let [out] = outs else {
        bail!("one tracer expected")
    };
    let by_key = |o: &Output| -> Result<BTreeMap<String, Value>> {
        let mut m = BTreeMap::new();
        for line in lines(o)? {
            for h in histograms(&line)? {
                m.insert(h["key"].to_string(), h.clone());
            }
        }
        Ok(m)
    };
    ensure!(
        lines(out)?.iter().all(|l| l["attach"] == "tp_btf"),
        "a report does not say \"attach\":\"tp_btf\""
    );
    let (tp, fentry) = (by_key(out)?, by_key(&run.reference)?);
    for (key, f) in &fentry {
        let t = tp
            .get(key)
            .with_context(|| format!("tp_btf has no row {key}"))?;
        ensure!(t == f, "{key}: fentry {f} but tp_btf {t}");
    }
    ensure!(
        tp.len() == fentry.len(),
        "tp_btf has {} rows, fentry {}",
        tp.len(),
        fentry.len()
    );
    Ok(format!(
        "{} histograms identical, {} segments",
        fentry.len(),
        total(out)?
    ))
}

fn same_text(_: &Run, outs: &[Output]) -> Result<String> {
    let [fentry, tp_btf] = outs else {
        bail!("two tracers expected")
    };
    ensure!(
        fentry.stdout.contains("count "),
        "no -e line: {}",
        fentry.stdout
    );
    ensure!(
        fentry.stdout == tp_btf.stdout,
        "fentry printed\n{}tp_btf printed\n{}",
        fentry.stdout,
        tp_btf.stdout
    );
    let ext = fentry
        .stdout
        .lines()
        .find(|l| l.starts_with("count "))
        .unwrap_or_default();
    Ok(ext.to_string())
}

/// A filter must count exactly the reference's segments it selects: some, and not all.
fn filtered(run: &Run, outs: &[Output], select: fn(&Flow) -> bool) -> Result<String> {
    let [out] = outs else {
        bail!("one tracer expected")
    };
    let flows = reference(run)?;
    let all: u64 = flows.iter().map(|f| f.count).sum();
    let want: u64 = flows.iter().filter(|f| select(f)).map(|f| f.count).sum();
    ensure!(
        want > 0 && want < all,
        "the traffic does not test this filter ({want} of {all})"
    );
    let got = total(out)?;
    ensure!(
        got == want,
        "{got} segments, the reference's matching sockets {want}"
    );
    Ok(format!("{got} of {all} segments"))
}

/// A grouping must give each key exactly the reference's segments of the sockets that
/// share it, and there must be more than one key.
fn grouped(run: &Run, outs: &[Output], key: fn(&Flow) -> Value) -> Result<String> {
    let [out] = outs else {
        bail!("one tracer expected")
    };
    let mut want: BTreeMap<String, u64> = BTreeMap::new();
    for f in reference(run)? {
        *want.entry(key(&f).to_string()).or_default() += f.count;
    }
    ensure!(want.len() > 1, "the traffic gives this grouping one key");
    let got = rows(out)?;
    ensure!(got == want, "got {got:?}, the reference gives {want:?}");
    Ok(format!("{} keys", got.len()))
}

fn intervals_add_up(_: &Run, outs: &[Output]) -> Result<String> {
    let [out, whole] = outs else {
        bail!("two tracers expected")
    };
    let reports = lines(out)?;
    ensure!(
        reports.len() >= 3,
        "{} reports over the traffic's seconds",
        reports.len()
    );
    let per: Vec<u64> = reports
        .iter()
        .map(|r| histograms(r)?.iter().map(count).sum())
        .collect::<Result<_>>()?;
    let (got, want) = (per.iter().sum::<u64>(), total(whole)?);
    ensure!(
        got == want,
        "intervals {per:?} add up to {got}, the whole run {want}"
    );
    Ok(format!("{per:?} = {got}"))
}

fn ndjson_fields(_: &Run, outs: &[Output]) -> Result<String> {
    let [out] = outs else {
        bail!("one tracer expected")
    };
    let reports = lines(out)?;
    ensure!(reports.len() == 1, "{} reports for one run", reports.len());
    let r = &reports[0];
    let time = r["time"].as_str().context("no time")?;
    time.parse::<jiff::Timestamp>()
        .with_context(|| format!("time {time} is not RFC 3339"))?;
    ensure!(
        r["interval_s"].as_f64().is_some_and(|s| s > 0.0),
        "interval_s {}",
        r["interval_s"]
    );
    for (field, want) in [
        ("unit", json!("us")),
        ("attach", json!("fentry")),
        ("group_by", json!("none")),
        ("dropped", json!(0)),
        ("missed", json!(0)),
    ] {
        ensure!(r[field] == want, "{field} is {}, expected {want}", r[field]);
    }
    let hs = histograms(r)?;
    ensure!(!hs.is_empty(), "no histograms");
    for h in hs {
        let n = count(h)?;
        let buckets: u64 = h["buckets"]
            .as_array()
            .context("no buckets")?
            .iter()
            .map(|b| b["count"].as_u64().context("a bucket without a count"))
            .sum::<Result<_>>()?;
        ensure!(buckets == n, "buckets hold {buckets} of {n}: {h}");
        let v = |f: &str| h[f].as_f64().with_context(|| format!("no {f} in {h}"));
        let (min, p50, p90, p99, max) = (v("min")?, v("p50")?, v("p90")?, v("p99")?, v("max")?);
        ensure!(
            min <= p50 && p50 <= p90 && p90 <= p99 && p99 <= max,
            "percentiles out of order: {h}"
        );
        ensure!(
            (v("avg")? - v("sum")? / n as f64).abs() < 1e-3,
            "avg is not sum/count: {h}"
        );
    }
    Ok(format!("{} histograms", hs.len()))
}

fn nothing_left(run: &Run, _: &[Output]) -> Result<String> {
    ensure!(
        run.loaded_while_tracing >= run.tracers,
        "only {} programs loaded for {} tracers",
        run.loaded_while_tracing,
        run.tracers
    );
    ensure!(
        run.left_after_exit.is_empty(),
        "still loaded: {}",
        run.left_after_exit.join(", ")
    );
    Ok(format!(
        "{} programs while tracing, none after",
        run.loaded_while_tracing
    ))
}

fn wire_run(run: &Run) -> Result<&WireRun> {
    run.wire
        .as_ref()
        .context("this check's round ran no wire tracer")
}

fn wire_attaches(run: &Run, outs: &[Output]) -> Result<String> {
    let [out] = outs else {
        bail!("one tracer expected")
    };
    let w = wire_run(run)?;
    let banner =
        format!("Tracing TCP RTT on the wire at {IFACE} (TCP timestamps). Hit Ctrl-C to end.");
    let said = out.stderr.lines().next().unwrap_or_default();
    ensure!(said == banner, "it said: {said}");
    let hook = w.expected_hook;
    let reports = lines(out)?;
    ensure!(
        !reports.is_empty() && reports.iter().all(|r| r["attach"] == hook),
        "not every report says \"attach\":\"{hook}\": {}",
        out.stdout
    );
    let via = format!("tcprtt: wire at {IFACE} via {hook};");
    ensure!(
        out.stderr.lines().any(|l| l.starts_with(&via)),
        "-v does not say {via:?}: {}",
        out.stderr
    );
    let samples = total(out)?;
    ensure!(samples > 0, "no sample: {}", out.stderr);
    let seen = &w.while_tracing;
    let n = w.tracers;
    // Each direction has its own program, which tells the samples' side.
    let programs = ["tcprtt_eth_in", "tcprtt_eth_out"];
    let ours =
        |names: &[String], program: &str| names.len() == n && names.iter().all(|p| p == program);
    let how = match hook {
        "tcx" => {
            let tcx = seen.tcx.as_ref().map_err(|e| anyhow::anyhow!("{e}"))?;
            ensure!(
                tcx.iter().zip(programs).all(|(names, p)| ours(names, p)),
                "{n} wire tracers, TCX ingress and egress hold {tcx:?}"
            );
            ensure!(
                seen.clsact.is_empty() && seen.filters.iter().all(Vec::is_empty),
                "a clsact qdisc or filters beside TCX: {seen:?}"
            );
            format!(
                "tcprtt_eth_in as a TCX link on ingress and tcprtt_eth_out on egress \
                 ({n} per hook), no qdisc"
            )
        }
        _ => {
            let refused = out
                .stderr
                .lines()
                .find(|l| {
                    l.contains("TCX refused") && l.ends_with("attached through a clsact qdisc")
                })
                .with_context(|| format!("no word of TCX being refused: {}", out.stderr))?;
            ensure!(
                seen.tcx
                    .as_ref()
                    .map_or(true, |t| t.iter().all(Vec::is_empty)),
                "TCX programs on a clsact kernel: {seen:?}"
            );
            ensure!(!seen.clsact.is_empty(), "no clsact qdisc while tracing");
            for ((hook, filters), program) in ["ingress", "egress"]
                .iter()
                .zip(&seen.filters)
                .zip(programs)
            {
                let named = format!(" {program} ");
                ensure!(
                    filters.len() == n && filters.iter().all(|f| f.contains(&named)),
                    "{n} wire tracers, {hook} filters: {filters:?}"
                );
            }
            format!(
                "{} (modules {}); tcprtt_eth_in as a filter on clsact ingress and \
                 tcprtt_eth_out on egress ({n} per hook)",
                refused.trim_start_matches("tcprtt: "),
                w.modules.join(", ")
            )
        }
    };
    Ok(format!("via {hook}: {how}; {samples} samples"))
}

fn wire_samples(run: &Run, outs: &[Output]) -> Result<String> {
    let [out] = outs else {
        bail!("one tracer expected")
    };
    let [c] = run.connections.as_slice() else {
        bail!(
            "{} connections, one wire flow expected",
            run.connections.len()
        )
    };
    let reports = lines(out)?;
    let [report] = reports.as_slice() else {
        bail!("{} reports for one -d run", reports.len())
    };
    let rows = histograms(report)?;
    ensure!(
        rows.len() == 2,
        "{} rows for the flow's two sides",
        rows.len()
    );
    let mut said = Vec::new();
    let mut client_range = (0, 0);
    // The client runs on IFACE's side: its TSvals leave through it, the server's come in.
    for (side, from, to, crossed) in [
        ("client", c.client, c.server, "egress"),
        ("server", c.server, c.client, "ingress"),
    ] {
        let h = rows
            .iter()
            .find(|h| {
                let k = &h["key"];
                k["laddr"] == from.ip().to_string()
                    && k["lport"] == from.port()
                    && k["addr"] == to.ip().to_string()
                    && k["port"] == to.port()
            })
            .with_context(|| format!("no row for the {side} side {from} -> {to}: {rows:?}"))?;
        ensure!(
            h["source"] == "wire",
            "the {side} row's source is {}",
            h["source"]
        );
        ensure!(
            h["key"]["iface"] == IFACE && h["key"]["side"] == crossed,
            "the {side} row is not at {IFACE} {crossed}: {}",
            h["key"]
        );
        let n = count(h)?;
        // One TSval per request (or reply), plus the SYN's and the FIN's; the first
        // request may share its TSval with the handshake's ACK, which records none.
        let want = c.round_trips as u64..=c.round_trips as u64 + 2;
        ensure!(
            want.contains(&n),
            "{side} side: {n} samples, expected {want:?}"
        );
        let v = |f: &str| h[f].as_u64().with_context(|| format!("no {f} in {h}"));
        let (min, p50, max) = (v("min")?, v("p50")?, v("max")?);
        ensure!(
            min > 0 && max < WIRE_MAX_US,
            "{side} side: RTTs {min}..{max} us, expected within 1..{WIRE_MAX_US}"
        );
        if side == "client" {
            client_range = (min, max);
        }
        said.push(format!("{side} {n} samples, p50 {p50} us, max {max} us"));
    }
    let flows = report["flows"].as_array().context("no flows list")?;
    ensure!(flows.len() == 1, "{} flows for one connection", flows.len());
    // The client's kernel smooths the same round trips into its srtt: the reference's
    // median for that socket must lie among the wire's samples of that side, give or
    // take the stack's few microseconds between the hook and TCP.
    let srtt = reference_row(run, c.client, c.server)?;
    let srtt_p50 = srtt["p50"].as_u64().context("no p50 in the reference")?;
    let (lo, hi) = client_range;
    ensure!(
        lo / 2 <= srtt_p50 && srtt_p50 <= hi * 2,
        "the client socket's srtt p50 {srtt_p50} us is far from its wire RTTs {lo}..{hi} us"
    );
    Ok(format!(
        "{} round trips: {}; the client socket's srtt p50 {srtt_p50} us",
        c.round_trips,
        said.join("; ")
    ))
}

/// The reference's histogram of the socket `local` -> `remote`.
fn reference_row(run: &Run, local: SocketAddr, remote: SocketAddr) -> Result<Value> {
    for line in lines(&run.reference)? {
        for h in histograms(&line)? {
            let k = &h["key"];
            if k["laddr"] == local.ip().to_string()
                && k["lport"] == local.port()
                && k["addr"] == remote.ip().to_string()
                && k["port"] == remote.port()
            {
                return Ok(h.clone());
            }
        }
    }
    bail!("the reference has no row for {local} -> {remote}")
}

fn wire_leaves_nothing(run: &Run, _: &[Output]) -> Result<String> {
    let w = wire_run(run)?;
    ensure!(
        !w.while_tracing.empty(),
        "nothing was on {IFACE} while tracing either"
    );
    ensure!(w.after_exit.empty(), "left on {IFACE}: {:?}", w.after_exit);
    Ok(format!(
        "wire tracers: {}; ended by -d, they left {IFACE} no TCX program{}, no clsact qdisc, no filter",
        w.tracers,
        if w.after_exit.tcx.is_err() {
            " (no TCX on this kernel)"
        } else {
            ""
        }
    ))
}
