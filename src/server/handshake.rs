//! A connection's first seconds: the TLS handshake, the peer's `Hello`, and who it is (a
//! device's token, or a new account by open registration), with the per-address limits on
//! guessing and registering. What follows is [`session`](super::session)'s.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::meta::{Account, Device, MetaError};
use super::session::{self, SessionError};
use super::{Registered, Shared};
use crate::protocol::*;

/// A peer has this long for the TLS handshake and its `Hello` together; then it is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Who a connection authenticated as.
pub struct Authed {
    /// The account's name, and as its id the *space* of the folder the `Hello` named (the
    /// account's own id for `default`): every per-path call of the session goes to that folder.
    pub account: Account,
    /// The folder's name.
    pub folder: String,
    /// The credential it used (revoking it ends the session).
    pub credential: Device,
    /// The device label the client gave: what the journal records and conflict copies name.
    pub label: String,
    /// Cancelled when the credential is revoked.
    pub kill: CancellationToken,
    /// The session's place in the registry of connected devices, while it lives.
    pub registered: Registered,
    /// What the session moved, for the line logged when it ends.
    pub tally: Arc<Tally>,
}

/// Files a session moved, counted where an upload commits and where a download's last block
/// goes out; the bytes on the wire are the connection's [`Counters`].
#[derive(Debug, Default)]
pub struct Tally {
    files_up: AtomicU64,
    files_down: AtomicU64,
}

impl Tally {
    /// `n` uploads committed.
    pub fn uploaded(&self, n: u64) {
        self.files_up.fetch_add(n, Ordering::Relaxed);
    }
    /// A file (or the rest of one, or an old version) sent.
    pub fn downloaded(&self) {
        self.files_down.fetch_add(1, Ordering::Relaxed);
    }
}

/// Serves one accepted TCP connection from start to end: TLS, then the `Hello`, then the
/// session. Every error ends here, logged.
pub async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    acceptor: tokio_rustls::TlsAcceptor,
    shared: Arc<Shared>,
    cancel: CancellationToken,
) {
    let started = std::time::Instant::now();
    let _ = stream.set_nodelay(true);
    let counters = Arc::new(Counters::default());
    let deadline = tokio::time::Instant::now() + HANDSHAKE_TIMEOUT;
    let tls = tokio::select! {
        _ = cancel.cancelled() => return,
        r = tokio::time::timeout_at(deadline, acceptor.accept(crate::transport::socket(stream, counters.clone(), &crate::protocol::Shaper::new(shared.bwlimit)))) => r,
    };
    let tls = match tls {
        Ok(Ok(tls)) => tls,
        // Port scanners and the like: not worth more than a debug line.
        Ok(Err(e)) => return tracing::debug!("{peer}: TLS handshake failed: {e}"),
        Err(_) => {
            return tracing::debug!("{peer}: no TLS handshake within {} s", HANDSHAKE_TIMEOUT.as_secs());
        }
    };
    let (mut rd, mut wr) = split(tls, counters.clone());
    wr.set_write_stall(shared.io_timeout);
    let authed = match hello(&mut rd, &mut wr, peer, deadline, &shared).await {
        Ok(Some(authed)) => authed,
        Ok(None) => return,
        Err(e) => return tracing::info!("{peer}: {e}"),
    };
    let (account, device, label, folder) = (
        authed.account.name.clone(),
        authed.credential.name.clone(),
        authed.label.clone(),
        authed.folder.clone(),
    );
    let (kill, tally) = (authed.kill.clone(), authed.tally.clone());
    // Every event of the session (its warnings) names the account, the device and the address.
    let span =
        tracing::info_span!("session", account = %account, folder = %folder, device = %device, peer = %peer);
    let r = session::serve(rd, wr, peer, authed, shared, cancel.clone()).instrument(span).await;
    let (reason, error) = match &r {
        _ if kill.is_cancelled() => ("revoked", None),
        Ok(()) if cancel.is_cancelled() => ("shutdown", None),
        Ok(()) => ("client closed", None),
        Err(e) => ("error", Some(e.to_string())),
    };
    // The one line per session: who, from where, what moved each way, how long, why it ended.
    tracing::info!(
        account = %account,
        folder = %folder,
        device = %device,
        label = %label,
        peer = %peer,
        files_up = tally.files_up.load(Ordering::Relaxed),
        files_down = tally.files_down.load(Ordering::Relaxed),
        bytes_received = counters.received(),
        bytes_sent = counters.sent(),
        duration_ms = started.elapsed().as_millis() as u64,
        reason,
        error = error.as_deref(),
        "session ended"
    );
}

/// What the blocking lookup found.
struct Found {
    account: Account,
    device: Device,
    new_token: Option<String>,
    seq: u64,
}

/// Reads the peer's `Hello` (by `deadline`), checks it and authenticates it; answers
/// `Welcome::Accepted` and returns who it is, or answers `Rejected` and returns why not.
/// `Ok(None)`: the peer left before saying anything.
async fn hello(
    rd: &mut FrameReader,
    wr: &mut FrameWriter,
    peer: SocketAddr,
    deadline: tokio::time::Instant,
    shared: &Arc<Shared>,
) -> Result<Option<Authed>, SessionError> {
    let hello: Hello = match tokio::time::timeout_at(deadline, rd.recv()).await {
        Err(_) => return Err(SessionError::Handshake("timed out".into())),
        Ok(Ok(Some(h))) => h,
        Ok(Ok(None)) => return Ok(None),
        Ok(Err(e)) => {
            let _ = wr
                .send(&Welcome::Rejected {
                    reason: Rejection::BadMagic,
                    message: "not a deltasync client".into(),
                    server_version: PROTOCOL_VERSION,
                })
                .await;
            return Err(e.into());
        }
    };
    let reject =
        |reason, message: String| Welcome::Rejected { reason, message, server_version: PROTOCOL_VERSION };
    if hello.magic != MAGIC {
        wr.send(&reject(Rejection::BadMagic, "not a deltasync client".into())).await?;
        return Err(SessionError::Handshake("bad magic".into()));
    }
    if hello.version != PROTOCOL_VERSION {
        let msg = format!(
            "protocol version mismatch: client speaks {}, server speaks {PROTOCOL_VERSION}; install the same deltasync version on both",
            hello.version
        );
        wr.send(&reject(Rejection::Version, msg.clone())).await?;
        return Err(SessionError::Handshake(msg));
    }
    // The label the journal records: printed by `log` and `status`, so no control characters
    // (a terminal escape in a device name would be an escape in someone's terminal).
    let device = hello.device.chars().filter(|c| !c.is_control()).take(64).collect::<String>();
    if let Err(msg) = check_folder(&hello.folder) {
        wr.send(&reject(Rejection::Folder, msg.clone())).await?;
        return Err(SessionError::Handshake(msg));
    }
    let folder = hello.folder.clone();
    let ip = peer.ip();
    // An address that keeps failing waits longer and longer before each answer, right or
    // wrong: guessing gets slow, and a fail2ban-style tool has the log lines below to act on.
    let delay = shared.limits.auth_delay(ip);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    if hello.token.is_none()
        && shared.open_registration
        && let Err(wait) = shared.limits.may_register(ip)
    {
        tracing::warn!("{peer}: open registration refused: too many new accounts from this address");
        let msg = format!(
            "authentication failed: this server makes only a few accounts per address; try again in {} min, or ask its administrator for a token",
            wait.as_secs().div_ceil(60)
        );
        wr.send(&reject(Rejection::Auth, msg)).await?;
        return Err(SessionError::Handshake("open registration refused".into()));
    }
    let sh = shared.clone();
    let token = hello.token.clone();
    let dev = device.clone();
    let addr = peer.to_string();
    let fold = folder.clone();
    let auth = tokio::task::spawn_blocking(move || -> Result<Option<Found>, MetaError> {
        let found = match token {
            Some(t) => sh.meta.authenticate(&t)?.map(|(a, d)| (a, d, None)),
            None if sh.open_registration => {
                let mut suffix = [0u8; 3];
                let _ = getrandom::fill(&mut suffix);
                // The account is named after the device (room left for the suffix).
                let label = crate::server::auth::sanitize_name(&dev);
                let short: String = label.chars().take(crate::server::auth::MAX_NAME - 7).collect();
                let name = format!("{short}-{}", hex::encode(suffix));
                let (a, t) = crate::server::add_account(sh.meta.as_ref(), &name, &label)?;
                match sh.meta.authenticate(&t)? {
                    Some((a, d)) => Some((a, d, Some(t))),
                    None => return Err(MetaError::CorruptRow(format!("the new account {}", a.name))),
                }
            }
            None => None,
        };
        let Some((mut account, dev, new_token)) = found else { return Ok(None) };
        // From here on the session works on the folder's space (made on its first use).
        let Some(space) = sh.meta.space(account.id, &fold)? else { return Ok(None) };
        account.id = space;
        sh.meta.device_seen(dev.id, &addr, crate::when::now_secs())?;
        let seq = sh.meta.seq(account.id)?;
        Ok(Some(Found { account, device: dev, new_token, seq }))
    })
    .await
    .map_err(|e| SessionError::Internal(e.to_string()))?;
    let auth = match auth {
        Ok(found) => found,
        Err(e) => {
            // Said to the client (who may not be who it claims) without the details; logged whole.
            tracing::warn!("cannot authenticate {peer}: {e}");
            let msg = "the server cannot check your token now: its metadata database cannot be reached or failed (the server's log says why); try again later";
            wr.send(&reject(Rejection::Unavailable, msg.into())).await?;
            return Err(SessionError::Handshake(format!("authentication could not be checked: {e}")));
        }
    };
    let Some(Found { account, device: credential, new_token, seq }) = auth else {
        let failures = shared.limits.auth_failed(ip);
        let msg = if hello.token.is_none() {
            "authentication failed: no token given and this server does not have open registration; create an account with `deltasync account add NAME` on the server"
        } else {
            "authentication failed: unknown or revoked token; check --token-file / DELTASYNC_TOKEN / --token, or ask for a new one (`deltasync account token NAME --device DEVICE` on the server)"
        };
        // One line per failure, with the address first, for fail2ban-style tools.
        tracing::warn!(
            "authentication failed from {peer}: {} ({failures} failures from this address recently; its next attempt waits {} ms)",
            if hello.token.is_none() { "no token" } else { "unknown or revoked token" },
            shared.limits.auth_delay(ip).as_millis()
        );
        wr.send(&reject(Rejection::Auth, msg.into())).await?;
        return Err(SessionError::Handshake("authentication failed".into()));
    };
    shared.limits.auth_ok(ip);
    // Registered before the welcome, so a revocation from here on reaches this session.
    let (kill, registered) = shared.register_device(credential.id);
    wr.send(&Welcome::Accepted {
        account: account.name.clone(),
        new_token,
        server_id: shared.server_id,
        seq,
        folder: folder.clone(),
    })
    .await?;
    Ok(Some(Authed { account, folder, credential, label: device, kill, registered, tally: Arc::default() }))
}
