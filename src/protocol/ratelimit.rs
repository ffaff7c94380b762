//! Bandwidth limits (`--bwlimit`): a token bucket per direction on the bytes that cross the TCP
//! socket (under TLS, so what is limited is what the link carries, records and handshake
//! included).
//!
//! The bucket refills continuously and holds little (the larger of 16 KiB and 50 ms of the rate),
//! so the traffic is smooth: no burst of a second's quota followed by a stall. Writes pass at
//! most what the bucket holds (a partial write; the caller writes the rest later); reads ask the
//! socket for at most that much, and TCP's flow control slows the sender down to it.

use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// The lowest limit taken: below it even the TLS handshake takes seconds.
pub const MIN_RATE: u64 = 1024;

/// A limit in bytes per second for each direction, from the point of view of the process that
/// applies it (`None`: unlimited). For a client `send` is the upload and `receive` the download;
/// for `serve` `send` is what it sends to each client (their downloads) and `receive` what it
/// receives from each (their uploads).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BwLimit {
    pub send: Option<u64>,
    pub receive: Option<u64>,
}

impl BwLimit {
    pub fn is_unlimited(&self) -> bool {
        self.send.is_none() && self.receive.is_none()
    }
}

const FORM: &str = "give RATE, or SEND:RECEIVE (a client's upload:download; for serve, what it sends to and \
                    receives from each client), like 500K, 2M or 1M:4M: a number per second with K, M or G \
                    (KiB, MiB, GiB; a bare number is KiB, as in rsync; B is bytes), or 0 / off for no limit";

/// One direction's rate: `None` for `0`, `off` or (beside a colon) nothing.
fn parse_rate(whole: &str, s: &str) -> Result<Option<u64>, String> {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    if lower.is_empty() || lower == "off" {
        return Ok(None);
    }
    let bad = || format!("`{whole}` is not a bandwidth limit: {FORM}");
    let (num, unit) = match lower.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => lower.split_at(i),
        None => (lower.as_str(), ""),
    };
    let mult: u64 = match unit.trim() {
        "" | "k" | "kb" | "kib" => 1 << 10,
        "b" => 1,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return Err(bad()),
    };
    if num.is_empty() {
        return Err(bad());
    }
    let v: f64 = num.parse().map_err(|_| bad())?;
    let bytes = v * mult as f64;
    if !bytes.is_finite() {
        return Err(bad());
    }
    if bytes == 0.0 {
        return Ok(None);
    }
    if bytes < MIN_RATE as f64 {
        let what = if t == whole.trim() { format!("`{t}`") } else { format!("`{whole}`: {t}") };
        return Err(format!(
            "{what} is below the lowest bandwidth limit, 1K (1 KiB/s); give at least 1K, or 0 / off for no limit"
        ));
    }
    // Past a PiB/s nothing is limited anyway.
    Ok(Some(bytes.min((1u64 << 50) as f64) as u64))
}

impl FromStr for BwLimit {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split(':').collect();
        match parts[..] {
            [one] if one.trim().is_empty() => Err(format!("an empty bandwidth limit: {FORM}")),
            [one] => {
                let r = parse_rate(s, one)?;
                Ok(BwLimit { send: r, receive: r })
            }
            [send, receive] => Ok(BwLimit { send: parse_rate(s, send)?, receive: parse_rate(s, receive)? }),
            _ => Err(format!("`{s}` is not a bandwidth limit: {FORM}")),
        }
    }
}

/// A token bucket: `rate` bytes per second, refilled continuously, holding at most `depth`.
#[derive(Debug)]
pub struct Bucket {
    rate: f64,
    depth: f64,
    /// The smallest piece worth waking up for (unless less is wanted): a few ms of the rate, so
    /// a limited stream is not a storm of tiny system calls.
    piece: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// Starts full, so a connection's handshake goes at once.
    pub fn new(rate: u64, now: Instant) -> Bucket {
        let rate = rate.max(1) as f64;
        let depth = (rate * 0.05).max(16.0 * 1024.0);
        let piece = (rate * 0.01).clamp(1024.0, depth);
        Bucket { rate, depth, piece, tokens: depth, last: now }
    }

    /// The most that can pass at once (after a quiet spell).
    pub fn depth(&self) -> u64 {
        self.depth as u64
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * self.rate).min(self.depth);
        self.last = now;
    }

    /// How many of `want` (> 0) bytes may pass now (at least 1), or how long to wait until a
    /// worthwhile piece may.
    pub fn grant(&mut self, want: usize, now: Instant) -> Result<usize, Duration> {
        self.refill(now);
        let piece = self.piece.min(want as f64);
        if self.tokens >= piece {
            return Ok((self.tokens.floor() as usize).clamp(1, want));
        }
        let wait = (piece - self.tokens) / self.rate;
        Err(Duration::from_secs_f64(wait).max(Duration::from_millis(1)))
    }

    /// `n` bytes passed.
    pub fn spend(&mut self, n: usize) {
        self.tokens -= n as f64;
    }
}

/// The buckets of a limit, shared by every connection made with it: a client's `--bwlimit` is the
/// process's, so its second connection (`watch`'s lane for big files) takes from the same tokens
/// instead of doubling the rate. `serve` makes one per connection (its limit is per connection).
#[derive(Clone, Debug, Default)]
pub struct Shaper {
    send: Option<Arc<Mutex<Bucket>>>,
    receive: Option<Arc<Mutex<Bucket>>>,
}

impl Shaper {
    pub fn new(limit: BwLimit) -> Shaper {
        let bucket = |r: u64| Arc::new(Mutex::new(Bucket::new(r, Instant::now())));
        Shaper { send: limit.send.map(bucket), receive: limit.receive.map(bucket) }
    }
}

/// Locks a shared bucket; a panic elsewhere while it was held leaves only numbers behind.
fn lock(b: &Mutex<Bucket>) -> std::sync::MutexGuard<'_, Bucket> {
    b.lock().unwrap_or_else(|e| e.into_inner())
}

/// One direction of a [`Limited`] stream: its (shared) bucket and the timer this stream waits on
/// when it is empty.
struct Direction {
    bucket: Arc<Mutex<Bucket>>,
    /// Made on the first wait, then reset for each later one.
    sleep: Option<Pin<Box<Sleep>>>,
    armed: bool,
}

impl Direction {
    fn new(bucket: &Arc<Mutex<Bucket>>) -> Direction {
        Direction { bucket: bucket.clone(), sleep: None, armed: false }
    }

    fn spend(&self, n: usize) {
        lock(&self.bucket).spend(n);
    }

    /// Ready with how many of `want` bytes may pass (≥ 1); pending (woken by the timer) while
    /// the bucket holds too little.
    fn poll_grant(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<usize> {
        loop {
            if self.armed {
                if let Some(s) = self.sleep.as_mut() {
                    ready!(s.as_mut().poll(cx));
                }
                self.armed = false;
            }
            let now = Instant::now();
            let granted = lock(&self.bucket).grant(want, now);
            match granted {
                Ok(n) => return Poll::Ready(n),
                Err(wait) => {
                    match self.sleep.as_mut() {
                        Some(s) => s.as_mut().reset(now + wait),
                        None => self.sleep = Some(Box::pin(tokio::time::sleep_until(now + wait))),
                    }
                    self.armed = true;
                }
            }
        }
    }
}

/// A byte stream whose reads and writes pass through a token bucket each (when limited; without
/// a limit every call goes straight through).
pub struct Limited<S> {
    inner: S,
    send: Option<Direction>,
    receive: Option<Direction>,
}

impl<S> Limited<S> {
    pub fn new(inner: S, shaper: &Shaper) -> Self {
        Limited {
            inner,
            send: shaper.send.as_ref().map(Direction::new),
            receive: shaper.receive.as_ref().map(Direction::new),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Limited<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let me = &mut *self;
        let Some(dir) = me.receive.as_mut() else {
            return Pin::new(&mut me.inner).poll_read(cx, buf);
        };
        if buf.remaining() == 0 {
            return Pin::new(&mut me.inner).poll_read(cx, buf);
        }
        let n = ready!(dir.poll_grant(cx, buf.remaining()));
        let mut part = ReadBuf::new(buf.initialize_unfilled_to(n));
        let r = ready!(Pin::new(&mut me.inner).poll_read(cx, &mut part));
        let got = part.filled().len();
        buf.advance(got);
        dir.spend(got);
        Poll::Ready(r)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Limited<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let me = &mut *self;
        let Some(dir) = me.send.as_mut() else {
            return Pin::new(&mut me.inner).poll_write(cx, buf);
        };
        if buf.is_empty() {
            return Pin::new(&mut me.inner).poll_write(cx, buf);
        }
        let n = ready!(dir.poll_grant(cx, buf.len()));
        let r = ready!(Pin::new(&mut me.inner).poll_write(cx, &buf[..n]));
        if let Ok(k) = &r {
            dir.spend(*k);
        }
        Poll::Ready(r)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let me = &mut *self;
        let Some(dir) = me.send.as_mut() else {
            return Pin::new(&mut me.inner).poll_write_vectored(cx, bufs);
        };
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if total == 0 {
            return Pin::new(&mut me.inner).poll_write_vectored(cx, bufs);
        }
        let n = ready!(dir.poll_grant(cx, total));
        let r = if n >= total {
            ready!(Pin::new(&mut me.inner).poll_write_vectored(cx, bufs))
        } else {
            // The first `n` bytes of the buffers.
            let mut left = n;
            let mut part = Vec::with_capacity(bufs.len());
            for b in bufs {
                if left == 0 {
                    break;
                }
                let m = left.min(b.len());
                part.push(std::io::IoSlice::new(&b[..m]));
                left -= m;
            }
            ready!(Pin::new(&mut me.inner).poll_write_vectored(cx, &part))
        };
        if let Ok(k) = &r {
            dir.spend(*k);
        }
        Poll::Ready(r)
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const K: u64 = 1024;

    #[test]
    fn limits_parse_like_rsync_and_rclone() {
        let both = |r| BwLimit { send: r, receive: r };
        assert_eq!("500K".parse::<BwLimit>().unwrap(), both(Some(500 * K)));
        assert_eq!("500".parse::<BwLimit>().unwrap(), both(Some(500 * K)), "a bare number is KiB/s");
        assert_eq!("2M".parse::<BwLimit>().unwrap(), both(Some(2 << 20)));
        assert_eq!("2m".parse::<BwLimit>().unwrap(), both(Some(2 << 20)));
        assert_eq!("2MiB".parse::<BwLimit>().unwrap(), both(Some(2 << 20)));
        assert_eq!("1.5M".parse::<BwLimit>().unwrap(), both(Some(3 << 19)));
        assert_eq!("1G".parse::<BwLimit>().unwrap(), both(Some(1 << 30)));
        assert_eq!("4096B".parse::<BwLimit>().unwrap(), both(Some(4096)));
        assert_eq!("64kib".parse::<BwLimit>().unwrap(), both(Some(64 * K)));
        assert_eq!(
            "1M:4M".parse::<BwLimit>().unwrap(),
            BwLimit { send: Some(1 << 20), receive: Some(4 << 20) }
        );
        assert_eq!("0:512K".parse::<BwLimit>().unwrap(), BwLimit { send: None, receive: Some(512 * K) });
        assert_eq!(":512K".parse::<BwLimit>().unwrap(), BwLimit { send: None, receive: Some(512 * K) });
        assert_eq!("512K:".parse::<BwLimit>().unwrap(), BwLimit { send: Some(512 * K), receive: None });
        assert_eq!("1M:off".parse::<BwLimit>().unwrap(), BwLimit { send: Some(1 << 20), receive: None });
        assert!("off".parse::<BwLimit>().unwrap().is_unlimited());
        assert!("OFF".parse::<BwLimit>().unwrap().is_unlimited());
        assert!("0".parse::<BwLimit>().unwrap().is_unlimited());
        assert!("0:0".parse::<BwLimit>().unwrap().is_unlimited());
        for bad in ["", " ", "fast", "2X", "M", "-1M", "1e3", "1:2:3", "2 Mbit", "1..5M", "0.5"] {
            let e = bad.parse::<BwLimit>().unwrap_err();
            assert!(e.contains("500K") || e.contains("1K"), "{bad:?}: {e}");
        }
        assert!("512B".parse::<BwLimit>().unwrap_err().contains("lowest"));
    }

    #[test]
    fn the_bucket_grants_what_it_holds_and_says_how_long_to_wait() {
        let t0 = Instant::now();
        let mut b = Bucket::new(100 * K, t0);
        assert_eq!(b.depth(), 16 * K, "depth: 16 KiB at least");
        assert_eq!(Bucket::new(10 << 20, t0).depth(), (10 << 20) / 20, "depth: 50 ms of the rate");
        // Full at the start; a partial grant of a big want.
        assert_eq!(b.grant(1 << 20, t0), Ok(16 * K as usize));
        b.spend(16 * K as usize);
        // Empty: wait for a piece (1 KiB at this rate: 10 ms).
        let wait = b.grant(1 << 20, t0).unwrap_err();
        assert!((wait.as_secs_f64() - 0.01).abs() < 1e-6, "{wait:?}");
        // 100 ms later: 10 KiB.
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!(b.grant(1 << 20, t1), Ok(10 * K as usize));
        // Never more than the depth, however long it was quiet.
        let t2 = t1 + Duration::from_secs(60);
        assert_eq!(b.grant(1 << 20, t2), Ok(16 * K as usize));
        // A small want passes whole when the bucket holds it.
        assert_eq!(b.grant(10, t2), Ok(10));
    }

    /// A sink that records when each byte arrived.
    #[derive(Default)]
    struct Clocked {
        at: Vec<(Instant, usize)>,
    }
    impl AsyncWrite for Clocked {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            self.at.push((Instant::now(), buf.len()));
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// Over `secs` from `t0`: the bytes in each 100 ms window.
    fn windows(at: &[(Instant, usize)], t0: Instant, secs: u64) -> Vec<u64> {
        let mut w = vec![0u64; (secs * 10) as usize];
        for (t, n) in at {
            let i = (t.duration_since(t0).as_millis() / 100) as usize;
            if i < w.len() {
                w[i] += *n as u64;
            }
        }
        w
    }

    /// Smooth: over 10 s of (virtual) time a writer that always has more to send passes the
    /// rate × 10 s (plus the bucket's depth), and no 100 ms window carries more than 100 ms of
    /// the rate plus the depth, nor nothing at all (no stall).
    #[tokio::test(start_paused = true)]
    async fn writes_are_smooth_at_the_rate() {
        for rate in [64 * K, 512 * K, 2 << 20] {
            let mut w =
                Limited::new(Clocked::default(), &Shaper::new(BwLimit { send: Some(rate), receive: None }));
            // The depth promised: the larger of 16 KiB and 50 ms of the rate.
            let depth = (rate / 20).max(16 * K);
            let t0 = Instant::now();
            let chunk = vec![7u8; 100_000];
            // Bounded by bytes too: an unlimited writer never lets the paused clock move.
            let mut written = 0;
            while t0.elapsed() < Duration::from_secs(10) && written < rate * 20 {
                w.write_all(&chunk).await.unwrap();
                written += chunk.len() as u64;
            }
            let at = std::mem::take(&mut w.inner.at);
            let passed: u64 = at
                .iter()
                .filter(|(t, _)| t.duration_since(t0) < Duration::from_secs(10))
                .map(|(_, n)| *n as u64)
                .sum();
            let expect = rate * 10 + depth;
            assert!(
                passed.abs_diff(expect) <= expect / 100,
                "rate {rate}: {passed} bytes passed in 10 s, expected about {expect}"
            );
            let win = windows(&at, t0, 10);
            let most = *win.iter().max().unwrap();
            assert!(most <= rate / 10 + depth, "rate {rate}: a 100 ms window carried {most}: {win:?}");
            let least = *win.iter().min().unwrap();
            assert!(least > 0, "rate {rate}: a 100 ms window carried nothing (a stall): {win:?}");
            // After the first window (the full bucket), each is within a piece of 100 ms' worth.
            for (i, n) in win.iter().enumerate().skip(1) {
                assert!(
                    n.abs_diff(rate / 10) <= 2 * (rate / 100).max(1024),
                    "rate {rate}, window {i}: {n}: {win:?}"
                );
            }
        }
    }

    /// Two connections made with one limit (a `watch`'s rounds and its lane for big files) share
    /// its buckets: together they pass the rate, not twice it, and both move.
    #[tokio::test(start_paused = true)]
    async fn connections_of_one_limit_share_its_rate() {
        let rate = 256 * K;
        let shaper = Shaper::new(BwLimit { send: Some(rate), receive: None });
        let write_for = |shaper: Shaper| async move {
            let mut w = Limited::new(Clocked::default(), &shaper);
            let t0 = Instant::now();
            let chunk = vec![7u8; 50_000];
            while t0.elapsed() < Duration::from_secs(10) {
                w.write_all(&chunk).await.unwrap();
            }
            let at = std::mem::take(&mut w.inner.at);
            at.iter()
                .filter(|(t, _)| t.duration_since(t0) < Duration::from_secs(10))
                .map(|(_, n)| *n as u64)
                .sum::<u64>()
        };
        let (a, b) = tokio::join!(write_for(shaper.clone()), write_for(shaper.clone()));
        let expect = rate * 10 + (16 * K);
        assert!(
            (a + b).abs_diff(expect) <= expect / 50,
            "{a} + {b} bytes passed in 10 s, expected about {expect}"
        );
        assert!(a > rate && b > rate, "one of them starved: {a} and {b}");
    }

    /// Vectored writes pass at most what the bucket holds, in order.
    #[tokio::test(start_paused = true)]
    async fn vectored_writes_are_limited_and_in_order() {
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let mut w = Limited::new(a, &Shaper::new(BwLimit { send: Some(64 * K), receive: None }));
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            b.read_to_end(&mut got).await.unwrap();
            got
        });
        let t0 = Instant::now();
        let mut off = 0;
        while off < data.len() {
            let (x, y) = data[off..].split_at((data.len() - off) / 2);
            let n = w.write_vectored(&[std::io::IoSlice::new(x), std::io::IoSlice::new(y)]).await.unwrap();
            assert!(n as u64 <= 16 * K, "a write passed {n} bytes, more than the bucket holds");
            off += n;
        }
        w.shutdown().await.unwrap();
        drop(w);
        let spent = t0.elapsed().as_secs_f64();
        let floor = (data.len() as f64 - 16.0 * 1024.0) / (64.0 * 1024.0);
        assert!(spent >= floor * 0.99, "{spent} s < {floor} s");
        assert_eq!(reader.await.unwrap(), data);
    }

    /// Reads ask the socket for no more than the bucket holds: a reader with plenty waiting gets
    /// it at the rate.
    #[tokio::test(start_paused = true)]
    async fn reads_are_limited() {
        let rate = 256 * K;
        let mut r =
            Limited::new(tokio::io::repeat(1), &Shaper::new(BwLimit { send: None, receive: Some(rate) }));
        let t0 = Instant::now();
        let mut buf = vec![0u8; 64 << 10];
        let mut total = 0u64;
        let mut at = Vec::new();
        while t0.elapsed() < Duration::from_secs(10) && total < rate * 20 {
            let n = r.read(&mut buf).await.unwrap();
            at.push((Instant::now(), n));
            total += n as u64;
        }
        let expect = rate * 10 + 16 * K;
        assert!(total.abs_diff(expect) <= expect / 50, "{total} bytes read in 10 s, expected about {expect}");
        let win = windows(&at, t0, 10);
        assert!(*win.iter().max().unwrap() <= rate / 10 + 16 * K, "{win:?}");
        assert!(*win.iter().min().unwrap() > 0, "a stall: {win:?}");
    }

    /// Without a limit nothing waits (tokio's paused clock would not move).
    #[tokio::test(start_paused = true)]
    async fn unlimited_passes_at_once() {
        let mut w = Limited::new(Clocked::default(), &Shaper::new(BwLimit::default()));
        let t0 = Instant::now();
        w.write_all(&vec![0u8; 10 << 20]).await.unwrap();
        assert_eq!(t0.elapsed(), Duration::ZERO);
        assert_eq!(w.inner.at.len(), 1);
    }
}
