//! Group commit of uploads: many small files become durable together, not one fsync and one
//! transaction each.
//!
//! A batch: make every temp file durable ([`fsutil::make_durable`]: one syncfs for many files,
//! parallel fsyncs for a few), then under the account's commit lock check each base revision,
//! record the batch as pending (redo log, one transaction), rename each file into place, make the
//! distinct parent directories durable the same way, and commit all rows and journal lines in
//! one transaction. A crash after the renames is completed at the next start by [`recover`].

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;

use super::Shared;
use super::meta::{AccountId, MetaError, Metadata};
use super::store::{AccountStore, Replaced, Store};
use crate::fsutil::{self, TempGuard};
use crate::path::RelPath;
use crate::protocol::{Entry, Node, Refusal, RefusalKind, Reply};

/// An upload reconstructed and verified into a temp file, waiting for its batch.
pub struct Staged {
    pub id: u64,
    pub path: RelPath,
    pub base_rev: u64,
    pub tmp: TempGuard,
    pub node: Node,
    pub op: &'static str,
}

pub struct Target<'a> {
    pub shared: &'a Arc<Shared>,
    pub account: AccountId,
    pub session: u64,
    pub device: &'a str,
    pub account_name: &'a str,
    pub store: &'a AccountStore,
}

fn server_err(e: impl std::fmt::Display) -> Refusal {
    let text = e.to_string();
    if let Some(r) = super::disk_full(&text) {
        return r;
    }
    tracing::warn!("commit failed: {text}");
    Refusal::new(RefusalKind::Server, format!("server could not store the file: {text}"))
}

/// [`fsutil::make_durable`] on the blocking pool.
async fn durable(paths: Vec<PathBuf>) -> Vec<std::io::Result<()>> {
    tokio::task::spawn_blocking(move || fsutil::make_durable(&paths)).await.unwrap_or_default()
}

/// Commits a batch; returns each upload's reply, in order.
pub async fn commit(t: Target<'_>, staged: Vec<Staged>) -> Vec<(u64, Result<Reply, Refusal>)> {
    let mut results: Vec<(u64, Result<Reply, Refusal>)> = Vec::with_capacity(staged.len());
    let synced = durable(staged.iter().map(|s| s.tmp.path().to_path_buf()).collect()).await;

    let lock = t.shared.commit_lock(t.account);
    let _held = lock.lock().await;
    // Base revisions, now that no other commit of the account can run.
    let paths: Vec<RelPath> = staged.iter().map(|s| s.path.clone()).collect();
    let sh = t.shared.clone();
    let account = t.account;
    type Current = (Vec<(Option<Entry>, bool)>, (u64, Option<u64>));
    let current = tokio::task::spawn_blocking(move || -> Result<Current, MetaError> {
        let entries = paths
            .iter()
            .map(|p| {
                let e = sh.meta.get(account, p)?;
                let full_dir = matches!(e, Some(Entry { node: Some(Node::Dir { .. }), .. }))
                    && sh.meta.has_children(account, p)?;
                Ok((e, full_dir))
            })
            .collect::<Result<Vec<_>, MetaError>>()?;
        Ok((entries, sh.meta.usage(account)?))
    })
    .await;
    let (current, (mut used, quota)) = match current {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return staged.into_iter().map(|s| (s.id, Err(server_err(&e)))).collect(),
        Err(e) => return staged.into_iter().map(|s| (s.id, Err(server_err(&e)))).collect(),
    };
    let mut ok: Vec<Staged> = Vec::new();
    let mut order: Vec<u64> = Vec::new();
    for ((s, sync), (cur, full_dir)) in staged.into_iter().zip(synced).zip(current) {
        order.push(s.id);
        let rev = cur.as_ref().map_or(0, |e| e.rev);
        let r = if let Err(e) = sync {
            Err(server_err(e))
        } else if rev != s.base_rev {
            Err(Refusal::new(
                RefusalKind::Stale,
                format!(
                    "`{}` changed on the server (now rev {rev}, your change was made on rev {}); pull first",
                    s.path, s.base_rev
                ),
            ))
        } else if full_dir {
            Err(Refusal::new(
                RefusalKind::Stale,
                format!("`{}` is a non-empty directory on the server; delete its contents first", s.path),
            ))
        } else {
            // The quota, now exact: the batch's earlier uploads count.
            let replaced = match &cur {
                Some(Entry { node: Some(Node::File { size, .. }), .. }) => *size,
                _ => 0,
            };
            let size = match &s.node {
                Node::File { size, .. } => *size,
                _ => 0,
            };
            match super::session::over_quota(t.account_name, used, quota, &s.path, size, replaced) {
                Err(r) => Err(r),
                Ok(()) => {
                    used = used.saturating_sub(replaced).saturating_add(size);
                    ok.push(s);
                    continue;
                }
            }
        };
        results.push((s.id, r));
    }
    if !ok.is_empty() {
        results.extend(place_and_record(&t, ok).await);
    }
    // Replies go out in request order.
    results.sort_by_key(|(id, _)| order.iter().position(|o| o == id));
    results
}

/// Crash points for the tests, built only with `--features failpoints` (never into a release):
/// the server aborts, as a power cut would stop it, where `DELTASYNC_FAILPOINT` says.
#[cfg(feature = "failpoints")]
fn failpoint(name: &str) {
    if std::env::var("DELTASYNC_FAILPOINT").is_ok_and(|v| v == name) {
        eprintln!("deltasync: failpoint {name}: aborting");
        std::process::abort();
    }
}
#[cfg(not(feature = "failpoints"))]
fn failpoint(_: &str) {}

async fn place_and_record(t: &Target<'_>, ok: Vec<Staged>) -> Vec<(u64, Result<Reply, Refusal>)> {
    failpoint("commit-before-stage");
    let fail_all = |ok: Vec<Staged>, e: &dyn std::fmt::Display| {
        ok.into_iter().map(|s| (s.id, Err(server_err(e)))).collect::<Vec<_>>()
    };
    // Redo log first.
    let sh = t.shared.clone();
    let (account, device) = (t.account, t.device.to_string());
    let items: Vec<(RelPath, PathBuf, Node, &'static str)> =
        ok.iter().map(|s| (s.path.clone(), s.tmp.path().to_path_buf(), s.node.clone(), s.op)).collect();
    let staged_ids = tokio::task::spawn_blocking(move || {
        let refs: Vec<_> = items.iter().map(|(p, t, n, o)| (p, t.as_path(), n, *o)).collect();
        sh.meta.stage(account, &device, &refs)
    })
    .await;
    let ids = match staged_ids {
        Ok(Ok(ids)) => ids,
        Ok(Err(e)) => return fail_all(ok, &e),
        Err(e) => return fail_all(ok, &e),
    };
    failpoint("commit-staged");
    // Renames.
    let store = t.store.clone();
    let moves: Vec<(PathBuf, RelPath)> =
        ok.iter().map(|s| (s.tmp.path().to_path_buf(), s.path.clone())).collect();
    let placed = tokio::task::spawn_blocking(move || {
        moves.iter().map(|(tmp, p)| store.place(tmp, p)).collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default();
    let mut replaced = Vec::new();
    let mut dirs = BTreeSet::new();
    let mut done: Vec<(i64, Staged)> = Vec::new();
    let mut failed = Vec::new();
    let mut dropped = Vec::new();
    for ((s, id), r) in
        ok.into_iter().zip(ids).zip(placed.into_iter().map(Some).chain(std::iter::repeat_with(|| None)))
    {
        match r {
            Some(Ok((dir, old))) => {
                dirs.insert(dir);
                replaced.extend(old);
                done.push((id, s));
            }
            Some(Err(e)) => {
                dropped.push(id);
                failed.push((s.id, Err(Refusal::from(e))));
            }
            None => {
                dropped.push(id);
                failed.push((s.id, Err(server_err("rename task failed"))));
            }
        }
    }
    let _ = durable(dirs.into_iter().collect()).await;
    failpoint("commit-renamed");
    let sh = t.shared.clone();
    let device = t.device.to_string();
    let rows: Vec<(i64, RelPath, Node, &'static str)> =
        done.iter().map(|(id, s)| (*id, s.path.clone(), s.node.clone(), s.op)).collect();
    let committed = tokio::task::spawn_blocking(move || {
        if !dropped.is_empty() {
            let _ = sh.meta.drop_pending(&dropped);
        }
        let refs: Vec<_> = rows.iter().map(|(id, p, n, o)| (*id, p, n, *o)).collect();
        sh.meta.commit_staged(account, &device, &refs)
    })
    .await;
    let mut out = failed;
    match committed {
        Ok(Ok(seqs)) => {
            failpoint("commit-recorded");
            if let Some(max) = seqs.iter().max() {
                t.shared.notify(t.account, *max, t.session);
            }
            for ((_, s), rev) in done.into_iter().zip(seqs) {
                s.tmp.keep();
                out.push((s.id, Ok(Reply::Committed { rev })));
            }
        }
        // The files are in place and the redo log has them: the next start records them.
        Ok(Err(e)) => out.extend(done.into_iter().map(|(_, s)| {
            s.tmp.keep();
            (s.id, Err(server_err(&e)))
        })),
        Err(e) => out.extend(done.into_iter().map(|(_, s)| {
            s.tmp.keep();
            (s.id, Err(server_err(&e)))
        })),
    }
    if !replaced.is_empty() {
        // After the replies: nobody waits for the old blocks to be freed.
        tokio::task::spawn_blocking(move || replaced.into_iter().for_each(|r| r.free()));
    }
    out
}

/// Completes group commits a crash interrupted: a staged file still in the temp area is renamed
/// into place (it was fsynced before it was staged); then the row is recorded.
pub fn recover(meta: &Metadata, store: &Store) -> Result<usize, String> {
    let pending = meta.pending().map_err(|e| e.to_string())?;
    let n = pending.len();
    for p in pending {
        let acct = store.account(p.account).map_err(|e| e.to_string())?;
        let dest = p.path.under(&acct.files);
        let placed = if p.tmp.exists() {
            acct.place(&p.tmp, &p.path)
                .and_then(|(dir, old)| {
                    old.into_iter().for_each(Replaced::free);
                    fsutil::sync_dir(&dir)
                })
                .is_ok()
        } else {
            dest.exists()
        };
        if placed {
            meta.commit_staged(p.account, &p.device, &[(p.id, &p.path, &p.node, &p.op)])
                .map_err(|e| e.to_string())?;
        } else {
            meta.drop_pending(&[p.id]).map_err(|e| e.to_string())?;
        }
    }
    Ok(n)
}
