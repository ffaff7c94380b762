//! Framed reader and writer halves over any byte stream (TLS over TCP in practice), and the
//! counting of every byte that crosses the socket (TLS and framing included) for `--stats`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use futures_util::StreamExt;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufWriter, ReadBuf};
use tokio_util::codec::{Decoder, FramedRead};

use super::{MAX_FRAME, ProtocolError};
use crate::delta::stream::{STREAM_MAX, StreamDecoder, StreamEncoder};

#[derive(Debug, Default)]
pub struct Counters {
    pub sent: AtomicU64,
    pub received: AtomicU64,
}

impl Counters {
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
}

/// A byte stream that counts what crosses it. It sits right on the TCP socket, under TLS, so
/// `--stats` shows the bytes on the wire, handshake and record overhead included.
pub struct Counted<S> {
    inner: S,
    counters: Arc<Counters>,
}

impl<S> Counted<S> {
    pub fn new(inner: S, counters: Arc<Counters>) -> Self {
        Counted { inner, counters }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        self.counters.received.fetch_add(n, Ordering::Relaxed);
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            self.counters.sent.fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }
    // TLS writes its records as several buffers at once: one system call, not one each.
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &r {
            self.counters.sent.fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Reads ahead in big pieces under TLS: rustls asks its socket for 4 KiB at a time (and zeroes
/// its buffer as it grows), which made a 256 MiB upload 65,000 read calls. The buffer exists
/// only while data keeps coming: it is dropped whenever it is empty and the socket has nothing
/// more, so an idle connection holds none of it.
pub struct ReadAhead<S> {
    inner: S,
    buf: Vec<u8>,
    pos: usize,
}

/// How much one read from the socket may bring (a few TLS records).
const READ_AHEAD: usize = 64 << 10;

impl<S> ReadAhead<S> {
    pub fn new(inner: S) -> Self {
        ReadAhead { inner, buf: Vec::new(), pos: 0 }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ReadAhead<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let me = &mut *self;
        if me.pos == me.buf.len() {
            // A big read goes straight through; a small one fills the read-ahead first.
            if out.remaining() >= READ_AHEAD {
                return Pin::new(&mut me.inner).poll_read(cx, out);
            }
            me.buf.resize(READ_AHEAD, 0);
            let mut rb = ReadBuf::new(&mut me.buf);
            match Pin::new(&mut me.inner).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    let n = rb.filled().len();
                    me.buf.truncate(n);
                    me.pos = 0;
                }
                other => {
                    me.buf = Vec::new();
                    me.pos = 0;
                    return other;
                }
            }
        }
        let n = out.remaining().min(me.buf.len() - me.pos);
        out.put_slice(&me.buf[me.pos..me.pos + n]);
        me.pos += n;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ReadAhead<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The writing half with a stall limit: a write the peer leaves waiting (not reading) for
/// `stall` fails.
struct Stalled<W> {
    inner: W,
    stall: Option<Duration>,
    /// Armed while a write waits; allocated only then, so idle connections hold none.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<W> Stalled<W> {
    /// After the inner write or flush said `Pending`: fails once the peer has not taken a byte
    /// for `stall`.
    fn stalled(&mut self, cx: &mut Context<'_>) -> Option<std::io::Error> {
        let stall = self.stall?;
        let timer = self.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(stall)));
        if timer.as_mut().poll(cx).is_pending() {
            return None;
        }
        self.timer = None;
        Some(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("the peer took nothing we sent for {} s", stall.as_secs()),
        ))
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for Stalled<W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        match &r {
            Poll::Ready(_) => self.timer = None,
            Poll::Pending => {
                if let Some(e) = self.stalled(cx) {
                    return Poll::Ready(Err(e));
                }
            }
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        match &r {
            Poll::Ready(_) => self.timer = None,
            Poll::Pending => {
                if let Some(e) = self.stalled(cx) {
                    return Poll::Ready(Err(e));
                }
            }
        }
        r
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

type ReadSide = Box<dyn AsyncRead + Send + Sync + Unpin>;
type WriteSide = Box<dyn AsyncWrite + Send + Sync + Unpin>;

/// The high bit of a frame's length: the body is a compressed run (see [`FrameWriter`]).
const RUN_FLAG: u32 = 1 << 31;

/// One frame as it arrived: a message, or a compressed run of them.
struct Frame {
    run: bool,
    body: BytesMut,
}

/// Reads frames: a 4-byte big-endian header (the run flag, then the body's length, at most
/// [`MAX_FRAME`]), then the body. A longer announced frame is an error before anything is
/// allocated.
struct FrameCodec;

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = std::io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> std::io::Result<Option<Frame>> {
        let Some(head) = src.first_chunk::<4>() else {
            return Ok(None);
        };
        let head = u32::from_be_bytes(*head);
        let (run, n) = (head & RUN_FLAG != 0, (head & !RUN_FLAG) as usize);
        if n > MAX_FRAME {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("the peer announced a frame of {n} bytes, more than the limit of {MAX_FRAME}"),
            ));
        }
        if src.len() < 4 + n {
            src.reserve(4 + n - src.len());
            return Ok(None);
        }
        src.advance(4);
        Ok(Some(Frame { run, body: src.split_to(n) }))
    }
}

pub struct FrameReader {
    inner: FramedRead<ReadSide, FrameCodec>,
    counters: Arc<Counters>,
    /// Made on first use: a zstd context costs about a megabyte, too much for idle connections.
    stream: Option<StreamDecoder>,
    /// The plain frames of the last compressed run, read from `at` on.
    run: Vec<u8>,
    at: usize,
}

/// Writes the frames [`FrameReader`] reads. Every message but the first (`Hello`, `Welcome`: so
/// a peer of another protocol version can read the version check) is queued in a run of plain
/// frames (4-byte length, postcard body); on [`flush`](Self::flush), or once the run holds
/// [`RUN_MAX`] bytes, the run goes out as one frame flagged `RUN_FLAG`: its length (a postcard
/// varint, at most [`MAX_FRAME`]) then the next flushed piece of this direction's zstd stream,
/// which must decode to exactly that many bytes of whole plain frames. So paths, hashes' neighbours, sizes, replies and small files'
/// blocks all compress against everything sent before them, as in rsync's `-z` stream. Messages
/// larger than [`RUN_MSG_MAX`] (big blocks, already compressed on their own) go out as plain
/// frames after the run queued before them, and so does a message that looks random; a run
/// such a message sends on its way goes plain itself when it is under [`RUN_BEFORE_PLAIN`]
/// bytes. A run under [`RUN_MIN`] bytes while no stream is open goes out plain: a lone `Ping`
/// or reply does not cost a zstd context.
///
/// Not a `FramedWrite`: that copies every frame into its own buffer, a third copy of each
/// uploaded byte; here small frames gather in the buffer and large ones go straight to the socket.
pub struct FrameWriter {
    inner: BufWriter<Stalled<WriteSide>>,
    stream: Option<StreamEncoder>,
    /// Plain frames waiting to be compressed.
    run: Vec<u8>,
    /// The compressed run being written (kept between runs while the stream is open).
    packed: Vec<u8>,
    /// Whether the first message went out (plain).
    started: bool,
    /// Bytes of runs that went through the compressor.
    compressed_in: u64,
}

/// Write buffer: many small pipelined requests share one segment; small, because every idle
/// connection holds one.
const WRITE_BUF: usize = 16 << 10;

/// See [`FrameWriter::feed_content`]; small files' blocks stay batched.
const FLUSH_COVERED: u64 = 1 << 20;

/// A run goes out once it holds this much (see [`FrameWriter`]).
pub const RUN_MAX: usize = 128 << 10;
/// Larger messages are sent as frames of their own: a block of small file's data, up to
/// [`STREAM_MAX`], still goes in a run.
pub const RUN_MSG_MAX: usize = STREAM_MAX + 1024;
/// A smaller run with no stream open goes out as plain frames.
pub const RUN_MIN: usize = 64;
/// A smaller run that goes out because a plain frame follows it goes out as plain frames: the
/// request before each small random-looking file (or the reply before each one downloaded) was
/// otherwise a piece of the stream of its own, one zstd flush per file. perf of a client pushing
/// 100,000 new 4 KiB files: zstd was 8.7% of its samples, for about 30 bytes saved per file
/// (under 1% of what the files send).
pub const RUN_BEFORE_PLAIN: usize = 256;

/// Messages from this size on are checked for random-looking content (see [`looks_random`]).
const RANDOM_CHECK_MIN: usize = 1024;

/// Whether a message's tail (where a block's bytes are) looks incompressible: at least 240
/// distinct byte values among its last 1,024 bytes (random or compressed data has 251 on
/// average, text under 100). Such a message goes out as a plain frame instead of through the
/// stream's compressor, which found nothing in it and cost a quarter of the server's CPU in a
/// pull of 100,000 random small files. The cost is a run frame's header or so (about 10 bytes)
/// per such message. The server's chunk store asks the same of small chunks.
pub(crate) fn looks_random(bytes: &[u8]) -> bool {
    if bytes.len() < RANDOM_CHECK_MIN {
        return false;
    }
    // Marked without a branch, then counted: the branch on "seen before?" was mispredicted
    // about once per new value of random data (1.9 µs a call; 0.35 µs this way).
    let mut seen = [0u8; 256];
    for &b in &bytes[bytes.len() - RANDOM_CHECK_MIN..] {
        seen[b as usize] = 1;
    }
    seen.iter().map(|&s| u32::from(s)).sum::<u32>() >= 240
}

/// Splits a connection (any byte stream: TLS over TCP in practice) into a reader and a writer
/// that can live in different tasks. `counters` are the ones counting under it (see [`Counted`]).
pub fn split<S>(stream: S, counters: Arc<Counters>) -> (FrameReader, FrameWriter)
where
    S: AsyncRead + AsyncWrite + Send + Sync + 'static,
{
    let (r, w) = tokio::io::split(stream);
    let reader = FramedRead::new(Box::new(r) as ReadSide, FrameCodec);
    let w = Stalled { inner: Box::new(w) as WriteSide, stall: None, timer: None };
    let writer = BufWriter::with_capacity(WRITE_BUF, w);
    (
        FrameReader { inner: reader, counters, stream: None, run: Vec::new(), at: 0 },
        FrameWriter {
            inner: writer,
            stream: None,
            run: Vec::new(),
            packed: Vec::new(),
            started: false,
            compressed_in: 0,
        },
    )
}

fn malformed(what: impl Into<String>) -> ProtocolError {
    ProtocolError::Malformed(what.into())
}

impl FrameReader {
    /// TLS reports a peer that closed the socket without its `close_notify` as an unexpected
    /// end; between frames that is no truncation (a frame's length says where it ends), so it
    /// is a close like any other. Inside a frame it stays an error.
    fn closed_between_frames(&self, e: &std::io::Error) -> bool {
        e.kind() == std::io::ErrorKind::UnexpectedEof && self.inner.read_buffer().is_empty()
    }

    /// The next message of the run being read, if any is left.
    fn next_in_run<M: DeserializeOwned>(&mut self) -> Result<Option<M>, ProtocolError> {
        let rest = &self.run[self.at..];
        if rest.is_empty() {
            return Ok(None);
        }
        let Some(head) = rest.first_chunk::<4>() else {
            return Err(malformed("a compressed run ends inside a frame header"));
        };
        let n = u32::from_be_bytes(*head) as usize;
        // A flagged (nested) run reads as a length far past the run's end.
        if n == 0 || n > rest.len() - 4 {
            return Err(malformed(format!(
                "a frame of {n} bytes inside a compressed run with {} bytes left",
                rest.len() - 4
            )));
        }
        let msg = postcard::from_bytes(&rest[4..4 + n]).map_err(ProtocolError::Decode)?;
        self.at += 4 + n;
        if self.at == self.run.len() {
            self.run.clear();
            self.at = 0;
        }
        Ok(Some(msg))
    }

    /// Takes a frame: `Ok(Some(msg))` for a plain message; `Ok(None)` for a run (now being
    /// read) or the end of the peer's stream.
    fn take<M: DeserializeOwned>(&mut self, frame: Frame) -> Result<Option<M>, ProtocolError> {
        if frame.run {
            let dec = match &mut self.stream {
                Some(d) => d,
                None => self.stream.insert(StreamDecoder::new()?),
            };
            self.run.clear();
            self.at = 0;
            let (len, piece) = postcard::take_from_bytes::<u32>(&frame.body)
                .map_err(|_| malformed("a compressed run without its length"))?;
            let len = len as usize;
            if len == 0 || len > MAX_FRAME {
                return Err(malformed(format!("a compressed run of {len} bytes announced")));
            }
            dec.decompress(piece, &mut self.run, len)
                .map_err(|e| malformed(format!("a compressed run that does not decode: {e}")))?;
            // A piece cut short decodes to less (the rest would wait inside the decoder).
            if self.run.len() != len {
                return Err(malformed(format!(
                    "a compressed run decodes to {} of its announced {len} bytes",
                    self.run.len()
                )));
            }
            return Ok(None);
        }
        // The peer ended its compression stream (see `FrameWriter::end_stream`). Only after it
        // began one: anywhere else an empty frame is a malformed message.
        if frame.body.is_empty() && self.stream.is_some() {
            self.stream = None;
            self.run = Vec::new();
            self.at = 0;
            return Ok(None);
        }
        postcard::from_bytes(&frame.body).map(Some).map_err(ProtocolError::Decode)
    }

    /// The next message, or `Ok(None)` when the peer closed cleanly between frames.
    pub async fn recv<M: DeserializeOwned>(&mut self) -> Result<Option<M>, ProtocolError> {
        loop {
            if let Some(m) = self.next_in_run()? {
                return Ok(Some(m));
            }
            match self.inner.next().await {
                None => return Ok(None),
                Some(Err(e)) if self.closed_between_frames(&e) => return Ok(None),
                Some(Err(e)) => return Err(ProtocolError::Io(e)),
                Some(Ok(frame)) => {
                    if let Some(m) = self.take(frame)? {
                        return Ok(Some(m));
                    }
                }
            }
        }
    }

    /// [`recv`](Self::recv) with two limits: no byte at all for `idle` while no frame has begun,
    /// or no new byte for `stall` once a frame has begun (half a frame, then silence), ends the
    /// wait with a `TimedOut` error. A frame that keeps arriving, however slowly, is waited for.
    pub async fn recv_within<M: DeserializeOwned>(
        &mut self,
        idle: Duration,
        stall: Duration,
    ) -> Result<Option<M>, ProtocolError> {
        let tick = (stall.min(idle) / 4).max(Duration::from_millis(50));
        let mut seen = self.counters.received();
        let mut since = Instant::now();
        loop {
            if let Some(m) = self.next_in_run()? {
                return Ok(Some(m));
            }
            match tokio::time::timeout(tick, self.inner.next()).await {
                Ok(None) => return Ok(None),
                Ok(Some(Err(e))) if self.closed_between_frames(&e) => return Ok(None),
                Ok(Some(Err(e))) => return Err(ProtocolError::Io(e)),
                Ok(Some(Ok(frame))) => {
                    if let Some(m) = self.take(frame)? {
                        return Ok(Some(m));
                    }
                }
                // `FramedRead::next` is cancel-safe: a partial frame stays in its buffer.
                Err(_) => {
                    let now = self.counters.received();
                    if now != seen {
                        (seen, since) = (now, Instant::now());
                        continue;
                    }
                    let mid_frame = !self.inner.read_buffer().is_empty();
                    let (limit, what) = if mid_frame {
                        (stall, "stalled in the middle of a message")
                    } else {
                        (idle, "idle")
                    };
                    if since.elapsed() >= limit {
                        return Err(ProtocolError::Io(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!("peer {what} for {} s", limit.as_secs()),
                        )));
                    }
                }
            }
        }
    }
}

impl FrameWriter {
    /// Writes fail once the peer has taken nothing for `stall` (a peer that stopped reading
    /// must not hold a session, and the memory of what waits for it, forever).
    pub fn set_write_stall(&mut self, stall: Duration) {
        self.inner.get_mut().stall = Some(stall);
    }

    /// Whether this side's compression stream holds a context (see [`end_stream`](Self::end_stream)).
    pub fn streaming(&self) -> bool {
        self.stream.is_some()
    }

    /// Ends this side's compression stream and tells the peer with an empty frame (no message
    /// is empty), so both ends free their zstd contexts: about 2.3 MiB per direction at level 4,
    /// which an idle `watch` connection would otherwise hold for its whole life. The next run
    /// starts a new stream. Called after a few seconds without traffic.
    pub async fn end_stream(&mut self) -> Result<(), ProtocolError> {
        self.write_run().await?;
        if self.stream.take().is_some() {
            self.inner.write_all(&0u32.to_be_bytes()).await?;
            self.inner.flush().await?;
        }
        self.run = Vec::new();
        self.packed = Vec::new();
        Ok(())
    }

    /// Sends the queued run: compressed as the next piece of the stream, or as its plain frames
    /// when it is tiny and no stream is open.
    async fn write_run(&mut self) -> Result<(), ProtocolError> {
        if self.run.is_empty() {
            return Ok(());
        }
        if self.stream.is_none() && self.run.len() < RUN_MIN {
            self.inner.write_all(&self.run).await?;
            self.run.clear();
            return Ok(());
        }
        let enc = match &mut self.stream {
            Some(e) => e,
            None => self.stream.insert(StreamEncoder::new()?),
        };
        self.packed.clear();
        self.packed = postcard::to_extend(&(self.run.len() as u32), std::mem::take(&mut self.packed))
            .map_err(ProtocolError::Encode)?;
        enc.compress(&self.run, &mut self.packed)?;
        self.compressed_in += self.run.len() as u64;
        self.run.clear();
        if self.packed.len() > MAX_FRAME {
            // Cannot happen: a run is at most RUN_MAX + RUN_MSG_MAX bytes before compression.
            return Err(ProtocolError::Io(std::io::Error::other("a compressed run exceeds the frame limit")));
        }
        self.inner.write_all(&(self.packed.len() as u32 | RUN_FLAG).to_be_bytes()).await?;
        self.inner.write_all(&self.packed).await?;
        Ok(())
    }

    /// Queues a message; it goes out once the run or the buffer fills or on
    /// [`flush`](Self::flush). Lets a pipelining sender put many small requests in one TCP
    /// segment, and in one compressed run.
    pub async fn feed<M: Serialize>(&mut self, msg: &M) -> Result<(), ProtocolError> {
        let bytes = postcard::to_allocvec(msg).map_err(ProtocolError::Encode)?;
        if bytes.len() > MAX_FRAME {
            return Err(ProtocolError::Io(std::io::Error::other(format!(
                "message of {} bytes exceeds the frame limit",
                bytes.len()
            ))));
        }
        if self.started && bytes.len() <= RUN_MSG_MAX && !looks_random(&bytes) {
            self.run.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
            self.run.extend_from_slice(&bytes);
            if self.run.len() >= RUN_MAX {
                self.write_run().await?;
            }
            return Ok(());
        }
        self.started = true;
        if self.run.len() < RUN_BEFORE_PLAIN {
            self.inner.write_all(&self.run).await?;
            self.run.clear();
        } else {
            self.write_run().await?;
        }
        self.inner.write_all(&(bytes.len() as u32).to_be_bytes()).await?;
        self.inner.write_all(&bytes).await?;
        Ok(())
    }

    /// Queues a message that carries `covered` bytes of a file, flushing once it stands for a
    /// lot of the file: a delta of a big file is a few small frames, and the receiver should
    /// apply each while the sender encodes the next, not find them all in one late segment.
    pub async fn feed_content<M: Serialize>(&mut self, msg: &M, covered: u64) -> Result<(), ProtocolError> {
        self.feed(msg).await?;
        if covered >= FLUSH_COVERED {
            self.flush().await?;
        }
        Ok(())
    }

    pub async fn send<M: Serialize>(&mut self, msg: &M) -> Result<(), ProtocolError> {
        self.feed(msg).await?;
        self.flush().await
    }

    pub async fn flush(&mut self) -> Result<(), ProtocolError> {
        self.write_run().await?;
        Ok(self.inner.flush().await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delta::{Block, Codec};
    use crate::protocol::{ClientMsg, Meta, Request};

    fn text(n: usize, seed: u8) -> Vec<u8> {
        (0..n).map(|i| b"abcdefgh hello world "[(i + seed as usize) % 21]).collect()
    }

    fn put(i: u32) -> ClientMsg {
        let path = format!("projets/été-2026/Документы/照片/📷 album {}/fichier numéro {i}.txt", i / 100);
        ClientMsg::Req {
            id: i as u64,
            req: Request::Put {
                path: crate::path::RelPath::new(&path).unwrap(),
                base_rev: 0,
                hash: crate::hash::ContentHash::of(&i.to_le_bytes()),
                size: 1000 + i as u64,
                meta: Meta { mtime_ns: 1_764_000_000_000_000_000 + i as i64, mode: 0o644 },
                base: None,
            },
        }
    }

    /// Sends the raw bytes of one frame (header `head`, then `body`) as a misbehaving peer would.
    async fn raw_frame(wr: &mut FrameWriter, head: u32, body: &[u8]) {
        wr.inner.write_all(&head.to_be_bytes()).await.unwrap();
        wr.inner.write_all(body).await.unwrap();
        wr.inner.flush().await.unwrap();
    }

    /// Thousands of small messages (requests with long unicode paths, small blocks, big blocks in
    /// between) arrive intact and in order, in runs that compress what they repeat; the first
    /// message is plain, so a peer of another version can read it.
    #[tokio::test]
    async fn many_messages_round_trip_in_compressed_runs() {
        let (a, b) = tokio::io::duplex(64 << 20);
        let counters = Arc::new(Counters::default());
        let (_, mut wr) = split(Counted::new(a, counters.clone()), Arc::default());
        let (mut rd, _w) = split(b, Arc::default());
        wr.send(&Block { codec: Codec::Raw, bytes: vec![1, 2, 3] }).await.unwrap();
        assert_eq!(counters.sent(), 4 + 5, "the first message is one plain frame");
        assert!(!wr.streaming());
        let (mut plain, mut big_plain) = (0, 0);
        for i in 0..3000u32 {
            let m = put(i);
            plain += 4 + postcard::to_allocvec(&m).unwrap().len();
            wr.feed(&m).await.unwrap();
            if i % 500 == 0 {
                let big = Block { codec: Codec::Raw, bytes: vec![i as u8; 200_000] };
                big_plain += 4 + 200_005;
                wr.feed(&big).await.unwrap();
            }
            if i % 7 == 0 {
                let small = Block { codec: Codec::Raw, bytes: text(3000, i as u8) };
                plain += 4 + postcard::to_allocvec(&small).unwrap().len();
                wr.feed(&small).await.unwrap();
            }
        }
        wr.flush().await.unwrap();
        assert!(wr.streaming());
        let first: Block = rd.recv().await.unwrap().unwrap();
        assert_eq!(first.bytes, [1, 2, 3]);
        for i in 0..3000u32 {
            let got: ClientMsg = rd.recv().await.unwrap().unwrap();
            assert_eq!(format!("{got:?}"), format!("{:?}", put(i)), "message {i}");
            if i % 500 == 0 {
                let big: Block = rd.recv().await.unwrap().unwrap();
                assert_eq!(big.bytes, vec![i as u8; 200_000]);
            }
            if i % 7 == 0 {
                let small: Block = rd.recv().await.unwrap().unwrap();
                assert_eq!(small.bytes, text(3000, i as u8), "block after message {i}");
            }
        }
        // Big blocks go as plain frames of their own; the small messages around them compress.
        let wire = counters.sent() as usize - 9;
        assert!(wire > big_plain);
        let small = wire - big_plain;
        assert!(small * 5 < plain, "{small} bytes on the wire for {plain} bytes of small messages");
    }

    /// Small blocks of random data skip the compressor (plain frames between runs) and arrive in
    /// order with the messages around them; text blocks still go through it.
    #[tokio::test]
    async fn random_small_blocks_go_plain_between_runs_in_order() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut random = |n: usize| {
            (0..n)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect::<Vec<u8>>()
        };
        assert!(looks_random(&random(4096)));
        assert!(!looks_random(&text(4096, 0)));
        assert!(!looks_random(&random(1000)), "small messages always go in runs");
        let counters = Arc::new(Counters::default());
        let (a, b) = tokio::io::duplex(1 << 22);
        let (_, mut wr) = split(Counted::new(a, counters.clone()), Arc::default());
        let (mut rd, _w) = split(b, Arc::default());
        wr.send(&put(0)).await.unwrap();
        let blocks: Vec<Vec<u8>> = (0..200).map(|_| random(4096)).collect();
        for (i, b) in blocks.iter().enumerate() {
            wr.feed(&put(i as u32 + 1)).await.unwrap();
            wr.feed(&Block { codec: Codec::Raw, bytes: b.clone() }).await.unwrap();
        }
        let before = counters.sent();
        wr.flush().await.unwrap();
        let _: ClientMsg = rd.recv().await.unwrap().unwrap();
        for (i, b) in blocks.iter().enumerate() {
            let got: ClientMsg = rd.recv().await.unwrap().unwrap();
            assert_eq!(format!("{got:?}"), format!("{:?}", put(i as u32 + 1)), "message {i}");
            let got: Block = rd.recv().await.unwrap().unwrap();
            assert_eq!(&got.bytes, b, "block {i}");
        }
        // Went out as they came, never through the compressor; nor did the lone request before
        // each (a piece of the stream of its own per file, see RUN_BEFORE_PLAIN).
        assert!(before > 150 * 4096, "random blocks were held back: {before} bytes sent before the flush");
        assert_eq!(wr.compressed_in, 0, "bytes went through the compressor");
        // A run of many requests before one still compresses.
        for i in 0..100 {
            wr.feed(&put(1000 + i)).await.unwrap();
        }
        wr.feed(&Block { codec: Codec::Raw, bytes: blocks[0].clone() }).await.unwrap();
        wr.flush().await.unwrap();
        assert!(wr.compressed_in > 100 * 64, "{} bytes went through the compressor", wr.compressed_in);
        for i in 0..100 {
            let got: ClientMsg = rd.recv().await.unwrap().unwrap();
            assert_eq!(format!("{got:?}"), format!("{:?}", put(1000 + i)), "message {i}");
        }
        let got: Block = rd.recv().await.unwrap().unwrap();
        assert_eq!(got.bytes, blocks[0]);
    }

    /// Runs sent after `end_stream` start a new zstd stream that the peer, having freed its old
    /// context on the empty frame, decodes from scratch; an empty frame where no stream was
    /// begun is malformed.
    #[tokio::test]
    async fn a_stream_ended_while_quiet_starts_again_on_both_ends() {
        let (a, b) = tokio::io::duplex(1 << 20);
        let (_, mut wr) = split(a, Arc::default());
        let (mut rd, _w) = split(b, Arc::default());
        wr.send(&Block { codec: Codec::Raw, bytes: vec![7; 10] }).await.unwrap();
        let _: Block = rd.recv().await.unwrap().unwrap();
        // A tiny run does not start a stream: nothing to end then.
        wr.send(&Block { codec: Codec::Raw, bytes: vec![7; 10] }).await.unwrap();
        assert!(!wr.streaming(), "a tiny run started a stream the peer never saw");
        let _: Block = rd.recv().await.unwrap().unwrap();
        for round in 0..3u8 {
            for i in 0..3u8 {
                let raw = Block { codec: Codec::Raw, bytes: text(3000, round * 10 + i) };
                wr.send(&raw).await.unwrap();
                assert!(wr.streaming());
                let got: Block = rd.recv().await.unwrap().unwrap();
                assert_eq!(got.bytes, raw.bytes, "round {round}, block {i}");
            }
            wr.end_stream().await.unwrap();
            assert!(!wr.streaming());
            wr.send(&Block { codec: Codec::Raw, bytes: vec![1] }).await.unwrap();
            let _: Block = rd.recv().await.unwrap().unwrap();
            assert!(rd.stream.is_none(), "the reader freed its context on the empty frame");
        }
        // Nothing to end: no empty frame goes out, and one that comes anyway is refused.
        wr.end_stream().await.unwrap();
        raw_frame(&mut wr, 0, &[]).await;
        assert!(matches!(rd.recv::<Block>().await, Err(ProtocolError::Decode(_))));
    }

    /// What a hostile or broken peer can send in place of a run: each is a protocol error, never
    /// a panic or an allocation past the frame limit.
    #[tokio::test]
    async fn bad_runs_are_protocol_errors() {
        async fn pair() -> (FrameWriter, FrameReader, FrameWriter) {
            let (a, b) = tokio::io::duplex(16 << 20);
            let (_, wr) = split(a, Arc::default());
            let (rd, w) = split(b, Arc::default());
            (wr, rd, w)
        }
        /// A run's body: the announced length, then `data` compressed.
        fn piece(data: &[u8], announced: u32) -> Vec<u8> {
            let mut out = postcard::to_allocvec(&announced).unwrap();
            StreamEncoder::new().unwrap().compress(data, &mut out).unwrap();
            out
        }
        // A bomb: 64 MiB of zeros in a few KiB, far past the frame limit once decoded, whether
        // it announces the limit (decoding stops there) or its real size (refused at once).
        let zeros = vec![0u8; 64 << 20];
        for announced in [MAX_FRAME as u32, 64 << 20] {
            let bomb = piece(&zeros, announced);
            assert!(bomb.len() < MAX_FRAME / 100);
            let (mut wr, mut rd, _w) = pair().await;
            raw_frame(&mut wr, bomb.len() as u32 | RUN_FLAG, &bomb).await;
            match rd.recv::<Block>().await {
                Err(ProtocolError::Malformed(m)) => {
                    assert!(m.contains("more than") || m.contains("announced"), "{m}")
                }
                other => panic!("a bomb gave {other:?}"),
            }
            assert!(rd.run.capacity() <= MAX_FRAME + 1, "decoded {} bytes", rd.run.capacity());
        }

        // Garbage, and a run cut short.
        let (mut wr, mut rd, _w) = pair().await;
        raw_frame(&mut wr, 100 | RUN_FLAG, &[0x5a; 100]).await;
        assert!(matches!(rd.recv::<Block>().await, Err(ProtocolError::Malformed(_))));
        let (mut wr, mut rd, _w) = pair().await;
        raw_frame(&mut wr, 100 | RUN_FLAG, &[[0x40].as_slice(), &[0x5a; 99]].concat()).await;
        assert!(matches!(rd.recv::<Block>().await, Err(ProtocolError::Malformed(_))));
        let mut frames = Vec::new();
        for i in 0..50u8 {
            let m = postcard::to_allocvec(&Block { codec: Codec::Raw, bytes: text(500, i) }).unwrap();
            frames.extend_from_slice(&(m.len() as u32).to_be_bytes());
            frames.extend_from_slice(&m);
        }
        let good = piece(&frames, frames.len() as u32);
        for cut in [0, 1, 3, good.len() / 2, good.len() - 1] {
            let (mut wr, mut rd, _w) = pair().await;
            raw_frame(&mut wr, cut as u32 | RUN_FLAG, &good[..cut]).await;
            let mut got = 0;
            // A guard against a hang (a cut run that leaves the reader waiting), not a timing.
            let r = tokio::time::timeout(Duration::from_secs(30), async {
                loop {
                    match rd.recv::<Block>().await {
                        Ok(Some(_)) => got += 1,
                        other => break other,
                    }
                }
            })
            .await
            .expect("a cut run left the reader waiting for more");
            assert!(got < 50 && r.is_err(), "cut at {cut}: {got} messages, then {r:?}");
        }
        // A run whose frames lie about their lengths, hold an empty frame, or nest a run.
        for inner in [
            [&100u32.to_be_bytes()[..], &[1, 2, 3]].concat(),
            [&0u32.to_be_bytes()[..], &[0; 8]].concat(),
            [&(3 | RUN_FLAG).to_be_bytes()[..], &[1, 2, 3]].concat(),
            vec![0, 0],
        ] {
            let (mut wr, mut rd, _w) = pair().await;
            let p = piece(&inner, inner.len() as u32);
            raw_frame(&mut wr, p.len() as u32 | RUN_FLAG, &p).await;
            assert!(matches!(rd.recv::<Block>().await, Err(ProtocolError::Malformed(_))), "{inner:?}");
        }
        // A frame announced past the limit is refused before it is read.
        let (mut wr, mut rd, _w) = pair().await;
        raw_frame(&mut wr, (MAX_FRAME as u32 + 1) | RUN_FLAG, &[]).await;
        assert!(matches!(rd.recv::<Block>().await, Err(ProtocolError::Io(_))));
    }
}
