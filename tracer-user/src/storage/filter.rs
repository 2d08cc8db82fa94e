//! Binary fuse filters (Graf and Lemire, "Binary Fuse Filters: Fast and Smaller Than Xor
//! Filters", 2022) with 8-bit fingerprints, over 64-bit keys: about 9 bits per key and a
//! false-positive rate of about 2^-8 (0.39 %), never a false negative.
//!
//! Construction uses the `xorf` crate. The lookup is written out here, from the bytes as
//! stored in a segment, so that FORMAT.md describes it completely: a reader does not need
//! `xorf` (or Rust) to use a segment's filters.

use std::net::IpAddr;

use xorf::BinaryFuse8;

/// Size of the filter descriptor in bytes (seed, segment length, mask, segment count length,
/// number of fingerprints).
pub const DESCRIPTOR_LEN: usize = 24;

/// A filter as stored: its descriptor and fingerprints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fuse8 {
    /// Hash seed.
    pub seed: u64,
    /// Length of one segment of the fingerprint array (a power of two).
    pub segment_length: u32,
    /// `segment_length - 1`.
    pub segment_length_mask: u32,
    /// Number of segments times `segment_length` (the range of the first position).
    pub segment_count_length: u32,
    /// The fingerprints; empty for a filter over no keys (it contains nothing).
    pub fingerprints: Vec<u8>,
}

impl Fuse8 {
    /// A filter holding `keys` (duplicates allowed).
    #[must_use]
    pub fn build(mut keys: Vec<u64>) -> Self {
        keys.sort_unstable();
        keys.dedup();
        if keys.is_empty() {
            return Self {
                seed: 0,
                segment_length: 0,
                segment_length_mask: 0,
                segment_count_length: 0,
                fingerprints: Vec::new(),
            };
        }
        let f = BinaryFuse8::try_from(&keys).expect("construction succeeds on distinct keys");
        Self {
            seed: f.descriptor.seed,
            segment_length: f.descriptor.segment_length,
            segment_length_mask: f.descriptor.segment_length_mask,
            segment_count_length: f.descriptor.segment_count_length,
            fingerprints: f.fingerprints.into_vec(),
        }
    }

    /// `key` may be in the set (false positives at about 0.39 %); `false` means it is not.
    #[must_use]
    pub fn contains(&self, key: u64) -> bool {
        if self.fingerprints.is_empty() {
            return false;
        }
        let hash = mix64(key.wrapping_add(self.seed));
        let fp = (hash ^ (hash >> 32)) as u8;
        let h0 = ((u128::from(hash) * u128::from(self.segment_count_length)) >> 64) as u32;
        let h1 = (h0.wrapping_add(self.segment_length))
            ^ (((hash >> 18) as u32) & self.segment_length_mask);
        let h2 = (h0.wrapping_add(self.segment_length.wrapping_mul(2)))
            ^ ((hash as u32) & self.segment_length_mask);
        let at = |i: u32| self.fingerprints.get(i as usize).copied();
        match (at(h0), at(h1), at(h2)) {
            (Some(a), Some(b), Some(c)) => fp ^ a ^ b ^ c == 0,
            // A position outside the array: the descriptor is damaged. Say "maybe" so that
            // damage never hides a record; the section checksum reports it.
            _ => true,
        }
    }

    /// The stored bytes: descriptor then fingerprints.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.seed.to_le_bytes());
        out.extend_from_slice(&self.segment_length.to_le_bytes());
        out.extend_from_slice(&self.segment_length_mask.to_le_bytes());
        out.extend_from_slice(&self.segment_count_length.to_le_bytes());
        let n = u32::try_from(self.fingerprints.len()).expect("filters hold fewer than 2^32 bytes");
        out.extend_from_slice(&n.to_le_bytes());
        out.extend_from_slice(&self.fingerprints);
    }

    /// Parses the stored bytes; `None` when the lengths do not add up.
    #[must_use]
    pub fn decode(b: &[u8]) -> Option<Self> {
        let d = b.get(..DESCRIPTOR_LEN)?;
        let u32_at = |i: usize| u32::from_le_bytes(d[i..i + 4].try_into().expect("4 bytes"));
        let n = u32_at(20) as usize;
        let fingerprints = b.get(DESCRIPTOR_LEN..)?;
        if fingerprints.len() != n {
            return None;
        }
        Some(Self {
            seed: u64::from_le_bytes(d[0..8].try_into().expect("8 bytes")),
            segment_length: u32_at(8),
            segment_length_mask: u32_at(12),
            segment_count_length: u32_at(16),
            fingerprints: fingerprints.to_vec(),
        })
    }
}

/// The murmur3 64-bit finaliser.
fn mix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

/// The 64-bit filter key of an address and port (port 0 for the address-only filter).
///
/// IPv4 `a.b.c.d:p`: `0x04 << 56 | u32(a.b.c.d) << 16 | p`, exact. IPv6: with `hi` and `lo`
/// the address's first and last 8 bytes read big-endian, `0x06 << 56 ^ hi ^ lo.rotate_left(23)
/// ^ p << 40`; different IPv6 keys may fold to one value, which only adds false positives.
#[must_use]
pub fn key(ip: IpAddr, port: u16) -> u64 {
    match ip {
        IpAddr::V4(v4) => (0x04 << 56) | (u64::from(u32::from(v4)) << 16) | u64::from(port),
        IpAddr::V6(v6) => {
            let a = u128::from(v6);
            let hi = (a >> 64) as u64;
            let lo = a as u64;
            (0x06 << 56) ^ hi ^ lo.rotate_left(23) ^ (u64::from(port) << 40)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use xorf::Filter;

    #[test]
    fn lookup_agrees_with_xorf_and_has_no_false_negatives() {
        let keys: Vec<u64> = (0..50_000u64)
            .map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15))
            .collect();
        let reference = BinaryFuse8::try_from(&keys).unwrap();
        let ours = Fuse8::build(keys.clone());
        for k in &keys {
            assert!(ours.contains(*k));
        }
        let mut false_positives = 0;
        for k in 1_000_000..1_100_000u64 {
            assert_eq!(ours.contains(k), reference.contains(&k), "key {k}");
            false_positives += usize::from(ours.contains(k));
        }
        // 2^-8 of 100 000 is 390; allow for chance.
        assert!(false_positives < 600, "{false_positives} false positives");
    }

    #[test]
    fn round_trips_and_empty_contains_nothing() {
        let f = Fuse8::build(vec![key("203.0.113.7".parse().unwrap(), 40123), 7, 7]);
        let mut b = Vec::new();
        f.encode(&mut b);
        assert_eq!(Fuse8::decode(&b), Some(f.clone()));
        assert!(f.contains(key("203.0.113.7".parse().unwrap(), 40123)));
        assert!(Fuse8::decode(&b[..b.len() - 1]).is_none());
        let empty = Fuse8::build(Vec::new());
        assert!(!empty.contains(0));
    }

    #[test]
    fn keys_differ_by_family_address_and_port() {
        let v4 = key("203.0.113.7".parse().unwrap(), 1);
        assert_eq!(v4, 0x0400_CB00_7107_0001);
        assert_ne!(v4, key("203.0.113.7".parse().unwrap(), 2));
        assert_ne!(
            key("2001:db8::1".parse().unwrap(), 1),
            key("2001:db8::2".parse().unwrap(), 1)
        );
    }
}
