//! The ping-pong generator: connections doing one-byte request/response round trips, as
//! interactive protocols do. Every response is a segment the client socket receives in
//! the established state, so the number of round trips is a lower bound on what a tracer
//! watching the client socket counts.

use std::{
    io::{self, Read, Write},
    net::{IpAddr, Shutdown, SocketAddr, TcpStream},
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use socket2::{Domain, Socket, Type};

/// Longer than any delay a test sets: a broken path fails the test instead of hanging it.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// An IPv4 or IPv6 address from its text.
pub fn ip(text: &str) -> IpAddr {
    text.parse()
        .unwrap_or_else(|e| panic!("{text:?} is not an IP address: {e}"))
}

/// `ip` (IPv4 or IPv6 text) and `port` as a socket address.
pub fn sock_addr(ip_text: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip(ip_text), port)
}

/// A client connection, made in the network namespace of the thread that opens it and
/// usable from any thread.
#[derive(Debug)]
pub struct Conn {
    stream: TcpStream,
    pub local: SocketAddr,
    pub peer: SocketAddr,
}

impl Conn {
    /// A connection from `local` (port 0: any) to `server`.
    pub fn open(local: SocketAddr, server: SocketAddr) -> Self {
        Self::connect(local, server)
            .unwrap_or_else(|e| panic!("connecting {local} -> {server}: {e}"))
    }

    pub fn connect(local: SocketAddr, server: SocketAddr) -> io::Result<Self> {
        let domain = if server.is_ipv4() {
            Domain::IPV4
        } else {
            Domain::IPV6
        };
        let socket = Socket::new(domain, Type::STREAM, None)?;
        socket.set_tcp_nodelay(true)?;
        socket.bind(&local.into())?;
        socket.connect_timeout(&server.into(), IO_TIMEOUT)?;
        let stream: TcpStream = socket.into();
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        Ok(Self {
            local: stream.local_addr()?,
            peer: server,
            stream,
        })
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

    /// Segments this socket has received so far, its handshake included (TCP_INFO).
    pub fn segs_in(&self) -> u64 {
        // SAFETY: an all-zero tcp_info is valid; getsockopt writes at most `len` bytes.
        let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        // SAFETY: both pointers are to live locals of the sizes given.
        let rc = unsafe {
            libc::getsockopt(
                self.stream.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                (&raw mut info).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0, "TCP_INFO: {}", io::Error::last_os_error());
        info.tcpi_segs_in.into()
    }
}

/// Opens a connection from `local` (port 0: any) to `server`, does `round_trips`
/// round trips, then closes it.
pub fn ping_pong(local: SocketAddr, server: SocketAddr, round_trips: usize) {
    Conn::open(local, server).round_trips(round_trips);
}

/// The same as [`ping_pong`] on `connections` parallel connections.
pub fn ping_pong_parallel(
    local: SocketAddr,
    server: SocketAddr,
    connections: usize,
    round_trips: usize,
) {
    thread::scope(|s| {
        for _ in 0..connections {
            s.spawn(move || ping_pong(local, server, round_trips));
        }
    });
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
