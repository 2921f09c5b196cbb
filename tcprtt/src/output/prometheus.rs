//! `--prometheus ADDR`: cumulative histograms on `/metrics`, in the Prometheus text format
//! or OpenMetrics (by the request's `Accept` header), encoded by prometheus-client.
//!
//! The main loop adds every drain of the kernel's maps to an [`Exposition`] and publishes
//! an immutable [`Snapshot`]. A scrape takes the current snapshot (an `Arc` clone under a
//! lock held for nothing else) and encodes it on a blocking thread, so a scrape never
//! holds up a drain, and every scrape shows the drains so far exactly.
//!
//! Encoding a histogram series (29 or 195 lines, each with its labels and a float `le`)
//! is what a scrape costs, and most series have no new sample between two scrapes. So
//! each series keeps the text prometheus-client encoded for it, per format, until a drain
//! brings it a sample (the drain makes a new `Series`, with no text), and a scrape joins
//! the texts under their metric's `# HELP`/`# TYPE` lines.

use std::{
    collections::{BTreeMap, VecDeque},
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex, OnceLock, PoisonError},
    task::{Context as TaskContext, Poll},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Body, Bytes, Frame, Incoming, SizeHint},
    header,
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};
use tcprtt_common::{FINE_BUCKETS, LOG2_SLOTS, bucket_high};
use tokio::{net::TcpListener, sync::Semaphore};

use crate::{
    histogram::Histogram,
    report::{Key, Losses, Row, Source, Unit},
};

/// How the exposition is set up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrometheusOptions {
    pub addr: SocketAddr,
    /// `le` at every fine bucket edge instead of the bcc rows.
    pub fine_buckets: bool,
    /// Series without a new sample for this long leave the exposition.
    pub ttl: Duration,
    /// Most series exposed at once (`--max-keys`).
    pub max_series: u32,
}

/// One histogram series, when it last had a sample, and its encoded lines in each text
/// format once a scrape has asked for them.
#[derive(Debug)]
struct Series {
    hist: Histogram,
    updated: Instant,
    text: [OnceLock<Bytes>; 2],
}

impl Series {
    fn new(hist: Histogram, updated: Instant) -> Self {
        Self {
            hist,
            updated,
            text: Default::default(),
        }
    }
}

impl Clone for Series {
    /// The copy a drain changes: without the text, which its next scrape encodes anew.
    fn clone(&self) -> Self {
        Self::new(self.hist.clone(), self.updated)
    }
}

/// One lock per text format, held while a scrape encodes a snapshot's missing series
/// texts: scrapes arriving together (several Prometheus servers, say) encode them once, the
/// others wait for that and reuse them. Drains never take it.
#[derive(Debug, Default)]
struct EncodingLocks([Mutex<()>; 2]);

impl Clone for EncodingLocks {
    /// A new snapshot's own locks.
    fn clone(&self) -> Self {
        Self::default()
    }
}

/// Everything a scrape shows. Series are kept in exposition order (by source, then key).
#[derive(Clone, Debug)]
pub struct Snapshot {
    series: BTreeMap<(Source, Key), Arc<Series>>,
    /// Samples not counted, by reason, cumulative.
    dropped: Losses,
    /// Samples of new series refused because `max_series` were exposed already.
    over_series_limit: u64,
    hook: &'static str,
    unit: Unit,
    fine_buckets: bool,
    encoding: EncodingLocks,
}

/// The cumulative state behind `/metrics`.
pub struct Exposition {
    current: Snapshot,
    published: Arc<Mutex<Arc<Snapshot>>>,
    ttl: Duration,
    max_series: usize,
    url: String,
}

/// Values per second. Dividing by it (rather than multiplying by its inverse) keeps edges
/// such as 15 µs printing as `1.5e-05`.
fn per_second(unit: Unit) -> f64 {
    match unit {
        Unit::Micros => 1e6,
        Unit::Millis => 1e3,
    }
}

/// The classic buckets of a histogram: `(le in seconds, count in that bucket)`, the last
/// one `+Inf`. Values are whole units, so the bcc row `2^k .. 2^(k+1)-1` is exactly the
/// bucket `le = 2^(k+1)-1`; the fine edges are each fine bucket's largest value.
fn buckets(hist: &Histogram, unit: Unit, fine: bool) -> Vec<(f64, u64)> {
    let scale = per_second(unit);
    // With `fine`, the kernel keeps fine buckets for every sample (`Options::keeps_detail`):
    // only an empty histogram lacks them.
    let fine_counts = match &hist.detail {
        Some(detail) if fine => Some(detail.buckets),
        None if fine && hist.count == 0 => Some([0; FINE_BUCKETS]),
        _ => None,
    };
    let mut out: Vec<(f64, u64)> = if let Some(counts) = fine_counts {
        (0..FINE_BUCKETS)
            .map(|b| (bucket_high(b) as f64 / scale, counts[b]))
            .collect()
    } else {
        hist.slots
            .iter()
            .enumerate()
            .map(|(k, n)| ((((1u64 << (k + 1)) - 1) as f64) / scale, *n))
            .collect()
    };
    if let Some(last) = out.last_mut() {
        last.0 = f64::INFINITY;
    }
    debug_assert!(fine || out.len() == LOG2_SLOTS);
    out
}

/// The labels of a series: wire series' interface and side, and the parts of a
/// connection its grouping keeps.
fn labels(key: &Key) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    if let Some(iface) = &key.iface {
        out.push(("iface", iface.to_string()));
    }
    if let Some(side) = key.side {
        out.push(("side", side.name().to_string()));
    }
    if let Some(family) = key.family {
        out.push(("family", family.name().to_string()));
    }
    if let Some(a) = key.laddr {
        out.push(("laddr", a.to_string()));
    }
    if let Some(p) = key.lport {
        out.push(("lport", p.to_string()));
    }
    if let Some(a) = key.raddr {
        out.push(("raddr", a.to_string()));
    }
    if let Some(p) = key.rport {
        out.push(("rport", p.to_string()));
    }
    out
}

fn metric_name(source: Source) -> &'static str {
    match source {
        Source::Srtt => "tcprtt_srtt_seconds",
        Source::Wire => "tcprtt_wire_rtt_seconds",
    }
}

const HISTOGRAM_HELP: &str = "TCP round-trip times since tcprtt started";

/// What prometheus-client needs of one histogram series.
#[derive(Debug)]
struct SeriesData {
    labels: Vec<(&'static str, String)>,
    sum: f64,
    count: u64,
    buckets: Vec<(f64, u64)>,
}

impl SeriesData {
    fn of(snapshot: &Snapshot, key: &Key, series: &Series) -> Self {
        let hist = &series.hist;
        Self {
            labels: labels(key),
            sum: hist.sum as f64 / per_second(snapshot.unit),
            count: hist.count,
            buckets: buckets(hist, snapshot.unit, snapshot.fine_buckets),
        }
    }
}

/// Series of one source, encoded together under their descriptor (without series: just
/// the `# HELP` and `# TYPE` lines).
#[derive(Debug)]
struct Batch {
    source: Source,
    series: Vec<SeriesData>,
}

impl Collector for Batch {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let mut metric = encoder.encode_descriptor(
            metric_name(self.source),
            HISTOGRAM_HELP,
            None,
            MetricType::Histogram,
        )?;
        for s in &self.series {
            metric
                .encode_family(&s.labels)?
                .encode_histogram::<NoLabelSet>(s.sum, s.count, &s.buckets, None)?;
        }
        Ok(())
    }
}

/// The counters and gauges that follow the histograms.
#[derive(Debug)]
struct Totals {
    dropped: Losses,
    over_series_limit: u64,
    series: usize,
    hook: &'static str,
}

impl Collector for Totals {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let dropped = [
            ("max_keys", self.dropped.dropped),
            ("no_memory", self.dropped.no_memory),
            ("series_limit", self.over_series_limit),
        ];
        let mut metric = encoder.encode_descriptor(
            "tcprtt_events_dropped",
            "Matched samples not counted, by reason",
            None,
            MetricType::Counter,
        )?;
        for (reason, n) in dropped {
            let labels = [("reason", reason)];
            ConstCounter::new(n).encode(metric.encode_family(&labels)?)?;
        }
        let metric = encoder.encode_descriptor(
            "tcprtt_missed",
            "Segments the kernel skipped the program for (already running on that CPU)",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(self.dropped.missed).encode(metric)?;
        let metric = encoder.encode_descriptor(
            "tcprtt_keys",
            "Histogram series exposed now",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(self.series as i64).encode(metric)?;
        let mut metric = encoder.encode_descriptor(
            "tcprtt_build_info",
            "tcprtt's version and the hook it traces",
            None,
            MetricType::Gauge,
        )?;
        let labels = [("version", env!("CARGO_PKG_VERSION")), ("hook", self.hook)];
        ConstGauge::new(1i64).encode(metric.encode_family(&labels)?)
    }
}

/// Which text format a request asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wire {
    Prometheus,
    OpenMetrics,
}

impl Wire {
    fn negotiate(accept: Option<&str>) -> Self {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Self::OpenMetrics,
            _ => Self::Prometheus,
        }
    }

    fn content_type(self) -> &'static str {
        match self {
            Self::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
            Self::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

impl Wire {
    /// Index of the format's text in [`Series::text`].
    fn index(self) -> usize {
        match self {
            Self::Prometheus => 0,
            Self::OpenMetrics => 1,
        }
    }

    /// What prometheus-client writes for `collector` in this format (no OpenMetrics
    /// `# EOF`: the exposition adds it once at its end).
    fn text_of(self, collector: impl Collector) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(collector));
        let mut out = String::new();
        // Writing into a String never fails, nor does any of these collectors.
        let _ = match self {
            Self::Prometheus => {
                prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)
            }
            Self::OpenMetrics => {
                prometheus_client::encoding::text::encode_registry(&mut out, &registry)
            }
        };
        out
    }
}

/// The text of a batch without its descriptor (the comment lines it starts with).
fn without_descriptor(text: &str) -> &str {
    let mut rest = text;
    while rest.starts_with('#') {
        rest = rest.split_once('\n').map_or("", |(_, after)| after);
    }
    rest
}

/// Each series' lines, as prometheus-client encodes them under their descriptor: the
/// batch's text cut every `lines` lines (a histogram series is its buckets, `_sum` and
/// `_count`, in either format; label values hold no line break, the encoder escapes it).
/// `None` if the text does not split into `n` series.
fn split_series(text: &str, lines: usize, n: usize) -> Option<Vec<Bytes>> {
    let body = without_descriptor(text);
    let mut out = Vec::with_capacity(n);
    let mut start = 0;
    for (i, (at, _)) in body.match_indices('\n').enumerate() {
        if (i + 1) % lines == 0 {
            // A copy of its own: a series' text outlives the batch's other series.
            out.push(Bytes::copy_from_slice(&body.as_bytes()[start..=at]));
            start = at + 1;
        }
    }
    (out.len() == n && start == body.len()).then_some(out)
}

/// Lines of each series: one per bucket, `_sum` and `_count`.
fn series_lines(snapshot: &Snapshot) -> usize {
    let buckets = if snapshot.fine_buckets {
        FINE_BUCKETS
    } else {
        LOG2_SLOTS
    };
    buckets + 2
}

/// Encodes the series of `snapshot` that have no text in `wire` format yet, each source's
/// in one batch.
fn encode_missing(snapshot: &Snapshot, wire: Wire) {
    let index = wire.index();
    let _one_at_a_time = snapshot.encoding.0[index]
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    for source in [Source::Srtt, Source::Wire] {
        let missing: Vec<(&Key, &Series)> = snapshot
            .series
            .iter()
            .filter(|((s, _), series)| *s == source && series.text[index].get().is_none())
            .map(|((_, key), series)| (key, series.as_ref()))
            .collect();
        if missing.is_empty() {
            continue;
        }
        let text = wire.text_of(Batch {
            source,
            series: missing
                .iter()
                .map(|(key, series)| SeriesData::of(snapshot, key, series))
                .collect(),
        });
        if let Some(texts) = split_series(&text, series_lines(snapshot), missing.len()) {
            for ((_, series), text) in missing.iter().zip(texts) {
                // A scrape that ran alongside may have set the same text first.
                let _ = series.text[index].set(text);
            }
        }
    }
}

/// A snapshot in the requested format, as the pieces of its text: each source's
/// descriptor and its series' texts (encoded now for the series that have none yet,
/// shared with the snapshot otherwise), then the counters and gauges.
fn encode(snapshot: Arc<Snapshot>, wire: Wire) -> Chunks {
    encode_missing(&snapshot, wire);
    let mut out = Chunks::default();
    let mut current = None;
    for ((source, key), series) in &snapshot.series {
        if current != Some(*source) {
            current = Some(*source);
            out.push(Bytes::from(wire.text_of(Batch {
                source: *source,
                series: Vec::new(),
            })));
        }
        // Set above, unless the batch's text did not split as expected: then this
        // series alone.
        out.push(
            series.text[wire.index()]
                .get_or_init(|| {
                    let text = wire.text_of(Batch {
                        source: *source,
                        series: vec![SeriesData::of(&snapshot, key, series)],
                    });
                    Bytes::copy_from_slice(without_descriptor(&text).as_bytes())
                })
                .clone(),
        );
    }
    let mut tail = wire.text_of(Totals {
        dropped: snapshot.dropped,
        over_series_limit: snapshot.over_series_limit,
        series: snapshot.series.len(),
        hook: snapshot.hook,
    });
    if wire == Wire::OpenMetrics {
        let _ = prometheus_client::encoding::text::encode_eof(&mut tail);
    }
    out.push(Bytes::from(tail));
    out
}

/// A response body sent as the pieces it is made of, never joined into one buffer: a
/// scrape of 10,000 series would otherwise copy 22 MB, and each connection would hold
/// its own copy until its client had read it.
#[derive(Debug, Default)]
struct Chunks {
    pieces: VecDeque<Bytes>,
    left: u64,
}

impl Chunks {
    fn push(&mut self, piece: Bytes) {
        self.left += piece.len() as u64;
        self.pieces.push_back(piece);
    }
}

impl From<&'static str> for Chunks {
    fn from(text: &'static str) -> Self {
        let mut chunks = Self::default();
        chunks.push(Bytes::from_static(text.as_bytes()));
        chunks
    }
}

impl Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        Poll::Ready(this.pieces.pop_front().map(|piece| {
            this.left -= piece.len() as u64;
            Ok(Frame::data(piece))
        }))
    }

    fn is_end_stream(&self) -> bool {
        self.pieces.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.left)
    }
}

fn reply(status: StatusCode, content_type: &str, body: Chunks) -> Response<Chunks> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    if let Ok(value) = header::HeaderValue::from_str(content_type) {
        response.headers_mut().insert(header::CONTENT_TYPE, value);
    }
    response
}

async fn handle(
    req: Request<Incoming>,
    published: Arc<Mutex<Arc<Snapshot>>>,
) -> Result<Response<Chunks>, Infallible> {
    const TEXT: &str = "text/plain; charset=utf-8";
    if req.uri().path() != "/metrics" {
        return Ok(reply(
            StatusCode::NOT_FOUND,
            TEXT,
            "tcprtt serves /metrics only\n".into(),
        ));
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut response = reply(StatusCode::METHOD_NOT_ALLOWED, TEXT, "use GET\n".into());
        response
            .headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return Ok(response);
    }
    let wire = Wire::negotiate(
        req.headers()
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok()),
    );
    let snapshot = match published.lock() {
        Ok(current) => Arc::clone(&current),
        Err(poisoned) => Arc::clone(&poisoned.into_inner()),
    };
    match tokio::task::spawn_blocking(move || encode(snapshot, wire)).await {
        Ok(body) => Ok(reply(StatusCode::OK, wire.content_type(), body)),
        Err(_) => Ok(reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            TEXT,
            "encoding failed\n".into(),
        )),
    }
}

/// Connections served at once. Each holds its body until the client has read it all:
/// its series' texts, shared with the snapshot and other scrapes, but kept alive by it
/// once the series have moved on (up to a whole scrape, 22.3 MB with 10,000 series). So
/// without a bound, clients that ask and never read grow tcprtt's memory until it is
/// killed. Connections beyond it are closed at once
/// rather than queued: a scraper never waits behind bodies encoded for clients long gone.
const MAX_CONNECTIONS: usize = 8;

/// After this long a connection ends, keep-alive or not, so that one whose client stalls
/// (reading nothing, or idling between requests) gives its place back: a response under
/// way is finished first, for at most [`LAST_RESPONSE`] more. Prometheus opens a new
/// connection for its next scrape.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);
const LAST_RESPONSE: Duration = Duration::from_secs(10);

/// Accepts connections for as long as the runtime runs; each gets its own task, and a
/// client that stalls is cut off by the header timeout or the connection lifetime.
async fn serve(listener: TcpListener, published: Arc<Mutex<Arc<Snapshot>>>) {
    let places = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of file descriptors, for instance: wait instead of spinning.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        // Dropping the stream closes the connection.
        let Ok(place) = Arc::clone(&places).try_acquire_owned() else {
            continue;
        };
        let published = Arc::clone(&published);
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(req, Arc::clone(&published)));
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service);
            let mut connection = std::pin::pin!(connection);
            if tokio::time::timeout(CONNECTION_LIFETIME, connection.as_mut())
                .await
                .is_err()
            {
                connection.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(LAST_RESPONSE, connection).await;
            }
            drop(place);
        });
    }
}

/// Binds the listening socket; done before anything is loaded, so a bad or busy address
/// fails the start-up alone.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("serving Prometheus metrics on {addr}"))
}

impl Exposition {
    /// Starts serving on `listener`. Must be called inside the tokio runtime.
    pub fn start(
        listener: TcpListener,
        opts: &PrometheusOptions,
        hook: &'static str,
        unit: Unit,
    ) -> Result<Self> {
        let local = listener
            .local_addr()
            .context("reading the Prometheus listener's address")?;
        let current = Snapshot {
            series: BTreeMap::new(),
            dropped: Losses::default(),
            over_series_limit: 0,
            hook,
            unit,
            fine_buckets: opts.fine_buckets,
            encoding: EncodingLocks::default(),
        };
        let published = Arc::new(Mutex::new(Arc::new(current.clone())));
        tokio::spawn(serve(listener, Arc::clone(&published)));
        Ok(Self {
            current,
            published,
            ttl: opts.ttl,
            max_series: opts.max_series as usize,
            url: format!("http://{local}/metrics"),
        })
    }

    /// Where scrapers find the metrics.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Adds one drain and publishes the result.
    pub fn add(&mut self, rows: &[Row], losses: Losses) {
        let now = Instant::now();
        let snap = &mut self.current;
        for row in rows.iter().filter(|r| r.hist.count > 0) {
            let id = (row.source, row.key.clone());
            let full = snap.series.len() >= self.max_series;
            match snap.series.get_mut(&id) {
                Some(series) => {
                    let mut hist = series.hist.clone();
                    hist.absorb(&row.hist);
                    // A new series, without the text encoded for the old one. Scrapes
                    // holding the old one go on with it.
                    *series = Arc::new(Series::new(hist, now));
                }
                None if full => snap.over_series_limit += row.hist.count,
                None => {
                    snap.series
                        .insert(id, Arc::new(Series::new(row.hist.clone(), now)));
                }
            }
        }
        let ttl = self.ttl;
        snap.series
            .retain(|_, s| now.duration_since(s.updated) <= ttl);
        snap.dropped.add(losses);
        let published = Arc::new(snap.clone());
        match self.published.lock() {
            Ok(mut current) => *current = published,
            Err(poisoned) => *poisoned.into_inner() = published,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{fixtures::*, *};

    /// A response body's text.
    fn joined(chunks: Chunks) -> String {
        let bytes: Vec<u8> = chunks
            .pieces
            .iter()
            .flat_map(|p| p.iter().copied())
            .collect();
        assert_eq!(bytes.len() as u64, chunks.left);
        String::from_utf8(bytes).unwrap()
    }

    fn snapshot(rows: &[Row]) -> Snapshot {
        let now = Instant::now();
        Snapshot {
            series: rows
                .iter()
                .map(|r| {
                    (
                        (r.source, r.key.clone()),
                        Arc::new(Series::new(r.hist.clone(), now)),
                    )
                })
                .collect(),
            dropped: Losses {
                dropped: 3,
                no_memory: 1,
                missed: 2,
            },
            over_series_limit: 0,
            hook: "tp_btf",
            unit: Unit::Micros,
            fine_buckets: false,
            encoding: EncodingLocks::default(),
        }
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// An exposition on an ephemeral loopback port, of the srtt source in µs.
    async fn exposition(ttl: Duration, max_series: u32) -> Exposition {
        let opts = PrometheusOptions {
            addr: "127.0.0.1:0".parse().unwrap(),
            fine_buckets: false,
            ttl,
            max_series,
        };
        let listener = bind(opts.addr).await.unwrap();
        Exposition::start(listener, &opts, "tp_btf", Unit::Micros).unwrap()
    }

    #[test]
    fn prometheus_text_of_a_grouped_report() {
        let snap = snapshot(&[
            row(BY_RADDR, v4([127, 0, 0, 2]), &[40, 41, 3000]),
            row(BY_RADDR, v6("2001:db8::1"), &[1]),
        ]);
        assert_eq!(
            joined(encode(Arc::new(snap), Wire::Prometheus)),
            golden("by_raddr.prom")
        );
    }

    #[test]
    fn wire_series_carry_their_interface_and_side() {
        use tcprtt_common::side::{EGRESS, INGRESS};
        let (a, b) = ([198, 51, 100, 1], [203, 0, 113, 1]);
        let snap = snapshot(&[
            wire_row(ALL_TRAFFIC, wire_v4(a, 4000, b, 80, 2, INGRESS), &[60]),
            wire_row(BY_RADDR, wire_v4(b, 80, a, 4000, 3, EGRESS), &[20]),
        ]);
        let text = joined(encode(Arc::new(snap), Wire::Prometheus));
        assert!(
            text.contains("tcprtt_wire_rtt_seconds_count{iface=\"eth0\",side=\"ingress\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "tcprtt_wire_rtt_seconds_count{iface=\"eth1\",side=\"egress\",\
                 family=\"ipv4\",raddr=\"198.51.100.1\"} 1\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn a_series_text_is_encoded_once_and_anew_after_a_drain_changes_it() {
        runtime().block_on(async {
            let mut e = exposition(Duration::from_secs(600), 10).await;
            let a = row(BY_RADDR, v4([127, 0, 0, 2]), &[5, 7]);
            let b = row(BY_RADDR, v4([127, 0, 0, 3]), &[9]);
            e.add(&[a.clone(), b.clone()], Losses::default());
            let first = Arc::clone(&e.published.lock().unwrap());
            let text = joined(encode(Arc::clone(&first), Wire::Prometheus));
            assert_eq!(text, joined(encode(Arc::clone(&first), Wire::Prometheus)));
            e.add(std::slice::from_ref(&a), Losses::default());
            let second = Arc::clone(&e.published.lock().unwrap());
            let text = joined(encode(Arc::clone(&second), Wire::Prometheus));
            assert!(
                text.contains("tcprtt_srtt_seconds_count{family=\"ipv4\",raddr=\"127.0.0.2\"} 4\n"),
                "{text}"
            );
            // Where each series' text lies: the same bytes while the series is unchanged.
            let cached = |snap: &Snapshot, key: &Key| {
                snap.series[&(Source::Srtt, key.clone())].text[0]
                    .get()
                    .map(|t| t.as_ptr())
                    .unwrap()
            };
            assert_eq!(cached(&first, &b.key), cached(&second, &b.key));
            assert_ne!(cached(&first, &a.key), cached(&second, &a.key));
            // The first snapshot, still held, shows what it showed.
            assert!(
                joined(encode(first, Wire::Prometheus))
                    .contains("tcprtt_srtt_seconds_count{family=\"ipv4\",raddr=\"127.0.0.2\"} 2\n")
            );
        });
    }

    /// The exposition as one registry of every collector encodes it, without the
    /// cached series texts.
    fn in_one_piece(snap: &Snapshot, wire: Wire) -> String {
        let mut registry = Registry::default();
        for source in [Source::Srtt, Source::Wire] {
            let series: Vec<SeriesData> = snap
                .series
                .iter()
                .filter(|((s, _), _)| *s == source)
                .map(|((_, key), series)| SeriesData::of(snap, key, series))
                .collect();
            if !series.is_empty() {
                registry.register_collector(Box::new(Batch { source, series }));
            }
        }
        registry.register_collector(Box::new(Totals {
            dropped: snap.dropped,
            over_series_limit: snap.over_series_limit,
            series: snap.series.len(),
            hook: snap.hook,
        }));
        let mut out = String::new();
        match wire {
            Wire::Prometheus => {
                prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)
            }
            Wire::OpenMetrics => prometheus_client::encoding::text::encode(&mut out, &registry),
        }
        .unwrap();
        out
    }

    #[test]
    fn joined_series_texts_are_the_exposition_in_one_piece() {
        use tcprtt_common::side::EGRESS;
        for fine in [false, true] {
            let mut snap = snapshot(&[
                row(BY_RADDR, v4([127, 0, 0, 2]), &[40, 41, 3000]),
                row(BY_RADDR, v6("2001:db8::1"), &[1]),
                wire_row(
                    BY_RADDR,
                    wire_v4([1, 2, 3, 4], 0, [5, 6, 7, 8], 0, 2, EGRESS),
                    &[9],
                ),
            ]);
            snap.fine_buckets = fine;
            for wire in [Wire::Prometheus, Wire::OpenMetrics] {
                let whole = in_one_piece(&snap, wire);
                let lines = series_lines(&snap);
                let srtt = wire.text_of(Batch {
                    source: Source::Srtt,
                    series: snap
                        .series
                        .iter()
                        .take(2)
                        .map(|((_, k), s)| SeriesData::of(&snap, k, s))
                        .collect(),
                });
                assert_eq!(split_series(&srtt, lines, 2).map(|t| t.len()), Some(2));
                assert_eq!(split_series(&srtt, lines, 3), None);
                let snap = Arc::new(snap.clone());
                assert_eq!(
                    joined(encode(Arc::clone(&snap), wire)),
                    whole,
                    "{wire:?} fine {fine}"
                );
                // Again, from the texts the first scrape left.
                assert_eq!(joined(encode(snap, wire)), whole, "{wire:?} fine {fine}");
            }
        }
    }

    #[test]
    fn openmetrics_on_request_ends_with_eof() {
        let snap = snapshot(&[row(ALL_TRAFFIC, Default::default(), &[7])]);
        let text = joined(encode(Arc::new(snap), Wire::OpenMetrics));
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert!(text.contains("tcprtt_srtt_seconds_count 1\n"), "{text}");
        assert_eq!(
            Wire::negotiate(Some("application/openmetrics-text;version=1.0.0")),
            Wire::OpenMetrics
        );
        assert_eq!(Wire::negotiate(Some("text/plain")), Wire::Prometheus);
        assert_eq!(Wire::negotiate(None), Wire::Prometheus);
    }

    #[test]
    fn bucket_edges_are_the_bcc_rows_or_the_fine_buckets() {
        let h = Histogram::from_samples([0, 1, 2, 3, 40_000]);
        let rows = buckets(&h, Unit::Micros, false);
        assert_eq!(rows.len(), LOG2_SLOTS);
        assert_eq!(rows[0], (1e-6, 2));
        assert_eq!(rows[1], (3e-6, 2));
        assert!((rows[15].0 - 0.065535).abs() < 1e-12 && rows[15].1 == 1);
        assert_eq!(rows.last().unwrap().0, f64::INFINITY);
        let fine = buckets(&h, Unit::Millis, true);
        assert_eq!(fine.len(), FINE_BUCKETS);
        assert_eq!(fine[3], (0.003, 1));
        assert_eq!(fine.iter().map(|b| b.1).sum::<u64>(), 5);
    }

    #[test]
    fn drains_add_up_idle_series_expire_and_the_series_cap_is_counted() {
        runtime().block_on(async {
            let mut e = exposition(Duration::from_millis(200), 2).await;
            assert!(e.url().starts_with("http://127.0.0.1:"));
            let a = row(BY_RADDR, v4([127, 0, 0, 2]), &[5, 7]);
            let b = row(BY_RADDR, v4([127, 0, 0, 3]), &[9]);
            let c = row(BY_RADDR, v4([127, 0, 0, 4]), &[11, 12, 13]);
            e.add(&[a.clone(), b.clone()], Losses::default());
            e.add(
                &[a.clone(), c],
                Losses {
                    dropped: 4,
                    no_memory: 0,
                    missed: 1,
                },
            );
            let snap = Arc::clone(&e.published.lock().unwrap());
            assert_eq!(snap.series.len(), 2);
            let a_series = &snap.series[&(Source::Srtt, a.key.clone())];
            assert_eq!(a_series.hist, Histogram::from_samples([5, 7, 5, 7]));
            assert_eq!((snap.over_series_limit, snap.dropped.dropped), (3, 4));
            std::thread::sleep(Duration::from_millis(300));
            e.add(std::slice::from_ref(&b), Losses::default());
            let snap = Arc::clone(&e.published.lock().unwrap());
            assert_eq!(snap.series.len(), 1, "a expired, b is back");
            assert!(snap.series.contains_key(&(Source::Srtt, b.key.clone())));
        });
    }
}
