//! The client's index in `DIR/.deltasync/index.db` (SQLite, WAL): settings, the stat cache of the
//! last scan, the server's state as last seen, and the version of each path last agreed with the
//! server (the base of the next change).

use std::collections::BTreeMap;
use std::path::Path;

use rusqlite::{Connection, OptionalExtension, params};

use crate::path::RelPath;
use crate::protocol::{Entry, Node};

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("index database error: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("cannot create {path}: {err}")]
    Create { path: String, err: std::io::Error },
}

/// Stat fields that decide whether a file must be re-hashed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    pub size: u64,
    pub mtime_ns: i64,
    pub inode: u64,
    pub mode: u32,
}

/// The version of a path last agreed with the server: `node: None` means agreed absent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Synced {
    pub rev: u64,
    pub node: Option<Node>,
}

pub struct Index {
    conn: Connection,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS stat_cache (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, inode INTEGER, mode INTEGER, hash BLOB);
CREATE TABLE IF NOT EXISTS remote (path TEXT PRIMARY KEY, entry BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS synced (path TEXT PRIMARY KEY, rev INTEGER NOT NULL, node BLOB);
";

impl Index {
    pub fn open(state_dir: &Path) -> Result<Self, IndexError> {
        std::fs::create_dir_all(state_dir)
            .map_err(|err| IndexError::Create { path: state_dir.display().to_string(), err })?;
        let conn = Connection::open(state_dir.join("index.db"))?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        // The index can always be rebuilt from the folder and the server, so NORMAL (no fsync per
        // commit) is enough: a lost update only makes the next round re-check a path.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.execute_batch(SCHEMA)?;
        Ok(Index { conn })
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

    pub fn last_seq(&self) -> Result<u64, IndexError> {
        Ok(self.setting("last_seq")?.and_then(|s| s.parse().ok()).unwrap_or(0))
    }

    /// Forgets everything learned from a server (used when the folder is pointed at another account).
    pub fn forget_server_state(&self) -> Result<(), IndexError> {
        self.conn.execute_batch(
            "DELETE FROM remote; DELETE FROM synced; DELETE FROM settings WHERE key='last_seq';",
        )?;
        Ok(())
    }

    pub fn stat_cache(&self) -> Result<BTreeMap<RelPath, (Stat, crate::hash::ContentHash)>, IndexError> {
        let mut st = self.conn.prepare("SELECT path, size, mtime_ns, inode, mode, hash FROM stat_cache")?;
        let rows = st.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                Stat {
                    size: r.get::<_, i64>(1)? as u64,
                    mtime_ns: r.get(2)?,
                    inode: r.get::<_, i64>(3)? as u64,
                    mode: r.get(4)?,
                },
                r.get::<_, Vec<u8>>(5)?,
            ))
        })?;
        let mut out = BTreeMap::new();
        for row in rows {
            let (p, stat, h) = row?;
            // A row that no longer parses is just a cache miss.
            if let (Ok(p), Some(h)) = (RelPath::new(p), crate::hash::ContentHash::from_slice(&h)) {
                out.insert(p, (stat, h));
            }
        }
        Ok(out)
    }

    pub fn save_stat_cache(
        &mut self,
        cache: &BTreeMap<RelPath, (Stat, crate::hash::ContentHash)>,
    ) -> Result<(), IndexError> {
        let tx = self.conn.transaction()?;
        tx.execute("DELETE FROM stat_cache", [])?;
        {
            let mut st = tx.prepare("INSERT INTO stat_cache (path, size, mtime_ns, inode, mode, hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6)")?;
            for (p, (s, h)) in cache {
                st.execute(params![p.as_str(), s.size as i64, s.mtime_ns, s.inode as i64, s.mode, &h.0[..]])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    pub fn remote(&self) -> Result<BTreeMap<RelPath, Entry>, IndexError> {
        let mut st = self.conn.prepare("SELECT entry FROM remote")?;
        let rows = st.query_map([], |r| r.get::<_, Vec<u8>>(0))?;
        let mut out = BTreeMap::new();
        for row in rows {
            if let Ok(e) = postcard::from_bytes::<Entry>(&row?) {
                out.insert(e.path.clone(), e);
            }
        }
        Ok(out)
    }

    pub fn synced(&self) -> Result<BTreeMap<RelPath, Synced>, IndexError> {
        let mut st = self.conn.prepare("SELECT path, rev, node FROM synced")?;
        let rows = st.query_map([], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get::<_, Option<Vec<u8>>>(2)?))
        })?;
        let mut out = BTreeMap::new();
        for row in rows {
            let (p, rev, node) = row?;
            let Ok(p) = RelPath::new(p) else { continue };
            let node = node.and_then(|b| postcard::from_bytes::<Node>(&b).ok());
            out.insert(p, Synced { rev: rev as u64, node });
        }
        Ok(out)
    }

    /// Applies a batch of changes in one transaction.
    pub fn apply(&mut self, batch: &Batch) -> Result<(), IndexError> {
        let tx = self.conn.transaction()?;
        {
            let mut put_remote =
                tx.prepare_cached("INSERT OR REPLACE INTO remote (path, entry) VALUES (?1, ?2)")?;
            for e in &batch.remote {
                let bytes = postcard::to_allocvec(e).unwrap_or_default();
                put_remote.execute(params![e.path.as_str(), bytes])?;
            }
            let mut put_synced =
                tx.prepare_cached("INSERT OR REPLACE INTO synced (path, rev, node) VALUES (?1, ?2, ?3)")?;
            for (p, s) in &batch.synced {
                let node = s.node.as_ref().map(|n| postcard::to_allocvec(n).unwrap_or_default());
                put_synced.execute(params![p.as_str(), s.rev as i64, node])?;
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
    pub last_seq: Option<u64>,
}
