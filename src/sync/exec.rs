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
//! `.deltasync/tmp/` and renamed into place: a run cut off at any point leaves nothing in the
//! user's folder.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufWriter, Seek};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use super::SyncError;
use super::index::{Batch, Stat, Synced};
use super::plan::Action;
use super::report::Report;
use super::scan::{StatCache, partial_dir, temp_dir};
use crate::client::{Client, ClientError, recv_reply, while_moving};
use crate::delta::signature::Builder;
use crate::delta::source::Skip;
use crate::delta::{self, Applier, Block, DeltaStats, FileBase, SigCache};
use crate::fsutil::{self, TempGuard};
use crate::hash::{ContentHash, Hasher};
use crate::path::RelPath;
use crate::progress::Progress;
use crate::protocol::*;

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

/// `.deltasync/partial/<hash>-<size>`: the partial download of that content.
fn partial_path(root: &Path, hash: &ContentHash, size: u64) -> PathBuf {
    partial_dir(root).join(format!("{}-{size}", hash.to_hex()))
}

/// Whether `a` and `b` (or, for a path that does not exist yet, its nearest existing ancestor)
/// are on one file system, so a file renames from one to the other.
fn same_fs(a: &Path, b: &Path) -> bool {
    let dev = |p: &Path| p.ancestors().find_map(|d| std::fs::metadata(d).ok()).map(|m| m.dev());
    matches!((dev(a), dev(b)), (Some(x), Some(y)) if x == y)
}

/// Where the temp file of a write to `full` goes: `.deltasync/tmp/`, so a run cut off there
/// leaves nothing in the user's folder, unless `full` is on another file system (a mount inside
/// the folder): then beside it, where the rename into place works.
fn landing_dir(root: &Path, full: &Path, memo: &Landings) -> PathBuf {
    let parent = full.parent().unwrap_or(root);
    let mut memo = memo.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(l) = memo.get(parent) {
        return l.clone();
    }
    let tmp = temp_dir(root);
    let l = if std::fs::create_dir_all(&tmp).is_ok() && same_fs(&tmp, parent) {
        tmp
    } else {
        parent.to_path_buf()
    };
    memo.insert(parent.to_path_buf(), l.clone());
    l
}

/// [`landing_dir`]'s answers for a round, by parent directory: it made the temp folder and
/// compared devices (a `mkdir` and three `statx`) for every file of a pull.
pub type Landings = Arc<Mutex<HashMap<PathBuf, PathBuf>>>;

/// Reads and hashes the first `from` bytes of `file` (which must have at least that many),
/// feeding them to a builder of the signature of the version (`hash`, `size`) unless that
/// signature is cached.
fn read_prefix(
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
struct PrefixRead {
    job: usize,
    file: PathBuf,
    hash: ContentHash,
    size: u64,
    from: u64,
    upload: Option<Option<ContentHash>>,
}

pub struct Exec {
    pub root: PathBuf,
    pub sigs: SigCache,
    pub progress: Arc<Progress>,
    pub device: String,
    pub upload: bool,
    /// Local nodes as the round goes (updated by each step).
    pub local: BTreeMap<RelPath, Node>,
    pub cache: StatCache,
    pub batch: Batch,
    pub report: Report,
    /// Journal sequences of the commits this round made, to skip our own changes next time.
    pub own_revs: std::collections::BTreeSet<u64>,
    /// Local files the server deleted, by content, that a fetch may rename instead of copy.
    pub renamed_away: std::collections::HashMap<ContentHash, (RelPath, u64, u64, Meta)>,
    pub renamed_here: std::collections::HashSet<RelPath>,
    /// Local deletes, run after the downloads (or earlier, to empty a directory a file replaces).
    pub pending_deletes: Vec<Action>,
    pub ready: Vec<Ready>,
    pub ready_bytes: u64,
    pub landings: Landings,
}

impl Exec {
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
        self.report.local_disk_full = true;
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

    /// Keeps both versions: ours moves to a conflict name (and is uploaded there), theirs comes here.
    fn conflict(&mut self, local: Node, remote: Entry, jobs: &mut Vec<Job>) -> Result<(), SyncError> {
        let path = remote.path.clone();
        let now = std::time::SystemTime::now();
        let mut n = 1;
        let cpath = loop {
            let c = super::conflict::conflict_path(&path, &self.device, now, n)
                .map_err(|e| SyncError::Other(e.to_string()))?;
            if !self.local.contains_key(&c) && std::fs::symlink_metadata(self.full(&c)).is_err() {
                break c;
            }
            n += 1;
        };
        std::fs::rename(self.full(&path), self.full(&cpath)).map_err(|e| self.io_err(&path, e))?;
        // Everything below a renamed directory moved too.
        let moved: Vec<RelPath> = self
            .local
            .range(path.clone()..)
            .map(|(k, _)| k.clone())
            .take_while(|k| k == &path || k.as_str().starts_with(&format!("{path}/")))
            .collect();
        for k in moved {
            if let Some(node) = self.local.remove(&k) {
                let suffix = &k.as_str()[path.as_str().len()..];
                if let Ok(nk) = RelPath::new(format!("{cpath}{suffix}")) {
                    self.local.insert(nk, node);
                }
            }
            self.cache.remove(&k);
        }
        self.report.conflicts.push(format!(
            "conflict: `{path}` changed on both sides; kept the server's version as `{path}` and this computer's as `{cpath}`"
        ));
        self.progress.say(self.report.conflicts.last().map_or("", |s| s.as_str()));
        if self.upload {
            match &local {
                Node::File { hash, size, meta } => jobs.push(Job::Up(Action::Put {
                    path: cpath.clone(),
                    base_rev: 0,
                    hash: *hash,
                    size: *size,
                    meta: *meta,
                    delta_base: None,
                })),
                Node::Symlink { target } => jobs.push(Job::Up(Action::Symlink {
                    path: cpath.clone(),
                    base_rev: 0,
                    target: target.clone(),
                })),
                Node::Dir { .. } => {} // its contents go up on the next round
            }
        }
        self.fetch(remote, jobs)
    }

    /// Brings a server entry here: directories and links directly, files by local copy when the
    /// content is already here, else by download (a delta against the version we hold).
    fn fetch(&mut self, entry: Entry, jobs: &mut Vec<Job>) -> Result<(), SyncError> {
        let path = entry.path.clone();
        let full = self.full(&path);
        let Some(node) = entry.node.clone() else {
            return Ok(());
        };
        match &node {
            Node::Dir { mode } => {
                fsutil::ensure_dirs(&self.root, &path).map_err(|e| self.io_err(&path, e))?;
                match std::fs::symlink_metadata(&full) {
                    Ok(md) if md.is_dir() => {}
                    Ok(_) => {
                        // The plan only fetches over an unchanged local version, so the file or
                        // link in the way is one the server replaced by this directory, unless
                        // it changed here since the scan.
                        if !self.as_seen(&path) {
                            self.changed_meanwhile(&path);
                            return Ok(());
                        }
                        std::fs::remove_file(&full).map_err(|e| self.io_err(&path, e))?;
                        self.cache.remove(&path);
                        std::fs::create_dir(&full).map_err(|e| self.io_err(&path, e))?;
                    }
                    Err(_) => std::fs::create_dir(&full).map_err(|e| self.io_err(&path, e))?,
                }
                let _ = fsutil::set_mode(&full, mode | 0o700);
                self.local.insert(path.clone(), node);
                self.record(&entry);
                self.progress.file_done(path.as_str(), "mkdir");
            }
            Node::Symlink { target } => {
                fsutil::ensure_dirs(&self.root, &path).map_err(|e| self.io_err(&path, e))?;
                if !self.make_way(&path) {
                    return Ok(());
                }
                if !self.as_seen(&path) {
                    self.changed_meanwhile(&path);
                    return Ok(());
                }
                let tmp = TempGuard::new(fsutil::temp_path(&landing_dir(&self.root, &full, &self.landings)));
                std::os::unix::fs::symlink(target, tmp.path()).map_err(|e| self.io_err(&path, e))?;
                std::fs::rename(tmp.path(), &full).map_err(|e| self.io_err(&path, e))?;
                tmp.keep();
                self.local.insert(path.clone(), node);
                self.record(&entry);
                self.progress.file_done(path.as_str(), "link");
            }
            Node::File { hash, meta, .. } => {
                let here = self.local.get(&path).cloned();
                if let Some(Node::File { hash: h, .. }) = &here
                    && h == hash
                {
                    // Same bytes: only the metadata moves.
                    let _ = fsutil::set_mode(&full, meta.mode);
                    let _ = fsutil::set_mtime(&full, meta.mtime_ns);
                    self.after_local_write(&path, node);
                    self.record(&entry);
                    return Ok(());
                }
                if let Some((src, src_rev, src_size, src_meta)) = self.renamed_away.remove(hash)
                    && self.rename_local(&src, src_size, src_meta, &path, *meta).is_ok()
                {
                    self.local.remove(&src);
                    self.cache.remove(&src);
                    self.batch.synced.push((src.clone(), Synced { rev: src_rev, node: None }));
                    self.renamed_here.insert(src);
                    self.after_local_write(&path, node);
                    self.record(&entry);
                    self.report.moved += 1;
                    self.progress.file_done(path.as_str(), "moved");
                    return Ok(());
                }
                if let Some(src) = self.local_with_hash(hash, &path)
                    && self.copy_local(&src, &path, *hash, *meta).is_ok()
                {
                    self.after_local_write(&path, node);
                    self.record(&entry);
                    self.report.files_copied_locally += 1;
                    self.progress.file_done(path.as_str(), "copied");
                    return Ok(());
                }
                let have = match here {
                    Some(Node::File { hash, size, .. }) => Some((hash, size)),
                    _ => None,
                };
                jobs.push(Job::Get { entry, have, land: Landing::Temp });
            }
        }
        Ok(())
    }

    fn local_with_hash(&self, hash: &ContentHash, not: &RelPath) -> Option<RelPath> {
        self.local.iter().find_map(|(p, n)| match n {
            Node::File { hash: h, .. } if h == hash && p != not => Some(p.clone()),
            _ => None,
        })
    }

    /// Renames `src` to `dst` if `src` is still the version the plan saw.
    fn rename_local(
        &self,
        src: &RelPath,
        size: u64,
        meta: Meta,
        dst: &RelPath,
        new_meta: Meta,
    ) -> std::io::Result<()> {
        fsutil::check_no_symlink_ancestors(&self.root, src)?;
        let from = self.full(src);
        let md = std::fs::symlink_metadata(&from)?;
        if !md.is_file() || md.len() != size || fsutil::mtime_ns(&md) != meta.mtime_ns {
            return Err(std::io::Error::other("changed here"));
        }
        fsutil::ensure_dirs(&self.root, dst)?;
        let to = self.full(dst);
        if std::fs::symlink_metadata(&to).is_ok() && !self.local.contains_key(dst) {
            return Err(std::io::Error::other("something appeared at the destination"));
        }
        std::fs::rename(&from, &to)?;
        fsutil::set_mode(&to, new_meta.mode)?;
        fsutil::set_mtime(&to, new_meta.mtime_ns)?;
        Ok(())
    }

    fn copy_local(&self, src: &RelPath, dst: &RelPath, hash: ContentHash, meta: Meta) -> std::io::Result<()> {
        fsutil::ensure_dirs(&self.root, dst)?;
        let full = self.full(dst);
        let tmp = TempGuard::new(fsutil::temp_path(&landing_dir(&self.root, &full, &self.landings)));
        std::fs::copy(self.full(src), tmp.path())?;
        if ContentHash::of_file(tmp.path())?.0 != hash {
            return Err(std::io::Error::other("source changed"));
        }
        fsutil::set_mode(tmp.path(), meta.mode)?;
        fsutil::set_mtime(tmp.path(), meta.mtime_ns)?;
        fsutil::commit_temp(tmp.path(), &full)?;
        tmp.keep();
        Ok(())
    }

    /// Records what a local write left on disk, so the next scan need not re-hash it.
    fn after_local_write(&mut self, path: &RelPath, node: Node) {
        if let (Node::File { hash, .. }, Ok(md)) = (&node, std::fs::symlink_metadata(self.full(path))) {
            let stat = Stat {
                size: md.len(),
                mtime_ns: fsutil::mtime_ns(&md),
                inode: md.ino(),
                mode: md.mode() & 0o7777,
            };
            self.cache.insert(path.clone(), (stat, *hash));
        }
        self.local.insert(path.clone(), node);
    }

    /// Whether what is on disk at `path` now is what this round's local view says is there, so a
    /// step may replace it: nothing where nothing was (or where the user deleted it meanwhile),
    /// the file as scanned or last written (stat), the same link. A directory never is: the
    /// server replaced it, so [`make_way`](Self::make_way) must have removed it first. Anything
    /// else was changed here during the round, and the next round syncs it.
    fn as_seen(&self, path: &RelPath) -> bool {
        let full = self.full(path);
        let md = match std::fs::symlink_metadata(&full) {
            Ok(md) => md,
            Err(e) => return e.kind() == std::io::ErrorKind::NotFound,
        };
        match self.local.get(path) {
            None => false, // something appeared here
            Some(Node::File { size, meta, .. }) => {
                md.is_file()
                    && match self.cache.get(path) {
                        Some((s, _)) => {
                            md.len() == s.size && fsutil::mtime_ns(&md) == s.mtime_ns && md.ino() == s.inode
                        }
                        None => md.len() == *size && fsutil::mtime_ns(&md) == meta.mtime_ns,
                    }
            }
            Some(Node::Symlink { target }) => {
                md.file_type().is_symlink()
                    && std::fs::read_link(&full).is_ok_and(|t| t.to_str() == Some(target.as_str()))
            }
            Some(Node::Dir { .. }) => false,
        }
    }

    fn changed_meanwhile(&mut self, path: &RelPath) {
        self.report.notes.push(format!("{path}: changed here while downloading; will sync on the next run"));
    }

    /// The server replaced a directory by a file or link: empties and removes the local
    /// directory (its contents were deleted on the server too). False if it has new files here,
    /// which then survive.
    fn make_way(&mut self, path: &RelPath) -> bool {
        // The local view first: a stat only where a directory was.
        if !matches!(self.local.get(path), Some(Node::Dir { .. })) {
            return true;
        }
        let full = self.full(path);
        if !std::fs::symlink_metadata(&full).is_ok_and(|m| m.is_dir()) {
            return true;
        }
        self.delete_pending_under(path);
        if std::fs::remove_dir(&full).is_err() {
            self.report.notes.push(format!("{path}: replaced on the server but has new files here; kept"));
            return false;
        }
        self.local.remove(path);
        true
    }

    fn delete_pending_under(&mut self, dir: &RelPath) {
        let prefix = format!("{dir}/");
        let (mut under, rest): (Vec<Action>, Vec<Action>) =
            std::mem::take(&mut self.pending_deletes).into_iter().partition(
                |a| matches!(a, Action::DeleteLocal { path, .. } if path.as_str().starts_with(&prefix)),
            );
        self.pending_deletes = rest;
        under.sort_by_key(|a| match a {
            Action::DeleteLocal { path, .. } => std::cmp::Reverse(path.depth()),
            _ => std::cmp::Reverse(0),
        });
        for a in under {
            if let Action::DeleteLocal { path, rev, expect } = a {
                self.delete_local(path, rev, expect);
            }
        }
    }

    fn delete_local(&mut self, path: RelPath, rev: u64, expect: Node) {
        let full = self.full(&path);
        if fsutil::check_no_symlink_ancestors(&self.root, &path).is_err() {
            return;
        }
        let r = match (&expect, std::fs::symlink_metadata(&full)) {
            (_, Err(_)) => Ok(()),
            (Node::Dir { .. }, Ok(md)) if md.is_dir() => match std::fs::remove_dir(&full) {
                Err(e) if e.kind() == std::io::ErrorKind::DirectoryNotEmpty => {
                    // New files inside: they survive, and the directory with them.
                    self.report
                        .notes
                        .push(format!("{path}: deleted on the server but has new files here; kept"));
                    return;
                }
                r => r,
            },
            (Node::File { size, meta, .. }, Ok(md)) => {
                if md.len() != *size || fsutil::mtime_ns(&md) != meta.mtime_ns {
                    self.report.notes.push(format!("{path}: deleted on the server but changed here; kept"));
                    return;
                }
                std::fs::remove_file(&full)
            }
            (Node::Symlink { .. }, Ok(_)) => std::fs::remove_file(&full),
            (_, Ok(_)) => return,
        };
        match r {
            Ok(()) => {
                self.local.remove(&path);
                self.cache.remove(&path);
                self.batch.synced.push((path.clone(), Synced { rev, node: None }));
                self.report.deleted_local += 1;
                self.progress.file_done(path.as_str(), "deleted");
            }
            Err(e) => self.report.error(path.as_str(), format!("cannot delete it on this computer: {e}")),
        }
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
                    let prefix = std::fs::OpenOptions::new()
                        .read(true)
                        .custom_flags(libc::O_NOFOLLOW)
                        .open(&r.file)
                        .and_then(|f| {
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
        let (ptx, mut prx) = mpsc::unbounded_channel::<(u64, Job, Outcome)>();
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
            for (id, job) in ids.into_iter().zip(jobs) {
                match sender.send(wr, id, &job, &mut stats).await? {
                    Outcome::Skipped => skipped.push(job),
                    sent => {
                        let _ = ptx.send((id, job, sent));
                    }
                }
            }
            wr.flush().await?;
            drop(ptx);
            Ok::<_, ClientError>((stats, skipped))
        };
        let reader = async {
            let mut retry = Vec::new();
            // The writer hands a job over once it is sent; a writer stuck on a server that reads
            // nothing more shows as a connection where nothing moves.
            while let Some((id, job, sent)) =
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
        let retry = match (w, r) {
            (Some(w), Some(r)) => {
                let (stats, skipped) = w?;
                let retry = r?;
                self.report.delta.add(stats);
                for j in skipped {
                    self.report.skip(
                        &job_path(&j),
                        "vanished or changed size on this computer while it was read; it goes on the next run",
                    );
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

    /// Receives a file's blocks into a temp file (or its partial file), verifies, and queues it
    /// to be moved into place.
    #[allow(clippy::too_many_arguments)]
    async fn download(
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
            _ => Dest::Temp,
        };
        let resumed = matches!(dest, Dest::Partial { from, .. } if from > 0);
        let (tx, mut rx) = mpsc::channel::<Block>(4);
        let use_base = base.is_some() && have.map(|h| Some(h.0) == base).unwrap_or(false);
        let local_base = have.filter(|_| use_base);
        // A small file sent whole is held here and written in this task at its end: no thread
        // hand-off per file (a pull of many small files spent more on those than on writing).
        let inline = size <= INLINE_FILE && local_base.is_none() && matches!(dest, Dest::Temp);
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
                    Dest::Temp,
                    &self.landings,
                )
            }
        };
        if let Err(e) = received {
            // Complete and verified all the same (the connection failed after its last block):
            // it goes into place with the others.
            if let Ok((tmp, stats)) = outcome
                && !bad_base
            {
                self.ready.push(Ready { got, tmp, stats });
            }
            return Err(e.into());
        }
        let (tmp, stats) = match outcome {
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
        self.ready.push(Ready { got, tmp, stats });
        if self.ready.len() >= READY_FILES || self.ready_bytes >= READY_BYTES {
            self.flush_ready().await;
        }
        Ok(None)
    }

    /// Makes received files durable together and moves them into place: the temp files made
    /// durable at once ([`fsutil::make_durable`]), the renames, then their directories the same
    /// way. Two rounds for many small files instead of three fsyncs each.
    async fn flush_ready(&mut self) {
        let ready = std::mem::take(&mut self.ready);
        self.ready_bytes = 0;
        if ready.is_empty() {
            return;
        }
        let temps: Vec<PathBuf> = ready.iter().map(|r| r.tmp.path().to_path_buf()).collect();
        let synced =
            tokio::task::spawn_blocking(move || fsutil::make_durable(&temps)).await.unwrap_or_default();
        let mut dirs = std::collections::BTreeSet::new();
        let mut placed = Vec::new();
        for (r, sync) in
            ready.into_iter().zip(synced.into_iter().map(Some).chain(std::iter::repeat_with(|| None)))
        {
            let path = r.got.path.clone();
            match sync {
                Some(Ok(())) => {}
                Some(Err(e)) if fsutil::says_disk_full(&e.to_string()) => {
                    self.local_disk_full(&path, &e.to_string());
                    continue;
                }
                _ => {
                    self.report.errors.push(format!("{path}: could not make the download durable"));
                    continue;
                }
            }
            // Do not overwrite a local change made while we were downloading.
            let full = self.full(&path);
            if !self.make_way(&path) {
                continue;
            }
            if !self.as_seen(&path) {
                self.changed_meanwhile(&path);
                continue;
            }
            if let Err(e) = std::fs::rename(r.tmp.path(), &full) {
                self.report
                    .error(path.as_str(), format!("cannot put the download in place on this computer: {e}"));
                continue;
            }
            r.tmp.keep();
            dirs.insert(full.parent().unwrap_or(&self.root).to_path_buf());
            placed.push((r.got, r.stats));
        }
        let dirs: Vec<PathBuf> = dirs.into_iter().collect();
        let _ = tokio::task::spawn_blocking(move || fsutil::make_durable(&dirs)).await;
        for (got, stats) in placed {
            self.report.delta.add(stats);
            self.report.files_received += 1;
            self.after_local_write(&got.path, got.node.clone().expect("a download is a file"));
            self.record(&got);
            self.progress.file_done(got.path.as_str(), "downloaded");
        }
    }
}

/// Downloads received in full, waiting to be made durable together.
pub struct Ready {
    got: Entry,
    tmp: TempGuard,
    stats: DeltaStats,
}

/// Received files made durable together at most.
const READY_FILES: usize = 256;
const READY_BYTES: u64 = 256 << 20;

/// Writer-side state, owned so the writer can run beside the reader.
struct Sender {
    root: PathBuf,
    sigs: SigCache,
    progress: Arc<Progress>,
    /// Uploads whose start the server kept (see [`Resumes::up`]), taken by their upload.
    resumed: Mutex<HashMap<RelPath, (Option<ContentHash>, Prefix)>>,
}

enum Item {
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
enum Outcome {
    Sent,
    /// Sent as the rest of a cut-off upload (`PutRest`).
    SentRest,
    /// Not sent: the file was gone or had another size.
    Skipped,
    /// Sent, but the bytes read did not hash to what the scan saw: the server will refuse them.
    Changed,
}

/// How the encoder of one upload ended.
enum Produced {
    Done(DeltaStats),
    Changed,
    Failed(String),
}

impl Sender {
    /// Sends one job's request (and content).
    async fn send(
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
    async fn put(
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
enum Items {
    Chan(mpsc::Receiver<Item>),
    Held(std::vec::IntoIter<Item>),
}

impl Items {
    async fn next(&mut self) -> Option<Item> {
        match self {
            Items::Chan(rx) => rx.recv().await,
            Items::Held(it) => it.next(),
        }
    }
}

/// An upload's encoder: running on the blocking pool, or done.
enum Producer {
    Task(tokio::task::JoinHandle<Produced>),
    Done(Produced),
}

impl Producer {
    async fn finish(self) -> Result<Produced, tokio::task::JoinError> {
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
fn produce(
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
    let file = match std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(full) {
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

/// Where [`receive_file`] writes.
enum Dest {
    /// A fresh temp file ([`landing_dir`]).
    Temp,
    /// The content's partial file, from byte `from` on: the bytes before are there already and
    /// `prefix` has them read and hashed (`None` when `from` is 0).
    Partial { from: u64, prefix: Option<Box<Prefix>> },
}

/// Why [`receive_file`] has no file.
#[derive(Debug)]
enum Received {
    /// The blocks ended before the file did; the partial file keeps what came.
    CutOff {
        got: u64,
    },
    Failed(String),
}

impl Received {
    fn message(&self) -> String {
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
fn file_id(n: &Node) -> Option<(ContentHash, u64)> {
    match n {
        Node::File { hash, size, .. } => Some((*hash, *size)),
        _ => None,
    }
}

/// Applies a download's blocks into a temp file or the content's partial file (`dest`) and
/// verifies it; `base` is the local version (hash and size) the blocks are a delta against, if
/// any. The verified file is returned as a temp file in [`landing_dir`]. A partial file is kept
/// if the blocks end early (the transfer was cut off) and removed on any other failure.
#[allow(clippy::too_many_arguments)]
fn receive_file(
    root: &Path,
    path: &RelPath,
    base: Option<(ContentHash, u64)>,
    mut next: impl FnMut() -> Option<Block>,
    (hash, size, meta): (ContentHash, u64, Meta),
    sigs: &SigCache,
    dest: Dest,
    landings: &Landings,
) -> Result<(TempGuard, DeltaStats), Received> {
    let full = path.under(root);
    fsutil::ensure_dirs(root, path)?;
    let base_sig = base.and_then(|(h, len)| sigs.get(&h, len));
    // Read by pread, never mapped (see `produce`): if the base is cut short while the copies are
    // read, the delta fails and the file is fetched whole.
    let base = match base {
        Some(_) => {
            let f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(&full)?;
            Some(FileBase::new(f)?)
        }
        None => None,
    };
    let landing = landing_dir(root, &full, landings);
    let partial = matches!(dest, Dest::Partial { .. });
    let (file, guard, prefix) = match dest {
        Dest::Temp => {
            let (file, t) = fsutil::create_temp(&landing)?;
            (file, TempGuard::new(t), None)
        }
        Dest::Partial { from, prefix } => {
            let at = partial_path(root, &hash, size);
            std::fs::create_dir_all(partial_dir(root))?;
            // Removed on failure from here on, kept only when cut off.
            let guard = TempGuard::new(at.clone());
            let mut open = std::fs::OpenOptions::new();
            open.write(true).custom_flags(libc::O_NOFOLLOW);
            match prefix {
                None if from == 0 => (open.create(true).truncate(true).open(&at)?, guard, None),
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
                    (f, guard, Some(p))
                }
                _ => return Err(Received::Failed("the start of the partial download was not read".into())),
            }
        }
    };
    // Writes of at most 1 MiB; a small file's buffer is its size (not 1 MiB per file of a pull).
    let cap = usize::try_from(size).unwrap_or(usize::MAX).clamp(8 << 10, 1 << 20);
    let out = BufWriter::with_capacity(cap, fsutil::WriteBehind::new(file));
    let (new_sig, start) = match prefix {
        Some(p) => (p.sig, Some((p.hasher, p.from))),
        None => (sigs.builder_for(&hash, size), None),
    };
    let mut ap = Applier::from_base(base, out, size).with_signature(new_sig, base_sig);
    if let Some((hasher, from)) = start {
        ap = ap.resume_after(hasher, from)?;
    }
    while let Some(b) = next() {
        ap.block(&b)?;
    }
    let done = ap.finish()?;
    if partial && done.len < size {
        // Cut off: what came stays for the next run.
        guard.keep();
        return Err(Received::CutOff { got: done.len });
    }
    if done.hash != hash || done.len != size {
        return Err(Received::Failed("content hash mismatch".into()));
    }
    // fsynced later, together with the other files of the batch (`flush_ready`).
    let file = done.out.into_inner().map_err(|e| e.error().to_string())?.into_inner();
    fsutil::set_file_meta(&file, meta.mode, meta.mtime_ns)?;
    drop(file);
    if let Some(sig) = done.sig {
        let _ = sigs.put(&hash, size, &sig);
    }
    let guard = if partial {
        // Complete: the partial file becomes an ordinary temp file, so the content's name is
        // free for the next download of it.
        let t = fsutil::temp_path(&landing);
        std::fs::rename(guard.path(), &t)?;
        guard.keep();
        TempGuard::new(t)
    } else {
        guard
    };
    Ok((guard, done.stats))
}

/// A download's answer must be the file asked for: the same path (a broken or malicious server
/// must not make the client write anywhere else) and a file.
fn check_file_reply(want: &Entry, got: &Entry) -> Result<(), ClientError> {
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

fn action_path(a: &Action) -> String {
    a.path().to_string()
}

fn job_path(j: &Job) -> String {
    match j {
        Job::Up(a) => action_path(a),
        Job::Get { entry, .. } => entry.path.to_string(),
    }
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
