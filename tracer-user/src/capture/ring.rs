//! The agent's side of the ring buffer every backend's programs write to, and the attached
//! programs that keep writing while it is held.

use std::os::fd::{AsRawFd as _, BorrowedFd, OwnedFd};

use aya::maps::{MapData, PerCpuArray, RingBuf};
use tracer_common::{EVENT_DST_MANIP, EVENT_END, EndEvent, LOST_END_SLOT, LOST_SLOT, NatEvent};

use super::{
    Capture, CaptureError, CapturedEnd, Lost, StartEvent, layout::TupleLayout, loader::Maps,
};

/// An attached backend: its ring buffer and loss counter, and the fds that keep its programs
/// attached (links, perf events) and loaded.
pub struct RingCapture {
    backend: &'static str,
    captures_ends: bool,
    tuple: TupleLayout,
    events: RingBuf<MapData>,
    lost: PerCpuArray<MapData, u64>,
    /// Closing these detaches the programs.
    attachments: Vec<OwnedFd>,
    /// Programs and module BTF objects, held while attached.
    _held: Vec<OwnedFd>,
    /// Records taken after a DST manip (fentry backend), counted and not forwarded.
    dst_records: u64,
}

impl RingCapture {
    /// Wraps attached programs. `captures_ends`: the programs report ends too.
    pub(crate) fn new(
        backend: &'static str,
        captures_ends: bool,
        tuple: TupleLayout,
        maps: Maps,
        attachments: Vec<OwnedFd>,
        held: Vec<OwnedFd>,
    ) -> Self {
        Self {
            backend,
            captures_ends,
            tuple,
            events: maps.events,
            lost: maps.lost,
            attachments,
            _held: held,
            dst_records: 0,
        }
    }
}

impl Capture for RingCapture {
    fn backend(&self) -> &'static str {
        self.backend
    }

    fn captures_ends(&self) -> bool {
        self.captures_ends
    }

    fn wakeup_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the ring buffer's fd lives as long as `self`.
        unsafe { BorrowedFd::borrow_raw(self.events.as_raw_fd()) }
    }

    fn drain(&mut self, starts: &mut Vec<StartEvent>, ends: &mut Vec<CapturedEnd>) -> usize {
        let mut bad = 0;
        while let Some(item) = self.events.next() {
            if item.len() < size_of::<NatEvent>() {
                bad += 1;
                continue;
            }
            // SAFETY: every record starts with a `NatEvent`; read unaligned because
            // ring-buffer records are only 8-byte aligned by contract.
            let ev = unsafe { item.as_ptr().cast::<NatEvent>().read_unaligned() };
            if ev.flags & EVENT_END != 0 {
                if item.len() < size_of::<EndEvent>() {
                    bad += 1;
                    continue;
                }
                // SAFETY: an end record is one whole `EndEvent`.
                let end = unsafe { item.as_ptr().cast::<EndEvent>().read_unaligned() };
                match self.tuple.decode_end(&end) {
                    Some(end) => ends.push(end),
                    None => bad += 1,
                }
            } else if ev.flags & EVENT_DST_MANIP != 0 {
                // The SRC-manip record of the same entry follows and is the binding.
                self.dst_records += 1;
            } else {
                match self.tuple.decode_event(&ev) {
                    Some(start) => starts.push(start),
                    None => bad += 1,
                }
            }
        }
        bad
    }

    fn lost(&self) -> Result<Lost, CaptureError> {
        let sum = |slot: u32| {
            self.lost
                .get(&slot, 0)
                .map(|per_cpu| per_cpu.iter().sum::<u64>())
                .map_err(|e| CaptureError::Kernel {
                    step: "read loss counter",
                    errno: None,
                    detail: e.to_string(),
                })
        };
        Ok(Lost {
            starts: sum(LOST_SLOT)?,
            ends: sum(LOST_END_SLOT)?,
        })
    }

    fn detach(&mut self) {
        if !self.attachments.is_empty() && self.dst_records > 0 {
            log::debug!(
                "{}: {} records after a DST manip (DNAT) seen and not forwarded",
                self.backend,
                self.dst_records
            );
        }
        self.attachments.clear();
    }
}
