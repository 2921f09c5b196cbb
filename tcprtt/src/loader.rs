//! Loading the eBPF object with its configuration, filling the filter maps and attaching.

use std::{
    fmt, io,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, anyhow, bail};
use aya::{
    Btf, Ebpf, EbpfLoader, Endianness,
    maps::{HashMap, LpmTrie, lpm_trie::Key},
    programs::{BtfTracePoint, FEntry, ProgramError},
};
use ipnet::IpNet;
use tcprtt_common::{ProbeConfig, filter, group};

use crate::{
    btf::KernelBtf,
    cli::{Attach, Family, GroupBy, Options},
};

const DEFAULT_BTF: &str = "/sys/kernel/btf/vmlinux";

/// The hook the program ended up on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachPoint {
    Fentry,
    TpBtf,
}

impl AttachPoint {
    /// The program's name in the eBPF object.
    pub fn program_name(self) -> &'static str {
        match self {
            Self::Fentry => "tcprtt_fentry",
            Self::TpBtf => "tcprtt_tp_btf",
        }
    }

    /// The name used in JSON output.
    pub fn short_name(self) -> &'static str {
        match self {
            Self::Fentry => "fentry",
            Self::TpBtf => "tp_btf",
        }
    }
}

impl fmt::Display for AttachPoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Fentry => "fentry/tcp_rcv_established",
            Self::TpBtf => "tp_btf/tcp_probe",
        })
    }
}

pub struct Probe {
    pub ebpf: Ebpf,
    pub attach_point: AttachPoint,
    /// Why fentry was not used, when `--attach auto` fell back to tp_btf.
    pub fallback_reason: Option<String>,
}

/// The kernel's words for an errno, without Rust's "(os error N)" suffix.
fn errno_text(err: &io::Error) -> String {
    let text = err.to_string();
    match text.find(" (os error") {
        Some(cut) => text[..cut].to_string(),
        None => text,
    }
}

/// The reason a program could not be loaded or attached, in one short phrase.
fn refusal(err: &ProgramError) -> String {
    match err {
        ProgramError::LoadError { io_error, .. } => errno_text(io_error),
        ProgramError::SyscallError(e) => errno_text(&e.io_error),
        other => other.to_string(),
    }
}

/// The key an address prefix is stored under: IPv4 goes in its IPv4-mapped IPv6 form.
pub fn filter_key(net: &IpNet) -> Key<[u8; 16]> {
    match net {
        IpNet::V4(v4) => Key::new(
            96 + u32::from(v4.prefix_len()),
            v4.addr().to_ipv6_mapped().octets(),
        ),
        IpNet::V6(v6) => Key::new(u32::from(v6.prefix_len()), v6.addr().octets()),
    }
}

/// The program's read-only configuration for these options.
pub fn probe_config(opts: &Options, offsets: ProbeConfig) -> ProbeConfig {
    let mut filters = 0;
    for (set, flag) in [
        (!opts.laddr.is_empty(), filter::LADDR),
        (!opts.raddr.is_empty(), filter::RADDR),
        (!opts.lport.is_empty(), filter::LPORT),
        (!opts.rport.is_empty(), filter::RPORT),
    ] {
        if set {
            filters |= flag;
        }
    }
    ProbeConfig {
        filters,
        family: match opts.family {
            Family::Any => 0,
            Family::V4 => 4,
            Family::V6 => 6,
        },
        group_by: match opts.group_by {
            GroupBy::None => group::NONE,
            GroupBy::LocalAddr => group::LADDR,
            GroupBy::RemoteAddr => group::RADDR,
            GroupBy::LocalPort => group::LPORT,
            GroupBy::RemotePort => group::RPORT,
            GroupBy::Flow => group::FLOW,
        },
        milliseconds: u32::from(opts.milliseconds),
        ..offsets
    }
}

fn btf_path(opts: &Options) -> Result<PathBuf> {
    match &opts.btf {
        Some(path) if path.exists() => Ok(path.clone()),
        Some(path) => bail!("--btf {}: no such file", path.display()),
        None if Path::new(DEFAULT_BTF).exists() => Ok(DEFAULT_BTF.into()),
        None => bail!(
            "this kernel exposes no BTF ({DEFAULT_BTF} is missing; it needs CONFIG_DEBUG_INFO_BTF): \
             pass --btf FILE with the BTF of the running kernel"
        ),
    }
}

/// Fails early, with the fix, when this process cannot load BPF programs.
pub fn check_privileges() -> Result<()> {
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_PERFMON: u32 = 38;
    const CAP_BPF: u32 = 39;
    let status = std::fs::read_to_string("/proc/self/status")
        .context("reading /proc/self/status to check capabilities")?;
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .ok_or_else(|| anyhow!("no CapEff line in /proc/self/status"))?;
    let has = |cap: u32| effective & (1 << cap) != 0;
    if has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON)) {
        Ok(())
    } else {
        bail!(
            "tcprtt needs root (or CAP_BPF and CAP_PERFMON) to load its eBPF program: run it with sudo"
        )
    }
}

fn fill_prefixes(ebpf: &mut Ebpf, name: &str, nets: &[IpNet]) -> Result<()> {
    let mut trie: LpmTrie<_, [u8; 16], u8> = LpmTrie::try_from(
        ebpf.map_mut(name)
            .ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))?,
    )?;
    for net in nets {
        trie.insert(&filter_key(net), 1, 0)
            .with_context(|| format!("adding {net} to the {name} filter"))?;
    }
    Ok(())
}

fn fill_ports(ebpf: &mut Ebpf, name: &str, ports: &[u16]) -> Result<()> {
    let mut map: HashMap<_, u16, u8> = HashMap::try_from(
        ebpf.map_mut(name)
            .ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))?,
    )?;
    for port in ports {
        map.insert(port, 1, 0)
            .with_context(|| format!("adding port {port} to the {name} filter"))?;
    }
    Ok(())
}

/// Loads and attaches the program for `point`; the error is the kernel's reason.
fn attach_at(ebpf: &mut Ebpf, point: AttachPoint, btf: &Btf) -> Result<(), String> {
    let name = point.program_name();
    let prog = ebpf
        .program_mut(name)
        .ok_or_else(|| format!("program {name} missing from the eBPF object"))?;
    let attached = match point {
        AttachPoint::Fentry => {
            let p: &mut FEntry = prog.try_into().map_err(|e: ProgramError| e.to_string())?;
            p.load("tcp_rcv_established", btf)
                .and_then(|()| p.attach().map(drop))
        }
        AttachPoint::TpBtf => {
            let p: &mut BtfTracePoint = prog.try_into().map_err(|e: ProgramError| e.to_string())?;
            p.load("tcp_probe", btf).and_then(|()| p.attach().map(drop))
        }
    };
    attached.map_err(|e| refusal(&e))
}

/// Loads `object`, fills the filters and attaches at the hook `opts.attach` asks for.
pub fn load(opts: &Options, object: &[u8]) -> Result<Probe> {
    let path = btf_path(opts)?;
    let offsets = KernelBtf::from_file(&path)?
        .probe_offsets()
        .context("resolving socket field offsets from BTF")?;
    let btf = Btf::parse_file(&path, Endianness::default())
        .with_context(|| format!("parsing BTF in {}", path.display()))?;
    let config = probe_config(opts, offsets);
    let hist_entries = if opts.group_by == GroupBy::None {
        1
    } else {
        opts.max_keys
    };
    let len = |n: usize| (n.max(1)) as u32;
    let mut ebpf = EbpfLoader::new()
        .btf(Some(&btf))
        .override_global("CONFIG", &config, true)
        .map_max_entries("HIST0", hist_entries)
        .map_max_entries("HIST1", hist_entries)
        .map_max_entries("LADDRS", len(opts.laddr.len()))
        .map_max_entries("RADDRS", len(opts.raddr.len()))
        .map_max_entries("LPORTS", len(opts.lport.len()))
        .map_max_entries("RPORTS", len(opts.rport.len()))
        .load(object)
        .context("loading the eBPF object into the kernel")?;
    fill_prefixes(&mut ebpf, "LADDRS", &opts.laddr)?;
    fill_prefixes(&mut ebpf, "RADDRS", &opts.raddr)?;
    fill_ports(&mut ebpf, "LPORTS", &opts.lport)?;
    fill_ports(&mut ebpf, "RPORTS", &opts.rport)?;

    let (attach_point, fallback_reason) = match opts.attach {
        Attach::Fentry => {
            attach_at(&mut ebpf, AttachPoint::Fentry, &btf).map_err(|why| {
                anyhow!(
                    "the kernel refused fentry/tcp_rcv_established ({why}): try --attach tp-btf"
                )
            })?;
            (AttachPoint::Fentry, None)
        }
        Attach::TpBtf => {
            attach_at(&mut ebpf, AttachPoint::TpBtf, &btf)
                .map_err(|why| anyhow!("the kernel refused tp_btf/tcp_probe ({why})"))?;
            (AttachPoint::TpBtf, None)
        }
        Attach::Auto => match attach_at(&mut ebpf, AttachPoint::Fentry, &btf) {
            Ok(()) => (AttachPoint::Fentry, None),
            Err(fentry_why) => {
                attach_at(&mut ebpf, AttachPoint::TpBtf, &btf).map_err(|why| {
                    anyhow!(
                        "the kernel refused both hooks: fentry/tcp_rcv_established ({fentry_why}) \
                         and tp_btf/tcp_probe ({why})"
                    )
                })?;
                (
                    AttachPoint::TpBtf,
                    Some(format!("fentry refused: {fentry_why}")),
                )
            }
        },
    };
    Ok(Probe {
        ebpf,
        attach_point,
        fallback_reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_prefixes_become_ipv4_mapped_keys() {
        let k = filter_key(&"127.0.0.0/8".parse().unwrap());
        assert_eq!(k.prefix_len(), 104);
        assert_eq!(k.data()[10..13], [0xff, 0xff, 127]);
        let k = filter_key(&"2001:db8::/32".parse().unwrap());
        assert_eq!(k.prefix_len(), 32);
        assert_eq!(k.data()[..4], [0x20, 0x01, 0x0d, 0xb8]);
    }

    #[test]
    fn errno_text_drops_the_os_error_suffix() {
        assert_eq!(
            errno_text(&io::Error::from_raw_os_error(1)),
            "Operation not permitted"
        );
    }
}
