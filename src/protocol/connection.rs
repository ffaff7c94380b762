//! Framed reader and writer halves over any byte stream (TLS over TCP in practice), and the
//! counting of every byte that crosses the socket (TLS and framing included) for `--stats`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufWriter, ReadBuf};
use tokio_util::codec::{FramedRead, LengthDelimitedCodec};

use super::{MAX_FRAME, ProtocolError};
use crate::delta::stream::{StreamDecoder, StreamEncoder};
use crate::delta::{Block, Codec, DeltaError};

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

fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder().max_frame_length(MAX_FRAME).new_codec()
}

pub struct FrameReader {
    inner: FramedRead<ReadSide, LengthDelimitedCodec>,
    counters: Arc<Counters>,
    /// Made on first use: a zstd context costs about a megabyte, too much for idle connections.
    stream: Option<StreamDecoder>,
}

/// Writes the frames [`FrameReader`] reads (a 4-byte big-endian length, then the message). Not a
/// `FramedWrite`: that copies every frame into its own buffer, a third copy of each uploaded byte;
/// here small frames gather in the buffer and large ones go straight to the socket.
pub struct FrameWriter {
    inner: BufWriter<Stalled<WriteSide>>,
    stream: Option<StreamEncoder>,
}

/// Write buffer: many small pipelined requests share one segment; small, because every idle
/// connection holds one.
const WRITE_BUF: usize = 16 << 10;

/// See [`FrameWriter::feed_content`]; small files' blocks stay batched.
const FLUSH_COVERED: u64 = 1 << 20;

/// Splits a connection (any byte stream: TLS over TCP in practice) into a reader and a writer
/// that can live in different tasks. `counters` are the ones counting under it (see [`Counted`]).
pub fn split<S>(stream: S, counters: Arc<Counters>) -> (FrameReader, FrameWriter)
where
    S: AsyncRead + AsyncWrite + Send + Sync + 'static,
{
    let (r, w) = tokio::io::split(stream);
    let reader = FramedRead::new(Box::new(r) as ReadSide, codec());
    let w = Stalled { inner: Box::new(w) as WriteSide, stall: None, timer: None };
    let writer = BufWriter::with_capacity(WRITE_BUF, w);
    (FrameReader { inner: reader, counters, stream: None }, FrameWriter { inner: writer, stream: None })
}

impl FrameReader {
    /// TLS reports a peer that closed the socket without its `close_notify` as an unexpected
    /// end; between frames that is no truncation (a frame's length says where it ends), so it
    /// is a close like any other. Inside a frame it stays an error.
    fn closed_between_frames(&self, e: &std::io::Error) -> bool {
        e.kind() == std::io::ErrorKind::UnexpectedEof && self.inner.read_buffer().is_empty()
    }

    /// Decodes a block of the peer's connection stream (other blocks pass unchanged). Blocks
    /// must be opened in the order they arrived.
    pub fn open(&mut self, b: Block) -> Result<Block, DeltaError> {
        if b.codec != Codec::Stream {
            return Ok(b);
        }
        if self.stream.is_none() {
            self.stream = Some(StreamDecoder::new()?);
        }
        self.stream.as_mut().expect("set above").open(b)
    }

    /// The next message, or `Ok(None)` when the peer closed cleanly between frames.
    pub async fn recv<M: DeserializeOwned>(&mut self) -> Result<Option<M>, ProtocolError> {
        loop {
            return match self.inner.next().await {
                None => Ok(None),
                Some(Err(e)) if self.closed_between_frames(&e) => Ok(None),
                Some(Err(e)) => Err(ProtocolError::Io(e)),
                // The peer ended its compression stream (see `FrameWriter::end_stream`). Only
                // after it began one: anywhere else an empty frame is a malformed message.
                Some(Ok(frame)) if frame.is_empty() && self.stream.is_some() => {
                    self.stream = None;
                    continue;
                }
                Some(Ok(frame)) => postcard::from_bytes(&frame).map(Some).map_err(ProtocolError::Decode),
            };
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
            match tokio::time::timeout(tick, self.inner.next()).await {
                Ok(None) => return Ok(None),
                Ok(Some(Err(e))) if self.closed_between_frames(&e) => return Ok(None),
                Ok(Some(Err(e))) => return Err(ProtocolError::Io(e)),
                Ok(Some(Ok(frame))) if frame.is_empty() && self.stream.is_some() => self.stream = None,
                Ok(Some(Ok(frame))) => {
                    return postcard::from_bytes(&frame).map(Some).map_err(ProtocolError::Decode);
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
    /// which an idle `watch` connection would otherwise hold for its whole life. The next small
    /// block starts a new stream. Called after a few seconds without traffic.
    pub async fn end_stream(&mut self) -> Result<(), ProtocolError> {
        if self.stream.take().is_some() {
            self.inner.write_all(&0u32.to_be_bytes()).await?;
            self.inner.flush().await?;
        }
        Ok(())
    }

    /// Compresses a small raw block as the next piece of this connection's stream. Every block
    /// passed here must then be sent, in order.
    pub fn seal(&mut self, b: Block) -> std::io::Result<Block> {
        // Only a block that goes into the stream starts one: `streaming` means the peer has a
        // decoder to free (an empty frame where it has none is malformed).
        if !StreamEncoder::takes(&b) {
            return Ok(b);
        }
        if self.stream.is_none() {
            self.stream = Some(StreamEncoder::new()?);
        }
        self.stream.as_mut().expect("set above").seal(b)
    }

    /// Queues a message; it goes out once the buffer fills or on [`flush`](Self::flush). Lets a
    /// pipelining sender put many small requests in one TCP segment.
    pub async fn feed<M: Serialize>(&mut self, msg: &M) -> Result<(), ProtocolError> {
        let bytes = postcard::to_allocvec(msg).map_err(ProtocolError::Encode)?;
        if bytes.len() > MAX_FRAME {
            return Err(ProtocolError::Io(std::io::Error::other(format!(
                "message of {} bytes exceeds the frame limit",
                bytes.len()
            ))));
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
        Ok(self.inner.flush().await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(n: usize, seed: u8) -> Vec<u8> {
        (0..n).map(|i| b"abcdefgh hello world "[(i + seed as usize) % 21]).collect()
    }

    /// Blocks sealed after `end_stream` start a new zstd stream that the peer, having freed its
    /// old context on the empty frame, decodes from scratch; an empty frame where no stream was
    /// begun is malformed.
    #[tokio::test]
    async fn a_stream_ended_while_quiet_starts_again_on_both_ends() {
        let (a, b) = tokio::io::duplex(1 << 20);
        let (_, mut wr) = split(a, Arc::default());
        let (mut rd, _w) = split(b, Arc::default());
        // A block too small for the stream does not start one: nothing to end then.
        let tiny = wr.seal(Block { codec: Codec::Raw, bytes: vec![7; 10] }).unwrap();
        assert_eq!(tiny.codec, Codec::Raw);
        assert!(!wr.streaming(), "a tiny block started a stream the peer never saw");
        for round in 0..3u8 {
            for i in 0..3u8 {
                let raw = Block { codec: Codec::Raw, bytes: text(3000, round * 10 + i) };
                let sealed = wr.seal(raw.clone()).unwrap();
                assert_eq!(sealed.codec, Codec::Stream);
                wr.send(&sealed).await.unwrap();
                let got: Block = rd.recv().await.unwrap().unwrap();
                assert_eq!(rd.open(got).unwrap().bytes, raw.bytes, "round {round}, block {i}");
            }
            assert!(wr.streaming());
            wr.end_stream().await.unwrap();
            assert!(!wr.streaming());
            wr.send(&Block { codec: Codec::Raw, bytes: vec![1] }).await.unwrap();
            let _: Block = rd.recv().await.unwrap().unwrap();
            assert!(rd.stream.is_none(), "the reader freed its context on the empty frame");
        }
        // Nothing to end: no empty frame goes out, and one that comes anyway is refused.
        wr.end_stream().await.unwrap();
        wr.inner.write_all(&0u32.to_be_bytes()).await.unwrap();
        wr.flush().await.unwrap();
        assert!(matches!(rd.recv::<Block>().await, Err(ProtocolError::Decode(_))));
    }
}
