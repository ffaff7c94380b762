//! Rsync-style deltas on top of `fast_rsync`, with what it lacks for huge files.
//!
//! `fast_rsync::diff` needs the whole new data and the whole signature index in memory, checks
//! every offset with a one-block MD4 (~720 MiB/s), and `fast_rsync::apply` appends its whole
//! result to one buffer. So:
//! - the new file is read through a window that moves forward ([`source`]: the client never maps
//!   a user's file, which can be truncated under it) and searched grid-first ([`diff`]): blocks
//!   that stayed put (or all moved by one amount) are found by fast_rsync's multi-lane MD4 over a
//!   span, and
//!   `fast_rsync::diff` runs only over short spans where that misses; its delta is re-encoded
//!   into our own op stream ([`ops`]), cut into blocks of about 1 MiB;
//! - the receiver applies op blocks one by one, streaming into a file and hashing and signing as
//!   it goes ([`apply`]), copying from a base read by `pread` (the client's) or mapped (the
//!   server's own store).
//!
//! A whole-file transfer is the same op stream with only literals, so there is one decoder.
//!
//! # Layout
//! - [`block_size`]: the one rule that picks a block size from a file size.
//! - [`signature`]: computing signatures (whole, from a file, or piece by piece) and the on-disk
//!   signature cache (both ends keep one).
//! - [`diff`]: the encoder's search for matches.
//! - [`ops`]: the wire op stream, how ops gather into blocks, and zstd framing.
//! - [`apply`]: the streaming decoder.
//! - [`source`]: what they read: slices, or a user's file by positional reads.
//! - [`stream`]: the per-connection zstd stream for small files' blocks.

pub mod apply;
pub mod block_size;
pub mod diff;
pub mod ops;
pub mod signature;
pub mod source;
pub mod stream;

pub use apply::{Applied, Applier, Sink};
pub use block_size::{WHOLE_FILE_BELOW, block_size};
pub use diff::{encode_delta, encode_delta_from};
pub use ops::{Block, Codec, DeltaStats, encode_whole, encode_whole_from};
pub use signature::SigCache;
pub use source::{Base, FileBase, FileWindow, Source};

/// Bytes of new data a block may stand for at most: progress moves and the sender releases the
/// pages behind it at least this often.
pub const WINDOW: usize = 8 << 20;

/// Largest decoded block a receiver accepts (blocks are cut at about 1 MiB of ops; this leaves
/// room for older senders that cut at a window).
pub const MAX_BLOCK: usize = WINDOW + (1 << 20);

#[derive(Debug, thiserror::Error)]
pub enum DeltaError {
    #[error("corrupt delta: {0}")]
    Corrupt(&'static str),
    #[error("delta copies {len} bytes at offset {offset} but the base has only {base_len}")]
    CopyOutOfBounds { offset: u64, len: u64, base_len: u64 },
    #[error("delta produces more than the announced {limit} bytes")]
    TooLong { limit: u64 },
    #[error("decompressing a delta block failed: {0}")]
    Decompress(std::io::Error),
    #[error("fast_rsync diff failed: {0}")]
    Diff(String),
    /// A read of a local file came back short: it was truncated or replaced while it was read.
    #[error("the file changed while it was read: it ends at {at} bytes, not {len}")]
    ChangedWhileRead { at: u64, len: u64 },
    #[error("I/O error while encoding or applying a delta: {0}")]
    Io(#[from] std::io::Error),
}

/// Deterministic incompressible test data (xorshift64).
#[cfg(test)]
pub(crate) fn pseudo_random(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
