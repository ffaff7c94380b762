//! Over the internet: what crosses the wire is encrypted, the server's identity is pinned, a peer
//! that is not a deltasync server is named as such, and the client's and server's secrets are
//! the owner's only.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::util::*;

/// A TCP relay in front of `to` that keeps every byte it passes, each way.
struct Relay {
    addr: String,
    up: Arc<Mutex<Vec<u8>>>,
    down: Arc<Mutex<Vec<u8>>>,
}

impl Relay {
    fn start(to: String) -> Relay {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let up = Arc::new(Mutex::new(Vec::new()));
        let down = Arc::new(Mutex::new(Vec::new()));
        let (u, d) = (up.clone(), down.clone());
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(client) = c else { return };
                let Ok(server) = TcpStream::connect(&to) else { return };
                pump(client.try_clone().unwrap(), server.try_clone().unwrap(), u.clone());
                pump(server, client, d.clone());
            }
        });
        Relay { addr, up, down }
    }

    fn seen(&self) -> Vec<u8> {
        let mut all = self.up.lock().unwrap().clone();
        all.extend_from_slice(&self.down.lock().unwrap());
        all
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, keep: Arc<Mutex<Vec<u8>>>) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 16384];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    keep.lock().unwrap().extend_from_slice(&buf[..n]);
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to.shutdown(std::net::Shutdown::Write);
    });
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn neither_the_token_nor_file_content_crosses_the_wire_in_the_clear() {
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let relay = Relay::start(srv.address());
    let a = temp_dir("tls-a");
    // Incompressible, so without encryption its bytes would cross as they are.
    let secret = random_bytes(11, 64 << 10);
    write(&a.path().join("secret.bin"), &secret);
    write(&a.path().join("note.txt"), b"the launch code is 0000, do not tell anyone\n");
    sync_command("push", a.path(), &relay.addr, &token, &[]).output().map(|_| ()).unwrap();
    let b = temp_dir("tls-b");
    let out = run(&mut sync_command("pull", b.path(), &relay.addr, &token, &[]));
    assert!(out.success(), "{}", out.dump());
    assert_eq!(read(&b.path().join("secret.bin")), secret);

    let wire = relay.seen();
    // What a TLS 1.3 ClientHello leaves in the clear (the ALPN name) is seen: the relay looks
    // at the real bytes.
    assert!(contains(&wire, b"deltasync"), "the relay sees the handshake's clear parts");
    assert!(wire.len() > 2 * secret.len(), "the transfers went through the relay ({} bytes)", wire.len());
    assert!(!contains(&wire, token.as_bytes()), "the token crossed the wire in the clear");
    assert!(!contains(&wire, b"launch code"), "a file's text crossed the wire in the clear");
    for window in secret.chunks(4096) {
        assert!(!contains(&wire, &window[..32]), "a file's bytes crossed the wire in the clear");
    }
    assert!(!contains(&wire, b"secret.bin"), "a path crossed the wire in the clear");
}

/// A listener that answers every connection with `reply` (if any) and then holds it open.
fn impostor(reply: &'static [u8]) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { return };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                if !reply.is_empty() {
                    let _ = c.read(&mut buf);
                    let _ = c.write_all(reply);
                }
                std::thread::sleep(Duration::from_secs(30));
            });
        }
    });
    addr
}

fn push_to(addr: &str, extra: &[&str]) -> Output {
    let d = temp_dir("tls-imp");
    write(&d.path().join("f"), b"x");
    run(&mut sync_command("push", d.path(), addr, "0123456789abcdef", extra))
}

#[test]
fn a_peer_that_is_not_a_deltasync_server_is_named_as_such() {
    for (what, reply) in [
        ("an HTTP server", &b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n"[..]),
        ("an ssh server", &b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n"[..]),
        ("a silent port", &b""[..]),
    ] {
        let addr = impostor(reply);
        let out = push_to(&addr, &["--timeout", "2"]);
        assert_eq!(out.status.code(), Some(3), "{what}: {}", out.dump());
        assert!(
            out.stderr.contains(&format!("{addr} is not a deltasync server")),
            "{what}: says what it is: {}",
            out.dump()
        );
        assert!(!out.stderr.contains("frame size"), "{what}: {}", out.dump());
    }
}

#[test]
fn a_wrong_fingerprint_is_refused() {
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let d = temp_dir("tls-fp");
    write(&d.path().join("f"), b"x");
    let wrong = "AAAA-AAAA-AAAA-AAAA-AAAA-AAAA-AAAA-AAAA-AAAA-AAAA-AAAA-AAAA-AAAA";
    let out = run(&mut sync_command("push", d.path(), &srv.address(), &token, &["--fingerprint", wrong]));
    assert_eq!(out.status.code(), Some(8), "{}", out.dump());
    assert!(out.stderr.contains("is not the one this folder trusts"), "{}", out.dump());
    assert!(out.stderr.contains(&srv.fingerprint), "names the fingerprint it saw: {}", out.dump());
    assert_eq!(account_changes(&srv.data, "alice"), 0, "nothing was pushed");
    // The right one works, and is what the folder pins from then on.
    let out = run(&mut sync_command(
        "push",
        d.path(),
        &srv.address(),
        &token,
        &["--fingerprint", &srv.fingerprint],
    ));
    assert!(out.success(), "{}", out.dump());
    assert!(!out.stderr.contains("trusting"), "a given fingerprint is checked, not trusted: {}", out.dump());
    let status = run(command().arg("status").arg(d.path())).ok("status").stdout;
    assert!(
        status.contains(&format!("(fingerprint {})", srv.fingerprint)),
        "status shows the pin:\n{status}"
    );
}

#[test]
fn a_changed_server_certificate_is_refused_until_the_new_one_is_given() {
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let d = temp_dir("tls-changed");
    write(&d.path().join("f"), b"one");
    let first = run(&mut sync_command("push", d.path(), &srv.address(), &token, &[]));
    assert!(first.success(), "{}", first.dump());
    assert!(
        first.stderr.contains(&format!("trusting the server at {} on first use", srv.address())),
        "{}",
        first.dump()
    );
    assert!(first.stderr.contains(&srv.fingerprint), "{}", first.dump());
    let again = run(&mut sync_command("push", d.path(), &srv.address(), &token, &[]));
    assert!(again.success() && !again.stderr.contains("trusting"), "pinned: {}", again.dump());

    // The same data folder with a new key: a different server as far as anyone can tell.
    let data = srv.data.clone();
    let srv = srv.restart_with(|| std::fs::remove_dir_all(data.join("tls")).unwrap());
    write(&d.path().join("f"), b"two");
    let out = run(&mut sync_command("push", d.path(), &srv.address(), &token, &[]));
    assert_eq!(out.status.code(), Some(8), "{}", out.dump());
    assert!(out.stderr.contains("is not the one this folder trusts"), "{}", out.dump());
    assert!(
        out.stderr.contains(&format!("--fingerprint {}", srv.fingerprint)),
        "says what to do: {}",
        out.dump()
    );
    assert_eq!(account_changes(&srv.data, "alice"), 1, "the second version was not sent");

    let out = run(&mut sync_command(
        "push",
        d.path(),
        &srv.address(),
        &token,
        &["--fingerprint", &srv.fingerprint],
    ));
    assert!(out.success(), "{}", out.dump());
    assert_eq!(account_changes(&srv.data, "alice"), 2);
    let out = run(&mut sync_command("push", d.path(), &srv.address(), &token, &[]));
    assert!(out.success(), "the new one is pinned now: {}", out.dump());
}

#[test]
fn secrets_are_the_owners_only() {
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let tf = temp_dir("tls-token");
    let token_file = tf.path().join("token");
    write(&token_file, format!("{token}\n"));
    let d = temp_dir("tls-perm");
    write(&d.path().join("f"), b"x");
    let mut cmd = command();
    cmd.args(["push", "--no-progress", "--server", &srv.address(), "--token-file"])
        .arg(&token_file)
        .arg(d.path());
    let out = run(&mut cmd);
    assert!(out.success(), "--token-file: {}", out.dump());
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let state = d.path().join(".deltasync");
    assert_eq!(mode(&state), 0o700);
    assert_eq!(mode(&state.join("index.db")), 0o600);
    assert_eq!(mode(&srv.data), 0o700);
    assert_eq!(mode(&srv.data.join("tls/key.pem")), 0o600);
    assert_eq!(mode(&srv.data.join("deltasync.db")), 0o600);

    let empty = tf.path().join("empty");
    write(&empty, b"\n");
    let mut cmd = command();
    cmd.args(["push", "--no-progress", "--server", &srv.address(), "--token-file"]).arg(&empty).arg(d.path());
    let out = run(&mut cmd);
    assert!(!out.success() && out.stderr.contains("is empty"), "{}", out.dump());
}

/// A CA, and a certificate it signed for 127.0.0.1: `(ca.pem, cert.pem, key.pem)` in `dir`.
fn ca_and_certificate(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "deltasync test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let cert =
        CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap().signed_by(&key, &issuer).unwrap();
    let paths = (dir.join("ca.pem"), dir.join("cert.pem"), dir.join("key.pem"));
    write(&paths.0, ca_cert.pem());
    write(&paths.1, cert.pem());
    write(&paths.2, key.serialize_pem());
    (paths.0, paths.1, paths.2)
}

#[test]
fn a_ca_certificate_is_checked_against_the_roots_not_pinned() {
    let certs = temp_dir("tls-ca");
    let (ca, cert, key) = ca_and_certificate(certs.path());
    let (cert, key) = (cert.to_str().unwrap().to_string(), key.to_str().unwrap().to_string());
    let srv = start_server_args(&["--tls-cert", &cert, "--tls-key", &key]);
    let token = add_account(&srv.data, "alice");
    let d = temp_dir("tls-ca-d");
    write(&d.path().join("f"), b"one");
    let push_with_roots = |dir: &Path, addr: &str| {
        let mut c = sync_command("push", dir, addr, &token, &[]);
        c.env("SSL_CERT_FILE", &ca);
        run(&mut c)
    };
    let out = push_with_roots(d.path(), &srv.address());
    assert!(out.success(), "{}", out.dump());
    assert!(
        !out.stderr.contains("trusting"),
        "valid under the roots: nothing to trust on first use: {}",
        out.dump()
    );

    // The same data folder served with its own self-signed certificate instead: no longer valid
    // under the roots, so refused, though this folder never pinned a fingerprint.
    let srv = srv.restart();
    write(&d.path().join("f"), b"two");
    let out = push_with_roots(d.path(), &srv.address());
    assert_eq!(out.status.code(), Some(8), "{}", out.dump());
    assert!(out.stderr.contains("no longer valid under this computer's CA roots"), "{}", out.dump());
    assert_eq!(account_changes(&srv.data, "alice"), 1);
}
