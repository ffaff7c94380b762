//! One connection: the handshake, then requests served in order. A request that fails is refused
//! with a reason and the session goes on; bytes that do not parse end this session only.

use std::io::BufWriter;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::Shared;
use super::batch::{self, Staged};
use super::meta::{Account, AccountId, MetaError, Metadata};
use super::store::{AccountStore, NoParent};
use crate::delta::{self, Applier, Block};
use crate::fsutil::{self, TempGuard};
use crate::hash::ContentHash;
use crate::path::RelPath;
use crate::protocol::*;
use futures_util::FutureExt;

/// A silent peer is dropped after this long without completing the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
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

/// Longest path the server's OS accepts (Linux `PATH_MAX` less its NUL).
const MAX_OS_PATH: usize = 4095;

/// Refuses a path that fits the protocol's 4096-byte limit but not the OS's once the account's
/// folder is put in front of it: the effective limit is 4095 bytes minus the length of
/// `DATA/accounts/ID/files/`.
fn path_fits(store: &AccountStore, path: &RelPath) -> Result<(), Refusal> {
    let prefix = store.files.as_os_str().len() + 1;
    let len = path.as_str().len();
    if prefix + len > MAX_OS_PATH {
        return Err(Refusal::new(
            RefusalKind::Invalid,
            format!(
                "path is too long for this server: `{path}` is {len} bytes and this server can store paths of at most {} bytes (the OS limit of {MAX_OS_PATH} less its data folder's {prefix}); shorten the names or the nesting",
                MAX_OS_PATH.saturating_sub(prefix)
            ),
        ));
    }
    Ok(())
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
    use super::human_size as h;
    Err(Refusal::new(
        RefusalKind::Server,
        format!(
            "account {name} is over its quota: `{path}` ({}) would bring it to {} used of {}; free space or raise it with `deltasync account quota {name} SIZE` on the server",
            h(size),
            h(after),
            h(quota)
        ),
    ))
}

/// Refuses an upload of `size` bytes before it is received when it is more than the server
/// may store or the account may hold, or more than the server's disk has free.
fn check_room(
    meta: &Metadata,
    account: AccountId,
    name: &str,
    store: &AccountStore,
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
    let (used, quota) = meta.usage(account)?;
    over_quota(name, used, quota, path, size, replaced)?;
    let free = fsutil_free_bytes(&store.tmp)?;
    if size > free {
        return Err(Refusal::new(
            RefusalKind::Server,
            format!(
                "server out of disk space: `{path}` needs {} and the server's data folder has {} free; nothing was changed on the server. Its administrator must free space; then push again",
                super::human_size(size),
                super::human_size(free)
            ),
        ));
    }
    Ok(())
}

/// Bytes an unprivileged writer may still use on the file system holding `dir`.
fn fsutil_free_bytes(dir: &std::path::Path) -> Result<u64, Refusal> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(server_err)?;
    #[allow(unsafe_code)]
    // SAFETY: all-zero is a valid `statvfs` (plain integers).
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    #[allow(unsafe_code)]
    // SAFETY: `c` is a NUL-terminated path and `st` a valid, writable statvfs.
    let r = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if r != 0 {
        return Err(server_err(std::io::Error::last_os_error()));
    }
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
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
        if let Some(np) = NoParent::of(&e) {
            return Refusal::new(RefusalKind::Stale, np.to_string());
        }
        server_err(e)
    }
}

/// Uploads committed together at most: bounds the time a reply waits and the open temp files.
const MAX_BATCH: usize = 256;
/// Uploads up to this size (sent whole) are received before they are checked and written, so
/// each costs one trip to the blocking pool.
const SMALL_UPLOAD: u64 = 64 << 10;
const MAX_BATCH_BYTES: u64 = 64 << 20;

struct Session {
    staged: Vec<Staged>,
    staged_bytes: u64,
    id: u64,
    shared: Arc<Shared>,
    account: Account,
    device: String,
    store: AccountStore,
    rd: FrameReader,
    wr: FrameWriter,
}

pub async fn serve(
    stream: TcpStream,
    shared: Arc<Shared>,
    cancel: CancellationToken,
) -> Result<(), SessionError> {
    let (mut rd, mut wr, _) = split(stream);
    wr.set_write_stall(shared.io_timeout);
    let hello: Hello = match tokio::time::timeout(HANDSHAKE_TIMEOUT, rd.recv()).await {
        Err(_) => return Err(SessionError::Handshake("timed out".into())),
        Ok(Ok(Some(h))) => h,
        Ok(Ok(None)) => return Ok(()),
        Ok(Err(e)) => {
            let _ = wr
                .send(&Welcome::Rejected {
                    reason: Rejection::BadMagic,
                    message: "not a deltasync client".into(),
                    server_version: PROTOCOL_VERSION,
                })
                .await;
            return Err(e.into());
        }
    };
    let reject =
        |reason, message: String| Welcome::Rejected { reason, message, server_version: PROTOCOL_VERSION };
    if hello.magic != MAGIC {
        wr.send(&reject(Rejection::BadMagic, "not a deltasync client".into())).await?;
        return Err(SessionError::Handshake("bad magic".into()));
    }
    if hello.version != PROTOCOL_VERSION {
        let msg = format!(
            "protocol version mismatch: client speaks {}, server speaks {PROTOCOL_VERSION}; install the same deltasync version on both",
            hello.version
        );
        wr.send(&reject(Rejection::Version, msg.clone())).await?;
        return Err(SessionError::Handshake(msg));
    }
    let sh = shared.clone();
    let token = hello.token.clone();
    let device = hello.device.chars().take(64).collect::<String>();
    let dev = device.clone();
    let auth =
        tokio::task::spawn_blocking(move || -> Result<Option<(Account, Option<String>, u64)>, MetaError> {
            let found = match token {
                Some(t) => sh.meta.authenticate(&t)?.map(|a| (a, None)),
                None if sh.open_registration => {
                    let mut suffix = [0u8; 3];
                    let _ = getrandom::fill(&mut suffix);
                    let name =
                        format!("{}-{}", if dev.is_empty() { "device" } else { &dev }, hex::encode(suffix));
                    let (a, t) = super::add_account(&sh.meta, &name)?;
                    Some((a, Some(t)))
                }
                None => None,
            };
            match found {
                Some((a, t)) => {
                    let seq = sh.meta.seq(a.id)?;
                    Ok(Some((a, t, seq)))
                }
                None => Ok(None),
            }
        })
        .await
        .map_err(|e| SessionError::Internal(e.to_string()))?
        .map_err(|e| SessionError::Internal(e.to_string()))?;
    let Some((account, new_token, seq)) = auth else {
        let msg = if hello.token.is_none() {
            "authentication failed: no token given and this server does not have open registration; create an account with `deltasync account add NAME` on the server"
        } else {
            "authentication failed: unknown token; check --token / DELTASYNC_TOKEN"
        };
        wr.send(&reject(Rejection::Auth, msg.into())).await?;
        return Err(SessionError::Handshake("authentication failed".into()));
    };
    let store = shared.store.account(account.id).map_err(|e| SessionError::Internal(e.to_string()))?;
    wr.send(&Welcome::Accepted {
        account: account.name.clone(),
        new_token,
        server_id: shared.server_id,
        seq,
    })
    .await?;
    let mut s = Session {
        staged: Vec::new(),
        staged_bytes: 0,
        id: shared.session_id(),
        shared,
        account,
        device,
        store,
        rd,
        wr,
    };
    let r = s.requests(cancel).await;
    if let Err(SessionError::Protocol(ProtocolError::Decode(e))) = &r {
        let _ = s.wr.send(&ServerMsg::Fatal { message: format!("malformed message ({e}): closing") }).await;
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
            let msg = if self.staged.is_empty() {
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(()),
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
            let (id, mut req) = match msg {
                ClientMsg::Req { id, req } => (id, req),
                other => {
                    return Err(SessionError::Violation(format!("unexpected {other:?} outside an upload")));
                }
            };
            mask_modes(&mut req);
            let result = match req {
                Request::Put { path, base_rev, hash, size, meta, base } => {
                    if self.staged.iter().any(|s| s.path == path) {
                        self.flush().await?;
                    }
                    match self.put(id, path.clone(), base_rev, hash, size, meta, base).await? {
                        Ok(tmp) => {
                            let node = Node::File { hash, size, meta };
                            self.stage(Staged { id, path, base_rev, tmp, node, op: "write" }).await?;
                            continue;
                        }
                        Err(r) => Err(r),
                    }
                }
                Request::Copy { hash, size, to, to_base_rev, meta } => {
                    if self.staged.iter().any(|s| s.path == to) {
                        self.flush().await?;
                    }
                    match self.copy(hash, size, &to, to_base_rev, meta).await {
                        Ok(tmp) => {
                            let node = Node::File { hash, size, meta };
                            self.stage(Staged { id, path: to, base_rev: to_base_rev, tmp, node, op: "copy" })
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

    /// Commits the waiting uploads as one batch and sends their replies.
    async fn flush(&mut self) -> Result<(), SessionError> {
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
            account_name: &self.account.name,
            store: &self.store,
        };
        let results = batch::commit(target, staged).await;
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
        tokio::task::spawn_blocking(move || f(&sh.meta, a)).await.map_err(server_err)?.map_err(Refusal::from)
    }

    async fn current(&self, path: &RelPath) -> Result<Option<Entry>, Refusal> {
        let p = path.clone();
        self.db(move |m, a| m.get(a, &p)).await
    }

    async fn commit(&self, op: &'static str, changes: Vec<(RelPath, Option<Node>)>) -> Result<u64, Refusal> {
        let device = self.device.clone();
        let seq = self
            .db(move |m, a| {
                let refs: Vec<_> = changes.iter().map(|(p, n)| (p, n.as_ref())).collect();
                m.commit(a, op, &device, &refs)
            })
            .await?;
        self.shared.notify(self.account.id, seq, self.id);
        Ok(seq)
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
        meta: Meta,
        base: Option<ContentHash>,
    ) -> Result<Result<TempGuard, Refusal>, SessionError> {
        let (sh, account, store) = (self.shared.clone(), self.account.id, self.store.clone());
        let name = self.account.name.clone();
        if base.is_none() && size <= SMALL_UPLOAD {
            // A small file arrives in a block or two: take it whole, then check and write it in
            // one trip to the blocking pool instead of one for the check and one for the write.
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
            let done = tokio::task::spawn_blocking(move || {
                check_put(&sh.meta, account, &name, &store, &path, base_rev, None, size)?;
                reconstruct(&store, None, blocks.into_iter(), size, hash, meta)
            })
            .await;
            return Ok(done.unwrap_or_else(|e| Err(server_err(e))));
        }
        let p = path.clone();
        let early = tokio::task::spawn_blocking(move || {
            check_put(&sh.meta, account, &name, &store, &p, base_rev, base, size)
        })
        .await
        .unwrap_or_else(|e| Err(server_err(e)));
        let (tx, mut rx) = mpsc::channel::<Block>(4);
        let worker = match &early {
            Ok(base_file) => {
                let store = self.store.clone();
                let base_file = base_file.clone();
                Some(tokio::task::spawn_blocking(move || {
                    reconstruct(
                        &store,
                        base_file,
                        std::iter::from_fn(|| rx.blocking_recv()),
                        size,
                        hash,
                        meta,
                    )
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
        // The connection's stream must be decoded in order, even for a refused upload.
        self.rd.open(block).map(Some).map_err(|e| SessionError::Violation(e.to_string()))
    }

    /// [`replaceable`] on the blocking pool.
    async fn check_replaceable(&self, path: &RelPath, cur: &Option<Entry>) -> Result<(), Refusal> {
        let (sh, account, p, c) = (self.shared.clone(), self.account.id, path.clone(), cur.clone());
        blocking(move || replaceable(&sh.meta, account, &p, &c)).await
    }

    /// A server-side copy of content the account already holds, into a temp file.
    async fn copy(
        &self,
        hash: ContentHash,
        size: u64,
        to: &RelPath,
        to_base_rev: u64,
        meta: Meta,
    ) -> Result<TempGuard, Refusal> {
        let (to, name, store) = (to.clone(), self.account.name.clone(), self.store.clone());
        self.db(move |m, a| {
            Ok((|| -> Result<(), Refusal> {
                path_fits(&store, &to)?;
                let cur = m.get(a, &to)?;
                check_base(&to, &cur, to_base_rev)?;
                check_room(m, a, &name, &store, &to, size, &cur)
            })())
        })
        .await??;
        let src = self.db(move |m, a| m.find_by_hash(a, &hash)).await?;
        let Some(src) = src else {
            return Err(Refusal::new(
                RefusalKind::NotFound,
                "no file with that content on the server; upload it",
            ));
        };
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || -> Result<TempGuard, Refusal> {
            let mut from = store.open(&src)?;
            let (f, t) = store.new_temp()?;
            let g = TempGuard::new(t);
            // Never more than announced, whatever the source has become.
            std::io::copy(&mut std::io::Read::take(&mut from, size.saturating_add(1)), &mut { f })?;
            let (h, n) = ContentHash::of_file(g.path())?;
            if h != hash || n != size {
                return Err(Refusal::new(RefusalKind::NotFound, "the server's copy changed; upload it"));
            }
            fsutil::set_mode(g.path(), meta.mode)?;
            fsutil::set_mtime(g.path(), meta.mtime_ns)?;
            Ok(g)
        })
        .await
        .map_err(server_err)?
    }

    /// Requests that change metadata or the tree without content (mkdir, symlink, delete, move,
    /// set-meta), under the account's commit lock.
    async fn simple(&self, req: Request) -> Result<Reply, Refusal> {
        match &req {
            Request::Mkdir { path, .. } | Request::Symlink { path, .. } | Request::SetMeta { path, .. } => {
                path_fits(&self.store, path)?
            }
            Request::Move { to, .. } => path_fits(&self.store, to)?,
            _ => {}
        }
        let lock = self.shared.commit_lock(self.account.id);
        let _held = lock.lock().await;
        let store = self.store.clone();
        match req {
            Request::Mkdir { path, base_rev, mode } => {
                let cur = self.current(&path).await?;
                if let Some(Entry { node: Some(Node::Dir { .. }), rev, .. }) = cur {
                    return Ok(Reply::Committed { rev });
                }
                check_base(&path, &cur, base_rev)?;
                let p = path.clone();
                blocking(move || store.mkdir(&p, mode)).await?;
                let rev = self.commit("mkdir", vec![(path, Some(Node::Dir { mode }))]).await?;
                Ok(Reply::Committed { rev })
            }
            Request::Symlink { path, base_rev, target } => {
                if target.is_empty() || target.len() > MAX_LINK_TARGET || target.contains('\0') {
                    return Err(Refusal::new(
                        RefusalKind::Invalid,
                        "symlink target is empty, too long or has a NUL byte",
                    ));
                }
                let cur = self.current(&path).await?;
                check_base(&path, &cur, base_rev)?;
                self.check_replaceable(&path, &cur).await?;
                let (p, t) = (path.clone(), target.clone());
                blocking(move || store.symlink(&p, &t)).await?;
                let rev = self.commit("symlink", vec![(path, Some(Node::Symlink { target }))]).await?;
                Ok(Reply::Committed { rev })
            }
            Request::Delete { path, base_rev } => {
                let cur = self.current(&path).await?;
                let Some(Entry { node: Some(node), .. }) = &cur else {
                    return Ok(Reply::Committed { rev: cur.map_or(0, |e| e.rev) });
                };
                check_base(&path, &cur, base_rev)?;
                if matches!(node, Node::Dir { .. }) {
                    let p = path.clone();
                    if self.db(move |m, a| m.has_children(a, &p)).await? {
                        return Err(Refusal::new(
                            RefusalKind::Stale,
                            format!("directory `{path}` is not empty on the server"),
                        ));
                    }
                }
                let p = path.clone();
                blocking(move || store.remove(&p)).await?;
                let rev = self.commit("delete", vec![(path, None)]).await?;
                Ok(Reply::Committed { rev })
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
                let dst = self.current(&to).await?;
                check_base(&to, &dst, to_base_rev)?;
                self.check_replaceable(&to, &dst).await?;
                let (f, t) = (from.clone(), to.clone());
                blocking(move || store.rename(&f, &t, meta)).await?;
                let rev = self.commit("move", vec![(from, None), (to, Some(node))]).await?;
                Ok(Reply::Committed { rev })
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
                let p = path.clone();
                blocking(move || store.set_meta(&p, meta)).await?;
                let rev = self.commit("meta", vec![(path, Some(node))]).await?;
                Ok(Reply::Committed { rev })
            }
            _ => Err(Refusal::new(RefusalKind::Invalid, "unexpected request")),
        }
    }

    /// Sends a file, as a delta against the client's version when the server holds its signature.
    async fn get(
        &mut self,
        id: u64,
        path: RelPath,
        have: Option<(ContentHash, u64)>,
    ) -> Result<(), SessionError> {
        let opened = async {
            let lock = self.shared.commit_lock(self.account.id);
            let _held = lock.lock().await;
            let cur = self.current(&path).await?;
            let Some(entry @ Entry { node: Some(Node::File { .. }), .. }) = cur else {
                return Err(Refusal::new(
                    RefusalKind::NotFound,
                    format!("`{path}` is not a file on the server"),
                ));
            };
            let file = self.store.open(&path)?;
            Ok((entry, file))
        }
        .await;
        let (entry, file) = match opened {
            Ok(x) => x,
            Err(r) => {
                self.wr.send(&ServerMsg::Resp { id, result: Err(r) }).await?;
                return Ok(());
            }
        };
        let Some(Node::File { hash, .. }) = entry.node else { unreachable!("checked above") };
        let sigs = self.store.sigs.clone();
        let base = have.filter(|(h, len)| *h != hash && sigs.contains(h, *len));
        self.wr
            .feed(&ServerMsg::Resp { id, result: Ok(Reply::File { entry, base: base.map(|b| b.0) }) })
            .await?;
        let (tx, mut rx) = mpsc::channel::<(Block, u64)>(4);
        let producer = tokio::task::spawn_blocking(move || -> Result<(), String> {
            let map = fsutil::map(&file).map_err(|e| e.to_string())?;
            let mut sent = 0usize;
            let emit = |b, covered: u64| {
                // Memory stays flat for huge files: drop the pages already encoded.
                map.release(0, sent);
                sent += covered as usize;
                tx.blocking_send((b, covered)).map_err(|_| std::io::Error::other("receiver gone"))
            };
            match base.and_then(|(h, len)| sigs.get(&h, len)) {
                Some(sig) => {
                    delta::encode_delta(&sig, &map, None, emit).map_err(|e| e.to_string())?;
                }
                None => {
                    delta::encode_whole(&map, None, emit).map_err(|e| e.to_string())?;
                }
            }
            Ok(())
        });
        while let Some((block, covered)) = rx.recv().await {
            let block = self.wr.seal(block).map_err(|e| SessionError::Internal(e.to_string()))?;
            self.wr.feed_content(&ServerMsg::Data { id, block }, covered).await?;
        }
        if let Ok(Err(e)) = producer.await {
            tracing::warn!("sending `{path}` failed: {e}");
        }
        // On a failed producer the client sees a short file, fails verification and retries.
        self.wr.send(&ServerMsg::End { id }).await?;
        Ok(())
    }

    async fn signature(&mut self, id: u64, path: RelPath) -> Result<(), SessionError> {
        let cur = self.current(&path).await;
        let r = match cur {
            Ok(Some(Entry { node: Some(Node::File { hash, size, .. }), .. })) => {
                let store = self.store.clone();
                let p = path.clone();
                blocking(move || -> std::io::Result<Vec<u8>> {
                    store.sigs.ensure_file(&hash, &store.resolve(&p)?)?;
                    Ok(store.sigs.get(&hash, size).map(|s| s.into_serialized()).unwrap_or_default())
                })
                .await
                .map(|bytes| (hash, size, bytes))
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

async fn blocking<T: Send + 'static, E: Into<Refusal> + Send + 'static>(
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, Refusal> {
    tokio::task::spawn_blocking(f).await.map_err(server_err)?.map_err(Into::into)
}

/// The checks of an upload that need the database (blocking): its base revision, no non-empty
/// directory in the way, and for a delta the base version, whose file, hash and size it returns.
#[allow(clippy::too_many_arguments)]
fn check_put(
    meta: &Metadata,
    account: AccountId,
    name: &str,
    store: &AccountStore,
    path: &RelPath,
    base_rev: u64,
    base: Option<ContentHash>,
    size: u64,
) -> Result<Option<(std::path::PathBuf, ContentHash, u64)>, Refusal> {
    path_fits(store, path)?;
    let cur = meta.get(account, path)?;
    check_base(path, &cur, base_rev)?;
    replaceable(meta, account, path, &cur)?;
    check_room(meta, account, name, store, path, size, &cur)?;
    match base {
        None => Ok(None),
        Some(h) => match cur.and_then(|e| e.node) {
            Some(Node::File { hash, size, .. }) if hash == h => Ok(Some((store.resolve(path)?, hash, size))),
            _ => Err(Refusal::new(
                RefusalKind::NotFound,
                format!("the server does not hold the base version of `{path}`; send it whole"),
            )),
        },
    }
}

/// A directory may be replaced by a file or link only once it is empty: its children must be
/// deleted first (the client orders deletes first), so no entry is orphaned. Blocking.
fn replaceable(
    meta: &Metadata,
    account: AccountId,
    path: &RelPath,
    cur: &Option<Entry>,
) -> Result<(), Refusal> {
    if let Some(Entry { node: Some(Node::Dir { .. }), .. }) = cur
        && meta.has_children(account, path)?
    {
        return Err(Refusal::new(
            RefusalKind::Stale,
            format!("`{path}` is a non-empty directory on the server; delete its contents first"),
        ));
    }
    Ok(())
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

/// Rebuilds an uploaded file in a temp file from its blocks and verifies it.
fn reconstruct(
    store: &AccountStore,
    base: Option<(std::path::PathBuf, ContentHash, u64)>,
    blocks: impl Iterator<Item = Block>,
    size: u64,
    hash: ContentHash,
    meta: Meta,
) -> Result<TempGuard, Refusal> {
    let base_sig = base.as_ref().and_then(|(_, h, len)| store.sigs.get(h, *len));
    let base_map = match base {
        Some((p, _, _)) => {
            use std::os::unix::fs::OpenOptionsExt;
            let f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(p)?;
            fsutil::map(&f)?
        }
        None => fsutil::Mapped::Empty,
    };
    let (file, t) = store.new_temp()?;
    let guard = TempGuard::new(t);
    let mut ap =
        Applier::new(&base_map, BufWriter::with_capacity(1 << 20, fsutil::WriteBehind::new(file)), size)
            .with_signature(store.sigs.builder_for(&hash, size), base_sig);
    for b in blocks {
        ap.block(&b).map_err(|e| match e {
            // Writing the temp file failed (a full disk): the server's fault, not the data's.
            delta::DeltaError::Io(e) => server_err(e),
            e => Refusal::new(RefusalKind::Corrupt, format!("bad upload data: {e}")),
        })?;
        // Copies read the base wherever they point; drop what they touched so memory stays flat.
        base_map.release_all();
    }
    let done = ap.finish().map_err(server_err)?;
    if done.hash != hash || done.len != size {
        return Err(Refusal::new(
            RefusalKind::Corrupt,
            "uploaded content does not match its announced hash; send it whole",
        ));
    }
    // Not fsynced here: the batch commit makes many files durable together.
    let file = done.out.into_inner().map_err(|e| server_err(e.error()))?.into_inner();
    fsutil::set_file_meta(&file, meta.mode, meta.mtime_ns)?;
    drop(file);
    if let Some(sig) = done.sig {
        store.sigs.put(&hash, size, &sig)?;
    }
    Ok(guard)
}
