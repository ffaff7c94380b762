//! Restore and undo on the server: both decide a target state for some paths from history and
//! commit it as new changes (op `restore` or `undo`), so it reaches every computer like any
//! other change, and what it replaces stays in history.
//!
//! Deletes go first, deepest paths first (a directory is emptied before it goes); then every
//! other change in path order (a directory is made before what goes in it). Each path is one
//! step, checked in the commit's transaction: one that cannot be made (its content was pruned,
//! another change raced it) is reported as skipped and the rest go on.

use std::collections::BTreeMap;

use super::meta::{AccountId, Change, MetaError, Metadata, Step};
use crate::path::RelPath;
use crate::protocol::{At, MAX_LOG, Node, Refusal, Reply};

pub enum Revert {
    /// `path` (everything without one) as it was at `at`.
    Restore { path: Option<RelPath>, at: At },
    /// Every change `device` made at or after `since` reverted.
    Undo { device: String, since: i64 },
}

/// Plans and commits a revert; the reply and the revision of its last change (0: none).
pub fn run(
    m: &Metadata,
    account: AccountId,
    device: &str,
    what: &Revert,
) -> Result<Result<(Reply, u64), Refusal>, MetaError> {
    // path → (current revision, current node, target node)
    let mut plan: BTreeMap<RelPath, (u64, Option<Node>, Option<Node>)> = BTreeMap::new();
    let mut skipped = Vec::new();
    let op = match what {
        Revert::Restore { path, at } => {
            let rev = m.rev_at(account, *at)?;
            let mut target: BTreeMap<RelPath, Node> = BTreeMap::new();
            let mut after: Option<RelPath> = None;
            loop {
                let page = m.snapshot(account, path.as_ref(), rev, after.as_ref(), MAX_LOG)?;
                let more = page.len() as u32 >= MAX_LOG;
                after = page.last().map(|v| v.path.clone());
                for v in page {
                    if let Some(n) = v.node {
                        target.insert(v.path, n);
                    }
                }
                if !more {
                    break;
                }
            }
            // The directories above a restored path, where they are gone now.
            if let Some(p) = path {
                for a in p.ancestors() {
                    if !matches!(m.get(account, &a)?.and_then(|e| e.node), Some(Node::Dir { .. })) {
                        let mode = match m.snapshot(account, Some(&a), rev, None, 1)?.pop() {
                            Some(v) if v.path == a => match v.node {
                                Some(Node::Dir { mode }) => mode,
                                _ => 0o755,
                            },
                            _ => 0o755,
                        };
                        target.insert(a, Node::Dir { mode });
                    }
                }
            }
            for e in m.live_under(account, path.as_ref())? {
                plan.insert(e.path.clone(), (e.rev, e.node.clone(), target.remove(&e.path)));
            }
            for (p, n) in target {
                let cur = m.get(account, &p)?;
                let (rev, node) = cur.map_or((0, None), |e| (e.rev, e.node));
                plan.insert(p, (rev, node, Some(n)));
            }
            "restore"
        }
        Revert::Undo { device: who, since } => {
            for versions in m.histories_touched_by(account, who, *since)? {
                let Some(first) = versions.iter().position(|v| v.device == *who && v.time >= *since) else {
                    continue;
                };
                let Some(last) = versions.last() else { continue };
                if versions[first..].iter().any(|v| v.device != *who) {
                    skipped.push(last.path.clone());
                    continue;
                }
                let before = if first == 0 { None } else { versions[first - 1].node.clone() };
                plan.insert(last.path.clone(), (last.rev, last.node.clone(), before));
            }
            "undo"
        }
    };
    plan.retain(|_, (_, cur, target)| cur != target);
    let change = |path: &RelPath, rev: u64, node: Option<Node>| Step {
        op,
        changes: vec![Change { path: path.clone(), base_rev: rev, node, chunks: None }],
    };
    let mut order: Vec<&RelPath> = Vec::new();
    let mut steps = Vec::new();
    for (p, (rev, _, target)) in plan.iter().rev() {
        if target.is_none() {
            steps.push(change(p, *rev, None));
            order.push(p);
        }
    }
    for (p, (rev, _, target)) in &plan {
        if target.is_some() {
            steps.push(change(p, *rev, target.clone()));
            order.push(p);
        }
    }
    let results = m.commit(account, device, &steps)?;
    let mut changed = Vec::new();
    let mut last = 0;
    for (p, r) in order.into_iter().zip(results) {
        match r {
            Ok(rev) => {
                last = last.max(rev);
                changed.push(p.clone());
            }
            Err(refusal) => {
                tracing::info!("{op} skipped `{p}`: {}", refusal.message);
                skipped.push(p.clone());
            }
        }
    }
    Ok(Ok((Reply::Reverted { rev: last, changed, skipped }, last)))
}
