//! The metadata store in SQLite (WAL): accounts, the current state of every path, history,
//! file contents and chunk locations. All SQL of the server lives here; [`MetaStore`] is the
//! interface the rest of the server uses. Each commit is one transaction that takes the account's next sequence number,
//! updates the path's row (its `rev` is that number) and appends a journal line, so "what changed
//! since N" is `WHERE rev > N` and can never miss a commit.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, params};
use sha2::{Digest, Sha256};

use super::PackId;
use crate::hash::ContentHash;
use crate::path::RelPath;
use crate::protocol::{At, Entry, MAX_LOG, Meta as NodeMeta, Node, Refusal, RefusalKind, Version};
use crate::server::content::{ChunkKey, ChunkList, ChunkLoc, NewChunk, Sealed};
use crate::server::meta::{
    Account, AccountId, AccountInfo, Change, Device, DeviceId, DeviceInfo, FileToSend, MetaError, MetaStore,
    PAGE, PARTIAL_KEEP, Partial, Pruned, Step, with_content,
};
use crate::server::retention::Keep;

/// The schema's version in `PRAGMA user_version`: 0 and 1 are the plain-mirror layout (converted
/// by `server::migrate`), 2 the versioned store, 3 with per-device tokens (`devices`), 4 with
/// several folders per account (`accounts.owner`, `accounts.folder`).
pub const SCHEMA_VERSION: i64 = 4;

/// The `accounts` table as version 4 makes it (also when [`migrate`] rebuilds it). Ids are
/// `AUTOINCREMENT` so a removed account's id is never given to a new one: a session of the removed
/// account still running until it is cut off must not reach a newcomer's files.
///
/// A row is an account (`owner` NULL; its id is also the space of its `default` folder) or the
/// space of another folder of account `owner` (named `OWNER_ID/FOLDER`: account names have no
/// `/`, so it never clashes with one). Every per-account table is keyed by the space's id;
/// `seq` and `used` are the space's, `quota` is the account's (over all its folders).
macro_rules! accounts_table {
    ($name:literal) => {
        concat!(
            "CREATE TABLE IF NOT EXISTS ",
            $name,
            " (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    seq INTEGER NOT NULL DEFAULT 0,
    created INTEGER NOT NULL,
    used INTEGER NOT NULL DEFAULT 0,   -- bytes of live files, kept by every commit
    quota INTEGER,                     -- NULL: none
    owner INTEGER,                     -- a folder's space: its account; NULL for an account
    folder TEXT                        -- a folder's space: the folder's name
);"
        )
    };
}

fn has_column(conn: &Connection, table: &str, column: &str) -> rusqlite::Result<bool> {
    conn.prepare("SELECT 1 FROM pragma_table_info(?1) WHERE name=?2")?.exists(params![table, column])
}

/// Whether [`migrate`] has something to do.
fn outdated(conn: &Connection) -> rusqlite::Result<bool> {
    Ok(!has_column(conn, "accounts", "used")?
        || has_column(conn, "accounts", "token_hash")?
        || !has_column(conn, "accounts", "owner")?)
}

/// Brings a database made by an older version up to date, in one transaction: accounts gain
/// `used` (bytes of live files) and `quota`; then (version 2 → 3) each account's token becomes
/// the token of its device `first`, so old tokens keep working, and `accounts.token_hash` goes;
/// then (3 → 4) accounts gain `owner` and `folder` (NULL: every existing account's files are its
/// `default` folder, no row moves). A database of the plain-mirror layout keeps its `user_version` (its conversion sets it).
fn migrate(conn: &Connection) -> Result<(), MetaError> {
    if !outdated(conn)? {
        return Ok(());
    }
    // Another process (`serve` and `account add` on a fresh folder) may be doing the same: check
    // again inside the write transaction.
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let r = (|| -> rusqlite::Result<()> {
        if !has_column(conn, "accounts", "used")? {
            conn.execute_batch(
                "ALTER TABLE accounts ADD COLUMN used INTEGER NOT NULL DEFAULT 0;
                 ALTER TABLE accounts ADD COLUMN quota INTEGER;
                 UPDATE accounts SET used = (SELECT COALESCE(SUM(size), 0) FROM files
                                             WHERE files.account = accounts.id AND kind = 1);",
            )?;
        }
        if has_column(conn, "accounts", "token_hash")? {
            conn.execute(
                "INSERT INTO devices (account, name, token_hash, created)
                 SELECT id, ?1, token_hash, created FROM accounts ORDER BY id",
                params![FIRST_DEVICE],
            )?;
            // SQLite cannot drop a UNIQUE column: a new table gets every other column, ids kept.
            // A column this version does not know makes the copy fail (and the whole migration
            // roll back) rather than vanish.
            let columns: Vec<String> = conn
                .prepare(
                    "SELECT name FROM pragma_table_info('accounts') WHERE name <> 'token_hash' ORDER BY cid",
                )?
                .query_map([], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            let columns = columns
                .iter()
                .map(|c| format!("\"{}\"", c.replace('"', "\"\"")))
                .collect::<Vec<_>>()
                .join(", ");
            conn.execute_batch(accounts_table!("accounts_v3"))?;
            conn.execute_batch(&format!(
                "INSERT INTO accounts_v3 ({columns}) SELECT {columns} FROM accounts;
                 DROP TABLE accounts;
                 ALTER TABLE accounts_v3 RENAME TO accounts;"
            ))?;
        }
        if !has_column(conn, "accounts", "owner")? {
            conn.execute_batch(
                "ALTER TABLE accounts ADD COLUMN owner INTEGER;
                 ALTER TABLE accounts ADD COLUMN folder TEXT;",
            )?;
        }
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if version == 2 || version == 3 {
            conn.execute_batch(&format!("PRAGMA user_version = {SCHEMA_VERSION}"))?;
        }
        conn.execute_batch("COMMIT")
    })();
    if r.is_err() {
        let _ = conn.execute_batch("ROLLBACK");
    }
    Ok(r?)
}

/// The device an account's token becomes when a version-2 database is migrated.
pub const FIRST_DEVICE: &str = "first";

/// One connection behind a mutex: SQLite serializes writers anyway, and every call is short.
/// This is a `std::sync::Mutex` (not a Tokio one) because no `.await` happens while it is held;
/// callers run it on the blocking pool.
pub struct SqliteMeta {
    conn: Mutex<Connection>,
    /// A second connection for the lookups of uploads being received (is this chunk stored,
    /// what is at this path, how much does the account use): WAL lets them read the last
    /// commit while a batch's transaction runs on `conn`, instead of waiting for it.
    reader: Mutex<Connection>,
}

const SCHEMA: &str = concat!(
    accounts_table!("accounts"),
    "
-- Each device of an account holds its own token (only its SHA-256 is kept). A revoked device's
-- row stays (`revoked`: when) for `account devices`; its name may be issued again. Ids are never
-- reused: the server cuts off sessions whose device id is no longer live.
CREATE TABLE IF NOT EXISTS devices (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    account INTEGER NOT NULL,
    name TEXT NOT NULL,
    token_hash BLOB NOT NULL UNIQUE,
    created INTEGER NOT NULL,
    last_seen INTEGER,
    last_addr TEXT,
    revoked INTEGER
);
CREATE UNIQUE INDEX IF NOT EXISTS devices_live_name ON devices(account, name) WHERE revoked IS NULL;
CREATE INDEX IF NOT EXISTS devices_account ON devices(account);
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
-- No index by hash on files or contents: every insert into one landed on a leaf of its own,
-- a page written per upload for each; prune reads them in one pass instead.
DROP INDEX IF EXISTS files_hash;
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
-- The versioned store. `packs`: finished packs; `chunks`: where each chunk is (shared by all
-- accounts); `contents`: per account, the chunk list of each file content it holds (postcard
-- `Vec<(chunk id, length)>`); `history`: every version of every path (the journal: one row per
-- path a commit changed, with its time, device and operation).
CREATE TABLE IF NOT EXISTS packs (
    id BLOB PRIMARY KEY,
    size INTEGER NOT NULL,
    created INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY,
    digest BLOB NOT NULL UNIQUE,
    pack BLOB NOT NULL,
    offset INTEGER NOT NULL,
    stored INTEGER NOT NULL,
    raw INTEGER NOT NULL,
    zstd INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS chunks_pack ON chunks(pack);
CREATE TABLE IF NOT EXISTS contents (
    account INTEGER NOT NULL,
    hash BLOB NOT NULL,
    size INTEGER NOT NULL,
    chunks BLOB NOT NULL,
    PRIMARY KEY (account, hash)
) WITHOUT ROWID;
DROP INDEX IF EXISTS contents_hash;
-- Signatures of stored versions, as chunk lists (see content::Sigs).
CREATE TABLE IF NOT EXISTS signatures (
    hash BLOB NOT NULL,
    block INTEGER NOT NULL,
    chunks BLOB NOT NULL,
    PRIMARY KEY (hash, block)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS history (
    account INTEGER NOT NULL,
    path TEXT NOT NULL,
    rev INTEGER NOT NULL,
    kind INTEGER NOT NULL,
    hash BLOB,
    size INTEGER NOT NULL DEFAULT 0,
    mtime_ns INTEGER NOT NULL DEFAULT 0,
    mode INTEGER NOT NULL DEFAULT 0,
    target TEXT,
    device TEXT NOT NULL DEFAULT '',
    op TEXT NOT NULL,
    at INTEGER NOT NULL,
    PRIMARY KEY (account, path, rev)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS history_rev ON history(account, rev);
-- The first bytes of cut-off uploads, kept for a resume (one per path; chunks as in contents).
CREATE TABLE IF NOT EXISTS partial (
    account INTEGER NOT NULL,
    path TEXT NOT NULL,
    hash BLOB NOT NULL,
    size INTEGER NOT NULL,
    base BLOB,
    bytes INTEGER NOT NULL,
    chunks BLOB NOT NULL,
    created INTEGER NOT NULL,
    PRIMARY KEY (account, path)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS journal (
    account INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    op TEXT NOT NULL,
    path TEXT NOT NULL,
    device TEXT NOT NULL,
    at INTEGER NOT NULL,
    PRIMARY KEY (account, seq)
) WITHOUT ROWID;
"
);

pub fn token_hash(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl SqliteMeta {
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
        // A batch's commit (up to 8,192 uploads) dirties thousands of pages (in the indexes keyed
        // by a hash each insert lands on a leaf of its own): a cache that holds them all avoids
        // spilling them to the WAL mid-transaction and reading them back, and checkpoints every
        // 8,192 pages (32 MiB of WAL) write a page changed by several commits once.
        conn.pragma_update(None, "cache_size", -65_536)?;
        conn.pragma_update(None, "wal_autocheckpoint", 8_192)?;
        conn.pragma_update(None, "temp_store", "MEMORY")?;
        let reader = Connection::open(path)?;
        reader.busy_timeout(std::time::Duration::from_secs(10))?;
        reader.pragma_update(None, "cache_size", -16_384)?;
        Ok(SqliteMeta { conn: Mutex::new(conn), reader: Mutex::new(reader) })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite inconsistent (transactions roll back).
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The read connection (see [`SqliteMeta::reader`]): for single reads of committed state.
    fn reader(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.reader.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every path row of every account (for converting an old data folder).
    pub fn all_files(&self) -> Result<Vec<(AccountId, Entry)>, MetaError> {
        let c = self.conn();
        let mut st = c.prepare(
            "SELECT path, rev, kind, hash, size, mtime_ns, mode, target, device, account FROM files ORDER BY account, path",
        )?;
        let rows = st
            .query_map([], |r| Ok((r.get::<_, i64>(9)?, row_to_entry(r)?)))?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter().map(|(a, e)| e.map(|e| (a, e))).collect()
    }

    /// Whether the layout of this database is the versioned store's (not the plain mirror's).
    pub fn layout(&self) -> Result<i64, MetaError> {
        Ok(self.conn().query_row("PRAGMA user_version", [], |r| r.get(0))?)
    }

    /// Converts the plain mirror's rows: every current path becomes its first version in history
    /// (file contents given by `contents`: hash → (size, chunk list)), and the layout is marked
    /// converted, in one transaction.
    pub fn convert_mirror(
        &self,
        contents: &[(AccountId, ContentHash, u64, ChunkList)],
    ) -> Result<(), MetaError> {
        let mut c = self.conn();
        let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        for (account, hash, size, list) in contents {
            let ids = chunk_ids(&tx, list)?.ok_or_else(|| MetaError::CorruptRow("converted chunk".into()))?;
            tx.execute(
                "INSERT OR REPLACE INTO contents (account, hash, size, chunks) VALUES (?1, ?2, ?3, ?4)",
                params![account, &hash.0[..], *size as i64, ids],
            )?;
        }
        tx.execute_batch(
            "INSERT OR IGNORE INTO history (account, path, rev, kind, hash, size, mtime_ns, mode, target, device, op, at)
               SELECT account, path, rev, kind, hash, size, mtime_ns, mode, target, device,
                      CASE kind WHEN 0 THEN 'delete' WHEN 2 THEN 'mkdir' WHEN 3 THEN 'symlink' ELSE 'write' END,
                      COALESCE((SELECT at FROM journal j WHERE j.account=files.account AND j.seq=files.rev), 0)
               FROM files;
             DELETE FROM pending;",
        )?;
        tx.execute_batch(&format!("PRAGMA user_version = {SCHEMA_VERSION}"))?;
        tx.commit()?;
        Ok(())
    }

    /// Marks a fresh database as the versioned store's.
    pub fn mark_layout(&self) -> Result<(), MetaError> {
        self.conn().execute_batch(&format!("PRAGMA user_version = {SCHEMA_VERSION}"))?;
        Ok(())
    }

    /// Whether the database has any account with files (a data folder in use).
    pub fn has_files(&self) -> Result<bool, MetaError> {
        Ok(self.conn().prepare("SELECT 1 FROM files LIMIT 1")?.exists([])?)
    }
}

impl MetaStore for SqliteMeta {
    /// This data folder's 16 random bytes, made when its database was created (or first opened
    /// by a version that knows them).
    fn server_id(&self) -> Result<[u8; 16], MetaError> {
        let c = self.conn();
        let mut fresh = [0u8; 16];
        getrandom::fill(&mut fresh).map_err(|e| MetaError::Random(e.to_string()))?;
        c.execute("INSERT OR IGNORE INTO server (id, server_id) VALUES (1, ?1)", params![&fresh[..]])?;
        let id: Vec<u8> = c.query_row("SELECT server_id FROM server WHERE id=1", [], |r| r.get(0))?;
        id.try_into().map_err(|_| MetaError::CorruptRow("server id".into()))
    }

    /// Sets (or with `None` removes) an account's quota in bytes; `false` if there is no such
    /// account.
    fn set_quota(&self, name: &str, quota: Option<u64>) -> Result<bool, MetaError> {
        let c = self.conn();
        let n = c.execute(
            "UPDATE accounts SET quota=?2 WHERE name=?1 AND owner IS NULL",
            params![name, quota.map(|q| q.min(i64::MAX as u64) as i64)],
        )?;
        Ok(n > 0)
    }

    /// The bytes of the live files of the account (all its folders) and its quota, if any.
    fn usage(&self, account: AccountId) -> Result<(u64, Option<u64>), MetaError> {
        let c = self.reader();
        let (others, own, quota) = room(&c, account)?;
        Ok(((others + own).max(0) as u64, quota.map(|q| q.max(0) as u64)))
    }

    fn space(&self, account: AccountId, folder: &str) -> Result<Option<AccountId>, MetaError> {
        // Found by its name (`ACCOUNT_ID/FOLDER`, the unique index) without a write lock: every
        // connection asks, and only a folder's first one writes.
        let name = format!("{account}/{folder}");
        let find = |c: &rusqlite::Connection| -> Result<Option<AccountId>, MetaError> {
            if !c
                .prepare_cached("SELECT 1 FROM accounts WHERE id=?1 AND owner IS NULL")?
                .exists(params![account])?
            {
                return Ok(None);
            }
            if folder == crate::protocol::DEFAULT_FOLDER {
                return Ok(Some(account));
            }
            Ok(c.prepare_cached("SELECT id FROM accounts WHERE name=?1 AND owner=?2")?
                .query_row(params![name, account], |r| r.get::<_, AccountId>(0))
                .optional()?)
        };
        let mut c = self.conn();
        if let Some(id) = find(&c)? {
            return Ok(Some(id));
        }
        let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        // Checked again under the write lock: the account may be gone, or another process may
        // have made the space meanwhile.
        let live = tx
            .prepare_cached("SELECT 1 FROM accounts WHERE id=?1 AND owner IS NULL")?
            .exists(params![account])?;
        if !live {
            return Ok(None);
        }
        tx.execute(
            "INSERT OR IGNORE INTO accounts (name, created, owner, folder) VALUES (?1, ?2, ?3, ?4)",
            params![name, now_secs(), account, folder],
        )?;
        let id = find(&tx)?;
        tx.commit()?;
        Ok(id)
    }

    fn folders(&self, account: AccountId) -> Result<Vec<(String, u64, u64)>, MetaError> {
        let c = self.conn();
        let mut st = c.prepare(
            "SELECT COALESCE(folder, ?2), seq, used FROM accounts WHERE id=?1 OR owner=?1
             ORDER BY owner IS NOT NULL, folder",
        )?;
        let rows = st.query_map(params![account, crate::protocol::DEFAULT_FOLDER], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?.max(0) as u64, r.get::<_, i64>(2)?.max(0) as u64))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn add_account(&self, name: &str, device: &str, token: &str) -> Result<Account, MetaError> {
        let mut c = self.conn();
        let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        if account_id(&tx, name)?.is_some() {
            return Err(MetaError::AccountExists(name.to_string()));
        }
        let now = now_secs();
        tx.execute("INSERT INTO accounts (name, created) VALUES (?1, ?2)", params![name, now])?;
        let id = tx.last_insert_rowid();
        insert_device(&tx, id, device, token, now)?;
        tx.commit()?;
        Ok(Account { id, name: name.to_string() })
    }

    fn add_device(&self, account: &str, device: &str, token: &str) -> Result<Option<DeviceId>, MetaError> {
        let mut c = self.conn();
        let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let Some(acct) = account_id(&tx, account)? else { return Ok(None) };
        let live = tx
            .prepare_cached("SELECT 1 FROM devices WHERE account=?1 AND name=?2 AND revoked IS NULL")?
            .exists(params![acct, device])?;
        if live {
            return Err(MetaError::DeviceExists(device.to_string()));
        }
        let id = insert_device(&tx, acct, device, token, now_secs())?;
        tx.commit()?;
        Ok(Some(id))
    }

    fn list_accounts(&self) -> Result<Vec<AccountInfo>, MetaError> {
        let c = self.conn();
        // Folders' spaces are not accounts: their bytes count in their account's `used`.
        let mut st = c.prepare(
            "SELECT a.id, a.name, a.seq,
                    (SELECT COALESCE(SUM(s.used), 0) FROM accounts s WHERE s.id = a.id OR s.owner = a.id),
                    a.quota
             FROM accounts a WHERE a.owner IS NULL ORDER BY a.name",
        )?;
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

    fn authenticate(&self, token: &str) -> Result<Option<(Account, Device)>, MetaError> {
        let c = self.conn();
        Ok(c.prepare_cached(
            "SELECT a.id, a.name, d.id, d.name FROM devices d JOIN accounts a ON a.id = d.account
             WHERE d.token_hash = ?1 AND d.revoked IS NULL",
        )?
        .query_row(params![token_hash(token)], |r| {
            Ok((Account { id: r.get(0)?, name: r.get(1)? }, Device { id: r.get(2)?, name: r.get(3)? }))
        })
        .optional()?)
    }

    fn device_seen(&self, device: DeviceId, addr: &str, at: i64) -> Result<(), MetaError> {
        let c = self.conn();
        c.prepare_cached("UPDATE devices SET last_seen=?2, last_addr=?3 WHERE id=?1")?
            .execute(params![device, at, addr])?;
        Ok(())
    }

    fn list_devices(&self, account: &str) -> Result<Option<Vec<DeviceInfo>>, MetaError> {
        let c = self.conn();
        let Some(acct) = account_id(&c, account)? else { return Ok(None) };
        let mut st = c.prepare(
            "SELECT name, created, last_seen, last_addr, revoked FROM devices WHERE account=?1 ORDER BY id",
        )?;
        let rows = st.query_map(params![acct], |r| {
            Ok(DeviceInfo {
                name: r.get(0)?,
                created: r.get(1)?,
                last_seen: r.get(2)?,
                last_addr: r.get(3)?,
                revoked: r.get(4)?,
            })
        })?;
        Ok(Some(rows.collect::<Result<_, _>>()?))
    }

    fn revoke_device(&self, account: &str, device: &str) -> Result<bool, MetaError> {
        let c = self.conn();
        let n = c.execute(
            "UPDATE devices SET revoked=?3
             WHERE account=(SELECT id FROM accounts WHERE name=?1 AND owner IS NULL) AND name=?2 AND revoked IS NULL",
            params![account, device, now_secs()],
        )?;
        Ok(n > 0)
    }

    fn remove_account(&self, name: &str) -> Result<bool, MetaError> {
        let mut c = self.conn();
        let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let Some(id) = account_id(&tx, name)? else { return Ok(false) };
        // The account and the spaces of its other folders.
        let spaces: Vec<AccountId> = tx
            .prepare("SELECT id FROM accounts WHERE id=?1 OR owner=?1")?
            .query_map(params![id], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        // Every table with an `account` column; signatures (shared, by content hash) and chunks
        // nothing uses any more are forgotten by the next prune.
        for space in spaces {
            for table in ["files", "history", "contents", "partial", "journal", "pending", "devices"] {
                tx.execute(&format!("DELETE FROM {table} WHERE account=?1"), params![space])?;
            }
            tx.execute("DELETE FROM accounts WHERE id=?1", params![space])?;
        }
        tx.commit()?;
        Ok(true)
    }

    fn live_devices(&self, ids: &[DeviceId]) -> Result<Vec<DeviceId>, MetaError> {
        let c = self.conn();
        let mut live = std::collections::HashSet::new();
        // Well below SQLite's limit on parameters per statement.
        for part in ids.chunks(500) {
            let marks = vec!["?"; part.len()].join(",");
            // Not cached: the text differs with the number of ids.
            let mut st = c.prepare(&format!(
                "SELECT d.id FROM devices d JOIN accounts a ON a.id = d.account
                 WHERE d.revoked IS NULL AND d.id IN ({marks})"
            ))?;
            let found = st.query_map(rusqlite::params_from_iter(part), |r| r.get::<_, DeviceId>(0))?;
            for id in found {
                live.insert(id?);
            }
        }
        Ok(ids.iter().copied().filter(|id| live.contains(id)).collect())
    }

    /// The current entry at `path` (a tombstone if deleted), `None` if it never existed.
    fn get(&self, account: AccountId, path: &RelPath) -> Result<Option<Entry>, MetaError> {
        entry_at(&self.reader(), account, path)
    }

    /// In one read transaction: a lock taken and released once, not three times per file.
    fn files_to_send(
        &self,
        account: AccountId,
        paths: &[RelPath],
    ) -> Result<Vec<Result<FileToSend, MetaError>>, MetaError> {
        let c = self.conn();
        let tx = c.unchecked_transaction()?;
        let out = paths
            .iter()
            .map(|p| with_content(entry_at(&tx, account, p)?, |hash| content_of(&tx, account, hash)))
            .collect();
        tx.finish()?;
        Ok(out)
    }

    /// One page of entries changed after `since`, the account's current sequence, and whether
    /// more pages follow.
    fn changes(&self, account: AccountId, since: u64) -> Result<(Vec<Entry>, u64, bool), MetaError> {
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

    fn seq(&self, account: AccountId) -> Result<u64, MetaError> {
        let c = self.conn();
        Ok(c.query_row("SELECT seq FROM accounts WHERE id=?1", params![account], |r| r.get::<_, i64>(0))?
            as u64)
    }

    /// Whether a chunk is stored (in a finished pack).
    fn chunk_exists(&self, key: &ChunkKey) -> Result<bool, MetaError> {
        let c = self.reader();
        Ok(c.prepare_cached("SELECT 1 FROM chunks WHERE digest=?1")?.exists(params![&key[..]])?)
    }

    /// Records a finished pack and its chunks. A chunk another pack has already keeps its first
    /// place (this copy is garbage for the next prune).
    fn add_pack(&self, sealed: &Sealed) -> Result<(), MetaError> {
        let mut c = self.conn();
        let tx = c.transaction()?;
        record_pack(&tx, sealed)?;
        tx.commit()?;
        Ok(())
    }

    /// The account's stored content with this hash: its size and where its chunks are.
    fn content(
        &self,
        account: AccountId,
        hash: &ContentHash,
    ) -> Result<Option<(u64, Vec<ChunkLoc>)>, MetaError> {
        content_of(&self.conn(), account, hash)
    }

    /// Commits steps in one transaction. Each step is one revision (the account's next sequence
    /// number) for all its changes and is checked whole, inside the transaction, against what is
    /// committed: a refused step changes nothing, the others commit. So the base-revision rule
    /// holds even with several server processes on one database.
    fn content_keys(&self, account: AccountId, hash: &ContentHash) -> Result<Option<ChunkList>, MetaError> {
        let c = self.conn();
        let list: Option<Vec<u8>> = c
            .prepare_cached("SELECT chunks FROM contents WHERE account=?1 AND hash=?2")?
            .query_row(params![account, &hash.0[..]], |r| r.get(0))
            .optional()?;
        let Some(list) = list else { return Ok(None) };
        let ids: Vec<(i64, u32)> =
            postcard::from_bytes(&list).map_err(|_| MetaError::CorruptRow("a chunk list".into()))?;
        let mut st = c.prepare_cached("SELECT digest FROM chunks WHERE id=?1")?;
        let mut out = Vec::with_capacity(ids.len());
        for (id, n) in ids {
            let Some(d) = st.query_row(params![id], |r| r.get::<_, Vec<u8>>(0)).optional()? else {
                return Ok(None);
            };
            let key: ChunkKey = d.try_into().map_err(|_| MetaError::CorruptRow("chunk digest".into()))?;
            out.push((key, n));
        }
        Ok(Some(out))
    }

    fn commit_with_pack(
        &self,
        account: AccountId,
        device: &str,
        pack: Option<&Sealed>,
        steps: &[Step],
    ) -> Result<Vec<Result<u64, Refusal>>, MetaError> {
        let mut c = self.conn();
        let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        if let Some(p) = pack {
            record_pack(&tx, p)?;
        }
        // The quota is the account's, over all its folders: the others' bytes count too.
        let (others, mut used, quota) = room(&tx, account)?;
        let mut seq: i64 =
            tx.query_row("SELECT seq FROM accounts WHERE id=?1", params![account], |r| r.get(0))?;
        let partials =
            tx.prepare_cached("SELECT 1 FROM partial WHERE account=?1 LIMIT 1")?.exists(params![account])?;
        let mut batch = Batch::new(&tx, account, device, (others, quota), partials)?;
        let mut out = Vec::with_capacity(steps.len());
        for step in steps {
            let next = seq as u64 + 1;
            // A step of one change checks everything before it writes anything, so a refusal
            // leaves nothing to undo; a step of several (a move) may be refused by what its
            // first change did, so it runs in a savepoint. (A savepoint per upload wrote every
            // page it touched to the statement journal: most of a 100,000-file push's commit time.)
            let r = if let [ch] = step.changes.as_slice() {
                apply_change(&tx, &mut batch, step.op, ch, next, &mut used)?
            } else {
                tx.execute_batch("SAVEPOINT step")?;
                let before = used;
                let mut r = Ok(next);
                for ch in &step.changes {
                    if let Err(refusal) = apply_change(&tx, &mut batch, step.op, ch, next, &mut used)? {
                        r = Err(refusal);
                        break;
                    }
                }
                match r {
                    Ok(_) => tx.execute_batch("RELEASE step")?,
                    Err(_) => {
                        used = before;
                        tx.execute_batch("ROLLBACK TO step; RELEASE step")?;
                    }
                }
                // What the step wrote may have been rolled back: look the folders up again.
                batch.dirs.clear();
                r
            };
            if r.is_ok() {
                seq += 1;
            }
            out.push(r);
        }
        drop(batch); // its statements borrow the transaction, which the commit takes
        tx.prepare_cached("UPDATE accounts SET used = MAX(0, ?2), seq = ?3 WHERE id=?1")?
            .execute(params![account, used, seq])?;
        tx.commit()?;
        Ok(out)
    }

    /// Versions for `log`: `path`'s, newest first; without a path the account's latest
    /// changes; with `deleted`, the deletes of paths whose earlier content is still kept.
    fn log(
        &self,
        account: AccountId,
        path: Option<&RelPath>,
        deleted: bool,
        limit: u32,
    ) -> Result<Vec<Version>, MetaError> {
        let c = self.conn();
        let limit = i64::from(limit.min(MAX_LOG));
        let cols =
            "h.path, h.rev, h.kind, h.hash, h.size, h.mtime_ns, h.mode, h.target, h.device, h.at, h.op";
        let rows = if deleted {
            let mut st = c.prepare(&format!(
                "SELECT {cols} FROM files f JOIN history h ON h.account=f.account AND h.path=f.path AND h.rev=f.rev
                 WHERE f.account=?1 AND f.kind=0 AND (?2 IS NULL OR f.path=?2 OR substr(f.path, 1, length(?2) + 1) = ?2 || '/')
                 AND EXISTS (SELECT 1 FROM history e WHERE e.account=f.account AND e.path=f.path AND e.kind IN (1, 3))
                 ORDER BY f.rev DESC LIMIT ?3"
            ))?;
            st.query_map(params![account, path.map(|p| p.as_str()), limit], row_to_version)?
                .collect::<Result<Vec<_>, _>>()?
        } else if let Some(p) = path {
            let mut st = c.prepare(&format!(
                "SELECT {cols} FROM history h WHERE h.account=?1 AND h.path=?2 ORDER BY h.rev DESC LIMIT ?3"
            ))?;
            st.query_map(params![account, p.as_str(), limit], row_to_version)?
                .collect::<Result<Vec<_>, _>>()?
        } else {
            let mut st = c.prepare(&format!(
                "SELECT {cols} FROM history h WHERE h.account=?1 ORDER BY h.rev DESC, h.path LIMIT ?2"
            ))?;
            st.query_map(params![account, limit], row_to_version)?.collect::<Result<Vec<_>, _>>()?
        };
        rows.into_iter().collect()
    }

    /// The revision a point in history stands for: the last change at or before it.
    fn rev_at(&self, account: AccountId, at: At) -> Result<u64, MetaError> {
        match at {
            At::Rev(r) => Ok(r),
            At::Time(t) => {
                let c = self.conn();
                let r: Option<i64> = c.query_row(
                    "SELECT MAX(rev) FROM history WHERE account=?1 AND at<=?2",
                    params![account, t],
                    |r| r.get(0),
                )?;
                Ok(r.unwrap_or(0).max(0) as u64)
            }
        }
    }

    /// The live paths at or under `path` (everything without one) as they were at revision
    /// `rev`, in path order, after `after`; at most `limit`.
    fn snapshot(
        &self,
        account: AccountId,
        path: Option<&RelPath>,
        rev: u64,
        after: Option<&RelPath>,
        limit: u32,
    ) -> Result<Vec<Version>, MetaError> {
        let c = self.conn();
        let mut st = c.prepare_cached(
            "SELECT h.path, h.rev, h.kind, h.hash, h.size, h.mtime_ns, h.mode, h.target, h.device, h.at, h.op
             FROM history h
             WHERE h.account=?1
               AND (?2 IS NULL OR h.path=?2 OR substr(h.path, 1, length(?2) + 1) = ?2 || '/')
               AND (?4 IS NULL OR h.path > ?4)
               AND h.rev = (SELECT MAX(rev) FROM history x WHERE x.account=h.account AND x.path=h.path AND x.rev<=?3)
               AND h.kind <> 0
             ORDER BY h.path LIMIT ?5",
        )?;
        let rows = st
            .query_map(
                params![
                    account,
                    path.map(|p| p.as_str()),
                    rev as i64,
                    after.map(|p| p.as_str()),
                    i64::from(limit)
                ],
                row_to_version,
            )?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter().collect()
    }

    /// The version of `path` committed at `rev`, if history has it.
    fn version(&self, account: AccountId, path: &RelPath, rev: u64) -> Result<Option<Version>, MetaError> {
        let c = self.conn();
        let v = c
            .prepare_cached(
                "SELECT path, rev, kind, hash, size, mtime_ns, mode, target, device, at, op FROM history
                 WHERE account=?1 AND path=?2 AND rev=?3",
            )?
            .query_row(params![account, path.as_str(), rev as i64], row_to_version)
            .optional()?;
        v.transpose()
    }

    /// Every version of every path that `device` changed at or after `since`, oldest first, per
    /// path: what an undo needs to decide.
    fn histories_touched_by(
        &self,
        account: AccountId,
        device: &str,
        since: i64,
    ) -> Result<Vec<Vec<Version>>, MetaError> {
        let c = self.conn();
        let mut st = c.prepare(
            "SELECT h.path, h.rev, h.kind, h.hash, h.size, h.mtime_ns, h.mode, h.target, h.device, h.at, h.op
             FROM history h WHERE h.account=?1 AND h.path IN
                (SELECT path FROM history WHERE account=?1 AND device=?2 AND at>=?3)
             ORDER BY h.path, h.rev",
        )?;
        let rows =
            st.query_map(params![account, device, since], row_to_version)?.collect::<Result<Vec<_>, _>>()?;
        let mut out: Vec<Vec<Version>> = Vec::new();
        for v in rows {
            let v = v?;
            match out.last_mut() {
                Some(last) if last[0].path == v.path => last.push(v),
                _ => out.push(vec![v]),
            }
        }
        Ok(out)
    }

    /// The live entries at or under `path` (everything without one), in path order.
    fn live_under(&self, account: AccountId, path: Option<&RelPath>) -> Result<Vec<Entry>, MetaError> {
        let c = self.conn();
        let mut st = c.prepare_cached(
            "SELECT path, rev, kind, hash, size, mtime_ns, mode, target, device FROM files
             WHERE account=?1 AND kind<>0
               AND (?2 IS NULL OR path=?2 OR substr(path, 1, length(?2) + 1) = ?2 || '/')
             ORDER BY path",
        )?;
        let rows = st
            .query_map(params![account, path.map(|p| p.as_str())], row_to_entry)?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter().collect()
    }

    /// One prune, in one transaction: forgets the versions `keep` does not keep (never a
    /// current one), the contents no kept version uses, and the chunks of packs that hold only
    /// unused chunks and were finished at least `grace` seconds ago. Returns the versions
    /// forgotten and the packs (with sizes) whose files may now be deleted. Commits check
    /// inside their own transaction that the chunks they refer to are still recorded, so an
    /// upload racing a prune is refused (and retried by its client), never left pointing at a
    /// deleted pack.
    fn prune(&self, keep: &Keep, now: i64, grace: u64) -> Result<Pruned, MetaError> {
        let mut c = self.conn();
        let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let mut forgotten = 0u64;
        if *keep != Keep::All {
            // (account, path) → versions' (rev, time), oldest first, and whether the last is a delete.
            let mut st =
                tx.prepare("SELECT account, path, rev, at, kind FROM history ORDER BY account, path, rev")?;
            let rows = st.query_map([], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, i64>(4)?,
                ))
            })?;
            let mut drop: Vec<(i64, String, i64)> = Vec::new();
            let mut group: Vec<(i64, String, i64, i64, i64)> = Vec::new();
            let flush = |group: &mut Vec<(i64, String, i64, i64, i64)>,
                         drop: &mut Vec<(i64, String, i64)>| {
                if group.is_empty() {
                    return;
                }
                let times: Vec<i64> = group.iter().map(|g| g.3).collect();
                let deleted = group.last().is_some_and(|g| g.4 == 0);
                for (g, k) in group.iter().zip(keep.select(&times, deleted, now)) {
                    if !k {
                        drop.push((g.0, g.1.clone(), g.2));
                    }
                }
                group.clear();
            };
            for row in rows {
                let row = row?;
                if group.last().is_some_and(|g| g.0 != row.0 || g.1 != row.1) {
                    flush(&mut group, &mut drop);
                }
                group.push(row);
            }
            flush(&mut group, &mut drop);
            drop_rows(&tx, &drop)?;
            forgotten = drop.len() as u64;
        }
        // Contents no file and no kept version uses.
        // One pass over each table (the IN list is built once as a temporary index): history has
        // no (account, hash) index, and a correlated NOT EXISTS scanned an account's whole history
        // for every content, more than 2 minutes with 100,000 files, holding the write lock.
        tx.execute_batch(
            "DELETE FROM contents WHERE (account, hash) NOT IN
                (SELECT account, hash FROM history WHERE hash IS NOT NULL
                 UNION ALL
                 SELECT account, hash FROM files WHERE kind=1 AND hash IS NOT NULL)",
        )?;
        tx.execute("DELETE FROM partial WHERE created < ?1", params![now - PARTIAL_KEEP])?;
        tx.execute_batch("DELETE FROM signatures WHERE hash NOT IN (SELECT hash FROM contents)")?;
        let used = used_chunks(&tx)?;
        let mut gone = Vec::new();
        let mut to_repack = Vec::new();
        {
            let packs: Vec<(Vec<u8>, i64, i64)> = tx
                .prepare("SELECT id, size, created FROM packs")?
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect::<Result<_, _>>()?;
            let mut ids_of =
                tx.prepare("SELECT id, digest, offset, stored, raw, zstd FROM chunks WHERE pack=?1")?;
            for (pack, size, created) in packs {
                if now.saturating_sub(created) < grace as i64 {
                    continue;
                }
                let Ok(pid) = <[u8; 16]>::try_from(pack.as_slice()) else { continue };
                let pid = PackId(pid);
                let rows: Vec<(i64, Vec<u8>, i64, u32, u32, bool)> = ids_of
                    .query_map(params![&pack], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?))
                    })?
                    .collect::<Result<_, _>>()?;
                let live: Vec<NewChunk> = rows
                    .into_iter()
                    .filter(|r| used.contains(&r.0))
                    .filter_map(|(_, key, offset, stored, raw, zstd)| {
                        let key: ChunkKey = key.try_into().ok()?;
                        Some(NewChunk {
                            key,
                            loc: ChunkLoc { pack: pid, offset: offset as u64, stored, raw, zstd },
                        })
                    })
                    .collect();
                if live.is_empty() {
                    gone.push((pid, size.max(0) as u64));
                } else {
                    let live_bytes: u64 = live.iter().map(|c| u64::from(c.loc.stored)).sum();
                    if crate::server::meta::worth_repacking(size.max(0) as u64, live_bytes) {
                        to_repack.push((pid, size.max(0) as u64, live));
                    }
                }
            }
        }
        for (p, _) in &gone {
            tx.execute("DELETE FROM chunks WHERE pack=?1", params![&p.0[..]])?;
            tx.execute("DELETE FROM packs WHERE id=?1", params![&p.0[..]])?;
        }
        tx.commit()?;
        Ok(Pruned { versions: forgotten, gone, to_repack })
    }

    fn repacked(&self, old: &[PackId], new: &Sealed) -> Result<Vec<PackId>, MetaError> {
        let mut c = self.conn();
        let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        // Chunks of an old pack that were not copied must still be unused: an upload may have
        // come to use one since the prune decided.
        let used = used_chunks(&tx)?;
        let copied: std::collections::HashMap<ChunkKey, &NewChunk> =
            new.chunks.iter().map(|c| (c.key, c)).collect();
        let mut forgotten = Vec::new();
        for pack in old {
            let rows: Vec<(i64, Vec<u8>)> = tx
                .prepare_cached("SELECT id, digest FROM chunks WHERE pack=?1")?
                .query_map(params![&pack.0[..]], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<_, _>>()?;
            let mut moved = Vec::new();
            let mut in_use = false;
            for (id, key) in &rows {
                match <[u8; 32]>::try_from(key.as_slice()).ok().and_then(|k| copied.get(&k)) {
                    Some(ch) => moved.push(*ch),
                    None if used.contains(id) => in_use = true,
                    None => {}
                }
            }
            if in_use {
                continue;
            }
            if forgotten.is_empty() {
                tx.execute(
                    "INSERT OR IGNORE INTO packs (id, size, created) VALUES (?1, ?2, ?3)",
                    params![&new.pack.0[..], new.size as i64, now_secs()],
                )?;
            }
            let mut st = tx.prepare_cached(
                "UPDATE chunks SET pack=?2, offset=?3, stored=?4, raw=?5, zstd=?6 WHERE digest=?1 AND pack=?7",
            )?;
            for ch in moved {
                let l = &ch.loc;
                st.execute(params![
                    &ch.key[..],
                    &l.pack.0[..],
                    l.offset as i64,
                    l.stored,
                    l.raw,
                    l.zstd,
                    &pack.0[..]
                ])?;
            }
            tx.execute("DELETE FROM chunks WHERE pack=?1", params![&pack.0[..]])?;
            tx.execute("DELETE FROM packs WHERE id=?1", params![&pack.0[..]])?;
            forgotten.push(*pack);
        }
        tx.commit()?;
        Ok(forgotten)
    }

    fn pack_known(&self, pack: PackId) -> Result<bool, MetaError> {
        Ok(self.conn().prepare_cached("SELECT 1 FROM packs WHERE id=?1")?.exists(params![&pack.0[..]])?)
    }

    fn save_partial(
        &self,
        account: AccountId,
        path: &RelPath,
        hash: &ContentHash,
        size: u64,
        base: Option<&ContentHash>,
        chunks: &[(ChunkKey, u32)],
    ) -> Result<bool, MetaError> {
        let c = self.conn();
        let Some(ids) = chunk_ids(&c, chunks)? else { return Ok(false) };
        let bytes: u64 = chunks.iter().map(|(_, n)| u64::from(*n)).sum();
        c.execute(
            "INSERT OR REPLACE INTO partial (account, path, hash, size, base, bytes, chunks, created)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                account,
                path.as_str(),
                &hash.0[..],
                size as i64,
                base.map(|b| b.0.to_vec()),
                bytes as i64,
                ids,
                now_secs()
            ],
        )?;
        Ok(true)
    }

    fn partial(&self, account: AccountId, path: &RelPath) -> Result<Option<Partial>, MetaError> {
        let c = self.conn();
        type Row = (Vec<u8>, i64, Option<Vec<u8>>, i64, Vec<u8>);
        let row: Option<Row> = c
            .prepare_cached(
                "SELECT hash, size, base, bytes, chunks FROM partial WHERE account=?1 AND path=?2",
            )?
            .query_row(params![account, path.as_str()], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })
            .optional()?;
        let Some((hash, size, base, bytes, list)) = row else { return Ok(None) };
        let bad = || MetaError::CorruptRow(format!("partial upload of {path}"));
        let hash = ContentHash::from_slice(&hash).ok_or_else(bad)?;
        let base = match base {
            Some(b) => Some(ContentHash::from_slice(&b).ok_or_else(bad)?),
            None => None,
        };
        let Some(chunks) = chunk_locs(&c, &list)? else { return Ok(None) };
        Ok(Some(Partial { hash, size: size.max(0) as u64, base, bytes: bytes.max(0) as u64, chunks }))
    }

    fn signature(&self, hash: &ContentHash, block: u32) -> Result<Option<Vec<ChunkLoc>>, MetaError> {
        let c = self.conn();
        let list: Option<Vec<u8>> = c
            .prepare_cached("SELECT chunks FROM signatures WHERE hash=?1 AND block=?2")?
            .query_row(params![&hash.0[..], block], |r| r.get(0))
            .optional()?;
        match list {
            Some(l) => chunk_locs(&c, &l),
            None => Ok(None),
        }
    }

    fn save_signature(
        &self,
        hash: &ContentHash,
        block: u32,
        chunks: &[(ChunkKey, u32)],
    ) -> Result<bool, MetaError> {
        let c = self.conn();
        let Some(ids) = chunk_ids(&c, chunks)? else { return Ok(false) };
        c.prepare_cached("INSERT OR REPLACE INTO signatures (hash, block, chunks) VALUES (?1, ?2, ?3)")?
            .execute(params![&hash.0[..], block, ids])?;
        Ok(true)
    }

    fn drop_signature(&self, hash: &ContentHash, block: u32) -> Result<(), MetaError> {
        let c = self.conn();
        c.prepare_cached("DELETE FROM signatures WHERE hash=?1 AND block=?2")?
            .execute(params![&hash.0[..], block])?;
        Ok(())
    }

    fn has_children(&self, account: AccountId, dir: &RelPath) -> Result<bool, MetaError> {
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

/// The id of the account named `name`.
fn account_id(c: &rusqlite::Connection, name: &str) -> Result<Option<AccountId>, MetaError> {
    Ok(c.prepare_cached("SELECT id FROM accounts WHERE name=?1 AND owner IS NULL")?
        .query_row(params![name], |r| r.get(0))
        .optional()?)
}

/// Adds a device row (inside the caller's transaction) and returns its id.
fn insert_device(
    tx: &rusqlite::Connection,
    account: AccountId,
    name: &str,
    token: &str,
    now: i64,
) -> Result<DeviceId, MetaError> {
    tx.prepare_cached("INSERT INTO devices (account, name, token_hash, created) VALUES (?1, ?2, ?3, ?4)")?
        .execute(params![account, name, token_hash(token), now])?;
    Ok(tx.last_insert_rowid())
}

/// [`MetaStore::get`] on this connection.
fn entry_at(
    c: &rusqlite::Connection,
    account: AccountId,
    path: &RelPath,
) -> Result<Option<Entry>, MetaError> {
    let mut st = c.prepare_cached(
        "SELECT path, rev, kind, hash, size, mtime_ns, mode, target, device FROM files WHERE account=?1 AND path=?2",
    )?;
    let row = st.query_row(params![account, path.as_str()], row_to_entry).optional()?;
    row.transpose()
}

/// [`MetaStore::content`] on this connection.
fn content_of(
    c: &rusqlite::Connection,
    account: AccountId,
    hash: &ContentHash,
) -> Result<Option<(u64, Vec<ChunkLoc>)>, MetaError> {
    let row: Option<(i64, Vec<u8>)> = c
        .prepare_cached("SELECT size, chunks FROM contents WHERE account=?1 AND hash=?2")?
        .query_row(params![account, &hash.0[..]], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let Some((size, list)) = row else { return Ok(None) };
    let Some(locs) = chunk_locs(c, &list)? else {
        return Err(MetaError::CorruptRow(format!("content {} refers to a missing chunk", hash.to_hex())));
    };
    Ok(Some((size.max(0) as u64, locs)))
}

/// Where the chunks of a stored list (a content's or a partial upload's) are; `None` if one is
/// not recorded.
fn chunk_locs(c: &rusqlite::Connection, list: &[u8]) -> Result<Option<Vec<ChunkLoc>>, MetaError> {
    let list: Vec<(i64, u32)> =
        postcard::from_bytes(list).map_err(|_| MetaError::CorruptRow("a chunk list".into()))?;
    let mut st = c.prepare_cached("SELECT pack, offset, stored, raw, zstd FROM chunks WHERE id=?1")?;
    let mut locs = Vec::with_capacity(list.len());
    for (id, _) in list {
        let loc = st
            .query_row(params![id], |r| {
                let pack: Vec<u8> = r.get(0)?;
                Ok((
                    pack,
                    r.get::<_, i64>(1)?,
                    r.get::<_, u32>(2)?,
                    r.get::<_, u32>(3)?,
                    r.get::<_, bool>(4)?,
                ))
            })
            .optional()?;
        let Some((pack, offset, stored, raw, zstd)) = loc else { return Ok(None) };
        let pack = PackId(pack.try_into().map_err(|_| MetaError::CorruptRow("chunk".into()))?);
        locs.push(ChunkLoc { pack, offset: offset as u64, stored, raw, zstd });
    }
    Ok(Some(locs))
}

/// The ids of stored chunks, as a content row's list; `None` if one is not stored (any more).
fn chunk_ids(c: &rusqlite::Connection, list: &[(ChunkKey, u32)]) -> Result<Option<Vec<u8>>, MetaError> {
    chunk_ids_by(&mut *c.prepare_cached(CHUNK_ID)?, list)
}

/// [`chunk_ids`] with the statement ([`CHUNK_ID`]) at hand.
fn chunk_ids_by(
    st: &mut rusqlite::Statement<'_>,
    list: &[(ChunkKey, u32)],
) -> Result<Option<Vec<u8>>, MetaError> {
    let mut ids: Vec<(i64, u32)> = Vec::with_capacity(list.len());
    for (key, len) in list {
        match st.query_row(params![&key[..]], |r| r.get::<_, i64>(0)).optional()? {
            Some(id) => ids.push((id, *len)),
            None => return Ok(None),
        }
    }
    Ok(Some(postcard::to_allocvec(&ids).map_err(|e| MetaError::CorruptRow(e.to_string()))?))
}

fn stale(msg: String) -> Refusal {
    Refusal::new(RefusalKind::Stale, msg)
}

/// What the changes of one commit share: the space, who writes and when, what its transaction
/// has learned that later changes need not look up again, and its statements, prepared once
/// (taken from rusqlite's cache for each change, each cost a hash of its text and two moves in
/// the cache).
struct Batch<'c> {
    account: AccountId,
    device: &'c str,
    at: i64,
    /// The bytes of the account's other folders, and its quota.
    quota: (i64, Option<i64>),
    /// Paths this transaction has found to be directories: the parent of a thousand uploads
    /// into one folder is looked up once. A path a change writes is taken out.
    dirs: HashSet<RelPath>,
    /// Whether the space kept cut-off uploads when the commit began (if not, no change deletes
    /// one: no other connection writes during the transaction).
    partials: bool,
    get: rusqlite::CachedStatement<'c>,
    has_content: rusqlite::CachedStatement<'c>,
    chunk_id: rusqlite::CachedStatement<'c>,
    add_content: rusqlite::CachedStatement<'c>,
    put_file: rusqlite::CachedStatement<'c>,
    put_history: rusqlite::CachedStatement<'c>,
    drop_partial: rusqlite::CachedStatement<'c>,
}

const GET_ROW: &str = "SELECT path, rev, kind, hash, size, mtime_ns, mode, target, device FROM files WHERE account=?1 AND path=?2";
const CHUNK_ID: &str = "SELECT id FROM chunks WHERE digest=?1";

impl<'c> Batch<'c> {
    fn new(
        tx: &'c rusqlite::Connection,
        account: AccountId,
        device: &'c str,
        quota: (i64, Option<i64>),
        partials: bool,
    ) -> Result<Self, MetaError> {
        Ok(Batch {
            account,
            device,
            at: now_secs(),
            quota,
            dirs: HashSet::new(),
            partials,
            get: tx.prepare_cached(GET_ROW)?,
            has_content: tx.prepare_cached("SELECT 1 FROM contents WHERE account=?1 AND hash=?2")?,
            chunk_id: tx.prepare_cached(CHUNK_ID)?,
            add_content: tx
                .prepare_cached("INSERT INTO contents (account, hash, size, chunks) VALUES (?1, ?2, ?3, ?4)")?,
            put_file: tx.prepare_cached(
                "INSERT OR REPLACE INTO files (account, path, rev, kind, hash, size, mtime_ns, mode, target, device)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            )?,
            put_history: tx.prepare_cached(
                "INSERT OR REPLACE INTO history (account, path, rev, kind, hash, size, mtime_ns, mode, target, device, op, at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
            )?,
            drop_partial: tx.prepare_cached("DELETE FROM partial WHERE account=?1 AND path=?2")?,
        })
    }

    fn get_row(&mut self, path: &RelPath) -> Result<Option<Entry>, MetaError> {
        let row = self.get.query_row(params![self.account, path.as_str()], row_to_entry).optional()?;
        row.transpose()
    }
}

/// Checks and writes one change of a step (revision `seq`) inside the commit's transaction:
/// `Ok(Err(_))` is a refusal, and then nothing of this change was written. `used` is the
/// space's usage, updated only when the change is written.
fn apply_change(
    tx: &rusqlite::Connection,
    batch: &mut Batch<'_>,
    op: &str,
    ch: &Change,
    seq: u64,
    used: &mut i64,
) -> Result<Result<u64, Refusal>, MetaError> {
    let account = batch.account;
    let (others, quota) = batch.quota;
    let cur = batch.get_row(&ch.path)?;
    let rev = cur.as_ref().map_or(0, |e| e.rev);
    if rev != ch.base_rev {
        return Ok(Err(stale(format!(
            "`{}` changed on the server (now rev {rev}, your change was made on rev {}); pull first",
            ch.path, ch.base_rev
        ))));
    }
    let is_dir = matches!(cur, Some(Entry { node: Some(Node::Dir { .. }), .. }));
    if is_dir && !matches!(ch.node, Some(Node::Dir { .. })) && children(tx, account, &ch.path)? {
        let what = if ch.node.is_none() { "is not empty" } else { "is a non-empty directory" };
        return Ok(Err(stale(format!("`{}` {what} on the server; delete its contents first", ch.path))));
    }
    if ch.node.is_some()
        && let Some(parent) = ch.path.parent()
        && !batch.dirs.contains(&parent)
    {
        match batch.get_row(&parent)?.and_then(|e| e.node) {
            Some(Node::Dir { .. }) => {
                batch.dirs.insert(parent);
            }
            Some(_) => {
                return Ok(Err(stale(format!(
                    "`{parent}` is not a directory on the server any more (another computer replaced it)"
                ))));
            }
            None => {
                return Ok(Err(stale(format!(
                    "directory `{parent}` does not exist on the server any more (another computer deleted it)"
                ))));
            }
        }
    }
    let old = match &cur {
        Some(Entry { node: Some(Node::File { size, .. }), .. }) => *size as i64,
        _ => 0,
    };
    let mut new_content = None;
    let after = if let Some(Node::File { hash, size, .. }) = &ch.node {
        let known = batch.has_content.exists(params![account, &hash.0[..]])?;
        if !known {
            let ids = match &ch.chunks {
                Some(list) => chunk_ids_by(&mut batch.chunk_id, list)?,
                None => None,
            };
            let Some(ids) = ids else {
                return Ok(Err(Refusal::new(
                    RefusalKind::NotFound,
                    format!("the server does not hold the content of `{}` (any more); upload it", ch.path),
                )));
            };
            new_content = Some((hash, *size, ids));
        }
        let size = *size as i64;
        let after = *used - old + size;
        if let Some(q) = quota
            && size > old
            && others + after > q
        {
            return Ok(Err(crate::server::session::quota_refusal(
                account_name(tx, account)?.as_str(),
                (others + *used).max(0) as u64,
                q as u64,
                &ch.path,
                size as u64,
                old as u64,
            )));
        }
        after
    } else {
        *used - old
    };
    if let Some((hash, size, ids)) = new_content {
        batch.add_content.execute(params![account, &hash.0[..], size as i64, ids])?;
    }
    write_change(batch, seq, &ch.path, ch.node.as_ref(), op)?;
    batch.dirs.remove(&ch.path);
    *used = after;
    Ok(Ok(seq))
}

/// Records a finished pack and its chunks. A chunk another pack has already keeps its first
/// place (this copy is garbage for the next prune).
fn record_pack(tx: &rusqlite::Connection, sealed: &Sealed) -> Result<(), MetaError> {
    tx.execute(
        "INSERT OR IGNORE INTO packs (id, size, created) VALUES (?1, ?2, ?3)",
        params![&sealed.pack.0[..], sealed.size as i64, now_secs()],
    )?;
    let mut st = tx.prepare_cached(
        "INSERT OR IGNORE INTO chunks (digest, pack, offset, stored, raw, zstd) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?;
    for ch in &sealed.chunks {
        let l = &ch.loc;
        st.execute(params![&ch.key[..], &l.pack.0[..], l.offset as i64, l.stored, l.raw, l.zstd])?;
    }
    Ok(())
}

/// Every chunk id a content, a partial upload or a signature refers to.
fn used_chunks(tx: &rusqlite::Connection) -> Result<std::collections::HashSet<i64>, MetaError> {
    let mut used = std::collections::HashSet::new();
    let mut st = tx.prepare(
        "SELECT chunks FROM contents UNION ALL SELECT chunks FROM partial UNION ALL SELECT chunks FROM signatures",
    )?;
    let mut rows = st.query([])?;
    while let Some(r) = rows.next()? {
        let list: Vec<u8> = r.get(0)?;
        let list: Vec<(i64, u32)> =
            postcard::from_bytes(&list).map_err(|_| MetaError::CorruptRow("a chunk list".into()))?;
        used.extend(list.into_iter().map(|(id, _)| id));
    }
    Ok(used)
}

fn drop_rows(tx: &rusqlite::Connection, rows: &[(i64, String, i64)]) -> Result<(), MetaError> {
    let mut st = tx.prepare_cached("DELETE FROM history WHERE account=?1 AND path=?2 AND rev=?3")?;
    for (a, p, r) in rows {
        st.execute(params![a, p, r])?;
    }
    Ok(())
}

/// The name of the account a space belongs to.
fn account_name(tx: &rusqlite::Connection, account: AccountId) -> Result<String, MetaError> {
    Ok(tx.query_row(
        "SELECT COALESCE((SELECT o.name FROM accounts o WHERE o.id = a.owner), a.name) FROM accounts a WHERE a.id=?1",
        params![account],
        |r| r.get(0),
    )?)
}

/// A space's room: the bytes of the other folders of its account, its own bytes, and the
/// account's quota.
fn room(tx: &rusqlite::Connection, space: AccountId) -> Result<(i64, i64, Option<i64>), MetaError> {
    Ok(tx
        .prepare_cached(
            "SELECT (SELECT COALESCE(SUM(s.used), 0) FROM accounts s
                     WHERE (s.id = o.id OR s.owner = o.id) AND s.id <> a.id),
                    a.used, o.quota
             FROM accounts a JOIN accounts o ON o.id = COALESCE(a.owner, a.id) WHERE a.id=?1",
        )?
        .query_row(params![space], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?)
}

fn children(tx: &rusqlite::Connection, account: AccountId, dir: &RelPath) -> Result<bool, MetaError> {
    let prefix = format!("{}/", dir.as_str());
    Ok(tx
        .prepare_cached(
            "SELECT 1 FROM files WHERE account=?1 AND kind<>0 AND path > ?2 AND path < ?3 LIMIT 1",
        )?
        .exists(params![account, prefix, format!("{}0", dir.as_str())])?)
}

fn write_change(
    batch: &mut Batch<'_>,
    seq: u64,
    path: &RelPath,
    node: Option<&Node>,
    op: &str,
) -> Result<(), MetaError> {
    let zero = NodeMeta { mtime_ns: 0, mode: 0 };
    let (kind, hash, size, meta, target): (i64, Option<&[u8]>, u64, NodeMeta, Option<&str>) = match node {
        None => (0, None, 0, zero, None),
        Some(Node::File { hash, size, meta }) => (1, Some(&hash.0[..]), *size, *meta, None),
        Some(Node::Dir { mode }) => (2, None, 0, NodeMeta { mtime_ns: 0, mode: *mode }, None),
        Some(Node::Symlink { target }) => (3, None, 0, zero, Some(target)),
    };
    let (account, device) = (batch.account, batch.device);
    batch.put_file.execute(params![
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
    if batch.partials {
        batch.drop_partial.execute(params![account, path.as_str()])?;
    }
    batch.put_history.execute(params![
        account,
        path.as_str(),
        seq as i64,
        kind,
        hash,
        size as i64,
        meta.mtime_ns,
        meta.mode,
        target,
        device,
        op,
        batch.at
    ])?;
    Ok(())
}

fn row_to_version(r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<Version, MetaError>> {
    let entry = row_to_entry(r)?;
    let at: i64 = r.get(9)?;
    let op: String = r.get(10)?;
    Ok(entry.map(|e| Version { path: e.path, rev: e.rev, time: at, device: e.device, op, node: e.node }))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The `accounts` table as version 2 left it (`used` and `quota` added by a migration).
    const V2_ACCOUNTS: &str = "
        CREATE TABLE accounts (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            token_hash BLOB NOT NULL UNIQUE,
            seq INTEGER NOT NULL DEFAULT 0,
            created INTEGER NOT NULL
        , used INTEGER NOT NULL DEFAULT 0, quota INTEGER);";

    fn old_db(path: &Path, accounts: &str, version: i64) {
        let c = Connection::open(path).unwrap();
        c.execute_batch(accounts).unwrap();
        for (id, name, token) in [(1, "alice", "token-alice"), (2, "bob", "token-bob")] {
            c.execute(
                "INSERT INTO accounts (id, name, token_hash, seq, created) VALUES (?1, ?2, ?3, 7, 1000)",
                params![id, name, token_hash(token)],
            )
            .unwrap();
        }
        c.execute_batch(&format!("PRAGMA user_version = {version}")).unwrap();
    }

    fn columns(m: &SqliteMeta) -> Vec<String> {
        m.conn()
            .prepare("SELECT name FROM pragma_table_info('accounts') ORDER BY cid")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    #[test]
    fn version_2_tokens_become_device_first_and_keep_working() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("db");
        old_db(&path, V2_ACCOUNTS, 2);
        {
            let c = Connection::open(&path).unwrap();
            c.execute_batch("UPDATE accounts SET used=123, quota=4096 WHERE name='alice'").unwrap();
        }
        let m = SqliteMeta::open(&path).unwrap();
        assert_eq!(m.layout().unwrap(), 4);
        assert_eq!(columns(&m), ["id", "name", "seq", "created", "used", "quota", "owner", "folder"]);
        let (a, dev) = m.authenticate("token-alice").unwrap().unwrap();
        assert_eq!((a.id, a.name.as_str(), dev.name.as_str()), (1, "alice", FIRST_DEVICE));
        let (b, _) = m.authenticate("token-bob").unwrap().unwrap();
        assert_eq!((b.id, b.name.as_str()), (2, "bob"));
        assert_eq!(m.usage(1).unwrap(), (123, Some(4096)));
        assert_eq!(m.seq(2).unwrap(), 7);
        let list = m.list_devices("alice").unwrap().unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!((list[0].name.as_str(), list[0].created), (FIRST_DEVICE, 1000));
        assert!(matches!(m.add_device("alice", FIRST_DEVICE, "t"), Err(MetaError::DeviceExists(_))));
        drop(m);

        // Opening again changes nothing; new ids follow the old ones and are never reused.
        let m = SqliteMeta::open(&path).unwrap();
        assert_eq!(m.list_devices("alice").unwrap().unwrap().len(), 1);
        let carol = m.add_account("carol", "pc", "token-carol").unwrap();
        assert_eq!(carol.id, 3);
        assert!(m.remove_account("carol").unwrap());
        assert_eq!(m.add_account("dave", "pc", "token-dave").unwrap().id, 4);
        assert!(m.authenticate("token-alice").unwrap().is_some());
    }

    #[test]
    fn a_plain_mirror_database_keeps_its_layout_version_until_it_is_converted() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("db");
        // As the plain-mirror release made it: no `used`, `quota`, user_version 0.
        let v1 = V2_ACCOUNTS.replace(", used INTEGER NOT NULL DEFAULT 0, quota INTEGER", "");
        old_db(&path, &v1, 0);
        let m = SqliteMeta::open(&path).unwrap();
        assert_eq!(m.layout().unwrap(), 0, "the mirror conversion would be skipped");
        assert!(!columns(&m).contains(&"token_hash".to_string()));
        assert_eq!(m.authenticate("token-bob").unwrap().unwrap().1.name, FIRST_DEVICE);
        m.convert_mirror(&[]).unwrap();
        assert_eq!(m.layout().unwrap(), SCHEMA_VERSION);
    }

    #[test]
    fn a_column_the_migration_does_not_know_stops_it_and_nothing_changes() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("db");
        old_db(&path, &V2_ACCOUNTS.replace("quota INTEGER", "quota INTEGER, note TEXT"), 2);
        assert!(SqliteMeta::open(&path).is_err());
        let c = Connection::open(&path).unwrap();
        let has: bool = c
            .prepare("SELECT 1 FROM pragma_table_info('accounts') WHERE name='token_hash'")
            .unwrap()
            .exists([])
            .unwrap();
        let devices: i64 = c.query_row("SELECT COUNT(*) FROM devices", [], |r| r.get(0)).unwrap();
        let version: i64 = c.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        assert_eq!((has, devices, version), (true, 0, 2));
    }

    /// Rows in every table with an `account` column, per account (found from the schema, so a
    /// table added later is checked too).
    fn rows_of(m: &SqliteMeta, account: AccountId) -> Vec<(String, i64)> {
        let c = m.conn();
        let tables: Vec<String> = c
            .prepare(
                "SELECT m.name FROM sqlite_master m, pragma_table_info(m.name) p
                 WHERE m.type = 'table' AND p.name = 'account' ORDER BY m.name",
            )
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        tables
            .into_iter()
            .map(|t| {
                let n = c
                    .query_row(&format!("SELECT COUNT(*) FROM {t} WHERE account=?1"), [account], |r| r.get(0))
                    .unwrap();
                (t, n)
            })
            .collect()
    }

    #[test]
    fn removing_an_account_leaves_no_row_of_it() {
        use crate::protocol::Meta;
        use crate::server::meta::Change;
        let d = tempfile::tempdir().unwrap();
        let m = SqliteMeta::open(&d.path().join("db")).unwrap();
        let mut ids = Vec::new();
        for name in ["a", "b"] {
            let id = m.add_account(name, "laptop", &format!("t-{name}")).unwrap().id;
            m.add_device(name, "phone", &format!("p-{name}")).unwrap().unwrap();
            let key = [name.as_bytes()[0]; 32];
            let pack = PackId([name.as_bytes()[0]; 16]);
            let loc = ChunkLoc { pack, offset: 0, stored: 2, raw: 2, zstd: false };
            m.add_pack(&Sealed { pack, size: 2, chunks: vec![NewChunk { key, loc }] }).unwrap();
            let node =
                Node::File { hash: ContentHash::of(b"xy"), size: 2, meta: Meta { mtime_ns: 0, mode: 0 } };
            let path = RelPath::new("f").unwrap();
            let change =
                Change { path: path.clone(), base_rev: 0, node: Some(node), chunks: Some(vec![(key, 2)]) };
            assert_eq!(
                m.commit(id, "laptop", &[Step { op: "write", changes: vec![change] }]).unwrap(),
                [Ok(1)]
            );
            let p = RelPath::new("p").unwrap();
            assert!(m.save_partial(id, &p, &ContentHash::of(b"z"), 9, None, &[(key, 2)]).unwrap());
            m.conn()
                .execute_batch(&format!(
                    "INSERT INTO journal (account, seq, op, path, device, at) VALUES ({id}, 1, 'write', 'f', 'laptop', 0);
                     INSERT INTO pending (account, path, tmp, node, op, device) VALUES ({id}, 'f', 't', x'00', 'write', 'laptop');"
                ))
                .unwrap();
            ids.push(id);
        }
        let full = rows_of(&m, ids[0]);
        assert!(full.len() >= 7 && full.iter().all(|(_, n)| *n > 0), "{full:?}");
        assert!(m.remove_account("a").unwrap());
        let left = rows_of(&m, ids[0]);
        assert!(left.iter().all(|(_, n)| *n == 0), "rows left: {left:?}");
        assert_eq!(rows_of(&m, ids[1]), full, "the other account lost rows");
    }

    #[test]
    fn a_fresh_database_has_the_current_schema() {
        let d = tempfile::tempdir().unwrap();
        let m = SqliteMeta::open(&d.path().join("db")).unwrap();
        assert_eq!(columns(&m), ["id", "name", "seq", "created", "used", "quota", "owner", "folder"]);
        m.mark_layout().unwrap();
        assert_eq!(m.layout().unwrap(), SCHEMA_VERSION);
    }
}
