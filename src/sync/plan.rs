//! The sync decision, pure: (local state, server state, last agreed base) → actions.
//!
//! Per path, with L = local now, R = the server's entry, B = the base last agreed:
//! - L equals R: record R as the new base (nothing moves).
//! - only L moved away from B: upload L (a delete, a rename when its content is being deleted
//!   elsewhere, a server-side copy when the server holds the content, a meta change, or a put,
//!   as a delta against B when B is a file the server still holds at that path);
//! - only R moved: download R (or delete locally);
//! - both moved: a delete loses to a change; equal content only merges metadata; otherwise a
//!   conflict, which keeps both versions.
//!
//! The executor does the I/O; everything here is testable with plain maps.

use std::collections::{BTreeMap, HashMap};

use super::index::Synced;
use crate::delta::WHOLE_FILE_BELOW;
use crate::hash::ContentHash;
use crate::path::RelPath;
use crate::protocol::{Entry, Meta, Node};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Mkdir {
        path: RelPath,
        base_rev: u64,
        mode: u32,
    },
    Symlink {
        path: RelPath,
        base_rev: u64,
        target: String,
    },
    /// Upload content; `delta_base` is the (hash, size) of the version the server holds.
    Put {
        path: RelPath,
        base_rev: u64,
        hash: ContentHash,
        size: u64,
        meta: Meta,
        delta_base: Option<(ContentHash, u64)>,
    },
    Copy {
        path: RelPath,
        base_rev: u64,
        hash: ContentHash,
        size: u64,
        meta: Meta,
    },
    Move {
        from: RelPath,
        from_rev: u64,
        to: RelPath,
        to_base_rev: u64,
        hash: ContentHash,
        size: u64,
        meta: Meta,
    },
    SetMeta {
        path: RelPath,
        base_rev: u64,
        meta: Meta,
    },
    DeleteRemote {
        path: RelPath,
        base_rev: u64,
    },
    /// Bring the server's entry here (file, directory or link).
    Fetch {
        entry: Entry,
    },
    /// Remove a local path, if it still is `expect`; the server deleted it at `rev`.
    DeleteLocal {
        path: RelPath,
        rev: u64,
        expect: Node,
    },
    /// Local and server agree: make `entry` the base.
    Record {
        entry: Entry,
    },
    /// Neither side has the path any more and the server holds no entry for it: drop its base.
    Forget {
        path: RelPath,
    },
    /// Both sides changed differently: keep both.
    Conflict {
        local: Node,
        remote: Entry,
    },
}

impl Action {
    pub fn is_upload(&self) -> bool {
        matches!(
            self,
            Action::Mkdir { .. }
                | Action::Symlink { .. }
                | Action::Put { .. }
                | Action::Copy { .. }
                | Action::Move { .. }
                | Action::SetMeta { .. }
                | Action::DeleteRemote { .. }
        )
    }
    /// The path the action is about (a move's destination).
    pub fn path(&self) -> &RelPath {
        match self {
            Action::Fetch { entry } | Action::Record { entry } | Action::Conflict { remote: entry, .. } => {
                &entry.path
            }
            Action::Mkdir { path, .. }
            | Action::Symlink { path, .. }
            | Action::Put { path, .. }
            | Action::Copy { path, .. }
            | Action::SetMeta { path, .. }
            | Action::DeleteRemote { path, .. }
            | Action::DeleteLocal { path, .. }
            | Action::Forget { path } => path,
            Action::Move { to, .. } => to,
        }
    }

    pub fn is_download(&self) -> bool {
        matches!(self, Action::Fetch { .. } | Action::DeleteLocal { .. })
    }
}

/// Same content: same kind, same bytes or target. Directory modes are not compared.
pub fn same_content(a: &Node, b: &Node) -> bool {
    match (a, b) {
        (Node::File { hash: x, .. }, Node::File { hash: y, .. }) => x == y,
        (Node::Dir { .. }, Node::Dir { .. }) => true,
        (Node::Symlink { target: x }, Node::Symlink { target: y }) => x == y,
        _ => false,
    }
}

/// Same content and same file metadata (mtime and permission bits).
pub fn same(a: Option<&Node>, b: Option<&Node>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(x @ Node::File { meta: m1, .. }), Some(y @ Node::File { meta: m2, .. })) => {
            same_content(x, y) && m1.mtime_ns == m2.mtime_ns && m1.mode & 0o777 == m2.mode & 0o777
        }
        (Some(x), Some(y)) => same_content(x, y),
        _ => false,
    }
}

enum Decision {
    Nothing,
    Record,
    Upload,
    Download,
    Conflict,
}

fn decide(l: Option<&Node>, r: Option<&Entry>, b: Option<&Synced>) -> Decision {
    let r_node = r.and_then(|e| e.node.as_ref());
    let r_rev = r.map_or(0, |e| e.rev);
    let b_node = b.and_then(|s| s.node.as_ref());
    let b_rev = b.map_or(0, |s| s.rev);
    if same(l, r_node) {
        return if r_rev != b_rev || !same(b_node, r_node) { Decision::Record } else { Decision::Nothing };
    }
    let local_changed = !same(l, b_node);
    // The server holding no entry at all for a path it once agreed on is not a change there: it
    // lost it (restored from an older backup), so the local version goes up again.
    let remote_changed = r.is_some() && r_rev != b_rev;
    match (local_changed, remote_changed) {
        (false, true) => Decision::Download,
        // Neither moved, yet they differ: the server has no entry or one that does not match its
        // own revision. Nothing is deleted on such evidence: fetch what it has, else upload.
        (false, false) if r_node.is_some() => Decision::Download,
        (false, false) => Decision::Upload,
        (true, false) => Decision::Upload,
        (true, true) => match (l, r_node) {
            (None, _) => Decision::Download, // a change beats a delete
            (_, None) => Decision::Upload,
            (Some(x), Some(y)) if same_content(x, y) => Decision::Download, // metadata only
            _ => Decision::Conflict,
        },
    }
}

/// Every path of the three maps once, in order, with what each map holds for it: one pass over
/// the three sorted maps side by side (no list of all paths to sort, no lookups per path).
pub fn merge3<'a, A, B, C>(
    a: &'a BTreeMap<RelPath, A>,
    b: &'a BTreeMap<RelPath, B>,
    c: &'a BTreeMap<RelPath, C>,
) -> impl Iterator<Item = (&'a RelPath, Option<&'a A>, Option<&'a B>, Option<&'a C>)> {
    let (mut a, mut b, mut c) = (a.iter().peekable(), b.iter().peekable(), c.iter().peekable());
    std::iter::from_fn(move || {
        let first = [a.peek().map(|x| x.0), b.peek().map(|x| x.0), c.peek().map(|x| x.0)]
            .into_iter()
            .flatten()
            .min()?;
        let x = a.next_if(|(k, _)| *k == first).map(|(_, v)| v);
        let y = b.next_if(|(k, _)| *k == first).map(|(_, v)| v);
        let z = c.next_if(|(k, _)| *k == first).map(|(_, v)| v);
        Some((first, x, y, z))
    })
}

pub fn plan(
    local: &BTreeMap<RelPath, Node>,
    remote: &BTreeMap<RelPath, Entry>,
    synced: &BTreeMap<RelPath, Synced>,
) -> Vec<Action> {
    let mut uploads = Vec::new();
    let mut out_records = Vec::new();
    let mut fetches = Vec::new();
    let mut local_deletes = Vec::new();
    let mut conflicts = Vec::new();
    for (p, l, r, b) in merge3(local, remote, synced) {
        // Every combination has an action: no state from disk, network or index is assumed.
        match (decide(l, r, b), l, r) {
            (Decision::Nothing, ..) => {}
            (Decision::Record, _, Some(entry)) => out_records.push(Action::Record { entry: entry.clone() }),
            // Agreed absent, and the server has no entry (an ignore rule or a reset hid it).
            (Decision::Record, _, None) => out_records.push(Action::Forget { path: p.clone() }),
            (Decision::Upload, ..) => uploads.push((p, l, r, b)),
            (Decision::Download, _, Some(entry)) if entry.node.is_some() => {
                fetches.push(Action::Fetch { entry: entry.clone() })
            }
            // A tombstone on the server, and the local version is the agreed base.
            (Decision::Download, Some(l), Some(entry)) => {
                local_deletes.push(Action::DeleteLocal { path: p.clone(), rev: entry.rev, expect: l.clone() })
            }
            (Decision::Download, ..) => {}
            (Decision::Conflict, Some(local), Some(remote)) if remote.node.is_some() => {
                conflicts.push(Action::Conflict { local: local.clone(), remote: remote.clone() })
            }
            // `decide` only finds a conflict where both sides have a node; should that ever not
            // hold, keeping the local version is the choice that loses nothing.
            (Decision::Conflict, ..) => uploads.push((p, l, r, b)),
        }
    }

    // A directory here with new or changed content inside, which the server replaced or deleted:
    // the content is not lost to the server's version. Replaced by a file or link: a conflict
    // (the directory is kept under a conflict name). Deleted: the directory is made again.
    let under = |dir: &RelPath, p: &RelPath| {
        p.as_str().strip_prefix(dir.as_str()).is_some_and(|s| s.starts_with('/'))
    };
    let changed_here: Vec<&RelPath> =
        uploads.iter().filter(|(_, l, ..)| l.is_some()).map(|(p, ..)| *p).collect();
    let grown_here = |dir: &RelPath| changed_here.iter().any(|p| under(dir, p));
    let mut kept_fetches = Vec::new();
    for f in fetches {
        match (&f, local.get(f.path())) {
            (Action::Fetch { entry: e @ Entry { node: Some(n), .. } }, Some(l @ Node::Dir { .. }))
                if !matches!(n, Node::Dir { .. }) && grown_here(&e.path) =>
            {
                conflicts.push(Action::Conflict { local: l.clone(), remote: e.clone() })
            }
            _ => kept_fetches.push(f),
        }
    }
    let mut fetches = kept_fetches;
    let mut remade = Vec::new();
    local_deletes.retain(|a| match a {
        Action::DeleteLocal { path, rev, expect: Node::Dir { mode } } if grown_here(path) => {
            remade.push((path.clone(), *rev, *mode));
            false
        }
        _ => true,
    });
    // Whatever was planned inside a directory that moves to a conflict name goes up from there,
    // in the next round.
    let conflict_dirs: Vec<RelPath> = conflicts
        .iter()
        .filter_map(|c| match c {
            Action::Conflict { local: Node::Dir { .. }, remote } => Some(remote.path.clone()),
            _ => None,
        })
        .collect();
    uploads.retain(|(p, ..)| !conflict_dirs.iter().any(|d| under(d, p)));

    // Files being deleted from the server in this round, by content: a new path with the same
    // content is their rename.
    let mut deleted_by_hash: HashMap<ContentHash, (RelPath, u64)> = HashMap::new();
    for (p, l, r, _) in &uploads {
        if let (None, Some(Entry { node: Some(Node::File { hash, .. }), rev, .. })) = (l, r) {
            deleted_by_hash.entry(*hash).or_insert(((*p).clone(), *rev));
        }
    }
    // Only a round with files to upload looks for their content on the server (a no-op round
    // over 100,000 files built this set for nothing).
    let remote_hashes: HashMap<ContentHash, ()> =
        if uploads.iter().any(|(_, l, ..)| matches!(l, Some(Node::File { .. }))) {
            remote
                .values()
                .filter_map(|e| match &e.node {
                    Some(Node::File { hash, .. }) => Some((*hash, ())),
                    _ => None,
                })
                .collect()
        } else {
            HashMap::new()
        };

    let (mut mkdirs, mut links, mut moves, mut copies, mut metas, mut puts, mut deletes) =
        (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
    let mut moved_from: Vec<RelPath> = Vec::new();
    // A directory removed or replaced here while something new arrived inside it on the server:
    // the addition wins, as a change beats a delete.
    let grown_on_server = |dir: &RelPath| {
        let prefix = format!("{dir}/");
        remote.values().any(|e| {
            e.node.is_some()
                && e.path.as_str().starts_with(&prefix)
                && synced.get(&e.path).map(|s| s.rev) != Some(e.rev)
        })
    };
    for (p, l, r, _b) in &uploads {
        let base_rev = r.map_or(0, |e| e.rev);
        let r_node = r.and_then(|e| e.node.as_ref());
        if let (Some(r), Some(Node::Dir { .. })) = (r, r_node)
            && !matches!(l, Some(Node::Dir { .. }))
            && grown_on_server(p)
        {
            match l {
                None => fetches.push(Action::Fetch { entry: (*r).clone() }),
                Some(local) => {
                    conflicts.push(Action::Conflict { local: (*local).clone(), remote: (*r).clone() })
                }
            }
            continue;
        }
        match l {
            None => deletes.push((p.depth(), Action::DeleteRemote { path: (*p).clone(), base_rev })),
            Some(Node::Dir { mode }) => {
                mkdirs.push((p.depth(), Action::Mkdir { path: (*p).clone(), base_rev, mode: *mode }))
            }
            Some(Node::Symlink { target }) => {
                links.push(Action::Symlink { path: (*p).clone(), base_rev, target: target.clone() })
            }
            Some(Node::File { hash, size, meta }) => {
                let (path, hash, size, meta) = ((*p).clone(), *hash, *size, *meta);
                match r_node {
                    Some(Node::File { hash: rh, .. }) if *rh == hash => {
                        metas.push(Action::SetMeta { path, base_rev, meta })
                    }
                    // A file replacing a directory on the server goes up after the deletes that
                    // empty it: not as a move or copy, which run before them (its content may
                    // even come from inside that directory).
                    Some(Node::Dir { .. }) => {
                        puts.push(Action::Put { path, base_rev, hash, size, meta, delta_base: None })
                    }
                    _ => {
                        if let Some((from, from_rev)) = deleted_by_hash.remove(&hash) {
                            moved_from.push(from.clone());
                            moves.push(Action::Move {
                                from,
                                from_rev,
                                to: path,
                                to_base_rev: base_rev,
                                hash,
                                size,
                                meta,
                            });
                        } else if remote_hashes.contains_key(&hash) {
                            copies.push(Action::Copy { path, base_rev, hash, size, meta });
                        } else {
                            let delta_base = match r_node {
                                Some(Node::File { hash: bh, size: bs, .. })
                                    if *bs >= WHOLE_FILE_BELOW && size >= WHOLE_FILE_BELOW =>
                                {
                                    Some((*bh, *bs))
                                }
                                _ => None,
                            };
                            puts.push(Action::Put { path, base_rev, hash, size, meta, delta_base });
                        }
                    }
                }
            }
        }
    }
    for (path, base_rev, mode) in remade {
        mkdirs.push((path.depth(), Action::Mkdir { path, base_rev, mode }));
    }
    deletes.retain(|(_, a)| !matches!(a, Action::DeleteRemote { path, .. } if moved_from.contains(path)));
    mkdirs.sort_by_key(|(d, _)| *d);
    deletes.sort_by_key(|(d, _)| std::cmp::Reverse(*d));
    let mut fetch_dirs: Vec<Action> = Vec::new();
    let mut fetch_rest: Vec<Action> = Vec::new();
    for f in fetches {
        match &f {
            Action::Fetch { entry: Entry { node: Some(Node::Dir { .. }), .. } } => fetch_dirs.push(f),
            _ => fetch_rest.push(f),
        }
    }
    local_deletes.sort_by_key(|a| match a {
        Action::DeleteLocal { path, .. } => std::cmp::Reverse(path.depth()),
        _ => std::cmp::Reverse(0),
    });

    // Order matters and the server keeps it: new directories first (parents first), so nothing
    // lands in a directory the journal does not have yet; renames and copies before the deletes
    // that could remove their source; deletes (deepest first) before links and files, so a
    // directory replaced by a file is emptied first.
    let mut out = conflicts;
    out.extend(mkdirs.into_iter().map(|(_, a)| a));
    out.extend(moves);
    out.extend(copies);
    out.extend(deletes.into_iter().map(|(_, a)| a));
    out.extend(links);
    out.extend(metas);
    out.extend(puts);
    out.extend(fetch_dirs);
    out.extend(fetch_rest);
    out.extend(out_records);
    out.extend(local_deletes);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }
    fn file(c: &str) -> Node {
        Node::File {
            hash: ContentHash::of(c.as_bytes()),
            size: 20_000,
            meta: Meta { mtime_ns: 1, mode: 0o644 },
        }
    }
    fn entry(path: &str, rev: u64, node: Option<Node>) -> Entry {
        Entry { path: p(path), rev, node, device: "d".into() }
    }
    fn kind(a: &Action) -> &'static str {
        match a {
            Action::Mkdir { .. } => "mkdir",
            Action::Symlink { .. } => "symlink",
            Action::Put { delta_base: Some(_), .. } => "put-delta",
            Action::Put { .. } => "put",
            Action::Copy { .. } => "copy",
            Action::Move { .. } => "move",
            Action::SetMeta { .. } => "setmeta",
            Action::DeleteRemote { .. } => "delete-remote",
            Action::Fetch { .. } => "fetch",
            Action::DeleteLocal { .. } => "delete-local",
            Action::Record { .. } => "record",
            Action::Forget { .. } => "forget",
            Action::Conflict { .. } => "conflict",
        }
    }

    fn dir() -> Option<Node> {
        Some(Node::Dir { mode: 0o755 })
    }
    fn link(t: &str) -> Option<Node> {
        Some(Node::Symlink { target: t.into() })
    }

    /// Runs one path through the planner: (local, remote (rev, node), base (rev, node)).
    fn one(
        l: Option<Node>,
        r: Option<(u64, Option<Node>)>,
        base: Option<(u64, Option<Node>)>,
    ) -> Vec<Action> {
        let local: BTreeMap<_, _> = l.into_iter().map(|n| (p("f"), n)).collect();
        let remote: BTreeMap<_, _> = r.into_iter().map(|(rev, n)| (p("f"), entry("f", rev, n))).collect();
        let synced: BTreeMap<_, _> =
            base.into_iter().map(|(rev, node)| (p("f"), Synced { rev, node })).collect();
        plan(&local, &remote, &synced)
    }

    /// Directories, links, tombstones and kind changes, and the states a damaged or reset index
    /// or an ignore rule can leave (a base with no server entry).
    #[test]
    fn merge3_gives_every_path_once_in_order_with_each_side() {
        let m =
            |ks: &[&str]| -> BTreeMap<RelPath, String> { ks.iter().map(|k| (p(k), k.to_string())).collect() };
        let (a, b, c) = (m(&["a", "c", "d/e"]), m(&["b", "c", "d"]), m(&["a", "d", "z"]));
        let got: Vec<(String, bool, bool, bool)> = merge3(&a, &b, &c)
            .map(|(k, x, y, z)| {
                for v in [x, y, z].into_iter().flatten() {
                    assert_eq!(v, k.as_str());
                }
                (k.to_string(), x.is_some(), y.is_some(), z.is_some())
            })
            .collect();
        let want = [
            ("a", true, false, true),
            ("b", false, true, false),
            ("c", true, true, false),
            ("d", false, true, true),
            ("d/e", true, false, false),
            ("z", false, false, true),
        ]
        .map(|(k, x, y, z)| (k.to_string(), x, y, z));
        assert_eq!(got, want);
    }

    #[test]
    fn decision_table_kinds_and_tombstones() {
        let a = || Some(file("a"));
        let cases: Vec<Case> = vec![
            ("new local dir", dir(), None, None, "mkdir"),
            ("new remote dir", None, Some((1, dir())), None, "fetch"),
            ("dir in sync", dir(), Some((1, dir())), Some((1, dir())), ""),
            ("local dir removed", None, Some((1, dir())), Some((1, dir())), "delete-remote"),
            ("remote dir removed", dir(), Some((2, None)), Some((1, dir())), "delete-local"),
            ("new local link", link("t"), None, None, "symlink"),
            ("link retargeted here", link("u"), Some((1, link("t"))), Some((1, link("t"))), "symlink"),
            ("link retargeted there", link("t"), Some((2, link("u"))), Some((1, link("t"))), "fetch"),
            ("link retargeted both", link("u"), Some((2, link("v"))), Some((1, link("t"))), "conflict"),
            ("file became link here", link("t"), Some((1, a())), Some((1, a())), "symlink"),
            ("link became file here", a(), Some((1, link("t"))), Some((1, link("t"))), "put"),
            ("file became dir here", dir(), Some((1, a())), Some((1, a())), "mkdir"),
            ("dir became file here", a(), Some((1, dir())), Some((1, dir())), "put"),
            ("dir became file there", dir(), Some((2, a())), Some((1, dir())), "fetch"),
            ("dir became link there", dir(), Some((2, link("t"))), Some((1, dir())), "fetch"),
            ("file vs dir created", a(), Some((1, dir())), None, "conflict"),
            ("tombstone, never seen here", None, Some((3, None)), None, "record"),
            ("tombstone, file created here", a(), Some((3, None)), None, "put"),
            ("base but no server entry, unchanged", a(), None, Some((1, a())), "put"),
            ("base but no server entry, gone here", None, None, Some((1, a())), "forget"),
            ("agreed absent, nothing anywhere", None, None, Some((1, None)), "forget"),
            ("server entry at base rev but other node", a(), Some((1, None)), Some((1, a())), "put"),
        ];
        for (name, l, r, base, want) in cases {
            let got: Vec<_> = one(l, r, base).iter().map(kind).collect();
            let want: Vec<&str> = if want.is_empty() { vec![] } else { vec![want] };
            assert_eq!(got, want, "case: {name}");
        }
    }

    /// A file moved out of a directory onto the directory's own path: the file inside is deleted
    /// first, then the file goes up (a move would land on a non-empty directory, refused forever).
    #[test]
    fn a_file_moved_onto_its_own_directory_goes_up_after_the_delete() {
        let local = BTreeMap::from([(p("d"), file("f"))]);
        let remote =
            BTreeMap::from([(p("d"), entry("d", 1, dir())), (p("d/a"), entry("d/a", 2, Some(file("f"))))]);
        let synced = BTreeMap::from([
            (p("d"), Synced { rev: 1, node: dir() }),
            (p("d/a"), Synced { rev: 2, node: Some(file("f")) }),
        ]);
        let got: Vec<_> =
            plan(&local, &remote, &synced).iter().map(|a| format!("{} {}", kind(a), a.path())).collect();
        assert_eq!(got, ["delete-remote d/a", "put d"]);
    }

    /// A directory here with changed content inside, which the server replaced by a link (a
    /// conflict, and nothing planned inside it) or deleted (made again, then its content).
    #[test]
    fn a_directory_changed_inside_survives_the_server_replacing_or_deleting_it() {
        let local = BTreeMap::from([(p("a"), dir().unwrap()), (p("a/f"), file("new"))]);
        let synced = BTreeMap::from([
            (p("a"), Synced { rev: 1, node: dir() }),
            (p("a/f"), Synced { rev: 1, node: Some(file("old")) }),
        ]);
        let replaced =
            BTreeMap::from([(p("a"), entry("a", 2, link("t"))), (p("a/f"), entry("a/f", 2, None))]);
        let got: Vec<_> = plan(&local, &replaced, &synced).iter().map(kind).collect();
        assert_eq!(got, ["conflict"]);
        let deleted = BTreeMap::from([(p("a"), entry("a", 2, None)), (p("a/f"), entry("a/f", 2, None))]);
        let acts = plan(&local, &deleted, &synced);
        let got: Vec<_> = acts.iter().map(|a| format!("{} {}", kind(a), a.path())).collect();
        assert_eq!(got, ["mkdir a", "put a/f"]);
    }

    fn any_node() -> impl proptest::strategy::Strategy<Value = Option<Node>> {
        use proptest::prelude::*;
        prop_oneof![
            Just(None),
            (0u8..3, 0u8..2, prop_oneof![Just(0o644u32), Just(0o755u32)]).prop_map(|(c, t, mode)| {
                Some(Node::File {
                    hash: ContentHash::of(&[c]),
                    size: 20_000,
                    meta: Meta { mtime_ns: t as i64, mode },
                })
            }),
            Just(dir()),
            (0u8..2).prop_map(|t| link(&format!("t{t}"))),
        ]
    }

    proptest::proptest! {
        /// For every combination of local, server and base state of every kind, over a few
        /// related paths: the planner never panics, never deletes a local path whose state
        /// differs from the agreed base, and never deletes on the server what changed there.
        #[test]
        fn plan_is_total_and_never_deletes_a_changed_path(
            states in proptest::collection::vec(
                (any_node(), proptest::option::of((0u64..4, any_node())), proptest::option::of((0u64..4, any_node()))),
                4,
            )
        ) {
            let names = ["a", "a/b", "c", "a/b/d"];
            let (mut local, mut remote, mut synced) = (BTreeMap::new(), BTreeMap::new(), BTreeMap::new());
            for (name, (l, r, b)) in names.iter().zip(states) {
                if let Some(l) = l { local.insert(p(name), l); }
                if let Some((rev, n)) = r { remote.insert(p(name), entry(name, rev, n)); }
                if let Some((rev, node)) = b { synced.insert(p(name), Synced { rev, node }); }
            }
            for a in plan(&local, &remote, &synced) {
                match &a {
                    Action::DeleteLocal { path, expect, .. } => {
                        let base = synced.get(path).and_then(|s| s.node.as_ref());
                        proptest::prop_assert!(same(local.get(path), base), "deletes changed {path}: {a:?}");
                        proptest::prop_assert_eq!(Some(expect), local.get(path));
                        proptest::prop_assert!(
                            matches!(remote.get(path), Some(Entry { node: None, .. })),
                            "local delete without a server tombstone at {}", path
                        );
                    }
                    Action::DeleteRemote { path, base_rev } => {
                        proptest::prop_assert_eq!(remote.get(path).map(|e| e.rev), Some(*base_rev));
                        let seen = synced.get(path).map(|s| s.rev);
                        proptest::prop_assert_eq!(seen, Some(*base_rev), "server delete of a version not seen here");
                    }
                    _ => {}
                }
            }
        }
    }

    /// A case of one path: (name, local, remote (rev, node), base (rev, node), the action).
    type Case =
        (&'static str, Option<Node>, Option<(u64, Option<Node>)>, Option<(u64, Option<Node>)>, &'static str);

    /// One path, every combination that matters: (local, remote (rev, node), base (rev, node)) → action.
    #[test]
    fn decision_table() {
        let a = || Some(file("a"));
        let b = || Some(file("b"));
        let c = || Some(file("c"));
        let cases: Vec<Case> = vec![
            ("in sync", a(), Some((1, a())), Some((1, a())), ""),
            ("new local file", a(), None, None, "put"),
            ("local edit", b(), Some((1, a())), Some((1, a())), "put-delta"),
            ("local delete", None, Some((1, a())), Some((1, a())), "delete-remote"),
            ("new remote file", None, Some((1, a())), None, "fetch"),
            ("remote edit", a(), Some((2, b())), Some((1, a())), "fetch"),
            ("remote delete", a(), Some((2, None)), Some((1, a())), "delete-local"),
            ("both deleted", None, Some((2, None)), Some((1, a())), "record"),
            ("same edit both sides", b(), Some((2, b())), Some((1, a())), "record"),
            ("different edits", b(), Some((2, c())), Some((1, a())), "conflict"),
            ("both created differently", a(), Some((1, b())), None, "conflict"),
            ("local edit beats remote delete", b(), Some((2, None)), Some((1, a())), "put"),
            ("remote edit beats local delete", None, Some((2, b())), Some((1, a())), "fetch"),
            ("already agreed, new rev only", a(), Some((3, a())), Some((1, a())), "record"),
        ];
        for (name, l, r, base, want) in cases {
            let got: Vec<_> = one(l, r, base).iter().map(kind).collect();
            let want: Vec<&str> = if want.is_empty() { vec![] } else { vec![want] };
            assert_eq!(got, want, "case: {name}");
        }
    }

    #[test]
    fn rename_is_a_move_and_copy_reuses_server_content() {
        let a = file("a");
        let local = BTreeMap::from([(p("new/name"), a.clone()), (p("copy"), file("x"))]);
        let remote = BTreeMap::from([
            (p("old"), entry("old", 1, Some(a.clone()))),
            (p("x"), entry("x", 2, Some(file("x")))),
        ]);
        let mut synced = BTreeMap::from([(p("old"), Synced { rev: 1, node: Some(a) })]);
        synced.insert(p("x"), Synced { rev: 2, node: Some(file("x")) });
        let mut local = local;
        local.insert(p("x"), file("x"));
        let got: Vec<_> = plan(&local, &remote, &synced).iter().map(kind).collect();
        assert_eq!(got, vec!["move", "copy"]);
    }

    #[test]
    fn parents_first_then_deletes_deepest_first() {
        let d = Node::Dir { mode: 0o755 };
        let local = BTreeMap::from([(p("a"), d.clone()), (p("a/b"), d.clone())]);
        let remote = BTreeMap::from([
            (p("x"), entry("x", 1, Some(d.clone()))),
            (p("x/y"), entry("x/y", 1, Some(d.clone()))),
        ]);
        let synced = BTreeMap::from([
            (p("x"), Synced { rev: 1, node: Some(d.clone()) }),
            (p("x/y"), Synced { rev: 1, node: Some(d) }),
        ]);
        let acts = plan(&local, &remote, &synced);
        let names: Vec<String> = acts
            .iter()
            .map(|a| match a {
                Action::Mkdir { path, .. } | Action::DeleteRemote { path, .. } => {
                    format!("{} {path}", kind(a))
                }
                _ => kind(a).to_string(),
            })
            .collect();
        assert_eq!(names, ["mkdir a", "mkdir a/b", "delete-remote x/y", "delete-remote x"]);
    }
}
