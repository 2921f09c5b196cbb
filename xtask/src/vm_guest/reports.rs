//! What the tracers printed, read back: NDJSON reports, per-key counts, and the
//! reference's rows as sockets.

use std::{collections::BTreeMap, net::IpAddr};

use anyhow::{Context, Result, ensure};
use serde_json::Value;

use super::{Output, Run};

/// One row of the reference: a socket (local and remote ends) and its count.
pub struct Flow {
    pub family: String,
    pub laddr: IpAddr,
    pub lport: u16,
    pub raddr: IpAddr,
    pub rport: u16,
    pub count: u64,
}

/// A tracer's reports. Every comparison is exact, so a report that lost samples (to a
/// full map, to key allocation, or to the kernel skipping the program) fails it, saying so.
pub fn lines(out: &Output) -> Result<Vec<Value>> {
    let reports: Vec<Value> = out
        .stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l)
                .with_context(|| format!("tcprtt {}: not JSON: {l}", out.args.join(" ")))
        })
        .collect::<Result<_>>()?;
    for r in &reports {
        for counter in ["dropped", "dropped_no_memory", "missed"] {
            ensure!(
                r[counter].as_u64() == Some(0),
                "tcprtt {} reports {counter} {}",
                out.args.join(" "),
                r[counter]
            );
        }
    }
    Ok(reports)
}

pub fn histograms(line: &Value) -> Result<&Vec<Value>> {
    line["histograms"]
        .as_array()
        .context("a report without a histograms list")
}

pub fn count(h: &Value) -> Result<u64> {
    h["count"].as_u64().context("a histogram without a count")
}

/// Counts per key (as JSON text), summed over every report a tracer printed.
pub fn rows(out: &Output) -> Result<BTreeMap<String, u64>> {
    let mut rows = BTreeMap::new();
    for line in lines(out)? {
        for h in histograms(&line)? {
            *rows.entry(h["key"].to_string()).or_default() += count(h)?;
        }
    }
    Ok(rows)
}

pub fn total(out: &Output) -> Result<u64> {
    Ok(rows(out)?.values().sum())
}

pub fn reference(run: &Run) -> Result<Vec<Flow>> {
    let mut flows = Vec::new();
    for line in lines(&run.reference)? {
        for h in histograms(&line)? {
            let k = &h["key"];
            let field = |name: &str| {
                k[name]
                    .as_str()
                    .with_context(|| format!("no {name} in {k}"))
            };
            let port = |name: &str| {
                k[name]
                    .as_u64()
                    .and_then(|p| u16::try_from(p).ok())
                    .with_context(|| format!("no {name} in {k}"))
            };
            flows.push(Flow {
                family: field("family")?.to_string(),
                laddr: field("laddr")?.parse()?,
                lport: port("lport")?,
                raddr: field("addr")?.parse()?,
                rport: port("port")?,
                count: count(h)?,
            });
        }
    }
    ensure!(!flows.is_empty(), "the reference counted nothing");
    Ok(flows)
}
