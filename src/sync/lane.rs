//! `watch`'s lane for big files: their transfers run on a second connection of their own, beside
//! the rounds, so a file saved while a 1 GiB upload is under way goes out at once instead of
//! after it (a round over one connection serves its requests in order).
//!
//! A round hands the lane its uploads and downloads of files of at least [`BIG_FILE`] once the
//! rest of the round is done (a new file's directory is then on both sides). Until the lane has
//! finished a path, the rounds leave that path alone (whatever else changed there waits: a newer
//! local version goes up in the round after, as a conflict would if the server moved on). The
//! lane carries each one out as a round would, with the executor, and records the outcome (and the
//! stat of what it wrote, so the next scan does not hash it again) in the
//! index through its own connection to it (SQLite serialises the two writers), then wakes the
//! watch for a round. One transfer at a time; the lane's bytes take from the same `--bwlimit`
//! buckets as the rounds'.
//!
//! [`BIG_FILE`]: super::exec::BIG_FILE

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, mpsc};

use super::exec::{BIG_FILE, Exec};
use super::index::{Index, Stat};
use super::plan::Action;
use super::{Settings, SyncError};
use crate::client::Client;
use crate::delta::SigCache;
use crate::hash::ContentHash;
use crate::path::RelPath;
use crate::progress::Progress;
use crate::protocol::{Entry, Node};

/// One transfer for the lane: the action and what the round's scan saw at its path.
pub struct Work {
    action: Action,
    local: Option<Node>,
    cache: Option<(Stat, ContentHash)>,
}

/// What the lane's task needs to carry out a transfer.
pub struct Context {
    pub root: PathBuf,
    pub state_dir: PathBuf,
    pub sigs: SigCache,
    pub settings: Settings,
    pub device: String,
    pub progress: Arc<Progress>,
}

struct Shared {
    /// Paths handed over and not finished yet.
    busy: Mutex<HashSet<RelPath>>,
    /// Woken when a transfer ends: its path is free again, and what it did is in the index.
    done: Notify,
}

pub struct Lane {
    shared: Arc<Shared>,
    tx: mpsc::UnboundedSender<Work>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Lane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lane").field("busy", &self.busy().len()).finish()
    }
}

impl Drop for Lane {
    /// A transfer cut off here is continued by the next run (the server keeps the start of a
    /// big upload, this computer the start of a big download).
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Lane {
    pub fn start(cx: Context) -> Arc<Lane> {
        let shared = Arc::new(Shared { busy: Mutex::default(), done: Notify::new() });
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(run(cx, rx, shared.clone()));
        Arc::new(Lane { shared, tx, task })
    }

    fn busy(&self) -> std::sync::MutexGuard<'_, HashSet<RelPath>> {
        self.shared.busy.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The paths given to the lane and not finished yet.
    pub fn busy_paths(&self) -> HashSet<RelPath> {
        self.busy().clone()
    }

    /// A transfer ended since the last call (or ends later): the caller's wait for the next round.
    pub async fn finished(&self) {
        self.shared.done.notified().await
    }

    /// Drops the actions about paths the lane is still transferring: they wait for it.
    pub fn hold_back(&self, actions: &mut Vec<Action>) -> usize {
        let busy = self.busy();
        if busy.is_empty() {
            return 0;
        }
        let before = actions.len();
        actions.retain(|a| {
            !busy.contains(a.path()) && !matches!(a, Action::Move { from, .. } if busy.contains(from))
        });
        before - actions.len()
    }

    /// Takes the transfers of big files out of `actions` (not yet handed over: see [`give`]).
    /// A download whose content is already here under some name stays in the round, which copies
    /// or renames it instead of fetching it.
    ///
    /// [`give`]: Self::give
    pub fn split_off(
        actions: &mut Vec<Action>,
        local: &BTreeMap<RelPath, Node>,
        cache: &BTreeMap<RelPath, (Stat, ContentHash)>,
    ) -> Vec<Work> {
        let big_fetch = |a: &Action| matches!(a, Action::Fetch { entry: Entry { node: Some(Node::File { size, .. }), .. } } if *size >= BIG_FILE);
        let here: HashSet<ContentHash> = if actions.iter().any(big_fetch) {
            local
                .values()
                .filter_map(|n| match n {
                    Node::File { hash, .. } => Some(*hash),
                    _ => None,
                })
                .collect()
        } else {
            HashSet::new()
        };
        let mut out = Vec::new();
        let mut keep = Vec::with_capacity(actions.len());
        for a in actions.drain(..) {
            let big = match &a {
                Action::Put { size, .. } => *size >= BIG_FILE,
                Action::Fetch { entry: Entry { node: Some(Node::File { hash, .. }), .. } } => {
                    big_fetch(&a) && !here.contains(hash)
                }
                _ => false,
            };
            if big {
                let p = a.path();
                out.push(Work { local: local.get(p).cloned(), cache: cache.get(p).cloned(), action: a });
            } else {
                keep.push(a);
            }
        }
        *actions = keep;
        out
    }

    /// Hands transfers over; their paths are busy until each one ends.
    pub fn give(&self, work: Vec<Work>) {
        let mut busy = self.busy();
        for w in work {
            let p = w.action.path().clone();
            if busy.insert(p.clone()) && self.tx.send(w).is_err() {
                busy.remove(&p);
            }
        }
    }
}

async fn run(cx: Context, mut rx: mpsc::UnboundedReceiver<Work>, shared: Arc<Shared>) {
    let mut client: Option<Client> = None;
    let mut index: Option<Index> = None;
    while let Some(w) = rx.recv().await {
        let path = w.action.path().clone();
        if let Err(e) = transfer(&cx, &mut client, &mut index, w).await {
            cx.progress.say(&format!("error: {path}: {e}; it goes again in a later round"));
            client = None;
            // Not a storm of retries against a server that is down: the watch's own connection
            // notices and waits for it.
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
        // Nothing more queued: the connection goes (a later big file connects again, one
        // handshake against megabytes, rather than finding a connection idle timeouts cut).
        if rx.is_empty() {
            client = None;
        }
        shared.busy.lock().unwrap_or_else(|e| e.into_inner()).remove(&path);
        shared.done.notify_one();
    }
}

async fn transfer(
    cx: &Context,
    client: &mut Option<Client>,
    index: &mut Option<Index>,
    w: Work,
) -> Result<(), SyncError> {
    let c = match client {
        Some(c) => c,
        None => client.insert(Client::connect(&cx.settings.connect()).await?),
    };
    let path = w.action.path().clone();
    let mut exec = Exec::new(
        cx.root.clone(),
        cx.sigs.clone(),
        cx.progress.clone(),
        cx.device.clone(),
        true,
        w.local.map(|n| (path.clone(), n)).into_iter().collect(),
        w.cache.map(|c| (path.clone(), c)).into_iter().collect(),
        Default::default(),
    );
    let r = exec.run(c, vec![w.action]).await;
    cx.progress.flush();
    // Whatever happened, keep what was done (the journal position stays the rounds' business).
    let idx = match index {
        Some(i) => i,
        None => index.insert(Index::open(&cx.state_dir)?),
    };
    idx.apply(&exec.batch)?;
    // What the transfer wrote is known as written: the round it wakes need not hash it again.
    idx.put_stats(&exec.cache)?;
    // A refusal because the server moved on is the next round's to settle, as in a round.
    for e in exec.report.error_lines() {
        cx.progress.say(&format!("error: {e}"));
    }
    for s in &exec.report.skipped {
        cx.progress.say(&format!("warning: skipped {s}"));
    }
    r
}
