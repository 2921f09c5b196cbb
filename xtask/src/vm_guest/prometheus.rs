//! The `--prometheus` check's plumbing: scraping /metrics with a plain HTTP/1.1 GET and
//! judging the exposition against the reference.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::TcpStream,
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};

use super::{Output, Run, reports::reference};

/// tcprtt refreshes what it serves once a second; a scrape this long after the traffic
/// sees all of it.
pub const DRAIN_PERIOD: Duration = Duration::from_millis(1500);

/// The address a tracer serves metrics on, if it does.
pub fn address<'a>(args: &[&'a str]) -> Option<&'a str> {
    args.iter()
        .position(|a| *a == "--prometheus")
        .and_then(|i| args.get(i + 1).copied())
}

pub fn scrape(address: &str) -> Result<String> {
    let mut conn =
        TcpStream::connect(address).with_context(|| format!("connecting to {address}"))?;
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        conn,
        "GET /metrics HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    conn.read_to_string(&mut response)
        .with_context(|| format!("reading http://{address}/metrics"))?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("an HTTP response without a body")?;
    ensure!(head.starts_with("HTTP/1.1 200"), "/metrics answered {head}");
    Ok(body.to_string())
}

/// `name{labels} value` lines of one metric, as (labels, value).
fn samples<'a>(body: &'a str, name: &str) -> Vec<(&'a str, &'a str)> {
    body.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let (labels, value) = match rest.strip_prefix('{') {
                Some(r) => r.split_once("} ")?,
                None => ("", rest.strip_prefix(' ')?),
            };
            Some((labels, value))
        })
        .collect()
}

/// `-B --prometheus` with the servers' ports as filter (the scrape's own connection is on
/// none of them): each remote address's `_count` must be the reference's segments of the
/// server sockets with that peer, `+Inf` must hold them all, and nothing may be lost.
pub fn matches_reference(run: &Run, outs: &[Output]) -> Result<String> {
    let [out] = outs else {
        bail!("one tracer expected")
    };
    let body = &out.scraped;
    let mut want: BTreeMap<String, u64> = BTreeMap::new();
    for f in reference(run)? {
        if (5001..=5003).contains(&f.lport) {
            *want.entry(f.raddr.to_string()).or_default() += f.count;
        }
    }
    let mut got = BTreeMap::new();
    for (labels, value) in samples(body, "tcprtt_srtt_seconds_count") {
        let raddr = labels
            .split(',')
            .find_map(|l| l.strip_prefix("raddr=\""))
            .and_then(|a| a.strip_suffix('"'))
            .with_context(|| format!("a series without raddr: {labels}"))?;
        let count: u64 = value.parse().with_context(|| format!("count {value}"))?;
        let inf = samples(body, "tcprtt_srtt_seconds_bucket")
            .into_iter()
            .find(|(l, _)| l.starts_with(labels) && l.ends_with("le=\"+Inf\""))
            .with_context(|| format!("no +Inf bucket for {labels}"))?;
        ensure!(
            inf.1 == value,
            "{labels}: +Inf bucket {} but count {value}",
            inf.1
        );
        got.insert(raddr.to_string(), count);
    }
    ensure!(
        want.len() > 1,
        "the traffic gives this exposition one series"
    );
    ensure!(got == want, "exposition {got:?}, the reference {want:?}");
    let losses: Vec<_> = samples(body, "tcprtt_events_dropped_total")
        .into_iter()
        .chain(samples(body, "tcprtt_missed_total"))
        .collect();
    ensure!(losses.len() == 4, "dropped and missed counters: {losses:?}");
    for (labels, value) in losses {
        ensure!(value == "0", "dropped or missed {labels}: {value}");
    }
    let info = samples(body, "tcprtt_build_info");
    ensure!(
        info.iter().any(|(l, _)| l.contains("fentry")),
        "tcprtt_build_info does not name fentry: {info:?}"
    );
    Ok(format!("{} series", got.len()))
}
