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
const HEADER: usize = 12;

/// The signature of a file, read window by window: the same bytes as [`compute`] over the whole
/// file (windows are whole blocks), in bounded memory.
pub fn compute_file(path: &Path) -> io::Result<Signature> {
    use std::os::unix::fs::OpenOptionsExt;
    // Never through a symlink: a link swapped in for a file must not make us read elsewhere.
    let mut f = fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(path)?;
    let len = f.metadata()?.len();
    let opts = options(len);
    // A whole number of blocks per window, so per-window signatures concatenate.
    let window = (super::WINDOW / opts.block_size as usize).max(1) * opts.block_size as usize;
    let mut buf = vec![0u8; window];
    let mut out: Vec<u8> = Vec::new();
    loop {
        let mut filled = 0;
        while filled < window {
            let n = f.read(&mut buf[filled..])?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 && !out.is_empty() {
            break;
        }
        let sig = Signature::calculate(&buf[..filled], opts);
        let bytes = sig.serialized();
        out.extend_from_slice(if out.is_empty() { bytes } else { &bytes[HEADER..] });
        if filled < window {
            break;
        }
    }
    Signature::deserialize(out).map_err(|e| io::Error::other(e.to_string()))
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

    /// Computes and stores the signature of a file unless it is small enough to go whole or is
    /// cached already.
    pub fn ensure_file(&self, hash: &ContentHash, path: &Path) -> io::Result<()> {
        let len = fs::symlink_metadata(path)?.len();
        if len < super::WHOLE_FILE_BELOW || self.contains(hash, len) {
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
}
