//! Streaming decoder: applies op blocks to a base (a slice or a map of the server's own file, or a
//! client's local file read by `pread`: [`Base`]), writing the result to any `Write` (a temp file)
//! and hashing it on the way, so neither side ever holds a whole file. The new version's signature
//! is built on the way too, so caching it costs no second read.

use std::io::Write;

use fast_rsync::Signature;

use super::DeltaError;
use super::ops::{Block, DeltaStats, Op, open_block, parse_ops};
use super::signature::{self, Builder};
use super::source::{Base, COPY_PIECE};
use crate::hash::{ContentHash, Hasher};

/// Where an [`Applier`] writes: a `Write` that may also use knowing which bytes were copied from
/// where in the base (the server's chunker reuses the base's chunks for them).
pub trait Sink: Write {
    /// `bytes`, copied from the base at `offset`.
    fn copied(&mut self, _offset: u64, bytes: &[u8]) -> std::io::Result<()> {
        self.write_all(bytes)
    }
}

impl Sink for Vec<u8> {}
impl Sink for &mut Vec<u8> {}
impl<W: Write> Sink for std::io::BufWriter<W> {}

pub struct Applier<B, W: Sink> {
    base: B,
    to: Output<W>,
    stats: DeltaStats,
}

/// Where an [`Applier`] puts what it produces: the writer, the hash and the signature.
struct Output<W> {
    out: W,
    hasher: Hasher,
    sig: Option<Builder>,
    /// The base's signature: where a copy takes whole blocks of the base onto the new version's
    /// block grid, their entries are taken from it instead of hashing the bytes again.
    base_sig: Option<Signature>,
    written: u64,
    /// The size the sender announced.
    limit: u64,
}

/// What an [`Applier`] wrote.
pub struct Applied<W> {
    pub hash: ContentHash,
    pub len: u64,
    pub stats: DeltaStats,
    /// The signature of what was written, when a builder was given.
    pub sig: Option<Signature>,
    pub out: W,
}

impl<'a, W: Sink> Applier<&'a [u8], W> {
    /// A base in memory. `limit` is the size the sender announced: a delta that would write more
    /// is refused.
    pub fn new(base: &'a [u8], out: W, limit: u64) -> Self {
        Self::from_base(base, out, limit)
    }
}

impl<B: Base, W: Sink> Applier<B, W> {
    /// Any [`Base`], such as a local file read by `pread` ([`super::FileBase`]).
    pub fn from_base(base: B, out: W, limit: u64) -> Self {
        Applier {
            base,
            to: Output { out, hasher: Hasher::new(), sig: None, base_sig: None, written: 0, limit },
            stats: DeltaStats::default(),
        }
    }

    /// Also builds the signature of the result (see [`super::SigCache::builder_for`]), reusing
    /// the base's signature, if known, for copied blocks.
    pub fn with_signature(mut self, sig: Option<Builder>, base_sig: Option<Signature>) -> Self {
        self.to.sig = sig;
        self.to.base_sig = base_sig;
        self
    }

    pub fn block(&mut self, b: &Block) -> Result<(), DeltaError> {
        let raw = open_block(b)?;
        for op in parse_ops(&raw) {
            match op? {
                Op::Literal(l) => {
                    self.to.reserve(l.len() as u64)?;
                    self.stats.literal += l.len() as u64;
                    self.to.put(None, l)?;
                }
                Op::Copy { offset, len } => {
                    let base_len = self.base.size();
                    let end = offset
                        .checked_add(len)
                        .filter(|&e| e <= base_len)
                        .ok_or(DeltaError::CopyOutOfBounds { offset, len, base_len })?;
                    self.to.reserve(len)?;
                    self.stats.matched += len;
                    // In pieces: one copy may stand for a whole huge file.
                    let mut at = offset;
                    while at < end {
                        let n = (end - at).min(COPY_PIECE as u64);
                        let bytes = self.base.read(at, n as usize)?;
                        self.to.put(Some((at, n)), bytes)?;
                        at += n;
                    }
                }
            }
        }
        Ok(())
    }

    /// Bytes of the result the receiver has already (the part of a cut-off upload it kept):
    /// written, hashed and signed as if they had come as a literal.
    pub fn prefix(&mut self, bytes: &[u8]) -> Result<(), DeltaError> {
        self.to.reserve(bytes.len() as u64)?;
        self.to.put(None, bytes)
    }

    /// The receiver has the first `len` bytes of the result already, in its output (the kept
    /// part of a cut-off download), read and hashed into `hasher` (and fed to the signature
    /// builder given to [`with_signature`](Self::with_signature)): the blocks that follow
    /// produce the rest, and [`finish`](Self::finish) gives the hash of the whole.
    pub fn resume_after(mut self, hasher: Hasher, len: u64) -> Result<Self, DeltaError> {
        self.to.hasher = hasher;
        self.to.reserve(len)?;
        Ok(self)
    }

    pub fn finish(mut self) -> Result<Applied<W>, DeltaError> {
        self.to.out.flush()?;
        Ok(Applied {
            hash: self.to.hasher.finish(),
            len: self.to.written,
            stats: self.stats,
            sig: self.to.sig.map(Builder::finish),
            out: self.to.out,
        })
    }
}

impl<W: Sink> Output<W> {
    /// Counts `len` more bytes against the announced size before they are produced.
    fn reserve(&mut self, len: u64) -> Result<(), DeltaError> {
        self.written = self.written.saturating_add(len);
        if self.written > self.limit {
            return Err(DeltaError::TooLong { limit: self.limit });
        }
        Ok(())
    }

    /// Writes, hashes and signs the bytes of an op (`copy`: where in the base they come from).
    fn put(&mut self, copy: Option<(u64, u64)>, bytes: &[u8]) -> Result<(), DeltaError> {
        self.hasher.update(bytes);
        self.sign(copy, bytes);
        match copy {
            Some((offset, _)) => self.out.copied(offset, bytes)?,
            None => self.out.write_all(bytes)?,
        }
        Ok(())
    }

    /// Feeds the signature builder with what an op wrote.
    fn sign(&mut self, copy: Option<(u64, u64)>, bytes: &[u8]) {
        let Some(b) = &mut self.sig else { return };
        if let (Some((offset, len)), Some((opts, entry, entries))) =
            (copy, self.base_sig.as_ref().and_then(signature::layout))
        {
            let bs = opts.block_size as u64;
            if b.in_step_with(opts) && offset % bs == 0 && len % bs == 0 {
                let from = (offset / bs) as usize * entry;
                if let Some(e) = entries.get(from..from + (len / bs) as usize * entry) {
                    b.append_signed(e);
                    return;
                }
            }
        }
        b.update(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Codec, encode_delta, encode_whole, pseudo_random, signature};
    use super::*;
    use proptest::prelude::*;

    fn roundtrip(base: &[u8], new: &[u8]) -> DeltaStats {
        let sig = signature::compute(base);
        let mut blocks = Vec::new();
        let stats = encode_delta(&sig, new, None, |b, _| {
            blocks.push(b);
            Ok(())
        })
        .unwrap();
        let mut a = Applier::new(base, Vec::new(), new.len() as u64)
            .with_signature(Some(signature::Builder::new(new.len() as u64)), Some(sig.clone()));
        for b in &blocks {
            a.block(b).unwrap();
        }
        let done = a.finish().unwrap();
        assert_eq!(done.out, new);
        assert_eq!(done.len, new.len() as u64);
        assert_eq!(done.hash, ContentHash::of(new));
        assert_eq!(done.stats, stats);
        assert_eq!(done.sig.map(|s| s.into_serialized()), Some(signature::compute(new).into_serialized()));
        stats
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
        encode_whole(&data, None, |b, _| {
            blocks.push(b);
            Ok(())
        })
        .unwrap();
        let mut a = Applier::new(&[], Vec::new(), data.len() as u64);
        for b in &blocks {
            a.block(b).unwrap();
        }
        assert_eq!(a.finish().unwrap().out, data);
    }

    #[test]
    fn a_resumed_apply_hashes_and_signs_the_whole() {
        let data = pseudo_random(3 << 20, 5);
        let from = 1_234_567;
        let mut blocks = Vec::new();
        encode_whole(&data[from..], None, |b, _| {
            blocks.push(b);
            Ok(())
        })
        .unwrap();
        let mut h = Hasher::new();
        h.update(&data[..from]);
        let mut sig = signature::Builder::new(data.len() as u64);
        sig.update(&data[..from]);
        let mut a = Applier::new(&[], Vec::new(), data.len() as u64)
            .with_signature(Some(sig), None)
            .resume_after(h, from as u64)
            .unwrap();
        for b in &blocks {
            a.block(b).unwrap();
        }
        let done = a.finish().unwrap();
        assert_eq!(done.out, &data[from..], "only the rest is written");
        assert_eq!((done.hash, done.len), (ContentHash::of(&data), data.len() as u64));
        assert_eq!(done.sig.unwrap().into_serialized(), signature::compute(&data).into_serialized());
        // Kept plus received may not exceed the announced size.
        let a = Applier::new(&[], Vec::new(), 10);
        assert!(a.resume_after(Hasher::new(), 11).is_err());
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
