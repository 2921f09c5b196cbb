//! The guest's traffic: one-byte ping-pong on a few loopback connections at once, spread
//! over a few seconds so that `-i 1` sees several intervals.

use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    thread,
    time::Duration,
};

use anyhow::{Context, Result, anyhow};

/// A connection to make: the server's address and how many round trips to do on it.
pub struct Flow {
    pub server: &'static str,
    pub round_trips: usize,
}

/// Distinct servers, ports, round-trip counts and both families, so each filter and
/// grouping selects a different part of the traffic.
pub const FLOWS: [Flow; 3] = [
    Flow {
        server: "127.0.0.2:5001",
        round_trips: 40,
    },
    Flow {
        server: "127.0.0.3:5002",
        round_trips: 30,
    },
    Flow {
        server: "[::1]:5003",
        round_trips: 20,
    },
];

/// Pause between round trips: 40 of them span more than two `-i 1` intervals.
const PAUSE: Duration = Duration::from_millis(60);
/// A grouped tracer's map allocates a new key's per-CPU histogram from a per-CPU cache
/// that holds one and is refilled asynchronously, so two new keys on one CPU in quick
/// succession lose the second one's samples (tcprtt reports them as dropped for want of
/// memory). Connections therefore start one after another, and each server waits before
/// its first reply, so that no two keys are ever new at once.
const NEW_KEY_GAP: Duration = Duration::from_millis(250);

/// One connection as made: its client and server ends.
#[derive(Clone, Debug)]
pub struct Connection {
    pub client: SocketAddr,
    pub server: SocketAddr,
    pub round_trips: usize,
}

/// Runs every flow at once, closes the connections, and returns them.
pub fn run() -> Result<Vec<Connection>> {
    let workers: Vec<_> = FLOWS
        .iter()
        .enumerate()
        .map(|(i, flow)| {
            let server: SocketAddr = flow.server.parse().context("a flow's server address")?;
            let listener =
                TcpListener::bind(server).with_context(|| format!("binding {server}"))?;
            let round_trips = flow.round_trips;
            let start = NEW_KEY_GAP * 2 * i as u32;
            Ok(thread::spawn(move || {
                thread::sleep(start);
                one(listener, server, round_trips)
            }))
        })
        .collect::<Result<_>>()?;
    workers
        .into_iter()
        .map(|w| w.join().map_err(|_| anyhow!("a traffic thread panicked"))?)
        .collect()
}

fn one(listener: TcpListener, server: SocketAddr, round_trips: usize) -> Result<Connection> {
    let echo = thread::spawn(move || -> Result<()> {
        let (mut conn, _) = listener.accept().context("accepting")?;
        conn.set_nodelay(true)?;
        let mut byte = [0u8; 1];
        let mut first = true;
        while conn.read(&mut byte)? == 1 {
            if first {
                thread::sleep(NEW_KEY_GAP);
                first = false;
            }
            conn.write_all(&byte)?;
        }
        Ok(())
    });
    let mut client =
        TcpStream::connect(server).with_context(|| format!("connecting to {server}"))?;
    client.set_nodelay(true)?;
    let connection = Connection {
        client: client.local_addr()?,
        server,
        round_trips,
    };
    let mut byte = [1u8];
    for _ in 0..round_trips {
        client.write_all(&byte)?;
        client.read_exact(&mut byte)?;
        thread::sleep(PAUSE);
    }
    drop(client);
    echo.join()
        .map_err(|_| anyhow!("an echo thread panicked"))??;
    Ok(connection)
}

/// The `family` a JSON key gives an address.
pub fn family(ip: IpAddr) -> &'static str {
    if ip.is_ipv4() { "ipv4" } else { "ipv6" }
}
