//! Group commit: many uploads become durable together, not one fsync and one transaction each.
//!
//! An upload's new chunks were appended to the session's open pack as it was rebuilt. A batch:
//! finish that pack (one fsync) and record it, then commit every staged upload in one metadata
//! transaction that checks each base revision (and quota, parents, replaced directories) and
//! writes each version. Nothing is renamed and nothing needs redoing after a crash: a crash
//! before the transaction leaves packs (or chunks) nothing refers to, which a prune collects;
//! after it, the versions are committed and their chunks durable.
//!
//! A session runs one batch's commit in a task of its own while it receives and rebuilds the
//! next batch (a commit of a thousand small uploads is mostly metadata work): the next batch's
//! chunks go into a new pack, and its replies wait for the commit before them.

use std::collections::HashSet;
use std::sync::Arc;

use super::Shared;
use super::content::{ChunkKey, ChunkList, Taken};
use super::meta::{AccountId, Change, Step};
use crate::path::RelPath;
use crate::protocol::{Node, Refusal, RefusalKind, Reply};

/// An upload rebuilt and verified, its new chunks in the open pack, waiting for its batch.
pub struct Staged {
    pub id: u64,
    pub path: RelPath,
    pub base_rev: u64,
    pub node: Node,
    pub op: &'static str,
    /// The content's chunks, or `None` for content the account holds already (a copy).
    pub chunks: Option<Vec<(ChunkKey, u32)>>,
    /// The new version's signature, in chunks of the same pack.
    pub sig: Option<ChunkList>,
}

/// The uploads staged for the next batch, with their paths as a set: every upload asks whether
/// its path waits here (a scan of the list for each made that check, comparing paths of one
/// length byte by byte, the server's biggest single cost on many small files).
#[derive(Default)]
pub struct Staging {
    list: Vec<Staged>,
    paths: HashSet<RelPath>,
    /// The bytes of the staged files.
    bytes: u64,
}

impl Staging {
    pub fn push(&mut self, s: Staged) {
        if let Node::File { size, .. } = &s.node {
            self.bytes += size;
        }
        self.paths.insert(s.path.clone());
        self.list.push(s);
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Whether the batch is as big as one gets (`files` uploads or `bytes`).
    pub fn full(&self, files: usize, bytes: u64) -> bool {
        self.list.len() >= files || self.bytes >= bytes
    }

    pub fn contains(&self, path: &RelPath) -> bool {
        self.paths.contains(path)
    }

    /// Takes the staged uploads and their paths, leaving it empty.
    pub fn take(&mut self) -> (Vec<Staged>, HashSet<RelPath>) {
        self.bytes = 0;
        (std::mem::take(&mut self.list), std::mem::take(&mut self.paths))
    }
}

pub struct Target {
    pub shared: Arc<Shared>,
    pub account: AccountId,
    pub session: u64,
    pub device: String,
}

pub fn server_err(e: impl std::fmt::Display) -> Refusal {
    let text = e.to_string();
    if let Some(r) = super::disk_full(&text) {
        return r;
    }
    tracing::warn!("commit failed: {text}");
    Refusal::new(RefusalKind::Server, format!("server could not store the file: {text}"))
}

/// Crash points for the tests, built only with `--features failpoints` (never into a release):
/// the server aborts, as a power cut would stop it, where `DELTASYNC_FAILPOINT` says.
#[cfg(feature = "failpoints")]
pub fn failpoint(name: &str) {
    if std::env::var("DELTASYNC_FAILPOINT").is_ok_and(|v| v == name) {
        eprintln!("deltasync: failpoint {name}: aborting");
        std::process::abort();
    }
}
#[cfg(not(feature = "failpoints"))]
pub fn failpoint(_: &str) {}

/// Commits a batch; returns each upload's reply, in order.
/// `pack` is the session's pack taken out with the batch's new chunks (see
/// [`PackSink::take_pack`](super::content::PackSink::take_pack)): the session fills the next one
/// meanwhile.
pub async fn commit(
    t: Target,
    staged: Vec<Staged>,
    pack: Option<Taken>,
) -> Vec<(u64, Result<Reply, Refusal>)> {
    failpoint("commit-before-seal");
    let (sh, account, device) = (t.shared.clone(), t.account, t.device.clone());
    let steps: Vec<Step> = staged
        .iter()
        .map(|s| Step {
            op: s.op,
            changes: vec![Change {
                path: s.path.clone(),
                base_rev: s.base_rev,
                node: Some(s.node.clone()),
                chunks: s.chunks.clone(),
            }],
        })
        .collect();
    let sigs: Vec<_> = staged
        .iter()
        .filter_map(|s| match (&s.node, &s.sig) {
            (Node::File { hash, size, .. }, Some(sig)) => Some((*hash, *size, sig.clone())),
            _ => None,
        })
        .collect();
    let lock = t.shared.commit_lock(t.account);
    let _held = lock.lock().await;
    // A failure's warning names the session (its span) and the batch's paths.
    let first = staged.first().map(|s| s.path.to_string()).unwrap_or_default();
    let span = tracing::info_span!("commit", files = staged.len(), first = %first);
    let done = tokio::task::spawn_blocking(move || -> Result<Vec<Result<u64, Refusal>>, Refusal> {
        let _span = span.enter();
        // The chunks first, durable; then, in one transaction, the pack and the versions that
        // refer to it.
        let sealed = pack.map(Taken::finish).transpose().map_err(server_err)?;
        failpoint("commit-sealed");
        let r = sh.meta.commit_with_pack(account, &device, sealed.as_ref(), &steps).map_err(server_err)?;
        failpoint("commit-recorded");
        for (hash, size, sig) in &sigs {
            // A signature is only a saving; failing to record one fails nothing.
            let _ = sh.sigs.record(hash, *size, sig);
        }
        Ok(r)
    })
    .await;
    let results = match done {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return staged.iter().map(|s| (s.id, Err(e.clone()))).collect(),
        Err(e) => return staged.iter().map(|s| (s.id, Err(server_err(&e)))).collect(),
    };
    if let Some(max) = results.iter().filter_map(|r| r.as_ref().ok()).max() {
        t.shared.notify(t.account, *max, t.session);
    }
    // Signatures are kept for a path's current and previous versions (a computer one version
    // behind gets a delta at once); older ones go (made again from the chunks if asked for).
    let big: Vec<RelPath> = staged
        .iter()
        .zip(&results)
        .filter(|(s, r)| {
            r.is_ok() && matches!(s.node, Node::File { size, .. } if size >= crate::delta::WHOLE_FILE_BELOW)
        })
        .map(|(s, _)| s.path.clone())
        .collect();
    if !big.is_empty() {
        let (sh, account) = (t.shared.clone(), t.account);
        tokio::task::spawn_blocking(move || {
            for p in big {
                if let Ok(v) = sh.meta.log(account, Some(&p), false, 3)
                    && let [new, prev, old] = v.as_slice()
                    && let Some(Node::File { hash, size, .. }) = &old.node
                    && ![&new.node, &prev.node]
                        .iter()
                        .any(|n| matches!(n, Some(Node::File { hash: h, .. }) if h == hash))
                {
                    sh.sigs.remove(hash, *size);
                }
            }
        });
    }
    staged.iter().zip(results).map(|(s, r)| (s.id, r.map(|rev| Reply::Committed { rev }))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The set of staged paths follows the list: every path pushed is found until the batch is
    /// taken, and the batch is full at its count or its bytes.
    #[test]
    fn staged_paths_are_found_until_the_batch_is_taken() {
        let staged = |path: &str, size| Staged {
            id: 0,
            path: RelPath::new(path).unwrap(),
            base_rev: 0,
            node: Node::File {
                hash: crate::hash::ContentHash::of(b""),
                size,
                meta: crate::protocol::Meta { mtime_ns: 0, mode: 0o644 },
            },
            op: "write",
            chunks: None,
            sig: None,
        };
        let mut s = Staging::default();
        s.push(staged("a/x", 10));
        s.push(staged("a/y", 20));
        let (x, y, z) =
            (RelPath::new("a/x").unwrap(), RelPath::new("a/y").unwrap(), RelPath::new("a/z").unwrap());
        assert!(s.contains(&x) && s.contains(&y) && !s.contains(&z));
        assert!(!s.full(3, 31) && s.full(2, 1000) && s.full(10, 30));
        let (list, paths) = s.take();
        assert_eq!(list.len(), 2);
        assert_eq!(paths, HashSet::from([x.clone(), y]));
        assert!(s.is_empty() && !s.contains(&x) && !s.full(1, 1));
    }
}
