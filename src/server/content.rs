//! File content as content-defined chunks in packs.
//!
//! A file's bytes are cut by FastCDC (v2020) into chunks of 8 KiB to 128 KiB (32 KiB on
//! average: [`CONTENT`]; README explains the choice), each named by the SHA-256 of its bytes and stored once
//! across the whole server: compressed with zstd when that saves at least an eighth, appended
//! to a pack. A version of a file is the ordered list of its chunks (in the metadata). An edit
//! changes the chunks around it only: cutting depends on the bytes near each cut, so the cuts
//! after an edit fall where they fell before, and those chunks are the same chunks.
//!
//! - [`Chunker`] is the `Write` an upload is rebuilt into: it cuts, and hands each chunk to
//!   the session's [`PackSink`], which skips chunks the server has and appends the others to
//!   its open pack.
//! - [`Reader`] reads a version back as the delta code's [`Source`] (forward, for downloads)
//!   and [`Base`] (random access, for an upload's copies).
//!
//! Each chunk in a pack is preceded by a header (magic, SHA-256, sizes, codec), so a pack can
//! be read without the database.

use std::collections::HashSet;
use std::io;
use std::ops::Range;
use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::meta::Metadata;
use super::store::{ChunkStore, PackId, PackWriter};
use crate::delta::{Base, DeltaError, Source};
use crate::hash::ContentHash;

/// How a stream is cut: minimum, average and maximum chunk sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sizes {
    pub min: usize,
    pub avg: usize,
    pub max: usize,
}

/// File content: 8 / 32 / 128 KiB (README, "Chunk sizes", has the measurements: the fewest
/// bytes stored per edit, new chunks and chunk list together).
pub const CONTENT: Sizes = Sizes { min: 8 << 10, avg: 32 << 10, max: 128 << 10 };
/// Signatures (12 bytes per block of the file, so an edit changes a few hundred bytes of one):
/// smaller chunks, so an edit rewrites little of it.
pub const SIGNATURE: Sizes = Sizes { min: 2 << 10, avg: 8 << 10, max: 32 << 10 };
/// A pack is finished once it holds this much; a batch's pack is finished at its commit anyway.
pub const PACK_TARGET: u64 = 32 << 20;

/// A chunk's name: the SHA-256 of its bytes (collision-resistant: chunks are shared across
/// accounts, so nobody may make one that stands for another's).
pub type ChunkKey = [u8; 32];

/// A version's content: its chunks in order, with their lengths.
pub type ChunkList = Vec<(ChunkKey, u32)>;

const HEADER_MAGIC: &[u8; 4] = b"DSCK";
const HEADER_LEN: usize = 4 + 32 + 4 + 4 + 1;

pub fn key_of(bytes: &[u8]) -> ChunkKey {
    Sha256::digest(bytes).into()
}

/// Where a chunk's bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkLoc {
    pub pack: PackId,
    /// Of the stored bytes (after the header).
    pub offset: u64,
    pub stored: u32,
    pub raw: u32,
    pub zstd: bool,
}

/// A chunk written into a pack that is not finished yet.
#[derive(Debug, Clone)]
pub struct NewChunk {
    pub key: ChunkKey,
    pub loc: ChunkLoc,
}

/// A finished pack and the chunks in it, for the metadata.
#[derive(Debug)]
pub struct Sealed {
    pub pack: PackId,
    pub size: u64,
    pub chunks: Vec<NewChunk>,
}

/// The fastcdc v2020 masks for an average size at normalization level 1.
fn masks(avg: usize) -> (u64, u64) {
    let bits = avg.trailing_zeros();
    (fastcdc::v2020::MASKS[(bits + 1) as usize], fastcdc::v2020::MASKS[(bits - 1) as usize])
}

/// The length of the first chunk of `data`: a cut point at most `sizes.max` in, or all of
/// `data` when it is shorter than that.
fn cut(data: &[u8], sizes: Sizes) -> usize {
    let (s, l) = masks(sizes.avg);
    let (_, n) = fastcdc::v2020::cut(data, sizes.min, sizes.avg, sizes.max, s, l, s << 1, l << 1);
    n.clamp(1.min(data.len()), data.len())
}

/// Cuts `data` whole into chunks of `sizes` (for measurements and tests): their lengths.
pub fn cut_all(mut data: &[u8], sizes: Sizes) -> Vec<usize> {
    let mut out = Vec::new();
    while !data.is_empty() {
        let n = cut(data, sizes);
        out.push(n);
        data = &data[n..];
    }
    out
}

/// Bytes of a chunk compressed first (at level 1) to see whether the whole is worth it.
const PROBE: usize = 4 << 10;

/// Whether a sample from the middle of a chunk shrinks by at least 1/16: random or already
/// compressed data (media, archives) then skips a full attempt that would be thrown away. A chunk
/// too small for the probe is tried unless its last KiB looks random (see
/// [`looks_random`](crate::protocol::connection::looks_random)): a first push of 100,000 random
/// files of 4 KiB spent 8% of the server's CPU compressing them for nothing.
fn worth_compressing(probe: &mut Option<zstd::bulk::Compressor<'static>>, bytes: &[u8]) -> bool {
    if bytes.len() < 4 * PROBE {
        return !crate::protocol::connection::looks_random(bytes);
    }
    let sample = &bytes[bytes.len() / 2 - PROBE / 2..][..PROBE];
    match probe {
        Some(c) => c.compress(sample).is_ok_and(|c| c.len() < PROBE - PROBE / 16),
        None => true,
    }
}

/// Where a session's new chunks go. Finished packs are recorded in the metadata at once
/// (their chunks unreferenced until a commit refers to them; a prune collects them after a
/// grace period if none ever does).
pub struct PackSink {
    chunks: Arc<dyn ChunkStore>,
    /// zstd contexts, made once (making one per chunk cost 7% of an upload's CPU).
    compressor: Option<zstd::bulk::Compressor<'static>>,
    probe: Option<zstd::bulk::Compressor<'static>>,
    open: Option<Box<dyn PackWriter>>,
    written: Vec<NewChunk>,
    keys: HashSet<ChunkKey>,
    /// Bytes of new chunks written (before compression).
    pub new_raw: u64,
}

impl PackSink {
    /// Frees the zstd contexts (an idle session should not hold a megabyte it is not using).
    pub fn release_contexts(&mut self) {
        self.compressor = None;
        self.probe = None;
    }

    pub fn new(chunks: Arc<dyn ChunkStore>) -> Self {
        PackSink {
            chunks,
            compressor: None,
            probe: None,
            open: None,
            written: Vec::new(),
            keys: HashSet::new(),
            new_raw: 0,
        }
    }

    /// Whether the server has this chunk already (in a finished pack, or in the open one).
    fn has(&self, meta: &Metadata, key: &ChunkKey) -> io::Result<bool> {
        Ok(self.keys.contains(key) || meta.chunk_exists(key).map_err(io::Error::other)?)
    }

    /// Stores a chunk unless the server has it.
    pub fn add(&mut self, meta: &Metadata, bytes: &[u8]) -> io::Result<ChunkKey> {
        let key = key_of(bytes);
        if self.has(meta, &key)? {
            return Ok(key);
        }
        // Made on first use and kept for the session's uploads; freed when it goes idle.
        if self.compressor.is_none() {
            self.compressor = zstd::bulk::Compressor::new(3).ok();
            self.probe = zstd::bulk::Compressor::new(1).ok();
        }
        let packed = match &mut self.compressor {
            Some(c) if worth_compressing(&mut self.probe, bytes) => c.compress(bytes).ok(),
            _ => None,
        }
        .filter(|c| c.len() < bytes.len() - bytes.len() / 8);
        let (stored, zstd) = match &packed {
            Some(c) => (c.as_slice(), true),
            None => (bytes, false),
        };
        if self.open.is_none() {
            self.open = Some(self.chunks.create()?);
        }
        let Some(w) = self.open.as_mut() else { unreachable!("just made") };
        let offset = write_stored(w.as_mut(), &key, bytes.len() as u32, stored, zstd)?;
        let loc =
            ChunkLoc { pack: w.id(), offset, stored: stored.len() as u32, raw: bytes.len() as u32, zstd };
        self.written.push(NewChunk { key, loc });
        self.keys.insert(key);
        self.new_raw += bytes.len() as u64;
        if w.len() >= PACK_TARGET {
            self.seal(meta)?;
        }
        Ok(key)
    }

    /// Finishes the open pack (durable) and records it and its chunks in the metadata.
    pub fn seal(&mut self, meta: &Metadata) -> io::Result<()> {
        match self.finish_pack()? {
            Some(sealed) => meta.add_pack(&sealed).map_err(io::Error::other),
            None => Ok(()),
        }
    }

    /// Finishes the open pack (durable) without recording it: the caller records it, in the
    /// transaction that commits the versions using it.
    pub fn finish_pack(&mut self) -> io::Result<Option<Sealed>> {
        self.take_pack().map(Taken::finish).transpose()
    }

    /// Takes the open pack out, unfinished, for a commit that runs while this sink fills the
    /// next one. Its chunks are forgotten here: until that commit is done, one sent again is
    /// stored again (the second copy is garbage for a prune), so a batch never depends on the
    /// one before it having committed.
    pub fn take_pack(&mut self) -> Option<Taken> {
        let writer = self.open.take()?;
        self.keys.clear();
        Some(Taken { writer, chunks: std::mem::take(&mut self.written) })
    }
}

/// A pack taken out of its [`PackSink`], not yet durable.
pub struct Taken {
    writer: Box<dyn PackWriter>,
    chunks: Vec<NewChunk>,
}

impl Taken {
    /// Makes the pack durable; what to record of it.
    pub fn finish(self) -> io::Result<Sealed> {
        let (pack, size) = (self.writer.id(), self.writer.len());
        self.writer.finish()?;
        Ok(Sealed { pack, size, chunks: self.chunks })
    }
}

/// Appends a chunk's header and stored bytes to a pack; the offset of the stored bytes.
pub fn write_stored(
    w: &mut dyn PackWriter,
    key: &ChunkKey,
    raw: u32,
    stored: &[u8],
    zstd: bool,
) -> io::Result<u64> {
    let mut header = [0u8; HEADER_LEN];
    header[..4].copy_from_slice(HEADER_MAGIC);
    header[4..36].copy_from_slice(key);
    header[36..40].copy_from_slice(&raw.to_le_bytes());
    header[40..44].copy_from_slice(&(stored.len() as u32).to_le_bytes());
    header[44] = u8::from(zstd);
    w.write(&header)?;
    let offset = w.len();
    w.write(stored)?;
    Ok(offset)
}

/// The `Write` an upload is rebuilt into: cuts chunks and stores them through a [`PackSink`];
/// [`finish`](Self::finish) gives the version's chunk list.
pub struct Chunker<'a> {
    sink: &'a mut PackSink,
    meta: &'a Metadata,
    sizes: Sizes,
    /// Bytes of the chunks in `list`.
    emitted: u64,
    /// The base version's chunks (for an upload that is a delta), which copies reuse.
    base: Option<BaseChunks>,
    buf: Vec<u8>,
    list: Vec<(ChunkKey, u32)>,
}

impl<'a> Chunker<'a> {
    pub fn new(sink: &'a mut PackSink, meta: &'a Metadata) -> Self {
        Self::with_sizes(sink, meta, CONTENT)
    }

    pub fn with_sizes(sink: &'a mut PackSink, meta: &'a Metadata, sizes: Sizes) -> Self {
        Chunker {
            sink,
            meta,
            sizes,
            emitted: 0,
            base: None,
            buf: Vec::with_capacity(2 * sizes.max),
            list: Vec::new(),
        }
    }

    /// Copies from `base` (the base version's chunk list, cut with the same sizes) reuse its
    /// chunks: see [`crate::delta::Sink::copied`].
    pub fn with_base(mut self, base: Option<ChunkList>) -> Self {
        self.base = base.map(BaseChunks::new);
        self
    }

    fn drain(&mut self, all: bool) -> io::Result<()> {
        let mut at = 0;
        while self.buf.len() - at >= self.sizes.max || (all && at < self.buf.len()) {
            at += self.cut_one(at)?;
        }
        self.buf.drain(..at);
        Ok(())
    }

    /// Cuts the chunk starting at `buf[at]` and stores it; its length.
    fn cut_one(&mut self, at: usize) -> io::Result<usize> {
        let n = cut(&self.buf[at..], self.sizes);
        let key = self.sink.add(self.meta, &self.buf[at..at + n])?;
        self.list.push((key, n as u32));
        self.emitted += n as u64;
        Ok(n)
    }

    /// The chunks cut so far whose ends are certain (what a cut-off upload can keep), and the
    /// bytes they hold; the rest of what was written is dropped.
    pub fn complete(mut self) -> io::Result<(ChunkList, u64)> {
        self.drain(false)?;
        let bytes = self.list.iter().map(|(_, n)| u64::from(*n)).sum();
        Ok((self.list, bytes))
    }

    /// The chunks of everything written, in order.
    pub fn finish(mut self) -> io::Result<Vec<(ChunkKey, u32)>> {
        self.drain(true)?;
        Ok(self.list)
    }
}

/// A base version's chunks by offset.
struct BaseChunks {
    /// Each chunk's start in the base, its key and length; the last chunk (cut by the end of the
    /// base, not by its content) is left out: a new version that goes on past it cuts elsewhere.
    chunks: Vec<(u64, ChunkKey, u32)>,
}

impl BaseChunks {
    fn new(list: ChunkList) -> Self {
        let mut at = 0u64;
        let mut chunks: Vec<_> = list
            .into_iter()
            .map(|(k, n)| {
                let c = (at, k, n);
                at += u64::from(n);
                c
            })
            .collect();
        chunks.pop();
        BaseChunks { chunks }
    }

    /// The index of the chunk that starts at `offset`.
    fn starting_at(&self, offset: u64) -> Option<usize> {
        self.chunks.binary_search_by_key(&offset, |c| c.0).ok()
    }
}

impl crate::delta::Sink for Chunker<'_> {
    /// Copied bytes: wherever this version's chunking stands at the start of one of the base's
    /// chunks inside the copy, the chunks that follow are the base's chunks (the same bytes cut
    /// the same way), so they are taken from its list without being cut, hashed or looked up.
    fn copied(&mut self, offset: u64, bytes: &[u8]) -> io::Result<()> {
        if self.base.is_none() {
            return io::Write::write_all(self, bytes);
        }
        // The new version's offset of `bytes[0]`.
        let start = self.emitted + self.buf.len() as u64;
        let mut i = 0usize;
        loop {
            if self.buf.is_empty()
                && let Some(base) = &self.base
                && let Some(mut k) = base.starting_at(offset + i as u64)
            {
                while let Some(&(at, key, n)) = base.chunks.get(k) {
                    if at + u64::from(n) > offset + bytes.len() as u64 {
                        break;
                    }
                    self.list.push((key, n));
                    self.emitted += u64::from(n);
                    i += n as usize;
                    k += 1;
                }
            }
            if i == bytes.len() {
                return Ok(());
            }
            // Cut what is buffered with the rest, looking after each cut for a base chunk's start.
            self.buf.extend_from_slice(&bytes[i..]);
            let mut at = 0usize;
            let mut synced = None;
            while self.buf.len() - at >= self.sizes.max {
                at += self.cut_one(at)?;
                let p = self.emitted;
                if p >= start + i as u64
                    && let Some(base) = &self.base
                    && base.starting_at(offset + (p - start)).is_some()
                {
                    synced = Some((p - start) as usize);
                    break;
                }
            }
            match synced {
                Some(next) => {
                    // Everything buffered from here is base bytes the loop above takes whole.
                    self.buf.clear();
                    i = next;
                }
                None => {
                    self.buf.drain(..at);
                    return Ok(());
                }
            }
        }
    }
}

impl io::Write for Chunker<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= 4 * self.sizes.max {
            self.drain(false)?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A stored version read back: as a [`Source`] for downloads and a [`Base`] for uploads'
/// copies. It keeps the run of chunks the last request covered, so reads that move forward
/// read each chunk once.
pub struct Reader {
    store: Arc<dyn ChunkStore>,
    /// Each chunk's place and its offset in the file.
    chunks: Vec<(ChunkLoc, u64)>,
    size: u64,
    /// The bytes of chunks `[first, first + n)`, starting at file offset `at`.
    buf: Vec<u8>,
    first: usize,
    n: usize,
    at: u64,
}

impl Reader {
    pub fn new(store: Arc<dyn ChunkStore>, locs: Vec<ChunkLoc>) -> Self {
        let mut off = 0u64;
        let chunks: Vec<_> = locs
            .into_iter()
            .map(|l| {
                let at = off;
                off += u64::from(l.raw);
                (l, at)
            })
            .collect();
        Reader { store, chunks, size: off, buf: Vec::new(), first: 0, n: 0, at: 0 }
    }

    pub fn len(&self) -> u64 {
        self.size
    }

    /// The store it reads from.
    pub fn into_store(self) -> Arc<dyn ChunkStore> {
        self.store
    }

    pub fn is_empty(&self) -> bool {
        self.size == 0
    }

    fn chunk_of(&self, offset: u64) -> usize {
        self.chunks.partition_point(|(l, at)| at + u64::from(l.raw) <= offset)
    }

    fn load(&self, i: usize) -> io::Result<Vec<u8>> {
        let (l, _) = &self.chunks[i];
        let stored = self.store.read(l.pack, l.offset, l.stored)?;
        if l.zstd { decode(&stored, l) } else { check_len(stored, l) }
    }

    /// Where the run of chunks from `i` that one read can fetch ends (exclusive): chunks that
    /// follow each other in one pack, through `to` (what the request needs) and on for the
    /// store's [`read_ahead`](ChunkStore::read_ahead), at most [`MAX_RUN`] bytes.
    fn run_end(&self, i: usize, to: usize) -> usize {
        let head = self.chunks[i].0;
        let ahead = self.store.read_ahead();
        let mut j = i + 1;
        while let Some((next, _)) = self.chunks.get(j) {
            let prev = self.chunks[j - 1].0;
            let follows = next.pack == head.pack
                && next.offset == prev.offset + u64::from(prev.stored) + HEADER_LEN as u64;
            if !follows {
                break;
            }
            let span = next.offset + u64::from(next.stored) - head.offset;
            if span > MAX_RUN || (j > to && span > ahead) {
                break;
            }
            j += 1;
        }
        j
    }
}

/// The most one read of a run of chunks asks for.
const MAX_RUN: u64 = 16 << 20;

/// A stored chunk's bytes as they were uploaded.
fn decode(stored: &[u8], l: &ChunkLoc) -> io::Result<Vec<u8>> {
    let raw = if l.zstd { zstd::bulk::decompress(stored, l.raw as usize)? } else { stored.to_vec() };
    check_len(raw, l)
}

fn check_len(raw: Vec<u8>, l: &ChunkLoc) -> io::Result<Vec<u8>> {
    if raw.len() != l.raw as usize {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "a stored chunk has the wrong length"));
    }
    Ok(raw)
}

impl Reader {
    /// The bytes at `[offset, offset + len)`, which lie inside the file.
    fn range(&mut self, offset: u64, len: usize) -> io::Result<&[u8]> {
        if len == 0 {
            return Ok(&[]);
        }
        let end = offset + len as u64;
        let (from, to) = (self.chunk_of(offset), self.chunk_of(end - 1));
        if to >= self.chunks.len() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past the end of a stored version",
            ));
        }
        let held = self.first..self.first + self.n;
        if self.n > 0 && held.contains(&from) {
            // Drop the chunks before `from`, keep the rest, append what is missing.
            let drop_bytes = (self.chunks[from].1 - self.at) as usize;
            self.buf.drain(..drop_bytes);
            self.n -= from - self.first;
            self.first = from;
            self.at = self.chunks[from].1;
        } else {
            self.buf.clear();
            self.first = from;
            self.n = 0;
            self.at = self.chunks[from].1;
        }
        while self.first + self.n <= to {
            let i = self.first + self.n;
            let j = self.run_end(i, to);
            if j == i + 1 {
                let bytes = self.load(i)?;
                self.buf.extend_from_slice(&bytes);
            } else {
                // Chunks stored one after another in one pack: one read (one request to an
                // object store) for all of them.
                let (head, last) = (self.chunks[i].0, self.chunks[j - 1].0);
                let span = last.offset + u64::from(last.stored) - head.offset;
                let bytes = self.store.read(head.pack, head.offset, span as u32)?;
                for k in i..j {
                    let l = self.chunks[k].0;
                    let at = (l.offset - head.offset) as usize;
                    let raw = decode(&bytes[at..at + l.stored as usize], &l)?;
                    self.buf.extend_from_slice(&raw);
                }
            }
            self.n += j - i;
        }
        let s = (offset - self.at) as usize;
        Ok(&self.buf[s..s + len])
    }
}

impl Source for Reader {
    fn size(&self) -> usize {
        self.size as usize
    }

    fn bytes(&mut self, range: Range<usize>) -> Result<&[u8], DeltaError> {
        Ok(self.range(range.start as u64, range.len())?)
    }
}

impl Base for Reader {
    fn size(&self) -> u64 {
        self.size
    }

    fn read(&mut self, offset: u64, len: usize) -> Result<&[u8], DeltaError> {
        Ok(self.range(offset, len)?)
    }
}

/// A download's delta from stored versions: the new version's chunks that the client's version
/// (`theirs`, whose signature is `sig`) also has become copies from where they are in it,
/// without reading or diffing them; only the runs of other chunks are diffed against `sig`. The
/// same op stream as [`crate::delta::encode_delta_from`] would make, found with a fraction of
/// the work when the versions share most chunks.
pub fn delta_by_chunks(
    sig: &fast_rsync::Signature,
    new: &mut Reader,
    mine: &[(ChunkKey, u32)],
    theirs: &[(ChunkKey, u32)],
    mut emit: impl FnMut(crate::delta::Block, u64) -> io::Result<()>,
) -> Result<(), DeltaError> {
    let mut at_theirs: std::collections::HashMap<ChunkKey, u64> = std::collections::HashMap::new();
    let mut off = 0u64;
    for (k, n) in theirs {
        at_theirs.entry(*k).or_insert(off);
        off += u64::from(*n);
    }
    let (mut i, mut pos) = (0usize, 0u64);
    while i < mine.len() {
        let start = pos;
        if at_theirs.contains_key(&mine[i].0) {
            // A run of shared chunks, as one or more copies.
            let mut sink = crate::delta::ops::OpSink::new(&mut emit);
            while let Some(&f) = mine.get(i).and_then(|(k, _)| at_theirs.get(k)) {
                let n = u64::from(mine[i].1);
                sink.copy(f, n);
                sink.flushed()?;
                pos += n;
                i += 1;
            }
            sink.finish()?;
        } else {
            while mine.get(i).is_some_and(|(k, _)| !at_theirs.contains_key(k)) {
                pos += u64::from(mine[i].1);
                i += 1;
            }
            let mut part = crate::delta::source::Slice::new(new, start as usize, pos as usize);
            crate::delta::encode_delta_from(sig, &mut part, None, &mut emit)?;
        }
    }
    Ok(())
}

/// Signatures of stored versions, themselves stored as chunks (a signature is a grid of block
/// hashes, so an edit changes a few of its chunks and the rest are shared with the previous
/// version's: keeping one per version costs about as little as the edit). Kept for a path's
/// current and previous versions; made again from the version's chunks when asked for another.
#[derive(Clone)]
pub struct Sigs {
    chunks: Arc<dyn ChunkStore>,
    meta: Arc<Metadata>,
}

impl Sigs {
    pub fn new(chunks: Arc<dyn ChunkStore>, meta: Arc<Metadata>) -> Self {
        Sigs { chunks, meta }
    }

    fn block(len: u64) -> u32 {
        crate::delta::block_size(len)
    }

    /// The stored signature of the version with `hash` and length `len`, if any.
    pub fn get(&self, hash: &ContentHash, len: u64) -> Option<fast_rsync::Signature> {
        let locs = self.meta.signature(hash, Self::block(len)).ok()??;
        let mut r = Reader::new(self.chunks.clone(), locs);
        let n = r.len() as usize;
        let bytes = Source::bytes(&mut r, 0..n).ok()?.to_vec();
        fast_rsync::Signature::deserialize(bytes).ok()
    }

    pub fn contains(&self, hash: &ContentHash, len: u64) -> bool {
        self.meta.signature(hash, Self::block(len)).is_ok_and(|l| l.is_some())
    }

    /// A builder for the signature of a version about to be stored, unless that version is
    /// small enough to go whole or has one already.
    pub fn builder_for(&self, hash: &ContentHash, len: u64) -> Option<crate::delta::signature::Builder> {
        (len >= crate::delta::WHOLE_FILE_BELOW && !self.contains(hash, len))
            .then(|| crate::delta::signature::Builder::new(len))
    }

    /// Writes a signature's chunks through `sink`; [`record`](Self::record) it once the sink's
    /// pack is sealed.
    pub fn write(&self, sink: &mut PackSink, sig: &fast_rsync::Signature) -> io::Result<ChunkList> {
        let mut w = Chunker::with_sizes(sink, self.meta.as_ref(), SIGNATURE);
        io::Write::write_all(&mut w, sig.serialized())?;
        w.finish()
    }

    pub fn record(&self, hash: &ContentHash, len: u64, list: &[(ChunkKey, u32)]) -> io::Result<()> {
        self.meta.save_signature(hash, Self::block(len), list).map(drop).map_err(io::Error::other)
    }

    /// Stores a signature at once (its own pack).
    pub fn put(&self, hash: &ContentHash, len: u64, sig: &fast_rsync::Signature) -> io::Result<()> {
        let mut sink = PackSink::new(self.chunks.clone());
        let list = self.write(&mut sink, sig)?;
        sink.seal(self.meta.as_ref())?;
        self.record(hash, len, &list)
    }

    pub fn remove(&self, hash: &ContentHash, len: u64) {
        let _ = self.meta.drop_signature(hash, Self::block(len));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delta::{Applier, encode_delta, pseudo_random, signature};
    use crate::server::store::local::LocalChunks;
    use crate::server::store::sqlite::SqliteMeta;

    fn list_of(data: &[u8]) -> ChunkList {
        let mut at = 0;
        cut_all(data, CONTENT)
            .into_iter()
            .map(|n| {
                let k = key_of(&data[at..at + n]);
                at += n;
                (k, n as u32)
            })
            .collect()
    }

    /// Rebuilding `new` from a delta against `base` through a chunker that reuses the base's
    /// chunks gives exactly the chunks of cutting `new` whole, and stores only the new ones.
    fn rebuild(base: &[u8], new: &[u8]) -> (ChunkList, u64) {
        let d = tempfile::tempdir().unwrap();
        let meta = SqliteMeta::open(&d.path().join("db")).unwrap();
        let store: Arc<dyn ChunkStore> = Arc::new(LocalChunks::open(&d.path().join("packs")).unwrap());
        let mut sink = PackSink::new(store);
        let sig = signature::compute(base);
        let mut blocks = Vec::new();
        encode_delta(&sig, new, None, |b, _| {
            blocks.push(b);
            Ok(())
        })
        .unwrap();
        let chunker = Chunker::new(&mut sink, &meta).with_base(Some(list_of(base)));
        let mut ap = Applier::new(base, chunker, new.len() as u64);
        for b in &blocks {
            ap.block(b).unwrap();
        }
        let done = ap.finish().unwrap();
        let list = done.out.finish().unwrap();
        (list, sink.new_raw)
    }

    #[test]
    fn small_random_chunks_are_not_compressed_and_small_text_chunks_are() {
        let text: Vec<u8> =
            (0..4096u32).flat_map(|i| format!("line {i} of some text\n").into_bytes()).collect();
        assert!(
            !worth_compressing(&mut None, &pseudo_random(4096, 7)),
            "a random 4 KiB chunk is stored as it is"
        );
        assert!(worth_compressing(&mut None, &text[..4096]), "text is compressed");
        assert!(worth_compressing(&mut None, &pseudo_random(500, 7)), "too small to tell: tried");
    }

    #[test]
    fn a_download_delta_by_chunks_rebuilds_the_new_version_and_sends_only_what_differs() {
        use crate::protocol::{Meta, Node};
        use crate::server::meta::{Change, MetaStore, Step};
        let d = tempfile::tempdir().unwrap();
        let meta = SqliteMeta::open(&d.path().join("db")).unwrap();
        let store: Arc<dyn ChunkStore> = Arc::new(LocalChunks::open(&d.path().join("packs")).unwrap());
        let acct = meta.add_account("a", "d", "t").unwrap().id;
        let base = pseudo_random(5 << 20, 11);
        let mut new = base.clone();
        new.splice(2_000_000..2_000_000, pseudo_random(3000, 12));
        new[4_000_000..4_010_000].copy_from_slice(&pseudo_random(10_000, 13));
        let mut sink = PackSink::new(store.clone());
        let mut lists = Vec::new();
        for data in [&base, &new] {
            let mut w = Chunker::new(&mut sink, &meta);
            io::Write::write_all(&mut w, data).unwrap();
            lists.push(w.finish().unwrap());
        }
        sink.seal(&meta).unwrap();
        let steps: Vec<Step> = [("b", &base, &lists[0]), ("n", &new, &lists[1])]
            .into_iter()
            .map(|(p, data, list)| Step {
                op: "write",
                changes: vec![Change {
                    path: crate::path::RelPath::new(p).unwrap(),
                    base_rev: 0,
                    node: Some(Node::File {
                        hash: ContentHash::of(data),
                        size: data.len() as u64,
                        meta: Meta { mtime_ns: 0, mode: 0o644 },
                    }),
                    chunks: Some(list.clone()),
                }],
            })
            .collect();
        assert!(meta.commit(acct, "d", &steps).unwrap().iter().all(Result::is_ok));
        let (_, locs) = meta.content(acct, &ContentHash::of(&new)).unwrap().unwrap();
        let sig = signature::compute(&base);
        let mut blocks = Vec::new();
        let mut reader = Reader::new(store, locs);
        delta_by_chunks(&sig, &mut reader, &lists[1], &lists[0], |b, _| {
            blocks.push(b);
            Ok(())
        })
        .unwrap();
        let mut ap = Applier::new(&base[..], Vec::new(), new.len() as u64);
        for b in &blocks {
            ap.block(b).unwrap();
        }
        let done = ap.finish().unwrap();
        assert!(done.out == new, "the delta does not rebuild the new version");
        assert!(done.stats.literal < 64 << 10, "{} literal bytes for 13 KB of change", done.stats.literal);
    }

    /// The local store, counting its reads and asking for an object store's read-ahead.
    struct Counted(LocalChunks, std::sync::atomic::AtomicU64);

    impl ChunkStore for Counted {
        fn create(&self) -> io::Result<Box<dyn PackWriter>> {
            self.0.create()
        }
        fn read(&self, pack: PackId, offset: u64, len: u32) -> io::Result<Vec<u8>> {
            self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.0.read(pack, offset, len)
        }
        fn delete(&self, pack: PackId) -> io::Result<()> {
            self.0.delete(pack)
        }
        fn list(&self) -> io::Result<Vec<(PackId, u64, u64)>> {
            self.0.list()
        }
        fn clean_unfinished(&self) -> io::Result<usize> {
            self.0.clean_unfinished()
        }
        fn free_bytes(&self) -> Option<u64> {
            None
        }
        fn read_ahead(&self) -> u64 {
            4 << 20
        }
    }

    /// A version read front to back in small pieces costs one read per 4 MiB of chunks that
    /// follow each other in a pack (an object store's GETs), not one per chunk; and the bytes
    /// are the version's, also where a chunk repeats.
    #[test]
    fn a_reader_fetches_chunks_that_follow_in_a_pack_together() {
        let d = tempfile::tempdir().unwrap();
        let meta = SqliteMeta::open(&d.path().join("db")).unwrap();
        let counted = Arc::new(Counted(
            LocalChunks::open(&d.path().join("packs")).unwrap(),
            std::sync::atomic::AtomicU64::new(0),
        ));
        let store: Arc<dyn ChunkStore> = counted.clone();
        let part = pseudo_random(6 << 20, 21);
        // The same 6 MiB twice: the second half's chunks are the first half's again.
        let data = [&part[..], &part[..]].concat();
        let mut sink = PackSink::new(store.clone());
        let mut w = Chunker::new(&mut sink, &meta);
        io::Write::write_all(&mut w, &data).unwrap();
        let list = w.finish().unwrap();
        let locs = sink.written.clone();
        sink.seal(&meta).unwrap();
        let by_key: std::collections::HashMap<_, _> = locs.iter().map(|c| (c.key, c.loc)).collect();
        let locs: Vec<ChunkLoc> = list.iter().map(|(k, _)| by_key[k]).collect();
        assert!(locs.len() > 100, "{} chunks", locs.len());
        let mut reader = Reader::new(store, locs.clone());
        let mut back = Vec::new();
        let mut at = 0;
        while at < data.len() {
            let n = (64 << 10).min(data.len() - at);
            back.extend_from_slice(reader.range(at as u64, n).unwrap());
            at += n;
        }
        assert!(back == data, "the reader gave other bytes");
        let reads = counted.1.load(std::sync::atomic::Ordering::Relaxed);
        assert!(reads <= 8, "{reads} reads for {} chunks of 12 MiB", locs.len());
    }

    #[test]
    fn copies_reuse_the_base_chunks_and_cut_exactly_as_a_whole_cut() {
        let base = pseudo_random(6 << 20, 1);
        let mut edits: Vec<(&str, Vec<u8>)> = Vec::new();
        let mut overwrite = base.clone();
        overwrite[3_000_000..3_065_536].copy_from_slice(&pseudo_random(65_536, 2));
        edits.push(("overwrite", overwrite));
        let mut insert = base.clone();
        insert.splice(1_000_000..1_000_000, pseudo_random(1000, 3));
        edits.push(("insert", insert));
        let mut append = base.clone();
        append.extend_from_slice(&pseudo_random(300_000, 4));
        edits.push(("append", append));
        let mut cut_front = base[500_000..].to_vec();
        cut_front[10] ^= 1;
        edits.push(("cut front", cut_front));
        edits.push(("same", base.clone()));
        for (what, new) in edits {
            let (list, stored) = rebuild(&base, &new);
            assert_eq!(list, list_of(&new), "{what}: the chunks differ from a whole cut");
            assert!(stored < 1 << 20, "{what}: {stored} bytes of new chunks for a small change");
        }
    }
}
