//! Where samples come from. A source owns its eBPF programs and maps and hands over what
//! they measured as report rows.

pub mod double_buffer;
pub mod srtt;

use anyhow::{Context, Result, anyhow};
use aya::{
    Ebpf,
    maps::{HashMap, LpmTrie, lpm_trie::Key},
};
use ipnet::IpNet;

use crate::report::{Losses, Row};

/// What a source measured over one interval.
pub struct Taken {
    pub rows: Vec<Row>,
    pub losses: Losses,
}

/// A measurement source, driven by main's loop.
pub trait Source {
    /// The first line on stderr, saying what is traced and how.
    fn banner(&self) -> String;
    /// The hook the samples come from, as JSON names it.
    fn hook(&self) -> &'static str;
    /// Moves what the kernel recorded into userspace; called at least every
    /// `tcprtt_common::DRAIN_PERIOD_SECS`.
    fn drain(&mut self) -> Result<()>;
    /// Everything measured since the previous call.
    fn take(&mut self) -> Result<Taken>;
    /// The `-v` summary: what the programs saw and, with run-time statistics, their cost.
    fn self_report(&self) -> Result<String>;
}

/// A map of the loaded object, as the aya type `T`.
pub fn take_map<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
    ebpf: &mut Ebpf,
    name: &str,
) -> Result<T> {
    let map = ebpf
        .take_map(name)
        .ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))?;
    T::try_from(map).with_context(|| format!("opening map {name}"))
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

/// Stores address prefixes in the LPM-trie filter map `name`.
pub fn fill_prefixes(ebpf: &mut Ebpf, name: &str, nets: &[IpNet]) -> Result<()> {
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

/// Stores ports in the hash filter map `name`.
pub fn fill_ports(ebpf: &mut Ebpf, name: &str, ports: &[u16]) -> Result<()> {
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
}
