//! The mass-change guard: a round that would delete most of a folder on the server is held back
//! before any delete is sent, because `rm -rf ~/Documents/*` or a folder on a disk that went
//! away looks exactly like that, and a sync would carry it to every computer.
//!
//! Thresholds: a round trips the guard when it deletes more than [`MANY`] files and more than
//! half of the folder's synced files, or all of them (when there were at least [`ALL_OF`]).
//! Above 50 a deliberate clean-up is still let through when it is a minority of the folder, and
//! small folders are not nagged; "all of them" catches the vanished-disk case at any size.
//! `--max-delete N` or `--max-delete N%` lets a round through that deletes at most that many.

use std::collections::BTreeMap;

use super::index::Synced;
use super::plan::Action;
use crate::path::RelPath;
use crate::protocol::Node;

/// More deletes than this, and more than half of the folder, trip the guard.
pub const MANY: u64 = 50;
/// Deleting every file trips the guard for folders of at least this many files.
pub const ALL_OF: u64 = 2;
/// Deletes sent within this long count together.
pub const WINDOW: std::time::Duration = std::time::Duration::from_secs(60);

/// How many deletes the user allowed with `--max-delete`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Count(u64),
    Percent(u64),
}

impl std::str::FromStr for Limit {
    type Err = String;
    fn from_str(s: &str) -> Result<Limit, String> {
        let bad = || format!("`{s}` is not a number of files (like 200) or a share of the folder (like 60%)");
        match s.strip_suffix('%') {
            Some(p) => match p.trim().parse::<u64>() {
                Ok(p) if p <= 100 => Ok(Limit::Percent(p)),
                _ => Err(bad()),
            },
            None => s.trim().parse().map(Limit::Count).map_err(|_| bad()),
        }
    }
}

/// Deletes held back by the guard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    /// Files this round would delete on the server.
    pub deletes: u64,
    /// Files the folder had (agreed with the server).
    pub files: u64,
}

impl Held {
    pub fn message(&self, dir: &std::path::Path) -> String {
        let dir = dir.display();
        format!(
            "held back {} deletes: this round would delete {} of the folder's {} files on the server \
             (the mass-delete guard stops deleting more than half of a folder, or all of it). \
             If you meant it, run `deltasync push {dir} --max-delete {}`; \
             to bring the files back from the server instead, run `deltasync pull {dir} --restore-deleted`",
            self.deletes, self.deletes, self.files, self.deletes
        )
    }
}

/// Files the plan deletes on the server, and files the folder had.
fn count(actions: &[Action], synced: &BTreeMap<RelPath, Synced>) -> Held {
    let is_file = |p: &RelPath| matches!(synced.get(p), Some(Synced { node: Some(Node::File { .. }), .. }));
    let deletes =
        actions.iter().filter(|a| matches!(a, Action::DeleteRemote { path, .. } if is_file(path))).count();
    let files = synced.values().filter(|s| matches!(s.node, Some(Node::File { .. }))).count();
    Held { deletes: deletes as u64, files: files as u64 }
}

/// Checks a plan; when it trips the guard (and `limit` does not allow it), removes every server
/// delete from `actions` and says how many were held back. `recent`: file deletes this folder
/// sent in the last [`WINDOW`] (a `watch` sees a slow `rm -rf` in pieces; they count together).
pub fn check(
    actions: &mut Vec<Action>,
    synced: &BTreeMap<RelPath, Synced>,
    limit: Option<Limit>,
    recent: u64,
) -> Option<Held> {
    let mut h = count(actions, synced);
    if h.deletes == 0 {
        return None;
    }
    h.deletes += recent;
    h.files += recent;
    let trips = (h.deletes > MANY && h.deletes * 2 > h.files) || (h.files >= ALL_OF && h.deletes == h.files);
    let allowed = match limit {
        None => false,
        Some(Limit::Count(n)) => h.deletes <= n,
        Some(Limit::Percent(p)) => h.deletes * 100 <= p * h.files,
    };
    if !trips || allowed {
        return None;
    }
    actions.retain(|a| !matches!(a, Action::DeleteRemote { .. }));
    Some(h)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::ContentHash;
    use crate::protocol::Meta;

    fn folder(n: u64) -> BTreeMap<RelPath, Synced> {
        (0..n)
            .map(|i| {
                let node = Node::File {
                    hash: ContentHash::of(&i.to_le_bytes()),
                    size: 1,
                    meta: Meta { mtime_ns: 0, mode: 0o644 },
                };
                (RelPath::new(format!("f{i}")).unwrap(), Synced { rev: i + 1, node: Some(node) })
            })
            .collect()
    }
    fn deletes(n: u64) -> Vec<Action> {
        let mut v: Vec<Action> = (0..n)
            .map(|i| Action::DeleteRemote { path: RelPath::new(format!("f{i}")).unwrap(), base_rev: i + 1 })
            .collect();
        v.push(Action::Mkdir { path: RelPath::new("d").unwrap(), base_rev: 0, mode: 0o755 });
        v
    }

    #[test]
    fn thresholds() {
        // (folder files, deletes, limit, held?)
        let cases = [
            (1000, 50, None, false),
            (1000, 400, None, false),
            (100, 51, None, true),
            (100, 50, None, false),
            (60, 51, Some(Limit::Count(51)), false),
            (60, 51, Some(Limit::Count(50)), true),
            (60, 51, Some(Limit::Percent(85)), false),
            (60, 51, Some(Limit::Percent(80)), true),
            (3, 3, None, true),
            (1, 1, None, false),
            (3, 2, None, false),
        ];
        for (files, n, limit, want) in cases {
            let mut acts = deletes(n);
            let held = check(&mut acts, &folder(files), limit, 0);
            assert_eq!(held.is_some(), want, "{n} of {files} with {limit:?}");
            let left = acts.iter().filter(|a| matches!(a, Action::DeleteRemote { .. })).count() as u64;
            assert_eq!(left, if want { 0 } else { n }, "deletes left, {n} of {files}");
            assert_eq!(
                acts.iter().filter(|a| matches!(a, Action::Mkdir { .. })).count(),
                1,
                "other actions stay"
            );
        }
    }

    /// 30 deletes sent a moment ago from a folder of 70, 30 more now: 60 of 70 together.
    #[test]
    fn recent_deletes_count_together() {
        let mut acts = deletes(30);
        assert!(check(&mut acts, &folder(40), None, 30).is_some());
        let mut acts = deletes(30);
        assert!(check(&mut acts, &folder(40), None, 0).is_none());
    }

    #[test]
    fn limits_parse() {
        assert_eq!("200".parse(), Ok(Limit::Count(200)));
        assert_eq!("60%".parse(), Ok(Limit::Percent(60)));
        assert!("abc".parse::<Limit>().is_err());
        assert!("120%".parse::<Limit>().is_err());
    }
}
