//! Metadata: accounts, the current state of every path, and the journal, in SQLite (WAL).
//!
//! All SQL of the server lives here, so a PostgreSQL backend is one more implementation of this
//! module's API. Each commit is one transaction that takes the account's next sequence number,
//! updates the path's row (its `rev` is that number) and appends a journal line, so "what changed
//! since N" is `WHERE rev > N` and can never miss a commit.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, params};
use sha2::{Digest, Sha256};

use crate::hash::ContentHash;
use crate::path::RelPath;
use crate::protocol::{Entry, Meta as NodeMeta, Node};

/// Entries per `Changes` page: ~100 bytes each keeps a page far below the frame limit.
pub const PAGE: usize = 2000;

#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("database error: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("an account named `{0}` exists already")]
    AccountExists(String),
    #[error("corrupt row for `{0}` in the database")]
    CorruptRow(String),
    #[error("the OS random number generator failed: {0}")]
    Random(String),
}

pub type AccountId = i64;

#[derive(Debug, Clone)]
pub struct Account {
    pub id: AccountId,
    pub name: String,
}

/// An account as `account list` shows it.
#[derive(Debug, Clone)]
pub struct AccountInfo {
    pub account: Account,
    /// Its journal position (number of changes).
    pub seq: u64,
    /// Bytes of its live files.
    pub used: u64,
    pub quota: Option<u64>,
}

/// Brings a database made by an older version up to date: accounts gain `used` (bytes of live
/// files, kept by every commit) and `quota` (NULL: none).
fn migrate(conn: &Connection) -> Result<(), MetaError> {
    let has_used = |conn: &Connection| -> rusqlite::Result<bool> {
        conn.prepare("SELECT 1 FROM pragma_table_info('accounts') WHERE name='used'")?.exists([])
    };
    if has_used(conn)? {
        return Ok(());
    }
    // Another process (`serve` and `account add` on a fresh folder) may be doing the same: check
    // again inside the write transaction.
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let r = (|| -> rusqlite::Result<()> {
        if !has_used(conn)? {
            conn.execute_batch(
                "ALTER TABLE accounts ADD COLUMN used INTEGER NOT NULL DEFAULT 0;
                 ALTER TABLE accounts ADD COLUMN quota INTEGER;
                 UPDATE accounts SET used = (SELECT COALESCE(SUM(size), 0) FROM files
                                             WHERE files.account = accounts.id AND kind = 1);",
            )?;
        }
        conn.execute_batch("COMMIT")
    })();
    if r.is_err() {
        let _ = conn.execute_batch("ROLLBACK");
    }
    Ok(r?)
}

/// One connection behind a mutex: SQLite serializes writers anyway, and every call is short.
/// This is a `std::sync::Mutex` (not a Tokio one) because no `.await` happens while it is held;
/// callers run it on the blocking pool.
pub struct Metadata {
    conn: Mutex<Connection>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS accounts (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    token_hash BLOB NOT NULL UNIQUE,
    seq INTEGER NOT NULL DEFAULT 0,
    created INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS files (
    account INTEGER NOT NULL,
    path TEXT NOT NULL,
    rev INTEGER NOT NULL,
    kind INTEGER NOT NULL,          -- 0 deleted, 1 file, 2 dir, 3 symlink
    hash BLOB,
    size INTEGER NOT NULL DEFAULT 0,
    mtime_ns INTEGER NOT NULL DEFAULT 0,
    mode INTEGER NOT NULL DEFAULT 0,
    target TEXT,
    device TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (account, path)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS files_rev ON files(account, rev);
CREATE INDEX IF NOT EXISTS files_hash ON files(account, hash);
-- Uploads between rename-into-place and their commit: a redo log, so a crash in between
-- is completed at start instead of leaving the mirror ahead of the metadata.
CREATE TABLE IF NOT EXISTS pending (
    id INTEGER PRIMARY KEY,
    account INTEGER NOT NULL,
    path TEXT NOT NULL,
    tmp TEXT NOT NULL,
    node BLOB NOT NULL,
    op TEXT NOT NULL,
    device TEXT NOT NULL
);
-- One row: this data folder's identity, made once (clients notice a server restored from an
-- older backup by it and the journal position).
CREATE TABLE IF NOT EXISTS server (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    server_id BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS journal (
    account INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    op TEXT NOT NULL,
    path TEXT NOT NULL,
    device TEXT NOT NULL,
    at INTEGER NOT NULL,
    PRIMARY KEY (account, seq)
) WITHOUT ROWID;
";

pub fn token_hash(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl Metadata {
    pub fn open(path: &Path) -> Result<Self, MetaError> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        // WAL lets `account add` write while the server runs; synchronous=FULL makes each commit
        // durable, matching the fsync of the file it records. Switching a new database to WAL
        // answers "locked" at once (no busy wait) while another process opens it too, as `serve`
        // and `account add` do on a fresh data folder: retry for a while.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let r = conn
                .pragma_update(None, "journal_mode", "WAL")
                .and_then(|_| conn.pragma_update(None, "synchronous", "FULL"))
                .and_then(|_| conn.execute_batch(SCHEMA));
            match r {
                Ok(()) => break,
                Err(rusqlite::Error::SqliteFailure(e, _))
                    if matches!(
                        e.code,
                        rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
                    ) && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => return Err(e.into()),
            }
        }
        migrate(&conn)?;
        Ok(Metadata { conn: Mutex::new(conn) })
    }

    /// This data folder's 16 random bytes, made when its database was created (or first opened
    /// by a version that knows them).
    pub fn server_id(&self) -> Result<[u8; 16], MetaError> {
        let c = self.conn();
        let mut fresh = [0u8; 16];
        getrandom::fill(&mut fresh).map_err(|e| MetaError::Random(e.to_string()))?;
        c.execute("INSERT OR IGNORE INTO server (id, server_id) VALUES (1, ?1)", params![&fresh[..]])?;
        let id: Vec<u8> = c.query_row("SELECT server_id FROM server WHERE id=1", [], |r| r.get(0))?;
        id.try_into().map_err(|_| MetaError::CorruptRow("server id".into()))
    }

    /// Sets (or with `None` removes) an account's quota in bytes; `false` if there is no such
    /// account.
    pub fn set_quota(&self, name: &str, quota: Option<u64>) -> Result<bool, MetaError> {
        let c = self.conn();
        let n = c.execute(
            "UPDATE accounts SET quota=?2 WHERE name=?1",
            params![name, quota.map(|q| q.min(i64::MAX as u64) as i64)],
        )?;
        Ok(n > 0)
    }

    /// The bytes of the account's live files and its quota, if any.
    pub fn usage(&self, account: AccountId) -> Result<(u64, Option<u64>), MetaError> {
        let c = self.conn();
        Ok(c.query_row("SELECT used, quota FROM accounts WHERE id=?1", params![account], |r| {
            Ok((r.get::<_, i64>(0)?.max(0) as u64, r.get::<_, Option<i64>>(1)?.map(|q| q.max(0) as u64)))
        })?)
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite inconsistent (transactions roll back).
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn add_account(&self, name: &str, token: &str) -> Result<Account, MetaError> {
        let c = self.conn();
        let r = c.execute(
            "INSERT INTO accounts (name, token_hash, created) VALUES (?1, ?2, ?3)",
            params![name, token_hash(token), now_secs()],
        );
        match r {
            Ok(_) => Ok(Account { id: c.last_insert_rowid(), name: name.to_string() }),
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                Err(MetaError::AccountExists(name.to_string()))
            }
            Err(e) => Err(e.into()),
        }
    }

    pub fn list_accounts(&self) -> Result<Vec<AccountInfo>, MetaError> {
        let c = self.conn();
        let mut st = c.prepare("SELECT id, name, seq, used, quota FROM accounts ORDER BY name")?;
        let rows = st.query_map([], |r| {
            Ok(AccountInfo {
                account: Account { id: r.get(0)?, name: r.get(1)? },
                seq: r.get::<_, i64>(2)? as u64,
                used: r.get::<_, i64>(3)?.max(0) as u64,
                quota: r.get::<_, Option<i64>>(4)?.map(|q| q.max(0) as u64),
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn authenticate(&self, token: &str) -> Result<Option<Account>, MetaError> {
        let c = self.conn();
        Ok(c.query_row(
            "SELECT id, name FROM accounts WHERE token_hash = ?1",
            params![token_hash(token)],
            |r| Ok(Account { id: r.get(0)?, name: r.get(1)? }),
        )
        .optional()?)
    }

    /// The current entry at `path` (a tombstone if deleted), `None` if it never existed.
    pub fn get(&self, account: AccountId, path: &RelPath) -> Result<Option<Entry>, MetaError> {
        let c = self.conn();
        let mut st = c.prepare_cached(
            "SELECT path, rev, kind, hash, size, mtime_ns, mode, target, device FROM files WHERE account=?1 AND path=?2",
        )?;
        let row = st.query_row(params![account, path.as_str()], row_to_entry).optional()?;
        row.transpose()
    }

    /// A live file in the account with this content, for server-side copies.
    pub fn find_by_hash(&self, account: AccountId, hash: &ContentHash) -> Result<Option<RelPath>, MetaError> {
        let c = self.conn();
        let p: Option<String> = c
            .query_row(
                "SELECT path FROM files WHERE account=?1 AND hash=?2 AND kind=1 LIMIT 1",
                params![account, &hash.0[..]],
                |r| r.get(0),
            )
            .optional()?;
        p.map(|p| RelPath::new(p.clone()).map_err(|_| MetaError::CorruptRow(p))).transpose()
    }

    /// One page of entries changed after `since`, the account's current sequence, and whether
    /// more pages follow.
    pub fn changes(&self, account: AccountId, since: u64) -> Result<(Vec<Entry>, u64, bool), MetaError> {
        let c = self.conn();
        let seq: i64 = c.query_row("SELECT seq FROM accounts WHERE id=?1", params![account], |r| r.get(0))?;
        let mut st = c.prepare_cached(
            "SELECT path, rev, kind, hash, size, mtime_ns, mode, target, device FROM files
             WHERE account=?1 AND rev>?2 ORDER BY rev, path LIMIT ?3",
        )?;
        let mut entries = st
            .query_map(params![account, since as i64, PAGE as i64 + 1], row_to_entry)?
            .collect::<Result<Result<Vec<_>, _>, _>>()??;
        let more = entries.len() > PAGE;
        if more {
            // The next page starts after the last revision of this one, so a page never ends
            // inside a revision: one commit's entries (a move's two paths) share it.
            let last = entries[PAGE].rev;
            let keep = entries.iter().position(|e| e.rev == last).unwrap_or(PAGE);
            if keep > 0 {
                entries.truncate(keep);
            } else {
                // One revision larger than a page: send all of it.
                let mut st = c.prepare_cached(
                    "SELECT path, rev, kind, hash, size, mtime_ns, mode, target, device FROM files
                     WHERE account=?1 AND rev=?2",
                )?;
                entries =
                    st.query_map(params![account, last as i64], row_to_entry)?
                        .collect::<Result<Result<Vec<_>, _>, _>>()??;
            }
        }
        Ok((entries, seq as u64, more))
    }

    pub fn seq(&self, account: AccountId) -> Result<u64, MetaError> {
        let c = self.conn();
        Ok(c.query_row("SELECT seq FROM accounts WHERE id=?1", params![account], |r| r.get::<_, i64>(0))?
            as u64)
    }

    /// Records a set of path changes as one journal step; returns the new sequence number.
    /// The caller holds the account's commit lock and has checked the base revisions.
    pub fn commit(
        &self,
        account: AccountId,
        op: &str,
        device: &str,
        changes: &[(&RelPath, Option<&Node>)],
    ) -> Result<u64, MetaError> {
        let mut c = self.conn();
        let tx = c.transaction()?;
        let seq = next_seq(&tx, account)?;
        for (path, node) in changes {
            write_change(&tx, account, seq, path, *node, op, device)?;
        }
        tx.commit()?;
        Ok(seq)
    }

    /// Step one of a group commit: remembers the uploads about to be renamed into place.
    pub fn stage(
        &self,
        account: AccountId,
        device: &str,
        items: &[(&RelPath, &Path, &Node, &str)],
    ) -> Result<Vec<i64>, MetaError> {
        let mut c = self.conn();
        let tx = c.transaction()?;
        let mut ids = Vec::with_capacity(items.len());
        {
            let mut st = tx.prepare_cached(
                "INSERT INTO pending (account, path, tmp, node, op, device) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            for (path, tmp, node, op) in items {
                let node = postcard::to_allocvec(node).unwrap_or_default();
                st.execute(params![account, path.as_str(), tmp.to_string_lossy(), node, op, device])?;
                ids.push(tx.last_insert_rowid());
            }
        }
        tx.commit()?;
        Ok(ids)
    }

    /// Step two: records the renamed uploads, one sequence number each, in one transaction.
    pub fn commit_staged(
        &self,
        account: AccountId,
        device: &str,
        items: &[(i64, &RelPath, &Node, &str)],
    ) -> Result<Vec<u64>, MetaError> {
        let mut c = self.conn();
        let tx = c.transaction()?;
        let mut seqs = Vec::with_capacity(items.len());
        for (id, path, node, op) in items {
            let seq = next_seq(&tx, account)?;
            write_change(&tx, account, seq, path, Some(node), op, device)?;
            tx.execute("DELETE FROM pending WHERE id=?1", params![id])?;
            seqs.push(seq);
        }
        tx.commit()?;
        Ok(seqs)
    }

    pub fn drop_pending(&self, ids: &[i64]) -> Result<(), MetaError> {
        let c = self.conn();
        for id in ids {
            c.execute("DELETE FROM pending WHERE id=?1", params![id])?;
        }
        Ok(())
    }

    /// Staged uploads left by a crash.
    pub fn pending(&self) -> Result<Vec<Pending>, MetaError> {
        let c = self.conn();
        let mut st = c.prepare("SELECT id, account, path, tmp, node, op, device FROM pending ORDER BY id")?;
        let rows = st.query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, Vec<u8>>(4)?,
                r.get::<_, String>(5)?,
                r.get::<_, String>(6)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, account, path, tmp, node, op, device) = row?;
            let (Ok(path), Ok(node)) = (RelPath::new(path.clone()), postcard::from_bytes::<Node>(&node))
            else {
                return Err(MetaError::CorruptRow(path));
            };
            out.push(Pending { id, account, path, tmp: tmp.into(), node, op, device });
        }
        Ok(out)
    }

    /// Live entries under a directory (for refusing to delete a non-empty one).
    pub fn has_children(&self, account: AccountId, dir: &RelPath) -> Result<bool, MetaError> {
        let c = self.conn();
        let prefix = format!("{}/", dir.as_str());
        let n: i64 = c.query_row(
            "SELECT COUNT(*) FROM files WHERE account=?1 AND kind<>0 AND path > ?2 AND path < ?3",
            params![account, prefix, format!("{}0", dir.as_str())],
            |r| r.get(0),
        )?;
        Ok(n > 0)
    }
}

/// An upload staged for a group commit.
#[derive(Debug)]
pub struct Pending {
    pub id: i64,
    pub account: AccountId,
    pub path: RelPath,
    pub tmp: std::path::PathBuf,
    pub node: Node,
    pub op: String,
    pub device: String,
}

fn next_seq(tx: &rusqlite::Transaction<'_>, account: AccountId) -> Result<u64, MetaError> {
    let seq: i64 =
        tx.query_row("UPDATE accounts SET seq = seq + 1 WHERE id=?1 RETURNING seq", params![account], |r| {
            r.get(0)
        })?;
    Ok(seq as u64)
}

fn write_change(
    tx: &rusqlite::Transaction<'_>,
    account: AccountId,
    seq: u64,
    path: &RelPath,
    node: Option<&Node>,
    op: &str,
    device: &str,
) -> Result<(), MetaError> {
    let zero = NodeMeta { mtime_ns: 0, mode: 0 };
    let (kind, hash, size, meta, target): (i64, Option<Vec<u8>>, u64, NodeMeta, Option<&str>) = match node {
        None => (0, None, 0, zero, None),
        Some(Node::File { hash, size, meta }) => (1, Some(hash.0.to_vec()), *size, *meta, None),
        Some(Node::Dir { mode }) => (2, None, 0, NodeMeta { mtime_ns: 0, mode: *mode }, None),
        Some(Node::Symlink { target }) => (3, None, 0, zero, Some(target)),
    };
    // Keep the account's byte count: the old row's file size out, the new one's in.
    let old: i64 = tx
        .prepare_cached("SELECT size FROM files WHERE account=?1 AND path=?2 AND kind=1")?
        .query_row(params![account, path.as_str()], |r| r.get(0))
        .optional()?
        .unwrap_or(0);
    let new = if kind == 1 { size as i64 } else { 0 };
    if new != old {
        tx.prepare_cached("UPDATE accounts SET used = MAX(0, used + ?2 - ?3) WHERE id=?1")?
            .execute(params![account, new, old])?;
    }
    tx.prepare_cached(
        "INSERT OR REPLACE INTO files (account, path, rev, kind, hash, size, mtime_ns, mode, target, device)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
    )?
    .execute(params![
        account,
        path.as_str(),
        seq as i64,
        kind,
        hash,
        size as i64,
        meta.mtime_ns,
        meta.mode,
        target,
        device
    ])?;
    tx.prepare_cached(
        "INSERT INTO journal (account, seq, op, path, device, at) VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT DO NOTHING",
    )?
    .execute(params![account, seq as i64, op, path.as_str(), device, now_secs()])?;
    Ok(())
}

type RowResult = Result<Entry, MetaError>;

fn row_to_entry(r: &rusqlite::Row<'_>) -> rusqlite::Result<RowResult> {
    let path: String = r.get(0)?;
    let rev: i64 = r.get(1)?;
    let kind: i64 = r.get(2)?;
    let hash: Option<Vec<u8>> = r.get(3)?;
    let size: i64 = r.get(4)?;
    // Only permission bits: rows written before modes were masked may hold more.
    let meta = NodeMeta { mtime_ns: r.get(5)?, mode: r.get::<_, u32>(6)? & 0o777 };
    let target: Option<String> = r.get(7)?;
    let device: String = r.get(8)?;
    let bad = || MetaError::CorruptRow(path.clone());
    let node = match kind {
        0 => None,
        1 => match hash.as_deref().and_then(ContentHash::from_slice) {
            Some(hash) => Some(Node::File { hash, size: size as u64, meta }),
            None => return Ok(Err(bad())),
        },
        2 => Some(Node::Dir { mode: meta.mode }),
        3 => match target {
            Some(target) => Some(Node::Symlink { target }),
            None => return Ok(Err(bad())),
        },
        _ => return Ok(Err(bad())),
    };
    let Ok(rel) = RelPath::new(path.clone()) else {
        return Ok(Err(bad()));
    };
    Ok(Ok(Entry { path: rel, rev: rev as u64, node, device }))
}
