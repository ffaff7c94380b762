//! Signatures and the signature cache.
//!
//! Both ends keep the signature of every version they hold, keyed by content hash and block size,
//! so the signature itself need not cross the wire: the sender of a change diffs against the
//! cached signature of the version the receiver has.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use fast_rsync::{Signature, SignatureOptions};

use crate::hash::ContentHash;

/// Bytes of MD4 kept per block. 8 bytes is what Dropbox uses; a wrong match is caught anyway by
/// the xxh3-128 check of every reconstructed file, which then falls back to a whole transfer.
const CRYPTO_HASH_SIZE: u32 = 8;

pub fn compute(data: &[u8]) -> Signature {
    Signature::calculate(
        data,
        SignatureOptions {
            block_size: super::block_size(data.len() as u64),
            crypto_hash_size: CRYPTO_HASH_SIZE,
        },
    )
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
        let (f, tmp) = crate::fsutil::create_temp(&self.dir)?;
        drop(f);
        fs::write(&tmp, sig.serialized())?;
        fs::rename(&tmp, self.path(hash, len))
    }

    /// Computes and stores the signature of `data` unless it is small enough to go whole or is
    /// cached already.
    pub fn ensure(&self, hash: &ContentHash, data: &[u8]) -> io::Result<()> {
        let len = data.len() as u64;
        if len < super::WHOLE_FILE_BELOW || self.contains(hash, len) {
            return Ok(());
        }
        self.put(hash, len, &compute(data))
    }

    /// Same as [`ensure`](Self::ensure) for a file on disk.
    pub fn ensure_file(&self, hash: &ContentHash, path: &Path) -> io::Result<()> {
        let f = fs::File::open(path)?;
        let len = f.metadata()?.len();
        if len < super::WHOLE_FILE_BELOW || self.contains(hash, len) {
            return Ok(());
        }
        let map = crate::fsutil::map(&f)?;
        self.ensure(hash, &map)
    }

    pub fn remove(&self, hash: &ContentHash, len: u64) {
        let _ = fs::remove_file(self.path(hash, len));
    }
}
