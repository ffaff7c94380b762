//! One zstd stream per connection direction, for runs of small messages (requests, replies,
//! change pages and small files' blocks: see [`crate::protocol::connection`]).
//!
//! A 4 KiB text file compressed on its own shrinks about 2.5×; compressed as the next part of a
//! stream that has seen the files before it, about 3.4× (rsync keeps one stream per connection
//! for the same reason). Paths and entries compress the same way: a path shares most of its bytes
//! with the paths before it. Each piece is flushed, so the receiver can decode it at once, and the
//! stream is only ever fed pieces that are sent, so both ends stay in step. Large blocks keep
//! their own frames ([`super::ops`]): they compress well alone and may be produced off the
//! connection's task.

use zstd::stream::raw::{DParameter, Decoder, Encoder, InBuffer, Operation, OutBuffer};

/// Raw blocks up to this size travel inside runs (compressed by the connection's stream); larger
/// ones are compressed on their own by [`super::ops`].
pub const STREAM_MAX: usize = 64 << 10;

/// Level 4: on initial-small (10,000 text files, flushed per file) levels 4 and 6 give 11.31 and
/// 11.29 MB, but level 4 takes 193 ms against 594 ms (level 3: 11.37 MB, 198 ms), and this
/// compression was the client's largest CPU cost for many small files.
const LEVEL: i32 = 4;

/// The largest window a peer's stream may use (8 MiB; level 4 uses 2 MiB at most): a peer cannot
/// make the decoder allocate more than that.
const WINDOW_LOG_MAX: u32 = 23;

pub struct StreamEncoder(Encoder<'static>);

impl StreamEncoder {
    pub fn new() -> std::io::Result<Self> {
        Ok(StreamEncoder(Encoder::new(LEVEL)?))
    }

    /// Appends `data` to `out` as the next flushed piece of the stream: the peer's
    /// [`StreamDecoder`] decodes it whole, given the pieces before it.
    pub fn compress(&mut self, data: &[u8], out: &mut Vec<u8>) -> std::io::Result<()> {
        out.reserve(zstd::zstd_safe::compress_bound(data.len()) + 1024);
        let mut input = InBuffer::around(data);
        while input.pos() < data.len() {
            let pos = out.len();
            if out.capacity() - pos < 1024 {
                out.reserve(64 << 10);
            }
            let mut o = OutBuffer::around_pos(out, pos);
            self.0.run(&mut input, &mut o)?;
        }
        loop {
            let pos = out.len();
            if out.capacity() - pos < 1024 {
                out.reserve(64 << 10);
            }
            let mut o = OutBuffer::around_pos(out, pos);
            if self.0.flush(&mut o)? == 0 {
                return Ok(());
            }
        }
    }
}

pub struct StreamDecoder(Decoder<'static>);

impl StreamDecoder {
    pub fn new() -> std::io::Result<Self> {
        let mut d = Decoder::new()?;
        d.set_parameter(DParameter::WindowLogMax(WINDOW_LOG_MAX))?;
        Ok(StreamDecoder(d))
    }

    /// Decodes one piece of the peer's stream, appending it to `out`; a piece that would make
    /// `out` longer than `limit` bytes is refused (`InvalidData`) once the limit is passed,
    /// never decoded further, as are bytes that are not the stream's next piece.
    pub fn decompress(&mut self, piece: &[u8], out: &mut Vec<u8>, limit: usize) -> std::io::Result<()> {
        let mut input = InBuffer::around(piece);
        loop {
            let pos = out.len();
            if pos > limit {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("a compressed piece decodes to more than {limit} bytes"),
                ));
            }
            if out.capacity() == pos {
                // Grow by what is there (at least 64 KiB), never past one byte beyond the limit.
                out.reserve_exact(pos.max(64 << 10).min(limit + 1 - pos));
            }
            let mut o = OutBuffer::around_pos(out, pos);
            self.0.run(&mut input, &mut o)?;
            let room_left = o.pos() < o.capacity();
            if input.pos() == piece.len() && room_left {
                break;
            }
        }
        if out.len() > limit {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("a compressed piece decodes to more than {limit} bytes"),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn many_pieces_round_trip_and_compress_across_pieces() {
        let mut enc = StreamEncoder::new().unwrap();
        let mut dec = StreamDecoder::new().unwrap();
        let text =
            |i: usize| format!("line {} of a log that repeats itself a lot, item {}\n", i % 7, i).repeat(60);
        let (mut raw, mut wire) = (0, 0);
        for i in 0..50 {
            let b = text(i).into_bytes();
            raw += b.len();
            let mut piece = Vec::new();
            enc.compress(&b, &mut piece).unwrap();
            wire += piece.len();
            let mut out = Vec::new();
            dec.decompress(&piece, &mut out, 1 << 20).unwrap();
            assert_eq!(out, b);
        }
        assert!(wire * 10 < raw, "{wire} of {raw}");
        assert!(StreamDecoder::new().unwrap().decompress(&[9; 100], &mut Vec::new(), 1 << 20).is_err());
    }

    #[test]
    fn a_piece_past_the_limit_is_refused() {
        let mut enc = StreamEncoder::new().unwrap();
        let mut piece = Vec::new();
        enc.compress(&vec![0u8; 1 << 20], &mut piece).unwrap();
        assert!(piece.len() < 1000);
        let mut out = Vec::new();
        let e = StreamDecoder::new().unwrap().decompress(&piece, &mut out, 100_000).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
        assert!(out.capacity() <= 100_001, "allocated {} past the limit", out.capacity());
    }
}
