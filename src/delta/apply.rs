//! Streaming decoder: applies op blocks to a memory-mapped base, writing the result to any
//! `Write` (a temp file) and hashing it on the way, so neither side ever holds a whole file.

use std::io::Write;

use super::DeltaError;
use super::ops::{Block, DeltaStats, Op, open_block, parse_ops};
use crate::hash::{ContentHash, Hasher};

pub struct Applier<'a, W: Write> {
    base: &'a [u8],
    out: W,
    hasher: Hasher,
    written: u64,
    limit: u64,
    stats: DeltaStats,
}

impl<'a, W: Write> Applier<'a, W> {
    /// `limit` is the size the sender announced: a delta that would write more is refused.
    pub fn new(base: &'a [u8], out: W, limit: u64) -> Self {
        Applier { base, out, hasher: Hasher::new(), written: 0, limit, stats: DeltaStats::default() }
    }

    pub fn block(&mut self, b: &Block) -> Result<(), DeltaError> {
        let raw = open_block(b)?;
        for op in parse_ops(&raw) {
            let bytes: &[u8] = match op? {
                Op::Literal(l) => {
                    self.stats.literal += l.len() as u64;
                    l
                }
                Op::Copy { offset, len } => {
                    let base_len = self.base.len() as u64;
                    let end = offset
                        .checked_add(len)
                        .filter(|&e| e <= base_len)
                        .ok_or(DeltaError::CopyOutOfBounds { offset, len, base_len })?;
                    self.stats.matched += len;
                    &self.base[offset as usize..end as usize]
                }
            };
            self.written += bytes.len() as u64;
            if self.written > self.limit {
                return Err(DeltaError::TooLong { limit: self.limit });
            }
            self.hasher.update(bytes);
            self.out.write_all(bytes)?;
        }
        Ok(())
    }

    /// Returns the hash and length of what was written, the stats, and the writer.
    pub fn finish(mut self) -> Result<(ContentHash, u64, DeltaStats, W), DeltaError> {
        self.out.flush()?;
        Ok((self.hasher.finish(), self.written, self.stats, self.out))
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Codec, encode_delta, encode_whole, signature};
    use super::*;
    use proptest::prelude::*;

    fn roundtrip(base: &[u8], new: &[u8]) -> DeltaStats {
        let sig = signature::compute(base);
        let mut blocks = Vec::new();
        let stats = encode_delta(&sig, new, |b, _| {
            blocks.push(b);
            Ok(())
        })
        .unwrap();
        let mut a = Applier::new(base, Vec::new(), new.len() as u64);
        for b in &blocks {
            a.block(b).unwrap();
        }
        let (h, n, applied, out) = a.finish().unwrap();
        assert_eq!(out, new);
        assert_eq!(n, new.len() as u64);
        assert_eq!(h, ContentHash::of(new));
        assert_eq!(applied, stats);
        stats
    }

    fn pseudo_random(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn small_edit_in_big_file_sends_little_across_windows() {
        // 20 MiB spans three windows; a 1 KiB insert shifts everything after it.
        let base = pseudo_random(20 << 20, 7);
        let mut new = base.clone();
        let at = 9 << 20;
        new.splice(at..at, pseudo_random(1024, 9));
        let s = roundtrip(&base, &new);
        assert!(s.literal < 8 * 1024, "literal {} for a 1 KiB insert", s.literal);
    }

    #[test]
    fn whole_is_a_delta_of_literals() {
        let data = pseudo_random(3 << 20, 3);
        let mut blocks = Vec::new();
        encode_whole(&data, |b, _| {
            blocks.push(b);
            Ok(())
        })
        .unwrap();
        let mut a = Applier::new(&[], Vec::new(), data.len() as u64);
        for b in &blocks {
            a.block(b).unwrap();
        }
        assert_eq!(a.finish().unwrap().3, data);
    }

    #[test]
    fn hostile_blocks_are_refused() {
        let base = vec![1u8; 100];
        let mut a = Applier::new(&base, Vec::new(), 1000);
        // copy past the end of the base
        let bad = Block { codec: Codec::Raw, bytes: vec![0, 90, 20] };
        assert!(matches!(a.block(&bad), Err(DeltaError::CopyOutOfBounds { .. })));
        let mut a = Applier::new(&base, Vec::new(), 10);
        let long = Block { codec: Codec::Raw, bytes: vec![0, 0, 50] };
        assert!(matches!(a.block(&long), Err(DeltaError::TooLong { .. })));
        let mut a = Applier::new(&base, Vec::new(), 10);
        let junk = Block { codec: Codec::Zstd, bytes: vec![1, 2, 3] };
        assert!(a.block(&junk).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn delta_then_apply_reproduces_random_edits(
            seed in any::<u64>(),
            len in 0usize..200_000,
            edits in prop::collection::vec((any::<u32>(), 0usize..3000, 0u8..3), 0..8),
        ) {
            let base = pseudo_random(len, seed);
            let mut new = base.clone();
            for (i, (pos, n, kind)) in edits.into_iter().enumerate() {
                let pos = if new.is_empty() { 0 } else { pos as usize % new.len() };
                let fresh = pseudo_random(n, seed ^ i as u64);
                match kind {
                    0 => { new.splice(pos..pos, fresh); }
                    1 => { let end = (pos + n).min(new.len()); new.drain(pos..end); }
                    _ => { let end = (pos + n).min(new.len()); new.splice(pos..end, fresh); }
                }
            }
            roundtrip(&base, &new);
        }
    }
}
