//! `--prometheus`: a real Prometheus server (Debian's `prometheus` package) scraping tcprtt
//! while traffic crosses a delay line of known RTT, `promtool` on real scrapes and on the
//! deploy/ scrape config, the deploy/ files' promises (dashboard panels, DaemonSet
//! privileges, systemd capabilities), and hostile HTTP clients during a run whose counts
//! must stay exact.
//!
//! Every process a test starts (tcprtt, prometheus, promtool) is owned by a guard that
//! ends it by pid; temporary directories go with their guard.

use std::{
    collections::BTreeSet,
    fs,
    io::{self, BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde_json::Value;
use serde_norway::Value as Yaml;
use socket2::{Domain, Socket, Type};
use tcprtt_tests::{
    kit::{
        Conn, EchoServer, Finished, Load, Loaded, bin, ip, ping_pong_parallel, round_trips_each,
        sock_addr, wait_for,
    },
    testbed::{Delay, QUIET, TestBed},
};

/// How long a start (tcprtt attaching, Prometheus opening its database) may take on a
/// loaded machine.
const START_LIMIT: Duration = Duration::from_secs(60);
/// Longer than a drain period (1 s while serving) plus a scrape.
const DRAIN: Duration = Duration::from_millis(1300);
/// How long `_count` must stay the same before a test takes it as final: two drain
/// periods and more, since a loaded machine can run a drain late.
const SETTLED: Duration = Duration::from_millis(2500);
/// The bcc row (bucket `le`, seconds) that the srtt of a 40 ms path falls in:
/// 32768..65535 µs.
const RTT_40MS_BUCKET: (f64, f64) = (0.032767, 0.065535);

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(path)
}

/// A directory of its own under the system's temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(what: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "tcprtt-test-{}-{}-{what}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Makes the kernel end a child if this test process dies before its guards run.
fn die_with_parent(command: &mut Command) {
    // SAFETY: prctl is async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == 0 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            }
        });
    }
}

/// Ends a child by its pid: SIGTERM, then SIGKILL if it is still there after `grace`.
fn end(child: &mut Child, grace: Duration) {
    // SAFETY: signalling our own child by pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    if wait_for(child, grace).is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// A free TCP port on loopback, for servers that must be told theirs.
fn free_port() -> u16 {
    let probe = TcpListener::bind("127.0.0.1:0").expect("binding a probe socket");
    probe.local_addr().expect("probe address").port()
}

/// An HTTP response: status, header block, body.
#[derive(Debug)]
struct Response {
    status: u16,
    head: String,
    body: String,
}

/// Sends `request` (HTTP/1.0, so that the server closes the connection after its one
/// response and sends no chunked body) and reads the response to the end.
fn http(addr: SocketAddr, request: &[u8]) -> io::Result<Response> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    stream.write_all(request)?;
    let mut bytes = Vec::new();
    stream.read_to_end(&mut bytes)?;
    parse_response(&bytes)
}

fn parse_response(bytes: &[u8]) -> io::Result<Response> {
    let text = String::from_utf8_lossy(bytes);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| io::Error::other(format!("no complete response: {text:?}")))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::other(format!("no status: {head:?}")))?;
    Ok(Response {
        status,
        head: head.to_string(),
        body: body.to_string(),
    })
}

fn get(addr: SocketAddr, path: &str, extra_headers: &str) -> Response {
    let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n{extra_headers}\r\n");
    http(addr, request.as_bytes()).unwrap_or_else(|e| panic!("GET http://{addr}{path}: {e}"))
}

/// The sum of every sample of metric `name` (any labels) in an exposition.
fn metric_sum(exposition: &str, name: &str) -> f64 {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .map(|l| {
            let value = l.rsplit(' ').next().expect("sample value");
            value.parse::<f64>().unwrap_or_else(|e| panic!("{e}: {l}"))
        })
        .sum()
}

/// Percent-encodes a query parameter.
fn encode_query(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64()
}

/// tcprtt serving `/metrics` on a port of its choosing (`--prometheus 127.0.0.1:0`).
struct Exporter {
    child: Option<Child>,
    /// Where it serves, from its second stderr line.
    addr: SocketAddr,
    lines: mpsc::Receiver<String>,
    stderr: Vec<String>,
    stdout: Option<thread::JoinHandle<String>>,
    /// Its BPF programs and maps, to check they are gone after it ends.
    loaded: Loaded,
}

impl Exporter {
    fn start(args: &[&str]) -> Self {
        let mut command = Command::new(bin());
        command.args(args);
        Self::start_command(command)
    }

    /// The same for a prepared command (setpriv running tcprtt, for instance).
    fn start_command(mut command: Command) -> Self {
        let what = format!("{command:?}");
        command
            .args(["--prometheus", "127.0.0.1:0"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        die_with_parent(&mut command);
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("starting {what}: {e}"));
        let mut out = child.stdout.take().expect("stdout");
        let stdout = thread::spawn(move || {
            let mut s = String::new();
            let _ = out.read_to_string(&mut s);
            s
        });
        let (tx, lines) = mpsc::channel();
        let err = child.stderr.take().expect("stderr");
        thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut exporter = Self {
            child: Some(child),
            addr: sock_addr("0.0.0.0", 0),
            lines,
            stderr: Vec::new(),
            stdout: Some(stdout),
            loaded: Loaded::default(),
        };
        // The banner first, then the URL line: the second line of stderr.
        for _ in 0..2 {
            let line = exporter
                .lines
                .recv_timeout(START_LIMIT)
                .unwrap_or_else(|e| panic!("{what}: {e} after {:?}", exporter.stderr));
            exporter.stderr.push(line);
        }
        assert!(
            exporter.stderr[0].starts_with("Tracing TCP RTT"),
            "{:?}",
            exporter.stderr
        );
        let url = exporter.stderr[1]
            .strip_prefix("Serving Prometheus metrics at http://")
            .and_then(|rest| rest.strip_suffix("/metrics"))
            .unwrap_or_else(|| panic!("second stderr line: {:?}", exporter.stderr));
        exporter.addr = url.parse().unwrap_or_else(|e| panic!("{url}: {e}"));
        exporter.loaded = Loaded::held_by(exporter.pid());
        exporter
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    /// A scrape, retried for a while when tcprtt closes the connection at once because it
    /// serves as many as it will already.
    fn scrape(&self) -> String {
        let request = format!("GET /metrics HTTP/1.0\r\nHost: {}\r\n\r\n", self.addr);
        let deadline = Instant::now() + Duration::from_secs(10);
        let response = loop {
            match http(self.addr, request.as_bytes()) {
                Ok(response) => break response,
                Err(e) if Instant::now() > deadline => panic!("scraping {}: {e}", self.addr),
                Err(_) => thread::sleep(Duration::from_millis(50)),
            }
        };
        assert_eq!(response.status, 200, "{response:?}");
        assert!(
            response
                .head
                .to_ascii_lowercase()
                .contains("content-type: text/plain; version=0.0.4"),
            "{}",
            response.head
        );
        response.body
    }

    /// The exposition's total `_count` once traffic has stopped: the first value that
    /// stays the same for [`SETTLED`].
    fn settled_count(&self) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last = metric_sum(&self.scrape(), "tcprtt_srtt_seconds_count");
        let mut since = Instant::now();
        loop {
            thread::sleep(Duration::from_millis(250));
            let now = metric_sum(&self.scrape(), "tcprtt_srtt_seconds_count");
            if now != last {
                (last, since) = (now, Instant::now());
            } else if since.elapsed() >= SETTLED {
                return last;
            }
            assert!(Instant::now() < deadline, "_count still changing: {now}");
        }
    }

    fn is_running(&mut self) -> bool {
        let child = self.child.as_mut().expect("running");
        child.try_wait().expect("waiting for tcprtt").is_none()
    }

    /// SIGINT, then what the run printed; its programs and maps must be gone.
    fn stop(mut self) -> Finished {
        let mut child = self.child.take().expect("running");
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let status = wait_for(&mut child, START_LIMIT).unwrap_or_else(|| {
            let _ = child.kill();
            let _ = child.wait();
            panic!("tcprtt did not exit after SIGINT")
        });
        let stdout = self
            .stdout
            .take()
            .expect("stdout reader")
            .join()
            .expect("stdout reader");
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(2)) {
            self.stderr.push(line);
        }
        self.loaded.assert_gone();
        Finished {
            status,
            stdout,
            stderr: self.stderr.join("\n"),
        }
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A Prometheus server on loopback scraping `target` every second, with its database in a
/// temporary directory.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    _dir: TempDir,
}

impl Prometheus {
    fn start(target: SocketAddr) -> Self {
        let dir = TempDir::new("prometheus");
        let config = dir.0.join("prometheus.yml");
        fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: tcprtt\n    static_configs:\n      \
                 - targets: ['{target}']\n"
            ),
        )
        .expect("writing the Prometheus config");
        // The port is free when probed; should another process take it first, Prometheus
        // exits, and the next attempt gets another.
        for _ in 0..3 {
            let addr = sock_addr("127.0.0.1", free_port());
            let log = fs::File::create(dir.0.join("log")).expect("Prometheus log file");
            let mut command = Command::new("prometheus");
            command
                .arg(format!("--config.file={}", config.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.0.join("data").display()
                ))
                .arg(format!("--web.listen-address={addr}"))
                .arg("--log.level=warn")
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log file"))
                .stderr(log);
            die_with_parent(&mut command);
            let mut child = command
                .spawn()
                .expect("prometheus is installed by `cargo xtask setup`");
            let deadline = Instant::now() + START_LIMIT;
            loop {
                if child.try_wait().expect("waiting for prometheus").is_some() {
                    break;
                }
                if http(addr, b"GET /-/ready HTTP/1.0\r\n\r\n").is_ok_and(|r| r.status == 200) {
                    return Self {
                        child,
                        addr,
                        _dir: dir,
                    };
                }
                if Instant::now() > deadline {
                    end(&mut child, Duration::from_secs(10));
                    panic!(
                        "Prometheus not ready within {START_LIMIT:?}: {}",
                        fs::read_to_string(dir.0.join("log")).unwrap_or_default()
                    );
                }
                thread::sleep(Duration::from_millis(100));
            }
        }
        panic!(
            "Prometheus did not start: {}",
            fs::read_to_string(dir.0.join("log")).unwrap_or_default()
        );
    }

    /// The `result` of an instant query, failing the test on an error.
    fn query(&self, promql: &str) -> Vec<Value> {
        let response = get(
            self.addr,
            &format!("/api/v1/query?query={}", encode_query(promql)),
            "",
        );
        let reply: Value = serde_json::from_str(&response.body)
            .unwrap_or_else(|e| panic!("{promql}: {e}: {response:?}"));
        assert_eq!(reply["status"], "success", "{promql}: {reply}");
        reply["data"]["result"]
            .as_array()
            .unwrap_or_else(|| panic!("{promql}: {reply}"))
            .clone()
    }

    /// Waits until a sample of `metric` scraped after `unix_time` is stored.
    fn wait_for_scrape_after(&self, metric: &str, unix_time: f64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let latest = self
                .query(&format!("max(timestamp({metric}))"))
                .first()
                .map_or(0.0, sample_value);
            if latest > unix_time {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no scrape of {metric} after {unix_time}"
            );
            thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        end(&mut self.child, Duration::from_secs(10));
    }
}

/// The value of one element of an instant query's result.
fn sample_value(element: &Value) -> f64 {
    let text = element["value"][1]
        .as_str()
        .unwrap_or_else(|| panic!("no value in {element}"));
    text.parse().unwrap_or_else(|e| panic!("{e}: {element}"))
}

/// The histograms of tcprtt's last NDJSON line, by remote address: (count, sum).
fn ndjson_by_raddr(stdout: &str) -> Vec<(String, u64, u64)> {
    let last = stdout.lines().last().expect("an NDJSON report");
    let report: Value = serde_json::from_str(last).unwrap_or_else(|e| panic!("{e}: {last}"));
    assert_eq!(report["group_by"], "raddr", "{last}");
    report["histograms"]
        .as_array()
        .expect("histograms")
        .iter()
        .map(|h| {
            (
                h["key"]["addr"].as_str().expect("addr").to_string(),
                h["count"].as_u64().expect("count"),
                h["sum"].as_u64().expect("sum"),
            )
        })
        .collect()
}

/// Grafana variables in the dashboard's queries, replaced by what Grafana would put there
/// for a short dashboard range over this test's Prometheus.
fn grafana_to_promql(expr: &str) -> String {
    expr.replace("$__rate_interval", "30s")
        .replace("$__range", "1m")
        .replace("$instance", ".*")
}

fn dashboard() -> Value {
    let path = deploy("grafana/tcprtt-dashboard.json");
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every query of every dashboard panel.
fn dashboard_exprs(dashboard: &Value) -> Vec<String> {
    dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().expect("targets").iter())
        .map(|t| t["expr"].as_str().expect("expr").to_string())
        .collect()
}

/// Traffic across a 40 ms path, scraped every second by a real Prometheus: the median its
/// `histogram_quantile` gives is in the row holding 40 ms, and its last `_count` and
/// `_sum` equal the counts of tcprtt's own NDJSON report of the same run. The dashboard's
/// queries all return data from that server.
#[test]
fn prometheus_scrapes_what_the_ndjson_report_counts_on_a_40_ms_path() {
    let (client_ip, server_ip) = ("198.51.100.131", "203.0.113.131");
    let mut bed = TestBed::new();
    let client = bed.host("client", &[client_ip]);
    let server = bed.host("server", &[server_ip]);
    bed.link(&client, &server, Delay::each_way(Duration::from_millis(20)));
    let srv = bed.serve(&server, sock_addr(server_ip, 0));
    let mut conns: Vec<Conn> = (0..4).map(|_| client.connect(ip(client_ip), srv)).collect();

    let exporter = Exporter::start(&["-B", "-A", server_ip, "--json"]);
    let prometheus = Prometheus::start(exporter.addr);
    prometheus.wait_for_scrape_after("tcprtt_build_info", unix_now());
    round_trips_each(&mut conns, 60);
    // Nothing more arrives on these sockets while they stay open and idle: once tcprtt's
    // count has settled, a scrape past that moment holds the run's final counts.
    thread::sleep(QUIET);
    let settled = exporter.settled_count();
    prometheus.wait_for_scrape_after("tcprtt_srtt_seconds_count", unix_now());

    let median = prometheus
        .query("histogram_quantile(0.5, sum by (le, raddr) (tcprtt_srtt_seconds_bucket))");
    assert_eq!(median.len(), 1, "{median:?}");
    assert_eq!(median[0]["metric"]["raddr"], server_ip, "{median:?}");
    let p50 = sample_value(&median[0]);
    assert!(
        RTT_40MS_BUCKET.0 < p50 && p50 <= RTT_40MS_BUCKET.1,
        "median {p50} s outside {RTT_40MS_BUCKET:?}"
    );
    let scraped = |metric: &str| {
        let result = prometheus.query(metric);
        assert_eq!(result.len(), 1, "{metric}: {result:?}");
        assert_eq!(result[0]["metric"]["raddr"], server_ip, "{result:?}");
        assert_eq!(result[0]["metric"]["family"], "ipv4", "{result:?}");
        sample_value(&result[0])
    };
    let (count, sum) = (
        scraped("tcprtt_srtt_seconds_count"),
        scraped("tcprtt_srtt_seconds_sum"),
    );
    for expr in dashboard_exprs(&dashboard()) {
        let promql = grafana_to_promql(&expr);
        assert!(!prometheus.query(&promql).is_empty(), "no data: {promql}");
    }
    drop(prometheus);

    let out = exporter.stop();
    assert!(out.status.success(), "{out:?}");
    let hists = ndjson_by_raddr(&out.stdout);
    assert_eq!(hists.len(), 1, "{}", out.stdout);
    let (addr, ndjson_count, ndjson_sum_us) = &hists[0];
    assert_eq!(addr, server_ip);
    assert!(*ndjson_count >= 4 * 60, "{}", out.stdout);
    assert_eq!(count, settled, "Prometheus against tcprtt's own /metrics");
    assert_eq!(count, *ndjson_count as f64, "{}", out.stdout);
    // _sum is in seconds, the NDJSON sum in whole µs.
    assert!(
        (sum * 1e6 - *ndjson_sum_us as f64).abs() < 0.5,
        "_sum {sum} s vs {ndjson_sum_us} µs"
    );
}

/// `promtool check metrics` finds nothing to say about real scrapes, with the bcc-row
/// buckets and with the fine ones; OpenMetrics comes on request.
#[test]
fn promtool_finds_real_scrapes_clean() {
    let srv = EchoServer::on("127.13.1.1");
    let rows = Exporter::start(&["-B", "-A", "127.13.1.1"]);
    let fine = Exporter::start(&["--by-flow", "-A", "127.13.1.1", "--prometheus-fine-buckets"]);
    Conn::open(sock_addr("127.13.1.2", 0), srv.addr).round_trips(200);
    thread::sleep(DRAIN);
    for (exporter, buckets) in [(&rows, 27), (&fine, 193)] {
        let text = exporter.scrape();
        assert!(
            metric_sum(&text, "tcprtt_srtt_seconds_count") >= 200.0,
            "{text}"
        );
        let les = text
            .lines()
            .filter(|l| l.starts_with("tcprtt_srtt_seconds_bucket{"))
            .count();
        assert_eq!(les, buckets, "{text}");
        let mut promtool = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("promtool is installed by `cargo xtask setup`");
        promtool
            .stdin
            .take()
            .expect("stdin")
            .write_all(text.as_bytes())
            .expect("feeding promtool");
        let checked = promtool.wait_with_output().expect("promtool");
        assert!(
            checked.status.success() && checked.stdout.is_empty() && checked.stderr.is_empty(),
            "promtool check metrics: {checked:?}\n{text}"
        );
    }
    let open = get(
        rows.addr,
        "/metrics",
        "Accept: application/openmetrics-text;version=1.0.0\r\n",
    );
    assert_eq!(open.status, 200);
    assert!(
        open.head
            .to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text; version=1.0.0"),
        "{}",
        open.head
    );
    assert!(open.body.ends_with("# EOF\n"), "{}", open.body);
    for exporter in [rows, fine] {
        assert!(exporter.stop().status.success());
    }
}

/// The deploy/ scrape config passes `promtool check config`. Debian's Prometheus is built
/// without Kubernetes service discovery; when this promtool refuses the
/// `kubernetes_sd_configs` field as unknown, the Kubernetes job is checked with that one
/// field taken out (its relabelling rules still are), and the field itself by shape.
#[test]
fn promtool_accepts_the_deploy_scrape_config() {
    let path = deploy("prometheus/prometheus.yml");
    let check = |file: &Path| {
        Command::new("promtool")
            .args(["check", "config"])
            .arg(file)
            .output()
            .expect("promtool is installed by `cargo xtask setup`")
    };
    let whole = check(&path);
    if whole.status.success() {
        return;
    }
    let why = String::from_utf8_lossy(&whole.stderr).into_owned()
        + &String::from_utf8_lossy(&whole.stdout);
    assert!(
        why.contains("field kubernetes_sd_configs not found"),
        "promtool check config {}: {why}",
        path.display()
    );
    let mut config: Yaml =
        serde_norway::from_str(&fs::read_to_string(&path).expect("scrape config"))
            .expect("the scrape config is YAML");
    let mut kubernetes_jobs = 0;
    for job in config["scrape_configs"]
        .as_sequence_mut()
        .expect("scrape_configs")
    {
        let job = job.as_mapping_mut().expect("a scrape config");
        if let Some(sd) = job.remove("kubernetes_sd_configs") {
            kubernetes_jobs += 1;
            let sd = sd.as_sequence().expect("kubernetes_sd_configs is a list");
            assert!(sd.iter().all(|c| c["role"] == "pod"), "{sd:?}");
        }
    }
    assert_eq!(kubernetes_jobs, 1, "one job discovers the DaemonSet's pods");
    let dir = TempDir::new("promtool");
    let stripped = dir.0.join("prometheus.yml");
    fs::write(&stripped, serde_norway::to_string(&config).expect("YAML")).expect("writing");
    let rest = check(&stripped);
    assert!(rest.status.success(), "promtool check config: {rest:?}");
}

#[test]
fn the_dashboard_has_the_heatmap_the_quantiles_and_the_top_peers() {
    let dashboard = dashboard();
    let panel = |title: &str| {
        dashboard["panels"]
            .as_array()
            .expect("panels")
            .iter()
            .find(|p| p["title"] == title)
            .unwrap_or_else(|| panic!("no panel {title:?}"))
            .clone()
    };
    let exprs = |p: &Value| -> Vec<String> {
        p["targets"]
            .as_array()
            .expect("targets")
            .iter()
            .map(|t| t["expr"].as_str().expect("expr").to_string())
            .collect()
    };
    let heatmap = panel("RTT distribution (heatmap)");
    assert_eq!(heatmap["type"], "heatmap");
    assert_eq!(heatmap["targets"][0]["format"], "heatmap");
    assert!(exprs(&heatmap)[0].contains("tcprtt_srtt_seconds_bucket"));
    assert!(exprs(&heatmap)[0].contains("by (le)"));

    let quantiles = panel("RTT p50 / p90 / p99");
    let q = exprs(&quantiles);
    for (i, phi) in ["0.5", "0.9", "0.99"].iter().enumerate() {
        assert!(
            q[i].starts_with(&format!(
                "histogram_quantile({phi}, sum by (le) (rate(tcprtt_srtt_seconds_bucket"
            )),
            "{q:?}"
        );
    }
    let top = panel("Top remote addresses by p99");
    let t = &exprs(&top)[0];
    assert!(
        t.starts_with(
            "topk(10, histogram_quantile(0.99, sum by (le, raddr) (rate(tcprtt_srtt_seconds_bucket"
        ),
        "{t}"
    );
    assert_eq!(top["targets"][0]["instant"], true);

    // Every metric a query names is one tcprtt exposes.
    let exposed = BTreeSet::from([
        "tcprtt_srtt_seconds_bucket",
        "tcprtt_srtt_seconds_count",
        "tcprtt_events_dropped_total",
        "tcprtt_missed_total",
        "tcprtt_keys",
        "tcprtt_build_info",
    ]);
    let mut named = BTreeSet::new();
    for expr in dashboard_exprs(&dashboard) {
        for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if word.starts_with("tcprtt_") {
                named.insert(word.to_string());
            }
        }
    }
    for name in &named {
        assert!(exposed.contains(name.as_str()), "{name} is not exposed");
    }
    let variable = &dashboard["templating"]["list"][1];
    assert_eq!(
        variable["query"]["query"],
        "label_values(tcprtt_build_info, instance)"
    );
}

/// The DaemonSet asks for nothing beyond CAP_BPF and CAP_PERFMON (and CAP_NET_ADMIN for
/// the wire source): not privileged, all else dropped, no escalation, a read-only root,
/// no host PID or IPC namespace, no writable host path; with limits. Its tcprtt flags are
/// run for real, as the pod runs them (root with a bounding set of the two, no new
/// privileges, a read-only root), and serve.
#[test]
fn the_daemonset_asks_for_no_privilege_beyond_bpf_and_perfmon() {
    let path = deploy("kubernetes/daemonset.yaml");
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let docs: Vec<Yaml> = text
        .split("\n---\n")
        .map(|doc| serde_norway::from_str(doc).expect("a YAML document"))
        .collect();
    let sets: Vec<&Yaml> = docs.iter().filter(|d| d["kind"] == "DaemonSet").collect();
    assert_eq!(sets.len(), 1, "one DaemonSet in {}", path.display());
    let pod = &sets[0]["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], Yaml::Bool(true));
    for key in ["hostPID", "hostIPC"] {
        assert_ne!(pod[key], Yaml::Bool(true), "{key}");
    }
    assert!(pod["securityContext"].get("sysctls").is_none());
    if let Some(volumes) = pod.get("volumes").and_then(Yaml::as_sequence) {
        assert!(
            volumes.iter().all(|v| v.get("hostPath").is_none()),
            "{volumes:?}"
        );
    }
    let allowed = BTreeSet::from(["BPF", "PERFMON", "NET_ADMIN"]);
    let mut args = Vec::new();
    for list in ["initContainers", "containers"] {
        let Some(containers) = pod.get(list).and_then(Yaml::as_sequence) else {
            continue;
        };
        for c in containers {
            let sc = &c["securityContext"];
            assert_ne!(sc["privileged"], Yaml::Bool(true), "{c:?}");
            assert_eq!(sc["allowPrivilegeEscalation"], Yaml::Bool(false), "{c:?}");
            assert_eq!(sc["readOnlyRootFilesystem"], Yaml::Bool(true), "{c:?}");
            let caps = &sc["capabilities"];
            assert_eq!(caps["drop"], Yaml::Sequence(vec!["ALL".into()]), "{c:?}");
            let add: BTreeSet<&str> = caps["add"]
                .as_sequence()
                .expect("capabilities.add")
                .iter()
                .map(|v| v.as_str().expect("a capability name"))
                .collect();
            assert!(add.is_subset(&allowed), "{add:?}");
            assert!(add.contains("BPF") && add.contains("PERFMON"), "{add:?}");
            for kind in ["requests", "limits"] {
                for resource in ["cpu", "memory"] {
                    assert!(
                        c["resources"][kind].get(resource).is_some(),
                        "no {kind}.{resource}: {c:?}"
                    );
                }
            }
            if c["name"] == "tcprtt" {
                args = c["args"]
                    .as_sequence()
                    .expect("args")
                    .iter()
                    .map(|a| a.as_str().expect("a string argument").to_string())
                    .collect();
            }
        }
    }

    // The pod's own address becomes loopback here, and its port one that is free.
    let at = args
        .iter()
        .position(|a| a == "--prometheus")
        .expect("the DaemonSet serves --prometheus");
    assert_eq!(args[at + 1], "$(NODE_IP):9464");
    args.drain(at..at + 2);
    // A mount namespace of its own whose root is read-only, as readOnlyRootFilesystem makes
    // it; then root with no capability but the two, and no new privileges.
    let mut command = Command::new("unshare");
    command
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(
            "mount -o remount,bind,ro / && ! touch /.tcprtt-rw-probe 2>/dev/null && \
             exec setpriv --bounding-set=-all,+bpf,+perfmon --no-new-privs -- \"$@\"",
        )
        .arg("sh")
        .arg(bin())
        .args(&args);
    let exporter = Exporter::start_command(command);
    let status =
        fs::read_to_string(format!("/proc/{}/status", exporter.pid())).expect("tcprtt's status");
    let cap_eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .expect("CapEff");
    // CAP_PERFMON is bit 38, CAP_BPF bit 39.
    assert_eq!(cap_eff.trim(), "000000c000000000", "{status}");
    assert!(exporter.scrape().contains("\ntcprtt_keys "));
    let out = exporter.stop();
    assert!(out.status.success(), "{out:?}");
}

/// The systemd unit gives a dynamic user the two capabilities and no more, keeps the
/// user namespace that the kernel's BPF checks look at, and its tcprtt flags are valid:
/// they are run for real and serve.
#[test]
fn the_systemd_unit_grants_bpf_and_perfmon_to_a_dynamic_user() {
    let path = deploy("systemd/tcprtt.service");
    let unit = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let values = |key: &str| -> Vec<String> {
        unit.lines()
            .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .map(str::to_string)
            .collect()
    };
    assert_eq!(values("DynamicUser"), ["yes"]);
    assert_eq!(values("NoNewPrivileges"), ["yes"]);
    assert_eq!(values("PrivateUsers"), ["no"]);
    assert_eq!(values("ProtectSystem"), ["strict"]);
    for key in ["AmbientCapabilities", "CapabilityBoundingSet"] {
        assert_eq!(values(key), ["CAP_BPF CAP_PERFMON"], "{key}");
    }
    let exec = values("ExecStart");
    assert_eq!(exec.len(), 1, "{exec:?}");
    let mut words: Vec<&str> = exec[0].split_whitespace().collect();
    assert_eq!(words.remove(0), "/usr/local/bin/tcprtt");
    let at = words
        .iter()
        .position(|w| *w == "--prometheus")
        .expect("the unit serves --prometheus");
    assert_eq!(words[at + 1], "[::]:9464");
    words.drain(at..at + 2);
    // As the unit runs it: not root, the two capabilities ambient.
    let mut command = Command::new("setpriv");
    command
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all,+bpf,+perfmon",
            "--ambient-caps=+bpf,+perfmon",
            "--bounding-set=-all,+bpf,+perfmon",
            "--no-new-privs",
            "--",
        ])
        .arg(bin())
        .args(&words);
    let exporter = Exporter::start_command(command);
    assert!(metric_sum(&exporter.scrape(), "tcprtt_build_info") == 1.0);
    let out = exporter.stop();
    assert!(out.status.success(), "{out:?}");
}

/// Wrong paths, a POST, a 10 MB header and 1,000 connections at once, while a ping-pong
/// runs: each is answered or refused, tcprtt goes on serving, and the ping-pong's count
/// is the same in the last scrape and in the final report.
#[test]
fn bad_requests_are_refused_and_the_counts_stay_exact() {
    let srv = EchoServer::on("127.13.2.1");
    let conn = Conn::open(sock_addr("127.13.2.2", 0), srv.addr);
    let before = conn.segs_in();
    let mut exporter = Exporter::start(&["-B", "-A", "127.13.2.1", "--json"]);
    let load = Load::start(vec![conn]);
    let addr = exporter.addr;

    for path in ["/", "/metric", "/metrics/x", "/api/v1/query"] {
        let response = get(addr, path, "");
        assert_eq!(response.status, 404, "{path}: {response:?}");
    }
    let post = http(
        addr,
        b"POST /metrics HTTP/1.0\r\nContent-Length: 3\r\n\r\nabc",
    )
    .expect("POST");
    assert_eq!(post.status, 405, "{post:?}");
    assert!(
        post.head.to_ascii_lowercase().contains("allow: get, head"),
        "{post:?}"
    );

    // A 10 MB header: refused with a 4xx, or the connection is closed on it.
    let mut big = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
    big.resize(big.len() + (10 << 20), b'a');
    big.extend_from_slice(b"\r\n\r\n");
    match http(addr, &big) {
        Ok(r) => assert!((400..500).contains(&r.status), "10 MB header: {}", r.head),
        Err(e) => assert!(
            matches!(
                e.kind(),
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset | io::ErrorKind::Other
            ),
            "10 MB header: {e}"
        ),
    }

    // 1,000 connections open at once, each with a request; then every one is read.
    let clients: Vec<io::Result<TcpStream>> = (0..1000)
        .map(|_| {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
            s.set_read_timeout(Some(Duration::from_secs(30)))?;
            s.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
            Ok(s)
        })
        .collect();
    let (mut answered, mut refused) = (0, 0);
    for client in clients {
        let outcome = client.and_then(|mut s| {
            let mut bytes = Vec::new();
            s.read_to_end(&mut bytes)?;
            parse_response(&bytes)
        });
        match outcome {
            Ok(r) => {
                assert_eq!(r.status, 200, "{}", r.head);
                answered += 1;
            }
            Err(e) => {
                assert_ne!(e.kind(), io::ErrorKind::WouldBlock, "a connection hung");
                assert_ne!(e.kind(), io::ErrorKind::TimedOut, "a connection hung");
                refused += 1;
            }
        }
    }
    assert_eq!(answered + refused, 1000);
    assert!(answered > 0, "all 1,000 refused");
    assert!(exporter.is_running(), "tcprtt ended under load");

    let idle = load.stop();
    let done = idle[0].1;
    thread::sleep(QUIET);
    let after = idle[0].0.segs_in();
    let scraped = exporter.settled_count();
    let out = exporter.stop();
    assert!(out.status.success(), "{out:?}");
    let hists = ndjson_by_raddr(&out.stdout);
    assert_eq!(hists.len(), 1, "{}", out.stdout);
    let count = hists[0].1;
    assert_eq!(scraped, count as f64, "{}", out.stdout);
    assert!(
        (done..=after - before).contains(&count),
        "{done} round trips, {} segments received, counted {count}",
        after - before
    );
    drop(idle);
}

/// tcprtt's resident memory, in bytes.
fn rss_bytes(pid: i32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("tcprtt's status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kib << 10
}

/// Each response holds its encoded body until the client has read it. Two hundred
/// clients that ask for a large exposition and never read leave tcprtt's memory within a
/// few bodies of where it was (it serves a bounded number of connections at once and
/// closes the others), and their connections end after their lifetime, silent or not.
#[test]
fn clients_that_never_read_neither_grow_tcprtts_memory_nor_keep_their_place() {
    let srv = EchoServer::on("127.13.3.1");
    // One series per connection, each with the 193 fine edges: a large body.
    let exporter = Exporter::start(&["--by-flow", "-A", "127.13.3.1", "--prometheus-fine-buckets"]);
    ping_pong_parallel(sock_addr("127.13.3.2", 0), srv.addr, 400, 1);
    thread::sleep(DRAIN);
    let body = exporter.scrape().len() as u64;
    assert!(
        body >= 4 << 20,
        "only {body} bytes: too few series to matter"
    );
    let base = rss_bytes(exporter.pid());

    let flood = Instant::now();
    let silent: Vec<TcpStream> = (0..200)
        .map(|_| {
            let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
            // A small receive window: the body stays in tcprtt, not in this socket.
            socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
            socket
                .connect(&exporter.addr.into())
                .expect("connecting to tcprtt");
            let mut stream: TcpStream = socket.into();
            stream
                .write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
                .expect("request");
            stream
        })
        .collect();
    let bound = base + 24 * body;
    let mut peak = base;
    let until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < until {
        peak = peak.max(rss_bytes(exporter.pid()));
        assert!(
            peak <= bound,
            "RSS {peak} bytes with 200 silent clients: from {base}, bodies of {body}"
        );
        thread::sleep(Duration::from_millis(100));
    }
    // Every place is taken by a silent client: another is closed at once, until the
    // silent ones reach the end of their lifetime (30 s, and 10 s for the last response).
    let request = b"GET /metrics HTTP/1.0\r\n\r\n";
    assert!(
        http(exporter.addr, request).is_err(),
        "served beyond the bound"
    );
    loop {
        if let Ok(r) = http(exporter.addr, request) {
            assert_eq!(r.status, 200, "{}", r.head);
            assert!(flood.elapsed() >= Duration::from_secs(29), "{flood:?}");
            break;
        }
        assert!(
            flood.elapsed() < Duration::from_secs(60),
            "silent clients still hold every place after 60 s"
        );
        thread::sleep(Duration::from_millis(500));
    }
    drop(silent);
    assert!(exporter.scrape().len() as u64 >= body);
    let out = exporter.stop();
    assert!(out.status.success(), "{out:?}");
}
