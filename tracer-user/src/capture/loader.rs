//! Loads the capture programs from the embedded eBPF object.
//!
//! aya 0.14 can neither load nor attach `BPF_PROG_TYPE_NETFILTER`, cannot load a tracing
//! program against a module's BTF object, and aya-obj rejects a `netfilter` section, so the
//! netfilter program sits under a section aya-obj knows (`classifier/…`) and this loader does
//! what `EbpfLoader` would, with the right program types: parse with aya-obj, patch the
//! offsets global, size the ring buffer, create the maps, write and freeze global data (aya's
//! own `finalize` is private), relocate, then `BPF_PROG_LOAD` each program a backend needs,
//! all sharing the one ring buffer and loss counter.

use std::{
    collections::{HashMap, HashSet},
    os::fd::{AsFd, AsRawFd, OwnedFd},
};

use aya::maps::{Map, MapData, PerCpuArray, RingBuf};
use aya_obj::{EbpfSectionKind, Object};
use tracer_common::{ProgramConfig, names};

use super::{CaptureError, sys};

/// The object with its maps created and relocated, ready to load programs from.
pub struct Loader {
    obj: Object,
    maps: HashMap<String, MapData>,
}

/// The maps every capture program writes to.
pub struct Maps {
    pub events: RingBuf<MapData>,
    pub lost: PerCpuArray<MapData, u64>,
}

impl Loader {
    /// Parses `object` (the tracer-ebpf ELF), patches `config` in as the offsets global,
    /// creates the maps with a ring buffer of `ring_bytes` (a power-of-two multiple of the
    /// page size) and relocates every program against them.
    pub fn new(
        object: &[u8],
        config: &ProgramConfig,
        ring_bytes: u32,
    ) -> Result<Self, CaptureError> {
        let mut obj = Object::parse(object).map_err(|e| obj_err("parse", &e))?;
        let config_bytes = config_bytes(config);
        obj.patch_map_data(HashMap::from([(
            names::CONFIG_GLOBAL,
            (config_bytes.as_slice(), true),
        )]))
        .map_err(|e| obj_err("patch offsets", &e))?;
        obj.maps
            .get_mut(names::EVENTS_MAP)
            .ok_or_else(|| CaptureError::Object {
                reason: format!("no map {}", names::EVENTS_MAP),
            })?
            .set_max_entries(ring_bytes);

        let mut maps: HashMap<String, MapData> = HashMap::new();
        for (name, map) in &obj.maps {
            let data =
                MapData::create(map.clone(), name, None).map_err(|e| CaptureError::Kernel {
                    step: "create map",
                    errno: None,
                    detail: format!("{name}: {e}"),
                })?;
            finalize_global(&data, map)?;
            maps.insert(name.clone(), data);
        }

        let text_sections: HashSet<usize> =
            obj.functions.keys().map(|(section, _)| *section).collect();
        let obj_maps = obj.maps.clone();
        obj.relocate_maps(
            maps.iter().map(|(name, data)| {
                (
                    name.as_str(),
                    data.fd().as_fd().as_raw_fd(),
                    &obj_maps[name],
                )
            }),
            &text_sections,
        )
        .map_err(|e| obj_err("relocate maps", &e))?;
        obj.relocate_calls(&text_sections)
            .map_err(|e| obj_err("relocate calls", &e))?;
        Ok(Self { obj, maps })
    }

    /// Loads program `name` as `kind`; `step` names it in errors.
    pub fn load(
        &self,
        name: &str,
        kind: sys::ProgKind<'_>,
        step: &'static str,
    ) -> Result<OwnedFd, CaptureError> {
        let program = self
            .obj
            .programs
            .get(name)
            .ok_or_else(|| CaptureError::Object {
                reason: format!("no program {name}"),
            })?;
        let function = self
            .obj
            .functions
            .get(&program.function_key())
            .ok_or_else(|| CaptureError::Object {
                reason: format!("program {name} has no instructions"),
            })?;
        sys::prog_load(kind, name, &function.instructions, &program.license).map_err(|f| {
            CaptureError::Kernel {
                step,
                errno: f.error.raw_os_error(),
                detail: if f.verifier_log.is_empty() {
                    f.error.to_string()
                } else {
                    format!("{}\n{}", f.error, f.verifier_log)
                },
            }
        })
    }

    /// The ring buffer and the loss counter, for the agent to read.
    pub fn into_maps(mut self) -> Result<Maps, CaptureError> {
        let mut take = |name: &str| {
            self.maps.remove(name).ok_or_else(|| CaptureError::Object {
                reason: format!("no map {name}"),
            })
        };
        let events = RingBuf::try_from(Map::RingBuf(take(names::EVENTS_MAP)?)).map_err(|e| {
            CaptureError::Kernel {
                step: "open ring buffer",
                errno: None,
                detail: e.to_string(),
            }
        })?;
        let lost =
            PerCpuArray::try_from(Map::PerCpuArray(take(names::LOST_MAP)?)).map_err(|e| {
                CaptureError::Kernel {
                    step: "open loss counter",
                    errno: None,
                    detail: e.to_string(),
                }
            })?;
        Ok(Maps { events, lost })
    }
}

fn obj_err(what: &str, e: &dyn std::fmt::Display) -> CaptureError {
    CaptureError::Object {
        reason: format!("{what}: {e}"),
    }
}

/// Writes a global-data map's initial bytes and freezes `.rodata`, as aya's private
/// `MapData::finalize` does. Without this every global reads as zero, and without the freeze
/// the verifier does not treat the offsets as constants.
fn finalize_global(data: &MapData, map: &aya_obj::Map) -> Result<(), CaptureError> {
    let kind = map.section_kind();
    if !matches!(
        kind,
        EbpfSectionKind::Rodata | EbpfSectionKind::Data | EbpfSectionKind::Bss
    ) {
        return Ok(());
    }
    let fd = data.fd().as_fd();
    if !map.data().is_empty() {
        sys::map_update_key0(fd, map.data()).map_err(|e| CaptureError::Kernel {
            step: "write global data",
            errno: e.raw_os_error(),
            detail: e.to_string(),
        })?;
    }
    if kind == EbpfSectionKind::Rodata {
        sys::map_freeze(fd).map_err(|e| CaptureError::Kernel {
            step: "freeze .rodata",
            errno: e.raw_os_error(),
            detail: e.to_string(),
        })?;
    }
    Ok(())
}

fn config_bytes(config: &ProgramConfig) -> Vec<u8> {
    let ProgramConfig {
        skb_nfct,
        ct_status,
        ct_tuple_orig,
        ct_tuple_reply,
        ct_zone_id,
        ct_mark,
        wakeup_bytes,
        ct_net,
        net_ns_inum,
        netns_ino,
        ct_ext,
        ext_acct_slot,
        ext_tstamp_slot,
    } = *config;
    let mut out = Vec::with_capacity(size_of::<ProgramConfig>());
    for v in [
        skb_nfct,
        ct_status,
        ct_tuple_orig,
        ct_tuple_reply,
        ct_zone_id,
        ct_mark,
    ] {
        out.extend_from_slice(&v.to_ne_bytes());
    }
    out.extend_from_slice(&wakeup_bytes.to_ne_bytes());
    for v in [
        ct_net,
        net_ns_inum,
        netns_ino,
        ct_ext,
        ext_acct_slot,
        ext_tstamp_slot,
    ] {
        out.extend_from_slice(&v.to_ne_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_bytes_follow_the_repr_c_layout() {
        let c = ProgramConfig {
            skb_nfct: 1,
            ct_status: 2,
            ct_tuple_orig: 3,
            ct_tuple_reply: 4,
            ct_zone_id: 5,
            ct_mark: 6,
            wakeup_bytes: 7,
            ct_net: 8,
            net_ns_inum: 9,
            netns_ino: 10,
            ct_ext: 11,
            ext_acct_slot: 12,
            ext_tstamp_slot: 13,
        };
        let b = config_bytes(&c);
        assert_eq!(b.len(), size_of::<ProgramConfig>());
        assert_eq!(&b[0..4], &1u32.to_ne_bytes());
        assert_eq!(&b[20..24], &6u32.to_ne_bytes());
        assert_eq!(&b[24..32], &7u64.to_ne_bytes());
        assert_eq!(&b[32..36], &8u32.to_ne_bytes());
        assert_eq!(&b[40..44], &10u32.to_ne_bytes());
        assert_eq!(&b[52..56], &13u32.to_ne_bytes());
    }

    #[test]
    fn embedded_object_has_the_program_maps_and_offsets_global() {
        let obj = Object::parse(crate::capture::EBPF_OBJECT).expect("embedded object parses");
        for program in [
            names::PROGRAM,
            names::FEXIT_PROGRAM,
            names::END_PROGRAM,
            names::KPROBE_START_PROGRAM,
            names::KPROBE_END_PROGRAM,
        ] {
            assert!(obj.programs.contains_key(program), "{program}");
        }
        assert!(obj.maps.contains_key(names::EVENTS_MAP));
        assert!(obj.maps.contains_key(names::LOST_MAP));
        let mut obj = obj;
        let bytes = config_bytes(&ProgramConfig::default());
        obj.patch_map_data(HashMap::from([(
            names::CONFIG_GLOBAL,
            (bytes.as_slice(), true),
        )]))
        .expect("offsets global has the size of ProgramConfig");
    }
}
