//! `--json`: one JSON object per report, on one line (NDJSON).
//!
//! Written by hand: the schema is small and fixed, and every string in it is an address,
//! a name or a timestamp that needs no escaping beyond what [`string`] does.

use std::fmt::Write as _;

use tcprtt_common::HistKey;

use crate::{cli::GroupBy, histogram::Histogram, render::key_ip};

/// What a JSON report says besides its histograms.
#[derive(Debug)]
pub struct JsonMeta {
    /// RFC 3339, UTC.
    pub time: String,
    /// Length of the interval the report covers, in seconds.
    pub interval_s: f64,
    /// `fentry` or `tp_btf`.
    pub attach: &'static str,
}

/// `unix` seconds and `millis` as RFC 3339 UTC, e.g. `2026-11-22T23:05:01.123Z`.
pub fn rfc3339_utc(unix: u64, millis: u32) -> String {
    let days = (unix / 86_400) as i64;
    let secs = unix % 86_400;
    // Days since 1970-01-01 to a civil date (the proleptic Gregorian calendar).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

fn string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn family_name(family: u16) -> &'static str {
    if family == tcprtt_common::AF_INET6 {
        "ipv6"
    } else {
        "ipv4"
    }
}

fn addr(family: u16, bytes: &[u8; 16]) -> String {
    key_ip(family, bytes).map_or_else(|| "null".into(), |ip| string(&ip.to_string()))
}

/// The key object: `{}` for all traffic, `{family, addr}` for an address, `{port}` for a
/// port, and for a connection the remote side as `addr`/`port` plus `laddr`/`lport`.
fn key(group_by: GroupBy, key: &HistKey) -> String {
    let fam = family_name(key.family);
    match group_by {
        GroupBy::None => "{}".into(),
        GroupBy::LocalAddr => {
            format!(
                r#"{{"family":"{fam}","addr":{}}}"#,
                addr(key.family, &key.laddr)
            )
        }
        GroupBy::RemoteAddr => {
            format!(
                r#"{{"family":"{fam}","addr":{}}}"#,
                addr(key.family, &key.raddr)
            )
        }
        GroupBy::LocalPort => format!(r#"{{"port":{}}}"#, key.lport),
        GroupBy::RemotePort => format!(r#"{{"port":{}}}"#, key.rport),
        GroupBy::Flow => format!(
            r#"{{"family":"{fam}","addr":{},"port":{},"laddr":{},"lport":{}}}"#,
            addr(key.family, &key.raddr),
            key.rport,
            addr(key.family, &key.laddr),
            key.lport
        ),
    }
}

fn histogram(group_by: GroupBy, k: &HistKey, h: &Histogram) -> String {
    let buckets: Vec<String> = h
        .nonempty_buckets()
        .map(|(low, high, count)| {
            // The overflow bucket has no upper bound.
            let high = if high == u64::MAX {
                "null".to_string()
            } else {
                high.to_string()
            };
            format!(r#"{{"low":{low},"high":{high},"count":{count}}}"#)
        })
        .collect();
    format!(
        r#"{{"key":{},"count":{},"sum":{},"avg":{:.6},"min":{},"max":{},"p50":{},"p90":{},"p99":{},"buckets":[{}]}}"#,
        key(group_by, k),
        h.count,
        h.sum,
        h.average(),
        h.min,
        h.max,
        h.percentile(0.50),
        h.percentile(0.90),
        h.percentile(0.99),
        buckets.join(",")
    )
}

/// One report as one line of JSON (with its newline).
pub fn render_json(report: &crate::render::Report, meta: &JsonMeta) -> String {
    let histograms: Vec<String> = report
        .histograms
        .iter()
        .filter(|(_, h)| h.count > 0)
        .map(|(k, h)| histogram(report.group_by, k, h))
        .collect();
    format!(
        r#"{{"time":{},"interval_s":{:.3},"unit":"{}","attach":"{}","group_by":"{}","dropped":{},"dropped_no_memory":{},"missed":{},"histograms":[{}]}}"#,
        string(&meta.time),
        meta.interval_s,
        if report.milliseconds { "ms" } else { "us" },
        meta.attach,
        report.group_by.name(),
        report.dropped,
        report.no_memory,
        report.missed,
        histograms.join(",")
    ) + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::Report;

    #[test]
    fn rfc3339_dates_across_leap_years_and_centuries() {
        assert_eq!(rfc3339_utc(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_utc(951_782_400, 5), "2000-02-29T00:00:00.005Z");
        assert_eq!(rfc3339_utc(1_795_388_701, 123), "2026-11-22T23:05:01.123Z");
        assert_eq!(rfc3339_utc(4_107_542_399, 999), "2100-02-28T23:59:59.999Z");
    }

    #[test]
    fn a_report_is_one_line_with_the_documented_schema() {
        let mut raddr = [0u8; 16];
        raddr[10] = 0xff;
        raddr[11] = 0xff;
        raddr[12..].copy_from_slice(&[127, 0, 0, 2]);
        let report = Report {
            timestamp: None,
            milliseconds: false,
            group_by: GroupBy::RemoteAddr,
            extension: false,
            histograms: vec![(
                HistKey {
                    family: tcprtt_common::AF_INET,
                    raddr,
                    ..HistKey::default()
                },
                Histogram::from_samples([40, 41, 1 << 30]),
            )],
            dropped: 2,
            no_memory: 0,
            missed: 0,
            max_keys: 10240,
        };
        let meta = JsonMeta {
            time: "2026-11-22T23:05:01.123Z".into(),
            interval_s: 1.0,
            attach: "tp_btf",
        };
        assert_eq!(
            render_json(&report, &meta),
            concat!(
                r#"{"time":"2026-11-22T23:05:01.123Z","interval_s":1.000,"unit":"us","attach":"tp_btf","group_by":"raddr","dropped":2,"dropped_no_memory":0,"missed":0,"#,
                r#""histograms":[{"key":{"family":"ipv4","addr":"127.0.0.2"},"count":3,"sum":1073741905,"avg":357913968.333333,"#,
                r#""min":40,"max":1073741824,"p50":41,"p90":1073741824,"p99":1073741824,"#,
                r#""buckets":[{"low":40,"high":43,"count":2},{"low":67108864,"high":null,"count":1}]}]}"#,
                "\n"
            )
        );
    }

    #[test]
    fn strings_are_escaped() {
        assert_eq!(
            string("a\"b\\c\n"),
            r#""a\"b\\c\n""#.replace("\\n", "\\u000a")
        );
    }
}
