//! A small reader of the kernel's BTF, enough to find struct member offsets and sizes.
//!
//! Rust eBPF programs carry no CO-RE relocations, so the agent reads the offsets of the kernel
//! structures its program touches (`sk_buff`, `nf_conn`, `nf_conntrack_tuple`) from the running
//! kernel's BTF at start-up (`/sys/kernel/btf/vmlinux`, and on kernels that build conntrack as a
//! module the module's split BTF on top of it, `/sys/kernel/btf/nf_conntrack`).
//!
//! Only what the lookups need is decoded: names, kinds, sizes, struct/union members (walking
//! into anonymous members), arrays and the modifiers/typedefs in between.

use std::{collections::HashMap, path::Path};

/// Where the running kernel publishes its own BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

const BTF_MAGIC: u16 = 0xeb9f;

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FWD: u32 = 7;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_FLOAT: u32 = 16;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

/// Errors reading BTF or looking a member up in it.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    /// The BTF file could not be read (missing when the kernel lacks CONFIG_DEBUG_INFO_BTF).
    #[error("cannot read kernel BTF {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The bytes are not BTF nattrace can read.
    #[error("malformed BTF at byte {offset}: {reason}")]
    Malformed { offset: usize, reason: &'static str },
    /// No struct of that name in the BTF.
    #[error("kernel BTF has no struct {name}")]
    NoStruct { name: String },
    /// The struct has no member of that name (or the path goes through a non-struct).
    #[error("kernel BTF: struct {ty} has no member {member}")]
    NoMember { ty: String, member: String },
    /// A member is a bitfield, which has no byte offset.
    #[error("kernel BTF: {ty}.{member} is a bitfield")]
    Bitfield { ty: String, member: String },
}

#[derive(Clone, Debug)]
struct Member {
    name: String,
    type_id: u32,
    bit_offset: u32,
    bitfield: bool,
}

#[derive(Clone, Debug)]
enum Type {
    Void,
    /// Struct or union.
    Composite {
        name: String,
        size: u32,
        members: Vec<Member>,
    },
    Array {
        elem: u32,
        len: u32,
    },
    /// Typedef, const, volatile, restrict, type tag: refers to another type.
    Alias {
        target: u32,
    },
    /// Anything else with a size (int, enum, float, pointer).
    Sized {
        size: u32,
    },
    Other,
}

/// Parsed BTF: a base (vmlinux) or a module's split BTF merged with its base.
#[derive(Clone, Debug)]
pub struct Btf {
    types: Vec<Type>,
    structs: HashMap<String, u32>,
    /// `BTF_KIND_FUNC` names to type ids (the ids a tracing program attaches to).
    funcs: HashMap<String, u32>,
    /// Enumerator names (of every `BTF_KIND_ENUM`/`ENUM64`) to values; C gives them one
    /// namespace, so the first definition is the one.
    enumerators: HashMap<String, i64>,
    /// The string table, base included: split BTF string offsets continue from the base's.
    strings: Vec<u8>,
    /// How many types (void included) the base BTF has; 0 for a base itself.
    base_types: usize,
}

/// The offset and size of a member reached through a path of member names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemberInfo {
    /// Byte offset from the start of the outer struct.
    pub offset: u32,
    /// Byte size of the member's type.
    pub size: u32,
}

impl Btf {
    /// Reads the running kernel's BTF.
    pub fn from_sys_fs() -> Result<Self, BtfError> {
        Self::from_file(Path::new(VMLINUX_BTF))
    }

    /// Reads a base BTF file.
    pub fn from_file(path: &Path) -> Result<Self, BtfError> {
        let data = std::fs::read(path).map_err(|source| BtfError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&data, None)
    }

    /// Reads a module's split BTF on top of `self` (its base), e.g. `/sys/kernel/btf/nf_conntrack`.
    pub fn with_split_file(&self, path: &Path) -> Result<Self, BtfError> {
        let data = std::fs::read(path).map_err(|source| BtfError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&data, Some(self))
    }

    /// Parses raw BTF bytes (little-endian, as the running kernel writes them). With `base`,
    /// the bytes are split BTF whose type ids and string offsets continue the base's.
    pub fn parse(data: &[u8], base: Option<&Btf>) -> Result<Self, BtfError> {
        let rd = Reader { data };
        if rd.u16(0)? != BTF_MAGIC {
            return Err(BtfError::Malformed {
                offset: 0,
                reason: "bad magic (big-endian BTF is not supported)",
            });
        }
        let hdr_len = rd.u32(4)? as usize;
        let type_off = rd.u32(8)? as usize;
        let type_len = rd.u32(12)? as usize;
        let str_off = rd.u32(16)? as usize;
        let str_len = rd.u32(20)? as usize;
        let types_start = hdr_len + type_off;
        let types_end = types_start + type_len;
        let strs_start = hdr_len + str_off;
        if types_end > data.len() || strs_start + str_len > data.len() {
            return Err(BtfError::Malformed {
                offset: 4,
                reason: "sections run past the end",
            });
        }
        // Split BTF names may point into the base's string table (offsets below its length)
        // or into its own (offsets continuing the base's).
        let mut all_strings = base.map(|b| b.strings.clone()).unwrap_or_default();
        all_strings.extend_from_slice(&data[strs_start..strs_start + str_len]);
        let (mut types, mut funcs) = match base {
            Some(b) => (b.types.clone(), b.funcs.clone()),
            None => (vec![Type::Void], HashMap::new()),
        };
        let mut enumerators = base.map(|b| b.enumerators.clone()).unwrap_or_default();
        let name_at = |off: u32| -> Result<String, BtfError> {
            let off = off as usize;
            let tail = all_strings.get(off..).ok_or(BtfError::Malformed {
                offset: strs_start + off,
                reason: "string offset out of range",
            })?;
            let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
            Ok(String::from_utf8_lossy(&tail[..end]).into_owned())
        };
        let mut pos = types_start;
        while pos < types_end {
            let name_off = rd.u32(pos)?;
            let info = rd.u32(pos + 4)?;
            let size_or_type = rd.u32(pos + 8)?;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 == 1;
            pos += 12;
            let ty = match kind {
                KIND_INT => {
                    pos += 4;
                    Type::Sized { size: size_or_type }
                }
                KIND_PTR => Type::Sized { size: 8 },
                KIND_ARRAY => {
                    let elem = rd.u32(pos)?;
                    let len = rd.u32(pos + 8)?;
                    pos += 12;
                    Type::Array { elem, len }
                }
                KIND_STRUCT | KIND_UNION => {
                    let mut members = Vec::with_capacity(vlen);
                    for _ in 0..vlen {
                        let m_name = rd.u32(pos)?;
                        let m_type = rd.u32(pos + 4)?;
                        let m_off = rd.u32(pos + 8)?;
                        pos += 12;
                        let (bit_offset, bitfield) = if kind_flag {
                            (m_off & 0x00ff_ffff, m_off >> 24 != 0)
                        } else {
                            (m_off, false)
                        };
                        members.push(Member {
                            name: name_at(m_name)?,
                            type_id: m_type,
                            bit_offset,
                            bitfield,
                        });
                    }
                    Type::Composite {
                        name: name_at(name_off)?,
                        size: size_or_type,
                        members,
                    }
                }
                KIND_ENUM => {
                    for _ in 0..vlen {
                        let e_name = name_at(rd.u32(pos)?)?;
                        // Signed when the kind flag is set; the values nattrace reads are small.
                        let v = rd.u32(pos + 4)?;
                        let v = if kind_flag {
                            i64::from(v.cast_signed())
                        } else {
                            i64::from(v)
                        };
                        enumerators.entry(e_name).or_insert(v);
                        pos += 8;
                    }
                    Type::Sized { size: size_or_type }
                }
                KIND_ENUM64 => {
                    for _ in 0..vlen {
                        let e_name = name_at(rd.u32(pos)?)?;
                        let v = u64::from(rd.u32(pos + 4)?) | (u64::from(rd.u32(pos + 8)?) << 32);
                        enumerators.entry(e_name).or_insert(v.cast_signed());
                        pos += 12;
                    }
                    Type::Sized { size: size_or_type }
                }
                KIND_FLOAT => Type::Sized { size: size_or_type },
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    Type::Alias {
                        target: size_or_type,
                    }
                }
                KIND_FUNC => {
                    let name = name_at(name_off)?;
                    if !name.is_empty() {
                        let id = u32::try_from(types.len()).expect("BTF type ids fit u32");
                        funcs.entry(name).or_insert(id);
                    }
                    Type::Other
                }
                KIND_FWD => Type::Other,
                KIND_FUNC_PROTO => {
                    pos += 8 * vlen;
                    Type::Other
                }
                KIND_VAR | KIND_DECL_TAG => {
                    pos += 4;
                    Type::Other
                }
                KIND_DATASEC => {
                    pos += 12 * vlen;
                    Type::Other
                }
                _ => {
                    return Err(BtfError::Malformed {
                        offset: pos - 12,
                        reason: "unknown type kind",
                    });
                }
            };
            types.push(ty);
        }
        if pos != types_end {
            return Err(BtfError::Malformed {
                offset: pos,
                reason: "type section length mismatch",
            });
        }
        let mut structs = base.map(|b| b.structs.clone()).unwrap_or_default();
        let first_new = base.map_or(0, |b| b.types.len());
        for (id, ty) in types.iter().enumerate().skip(first_new) {
            if let Type::Composite { name, .. } = ty
                && !name.is_empty()
            {
                // The first definition wins; duplicates are identical in practice.
                structs
                    .entry(name.clone())
                    .or_insert(u32::try_from(id).expect("BTF type ids fit u32"));
            }
        }
        Ok(Self {
            types,
            structs,
            funcs,
            enumerators,
            strings: all_strings,
            base_types: base.map_or(0, |b| b.types.len()),
        })
    }

    /// The value of an enumerator, e.g. `NF_CT_EXT_ACCT`.
    #[must_use]
    pub fn enumerator(&self, name: &str) -> Option<i64> {
        self.enumerators.get(name).copied()
    }

    /// The type id of a function (`BTF_KIND_FUNC`), as a tracing program's `attach_btf_id`.
    /// In split BTF the id continues the base's numbering, as the kernel expects.
    #[must_use]
    pub fn func_id(&self, name: &str) -> Option<u32> {
        self.funcs.get(name).copied()
    }

    /// Whether the function is described by this BTF's own (split) part rather than its base:
    /// attaching to it then needs the module's BTF object.
    #[must_use]
    pub fn func_in_split(&self, name: &str) -> bool {
        self.func_id(name)
            .is_some_and(|id| self.base_types > 0 && id as usize >= self.base_types)
    }

    /// Whether the BTF describes a struct of that name.
    #[must_use]
    pub fn has_struct(&self, name: &str) -> bool {
        self.structs.contains_key(name)
    }

    /// Byte size of a struct.
    pub fn struct_size(&self, name: &str) -> Result<u32, BtfError> {
        let id = self.struct_id(name)?;
        Ok(self.size_of(id))
    }

    /// Offset and size of `ty.path[0].path[1]…`; array members may be indexed as `name[i]`.
    /// Anonymous struct/union members are searched transparently, as C does.
    pub fn member(&self, ty: &str, path: &[&str]) -> Result<MemberInfo, BtfError> {
        let mut id = self.struct_id(ty)?;
        let mut offset = 0u32;
        let mut current = ty.to_owned();
        for step in path {
            let (name, index) = match step.split_once('[') {
                Some((n, rest)) => (n, rest.trim_end_matches(']').parse::<u32>().ok()),
                None => (*step, None),
            };
            let (bit_off, member_type, bitfield) =
                self.find_member(id, name)
                    .ok_or_else(|| BtfError::NoMember {
                        ty: current.clone(),
                        member: (*step).to_owned(),
                    })?;
            if bitfield || bit_off % 8 != 0 {
                return Err(BtfError::Bitfield {
                    ty: current.clone(),
                    member: (*step).to_owned(),
                });
            }
            offset += bit_off / 8;
            id = self.resolve(member_type);
            if let Some(i) = index {
                let Type::Array { elem, len } = self.types[id as usize] else {
                    return Err(BtfError::NoMember {
                        ty: current.clone(),
                        member: (*step).to_owned(),
                    });
                };
                if i >= len {
                    return Err(BtfError::NoMember {
                        ty: current.clone(),
                        member: (*step).to_owned(),
                    });
                }
                offset += i * self.size_of(elem);
                id = self.resolve(elem);
            }
            current = format!("{current}.{step}");
        }
        Ok(MemberInfo {
            offset,
            size: self.size_of(id),
        })
    }

    fn struct_id(&self, name: &str) -> Result<u32, BtfError> {
        self.structs
            .get(name)
            .copied()
            .ok_or_else(|| BtfError::NoStruct {
                name: name.to_owned(),
            })
    }

    /// Finds a member by name in a struct/union, descending into anonymous members.
    /// Returns its bit offset from the start of `id`, its type, and whether it is a bitfield.
    fn find_member(&self, id: u32, name: &str) -> Option<(u32, u32, bool)> {
        let Type::Composite { members, .. } = &self.types[self.resolve(id) as usize] else {
            return None;
        };
        for m in members {
            if m.name == name {
                return Some((m.bit_offset, m.type_id, m.bitfield));
            }
        }
        for m in members.iter().filter(|m| m.name.is_empty()) {
            if let Some((off, ty, bitfield)) = self.find_member(m.type_id, name) {
                return Some((m.bit_offset + off, ty, bitfield));
            }
        }
        None
    }

    /// Follows typedefs and modifiers to the underlying type.
    fn resolve(&self, mut id: u32) -> u32 {
        for _ in 0..32 {
            match self.types.get(id as usize) {
                Some(Type::Alias { target }) => id = *target,
                _ => break,
            }
        }
        id
    }

    fn size_of(&self, id: u32) -> u32 {
        match &self.types[self.resolve(id) as usize] {
            Type::Composite { size, .. } | Type::Sized { size } => *size,
            Type::Array { elem, len } => len * self.size_of(*elem),
            Type::Void | Type::Alias { .. } | Type::Other => 0,
        }
    }
}

struct Reader<'a> {
    data: &'a [u8],
}

impl Reader<'_> {
    fn u32(&self, at: usize) -> Result<u32, BtfError> {
        self.data
            .get(at..at + 4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
            .ok_or(BtfError::Malformed {
                offset: at,
                reason: "truncated",
            })
    }

    fn u16(&self, at: usize) -> Result<u16, BtfError> {
        self.data
            .get(at..at + 2)
            .map(|b| u16::from_le_bytes(b.try_into().expect("2 bytes")))
            .ok_or(BtfError::Malformed {
                offset: at,
                reason: "truncated",
            })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds little BTF blobs for tests.
    #[derive(Default)]
    pub(crate) struct Builder {
        types: Vec<u8>,
        strings: Vec<u8>,
    }

    impl Builder {
        pub(crate) fn new() -> Self {
            Self {
                types: Vec::new(),
                strings: vec![0],
            }
        }

        fn s(&mut self, name: &str) -> u32 {
            if name.is_empty() {
                return 0;
            }
            let off = u32::try_from(self.strings.len()).unwrap();
            self.strings.extend_from_slice(name.as_bytes());
            self.strings.push(0);
            off
        }

        fn head(&mut self, name: &str, kind: u32, vlen: u32, kind_flag: bool, size: u32) {
            let n = self.s(name);
            self.types.extend_from_slice(&n.to_le_bytes());
            let info = (kind << 24) | vlen | (u32::from(kind_flag) << 31);
            self.types.extend_from_slice(&info.to_le_bytes());
            self.types.extend_from_slice(&size.to_le_bytes());
        }

        pub(crate) fn int(&mut self, name: &str, size: u32) {
            self.head(name, KIND_INT, 0, false, size);
            self.types.extend_from_slice(&(size * 8).to_le_bytes());
        }

        /// A 4-byte enum with `(name, value)` enumerators.
        pub(crate) fn enumeration(&mut self, name: &str, values: &[(&str, u32)]) {
            self.head(
                name,
                KIND_ENUM,
                u32::try_from(values.len()).unwrap(),
                false,
                4,
            );
            for (e, v) in values {
                let n = self.s(e);
                self.types.extend_from_slice(&n.to_le_bytes());
                self.types.extend_from_slice(&v.to_le_bytes());
            }
        }

        pub(crate) fn typedef(&mut self, name: &str, target: u32) {
            self.head(name, KIND_TYPEDEF, 0, false, target);
        }

        pub(crate) fn array(&mut self, elem: u32, len: u32) {
            self.head("", KIND_ARRAY, 0, false, 0);
            for v in [elem, elem, len] {
                self.types.extend_from_slice(&v.to_le_bytes());
            }
        }

        /// members: (name, type id, byte offset)
        pub(crate) fn composite(
            &mut self,
            union: bool,
            name: &str,
            size: u32,
            members: &[(&str, u32, u32)],
        ) {
            let kind = if union { KIND_UNION } else { KIND_STRUCT };
            self.head(
                name,
                kind,
                u32::try_from(members.len()).unwrap(),
                false,
                size,
            );
            for (m, ty, off) in members {
                let n = self.s(m);
                for v in [n, *ty, off * 8] {
                    self.types.extend_from_slice(&v.to_le_bytes());
                }
            }
        }

        pub(crate) fn build(&self) -> Vec<u8> {
            let mut out = Vec::new();
            out.extend_from_slice(&BTF_MAGIC.to_le_bytes());
            out.extend_from_slice(&[1, 0]);
            let tl = u32::try_from(self.types.len()).unwrap();
            let sl = u32::try_from(self.strings.len()).unwrap();
            for v in [24, 0, tl, tl, sl] {
                out.extend_from_slice(&v.to_le_bytes());
            }
            out.extend_from_slice(&self.types);
            out.extend_from_slice(&self.strings);
            out
        }
    }

    fn sample() -> Btf {
        let mut b = Builder::new();
        b.int("unsigned int", 4); // 1
        b.int("unsigned short", 2); // 2
        b.typedef("u16", 2); // 3
        b.composite(false, "inner", 8, &[("a", 1, 0), ("b", 3, 4)]); // 4
        b.array(4, 2); // 5: inner[2]
        b.composite(true, "", 4, &[("x", 1, 0), ("y", 3, 0)]); // 6: anonymous union
        b.composite(
            false,
            "outer",
            32,
            &[("first", 1, 0), ("", 6, 4), ("pair", 5, 8), ("last", 3, 24)],
        ); // 7
        Btf::parse(&b.build(), None).unwrap()
    }

    #[test]
    fn finds_nested_and_anonymous_members() {
        let btf = sample();
        assert_eq!(
            btf.member("outer", &["first"]).unwrap(),
            MemberInfo { offset: 0, size: 4 }
        );
        assert_eq!(
            btf.member("outer", &["y"]).unwrap(),
            MemberInfo { offset: 4, size: 2 }
        );
        assert_eq!(
            btf.member("outer", &["pair"]).unwrap(),
            MemberInfo {
                offset: 8,
                size: 16
            }
        );
        assert_eq!(
            btf.member("outer", &["pair[1]", "b"]).unwrap(),
            MemberInfo {
                offset: 20,
                size: 2
            }
        );
        assert_eq!(btf.member("outer", &["last"]).unwrap().offset, 24);
        assert_eq!(btf.struct_size("outer").unwrap(), 32);
    }

    #[test]
    fn enumerators_resolve_by_name_and_do_not_disturb_type_ids() {
        let mut b = Builder::new();
        b.int("int", 4); // 1
        b.enumeration(
            "nf_ct_ext_id",
            &[("NF_CT_EXT_HELPER", 0), ("NF_CT_EXT_ACCT", 3)],
        ); // 2
        b.composite(false, "after", 4, &[("x", 1, 0)]); // 3
        let btf = Btf::parse(&b.build(), None).unwrap();
        assert_eq!(btf.enumerator("NF_CT_EXT_ACCT"), Some(3));
        assert_eq!(btf.enumerator("NF_CT_EXT_HELPER"), Some(0));
        assert_eq!(btf.enumerator("NF_CT_EXT_TSTAMP"), None);
        assert_eq!(btf.member("after", &["x"]).unwrap().offset, 0);
    }

    #[test]
    fn missing_struct_member_and_index_are_errors() {
        let btf = sample();
        assert!(matches!(
            btf.member("nope", &["a"]),
            Err(BtfError::NoStruct { .. })
        ));
        assert!(matches!(
            btf.member("outer", &["zzz"]),
            Err(BtfError::NoMember { .. })
        ));
        assert!(matches!(
            btf.member("outer", &["pair[2]"]),
            Err(BtfError::NoMember { .. })
        ));
    }

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        assert!(Btf::parse(&[0u8; 3], None).is_err());
        let mut bytes = sample_bytes();
        bytes.truncate(40);
        assert!(Btf::parse(&bytes, None).is_err());
        let mut bytes = sample_bytes();
        bytes[0] = 0;
        assert!(matches!(
            Btf::parse(&bytes, None),
            Err(BtfError::Malformed { .. })
        ));
    }

    fn sample_bytes() -> Vec<u8> {
        let mut b = Builder::new();
        b.int("int", 4);
        b.composite(false, "s", 4, &[("a", 1, 0)]);
        b.build()
    }

    /// Split BTF (a module's) on top of a base: ids and string offsets continue the base's,
    /// and names may point into the base's string table.
    #[test]
    fn split_btf_finds_functions_and_base_named_members() {
        let base_bytes = sample_bytes(); // strings "\0int\0s\0a\0"; types 1 int, 2 struct s
        let base = Btf::parse(&base_bytes, None).unwrap();
        let base_str_len = 9u32;
        let mut types = Vec::new();
        let mut push = |words: &[u32]| {
            for w in words {
                types.extend_from_slice(&w.to_le_bytes());
            }
        };
        // 3: FUNC_PROTO returning int, no params
        push(&[0, KIND_FUNC_PROTO << 24, 1]);
        // 4: FUNC "f" (own string table, offset 1) of type 3
        push(&[base_str_len + 1, KIND_FUNC << 24, 3]);
        // 5: struct "m" (own, offset 3) with member named "a" from the base table (offset 7)
        push(&[base_str_len + 3, (KIND_STRUCT << 24) | 1, 4, 7, 1, 0]);
        let strings = b"\0f\0m\0";
        let mut blob = Vec::new();
        blob.extend_from_slice(&BTF_MAGIC.to_le_bytes());
        blob.extend_from_slice(&[1, 0]);
        let tl = u32::try_from(types.len()).unwrap();
        let sl = u32::try_from(strings.len()).unwrap();
        for v in [24, 0, tl, tl, sl] {
            blob.extend_from_slice(&v.to_le_bytes());
        }
        blob.extend_from_slice(&types);
        blob.extend_from_slice(strings);
        let split = Btf::parse(&blob, Some(&base)).unwrap();
        assert_eq!(split.func_id("f"), Some(4));
        assert!(split.func_in_split("f"));
        assert_eq!(split.func_id("nope"), None);
        assert_eq!(
            split.member("m", &["a"]).unwrap(),
            MemberInfo { offset: 0, size: 4 }
        );
        assert!(split.has_struct("s"));
    }

    #[test]
    fn running_kernel_describes_conntrack_structs() {
        let Ok(btf) = Btf::from_sys_fs() else {
            panic!("{VMLINUX_BTF} is required on the machines nattrace is tested on");
        };
        let nfct = btf.member("sk_buff", &["_nfct"]).unwrap();
        assert_eq!(nfct.size, 8);
        let orig = btf.member("nf_conn", &["tuplehash[0]", "tuple"]).unwrap();
        let reply = btf.member("nf_conn", &["tuplehash[1]", "tuple"]).unwrap();
        assert!(reply.offset > orig.offset);
        assert_eq!(btf.struct_size("nf_conntrack_tuple").unwrap(), 40);
        assert_eq!(
            btf.member("nf_conntrack_tuple", &["dst", "protonum"])
                .unwrap()
                .size,
            1
        );
    }
}
