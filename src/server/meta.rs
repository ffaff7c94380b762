//! The metadata interface: accounts, the current state of every path, history, file contents
//! and where their chunks are. The server sees only [`MetaStore`]; `store::sqlite` implements
//! it (a PostgreSQL one is the next). Every commit is one transaction that takes the account's
//! next sequence number per step, checks the step's rules against what is committed, and writes
//! the paths' rows and history, so "what changed since N" is `WHERE rev > N` and can never miss
//! a commit, and two server processes on one database cannot both win a base revision.
//!
//! Every per-path call takes a *space*: an account's `default` folder is the account's own id,
//! each other folder has a space of its own ([`MetaStore::space`]), so the folders of an account
//! keep separate trees, histories and journals; devices, tokens and the quota are the account's.

use crate::hash::ContentHash;
use crate::path::RelPath;
use crate::protocol::Refusal;
use crate::protocol::{At, Entry, Node, Version};
use crate::server::content::{ChunkKey, ChunkList, ChunkLoc, Sealed};
use crate::server::retention::Keep;
use crate::server::store::PackId;

/// Entries per `Changes` page: ~100 bytes each keeps a page far below the frame limit.
pub const PAGE: usize = 2000;

#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("database error: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("PostgreSQL error: {}", pg_message(.0))]
    Pg(#[from] tokio_postgres::Error),
    /// The metadata database cannot be reached (a lost connection, a full pool): requests are
    /// refused until it is back.
    #[error("the metadata database cannot be reached: {0}")]
    Unavailable(String),
    #[error("an account named `{0}` exists already")]
    AccountExists(String),
    #[error("the account has a device named `{0}` already; revoke it first or choose another name")]
    DeviceExists(String),
    #[error("corrupt row for `{0}` in the database")]
    CorruptRow(String),
    #[error("the OS random number generator failed: {0}")]
    Random(String),
}

/// A PostgreSQL error with the server's own message (tokio-postgres shows only "db error").
fn pg_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {} ({})", db.severity(), db.message(), db.code().code()),
        None => match std::error::Error::source(e) {
            Some(cause) => format!("{e}: {cause}"),
            None => e.to_string(),
        },
    }
}

pub type AccountId = i64;

#[derive(Debug, Clone)]
pub struct Account {
    pub id: AccountId,
    pub name: String,
}

pub type DeviceId = i64;

/// One device of an account: it holds its own token (only its hash is stored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    pub id: DeviceId,
    pub name: String,
}

/// A device as `account devices` shows it. Times are Unix seconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    pub name: String,
    pub created: i64,
    /// When it last authenticated, and from where (as [`MetaStore::device_seen`] recorded).
    pub last_seen: Option<i64>,
    pub last_addr: Option<String>,
    /// When it was revoked: its token no longer works, and its name may be issued again.
    pub revoked: Option<i64>,
}

/// An account as `account list` shows it.
#[derive(Debug, Clone)]
pub struct AccountInfo {
    pub account: Account,
    /// Its journal position (number of changes).
    pub seq: u64,
    /// Bytes of its live files (in all its folders).
    pub used: u64,
    pub quota: Option<u64>,
}

/// One change of a [`Step`]: `path` becomes `node` (`None`: deleted), made from revision
/// `base_rev`. A file's content is the account's already, or `chunks` lists it.
#[derive(Debug, Clone)]
pub struct Change {
    pub path: RelPath,
    pub base_rev: u64,
    pub node: Option<Node>,
    pub chunks: Option<Vec<(ChunkKey, u32)>>,
}

/// A path's current entry and, for a file, its content's size and chunks
/// ([`MetaStore::files_to_send`]).
pub type FileToSend = (Option<Entry>, Option<(u64, Vec<ChunkLoc>)>);

/// Downloads asked for one after another, up to this many, are looked up together
/// ([`MetaStore::files_to_send`]).
pub const GET_RUN: usize = 256;

/// [`MetaStore::files_to_send`] for one path, by [`get`](MetaStore::get) and
/// [`content`](MetaStore::content).
pub fn file_to_send<M: MetaStore + ?Sized>(
    m: &M,
    account: AccountId,
    path: &RelPath,
) -> Result<FileToSend, MetaError> {
    with_content(m.get(account, path)?, |hash| m.content(account, hash))
}

/// A path's entry with, for a file, its content as `content` finds it: the one rule of
/// [`MetaStore::files_to_send`], whichever way a store looks things up.
pub fn with_content(
    entry: Option<Entry>,
    content: impl FnOnce(&ContentHash) -> Result<Option<(u64, Vec<ChunkLoc>)>, MetaError>,
) -> Result<FileToSend, MetaError> {
    let content = match &entry {
        Some(Entry { node: Some(Node::File { hash, .. }), .. }) => content(hash)?,
        _ => None,
    };
    Ok((entry, content))
}

/// Changes committed together as one revision (a move's two paths) and refused together.
#[derive(Debug, Clone)]
pub struct Step {
    pub op: &'static str,
    pub changes: Vec<Change>,
}

/// The metadata store. Blocking calls (the server runs them on the blocking pool); every method
/// is one transaction or a consistent read.
pub trait MetaStore: Send + Sync {
    /// This data folder's 16 random bytes, made when its database was created (or first opened
    /// by a version that knows them).
    fn server_id(&self) -> Result<[u8; 16], MetaError>;

    /// Sets (or with `None` removes) an account's quota in bytes; `false` if there is no such
    /// account.
    fn set_quota(&self, name: &str, quota: Option<u64>) -> Result<bool, MetaError>;

    /// The bytes of the live files of the account `account` (a folder's space) belongs to,
    /// over all its folders, and the account's quota, if any.
    fn usage(&self, account: AccountId) -> Result<(u64, Option<u64>), MetaError>;

    /// The space (the id every per-folder call takes) of the account's folder `folder`: the
    /// account's own id for [`DEFAULT_FOLDER`](crate::protocol::DEFAULT_FOLDER), else one of its
    /// own, made on first use. `None` if there is no such account (removed meanwhile).
    fn space(&self, account: AccountId, folder: &str) -> Result<Option<AccountId>, MetaError>;

    /// The account's folders that have a space: name, journal position and bytes of live
    /// files, `default` first.
    fn folders(&self, account: AccountId) -> Result<Vec<(String, u64, u64)>, MetaError>;

    /// Creates an account and its first device (holding `token`) in one transaction;
    /// [`MetaError::AccountExists`] if the name is taken.
    fn add_account(&self, name: &str, device: &str, token: &str) -> Result<Account, MetaError>;

    /// A new device of `account` holding `token`; `None` if there is no such account,
    /// [`MetaError::DeviceExists`] if a device of that name is live (a revoked name may be reused).
    fn add_device(&self, account: &str, device: &str, token: &str) -> Result<Option<DeviceId>, MetaError>;

    fn list_accounts(&self) -> Result<Vec<AccountInfo>, MetaError>;

    /// The account and device holding `token`; `None` for an unknown or revoked token.
    fn authenticate(&self, token: &str) -> Result<Option<(Account, Device)>, MetaError>;

    /// Records that a device authenticated at `at` (Unix seconds) from `addr`.
    fn device_seen(&self, device: DeviceId, addr: &str, at: i64) -> Result<(), MetaError>;

    /// The account's devices, revoked ones too, oldest first; `None` if there is no such account.
    fn list_devices(&self, account: &str) -> Result<Option<Vec<DeviceInfo>>, MetaError>;

    /// Revokes the account's live device of that name; `false` if there is none.
    fn revoke_device(&self, account: &str, device: &str) -> Result<bool, MetaError>;

    /// Deletes the account and everything of it (paths, history, contents, partial uploads,
    /// devices) in one transaction; `false` if there is no such account. Its chunks are freed
    /// by the next prune.
    fn remove_account(&self, name: &str) -> Result<bool, MetaError>;

    /// Which of `ids` are still valid (not revoked, account not removed), in the order given:
    /// the server asks this now and then to cut off the sessions of revoked devices.
    fn live_devices(&self, ids: &[DeviceId]) -> Result<Vec<DeviceId>, MetaError>;

    /// The current entry at `path` (a tombstone if deleted), `None` if it never existed.
    fn get(&self, account: AccountId, path: &RelPath) -> Result<Option<Entry>, MetaError>;

    /// One page of entries changed after `since`, the account's current sequence, and whether
    /// more pages follow.
    fn changes(&self, account: AccountId, since: u64) -> Result<(Vec<Entry>, u64, bool), MetaError>;

    fn seq(&self, account: AccountId) -> Result<u64, MetaError>;

    /// Whether a chunk is stored (in a finished pack).
    fn chunk_exists(&self, key: &ChunkKey) -> Result<bool, MetaError>;

    /// Records a finished pack and its chunks. A chunk another pack has already keeps its first
    /// place (this copy is garbage for the next prune).
    fn add_pack(&self, sealed: &Sealed) -> Result<(), MetaError>;

    /// The account's stored content with this hash: its size and where its chunks are.
    fn content(
        &self,
        account: AccountId,
        hash: &ContentHash,
    ) -> Result<Option<(u64, Vec<ChunkLoc>)>, MetaError>;

    /// For each of `paths`, its current entry ([`get`](Self::get)) and, for a file, its
    /// content ([`content`](Self::content)): what a run of downloads needs, in one read (one
    /// trip to the blocking pool and one transaction for up to [`GET_RUN`] downloads, instead of
    /// a trip and three lookups, each its own transaction, per file). The outer error is the
    /// read's; each path has its own.
    fn files_to_send(
        &self,
        account: AccountId,
        paths: &[RelPath],
    ) -> Result<Vec<Result<FileToSend, MetaError>>, MetaError> {
        Ok(paths.iter().map(|p| file_to_send(self, account, p)).collect())
    }

    /// The chunk list (keys and lengths) of the account's content with this hash.
    fn content_keys(&self, account: AccountId, hash: &ContentHash) -> Result<Option<ChunkList>, MetaError>;

    /// Commits steps in one transaction. Each step is one revision (the account's next sequence
    /// number) for all its changes and is checked whole, inside the transaction, against what is
    /// committed: a refused step changes nothing, the others commit. So the base-revision rule
    /// holds even with several server processes on one database.
    fn commit(
        &self,
        account: AccountId,
        device: &str,
        steps: &[Step],
    ) -> Result<Vec<Result<u64, Refusal>>, MetaError> {
        self.commit_with_pack(account, device, None, steps)
    }

    /// [`commit`](Self::commit), recording a just finished pack (as `add_pack`) in the same
    /// transaction: a batch of small uploads then costs one transaction, not two.
    fn commit_with_pack(
        &self,
        account: AccountId,
        device: &str,
        pack: Option<&Sealed>,
        steps: &[Step],
    ) -> Result<Vec<Result<u64, Refusal>>, MetaError>;

    /// Versions for `log`: `path`'s, newest first; without a path the account's latest
    /// changes; with `deleted`, the deletes of paths whose earlier content is still kept.
    fn log(
        &self,
        account: AccountId,
        path: Option<&RelPath>,
        deleted: bool,
        limit: u32,
    ) -> Result<Vec<Version>, MetaError>;

    /// The revision a point in history stands for: the last change at or before it.
    fn rev_at(&self, account: AccountId, at: At) -> Result<u64, MetaError>;

    /// The live paths at or under `path` (everything without one) as they were at revision
    /// `rev`, in path order, after `after`; at most `limit`.
    fn snapshot(
        &self,
        account: AccountId,
        path: Option<&RelPath>,
        rev: u64,
        after: Option<&RelPath>,
        limit: u32,
    ) -> Result<Vec<Version>, MetaError>;

    /// The version of `path` committed at `rev`, if history has it.
    fn version(&self, account: AccountId, path: &RelPath, rev: u64) -> Result<Option<Version>, MetaError>;

    /// Every version of every path that `device` changed at or after `since`, oldest first, per
    /// path: what an undo needs to decide.
    fn histories_touched_by(
        &self,
        account: AccountId,
        device: &str,
        since: i64,
    ) -> Result<Vec<Vec<Version>>, MetaError>;

    /// The live entries at or under `path` (everything without one), in path order.
    fn live_under(&self, account: AccountId, path: Option<&RelPath>) -> Result<Vec<Entry>, MetaError>;

    /// One prune, in one transaction: forgets the versions `keep` does not keep (never a
    /// current one), the contents no kept version uses, and the chunks of packs that hold only
    /// unused chunks and were finished at least `grace` seconds ago. Returns the versions
    /// forgotten and the packs (with sizes) whose files may now be deleted. Commits check
    /// inside their own transaction that the chunks they refer to are still recorded, so an
    /// upload racing a prune is refused (and retried by its client), never left pointing at a
    /// deleted pack.
    fn prune(&self, keep: &Keep, now: i64, grace: u64) -> Result<Pruned, MetaError>;

    /// Moves the live chunks of the packs `old` to the finished pack `new` (a repack) and
    /// forgets those packs, in one transaction; returns the packs forgotten. A pack with a chunk
    /// that was not copied and is in use again (an upload came to use it since the prune
    /// decided) is left as it was, and so are its chunks.
    fn repacked(&self, old: &[PackId], new: &Sealed) -> Result<Vec<PackId>, MetaError>;

    /// Whether a pack is recorded (finished and known to the metadata).
    fn pack_known(&self, pack: PackId) -> Result<bool, MetaError>;

    /// Remembers the first bytes of a cut-off upload of `path` (replacing an earlier one);
    /// `false` if one of its chunks is not stored.
    fn save_partial(
        &self,
        account: AccountId,
        path: &RelPath,
        hash: &ContentHash,
        size: u64,
        base: Option<&ContentHash>,
        chunks: &[(ChunkKey, u32)],
    ) -> Result<bool, MetaError>;

    /// The kept part of a cut-off upload of `path`, if any. A commit at the path forgets it; a
    /// prune forgets it after [`PARTIAL_KEEP`] seconds.
    fn partial(&self, account: AccountId, path: &RelPath) -> Result<Option<Partial>, MetaError>;

    /// Where the chunks of the stored signature of content `hash` (block size `block`) are.
    fn signature(&self, hash: &ContentHash, block: u32) -> Result<Option<Vec<ChunkLoc>>, MetaError>;

    /// Records a signature stored in chunks; `false` if one of them is not stored.
    fn save_signature(
        &self,
        hash: &ContentHash,
        block: u32,
        chunks: &[(ChunkKey, u32)],
    ) -> Result<bool, MetaError>;

    fn drop_signature(&self, hash: &ContentHash, block: u32) -> Result<(), MetaError>;

    /// Whether a directory has live entries under it (a non-empty one is never deleted or
    /// replaced).
    fn has_children(&self, account: AccountId, dir: &RelPath) -> Result<bool, MetaError>;

    /// Commits that *other* server processes make on the same database: from now until the
    /// store is dropped, `notify(space, seq)` is called (from a task or thread of the store's
    /// own) when a commit elsewhere moves a space's journal to `seq`, so this process tells its
    /// own connected devices. A store only one process uses (SQLite) has nothing to report.
    fn on_commits_elsewhere(&self, notify: CommitListener) {
        let _ = notify;
    }
}

/// See [`MetaStore::on_commits_elsewhere`].
pub type CommitListener = std::sync::Arc<dyn Fn(AccountId, u64) + Send + Sync>;

/// How long the kept part of a cut-off upload waits for its client to come back: two days.
pub const PARTIAL_KEEP: i64 = 2 * 86_400;

/// What the server kept of a cut-off upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partial {
    pub hash: ContentHash,
    pub size: u64,
    /// The base the upload was a delta against.
    pub base: Option<ContentHash>,
    /// The first `bytes` bytes of the content, in chunks.
    pub bytes: u64,
    pub chunks: Vec<ChunkLoc>,
}

/// What a prune's transaction decided.
#[derive(Debug, Default)]
pub struct Pruned {
    /// Versions forgotten.
    pub versions: u64,
    /// Packs nothing uses any more (forgotten; their files may go), with their sizes.
    pub gone: Vec<(PackId, u64)>,
    /// Packs worth rewriting ([`worth_repacking`]), with their sizes and live chunks: their
    /// live chunks are copied into new packs.
    pub to_repack: Vec<(PackId, u64, Vec<crate::server::content::NewChunk>)>,
}

/// Packs below this size are merged by a prune: `watch` commits a few small files at a time,
/// each commit in a pack of its own, and an object store bills and waits per object.
pub const SMALL_PACK: u64 = 1 << 20;

/// Whether a finished pack of `size` bytes, `live` of them still used, is worth copying into a
/// new pack: less than half of it is used, or it is small (merged with others).
pub fn worth_repacking(size: u64, live: u64) -> bool {
    live.saturating_mul(2) < size || size < SMALL_PACK
}

/// The metadata store as the server holds it.
pub type Metadata = dyn MetaStore;
