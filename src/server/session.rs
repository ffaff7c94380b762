//! One connection: the handshake, then requests served in order. A request that fails is refused
//! with a reason and the session goes on; bytes that do not parse end this session only.
//!
//! Here: the request loop, the batches of uploads waiting for their commit, and the requests
//! without content. `upload` checks, receives and rebuilds uploads; `download` sends
//! versions, their rest and signatures.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::Shared;
use super::batch::{self, Staged, Staging};
use super::content::{ChunkList, ChunkLoc, Chunker, PACK_TARGET, PackSink, Reader};
use super::handshake::Authed;
use super::meta::{Account, AccountId, Change, GET_RUN, MetaError, Metadata, Step};
use crate::delta::{self, Applier, Block};
use crate::hash::ContentHash;
use crate::path::RelPath;
use crate::protocol::*;
use futures_util::FutureExt;

mod download;
mod upload;

pub(crate) use upload::quota_refusal;
use upload::*;

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
/// 256 -> 1024 took a first push of 100,000 x 4 KiB files from 17.2 to 9.9 s; with the commit
/// running beside the next batch (see [`batch`]), 1024 -> 2048 took it from 6.0 / 6.5 / 6.9 s to
/// 4.8 / 5.1 / 5.6 s (4096: no better then). 2048 -> 8192 once the server holds many files: each
/// commit writes every leaf of the global chunk-digest index its inserts landed on (random keys),
/// so the page writes per upload grow with the store; four pushes of 100,000 new files into one
/// server went from 5.1 / 6.4 / 7.1 / 7.9 s (server CPU 4.1 / 5.4 / 5.9 / 6.9 s, pwrite 130k -> 313k
/// per push) to 4.7 / 4.9 / 6.0 / 5.5 s (3.7 / 3.7 / 4.9 / 4.3 s, 57k -> 159k); 16,384 was no
/// better.
const MAX_BATCH: usize = 8192;
/// A batch's bytes at most: under [`PACK_TARGET`] with room for the chunks' headers and
/// signatures, so that its pack is finished (made durable) by its commit, in a task of its own.
/// At 64 MiB, a batch of 8,192 files of 4 KiB filled its pack first, and the upload that did
/// waited for the pack's fsync and for the writer's lock held by the commit before: 12 waits of
/// 58-178 ms in a push of 100,000 files, 1.1 s of the 4.8 s the session's uploads spent on the
/// blocking pool.
const MAX_BATCH_BYTES: u64 = PACK_TARGET / 8 * 7;

struct Session {
    /// Set once a quiet connection has freed its transfer state (see [`QUIET`]).
    idle: bool,
    staged: Staging,
    /// The batch being committed in a task of its own (see [`batch`]).
    behind: Option<Behind>,
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
    /// What was read after a run of downloads ([`GET_RUN`]): the next message to handle.
    ahead: Option<Result<Option<ClientMsg>, ProtocolError>>,
}

/// A batch being committed while the session receives the next one.
struct Behind {
    task: tokio::task::JoinHandle<Vec<(u64, Result<Reply, Refusal>)>>,
    /// Each upload's request id, and whether it is a write (for the tally).
    ids: Vec<(u64, bool)>,
    /// A new upload of one of these paths waits for the commit.
    paths: HashSet<RelPath>,
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
        staged: Staging::default(),
        behind: None,
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
        ahead: None,
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
            let waiting = !self.staged.is_empty() || !self.small.is_empty() || self.behind.is_some();
            let ready = if let Some(m) = self.ahead.take() {
                Some(m)
            } else if !waiting {
                self.rd.recv::<ClientMsg>().now_or_never()
            } else {
                None
            };
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
                    if self.uncommitted(&path) {
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
                    if self.uncommitted(&to) {
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
                            // The downloads asked for right after this one are looked up with it.
                            let mut run = vec![(id, path, have)];
                            while run.len() < GET_RUN {
                                match self.rd.recv::<ClientMsg>().now_or_never() {
                                    Some(Ok(Some(ClientMsg::Req {
                                        id,
                                        req: Request::Get { path, have },
                                    }))) => run.push((id, path, have)),
                                    Some(next) => {
                                        self.ahead = Some(next);
                                        break;
                                    }
                                    None => break,
                                }
                            }
                            self.gets(run).await?;
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
        self.staged.push(s);
        if self.staged.full(MAX_BATCH, MAX_BATCH_BYTES) {
            self.settle_small().await?;
            self.start_commit().await?;
        }
        Ok(())
    }

    /// Whether an upload of `path` is received but not yet committed (waiting, staged or in the
    /// batch being committed): a new change of it waits for that.
    fn uncommitted(&self, path: &RelPath) -> bool {
        self.small.iter().any(|s| &s.path == path)
            || self.staged.contains(path)
            || self.behind.as_ref().is_some_and(|b| b.paths.contains(path))
    }

    /// Checks and writes the waiting small uploads, then commits the waiting uploads as one
    /// batch and sends their replies.
    async fn flush(&mut self) -> Result<(), SessionError> {
        self.settle_small().await?;
        self.commit_staged().await
    }

    /// Commits the staged uploads as one batch and sends their replies, and those of the batch
    /// before it.
    pub(super) async fn commit_staged(&mut self) -> Result<(), SessionError> {
        self.start_commit().await?;
        self.wait_behind().await
    }

    /// Starts the commit of the staged uploads in a task of its own, once the one before it is
    /// done and answered; the session goes on receiving meanwhile.
    pub(super) async fn start_commit(&mut self) -> Result<(), SessionError> {
        if self.staged.is_empty() {
            return Ok(());
        }
        self.wait_behind().await?;
        let (staged, paths) = self.staged.take();
        let target = batch::Target {
            shared: self.shared.clone(),
            account: self.account.id,
            session: self.id,
            device: self.device.clone(),
        };
        let pack = self.sink.lock().unwrap_or_else(|p| p.into_inner()).take_pack();
        let ids = staged.iter().map(|s| (s.id, s.op == "write")).collect();
        let span = tracing::Span::current();
        let task = tokio::spawn(batch::commit(target, staged, pack).instrument(span));
        self.behind = Some(Behind { task, ids, paths });
        Ok(())
    }

    /// Waits for the batch being committed and sends its replies.
    async fn wait_behind(&mut self) -> Result<(), SessionError> {
        let Some(Behind { task, ids, .. }) = self.behind.take() else { return Ok(()) };
        let results = match task.await {
            Ok(results) => results,
            // The commit's task failed: its uploads are refused, so the connection stays in step.
            Err(e) => ids.iter().map(|(id, _)| (*id, Err(server_err(&e)))).collect(),
        };
        let up = results.iter().zip(ids).filter(|((_, r), (_, write))| *write && r.is_ok()).count();
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
}

impl From<delta::DeltaError> for Refusal {
    fn from(e: delta::DeltaError) -> Self {
        server_err(e)
    }
}

async fn blocking<T: Send + 'static, E: Into<Refusal> + Send + 'static>(
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, Refusal> {
    tokio::task::spawn_blocking(f).await.map_err(server_err)?.map_err(Into::into)
}
