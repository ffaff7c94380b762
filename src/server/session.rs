//! One connection: the handshake, then requests served in order. A request that fails is refused
//! with a reason and the session goes on; bytes that do not parse end this session only.

use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::Shared;
use super::batch::{self, Staged};
use super::content::{ChunkList, ChunkLoc, Chunker, PackSink, Reader};
use super::handshake::Authed;
use super::meta::{Account, AccountId, Change, MetaError, Metadata, Step};
use crate::delta::{self, Applier, Block};
use crate::hash::ContentHash;
use crate::path::RelPath;
use crate::protocol::*;
use futures_util::FutureExt;

/// Longest symlink target accepted (Linux `PATH_MAX`).
const MAX_LINK_TARGET: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("handshake: {0}")]
    Handshake(String),
    #[error("protocol violation: {0}")]
    Violation(String),
    #[error("server error: {0}")]
    Internal(String),
}

fn server_err(e: impl std::fmt::Display) -> Refusal {
    let text = e.to_string();
    if let Some(r) = super::disk_full(&text) {
        return r;
    }
    tracing::warn!("request failed: {text}");
    Refusal::new(RefusalKind::Server, format!("server could not complete the request: {text}"))
}

/// The refusal when `path` (`size` bytes, replacing `replaced` bytes) would take the account
/// past its quota. Moves and deletes never add bytes, so they are never refused for a quota.
pub(super) fn over_quota(
    name: &str,
    used: u64,
    quota: Option<u64>,
    path: &RelPath,
    size: u64,
    replaced: u64,
) -> Result<(), Refusal> {
    let Some(quota) = quota else { return Ok(()) };
    let after = used.saturating_sub(replaced).saturating_add(size);
    if size <= replaced || after <= quota {
        return Ok(());
    }
    Err(quota_refusal(name, used, quota, path, size, replaced))
}

/// The refusal of an upload that would take the account past its quota.
pub(crate) fn quota_refusal(
    name: &str,
    used: u64,
    quota: u64,
    path: &RelPath,
    size: u64,
    replaced: u64,
) -> Refusal {
    let after = used.saturating_sub(replaced).saturating_add(size);
    use super::human_size as h;
    Refusal::new(
        RefusalKind::Server,
        format!(
            "account {name} is over its quota: `{path}` ({}) would bring it to {} used of {}; free space or raise it with `deltasync account quota {name} SIZE` on the server",
            h(size),
            h(after),
            h(quota)
        ),
    )
}

/// What uploads are checked against before they are received: the account's bytes in use and
/// its quota, and the disk's free bytes. A batch of small uploads looks them up once and moves
/// them along with each upload it lets through (the commit checks the quota again, exactly).
struct Room {
    used: u64,
    quota: Option<u64>,
    free: Option<u64>,
}

impl Room {
    fn look(meta: &Metadata, account: AccountId, free: Option<u64>) -> Result<Room, MetaError> {
        let (used, quota) = meta.usage(account)?;
        Ok(Room { used, quota, free })
    }
}

/// Refuses an upload of `size` bytes before it is received when it is more than the server
/// may store or the account may hold, or more than the server's disk has free; else counts it
/// in `room`.
fn check_room(
    name: &str,
    room: &mut Room,
    path: &RelPath,
    size: u64,
    cur: &Option<Entry>,
) -> Result<(), Refusal> {
    if size > super::MAX_FILE_SIZE {
        return Err(Refusal::new(
            RefusalKind::Invalid,
            format!(
                "`{path}` announces {size} bytes, more than the {} a file on this server may have",
                super::human_size(super::MAX_FILE_SIZE)
            ),
        ));
    }
    let replaced = match cur {
        Some(Entry { node: Some(Node::File { size, .. }), .. }) => *size,
        _ => 0,
    };
    over_quota(name, room.used, room.quota, path, size, replaced)?;
    if let Some(free) = room.free
        && size > free
    {
        return Err(Refusal::new(
            RefusalKind::Server,
            format!(
                "server out of disk space: `{path}` needs {} and the server's data folder has {} free; nothing was changed on the server. Its administrator must free space; then push again",
                super::human_size(size),
                super::human_size(free)
            ),
        ));
    }
    room.used = room.used.saturating_sub(replaced).saturating_add(size);
    room.free = room.free.map(|f| f - size);
    Ok(())
}

/// Only permission bits are kept: never set-uid, set-gid or sticky, whatever a client sends.
fn mask_modes(req: &mut Request) {
    match req {
        Request::Put { meta, .. }
        | Request::Move { meta, .. }
        | Request::Copy { meta, .. }
        | Request::SetMeta { meta, .. } => meta.mode &= 0o777,
        Request::Mkdir { mode, .. } => *mode &= 0o777,
        _ => {}
    }
}

/// A refused or failed upload is still read to its end (so the connection stays in step), but
/// never more than an upload of its announced size can be: a whole-file stream is its bytes plus
/// a few per block, a delta or compressed one less.
fn drain_limit(size: u64) -> u64 {
    size.min(super::MAX_FILE_SIZE).saturating_add(size / 8).saturating_add(1 << 20)
}

impl From<MetaError> for Refusal {
    fn from(e: MetaError) -> Self {
        server_err(e)
    }
}

impl From<std::io::Error> for Refusal {
    fn from(e: std::io::Error) -> Self {
        server_err(e)
    }
}

/// A connection without requests for this long frees its compression contexts (they are made
/// again, in about a millisecond, by the next transfer).
const QUIET: std::time::Duration = std::time::Duration::from_secs(2);

/// Uploads committed together at most: bounds the time a reply waits. Each commit costs two
/// fsyncs and about a page write per index per upload, so fewer, bigger batches are cheaper:
/// 256 -> 1024 took a first push of 100,000 x 4 KiB files from 17.2 to 9.9 s.
const MAX_BATCH: usize = 1024;
/// Downloads up to this size (sent whole) are read and encoded in the session's task.
const INLINE_DOWNLOAD: u64 = 64 << 10;
/// Uploads up to this size (sent whole) are received before they are checked and written, and
/// checked and written together with the small uploads that follow them: one trip to the
/// blocking pool per [`SMALL_BATCH`] of them, not one each (the hand-offs were 45% of the
/// server's CPU in a first push of 100,000 x 4 KiB files).
const SMALL_UPLOAD: u64 = 64 << 10;
/// Small uploads checked and written in one trip to the blocking pool at most, and their bytes.
const SMALL_BATCH: usize = 64;
const SMALL_BATCH_BYTES: usize = 2 << 20;
const MAX_BATCH_BYTES: u64 = 64 << 20;

/// A small upload received whole (its blocks held), to be checked and written with others.
struct SmallPut {
    id: u64,
    path: RelPath,
    base_rev: u64,
    hash: ContentHash,
    size: u64,
    meta: Meta,
    blocks: Vec<Block>,
}

struct Session {
    /// Set once a quiet connection has freed its transfer state (see [`QUIET`]).
    idle: bool,
    staged: Vec<Staged>,
    staged_bytes: u64,
    /// Small uploads received whole, waiting to be checked and written (see [`SMALL_UPLOAD`]).
    small: Vec<SmallPut>,
    small_bytes: usize,
    id: u64,
    shared: Arc<Shared>,
    account: Account,
    device: String,
    /// Where this session's new chunks go; its pack is finished at each batch commit.
    sink: Arc<Mutex<PackSink>>,
    rd: FrameReader,
    wr: FrameWriter,
    /// Files moved, for the session's closing log line.
    tally: Arc<super::handshake::Tally>,
}

/// Serves the requests of a connection that passed the [`handshake`](super::handshake), until
/// the client leaves, the server stops (`cancel`) or the device is revoked (`authed.kill`).
pub async fn serve(
    rd: FrameReader,
    wr: FrameWriter,
    peer: std::net::SocketAddr,
    authed: Authed,
    shared: Arc<Shared>,
    cancel: CancellationToken,
) -> Result<(), SessionError> {
    // `account.id` is the space of the folder the client named: everything below acts on it.
    let Authed { account, folder: _, credential, label: device, kill, registered: _registered, tally } =
        authed;
    let sink = Arc::new(Mutex::new(PackSink::new(shared.chunks.clone())));
    let mut s = Session {
        idle: false,
        staged: Vec::new(),
        staged_bytes: 0,
        small: Vec::new(),
        small_bytes: 0,
        id: shared.session_id(),
        shared,
        account,
        device,
        sink,
        rd,
        wr,
        tally,
    };
    let r = tokio::select! {
        r = s.requests(cancel) => r,
        _ = kill.cancelled() => {
            tracing::info!("{peer}: device `{}` of account `{}` was revoked: closing", credential.name, s.account.name);
            let _ = s.wr.send(&ServerMsg::Revoked {
                message: format!(
                    "authentication failed: this device's token (device `{}` of account `{}`) was revoked on the server; ask its administrator for a new one",
                    credential.name, s.account.name
                ),
            }).await;
            return Err(SessionError::Handshake("device revoked".into()));
        }
    };
    match &r {
        Err(SessionError::Protocol(ProtocolError::Decode(e))) => {
            let _ =
                s.wr.send(&ServerMsg::Fatal { message: format!("malformed message ({e}): closing") }).await;
        }
        Err(SessionError::Protocol(ProtocolError::Malformed(e))) => {
            let _ = s.wr.send(&ServerMsg::Fatal { message: format!("malformed frame ({e}): closing") }).await;
        }
        _ => {}
    }
    r
}

impl Session {
    async fn requests(&mut self, cancel: CancellationToken) -> Result<(), SessionError> {
        let r = self.serve_requests(cancel).await;
        // Uploads that arrived whole are committed even if the client is gone: they were verified.
        let _ = self.flush().await;
        r
    }

    async fn serve_requests(&mut self, cancel: CancellationToken) -> Result<(), SessionError> {
        let mut notices: Option<tokio::sync::broadcast::Receiver<(u64, u64)>> = None;
        loop {
            // Answers (a download's end, say) are queued, and go out in one write for as long as
            // requests keep coming: everything queued is sent before waiting for the next one.
            let waiting = !self.staged.is_empty() || !self.small.is_empty();
            let ready = if !waiting { self.rd.recv::<ClientMsg>().now_or_never() } else { None };
            let msg = if let Some(m) = ready {
                m?
            } else if !waiting {
                self.wr.flush().await?;
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(()),
                    // Quiet for a while: free what only transfers need (an idle `watch`
                    // connection stays open for hours).
                    _ = tokio::time::sleep(QUIET), if !self.idle => {
                        self.idle = true;
                        self.wr.end_stream().await?;
                        self.sink.lock().unwrap_or_else(|p| p.into_inner()).release_contexts();
                        self.shared.quiet.notify_one();
                        continue;
                    }
                    seq = async { match notices.as_mut() { Some(n) => n.recv().await, None => std::future::pending().await } } => {
                        match seq {
                            Ok((_, origin)) if origin == self.id => {}
                            Ok((seq, _)) => self.wr.send(&ServerMsg::Notify { seq }).await?,
                            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                                let seq = self.db(|m, a| m.seq(a)).await.map_err(|e| SessionError::Internal(e.message))?;
                                self.wr.send(&ServerMsg::Notify { seq }).await?;
                            }
                            Err(_) => notices = None,
                        }
                        continue;
                    }
                    m = self.rd.recv_within::<ClientMsg>(self.shared.idle_timeout, self.shared.io_timeout) => m?,
                }
            } else {
                // Uploads are waiting for their batch: keep batching while the client keeps
                // sending; commit as soon as it pauses (it may be waiting for the replies).
                match self.rd.recv::<ClientMsg>().now_or_never() {
                    Some(m) => m?,
                    None => {
                        self.flush().await?;
                        continue;
                    }
                }
            };
            let Some(msg) = msg else { return Ok(()) };
            self.idle = false;
            let (id, mut req) = match msg {
                ClientMsg::Req { id, req } => (id, req),
                other => {
                    return Err(SessionError::Violation(format!("unexpected {other:?} outside an upload")));
                }
            };
            mask_modes(&mut req);
            // Small uploads wait only for more small uploads: anything else comes after them.
            if !matches!(req, Request::Put { .. }) {
                self.settle_small().await?;
            }
            let req_from = match &req {
                Request::PutRest { from, .. } => Some(*from),
                _ => None,
            };
            let result = match req {
                Request::Put { path, base_rev, hash, size, meta, base }
                | Request::PutRest { path, base_rev, hash, size, meta, base, from: _ } => {
                    if self.staged.iter().any(|s| s.path == path) || self.small.iter().any(|s| s.path == path)
                    {
                        self.flush().await?;
                    }
                    let from = match &req_from {
                        Some(f) => *f,
                        None => 0,
                    };
                    if base.is_none() && size <= SMALL_UPLOAD && from == 0 {
                        match self.receive_small(id, &path, size).await? {
                            Ok(blocks) => {
                                self.small_bytes += blocks.iter().map(|b| b.bytes.len()).sum::<usize>();
                                self.small.push(SmallPut { id, path, base_rev, hash, size, meta, blocks });
                                if self.small.len() >= SMALL_BATCH || self.small_bytes >= SMALL_BATCH_BYTES {
                                    self.settle_small().await?;
                                }
                                continue;
                            }
                            Err(r) => Err(r),
                        }
                    } else {
                        self.settle_small().await?;
                        match self.put(id, path.clone(), base_rev, hash, size, base, from).await? {
                            Ok((chunks, sig)) => {
                                let node = Node::File { hash, size, meta };
                                let chunks = Some(chunks);
                                self.stage(Staged { id, path, base_rev, node, op: "write", chunks, sig })
                                    .await?;
                                continue;
                            }
                            Err(r) => Err(r),
                        }
                    }
                }
                Request::Copy { hash, size, to, to_base_rev, meta } => {
                    if self.staged.iter().any(|s| s.path == to) {
                        self.flush().await?;
                    }
                    match self.copy(hash, size, &to, to_base_rev, meta).await {
                        Ok(()) => {
                            let node = Node::File { hash, size, meta };
                            let path = to;
                            self.stage(Staged {
                                id,
                                path,
                                base_rev: to_base_rev,
                                node,
                                op: "copy",
                                chunks: None,
                                sig: None,
                            })
                            .await?;
                            continue;
                        }
                        Err(r) => Err(r),
                    }
                }
                other => {
                    // Everything else must see the waiting uploads committed.
                    self.flush().await?;
                    match other {
                        Request::Changes { since } => {
                            self.changes(id, since).await?;
                            continue;
                        }
                        Request::Get { path, have } => {
                            self.get(id, path, have).await?;
                            continue;
                        }
                        Request::Signature { path } => {
                            self.signature(id, path).await?;
                            continue;
                        }
                        Request::Subscribe => {
                            notices = Some(self.shared.subscribe(self.account.id));
                            Ok(Reply::Ok)
                        }
                        Request::Ping => Ok(Reply::Ok),
                        Request::GetRest { path, hash, size, from } => {
                            self.get_rest(id, path, hash, size, from).await?;
                            continue;
                        }
                        Request::Resume { path, hash, size } => {
                            self.db(move |m, a| {
                                Ok(match m.partial(a, &path)? {
                                    Some(p) if p.hash == hash && p.size == size => {
                                        Reply::Resume { from: p.bytes, base: p.base }
                                    }
                                    _ => Reply::Resume { from: 0, base: None },
                                })
                            })
                            .await
                        }
                        Request::GetVersion { path, rev } => {
                            self.get_version(id, path, rev).await?;
                            continue;
                        }
                        Request::Log { path, deleted, limit } => {
                            self.db(move |m, a| {
                                let versions = m.log(a, path.as_ref(), deleted, limit)?;
                                let more = versions.len() as u32 >= limit.min(MAX_LOG);
                                Ok(Reply::Log { versions, more })
                            })
                            .await
                        }
                        Request::Snapshot { path, at, after } => {
                            self.db(move |m, a| {
                                let rev = m.rev_at(a, at)?;
                                let versions = m.snapshot(a, path.as_ref(), rev, after.as_ref(), MAX_LOG)?;
                                let more = versions.len() as u32 >= MAX_LOG;
                                Ok(Reply::Snapshot { versions, more })
                            })
                            .await
                        }
                        Request::Restore { path, at } => {
                            self.revert(super::revert::Revert::Restore { path, at }).await
                        }
                        Request::Undo { device, since } => {
                            self.revert(super::revert::Revert::Undo { device, since }).await
                        }
                        other => self.simple(other).await,
                    }
                }
            };
            self.flush().await?;
            self.wr.send(&ServerMsg::Resp { id, result }).await?;
        }
    }

    async fn stage(&mut self, s: Staged) -> Result<(), SessionError> {
        if let Node::File { size, .. } = &s.node {
            self.staged_bytes += size;
        }
        self.staged.push(s);
        if self.staged.len() >= MAX_BATCH || self.staged_bytes >= MAX_BATCH_BYTES {
            self.flush().await?;
        }
        Ok(())
    }

    /// Checks and writes the waiting small uploads, then commits the waiting uploads as one
    /// batch and sends their replies.
    async fn flush(&mut self) -> Result<(), SessionError> {
        self.settle_small().await?;
        self.commit_staged().await
    }

    /// Receives a small upload whole (see [`SMALL_UPLOAD`]); refused if it sends far more than
    /// it announced.
    async fn receive_small(
        &mut self,
        id: u64,
        path: &RelPath,
        size: u64,
    ) -> Result<Result<Vec<Block>, Refusal>, SessionError> {
        let (mut blocks, mut ended, mut held) = (Vec::new(), false, 0usize);
        while let Some(b) = self.upload_block(id, &mut ended).await? {
            // Held in memory until the end of the upload: never more than a small file's worth.
            held += b.bytes.len();
            if held <= 2 * SMALL_UPLOAD as usize {
                blocks.push(b);
            }
        }
        if held > 2 * SMALL_UPLOAD as usize {
            return Ok(Err(Refusal::new(
                RefusalKind::Corrupt,
                format!("upload of `{path}` sent far more data than its announced {size} bytes"),
            )));
        }
        Ok(Ok(blocks))
    }

    /// Checks and writes the waiting small uploads in one trip to the blocking pool, in order,
    /// and stages them (a refused one is answered in its turn, after the batch before it).
    async fn settle_small(&mut self) -> Result<(), SessionError> {
        if self.small.is_empty() {
            return Ok(());
        }
        let small = std::mem::take(&mut self.small);
        self.small_bytes = 0;
        let ids: Vec<u64> = small.iter().map(|u| u.id).collect();
        let (sh, account, sink) = (self.shared.clone(), self.account.id, self.sink.clone());
        let name = self.account.name.clone();
        // Warnings from the blocking work name the session (from the span it is in) and the path.
        let session = tracing::Span::current();
        let done = tokio::task::spawn_blocking(move || {
            let _session = session.enter();
            // Usage, quota and free space looked up once for the batch (a query and a statvfs
            // per file were a tenth of the server's work on many small files).
            let mut room =
                Room::look(sh.meta.as_ref(), account, sh.chunks.free_bytes()).map_err(Refusal::from);
            small
                .into_iter()
                .map(|u| {
                    let _span = tracing::info_span!("upload", path = %u.path).entered();
                    let checked = match &mut room {
                        Ok(room) => check_put(
                            &sh,
                            account,
                            &name,
                            &u.path,
                            u.base_rev,
                            (u.hash, u.size),
                            None,
                            0,
                            Some(room),
                        ),
                        Err(r) => Err(r.clone()),
                    };
                    let r = checked.and_then(|_| {
                        let to = Rebuild {
                            account,
                            path: u.path.clone(),
                            hash: u.hash,
                            size: u.size,
                            base: None,
                            prefix: None,
                        };
                        reconstruct(&sh, &sink, to, u.blocks.into_iter())
                    });
                    let node = Node::File { hash: u.hash, size: u.size, meta: u.meta };
                    (u.id, u.path, u.base_rev, node, r)
                })
                .collect::<Vec<_>>()
        })
        .await;
        let done = match done {
            Ok(d) => d,
            Err(e) => {
                // Every one of them is answered, so the connection stays in step.
                let r = server_err(e);
                self.commit_staged().await?;
                for id in ids {
                    self.wr.feed(&ServerMsg::Resp { id, result: Err(r.clone()) }).await?;
                }
                return Ok(());
            }
        };
        let mut failed: Option<SessionError> = None;
        for (id, path, base_rev, node, r) in done {
            match r {
                Ok((chunks, sig)) => {
                    if let Node::File { size, .. } = &node {
                        self.staged_bytes += size;
                    }
                    self.staged.push(Staged {
                        id,
                        path,
                        base_rev,
                        node,
                        op: "write",
                        chunks: Some(chunks),
                        sig,
                    });
                }
                // A client gone meanwhile: the rest are still staged and committed (they were
                // verified), as they were before a batch of them.
                Err(r) if failed.is_none() => {
                    if let Err(e) = self.commit_staged().await {
                        failed = Some(e);
                    } else if let Err(e) = self.wr.feed(&ServerMsg::Resp { id, result: Err(r) }).await {
                        failed = Some(e.into());
                    }
                }
                Err(_) => {}
            }
        }
        if let Some(e) = failed {
            let _ = self.commit_staged().await;
            return Err(e);
        }
        if self.staged.len() >= MAX_BATCH || self.staged_bytes >= MAX_BATCH_BYTES {
            self.commit_staged().await?;
        }
        Ok(())
    }

    /// Commits the staged uploads as one batch and sends their replies.
    async fn commit_staged(&mut self) -> Result<(), SessionError> {
        if self.staged.is_empty() {
            return Ok(());
        }
        let staged = std::mem::take(&mut self.staged);
        self.staged_bytes = 0;
        let target = batch::Target {
            shared: &self.shared,
            account: self.account.id,
            session: self.id,
            device: &self.device,
            sink: &self.sink,
        };
        let writes: Vec<bool> = staged.iter().map(|s| s.op == "write").collect();
        let results = batch::commit(target, staged).await;
        let up = results.iter().zip(writes).filter(|((_, r), write)| *write && r.is_ok()).count();
        self.tally.uploaded(up as u64);
        for (id, result) in results {
            self.wr.feed(&ServerMsg::Resp { id, result }).await?;
        }
        self.wr.flush().await?;
        Ok(())
    }

    /// Runs a metadata call on the blocking pool.
    async fn db<T: Send + 'static>(
        &self,
        f: impl FnOnce(&super::meta::Metadata, super::meta::AccountId) -> Result<T, MetaError> + Send + 'static,
    ) -> Result<T, Refusal> {
        let sh = self.shared.clone();
        let a = self.account.id;
        tokio::task::spawn_blocking(move || f(sh.meta.as_ref(), a))
            .await
            .map_err(server_err)?
            .map_err(Refusal::from)
    }

    async fn current(&self, path: &RelPath) -> Result<Option<Entry>, Refusal> {
        let p = path.clone();
        self.db(move |m, a| m.get(a, &p)).await
    }

    /// Commits steps; each one's revision or refusal. Tells the account's other devices.
    async fn commit(&self, steps: Vec<Step>) -> Result<Vec<Result<u64, Refusal>>, Refusal> {
        let device = self.device.clone();
        let results = self.db(move |m, a| m.commit(a, &device, &steps)).await?;
        if let Some(max) = results.iter().filter_map(|r| r.as_ref().ok()).max() {
            self.shared.notify(self.account.id, *max, self.id);
        }
        Ok(results)
    }

    async fn changes(&mut self, id: u64, mut since: u64) -> Result<(), SessionError> {
        loop {
            let page = self.db(move |m, a| m.changes(a, since)).await;
            let (result, more) = match page {
                Ok((entries, seq, more)) => {
                    if let Some(last) = entries.last() {
                        since = last.rev;
                    }
                    (Ok(Reply::Changes { entries, seq, more }), more)
                }
                Err(r) => (Err(r), false),
            };
            self.wr.feed(&ServerMsg::Resp { id, result }).await?;
            if !more {
                break;
            }
        }
        self.wr.flush().await?;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn put(
        &mut self,
        id: u64,
        path: RelPath,
        base_rev: u64,
        hash: ContentHash,
        size: u64,
        base: Option<ContentHash>,
        from: u64,
    ) -> Result<Result<(ChunkList, Option<ChunkList>), Refusal>, SessionError> {
        let (sh, account) = (self.shared.clone(), self.account.id);
        let name = self.account.name.clone();
        // Warnings from the blocking work below name the session (account, device, address,
        // from the span it is in) and the path.
        let span = tracing::info_span!("upload", path = %path);
        let p = path.clone();
        let early_span = span.clone();
        let early = tokio::task::spawn_blocking(move || {
            let _span = early_span.enter();
            check_put(&sh, account, &name, &p, base_rev, (hash, size), base, from, None)
        })
        .await
        .unwrap_or_else(|e| Err(server_err(e)));
        let (tx, mut rx) = mpsc::channel::<Block>(4);
        let worker = match &early {
            Ok((base_version, prefix)) => {
                let (sh, sink) = (self.shared.clone(), self.sink.clone());
                let to = Rebuild {
                    account,
                    path: path.clone(),
                    hash,
                    size,
                    base: base_version.clone(),
                    prefix: prefix.clone(),
                };
                Some(tokio::task::spawn_blocking(move || {
                    let _span = span.enter();
                    reconstruct(&sh, &sink, to, std::iter::from_fn(|| rx.blocking_recv()))
                }))
            }
            Err(_) => {
                // Nobody will receive: sending into a channel no one reads would wait forever.
                drop(rx);
                None
            }
        };
        // Always read the upload to its end, so the next request on this connection is in step;
        // a refused one too, but never more than its announced size allows.
        let (mut ended, mut got, limit) = (false, 0u64, drain_limit(size));
        while let Some(b) = self.upload_block(id, &mut ended).await? {
            got = got.saturating_add(b.bytes.len() as u64);
            if got > limit {
                return Err(SessionError::Violation(format!(
                    "upload of `{path}` sent more than {limit} bytes for an announced {size}"
                )));
            }
            let _ = tx.send(b).await; // a failed worker stops receiving; keep draining
        }
        drop(tx);
        if let Err(r) = early {
            return Ok(Err(r));
        }
        Ok(match worker.expect("worker exists when checks passed").await {
            Ok(r) => r,
            Err(e) => Err(server_err(e)),
        })
    }

    /// The next block of upload `id`, decoded; `None` once the upload has ended (`ended` is set
    /// when its last block is returned).
    async fn upload_block(&mut self, id: u64, ended: &mut bool) -> Result<Option<Block>, SessionError> {
        if *ended {
            return Ok(None);
        }
        // Inside an upload the client sends continuously: silence here is a stall.
        let stall = self.shared.io_timeout;
        let (block, last) = match self.rd.recv_within::<ClientMsg>(stall, stall).await? {
            Some(ClientMsg::Data { id: i, block }) if i == id => (block, false),
            Some(ClientMsg::Last { id: i, block }) if i == id => (block, true),
            Some(ClientMsg::End { id: i }) if i == id => {
                *ended = true;
                return Ok(None);
            }
            Some(other) => {
                return Err(SessionError::Violation(format!("expected data for upload {id}, got {other:?}")));
            }
            None => return Err(SessionError::Protocol(ProtocolError::Closed)),
        };
        *ended = last;
        Ok(Some(block))
    }

    /// A server-side copy of content the account already holds: only metadata (the commit
    /// checks again that the content is still there).
    async fn copy(
        &self,
        hash: ContentHash,
        size: u64,
        to: &RelPath,
        to_base_rev: u64,
        _meta: Meta,
    ) -> Result<(), Refusal> {
        let (to, name, free) = (to.clone(), self.account.name.clone(), self.shared.chunks.free_bytes());
        self.db(move |m, a| {
            Ok((|| -> Result<(), Refusal> {
                let cur = m.get(a, &to)?;
                check_base(&to, &cur, to_base_rev)?;
                let mut room = Room::look(m, a, free.map(|_| u64::MAX))?;
                check_room(&name, &mut room, &to, size, &cur)?;
                match m.content(a, &hash)? {
                    Some((n, _)) if n == size => Ok(()),
                    _ => Err(Refusal::new(
                        RefusalKind::NotFound,
                        "no file with that content on the server; upload it",
                    )),
                }
            })())
        })
        .await?
    }

    /// Requests that change metadata or the tree without content (mkdir, symlink, delete, move,
    /// set-meta): one step each, checked inside the commit's transaction.
    async fn simple(&self, req: Request) -> Result<Reply, Refusal> {
        let lock = self.shared.commit_lock(self.account.id);
        let _held = lock.lock().await;
        let change =
            |path: RelPath, base_rev: u64, node: Option<Node>| Change { path, base_rev, node, chunks: None };
        let step = match req {
            Request::Mkdir { path, base_rev, mode } => {
                let cur = self.current(&path).await?;
                if let Some(Entry { node: Some(Node::Dir { .. }), rev, .. }) = cur {
                    return Ok(Reply::Committed { rev });
                }
                Step { op: "mkdir", changes: vec![change(path, base_rev, Some(Node::Dir { mode }))] }
            }
            Request::Symlink { path, base_rev, target } => {
                if target.is_empty() || target.len() > MAX_LINK_TARGET || target.contains('\0') {
                    return Err(Refusal::new(
                        RefusalKind::Invalid,
                        "symlink target is empty, too long or has a NUL byte",
                    ));
                }
                Step { op: "symlink", changes: vec![change(path, base_rev, Some(Node::Symlink { target }))] }
            }
            Request::Delete { path, base_rev } => {
                let cur = self.current(&path).await?;
                let Some(Entry { node: Some(_), .. }) = &cur else {
                    return Ok(Reply::Committed { rev: cur.map_or(0, |e| e.rev) });
                };
                Step { op: "delete", changes: vec![change(path, base_rev, None)] }
            }
            Request::Move { from, from_rev, to, to_base_rev, meta } => {
                let src = self.current(&from).await?;
                check_base(&from, &src, from_rev)?;
                let node = match src.and_then(|e| e.node) {
                    Some(Node::File { hash, size, .. }) => Node::File { hash, size, meta },
                    _ => {
                        return Err(Refusal::new(
                            RefusalKind::NotFound,
                            format!("`{from}` is not a file on the server"),
                        ));
                    }
                };
                Step {
                    op: "move",
                    changes: vec![change(from, from_rev, None), change(to, to_base_rev, Some(node))],
                }
            }
            Request::SetMeta { path, base_rev, meta } => {
                let cur = self.current(&path).await?;
                check_base(&path, &cur, base_rev)?;
                let node = match cur.and_then(|e| e.node) {
                    Some(Node::File { hash, size, .. }) => Node::File { hash, size, meta },
                    Some(Node::Dir { .. }) => Node::Dir { mode: meta.mode },
                    _ => {
                        return Err(Refusal::new(
                            RefusalKind::NotFound,
                            format!("`{path}` does not exist on the server"),
                        ));
                    }
                };
                Step { op: "meta", changes: vec![change(path, base_rev, Some(node))] }
            }
            _ => return Err(Refusal::new(RefusalKind::Invalid, "unexpected request")),
        };
        let rev = self.commit(vec![step]).await?.pop().unwrap_or_else(|| Err(server_err("empty commit")))?;
        Ok(Reply::Committed { rev })
    }

    /// A restore or an undo, planned and committed under the account's commit lock.
    async fn revert(&self, what: super::revert::Revert) -> Result<Reply, Refusal> {
        let lock = self.shared.commit_lock(self.account.id);
        let _held = lock.lock().await;
        let device = self.device.clone();
        let (reply, last) = self.db(move |m, a| super::revert::run(m, a, &device, &what)).await??;
        if last > 0 {
            self.shared.notify(self.account.id, last, self.id);
        }
        Ok(reply)
    }

    /// Sends a file, as a delta against the client's version when the server holds its signature.
    async fn get(
        &mut self,
        id: u64,
        path: RelPath,
        have: Option<(ContentHash, u64)>,
    ) -> Result<(), SessionError> {
        // The entry and where its content is, in one trip to the blocking pool.
        let p = path.clone();
        let found = self
            .db(move |m, a| {
                let cur = m.get(a, &p)?;
                let content = match &cur {
                    Some(Entry { node: Some(Node::File { hash, .. }), .. }) => m.content(a, hash)?,
                    _ => None,
                };
                Ok((cur, content))
            })
            .await;
        let opened = found.and_then(|(cur, content)| {
            let Some(entry @ Entry { node: Some(Node::File { size, .. }), .. }) = cur else {
                return Err(Refusal::new(
                    RefusalKind::NotFound,
                    format!("`{path}` is not a file on the server"),
                ));
            };
            match content {
                Some((n, locs)) if n == size => Ok((entry, locs)),
                _ => Err(Refusal::new(
                    RefusalKind::NotFound,
                    format!("the server no longer holds the content of `{path}` (pruned?)"),
                )),
            }
        });
        match opened {
            Ok((entry, locs)) => {
                // The client's version, when its signature is not cached but the account holds
                // it: the signature is made from it, so the download is still a delta.
                let mut have_locs = None;
                if let (Some((h, len)), Some(Node::File { hash, .. })) = (have, &entry.node)
                    && h != *hash
                    && len >= delta::WHOLE_FILE_BELOW
                    && !self.shared.sigs.contains(&h, len)
                    && let Ok(Some((n, locs))) = self.db(move |m, a| m.content(a, &h)).await
                    && n == len
                {
                    have_locs = Some(locs);
                }
                self.send_file_from(id, entry, locs, have, 0, have_locs).await
            }
            Err(r) => Ok(self.wr.send(&ServerMsg::Resp { id, result: Err(r) }).await?),
        }
    }

    /// The rest of a cut-off download: the current file at `path`, still `hash`, from `from`.
    async fn get_rest(
        &mut self,
        id: u64,
        path: RelPath,
        hash: ContentHash,
        size: u64,
        from: u64,
    ) -> Result<(), SessionError> {
        let opened = async {
            let cur = self.current(&path).await?;
            match cur {
                Some(entry @ Entry { node: Some(Node::File { .. }), .. })
                    if matches!(entry.node, Some(Node::File { hash: h, size: n, .. }) if h == hash && n == size && from <= n) =>
                {
                    let locs = self.locations(&entry).await?;
                    Ok((entry, locs))
                }
                _ => Err(Refusal::new(
                    RefusalKind::Stale,
                    format!("`{path}` changed on the server since the download began; download it again"),
                )),
            }
        }
        .await;
        match opened {
            Ok((entry, locs)) => self.send_file_from(id, entry, locs, None, from, None).await,
            Err(r) => Ok(self.wr.send(&ServerMsg::Resp { id, result: Err(r) }).await?),
        }
    }

    /// Sends the version of `path` committed at `rev`, whole.
    async fn get_version(&mut self, id: u64, path: RelPath, rev: u64) -> Result<(), SessionError> {
        let opened = async {
            let p = path.clone();
            let v = self.db(move |m, a| m.version(a, &p, rev)).await?;
            let Some(v @ Version { node: Some(Node::File { .. }), .. }) = v else {
                return Err(Refusal::new(
                    RefusalKind::NotFound,
                    format!("history has no file `{path}` at revision {rev}"),
                ));
            };
            let entry = Entry { path: v.path, rev: v.rev, node: v.node, device: v.device };
            let locs = self.locations(&entry).await?;
            Ok((entry, locs))
        }
        .await;
        match opened {
            Ok((entry, locs)) => self.send_file(id, entry, locs, None).await,
            Err(r) => Ok(self.wr.send(&ServerMsg::Resp { id, result: Err(r) }).await?),
        }
    }

    /// Where the chunks of a file entry's content are.
    async fn locations(&self, entry: &Entry) -> Result<Vec<ChunkLoc>, Refusal> {
        let Some(Node::File { hash, size, .. }) = entry.node else {
            return Err(Refusal::new(RefusalKind::NotFound, format!("`{}` is not a file", entry.path)));
        };
        let path = entry.path.clone();
        match self.db(move |m, a| m.content(a, &hash)).await? {
            Some((n, locs)) if n == size => Ok(locs),
            _ => Err(Refusal::new(
                RefusalKind::NotFound,
                format!("the server no longer holds the content of `{path}` (pruned?)"),
            )),
        }
    }

    /// The reply and content of a file: a delta against the client's version when the server
    /// holds that version's signature, else whole.
    async fn send_file(
        &mut self,
        id: u64,
        entry: Entry,
        locs: Vec<ChunkLoc>,
        have: Option<(ContentHash, u64)>,
    ) -> Result<(), SessionError> {
        self.send_file_from(id, entry, locs, have, 0, None).await
    }

    /// [`send_file`](Self::send_file) of the bytes from `from` on (whole, no delta, when
    /// `from` > 0).
    async fn send_file_from(
        &mut self,
        id: u64,
        entry: Entry,
        locs: Vec<ChunkLoc>,
        have: Option<(ContentHash, u64)>,
        from: u64,
        have_locs: Option<Vec<ChunkLoc>>,
    ) -> Result<(), SessionError> {
        let Some(Node::File { hash, .. }) = entry.node else { return Ok(()) };
        let entry_node = entry.node.clone();
        let path = entry.path.clone();
        let sigs = self.shared.sigs.clone();
        let base = have
            .filter(|(h, len)| from == 0 && *h != hash && (have_locs.is_some() || sigs.contains(h, *len)));
        self.wr
            .feed(&ServerMsg::Resp { id, result: Ok(Reply::File { entry, base: base.map(|b| b.0) }) })
            .await?;
        // The chunks both versions share go as copies without a diff (see `content::delta_by_chunks`).
        let mut shared_chunks = None;
        if let (Some((h, len)), Some(Node::File { size, .. })) = (base, &entry_node)
            && len >= delta::WHOLE_FILE_BELOW
            && *size >= delta::WHOLE_FILE_BELOW
        {
            let n = hash;
            if let Ok((Some(mine), Some(theirs))) =
                self.db(move |m, a| Ok((m.content_keys(a, &n)?, m.content_keys(a, &h)?))).await
            {
                shared_chunks = Some((mine, theirs));
            }
        }
        let chunks = self.shared.chunks.clone();
        let small = base.is_none()
            && from == 0
            && matches!(&entry_node, Some(Node::File { size, .. }) if *size <= INLINE_DOWNLOAD);
        let sent = if small {
            // A small file whole: a read of at most 64 KiB from a pack (mostly in the page cache)
            // costs less here than the hand-off to the blocking pool and back (a dozen futex calls
            // per file: most of a pull of 100,000 small files).
            let mut blocks = Vec::new();
            let r = delta::encode_whole_from(&mut Reader::new(chunks, locs), None, |b, covered| {
                blocks.push((b, covered));
                Ok(())
            });
            for (block, covered) in blocks {
                self.wr.feed_content(&ServerMsg::Data { id, block }, covered).await?;
            }
            r.map(drop).map_err(|e| e.to_string())
        } else {
            let (tx, mut rx) = mpsc::channel::<(Block, u64)>(4);
            let producer = tokio::task::spawn_blocking(move || -> Result<(), String> {
                if let (Some((h, len)), Some(have_locs)) = (base, have_locs) {
                    let sig = signature_of(Reader::new(chunks.clone(), have_locs), len)
                        .map_err(|e| e.to_string())?;
                    let _ = sigs.put(&h, len, &sig);
                }
                let reader_locs = locs.clone();
                let reader = Reader::new(chunks, locs);
                let mut reader = delta::source::Skip::new(reader, from as usize);
                let emit = |b, covered: u64| {
                    tx.blocking_send((b, covered)).map_err(|_| std::io::Error::other("receiver gone"))
                };
                match base.and_then(|(h, len)| sigs.get(&h, len)) {
                    Some(sig) if from == 0 && shared_chunks.is_some() => {
                        let (mine, theirs) = shared_chunks.unwrap_or_default();
                        // Random access to the new version (the skipped offset is 0 here).
                        let mut reader = Reader::new(reader.into_inner().into_store(), reader_locs);
                        super::content::delta_by_chunks(&sig, &mut reader, &mine, &theirs, emit)
                            .map_err(|e| e.to_string())?;
                    }
                    Some(sig) => {
                        delta::encode_delta_from(&sig, &mut reader, None, emit).map_err(|e| e.to_string())?;
                    }
                    None => {
                        delta::encode_whole_from(&mut reader, None, emit).map_err(|e| e.to_string())?;
                    }
                }
                Ok(())
            });
            while let Some((block, covered)) = rx.recv().await {
                self.wr.feed_content(&ServerMsg::Data { id, block }, covered).await?;
            }
            producer.await.unwrap_or_else(|e| Err(e.to_string()))
        };
        if let Err(e) = sent {
            tracing::warn!("sending `{path}` failed: {e}");
        }
        // On a failed read the client sees a short file, fails verification and retries.
        // Flushed with the next answers, or before the session waits (see `serve_requests`).
        self.wr.feed(&ServerMsg::End { id }).await?;
        self.tally.downloaded();
        Ok(())
    }

    async fn signature(&mut self, id: u64, path: RelPath) -> Result<(), SessionError> {
        let cur = self.current(&path).await;
        let r = match cur {
            Ok(Some(entry @ Entry { node: Some(Node::File { .. }), .. })) => {
                let Some(Node::File { hash, size, .. }) = entry.node else { unreachable!("matched") };
                match self.locations(&entry).await {
                    Ok(locs) => {
                        let (sigs, chunks) = (self.shared.sigs.clone(), self.shared.chunks.clone());
                        blocking(move || -> Result<Vec<u8>, delta::DeltaError> {
                            if let Some(sig) = sigs.get(&hash, size) {
                                return Ok(sig.into_serialized());
                            }
                            let sig = signature_of(Reader::new(chunks, locs), size)?;
                            let _ = sigs.put(&hash, size, &sig);
                            Ok(sig.into_serialized())
                        })
                        .await
                        .map(|bytes| (hash, size, bytes))
                    }
                    Err(r) => Err(r),
                }
            }
            Ok(_) => {
                Err(Refusal::new(RefusalKind::NotFound, format!("`{path}` is not a file on the server")))
            }
            Err(r) => Err(r),
        };
        match r {
            Err(r) => self.wr.send(&ServerMsg::Resp { id, result: Err(r) }).await?,
            Ok((hash, size, bytes)) => {
                self.wr.feed(&ServerMsg::Resp { id, result: Ok(Reply::Signature { hash, size }) }).await?;
                for c in bytes.chunks(1 << 20) {
                    self.wr
                        .feed(&ServerMsg::Data {
                            id,
                            block: Block { codec: delta::Codec::Raw, bytes: c.to_vec() },
                        })
                        .await?;
                }
                self.wr.send(&ServerMsg::End { id }).await?;
            }
        }
        Ok(())
    }
}

impl From<delta::DeltaError> for Refusal {
    fn from(e: delta::DeltaError) -> Self {
        server_err(e)
    }
}

/// The signature of a stored version, made from its chunks.
fn signature_of(mut reader: Reader, size: u64) -> Result<fast_rsync::Signature, delta::DeltaError> {
    let mut b = delta::signature::Builder::new(size);
    let mut at = 0usize;
    while at < size as usize {
        let to = (at + (1 << 20)).min(size as usize);
        b.update(delta::Source::bytes(&mut reader, at..to)?);
        at = to;
    }
    Ok(b.finish())
}

async fn blocking<T: Send + 'static, E: Into<Refusal> + Send + 'static>(
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, Refusal> {
    tokio::task::spawn_blocking(f).await.map_err(server_err)?.map_err(Into::into)
}

/// An upload's base: the stored version it is a delta against.
#[derive(Clone)]
struct BaseVersion {
    hash: ContentHash,
    size: u64,
    locs: Vec<ChunkLoc>,
    /// Its chunks' keys and lengths, which copies from it reuse.
    keys: Option<ChunkList>,
}

/// The checks of an upload before its data is read (blocking): its base revision, no non-empty
/// directory in the way, room for it, and for a delta the base version. The commit checks the
/// rules again, inside its transaction.
#[allow(clippy::too_many_arguments)]
fn check_put(
    sh: &Shared,
    account: AccountId,
    name: &str,
    path: &RelPath,
    base_rev: u64,
    (hash, size): (ContentHash, u64),
    base: Option<ContentHash>,
    from: u64,
    room: Option<&mut Room>,
) -> Result<(Option<BaseVersion>, Option<Vec<ChunkLoc>>), Refusal> {
    let meta = &sh.meta;
    let cur = meta.get(account, path)?;
    check_base(path, &cur, base_rev)?;
    if let Some(Entry { node: Some(Node::Dir { .. }), .. }) = cur
        && meta.has_children(account, path)?
    {
        return Err(Refusal::new(
            RefusalKind::Stale,
            format!("`{path}` is a non-empty directory on the server; delete its contents first"),
        ));
    }
    let mut own;
    let room = match room {
        Some(r) => r,
        None => {
            own = Room::look(meta.as_ref(), account, sh.chunks.free_bytes())?;
            &mut own
        }
    };
    check_room(name, room, path, size, &cur)?;
    let prefix = if from == 0 {
        None
    } else {
        match meta.partial(account, path)? {
            Some(p) if p.hash == hash && p.size == size && p.bytes == from && p.base == base => {
                Some(p.chunks)
            }
            _ => {
                return Err(Refusal::new(
                    RefusalKind::NotFound,
                    format!("the server no longer holds the start of this upload of `{path}`; send it whole"),
                ));
            }
        }
    };
    let Some(h) = base else { return Ok((None, prefix)) };
    let not_held = || {
        Refusal::new(
            RefusalKind::NotFound,
            format!("the server does not hold the base version of `{path}`; send it whole"),
        )
    };
    match cur.and_then(|e| e.node) {
        Some(Node::File { hash, size, .. }) if hash == h => match meta.content(account, &hash)? {
            Some((n, locs)) if n == size => {
                let keys = meta.content_keys(account, &hash)?;
                Ok((Some(BaseVersion { hash, size, locs, keys }), prefix))
            }
            _ => Err(not_held()),
        },
        _ => Err(not_held()),
    }
}

/// The optimistic-concurrency rule: a change names the revision it was made from.
fn check_base(path: &RelPath, cur: &Option<Entry>, base_rev: u64) -> Result<(), Refusal> {
    let rev = cur.as_ref().map_or(0, |e| e.rev);
    if rev != base_rev {
        return Err(Refusal::new(
            RefusalKind::Stale,
            format!(
                "`{path}` changed on the server (now rev {rev}, your change was made on rev {base_rev}); pull first"
            ),
        ));
    }
    Ok(())
}

/// What an upload rebuilds: the content of `path` (`hash`, `size`) from a base and, for a
/// resumed upload, the chunks of its first bytes the server kept.
struct Rebuild {
    account: AccountId,
    path: RelPath,
    hash: ContentHash,
    size: u64,
    base: Option<BaseVersion>,
    prefix: Option<Vec<ChunkLoc>>,
}

/// Uploads cut off after at least this much are kept for a resume.
const KEEP_PARTIAL_FROM: u64 = 8 << 20;

/// Rebuilds an uploaded file from its blocks into chunks (new ones go to the session's open
/// pack), verifies it, and returns its chunk list. An upload cut off after
/// [`KEEP_PARTIAL_FROM`] bytes keeps what it has for a resume.
fn reconstruct(
    sh: &Shared,
    sink: &Mutex<PackSink>,
    to: Rebuild,
    blocks: impl Iterator<Item = Block>,
) -> Result<(ChunkList, Option<ChunkList>), Refusal> {
    let Rebuild { account, path, hash, size, base, prefix } = to;
    let base_hash = base.as_ref().map(|b| b.hash);
    let base_sig = base.as_ref().and_then(|b| sh.sigs.get(&b.hash, b.size));
    let base_keys = base.as_ref().and_then(|b| b.keys.clone());
    let reader = base.map(|b| Reader::new(sh.chunks.clone(), b.locs));
    let mut sink = sink.lock().unwrap_or_else(|p| p.into_inner());
    let meta = sh.meta.as_ref();
    let mut ap = Applier::from_base(reader, Chunker::new(&mut sink, meta).with_base(base_keys), size)
        .with_signature(sh.sigs.builder_for(&hash, size), base_sig);
    if let Some(locs) = prefix {
        // The kept start goes through like a literal: hashed, signed and chunked again (its
        // chunks are stored, so nothing is written for it).
        let mut kept = Reader::new(sh.chunks.clone(), locs);
        let mut at = 0u64;
        while at < kept.len() {
            let n = (kept.len() - at).min(1 << 20);
            let bytes = delta::Source::bytes(&mut kept, at as usize..(at + n) as usize)?;
            ap.prefix(bytes).map_err(server_err)?;
            at += n;
        }
    }
    let mut failed = None;
    for b in blocks {
        if let Err(e) = ap.block(&b) {
            failed = Some(match e {
                // Storing the chunks failed (a full disk): the server's fault, not the data's.
                delta::DeltaError::Io(e) => server_err(e),
                e => Refusal::new(RefusalKind::Corrupt, format!("bad upload data: {e}")),
            });
            break;
        }
    }
    let done = ap.finish().map_err(server_err)?;
    if let Some(r) = failed {
        return Err(r);
    }
    if done.len < size {
        // Cut off: keep the whole chunks received for the next try.
        let (list, bytes) = done.out.complete().map_err(server_err)?;
        drop(sink.seal(meta));
        if bytes >= KEEP_PARTIAL_FROM
            && let Ok(true) = meta.save_partial(account, &path, &hash, size, base_hash.as_ref(), &list)
        {
            tracing::info!("kept {bytes} bytes of a cut-off upload of `{path}` for a resume");
        }
        return Err(Refusal::new(RefusalKind::Corrupt, "the upload ended early; send it again"));
    }
    if done.hash != hash || done.len != size {
        return Err(Refusal::new(
            RefusalKind::Corrupt,
            "uploaded content does not match its announced hash; send it whole",
        ));
    }
    let list = done.out.finish().map_err(server_err)?;
    // The new version's signature, built on the way, goes into the same pack; the batch
    // records it once the pack is sealed.
    let sig = match done.sig {
        Some(sig) => Some(sh.sigs.write(&mut sink, &sig)?),
        None => None,
    };
    Ok((list, sig))
}
