//! A connection to the server from the client's side: connect, handshake, simple calls.
//! Pipelined transfers use the reader and writer halves directly (see `sync::exec`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::protocol::*;
use crate::transport::{self, ConnectError, Fingerprint, Seen, Trust};

/// Connect, TLS and deltasync handshakes together (`--timeout`): long enough for a slow link, short
/// enough that a wrong address fails before a person wonders.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot reach the server at {addr}: {err}; is `deltasync serve` running there? (set it with --server or DELTASYNC_SERVER)"
    )]
    Unreachable { addr: String, err: String },
    /// Something answered, but not a deltasync server (another service, or no TLS handshake).
    #[error("{0}")]
    NotDeltasync(String),
    /// The server's certificate is not the trusted one; nothing was sent.
    #[error("{}", identity_message(.addr, .seen, .trusted, *.from_flag))]
    IdentityChanged { addr: String, seen: Option<Fingerprint>, trusted: Trust, from_flag: bool },
    #[error("{0}")]
    Auth(String),
    #[error("{0}")]
    Version(String),
    #[error("the server refused the connection: {0}")]
    Rejected(String),
    #[error("lost the connection to the server: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("the server refused: {0}")]
    Refused(Refusal),
    #[error("the server closed the connection: {0}")]
    Fatal(String),
    #[error("unexpected reply from the server: {0}")]
    Unexpected(String),
}

pub struct Client {
    pub rd: FrameReader,
    pub wr: FrameWriter,
    pub counters: Arc<Counters>,
    /// The account's name on the server.
    pub account: String,
    /// The account's folder this connection syncs (as the server confirmed it).
    pub folder: String,
    /// Set when the server just registered a new account for this client.
    pub new_token: Option<String>,
    /// The highest journal sequence the server announced (after `Subscribe`).
    pub notified: Arc<AtomicU64>,
    /// The server's data folder identity, from the handshake.
    pub server_id: [u8; 16],
    /// The folder's journal sequence at the handshake.
    pub server_seq: u64,
    /// What the TLS handshake found of the server's certificate.
    pub seen: Seen,
    next_id: u64,
}

/// How to reach the server and what to trust.
pub struct Connect<'a> {
    pub addr: &'a str,
    pub token: Option<&'a str>,
    pub device: &'a str,
    /// Which of the account's folders (`--folder`, [`DEFAULT_FOLDER`] unless told).
    pub folder: &'a str,
    pub trust: Trust,
    /// `trust` came from `--fingerprint` (not from the folder's memory).
    pub from_flag: bool,
    pub timeout: Duration,
    /// `--bwlimit` on the connection's socket.
    pub bwlimit: crate::protocol::Shaper,
}

fn identity_message(addr: &str, seen: &Option<Fingerprint>, trusted: &Trust, from_flag: bool) -> String {
    let now = seen.map_or("unknown".to_string(), |f| f.to_string());
    let what = match (trusted, from_flag) {
        (Trust::Pinned(f), true) => {
            format!("its certificate's fingerprint is {now}, not {f} as given with --fingerprint")
        }
        (Trust::Pinned(f), false) => {
            format!("its certificate's fingerprint is now {now}, but this folder trusted {f}")
        }
        (Trust::Ca, _) => format!(
            "its certificate (fingerprint {now}) is no longer valid under this computer's CA roots, as it was"
        ),
        (Trust::New, _) => format!("its certificate has fingerprint {now}"),
    };
    format!(
        "the server at {addr} is not the one this folder trusts: {what}. Nothing was sent to it (the token stays \
         secret). If its certificate was replaced on purpose (a new data folder, or a new --tls-cert), compare \
         {now} with the `fingerprint:` line `deltasync serve` prints and run again with --fingerprint {now}; \
         otherwise someone may be intercepting the connection"
    )
}

impl Client {
    pub async fn connect(c: &Connect<'_>) -> Result<Client, ClientError> {
        let addr = c.addr;
        let counters = Arc::new(Counters::default());
        let (stream, seen) = transport::connect(addr, &c.trust, c.timeout, counters.clone(), &c.bwlimit)
            .await
            .map_err(|e| match e {
                ConnectError::Unreachable(err) => ClientError::Unreachable { addr: addr.to_string(), err },
                ConnectError::NotDeltasync(m) => ClientError::NotDeltasync(m),
                ConnectError::Identity { seen, trusted } => ClientError::IdentityChanged {
                    addr: addr.to_string(),
                    seen,
                    trusted,
                    from_flag: c.from_flag,
                },
            })?;
        let (mut rd, mut wr) = split(stream, counters.clone());
        let hello = Hello {
            magic: MAGIC,
            version: PROTOCOL_VERSION,
            token: c.token.map(String::from),
            device: c.device.to_string(),
            folder: c.folder.to_string(),
        };
        let welcome = tokio::time::timeout(c.timeout, async {
            wr.send(&hello).await?;
            rd.recv::<Welcome>().await
        })
        .await
        .map_err(|_| {
            ClientError::NotDeltasync(format!(
                "{addr} finished the TLS handshake but did not answer the deltasync one within {}",
                transport::secs(c.timeout)
            ))
        })?;
        match welcome? {
            None => Err(ClientError::Rejected("closed during the handshake".into())),
            Some(Welcome::Accepted { account, new_token, server_id, seq, folder }) => Ok(Client {
                rd,
                wr,
                counters,
                account,
                folder,
                new_token,
                notified: Arc::default(),
                server_id,
                server_seq: seq,
                seen,
                next_id: 1,
            }),
            Some(Welcome::Rejected { reason: Rejection::Auth, message, .. }) => {
                Err(ClientError::Auth(message))
            }
            Some(Welcome::Rejected { reason: Rejection::Version, message, .. }) => {
                Err(ClientError::Version(message))
            }
            Some(Welcome::Rejected { message, .. }) => Err(ClientError::Rejected(message)),
        }
    }

    pub fn next_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Reads the next message that is not a change notice.
    pub async fn recv(&mut self) -> Result<ServerMsg, ClientError> {
        recv_reply(&mut self.rd, &self.notified, &self.counters).await
    }

    /// One request, one reply, for requests without content.
    pub async fn call(&mut self, req: Request) -> Result<Reply, ClientError> {
        let id = self.next_id();
        self.wr.send(&ClientMsg::Req { id, req }).await?;
        match self.recv().await? {
            ServerMsg::Resp { id: i, result } if i == id => result.map_err(ClientError::Refused),
            other => Err(unexpected(&other, id)),
        }
    }

    /// Every entry changed after `since`, and the journal sequence they bring the client to.
    pub async fn changes(&mut self, since: u64) -> Result<(Vec<Entry>, u64), ClientError> {
        let id = self.next_id();
        self.wr.send(&ClientMsg::Req { id, req: Request::Changes { since } }).await?;
        let mut all = Vec::new();
        let mut check = ChangesCheck::new(since, MAX_CHANGE_ENTRIES, MAX_CHANGE_BYTES);
        loop {
            match self.recv().await? {
                ServerMsg::Resp { id: i, result: Ok(Reply::Changes { entries, seq, more }) } if i == id => {
                    check.page(&entries, more).map_err(|e| {
                        ClientError::Unexpected(format!(
                            "the server's list of changes since {since} {e}; refusing it (a broken or malicious server?)"
                        ))
                    })?;
                    all.extend(entries);
                    if !more {
                        return Ok((all, seq));
                    }
                }
                ServerMsg::Resp { id: i, result: Err(r) } if i == id => return Err(ClientError::Refused(r)),
                other => return Err(unexpected(&other, id)),
            }
        }
    }

    /// How much of each content (path, hash, size) the server kept from cut-off uploads: per ask,
    /// in order, the bytes it holds from the start (0: none, or it would not say) and the base
    /// that upload was a delta against. The requests go out together: one round trip per
    /// [`RESUME_BATCH`] asks.
    pub async fn resume_points(
        &mut self,
        asks: &[(crate::path::RelPath, crate::hash::ContentHash, u64)],
    ) -> Result<Vec<(u64, Option<crate::hash::ContentHash>)>, ClientError> {
        let mut out = Vec::with_capacity(asks.len());
        for batch in asks.chunks(RESUME_BATCH) {
            let mut ids = Vec::with_capacity(batch.len());
            for (path, hash, size) in batch {
                let id = self.next_id();
                let req = Request::Resume { path: path.clone(), hash: *hash, size: *size };
                self.wr.feed(&ClientMsg::Req { id, req }).await?;
                ids.push(id);
            }
            self.wr.flush().await?;
            for (id, (_, _, size)) in ids.into_iter().zip(batch) {
                match self.recv().await? {
                    // More than the file has is no point to continue from.
                    ServerMsg::Resp { id: i, result: Ok(Reply::Resume { from, base }) } if i == id => {
                        out.push(if from <= *size { (from, base) } else { (0, None) })
                    }
                    ServerMsg::Resp { id: i, result: Err(_) } if i == id => out.push((0, None)),
                    other => return Err(unexpected(&other, id)),
                }
            }
        }
        Ok(out)
    }

    /// Fetches the server's signature of its version of `path` (rsync's fallback when the local
    /// signature cache lost it).
    pub async fn signature(
        &mut self,
        path: &crate::path::RelPath,
    ) -> Result<(crate::hash::ContentHash, u64, Vec<u8>), ClientError> {
        let id = self.next_id();
        self.wr.send(&ClientMsg::Req { id, req: Request::Signature { path: path.clone() } }).await?;
        let (hash, size) = match self.recv().await? {
            ServerMsg::Resp { id: i, result: Ok(Reply::Signature { hash, size }) } if i == id => (hash, size),
            ServerMsg::Resp { id: i, result: Err(r) } if i == id => return Err(ClientError::Refused(r)),
            other => return Err(unexpected(&other, id)),
        };
        // A signature has one entry (a 4-byte CRC and at most a 32-byte strong hash) per block.
        let bs = crate::delta::block_size(size).max(1) as u64;
        let limit = size.div_ceil(bs).saturating_mul(36).saturating_add(64);
        let mut bytes = Vec::new();
        loop {
            match self.recv().await? {
                ServerMsg::Data { id: i, block } if i == id => {
                    if (bytes.len() + block.bytes.len()) as u64 > limit {
                        return Err(ClientError::Unexpected(format!(
                            "the server's signature of `{path}` ({size} bytes) is longer than any such signature ({limit} bytes); refusing it"
                        )));
                    }
                    bytes.extend_from_slice(&block.bytes)
                }
                ServerMsg::End { id: i } if i == id => return Ok((hash, size, bytes)),
                other => return Err(unexpected(&other, id)),
            }
        }
    }
}

/// `Resume` requests sent together before their answers are read: far fewer bytes than either
/// side's socket buffers hold, so neither waits on the other.
pub const RESUME_BATCH: usize = 256;

/// Most entries one `Changes` answer may bring: far more than any real folder holds (10 million
/// files), and bounded, so a broken or malicious server cannot grow the client without end.
pub const MAX_CHANGE_ENTRIES: usize = 10_000_000;

/// Most bytes of paths, link targets and device names (plus 64 per entry) one `Changes` answer
/// may bring: 10 million entries of ~150 bytes each.
pub const MAX_CHANGE_BYTES: u64 = 2 << 30;

/// Checks the pages of one `Changes` answer as they arrive: entries after `since`, in journal
/// order (the server lists them by revision), no entry twice, no empty page that promises more,
/// and at most `max_entries` entries and `max_bytes` bytes in all.
pub struct ChangesCheck {
    since: u64,
    last_rev: u64,
    /// Paths seen at `last_rev`: a path repeats only with a later revision (changed again while
    /// the pages were read).
    at_last_rev: std::collections::HashSet<crate::path::RelPath>,
    entries: usize,
    bytes: u64,
    max_entries: usize,
    max_bytes: u64,
}

impl ChangesCheck {
    pub fn new(since: u64, max_entries: usize, max_bytes: u64) -> Self {
        ChangesCheck {
            since,
            last_rev: since,
            at_last_rev: Default::default(),
            entries: 0,
            bytes: 0,
            max_entries,
            max_bytes,
        }
    }

    /// One page; `Err` says what is wrong with it (to follow "the server's list of changes").
    pub fn page(&mut self, entries: &[Entry], more: bool) -> Result<(), String> {
        if more && entries.is_empty() {
            return Err("has an empty page that announces more".into());
        }
        for e in entries {
            if e.rev <= self.since {
                return Err(format!("lists `{}` at revision {}, not after {}", e.path, e.rev, self.since));
            }
            if e.rev < self.last_rev {
                return Err(format!(
                    "goes back from revision {} to {} (at `{}`)",
                    self.last_rev, e.rev, e.path
                ));
            }
            if e.rev > self.last_rev {
                self.last_rev = e.rev;
                self.at_last_rev.clear();
            }
            if !self.at_last_rev.insert(e.path.clone()) {
                return Err(format!("lists `{}` twice at revision {}", e.path, e.rev));
            }
            let target = match &e.node {
                Some(Node::Symlink { target }) => target.len(),
                _ => 0,
            };
            self.entries += 1;
            self.bytes += (e.path.as_str().len() + e.device.len() + target) as u64 + 64;
            if self.entries > self.max_entries || self.bytes > self.max_bytes {
                return Err(format!(
                    "is longer than the most this client accepts ({} entries, {} MiB)",
                    self.max_entries,
                    self.max_bytes >> 20
                ));
            }
        }
        Ok(())
    }
}

/// An answer that is not the one awaited for request `id`.
fn unexpected(got: &ServerMsg, id: u64) -> ClientError {
    ClientError::Unexpected(format!("{} while waiting for the answer to request {id}", describe(got)))
}

/// A message, briefly: never its whole content (a page of entries, a block).
pub fn describe(m: &ServerMsg) -> String {
    match m {
        ServerMsg::Resp { id, result: Ok(r) } => {
            let what = match r {
                Reply::Changes { entries, .. } => format!("a page of {} changes", entries.len()),
                Reply::Committed { rev } => format!("a commit at revision {rev}"),
                Reply::File { entry, .. } => format!("the file `{}`", entry.path),
                Reply::Signature { .. } => "a signature".into(),
                Reply::Ok => "ok".into(),
                Reply::Resume { from, .. } => format!("a resume point ({from})"),
                Reply::Log { versions, .. } => format!("a page of {} versions", versions.len()),
                Reply::Snapshot { versions, .. } => format!("a snapshot page of {} paths", versions.len()),
                Reply::Reverted { changed, .. } => format!("a revert of {} paths", changed.len()),
            };
            format!("an answer to request {id} ({what})")
        }
        ServerMsg::Resp { id, result: Err(r) } => format!("a refusal of request {id} ({r})"),
        ServerMsg::Data { id, block } => format!("content of request {id} ({} bytes)", block.bytes.len()),
        ServerMsg::End { id } => format!("the end of the content of request {id}"),
        ServerMsg::Notify { seq } => format!("a change notice ({seq})"),
        ServerMsg::Fatal { message } => format!("a fatal error ({message})"),
        ServerMsg::Revoked { message } => format!("a revocation ({message})"),
    }
}

/// How long a client waits for an expected answer from the server while nothing at all crosses the
/// connection, either way: `DELTASYNC_IO_TIMEOUT_SECS` (default 60 s). Idle connections (`watch`
/// waiting for change notices) do not wait through here.
pub fn io_timeout() -> Duration {
    static T: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *T.get_or_init(|| {
        let secs = std::env::var("DELTASYNC_IO_TIMEOUT_SECS").ok().and_then(|v| v.trim().parse::<u64>().ok());
        Duration::from_secs(secs.filter(|&s| s > 0).unwrap_or(DEFAULT_IO_TIMEOUT_SECS))
    })
}

const DEFAULT_IO_TIMEOUT_SECS: u64 = 60;

/// The error for a connection on which nothing moved for [`io_timeout`] while an answer was due.
pub fn timed_out(waiting_for: &str) -> ClientError {
    let t = io_timeout().as_secs();
    ClientError::Protocol(ProtocolError::Io(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!(
            "nothing came from the server for {t} s while waiting for {waiting_for}; it may be overloaded or stuck; try again later (DELTASYNC_IO_TIMEOUT_SECS sets this limit)"
        ),
    )))
}

/// Waits for `fut` as long as the connection moves: bytes received or sent (a big upload may keep
/// the server from answering for long) within every [`io_timeout`]; else [`timed_out`].
pub async fn while_moving<T>(
    counters: &Counters,
    waiting_for: &str,
    fut: impl std::future::Future<Output = T>,
) -> Result<T, ClientError> {
    tokio::pin!(fut);
    let mut seen = (counters.sent(), counters.received());
    loop {
        match tokio::time::timeout(io_timeout(), &mut fut).await {
            Ok(r) => return Ok(r),
            Err(_) => {
                let now = (counters.sent(), counters.received());
                if now == seen {
                    return Err(timed_out(waiting_for));
                }
                seen = now;
            }
        }
    }
}

/// Reads the next message that is not a change notice (those only matter to `watch`). Gives up
/// when nothing crosses the connection for [`io_timeout`].
pub async fn recv_reply(
    rd: &mut FrameReader,
    notified: &AtomicU64,
    counters: &Counters,
) -> Result<ServerMsg, ClientError> {
    loop {
        // `FramedRead::next` keeps a partly read frame when the wait ends, so waiting again is safe.
        match while_moving(counters, "an answer", rd.recv::<ServerMsg>()).await?? {
            None => return Err(ClientError::Protocol(ProtocolError::Closed)),
            Some(ServerMsg::Notify { seq }) => {
                notified.fetch_max(seq, Ordering::Relaxed);
            }
            Some(ServerMsg::Fatal { message }) => return Err(ClientError::Fatal(message)),
            Some(ServerMsg::Revoked { message }) => return Err(ClientError::Auth(message)),
            Some(m) => return Ok(m),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::path::RelPath;

    fn entry(path: &str, rev: u64) -> Entry {
        Entry { path: RelPath::new(path).unwrap(), rev, node: None, device: "d".into() }
    }

    #[test]
    fn changes_pages_are_checked_and_bounded() {
        let mut c = ChangesCheck::new(5, 100, 1 << 20);
        c.page(&[entry("a", 6), entry("b", 6), entry("c", 9)], true).unwrap();
        // Changed again while the pages were read: later, so fine.
        c.page(&[entry("a", 10)], false).unwrap();

        let bad = |pages: &[(&[Entry], bool)]| {
            let mut c = ChangesCheck::new(5, 100, 1 << 20);
            pages.iter().map(|(p, more)| c.page(p, *more)).find_map(Result::err).unwrap_or_default()
        };
        assert!(bad(&[(&[entry("a", 5)], false)]).contains("not after 5"));
        assert!(bad(&[(&[entry("a", 7), entry("b", 6)], false)]).contains("goes back"));
        let page = [entry("a", 7), entry("b", 8)];
        assert!(bad(&[(&page, true), (&page, true)]).contains("goes back"));
        assert!(bad(&[(&[entry("a", 7), entry("a", 7)], false)]).contains("twice"));
        assert!(bad(&[(&[], true)]).contains("empty page"));
        assert!(bad(&[(&[entry("z", 6)], false)]).is_empty());

        // Endless new entries stop at the bound, by count or by size.
        let mut c = ChangesCheck::new(0, 1000, 1 << 30);
        let r = (1..).map(|i| c.page(&[entry(&format!("f{i}"), i)], true)).find_map(Result::err);
        assert!(r.unwrap().contains("1000 entries"));
        let mut c = ChangesCheck::new(0, usize::MAX, 1 << 20);
        let long = "x".repeat(200);
        let r = (1..).map(|i| c.page(&[entry(&format!("{long}{i}"), i)], true)).find_map(Result::err);
        assert!(r.unwrap().contains("1 MiB"));
    }
}
