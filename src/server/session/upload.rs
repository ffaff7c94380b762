//! Uploads: the checks before an upload's data is read (base revision, room, the base of a
//! delta), receiving it (small ones whole, checked and written in batches), and rebuilding it
//! into chunks.

use super::*;

/// The refusal when `path` (`size` bytes, replacing `replaced` bytes) would take the account
/// past its quota. Moves and deletes never add bytes, so they are never refused for a quota.
fn over_quota(
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
    use crate::server::human_size as h;
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
pub(super) struct Room {
    pub(super) used: u64,
    pub(super) quota: Option<u64>,
    pub(super) free: Option<u64>,
}

impl Room {
    pub(super) fn look(meta: &Metadata, account: AccountId, free: Option<u64>) -> Result<Room, MetaError> {
        let (used, quota) = meta.usage(account)?;
        Ok(Room { used, quota, free })
    }
}

/// Refuses an upload of `size` bytes before it is received when it is more than the server
/// may store or the account may hold, or more than the server's disk has free; else counts it
/// in `room`.
pub(super) fn check_room(
    name: &str,
    room: &mut Room,
    path: &RelPath,
    size: u64,
    cur: &Option<Entry>,
) -> Result<(), Refusal> {
    if size > crate::server::MAX_FILE_SIZE {
        return Err(Refusal::new(
            RefusalKind::Invalid,
            format!(
                "`{path}` announces {size} bytes, more than the {} a file on this server may have",
                crate::server::human_size(crate::server::MAX_FILE_SIZE)
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
                crate::server::human_size(size),
                crate::server::human_size(free)
            ),
        ));
    }
    room.used = room.used.saturating_sub(replaced).saturating_add(size);
    room.free = room.free.map(|f| f - size);
    Ok(())
}

/// A refused or failed upload is still read to its end (so the connection stays in step), but
/// never more than an upload of its announced size can be: a whole-file stream is its bytes plus
/// a few per block, a delta or compressed one less.
pub(super) fn drain_limit(size: u64) -> u64 {
    size.min(crate::server::MAX_FILE_SIZE).saturating_add(size / 8).saturating_add(1 << 20)
}

/// Uploads up to this size (sent whole) are received before they are checked and written, and
/// checked and written together with the small uploads that follow them: one trip to the
/// blocking pool per [`SMALL_BATCH`] of them, not one each (the hand-offs were 45% of the
/// server's CPU in a first push of 100,000 x 4 KiB files).
pub(super) const SMALL_UPLOAD: u64 = 64 << 10;

/// Small uploads checked and written in one trip to the blocking pool at most, and their bytes.
pub(super) const SMALL_BATCH: usize = 64;

pub(super) const SMALL_BATCH_BYTES: usize = 2 << 20;

/// A small upload received whole (its blocks held), to be checked and written with others.
pub(super) struct SmallPut {
    pub(super) id: u64,
    pub(super) path: RelPath,
    pub(super) base_rev: u64,
    pub(super) hash: ContentHash,
    pub(super) size: u64,
    pub(super) meta: Meta,
    pub(super) blocks: Vec<Block>,
}

/// An upload's base: the stored version it is a delta against.
#[derive(Clone)]
pub(super) struct BaseVersion {
    pub(super) hash: ContentHash,
    pub(super) size: u64,
    pub(super) locs: Vec<ChunkLoc>,
    /// Its chunks' keys and lengths, which copies from it reuse.
    pub(super) keys: Option<ChunkList>,
}

/// The checks of an upload before its data is read (blocking): its base revision, no non-empty
/// directory in the way, room for it, and for a delta the base version. The commit checks the
/// rules again, inside its transaction.
#[allow(clippy::too_many_arguments)]
pub(super) fn check_put(
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
pub(super) fn check_base(path: &RelPath, cur: &Option<Entry>, base_rev: u64) -> Result<(), Refusal> {
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
pub(super) struct Rebuild {
    pub(super) account: AccountId,
    pub(super) path: RelPath,
    pub(super) hash: ContentHash,
    pub(super) size: u64,
    pub(super) base: Option<BaseVersion>,
    pub(super) prefix: Option<Vec<ChunkLoc>>,
}

/// Uploads cut off after at least this much are kept for a resume.
pub(super) const KEEP_PARTIAL_FROM: u64 = 8 << 20;

/// Rebuilds an uploaded file from its blocks into chunks (new ones go to the session's open
/// pack), verifies it, and returns its chunk list. An upload cut off after
/// [`KEEP_PARTIAL_FROM`] bytes keeps what it has for a resume.
pub(super) fn reconstruct(
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

impl Session {
    /// Receives a small upload whole (see [`SMALL_UPLOAD`]); refused if it sends far more than
    /// it announced.
    pub(super) async fn receive_small(
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
    pub(super) async fn settle_small(&mut self) -> Result<(), SessionError> {
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
        if self.staged.full(MAX_BATCH, MAX_BATCH_BYTES) {
            self.start_commit().await?;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) async fn put(
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
    pub(super) async fn upload_block(
        &mut self,
        id: u64,
        ended: &mut bool,
    ) -> Result<Option<Block>, SessionError> {
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
}
