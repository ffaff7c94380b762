//! Uploads: the writer side of the pipeline. Each job's request goes out; a file's content is
//! encoded in one pass (a delta against the base's cached signature, or whole), on the blocking
//! pool or, for a small file, in the connection's task.

use super::*;

/// Writer-side state, owned so the writer can run beside the reader.
pub(super) struct Sender {
    pub(super) root: PathBuf,
    pub(super) sigs: SigCache,
    pub(super) progress: Arc<Progress>,
    /// Uploads whose start the server kept (see [`Resumes::up`]), taken by their upload.
    pub(super) resumed: Mutex<HashMap<RelPath, (Option<ContentHash>, Prefix)>>,
}

pub(super) enum Item {
    /// The file still has its planned size; the blocks are a delta against `base`, if any, and
    /// cover the file from byte `from` (the server kept the bytes before).
    Start {
        base: Option<ContentHash>,
        from: u64,
    },
    Block(Block, u64),
    Skip,
}

/// What became of one job's request.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Outcome {
    Sent,
    /// Sent as the rest of a cut-off upload (`PutRest`).
    SentRest,
    /// Not sent: the file was gone or had another size.
    Skipped,
    /// Sent, but the bytes read did not hash to what the scan saw: the server will refuse them.
    Changed,
}

/// How the encoder of one upload ended.
pub(super) enum Produced {
    Done(DeltaStats),
    Changed,
    Failed(String),
}

impl Sender {
    /// Sends one job's request (and content).
    pub(super) async fn send(
        &self,
        wr: &mut FrameWriter,
        id: u64,
        job: &Job,
        stats: &mut DeltaStats,
    ) -> Result<Outcome, ClientError> {
        let req = match job {
            Job::Get { entry, have, land } => match (land, entry.node.as_ref().and_then(file_id)) {
                (Landing::Partial { from }, Some((hash, size))) if *from > 0 => {
                    Request::GetRest { path: entry.path.clone(), hash, size, from: *from }
                }
                _ => Request::Get { path: entry.path.clone(), have: *have },
            },
            Job::Up(a) => match a.clone() {
                Action::Mkdir { path, base_rev, mode } => Request::Mkdir { path, base_rev, mode },
                Action::Symlink { path, base_rev, target } => Request::Symlink { path, base_rev, target },
                Action::Copy { path, base_rev, hash, size, meta } => {
                    Request::Copy { hash, size, to: path, to_base_rev: base_rev, meta }
                }
                Action::Move { from, from_rev, to, to_base_rev, meta, .. } => {
                    Request::Move { from, from_rev, to, to_base_rev, meta }
                }
                Action::SetMeta { path, base_rev, meta } => Request::SetMeta { path, base_rev, meta },
                Action::DeleteRemote { path, base_rev } => Request::Delete { path, base_rev },
                Action::Put { path, base_rev, hash, size, meta, delta_base } => {
                    return self.put(wr, id, path, base_rev, hash, size, meta, delta_base, stats).await;
                }
                other => {
                    return Err(ClientError::Unexpected(format!("not a server step: {other:?}")));
                }
            },
        };
        wr.feed(&ClientMsg::Req { id, req }).await?;
        Ok(Outcome::Sent)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) async fn put(
        &self,
        wr: &mut FrameWriter,
        id: u64,
        path: RelPath,
        base_rev: u64,
        hash: ContentHash,
        size: u64,
        meta: Meta,
        delta_base: Option<(ContentHash, u64)>,
        stats: &mut DeltaStats,
    ) -> Result<Outcome, ClientError> {
        let full = path.under(&self.root);
        let sigs = self.sigs.clone();
        self.progress.file_started(path.as_str(), size);
        let resume = self.resumed.lock().unwrap_or_else(|p| p.into_inner()).remove(&path);
        // A small file sent whole is read and encoded here, its blocks held: no thread hand-off
        // per file (a push of many small files spent more on those than on reading them).
        let (mut rx, producer) = if size <= INLINE_FILE && delta_base.is_none() && resume.is_none() {
            let mut held = Vec::new();
            let produced = produce(&full, hash, size, None, None, &sigs, |item| {
                held.push(item);
                Ok(())
            });
            (Items::Held(held.into_iter()), Producer::Done(produced))
        } else {
            let (tx, rx) = mpsc::channel::<Item>(4);
            let task = tokio::task::spawn_blocking(move || {
                produce(&full, hash, size, delta_base, resume, &sigs, |item| {
                    tx.blocking_send(item).map_err(|_| ())
                })
            });
            (Items::Chan(rx), Producer::Task(task))
        };
        let (base, from) = match rx.next().await {
            Some(Item::Start { base, from }) => (base, from),
            _ => {
                let _ = producer.finish().await;
                return Ok(Outcome::Skipped);
            }
        };
        let req = if from > 0 {
            self.progress.advance(path.as_str(), from);
            Request::PutRest { path: path.clone(), base_rev, hash, size, meta, base, from }
        } else {
            Request::Put { path: path.clone(), base_rev, hash, size, meta, base }
        };
        wr.feed(&ClientMsg::Req { id, req }).await?;
        let mut next = rx.next().await;
        let mut ended = false;
        while let Some(Item::Block(block, covered)) = next {
            // One block of look-ahead: the last one carries the end of the upload.
            next = rx.next().await;
            if next.is_none() {
                wr.feed_content(&ClientMsg::Last { id, block }, covered).await?;
                ended = true;
            } else {
                wr.feed_content(&ClientMsg::Data { id, block }, covered).await?;
            }
            self.progress.advance(path.as_str(), covered);
        }
        if !ended {
            wr.feed(&ClientMsg::End { id }).await?;
        }
        match producer.finish().await {
            Ok(Produced::Done(s)) => stats.add(s),
            Ok(Produced::Changed) => return Ok(Outcome::Changed),
            // A short upload: the server refuses it, and a delta is retried whole.
            Ok(Produced::Failed(e)) => tracing::debug!("encoding `{path}` stopped: {e}"),
            Err(e) => tracing::debug!("encoding `{path}` stopped: {e}"),
        }
        Ok(if from > 0 { Outcome::SentRest } else { Outcome::Sent })
    }
}

/// An upload's items: from its encoder on the blocking pool, or all made already.
pub(super) enum Items {
    Chan(mpsc::Receiver<Item>),
    Held(std::vec::IntoIter<Item>),
}

impl Items {
    pub(super) async fn next(&mut self) -> Option<Item> {
        match self {
            Items::Chan(rx) => rx.recv().await,
            Items::Held(it) => it.next(),
        }
    }
}

/// An upload's encoder: running on the blocking pool, or done.
pub(super) enum Producer {
    Task(tokio::task::JoinHandle<Produced>),
    Done(Produced),
}

impl Producer {
    pub(super) async fn finish(self) -> Result<Produced, tokio::task::JoinError> {
        match self {
            Producer::Task(t) => t.await,
            Producer::Done(p) => Ok(p),
        }
    }
}

/// Encodes a local file for upload (on the blocking pool, or in place for a small one), in one
/// pass over it: the blocks (a delta
/// against the base's cached signature when there is one), the hash that proves the file is still
/// what the scan saw, and the new version's signature for the next upload. With `resume` (the
/// base of an upload whose start the server kept, and that start as read here) and the same base,
/// only the rest is encoded; the hash and the signature are still of the whole file.
pub(super) fn produce(
    full: &Path,
    hash: ContentHash,
    size: u64,
    delta_base: Option<(ContentHash, u64)>,
    resume: Option<(Option<ContentHash>, Prefix)>,
    sigs: &SigCache,
    mut send: impl FnMut(Item) -> Result<(), ()>,
) -> Produced {
    let skip = |send: &mut dyn FnMut(Item) -> Result<(), ()>, why: String| {
        let _ = send(Item::Skip);
        Produced::Failed(why)
    };
    let file = match fsutil::open_to_read(full) {
        Ok(f) => f,
        Err(e) => return skip(&mut send, e.to_string()),
    };
    match file.metadata() {
        Ok(m) if m.len() == size => {}
        Ok(_) => return skip(&mut send, "changed since scan".into()),
        Err(e) => return skip(&mut send, e.to_string()),
    }
    let sig = delta_base.and_then(|(h, s)| sigs.get(&h, s).map(|sig| (h, sig)));
    let base = sig.as_ref().map(|(h, _)| *h);
    // The server's kept start is of use only to an upload against the same base.
    let resume = resume.filter(|(b, p)| *b == base && p.from < size).map(|(_, p)| p);
    let from = resume.as_ref().map_or(0, |p| p.from);
    if send(Item::Start { base, from }).is_err() {
        return Produced::Failed("connection gone".into());
    }
    // Read, never mapped: a user's file can be truncated under us, and a map then kills the
    // process with SIGBUS. The window hashes what it reads, so the check below is of exactly the
    // bytes encoded (and, resumed, of the start read before).
    let (window, mut new_sig) = match resume {
        Some(p) => (delta::FileWindow::resume(file, size, p.from, p.hasher), p.sig),
        None => (delta::FileWindow::new(file, size), sigs.builder_for(&hash, size)),
    };
    let mut data = Skip::new(window, from as usize);
    let emit =
        |b, covered: u64| send(Item::Block(b, covered)).map_err(|_| std::io::Error::other("connection gone"));
    let stats = match sig {
        Some((_, sig)) => delta::encode_delta_from(&sig, &mut data, new_sig.as_mut(), emit),
        None => delta::encode_whole_from(&mut data, new_sig.as_mut(), emit),
    };
    let read = stats.and_then(|s| Ok((s, data.into_inner().finish()?)));
    let (stats, read_hash) = match read {
        Ok(x) => x,
        // Shorter than the scan saw: what was sent ends early, the server refuses it, and the
        // next round sends the file as it is then.
        Err(delta::DeltaError::ChangedWhileRead { .. }) => return Produced::Changed,
        Err(e) => return Produced::Failed(e.to_string()),
    };
    if read_hash != hash {
        return Produced::Changed;
    }
    if let Some(s) = new_sig {
        let _ = sigs.put(&hash, size, &s.finish());
    }
    Produced::Done(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the encoder to its end, draining its blocks as the sender would.
    fn run_produce(full: &Path, hash: ContentHash, size: u64, sigs: &SigCache) -> (Produced, usize) {
        let (p, items) = run_produce_from(full, hash, size, None, sigs);
        (p, items.iter().filter(|i| matches!(i, Item::Block(..))).count())
    }

    /// [`run_produce`] of an upload that may continue a cut-off one; every item sent.
    fn run_produce_from(
        full: &Path,
        hash: ContentHash,
        size: u64,
        resume: Option<(Option<ContentHash>, Prefix)>,
        sigs: &SigCache,
    ) -> (Produced, Vec<Item>) {
        let (tx, mut rx) = mpsc::channel(4);
        std::thread::scope(|s| {
            let h = s.spawn(|| {
                produce(full, hash, size, None, resume, sigs, move |i| tx.blocking_send(i).map_err(|_| ()))
            });
            let mut items = Vec::new();
            while let Some(item) = rx.blocking_recv() {
                items.push(item);
            }
            (h.join().expect("producer thread"), items)
        })
    }

    #[test]
    fn a_continued_upload_sends_the_rest_and_checks_the_whole() {
        let d = tempfile::tempdir().unwrap();
        let sigs = SigCache::new(d.path().join("sigs")).unwrap();
        let full = d.path().join("f");
        let data: Vec<u8> =
            (0..(9u32 << 20) + 12_345).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        std::fs::write(&full, &data).unwrap();
        let (hash, size) = (ContentHash::of(&data), data.len() as u64);
        let from = (5 << 20) + 777;
        let prefix = |sigs: &SigCache| {
            let f = std::fs::File::open(&full).unwrap();
            read_prefix(&f, &hash, size, from, sigs).unwrap()
        };

        let (r, items) = run_produce_from(&full, hash, size, Some((None, prefix(&sigs))), &sigs);
        assert!(matches!(r, Produced::Done(s) if s.literal == size - from), "only the rest is encoded");
        assert!(matches!(items[0], Item::Start { base: None, from: f } if f == from));
        let mut ap = Applier::new(&[], Vec::new(), size - from);
        for i in &items[1..] {
            let Item::Block(b, _) = i else { panic!("not a block") };
            ap.block(b).unwrap();
        }
        assert!(ap.finish().unwrap().out == data[from as usize..]);
        let cached = sigs.get(&hash, size).expect("the signature of the whole file");
        assert_eq!(cached.serialized(), delta::signature::compute(&data).serialized());

        // The start read before the upload is not the file's: the whole no longer checks.
        let other = d.path().join("g");
        let mut changed = data.clone();
        changed[1000] ^= 1;
        std::fs::write(&other, &changed).unwrap();
        let f = std::fs::File::open(&other).unwrap();
        let wrong = read_prefix(&f, &hash, size, from, &sigs).unwrap();
        let (r, _) = run_produce_from(&full, hash, size, Some((None, wrong)), &sigs);
        assert!(matches!(r, Produced::Changed));

        // Kept against another base than this upload's: sent whole.
        let (r, items) = run_produce_from(&full, hash, size, Some((Some(hash), prefix(&sigs))), &sigs);
        assert!(matches!(r, Produced::Done(s) if s.literal == size));
        assert!(matches!(items[0], Item::Start { from: 0, .. }));
    }

    #[test]
    fn an_upload_that_no_longer_matches_the_scan_is_flagged_and_not_cached() {
        let d = tempfile::tempdir().unwrap();
        let sigs = SigCache::new(d.path().join("sigs")).unwrap();
        let full = d.path().join("f");
        let data = vec![7u8; 100_000];
        std::fs::write(&full, &data).unwrap();
        let planned = ContentHash::of(b"what the scan saw");
        let (r, blocks) = run_produce(&full, planned, data.len() as u64, &sigs);
        assert!(matches!(r, Produced::Changed));
        assert!(blocks > 0, "the content was still sent; the server's check refuses it");
        assert!(!sigs.contains(&planned, data.len() as u64), "a signature under the wrong hash");

        let real = ContentHash::of(&data);
        let (r, _) = run_produce(&full, real, data.len() as u64, &sigs);
        assert!(matches!(r, Produced::Done(s) if s.literal == data.len() as u64));
        let cached = sigs.get(&real, data.len() as u64).expect("signature cached in the same pass");
        assert_eq!(cached.serialized(), delta::signature::compute(&data).serialized());

        // Another size than planned: skipped before anything is sent.
        let (r, blocks) = run_produce(&full, real, 5, &sigs);
        assert!(matches!(r, Produced::Failed(_)));
        assert_eq!(blocks, 0);
    }
}
