//! The op stream that carries file content on the wire, and its encoders.
//!
//! A block is a sequence of ops, each `0 varint(offset) varint(len)` (copy from the base) or
//! `1 varint(len) bytes` (literal), zstd-compressed when that makes it smaller. fast_rsync's own
//! delta format is the same two ops; we re-encode it so the search ([`super::diff`]) can take a
//! span's ops up to its last match and so blocks are cut where we choose.

use serde::{Deserialize, Serialize};

use super::signature::Builder;
use super::source::Source;
use super::{DeltaError, MAX_BLOCK, WINDOW};

/// zstd level for literal data: 3 is zstd's default and compresses text well at hundreds of MB/s;
/// random data is detected and stored raw cheaply.
const ZSTD_LEVEL: i32 = 3;

/// Whole-file transfers are cut into blocks of this size so progress moves and memory stays low.
const WHOLE_CHUNK: usize = 1 << 20;

const OP_COPY: u8 = 0;
const OP_LITERAL: u8 = 1;

/// How a block's bytes are packed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Codec {
    Raw,
    /// A zstd frame of its own.
    Zstd,
}

/// One unit of file content on the wire.
#[derive(Clone, Serialize, Deserialize)]
pub struct Block {
    pub codec: Codec,
    #[serde(with = "serde_bytes")]
    pub bytes: Vec<u8>,
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Block({:?}, {} bytes)", self.codec, self.bytes.len())
    }
}

/// What rsync calls literal and matched data.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeltaStats {
    pub literal: u64,
    pub matched: u64,
}

impl DeltaStats {
    pub fn add(&mut self, o: DeltaStats) {
        self.literal += o.literal;
        self.matched += o.matched;
    }
}

pub(crate) enum Op<'a> {
    Copy { offset: u64, len: u64 },
    Literal(&'a [u8]),
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(buf: &mut &[u8]) -> Result<u64, DeltaError> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = buf.split_first().ok_or(DeltaError::Corrupt("truncated varint"))?;
        *buf = rest;
        v |= ((b & 0x7f) as u64) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(DeltaError::Corrupt("varint too long"))
}

fn put_op(out: &mut Vec<u8>, op: &Op<'_>, stats: &mut DeltaStats) {
    match op {
        Op::Copy { offset, len } => {
            out.push(OP_COPY);
            put_varint(out, *offset);
            put_varint(out, *len);
            stats.matched += len;
        }
        Op::Literal(b) => {
            out.push(OP_LITERAL);
            put_varint(out, b.len() as u64);
            out.extend_from_slice(b);
            stats.literal += b.len() as u64;
        }
    }
}

/// Parses one decoded block into ops.
pub(crate) fn parse_ops(mut buf: &[u8]) -> impl Iterator<Item = Result<Op<'_>, DeltaError>> {
    std::iter::from_fn(move || {
        let (&tag, rest) = buf.split_first()?;
        buf = rest;
        let op = (|| match tag {
            OP_COPY => {
                let offset = get_varint(&mut buf)?;
                let len = get_varint(&mut buf)?;
                Ok(Op::Copy { offset, len })
            }
            OP_LITERAL => {
                let len = get_varint(&mut buf)? as usize;
                if len > buf.len() {
                    return Err(DeltaError::Corrupt("literal runs past the block"));
                }
                let (lit, rest) = buf.split_at(len);
                buf = rest;
                Ok(Op::Literal(lit))
            }
            _ => Err(DeltaError::Corrupt("unknown op")),
        })();
        if op.is_err() {
            buf = &[];
        }
        Some(op)
    })
}

/// Bytes of a large block compressed first to see whether the rest is worth it.
const PROBE: usize = 32 << 10;

/// Whether a sample of `raw` shrinks by at least 1/32 under zstd: already-compressed or random
/// data (media, archives) then skips a full compression attempt that would be thrown away, which
/// otherwise costs more CPU than sending it.
fn worth_compressing(raw: &[u8]) -> bool {
    if raw.len() < 4 * PROBE {
        return true;
    }
    let sample = &raw[raw.len() / 2 - PROBE / 2..][..PROBE];
    zstd::bulk::compress(sample, 1).is_ok_and(|c| c.len() < PROBE - PROBE / 32)
}

/// Compresses a block of ops when that helps.
fn seal(raw: Vec<u8>) -> Block {
    if raw.len() > 64
        && worth_compressing(&raw)
        && let Ok(c) = zstd::bulk::compress(&raw, ZSTD_LEVEL)
        && c.len() < raw.len()
    {
        return Block { codec: Codec::Zstd, bytes: c };
    }
    Block { codec: Codec::Raw, bytes: raw }
}

/// Decompresses a received block, refusing anything larger than [`MAX_BLOCK`].
pub fn open_block(b: &Block) -> Result<std::borrow::Cow<'_, [u8]>, DeltaError> {
    match b.codec {
        Codec::Zstd => {
            zstd::bulk::decompress(&b.bytes, MAX_BLOCK).map(Into::into).map_err(DeltaError::Decompress)
        }
        Codec::Raw if b.bytes.len() > MAX_BLOCK => Err(DeltaError::Corrupt("block too large")),
        Codec::Raw => Ok(std::borrow::Cow::Borrowed(&b.bytes)),
    }
}

/// A whole file as literal blocks.
/// `emit` gets each block and how many bytes of `data` it covers (for progress); `new_sig`, if
/// given, is fed all of `data`.
pub fn encode_whole(
    mut data: &[u8],
    new_sig: Option<&mut Builder>,
    emit: impl FnMut(Block, u64) -> std::io::Result<()>,
) -> std::io::Result<DeltaStats> {
    encode_whole_from(&mut data, new_sig, emit).map_err(|e| match e {
        DeltaError::Io(e) => e,
        other => std::io::Error::other(other),
    })
}

/// [`encode_whole`] of data read through a [`Source`], front to back.
pub fn encode_whole_from(
    data: &mut impl Source,
    mut new_sig: Option<&mut Builder>,
    mut emit: impl FnMut(Block, u64) -> std::io::Result<()>,
) -> Result<DeltaStats, DeltaError> {
    let mut stats = DeltaStats::default();
    let len = data.size();
    let mut at = 0;
    while at < len {
        let to = (at + WHOLE_CHUNK).min(len);
        let chunk = data.bytes(at..to)?;
        if let Some(b) = new_sig.as_deref_mut() {
            b.update(chunk);
        }
        let mut raw = Vec::with_capacity(chunk.len() + 12);
        put_op(&mut raw, &Op::Literal(chunk), &mut stats);
        // Small files stay raw here: the connection's stream compresses them better.
        let block = if raw.len() <= super::stream::STREAM_MAX {
            Block { codec: Codec::Raw, bytes: raw }
        } else {
            seal(raw)
        };
        emit(block, (to - at) as u64)?;
        at = to;
        data.advance(at);
    }
    Ok(stats)
}

/// Collects ops into blocks of about [`WHOLE_CHUNK`] bytes, merging adjacent copies, and hands
/// each block to `emit` with how many bytes of the new data it covers.
pub(crate) struct OpSink<F> {
    emit: F,
    raw: Vec<u8>,
    covered: u64,
    /// A copy that the next one may extend.
    pending: Option<(u64, u64)>,
    stats: DeltaStats,
}

impl<F: FnMut(Block, u64) -> std::io::Result<()>> OpSink<F> {
    pub(crate) fn new(emit: F) -> Self {
        OpSink { emit, raw: Vec::new(), covered: 0, pending: None, stats: DeltaStats::default() }
    }

    pub(crate) fn copy(&mut self, offset: u64, len: u64) {
        match &mut self.pending {
            Some((o, l)) if *o + *l == offset => *l += len,
            _ => {
                self.settle_copy();
                self.pending = Some((offset, len));
            }
        }
    }

    fn settle_copy(&mut self) {
        if let Some((offset, len)) = self.pending.take() {
            put_op(&mut self.raw, &Op::Copy { offset, len }, &mut self.stats);
            self.covered += len;
        }
    }

    pub(crate) fn literal(&mut self, mut data: &[u8]) -> std::io::Result<()> {
        self.settle_copy();
        while !data.is_empty() {
            let room = WHOLE_CHUNK.saturating_sub(self.raw.len()).max(1);
            let (piece, rest) = data.split_at(room.min(data.len()));
            put_op(&mut self.raw, &Op::Literal(piece), &mut self.stats);
            self.covered += piece.len() as u64;
            data = rest;
            self.flushed()?;
        }
        Ok(())
    }

    /// Emits a block once enough has gathered: [`WHOLE_CHUNK`] bytes of ops, or [`WINDOW`] bytes
    /// of data covered (so progress moves and the sender can release what is behind).
    pub(crate) fn flushed(&mut self) -> std::io::Result<()> {
        let pending = self.pending.map_or(0, |(_, l)| l);
        if self.raw.len() >= WHOLE_CHUNK || self.covered + pending >= WINDOW as u64 {
            self.settle_copy();
            self.emit_block()?;
        }
        Ok(())
    }

    fn emit_block(&mut self) -> std::io::Result<()> {
        if self.raw.is_empty() {
            return Ok(());
        }
        let raw = std::mem::take(&mut self.raw);
        (self.emit)(seal(raw), std::mem::take(&mut self.covered))
    }

    pub(crate) fn finish(mut self) -> Result<DeltaStats, DeltaError> {
        self.settle_copy();
        self.emit_block()?;
        Ok(self.stats)
    }
}

/// Reads fast_rsync's (librsync's) delta format: magic, then literal/copy commands, then end.
pub(crate) fn parse_fast_rsync(mut d: &[u8]) -> Result<Vec<Op<'_>>, DeltaError> {
    const MAGIC: [u8; 4] = 0x72730236u32.to_be_bytes();
    fn take<'a>(d: &mut &'a [u8], n: usize) -> Result<&'a [u8], DeltaError> {
        if d.len() < n {
            return Err(DeltaError::Corrupt("truncated fast_rsync delta"));
        }
        let (a, b) = d.split_at(n);
        *d = b;
        Ok(a)
    }
    fn int(d: &mut &[u8], n: usize) -> Result<u64, DeltaError> {
        let mut b = [0u8; 8];
        b[8 - n..].copy_from_slice(take(d, n)?);
        Ok(u64::from_be_bytes(b))
    }
    if take(&mut d, 4)? != MAGIC {
        return Err(DeltaError::Corrupt("fast_rsync delta magic"));
    }
    let mut ops = Vec::new();
    loop {
        let cmd = take(&mut d, 1)?[0];
        match cmd {
            0 => break,
            0x01..=0x40 => ops.push(Op::Literal(take(&mut d, cmd as usize)?)),
            0x41..=0x44 => {
                let n = int(&mut d, 1 << (cmd - 0x41))? as usize;
                ops.push(Op::Literal(take(&mut d, n)?));
            }
            0x45..=0x54 => {
                let mode = cmd - 0x45;
                let offset = int(&mut d, 1 << (mode / 4))?;
                let len = int(&mut d, 1 << (mode % 4))?;
                ops.push(Op::Copy { offset, len });
            }
            _ => return Err(DeltaError::Corrupt("unknown fast_rsync command")),
        }
    }
    // fast_rsync emits at most 2^64-sized literals in pieces; merge adjacent ones for one header.
    Ok(ops)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_blocks_are_compressed_only_when_a_sample_says_it_pays() {
        let random = super::super::pseudo_random(1 << 20, 5);
        assert_eq!(seal(random.clone()).codec, Codec::Raw);
        let text: Vec<u8> = (0..1 << 20).map(|i| b"the quick brown fox "[i % 20]).collect();
        let sealed = seal(text.clone());
        assert_eq!(sealed.codec, Codec::Zstd);
        assert_eq!(open_block(&sealed).unwrap().as_ref(), &text[..]);
        // Random at the front, text in the middle where the sample is: still compressed.
        let mut mixed = random[..1 << 19].to_vec();
        mixed.extend_from_slice(&text[..1 << 19]);
        assert!(seal(mixed.clone()).bytes.len() < mixed.len());
    }
}
