//! Turning a report into what the user reads. Each format is a module with a pure
//! `render(&Report, ..) -> String`.

pub mod json;
pub mod prometheus;
pub mod text;

use std::io::{self, Write};

use anyhow::{Context, Result};
use jiff::{Timestamp, tz::TimeZone};

use crate::report::Report;

/// How reports are printed on stdout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// bcc-style histograms.
    Text {
        /// `HH:MM:SS` above each report (`-T`).
        timestamp: bool,
        /// The count/min/max/percentile line (`-e`).
        extension: bool,
        /// A blank line after each report, when there will be several (`-i`).
        separated: bool,
    },
    /// One JSON object per line.
    Json,
}

/// What became of a report written to stdout.
#[derive(Debug, PartialEq, Eq)]
pub enum Written {
    Ok,
    /// The reader closed stdout: the run ends quietly, as other Unix tools do.
    Closed,
}

/// Local wall-clock time as HH:MM:SS.
fn local_clock(at: Timestamp) -> String {
    TimeZone::system()
        .to_datetime(at)
        .strftime("%H:%M:%S")
        .to_string()
}

pub fn render(report: &Report, format: Format) -> String {
    match format {
        Format::Json => json::render(report),
        Format::Text {
            timestamp,
            extension,
            separated,
        } => {
            let opts = text::TextOptions {
                timestamp: timestamp.then(|| local_clock(report.meta.end)),
                extension,
            };
            let mut out = text::render(report, &opts);
            if separated {
                out.push('\n');
            }
            out
        }
    }
}

/// Writes a rendered report to stdout.
pub fn write_stdout(text: &str) -> Result<Written> {
    let mut out = io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(Written::Ok),
        Err(err) if err.kind() == io::ErrorKind::BrokenPipe => Ok(Written::Closed),
        Err(err) => Err(err).context("writing the report to stdout"),
    }
}
