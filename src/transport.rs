//! TLS 1.3 for every connection (rustls, ring): the server's identity (its own self-signed
//! certificate, or one from a CA), the acceptor, and the client's connector, which pins the
//! server's certificate by its fingerprint the way ssh pins a host key.
//!
//! Both ends hand the session a [`ClientStream`] / [`ServerStream`] (TLS over a rate-limited
//! (`--bwlimit`; a no-op without one), byte-counting TCP stream); what runs on it
//! (`protocol::split`) works on any `AsyncRead + AsyncWrite`.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;

use crate::protocol::{Counted, Limited, ReadAhead, Shaper};

/// Offered and required in the handshake: a TLS server that does not speak deltasync (an
/// HTTPS server, say) is found out before the client sends its token.
pub const ALPN: &[u8] = b"deltasync";

/// What TLS runs on: the TCP socket, counted (`--stats`), limited (`--bwlimit`), read ahead.
pub type Socket = ReadAhead<Limited<Counted<TcpStream>>>;

/// `tcp` as TLS gets it, counting into `counters` and within `limit`.
pub fn socket(tcp: TcpStream, counters: Arc<crate::protocol::Counters>, limit: &Shaper) -> Socket {
    ReadAhead::new(Limited::new(Counted::new(tcp, counters), limit))
}

/// The connection the session runs on.
pub type ClientStream = tokio_rustls::client::TlsStream<Socket>;
pub type ServerStream = tokio_rustls::server::TlsStream<Socket>;

/// ring's default suites (AES-256-GCM first). Putting AES-128-GCM first was measured: no
/// difference in CPU per GiB on either side here (AES instructions make both cheap; what TLS
/// costs is mostly the copies).
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

// ---------------------------------------------------------------------------------------------
// Fingerprints

/// SHA-256 of a certificate (DER). Shown as 52 base32 characters in groups of four
/// (`ABCD-EFGH-…`): shorter to compare and type than 64 hex digits, and free of 0/O, 1/I
/// confusion. Parsing also takes the 64 hex digits `openssl x509 -fingerprint -sha256` prints.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Fingerprint(pub [u8; 32]);

const BASE32: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";

impl Fingerprint {
    pub fn of(cert_der: &[u8]) -> Fingerprint {
        Fingerprint(Sha256::digest(cert_der).into())
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut chars = Vec::with_capacity(52);
        let (mut acc, mut bits) = (0u32, 0);
        for &b in &self.0 {
            acc = (acc << 8) | u32::from(b);
            bits += 8;
            while bits >= 5 {
                bits -= 5;
                chars.push(BASE32[((acc >> bits) & 31) as usize]);
            }
        }
        if bits > 0 {
            chars.push(BASE32[((acc << (5 - bits)) & 31) as usize]);
        }
        for (i, group) in chars.chunks(4).enumerate() {
            if i > 0 {
                f.write_str("-")?;
            }
            f.write_str(std::str::from_utf8(group).map_err(|_| fmt::Error)?)?;
        }
        Ok(())
    }
}

impl FromStr for Fingerprint {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "`{s}` is not a server fingerprint: give the 52 letters and digits of the `fingerprint:` line `deltasync serve` prints (dashes optional)"
            )
        };
        let clean: Vec<u8> =
            s.bytes().filter(|b| !matches!(b, b'-' | b':' | b' ')).map(|b| b.to_ascii_uppercase()).collect();
        let mut out = [0u8; 32];
        match clean.len() {
            52 => {
                let (mut acc, mut bits, mut n) = (0u32, 0, 0);
                for c in &clean {
                    let v = BASE32.iter().position(|x| x == c).ok_or_else(bad)? as u32;
                    acc = (acc << 5) | v;
                    bits += 5;
                    if bits >= 8 {
                        bits -= 8;
                        if n < 32 {
                            out[n] = (acc >> bits) as u8;
                        }
                        n += 1;
                    }
                    acc &= (1 << bits) - 1;
                }
                // 52 × 5 = 260 bits: the last 4 must be zero padding.
                if n != 32 || acc != 0 {
                    return Err(bad());
                }
            }
            64 => hex::decode_to_slice(&clean, &mut out).map_err(|_| bad())?,
            _ => return Err(bad()),
        }
        Ok(Fingerprint(out))
    }
}

// ---------------------------------------------------------------------------------------------
// Server

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot use {path}: {err}")]
    Io { path: PathBuf, err: io::Error },
    #[error("{path} holds no {what} in PEM form ({err}); give a PEM file")]
    Pem { path: PathBuf, what: &'static str, err: String },
    #[error("cannot make the server's certificate: {0}")]
    Generate(String),
    #[error("the certificate and key do not make a TLS server: {0}")]
    Config(String),
}

/// The server's side: what it accepts with and the fingerprint clients pin.
pub struct ServerIdentity {
    pub acceptor: tokio_rustls::TlsAcceptor,
    pub fingerprint: Fingerprint,
    /// True for a certificate from `--tls-cert` (clients check it against their CA roots).
    pub from_ca: bool,
}

/// Where a data folder keeps the server's own certificate and key.
pub fn tls_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("tls")
}

/// The data folder's own identity, made on first use: a P-256 key and a self-signed certificate
/// in `DATA/tls/` (the key readable by its owner only). Keeping them is what keeps the
/// fingerprint clients pinned.
pub fn own_identity(data_dir: &Path) -> Result<ServerIdentity, TlsError> {
    let dir = tls_dir(data_dir);
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    // Made under a lock: `serve` and `account add` starting together on a new data folder
    // each made a key and a certificate, and could leave one's key beside the other's
    // certificate. The second one waits, then finds the pair made.
    let _lock;
    if !cert_path.exists() || !key_path.exists() {
        let io = |err| TlsError::Io { path: dir.clone(), err };
        crate::fsutil::private_dir(&dir).map_err(io)?;
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("lock"))
            .map_err(io)?;
        lock.lock().map_err(io)?;
        _lock = lock;
    }
    if !cert_path.exists() || !key_path.exists() {
        let mut names = vec!["localhost".to_string()];
        let host = gethostname::gethostname().to_string_lossy().into_owned();
        let dns_like = host.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
        if !host.is_empty() && host != "localhost" && dns_like {
            names.push(host);
        }
        let made =
            rcgen::generate_simple_self_signed(names).map_err(|e| TlsError::Generate(e.to_string()))?;
        // The key first: a certificate without its key would be a fingerprint nobody can serve.
        crate::fsutil::write_private(&key_path, made.signing_key.serialize_pem().as_bytes())
            .map_err(|err| TlsError::Io { path: key_path.clone(), err })?;
        crate::fsutil::write_private(&cert_path, made.cert.pem().as_bytes())
            .map_err(|err| TlsError::Io { path: cert_path.clone(), err })?;
    }
    let mut id = identity_from_files(&cert_path, &key_path)?;
    id.from_ca = false;
    Ok(id)
}

/// A certificate (chain) and key from files (`serve --tls-cert --tls-key`), e.g. from a CA.
pub fn identity_from_files(cert: &Path, key: &Path) -> Result<ServerIdentity, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| pem_error(cert, "certificate", e))?;
    let Some(leaf) = chain.first() else {
        return Err(TlsError::Pem {
            path: cert.into(),
            what: "certificate",
            err: "the file is empty".into(),
        });
    };
    let fingerprint = Fingerprint::of(leaf);
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| pem_error(key, "private key", e))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    // Clients do not resume sessions (each run is a new process), so tickets would be ~500
    // bytes of every connection's handshake for nothing.
    config.send_tls13_tickets = 0;
    Ok(ServerIdentity {
        acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        fingerprint,
        from_ca: true,
    })
}

fn pem_error(path: &Path, what: &'static str, e: rustls::pki_types::pem::Error) -> TlsError {
    match e {
        rustls::pki_types::pem::Error::Io(err) => TlsError::Io { path: path.into(), err },
        other => TlsError::Pem { path: path.into(), what, err: format!("{other:?}") },
    }
}

// ---------------------------------------------------------------------------------------------
// Client

/// What a client knows of the server it connects to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Trust {
    /// Nothing yet: a certificate valid for the name under the system's CA roots is trusted as
    /// such; any other is trusted on first use and pinned.
    New,
    /// `--fingerprint`, or the one pinned at first use: nothing else is accepted.
    Pinned(Fingerprint),
    /// The server's certificate was valid under the system's CA roots: it must stay so.
    Ca,
}

impl Trust {
    /// As kept in the folder's state (`fingerprint` setting).
    pub fn to_setting(&self) -> Option<String> {
        match self {
            Trust::New => None,
            Trust::Pinned(f) => Some(f.to_string()),
            Trust::Ca => Some("ca".into()),
        }
    }
    pub fn from_setting(s: Option<&str>) -> Trust {
        match s {
            None => Trust::New,
            Some("ca") => Trust::Ca,
            Some(f) => f.parse().map(Trust::Pinned).unwrap_or(Trust::New),
        }
    }
}

/// What the handshake found (read after it).
#[derive(Clone, Debug, Default)]
pub struct Seen {
    pub fingerprint: Option<Fingerprint>,
    /// Valid under the system's CA roots for the name connected to.
    pub ca_valid: bool,
    /// The certificate did not match what was trusted.
    pub mismatch: bool,
}

impl Seen {
    /// What to remember after the server accepted us.
    pub fn trust(&self, before: &Trust) -> Trust {
        match (before, self.fingerprint) {
            (Trust::Pinned(_), Some(f)) => Trust::Pinned(f),
            (_, _) if self.ca_valid => Trust::Ca,
            (_, Some(f)) => Trust::Pinned(f),
            (t, None) => t.clone(),
        }
    }
}

#[derive(Debug)]
struct Verifier {
    trust: Trust,
    /// The system's roots, loaded only when a CA may decide (not for a pinned server).
    webpki: Option<Arc<rustls::client::WebPkiServerVerifier>>,
    algorithms: WebPkiSupportedAlgorithms,
    seen: Arc<Mutex<Seen>>,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let fp = Fingerprint::of(end_entity);
        let ca_valid = self.webpki.as_ref().is_some_and(|w| {
            w.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now).is_ok()
        });
        let ok = match &self.trust {
            Trust::Pinned(pin) => *pin == fp,
            Trust::Ca => ca_valid,
            Trust::New => true,
        };
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        *seen = Seen { fingerprint: Some(fp), ca_valid, mismatch: !ok };
        if ok {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General("the server's certificate is not the one this client trusts".into()))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The system's CA roots (honouring `SSL_CERT_FILE` / `SSL_CERT_DIR`); `None` if it has none.
fn system_verifier(provider: &Arc<CryptoProvider>) -> Option<Arc<rustls::client::WebPkiServerVerifier>> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = rustls::RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        return None;
    }
    rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .ok()
}

/// The client's TLS configuration: TLS 1.3, ALPN `deltasync`, and a verifier that enforces
/// `trust` and records what it saw in the returned [`Seen`] (read it after the handshake).
pub fn client_config(trust: &Trust) -> Result<(Arc<rustls::ClientConfig>, Arc<Mutex<Seen>>), rustls::Error> {
    let provider = provider();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let webpki = match trust {
        Trust::Pinned(_) => None,
        Trust::New | Trust::Ca => system_verifier(&provider),
    };
    let verifier = Verifier {
        trust: trust.clone(),
        webpki,
        algorithms: provider.signature_verification_algorithms,
        seen: seen.clone(),
    };
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok((Arc::new(config), seen))
}

/// Why a connection did not get as far as the deltasync handshake.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{0}")]
    Unreachable(String),
    #[error("{0}")]
    NotDeltasync(String),
    /// The certificate is not the trusted one (the token was not sent).
    #[error("identity changed")]
    Identity { seen: Option<Fingerprint>, trusted: Trust },
}

/// Connects over TCP and TLS within `timeout` (both together), checking the server against
/// `trust`; the connection's bytes then flow within `limit` (`--bwlimit`).
pub async fn connect(
    addr: &str,
    trust: &Trust,
    timeout: Duration,
    counters: Arc<crate::protocol::Counters>,
    limit: &Shaper,
) -> Result<(ClientStream, Seen), ConnectError> {
    let deadline = Instant::now() + timeout;
    let left = || deadline.saturating_duration_since(Instant::now());
    let tcp = match tokio::time::timeout(left(), TcpStream::connect(addr)).await {
        Err(_) => return Err(ConnectError::Unreachable(format!("no answer within {}", secs(timeout)))),
        Ok(Err(e)) => return Err(ConnectError::Unreachable(e.to_string())),
        Ok(Ok(s)) => s,
    };
    let _ = tcp.set_nodelay(true);
    let (config, seen) = client_config(trust).map_err(|e| ConnectError::Unreachable(e.to_string()))?;
    let host = host_of(addr);
    let name = ServerName::try_from(host.to_string())
        .unwrap_or_else(|_| ServerName::try_from("deltasync.invalid").expect("a valid DNS name"));
    let connector = tokio_rustls::TlsConnector::from(config);
    let stream = socket(tcp, counters, limit);
    let not_ours = |what: String| {
        ConnectError::NotDeltasync(format!(
            "{addr} is not a deltasync server ({what}); check the address and port (set it with --server or DELTASYNC_SERVER)"
        ))
    };
    let tls = match tokio::time::timeout(left(), connector.connect(name, stream)).await {
        Err(_) => {
            return Err(not_ours(format!(
                "it did not complete a TLS handshake within {}; on a very slow link raise --timeout",
                secs(timeout)
            )));
        }
        Ok(Err(e)) => {
            let seen = seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
            if seen.mismatch {
                return Err(ConnectError::Identity { seen: seen.fingerprint, trusted: trust.clone() });
            }
            return Err(match e.kind() {
                io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset => not_ours(format!(
                    "it closed the connection during the TLS handshake: another service, or a deltasync release from before TLS ({e})"
                )),
                _ => not_ours(format!("it does not speak TLS as deltasync does: {e}")),
            });
        }
        Ok(Ok(s)) => s,
    };
    if tls.get_ref().1.alpn_protocol() != Some(ALPN) {
        return Err(not_ours("a TLS server that does not offer the deltasync protocol".into()));
    }
    let seen = seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
    Ok((tls, seen))
}

/// `HOST` of `HOST:PORT` or `[V6]:PORT`.
fn host_of(addr: &str) -> &str {
    if let Some(rest) = addr.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    addr.rsplit_once(':').map_or(addr, |(h, _)| h)
}

/// `10 s`, `1.5 s`.
pub fn secs(d: Duration) -> String {
    format!("{} s", d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `serve` and `account add` starting together on a new data folder: every one of them gets
    /// the one identity made, never a key of one beside a certificate of another.
    #[test]
    fn identities_made_at_once_are_one() {
        for _ in 0..5 {
            let d = tempfile::tempdir().unwrap();
            let prints: Vec<Result<Fingerprint, String>> = std::thread::scope(|s| {
                let hs: Vec<_> = (0..6)
                    .map(|_| {
                        s.spawn(|| own_identity(d.path()).map(|i| i.fingerprint).map_err(|e| e.to_string()))
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let first = prints[0].clone().unwrap();
            for p in &prints {
                assert_eq!(p.as_ref(), Ok(&first), "{prints:?}");
            }
            assert_eq!(own_identity(d.path()).unwrap().fingerprint, first);
        }
    }

    #[test]
    fn fingerprints_read_back_in_both_forms() {
        let f = Fingerprint::of(b"a certificate");
        let shown = f.to_string();
        assert_eq!(shown.len(), 52 + 12);
        assert_eq!(shown.parse::<Fingerprint>().unwrap(), f);
        assert_eq!(shown.to_lowercase().replace('-', "").parse::<Fingerprint>().unwrap(), f);
        let openssl = f.0.iter().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(":");
        assert_eq!(openssl.parse::<Fingerprint>().unwrap(), f);
        let mut wrong = shown.clone().into_bytes();
        wrong[0] = if wrong[0] == b'A' { b'B' } else { b'A' };
        assert_ne!(String::from_utf8(wrong).unwrap().parse::<Fingerprint>().unwrap(), f);
        assert!("ABCD".parse::<Fingerprint>().is_err());
        assert!(shown.replace('A', "1").parse::<Fingerprint>().is_err() || !shown.contains('A'));
    }

    #[test]
    fn hosts() {
        assert_eq!(host_of("127.0.0.1:7700"), "127.0.0.1");
        assert_eq!(host_of("[::1]:7700"), "::1");
        assert_eq!(host_of("example.org:1"), "example.org");
    }
}
