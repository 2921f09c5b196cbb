//! Struct member offsets from the running kernel's BTF.
//!
//! aya's `Btf` does not expose member offsets, and the permissive-licensed parsers are
//! larger than what tcprtt needs, so this is a small reader for the BTF type section: just
//! enough to walk structs and unions, including the anonymous ones the kernel nests its
//! socket fields in.

use std::{
    fs::{File, OpenOptions},
    io::Read,
    ops::Deref,
    os::{
        fd::AsRawFd,
        unix::fs::{FileTypeExt, OpenOptionsExt},
    },
    path::Path,
    ptr::NonNull,
};

use anyhow::{Context, Result, anyhow, bail, ensure};
use aya_obj::btf::{BtfType, Func, FuncLinkage};

/// The largest BTF file tcprtt reads. A kernel's own BTF is a few MiB (5.3 MiB for
/// the 6.18 kernel of the development machines); a file larger than this is not one.
pub const MAX_BTF_BYTES: u64 = 64 << 20;

/// How deep anonymous structs and unions may nest. The kernel nests its socket fields two
/// or three levels deep; a deeper or cyclic nesting is a malformed file.
const MAX_NESTING: usize = 16;

const MAGIC: u16 = 0xeb9f;

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

/// One member of a struct or union, decoded from the type section when a lookup needs it.
#[derive(Debug, Clone, Copy)]
struct Member {
    name_off: u32,
    type_id: u32,
    bit_offset: u32,
    bitfield_size: u32,
}

/// An index over one BTF blob: where each type starts, nothing decoded. A kernel's BTF
/// holds over 100,000 types and tcprtt looks inside a handful, so decoding happens only in
/// the lookups; the index costs 4 bytes a type and borrows the blob.
#[derive(Debug)]
pub struct KernelBtf<'a> {
    types: &'a [u8],
    strings: &'a [u8],
    /// Byte offset of each type in `types`, indexed by BTF type id; id 0 is `void` and has
    /// no entry of its own (its slot holds 0 and is never read).
    starts: Vec<u32>,
}

fn u16_at(data: &[u8], at: usize) -> Result<u16> {
    let bytes = data
        .get(at..at + 2)
        .ok_or_else(|| anyhow!("BTF truncated at byte {at}"))?;
    Ok(u16::from_le_bytes([bytes[0], bytes[1]]))
}

fn u32_at(data: &[u8], at: usize) -> Result<u32> {
    let bytes = data
        .get(at..at + 4)
        .ok_or_else(|| anyhow!("BTF truncated at byte {at}"))?;
    Ok(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
}

/// The 12 bytes every BTF type starts with, and where the rest of it starts.
#[derive(Debug, Clone, Copy)]
struct Header {
    name_off: u32,
    info: u32,
    size_or_type: u32,
    payload: usize,
}

fn kind_of(info: u32) -> u32 {
    (info >> 24) & 0x1f
}

/// The member or entry count.
fn vlen_of(info: u32) -> usize {
    (info & 0xffff) as usize
}

impl Header {
    fn kind(self) -> u32 {
        kind_of(self.info)
    }
    fn vlen(self) -> usize {
        vlen_of(self.info)
    }
    /// Set on a struct or union whose member offsets carry bit-field sizes.
    fn kind_flag(self) -> bool {
        self.info >> 31 == 1
    }
}

/// The NUL-terminated string at `offset`, without its NUL; empty when out of range.
fn c_str_at(strings: &[u8], offset: u32) -> &[u8] {
    let tail = strings.get(offset as usize..).unwrap_or_default();
    &tail[..tail.iter().position(|b| *b == 0).unwrap_or(tail.len())]
}

/// Bytes that follow the 12-byte common header of a type of `kind`.
fn payload_len(kind: u32, vlen: usize) -> usize {
    match kind {
        KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
        KIND_ARRAY => 12,
        KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => vlen * 12,
        KIND_ENUM | KIND_FUNC_PROTO => vlen * 8,
        _ => 0,
    }
}

/// A BTF file's bytes, mapped or read.
#[derive(Debug)]
pub enum Bytes {
    /// The kernel's own BTF, mapped read-only from sysfs (Linux 6.16 and later allow it):
    /// no copy made and no memory of the process's own, where a read takes over a thousand
    /// page-sized calls and as many MiB as the file has.
    Mapped {
        start: NonNull<u8>,
        len: usize,
    },
    Read(Vec<u8>),
}

impl Deref for Bytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            // SAFETY: a live read-only mapping of `len` bytes (unmapped only on drop) of a
            // file the kernel never changes.
            Self::Mapped { start, len } => unsafe {
                std::slice::from_raw_parts(start.as_ptr(), *len)
            },
            Self::Read(data) => data,
        }
    }
}

impl Drop for Bytes {
    fn drop(&mut self) {
        if let Self::Mapped { start, len } = self {
            // SAFETY: the mapping made in `map_kernel_btf`, which no slice outlives.
            unsafe { libc::munmap(start.as_ptr().cast(), *len) };
        }
    }
}

/// `SYSFS_MAGIC` (linux/magic.h): the file system of /sys/kernel/btf.
const SYSFS_MAGIC: libc::c_long = 0x6265_6572;

/// `len` bytes of `file` mapped read-only, if it is on sysfs (where BTF is the kernel's own
/// and never changes) and the kernel maps it. Another file could shrink under the mapping
/// and fault tcprtt's reads, so it is read instead.
fn map_kernel_btf(file: &File, len: u64) -> Option<Bytes> {
    let len = usize::try_from(len).ok().filter(|len| *len > 0)?;
    // SAFETY: statfs is plain data, filled by the kernel.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid descriptor and a struct to fill.
    if unsafe { libc::fstatfs(file.as_raw_fd(), &raw mut fs) } != 0
        || libc::c_long::from(fs.f_type) != SYSFS_MAGIC
    {
        return None;
    }
    // SAFETY: a new read-only mapping at an address the kernel picks.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_PRIVATE,
            file.as_raw_fd(),
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        return None;
    }
    Some(Bytes::Mapped {
        start: NonNull::new(addr.cast())?,
        len,
    })
}

/// Reads a BTF file: a regular file of at most [`MAX_BTF_BYTES`]. The open does not wait
/// for a writer (a FIFO is refused, not waited on), and nothing past the bound is read.
/// The kernel's own BTF is mapped instead where the kernel allows.
pub fn read_file(path: &Path) -> Result<Bytes> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .with_context(|| format!("opening the BTF file {}", path.display()))?;
    let meta = file
        .metadata()
        .with_context(|| format!("reading the BTF file {}", path.display()))?;
    let kind = meta.file_type();
    if !kind.is_file() {
        let what = if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_char_device() || kind.is_block_device() {
            "a device"
        } else if kind.is_dir() {
            "a directory"
        } else {
            "something else"
        };
        bail!(
            "{} is not a regular file ({what}): pass a kernel BTF file such as /sys/kernel/btf/vmlinux",
            path.display()
        );
    }
    let too_large = || {
        anyhow!(
            "{} is larger than {} MiB, more than any kernel's BTF: pass a kernel BTF file such as \
             /sys/kernel/btf/vmlinux",
            path.display(),
            MAX_BTF_BYTES >> 20
        )
    };
    if meta.len() > MAX_BTF_BYTES {
        return Err(too_large());
    }
    if let Some(mapped) = map_kernel_btf(&file, meta.len()) {
        return Ok(mapped);
    }
    let mut data = Vec::with_capacity(meta.len() as usize);
    // sysfs files may report a size other than what they hold, so the read is bounded too.
    file.take(MAX_BTF_BYTES + 1)
        .read_to_end(&mut data)
        .with_context(|| format!("reading the BTF file {}", path.display()))?;
    if data.len() as u64 > MAX_BTF_BYTES {
        return Err(too_large());
    }
    Ok(Bytes::Read(data))
}

impl<'a> KernelBtf<'a> {
    /// Indexes a little-endian BTF blob (the layout of `/sys/kernel/btf/vmlinux`).
    pub fn parse(data: &'a [u8]) -> Result<Self> {
        ensure!(
            u16_at(data, 0)? == MAGIC,
            "not a BTF file (bad magic; big-endian BTF is not supported)"
        );
        let hdr_len = u32_at(data, 4)? as usize;
        let type_off = u32_at(data, 8)? as usize;
        let type_len = u32_at(data, 12)? as usize;
        let str_off = u32_at(data, 16)? as usize;
        let str_len = u32_at(data, 20)? as usize;
        let section = |off: usize, len: usize| {
            data.get(hdr_len + off..hdr_len + off + len)
                .ok_or_else(|| anyhow!("BTF section {off}+{len} lies outside the file"))
        };
        let types = section(type_off, type_len)?;
        let strings = section(str_off, str_len)?;

        // A type is at least 12 bytes, which bounds the index before it is filled.
        let mut starts = Vec::with_capacity(1 + types.len() / 12);
        starts.push(0);
        let mut at = 0;
        while at < types.len() {
            let info = u32_at(types, at + 4)?;
            starts.push(at as u32);
            at += 12 + payload_len(kind_of(info), vlen_of(info));
        }
        ensure!(at == types.len(), "BTF type section has a torn last entry");
        Ok(Self {
            types,
            strings,
            starts,
        })
    }

    fn header(&self, id: u32) -> Option<Header> {
        if id == 0 {
            return None;
        }
        let at = *self.starts.get(id as usize)? as usize;
        let word = |i: usize| u32_at(self.types, at + 4 * i).ok();
        Some(Header {
            name_off: word(0)?,
            info: word(1)?,
            size_or_type: word(2)?,
            payload: at + 12,
        })
    }

    /// Whether the NUL-terminated string at `offset` is `name`.
    fn name_is(&self, offset: u32, name: &str) -> bool {
        let end = offset as usize + name.len();
        self.strings.get(offset as usize..end) == Some(name.as_bytes())
            && self.strings.get(end) == Some(&0)
    }

    fn name_at(&self, offset: u32) -> String {
        String::from_utf8_lossy(c_str_at(self.strings, offset)).into_owned()
    }

    /// The id of the first type of `kind` named `name`.
    fn find(&self, kind: u32, name: &str) -> Option<u32> {
        (1..self.starts.len() as u32).find(|&id| {
            self.header(id)
                .is_some_and(|h| h.kind() == kind && self.name_is(h.name_off, name))
        })
    }

    /// The id of the typedef `name` (`btf_trace_<tracepoint>`, a tp_btf program's target).
    pub fn typedef_id(&self, name: &str) -> Option<u32> {
        self.find(KIND_TYPEDEF, name)
    }

    /// The id of the function `name` (an fentry program's target).
    pub fn func_id(&self, name: &str) -> Option<u32> {
        self.find(KIND_FUNC, name)
    }

    /// Looks through typedefs and qualifiers to a struct or union; returns its name offset
    /// and members.
    fn composite(&self, mut id: u32) -> Option<(u32, Vec<Member>)> {
        // Alias chains are short; the bound only guards against a malformed loop.
        for _ in 0..32 {
            let h = self.header(id)?;
            match h.kind() {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = h.size_or_type;
                }
                KIND_STRUCT | KIND_UNION => {
                    let members = (0..h.vlen())
                        .map(|i| {
                            let m = h.payload + i * 12;
                            let offset = u32_at(self.types, m + 8)?;
                            let (bit_offset, bitfield_size) = if h.kind_flag() {
                                (offset & 0xff_ffff, offset >> 24)
                            } else {
                                (offset, 0)
                            };
                            Ok(Member {
                                name_off: u32_at(self.types, m)?,
                                type_id: u32_at(self.types, m + 4)?,
                                bit_offset,
                                bitfield_size,
                            })
                        })
                        .collect::<Result<Vec<_>>>()
                        .ok()?;
                    return Some((h.name_off, members));
                }
                _ => return None,
            }
        }
        None
    }

    /// Finds `name` among `members`, looking inside anonymous structs and unions; returns
    /// its bit offset, bit-field size and type. `inside` holds the anonymous types already
    /// being searched, so a type that contains itself is an error, not endless recursion.
    fn find_member(
        &self,
        members: &[Member],
        name: &str,
        inside: &mut Vec<u32>,
    ) -> Result<Option<(u32, u32, u32)>> {
        for m in members {
            if self.name_is(m.name_off, name) {
                return Ok(Some((m.bit_offset, m.bitfield_size, m.type_id)));
            }
            if !self.name_is(m.name_off, "") {
                continue;
            }
            let Some((_, inner)) = self.composite(m.type_id) else {
                continue;
            };
            ensure!(
                !inside.contains(&m.type_id),
                "malformed BTF: type {} contains itself",
                m.type_id
            );
            ensure!(
                inside.len() < MAX_NESTING,
                "malformed BTF: anonymous members nest deeper than {MAX_NESTING} levels"
            );
            inside.push(m.type_id);
            let found = self.find_member(&inner, name, inside)?;
            inside.pop();
            if let Some((bits, size, ty)) = found {
                return Ok(Some((m.bit_offset.saturating_add(bits), size, ty)));
            }
        }
        Ok(None)
    }

    /// `struct <name>`: found once (a scan of every type), then asked for any number of
    /// member offsets.
    pub fn struct_named<'b>(&'b self, name: &'b str) -> Result<Struct<'a, 'b>> {
        let id = self
            .find(KIND_STRUCT, name)
            .ok_or_else(|| anyhow!("struct {name} not found in the kernel's BTF"))?;
        Ok(Struct {
            btf: self,
            name,
            id,
        })
    }

    /// Byte offset of `path` (member names joined by dots, e.g. `__sk_common.skc_family`)
    /// inside `struct <struct_name>`.
    pub fn offset_of(&self, struct_name: &str, path: &str) -> Result<u32> {
        self.struct_named(struct_name)?.offset_of(path)
    }
}

/// A struct of a [`KernelBtf`], by its type id.
#[derive(Debug, Clone, Copy)]
pub struct Struct<'a, 'b> {
    btf: &'b KernelBtf<'a>,
    name: &'b str,
    id: u32,
}

impl Struct<'_, '_> {
    /// Byte offset of `path` (member names joined by dots, e.g. `__sk_common.skc_family`)
    /// inside this struct.
    pub fn offset_of(&self, path: &str) -> Result<u32> {
        let (btf, struct_name) = (self.btf, self.name);
        let mut ty = self.id;
        let mut bits = 0;
        for part in path.split('.') {
            let Some((name_off, members)) = btf.composite(ty) else {
                bail!("{struct_name}.{path}: {part} is not inside a struct or union");
            };
            let (offset, bitfield_size, member_ty) = btf
                .find_member(&members, part, &mut Vec::new())?
                .ok_or_else(|| {
                    anyhow!(
                        "struct {struct_name} has no member {path} ({part} missing in {})",
                        btf.name_at(name_off)
                    )
                })?;
            ensure!(
                bitfield_size == 0 && offset % 8 == 0,
                "{struct_name}.{path} is a bit field; tcprtt cannot read it"
            );
            bits = offset
                .checked_add(bits)
                .ok_or_else(|| anyhow!("malformed BTF: {struct_name}.{path} lies beyond 4 GiB"))?;
            ty = member_ty;
        }
        Ok(bits / 8)
    }
}

/// aya resolves a tracing program's attach target by name in its own `Btf`, and parsing
/// the kernel's whole BTF into one for a single name costs tens of milliseconds and MiBs.
/// These stand-ins hold only the target, at the id it has in the kernel's BTF; every id
/// before it is a placeholder that names nothing.
///
/// A typedef (a tp_btf target) can only be made by parsing, so this one parses a blob.
pub fn typedef_stand_in(name: &str, id: u32) -> Result<aya::Btf> {
    let mut out = Writer::new();
    for _ in 1..id {
        out.placeholder();
    }
    out.typedef(name, 0);
    aya::Btf::parse(&out.build(), aya::Endianness::Little)
        .with_context(|| format!("making the BTF that names {name} for aya"))
}

/// A function (an fentry target): aya builds one directly, without a parse.
pub fn func_stand_in(name: &str, id: u32) -> aya::Btf {
    let mut btf = aya::Btf::new();
    let name_offset = btf.add_string(name);
    for _ in 1..id {
        btf.add_type(BtfType::Unknown);
    }
    btf.add_type(BtfType::Func(Func::new(
        name_offset,
        0,
        FuncLinkage::Static,
    )));
    btf
}

/// Writes a little-endian BTF blob, type by type: the stand-in above, and the tests'
/// miniatures of a kernel's BTF.
#[derive(Debug)]
struct Writer {
    types: Vec<u8>,
    strings: Vec<u8>,
}

impl Writer {
    fn new() -> Self {
        Self {
            types: Vec::new(),
            strings: vec![0],
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

    fn word(&mut self, w: u32) {
        self.types.extend_from_slice(&w.to_le_bytes());
    }

    /// An anonymous `void *`: a type that takes up an id and names nothing.
    fn placeholder(&mut self) {
        self.word(0);
        self.word(KIND_PTR << 24);
        self.word(0);
    }

    fn typedef(&mut self, name: &str, target: u32) {
        let n = self.name(name);
        self.word(n);
        self.word(KIND_TYPEDEF << 24);
        self.word(target);
    }

    fn build(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.extend_from_slice(&[1, 0]);
        for w in [
            24,
            0,
            self.types.len() as u32,
            self.types.len() as u32,
            self.strings.len() as u32,
        ] {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out.extend_from_slice(&self.types);
        out.extend_from_slice(&self.strings);
        out
    }
}

#[cfg(test)]
impl Writer {
    /// A static function whose prototype is type `proto`.
    fn func(&mut self, name: &str, proto: u32) {
        let n = self.name(name);
        self.word(n);
        self.word(KIND_FUNC << 24);
        self.word(proto);
    }

    fn int(&mut self, name: &str, size: u32) {
        let n = self.name(name);
        self.word(n);
        self.word(KIND_INT << 24);
        self.word(size);
        self.word(size * 8);
    }

    /// members: (name, type id, bit offset, bitfield size)
    fn composite(&mut self, kind: u32, name: &str, size: u32, members: &[(&str, u32, u32, u32)]) {
        let kind_flag = members.iter().any(|m| m.3 != 0);
        let n = self.name(name);
        self.word(n);
        self.word((u32::from(kind_flag) << 31) | (kind << 24) | members.len() as u32);
        self.word(size);
        for &(name, ty, bits, bitfield) in members {
            let n = self.name(name);
            self.word(n);
            self.word(ty);
            self.word(if kind_flag {
                (bitfield << 24) | bits
            } else {
                bits
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A miniature of the kernel's nesting: named and anonymous members, unions, a typedef.
    fn sample() -> Vec<u8> {
        let mut b = Writer::new();
        b.int("u16", 2); // 1
        b.int("u32", 4); // 2
        b.typedef("__be32", 2); // 3
        b.composite(
            KIND_STRUCT,
            "",
            8,
            &[("skc_daddr", 3, 0, 0), ("skc_rcv_saddr", 3, 32, 0)],
        ); // 4
        b.composite(
            KIND_UNION,
            "",
            8,
            &[("skc_addrpair", 2, 0, 0), ("", 4, 0, 0)],
        ); // 5
        b.composite(
            KIND_STRUCT,
            "sock_common",
            16,
            &[("", 5, 0, 0), ("skc_family", 1, 64, 0), ("flag", 2, 80, 3)],
        ); // 6
        b.composite(
            KIND_STRUCT,
            "sock",
            32,
            &[("pad", 2, 0, 0), ("__sk_common", 6, 64, 0)],
        ); // 7
        b.composite(
            KIND_STRUCT,
            "tcp_sock",
            64,
            &[("sk", 7, 0, 0), ("srtt_us", 2, 320, 0)],
        ); // 8
        b.typedef("btf_trace_tcp_probe", 2); // 9
        b.func("tcp_rcv_established", 0); // 10
        b.build()
    }

    #[test]
    fn finds_members_through_anonymous_unions_and_named_paths() {
        let blob = sample();
        let btf = KernelBtf::parse(&blob).unwrap();
        assert_eq!(btf.offset_of("tcp_sock", "srtt_us").unwrap(), 40);
        assert_eq!(btf.offset_of("sock_common", "skc_daddr").unwrap(), 0);
        assert_eq!(btf.offset_of("sock_common", "skc_rcv_saddr").unwrap(), 4);
        assert_eq!(
            btf.offset_of("sock", "__sk_common.skc_rcv_saddr").unwrap(),
            12
        );
        assert_eq!(btf.offset_of("sock", "__sk_common.skc_family").unwrap(), 16);
    }

    #[test]
    fn finds_attach_targets_by_kind_and_whole_name() {
        let blob = sample();
        let btf = KernelBtf::parse(&blob).unwrap();
        assert_eq!(btf.typedef_id("btf_trace_tcp_probe"), Some(9));
        assert_eq!(btf.typedef_id("btf_trace_tcp"), None);
        assert_eq!(btf.typedef_id("sock"), None);
        assert_eq!(btf.func_id("btf_trace_tcp_probe"), None);
        assert_eq!(btf.func_id("tcp_rcv_established"), Some(10));
        assert_eq!(btf.typedef_id("tcp_rcv_established"), None);
    }

    #[test]
    fn the_attach_target_stand_ins_keep_the_kernels_ids() {
        let kind = |k| aya_obj::btf::BtfKind::try_from(k).unwrap();
        let typedef = typedef_stand_in("btf_trace_tcp_probe", 38).unwrap();
        assert_eq!(
            typedef
                .id_by_type_name_kind("btf_trace_tcp_probe", kind(KIND_TYPEDEF))
                .unwrap(),
            38
        );
        let func = func_stand_in("tcp_rcv_established", 1140);
        assert_eq!(
            func.id_by_type_name_kind("tcp_rcv_established", kind(KIND_FUNC))
                .unwrap(),
            1140
        );
        assert!(
            func.id_by_type_name_kind("tcp_rcv_established", kind(KIND_TYPEDEF))
                .is_err()
        );
    }

    #[test]
    fn names_what_is_missing_or_unreadable() {
        let blob = sample();
        let btf = KernelBtf::parse(&blob).unwrap();
        let err = btf
            .offset_of("sock", "__sk_common.nope")
            .unwrap_err()
            .to_string();
        assert!(err.contains("no member __sk_common.nope"), "{err}");
        let err = btf.offset_of("inet_sock", "x").unwrap_err().to_string();
        assert!(err.contains("struct inet_sock not found"), "{err}");
        let err = btf
            .offset_of("sock_common", "flag")
            .unwrap_err()
            .to_string();
        assert!(err.contains("bit field"), "{err}");
        assert!(KernelBtf::parse(b"\x00\x00garbage-garbage-garbage").is_err());
    }

    #[test]
    fn a_struct_containing_itself_is_an_error_not_a_stack_overflow() {
        let mut b = Writer::new();
        b.int("u32", 4); // 1
        b.composite(KIND_STRUCT, "sock", 8, &[("", 2, 0, 0)]); // 2
        let blob = b.build();
        let btf = KernelBtf::parse(&blob).unwrap();
        let err = btf.offset_of("sock", "x").unwrap_err().to_string();
        assert!(err.contains("contains itself"), "{err}");
    }

    #[test]
    fn nesting_is_bounded() {
        let mut b = Writer::new();
        b.int("u32", 4); // 1
        b.composite(KIND_STRUCT, "", 4, &[("deep", 1, 0, 0)]); // 2
        for id in 2..40 {
            b.composite(KIND_STRUCT, "", 4, &[("", id, 0, 0)]); // id + 1
        }
        b.composite(KIND_STRUCT, "sock", 4, &[("", 40, 0, 0)]);
        let blob = b.build();
        let btf = KernelBtf::parse(&blob).unwrap();
        let err = btf.offset_of("sock", "deep").unwrap_err().to_string();
        assert!(err.contains("nest deeper than 16"), "{err}");
    }

    #[test]
    fn only_bounded_regular_files_are_read() {
        let err = read_file(Path::new("/dev/zero")).unwrap_err().to_string();
        assert!(err.contains("is not a regular file (a device)"), "{err}");
        let dir = std::env::temp_dir().join(format!("tcprtt-btf-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let err = read_file(&fifo).unwrap_err().to_string();
        assert!(err.contains("is not a regular file (a FIFO)"), "{err}");
        let big = dir.join("big");
        std::fs::File::create(&big)
            .unwrap()
            .set_len(MAX_BTF_BYTES + 1)
            .unwrap();
        let err = read_file(&big).unwrap_err().to_string();
        assert!(err.contains("is larger than 64 MiB"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The running kernel's version, from uname.
    fn kernel_version() -> (u32, u32) {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
        let mut parts = release.split(['.', '-']).map(|p| p.parse().unwrap_or(0));
        (parts.next().unwrap(), parts.next().unwrap())
    }

    #[test]
    fn the_kernels_btf_is_mapped_from_linux_6_16_and_other_files_are_read() {
        let path = Path::new("/sys/kernel/btf/vmlinux");
        let bytes = read_file(path).unwrap();
        assert_eq!(
            matches!(bytes, Bytes::Mapped { .. }),
            kernel_version() >= (6, 16)
        );
        assert!(*bytes == *std::fs::read(path).unwrap());
        let copy = std::env::temp_dir().join(format!("tcprtt-btf-map-{}", std::process::id()));
        std::fs::write(&copy, &*bytes).unwrap();
        let read = read_file(&copy).unwrap();
        std::fs::remove_file(&copy).unwrap();
        assert!(matches!(read, Bytes::Read(_)));
        assert!(*read == *bytes);
    }

    fn sample_blob() -> Vec<u8> {
        let mut b = Writer::new();
        b.int("u16", 2);
        b.int("u32", 4);
        b.typedef("__be32", 2);
        b.composite(KIND_STRUCT, "", 8, &[("skc_daddr", 3, 0, 0)]);
        b.composite(KIND_UNION, "", 8, &[("a", 2, 0, 0), ("", 4, 0, 0)]);
        b.composite(
            KIND_STRUCT,
            "sock_common",
            16,
            &[("", 5, 0, 0), ("skc_family", 1, 64, 0)],
        );
        b.composite(KIND_STRUCT, "sock", 32, &[("__sk_common", 6, 64, 0)]);
        b.build()
    }

    fn lookups(btf: &KernelBtf) {
        for path in ["__sk_common.skc_family", "__sk_common.skc_daddr", "x"] {
            let _ = btf.offset_of("sock", path);
        }
    }

    proptest::proptest! {
        #[test]
        fn random_blobs_never_panic(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048)) {
            if let Ok(btf) = KernelBtf::parse(&data) {
                lookups(&btf);
            }
        }

        #[test]
        fn mutated_blobs_never_panic(
            flips in proptest::collection::vec(
                (proptest::prelude::any::<proptest::sample::Index>(), proptest::prelude::any::<u8>()),
                1..12,
            )
        ) {
            let mut data = sample_blob();
            for (at, byte) in flips {
                let at = at.index(data.len());
                data[at] = byte;
            }
            if let Ok(btf) = KernelBtf::parse(&data) {
                lookups(&btf);
            }
        }
    }
}
