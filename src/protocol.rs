//! The wire protocol: length-prefixed frames holding postcard-encoded messages.
//!
//! # Layout
//! - [`message`]: every message and the order they flow in (see ARCHITECTURE.md).
//! - [`connection`]: framed, byte-counting reader and writer halves of a TCP stream.
//! - [`ratelimit`]: `--bwlimit`, a token bucket per direction on the bytes of the TCP stream.

pub mod connection;
pub mod message;
pub mod ratelimit;

pub use connection::{Counted, Counters, FrameReader, FrameWriter, ReadAhead, split};
pub use message::*;
pub use ratelimit::{BwLimit, Limited, Shaper};

/// Hard limit on one frame: a delta block ([`crate::delta::MAX_BLOCK`]) plus headroom. A peer
/// announcing a larger frame is cut off before anything is allocated.
pub const MAX_FRAME: usize = crate::delta::MAX_BLOCK + (64 << 10);

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("connection error: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed message from peer: {0}")]
    Decode(postcard::Error),
    #[error("malformed frame from peer: {0}")]
    Malformed(String),
    #[error("could not encode message: {0}")]
    Encode(postcard::Error),
    #[error("peer closed the connection")]
    Closed,
}
