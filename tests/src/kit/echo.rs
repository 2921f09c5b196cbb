//! The echo server every test talks to, on loopback or inside a test-bed host.

use std::{
    io::{self, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
};

/// The server's accepted connections, each with the thread echoing on it.
type Echoes = Arc<Mutex<Vec<(TcpStream, JoinHandle<()>)>>>;

/// Echoes whatever each connection sends; stopped (listener and connections closed,
/// threads joined) on drop. It listens in the network namespace of the thread that
/// starts it.
pub struct EchoServer {
    pub addr: SocketAddr,
    listener: Arc<TcpListener>,
    stop: Arc<AtomicBool>,
    conns: Echoes,
    accept: Option<JoinHandle<()>>,
}

impl EchoServer {
    /// A server on `addr` (port 0: any free port).
    pub fn start(addr: SocketAddr) -> Self {
        Self::bind(addr).unwrap_or_else(|e| panic!("binding the echo server to {addr}: {e}"))
    }

    /// A server on `ip` (text), any free port.
    pub fn on(ip: &str) -> Self {
        Self::start(super::sock_addr(ip, 0))
    }

    pub fn bind(addr: SocketAddr) -> io::Result<Self> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
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
                    let mut conns = conns.lock().expect("server connections");
                    // Connections that ended are joined now, so that a server accepting
                    // thousands of short connections holds no more than the live ones.
                    let (done, live): (Vec<_>, Vec<_>) =
                        conns.drain(..).partition(|(_, t)| t.is_finished());
                    *conns = live;
                    conns.push((handle, echo));
                    drop(conns);
                    for (_, t) in done {
                        let _ = t.join();
                    }
                }
            })
        };
        Ok(Self {
            addr,
            listener,
            stop,
            conns,
            accept: Some(accept),
        })
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

impl Drop for EchoServer {
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
