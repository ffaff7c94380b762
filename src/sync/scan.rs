//! Walks a synced folder into a map of path → node, re-hashing only files whose size, mtime or
//! inode changed since the last scan.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
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
    /// Temp files of interrupted runs removed on the way.
    pub temps_removed: usize,
}

/// `.deltasync/tmp/`: the temp files of downloads and local copies, renamed into place from here.
pub fn temp_dir(root: &Path) -> PathBuf {
    root.join(STATE_DIR).join("tmp")
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
    clean(partial_dir(root), true);
    removed
}

/// Is this a name deltasync never syncs?
pub fn is_ignored_name(name: &str) -> bool {
    name.starts_with(TEMP_PREFIX)
}

/// Walks `root`. With `clean`, deltasync temp files met on the way are removed: only for a folder
/// whose lock is held (no other deltasync writes there), where they are what an interrupted run
/// left behind (older versions wrote downloads to a temp beside the file); so are the temp files
/// in `.deltasync/` and its stale partial downloads ([`clean_state`]).
pub fn scan(root: &Path, old: &StatCache, rules: &IgnoreRules, clean: bool) -> std::io::Result<Scan> {
    let mut s = Scan::default();
    if clean {
        s.temps_removed += clean_state(root, SystemTime::now());
    }
    walk(root, root, old, rules, clean, &mut s)?;
    Ok(s)
}

fn walk(
    root: &Path,
    dir: &Path,
    old: &StatCache,
    rules: &IgnoreRules,
    clean: bool,
    s: &mut Scan,
) -> std::io::Result<()> {
    let shown = |p: &Path| p.strip_prefix(root).unwrap_or(p).to_string_lossy().into_owned();
    let unreadable = |s: &mut Scan, e: std::io::Error| {
        s.skipped.push(PathIssue { path: shown(dir), cause: local_cause(&e) });
        if let Ok(rel) = RelPath::from_local(root, dir) {
            s.nodes.remove(&rel);
            s.unknown.push(rel);
        }
    };
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if dir != root => {
            unreadable(s, e);
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    for entry in rd {
        let entry = match entry {
            Ok(entry) => entry,
            Err(e) if dir != root => {
                unreadable(s, e);
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let full = entry.path();
        let name = entry.file_name();
        let name_str = name.to_string_lossy();
        if is_ignored_name(&name_str) {
            if clean && entry.file_type().is_ok_and(|t| t.is_file()) {
                match fs::remove_file(&full) {
                    Ok(()) => s.temps_removed += 1,
                    Err(e) => tracing::debug!("cannot remove {}: {e}", full.display()),
                }
            }
            continue;
        }
        if dir == root && name_str == STATE_DIR {
            continue;
        }
        let rel = match RelPath::from_local(root, &full) {
            Ok(r) => r,
            Err(e) => {
                s.skipped.push(PathIssue { path: shown(&full), cause: format!("cannot be synced: {e}") });
                continue;
            }
        };
        // fstatat on the directory's descriptor (does not follow a symlink, like
        // symlink_metadata), without walking the whole path again for every file.
        let md = match entry.metadata() {
            Ok(m) => m,
            Err(e) => {
                s.skipped.push(PathIssue { path: shown(&full), cause: local_cause(&e) });
                s.unknown.push(rel);
                continue;
            }
        };
        let ft = md.file_type();
        if rules.is_ignored(&rel, ft.is_dir()) {
            continue;
        }
        if ft.is_dir() {
            s.nodes.insert(rel, Node::Dir { mode: md.permissions().mode() & fsutil::PERMISSION_BITS });
            walk(root, &full, old, rules, clean, s)?;
        } else if ft.is_symlink() {
            match fs::read_link(&full).ok().and_then(|t| t.to_str().map(String::from)) {
                Some(target) => {
                    s.nodes.insert(rel, Node::Symlink { target });
                }
                None => {
                    s.skipped.push(PathIssue {
                        path: shown(&full),
                        cause: "its symlink target is not UTF-8, which cannot be synced".into(),
                    });
                    s.unknown.push(rel);
                }
            }
        } else if ft.is_file() {
            let stat = Stat {
                size: md.len(),
                mtime_ns: fsutil::mtime_ns(&md),
                inode: md.ino(),
                mode: md.mode() & fsutil::PERMISSION_BITS,
            };
            let hash = match old.get(&rel) {
                Some((st, h))
                    if st.size == stat.size && st.mtime_ns == stat.mtime_ns && st.inode == stat.inode =>
                {
                    *h
                }
                _ => match ContentHash::of_file(&full) {
                    Ok((h, _)) => {
                        s.hashed_bytes += stat.size;
                        h
                    }
                    Err(e) => {
                        s.skipped.push(PathIssue { path: shown(&full), cause: local_cause(&e) });
                        s.unknown.push(rel);
                        continue;
                    }
                },
            };
            s.cache.insert(rel.clone(), (stat, hash));
            s.nodes.insert(
                rel,
                Node::File { hash, size: stat.size, meta: Meta { mtime_ns: stat.mtime_ns, mode: stat.mode } },
            );
        } else {
            s.special.push(PathIssue {
                path: shown(&full),
                cause: "not a regular file, directory or symlink (never synced)".into(),
            });
            s.unknown.push(rel);
        }
    }
    Ok(())
}
