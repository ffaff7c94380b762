//! The client's index in `DIR/.deltasync/index.db` (SQLite, WAL): settings, the stat cache of the
//! last scan, the server's state as last seen, the version of each path last agreed with the
//! server (the base of the next change), and the uploads this computer has started (intents).
//!
//! Rows are the index's own columns, not wire structs, and the schema is versioned
//! (`PRAGMA user_version`), so a protocol change cannot make rows unreadable. The index is never
//! trusted to delete: a row that cannot be read is [`IndexError::Damaged`], and the caller then
//! forgets the server state (`forget_server_state`) and rebuilds it from the folder and the
//! server, a round in which no path has a base and so nothing is deleted on either side.

use std::collections::BTreeMap;
use std::path::Path;

use rusqlite::{Connection, OptionalExtension, Row, params};

use super::plan::merge3;
use crate::hash::ContentHash;
use crate::path::RelPath;
use crate::protocol::{Entry, Meta, Node};

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("index database error: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("cannot create {path}: {err}")]
    Create { path: String, err: std::io::Error },
    #[error("index row for `{path}` in `{table}` cannot be read ({why})")]
    Damaged { table: &'static str, path: String, why: String },
}

/// Stat fields that decide whether a file must be re-hashed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    pub size: u64,
    pub mtime_ns: i64,
    pub inode: u64,
    pub mode: u32,
}

impl Stat {
    /// A file's stat as the scan sees it and the stat cache keeps it (the permission bits of
    /// its mode, the only ones synced).
    pub fn of(md: &std::fs::Metadata) -> Stat {
        use std::os::unix::fs::MetadataExt;
        Stat {
            size: md.len(),
            mtime_ns: crate::fsutil::mtime_ns(md),
            inode: md.ino(),
            mode: md.mode() & crate::fsutil::PERMISSION_BITS,
        }
    }
}

/// The version of a path last agreed with the server: `node: None` means agreed absent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Synced {
    pub rev: u64,
    pub node: Option<Node>,
}

/// The statement [`put_stat`] runs.
const PUT_STAT: &str = "INSERT OR REPLACE INTO stat_cache (path, size, mtime_ns, inode, mode, hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6)";

/// Writes one stat cache row.
fn put_stat(
    st: &mut rusqlite::Statement<'_>,
    p: &RelPath,
    s: &Stat,
    h: &ContentHash,
) -> rusqlite::Result<usize> {
    st.execute(params![p.as_str(), s.size as i64, s.mtime_ns, s.inode as i64, s.mode, &h.0[..]])
}

pub struct Index {
    conn: Connection,
    /// Set when opening found an index of an older layout and replaced it by an empty one.
    pub fresh: bool,
}

/// The layout of the tables below; bump it when a column changes meaning.
const SCHEMA_VERSION: i64 = 2;

/// A node in columns: `kind` 0 absent, 1 file, 2 directory, 3 symlink.
const NODE_COLUMNS: &str =
    "kind INTEGER NOT NULL, hash BLOB, size INTEGER, mtime_ns INTEGER, mode INTEGER, target TEXT";

fn schema() -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS stat_cache (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, inode INTEGER, mode INTEGER, hash BLOB);
CREATE TABLE IF NOT EXISTS remote (path TEXT PRIMARY KEY, rev INTEGER NOT NULL, device TEXT NOT NULL, {NODE_COLUMNS});
CREATE TABLE IF NOT EXISTS synced (path TEXT PRIMARY KEY, rev INTEGER NOT NULL, {NODE_COLUMNS});
CREATE TABLE IF NOT EXISTS intents (path TEXT NOT NULL, {NODE_COLUMNS});
CREATE INDEX IF NOT EXISTS intents_path ON intents (path);"
    )
}

/// A node's columns, in `NODE_COLUMNS` order.
type NodeCols = (i64, Option<Vec<u8>>, Option<i64>, Option<i64>, Option<i64>, Option<String>);

fn node_cols(n: Option<&Node>) -> NodeCols {
    match n {
        None => (0, None, None, None, None, None),
        Some(Node::File { hash, size, meta }) => {
            (1, Some(hash.0.to_vec()), Some(*size as i64), Some(meta.mtime_ns), Some(meta.mode as i64), None)
        }
        Some(Node::Dir { mode }) => (2, None, None, None, Some(*mode as i64), None),
        Some(Node::Symlink { target }) => (3, None, None, None, None, Some(target.clone())),
    }
}

/// Reads the node columns starting at `at`; `Err` says why the row is not a node.
fn read_node(r: &Row, at: usize) -> rusqlite::Result<Result<Option<Node>, String>> {
    let kind: i64 = r.get(at)?;
    // Read in place: no buffer per row for the hash.
    let hash = r.get_ref(at + 1)?.as_blob_or_null()?;
    let size: Option<i64> = r.get(at + 2)?;
    let mtime_ns: Option<i64> = r.get(at + 3)?;
    let mode: Option<i64> = r.get(at + 4)?;
    let mode = mode.map(|m| u32::try_from(m).map_err(|_| format!("mode {m}")));
    Ok(match kind {
        0 => Ok(None),
        1 => match (hash.and_then(ContentHash::from_slice), size, mtime_ns, mode) {
            (Some(hash), Some(size), Some(mtime_ns), Some(Ok(mode))) if size >= 0 => {
                Ok(Some(Node::File { hash, size: size as u64, meta: Meta { mtime_ns, mode } }))
            }
            _ => Err("incomplete file columns".into()),
        },
        2 => match mode {
            Some(Ok(mode)) => Ok(Some(Node::Dir { mode })),
            _ => Err("directory without a mode".into()),
        },
        3 => match r.get::<_, Option<String>>(at + 5)? {
            Some(target) => Ok(Some(Node::Symlink { target })),
            None => Err("link without a target".into()),
        },
        k => Err(format!("unknown kind {k}")),
    })
}

/// The stat-cache rows that differ from `old` in `new`, in path order: each path with its row
/// in `new`, or `None` where it went (both maps sorted: compared side by side, not looked up one
/// by one).
fn stat_diff<'a>(
    old: &'a BTreeMap<RelPath, (Stat, ContentHash)>,
    new: &'a BTreeMap<RelPath, (Stat, ContentHash)>,
) -> impl Iterator<Item = (&'a RelPath, Option<&'a (Stat, ContentHash)>)> {
    static NONE: BTreeMap<RelPath, ()> = BTreeMap::new();
    merge3(old, new, &NONE).filter_map(|(p, was, now, _)| (was != now).then_some((p, now)))
}

/// How many stat-cache rows [`Index::save_stat_cache`] would write or delete going from `old`
/// to `new`, counting no further than `limit`.
pub fn stat_changes(
    old: &BTreeMap<RelPath, (Stat, ContentHash)>,
    new: &BTreeMap<RelPath, (Stat, ContentHash)>,
    limit: usize,
) -> usize {
    stat_diff(old, new).take(limit).count()
}

fn rev_of(v: i64) -> Result<u64, String> {
    u64::try_from(v).map_err(|_| format!("revision {v}"))
}

impl Index {
    /// Opens (or creates) the index. An index of an older layout is replaced by an empty one of
    /// this layout, keeping only the settings: the next round rebuilds it (see the module doc).
    pub fn open(state_dir: &Path) -> Result<Self, IndexError> {
        // It holds the token: the owner's only (0700, and 0600 for the database, whose WAL and
        // shared-memory files SQLite makes with the same mode).
        crate::fsutil::private_dir(state_dir)
            .map_err(|err| IndexError::Create { path: state_dir.display().to_string(), err })?;
        let db = state_dir.join("index.db");
        let conn = Connection::open(&db)?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o600))
                .map_err(|err| IndexError::Create { path: db.display().to_string(), err })?;
        }
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        // The index can always be rebuilt from the folder and the server, so NORMAL (no fsync per
        // commit) is enough: a lost update only makes the next round re-check a path.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        let mut fresh = false;
        if version != SCHEMA_VERSION {
            let had_tables: bool = conn.query_row(
                "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE name IN ('remote', 'synced'))",
                [],
                |r| r.get(0),
            )?;
            fresh = had_tables;
            // Not atomic, and need not be: a crash in between leaves the old version number, so
            // the next open does this again.
            conn.execute_batch(
                "DROP TABLE IF EXISTS remote; DROP TABLE IF EXISTS synced; DROP TABLE IF EXISTS intents;
                 DROP TABLE IF EXISTS stat_cache;",
            )?;
        }
        conn.execute_batch(&schema())?;
        if version != SCHEMA_VERSION {
            conn.execute_batch("DELETE FROM settings WHERE key='last_seq';")?;
            conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        }
        Ok(Index { conn, fresh })
    }

    pub fn setting(&self, key: &str) -> Result<Option<String>, IndexError> {
        Ok(self
            .conn
            .query_row("SELECT value FROM settings WHERE key=?1", params![key], |r| r.get(0))
            .optional()?)
    }

    pub fn set_setting(&self, key: &str, value: &str) -> Result<(), IndexError> {
        self.conn
            .execute("INSERT OR REPLACE INTO settings (key, value) VALUES (?1, ?2)", params![key, value])?;
        Ok(())
    }

    /// The journal position of the last round; a value that does not parse is damage.
    pub fn last_seq(&self) -> Result<u64, IndexError> {
        match self.setting("last_seq")? {
            None => Ok(0),
            Some(s) => s.parse().map_err(|_| IndexError::Damaged {
                table: "settings",
                path: "last_seq".into(),
                why: format!("`{s}` is not a number"),
            }),
        }
    }

    /// Forgets everything learned from a server: the next round has no base for any path, so it
    /// deletes nothing and keeps differing content as conflict copies. Used when the folder is
    /// pointed at another account, the index is damaged, or the server's history went backwards.
    pub fn forget_server_state(&self) -> Result<(), IndexError> {
        self.conn.execute_batch(
            "DELETE FROM remote; DELETE FROM synced; DELETE FROM intents; DELETE FROM settings WHERE key='last_seq';",
        )?;
        Ok(())
    }

    pub fn stat_cache(&self) -> Result<BTreeMap<RelPath, (Stat, ContentHash)>, IndexError> {
        let mut st = self.conn.prepare("SELECT path, size, mtime_ns, inode, mode, hash FROM stat_cache")?;
        let rows = st.query_map([], |r| {
            let stat = Stat {
                size: r.get::<_, i64>(1)? as u64,
                mtime_ns: r.get(2)?,
                inode: r.get::<_, i64>(3)? as u64,
                mode: r.get(4)?,
            };
            // A row that no longer parses is just a cache miss: the file is hashed again.
            let Some(hash) = ContentHash::from_slice(r.get_ref(5)?.as_blob()?) else { return Ok(None) };
            Ok(RelPath::new(r.get_ref(0)?.as_str()?).ok().map(|p| (p, (stat, hash))))
        })?;
        // Gathered first: a map built from a whole list is built in one pass.
        let rows: Vec<_> = rows.filter_map(|row| row.ok().flatten()).collect();
        Ok(rows.into_iter().collect())
    }

    /// A second connection to this index, for work beside this one's: reading the server's
    /// view during the scan, writing a big scan's stat cache during the transfers (see
    /// [`stat_changes`]). It says the index is fresh if this one does.
    pub fn second(&self) -> Result<Index, IndexError> {
        let path = self.conn.path().unwrap_or_default().to_string();
        let conn = Connection::open(&path)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        Ok(Index { conn, fresh: self.fresh })
    }

    /// Saves the stat cache `cache`, given `old`, what [`stat_cache`](Self::stat_cache) read at
    /// the start of the round: only the rows that changed are written (a no-op round over
    /// 100,000 files rewrote them all: 12% of its time). If the table held rows `old` could not
    /// read, it is written whole.
    pub fn save_stat_cache(
        &mut self,
        old: &BTreeMap<RelPath, (Stat, ContentHash)>,
        cache: &BTreeMap<RelPath, (Stat, ContentHash)>,
    ) -> Result<(), IndexError> {
        let tx = self.conn.transaction()?;
        let rows: i64 = tx.query_row("SELECT count(*) FROM stat_cache", [], |r| r.get(0))?;
        let whole = usize::try_from(rows).is_ok_and(|n| n != old.len()) || rows < 0;
        if whole {
            tx.execute("DELETE FROM stat_cache", [])?;
        }
        {
            let mut put = tx.prepare(PUT_STAT)?;
            if whole {
                for (p, (s, h)) in cache {
                    put_stat(&mut put, p, s, h)?;
                }
            } else {
                let mut del = tx.prepare("DELETE FROM stat_cache WHERE path=?1")?;
                for (p, now) in stat_diff(old, cache) {
                    match now {
                        Some((s, h)) => put_stat(&mut put, p, s, h)?,
                        None => del.execute(params![p.as_str()])?,
                    };
                }
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Records the stats of files written outside a round (by `watch`'s lane), so the next
    /// round's scan knows them and does not read them again to hash them.
    pub fn put_stats(&mut self, rows: &BTreeMap<RelPath, (Stat, ContentHash)>) -> Result<(), IndexError> {
        let tx = self.conn.transaction()?;
        {
            let mut put = tx.prepare(PUT_STAT)?;
            for (p, (s, h)) in rows {
                put_stat(&mut put, p, s, h)?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Reads `SELECT path, <extra columns>, <node columns>` rows, failing on the first damaged one.
    fn rows<T>(
        &self,
        table: &'static str,
        sql: &str,
        extra: usize,
        make: impl Fn(&Row, &RelPath, Option<Node>) -> rusqlite::Result<Result<T, String>>,
    ) -> Result<Vec<(RelPath, T)>, IndexError> {
        let mut st = self.conn.prepare(sql)?;
        let mut rows = st.query([])?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            let path = r.get_ref(0).ok().and_then(|v| v.as_str().ok()).unwrap_or_default();
            let damaged = |why: String| IndexError::Damaged { table, path: path.to_string(), why };
            let rel = RelPath::new(path).map_err(|e| damaged(e.to_string()))?;
            let node = read_node(r, 1 + extra).map_err(|e| damaged(e.to_string()))?.map_err(damaged)?;
            let v = make(r, &rel, node).map_err(|e| damaged(e.to_string()))?.map_err(damaged)?;
            out.push((rel, v));
        }
        Ok(out)
    }

    pub fn remote(&self) -> Result<BTreeMap<RelPath, Entry>, IndexError> {
        Ok(self
            .rows(
                "remote",
                "SELECT path, rev, device, kind, hash, size, mtime_ns, mode, target FROM remote",
                2,
                |r, path, node| {
                    let device: String = r.get(2)?;
                    Ok(rev_of(r.get(1)?).map(|rev| Entry { path: path.clone(), rev, node, device }))
                },
            )?
            .into_iter()
            .collect())
    }

    pub fn synced(&self) -> Result<BTreeMap<RelPath, Synced>, IndexError> {
        Ok(self
            .rows(
                "synced",
                "SELECT path, rev, kind, hash, size, mtime_ns, mode, target FROM synced",
                1,
                |r, _, node| Ok(rev_of(r.get(1)?).map(|rev| Synced { rev, node })),
            )?
            .into_iter()
            .collect())
    }

    /// The uploads of rounds that did not end cleanly: path → the node it uploads (`None`: a
    /// delete); a path may have several. A server entry equal to one is this computer's own.
    pub fn intents(&self) -> Result<Vec<(RelPath, Option<Node>)>, IndexError> {
        self.rows(
            "intents",
            "SELECT path, kind, hash, size, mtime_ns, mode, target FROM intents",
            0,
            |_, _, node| Ok(Ok(node)),
        )
    }

    /// Records the uploads a round is about to send, before it sends them. They are kept until a
    /// round ends cleanly ([`Index::clear_intents`]): a session of a round that was cut off may
    /// still be committing on the server while the next round plans.
    pub fn add_intents(&mut self, intents: &[(RelPath, Option<Node>)]) -> Result<(), IndexError> {
        let tx = self.conn.transaction()?;
        {
            // Rounds that keep failing add the same intents again: each is kept once. (Usually
            // there are none: a first push of 100,000 files spent half of this on the deletes.)
            let some: bool = tx.query_row("SELECT EXISTS (SELECT 1 FROM intents)", [], |r| r.get(0))?;
            let mut same = tx.prepare(
                "DELETE FROM intents WHERE path=?1 AND kind=?2 AND hash IS ?3 AND size IS ?4 AND mtime_ns IS ?5
                 AND mode IS ?6 AND target IS ?7",
            )?;
            let mut st = tx.prepare(
                "INSERT INTO intents (path, kind, hash, size, mtime_ns, mode, target) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?;
            for (p, n) in intents {
                let c = node_cols(n.as_ref());
                if some {
                    same.execute(params![p.as_str(), c.0, c.1, c.2, c.3, c.4, c.5])?;
                }
                st.execute(params![p.as_str(), c.0, c.1, c.2, c.3, c.4, c.5])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    pub fn clear_intents(&mut self) -> Result<(), IndexError> {
        self.conn.execute("DELETE FROM intents", [])?;
        Ok(())
    }

    /// Applies a batch of changes in one transaction.
    pub fn apply(&mut self, batch: &Batch) -> Result<(), IndexError> {
        let tx = self.conn.transaction()?;
        if batch.replace_remote {
            tx.execute("DELETE FROM remote", [])?;
            tx.execute("DELETE FROM intents", [])?;
        }
        {
            let mut put_remote = tx.prepare_cached(
                "INSERT OR REPLACE INTO remote (path, rev, device, kind, hash, size, mtime_ns, mode, target)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )?;
            for e in &batch.remote {
                let c = node_cols(e.node.as_ref());
                put_remote.execute(params![
                    e.path.as_str(),
                    e.rev as i64,
                    e.device,
                    c.0,
                    c.1,
                    c.2,
                    c.3,
                    c.4,
                    c.5
                ])?;
            }
            let mut put_synced = tx.prepare_cached(
                "INSERT OR REPLACE INTO synced (path, rev, kind, hash, size, mtime_ns, mode, target)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?;
            for (p, s) in &batch.synced {
                let c = node_cols(s.node.as_ref());
                put_synced.execute(params![p.as_str(), s.rev as i64, c.0, c.1, c.2, c.3, c.4, c.5])?;
            }
            let mut forget = tx.prepare_cached("DELETE FROM synced WHERE path=?1")?;
            for p in &batch.forget {
                forget.execute(params![p.as_str()])?;
            }
            if let Some(seq) = batch.last_seq {
                tx.execute(
                    "INSERT OR REPLACE INTO settings (key, value) VALUES ('last_seq', ?1)",
                    params![seq.to_string()],
                )?;
            }
        }
        tx.commit()?;
        Ok(())
    }
}

/// Index updates gathered during a round and written together.
#[derive(Default, Debug)]
pub struct Batch {
    pub remote: Vec<Entry>,
    pub synced: Vec<(RelPath, Synced)>,
    /// Paths whose base is dropped (neither side has them any more).
    pub forget: Vec<RelPath>,
    /// `remote` is the server's whole state: what the index held of it before goes.
    pub replace_remote: bool,
    pub last_seq: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    #[test]
    fn the_stat_cache_saves_what_changed_and_forgets_what_went() {
        let d = tempfile::tempdir().unwrap();
        let mut ix = Index::open(d.path()).unwrap();
        let st = |n: u64| Stat { size: n, mtime_ns: n as i64, inode: n, mode: 0o644 };
        let h = |n: u8| ContentHash::of(&[n]);
        let first: BTreeMap<_, _> =
            [(p("a"), (st(1), h(1))), (p("b"), (st(2), h(2))), (p("c"), (st(3), h(3)))].into();
        ix.save_stat_cache(&BTreeMap::new(), &first).unwrap();
        assert_eq!(ix.stat_cache().unwrap(), first);
        let old = ix.stat_cache().unwrap();
        let next: BTreeMap<_, _> =
            [(p("a"), (st(1), h(1))), (p("b"), (st(5), h(5))), (p("d"), (st(4), h(4)))].into();
        ix.save_stat_cache(&old, &next).unwrap();
        assert_eq!(ix.stat_cache().unwrap(), next);
        // Given a stale `old` (rows it did not know), the table is written whole.
        ix.save_stat_cache(&BTreeMap::new(), &first).unwrap();
        assert_eq!(ix.stat_cache().unwrap(), first);
    }

    #[test]
    fn stat_changes_counts_what_a_save_writes_and_a_second_connection_saves_it() {
        let st = |n: u64| Stat { size: n, mtime_ns: n as i64, inode: n, mode: 0o644 };
        let h = |n: u8| ContentHash::of(&[n]);
        let old: BTreeMap<_, _> =
            [(p("a"), (st(1), h(1))), (p("b"), (st(2), h(2))), (p("c"), (st(3), h(3)))].into();
        let new: BTreeMap<_, _> = [
            (p("a"), (st(1), h(1))),
            (p("b"), (st(5), h(5))),
            (p("d"), (st(4), h(4))),
            (p("e"), (st(6), h(6))),
        ]
        .into();
        // b changed, d and e are new, c went.
        assert_eq!(stat_changes(&old, &new, 100), 4);
        assert_eq!(stat_changes(&old, &old, 100), 0);
        assert_eq!(stat_changes(&BTreeMap::new(), &new, 100), 4);
        assert_eq!(stat_changes(&new, &BTreeMap::new(), 100), 4);
        assert_eq!(stat_changes(&BTreeMap::new(), &new, 2), 2);
        let d = tempfile::tempdir().unwrap();
        let mut ix = Index::open(d.path()).unwrap();
        ix.save_stat_cache(&BTreeMap::new(), &old).unwrap();
        let mut second = ix.second().unwrap();
        second.save_stat_cache(&old, &new).unwrap();
        assert_eq!(ix.stat_cache().unwrap(), new);
    }

    #[test]
    fn rows_round_trip_every_kind() {
        let d = tempfile::tempdir().unwrap();
        let mut ix = Index::open(d.path()).unwrap();
        let nodes = [
            None,
            Some(Node::File {
                hash: ContentHash::of(b"x"),
                size: 7,
                meta: Meta { mtime_ns: -5, mode: 0o755 },
            }),
            Some(Node::Dir { mode: 0o700 }),
            Some(Node::Symlink { target: "../t".into() }),
        ];
        let mut batch = Batch::default();
        for (i, n) in nodes.iter().enumerate() {
            let path = p(&format!("p{i}"));
            batch.remote.push(Entry {
                path: path.clone(),
                rev: i as u64 + 1,
                node: n.clone(),
                device: "d".into(),
            });
            batch.synced.push((path, Synced { rev: i as u64, node: n.clone() }));
        }
        batch.last_seq = Some(9);
        ix.apply(&batch).unwrap();
        let remote = ix.remote().unwrap();
        let synced = ix.synced().unwrap();
        for (i, n) in nodes.iter().enumerate() {
            let path = p(&format!("p{i}"));
            assert_eq!(remote[&path].node, *n);
            assert_eq!(remote[&path].rev, i as u64 + 1);
            assert_eq!(synced[&path], Synced { rev: i as u64, node: n.clone() });
        }
        assert_eq!(ix.last_seq().unwrap(), 9);
    }

    #[test]
    fn intents_are_kept_once_each_until_cleared() {
        let d = tempfile::tempdir().unwrap();
        let mut ix = Index::open(d.path()).unwrap();
        let f = |c: &[u8]| {
            Some(Node::File { hash: ContentHash::of(c), size: 1, meta: Meta { mtime_ns: 1, mode: 0o644 } })
        };
        ix.add_intents(&[(p("a"), f(b"1")), (p("b"), None)]).unwrap();
        ix.add_intents(&[(p("a"), f(b"1")), (p("a"), f(b"2")), (p("b"), None)]).unwrap();
        let mut got = ix.intents().unwrap();
        got.sort_by(|x, y| format!("{x:?}").cmp(&format!("{y:?}")));
        assert_eq!(got.len(), 3, "{got:?}");
        ix.clear_intents().unwrap();
        assert!(ix.intents().unwrap().is_empty());
    }

    #[test]
    fn a_damaged_row_is_an_error_never_an_absent_path() {
        let d = tempfile::tempdir().unwrap();
        let mut ix = Index::open(d.path()).unwrap();
        let f = Node::File { hash: ContentHash::of(b"x"), size: 1, meta: Meta { mtime_ns: 1, mode: 0o644 } };
        let e = Entry { path: p("a"), rev: 3, node: Some(f.clone()), device: "d".into() };
        ix.apply(&Batch {
            remote: vec![e],
            synced: vec![(p("a"), Synced { rev: 3, node: Some(f) })],
            ..Default::default()
        })
        .unwrap();
        ix.conn.execute("UPDATE remote SET hash = x'00'", []).unwrap();
        ix.conn.execute("UPDATE synced SET kind = 9", []).unwrap();
        assert!(matches!(ix.remote(), Err(IndexError::Damaged { table: "remote", .. })));
        assert!(matches!(ix.synced(), Err(IndexError::Damaged { table: "synced", .. })));
        ix.forget_server_state().unwrap();
        assert!(ix.remote().unwrap().is_empty() && ix.synced().unwrap().is_empty());
    }

    #[test]
    fn an_index_of_the_old_layout_is_replaced_and_keeps_its_settings() {
        let d = tempfile::tempdir().unwrap();
        {
            let c = Connection::open(d.path().join("index.db")).unwrap();
            c.execute_batch(
                "CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
                 CREATE TABLE remote (path TEXT PRIMARY KEY, entry BLOB NOT NULL);
                 CREATE TABLE synced (path TEXT PRIMARY KEY, rev INTEGER NOT NULL, node BLOB);
                 INSERT INTO settings VALUES ('server', 's:1'), ('last_seq', '40');
                 INSERT INTO remote VALUES ('a', x'0102');",
            )
            .unwrap();
        }
        let ix = Index::open(d.path()).unwrap();
        assert!(ix.fresh);
        assert_eq!(ix.setting("server").unwrap().as_deref(), Some("s:1"));
        assert_eq!(ix.last_seq().unwrap(), 0);
        assert!(ix.remote().unwrap().is_empty());
        drop(ix);
        assert!(!Index::open(d.path()).unwrap().fresh);
    }
}
