//! `deltasync serve`: a TLS server that keeps each account's files and their history.
//!
//! # Layout
//! - [`meta`]: the metadata interface: accounts and devices, path states, history, contents.
//! - [`store`]: the storage interfaces' implementations (packs in a folder, SQLite) and their
//!   conformance tests.
//! - [`handshake`]: a connection's first seconds: TLS, `Hello`, who it is.
//! - [`session`]: one task per connection after that: requests in order.
//! - [`auth`]: account and device names; the per-address brakes on authentication and open
//!   registration.
//! - [`content`], [`batch`], [`revert`], [`retention`], [`history`], [`migrate`]: chunks and
//!   packs, group commit, restore/undo, `--keep`, export/prune, conversion of old data folders.
//!
//! Every commit rule is decided inside the metadata transaction; the per-account lock only
//! keeps one account's uploads from racing each other for nothing.
pub mod auth;
pub mod batch;
pub mod content;
mod handshake;
pub mod history;
pub mod meta;
mod migrate;
pub mod retention;
mod revert;
pub mod session;
pub mod store;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{Semaphore, broadcast};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::{protocol, transport};
use meta::{Account, AccountId, Metadata};
use store::ChunkStore;

/// Connections served at once; one more waits in the accept queue.
const MAX_CONNECTIONS: usize = 4096;
/// After Ctrl-C, sessions get this long to finish what they are doing; then the server stops
/// anyway (a session stuck on a silent peer must not keep it running).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// A peer that stops sending in the middle of a message, or in the middle of an upload, is
/// dropped after this long. `DELTASYNC_IO_TIMEOUT_SECS` overrides it (tests use a short one).
const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// A connection with no message at all for this long is dropped. Long: `watch` pings every
/// 30 s, but `push` and `pull` send nothing while they scan a big folder.
const IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// The largest file an upload may announce: 16 TiB, the largest file ext4 (4 KiB blocks) can
/// hold. Anything bigger is a lie; quotas and the free-space check bound real uploads.
pub const MAX_FILE_SIZE: u64 = 16 << 40;

/// The stall timeout: `DELTASYNC_IO_TIMEOUT_SECS` (whole seconds, at least 1) or [`IO_TIMEOUT`].
fn io_timeout() -> Duration {
    match std::env::var("DELTASYNC_IO_TIMEOUT_SECS") {
        Ok(v) => match v.trim().parse::<u64>() {
            Ok(n) if n > 0 => Duration::from_secs(n),
            _ => {
                tracing::warn!(
                    "ignoring DELTASYNC_IO_TIMEOUT_SECS={v:?}: not a whole number of seconds above 0"
                );
                IO_TIMEOUT
            }
        },
        Err(_) => IO_TIMEOUT,
    }
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Where metadata and content live: the data folder, or PostgreSQL and an S3 bucket.
    pub storage: Storage,
    /// `serve --tls-cert FILE --tls-key FILE`; without them, the data folder's own certificate.
    pub tls_files: Option<(PathBuf, PathBuf)>,
    pub open_registration: bool,
    /// Which versions history keeps (`serve --keep`).
    pub keep: retention::Keep,
    /// `serve --bwlimit`: each connection's limit (send = to the client, receive = from it).
    pub bwlimit: protocol::BwLimit,
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot use data folder {path}: {err}")]
    DataDir { path: PathBuf, err: std::io::Error },
    #[error(transparent)]
    Meta(#[from] meta::MetaError),
    #[error(
        "converting the data folder to the versioned store failed: {0}; nothing was deleted, the old layout is still in place: fix the cause and start again"
    )]
    Convert(String),
    #[error("{0}")]
    History(String),
    #[error("accepting connections failed: {0}")]
    Accept(std::io::Error),
    #[error("cannot use the object store: {0}")]
    Store(std::io::Error),
    #[error("{0}")]
    Tls(#[from] crate::transport::TlsError),
}

/// State shared by all sessions.
pub struct Shared {
    pub meta: Arc<Metadata>,
    pub chunks: Arc<dyn ChunkStore>,
    /// Signatures of stored versions (see [`content::Sigs`]).
    pub sigs: content::Sigs,
    pub keep: retention::Keep,
    pub open_registration: bool,
    /// `serve --bwlimit`, applied to each connection on its TCP socket.
    pub bwlimit: protocol::BwLimit,
    /// This data folder's identity (kept in the database), sent in every `Welcome`.
    pub server_id: [u8; 16],
    /// See [`IO_TIMEOUT`] and [`IDLE_TIMEOUT`].
    pub io_timeout: Duration,
    pub idle_timeout: Duration,
    /// Rung by a session that went quiet: memory it freed goes back to the OS (see
    /// [`trim_when_quiet`]).
    pub quiet: tokio::sync::Notify,
    /// Failed-authentication slowdown and open-registration limits, per source address.
    pub limits: auth::Limits,
    /// Connected sessions by credential, so a revoked device is cut off (see [`cut_off_revoked`]).
    devices: DeviceSessions,
    locks: Mutex<HashMap<AccountId, Arc<tokio::sync::Mutex<()>>>>,
    hub: Mutex<HashMap<AccountId, broadcast::Sender<(u64, u64)>>>,
    next_session: std::sync::atomic::AtomicU64,
}

impl Shared {
    pub fn open(config: &ServerConfig) -> Result<Self, ServerError> {
        let dd = |err| ServerError::DataDir { path: config.storage.data_dir.clone(), err };
        let (meta, chunks) = open_data(&config.storage)?;
        // Packs an interrupted upload left unfinished: nothing refers to them.
        let cleaned = chunks.clean_unfinished().map_err(dd)?;
        if cleaned > 0 {
            tracing::info!("removed {cleaned} unfinished packs left by interrupted uploads");
        }
        let sigs = content::Sigs::new(chunks.clone(), meta.clone());
        // Signatures were files in `sigs/` before they were chunks: made again when needed.
        let _ = std::fs::remove_dir_all(config.storage.data_dir.join("sigs"));
        let server_id = meta.server_id()?;
        let io_timeout = io_timeout();
        Ok(Shared {
            meta,
            chunks,
            sigs,
            keep: config.keep.clone(),
            open_registration: config.open_registration,
            bwlimit: config.bwlimit,
            server_id,
            io_timeout,
            idle_timeout: IDLE_TIMEOUT.max(io_timeout),
            quiet: tokio::sync::Notify::new(),
            limits: auth::Limits::new(),
            devices: Arc::default(),
            locks: Mutex::default(),
            hub: Mutex::default(),
            next_session: Default::default(),
        })
    }

    /// Records a session of `device`; the token is cancelled when the device is revoked, and
    /// the guard forgets the session when dropped.
    pub fn register_device(&self, device: meta::DeviceId) -> (CancellationToken, Registered) {
        let kill = CancellationToken::new();
        let key = REGISTRATION.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut m = self.devices.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(device).or_default().push((key, kill.clone()));
        (kill, Registered { devices: self.devices.clone(), device, key })
    }

    /// The lock that serializes commits to one account.
    pub fn commit_lock(&self, account: AccountId) -> Arc<tokio::sync::Mutex<()>> {
        let mut m = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(account).or_default().clone()
    }

    pub fn session_id(&self) -> u64 {
        self.next_session.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// Notices are `(seq, session that made the change)`, so a device is not told of its own commits.
    pub fn subscribe(&self, account: AccountId) -> broadcast::Receiver<(u64, u64)> {
        let mut m = self.hub.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(account).or_insert_with(|| broadcast::channel(16).0).subscribe()
    }

    /// Tells every subscribed device of the account that its journal reached `seq`.
    pub fn notify(&self, account: AccountId, seq: u64, origin: u64) {
        let m = self.hub.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = m.get(&account) {
            let _ = tx.send((seq, origin));
        }
    }
}

/// Per credential, its live sessions: (registration key, the token that closes the session).
type DeviceSessions = Arc<Mutex<HashMap<meta::DeviceId, Vec<(u64, CancellationToken)>>>>;

static REGISTRATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A session's place in [`Shared`]'s device registry; dropping it leaves.
pub struct Registered {
    devices: DeviceSessions,
    device: meta::DeviceId,
    key: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        let mut m = self.devices.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(v) = m.get_mut(&self.device) {
            v.retain(|(k, _)| *k != self.key);
            if v.is_empty() {
                m.remove(&self.device);
            }
        }
    }
}

/// How often the server checks whether a connected device was revoked. `account revoke` runs in
/// another process (it only writes the database), so this poll is how it reaches live sessions:
/// one small indexed query per second, only while devices are connected.
const REVOCATION_POLL: Duration = Duration::from_secs(1);

/// Closes the sessions of devices revoked (or accounts removed) since they connected.
async fn cut_off_revoked(shared: Arc<Shared>, cancel: CancellationToken) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(REVOCATION_POLL) => {}
        }
        let ids: Vec<meta::DeviceId> = {
            let m = shared.devices.lock().unwrap_or_else(|p| p.into_inner());
            m.keys().copied().collect()
        };
        if ids.is_empty() {
            continue;
        }
        let sh = shared.clone();
        let asked = ids.clone();
        let live = match tokio::task::spawn_blocking(move || sh.meta.live_devices(&asked)).await {
            Ok(Ok(live)) => live,
            Ok(Err(e)) => {
                tracing::warn!("cannot check for revoked devices: {e}");
                continue;
            }
            Err(_) => continue,
        };
        let m = shared.devices.lock().unwrap_or_else(|p| p.into_inner());
        for id in ids.iter().filter(|id| !live.contains(id)) {
            for (_, kill) in m.get(id).into_iter().flatten() {
                kill.cancel();
            }
        }
    }
}

/// Gives the memory sessions freed back to the OS once they go quiet (glibc keeps freed memory
/// in its arenas otherwise): 200 `watch` connections that had each synced 200 small files then
/// held 151 KiB of server memory apiece; trimmed, see README. At most once per [`TRIM_EVERY`],
/// a second after the first session of a burst went quiet.
async fn trim_when_quiet(shared: Arc<Shared>, cancel: CancellationToken) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = shared.quiet.notified() => {}
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(TRIM_EVERY) => {}
        }
        let _ = tokio::task::spawn_blocking(crate::fsutil::release_free_memory).await;
    }
}

/// See [`trim_when_quiet`].
const TRIM_EVERY: Duration = Duration::from_secs(1);

/// Opens a data folder's metadata and chunk store, converting a folder of the plain-mirror
/// layout first (see [`migrate`]).
/// Where a server keeps accounts, history and content: by default all in its data folder
/// (SQLite + packs), or in PostgreSQL (`--metadata`) and an S3-compatible bucket (`--store`),
/// which any number of server processes share. The data folder keeps the TLS identity either way.
#[derive(Debug, Clone, Default)]
pub struct Storage {
    pub data_dir: PathBuf,
    /// `postgres://…`: the metadata in PostgreSQL.
    pub metadata: Option<String>,
    /// The content in a bucket.
    pub s3: Option<store::s3::S3Config>,
}

impl Storage {
    /// The data folder alone (the embedded default).
    pub fn local(data_dir: &Path) -> Self {
        Storage { data_dir: data_dir.to_path_buf(), metadata: None, s3: None }
    }

    /// Whether the metadata lives in the data folder (its `deltasync.db`).
    pub fn is_local(&self) -> bool {
        self.metadata.is_none()
    }

    /// For `serve`'s banner: where metadata and content are when they are not in the data folder.
    pub fn shared(&self) -> Option<String> {
        let url = self.metadata.as_ref()?;
        let content = match &self.s3 {
            Some(s3) => format!(
                "s3://{}/{}{}",
                s3.bucket,
                s3.prefix,
                s3.endpoint.as_ref().map_or(String::new(), |e| format!(" at {e}"))
            ),
            None => format!("{}", self.data_dir.join("packs").display()),
        };
        Some(format!("metadata in {}, content in {content}", redact_url(url)))
    }

    /// Where the metadata is, for messages: the data folder, or the database (without password).
    pub fn describe(&self) -> String {
        match &self.metadata {
            None => self.data_dir.display().to_string(),
            Some(url) => redact_url(url),
        }
    }
}

/// `s3://BUCKET[/PREFIX]` → (bucket, prefix without slashes at its ends).
pub fn parse_store_url(s: &str) -> Result<(String, String), String> {
    let bad = || format!("`{s}` is not an object store: expected s3://BUCKET or s3://BUCKET/PREFIX");
    let rest = s.strip_prefix("s3://").ok_or_else(bad)?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let valid = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.';
    if bucket.len() < 3 || bucket.len() > 63 || !bucket.chars().all(valid) {
        return Err(format!(
            "{}: a bucket name is 3 to 63 lowercase letters, digits, dots and hyphens",
            bad()
        ));
    }
    let prefix = prefix.trim_matches('/');
    if prefix.split('/').any(|c| c == ".." || c == ".") || prefix.contains("//") {
        return Err(format!("{}: the prefix has an empty, `.` or `..` part", bad()));
    }
    Ok((bucket.to_string(), prefix.to_string()))
}

/// A URL as it may be shown: a password in it (`scheme://user:PASSWORD@host`) replaced by `***`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_string() };
    let (auth, host) = match rest.rsplit_once('@') {
        Some((a, h)) if !a.contains('/') => (a, h),
        _ => return url.to_string(),
    };
    match auth.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_string(),
    }
}

/// Opens the metadata and the content store (converting a plain-mirror data folder first).
pub fn open_data(storage: &Storage) -> Result<(Arc<Metadata>, Arc<dyn ChunkStore>), ServerError> {
    let data_dir = &storage.data_dir;
    let dd = |err| ServerError::DataDir { path: data_dir.to_path_buf(), err };
    if let Some(url) = &storage.metadata {
        let meta: Arc<Metadata> = Arc::new(store::postgres::PgMeta::open(url)?);
        let chunks: Arc<dyn ChunkStore> = match &storage.s3 {
            Some(s3) => Arc::new(store::s3::S3Chunks::open(s3).map_err(ServerError::Store)?),
            None => Arc::new(store::local::LocalChunks::open(&data_dir.join("packs")).map_err(dd)?),
        };
        return Ok((meta, chunks));
    }
    let meta = open_sqlite(data_dir)?;
    let chunks: Arc<dyn ChunkStore> =
        Arc::new(store::local::LocalChunks::open(&data_dir.join("packs")).map_err(dd)?);
    migrate::run(data_dir, &meta, &chunks)?;
    Ok((Arc::new(meta), chunks))
}

/// The metadata alone (for the account commands; `serve` uses [`open_data`]).
pub fn open_metadata(storage: &Storage) -> Result<Arc<Metadata>, ServerError> {
    match &storage.metadata {
        Some(url) => Ok(Arc::new(store::postgres::PgMeta::open(url)?)),
        None => Ok(Arc::new(open_sqlite(&storage.data_dir)?)),
    }
}

fn open_sqlite(data_dir: &Path) -> Result<store::sqlite::SqliteMeta, ServerError> {
    // Everyone's files, and the server's key: the owner's only.
    crate::fsutil::private_dir(data_dir)
        .map_err(|err| ServerError::DataDir { path: data_dir.to_path_buf(), err })?;
    let db = data_dir.join("deltasync.db");
    let meta = store::sqlite::SqliteMeta::open(&db)?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o600))
            .map_err(|err| ServerError::DataDir { path: db.clone(), err })?;
    }
    Ok(meta)
}

/// A new random 256-bit token, hex-encoded.
pub fn new_token() -> String {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).expect("the OS random number generator failed");
    hex::encode(b)
}

/// Creates an account with its first device and returns that device's token (shown once; only
/// its hash is stored).
pub fn add_account(meta: &Metadata, name: &str, device: &str) -> Result<(Account, String), meta::MetaError> {
    let token = new_token();
    let acct = meta.add_account(name, device, &token)?;
    Ok((acct, token))
}

/// The server's TLS identity: the certificate from `--tls-cert`, or the data folder's own (made
/// on first use).
pub fn identity(config: &ServerConfig) -> Result<transport::ServerIdentity, ServerError> {
    Ok(match &config.tls_files {
        Some((cert, key)) => transport::identity_from_files(cert, key)?,
        None => transport::own_identity(&config.storage.data_dir)?,
    })
}

/// Writes the fingerprint the server serves with to `DATA/tls/fingerprint`, for `account add` to
/// print beside a new token.
pub fn record_fingerprint(data_dir: &Path, fp: &transport::Fingerprint) -> std::io::Result<()> {
    let dir = transport::tls_dir(data_dir);
    crate::fsutil::private_dir(&dir)?;
    crate::fsutil::write_private(&dir.join("fingerprint"), format!("{fp}\n").as_bytes())
}

/// The fingerprint to give to a new device: the one the server last served with, or else the
/// data folder's own (made now if missing, so the server will serve it).
pub fn serving_fingerprint(data_dir: &Path) -> Result<transport::Fingerprint, ServerError> {
    let recorded = std::fs::read_to_string(transport::tls_dir(data_dir).join("fingerprint")).ok();
    if let Some(fp) = recorded.and_then(|t| t.trim().parse().ok()) {
        return Ok(fp);
    }
    Ok(transport::own_identity(data_dir)?.fingerprint)
}

/// The origin of a notice of a commit made by another server process: no session of this one.
const ELSEWHERE: u64 = u64::MAX;

/// Serves until `shutdown` completes, then stops accepting, tells sessions to finish, and waits
/// for them.
pub async fn run(
    listener: TcpListener,
    config: ServerConfig,
    shutdown: impl Future,
) -> Result<(), ServerError> {
    let shared = Arc::new(Shared::open(&config)?);
    // Commits made by other server processes on the same database reach this one's devices.
    let weak = Arc::downgrade(&shared);
    shared.meta.on_commits_elsewhere(Arc::new(move |space, seq| {
        if let Some(shared) = weak.upgrade() {
            shared.notify(space, seq, ELSEWHERE);
        }
    }));
    let acceptor = identity(&config)?.acceptor;
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tracker.spawn(prune_in_background(shared.clone(), cancel.clone()));
    tracker.spawn(cut_off_revoked(shared.clone(), cancel.clone()));
    tracker.spawn(trim_when_quiet(shared.clone(), cancel.clone()));
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            p = limit.clone().acquire_owned() => p.expect("semaphore never closed"),
        };
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let shared = shared.clone();
        let cancel = cancel.clone();
        let acceptor = acceptor.clone();
        tracker.spawn(async move {
            handshake::connection(stream, peer, acceptor, shared, cancel).await;
            drop(permit);
        });
    }
    cancel.cancel();
    tracker.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait()).await.is_err() {
        // Their uploads were not committed; the clients retry them.
        tracing::warn!(
            "{} sessions did not finish within {} s of the stop; closing them",
            tracker.len(),
            SHUTDOWN_GRACE.as_secs()
        );
    }
    Ok(())
}

/// Between background prunes.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);
/// A pack nothing refers to is deleted only once it is this old: an upload may be about to
/// commit the chunks in it (or resume into it).
pub const PRUNE_GRACE: Duration = Duration::from_secs(86_400);

/// Applies the retention policy every [`PRUNE_EVERY`] (the first time a minute after the start).
async fn prune_in_background(shared: Arc<Shared>, cancel: CancellationToken) {
    let mut wait = Duration::from_secs(60);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        wait = PRUNE_EVERY;
        let sh = shared.clone();
        let r = tokio::task::spawn_blocking(move || {
            history::prune_store(sh.meta.as_ref(), sh.chunks.as_ref(), &sh.keep, PRUNE_GRACE)
        })
        .await;
        match r {
            Ok(Ok(s)) if s.versions + s.packs > 0 => tracing::info!(
                "prune: forgot {} versions, deleted {} packs ({})",
                s.versions,
                s.packs,
                human_size(s.bytes)
            ),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!("background prune failed: {e}; it runs again in an hour"),
            Err(e) => tracing::warn!("background prune stopped: {e}; it runs again in an hour"),
        }
    }
}

/// `1.2 GiB`-style sizes for messages.
pub fn human_size(n: u64) -> String {
    const UNITS: [&str; 5] = ["bytes", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{n} bytes") } else { format!("{:.1} {}", v, UNITS[u]).replace(".0 ", " ") }
}

/// Parses a quota size: a number with an optional binary unit (`500M`, `10G`, `1.5T`, `10GiB`,
/// `4096`), or `none` (no quota).
pub fn parse_size(s: &str) -> Result<Option<u64>, String> {
    let t = s.trim();
    if t.eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    let lower = t.to_ascii_lowercase();
    let body = lower.strip_suffix("ib").or_else(|| lower.strip_suffix('b')).unwrap_or(&lower);
    let (num, shift) = match body.chars().last() {
        Some('k') => (&body[..body.len() - 1], 10),
        Some('m') => (&body[..body.len() - 1], 20),
        Some('g') => (&body[..body.len() - 1], 30),
        Some('t') => (&body[..body.len() - 1], 40),
        Some('p') => (&body[..body.len() - 1], 50),
        _ => (body, 0),
    };
    let bad = || format!("`{s}` is not a size; write it like 500M, 10G, 1.5T or `none`");
    let v: f64 = num.trim().parse().map_err(|_| bad())?;
    if !v.is_finite() || v < 0.0 {
        return Err(bad());
    }
    let bytes = v * (1u64 << shift) as f64;
    if bytes >= u64::MAX as f64 {
        return Err(format!("`{s}` is too large"));
    }
    Ok(Some(bytes as u64))
}

/// The refusal for a full disk on the server, if `e` (an error's text: I/O or SQLite) says so.
pub fn disk_full(e: &str) -> Option<protocol::Refusal> {
    crate::fsutil::says_disk_full(e).then(|| {
        tracing::warn!("data folder out of disk space: {e}; uploads are refused until space is freed");
        protocol::Refusal::new(
            protocol::RefusalKind::Server,
            format!(
                "server out of disk space: {e}; nothing was changed on the server. Its administrator must free space in its data folder; then push again"
            ),
        )
    })
}

/// Binds `addr` and serves in a background task; for tests and embedding.
pub async fn spawn(
    addr: &str,
    config: ServerConfig,
) -> std::io::Result<(SocketAddr, CancellationToken, tokio::task::JoinHandle<Result<(), ServerError>>)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let stop = CancellationToken::new();
    let s = stop.clone();
    let h = tokio::spawn(async move { run(listener, config, s.cancelled_owned()).await });
    Ok((local, stop, h))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_in_a_url_is_never_shown() {
        assert_eq!(redact_url("postgres://ds:s3cret@db:5432/ds"), "postgres://ds:***@db:5432/ds");
        assert_eq!(redact_url("postgres://ds@db/ds"), "postgres://ds@db/ds");
        assert_eq!(redact_url("postgres://db/ds"), "postgres://db/ds");
        assert_eq!(redact_url("postgres://u:p@ss:w@rd@db/ds"), "postgres://u:***@db/ds");
        let st = Storage { metadata: Some("postgres://u:hunter2@h/d".into()), ..Storage::default() };
        assert!(!st.describe().contains("hunter2") && !st.shared().unwrap_or_default().contains("hunter2"));
    }

    #[test]
    fn store_urls_are_checked() {
        assert_eq!(parse_store_url("s3://packs"), Ok(("packs".into(), String::new())));
        assert_eq!(parse_store_url("s3://my-bucket/a/b/"), Ok(("my-bucket".into(), "a/b".into())));
        for bad in [
            "packs",
            "http://x/y",
            "s3://",
            "s3://ab",
            "s3://Upper",
            "s3://b_b",
            "s3://okay/a//b",
            "s3://okay/../x",
        ] {
            let e = parse_store_url(bad).expect_err(bad);
            assert!(e.contains("s3://BUCKET"), "{bad}: {e}");
        }
    }
}
