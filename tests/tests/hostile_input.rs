//! Files a hostile or careless user can pass as --btf: endless devices, FIFOs nobody
//! writes, huge files, and BTF crafted to send a type walk in circles. Each ends the run
//! at once with one line and exit 1; none hangs, exhausts memory or crashes.

use std::{
    ffi::CString,
    fs,
    os::unix::{ffi::OsStrExt, process::CommandExt},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use tcprtt_tests::kit::{Finished, bin, run_within};

/// The contract: a bad --btf file is refused within this long (no read without bound,
/// no open that waits for a writer).
const PROMPT: Duration = Duration::from_secs(2);

/// Address space allowed to tcprtt here: ample for a refusal, and a binary that read
/// /dev/zero without bound fails fast instead of eating the machine's memory.
const ADDRESS_SPACE: u64 = 1 << 30;

/// A scratch directory of this test process, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("tcprtt-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir(&dir).expect("scratch directory");
        Self(dir)
    }

    fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// tcprtt --btf `path` -d 1, with its address space bounded, ended (and failed) if it
/// takes longer than [`PROMPT`].
fn run_with_btf(path: &Path) -> Finished {
    let mut command = Command::new(bin());
    command.arg("--btf").arg(path).args(["-d", "1"]);
    // SAFETY: setrlimit is async-signal-safe and touches only the child.
    unsafe {
        command.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: ADDRESS_SPACE,
                rlim_max: ADDRESS_SPACE,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &limit) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    run_within(command, PROMPT)
}

#[test]
fn a_device_or_a_fifo_as_btf_is_refused_at_once() {
    let scratch = Scratch::new("fifo");
    let fifo = scratch.path("btf.fifo");
    let c_path = CString::new(fifo.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    let rc = unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) };
    assert_eq!(rc, 0, "mkfifo: {}", std::io::Error::last_os_error());
    let wrong: Vec<String> = [Path::new("/dev/zero"), &fifo]
        .iter()
        .filter_map(|path| {
            let why = run_with_btf(path).one_line_error_mismatch(1, "not a regular file")?;
            Some(format!("--btf {}: {why}", path.display()))
        })
        .collect();
    assert!(wrong.is_empty(), "{wrong:#?}");
}

#[test]
fn a_btf_file_larger_than_64_mib_is_refused_without_reading_it() {
    let scratch = Scratch::new("huge-btf");
    let huge = scratch.path("vmlinux");
    // Sparse: 100 MiB long, no disk used.
    fs::File::create(&huge)
        .and_then(|f| f.set_len(100 << 20))
        .expect("a sparse file");
    run_with_btf(&huge).assert_one_line_error("--btf <100 MiB file>", 1, "larger than 64 MiB");
}

const KIND_INT: u32 = 1;
const KIND_STRUCT: u32 = 4;

/// A little-endian BTF blob written field by field, as the kernel lays it out.
struct Btf {
    types: Vec<u8>,
    strings: Vec<u8>,
    next_id: u32,
}

impl Btf {
    fn new() -> Self {
        Self {
            types: Vec::new(),
            strings: vec![0],
            next_id: 1,
        }
    }

    fn name(&mut self, s: &str) -> u32 {
        if s.is_empty() {
            return 0;
        }
        let off = self.strings.len() as u32;
        self.strings.extend_from_slice(s.as_bytes());
        self.strings.push(0);
        off
    }

    fn words(&mut self, words: &[u32]) {
        for w in words {
            self.types.extend_from_slice(&w.to_le_bytes());
        }
    }

    fn id(&mut self) -> u32 {
        self.next_id += 1;
        self.next_id - 1
    }

    fn int(&mut self) -> u32 {
        let n = self.name("int");
        self.words(&[n, KIND_INT << 24, 4, 32]);
        self.id()
    }

    /// A struct of `size` bytes; members are (name, type id, bit offset).
    fn structure(&mut self, name: &str, size: u32, members: &[(&str, u32, u32)]) -> u32 {
        let n = self.name(name);
        self.words(&[n, (KIND_STRUCT << 24) | members.len() as u32, size]);
        for &(member, ty, bits) in members {
            let m = self.name(member);
            self.words(&[m, ty, bits]);
        }
        self.id()
    }

    fn bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&0xeb9f_u16.to_le_bytes());
        out.push(1); // version
        out.push(0); // flags
        let type_len = self.types.len() as u32;
        for w in [24, 0, type_len, type_len, self.strings.len() as u32] {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out.extend_from_slice(&self.types);
        out.extend_from_slice(&self.strings);
        out
    }
}

/// The members tcprtt reads from `struct sock`, all ints, at made-up offsets.
fn sock_common(btf: &mut Btf, int: u32) -> u32 {
    let fields = [
        "skc_family",
        "skc_rcv_saddr",
        "skc_daddr",
        "skc_v6_rcv_saddr",
        "skc_v6_daddr",
        "skc_num",
        "skc_dport",
    ];
    let members: Vec<(&str, u32, u32)> = fields
        .iter()
        .enumerate()
        .map(|(i, f)| (*f, int, 32 * i as u32))
        .collect();
    btf.structure("sock_common", 64, &members)
}

/// Type ids are assigned in order, so a struct can name its own id (or one still to
/// come) as a member's type: the cycles a hostile file can hold.
fn crafted() -> Vec<(&'static str, Vec<u8>)> {
    let mut cases = Vec::new();

    // struct sock { struct sock; } and a tcp_sock that is fine.
    let mut btf = Btf::new();
    let int = btf.int();
    let own = btf.next_id;
    btf.structure("sock", 8, &[("", own, 0)]);
    btf.structure("tcp_sock", 8, &[("srtt_us", int, 0)]);
    cases.push(("sock holding itself", btf.bytes()));

    // struct tcp_sock { struct tcp_sock; } and struct sock { struct tcp_sock; }.
    let mut btf = Btf::new();
    btf.int();
    let own = btf.next_id;
    btf.structure("tcp_sock", 8, &[("", own, 0)]);
    btf.structure("sock", 8, &[("", own, 0)]);
    cases.push(("tcp_sock holding itself", btf.bytes()));

    // struct sock { struct a; } struct a { struct sock; }: a cycle of two.
    let mut btf = Btf::new();
    let int = btf.int();
    let sock = btf.next_id;
    btf.structure("sock", 8, &[("", sock + 1, 0)]);
    btf.structure("a", 8, &[("", sock, 0)]);
    btf.structure("tcp_sock", 8, &[("srtt_us", int, 0)]);
    cases.push(("sock and a holding each other", btf.bytes()));

    // No cycle, but 200,000 anonymous structs nested in each other above a sock_common
    // that lacks nothing: a walk without a depth bound runs out of stack.
    let mut btf = Btf::new();
    let int = btf.int();
    let common = sock_common(&mut btf, int);
    let mut inner = btf.structure("", 64, &[("__sk_common", common, 0)]);
    for _ in 0..200_000 {
        inner = btf.structure("", 64, &[("", inner, 0)]);
    }
    btf.structure("sock", 64, &[("", inner, 0)]);
    btf.structure("tcp_sock", 64, &[("srtt_us", int, 0)]);
    cases.push(("sock nested 200,000 deep", btf.bytes()));

    cases
}

#[test]
fn crafted_btf_with_cyclic_or_bottomless_types_is_one_line_and_exit_1() {
    let scratch = Scratch::new("crafted-btf");
    let path = scratch.path("vmlinux");
    let wrong: Vec<String> = crafted()
        .into_iter()
        .filter_map(|(what, bytes)| {
            fs::write(&path, bytes).expect("writing the crafted BTF");
            let why = run_with_btf(&path).one_line_error_mismatch(1, "BTF")?;
            Some(format!("{what}: {why}"))
        })
        .collect();
    assert!(wrong.is_empty(), "{wrong:#?}");
}
