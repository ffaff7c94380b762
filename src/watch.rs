//! `deltasync watch`: one full round, then a round whenever the folder changes (the `notify`
//! crate's raw events, debounced here) or the server announces a change (a `Notify` pushed on the
//! open connection; nothing polls the wire), plus a periodic rescan for anything a watcher missed.
//!
//! A file whose writer has closed it (inotify's `IN_CLOSE_WRITE`) is complete: when every path
//! changed since the last round is such a file, the next round starts at once. Anything else (a
//! file written but not yet closed, a new folder, a rename, a delete) waits until the folder has
//! been quiet for [`DEBOUNCE`], so a file still being written waits for its writer and a burst of
//! changes becomes one round.
//!
//! Rounds are the same engine as push and pull, so a change made here, a change arriving from
//! another computer, and a change made while no watch ran are all reconciled the same way. A file
//! watch itself just wrote is in the index with its new stat, so the round its event triggers
//! finds nothing to send (no echo).

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use notify::event::{AccessKind, AccessMode, ModifyKind};
use notify::{EventKind, RecursiveMode, Watcher};
use tokio::time::Instant;

use crate::client::{Client, ClientError};
use crate::fsutil::TEMP_PREFIX;
use crate::path::STATE_DIR;
use crate::progress::Progress;
use crate::protocol::{ClientMsg, Request, ServerMsg};
use crate::sync::lane::Lane;
use crate::sync::{Folder, Options, Settings, SyncError};

/// A round that took longer than this (one over a folder of tens of thousands of files) returns
/// the memory it freed to the OS once the watch has been idle for [`TRIM_IDLE`].
const BIG_ROUND: Duration = Duration::from_millis(250);
const TRIM_IDLE: Duration = Duration::from_secs(1);
/// How long the folder must be quiet before a round starts for changes other than closed files:
/// coalesces an editor's write-temp-then-rename and the thousands of events of a `git checkout`,
/// and lets a file still being written finish.
const DEBOUNCE: Duration = Duration::from_millis(50);
/// A folder that never stays quiet (a log written line by line) still gets a round this long
/// after its first unsent change.
const MAX_WAIT: Duration = Duration::from_secs(1);
/// Changed paths remembered between rounds; beyond it the round waits for quiet (a `git checkout`
/// of many files needs no per-path readiness, and memory stays bounded).
const MAX_TRACKED: usize = 4096;
/// Server deletes wait until the folder has been quiet this long, so the mass-delete guard sees a
/// `rm -rf` whole rather than in the pieces the debounce cuts it into.
const DELETE_QUIET: Duration = Duration::from_secs(1);
/// Keep-alive on an idle connection, so a dead server or NAT drop is noticed.
const KEEPALIVE: Duration = Duration::from_secs(30);
/// After this long without a round, the connection's zstd stream is ended (see
/// `FrameWriter::end_stream`).
const STREAM_QUIET: Duration = Duration::from_secs(2);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Immediate re-rounds after refused (stale) changes before waiting for the next event.
const MAX_RETRIES: u32 = 3;

#[derive(Debug, Clone)]
pub struct WatchOptions {
    /// Full rescan period, for changes the watcher missed.
    pub rescan: Duration,
}

impl Default for WatchOptions {
    fn default() -> Self {
        WatchOptions { rescan: Duration::from_secs(300) }
    }
}

/// Watches until `shutdown` completes. Returns an error only for what retrying cannot fix
/// (authentication, protocol version, the folder itself).
pub async fn watch(
    root: &Path,
    opts: Options,
    wopts: WatchOptions,
    progress: Arc<Progress>,
    shutdown: impl Future,
) -> Result<(), SyncError> {
    crate::fsutil::keep_free_memory_small();
    let mut folder = Folder::open(root, true)?;
    let mut settings = folder.settings(&opts)?;
    let opts = Options { upload: true, download: true, ..opts };
    let changes = Arc::new(Changes::default());
    let mut rescan_every = wopts.rescan;
    // The recursive watch is set up once the first round is over, not before it: in a watched
    // folder every open, read and close of a file costs the kernel a check of the folder's watch,
    // and every file the round downloads raises events the next round would only find done
    // already; and notify lists every folder to add its watches (~120 ms for 100,000 files in 100
    // folders). A change made before the watch is in place raises no event, so the watch's
    // first event is its setup ending: one more round then finds what changed meanwhile.
    let mut setup: Option<tokio::task::JoinHandle<Result<notify::RecommendedWatcher, String>>> = None;
    let mut _watcher = None;
    let mut setup_started = false;
    let mut trim_due: Option<Instant> = None;
    tokio::pin!(shutdown);
    let mut client: Option<Client> = None;
    let mut dirty = true;
    let mut retries = 0;
    let mut held_said = None;
    let mut skipped_said = Vec::new();
    let mut last_event: Option<Instant> = None;
    let mut deletes_due: Option<Instant> = None;
    let mut backoff = Duration::from_millis(250);
    let mut down_since_said = false;
    // Once the server has answered as a deltasync server, a later answer that is not one (a
    // connection closed in the middle of the TLS handshake while it restarts) is a passing fault.
    let mut ever_connected = false;
    let mut next_rescan = Instant::now() + rescan_every;
    // Big files' transfers, beside the rounds (see `sync::lane`).
    let mut lane: Option<Arc<Lane>> = None;
    loop {
        let Some(c) = client.as_mut() else {
            match connect(&mut folder, &mut settings, &progress).await {
                Ok(c) => {
                    ever_connected = true;
                    // Made with the settings the first connection settled (the trusted
                    // certificate, a token just issued).
                    if lane.is_none() {
                        lane = Some(Lane::start(crate::sync::lane::Context {
                            root: folder.root.clone(),
                            state_dir: crate::sync::state_dir(&folder.root),
                            sigs: folder.sigs.clone(),
                            settings: settings.clone(),
                            device: settings.device.clone(),
                            progress: progress.clone(),
                        }));
                    }
                    if down_since_said {
                        progress.say(&format!("deltasync: reconnected to {}", settings.server));
                        down_since_said = false;
                    }
                    client = Some(c);
                    backoff = Duration::from_millis(250);
                    dirty = true;
                    continue;
                }
                Err(e)
                    if retryable(&e)
                        || (ever_connected
                            && matches!(e, SyncError::Client(ClientError::NotDeltasync(_)))) =>
                {
                    if !down_since_said {
                        progress.say(&format!("deltasync: {e}; still watching, retrying in the background"));
                        down_since_said = true;
                    }
                    tokio::select! {
                        _ = &mut shutdown => return Ok(()),
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    changes.take();
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
                Err(e) => return Err(e),
            }
        };
        if dirty {
            dirty = false;
            // The round scans the whole folder: every change seen so far is in it.
            if let Some(t) = changes.take().last {
                last_event = Some(t);
            }
            let ropts = Options {
                defer_deletes: last_event.is_some_and(|t| t.elapsed() < DELETE_QUIET),
                lane: lane.clone(),
                ..opts.clone()
            };
            let started = std::time::Instant::now();
            let round = folder.round(c, &ropts, &settings.device, &progress);
            let result = tokio::select! {
                _ = &mut shutdown => return Ok(()),
                r = round => r,
            };
            if !setup_started {
                setup_started = true;
                let (root, changes) = (folder.root.clone(), changes.clone());
                setup = Some(tokio::task::spawn_blocking(move || {
                    // Test-only: a setup as slow as a folder of millions of files, so a test can
                    // change the folder after the first round and before it is watched.
                    #[cfg(feature = "failpoints")]
                    if std::env::var("DELTASYNC_FAILPOINT").is_ok_and(|v| v == "watcher-slow") {
                        std::thread::sleep(Duration::from_secs(5));
                    }
                    start_watcher(&root, changes)
                }));
            }
            // A big round (any over a big folder) frees much more than a watch keeps while idle:
            // the freed memory goes back to the OS (103 MiB -> 15 MiB after a first round of
            // 100,000 files) once the watch is idle, not between rounds that follow each other
            // (the one the watch's setup starts comes right after the first). Not after small
            // rounds: trimming costs ~10 ms.
            if started.elapsed() > BIG_ROUND {
                trim_due = Some(Instant::now() + TRIM_IDLE);
            }
            match result {
                Ok(report) => {
                    for e in report.error_lines() {
                        progress.say(&format!("error: {e}"));
                    }
                    // An unreadable path stays so round after round: said when the list changes.
                    if report.skipped != skipped_said {
                        for s in report.skipped.iter().filter(|s| !skipped_said.contains(s)) {
                            progress.say(&format!("warning: skipped {s}"));
                        }
                        skipped_said = report.skipped.clone();
                    }
                    // Held deletes wait while everything else syncs; said once (again only when
                    // their number changes), not every round. A round that deferred its deletes
                    // did not look at them.
                    if report.deferred_deletes > 0 {
                        deletes_due = last_event.map(|t| t + DELETE_QUIET);
                    } else {
                        let held = report.held.map(|h| h.deletes);
                        if let Some(h) = report.held
                            && held != held_said
                        {
                            progress.say(&format!("deltasync: {}", h.message(&folder.root)));
                        }
                        held_said = held;
                    }
                    // The server moved on meanwhile: fetch and decide again, a few times; a refusal
                    // that persists waits for the next change instead of spinning.
                    if report.unresolved.is_empty() {
                        retries = 0;
                    } else if retries < MAX_RETRIES {
                        retries += 1;
                        dirty = true;
                    }
                }
                Err(SyncError::Client(e)) => {
                    progress.say(&format!("deltasync: connection lost ({e}); retrying"));
                    down_since_said = true;
                    client = None;
                    dirty = true;
                    continue;
                }
                Err(e) => {
                    progress.say(&format!("deltasync: round failed: {e}; retrying at the next change"));
                }
            }
            // A notice that came in during the round may be newer than what the round fetched.
            let last = folder.index.last_seq()?;
            if let Some(c) = client.as_ref() {
                let n = c.notified.load(Ordering::Relaxed);
                if n > last {
                    dirty = true;
                }
            }
            next_rescan = Instant::now() + rescan_every;
            continue;
        }
        let Some(c) = client.as_mut() else { continue };
        let due = changes.due();
        if due.is_some_and(|t| t <= Instant::now()) {
            dirty = true;
            continue;
        }
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            // A change: look again at when the next round is due.
            _ = changes.wake.notified() => {}
            // The watcher is in place: one more round finds what changed before it was.
            r = async { match &mut setup { Some(s) => s.await, None => std::future::pending().await } }, if setup.is_some() => {
                setup = None;
                _watcher = watcher_ready(r, &folder.root, &mut rescan_every, &mut next_rescan, &progress);
                dirty = true;
            }
            // A big file's transfer ended: what changed meanwhile at its path goes now.
            _ = async { match &lane { Some(l) => l.finished().await, None => std::future::pending().await } } => dirty = true,
            _ = tokio::time::sleep_until(due.unwrap_or(next_rescan)), if due.is_some() => {}
            _ = tokio::time::sleep_until(trim_due.unwrap_or(next_rescan)), if trim_due.is_some() => {
                trim_due = None;
                folder.wait_freed();
                crate::fsutil::release_free_memory();
            }
            _ = tokio::time::sleep_until(deletes_due.unwrap_or(next_rescan)), if deletes_due.is_some() => {
                deletes_due = None;
                dirty = true;
            }
            msg = c.rd.recv::<ServerMsg>() => match msg {
                Ok(Some(ServerMsg::Notify { seq })) => {
                    c.notified.fetch_max(seq, Ordering::Relaxed);
                    if seq > folder.index.last_seq()? {
                        dirty = true;
                    }
                }
                // Not a reason to retry: the token is dead.
                Ok(Some(ServerMsg::Revoked { message })) => {
                    return Err(SyncError::Client(ClientError::Auth(message)));
                }
                Ok(Some(_)) => {} // the reply to a keep-alive
                Ok(None) | Err(_) => {
                    progress.say(&format!("deltasync: the server at {} went away; still watching, retrying", settings.server));
                    down_since_said = true;
                    client = None;
                }
            },
            _ = tokio::time::sleep_until(next_rescan) => dirty = true,
            // Quiet: free this side's compression stream (the server frees its own).
            _ = tokio::time::sleep(STREAM_QUIET), if c.wr.streaming() => {
                if c.wr.end_stream().await.is_err() {
                    client = None;
                }
            }
            _ = tokio::time::sleep(KEEPALIVE) => {
                let id = c.next_id();
                if c.wr.send(&ClientMsg::Req { id, req: Request::Ping }).await.is_err() {
                    client = None;
                }
            }
        }
    }
}

/// The watcher, once its setup (after the first round) is done; or, if it failed, a warning and
/// a rescan every 10 s instead.
fn watcher_ready(
    setup: Result<Result<notify::RecommendedWatcher, String>, tokio::task::JoinError>,
    root: &Path,
    rescan_every: &mut Duration,
    next_rescan: &mut Instant,
    progress: &Progress,
) -> Option<notify::RecommendedWatcher> {
    let e = match setup {
        Ok(Ok(w)) => return Some(w),
        Ok(Err(e)) => e,
        Err(e) => e.to_string(),
    };
    *rescan_every = (*rescan_every).min(Duration::from_secs(10));
    *next_rescan = (*next_rescan).min(Instant::now() + *rescan_every);
    progress.say(&format!(
        "warning: cannot watch {} for changes ({e}); scanning every {} s instead.{}",
        root.display(),
        rescan_every.as_secs(),
        if e.contains("No space left") || e.contains("limit") {
            " The inotify watch limit is reached: raise it with `sudo sysctl fs.inotify.max_user_watches=1048576` (and in /etc/sysctl.conf to keep it)."
        } else {
            ""
        }
    ));
    None
}

/// Connects, then remembers for the next reconnect what this connection settled: the server's
/// certificate is trusted now (no second "trusting on first use"), and a token open
/// registration just issued is this folder's (not a reason to register again).
async fn connect(
    folder: &mut Folder,
    settings: &mut Settings,
    progress: &Progress,
) -> Result<Client, SyncError> {
    let mut c = folder.connect(settings, progress).await?;
    settings.trust = c.seen.trust(&settings.trust);
    if let Some(t) = &c.new_token {
        settings.token = Some(t.clone());
    }
    c.call(Request::Subscribe).await?;
    Ok(c)
}

fn retryable(e: &SyncError) -> bool {
    matches!(
        e,
        SyncError::Client(ClientError::Unreachable { .. } | ClientError::Protocol(_) | ClientError::Fatal(_))
    )
}

/// What the file-system watcher saw since the last round started, shared between notify's thread
/// and the watch loop.
#[derive(Default)]
struct Changes {
    pending: Mutex<Pending>,
    /// Woken on every change (a permit is kept if the loop is busy with a round).
    wake: tokio::sync::Notify,
}

#[derive(Default)]
struct Pending {
    /// Each changed path, and whether its writer has closed it since its last change.
    paths: HashMap<PathBuf, bool>,
    /// Paths in `paths` not closed since their last change.
    open: usize,
    /// Too many paths to track, or the watcher lost events: wait for quiet.
    crowded: bool,
    first: Option<Instant>,
    last: Option<Instant>,
}

/// What one raw event says about its paths.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Seen {
    /// Written and closed by its writer: complete.
    Closed,
    /// Permissions or times: leaves a closed file closed.
    Meta,
    /// Anything else: wait for quiet.
    Changed,
}

impl Changes {
    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Everything seen so far, leaving nothing pending.
    fn take(&self) -> Pending {
        std::mem::take(&mut *self.lock())
    }

    /// When the next round should start for what is pending: at once if every changed path is a
    /// file its writer closed, else once the folder has been quiet for [`DEBOUNCE`] (at most
    /// [`MAX_WAIT`] after the first change).
    fn due(&self) -> Option<Instant> {
        let p = self.lock();
        let first = p.first?;
        if !p.crowded && p.open == 0 && !p.paths.is_empty() {
            return Some(first);
        }
        Some((p.last.unwrap_or(first) + DEBOUNCE).min(first + MAX_WAIT))
    }

    fn note(&self, paths: &[PathBuf], seen: Option<Seen>) {
        let now = Instant::now();
        let mut p = self.lock();
        p.first.get_or_insert(now);
        p.last = Some(now);
        match seen {
            None => {
                p.crowded = true;
                p.paths = HashMap::new();
                p.open = 0;
            }
            Some(_) if p.crowded => {}
            Some(seen) => {
                for path in paths {
                    let was = p.paths.get(path).copied();
                    if was.is_none() && p.paths.len() >= MAX_TRACKED {
                        p.crowded = true;
                        p.paths = HashMap::new();
                        p.open = 0;
                        break;
                    }
                    let closed = match seen {
                        Seen::Closed => true,
                        Seen::Meta => was == Some(true),
                        Seen::Changed => false,
                    };
                    p.paths.insert(path.clone(), closed);
                    match (was, closed) {
                        (None | Some(true), false) => p.open += 1,
                        (Some(false), true) => p.open -= 1,
                        _ => {}
                    }
                }
            }
        }
        drop(p);
        self.wake.notify_one();
    }
}

/// What an event says about its paths; `None` for events that are not changes.
fn seen(kind: &EventKind) -> Option<Seen> {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => Some(Seen::Closed),
        // Reads are not changes: our own scan opens every directory and file, and an access event
        // would start the next round, forever.
        EventKind::Access(_) | EventKind::Other => None,
        EventKind::Modify(ModifyKind::Metadata(_)) => Some(Seen::Meta),
        EventKind::Any | EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_) => {
            Some(Seen::Changed)
        }
    }
}

/// Starts the recursive watcher (one inotify watch per folder; new folders are added as they
/// appear), feeding `changes`.
fn start_watcher(root: &Path, changes: Arc<Changes>) -> Result<notify::RecommendedWatcher, String> {
    let state: PathBuf = root.join(STATE_DIR);
    // Changes only: no open or read-close events (the kernel queued one for every file our own
    // scan and uploads opened, and woke the watcher's thread for each).
    let kinds = notify::EventKindMask::CREATE
        | notify::EventKindMask::REMOVE
        | notify::EventKindMask::ALL_MODIFY
        | notify::EventKindMask::ACCESS_CLOSE;
    let config = notify::Config::default().with_event_kinds(kinds);
    let mut watcher = notify::RecommendedWatcher::new(
        move |res: notify::Result<notify::Event>| match res {
            // The kernel's queue overflowed: events were lost, the next round rescans everything.
            Ok(e) if e.need_rescan() => changes.note(&[], None),
            Ok(e) => {
                let Some(seen) = seen(&e.kind) else { return };
                let paths: Vec<PathBuf> = e.paths.into_iter().filter(|p| !ours(p, &state)).collect();
                if !paths.is_empty() {
                    changes.note(&paths, Some(seen));
                }
            }
            // A failed watcher (a new folder over the watch limit): rescan to be safe.
            Err(_) => changes.note(&[], None),
        },
        config,
    )
    .map_err(|e| e.to_string())?;
    watcher.watch(root, RecursiveMode::Recursive).map_err(|e| e.to_string())?;
    // Not the state folder: every write of the index's log raised an event there, and woke the
    // watcher's thread only for `ours` to drop it (13,000 wake-ups in a first round of 100,000
    // files). Its events, if it is made again, are still dropped by `ours`.
    let _ = watcher.unwatch(&root.join(STATE_DIR));
    Ok(watcher)
}

/// Events on deltasync's own state and temp files do not start a round.
fn ours(p: &Path, state: &Path) -> bool {
    p.starts_with(state) || p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(TEMP_PREFIX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Vec<PathBuf> {
        vec![PathBuf::from(s)]
    }

    #[test]
    fn a_closed_file_is_due_at_once_and_an_open_one_after_quiet() {
        let c = Changes::default();
        assert_eq!(c.due(), None, "nothing pending");
        // Created, written, closed: due now.
        c.note(&p("/r/a"), Some(Seen::Changed));
        let after_write = c.due().expect("pending");
        assert!(after_write > Instant::now(), "a file still open waits");
        c.note(&p("/r/a"), Some(Seen::Closed));
        assert!(c.due().expect("pending") <= Instant::now(), "a closed file is due at once");
        // A permissions change keeps it closed; a second file still open makes both wait.
        c.note(&p("/r/a"), Some(Seen::Meta));
        assert!(c.due().expect("pending") <= Instant::now());
        c.note(&p("/r/b"), Some(Seen::Changed));
        assert!(c.due().expect("pending") > Instant::now(), "b is still being written");
        c.note(&p("/r/b"), Some(Seen::Closed));
        assert!(c.due().expect("pending") <= Instant::now());
        // Written again after its close: open again.
        c.note(&p("/r/a"), Some(Seen::Changed));
        assert!(c.due().expect("pending") > Instant::now());
        let taken = c.take();
        assert_eq!(taken.paths.len(), 2);
        assert_eq!(c.due(), None, "a round took everything");
    }

    #[test]
    fn a_lost_event_or_too_many_paths_wait_for_quiet() {
        let c = Changes::default();
        c.note(&[], None);
        assert!(c.due().expect("pending") > Instant::now(), "an overflow waits for quiet");
        c.note(&p("/r/a"), Some(Seen::Closed));
        assert!(c.due().expect("pending") > Instant::now(), "still: events were lost");
        c.take();
        for i in 0..=MAX_TRACKED {
            c.note(&p(&format!("/r/{i}")), Some(Seen::Closed));
        }
        let pending = c.lock();
        assert!(pending.crowded && pending.paths.is_empty(), "bounded: {} paths", pending.paths.len());
        drop(pending);
        assert!(c.due().expect("pending") > Instant::now());
    }

    #[test]
    fn a_folder_that_never_stays_quiet_gets_a_round_within_max_wait() {
        let c = Changes::default();
        c.note(&p("/r/log"), Some(Seen::Changed));
        let first = c.lock().first.expect("first");
        c.lock().first = Some(first - MAX_WAIT);
        c.note(&p("/r/log"), Some(Seen::Changed));
        assert!(c.due().expect("pending") <= Instant::now(), "due MAX_WAIT after the first change");
    }

    /// The real watcher on a real folder: a file written and closed is seen closed (so its
    /// round starts at once), and reading files is no change at all.
    #[test]
    fn the_watcher_sees_a_written_file_closed_and_reads_not_at_all() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("sub")).unwrap();
        std::fs::write(d.path().join("sub/old"), b"old").unwrap();
        let changes = Arc::new(Changes::default());
        let _w = start_watcher(d.path(), changes.clone()).unwrap();
        let settle = |what: &str, done: &dyn Fn(&Pending) -> bool| {
            let until = std::time::Instant::now() + Duration::from_secs(10);
            while !done(&changes.lock()) {
                assert!(std::time::Instant::now() < until, "{what}: {:?}", changes.lock().paths);
                std::thread::sleep(Duration::from_millis(10));
            }
        };
        let new = d.path().join("sub/new");
        std::fs::write(&new, b"new").unwrap();
        settle("the written file, closed", &|p| p.paths.get(&new) == Some(&true) && p.open == 0);
        changes.take();
        for _ in 0..3 {
            assert_eq!(std::fs::read(d.path().join("sub/old")).unwrap(), b"old");
            assert_eq!(std::fs::read_dir(d.path().join("sub")).unwrap().count(), 2);
        }
        // A change after the reads, so the reads' events (if any) were delivered before it.
        let marker = d.path().join("marker");
        std::fs::write(&marker, b"m").unwrap();
        settle("the marker", &|p| p.paths.contains_key(&marker));
        let p = changes.lock();
        assert_eq!(p.paths.keys().collect::<Vec<_>>(), vec![&marker], "reads were taken for changes");
    }

    #[test]
    fn reads_are_not_changes_and_a_close_after_writing_is() {
        use notify::event::{CreateKind, DataChange, MetadataKind, RemoveKind};
        assert_eq!(seen(&EventKind::Access(AccessKind::Close(AccessMode::Write))), Some(Seen::Closed));
        assert_eq!(seen(&EventKind::Access(AccessKind::Close(AccessMode::Read))), None);
        assert_eq!(seen(&EventKind::Access(AccessKind::Open(AccessMode::Any))), None);
        assert_eq!(seen(&EventKind::Modify(ModifyKind::Metadata(MetadataKind::Any))), Some(Seen::Meta));
        assert_eq!(seen(&EventKind::Modify(ModifyKind::Data(DataChange::Any))), Some(Seen::Changed));
        assert_eq!(seen(&EventKind::Create(CreateKind::File)), Some(Seen::Changed));
        assert_eq!(seen(&EventKind::Remove(RemoveKind::Folder)), Some(Seen::Changed));
    }
}
