//! Where samples come from. A source owns its eBPF programs and maps and hands over what
//! they measured as report rows.

pub mod double_buffer;
mod loader;
pub mod srtt;
pub mod wire;

use anyhow::{Context, Result, anyhow};
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, LpmTrie, lpm_trie::Key},
};
use ipnet::IpNet;
use tcprtt_common::{FILTER_KEY_LEN, family};

use crate::{
    cli::{Options, is_ipv4_prefix},
    report::{ALL_TRAFFIC, Losses, Row},
};

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
    /// Everything measured since the previous call, the kernel's maps emptied. Called at
    /// least every `tcprtt_common::DRAIN_PERIOD_SECS`.
    fn take(&mut self) -> Result<Taken>;
    /// The `-v` summary: what the programs saw and, with run-time statistics on, what they
    /// cost.
    fn self_report(&self, stats_on: bool) -> Result<String>;
    /// A line for stderr at the end of the run, when the source has something to say
    /// without -v (why nothing could be measured, samples it had to give up).
    fn farewell(&self) -> Result<Option<String>> {
        Ok(None)
    }
}

/// Loads `object` with `loader`'s settings, the histogram and filter maps sized for
/// `opts`, and fills the filters.
pub fn load_with_filters(
    loader: &mut EbpfLoader<'_>,
    opts: &Options,
    object: &[u8],
) -> Result<Ebpf> {
    // Without a grouping the srtt programs use the all-traffic array; the wire programs
    // still key by interface and side.
    let hist_entries = if opts.grouping != ALL_TRAFFIC {
        opts.max_keys
    } else if opts.passive.is_empty() {
        1
    } else {
        2 * opts.passive.len() as u32
    };
    // A map needs at least one entry even when its filter is unused.
    let len = |n: usize| n.max(1) as u32;
    let (fine_entries, log2_entries) = if opts.keeps_detail() {
        (hist_entries, 1)
    } else {
        (1, hist_entries)
    };
    let mut ebpf = loader
        .map_max_entries("HIST0", fine_entries)
        .map_max_entries("HIST1", fine_entries)
        .map_max_entries("LOG2_HIST0", log2_entries)
        .map_max_entries("LOG2_HIST1", log2_entries)
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
    Ok(ebpf)
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

/// The key an address prefix is stored under: a family tag, then the address with IPv4 in
/// its IPv4-mapped IPv6 form (see `FILTER_KEY_LEN`). An IPv4-mapped IPv6 prefix is IPv4.
pub fn filter_key(net: &IpNet) -> Key<[u8; FILTER_KEY_LEN]> {
    let (addr, bits) = match net {
        IpNet::V4(v4) => (v4.addr().to_ipv6_mapped(), 96 + u32::from(v4.prefix_len())),
        IpNet::V6(v6) => (v6.addr(), u32::from(v6.prefix_len())),
    };
    let tag = if is_ipv4_prefix(net) {
        family::V4
    } else {
        family::V6
    };
    let mut data = [0; FILTER_KEY_LEN];
    data[0] = tag as u8;
    data[4..].copy_from_slice(&addr.octets());
    Key::new(32 + bits, data)
}

/// Stores address prefixes in the LPM-trie filter map `name`.
fn fill_prefixes(ebpf: &mut Ebpf, name: &str, nets: &[IpNet]) -> Result<()> {
    let mut trie: LpmTrie<_, [u8; FILTER_KEY_LEN], u8> = LpmTrie::try_from(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_tagged_with_their_family() {
        let k = filter_key(&"127.0.0.0/8".parse().unwrap());
        assert_eq!(k.prefix_len(), 32 + 104);
        assert_eq!(k.data()[..4], [4, 0, 0, 0]);
        assert_eq!(k.data()[14..17], [0xff, 0xff, 127]);
        let k = filter_key(&"::ffff:127.0.0.0/104".parse().unwrap());
        assert_eq!(
            (k.prefix_len(), k.data()),
            (32 + 104, filter_key(&"127.0.0.0/8".parse().unwrap()).data())
        );
        let k = filter_key(&"2001:db8::/32".parse().unwrap());
        assert_eq!(k.prefix_len(), 32 + 32);
        assert_eq!(k.data()[..8], [6, 0, 0, 0, 0x20, 0x01, 0x0d, 0xb8]);
        let k = filter_key(&"::/0".parse().unwrap());
        assert_eq!((k.prefix_len(), k.data()[0]), (32, 6));
    }
}
