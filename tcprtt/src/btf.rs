//! Struct member offsets from the running kernel's BTF.
//!
//! aya's `Btf` does not expose member offsets, and the permissive-licensed parsers are
//! larger than what tcprtt needs, so this is a small reader for the BTF type section: just
//! enough to walk structs and unions, including the anonymous ones the kernel nests its
//! socket fields in.

use std::{
    collections::HashMap,
    fs::OpenOptions,
    io::Read,
    os::unix::fs::{FileTypeExt, OpenOptionsExt},
    path::Path,
};

use anyhow::{Context, Result, anyhow, bail, ensure};

/// The largest BTF file tcprtt reads. A kernel's own BTF is a few MiB (5.3 MiB for
/// the 6.18 kernel of the development machines); a file larger than this is not one.
pub const MAX_BTF_BYTES: u64 = 64 << 20;

/// How deep anonymous structs and unions may nest. The kernel nests its socket fields two
/// or three levels deep; a deeper or cyclic nesting is a malformed file.
const MAX_NESTING: usize = 16;

const MAGIC: u16 = 0xeb9f;

const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

#[derive(Debug, Clone)]
struct Member {
    name: String,
    type_id: u32,
    bit_offset: u32,
    bitfield_size: u32,
}

#[derive(Debug, Clone)]
enum Type {
    /// A struct or union with its members.
    Composite { name: String, members: Vec<Member> },
    /// typedef / const / volatile / restrict / type tag: look through to `target`.
    Alias { target: u32 },
    /// Anything tcprtt never needs to look inside.
    Other,
}

/// The parsed type section of one BTF blob.
#[derive(Debug)]
pub struct KernelBtf {
    /// Indexed by BTF type id; id 0 is `void`.
    types: Vec<Type>,
    structs_by_name: HashMap<String, u32>,
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

fn string_at(strings: &[u8], offset: u32) -> Result<String> {
    let tail = strings
        .get(offset as usize..)
        .ok_or_else(|| anyhow!("BTF string offset {offset} out of range"))?;
    let end = tail.iter().position(|b| *b == 0).unwrap_or(tail.len());
    Ok(String::from_utf8_lossy(&tail[..end]).into_owned())
}

/// Reads a BTF file: a regular file of at most [`MAX_BTF_BYTES`]. The open does not wait
/// for a writer (a FIFO is refused, not waited on), and nothing past the bound is read.
pub fn read_file(path: &Path) -> Result<Vec<u8>> {
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
    let mut data = Vec::with_capacity(meta.len() as usize);
    // sysfs files may report a size other than what they hold, so the read is bounded too.
    file.take(MAX_BTF_BYTES + 1)
        .read_to_end(&mut data)
        .with_context(|| format!("reading the BTF file {}", path.display()))?;
    if data.len() as u64 > MAX_BTF_BYTES {
        return Err(too_large());
    }
    Ok(data)
}

impl KernelBtf {
    /// Parses a little-endian BTF blob (the layout of `/sys/kernel/btf/vmlinux`).
    pub fn parse(data: &[u8]) -> Result<Self> {
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
        let type_data = section(type_off, type_len)?;
        let strings = section(str_off, str_len)?;

        let mut types = vec![Type::Other];
        let mut structs_by_name = HashMap::new();
        let mut at = 0;
        while at < type_data.len() {
            let name_off = u32_at(type_data, at)?;
            let info = u32_at(type_data, at + 4)?;
            let size_or_type = u32_at(type_data, at + 8)?;
            at += 12;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 == 1;
            let ty = match kind {
                KIND_STRUCT | KIND_UNION => {
                    let mut members = Vec::with_capacity(vlen);
                    for i in 0..vlen {
                        let m = at + i * 12;
                        let offset = u32_at(type_data, m + 8)?;
                        let (bit_offset, bitfield_size) = if kind_flag {
                            (offset & 0xff_ffff, offset >> 24)
                        } else {
                            (offset, 0)
                        };
                        members.push(Member {
                            name: string_at(strings, u32_at(type_data, m)?)?,
                            type_id: u32_at(type_data, m + 4)?,
                            bit_offset,
                            bitfield_size,
                        });
                    }
                    at += vlen * 12;
                    let name = string_at(strings, name_off)?;
                    if kind == KIND_STRUCT && !name.is_empty() {
                        structs_by_name
                            .entry(name.clone())
                            .or_insert(types.len() as u32);
                    }
                    Type::Composite { name, members }
                }
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    Type::Alias {
                        target: size_or_type,
                    }
                }
                _ => {
                    at += match kind {
                        KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                        KIND_ARRAY => 12,
                        KIND_ENUM | KIND_FUNC_PROTO => vlen * 8,
                        KIND_DATASEC | KIND_ENUM64 => vlen * 12,
                        _ => 0,
                    };
                    Type::Other
                }
            };
            types.push(ty);
        }
        ensure!(
            at == type_data.len(),
            "BTF type section has a torn last entry"
        );
        Ok(Self {
            types,
            structs_by_name,
        })
    }

    fn resolve(&self, mut id: u32) -> Option<&Type> {
        // Alias chains are short; the bound only guards against a malformed loop.
        for _ in 0..32 {
            match self.types.get(id as usize)? {
                Type::Alias { target } => id = *target,
                other => return Some(other),
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
            if m.name == name {
                return Ok(Some((m.bit_offset, m.bitfield_size, m.type_id)));
            }
            if !m.name.is_empty() {
                continue;
            }
            let Some(Type::Composite { members: inner, .. }) = self.resolve(m.type_id) else {
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
            let found = self.find_member(inner, name, inside)?;
            inside.pop();
            if let Some((bits, size, ty)) = found {
                return Ok(Some((m.bit_offset.saturating_add(bits), size, ty)));
            }
        }
        Ok(None)
    }

    /// Byte offset of `path` (member names joined by dots, e.g. `__sk_common.skc_family`)
    /// inside `struct <struct_name>`.
    pub fn offset_of(&self, struct_name: &str, path: &str) -> Result<u32> {
        let id = *self
            .structs_by_name
            .get(struct_name)
            .ok_or_else(|| anyhow!("struct {struct_name} not found in the kernel's BTF"))?;
        let mut ty = id;
        let mut bits = 0;
        for part in path.split('.') {
            let Some(Type::Composite { name, members }) = self.resolve(ty) else {
                bail!("{struct_name}.{path}: {part} is not inside a struct or union");
            };
            let (offset, bitfield_size, member_ty) = self
                .find_member(members, part, &mut Vec::new())?
                .ok_or_else(|| {
                    anyhow!("struct {struct_name} has no member {path} ({part} missing in {name})")
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a BTF blob by hand, so offsets can be checked against known answers.
    #[derive(Default)]
    struct Builder {
        types: Vec<u8>,
        strings: Vec<u8>,
    }

    impl Builder {
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
        fn int(&mut self, name: &str, size: u32) {
            let n = self.name(name);
            self.word(n);
            self.word(KIND_INT << 24);
            self.word(size);
            self.word(size * 8);
        }
        fn typedef(&mut self, name: &str, target: u32) {
            let n = self.name(name);
            self.word(n);
            self.word(KIND_TYPEDEF << 24);
            self.word(target);
        }
        /// members: (name, type id, bit offset, bitfield size)
        fn composite(
            &mut self,
            kind: u32,
            name: &str,
            size: u32,
            members: &[(&str, u32, u32, u32)],
        ) {
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

    /// A miniature of the kernel's nesting: named and anonymous members, unions, a typedef.
    fn sample() -> KernelBtf {
        let mut b = Builder::new();
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
        KernelBtf::parse(&b.build()).unwrap()
    }

    #[test]
    fn finds_members_through_anonymous_unions_and_named_paths() {
        let btf = sample();
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
    fn names_what_is_missing_or_unreadable() {
        let btf = sample();
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
        let mut b = Builder::new();
        b.int("u32", 4); // 1
        b.composite(KIND_STRUCT, "sock", 8, &[("", 2, 0, 0)]); // 2
        let btf = KernelBtf::parse(&b.build()).unwrap();
        let err = btf.offset_of("sock", "x").unwrap_err().to_string();
        assert!(err.contains("contains itself"), "{err}");
    }

    #[test]
    fn nesting_is_bounded() {
        let mut b = Builder::new();
        b.int("u32", 4); // 1
        b.composite(KIND_STRUCT, "", 4, &[("deep", 1, 0, 0)]); // 2
        for id in 2..40 {
            b.composite(KIND_STRUCT, "", 4, &[("", id, 0, 0)]); // id + 1
        }
        b.composite(KIND_STRUCT, "sock", 4, &[("", 40, 0, 0)]);
        let btf = KernelBtf::parse(&b.build()).unwrap();
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

    fn sample_blob() -> Vec<u8> {
        let mut b = Builder::new();
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
