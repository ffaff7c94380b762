//! Signatures and the signature cache.
//!
//! Both ends keep the signature of every version they hold, keyed by content hash and block size,
//! so the signature itself need not cross the wire: the sender of a change diffs against the
//! cached signature of the version the receiver has.

use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use fast_rsync::{Signature, SignatureOptions};

use crate::hash::ContentHash;

/// Bytes of MD4 kept per block. 8 bytes is what Dropbox uses; a wrong match is caught anyway by
/// the xxh3-128 check of every reconstructed file, which then falls back to a whole transfer.
const CRYPTO_HASH_SIZE: u32 = 8;

fn options(len: u64) -> SignatureOptions {
    SignatureOptions { block_size: super::block_size(len), crypto_hash_size: CRYPTO_HASH_SIZE }
}

pub fn compute(data: &[u8]) -> Signature {
    Signature::calculate(data, options(data.len() as u64))
}

/// Bytes of the serialized header (magic, block size, hash size) that starts every signature.
pub(crate) const HEADER: usize = 12;

/// A signature's options and its per-block entries (CRC, then the strong hash), read from its
/// serialized form; `None` for a header no signature of ours has.
pub fn layout(sig: &Signature) -> Option<(SignatureOptions, usize, &[u8])> {
    let bytes = sig.serialized();
    let be = |at: usize| bytes.get(at..at + 4).and_then(|b| b.try_into().ok()).map(u32::from_be_bytes);
    let (block_size, crypto_hash_size) = (be(4)?, be(8)?);
    if block_size == 0 || crypto_hash_size > 16 {
        return None;
    }
    Some((SignatureOptions { block_size, crypto_hash_size }, 4 + crypto_hash_size as usize, &bytes[HEADER..]))
}

/// Bytes gathered before hashing when data arrives in small pieces: enough blocks at once for
/// fast_rsync's multi-lane MD4.
const GATHER: usize = 256 << 10;

/// Builds the signature of data that arrives in pieces of any size (an upload being encoded, a
/// reconstruction being written), so caching the new version's signature costs no second read of
/// the file. The result is the same bytes as [`compute`] over the whole data.
pub struct Builder {
    opts: SignatureOptions,
    /// Serialized signature so far: header, then one entry per block.
    out: Vec<u8>,
    /// Data not yet hashed, always less than `gather` bytes.
    pending: Vec<u8>,
    /// Bytes fed so far.
    fed: u64,
    /// A whole number of blocks.
    gather: usize,
}

impl Builder {
    /// `len` is the final size of the data: it picks the block size.
    pub fn new(len: u64) -> Self {
        let opts = options(len);
        let bs = opts.block_size as usize;
        let mut out = Vec::with_capacity(HEADER + (len as usize).div_ceil(bs).min(1 << 20) * 12);
        out.extend_from_slice(&Signature::calculate(&[], opts).serialized()[..HEADER]);
        Builder { opts, out, pending: Vec::new(), fed: 0, gather: (GATHER / bs).max(1) * bs }
    }

    pub fn update(&mut self, mut data: &[u8]) {
        self.fed += data.len() as u64;
        while !data.is_empty() {
            if self.pending.is_empty() && data.len() >= self.gather {
                // Large pieces are hashed in place, whole blocks at a time.
                let whole = data.len() - data.len() % self.opts.block_size as usize;
                self.hash(&data[..whole]);
                data = &data[whole..];
                continue;
            }
            let take = (self.gather - self.pending.len()).min(data.len());
            self.pending.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.pending.len() == self.gather {
                self.hash_pending();
            }
        }
    }

    /// Whether entries computed with `opts` from the current position on can be taken as they are
    /// ([`append_signed`](Self::append_signed)): same block and hash sizes, at a block boundary.
    pub fn in_step_with(&self, opts: SignatureOptions) -> bool {
        opts.block_size == self.opts.block_size
            && opts.crypto_hash_size == self.opts.crypto_hash_size
            && self.fed.is_multiple_of(self.opts.block_size as u64)
    }

    /// Takes the serialized entries of the next whole blocks, computed elsewhere (the diff's grid
    /// already hashed them); only valid when [`in_step_with`](Self::in_step_with) says so.
    pub fn append_signed(&mut self, entries: &[u8]) {
        self.hash_pending();
        let entry = 4 + self.opts.crypto_hash_size as usize;
        self.fed += (entries.len() / entry) as u64 * self.opts.block_size as u64;
        self.out.extend_from_slice(entries);
    }

    fn hash(&mut self, blocks: &[u8]) {
        self.out.extend_from_slice(&Signature::calculate(blocks, self.opts).serialized()[HEADER..]);
    }

    fn hash_pending(&mut self) {
        let p = std::mem::take(&mut self.pending);
        if !p.is_empty() {
            self.hash(&p);
        }
        self.pending = p;
        self.pending.clear();
    }

    pub fn finish(mut self) -> Signature {
        self.hash_pending();
        Signature::deserialize(self.out).expect("a header and whole entries, as fast_rsync writes them")
    }
}

/// The signature of a file, read piece by piece: the same bytes as [`compute`], in bounded memory.
pub fn compute_file(path: &Path) -> io::Result<Signature> {
    let mut f = crate::fsutil::open_to_read(path)?;
    let mut b = Builder::new(f.metadata()?.len());
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(b.finish());
        }
        b.update(&buf[..n]);
    }
}

/// A folder of `<hash>-<block size>.sig` files. Losing it costs bandwidth, never data, so writes
/// are atomic (temp + rename) but not fsynced.
#[derive(Clone, Debug)]
pub struct SigCache {
    dir: PathBuf,
}

impl SigCache {
    pub fn new(dir: impl Into<PathBuf>) -> io::Result<Self> {
        let dir = dir.into();
        fs::create_dir_all(&dir)?;
        Ok(SigCache { dir })
    }

    fn path(&self, hash: &ContentHash, len: u64) -> PathBuf {
        self.dir.join(format!("{}-{}.sig", hash.to_hex(), super::block_size(len)))
    }

    /// The cached signature of the version with `hash` and length `len`, if any.
    pub fn get(&self, hash: &ContentHash, len: u64) -> Option<Signature> {
        let bytes = fs::read(self.path(hash, len)).ok()?;
        Signature::deserialize(bytes).ok()
    }

    pub fn contains(&self, hash: &ContentHash, len: u64) -> bool {
        self.path(hash, len).exists()
    }

    pub fn put(&self, hash: &ContentHash, len: u64, sig: &Signature) -> io::Result<()> {
        use std::io::Write;
        let (f, tmp) = crate::fsutil::create_temp(&self.dir)?;
        let mut w = crate::fsutil::WriteBehind::new(f);
        w.write_all(sig.serialized())?;
        drop(w);
        fs::rename(&tmp, self.path(hash, len))
    }

    /// A builder for the signature of a version about to be sent or written, unless that version
    /// is small enough to go whole or is cached already.
    pub fn builder_for(&self, hash: &ContentHash, len: u64) -> Option<Builder> {
        (len >= super::WHOLE_FILE_BELOW && !self.contains(hash, len)).then(|| Builder::new(len))
    }

    /// Computes and stores the signature of a file unless it is small enough to go whole or is
    /// cached already.
    pub fn ensure_file(&self, hash: &ContentHash, path: &Path) -> io::Result<()> {
        let len = fs::symlink_metadata(path)?.len();
        if self.builder_for(hash, len).is_none() {
            return Ok(());
        }
        self.put(hash, len, &compute_file(path)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windowed_signature_equals_whole() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        // Three windows and a partial last block.
        let data: Vec<u8> = (0..(super::super::WINDOW * 2 + 12_345)).map(|i| (i * 31 % 251) as u8).collect();
        fs::write(&p, &data).unwrap();
        assert_eq!(compute_file(&p).unwrap().serialized(), compute(&data).serialized());
        fs::write(&p, b"").unwrap();
        assert_eq!(compute_file(&p).unwrap().serialized(), compute(b"").serialized());
    }

    #[test]
    fn builder_equals_whole_whatever_the_pieces() {
        let data: Vec<u8> = (0..3_000_017usize).map(|i| (i * 131 % 253) as u8).collect();
        for pieces in [&[1usize, 7, 1023, 1024, 1025][..], &[300_000, 5], &[4 << 20]] {
            let mut b = Builder::new(data.len() as u64);
            let mut rest = &data[..];
            for &n in pieces.iter().cycle() {
                if rest.is_empty() {
                    break;
                }
                let (a, r) = rest.split_at(n.min(rest.len()));
                b.update(a);
                rest = r;
            }
            assert_eq!(b.finish().serialized(), compute(&data).serialized(), "pieces {pieces:?}");
        }
    }
}
