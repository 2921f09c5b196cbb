//! aya's loader kept from the kernel's BTF (tcprtt/src/source/loader.rs): each way of
//! making it (Landlock, a chroot, aya's own parse) is taken when it should be, each still
//! traces, and the confinement stays in the thread that made the loader: no other thread
//! of tcprtt, and nothing on the host, ever sees /sys/kernel/btf/vmlinux differently.

use std::{
    os::unix::process::CommandExt,
    process::{Command, Stdio},
    time::Duration,
};

use tcprtt_tests::kit::{
    EchoServer, Finished, Tracer, as_nobody, bin, parse_histograms, ping_pong, sock_addr,
};

const KERNEL_BTF: &str = "/sys/kernel/btf/vmlinux";

/// What `-v` says of each way.
const LANDLOCK: &str = "(kernel BTF kept from it by Landlock)";
const CHROOT: &str = "(kernel BTF kept from it by chroot)";
const PARSED: &str = "(with its own parse of the kernel BTF)";

/// Whether the running kernel offers Landlock, asked the way its documentation says
/// (`LANDLOCK_CREATE_RULESET_VERSION`): the ABI version, or an error.
fn kernel_has_landlock() -> bool {
    const LANDLOCK_CREATE_RULESET_VERSION: u32 = 1;
    // SAFETY: with this flag the kernel reads neither pointer nor size.
    let abi = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    abi >= 1
}

/// Makes `command`'s process (and what it execs) get ENOSYS from
/// `landlock_create_ruleset`, as on a kernel without Landlock. Run as root, so the
/// filter needs no `no_new_privs`, which would show in the threads' status.
fn without_landlock(command: &mut Command) {
    let nr = u32::try_from(libc::SYS_landlock_create_ruleset).expect("a syscall number");
    let filter = [
        // The syscall number: the first word of `struct seccomp_data`.
        libc::sock_filter {
            code: (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16,
            jt: 0,
            jf: 0,
            k: 0,
        },
        libc::sock_filter {
            code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
            jt: 0,
            jf: 1,
            k: nr,
        },
        libc::sock_filter {
            code: (libc::BPF_RET | libc::BPF_K) as u16,
            jt: 0,
            jf: 0,
            k: libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32,
        },
        libc::sock_filter {
            code: (libc::BPF_RET | libc::BPF_K) as u16,
            jt: 0,
            jf: 0,
            k: libc::SECCOMP_RET_ALLOW,
        },
    ];
    // SAFETY: prctl is async-signal-safe; the program it reads lives in the closure,
    // which outlives the call.
    unsafe {
        command.pre_exec(move || {
            let prog = libc::sock_fprog {
                len: filter.len() as u16,
                filter: filter.as_ptr().cast_mut(),
            };
            if libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &raw const prog,
            ) == 0
            {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
}

/// tcprtt with `args`, as this (root) process.
fn as_root(args: &[&str]) -> Command {
    let mut command = Command::new(bin());
    command.args(args);
    command
}

/// Every thread of a running tcprtt: its root is the host's `/`, it may gain privileges
/// as before (no `no_new_privs`, which Landlock needs), it reads the same kernel BTF as
/// this process, and the loader's thread is gone.
fn assert_no_thread_confined(pid: i32) {
    let host_btf = std::fs::read(KERNEL_BTF).expect("reading the kernel's BTF");
    let tasks: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("listing tcprtt's threads")
        .map(|t| t.expect("a thread").path())
        .collect();
    assert!(!tasks.is_empty());
    for task in tasks {
        let comm = std::fs::read_to_string(task.join("comm")).expect("comm");
        assert_ne!(
            comm.trim(),
            "tcprtt-loader",
            "the loader's thread outlived it"
        );
        let root = std::fs::read_link(task.join("root")).expect("a thread's root");
        assert_eq!(root.to_str(), Some("/"), "{}", task.display());
        let status = std::fs::read_to_string(task.join("status")).expect("status");
        assert!(
            status.lines().any(|l| l == "NoNewPrivs:\t0"),
            "{}: {status}",
            task.display()
        );
        let seen = std::fs::read(task.join("root").join(&KERNEL_BTF[1..]))
            .expect("the kernel's BTF through the thread's root");
        assert!(seen == host_btf, "{} sees another BTF", task.display());
    }
}

/// Runs `command` (tcprtt with `-v`, matching `127.14.<net>.1`), checks its threads while
/// it traces, drives round trips, and returns its `-v` line once it ended on SIGINT.
fn trace(command: Command, net: u8) -> String {
    let server = format!("127.14.{net}.1");
    let srv = EchoServer::on(&server);
    let t = Tracer::start_command(command);
    assert_no_thread_confined(t.pid());
    ping_pong(sock_addr(&format!("127.14.{net}.2"), 0), srv.addr, 50);
    let out: Finished = t.stop_with(libc::SIGINT);
    assert!(out.status.success(), "{out:?}");
    assert!(parse_histograms(&out.stdout)[0].count() > 0, "{out:?}");
    out.stderr
        .lines()
        .find(|l| l.contains("start-up "))
        .unwrap_or_else(|| panic!("no start-up in -v's report: {}", out.stderr))
        .to_string()
}

/// `-v`, tracing one echo server's connections.
fn verbose_on(server: &str) -> [&str; 4] {
    ["-v", "-A", server, "-e"]
}

#[test]
fn root_keeps_the_kernel_btf_from_the_loader_and_no_other_thread_is_confined() {
    let line = trace(as_root(&verbose_on("127.14.1.1")), 1);
    let way = if kernel_has_landlock() {
        LANDLOCK
    } else {
        CHROOT
    };
    assert!(line.contains(way), "{line}");
}

#[test]
fn root_without_landlock_confines_the_loader_thread_with_a_chroot_of_its_own() {
    let mut command = as_root(&verbose_on("127.14.2.1"));
    without_landlock(&mut command);
    let line = trace(command, 2);
    assert!(line.contains(CHROOT), "{line}");
}

#[test]
fn a_user_with_only_bpf_and_perfmon_keeps_it_out_with_landlock_or_lets_aya_parse_it() {
    let line = trace(as_nobody("+bpf,+perfmon", &verbose_on("127.14.3.1")), 3);
    let way = if kernel_has_landlock() {
        LANDLOCK
    } else {
        PARSED
    };
    assert!(line.contains(way), "{line}");

    // Without Landlock such a user may not chroot either: aya parses the BTF, and
    // tcprtt still traces.
    let mut command = as_nobody("+bpf,+perfmon", &verbose_on("127.14.4.1"));
    without_landlock(&mut command);
    let line = trace(command, 4);
    assert!(line.contains(PARSED), "{line}");
}

/// The host's mounts on the kernel's BTF (none, unless someone else made one).
fn mounts_on_kernel_btf() -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .expect("reading mountinfo")
        .lines()
        .filter(|l| l.contains("/sys/kernel/btf"))
        .map(str::to_string)
        .collect()
}

#[test]
fn runs_ended_any_way_leave_the_hosts_kernel_btf_as_it_was() {
    let (mounts, btf) = (mounts_on_kernel_btf(), std::fs::read(KERNEL_BTF).unwrap());
    // Ended by SIGINT, by SIGKILL while tracing, and by SIGKILL at points across its
    // start-up (the loader's thread runs some 5 to 15 ms in), each with and without
    // Landlock.
    for landlock in [true, false] {
        let with = |command: &mut Command| {
            if !landlock {
                without_landlock(command);
            }
        };
        let mut command = as_root(&["-d", "0.05"]);
        with(&mut command);
        let out = command.output().expect("running tcprtt");
        assert!(out.status.success(), "{out:?}");

        let mut command = as_root(&[]);
        with(&mut command);
        let t = Tracer::start_command(command);
        let out = t.stop_with(libc::SIGKILL);
        assert_eq!(out.status.code(), None, "{out:?}");

        for ms in (2..=22).step_by(4) {
            let mut command = as_root(&[]);
            with(&mut command);
            let mut child = command
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("starting tcprtt");
            std::thread::sleep(Duration::from_millis(ms));
            child.kill().expect("SIGKILL");
            child.wait().expect("reaping tcprtt");
        }

        assert_eq!(mounts_on_kernel_btf(), mounts);
        assert!(std::fs::read(KERNEL_BTF).unwrap() == btf);
    }
}
