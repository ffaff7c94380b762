//! Walks a synced folder into a map of path → node, re-hashing only files whose size, mtime or
//! inode changed since the last scan.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, SystemTime};

use super::index::Stat;
use super::report::{PathIssue, local_cause};
use super::rules::IgnoreRules;
use crate::fsutil::{self, TEMP_PREFIX};
use crate::hash::ContentHash;
use crate::path::{RelPath, STATE_DIR};
use crate::protocol::{Meta, Node};

pub type StatCache = BTreeMap<RelPath, (Stat, ContentHash)>;

#[derive(Debug, Default)]
pub struct Scan {
    pub nodes: BTreeMap<RelPath, Node>,
    /// The stat cache to save for the next scan.
    pub cache: StatCache,
    /// Paths skipped, with why (unreadable here, vanished while read, names that cannot be
    /// synced): the round is partial.
    pub skipped: Vec<PathIssue>,
    /// Special files (FIFOs, sockets, devices), which are never synced: noted, not a failure.
    pub special: Vec<PathIssue>,
    /// Paths whose state here is unknown (unreadable files and folders, special files): they and
    /// everything below them are left out of the round, so what could not be read is never
    /// taken for deleted.
    pub unknown: Vec<RelPath>,
    pub hashed_bytes: u64,
    /// How many files' rows in `cache` are the ones the scan was given, stat and hash alike:
    /// all of them, with none gone, and the cache needs no writing.
    pub unchanged: usize,
    /// Temp files of interrupted runs removed on the way.
    pub temps_removed: usize,
}

impl Scan {
    /// Is `cache` the stat cache `old` the scan was given, row for row (as in a round where
    /// nothing changed)? Told from the scan's count, without comparing the two maps.
    pub fn cache_is(&self, old: &StatCache) -> bool {
        self.unchanged == self.cache.len() && self.cache.len() == old.len()
    }
}

/// `.deltasync/tmp/`: the temp files of downloads and local copies, renamed into place from here.
pub fn temp_dir(root: &Path) -> PathBuf {
    root.join(STATE_DIR).join("tmp")
}

/// Slots of [`temp_dir`] taken in turn by the batches of a pull (`.deltasync/tmp/0/`, …): one
/// batch's files are renamed out of one while the next one's are made in another. Creating and
/// renaming in one directory both need its lock; with one temp folder, a pull of 100,000 files
/// spent a tenth of its client CPU spinning on it.
pub const TEMP_SLOTS: usize = 3;

/// [`temp_dir`]'s slot `n` (modulo [`TEMP_SLOTS`]). Made by the first download into the
/// temp folder and kept (a `watch` would otherwise make and remove them every round).
pub fn temp_slot(root: &Path, n: usize) -> PathBuf {
    temp_dir(root).join((n % TEMP_SLOTS).to_string())
}

/// `.deltasync/partial/`: whole downloads of big files, kept when cut off so the next run
/// continues them.
pub fn partial_dir(root: &Path) -> PathBuf {
    root.join(STATE_DIR).join("partial")
}

/// A partial download not continued for this long is removed.
pub const PARTIAL_KEEP: Duration = Duration::from_secs(2 * 86_400);

/// Removes what interrupted runs left in `.deltasync/`: every file in `tmp/` (while the folder's
/// lock is held nobody else writes there) and the partial downloads not written to for
/// [`PARTIAL_KEEP`] (before `now`). Returns how many.
pub fn clean_state(root: &Path, now: SystemTime) -> usize {
    let mut removed = 0;
    let mut clean = |dir: PathBuf, old_only: bool| {
        let Ok(rd) = fs::read_dir(&dir) else { return };
        for e in rd.flatten() {
            let Ok(md) = e.metadata() else { continue };
            if md.is_dir() {
                continue;
            }
            if old_only {
                let age = md.modified().ok().and_then(|m| now.duration_since(m).ok());
                if age.is_none_or(|a| a < PARTIAL_KEEP) {
                    continue;
                }
            }
            match fs::remove_file(e.path()) {
                Ok(()) => removed += 1,
                Err(err) => tracing::debug!("cannot remove {}: {err}", e.path().display()),
            }
        }
    };
    clean(temp_dir(root), false);
    for n in 0..TEMP_SLOTS {
        clean(temp_slot(root, n), false);
    }
    clean(partial_dir(root), true);
    removed
}

/// Is this a name deltasync never syncs?
pub fn is_ignored_name(name: &str) -> bool {
    name.starts_with(TEMP_PREFIX)
}

/// At most this many threads read a folder's directories at once (the calling thread is one).
const SCAN_THREADS: usize = 4;

/// Walks `root`. With `clean`, deltasync temp files met on the way are removed: only for a folder
/// whose lock is held (no other deltasync writes there), where they are what an interrupted run
/// left behind (older versions wrote downloads to a temp beside the file); so are the temp files
/// in `.deltasync/` and its stale partial downloads ([`clean_state`]).
///
/// The directories below the root are read by up to [`SCAN_THREADS`] threads (one per core),
/// each taking the next directory any of them found: a scan is mostly `statx` calls, which run
/// side by side. Only an unreadable root is an error; what cannot be read below it is skipped.
///
/// A file in `busy` (being written by `watch`'s lane, which records its stat when done) is not
/// read to be hashed when its stat is not the cached one: it is left out of the round, unknown.
pub fn scan(
    root: &Path,
    old: &StatCache,
    rules: &IgnoreRules,
    clean: bool,
    busy: &HashSet<RelPath>,
) -> std::io::Result<Scan> {
    let mut s = Part::default();
    if clean {
        s.temps_removed += clean_state(root, SystemTime::now());
    }
    let w = Walker { root, old, rules, clean, busy };
    let mut dirs = Vec::new();
    w.read_dir(&Dir { full: root.to_path_buf(), rel: None }, &mut s, &mut dirs)?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, SCAN_THREADS);
    if threads == 1 || dirs.len() < 2 {
        while let Some(d) = dirs.pop() {
            w.read_dir(&d, &mut s, &mut dirs)?;
        }
    } else {
        let queue = Queue { state: Mutex::new((dirs, 0)), more: Condvar::new() };
        let parts: Vec<Part> = std::thread::scope(|scope| {
            // A thread that cannot be started is no error: the others (and this one) do its share.
            let helpers: Vec<_> = (1..threads)
                .filter_map(|_| {
                    std::thread::Builder::new()
                        .name("scan".into())
                        .spawn_scoped(scope, || w.work(&queue))
                        .ok()
                })
                .collect();
            let mut parts = vec![w.work(&queue)];
            for h in helpers {
                match h.join() {
                    Ok(part) => parts.push(part),
                    Err(panic) => std::panic::resume_unwind(panic),
                }
            }
            parts
        });
        for mut part in parts {
            s.nodes.append(&mut part.nodes);
            s.cache.append(&mut part.cache);
            s.skipped.append(&mut part.skipped);
            s.special.append(&mut part.special);
            s.unknown.append(&mut part.unknown);
            s.hashed_bytes += part.hashed_bytes;
            s.unchanged += part.unchanged;
            s.temps_removed += part.temps_removed;
        }
    }
    // Each directory's paths were sorted as it was read: the maps are built by merging those
    // runs, not by inserting each path (a no-op scan of 100,000 files spent 14% of its samples
    // inserting into the maps and merging the threads' maps).
    let mut s = Scan {
        nodes: s.nodes.into_iter().collect(),
        cache: s.cache.into_iter().collect(),
        skipped: s.skipped,
        special: s.special,
        unknown: s.unknown,
        hashed_bytes: s.hashed_bytes,
        unchanged: s.unchanged,
        temps_removed: s.temps_removed,
    };
    // A directory that could not be read was listed by its parent, maybe in another thread.
    for u in &s.unknown {
        s.nodes.remove(u);
    }
    // The threads finish in any order; what is reported is listed by path.
    s.skipped.sort_by(|a, b| a.path.cmp(&b.path));
    s.special.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(s)
}

/// A directory to read: its path here and below the root (`None`: the root).
struct Dir {
    full: PathBuf,
    rel: Option<RelPath>,
}

/// The directories found and not yet read, and how many threads are reading one.
struct Queue {
    state: Mutex<(Vec<Dir>, usize)>,
    more: Condvar,
}

/// What one thread found: a [`Scan`] with its maps still lists, each directory's paths sorted.
#[derive(Default)]
struct Part {
    nodes: Vec<(RelPath, Node)>,
    cache: Vec<(RelPath, (Stat, ContentHash))>,
    skipped: Vec<PathIssue>,
    special: Vec<PathIssue>,
    unknown: Vec<RelPath>,
    hashed_bytes: u64,
    unchanged: usize,
    temps_removed: usize,
}

struct Walker<'a> {
    root: &'a Path,
    old: &'a StatCache,
    rules: &'a IgnoreRules,
    clean: bool,
    busy: &'a HashSet<RelPath>,
}

impl Walker<'_> {
    /// Reads directories from `queue` until none is left and no thread can find more.
    fn work(&self, queue: &Queue) -> Part {
        let mut s = Part::default();
        let mut found = Vec::new();
        loop {
            let dir = {
                let mut q = queue.state.lock().unwrap_or_else(|e| e.into_inner());
                loop {
                    if let Some(d) = q.0.pop() {
                        q.1 += 1;
                        break Some(d);
                    }
                    if q.1 == 0 {
                        break None;
                    }
                    q = queue.more.wait(q).unwrap_or_else(|e| e.into_inner());
                }
            };
            let Some(dir) = dir else {
                queue.more.notify_all();
                return s;
            };
            // Below the root, what cannot be read is recorded in `s`, never an error.
            let _ = self.read_dir(&dir, &mut s, &mut found);
            let mut q = queue.state.lock().unwrap_or_else(|e| e.into_inner());
            q.0.append(&mut found);
            q.1 -= 1;
            queue.more.notify_all();
        }
    }

    /// Reads one directory into `s`, adding its subdirectories to `dirs`. Only an unreadable
    /// root is an error.
    fn read_dir(&self, dir: &Dir, s: &mut Part, dirs: &mut Vec<Dir>) -> std::io::Result<()> {
        let root = self.root;
        let shown = |p: &Path| p.strip_prefix(root).unwrap_or(p).to_string_lossy().into_owned();
        let unreadable = |s: &mut Part, e: std::io::Error, rel: &RelPath| {
            s.skipped.push(PathIssue { path: rel.to_string(), cause: local_cause(&e) });
            s.unknown.push(rel.clone());
        };
        let rd = match (fs::read_dir(&dir.full), &dir.rel) {
            (Ok(rd), _) => rd,
            (Err(e), Some(rel)) => {
                unreadable(s, e, rel);
                return Ok(());
            }
            (Err(e), None) => return Err(e),
        };
        let first = (s.nodes.len(), s.cache.len());
        for entry in rd {
            let entry = match (entry, &dir.rel) {
                (Ok(entry), _) => entry,
                (Err(e), Some(rel)) => {
                    unreadable(s, e, rel);
                    return Ok(());
                }
                (Err(e), None) => return Err(e),
            };
            let name = entry.file_name();
            let name_str = name.to_string_lossy();
            if is_ignored_name(&name_str) {
                if self.clean && entry.file_type().is_ok_and(|t| t.is_file()) {
                    let full = entry.path();
                    match fs::remove_file(&full) {
                        Ok(()) => s.temps_removed += 1,
                        Err(e) => tracing::debug!("cannot remove {}: {e}", full.display()),
                    }
                }
                continue;
            }
            if dir.rel.is_none() && name_str == STATE_DIR {
                continue;
            }
            // The path below the root from the directory's own (checked once per name, not
            // stripped from the whole path again).
            let rel = match (name.to_str(), &dir.rel) {
                (Some(n), None) => RelPath::new(n),
                (Some(n), Some(d)) => RelPath::new(format!("{d}/{n}")),
                (None, _) => RelPath::from_local(root, &entry.path()),
            };
            let rel = match rel {
                Ok(r) => r,
                Err(e) => {
                    s.skipped.push(PathIssue {
                        path: shown(&entry.path()),
                        cause: format!("cannot be synced: {e}"),
                    });
                    continue;
                }
            };
            // fstatat on the directory's descriptor (does not follow a symlink, like
            // symlink_metadata), without walking the whole path again for every file.
            let md = match entry.metadata() {
                Ok(m) => m,
                Err(e) => {
                    s.skipped.push(PathIssue { path: rel.to_string(), cause: local_cause(&e) });
                    s.unknown.push(rel);
                    continue;
                }
            };
            let ft = md.file_type();
            if self.rules.is_ignored(&rel, ft.is_dir()) {
                continue;
            }
            if ft.is_dir() {
                s.nodes.push((
                    rel.clone(),
                    Node::Dir { mode: md.permissions().mode() & fsutil::PERMISSION_BITS },
                ));
                dirs.push(Dir { full: entry.path(), rel: Some(rel) });
            } else if ft.is_symlink() {
                match fs::read_link(entry.path()).ok().and_then(|t| t.to_str().map(String::from)) {
                    Some(target) => {
                        s.nodes.push((rel, Node::Symlink { target }));
                    }
                    None => {
                        s.skipped.push(PathIssue {
                            path: rel.to_string(),
                            cause: "its symlink target is not UTF-8, which cannot be synced".into(),
                        });
                        s.unknown.push(rel);
                    }
                }
            } else if ft.is_file() {
                let stat = Stat::of(&md);
                let hash = match self.old.get(&rel) {
                    Some((st, h))
                        if st.size == stat.size && st.mtime_ns == stat.mtime_ns && st.inode == stat.inode =>
                    {
                        // Only the content is known: a new mode is still a row to write.
                        s.unchanged += usize::from(*st == stat);
                        *h
                    }
                    _ if self.busy.contains(&rel) => {
                        s.unknown.push(rel);
                        continue;
                    }
                    _ => match ContentHash::of_file_sized(&entry.path(), stat.size) {
                        Ok((h, _)) => {
                            s.hashed_bytes += stat.size;
                            tracing::debug!("hashed {rel} ({} bytes)", stat.size);
                            h
                        }
                        Err(e) => {
                            s.skipped.push(PathIssue { path: rel.to_string(), cause: local_cause(&e) });
                            s.unknown.push(rel);
                            continue;
                        }
                    },
                };
                s.cache.push((rel.clone(), (stat, hash)));
                s.nodes.push((
                    rel,
                    Node::File {
                        hash,
                        size: stat.size,
                        meta: Meta { mtime_ns: stat.mtime_ns, mode: stat.mode },
                    },
                ));
            } else {
                s.special.push(PathIssue {
                    path: rel.to_string(),
                    cause: "not a regular file, directory or symlink (never synced)".into(),
                });
                s.unknown.push(rel);
            }
        }
        // Sorted runs, one a directory, for the maps to be built from.
        s.nodes[first.0..].sort_unstable_by(|a, b| a.0.cmp(&b.0));
        s.cache[first.1..].sort_unstable_by(|a, b| a.0.cmp(&b.0));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The threads together find every path of a tree of many directories, each once, with the
    /// stat cache of every file: the same as one recursive walk.
    #[test]
    fn a_scan_by_several_threads_finds_every_path_once() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        let mut want: BTreeMap<String, &str> = BTreeMap::new();
        for a in 0..6 {
            for b in 0..5 {
                let dir = format!("a{a}/b{b}");
                fs::create_dir_all(root.join(&dir)).unwrap();
                want.insert(format!("a{a}"), "dir");
                want.insert(dir.clone(), "dir");
                for f in 0..4 {
                    let p = format!("{dir}/f{f}");
                    fs::write(root.join(&p), p.as_bytes()).unwrap();
                    want.insert(p, "file");
                }
                let link = format!("{dir}/l");
                std::os::unix::fs::symlink("f0", root.join(&link)).unwrap();
                want.insert(link, "link");
            }
        }
        fs::write(root.join("top"), b"x").unwrap();
        want.insert("top".into(), "file");
        let s = scan(root, &StatCache::new(), &IgnoreRules::default(), false, &HashSet::new()).unwrap();
        let got: BTreeMap<String, &str> = s
            .nodes
            .iter()
            .map(|(p, n)| {
                let kind = match n {
                    Node::File { .. } => "file",
                    Node::Dir { .. } => "dir",
                    Node::Symlink { .. } => "link",
                };
                (p.to_string(), kind)
            })
            .collect();
        assert_eq!(got, want);
        let files: Vec<String> = want.iter().filter(|(_, k)| **k == "file").map(|(p, _)| p.clone()).collect();
        assert_eq!(s.cache.keys().map(|p| p.to_string()).collect::<Vec<_>>(), files);
        assert!(s.skipped.is_empty() && s.unknown.is_empty(), "{:?}", s.skipped);
        // A second scan with that cache hashes nothing.
        let again = scan(root, &s.cache, &IgnoreRules::default(), false, &HashSet::new()).unwrap();
        assert_eq!(again.hashed_bytes, 0);
        assert_eq!(again.nodes, s.nodes);
    }

    /// The scan says its stat cache is the one it was given only when every row is: a file's
    /// new mode (content not read again), a new file or a file gone makes it differ.
    #[test]
    fn a_scan_tells_whether_its_stat_cache_is_the_old_one() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        for f in ["a", "b", "c"] {
            fs::write(root.join(f), f).unwrap();
        }
        let again =
            |old: &StatCache| scan(root, old, &IgnoreRules::default(), false, &HashSet::new()).unwrap();
        let first = again(&StatCache::new());
        assert!(!first.cache_is(&StatCache::new()));
        let same = again(&first.cache);
        assert!(same.cache_is(&first.cache));
        assert_eq!(same.cache, first.cache);

        fs::set_permissions(root.join("b"), fs::Permissions::from_mode(0o600)).unwrap();
        let moded = again(&same.cache);
        assert_eq!(moded.hashed_bytes, 0);
        assert_ne!(moded.cache, same.cache);
        assert!(!moded.cache_is(&same.cache));
        assert!(again(&moded.cache).cache_is(&moded.cache));

        fs::write(root.join("d"), "d").unwrap();
        assert!(!again(&moded.cache).cache_is(&moded.cache));
        fs::remove_file(root.join("d")).unwrap();
        fs::remove_file(root.join("a")).unwrap();
        let mut old = moded.cache.clone();
        old.remove(&RelPath::new("a").unwrap());
        // `old` without a: the same rows as the folder now.
        assert!(again(&old).cache_is(&old));
        assert!(!again(&moded.cache).cache_is(&moded.cache));
    }
}
