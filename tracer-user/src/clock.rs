//! Turning the kernel's clock into wall-clock UTC.
//!
//! The eBPF program stamps each record with `bpf_ktime_get_boot_ns()` (CLOCK_BOOTTIME: it
//! never jumps and keeps counting across suspend). The agent converts these stamps to UTC
//! with an offset `REALTIME - BOOTTIME` that it measures itself:
//!
//! 1. read BOOTTIME, REALTIME, BOOTTIME in a row, several times;
//! 2. keep the sample with the narrowest BOOTTIME window and take
//!    `offset = REALTIME - (b1 + b2) / 2`; the error of that sample is at most `(b2 - b1) / 2`
//!    (typically well under a microsecond);
//! 3. re-measure every second, so NTP slewing (at most 500 ppm, i.e. 0.5 ms per second)
//!    adds at most half a millisecond between two measurements.
//!
//! Expected error of a converted time: under 1 ms, relative to the host's own REALTIME clock.
//! A step of the wall clock (settimeofday, NTP step) is taken into account at the next
//! re-measurement; records drained in between are off by that step. Ends reported by
//! ctnetlink carry the kernel's own REALTIME stamps (`nf_conntrack_timestamp`) and need no
//! conversion.

/// Nanoseconds since the Unix epoch on CLOCK_REALTIME.
#[must_use]
pub fn now_unix_ns() -> i64 {
    clock_ns(libc::CLOCK_REALTIME)
}

/// Nanoseconds on CLOCK_BOOTTIME, the clock of the eBPF records.
#[must_use]
pub fn now_boot_ns() -> i64 {
    clock_ns(libc::CLOCK_BOOTTIME)
}

fn clock_ns(clock: libc::clockid_t) -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec; these clocks always exist on Linux.
    let rc = unsafe { libc::clock_gettime(clock, &raw mut ts) };
    assert_eq!(rc, 0, "clock_gettime({clock}) failed");
    ts.tv_sec * 1_000_000_000 + ts.tv_nsec
}

/// The measured offset from CLOCK_BOOTTIME to UTC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootToUtc {
    /// `REALTIME - BOOTTIME`, nanoseconds.
    pub offset_ns: i64,
    /// Bound on the measurement error, nanoseconds.
    pub error_ns: i64,
}

impl BootToUtc {
    /// Measures the offset now (best of 7 samples).
    #[must_use]
    pub fn measure() -> Self {
        Self::measure_with(|| (now_boot_ns(), now_unix_ns(), now_boot_ns()))
    }

    /// Measures with a sampling function returning (BOOTTIME, REALTIME, BOOTTIME).
    pub fn measure_with(mut sample: impl FnMut() -> (i64, i64, i64)) -> Self {
        let mut best = Self {
            offset_ns: 0,
            error_ns: i64::MAX,
        };
        for _ in 0..7 {
            let (b1, real, b2) = sample();
            let error_ns = ((b2 - b1).max(0) + 1) / 2;
            if error_ns < best.error_ns {
                best = Self {
                    offset_ns: real - (b1 + (b2 - b1) / 2),
                    error_ns,
                };
            }
        }
        best
    }

    /// Converts a CLOCK_BOOTTIME stamp to nanoseconds since the Unix epoch, UTC.
    #[must_use]
    pub fn to_unix_ns(&self, boot_ns: u64) -> i64 {
        i64::try_from(boot_ns)
            .unwrap_or(i64::MAX)
            .saturating_add(self.offset_ns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_narrowest_sample() {
        let samples = [
            (100, 1_000_150, 200),
            (300, 1_000_305, 310),
            (400, 1_000_500, 700),
        ];
        let mut i = 0;
        let m = BootToUtc::measure_with(|| {
            let s = samples[i % samples.len()];
            i += 1;
            s
        });
        assert_eq!(m.offset_ns, 1_000_000);
        assert_eq!(m.error_ns, 5);
        assert_eq!(m.to_unix_ns(42), 1_000_042);
    }

    #[test]
    fn converted_now_matches_realtime_within_a_millisecond() {
        let m = BootToUtc::measure();
        assert!(
            m.error_ns < 1_000_000,
            "measurement window {} ns",
            m.error_ns
        );
        let boot = u64::try_from(now_boot_ns()).unwrap();
        let real = now_unix_ns();
        assert!((m.to_unix_ns(boot) - real).abs() < 1_000_000);
    }
}
