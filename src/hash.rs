//! Content identity: xxh3-128 of a file's bytes, the one hash used for "same content",
//! rename detection, signature-cache keys and verification after every reconstruction.

use std::fmt;
use std::io::{self, Read};
use std::path::Path;

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::Xxh3Default;

/// Read size for hashing: large enough that syscalls cost nothing next to hashing.
const READ_BUF: usize = 1 << 20;

#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ContentHash(pub [u8; 16]);

impl ContentHash {
    pub fn of(bytes: &[u8]) -> Self {
        ContentHash(xxhash_rust::xxh3::xxh3_128(bytes).to_be_bytes())
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn from_slice(b: &[u8]) -> Option<Self> {
        Some(ContentHash(b.try_into().ok()?))
    }

    /// Hashes a file, streaming through a buffer: memory stays bounded whatever the size. The
    /// file is opened as [`open_to_read`](crate::fsutil::open_to_read) does: not through a
    /// symlink, its access time left alone.
    pub fn of_file(path: &Path) -> io::Result<(Self, u64)> {
        let f = crate::fsutil::open_to_read(path)?;
        let len = f.metadata()?.len();
        Self::of_open(f, len)
    }

    /// [`of_file`](Self::of_file) for a file whose size a stat just gave (`len`): the scan's
    /// path, two system calls fewer per file (no `fstat`; a read that brings exactly `len` bytes
    /// when it asked for more is the end, so no read only to see it). Reads past `len` if the
    /// file grew; the bytes read are counted and hashed either way.
    pub fn of_file_sized(path: &Path, len: u64) -> io::Result<(Self, u64)> {
        Self::of_open(crate::fsutil::open_to_read(path)?, len)
    }

    fn of_open(mut f: std::fs::File, len: u64) -> io::Result<(Self, u64)> {
        let mut h = Hasher::new();
        // Sized to the file: a scan hashes thousands of small files, and zeroing a full buffer
        // for each cost more than hashing them. One byte more than expected, so a short read at
        // the expected size says the end.
        let mut buf = vec![0u8; (len as usize).saturating_add(1).clamp(1, READ_BUF)];
        let mut total = 0u64;
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            total += n as u64;
            h.update(&buf[..n]);
            if n < buf.len() && total == len {
                break;
            }
        }
        Ok((h.finish(), total))
    }
}

/// Incremental hashing, for data that arrives in pieces (downloads, reconstructions).
pub struct Hasher(Xxh3Default);

impl Hasher {
    pub fn new() -> Self {
        Hasher(Xxh3Default::new())
    }
    pub fn update(&mut self, b: &[u8]) {
        self.0.update(b);
    }
    pub fn finish(&self) -> ContentHash {
        ContentHash(self.0.digest128().to_be_bytes())
    }
}

impl Default for Hasher {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", &self.to_hex()[..12])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streaming_equals_one_shot() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut h = Hasher::new();
        for c in data.chunks(777) {
            h.update(c);
        }
        assert_eq!(h.finish(), ContentHash::of(&data));
        assert_ne!(ContentHash::of(b"a"), ContentHash::of(b"b"));
    }

    /// A file hashed with the size its stat gave is hashed whole, whatever that size says: the
    /// same hash and byte count as the content's, for sizes around the buffer's, and when the
    /// file grew or shrank after the stat.
    #[test]
    fn a_file_hashed_with_its_stat_size_is_hashed_whole() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        for size in [0, 1, 4096, READ_BUF - 1, READ_BUF, READ_BUF + 1, 3 * READ_BUF + 5] {
            let data: Vec<u8> = (0..size).map(|i| (i * 13 % 251) as u8).collect();
            std::fs::write(&p, &data).unwrap();
            let want = (ContentHash::of(&data), size as u64);
            assert_eq!(ContentHash::of_file(&p).unwrap(), want, "{size}");
            for stat in [size as u64, (size as u64).saturating_sub(1), size as u64 + 1, 0] {
                assert_eq!(ContentHash::of_file_sized(&p, stat).unwrap(), want, "{size} stat {stat}");
            }
        }
    }
}
