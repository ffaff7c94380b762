//! The sync engine shared by `push`, `pull` (and `watch`): one round brings a folder and the
//! server into agreement.
//!
//! A round: lock the folder, connect, scan (re-hashing only changed files), fetch the journal
//! since the last round, plan (pure), execute (pipelined), save the index.
//!
//! # Layout
//! - [`index`]: the client's SQLite index in `.deltasync/`.
//! - [`scan`]: folder → nodes, with the stat cache.
//! - [`plan`]: the pure decision table.
//! - [`exec`]: carries a plan out.
//! - [`conflict`]: conflict-copy names.
//! - [`report`]: what a round did.
//! - [`rules`]: the `.deltasyncignore` rules.
//! - [`input`]: the prelude every command shares: index, rules and scan → the planner's inputs.
//! - [`guard`]: the mass-delete guard.

pub mod conflict;
pub mod exec;
pub mod guard;
pub mod index;
pub mod input;
pub mod lane;
pub mod plan;
pub mod report;
pub mod rules;
pub mod scan;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::client::{Client, ClientError};
use crate::delta::SigCache;
use crate::path::{RelPath, STATE_DIR};
use crate::progress::Progress;
use crate::protocol::{DEFAULT_FOLDER, Entry, Node};
use crate::transport::Trust;
use index::{Batch, Index, IndexError, Synced};
use plan::Action;
use report::Report;

/// The address `deltasync serve` listens on by default.
pub const DEFAULT_SERVER: &str = "127.0.0.1:7700";

/// A scan that changes at least this many rows of the stat cache has it written beside the
/// round's transfers: a first push of 100,000 files spent 0.12 s writing it after them, with the
/// server done and waiting.
const STATS_BESIDE: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error("{} (on this computer): {err}", path.display())]
    Io { path: PathBuf, err: std::io::Error },
    #[error("{0} is used by another deltasync process (push, pull or watch); wait for it to finish")]
    Locked(PathBuf),
    /// The folder is linked to another account, folder or server than this run's, and
    /// `--relink` was not given (a usage error: exit 2).
    #[error("{0}")]
    Linked(String),
    #[error("{0}")]
    Other(String),
}

#[derive(Debug, Clone, Default)]
pub struct Options {
    pub upload: bool,
    pub download: bool,
    pub dry_run: bool,
    pub server: Option<String>,
    pub token: Option<String>,
    pub device: Option<String>,
    /// `--fingerprint`: the server's certificate must have it.
    pub fingerprint: Option<crate::transport::Fingerprint>,
    /// `--timeout`: for connect and handshake (default [`crate::client::CONNECT_TIMEOUT`]).
    pub timeout: Option<std::time::Duration>,
    /// `--max-delete`: let a round through the mass-delete guard.
    pub max_delete: Option<guard::Limit>,
    /// `--bwlimit`: upload (send) and download (receive) limits of the connection.
    pub bwlimit: crate::protocol::BwLimit,
    /// `pull --restore-deleted`: download files deleted here instead of deleting them there.
    pub restore_deleted: bool,
    /// `watch`, while the folder is still changing: server deletes wait for it to be quiet, so a
    /// mass delete is seen whole by the guard.
    pub defer_deletes: bool,
    /// `watch`: big files go over this lane of their own, beside the rounds.
    pub lane: Option<Arc<lane::Lane>>,
    /// `--folder`: which of the account's folders (default: the one remembered, else `default`).
    pub folder: Option<String>,
    /// `--relink`: sync with the account, folder or server given even if this folder was linked
    /// to another one.
    pub relink: bool,
}

/// Where a folder's settings came from, after resolving flags, environment and `.deltasync/`.
#[derive(Debug, Clone)]
pub struct Settings {
    pub server: String,
    pub token: Option<String>,
    pub device: String,
    /// What to trust of the server's certificate.
    pub trust: Trust,
    /// `trust` is `--fingerprint`'s.
    pub trust_from_flag: bool,
    pub timeout: std::time::Duration,
    /// `--bwlimit`'s buckets, shared by every connection made with these settings (`watch`'s
    /// reconnects and its lane for big files).
    pub bwlimit: crate::protocol::Shaper,
    /// The account's folder to sync with.
    pub folder: String,
    /// `--relink`: a link to another account, folder or server may replace the remembered one.
    pub relink: bool,
}

impl Settings {
    fn connect(&self) -> crate::client::Connect<'_> {
        crate::client::Connect {
            addr: &self.server,
            token: self.token.as_deref(),
            device: &self.device,
            folder: &self.folder,
            trust: self.trust.clone(),
            from_flag: self.trust_from_flag,
            timeout: self.timeout,
            bwlimit: self.bwlimit.clone(),
        }
    }
}

pub fn state_dir(root: &Path) -> PathBuf {
    root.join(STATE_DIR)
}

pub fn hostname() -> String {
    gethostname::gethostname().to_string_lossy().into_owned()
}

/// What a folder's index says it syncs with.
struct Link {
    /// `None`: it never synced.
    account: Option<String>,
    /// The account's folder (an index of a version before folders: `default`).
    folder: String,
    /// The server's address and identity (hex).
    server: Option<String>,
    server_id: Option<String>,
}

/// An open folder: its index, held under an exclusive lock so two runs never interleave.
pub struct Folder {
    pub root: PathBuf,
    pub index: Index,
    pub sigs: SigCache,
    /// Server deletes this process sent, and when: the mass-delete guard counts them together.
    recent_deletes: Vec<(std::time::Instant, u64)>,
    /// The thread freeing the last round's maps (see [`free_beside`]).
    freeing: Option<std::thread::JoinHandle<()>>,
    /// A second connection to the index, for a round's work beside the first (see
    /// [`second`](Self::second)), kept from round to round.
    spare: Option<Index>,
    _lock: std::fs::File,
}

impl Folder {
    pub fn open(root: &Path, create: bool) -> Result<Folder, SyncError> {
        let io = |err| SyncError::Io { path: root.to_path_buf(), err };
        if create {
            std::fs::create_dir_all(root).map_err(io)?;
        }
        let md = std::fs::metadata(root).map_err(io)?;
        if !md.is_dir() {
            return Err(SyncError::Other(format!("{} is not a folder", root.display())));
        }
        let root = root.canonicalize().map_err(io)?;
        let sd = state_dir(&root);
        crate::fsutil::private_dir(&sd).map_err(|err| SyncError::Io { path: sd.clone(), err })?;
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(sd.join("lock"))
            .map_err(|err| SyncError::Io { path: sd.clone(), err })?;
        if lock.try_lock().is_err() {
            return Err(SyncError::Locked(root));
        }
        let index = Index::open(&sd)?;
        let sigs = SigCache::new(sd.join("sigs")).map_err(|err| SyncError::Io { path: sd.clone(), err })?;
        Ok(Folder { root, index, sigs, recent_deletes: Vec::new(), freeing: None, spare: None, _lock: lock })
    }

    /// Flags and environment win over what `.deltasync/` remembers.
    pub fn settings(&self, opts: &Options) -> Result<Settings, SyncError> {
        let server = match &opts.server {
            Some(s) => s.clone(),
            None => self.index.setting("server")?.unwrap_or_else(|| DEFAULT_SERVER.to_string()),
        };
        let token = match &opts.token {
            Some(t) => Some(t.clone()),
            None => self.index.setting("token")?,
        };
        let device = match &opts.device {
            Some(d) => d.clone(),
            None => self.index.setting("device")?.unwrap_or_else(hostname),
        };
        let (trust, trust_from_flag) = match opts.fingerprint {
            Some(f) => (Trust::Pinned(f), true),
            None => (Trust::from_setting(self.index.setting("fingerprint")?.as_deref()), false),
        };
        let timeout = opts.timeout.unwrap_or(crate::client::CONNECT_TIMEOUT);
        let folder = match &opts.folder {
            Some(f) => f.clone(),
            None => self.index.setting("folder")?.unwrap_or_else(|| DEFAULT_FOLDER.to_string()),
        };
        Ok(Settings {
            server,
            token,
            device,
            trust,
            trust_from_flag,
            timeout,
            bwlimit: crate::protocol::Shaper::new(opts.bwlimit),
            folder,
            relink: opts.relink,
        })
    }

    /// What this folder is linked to.
    fn link(&self) -> Result<Link, SyncError> {
        Ok(Link {
            account: self.index.setting("account")?,
            folder: self.index.setting("folder")?.unwrap_or_else(|| DEFAULT_FOLDER.to_string()),
            server: self.index.setting("server")?,
            server_id: self.index.setting("server_id")?,
        })
    }

    /// The refusal to sync a folder linked elsewhere, naming both links.
    fn linked_elsewhere(&self, was: &str, now: &str, keep: &str) -> SyncError {
        SyncError::Linked(format!(
            "{} is linked to {was}, not {now}; refusing to merge the two trees. Run it {keep} to sync it with \
             its link, or add --relink to link it to {now} instead (both trees are then kept and merged: \
             nothing is deleted on either side)",
            self.root.display()
        ))
    }

    /// Connects and, only once the server accepted, remembers server, token, account and folder.
    /// A folder linked to another account, folder or server (another address with another
    /// identity) is refused ([`SyncError::Linked`]) unless `s.relink`; then the server state is
    /// forgotten, so no path has a base and nothing is deleted: the trees merge.
    pub async fn connect(&mut self, s: &Settings, progress: &Progress) -> Result<Client, SyncError> {
        let Link { account, folder, server, server_id: known_id } = self.link()?;
        let shown = |a: &str, f: &str, srv: &str| format!("folder `{f}` of account `{a}` on {srv}");
        // Refused before connecting: a folder named by mistake is not made on the server.
        if let Some(a) = &account
            && folder != s.folder
            && !s.relink
        {
            let srv = server.as_deref().unwrap_or(&s.server);
            return Err(self.linked_elsewhere(
                &shown(a, &folder, srv),
                &format!("folder `{}`", s.folder),
                &format!("with --folder {folder} (or without --folder)"),
            ));
        }
        let client = Client::connect(&s.connect()).await?;
        let server_id = hex::encode(client.server_id);
        let elsewhere = account.as_ref().is_some_and(|a| {
            *a != client.account
                || folder != client.folder
                || (server.as_deref() != Some(s.server.as_str())
                    && known_id.as_ref().is_some_and(|k| *k != server_id))
        });
        if elsewhere {
            let (a, srv) = (account.as_deref().unwrap_or("-"), server.as_deref().unwrap_or("-"));
            let (was, now) = (shown(a, &folder, srv), shown(&client.account, &client.folder, &s.server));
            if !s.relink {
                return Err(self.linked_elsewhere(
                    &was,
                    &now,
                    "with the token, --server and --folder of its link",
                ));
            }
            progress.say(&format!(
                "note: {} was linked to {was}; linking it to {now} (--relink): every path is re-checked, \
                 nothing is deleted, differing versions are kept as conflict copies",
                self.root.display()
            ));
            self.index.forget_server_state()?;
        }
        self.connected(client, s, progress, elsewhere).await
    }

    /// Remembers what the accepted connection settled; `relinked`: the server state was just
    /// forgotten for a new link.
    async fn connected(
        &mut self,
        mut client: Client,
        s: &Settings,
        progress: &Progress,
        relinked: bool,
    ) -> Result<Client, SyncError> {
        let trust = client.seen.trust(&s.trust);
        if s.trust == Trust::New
            && let Trust::Pinned(f) = &trust
        {
            progress.say(&format!(
                "note: trusting the server at {} on first use; its certificate's fingerprint is {f} (compare it with \
                 the `fingerprint:` line `deltasync serve` prints; --fingerprint checks it instead of trusting)",
                s.server
            ));
        }
        let token = client.new_token.clone().or_else(|| s.token.clone());
        if let Some(t) = &client.new_token {
            progress.say(&format!("Created a new account `{}` on {}.", client.account, s.server));
            println!(
                "To use this folder's account on another computer, run there:\n  deltasync pull DIR --server {} --token {t}\nToken:\n{t}",
                s.server
            );
        }
        let server_id = hex::encode(client.server_id);
        if relinked {
            // Forgotten already.
        } else if self.index.setting("account")?.as_deref() != Some(client.account.as_str()) {
            self.index.forget_server_state()?;
        } else if self.index.setting("server_id")?.is_some_and(|known| known != server_id) {
            progress.say(&format!(
                "note: the server at {} is not the one this folder last synced with (its identity changed: a new \
                 or replaced data folder); re-checking every path (nothing is deleted, differing versions are \
                 kept as conflict copies)",
                s.server
            ));
            self.index.forget_server_state()?;
        } else if let Ok(seen) = self.index.last_seq()
            && client.server_seq < seen
        {
            progress.say(&format!(
                "note: the server's journal went backwards (it is at change {}, this folder had seen {seen}: \
                 restored from an older backup?); putting back what it lost from this computer",
                client.server_seq
            ));
            self.rewind(&mut client).await?;
        }
        if let Some(t) = trust.to_setting() {
            self.index.set_setting("fingerprint", &t)?;
        }
        self.index.set_setting("server_id", &server_id)?;
        self.index.set_setting("server", &s.server)?;
        if let Some(t) = token {
            self.index.set_setting("token", &t)?;
        }
        self.index.set_setting("account", &client.account)?;
        self.index.set_setting("folder", &client.folder)?;
        self.index.set_setting("device", &s.device)?;
        Ok(client)
    }

    /// The server's journal went back to `client.server_seq` (a restore from a backup): its
    /// history up to there is the one this folder saw, and everything after it is lost. Every
    /// base agreed after that point goes back to what the server holds now (or is dropped where
    /// it holds nothing), so the next round uploads this computer's later versions and deletes
    /// again as its own changes: no conflicts with itself, nothing deleted here.
    async fn rewind(&mut self, client: &mut Client) -> Result<(), SyncError> {
        let kept = client.server_seq;
        let (entries, seq) = client.changes(0).await?;
        let now: BTreeMap<RelPath, Entry> = entries.iter().map(|e| (e.path.clone(), e.clone())).collect();
        let synced = match self.index.synced() {
            Ok(s) => s,
            // A damaged index is rebuilt by the round anyway.
            Err(IndexError::Damaged { .. }) => return Ok(self.index.forget_server_state()?),
            Err(e) => return Err(e.into()),
        };
        let mut batch =
            Batch { remote: entries, replace_remote: true, last_seq: Some(seq), ..Default::default() };
        for (p, _) in synced.into_iter().filter(|(_, b)| b.rev > kept) {
            match now.get(&p) {
                Some(e) => batch.synced.push((p, Synced { rev: e.rev, node: e.node.clone() })),
                None => batch.forget.push(p),
            }
        }
        self.index.apply(&batch)?;
        Ok(())
    }

    /// One round over an open connection.
    pub async fn round(
        &mut self,
        client: &mut Client,
        opts: &Options,
        device: &str,
        progress: &Arc<Progress>,
    ) -> Result<Report, SyncError> {
        let mut report = Report::default();
        // The index's view of the server is read on a connection of its own, beside the stat
        // cache and the scan: both are mostly CPU (a row or a `statx` a path), and the scan alone
        // does not keep two cores busy.
        let second = self.second()?;
        let based = tokio::task::spawn_blocking(move || {
            let r = input::Base::load(&second, true);
            (second, r)
        });
        let root = self.root.clone();
        let old_cache = self.index.stat_cache()?;
        // What the lane is writing now: not hashed half-written; the lane records it when done.
        let busy = opts.lane.as_ref().map(|l| l.busy_paths()).unwrap_or_default();
        let (scanned, old_cache) = tokio::task::spawn_blocking(move || {
            let r = input::scan(&root, &old_cache, true, &busy);
            (r, old_cache)
        })
        .await
        .map_err(|e| SyncError::Other(e.to_string()))?;
        let (second, loaded) = based.await.map_err(|e| SyncError::Other(e.to_string()))?;
        self.spare = Some(second);
        let (base, note) = loaded?;
        if let Some(n) = note {
            progress.say(&format!("note: {n}"));
            report.notes.push(n);
        }
        let (scan, rules, warning) = scanned.map_err(|err| SyncError::Io { path: self.root.clone(), err })?;
        if let Some(w) = warning {
            progress.say(&format!("warning: {w}"));
        }
        if scan.temps_removed > 0 {
            report.notes.push(format!("removed {} temp files left by interrupted runs", scan.temps_removed));
        }
        // Listed by the command at the end (`skipped PATH: CAUSE`), and the round is partial.
        report.skipped.extend(scan.skipped.iter().cloned());
        for s in &scan.special {
            progress.say(&format!("note: skipped {s}"));
        }

        let (changes, seq) = client.changes(base.last_seq).await?;
        let mut inputs = input::prepare(&scan, &rules, base, &changes);
        if !inputs.adopted.is_empty() {
            // Our own uploads from a round that stopped early: they are the base now.
            self.index.apply(&Batch { synced: inputs.adopted.clone(), ..Default::default() })?;
        }
        if opts.restore_deleted {
            restore_deleted(&mut inputs);
        }
        let all = plan::plan(&inputs.local, &inputs.remote, &inputs.synced);
        let mut actions: Vec<Action> = all
            .into_iter()
            .filter(|a| {
                let keep = (opts.upload || !a.is_upload())
                    && (opts.download || !a.is_download() || finishes_a_conflict(a, &inputs));
                if !keep {
                    report.pending_other_way += 1;
                }
                keep
            })
            .collect();
        if opts.defer_deletes {
            let before = actions.len();
            actions.retain(|a| !matches!(a, Action::DeleteRemote { .. }));
            report.deferred_deletes = before - actions.len();
        } else {
            let now = std::time::Instant::now();
            self.recent_deletes.retain(|(t, _)| now.duration_since(*t) < guard::WINDOW);
            let recent = self.recent_deletes.iter().map(|(_, n)| n).sum();
            report.held = guard::check(&mut actions, &inputs.synced, opts.max_delete, recent);
        }
        if opts.dry_run {
            for a in &actions {
                println!("would {}", describe(a));
            }
            return Ok(report);
        }
        // Written before anything is sent: if this round is cut off after the server committed
        // some of them, the next round recognises them as its own instead of as conflicts.
        self.index.add_intents(&intents(&actions, &inputs.local))?;
        // `watch`: paths its lane is transferring wait for it; the round's own big files go to
        // the lane once the rest of the round is done.
        let mut big = Vec::new();
        if let Some(lane) = &opts.lane {
            lane.hold_back(&mut actions);
            big = lane::Lane::split_off(&mut actions, &scan.nodes, &scan.cache);
        }

        let mut planned_bytes = 0;
        for a in &actions {
            if let Action::Put { size, .. } = a {
                planned_bytes += size;
            }
        }
        // Files only (the bar counts files, not folders or links).
        let files = actions
            .iter()
            .filter(|a| match a {
                Action::Put { .. } | Action::Copy { .. } | Action::Move { .. } => true,
                Action::Fetch { entry } => matches!(entry.node, Some(Node::File { .. })),
                _ => false,
            })
            .count() as u64;
        {
            let fetch_bytes: u64 = actions
                .iter()
                .filter_map(|a| match a {
                    Action::Fetch { entry } => match &entry.node {
                        Some(Node::File { size, .. }) => Some(*size),
                        _ => None,
                    },
                    _ => None,
                })
                .sum();
            progress.start(files, planned_bytes + fetch_bytes);
        }
        // Nothing to write when the scan found every stat as it was and no step changes one. A
        // big scan's stat cache (a first round over a big folder) is written on the second
        // connection while the transfers run (mostly waiting for the server then), instead of
        // after them; the end writes only what the round changed in it.
        let cache_kept = scan.cache_is(&old_cache) && actions.is_empty();
        let (beside, old_cache) =
            if !cache_kept && index::stat_changes(&old_cache, &scan.cache, STATS_BESIDE) >= STATS_BESIDE {
                let mut second = self.second()?;
                let new = scan.cache.clone();
                let t = tokio::task::spawn_blocking(move || {
                    let r = second.save_stat_cache(&old_cache, &new).map(|()| new);
                    (second, r)
                });
                (Some(t), BTreeMap::new())
            } else {
                (None, old_cache)
            };
        let mut exec = exec::Exec::new(
            self.root.clone(),
            self.sigs.clone(),
            progress.clone(),
            device.to_string(),
            opts.upload,
            scan.nodes,
            scan.cache,
            report,
        );
        let r = exec.run(client, actions).await;
        exec.batch.last_seq = Some(exec.advanced_seq(seq));
        // Whatever happened, keep what was done: the server's changes the round started from
        // (written now, with the rest: a pull wrote each of its files' rows twice before), under
        // what the round's own steps made of them.
        let done: HashSet<&RelPath> = exec.batch.remote.iter().map(|e| &e.path).collect();
        let mut remote: Vec<Entry> = changes.into_iter().filter(|e| !done.contains(&e.path)).collect();
        drop(done);
        remote.append(&mut exec.batch.remote);
        exec.batch.remote = remote;
        let saved = match beside {
            Some(t) => {
                let (second, saved) =
                    t.await.map_err(|e| SyncError::Other(format!("writing the stat cache failed: {e}")))?;
                self.spare = Some(second);
                saved?
            }
            None => old_cache,
        };
        self.index.apply(&exec.batch)?;
        if !cache_kept {
            self.index.save_stat_cache(&saved, &exec.cache)?;
        }
        progress.finish();
        r?;
        if let Some(lane) = &opts.lane {
            lane.give(big);
        }
        let mut report = exec.report;
        if report.deleted_remote > 0 {
            self.recent_deletes.push((std::time::Instant::now(), report.deleted_remote));
        }
        if report.unresolved.is_empty() && report.errors.is_empty() {
            self.index.clear_intents()?;
        }
        let now =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        self.index.set_setting("last_sync", &now.to_string())?;
        report.bytes_sent = client.counters.sent();
        report.bytes_received = client.counters.received();
        for n in exec.local.values() {
            if let Node::File { size, .. } = n {
                report.total_files += 1;
                report.total_size += size;
            }
        }
        // The round's maps of every path are freed on a thread of their own, beside what comes
        // next (for push and pull: the exit). At 100,000 files that took 30-40 ms, a tenth of a
        // no-op round.
        self.freeing =
            free_beside((inputs, std::mem::take(&mut exec.local), std::mem::take(&mut exec.cache), saved));
        Ok(report)
    }

    /// The second connection to the index: the one kept from an earlier round, else a new one.
    fn second(&mut self) -> Result<Index, SyncError> {
        match self.spare.take() {
            Some(ix) => Ok(ix),
            None => Ok(self.index.second()?),
        }
    }

    /// Waits until the last round's maps are freed (before giving the memory back to the OS).
    pub fn wait_freed(&mut self) {
        if let Some(t) = self.freeing.take() {
            let _ = t.join();
        }
    }
}

/// Drops `t` on a new thread, returned; here when none can be started.
fn free_beside<T: Send + 'static>(t: T) -> Option<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name("free".into()).spawn(move || drop(t)).ok()
}

/// A download a push makes too: the server changed a path that is gone here but was agreed
/// before. A change beats a delete, and this is also what a conflict cut off between moving the
/// local version aside and fetching the server's leaves behind; a push resolves conflicts.
fn finishes_a_conflict(a: &Action, inputs: &input::Inputs) -> bool {
    match a {
        Action::Fetch { entry } => {
            !inputs.local.contains_key(&entry.path)
                && inputs.synced.get(&entry.path).is_some_and(|s| s.node.is_some())
                // Only into directories that are here: a parent the server changed waits for
                // the pull that brings it.
                && entry.path.ancestors().all(|d| matches!(inputs.local.get(&d), Some(Node::Dir { .. })))
        }
        _ => false,
    }
}

/// What each upload will leave on the server, by path (`None`: deleted there).
fn intents(actions: &[Action], local: &BTreeMap<RelPath, Node>) -> Vec<(RelPath, Option<Node>)> {
    let file = |hash, size, meta| Some(Node::File { hash, size, meta });
    let mut out = Vec::new();
    for a in actions {
        match a {
            Action::Mkdir { path, mode, .. } => out.push((path.clone(), Some(Node::Dir { mode: *mode }))),
            Action::Symlink { path, target, .. } => {
                out.push((path.clone(), Some(Node::Symlink { target: target.clone() })))
            }
            Action::Put { path, hash, size, meta, .. } | Action::Copy { path, hash, size, meta, .. } => {
                out.push((path.clone(), file(*hash, *size, *meta)))
            }
            Action::Move { from, to, hash, size, meta, .. } => {
                out.push((from.clone(), None));
                out.push((to.clone(), file(*hash, *size, *meta)));
            }
            Action::SetMeta { path, .. } => out.push((path.clone(), local.get(path).cloned())),
            Action::DeleteRemote { path, .. } => out.push((path.clone(), None)),
            Action::Fetch { .. }
            | Action::DeleteLocal { .. }
            | Action::Record { .. }
            | Action::Forget { .. }
            | Action::Conflict { .. } => {}
        }
    }
    out
}

/// `pull --restore-deleted`: paths deleted here that the server still holds as agreed lose their
/// base, so the plan downloads them instead of deleting them on the server.
fn restore_deleted(inputs: &mut input::Inputs) {
    let gone: Vec<RelPath> = inputs
        .synced
        .iter()
        .filter(|(p, s)| {
            !inputs.local.contains_key(*p)
                && s.node.is_some()
                && inputs.remote.get(*p).is_some_and(|e| e.rev == s.rev && e.node.is_some())
        })
        .map(|(p, _)| p.clone())
        .collect();
    for p in gone {
        inputs.synced.remove(&p);
    }
}

/// One line saying what an action does, for `--dry-run` and `status`.
pub fn describe(a: &Action) -> String {
    match a {
        Action::Mkdir { path, .. } => format!("create directory {path} on the server"),
        Action::Symlink { path, target, .. } => format!("upload link {path} -> {target}"),
        Action::Put { path, delta_base: Some(_), .. } => format!("upload {path} (delta)"),
        Action::Put { path, .. } => format!("upload {path}"),
        Action::Copy { path, .. } => format!("copy {path} from content the server has"),
        Action::Move { from, to, .. } => format!("move {from} -> {to} on the server"),
        Action::SetMeta { path, .. } => format!("update mode/mtime of {path} on the server"),
        Action::DeleteRemote { path, .. } => format!("delete {path} on the server"),
        Action::Fetch { entry } => format!("download {}", entry.path),
        Action::DeleteLocal { path, .. } => format!("delete {path} here"),
        Action::Record { entry } => format!("record {} as in sync", entry.path),
        Action::Forget { path } => format!("forget {path} (gone on both sides)"),
        Action::Conflict { remote, .. } => {
            format!("keep both versions of {} (conflict)", remote.path)
        }
    }
}
