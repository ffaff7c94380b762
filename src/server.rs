//! `deltasync serve`: a TCP server that keeps each account's folder.
//!
//! # Layout
//! - [`meta`]: accounts, path states and the journal (SQLite). All SQL lives there.
//! - [`store`]: the per-account plain mirror, temp area and signature cache. All file I/O.
//! - [`session`]: one task per connection: handshake, then requests in order.
//!
//! Commits to one account are serialized by a per-account lock; accounts never wait on each other
//! except for the short SQLite transaction.

pub mod batch;
pub mod meta;
pub mod session;
pub mod store;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::net::TcpListener;
use tokio::sync::{Semaphore, broadcast};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use meta::{Account, AccountId, Metadata};
use store::Store;

/// Connections served at once; one more waits in the accept queue.
const MAX_CONNECTIONS: usize = 4096;

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub data_dir: PathBuf,
    pub open_registration: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot use data folder {path}: {err}")]
    DataDir { path: PathBuf, err: std::io::Error },
    #[error(transparent)]
    Meta(#[from] meta::MetaError),
    #[error("completing interrupted uploads failed: {0}")]
    Recover(String),
    #[error("accepting connections failed: {0}")]
    Accept(std::io::Error),
}

/// State shared by all sessions.
pub struct Shared {
    pub meta: Metadata,
    pub store: Store,
    pub open_registration: bool,
    locks: Mutex<HashMap<AccountId, Arc<tokio::sync::Mutex<()>>>>,
    hub: Mutex<HashMap<AccountId, broadcast::Sender<(u64, u64)>>>,
    next_session: std::sync::atomic::AtomicU64,
}

impl Shared {
    pub fn open(config: &ServerConfig) -> Result<Self, ServerError> {
        let dd = |err| ServerError::DataDir { path: config.data_dir.clone(), err };
        std::fs::create_dir_all(&config.data_dir).map_err(dd)?;
        let store = Store::open(&config.data_dir).map_err(dd)?;
        let meta = open_metadata(&config.data_dir)?;
        // Finish group commits a crash interrupted before temp files are swept away.
        let recovered = batch::recover(&meta, &store).map_err(ServerError::Recover)?;
        if recovered > 0 {
            tracing::info!("completed {recovered} uploads interrupted by a crash");
        }
        let cleaned = store.clean_temps().map_err(dd)?;
        if cleaned > 0 {
            tracing::info!("removed {cleaned} temp files left by interrupted uploads");
        }
        Ok(Shared {
            meta,
            store,
            open_registration: config.open_registration,
            locks: Mutex::default(),
            hub: Mutex::default(),
            next_session: Default::default(),
        })
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

pub fn open_metadata(data_dir: &Path) -> Result<Metadata, ServerError> {
    std::fs::create_dir_all(data_dir)
        .map_err(|err| ServerError::DataDir { path: data_dir.to_path_buf(), err })?;
    Ok(Metadata::open(&data_dir.join("deltasync.db"))?)
}

/// A new random 256-bit token, hex-encoded.
pub fn new_token() -> String {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).expect("the OS random number generator failed");
    hex::encode(b)
}

/// Creates an account and returns its token (shown once; only its hash is stored).
pub fn add_account(meta: &Metadata, name: &str) -> Result<(Account, String), meta::MetaError> {
    let token = new_token();
    let acct = meta.add_account(name, &token)?;
    Ok((acct, token))
}

/// Serves until `shutdown` completes, then stops accepting, tells sessions to finish, and waits
/// for them.
pub async fn run(
    listener: TcpListener,
    config: ServerConfig,
    shutdown: impl Future,
) -> Result<(), ServerError> {
    let shared = Arc::new(Shared::open(&config)?);
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
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
        tracker.spawn(async move {
            if let Err(e) = session::serve(stream, shared, cancel).await {
                tracing::info!("{peer}: {e}");
            }
            drop(permit);
        });
    }
    cancel.cancel();
    tracker.close();
    tracker.wait().await;
    Ok(())
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
