//! Inclusion proofs of a sealed segment's records (format version 2): the audit path from a
//! record's leaf to the segment root, which the segment's checkpoint signs.
//!
//! The segment's tree has one leaf per row, in row order, then the events leaf (FORMAT.md,
//! "Merkle trees"). A path needs the hashes of the sibling subtrees only: a subtree that is
//! exactly one block is that block's stored root (its fence), so proving a record reads its
//! own block and at most the last one, never the whole segment. Every path is checked
//! against the root before it is handed out, so a damaged fence cannot yield a bad proof.

use std::collections::HashMap;

use super::columnar::{ColumnarError, Fence, ReadAt, Row, SealedSegment};
use super::merkle::{self, Hash};
use super::record;

/// A record's (or the events') place in its segment's tree and the audit path to the root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inclusion {
    /// Leaf index in the segment's tree.
    pub index: u64,
    /// Leaves in the tree: rows + 1.
    pub tree_size: u64,
    /// The audit path, leaf's sibling first (RFC 9162 section 2.1.3).
    pub path: Vec<Hash>,
}

/// Builds inclusion proofs for one sealed segment.
pub struct Prover<'a> {
    seg: &'a SealedSegment,
    src: &'a dyn ReadAt,
    fences: Vec<Fence>,
    /// First leaf index of each block.
    starts: Vec<u64>,
    /// Record leaves of the blocks read so far.
    leaves: HashMap<usize, Vec<Hash>>,
}

/// Why a proof cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum ProveError {
    /// The segment cannot be read or decoded there.
    #[error("offset {0}: {1}")]
    Read(u64, #[source] ColumnarError),
    /// The segment predates record-level hashing.
    #[error("format version {0} segments hash whole blocks, so single records cannot be proven")]
    Version(u32),
    /// The stored hashes do not lead to the segment root (the segment is damaged).
    #[error("the audit path of leaf {0} does not lead to the segment root (run nattrace verify)")]
    Mismatch(u64),
}

impl<'a> Prover<'a> {
    /// A prover for `seg` (its header read: [`SealedSegment::open`]) read from `src`.
    pub fn new(seg: &'a SealedSegment, src: &'a dyn ReadAt) -> Result<Self, ProveError> {
        if seg.version < 2 {
            return Err(ProveError::Version(seg.version));
        }
        let fences = seg.fences(src).map_err(|(at, e)| ProveError::Read(at, e))?;
        let mut starts = Vec::with_capacity(fences.len());
        let mut n = 0u64;
        for f in &fences {
            starts.push(n);
            n += u64::from(f.rows);
        }
        Ok(Self {
            seg,
            src,
            fences,
            starts,
            leaves: HashMap::new(),
        })
    }

    /// Leaves in the segment's tree: its rows, then the events leaf.
    #[must_use]
    pub fn tree_size(&self) -> u64 {
        self.seg.summary.rows + 1
    }

    /// The segment's blocks.
    #[must_use]
    pub fn fences(&self) -> &[Fence] {
        &self.fences
    }

    /// Leaf index of row `row` of block `block`.
    #[must_use]
    pub fn leaf_index(&self, block: usize, row: usize) -> u64 {
        self.starts[block] + row as u64
    }

    /// The rows of block `block`, decoded (and their leaves remembered for proofs).
    pub fn rows(&mut self, block: usize) -> Result<Vec<Row>, ProveError> {
        let rows = self
            .seg
            .read_block(self.src, &self.fences[block])
            .map_err(|(at, e)| ProveError::Read(at, e))?;
        self.leaves
            .insert(block, rows.iter().map(record::leaf).collect());
        Ok(rows)
    }

    /// The proof of leaf `index` (a row, or `rows` for the events leaf), checked against
    /// the segment root.
    pub fn prove(&mut self, index: u64) -> Result<Inclusion, ProveError> {
        let size = self.tree_size();
        let path = merkle::inclusion_path(index, size, &mut |lo, hi| self.subtree(lo, hi))?;
        let leaf = self.leaf(index)?;
        if !merkle::verify_inclusion(&leaf, index, size, &path, &self.seg.summary.root) {
            return Err(ProveError::Mismatch(index));
        }
        Ok(Inclusion {
            index,
            tree_size: size,
            path,
        })
    }

    fn subtree(&mut self, lo: u64, hi: u64) -> Result<Hash, ProveError> {
        // Copy out what the closures need, so that `leaf` may borrow self mutably.
        let known: Vec<(u64, u64, Hash)> = self
            .starts
            .iter()
            .zip(&self.fences)
            .map(|(&s, f)| (s, s + u64::from(f.rows), f.leaf))
            .collect();
        merkle::subtree_root(
            lo,
            hi,
            &mut |a, b| {
                known
                    .binary_search_by_key(&a, |k| k.0)
                    .ok()
                    .filter(|&j| known[j].1 == b && b > a)
                    .map(|j| known[j].2)
            },
            &mut |i| self.leaf(i),
        )
    }

    fn leaf(&mut self, index: u64) -> Result<Hash, ProveError> {
        if index == self.seg.summary.rows {
            return Ok(self.seg.summary.events_leaf);
        }
        let block = self.starts.partition_point(|&s| s <= index) - 1;
        if !self.leaves.contains_key(&block) {
            self.rows(block)?;
        }
        let leaves = &self.leaves[&block];
        let at = (index - self.starts[block]) as usize;
        leaves.get(at).copied().ok_or(ProveError::Mismatch(index))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::binding::Binding;
    use crate::storage::CoverageEvent;
    use crate::storage::columnar::{self, SegmentHeader};

    fn rows(n: u64) -> Vec<Row> {
        (0..n)
            .map(|i| Row {
                binding: Binding {
                    id: i + 1,
                    proto: 17,
                    start_ns: 1_000_000 * i as i64,
                    end_ns: Some(1_000_000 * i as i64 + 5_000_000),
                    orig: crate::binding::Tuple {
                        src: std::net::Ipv4Addr::new(100, 64, (i >> 8) as u8, i as u8).into(),
                        dst: std::net::Ipv4Addr::new(192, 0, 2, 1).into(),
                        src_port: 1000,
                        dst_port: 53,
                    },
                    reply: crate::binding::Tuple {
                        src: std::net::Ipv4Addr::new(192, 0, 2, 1).into(),
                        dst: std::net::Ipv4Addr::new(203, 0, 113, 1).into(),
                        src_port: 53,
                        dst_port: (1024 + i % 60000) as u16,
                    },
                    status: 0x1b8,
                    ..Binding::EMPTY
                },
                carried: false,
            })
            .collect()
    }

    #[test]
    fn every_record_of_a_multi_block_segment_proves_against_the_root() {
        let n = columnar::BLOCK_ROWS as u64 * 2 + 77;
        let header = SegmentHeader {
            seq: 1,
            writer_id: [7; 16],
            prev_seq: 0,
            prev_root: [0; 32],
            window_start_ns: 0,
            window_end_ns: 1_000_000 * n as i64 + 10_000_000,
        };
        let events = [CoverageEvent::Heartbeat { t_ns: 5 }];
        let (bytes, root) = columnar::encode_segment(&header, rows(n), &events);
        let seg = SealedSegment::open(&bytes).unwrap();
        assert_eq!(seg.summary.root, root);
        let mut p = Prover::new(&seg, &bytes).unwrap();
        assert_eq!(p.tree_size(), n + 1);
        let mut checked = 0;
        for block in 0..p.fences().len() {
            let rows = p.rows(block).unwrap();
            for (j, r) in rows.iter().enumerate().step_by(997) {
                let i = p.leaf_index(block, j);
                let proof = p.prove(i).unwrap();
                assert!(merkle::verify_inclusion(
                    &record::leaf(r),
                    i,
                    n + 1,
                    &proof.path,
                    &root
                ));
                checked += 1;
            }
        }
        assert!(checked > 30);
        let ev = p.prove(n).unwrap();
        assert!(merkle::verify_inclusion(
            &record::events_leaf_of_records(&record::events_data(&events)[1..]),
            n,
            n + 1,
            &ev.path,
            &root
        ));
    }
}
