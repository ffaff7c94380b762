//! The prelude every command shares (`push`, `pull`, `watch`, `status`): the index's view of the
//! server and of the agreed bases, the ignore rules and the scan, made into the three maps the
//! planner takes. One copy, so the commands cannot disagree about what is pending.

use std::collections::BTreeMap;
use std::path::Path;

use super::index::{Index, IndexError, Synced};
use super::plan::{merge3, same};
use super::rules::IgnoreRules;
use super::scan::Scan;
use crate::path::RelPath;
use crate::protocol::{Entry, Node};

/// What the index holds about the server, read whole.
pub struct Base {
    pub remote: BTreeMap<RelPath, Entry>,
    pub synced: BTreeMap<RelPath, Synced>,
    pub intents: Vec<(RelPath, Option<Node>)>,
    pub last_seq: u64,
}

impl Base {
    fn read(index: &Index) -> Result<Base, IndexError> {
        Ok(Base {
            remote: index.remote()?,
            synced: index.synced()?,
            intents: index.intents()?,
            last_seq: index.last_seq()?,
        })
    }

    /// Reads the index. A damaged one is never trusted to delete: with `repair`, its server
    /// state is forgotten (the round rebuilds it from the folder and the server, deleting
    /// nothing) and the returned note says so; without, the damage is the error.
    pub fn load(index: &Index, repair: bool) -> Result<(Base, Option<String>), IndexError> {
        let mut note = index.fresh.then(|| {
            "the index in .deltasync/ is from an older version; re-checking every path against the server \
             (nothing is deleted, differing versions are kept as conflict copies)"
                .to_string()
        });
        let base = match Base::read(index) {
            Ok(b) => b,
            Err(e @ IndexError::Damaged { .. }) if repair => {
                index.forget_server_state()?;
                note = Some(format!(
                    "{e}; rebuilding the index from this folder and the server \
                     (nothing is deleted, differing versions are kept as conflict copies)"
                ));
                Base::read(index)?
            }
            Err(e) => return Err(e),
        };
        Ok((base, note))
    }
}

/// The planner's inputs for one round.
pub struct Inputs {
    pub local: BTreeMap<RelPath, Node>,
    pub remote: BTreeMap<RelPath, Entry>,
    pub synced: BTreeMap<RelPath, Synced>,
    /// Bases moved to the server's version because that version is one of this computer's own
    /// uploads, from a round that stopped before it could record them.
    pub adopted: Vec<(RelPath, Synced)>,
}

/// Merges the server's `changes` into the base, adopts this computer's own unrecorded uploads,
/// and leaves out of all three maps every path that is ignored or could not be read here, with
/// the same decision for all three (a path is a directory if any side says so).
pub fn prepare(scan: &Scan, rules: &IgnoreRules, base: Base, changes: &[Entry]) -> Inputs {
    let Base { mut remote, mut synced, intents, .. } = base;
    for e in changes {
        remote.insert(e.path.clone(), e.clone());
    }
    let mut local = scan.nodes.clone();
    let unknown = |p: &RelPath| {
        scan.unknown
            .iter()
            .any(|u| p == u || p.as_str().strip_prefix(u.as_str()).is_some_and(|s| s.starts_with('/')))
    };
    // One pass over the three maps side by side (none when no path can be left out); only the
    // paths left out are cloned.
    let nothing_out = rules.is_empty() && scan.unknown.is_empty();
    let out: Vec<RelPath> = merge3(&local, &remote, &synced)
        .take_while(|_| !nothing_out)
        .filter(|(p, l, r, b)| {
            let is_dir = [*l, r.and_then(|e| e.node.as_ref()), b.and_then(|s| s.node.as_ref())]
                .into_iter()
                .any(|n| matches!(n, Some(Node::Dir { .. })));
            rules.is_ignored(p, is_dir) || unknown(p)
        })
        .map(|(p, ..)| p.clone())
        .collect();
    for p in out {
        local.remove(&p);
        remote.remove(&p);
        synced.remove(&p);
    }
    let mut adopted = Vec::new();
    for (p, node) in intents {
        if let Some(e) = remote.get(&p)
            && same(node.as_ref(), e.node.as_ref())
            && synced.get(&p).map(|s| s.rev) != Some(e.rev)
        {
            let s = Synced { rev: e.rev, node: e.node.clone() };
            synced.insert(p.clone(), s.clone());
            adopted.push((p, s));
        }
    }
    Inputs { local, remote, synced, adopted }
}

/// Loads the ignore rules and scans the folder (blocking: call it on the blocking pool). `clean`
/// removes interrupted runs' temp files, for a caller that holds the folder's lock.
pub fn scan(
    root: &Path,
    index_cache: &super::scan::StatCache,
    clean: bool,
    busy: &std::collections::HashSet<RelPath>,
) -> std::io::Result<(Scan, IgnoreRules, Option<String>)> {
    let (rules, warning) = IgnoreRules::load(root);
    let s = super::scan::scan(root, index_cache, &rules, clean, busy)?;
    Ok((s, rules, warning))
}
