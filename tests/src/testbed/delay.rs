//! The delay line: a TUN device at each end of a path, and threads of the test process
//! that copy every packet from one to the other after the wanted one-way delay. This
//! kernel has no netem, so this is how a test connection gets a real, known RTT.

use std::{
    collections::hash_map::RandomState,
    fs::File,
    hash::BuildHasher,
    io::{self, Read, Write},
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

/// How long a reader waits for a packet before it looks at the stop flag again.
const POLL_MS: i32 = 50;

/// Creates TUN device `name` in the calling thread's namespace. The device lives as long
/// as the returned descriptor.
pub(crate) fn open_tun(name: &str) -> File {
    let tun = File::options()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .expect("opening /dev/net/tun");
    // SAFETY: an all-zero ifreq is valid; the name fits (checked) and stays NUL-terminated.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    assert!(name.len() < libc::IFNAMSIZ, "TUN name {name} too long");
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    // Raw IP packets, no extra header: what is read can be written to the other end as is.
    req.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: TUNSETIFF takes a pointer to an ifreq that lives across the call.
    let rc = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut req) };
    assert_eq!(rc, 0, "TUNSETIFF {name}: {}", io::Error::last_os_error());
    tun
}

/// The one-way delays of a link: from its first host to its second, back, and a random
/// extra of up to `jitter` per packet (packets still leave in the order they came).
#[derive(Debug, Clone, Copy)]
pub struct Delay {
    pub a_to_b: Duration,
    pub b_to_a: Duration,
    pub jitter: Duration,
}

impl Delay {
    /// The same delay both ways, no jitter: an RTT of twice `one_way`.
    pub fn each_way(one_way: Duration) -> Self {
        Self {
            a_to_b: one_way,
            b_to_a: one_way,
            jitter: Duration::ZERO,
        }
    }

    pub fn with_jitter(self, jitter: Duration) -> Self {
        Self { jitter, ..self }
    }
}

/// One direction's settings, read for every packet so that a test can change them while
/// traffic flows.
struct Shaping {
    delay_us: AtomicU64,
    jitter_us: AtomicU64,
}

impl Shaping {
    fn new(delay: Duration, jitter: Duration) -> Arc<Self> {
        Arc::new(Self {
            delay_us: AtomicU64::new(delay.as_micros() as u64),
            jitter_us: AtomicU64::new(jitter.as_micros() as u64),
        })
    }
}

/// A handle on a running link's delays.
#[derive(Clone)]
pub struct Link {
    a_to_b: Arc<Shaping>,
    b_to_a: Arc<Shaping>,
}

impl Link {
    /// Takes effect for packets that enter the path from now on; packets already on their
    /// way keep their delay, and none overtakes another.
    pub fn set_delay(&self, delay: Delay) {
        for (shaping, one_way) in [(&self.a_to_b, delay.a_to_b), (&self.b_to_a, delay.b_to_a)] {
            shaping
                .delay_us
                .store(one_way.as_micros() as u64, Ordering::Relaxed);
            shaping
                .jitter_us
                .store(delay.jitter.as_micros() as u64, Ordering::Relaxed);
        }
    }
}

/// The forwarding threads of one link; dropping it stops them and closes both TUN
/// descriptors, which removes the devices.
pub(crate) struct Forwarder {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Forwarder {
    pub(crate) fn start(a: File, b: File, delay: Delay) -> (Self, Link) {
        let link = Link {
            a_to_b: Shaping::new(delay.a_to_b, delay.jitter),
            b_to_a: Shaping::new(delay.b_to_a, delay.jitter),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let (a, b) = (Arc::new(a), Arc::new(b));
        let mut threads = Vec::new();
        for (from, to, shaping) in [(&a, &b, &link.a_to_b), (&b, &a, &link.b_to_a)] {
            let (tx, rx) = mpsc::channel();
            let (from, shaping, reader_stop) = (from.clone(), shaping.clone(), stop.clone());
            threads.push(thread::spawn(move || {
                read_side(&from, &shaping, &reader_stop, &tx)
            }));
            let (to, writer_stop) = (to.clone(), stop.clone());
            threads.push(thread::spawn(move || write_side(&to, &writer_stop, &rx)));
        }
        (Self { stop, threads }, link)
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A small xorshift generator: jitter needs spread, not quality, and no extra crate.
struct Jitter(u64);

impl Jitter {
    fn seeded() -> Self {
        Self(RandomState::new().hash_one(Instant::now()) | 1)
    }

    fn up_to(&mut self, max_us: u64) -> u64 {
        if max_us == 0 {
            return 0;
        }
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % (max_us + 1)
    }
}

/// Reads packets as they leave one end and queues each with the time it is due at the
/// other end.
fn read_side(
    from: &File,
    shaping: &Shaping,
    stop: &AtomicBool,
    tx: &mpsc::Sender<(Instant, Vec<u8>)>,
) {
    let mut jitter = Jitter::seeded();
    let mut last_due = Instant::now();
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        let mut pfd = libc::pollfd {
            fd: from.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut pfd, 1, POLL_MS) } <= 0 {
            continue;
        }
        let Ok(len) = (&*from).read(&mut buf) else {
            continue;
        };
        let extra = shaping.delay_us.load(Ordering::Relaxed)
            + jitter.up_to(shaping.jitter_us.load(Ordering::Relaxed));
        // A link keeps packet order, as a real link does, even when jitter or a shorter
        // new delay would let a later packet overtake.
        let due = (Instant::now() + Duration::from_micros(extra)).max(last_due);
        last_due = due;
        if tx.send((due, buf[..len].to_vec())).is_err() {
            break;
        }
    }
}

/// Hands each queued packet to the other end when it is due. The queue is in due order.
fn write_side(to: &File, stop: &AtomicBool, rx: &mpsc::Receiver<(Instant, Vec<u8>)>) {
    while let Ok((due, packet)) = rx.recv() {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        thread::sleep(due.saturating_duration_since(Instant::now()));
        // A device that is not up yet (or no longer) refuses packets: a lost packet,
        // which TCP repairs, as on a real link.
        let _ = (&*to).write(&packet);
    }
}
