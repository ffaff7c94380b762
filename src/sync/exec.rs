//! Carries out a plan: local steps directly, server steps pipelined over one connection.
//!
//! The pipeline runs a writer and a reader side by side: the writer sends every request (and
//! streams each upload's blocks) without waiting; the reader takes the replies, which the server
//! sends in request order, and commits each result. So many small files cost one round trip,
//! not one each. A delta that fails verification is retried whole, once.
//!
//! Big transfers that were cut off continue where they stopped. The server keeps the start of a
//! cut-off upload of [`RESUME_FROM`] bytes or more: before the pipeline the client asks how much
//! (`Resume`, one round trip for all big uploads) and sends only the rest (`PutRest`). A whole
//! download of such a file is written to `.deltasync/partial/<hash>-<size>`, which a cut-off run
//! leaves behind; the next download of that content asks for the rest (`GetRest`) and appends it.
//! Either way the bytes already there are read and hashed before the pipeline starts (while the
//! connection is idle), so the whole file is verified in the end. Downloads are written in
//! `.deltasync/tmp/` and renamed into place (to a path where nothing was: written as an unnamed
//! file there and linked into place): a run cut off at any point leaves nothing in the user's
//! folder.
//!
//! Here: the jobs, the pipeline and the replies. `upload` is the writer side (requests and
//! encoding), `download` receiving, verifying and placing files, `local` the steps taken on
//! this computer and the checks that a path is still as scanned.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufWriter, Seek};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use super::SyncError;
use super::index::{Batch, Stat, Synced};
use super::plan::Action;
use super::report::Report;
use super::scan::{StatCache, TEMP_SLOTS, partial_dir, temp_dir, temp_slot};
use crate::client::{Client, ClientError, recv_reply, while_moving};
use crate::delta::signature::Builder;
use crate::delta::source::Skip;
use crate::delta::{self, Applier, Block, DeltaStats, FileBase, SigCache};
use crate::fsutil::{self, TempGuard};
use crate::hash::{ContentHash, Hasher};
use crate::path::RelPath;
use crate::progress::Progress;
use crate::protocol::*;

mod download;
mod local;
mod upload;

use download::*;
use local::Expect;
use upload::*;

/// One server step.
#[derive(Debug, Clone)]
enum Job {
    Up(Action),
    Get { entry: Entry, have: Option<(ContentHash, u64)>, land: Landing },
}

/// Files of at least this size are transferred after every smaller job of their round (smallest
/// first), so a big file never holds up the small ones (the pull of 20,000 small files seen
/// waiting behind a 1 GiB one), and `watch` hands them to its lane for big files.
pub const BIG_FILE: u64 = 4 << 20;

/// Files of at most this size sent whole are read and encoded (uploads, `Sender::put`) or
/// written (downloads, `download`) in the connection's task, without a blocking-pool hand-off
/// each, as the server reads files up to this size in its session's task.
const INLINE_FILE: u64 = 64 << 10;

/// The size of a job that carries a big file's content, if it does.
fn big_size(j: &Job) -> Option<u64> {
    let size = match j {
        Job::Up(Action::Put { size, .. }) => *size,
        Job::Get { entry: Entry { node: Some(Node::File { size, .. }), .. }, .. } => *size,
        _ => return None,
    };
    (size >= BIG_FILE).then_some(size)
}

/// Moves the jobs of big files to the end, smallest first; the other jobs keep their order. Safe
/// for the plan's order: nothing in a round depends on a file's content arriving first (a
/// `Copy` copies content the server held before the round; a `Fetch` goes into directories
/// made before the transfers start).
fn put_big_files_last(jobs: &mut [Job]) {
    // A stable sort: small jobs (key 0) in their order, then big ones by size.
    jobs.sort_by_key(|j| big_size(j).unwrap_or(0));
}

/// The downloads asked for and not yet answered, by what they bring: each request weighs its
/// file's size in KiB plus 8, in a window of 32 MiB. What is still coming when a round stops
/// asking (this computer's disk is full) stays within it, but for the two big files at most that
/// may be on their way, and so does the work a server queues up for one client. 8 per request
/// lets 2,730 files of 4 KiB be in flight, far more than a round trip on any link needs; a file
/// weighs half the window at most, so the next big file is asked for while one is still coming.
const GET_WINDOW: u32 = 32 << 10;

/// A download request's weight in [`GET_WINDOW`].
fn get_weight(j: &Job) -> u32 {
    let size = match j {
        Job::Get { entry: Entry { node: Some(Node::File { size, .. }), .. }, .. } => *size,
        _ => 0,
    };
    u32::try_from(8 + size / 1024).unwrap_or(GET_WINDOW).min(GET_WINDOW / 2)
}

/// Files of at least this size continue where a cut-off transfer of them stopped (the server
/// keeps the start of cut-off uploads from this size on).
pub const RESUME_FROM: u64 = 8 << 20;

/// A partial download continues from a multiple of this many bytes (what a killed run wrote
/// last may be a torn write; the hash of the whole catches anything else).
const PARTIAL_STEP: u64 = 1 << 20;

/// Where a download is written before it is moved into place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Landing {
    /// A fresh temp file in `.deltasync/tmp/` (beside the target when that is on another file
    /// system than `.deltasync/`), removed if the download fails.
    Temp,
    /// `.deltasync/partial/<hash>-<size>`, left there if the download is cut off; continued from
    /// byte `from` (0: from the start).
    Partial { from: u64 },
}

/// The first `from` bytes of a transfer that continues a cut-off one, read and hashed (and fed
/// to the new version's signature) before the transfer starts.
struct Prefix {
    from: u64,
    hasher: Hasher,
    sig: Option<Builder>,
}

/// What the transfers of one round continue from.
#[derive(Default)]
struct Resumes {
    /// Uploads whose start the server kept, by path: the base that upload was a delta against,
    /// and that start as read here.
    up: HashMap<RelPath, (Option<ContentHash>, Prefix)>,
    /// Downloads that continue a partial file, by content.
    down: HashMap<(ContentHash, u64), Prefix>,
}

pub struct Exec {
    root: PathBuf,
    sigs: SigCache,
    progress: Arc<Progress>,
    device: String,
    upload: bool,
    /// Local nodes as the round goes (updated by each step).
    pub local: BTreeMap<RelPath, Node>,
    pub cache: StatCache,
    pub batch: Batch,
    pub report: Report,
    /// Journal sequences of the commits this round made, to skip our own changes next time.
    own_revs: std::collections::BTreeSet<u64>,
    /// Local files the server deleted, by content, that a fetch may rename instead of copy.
    renamed_away: std::collections::HashMap<ContentHash, (RelPath, u64, u64, Meta)>,
    /// The local view's files by content, made when first needed (see
    /// [`local_with_hash`](Self::local_with_hash)).
    by_hash: Option<HashMap<ContentHash, Vec<RelPath>>>,
    renamed_here: std::collections::HashSet<RelPath>,
    /// Local deletes, run after the downloads (or earlier, to empty a directory a file replaces).
    pending_deletes: Vec<Action>,
    ready: Vec<Ready>,
    ready_bytes: u64,
    /// The batch of downloads being put in place (see `flush_ready`).
    flushing: Option<tokio::task::JoinHandle<Result<download::Placements, String>>>,
    landings: Arc<Landings>,
    /// Set when this computer's disk is full: the round asks for no further downloads, and those
    /// already on their way are read past without writing.
    no_more_gets: Arc<AtomicBool>,
}

impl Exec {
    /// An executor for one round (or one transfer of `watch`'s lane) over the local view
    /// `local`, whose files' stats and hashes are `cache`; its report starts as `report`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        root: PathBuf,
        sigs: SigCache,
        progress: Arc<Progress>,
        device: String,
        upload: bool,
        local: BTreeMap<RelPath, Node>,
        cache: StatCache,
        report: Report,
    ) -> Exec {
        Exec {
            root,
            sigs,
            progress,
            device,
            upload,
            local,
            cache,
            batch: Batch::default(),
            report,
            own_revs: Default::default(),
            renamed_away: Default::default(),
            by_hash: None,
            renamed_here: Default::default(),
            pending_deletes: Vec::new(),
            ready: Vec::new(),
            ready_bytes: 0,
            flushing: None,
            landings: Default::default(),
            no_more_gets: Default::default(),
        }
    }

    pub async fn run(&mut self, client: &mut Client, actions: Vec<Action>) -> Result<(), SyncError> {
        let mut jobs = Vec::new();
        let (local_deletes, actions): (Vec<Action>, Vec<Action>) =
            actions.into_iter().partition(|a| matches!(a, Action::DeleteLocal { .. }));
        // A file deleted by the server whose content arrives under another name was renamed there:
        // rename it here too instead of copying it.
        for a in &local_deletes {
            if let Action::DeleteLocal { path, rev, expect: Node::File { hash, size, meta } } = a {
                self.renamed_away.entry(*hash).or_insert((path.clone(), *rev, *size, *meta));
            }
        }
        self.pending_deletes = local_deletes;
        for a in actions {
            match a {
                // One path that cannot be carried out is reported; the others go on.
                Action::Conflict { local, remote } => {
                    if let Err(e) = self.conflict(local, remote, &mut jobs) {
                        self.report.errors.push(e.to_string());
                    }
                }
                Action::Fetch { entry } => {
                    if let Err(e) = self.fetch(entry, &mut jobs) {
                        self.report.errors.push(e.to_string());
                    }
                    // Local copies wait for their batch like downloads.
                    if self.ready.len() >= READY_FILES || self.ready_bytes >= READY_BYTES {
                        self.flush_ready().await;
                    }
                }
                Action::Record { entry } => self.record(&entry),
                Action::Forget { path } => self.batch.forget.push(path),
                a => jobs.push(Job::Up(a)),
            }
        }
        put_big_files_last(&mut jobs);
        self.prefetch_signatures(client, &jobs).await?;
        let mut resumes = self.prepare_resumes(client, &mut jobs).await?;
        let retry = self.pipeline(client, jobs, &mut resumes).await?;
        if !retry.is_empty() {
            // Retries start over: an upload is sent whole, without the server's kept start.
            resumes.up.clear();
            let failed = self.pipeline(client, retry, &mut resumes).await?;
            for j in failed {
                self.report
                    .errors
                    .push(format!("{}: failed twice; will retry on the next run", job_path(&j)));
            }
        }
        // Local copies wait in the last batch when nothing was transferred.
        self.flush_ready().await;
        self.finish_flush().await;
        for a in std::mem::take(&mut self.pending_deletes) {
            if let Action::DeleteLocal { path, rev, expect } = a
                && !self.renamed_here.contains(&path)
            {
                self.delete_local(path, rev, expect);
            }
        }
        Ok(())
    }

    /// The journal position after this round: `since` advanced over every sequence number that is
    /// one of our own commits. A gap may be another device's change, so it stops there.
    pub fn advanced_seq(&self, since: u64) -> u64 {
        let mut s = since;
        while self.own_revs.contains(&(s + 1)) {
            s += 1;
        }
        s
    }

    /// A download that did not fit on this computer's disk: said once per path, in the words
    /// of whose disk it is, and the round's exit code says disk error.
    fn local_disk_full(&mut self, path: &RelPath, e: &str) {
        if self.report.local_disk_full {
            self.report.disk_full_more += 1;
            self.report.failed.push(super::report::PathIssue {
                path: path.to_string(),
                cause: format!("this computer's disk is full ({e})"),
            });
            return;
        }
        self.report.local_disk_full = true;
        self.no_more_gets.store(true, Ordering::Relaxed);
        self.report.errors.push(format!(
            "{path}: this computer's disk is full ({e}); nothing was changed here. Free space on the disk \
             of {} and run again",
            self.root.display()
        ));
    }

    fn record(&mut self, entry: &Entry) {
        self.batch.synced.push((entry.path.clone(), Synced { rev: entry.rev, node: entry.node.clone() }));
        self.batch.remote.push(entry.clone());
    }

    fn full(&self, p: &RelPath) -> PathBuf {
        p.under(&self.root)
    }

    fn io_err(&self, p: &RelPath, err: std::io::Error) -> SyncError {
        SyncError::Io { path: self.full(p), err }
    }

    /// Before the pipeline: a delta upload needs the signature of the base; if this computer's
    /// cache lost it, ask the server (rsync's way).
    async fn prefetch_signatures(&mut self, client: &mut Client, jobs: &[Job]) -> Result<(), SyncError> {
        for j in jobs {
            if let Job::Up(Action::Put { path, delta_base: Some((bh, bs)), .. }) = j {
                if self.sigs.contains(bh, *bs) {
                    continue;
                }
                match client.signature(path).await {
                    Ok((h, _, bytes)) if h == *bh => {
                        if let Ok(sig) = fast_rsync::Signature::deserialize(bytes) {
                            let _ = self.sigs.put(bh, *bs, &sig);
                        }
                    }
                    Ok(_) | Err(ClientError::Refused(_)) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(())
    }

    /// Before the pipeline: which transfers continue a cut-off one. A whole download of a big
    /// file lands in `.deltasync/partial/` and continues from what an earlier run left there
    /// (one download per content: it is the file's name); a big upload asks the server how much
    /// it kept (one round trip for all), and continues if that upload was against the base this
    /// one uses. The bytes already there are read and hashed now, while the connection is idle
    /// (the server waits an hour for a next request, but only a minute inside a transfer).
    async fn prepare_resumes(&mut self, client: &mut Client, jobs: &mut [Job]) -> Result<Resumes, SyncError> {
        let state = super::state_dir(&self.root);
        let mut reads = Vec::new();
        let mut claimed = HashSet::new();
        for (i, j) in jobs.iter_mut().enumerate() {
            if let Job::Get { entry, have: None, land } = j
                && let Some(Node::File { hash, size, .. }) = &entry.node
                && *size >= RESUME_FROM
                && same_fs(&state, &entry.path.under(&self.root))
                && claimed.insert((*hash, *size))
            {
                let file = partial_path(&self.root, hash, *size);
                let kept =
                    std::fs::symlink_metadata(&file).map_or(0, |m| if m.is_file() { m.len() } else { 0 });
                let from = kept.min(*size) / PARTIAL_STEP * PARTIAL_STEP;
                *land = Landing::Partial { from: 0 };
                if from > 0 {
                    reads.push(PrefixRead { job: i, file, hash: *hash, size: *size, from, upload: None });
                }
            }
        }
        let asks: Vec<(usize, RelPath, ContentHash, u64, Option<ContentHash>)> = jobs
            .iter()
            .enumerate()
            .filter_map(|(i, j)| match j {
                Job::Up(Action::Put { path, hash, size, delta_base, .. }) if *size >= RESUME_FROM => {
                    // The base this upload will be a delta against: the one whose signature is here.
                    let base = delta_base.filter(|(h, s)| self.sigs.contains(h, *s)).map(|(h, _)| h);
                    Some((i, path.clone(), *hash, *size, base))
                }
                _ => None,
            })
            .collect();
        if !asks.is_empty() {
            let q: Vec<(RelPath, ContentHash, u64)> = asks.iter().map(|a| (a.1.clone(), a.2, a.3)).collect();
            let points = client.resume_points(&q).await?;
            for ((i, path, hash, size, base), (from, kept_base)) in asks.into_iter().zip(points) {
                if from > 0 && from < size && kept_base == base {
                    let file = path.under(&self.root);
                    reads.push(PrefixRead { job: i, file, hash, size, from, upload: Some(base) });
                }
            }
        }
        if reads.is_empty() {
            return Ok(Resumes::default());
        }
        let sigs = self.sigs.clone();
        let read = tokio::task::spawn_blocking(move || {
            reads
                .into_iter()
                .map(|r| {
                    let prefix = fsutil::open_to_read(&r.file).and_then(|f| {
                        let len = f.metadata()?.len();
                        // An upload's file must still have the size the scan saw.
                        if len < r.from || (r.upload.is_some() && len != r.size) {
                            return Err(std::io::Error::other("changed since the scan"));
                        }
                        read_prefix(&f, &r.hash, r.size, r.from, &sigs)
                    });
                    (r, prefix)
                })
                .collect::<Vec<_>>()
        })
        .await
        .map_err(|e| SyncError::Other(format!("reading the start of a cut-off transfer failed: {e}")))?;
        let mut resumes = Resumes::default();
        for (r, prefix) in read {
            match (r.upload, prefix) {
                (Some(base), Ok(p)) => {
                    if let Job::Up(a) = &jobs[r.job] {
                        resumes.up.insert(a.path().clone(), (base, p));
                    }
                }
                (None, Ok(p)) => {
                    if let Job::Get { land, .. } = &mut jobs[r.job] {
                        *land = Landing::Partial { from: r.from };
                        resumes.down.insert((r.hash, r.size), p);
                    }
                }
                // Unreadable: the upload goes whole; the download starts its partial file again.
                (_, Err(e)) => tracing::debug!("cannot continue from {}: {e}", r.file.display()),
            }
        }
        Ok(resumes)
    }

    /// Sends all jobs without waiting and handles replies as they come; returns jobs to retry.
    async fn pipeline(
        &mut self,
        client: &mut Client,
        jobs: Vec<Job>,
        resumes: &mut Resumes,
    ) -> Result<Vec<Job>, SyncError> {
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<u64> = jobs.iter().map(|_| client.next_id()).collect();
        let (ptx, mut prx) = mpsc::unbounded_channel::<(u64, Job, Outcome, Option<OwnedSemaphorePermit>)>();
        let window = Arc::new(Semaphore::new(GET_WINDOW as usize));
        let no_more_gets = self.no_more_gets.clone();
        let sender = Sender {
            root: self.root.clone(),
            sigs: self.sigs.clone(),
            progress: self.progress.clone(),
            resumed: Mutex::new(std::mem::take(&mut resumes.up)),
        };
        let wr = &mut client.wr;
        let rd = &mut client.rd;
        let notified = client.notified.clone();
        let counters = client.counters.clone();
        let writer = async move {
            let mut stats = DeltaStats::default();
            let mut skipped = Vec::new();
            let mut unasked = Vec::new();
            for (id, job) in ids.into_iter().zip(jobs) {
                // A download waits for room in the window; its answer gives the room back.
                let permit = if let Job::Get { .. } = job {
                    let stopped = || no_more_gets.load(Ordering::Relaxed);
                    let permit = if stopped() {
                        None
                    } else {
                        let weight = get_weight(&job);
                        Some(match window.clone().try_acquire_many_owned(weight) {
                            Ok(p) => p,
                            Err(_) => {
                                // The requests written so far must reach the server to be answered.
                                wr.flush().await?;
                                window.clone().acquire_many_owned(weight).await.map_err(|e| {
                                    ClientError::Unexpected(format!("the window of downloads closed: {e}"))
                                })?
                            }
                        })
                    };
                    // Checked again: the disk may have filled while this one waited.
                    match permit.filter(|_| !stopped()) {
                        Some(p) => Some(p),
                        None => {
                            unasked.push(job);
                            continue;
                        }
                    }
                } else {
                    None
                };
                match sender.send(wr, id, &job, &mut stats).await? {
                    Outcome::Skipped => skipped.push(job),
                    sent => {
                        let _ = ptx.send((id, job, sent, permit));
                    }
                }
            }
            wr.flush().await?;
            drop(ptx);
            Ok::<_, ClientError>((stats, skipped, unasked))
        };
        let reader = async {
            let mut retry = Vec::new();
            // The writer hands a job over once it is sent; a writer stuck on a server that reads
            // nothing more shows as a connection where nothing moves.
            while let Some((id, job, sent, _room)) =
                while_moving(&counters, "the server to take an upload", prx.recv()).await?
            {
                if let Some(j) = self.receive(rd, &notified, &counters, id, job, sent, resumes).await? {
                    retry.push(j);
                }
            }
            Ok::<_, SyncError>(retry)
        };
        // Both run to their end, except when the reader fails: then the writer may be stuck on a
        // server that stopped reading, and is dropped.
        let (w, r) = {
            tokio::pin!(writer);
            tokio::pin!(reader);
            let (mut w, mut r) = (None, None);
            while r.is_none() || (w.is_none() && matches!(r, Some(Ok(_)))) {
                tokio::select! {
                    x = &mut writer, if w.is_none() => w = Some(x),
                    x = &mut reader, if r.is_none() => r = Some(x),
                }
            }
            (w, r)
        };
        self.flush_ready().await;
        self.finish_flush().await;
        let retry = match (w, r) {
            (Some(w), Some(r)) => {
                let (stats, skipped, unasked) = w?;
                let retry = r?;
                self.report.delta.add(stats);
                for j in skipped {
                    self.report.skip(
                        &job_path(&j),
                        "vanished or changed size on this computer while it was read; it goes on the next run",
                    );
                }
                for j in unasked {
                    if let Job::Get { entry, .. } = j {
                        self.local_disk_full(&entry.path, "not downloaded once the disk was full");
                    }
                }
                retry
            }
            (_, Some(Err(e))) => return Err(e),
            _ => return Err(SyncError::Other("the transfer stopped early".into())),
        };
        Ok(retry)
    }

    /// Handles the reply to one job. Returns the job again if it should be retried whole.
    #[allow(clippy::too_many_arguments)]
    async fn receive(
        &mut self,
        rd: &mut FrameReader,
        notified: &AtomicU64,
        counters: &Counters,
        id: u64,
        job: Job,
        sent: Outcome,
        resumes: &mut Resumes,
    ) -> Result<Option<Job>, SyncError> {
        let result = match recv_reply(rd, notified, counters).await? {
            ServerMsg::Resp { id: i, result } if i == id => result,
            other => {
                return Err(ClientError::Unexpected(format!(
                    "{} while waiting for the answer to request {id}",
                    crate::client::describe(&other)
                ))
                .into());
            }
        };
        if sent == Outcome::Changed && result.is_err() {
            // The server refused content that no longer matched its announced hash: not an error,
            // the next round sends the file as it is then.
            self.report
                .notes
                .push(format!("{}: changed while syncing; will sync on the next run", job_path(&job)));
            return Ok(None);
        }
        match job {
            Job::Up(action) => Ok(self.uploaded(action, result, sent == Outcome::SentRest)),
            Job::Get { entry, have, land } => match result {
                Ok(Reply::File { entry: got, base }) => {
                    check_file_reply(&entry, &got)?;
                    if let Landing::Partial { from } = land
                        && from > 0
                        && (got.node.as_ref().map(file_id) != entry.node.as_ref().map(file_id)
                            || base.is_some())
                    {
                        return Err(ClientError::Unexpected(format!(
                            "asked for the rest of `{}` from byte {from}, the server sent another version or a \
                             delta instead; stopping (a broken or malicious server?)",
                            entry.path
                        ))
                        .into());
                    }
                    self.download(rd, notified, counters, id, entry, got, base, have, land, resumes).await
                }
                Ok(other) => Err(ClientError::Unexpected(format!(
                    "{} to the download of `{}`",
                    crate::client::describe(&ServerMsg::Resp { id, result: Ok(other) }),
                    entry.path
                ))
                .into()),
                Err(r) => {
                    if let Landing::Partial { from } = land
                        && from > 0
                        && let Some(Node::File { hash, size, .. }) = &entry.node
                    {
                        // The server no longer has that content there: what was kept of it is of
                        // no use. Fetch whatever the path holds now.
                        let _ = std::fs::remove_file(partial_path(&self.root, hash, *size));
                        resumes.down.remove(&(*hash, *size));
                        self.report.notes.push(format!(
                            "{}: cannot continue the cut-off download ({}); downloading it again",
                            entry.path, r.message
                        ));
                        return Ok(Some(Job::Get { entry, have: None, land: Landing::Temp }));
                    }
                    self.report.notes.push(format!("{}: {}", entry.path, r.message));
                    Ok(None)
                }
            },
        }
    }

    /// An upload's reply. `resumed`: it was sent as the rest of a cut-off upload.
    fn uploaded(&mut self, action: Action, result: Result<Reply, Refusal>, resumed: bool) -> Option<Job> {
        let rev = match result {
            Ok(Reply::Committed { rev }) => rev,
            Ok(other) => {
                self.report.errors.push(format!("unexpected reply {other:?}"));
                return None;
            }
            Err(r) => return self.refused(action, r, resumed),
        };
        self.own_revs.insert(rev);
        let device = self.device.clone();
        let entry = |path: &RelPath, node: Option<Node>| Entry {
            path: path.clone(),
            rev,
            node,
            device: device.clone(),
        };
        let (path, node, what) = match &action {
            Action::Mkdir { path, mode, .. } => (path, Some(Node::Dir { mode: *mode }), "mkdir"),
            Action::Symlink { path, target, .. } => {
                (path, Some(Node::Symlink { target: target.clone() }), "link")
            }
            Action::Put { path, hash, size, meta, .. } => {
                self.report.files_sent += 1;
                (path, Some(Node::File { hash: *hash, size: *size, meta: *meta }), "uploaded")
            }
            Action::Copy { path, hash, size, meta, .. } => {
                self.report.files_copied_remote += 1;
                (path, Some(Node::File { hash: *hash, size: *size, meta: *meta }), "copied")
            }
            Action::Move { from, to, hash, size, meta, .. } => {
                let e = entry(from, None);
                self.record(&e);
                self.report.moved += 1;
                (to, Some(Node::File { hash: *hash, size: *size, meta: *meta }), "moved")
            }
            Action::SetMeta { path, meta, .. } => match self.local.get(path) {
                Some(Node::File { hash, size, .. }) => {
                    (path, Some(Node::File { hash: *hash, size: *size, meta: *meta }), "meta")
                }
                other => (path, other.cloned(), "meta"),
            },
            Action::DeleteRemote { path, .. } => {
                self.report.deleted_remote += 1;
                (path, None, "deleted")
            }
            _ => return None,
        };
        let e = entry(path, node);
        self.record(&e);
        self.progress.file_done(path.as_str(), what);
        None
    }

    /// A refused upload: retried whole if it was a delta or the rest of a cut-off upload and the
    /// server could not rebuild it (it lost the base or the kept start, or the result did not
    /// verify).
    fn refused(&mut self, action: Action, r: Refusal, resumed: bool) -> Option<Job> {
        match (r.kind, action) {
            (
                RefusalKind::Corrupt | RefusalKind::NotFound,
                Action::Put { path, base_rev, hash, size, meta, delta_base },
            ) if delta_base.is_some() || resumed => {
                if resumed {
                    self.report.notes.push(format!(
                        "{path}: the server could not continue the cut-off upload ({}); sending it whole",
                        r.message
                    ));
                }
                Some(Job::Up(Action::Put { path, base_rev, hash, size, meta, delta_base: None }))
            }
            (RefusalKind::NotFound, Action::Copy { path, base_rev, hash, size, meta }) => {
                Some(Job::Up(Action::Put { path, base_rev, hash, size, meta, delta_base: None }))
            }
            (RefusalKind::NotFound, Action::Move { from, from_rev, to, to_base_rev, hash, size, meta }) => {
                let _ = (from, from_rev);
                Some(Job::Up(Action::Put {
                    path: to,
                    base_rev: to_base_rev,
                    hash,
                    size,
                    meta,
                    delta_base: None,
                }))
            }
            (RefusalKind::Stale, a) => {
                self.report.unresolved.push(format!("{}: {}", action_path(&a), r.message));
                None
            }
            // The server will not take this path (a name or type it refuses): left out, the rest
            // went on.
            (RefusalKind::Invalid | RefusalKind::NotFound, a) => {
                self.report.skip(&action_path(&a), format!("refused by the server: {}", r.message));
                None
            }
            // The server's words (`server out of disk space: ...`, with what it needed and had,
            // or the OS error) name the cause; said first as whose disk it is.
            (RefusalKind::Server, a)
                if r.message.starts_with("server out of disk space")
                    || fsutil::says_disk_full(&r.message) =>
            {
                self.report.error(&action_path(&a), format!("the server's disk is full ({})", r.message));
                None
            }
            (_, a) => {
                self.report.error(&action_path(&a), r.message);
                None
            }
        }
    }
}

fn action_path(a: &Action) -> String {
    a.path().to_string()
}

fn job_path(j: &Job) -> String {
    match j {
        Job::Up(a) => action_path(a),
        Job::Get { entry, .. } => entry.path.to_string(),
    }
}
