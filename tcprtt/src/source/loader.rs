//! aya's loader, made without aya's own parse of the kernel's BTF where the kernel allows.
//!
//! aya 0.14's `EbpfLoader::new()`, its only constructor, reads and parses
//! `/sys/kernel/btf/vmlinux` before anything else: some 5 MB of file and several times that
//! once parsed, the largest part of tcprtt's start-up and its peak memory. tcprtt needs none
//! of it: its object has no CO-RE relocations (the offsets travel in its configuration), and
//! what it needs from the kernel's BTF it reads itself (`crate::btf`). aya gives up on that
//! parse quietly when the file cannot be read, so the loader is made in a thread of its own
//! that cannot read it. Whatever confines that thread ends with it: the rest of the process
//! never sees the file differently.

use std::{
    ffi::CStr,
    fs::File,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use aya::EbpfLoader;

/// The file aya's loader parses (`aya::Btf::from_sys_fs`).
const KERNEL_BTF: &str = "/sys/kernel/btf/vmlinux";
/// A root under which [`KERNEL_BTF`] does not exist, and which exists wherever it does.
const KERNEL_BTF_DIR: &CStr = c"/sys/kernel/btf";

/// How the loader was kept from the kernel's BTF, for `-v`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelBtf {
    /// A Landlock domain on the loader's thread denied it every file read. Needs no
    /// privilege, so it also serves a user with only CAP_BPF and CAP_PERFMON.
    Landlock,
    /// The loader's thread had a root of its own (`/sys/kernel/btf`), under which the path
    /// leads nowhere. Needs CAP_SYS_CHROOT: root on a kernel without Landlock.
    Chroot,
    /// Neither was possible: aya parsed the kernel's BTF.
    Parsed,
}

impl KernelBtf {
    pub fn describe(self) -> &'static str {
        match self {
            Self::Landlock => "kernel BTF kept from it by Landlock",
            Self::Chroot => "kernel BTF kept from it by chroot",
            Self::Parsed => "with its own parse of the kernel BTF",
        }
    }
}

/// An `EbpfLoader` holding no kernel BTF, made in a thread that cannot read it, or, where
/// no such thread can be made, a plain one (which parsed it: `.btf(None)` frees that).
pub fn new<'a>() -> (EbpfLoader<'a>, KernelBtf) {
    let confined = std::thread::Builder::new()
        .name("tcprtt-loader".into())
        .spawn(|| keep_kernel_btf_out().map(|how| (EbpfLoader::new(), how)))
        .ok()
        .and_then(|thread| thread.join().ok().flatten());
    confined.unwrap_or_else(|| (EbpfLoader::new(), KernelBtf::Parsed))
}

/// Confines the calling thread so it cannot read [`KERNEL_BTF`], and says how; `None` when
/// it still can. A confinement is judged by the file's failing to open, not by the calls'
/// success, so `-v` never claims one that does not hold.
fn keep_kernel_btf_out() -> Option<KernelBtf> {
    let unreadable = || File::open(KERNEL_BTF).is_err();
    if deny_file_reads().is_ok() && unreadable() {
        return Some(KernelBtf::Landlock);
    }
    if own_root().is_ok() && unreadable() {
        return Some(KernelBtf::Chroot);
    }
    None
}

/// `LANDLOCK_ACCESS_FS_READ_FILE` (linux/landlock.h).
const LANDLOCK_ACCESS_FS_READ_FILE: u64 = 1 << 2;

/// `struct landlock_ruleset_attr` as of Landlock ABI 1; later kernels accept this size.
#[repr(C)]
struct LandlockRulesetAttr {
    handled_access_fs: u64,
}

/// Puts the calling thread, and only it (`landlock_restrict_self` without
/// `LANDLOCK_RESTRICT_SELF_TSYNC`), in a Landlock domain that handles file reads and allows
/// none.
fn deny_file_reads() -> io::Result<()> {
    let attr = LandlockRulesetAttr {
        handled_access_fs: LANDLOCK_ACCESS_FS_READ_FILE,
    };
    // SAFETY: the kernel reads `size_of` bytes of `attr`, which lives across the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            &raw const attr,
            size_of::<LandlockRulesetAttr>(),
            0u32,
        )
    };
    let fd = i32::try_from(fd)
        .ok()
        .filter(|fd| *fd >= 0)
        .ok_or_else(io::Error::last_os_error)?;
    // SAFETY: a new descriptor the kernel just returned, owned by nothing else.
    let ruleset = unsafe { OwnedFd::from_raw_fd(fd) };
    // An unprivileged thread may only confine itself once it can gain no privileges; the
    // attribute is the thread's own and ends with it.
    // SAFETY: plain prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a valid ruleset descriptor and no flags.
    if unsafe { libc::syscall(libc::SYS_landlock_restrict_self, ruleset.as_raw_fd(), 0u32) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Gives the calling thread a root of its own, [`KERNEL_BTF_DIR`].
fn own_root() -> io::Result<()> {
    // Threads share one root unless a thread unshares its filesystem attributes; without
    // this, chroot would move every thread's root, so nothing is changed if it fails.
    // SAFETY: plain unshare of the calling thread's filesystem attributes.
    if unsafe { libc::unshare(libc::CLONE_FS) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a NUL-terminated path.
    if unsafe { libc::chroot(KERNEL_BTF_DIR.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
