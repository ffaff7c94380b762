//! Downloads: a file's blocks applied into a temp file (or the content's partial file) and
//! verified, on the blocking pool or, for a small file sent whole, in the connection's task; then
//! made durable with the others of their batch and renamed into place.

use super::*;

/// `.deltasync/partial/<hash>-<size>`: the partial download of that content.
pub(super) fn partial_path(root: &Path, hash: &ContentHash, size: u64) -> PathBuf {
    partial_dir(root).join(format!("{}-{size}", hash.to_hex()))
}

/// Whether `a` and `b` (or, for a path that does not exist yet, its nearest existing ancestor)
/// are on one file system, so a file renames from one to the other.
pub(super) fn same_fs(a: &Path, b: &Path) -> bool {
    let dev = |p: &Path| p.ancestors().find_map(|d| std::fs::metadata(d).ok()).map(|m| m.dev());
    matches!((dev(a), dev(b)), (Some(x), Some(y)) if x == y)
}

/// Where the temp files of a round's writes go (see [`Landings::dir`]), remembered by parent
/// directory: finding out made the temp folder and compared devices (a `mkdir` and three
/// `statx`) for every file of a pull.
#[derive(Default)]
pub(super) struct Landings {
    /// Whether a parent directory's temp files go into `.deltasync/tmp/` (else beside it).
    memo: Mutex<HashMap<PathBuf, bool>>,
    /// The slot of `.deltasync/tmp/` new temp files go to (see [`TEMP_SLOTS`]).
    slot: std::sync::atomic::AtomicUsize,
}

impl Landings {
    /// Where the temp file of a write to `full` goes: `.deltasync/tmp/`, in the current slot, so
    /// a run cut off there leaves nothing in the user's folder, unless `full` is on another file
    /// system (a mount inside the folder): then beside it, where the rename into place works.
    pub(super) fn dir(&self, root: &Path, full: &Path) -> PathBuf {
        let parent = full.parent().unwrap_or(root);
        let slot = || temp_slot(root, self.slot.load(std::sync::atomic::Ordering::Relaxed));
        let mut memo = self.memo.lock().unwrap_or_else(|e| e.into_inner());
        match memo.get(parent) {
            Some(true) => return slot(),
            Some(false) => return parent.to_path_buf(),
            None => {}
        }
        let tmp = temp_dir(root);
        let in_tmp = (0..TEMP_SLOTS).all(|i| std::fs::create_dir_all(temp_slot(root, i)).is_ok())
            && same_fs(&tmp, parent);
        memo.insert(parent.to_path_buf(), in_tmp);
        if in_tmp { slot() } else { parent.to_path_buf() }
    }

    /// [`dir`](Self::dir) for a download to `path`, making its parent folders (refusing to pass
    /// through a symlink) the first time the round writes into that folder, not for every file:
    /// [`place`] checks them again, once per batch, just before its renames.
    pub(super) fn prepare(&self, root: &Path, path: &RelPath) -> std::io::Result<PathBuf> {
        let full = path.under(root);
        let parent = full.parent().unwrap_or(root);
        if !self.memo.lock().unwrap_or_else(|e| e.into_inner()).contains_key(parent) {
            fsutil::ensure_dirs(root, path)?;
        }
        Ok(self.dir(root, &full))
    }

    /// New temp files go to the next slot from now on: called when a batch of downloads starts
    /// being renamed out of the current one.
    pub(super) fn next_slot(&self) {
        self.slot.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Reads and hashes the first `from` bytes of `file` (which must have at least that many),
/// feeding them to a builder of the signature of the version (`hash`, `size`) unless that
/// signature is cached.
pub(super) fn read_prefix(
    file: &std::fs::File,
    hash: &ContentHash,
    size: u64,
    from: u64,
    sigs: &SigCache,
) -> std::io::Result<Prefix> {
    let mut hasher = Hasher::new();
    let mut sig = sigs.builder_for(hash, size);
    let mut buf = vec![0u8; (from as usize).min(1 << 20)];
    let mut at = 0u64;
    while at < from {
        let n = (from - at).min(buf.len() as u64) as usize;
        file.read_exact_at(&mut buf[..n], at)?;
        hasher.update(&buf[..n]);
        if let Some(b) = sig.as_mut() {
            b.update(&buf[..n]);
        }
        at += n as u64;
    }
    Ok(Prefix { from, hasher, sig })
}

/// A prefix to read before the pipeline: of job `job`'s local file (an upload the server kept
/// the start of, against `base`) or of its partial download.
pub(super) struct PrefixRead {
    pub(super) job: usize,
    pub(super) file: PathBuf,
    pub(super) hash: ContentHash,
    pub(super) size: u64,
    pub(super) from: u64,
    pub(super) upload: Option<Option<ContentHash>>,
}

impl Exec {
    /// Receives a file's blocks into a temp file (or its partial file), verifies, and queues it
    /// to be moved into place.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn download(
        &mut self,
        rd: &mut FrameReader,
        notified: &AtomicU64,
        counters: &Counters,
        id: u64,
        want: Entry,
        got: Entry,
        base: Option<ContentHash>,
        have: Option<(ContentHash, u64)>,
        land: Landing,
        resumes: &mut Resumes,
    ) -> Result<Option<Job>, SyncError> {
        let path = got.path.clone();
        let Some(Node::File { hash, size, meta }) = got.node.clone() else {
            return Err(ClientError::Unexpected("file reply without a file".into()).into());
        };
        if self.no_more_gets.load(Ordering::Relaxed) {
            // This computer's disk is full: asked for before that was known, read past unwritten.
            loop {
                match recv_reply(rd, notified, counters).await? {
                    ServerMsg::Data { id: i, .. } if i == id => {}
                    ServerMsg::End { id: i } if i == id => break,
                    other => {
                        return Err(ClientError::Unexpected(format!(
                            "{} inside the download of `{path}`",
                            crate::client::describe(&other)
                        ))
                        .into());
                    }
                }
            }
            self.local_disk_full(&path, "not written once the disk was full");
            return Ok(None);
        }
        self.progress.file_started(path.as_str(), size);
        // A partial file holds one content: a fresh one only for the content planned (the server
        // may have sent a newer one), and only for a whole download.
        let dest = match land {
            Landing::Partial { from }
                if have.is_none()
                    && base.is_none()
                    && (from > 0 || want.node.as_ref().and_then(file_id) == Some((hash, size))) =>
            {
                if from > 0 {
                    self.progress.advance(path.as_str(), from);
                }
                Dest::Partial { from, prefix: resumes.down.remove(&(hash, size)).map(Box::new) }
            }
            // Nothing here as the round saw it: an unnamed file, linked into place.
            _ if !self.local.contains_key(&path) => Dest::Fresh,
            _ => Dest::Temp,
        };
        let resumed = matches!(dest, Dest::Partial { from, .. } if from > 0);
        let (tx, mut rx) = mpsc::channel::<Block>(4);
        let use_base = base.is_some() && have.map(|h| Some(h.0) == base).unwrap_or(false);
        let local_base = have.filter(|_| use_base);
        // A small file sent whole is held here and written in this task at its end: no thread
        // hand-off per file (a pull of many small files spent more on those than on writing).
        let inline = size <= INLINE_FILE && local_base.is_none() && matches!(dest, Dest::Temp | Dest::Fresh);
        let fresh = matches!(dest, Dest::Fresh);
        let mut held: Vec<Block> = Vec::new();
        let mut held_bytes = 0u64;
        let worker = if inline {
            None
        } else {
            let (root, sigs, landings, p) =
                (self.root.clone(), self.sigs.clone(), self.landings.clone(), path.clone());
            Some(tokio::task::spawn_blocking(move || {
                receive_file(
                    &root,
                    &p,
                    local_base,
                    move || rx.blocking_recv(),
                    (hash, size, meta),
                    &sigs,
                    dest,
                    &landings,
                )
            }))
        };
        let mut bad_base = base.is_some() && !use_base;
        let received = loop {
            let m = match recv_reply(rd, notified, counters).await {
                Ok(m) => m,
                Err(e) => break Err(e),
            };
            match m {
                ServerMsg::Data { id: i, block } if i == id => {
                    self.progress.advance(path.as_str(), block.bytes.len() as u64);
                    if worker.is_none() {
                        // Bounded: a whole file's blocks cannot be much larger than the file.
                        held_bytes += block.bytes.len() as u64;
                        if held_bytes > 2 * size + (64 << 10) {
                            break Err(ClientError::Unexpected(format!(
                                "the server sent more than {held_bytes} bytes for `{path}` of {size} bytes; stopping (a broken or malicious server?)"
                            )));
                        }
                        held.push(block);
                    } else if tx.send(block).await.is_err() {
                        bad_base = true; // the worker gave up; keep draining
                    }
                }
                ServerMsg::End { id: i } if i == id => break Ok(()),
                other => {
                    break Err(ClientError::Unexpected(format!(
                        "{} inside the download of `{path}`",
                        crate::client::describe(&other)
                    )));
                }
            }
        };
        drop(tx);
        // Waited for even when the connection failed: a cut-off partial download is then
        // written out to where it stopped, for the next run to continue.
        let outcome = match worker {
            Some(w) => w.await.map_err(|e| SyncError::Other(e.to_string()))?,
            None => {
                let mut blocks = held.into_iter();
                receive_file(
                    &self.root,
                    &path,
                    None,
                    move || blocks.next(),
                    (hash, size, meta),
                    &self.sigs,
                    if fresh { Dest::Fresh } else { Dest::Temp },
                    &self.landings,
                )
            }
        };
        if let Err(e) = received {
            // Complete and verified all the same (the connection failed after its last block):
            // it goes into place with the others.
            if let Ok(file) = outcome
                && !bad_base
            {
                self.ready.push(Ready { got, file });
            }
            return Err(e.into());
        }
        let file = match outcome {
            Ok(x) if !bad_base => x,
            Err(Received::Failed(e)) if fsutil::says_disk_full(&e) => {
                self.local_disk_full(&path, &e);
                return Ok(None);
            }
            Err(Received::CutOff { got: n }) => {
                self.report.errors.push(format!(
                    "{path}: the server sent {n} of its {size} bytes; the next run continues the download"
                ));
                return Ok(None);
            }
            Err(e) if resumed => {
                // The kept part (removed by now) and the rest do not make the file.
                self.report.notes.push(format!(
                    "{path}: the continued download did not verify ({}); downloading it whole",
                    e.message()
                ));
                return Ok(Some(Job::Get { entry: want, have: None, land: Landing::Partial { from: 0 } }));
            }
            _ => {
                // Wrong base or failed verification: fetch it whole.
                return Ok(if have.is_some() {
                    Some(Job::Get { entry: want, have: None, land: Landing::Temp })
                } else {
                    self.report.errors.push(format!("{path}: download did not verify"));
                    None
                });
            }
        };
        self.ready_bytes += size;
        self.ready.push(Ready { got, file });
        if self.ready.len() >= READY_FILES || self.ready_bytes >= READY_BYTES {
            self.flush_ready().await;
        }
        Ok(None)
    }

    /// Makes received files durable together and moves them into place, in the background: the
    /// temp files made durable at once ([`fsutil::make_durable`]), the renames (or links), then
    /// their directories the same way (two rounds for many small files instead of three fsyncs
    /// each), on blocking threads while the connection goes on receiving the next ones. The
    /// durable step starts at once, while the previous batch may still be being put in place
    /// (a `syncfs` mostly waits on the disk; a pull of 100,000 small files spent a third of each
    /// batch's placing in it); the renames wait for that batch to be recorded
    /// ([`finish_flush`](Self::finish_flush)), so at most one batch is being put in place.
    pub(super) async fn flush_ready(&mut self) {
        let ready = std::mem::take(&mut self.ready);
        self.ready_bytes = 0;
        if ready.is_empty() {
            self.finish_flush().await;
            return;
        }
        let paths: Vec<RelPath> = ready.iter().map(|r| r.got.path.clone()).collect();
        let durable = tokio::task::spawn_blocking(move || {
            let synced = make_durable(&ready);
            (ready, synced)
        });
        // The next batch is written into the next slot: the renames out of this one and the
        // creates of the next do not wait on each other's lock of one directory.
        self.landings.next_slot();
        self.finish_flush().await;
        let mut plan = Vec::with_capacity(paths.len());
        for path in &paths {
            // A directory the server replaced by this file goes first (here: it may hold deletes
            // of this round); one with new files in it stays, and so does the download's temp.
            if !self.make_way(path) {
                plan.push(None);
                continue;
            }
            // Do not overwrite a local change made while we were downloading: what is there must
            // be what the round saw, checked just before the rename.
            let expect = self.local.contains_key(path).then(|| self.expect(path));
            plan.push(Some((self.full(path), expect)));
        }
        let root = self.root.clone();
        self.flushing = Some(tokio::spawn(async move {
            let (ready, synced) = durable.await.map_err(|e| e.to_string())?;
            tokio::task::spawn_blocking(move || place(ready, synced, plan, &root))
                .await
                .map_err(|e| e.to_string())
        }));
    }

    /// Waits for the batch [`flush_ready`](Self::flush_ready) is placing and records its files.
    pub(super) async fn finish_flush(&mut self) {
        let Some(flushing) = self.flushing.take() else { return };
        let placed = match flushing.await.map_err(|e| e.to_string()).and_then(|r| r) {
            Ok(placed) => placed,
            Err(e) => {
                self.report.errors.push(format!("putting downloads in place stopped: {e}"));
                return;
            }
        };
        for Placement { got, stats, stat, copied, placed } in placed {
            let path = &got.path;
            match placed {
                Placed::Done => {
                    self.report.delta.add(stats);
                    if copied {
                        self.report.files_copied_locally += 1;
                    } else {
                        self.report.files_received += 1;
                    }
                    self.after_write(path, got.node.clone().expect("a download is a file"), Some(stat));
                    self.record(&got);
                    self.progress.file_done(path.as_str(), if copied { "copied" } else { "downloaded" });
                }
                Placed::NotDurable(e) if fsutil::says_disk_full(&e) => self.local_disk_full(path, &e),
                Placed::NotDurable(_) => {
                    self.report.errors.push(format!("{path}: could not make the download durable"))
                }
                Placed::Changed => self.changed_meanwhile(path),
                Placed::Failed(e) => self
                    .report
                    .error(path.as_str(), format!("cannot put the download in place on this computer: {e}")),
            }
        }
    }
}

/// What became of one download of a batch put in place.
pub(super) enum Placed {
    Done,
    NotDurable(String),
    /// Something else is there now than the round saw: left alone, the download dropped.
    Changed,
    Failed(String),
}

/// A file of a batch as [`place`] leaves it.
pub(super) struct Placement {
    got: Entry,
    stats: DeltaStats,
    stat: Stat,
    /// Copied from a local file with its content ([`Written::copied`]).
    copied: bool,
    placed: Placed,
}

/// A batch's files as [`place`] leaves them.
pub(super) type Placements = Vec<Placement>;

/// The files of a batch made durable together: one result per file.
fn make_durable(ready: &[Ready]) -> Vec<std::io::Result<()>> {
    let items: Vec<fsutil::Durable<'_>> = ready
        .iter()
        .map(|r| match &r.file.tmp {
            Landed::Named(t) => fsutil::Durable::Path(t.path()),
            Landed::Unnamed(u) => fsutil::Durable::File(u.file()),
        })
        .collect();
    fsutil::make_durable_on(&items, |i| Ok(ready[i].file.dev))
}

/// [`Exec::flush_ready`]'s last blocking part: the batch `ready`, made durable (`synced`), put
/// in place as `plan` says (per file: where, and what must be there now; `None`: dropped). Where
/// the round saw nothing (`expect` none), the rename itself refuses to replace what appeared
/// meanwhile; elsewhere what is there must still be what the round saw.
fn place(
    ready: Vec<Ready>,
    synced: Vec<std::io::Result<()>>,
    plan: Vec<Option<(PathBuf, Option<Expect>)>>,
    root: &Path,
) -> Placements {
    // Each folder renamed into is checked (and made if it went meanwhile) once per batch, just
    // before: no symlink on the way, which could lead outside the synced folder.
    let mut parents: HashMap<PathBuf, Result<(), String>> = HashMap::new();
    let mut dirs = std::collections::BTreeSet::new();
    let mut out = Vec::with_capacity(ready.len());
    let synced = synced.into_iter().map(Some).chain(std::iter::repeat_with(|| None));
    for ((r, sync), plan) in ready.into_iter().zip(synced).zip(plan) {
        let Some((full, expect)) = plan else { continue };
        let Ready { got, file: Written { tmp, stats, stat, copied, .. } } = r;
        let parent = full.parent().unwrap_or(root).to_path_buf();
        let parent_ok = parents
            .entry(parent)
            .or_insert_with(|| fsutil::ensure_dirs(root, &got.path).map_err(|e| e.to_string()));
        let placed = match (parent_ok, sync, expect) {
            (Err(e), ..) => Placed::Failed(e.clone()),
            (Ok(()), Some(Err(e)), _) => Placed::NotDurable(e.to_string()),
            (Ok(()), None, _) => Placed::NotDurable(String::new()),
            (Ok(()), Some(Ok(())), expect) => {
                let moved = match (&tmp, expect) {
                    (Landed::Named(t), None) => fsutil::rename_noreplace(t.path(), &full),
                    (Landed::Unnamed(u), None) => u.link(&full),
                    (Landed::Named(t), Some(e)) if e.holds(&full) => {
                        std::fs::rename(t.path(), &full).map(|()| true)
                    }
                    (Landed::Unnamed(u), Some(e)) if e.holds(&full) => replace_with(u, &full),
                    (_, Some(_)) => Ok(false),
                };
                match moved {
                    Ok(true) => {
                        if let Landed::Named(t) = tmp {
                            t.keep();
                        }
                        dirs.insert(full.parent().unwrap_or(root).to_path_buf());
                        Placed::Done
                    }
                    Ok(false) => Placed::Changed,
                    Err(e) => Placed::Failed(e.to_string()),
                }
            }
        };
        out.push(Placement { got, stats, stat, copied, placed });
    }
    let dirs: Vec<PathBuf> = dirs.into_iter().collect();
    let _ = fsutil::make_durable(&dirs);
    out
}

/// Replaces the file at `full` by the unnamed file `u`: linked under a temp name beside it, then
/// renamed over it.
fn replace_with(u: &fsutil::Unnamed, full: &Path) -> std::io::Result<bool> {
    let t = TempGuard::new(fsutil::temp_path(full.parent().unwrap_or(Path::new("."))));
    if !u.link(t.path())? {
        return Err(std::io::Error::other(format!("{} exists already", t.path().display())));
    }
    std::fs::rename(t.path(), full)?;
    t.keep();
    Ok(true)
}

/// Downloads received in full (and local copies), waiting to be made durable together.
pub struct Ready {
    pub(super) got: Entry,
    pub(super) file: Written,
}

/// Received files made durable together at most: each batch costs two `syncfs` (a journal
/// commit each); 256 -> 2,048 took a pull of 100,000 x 4 KiB from 9.1 to 8.1 s.
pub(super) const READY_FILES: usize = 2048;
pub(super) const READY_BYTES: u64 = 256 << 20;

/// Where [`receive_file`] writes.
pub(super) enum Dest {
    /// A fresh temp file ([`Landings::dir`]).
    Temp,
    /// A path where the round saw nothing: an unnamed file ([`fsutil::Unnamed`]) in the temp
    /// folder, where the file system makes one, else as [`Dest::Temp`].
    Fresh,
    /// The content's partial file, from byte `from` on: the bytes before are there already and
    /// `prefix` has them read and hashed (`None` when `from` is 0).
    Partial { from: u64, prefix: Option<Box<Prefix>> },
}

/// Why [`receive_file`] has no file.
#[derive(Debug)]
pub(super) enum Received {
    /// The blocks ended before the file did; the partial file keeps what came.
    CutOff {
        got: u64,
    },
    Failed(String),
}

impl Received {
    pub(super) fn message(&self) -> String {
        match self {
            Received::CutOff { got } => format!("cut off after {got} bytes"),
            Received::Failed(e) => e.clone(),
        }
    }
}

impl<E: std::fmt::Display> From<E> for Received {
    fn from(e: E) -> Self {
        Received::Failed(e.to_string())
    }
}

/// The content hash and size of a file node.
pub(super) fn file_id(n: &Node) -> Option<(ContentHash, u64)> {
    match n {
        Node::File { hash, size, .. } => Some((*hash, *size)),
        _ => None,
    }
}

/// Applies a download's blocks into a temp file or the content's partial file (`dest`) and
/// verifies it; `base` is the local version (hash and size) the blocks are a delta against, if
/// any. The verified file is returned as a temp file in [`Landings::dir`]. A partial file is kept
/// if the blocks end early (the transfer was cut off) and removed on any other failure.
#[allow(clippy::too_many_arguments)]
pub(super) fn receive_file(
    root: &Path,
    path: &RelPath,
    base: Option<(ContentHash, u64)>,
    mut next: impl FnMut() -> Option<Block>,
    (hash, size, meta): (ContentHash, u64, Meta),
    sigs: &SigCache,
    dest: Dest,
    landings: &Landings,
) -> Result<Written, Received> {
    let full = path.under(root);
    let landing = landings.prepare(root, path)?;
    let base_sig = base.and_then(|(h, len)| sigs.get(&h, len));
    // Read by pread, never mapped (see `produce`): if the base is cut short while the copies are
    // read, the delta fails and the file is fetched whole.
    let base = match base {
        Some(_) => Some(FileBase::new(fsutil::open_to_read(&full)?)?),
        None => None,
    };
    let partial = matches!(dest, Dest::Partial { .. });
    // Whether the file has its permission bits from its creation (no `fchmod` needed).
    let mut mode_set = false;
    let unnamed = match dest {
        Dest::Fresh => fsutil::Unnamed::create(&landing, meta.mode)?,
        _ => None,
    };
    let (out, prefix) = match (dest, unnamed) {
        (_, Some((u, with_mode))) => {
            mode_set = with_mode;
            (Out::Unnamed(u), None)
        }
        (Dest::Temp | Dest::Fresh, None) => {
            let (file, t, with_mode) = fsutil::create_temp_with_mode(&landing, meta.mode)?;
            mode_set = with_mode;
            (Out::Named(file, TempGuard::new(t)), None)
        }
        (Dest::Partial { from, prefix }, None) => {
            let at = partial_path(root, &hash, size);
            std::fs::create_dir_all(partial_dir(root))?;
            // Removed on failure from here on, kept only when cut off.
            let guard = TempGuard::new(at.clone());
            let mut open = std::fs::OpenOptions::new();
            open.write(true).custom_flags(libc::O_NOFOLLOW);
            match prefix {
                None if from == 0 => (Out::Named(open.create(true).truncate(true).open(&at)?, guard), None),
                Some(p) if p.from == from => {
                    let mut f = open.open(&at)?;
                    if f.metadata()?.len() < from {
                        return Err(Received::Failed(format!(
                            "the partial download {} got shorter",
                            at.display()
                        )));
                    }
                    // What a killed run wrote after the resume point goes.
                    f.set_len(from)?;
                    f.seek(std::io::SeekFrom::Start(from))?;
                    (Out::Named(f, guard), Some(p))
                }
                _ => return Err(Received::Failed("the start of the partial download was not read".into())),
            }
        }
    };
    // Writes of at most 1 MiB; a small file's buffer is its size (not 1 MiB per file of a pull).
    let cap = usize::try_from(size).unwrap_or(usize::MAX).clamp(8 << 10, 1 << 20);
    let writer = BufWriter::with_capacity(cap, fsutil::WriteBehind::new(out.file()));
    let (new_sig, start) = match prefix {
        Some(p) => (p.sig, Some((p.hasher, p.from))),
        None => (sigs.builder_for(&hash, size), None),
    };
    let mut ap = Applier::from_base(base, writer, size).with_signature(new_sig, base_sig);
    if let Some((hasher, from)) = start {
        ap = ap.resume_after(hasher, from)?;
    }
    while let Some(b) = next() {
        ap.block(&b)?;
    }
    let crate::delta::Applied { hash: got, len, stats, sig, out: writer } = ap.finish()?;
    // Written out (the file is borrowed until then); a failure to is an error below, unless the
    // download was cut off anyway.
    let flushed = writer.into_inner().map(drop).map_err(|e| e.error().to_string());
    if partial && len < size {
        // Cut off: what came stays for the next run.
        if let Out::Named(_, guard) = out {
            guard.keep();
        }
        return Err(Received::CutOff { got: len });
    }
    if got != hash || len != size {
        return Err(Received::Failed("content hash mismatch".into()));
    }
    flushed?;
    // fsynced later, together with the other files of the batch (`flush_ready`).
    let file = out.file();
    if mode_set {
        fsutil::set_file_mtime(file, meta.mtime_ns)?;
    } else {
        fsutil::set_file_meta(file, meta.mode, meta.mtime_ns)?;
    }
    // What the file is once renamed or linked into place (neither changes any of it), by
    // `fstat`: no second look-up of the path after.
    let md = file.metadata()?;
    if let Some(sig) = sig {
        let _ = sigs.put(&hash, size, &sig);
    }
    let tmp = match out {
        Out::Unnamed(u) => Landed::Unnamed(u),
        Out::Named(file, guard) if partial => {
            drop(file);
            // Complete: the partial file becomes an ordinary temp file, so the content's name is
            // free for the next download of it.
            let t = fsutil::temp_path(&landing);
            std::fs::rename(guard.path(), &t)?;
            guard.keep();
            Landed::Named(TempGuard::new(t))
        }
        Out::Named(_, guard) => Landed::Named(guard),
    };
    Ok(Written { tmp, stats, stat: Stat::of(&md), dev: md.dev(), copied: false })
}

/// What [`receive_file`] writes into: a named file (a temp file or a partial download), removed
/// unless kept, or an unnamed one.
enum Out {
    Named(std::fs::File, TempGuard),
    Unnamed(fsutil::Unnamed),
}

impl Out {
    fn file(&self) -> &std::fs::File {
        match self {
            Out::Named(f, _) => f,
            Out::Unnamed(u) => u.file(),
        }
    }
}

/// A verified file waiting to be put in place: a named temp file, or an unnamed one
/// ([`fsutil::Unnamed`], linked into place).
pub(super) enum Landed {
    Named(TempGuard),
    Unnamed(fsutil::Unnamed),
}

/// A verified download (or local copy) in its temp file.
pub(super) struct Written {
    tmp: Landed,
    stats: DeltaStats,
    /// The temp file's, by `fstat` (the same after the rename into place).
    pub(super) stat: Stat,
    dev: u64,
    /// Made by copying a local file with the content, not by a download.
    copied: bool,
}

impl Written {
    /// A local copy in its temp file, `md` its `fstat`.
    pub(super) fn copied(tmp: TempGuard, md: &std::fs::Metadata) -> Written {
        Written {
            tmp: Landed::Named(tmp),
            stats: DeltaStats::default(),
            stat: Stat::of(md),
            dev: md.dev(),
            copied: true,
        }
    }
}

/// A download's answer must be the file asked for: the same path (a broken or malicious server
/// must not make the client write anywhere else) and a file.
pub(super) fn check_file_reply(want: &Entry, got: &Entry) -> Result<(), ClientError> {
    if got.path != want.path {
        return Err(ClientError::Unexpected(format!(
            "asked for `{}`, the server sent `{}` instead; refusing it and stopping (a broken or malicious server?)",
            want.path, got.path
        )));
    }
    if !matches!(got.node, Some(Node::File { .. })) {
        return Err(ClientError::Unexpected(format!(
            "asked for the file `{}`, the server answered with {:?} instead; stopping (a broken or malicious server?)",
            want.path, got.node
        )));
    }
    Ok(())
}
