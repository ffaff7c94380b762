//! Downloads: a version's content sent whole or as a delta against what the client has
//! (chunks both share go as copies), its rest after a cut-off transfer, and signatures.

use super::*;
use crate::server::meta::FileToSend;

/// One `Get` of a run: its request id, the path, and the version the client has.
pub(super) type GetRequest = (u64, RelPath, Option<(ContentHash, u64)>);

/// Downloads up to this size (sent whole) are read and encoded in the session's task.
pub(super) const INLINE_DOWNLOAD: u64 = 64 << 10;

/// The signature of a stored version, made from its chunks.
pub(super) fn signature_of(
    mut reader: Reader,
    size: u64,
) -> Result<fast_rsync::Signature, delta::DeltaError> {
    let mut b = delta::signature::Builder::new(size);
    let mut at = 0usize;
    while at < size as usize {
        let to = (at + (1 << 20)).min(size as usize);
        b.update(delta::Source::bytes(&mut reader, at..to)?);
        at = to;
    }
    Ok(b.finish())
}

impl Session {
    /// Sends files asked for one after another (up to [`GET_RUN`]), each as a delta against
    /// the client's version when the server holds its signature: looked up together, in one
    /// trip to the blocking pool ([`MetaStore::files_to_send`]), then sent in order.
    pub(super) async fn gets(&mut self, run: Vec<GetRequest>) -> Result<(), SessionError> {
        let paths: Vec<RelPath> = run.iter().map(|(_, p, _)| p.clone()).collect();
        let n = paths.len();
        let found = match self.db(move |m, a| m.files_to_send(a, &paths)).await {
            Ok(found) if found.len() == n => found.into_iter().map(|f| f.map_err(Refusal::from)).collect(),
            Ok(_) => vec![Err(server_err("a lookup of files answered for another number of them")); n],
            Err(r) => vec![Err(r); n],
        };
        for ((id, path, have), found) in run.into_iter().zip(found) {
            self.get(id, path, have, found).await?;
        }
        Ok(())
    }

    /// Sends one file of [`gets`](Self::gets), `found` its lookup.
    async fn get(
        &mut self,
        id: u64,
        path: RelPath,
        have: Option<(ContentHash, u64)>,
        found: Result<FileToSend, Refusal>,
    ) -> Result<(), SessionError> {
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
    pub(super) async fn get_rest(
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
    pub(super) async fn get_version(&mut self, id: u64, path: RelPath, rev: u64) -> Result<(), SessionError> {
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
    pub(super) async fn locations(&self, entry: &Entry) -> Result<Vec<ChunkLoc>, Refusal> {
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
    pub(super) async fn send_file(
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
    pub(super) async fn send_file_from(
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
                        crate::server::content::delta_by_chunks(&sig, &mut reader, &mine, &theirs, emit)
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

    pub(super) async fn signature(&mut self, id: u64, path: RelPath) -> Result<(), SessionError> {
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
