//! The server's two storage interfaces, the seam for other backends: a [`ChunkStore`] holds
//! packs of content chunks (immutable objects), a [`super::meta::MetaStore`] holds everything
//! else (accounts, versions, journal, chunk locations) and decides every commit in one
//! transaction. Neither passes a `PathBuf` or a `File`: an object store and a database can
//! implement them.
//!
//! # Layout
//! - [`local`]: packs as files in the data folder.
//! - [`sqlite`]: the metadata in the data folder's SQLite database.
//! - [`s3`]: packs as objects in an S3-compatible bucket (many server processes).
//! - [`postgres`]: the metadata in PostgreSQL (many server processes).
//! - [`conformance`]: the contract every implementation passes (tests).

pub mod local;
pub mod postgres;
pub mod s3;
pub mod sqlite;

#[cfg(test)]
pub mod conformance;
#[cfg(test)]
pub mod testenv;

use std::io;

/// A pack's name: 16 random bytes, never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PackId(pub [u8; 16]);

impl PackId {
    pub fn random() -> io::Result<Self> {
        let mut b = [0u8; 16];
        getrandom::fill(&mut b)
            .map_err(|e| io::Error::other(format!("the OS random number generator failed: {e}")))?;
        Ok(PackId(b))
    }

    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn from_hex(s: &str) -> Option<Self> {
        let v = hex::decode(s).ok()?;
        Some(PackId(v.try_into().ok()?))
    }
}

/// Immutable packs of chunks. A pack is written once, front to back, and becomes visible (and
/// durable) only when [`PackWriter::finish`] returns; it is never changed afterwards, only
/// deleted. Writing the same pack again is harmless.
pub trait ChunkStore: Send + Sync {
    /// Starts a new pack.
    fn create(&self) -> io::Result<Box<dyn PackWriter>>;
    /// `len` bytes of a finished pack at `offset`. A missing pack is `NotFound`; a short one
    /// `UnexpectedEof`.
    fn read(&self, pack: PackId, offset: u64, len: u32) -> io::Result<Vec<u8>>;
    /// Deletes a finished pack; a missing one is fine.
    fn delete(&self, pack: PackId) -> io::Result<()>;
    /// Every finished pack, with its size in bytes and its age in seconds.
    fn list(&self) -> io::Result<Vec<(PackId, u64, u64)>>;
    /// Removes packs whose writing was interrupted (a crash): they were never finished, so
    /// nothing refers to them. Returns how many.
    fn clean_unfinished(&self) -> io::Result<usize>;
    /// Bytes still free for packs, if the backend knows (a local disk does).
    fn free_bytes(&self) -> Option<u64>;
    /// How far past what a reader needs one read may go when the chunks there follow in the
    /// same pack: worth it where each read is a request (an object store), not for a local file.
    fn read_ahead(&self) -> u64 {
        0
    }
}

/// A pack being written.
pub trait PackWriter: Send {
    fn id(&self) -> PackId;
    /// Appends bytes.
    fn write(&mut self, bytes: &[u8]) -> io::Result<()>;
    /// Bytes written so far.
    fn len(&self) -> u64;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Makes the pack durable and visible under its id.
    fn finish(self: Box<Self>) -> io::Result<()>;
}
