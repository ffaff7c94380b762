//! The encoder's search for matches: rsync's rolling search, made cheap where data did not move.
//!
//! `fast_rsync::diff` tries every byte offset and confirms each candidate with an MD4 of one
//! block: about 720 MiB/s even on a file that barely changed, the slowest step of a small edit to
//! a big file. But most blocks of a changed file are where they were (edits in place, appends), or
//! all shifted by the same amount (an insert). So matches are looked for on a grid first: the
//! data's blocks from the current position are signed together with fast_rsync's multi-lane MD4
//! (4 GiB/s) and looked up among the base's blocks. Only where the grid stops matching does
//! fast_rsync's rolling search run, over a short span, to find where the data lines up again;
//! the grid restarts from the end of the last match it found, in the new phase.
//!
//! A grid match is the same test as fast_rsync's (CRC and 8 bytes of MD4 of a whole block), and
//! every reconstruction is verified by xxh3-128 anyway, so the result is as safe as a plain diff
//! and as small: a block can only be missed if the rolling search would have missed it too.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use fast_rsync::{IndexedSignature, Signature, SignatureOptions};

use super::DeltaError;
use super::ops::{Block, DeltaStats, Op, OpSink, parse_fast_rsync};
use super::signature::{self, Builder, HEADER};
use super::source::Source;

/// Grid span after a miss; it doubles while every block matches, up to [`GRID_MAX`]. Small enough
/// that signing blocks past a nearby change wastes little.
const GRID_MIN: usize = 64 << 10;
const GRID_MAX: usize = 8 << 20;

/// Span of one rolling search (plus a block, so a match may start anywhere in it).
const ROLL: usize = 64 << 10;

/// The base's blocks by their signature entry (CRC and strong hash bytes, as serialized).
struct Grid<'s> {
    opts: SignatureOptions,
    entry: usize,
    /// The base's entries, one per block.
    entries: &'s [u8],
    /// Block index by the entry's first 8 bytes (CRC and the start of the MD4); a hit is then
    /// compared whole.
    blocks: HashMap<u64, u32, BuildHasherDefault<Spread>>,
}

/// The keys are CRC and MD4 bytes, already uniform: one multiply spreads them over the table,
/// several times cheaper per lookup than a general-purpose hasher on a byte slice.
#[derive(Default)]
struct Spread(u64);

impl Hasher for Spread {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8 | b as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u64(&mut self, x: u64) {
        self.0 = (x ^ x >> 29).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

fn key(entry: &[u8]) -> u64 {
    let mut k = [0u8; 8];
    let n = entry.len().min(8);
    k[..n].copy_from_slice(&entry[..n]);
    u64::from_le_bytes(k)
}

impl<'s> Grid<'s> {
    fn new(sig: &'s Signature) -> Result<Self, DeltaError> {
        let (opts, entry, entries) = signature::layout(sig).ok_or(DeltaError::Corrupt("signature header"))?;
        let mut blocks = HashMap::with_capacity_and_hasher(entries.len() / entry, Default::default());
        for (i, e) in entries.chunks_exact(entry).enumerate() {
            blocks.entry(key(e)).or_insert(i as u32);
        }
        Ok(Grid { opts, entry, entries, blocks })
    }

    fn block_size(&self) -> usize {
        self.opts.block_size as usize
    }

    /// How many whole blocks of `data`, from its start, are blocks of the base; calls `hit` with
    /// the base offset of each. The base's last block may be short: only whole blocks count.
    /// `new_sig`, when given, takes the entries computed here as its next ones.
    fn matches(&self, data: &[u8], new_sig: Option<&mut Builder>, mut hit: impl FnMut(u64)) -> usize {
        let bs = self.block_size();
        let whole = data.len() - data.len() % bs;
        if whole == 0 {
            return 0;
        }
        let sig = Signature::calculate(&data[..whole], self.opts);
        if let Some(b) = new_sig {
            b.append_signed(&sig.serialized()[HEADER..]);
        }
        let mut n = 0;
        for e in sig.serialized()[HEADER..].chunks_exact(self.entry) {
            let Some(&i) = self.blocks.get(&key(e)) else { break };
            let at = i as usize * self.entry;
            if self.entries.get(at..at + self.entry) != Some(e) {
                break;
            }
            hit(i as u64 * bs as u64);
            n += 1;
        }
        n
    }
}

/// Diffs `data` against the base whose signature is `sig`. `emit` gets each block and how many
/// bytes of `data` it covers, in order. `new_sig`, if given, is fed all of `data`: where the grid
/// ran in step with the data's own block grid, its entries are reused instead of hashed again.
pub fn encode_delta(
    signature: &Signature,
    mut data: &[u8],
    new_sig: Option<&mut Builder>,
    emit: impl FnMut(Block, u64) -> std::io::Result<()>,
) -> Result<DeltaStats, DeltaError> {
    encode_delta_from(signature, &mut data, new_sig, emit)
}

/// [`encode_delta`] of data read through a [`Source`]. It moves forward: what it is asked for
/// starts at most a grid span plus a rolling search before the furthest point asked for.
pub fn encode_delta_from(
    signature: &Signature,
    data: &mut impl Source,
    mut new_sig: Option<&mut Builder>,
    emit: impl FnMut(Block, u64) -> std::io::Result<()>,
) -> Result<DeltaStats, DeltaError> {
    let grid = Grid::new(signature)?;
    let bs = grid.block_size();
    let len = data.size();
    // fast_rsync's index is only needed once the grid misses; a file whose blocks all stayed put
    // never builds it.
    let mut rolling: Option<IndexedSignature<'_>> = None;
    let mut sink = OpSink::new(emit);
    let mut fr = Vec::new();
    let mut pos = 0;
    let mut span = GRID_MIN;
    // How far `new_sig` has been fed.
    let mut signed = 0;
    while pos < len {
        if let Some(b) = new_sig.as_deref_mut()
            && signed < pos
        {
            b.update(data.bytes(signed..pos)?);
            signed = pos;
        }
        // Everything from here on is at or after `pos` (`signed` is not behind it any more).
        data.advance(pos);
        let end = (pos + span).min(len);
        let whole = (end - pos) / bs;
        if whole == 0 {
            // Less than a block is left: no match can start in it.
            sink.literal(data.bytes(pos..len)?)?;
            break;
        }
        let reuse = signed == pos && new_sig.as_deref().is_some_and(|b| b.in_step_with(grid.opts));
        let into = if reuse { new_sig.as_deref_mut() } else { None };
        let n = grid.matches(data.bytes(pos..end)?, into, |offset| sink.copy(offset, bs as u64));
        if reuse {
            signed = pos + whole * bs;
        }
        sink.flushed()?;
        pos += n * bs;
        if n == whole {
            span = (span * 2).min(GRID_MAX);
        } else {
            // A miss on the grid: search byte by byte from here.
            span = GRID_MIN;
            let index = rolling.get_or_insert_with(|| signature.index());
            let to = (pos + ROLL + bs - 1).min(len);
            pos += roll(index, bs, data.bytes(pos..to)?, to == len, &mut fr, &mut sink)?;
        }
    }
    if let Some(b) = new_sig
        && signed < len
    {
        b.update(data.bytes(signed..len)?);
    }
    sink.finish()
}

/// One rolling search over `span` ([`ROLL`] + a block - 1 bytes, or less at the end of the data:
/// `last`); returns how many bytes it settled. A literal at the end of the span is given back
/// (all but what no match can start in), so the grid resumes right after the last match found.
fn roll(
    index: &IndexedSignature<'_>,
    bs: usize,
    span: &[u8],
    last: bool,
    fr: &mut Vec<u8>,
    sink: &mut OpSink<impl FnMut(Block, u64) -> std::io::Result<()>>,
) -> Result<usize, DeltaError> {
    fr.clear();
    fast_rsync::diff(index, span, &mut *fr).map_err(|e| DeltaError::Diff(e.to_string()))?;
    let mut ops = parse_fast_rsync(fr)?;
    let mut settled = span.len();
    if !last && let Some(Op::Literal(tail)) = ops.last() {
        let tail: &[u8] = tail;
        // After a match the grid picks up again at its end; with no match at all, keep all but
        // the last bs-1 bytes, where a match could still start.
        let matched = ops.iter().any(|op| matches!(op, Op::Copy { .. }));
        let back = if matched { tail.len() } else { tail.len().min(bs - 1) };
        settled -= back;
        let keep = tail.len() - back;
        if keep == 0 {
            ops.pop();
        } else {
            *ops.last_mut().expect("checked above") = Op::Literal(&tail[..keep]);
        }
    }
    for op in ops {
        match op {
            Op::Copy { offset, len } => sink.copy(offset, len),
            Op::Literal(l) => sink.literal(l)?,
        }
    }
    sink.flushed()?;
    debug_assert!(settled > 0, "a rolling search always settles something");
    Ok(settled)
}

#[cfg(test)]
mod tests {
    use super::super::{Applier, pseudo_random, signature};
    use super::*;

    fn roundtrip(base: &[u8], new: &[u8]) -> (DeltaStats, usize) {
        let sig = signature::compute(base);
        let mut blocks = Vec::new();
        let mut covered = 0;
        let mut new_sig = signature::Builder::new(new.len() as u64);
        let stats = encode_delta(&sig, new, Some(&mut new_sig), |b, c| {
            blocks.push(b);
            covered += c;
            Ok(())
        })
        .unwrap();
        assert_eq!(covered, new.len() as u64, "blocks cover the data exactly");
        assert!(new_sig.finish().serialized() == signature::compute(new).serialized());
        let mut a = Applier::new(base, Vec::new(), new.len() as u64);
        for b in &blocks {
            a.block(b).unwrap();
        }
        let done = a.finish().unwrap();
        assert!(done.out == new, "reconstruction differs");
        let wire = blocks.iter().map(|b| b.bytes.len()).sum();
        (stats, wire)
    }

    #[test]
    fn edits_in_place_cost_about_their_size() {
        let base = pseudo_random(8 << 20, 1);
        let mut new = base.clone();
        new[4 << 20..(4 << 20) + 65536].copy_from_slice(&pseudo_random(65536, 2));
        for k in 0..50 {
            let at = (k * 160_001) % new.len();
            new[at] ^= 0x5a;
        }
        let (s, _) = roundtrip(&base, &new);
        // Each scattered byte costs at most two blocks (bs = 1 KiB at this size).
        assert!(s.literal <= 65536 + 2048 + 50 * 2048, "literal {}", s.literal);
        assert_eq!(s.literal + s.matched, new.len() as u64);
    }

    #[test]
    fn inserts_and_deletes_resync_in_the_new_phase() {
        let base = pseudo_random(6 << 20, 3);
        let mut new = base.clone();
        new.splice(1_000_003..1_000_003, pseudo_random(777, 4));
        new.drain(3_000_000..3_000_100);
        new.extend_from_slice(&pseudo_random(5000, 5));
        let (s, wire) = roundtrip(&base, &new);
        assert!(s.literal < 777 + 5000 + 6 * 1024, "literal {}", s.literal);
        assert!(wire < 20_000, "{wire} bytes on the wire");
    }

    #[test]
    fn unrelated_and_tiny_data_go_as_literals() {
        let base = pseudo_random(1 << 20, 6);
        let new = pseudo_random((1 << 20) + 333, 8);
        let (s, _) = roundtrip(&base, &new);
        assert_eq!(s.matched, 0);
        let (s, _) = roundtrip(&base, &base[..500]);
        assert_eq!(s.literal, 500);
        roundtrip(&base, &[]);
        // Blocks moved around are found wherever they went.
        let mut shuffled = base[512 << 10..].to_vec();
        shuffled.extend_from_slice(&base[..512 << 10]);
        let (s, _) = roundtrip(&base, &shuffled);
        assert!(s.literal < 4096, "literal {}", s.literal);
    }

    /// Encodes `new` from memory and from a file through a window of `capacity` bytes (and the
    /// default one); the two must be the same blocks, byte for byte, covering the same ranges,
    /// with the same signature and hash, and decode (from a base read by pread) to `new`.
    fn windowed_is_the_same(base: &[u8], new: &[u8], capacity: usize) {
        use super::super::source::{FileBase, FileWindow};
        use crate::hash::ContentHash;
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("base"), base).unwrap();
        std::fs::write(d.path().join("new"), new).unwrap();
        let sig = signature::compute(base);
        let encode = |data: Option<FileWindow>| {
            let mut blocks = Vec::new();
            let mut new_sig = signature::Builder::new(new.len() as u64);
            let emit = |b: Block, c| {
                blocks.push((b.codec, b.bytes, c));
                Ok(())
            };
            let (stats, hash) = match data {
                None => (encode_delta(&sig, new, Some(&mut new_sig), emit).unwrap(), None),
                Some(mut w) => {
                    let stats = encode_delta_from(&sig, &mut w, Some(&mut new_sig), emit).unwrap();
                    (stats, Some(w.finish().unwrap()))
                }
            };
            (blocks, stats, new_sig.finish().into_serialized(), hash)
        };
        let mapped = encode(None);
        let open = || std::fs::File::open(d.path().join("new")).unwrap();
        for w in [
            FileWindow::with_capacity(open(), new.len() as u64, capacity),
            FileWindow::new(open(), new.len() as u64),
        ] {
            let read = encode(Some(w));
            assert_eq!(read.0.len(), mapped.0.len(), "as many blocks");
            assert!(read.0 == mapped.0, "the same blocks, byte for byte");
            assert_eq!(read.1, mapped.1);
            assert!(read.2 == mapped.2, "the same signature");
            assert_eq!(read.3, Some(ContentHash::of(new)));
        }
        let base_file = FileBase::new(std::fs::File::open(d.path().join("base")).unwrap()).unwrap();
        let mut a = Applier::from_base(base_file, Vec::new(), new.len() as u64);
        for (codec, bytes, _) in mapped.0 {
            a.block(&Block { codec, bytes }).unwrap();
        }
        assert!(a.finish().unwrap().out == new, "reconstruction from a base read by pread");
    }

    #[test]
    fn a_window_read_from_the_file_encodes_exactly_as_the_whole_data_does() {
        // Bigger than the default window (16 MiB) and than a grid span (8 MiB).
        let base = pseudo_random(40 << 20, 11);
        let mut new = base.clone();
        new[20 << 20..(20 << 20) + 65536].copy_from_slice(&pseudo_random(65536, 12));
        windowed_is_the_same(&base, &new, 1 << 20);
        for k in 0..40 {
            let at = (k * 1_000_003) % new.len();
            new[at] ^= 0x5a;
        }
        new.splice(9_000_001..9_000_001, pseudo_random(777, 13));
        new.drain(30_000_000..30_004_321);
        new.extend_from_slice(&pseudo_random(100_000, 14));
        windowed_is_the_same(&base, &new, 3 << 20);
        // Truncated, and moved around.
        windowed_is_the_same(&base, &new[..17 << 20], 1 << 20);
        let mut shuffled = base[(25 << 20) + 12345..].to_vec();
        shuffled.extend_from_slice(&base[..(25 << 20) + 12345]);
        windowed_is_the_same(&base, &shuffled, 5 << 20);
        // Unrelated (the rolling search all the way), tiny and empty.
        windowed_is_the_same(&base[..1 << 20], &pseudo_random(3 << 20, 15), 1 << 20);
        windowed_is_the_same(&base, &base[..500], 1 << 20);
        windowed_is_the_same(&base, &[], 1 << 20);
    }

    #[test]
    fn repeated_blocks_do_not_confuse_the_grid() {
        let base = vec![0u8; 3 << 20];
        let mut new = base.clone();
        new[1 << 20] = 1;
        let (s, _) = roundtrip(&base, &new);
        assert!(s.literal <= 2 * 1024, "literal {}", s.literal);
    }
}
