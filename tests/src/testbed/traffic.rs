//! Request/response traffic inside test hosts, and the kernel's own view of it (`ss -ti`,
//! the namespace's SNMP counters) to check tcprtt against.

use std::{
    fs,
    io::{self, Read, Write},
    net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use socket2::{Domain, Socket, Type};

use super::netns::enter;

/// Longer than any delay a test sets: a broken path fails the test instead of hanging it.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// The server's accepted connections, each with the thread echoing on it.
type Echoes = Arc<Mutex<Vec<(TcpStream, JoinHandle<()>)>>>;

/// An echo server listening inside a host; stopped (listener and connections closed,
/// threads joined) on drop.
pub(crate) struct Server {
    pub(crate) addr: SocketAddr,
    listener: Arc<TcpListener>,
    stop: Arc<AtomicBool>,
    conns: Echoes,
    accept: Option<JoinHandle<()>>,
}

impl Server {
    pub(crate) fn start(ns: &str, addr: SocketAddr) -> Self {
        let listener = enter(ns, || TcpListener::bind(addr))
            .unwrap_or_else(|e| panic!("binding the echo server to {addr} in {ns}: {e}"));
        let addr = listener.local_addr().expect("server address");
        let listener = Arc::new(listener);
        let stop = Arc::new(AtomicBool::new(false));
        let conns = Echoes::default();
        let accept = {
            let (listener, stop, conns) = (listener.clone(), stop.clone(), conns.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Ok((conn, _)) = listener.accept() else {
                        continue;
                    };
                    let Ok(handle) = conn.try_clone() else {
                        continue;
                    };
                    let _ = conn.set_nodelay(true);
                    let echo = thread::spawn(move || echo(conn));
                    conns
                        .lock()
                        .expect("server connections")
                        .push((handle, echo));
                }
            })
        };
        Self {
            addr,
            listener,
            stop,
            conns,
            accept: Some(accept),
        }
    }
}

fn echo(mut conn: TcpStream) {
    let mut buf = [0u8; 256];
    while let Ok(n @ 1..) = conn.read(&mut buf) {
        if conn.write_all(&buf[..n]).is_err() {
            break;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wakes the blocked accept(): on Linux it then fails with EINVAL.
        // SAFETY: shutting down a socket we own.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
        let conns = std::mem::take(&mut *self.conns.lock().unwrap_or_else(|e| e.into_inner()));
        for (conn, echo) in conns {
            let _ = conn.shutdown(Shutdown::Both);
            let _ = echo.join();
        }
    }
}

/// A client connection made from inside a host; usable from any thread.
#[derive(Debug)]
pub struct Conn {
    stream: TcpStream,
    pub local: SocketAddr,
    pub peer: SocketAddr,
}

impl Conn {
    pub(crate) fn open(ns: &str, local: IpAddr, server: SocketAddr) -> Self {
        let stream = enter(ns, || -> io::Result<TcpStream> {
            let domain = if server.is_ipv4() {
                Domain::IPV4
            } else {
                Domain::IPV6
            };
            let socket = Socket::new(domain, Type::STREAM, None)?;
            socket.set_tcp_nodelay(true)?;
            socket.bind(&SocketAddr::new(local, 0).into())?;
            socket.connect_timeout(&server.into(), IO_TIMEOUT)?;
            Ok(socket.into())
        })
        .unwrap_or_else(|e| panic!("connecting {local} -> {server} in {ns}: {e}"));
        stream.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
        Self {
            local: stream.local_addr().expect("local address"),
            peer: server,
            stream,
        }
    }

    /// One one-byte request and its response.
    pub fn round_trip(&mut self) -> io::Result<()> {
        let mut byte = [b'?'];
        self.stream.write_all(&byte)?;
        self.stream.read_exact(&mut byte)
    }

    pub fn round_trips(&mut self, n: usize) {
        for i in 0..n {
            self.round_trip()
                .unwrap_or_else(|e| panic!("{} -> {}: round trip {i}: {e}", self.local, self.peer));
        }
    }
}

/// `n` round trips on each connection, all connections at once.
pub fn round_trips_each(conns: &mut [Conn], n: usize) {
    thread::scope(|s| {
        for conn in conns.iter_mut() {
            s.spawn(move || conn.round_trips(n));
        }
    });
}

/// Connections doing back-to-back round trips, each on a thread of its own, until
/// stopped. Dropping it without [`Load::stop`] ends the threads by closing the sockets.
pub struct Load {
    stop: Arc<AtomicBool>,
    sockets: Vec<TcpStream>,
    workers: Vec<JoinHandle<io::Result<(Conn, u64)>>>,
}

impl Load {
    pub fn start(conns: Vec<Conn>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let sockets = conns
            .iter()
            .map(|c| c.stream.try_clone().expect("cloning a socket"))
            .collect();
        let workers = conns
            .into_iter()
            .map(|mut conn| {
                let stop = stop.clone();
                thread::spawn(move || {
                    let mut done = 0;
                    while !stop.load(Ordering::Relaxed) {
                        conn.round_trip()?;
                        done += 1;
                    }
                    Ok((conn, done))
                })
            })
            .collect();
        Self {
            stop,
            sockets,
            workers,
        }
    }

    /// Lets each connection finish its round trip in progress; they stay open (and
    /// idle), each returned with the number of round trips it did.
    pub fn stop(mut self) -> Vec<(Conn, u64)> {
        self.stop.store(true, Ordering::Relaxed);
        self.sockets.clear();
        self.workers
            .drain(..)
            .map(|w| {
                w.join()
                    .expect("load thread")
                    .unwrap_or_else(|e| panic!("round trip failed: {e}"))
            })
            .collect()
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for s in &self.sockets {
            let _ = s.shutdown(Shutdown::Both);
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// What the kernel says about one established socket (`ss -ti`).
#[derive(Debug, Clone, PartialEq)]
pub struct TcpInfo {
    pub local: SocketAddr,
    pub peer: SocketAddr,
    /// The smoothed RTT, in µs (ss prints it in ms with three decimals).
    pub srtt_us: f64,
    /// Segments the socket has received, its handshake included.
    pub segs_in: u64,
}

pub(crate) fn established_sockets(ns: &str) -> Vec<TcpInfo> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "ss", "-tinHO", "state", "established"])
        .output()
        .expect("running ss in a namespace");
    assert!(
        out.status.success(),
        "ss in {ns}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|line| parse_ss_line(line).unwrap_or_else(|| panic!("unexpected ss line {line:?}")))
        .collect()
}

/// One line of `ss -tinHO state established`: `Recv-Q Send-Q local peer <info fields>`.
fn parse_ss_line(line: &str) -> Option<TcpInfo> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let field = |name: &str| {
        words
            .iter()
            .find_map(|w| w.strip_prefix(name)?.strip_prefix(':'))
    };
    let srtt_ms: f64 = field("rtt")?.split('/').next()?.parse().ok()?;
    Some(TcpInfo {
        local: words.get(2)?.parse().ok()?,
        peer: words.get(3)?.parse().ok()?,
        srtt_us: srtt_ms * 1000.0,
        segs_in: field("segs_in").map_or(Some(0), |n| n.parse().ok())?,
    })
}

/// A counter of the namespace's `/proc/net/snmp` or `/proc/net/netstat`, e.g.
/// (`Tcp`, `InSegs`) or (`TcpExt`, `TCPBacklogCoalesce`).
pub(crate) fn counter(ns: &str, group: &str, name: &str) -> u64 {
    // /proc/thread-self/net is the calling thread's namespace (/proc/self/net would be the
    // main thread's).
    let text = enter(ns, || {
        ["snmp", "netstat"]
            .map(|f| fs::read_to_string(format!("/proc/thread-self/net/{f}")).expect(f))
            .concat()
    });
    let prefix = format!("{group}:");
    let mut lines = text.lines().filter(|l| l.starts_with(&prefix));
    while let (Some(names), Some(values)) = (lines.next(), lines.next()) {
        if let Some((_, value)) = names
            .split_whitespace()
            .zip(values.split_whitespace())
            .find(|(n, _)| *n == name)
        {
            return value.parse().expect("counter value");
        }
    }
    panic!("no counter {group} {name} in {ns}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ss_lines_of_both_families_parse() {
        let v6 = "0      0      [2001:db8:1::1]:44594 [2001:db8:2::1]:40219 bbr wscale:10,10 \
                  rto:204 rtt:40.125/0.014 ato:40 mss:1448 segs_out:4 segs_in:3 \
                  data_segs_out:1 data_segs_in:1 minrtt:0.007";
        assert_eq!(
            parse_ss_line(v6),
            Some(TcpInfo {
                local: "[2001:db8:1::1]:44594".parse().unwrap(),
                peer: "[2001:db8:2::1]:40219".parse().unwrap(),
                srtt_us: 40125.0,
                segs_in: 3,
            })
        );
        let v4 = "0 0 198.51.100.1:5000 203.0.113.1:41000 cubic rtt:10.5/2 mss:1448";
        let got = parse_ss_line(v4).unwrap();
        assert_eq!((got.srtt_us, got.segs_in), (10500.0, 0));
        assert_eq!(parse_ss_line("0 0 junk"), None);
    }
}
