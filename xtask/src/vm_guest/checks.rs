//! The table of checks run inside each test kernel. Each entry names the tracers (tcprtt
//! argument lists) it needs, which run beside every other entry's on the same traffic,
//! and a judge that compares what they printed with the reference tracer
//! (`--attach fentry --by-flow --json`) and the connections made. Adding a check is
//! adding one entry.

use std::collections::BTreeMap;

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};

use super::{
    Output, Run,
    reports::{Flow, count, histograms, lines, reference, rows, total},
    traffic::family,
};

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
