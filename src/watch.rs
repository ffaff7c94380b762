//! `deltasync watch`: one full round, then a round whenever the folder changes (the `notify`
//! crate, debounced) or the server announces a change (a `Notify` pushed on the open
//! connection; nothing polls the wire), plus a periodic rescan for anything a watcher missed.
//!
//! Rounds are the same engine as push and pull, so a change made here, a change arriving from
//! another computer, and a change made while no watch ran are all reconciled the same way. A file
//! watch itself just wrote is in the index with its new stat, so the round its event triggers
//! finds nothing to send (no echo).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use notify::RecursiveMode;
use notify_debouncer_full::{DebounceEventResult, new_debouncer};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::client::{Client, ClientError};
use crate::fsutil::TEMP_PREFIX;
use crate::path::STATE_DIR;
use crate::progress::Progress;
use crate::protocol::{ClientMsg, Request, ServerMsg};
use crate::sync::{Folder, Options, Settings, SyncError};

/// How long the folder must be quiet before a round starts: coalesces an editor's
/// write-temp-then-rename and the thousands of events of a `git checkout`, yet keeps a single
/// save's latency well under the 200 ms target.
/// A round that took longer than this returns the memory it freed to the OS.
const BIG_ROUND: Duration = Duration::from_secs(2);
const DEBOUNCE: Duration = Duration::from_millis(50);
/// Server deletes wait until the folder has been quiet this long, so the mass-delete guard sees a
/// `rm -rf` whole rather than in the pieces the debouncer cuts it into.
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
    let mut folder = Folder::open(root, true)?;
    let mut settings = folder.settings(&opts)?;
    let opts = Options { upload: true, download: true, ..opts };
    let (fs_tx, mut fs_rx) = mpsc::unbounded_channel::<()>();
    let mut rescan_every = wopts.rescan;
    let _watcher = match start_watcher(&folder.root, fs_tx) {
        Ok(w) => Some(w),
        Err(e) => {
            rescan_every = rescan_every.min(Duration::from_secs(10));
            progress.say(&format!(
                "warning: cannot watch {} for changes ({e}); scanning every {} s instead.{}",
                folder.root.display(),
                rescan_every.as_secs(),
                if e.contains("No space left") || e.contains("limit") {
                    " The inotify watch limit is reached: raise it with `sudo sysctl fs.inotify.max_user_watches=1048576` (and in /etc/sysctl.conf to keep it)."
                } else {
                    ""
                }
            ));
            None
        }
    };
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
    loop {
        let Some(c) = client.as_mut() else {
            match connect(&mut folder, &mut settings, &progress).await {
                Ok(c) => {
                    ever_connected = true;
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
                    while fs_rx.try_recv().is_ok() {}
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
                Err(e) => return Err(e),
            }
        };
        if dirty {
            dirty = false;
            let ropts = Options {
                defer_deletes: last_event.is_some_and(|t| t.elapsed() < DELETE_QUIET),
                ..opts.clone()
            };
            let started = std::time::Instant::now();
            let round = folder.round(c, &ropts, &settings.device, &progress);
            let result = tokio::select! {
                _ = &mut shutdown => return Ok(()),
                r = round => r,
            };
            // A big round (the first over a big folder) frees much more than a watch keeps while
            // idle: give the freed memory back to the OS (103 MiB -> 15 MiB after a first round of
            // 100,000 files). Not after small rounds: trimming costs ~10 ms of their latency.
            if started.elapsed() > BIG_ROUND {
                crate::fsutil::release_free_memory();
            }
            match result {
                Ok(report) => {
                    for e in &report.errors {
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
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            ev = fs_rx.recv() => {
                if ev.is_some() {
                    while fs_rx.try_recv().is_ok() {}
                    dirty = true;
                    last_event = Some(Instant::now());
                }
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

/// Starts the recursive watcher; each batch of relevant events sends one `()`.
fn start_watcher(
    root: &Path,
    tx: mpsc::UnboundedSender<()>,
) -> Result<
    notify_debouncer_full::Debouncer<notify::RecommendedWatcher, notify_debouncer_full::RecommendedCache>,
    String,
> {
    let state: PathBuf = root.join(STATE_DIR);
    let mut debouncer = new_debouncer(DEBOUNCE, None, move |res: DebounceEventResult| match res {
        Ok(events) => {
            // Reads are not changes: our own scan opens every directory, and an access event would
            // start the next round, forever.
            let relevant = events.iter().any(|e| {
                !matches!(e.kind, notify::EventKind::Access(_)) && e.paths.iter().any(|p| !ours(p, &state))
            });
            if relevant {
                let _ = tx.send(());
            }
        }
        // An overflowed or failed watcher: rescan to be safe.
        Err(_) => {
            let _ = tx.send(());
        }
    })
    .map_err(|e| e.to_string())?;
    debouncer.watch(root, RecursiveMode::Recursive).map_err(|e| e.to_string())?;
    Ok(debouncer)
}

/// Events on deltasync's own state and temp files do not start a round.
fn ours(p: &Path, state: &Path) -> bool {
    p.starts_with(state) || p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(TEMP_PREFIX))
}
