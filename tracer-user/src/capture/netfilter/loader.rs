//! Loads one program (the netfilter one, or the fentry backend's fexit one) from the
//! embedded eBPF object.
//!
//! aya 0.14 can neither load nor attach `BPF_PROG_TYPE_NETFILTER`, and aya-obj rejects a
//! `netfilter` section, so the program sits under a section aya-obj knows (`classifier/…`) and
//! this loader does what `EbpfLoader` would, with the right program type:
//! parse with aya-obj, patch the offsets global, size the ring buffer, create the maps, write
//! and freeze global data (aya's own `finalize` is private), relocate, then `BPF_PROG_LOAD`.

use std::{
    collections::{HashMap, HashSet},
    os::fd::{AsFd, AsRawFd, OwnedFd},
};

use aya::maps::{Map, MapData, PerCpuArray, RingBuf};
use aya_obj::{EbpfSectionKind, Object};
use tracer_common::{EndConfig, ProgramConfig, names};

use super::sys;
use crate::capture::CaptureError;

/// The program and the maps it uses, created in the kernel, not yet attached.
pub struct LoadedProgram {
    pub prog: OwnedFd,
    pub events: RingBuf<MapData>,
    pub lost: PerCpuArray<MapData, u64>,
    /// Ends ring (used only by the fentry backend's end program).
    pub ends: RingBuf<MapData>,
}

/// What the end program (fentry on nf_ct_destroy) needs; `Default` when it is not loaded.
#[derive(Clone, Copy, Debug)]
pub struct EndSpec {
    pub config: EndConfig,
    /// Ends ring size: a power-of-two multiple of the page size.
    pub ring_bytes: u32,
}

impl Default for EndSpec {
    fn default() -> Self {
        Self {
            config: EndConfig::default(),
            ring_bytes: 4096,
        }
    }
}

/// Loads program `program` of `object` (the tracer-ebpf ELF) as `kind`, with `config` as its
/// offsets global and a ring buffer of `ring_bytes` (a power-of-two multiple of the page
/// size).
pub fn load(
    object: &[u8],
    config: &ProgramConfig,
    ring_bytes: u32,
    program: &str,
    kind: sys::ProgKind<'_>,
    end: &EndSpec,
) -> Result<LoadedProgram, CaptureError> {
    let obj_err = |what: &str, e: &dyn std::fmt::Display| CaptureError::Object {
        reason: format!("{what}: {e}"),
    };
    let mut obj = Object::parse(object).map_err(|e| obj_err("parse", &e))?;

    // SAFETY-free byte view of a plain `#[repr(C)]` struct without padding.
    let config_bytes = config_bytes(config);
    let end_bytes = [
        end.config.ct_ext.to_ne_bytes(),
        end.config.ext_acct_slot.to_ne_bytes(),
    ]
    .concat();
    obj.patch_map_data(HashMap::from([
        (names::CONFIG_GLOBAL, (config_bytes.as_slice(), true)),
        (names::END_CONFIG_GLOBAL, (end_bytes.as_slice(), true)),
    ]))
    .map_err(|e| obj_err("patch offsets", &e))?;
    obj.maps
        .get_mut(names::ENDS_MAP)
        .ok_or_else(|| CaptureError::Object {
            reason: format!("no map {}", names::ENDS_MAP),
        })?
        .set_max_entries(end.ring_bytes);
    obj.maps
        .get_mut(names::EVENTS_MAP)
        .ok_or_else(|| CaptureError::Object {
            reason: format!("no map {}", names::EVENTS_MAP),
        })?
        .set_max_entries(ring_bytes);

    let mut maps: HashMap<String, MapData> = HashMap::new();
    for (name, map) in &obj.maps {
        let data = MapData::create(map.clone(), name, None).map_err(|e| CaptureError::Kernel {
            step: "create map",
            detail: format!("{name}: {e}"),
        })?;
        finalize_global(&data, map)?;
        maps.insert(name.clone(), data);
    }

    let text_sections: HashSet<usize> = obj.functions.keys().map(|(section, _)| *section).collect();
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

    let name = program;
    let program = obj.programs.get(name).ok_or_else(|| CaptureError::Object {
        reason: format!("no program {name}"),
    })?;
    let function =
        obj.functions
            .get(&program.function_key())
            .ok_or_else(|| CaptureError::Object {
                reason: "program has no instructions".into(),
            })?;
    let prog =
        sys::prog_load(kind, name, &function.instructions, &program.license).map_err(|f| {
            CaptureError::Kernel {
                step: match kind {
                    sys::ProgKind::Netfilter => "load netfilter program",
                    sys::ProgKind::Tracing { .. } => "load tracing program",
                },
                detail: format!("{}\n{}", f.error, f.verifier_log),
            }
        })?;

    let take = |name: &str, maps: &mut HashMap<String, MapData>| {
        maps.remove(name).ok_or_else(|| CaptureError::Object {
            reason: format!("no map {name}"),
        })
    };
    let events =
        RingBuf::try_from(Map::RingBuf(take(names::EVENTS_MAP, &mut maps)?)).map_err(|e| {
            CaptureError::Kernel {
                step: "open ring buffer",
                detail: e.to_string(),
            }
        })?;
    let lost = PerCpuArray::try_from(Map::PerCpuArray(take(names::LOST_MAP, &mut maps)?)).map_err(
        |e| CaptureError::Kernel {
            step: "open loss counter",
            detail: e.to_string(),
        },
    )?;
    let ends = RingBuf::try_from(Map::RingBuf(take(names::ENDS_MAP, &mut maps)?)).map_err(|e| {
        CaptureError::Kernel {
            step: "open ends ring buffer",
            detail: e.to_string(),
        }
    })?;
    Ok(LoadedProgram {
        prog,
        events,
        lost,
        ends,
    })
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
            detail: e.to_string(),
        })?;
    }
    if kind == EbpfSectionKind::Rodata {
        sys::map_freeze(fd).map_err(|e| CaptureError::Kernel {
            step: "freeze .rodata",
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
        };
        let b = config_bytes(&c);
        assert_eq!(b.len(), size_of::<ProgramConfig>());
        assert_eq!(&b[0..4], &1u32.to_ne_bytes());
        assert_eq!(&b[20..24], &6u32.to_ne_bytes());
        assert_eq!(&b[24..32], &7u64.to_ne_bytes());
    }

    #[test]
    fn embedded_object_has_the_program_maps_and_offsets_global() {
        let obj =
            Object::parse(crate::capture::netfilter::EBPF_OBJECT).expect("embedded object parses");
        assert!(obj.programs.contains_key(names::PROGRAM));
        assert!(obj.programs.contains_key(names::FEXIT_PROGRAM));
        assert!(obj.programs.contains_key(names::END_PROGRAM));
        assert!(obj.maps.contains_key(names::ENDS_MAP));
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
