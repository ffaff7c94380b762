//! A hostile or broken peer: garbage, oversized frames, paths that try to leave the account's
//! folder, symlinks inside the account, and a client killed in the middle of an upload.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use deltasync::delta::Block;
use deltasync::hash::ContentHash;
use deltasync::path::RelPath;
use deltasync::protocol::{
    ClientMsg, FrameReader, FrameWriter, Hello, MAGIC, MAX_FRAME, Meta, PROTOCOL_VERSION, Refusal, Reply,
    Request, ServerMsg, Welcome,
};
use serde::Serialize;

use crate::util::*;

/// How long the server may take to close a connection it should refuse. Below the server's
/// 10 s handshake timeout, so a close caused by that timeout (the server not noticing the
/// garbage at all) does not pass.
const CLOSE_DEADLINE: Duration = Duration::from_secs(8);

/// A push of new files and a pull into a fresh folder work: the server still serves the account.
fn assert_server_still_serves(srv: &Server, token: &str) {
    let a = temp_dir("ds-after-");
    let files = [
        ("after.txt", b"the server still works\n".to_vec()),
        ("after/random.bin", random_bytes(99, 100_000)),
    ];
    for (name, data) in &files {
        write(&a.path().join(name), data);
    }
    push(a.path(), srv, token);
    let b = temp_dir("ds-after-pull-");
    pull(b.path(), srv, token);
    for (name, data) in &files {
        assert!(read(&b.path().join(name)) == *data, "{name} did not come back intact");
    }
}

/// Reads until the server closes the connection (EOF, reset, or over TLS an end without
/// `close_notify`); returns what it sent. Panics if it is still open after [`CLOSE_DEADLINE`].
fn expect_closed(s: &mut impl Socket, what: &str) -> Vec<u8> {
    let deadline = Instant::now() + CLOSE_DEADLINE;
    s.tcp().set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) =>
            {
                if Instant::now() > deadline {
                    let _ = s.tcp().shutdown(std::net::Shutdown::Both);
                    panic!("{what}: the server kept the connection open for {CLOSE_DEADLINE:?}");
                }
            }
            Err(_) => return got, // reset, or TLS closed without close_notify: closed too
        }
    }
}

/// The frames in `bytes` (4-byte big-endian length, then payload); a torn last frame is dropped.
fn frames(mut bytes: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    while bytes.len() >= 4 {
        let n = u32::from_be_bytes(bytes[..4].try_into().unwrap()) as usize;
        if bytes.len() < 4 + n {
            break;
        }
        out.push(&bytes[4..4 + n]);
        bytes = &bytes[4 + n..];
    }
    out
}

/// Anything the server sent before closing a connection that never completed a handshake must be
/// a rejection.
fn assert_only_rejections(got: &[u8], what: &str) {
    for f in frames(got) {
        match postcard::from_bytes::<Welcome>(f) {
            Ok(Welcome::Rejected { .. }) => {}
            other => panic!("{what}: the server answered {other:?}"),
        }
    }
}

fn frame(payload: &[u8]) -> Vec<u8> {
    let mut v = (payload.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(payload);
    v
}

/// A handshake over a blocking TLS connection, by hand.
fn handshake_std(srv: &Server, token: &str) -> TlsStream {
    let mut s = srv.tls();
    let hello = Hello {
        magic: MAGIC,
        version: PROTOCOL_VERSION,
        token: Some(token.into()),
        device: "raw".into(),
        folder: "default".into(),
    };
    s.write_all(&frame(&postcard::to_allocvec(&hello).unwrap())).unwrap();
    let mut len = [0u8; 4];
    s.read_exact(&mut len).unwrap();
    let mut payload = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut payload).unwrap();
    match postcard::from_bytes::<Welcome>(&payload).unwrap() {
        Welcome::Accepted { .. } => s,
        other => panic!("handshake refused: {other:?}"),
    }
}

#[test]
fn garbage_bytes_are_rejected_and_server_keeps_serving() {
    let srv = start_server();
    let token = add_account(&srv.data, "alice");

    // Short inputs the server reads whole.
    let mut inputs: Vec<(String, Vec<u8>)> = vec![
        ("an empty frame".into(), vec![0, 0, 0, 0]),
        ("an HTTP request".into(), b"GET / HTTP/1.1\r\nHost: example\r\n\r\n".to_vec()),
        ("a frame of random bytes".into(), frame(&random_bytes(11, 64))),
        ("a short frame".into(), frame(b"DLTASYNC")),
    ];
    for seed in 0..3 {
        inputs.push((format!("random bytes (seed {seed})"), random_bytes(100 + seed, 4096)));
    }
    for (what, bytes) in &inputs {
        // Inside TLS, where the deltasync protocol starts.
        let mut s = srv.tls();
        let _ = s.write_all(bytes);
        let _ = s.flush();
        let got = expect_closed(&mut s, what);
        assert_only_rejections(&got, what);
        // And instead of a TLS handshake. Four bytes are less than a TLS record's header: the
        // server rightly waits for the rest then (until its handshake timeout).
        if bytes.len() >= 5 {
            let mut s = std::net::TcpStream::connect(srv.addr).unwrap();
            let _ = s.write_all(bytes);
            expect_closed(&mut s, &format!("{what} instead of a TLS handshake"));
        }
    }

    // An endless random stream: whatever length its first four bytes announce is satisfied
    // sooner or later, so the server must decide about it without waiting for a timeout. The
    // writer thread owns the TLS connection (it only writes); this thread watches the socket
    // under it for the server's close.
    for seed in 0..3u64 {
        let mut w = srv.tls();
        let mut s = w.get_ref().try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            let mut rng = XorShift::new(200 + seed);
            let mut chunk = vec![0u8; 64 << 10];
            let mut sent = 0usize;
            while sent < MAX_FRAME + (1 << 20) {
                rng.fill(&mut chunk);
                if w.write_all(&chunk).and_then(|()| w.flush()).is_err() {
                    break;
                }
                sent += chunk.len();
            }
        });
        expect_closed(&mut s, &format!("an endless random stream (seed {seed})"));
        let _ = s.shutdown(std::net::Shutdown::Both);
        writer.join().unwrap();
    }

    assert_server_still_serves(&srv, &token);
}

#[test]
fn oversized_frame_is_rejected_before_and_after_handshake() {
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let huge = 512u32 << 20;
    let mut msg = huge.to_be_bytes().to_vec();
    msg.extend_from_slice(&random_bytes(12, 1024));

    // Instead of a Hello.
    let mut s = srv.tls();
    s.write_all(&msg).unwrap();
    s.flush().unwrap();
    let got = expect_closed(&mut s, "a 512 MiB frame header instead of a Hello");
    assert_only_rejections(&got, "a 512 MiB frame header");

    // After a good handshake, as the first request: 512 MiB, and just over the limit.
    for len in [huge, MAX_FRAME as u32 + 1] {
        let mut s = handshake_std(&srv, &token);
        let mut m = len.to_be_bytes().to_vec();
        m.extend_from_slice(&random_bytes(13, 1024));
        let _ = s.write_all(&m);
        let _ = s.flush();
        let got = expect_closed(&mut s, &format!("a {len}-byte frame header after the handshake"));
        for f in frames(&got) {
            let msg = postcard::from_bytes::<ServerMsg>(f);
            assert!(
                matches!(msg, Ok(ServerMsg::Fatal { .. })),
                "the server answered an oversized frame with {msg:?}"
            );
        }
    }

    assert_server_still_serves(&srv, &token);
}

// ---------------------------------------------------------------------------------------------
// Raw protocol with paths `RelPath` would refuse to hold.

/// Mirrors `deltasync::protocol::ClientMsg` variant for variant (postcard encodes the variant
/// index), with `String` paths. `lookalike_messages_encode_like_the_real_ones` checks the mirror.
#[derive(Serialize)]
enum RawMsg {
    Req { id: u64, req: RawRequest },
    Data { id: u64, block: Block },
    End { id: u64 },
}

/// Mirrors `deltasync::protocol::Request` (same variants, same order, same fields).
#[allow(dead_code)]
#[derive(Serialize)]
enum RawRequest {
    Changes { since: u64 },
    Put { path: String, base_rev: u64, hash: ContentHash, size: u64, meta: Meta, base: Option<ContentHash> },
    Mkdir { path: String, base_rev: u64, mode: u32 },
    Symlink { path: String, base_rev: u64, target: String },
    Delete { path: String, base_rev: u64 },
    Move { from: String, from_rev: u64, to: String, to_base_rev: u64, meta: Meta },
    Copy { hash: ContentHash, size: u64, to: String, to_base_rev: u64, meta: Meta },
    SetMeta { path: String, base_rev: u64, meta: Meta },
    Get { path: String, have: Option<(ContentHash, u64)> },
    Signature { path: String },
    Subscribe,
    Ping,
}

const META: Meta = Meta { mtime_ns: 1_600_000_000_000_000_000, mode: 0o644 };
const PAYLOAD: &[u8] = b"pwned\n";

/// One literal op carrying `data` (the op stream of `deltasync::delta`: `1 varint(len) bytes`).
fn literal_block(data: &[u8]) -> Block {
    assert!(data.len() < 128);
    let mut bytes = vec![1u8, data.len() as u8];
    bytes.extend_from_slice(data);
    Block { codec: deltasync::delta::Codec::Raw, bytes }
}

/// Every request kind that names a path, aimed at `p`; a `Put` comes with its content.
/// `sanity_rev` is the revision of the account's `sanity.txt`, so a `Move` from it is not refused
/// as stale before the server even looks at the destination.
fn hostile_requests(p: &str, sanity_rev: u64) -> Vec<(String, Vec<RawMsg>)> {
    let hash = ContentHash::of(PAYLOAD);
    let size = PAYLOAD.len() as u64;
    let req = |r| RawMsg::Req { id: 1, req: r };
    let p = p.to_string();
    vec![
        (
            format!("Put {p}"),
            vec![
                req(RawRequest::Put { path: p.clone(), base_rev: 0, hash, size, meta: META, base: None }),
                RawMsg::Data { id: 1, block: literal_block(PAYLOAD) },
                RawMsg::End { id: 1 },
            ],
        ),
        (format!("Mkdir {p}"), vec![req(RawRequest::Mkdir { path: p.clone(), base_rev: 0, mode: 0o755 })]),
        (
            format!("Symlink {p}"),
            vec![req(RawRequest::Symlink { path: p.clone(), base_rev: 0, target: "pwned".into() })],
        ),
        (format!("Delete {p}"), vec![req(RawRequest::Delete { path: p.clone(), base_rev: 0 })]),
        (
            format!("Move sanity.txt -> {p}"),
            vec![req(RawRequest::Move {
                from: "sanity.txt".into(),
                from_rev: sanity_rev,
                to: p.clone(),
                to_base_rev: 0,
                meta: META,
            })],
        ),
        (
            format!("Move {p} -> stolen"),
            vec![req(RawRequest::Move {
                from: p.clone(),
                from_rev: 0,
                to: "stolen".into(),
                to_base_rev: 0,
                meta: META,
            })],
        ),
        (
            format!("Copy -> {p}"),
            vec![req(RawRequest::Copy { hash, size, to: p.clone(), to_base_rev: 0, meta: META })],
        ),
        (format!("SetMeta {p}"), vec![req(RawRequest::SetMeta { path: p.clone(), base_rev: 0, meta: META })]),
        (format!("Get {p}"), vec![req(RawRequest::Get { path: p.clone(), have: None })]),
        (format!("Signature {p}"), vec![req(RawRequest::Signature { path: p })]),
    ]
}

#[derive(Debug)]
enum Outcome {
    Answered(Box<Result<Reply, Refusal>>),
    Fatal(#[allow(dead_code)] String),
    Closed,
}

async fn connect(addr: Endpoint, token: &str) -> (FrameReader, FrameWriter) {
    let (mut rd, mut wr) = addr.frames().await;
    wr.send(&Hello {
        magic: MAGIC,
        version: PROTOCOL_VERSION,
        token: Some(token.into()),
        device: "raw".into(),
        folder: "default".into(),
    })
    .await
    .unwrap();
    match rd.recv::<Welcome>().await.unwrap() {
        Some(Welcome::Accepted { .. }) => (rd, wr),
        other => panic!("handshake refused: {other:?}"),
    }
}

/// A fresh connection, `msgs` sent, and the server's first answer.
async fn exchange<M: Serialize>(addr: Endpoint, token: &str, msgs: &[M]) -> Outcome {
    let (mut rd, mut wr) = connect(addr, token).await;
    for m in msgs {
        if wr.feed(m).await.is_err() {
            break;
        }
    }
    let _ = wr.flush().await;
    let next = async {
        loop {
            return match rd.recv::<ServerMsg>().await {
                Ok(Some(ServerMsg::Notify { .. })) => continue,
                Ok(Some(ServerMsg::Resp { result, .. })) => Outcome::Answered(Box::new(result)),
                Ok(Some(ServerMsg::Fatal { message })) => Outcome::Fatal(message),
                Ok(Some(other)) => panic!("unexpected first message {other:?}"),
                Ok(None) | Err(_) => Outcome::Closed,
            };
        }
    };
    tokio::time::timeout(Duration::from_secs(30), next).await.expect("no answer from the server within 30 s")
}

#[test]
fn lookalike_messages_encode_like_the_real_ones() {
    let h = ContentHash::of(b"x");
    let p = || RelPath::new("dir/file").unwrap();
    let s = || "dir/file".to_string();
    let cases: Vec<(Request, RawRequest)> = vec![
        (Request::Changes { since: 7 }, RawRequest::Changes { since: 7 }),
        (
            Request::Put { path: p(), base_rev: 3, hash: h, size: 9, meta: META, base: Some(h) },
            RawRequest::Put { path: s(), base_rev: 3, hash: h, size: 9, meta: META, base: Some(h) },
        ),
        (
            Request::Mkdir { path: p(), base_rev: 1, mode: 0o755 },
            RawRequest::Mkdir { path: s(), base_rev: 1, mode: 0o755 },
        ),
        (
            Request::Symlink { path: p(), base_rev: 1, target: "t".into() },
            RawRequest::Symlink { path: s(), base_rev: 1, target: "t".into() },
        ),
        (Request::Delete { path: p(), base_rev: 4 }, RawRequest::Delete { path: s(), base_rev: 4 }),
        (
            Request::Move { from: p(), from_rev: 1, to: p(), to_base_rev: 2, meta: META },
            RawRequest::Move { from: s(), from_rev: 1, to: s(), to_base_rev: 2, meta: META },
        ),
        (
            Request::Copy { hash: h, size: 5, to: p(), to_base_rev: 2, meta: META },
            RawRequest::Copy { hash: h, size: 5, to: s(), to_base_rev: 2, meta: META },
        ),
        (
            Request::SetMeta { path: p(), base_rev: 2, meta: META },
            RawRequest::SetMeta { path: s(), base_rev: 2, meta: META },
        ),
        (Request::Get { path: p(), have: Some((h, 5)) }, RawRequest::Get { path: s(), have: Some((h, 5)) }),
        (Request::Signature { path: p() }, RawRequest::Signature { path: s() }),
        (Request::Subscribe, RawRequest::Subscribe),
        (Request::Ping, RawRequest::Ping),
    ];
    for (real, raw) in cases {
        let what = format!("{real:?}");
        let a = postcard::to_allocvec(&ClientMsg::Req { id: 42, req: real }).unwrap();
        let b = postcard::to_allocvec(&RawMsg::Req { id: 42, req: raw }).unwrap();
        assert_eq!(a, b, "the look-alike encodes {what} differently");
    }
    let blk = literal_block(PAYLOAD);
    assert_eq!(
        postcard::to_allocvec(&ClientMsg::Data { id: 3, block: blk.clone() }).unwrap(),
        postcard::to_allocvec(&RawMsg::Data { id: 3, block: blk }).unwrap()
    );
    assert_eq!(
        postcard::to_allocvec(&ClientMsg::End { id: 3 }).unwrap(),
        postcard::to_allocvec(&RawMsg::End { id: 3 }).unwrap()
    );
}

/// Names the hostile requests would create; none may appear anywhere.
const ESCAPE_NAMES: &[&str] = &["escape", "abs-escape", "b", "stolen", "pwned"];

#[tokio::test]
async fn path_traversal_requests_are_refused() {
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let addr = srv.endpoint();

    // The look-alike messages work: valid paths sent through them are committed.
    let sanity = hostile_requests("sanity.txt", 0).swap_remove(0).1;
    let sanity_rev =
        committed_rev(exchange(addr, &token, &sanity).await, "a valid Put through the look-alike");
    let mkdir =
        [RawMsg::Req { id: 1, req: RawRequest::Mkdir { path: "sanity".into(), base_rev: 0, mode: 0o755 } }];
    committed_rev(exchange(addr, &token, &mkdir).await, "a valid Mkdir through the look-alike");
    let files = srv.files();
    assert_eq!(read(&files.join("sanity.txt")), PAYLOAD, "the sanity upload did not land where expected");
    // The server's own database (in the data folder unless it is in PostgreSQL).
    let db = srv.storage().is_local().then(|| srv.data.join("deltasync.db"));
    assert!(db.as_ref().is_none_or(|db| db.is_file()));

    let abs = srv.root.join("abs-escape").to_string_lossy().into_owned();
    let paths = [
        "../escape".to_string(),
        abs,
        "/tmp/x".to_string(),
        "a/../../b".to_string(),
        "../../../deltasync.db".to_string(),
        "sanity/../../escape".to_string(),
    ];
    let tmp_x_existed = Path::new("/tmp/x").exists();
    let mut failures = Vec::new();
    for p in &paths {
        for (what, msgs) in hostile_requests(p, sanity_rev) {
            match exchange(addr, &token, &msgs).await {
                Outcome::Answered(r) if r.is_err() => {}
                Outcome::Fatal(_) | Outcome::Closed => {}
                Outcome::Answered(r) => failures.push(format!("{what}: the server answered {r:?}")),
            }
        }
    }
    // Reads of files outside the account, with a real target.
    for p in ["/etc/passwd", "../../../deltasync.db", "../../../../server.log"] {
        for (what, msgs) in hostile_requests(p, sanity_rev)
            .into_iter()
            .filter(|(w, _)| w.starts_with("Get") || w.starts_with("Sig"))
        {
            if let Outcome::Answered(r) = exchange(addr, &token, &msgs).await
                && r.is_ok()
            {
                failures.push(format!("{what}: the server answered {r:?}"));
            }
        }
    }
    assert!(failures.is_empty(), "hostile requests were accepted:\n{}", failures.join("\n"));

    let found = find_named(&srv.root, ESCAPE_NAMES);
    assert!(found.is_empty(), "hostile requests created {found:?}");
    if !tmp_x_existed {
        assert!(!Path::new("/tmp/x").exists(), "a request for `/tmp/x` created it");
    }
    assert!(db.is_none_or(|db| db.is_file()), "the server's database is gone");
    let mut in_account = list_tree(&files);
    in_account.sort();
    assert_eq!(in_account, ["sanity", "sanity.txt"], "the account's folder changed");
    assert_eq!(read(&files.join("sanity.txt")), PAYLOAD);

    tokio::task::spawn_blocking(move || assert_server_still_serves(&srv, &token)).await.unwrap();
}

/// The revision of a `Committed` answer; panics on anything else.
fn committed_rev(o: Outcome, what: &str) -> u64 {
    match o {
        Outcome::Answered(r) => match *r {
            Ok(Reply::Committed { rev }) => rev,
            other => panic!("{what}: expected Committed, got {other:?}"),
        },
        other => panic!("{what}: expected Committed, got {other:?}"),
    }
}

fn req(req: Request) -> Vec<ClientMsg> {
    vec![ClientMsg::Req { id: 1, req }]
}

fn put_msgs(path: RelPath, base_rev: u64, data: &[u8]) -> Vec<ClientMsg> {
    let req = Request::Put {
        path,
        base_rev,
        hash: ContentHash::of(data),
        size: data.len() as u64,
        meta: META,
        base: None,
    };
    vec![
        ClientMsg::Req { id: 1, req },
        ClientMsg::Data { id: 1, block: literal_block(data) },
        ClientMsg::End { id: 1 },
    ]
}

/// Symlinks the account stores (allowed: links are data) are never followed by later requests.
/// (The server keeps content in packs named by chunk, never at a user's path, so there is no
/// stored tree to plant a link in behind its back: a user path never names a server file.)
#[tokio::test]
async fn symlinks_in_the_account_are_never_followed() {
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let addr = srv.endpoint();
    let rel = |s: &str| RelPath::new(s).unwrap();
    // A file outside the account that a followed link would expose or overwrite.
    let outside = srv.root.join("f");
    write(&outside, "outside the account\n");
    set_mode(&outside, 0o600);
    let md = std::fs::metadata(&outside).unwrap();
    let outside_before = (md.mtime(), md.mode() & 0o7777);

    // files/up -> the temp root holding data/, server.log and f.
    let link = "../../../..";
    committed_rev(
        exchange(addr, &token, &req(Request::Symlink { path: rel("up"), base_rev: 0, target: link.into() }))
            .await,
        "storing a symlink",
    );
    let sanity_rev =
        committed_rev(exchange(addr, &token, &put_msgs(rel("sanity.txt"), 0, PAYLOAD)).await, "put");
    let replaced = "only stored links";

    let hash = ContentHash::of(PAYLOAD);
    let size = PAYLOAD.len() as u64;
    let mut attempts: Vec<(String, Vec<ClientMsg>)> = Vec::new();
    {
        let (dir, rev) = ("up", 0);
        let p = |name: &str| rel(&format!("{dir}/{name}"));
        attempts.extend([
            (format!("Put {dir}/escape"), put_msgs(p("escape"), 0, PAYLOAD)),
            (format!("Put over {dir}/f"), put_msgs(p("f"), rev, PAYLOAD)),
            (
                format!("Mkdir {dir}/escape"),
                req(Request::Mkdir { path: p("escape"), base_rev: 0, mode: 0o755 }),
            ),
            (
                format!("Symlink {dir}/escape"),
                req(Request::Symlink { path: p("escape"), base_rev: 0, target: "x".into() }),
            ),
            (
                format!("Move sanity.txt -> {dir}/stolen"),
                req(Request::Move {
                    from: rel("sanity.txt"),
                    from_rev: sanity_rev,
                    to: p("stolen"),
                    to_base_rev: 0,
                    meta: META,
                }),
            ),
            (
                format!("Move {dir}/f -> stolen"),
                req(Request::Move {
                    from: p("f"),
                    from_rev: rev,
                    to: rel("stolen"),
                    to_base_rev: 0,
                    meta: META,
                }),
            ),
            (
                format!("Copy -> {dir}/pwned"),
                req(Request::Copy { hash, size, to: p("pwned"), to_base_rev: 0, meta: META }),
            ),
            (format!("SetMeta {dir}/f"), req(Request::SetMeta { path: p("f"), base_rev: rev, meta: META })),
            (format!("Get {dir}/f"), req(Request::Get { path: p("f"), have: None })),
            (
                format!("Get {dir}/data/deltasync.db"),
                req(Request::Get { path: p("data/deltasync.db"), have: None }),
            ),
            (format!("Signature {dir}/f"), req(Request::Signature { path: p("f") })),
        ]);
    }
    let mut failures = Vec::new();
    for (what, msgs) in &attempts {
        if let Outcome::Answered(r) = exchange(addr, &token, msgs).await
            && r.is_ok()
        {
            failures.push(format!("{what}: the server answered {r:?}"));
        }
    }
    // Deletes must not remove what the links point at.
    for (what, msgs) in [("Delete up/f", req(Request::Delete { path: rel("up/f"), base_rev: 0 }))] {
        let _ = (what, exchange(addr, &token, &msgs).await);
    }
    assert!(
        failures.is_empty(),
        "requests through a symlink were accepted (replacing d by a link: {replaced:?}):\n{}",
        failures.join("\n")
    );
    assert_eq!(read_string(&outside), "outside the account\n", "a file outside the account was changed");
    let found = find_named(&srv.root, ESCAPE_NAMES);
    assert!(found.is_empty(), "requests through a symlink created {found:?}");
    assert!(srv.root.join("server.log").is_file());
    assert!(!srv.storage().is_local() || srv.data.join("deltasync.db").is_file());
    let md = std::fs::metadata(&outside).unwrap();
    assert_eq!(
        (md.mtime(), md.mode() & 0o7777),
        outside_before,
        "a file outside the account got new metadata"
    );

    tokio::task::spawn_blocking(move || assert_server_still_serves(&srv, &token)).await.unwrap();
}

// ---------------------------------------------------------------------------------------------

/// Pushes bigger and bigger new versions of `dir/big.bin` until `interrupt` catches one in the
/// middle of its upload (the server has started writing a temp file), then checks the server
/// still serves `on_server` whole. Returns that version.
fn interrupt_an_upload(
    srv: &mut Server,
    dir: &Path,
    token: &str,
    seed: u64,
    mut on_server: Vec<u8>,
    interrupt: impl Fn(&mut Server, &mut std::process::Child),
) -> Vec<u8> {
    for (attempt, size) in [64usize << 20, 128 << 20, 256 << 20].into_iter().enumerate() {
        let v2 = random_bytes(seed + attempt as u64, size);
        write(&dir.join("big.bin"), &v2);
        // An upload in progress shows as a pack being written in the data folder; in S3 it is
        // invisible until finished, so there the push is slowed and cut after 3 s.
        let local = srv.storage().is_local();
        let slow: &[&str] = if local { &[] } else { &["--bwlimit", "8M"] };
        let started = Instant::now();
        let mut child = sync_command("push", dir, &srv.address(), token, slow)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let finished = loop {
            if child.try_wait().unwrap().is_some() {
                break true;
            }
            let uploading = if local {
                srv.temp_files().iter().any(|(_, len)| *len > 0)
            } else {
                started.elapsed() > Duration::from_secs(3)
            };
            if uploading {
                interrupt(srv, &mut child);
                break false;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the push neither finished nor started uploading within 60 s\n{}", srv.log());
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        let status = child.wait().unwrap();
        let check = temp_dir("ds-check-");
        pull(check.path(), srv, token);
        let got = read(&check.path().join("big.bin"));
        if !finished {
            assert!(!status.success(), "an interrupted push reported success");
            assert!(
                got == on_server,
                "after the interruption the server does not hold the old version whole"
            );
            return on_server;
        }
        assert!(got == v2, "a push that finished left the old version on the server");
        on_server = v2; // the push won the race; the server holds it now
    }
    panic!("could not interrupt an upload in the middle");
}

#[test]
fn client_killed_mid_upload_leaves_old_version_intact() {
    let mut srv = start_server();
    let token = add_account(&srv.data, "alice");
    let dir = temp_dir("ds-kill-");
    let file = dir.path().join("big.bin");
    let v1 = random_bytes(20, 64 << 20);
    write(&file, &v1);
    push(dir.path(), &srv, &token);
    let on_server = interrupt_an_upload(&mut srv, dir.path(), &token, 21, v1, |_, child| {
        child.kill().unwrap(); // SIGKILL
    });

    // A restarted server has no leftover temp files.
    srv = srv.restart();
    let left = srv.temp_files();
    assert!(left.is_empty(), "temp files left after a restart: {left:?}\n{}", srv.log());
    let check = temp_dir("ds-check-");
    pull(check.path(), &srv, &token);
    assert!(read(&check.path().join("big.bin")) == on_server, "the old version is gone after the restart");

    // The killed client's folder recovers: pushing again brings the new version up.
    push(dir.path(), &srv, &token);
    let check = temp_dir("ds-check-");
    pull(check.path(), &srv, &token);
    assert!(
        read(&check.path().join("big.bin")) == read(&file),
        "the retried push did not upload the new version"
    );
}

/// The server is killed (SIGKILL, like a power cut) while it receives a new version: after a
/// restart it still serves the old version whole, has no temp leftovers, and the client's next
/// push completes the change.
#[test]
fn server_killed_mid_upload_loses_nothing() {
    let mut srv = start_server();
    let token = add_account(&srv.data, "alice");
    let dir = temp_dir("ds-srvkill-");
    let file = dir.path().join("big.bin");
    let v1 = random_bytes(30, 64 << 20);
    write(&file, &v1);
    push(dir.path(), &srv, &token);
    interrupt_an_upload(&mut srv, dir.path(), &token, 31, v1, |srv, _| {
        srv.kill_hard();
        srv.start_again();
    });
    let left = srv.temp_files();
    assert!(left.is_empty(), "temp files left after the restart: {left:?}\n{}", srv.log());

    push(dir.path(), &srv, &token);
    let check = temp_dir("ds-check-");
    pull(check.path(), &srv, &token);
    assert!(
        read(&check.path().join("big.bin")) == read(&file),
        "the retried push did not upload the new version"
    );
}

/// A small upload is held in memory until its end, so one that announces a few bytes and then
/// keeps sending must not be buffered: it is refused, nothing lands, the server's memory stays
/// low and it keeps serving.
#[tokio::test]
async fn upload_far_larger_than_announced_is_refused_without_buffering_it() {
    const BLOCK: usize = 8 << 20;
    const BLOCKS: usize = 24;
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let path = RelPath::new("small.txt").unwrap();
    let mut msgs = put_msgs(path, 0, PAYLOAD);
    let end = msgs.pop().expect("put_msgs ends with End");
    // 192 MiB of literal data after a Put that announced 6 bytes.
    let mut op = vec![1u8];
    let mut n = BLOCK as u64;
    while n >= 0x80 {
        op.push(n as u8 | 0x80);
        n >>= 7;
    }
    op.push(n as u8);
    op.resize(op.len() + BLOCK, 7);
    let block = Block { codec: deltasync::delta::Codec::Raw, bytes: op };
    for _ in 0..BLOCKS {
        msgs.push(ClientMsg::Data { id: 1, block: block.clone() });
    }
    msgs.push(end);
    match exchange(srv.endpoint(), &token, &msgs).await {
        Outcome::Answered(r) => assert!(r.is_err(), "an oversized upload was accepted: {r:?}"),
        Outcome::Fatal(_) | Outcome::Closed => {}
    }
    drop(msgs);
    let files = srv.files();
    assert!(list_tree(&files).is_empty(), "something landed: {:?}", list_tree(&files));
    if let Some(peak) = srv.peak_rss_kib() {
        assert!(peak < 96 << 10, "the server held {peak} KiB while refusing {} MiB", (BLOCK * BLOCKS) >> 20);
    }
    tokio::task::spawn_blocking(move || assert_server_still_serves(&srv, &token)).await.unwrap();
}

/// A folder that trusts its server (on first use) refuses another certificate before its token
/// is sent: someone in the middle, or a server on a new data folder, is exit 8, and only
/// `--fingerprint` of the new server lets the folder use it.
#[test]
fn a_server_with_another_certificate_is_refused_before_the_token_is_sent() {
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let a = temp_dir("ds-pin-");
    write(&a.path().join("f.txt"), "pinned\n");
    push(a.path(), &srv, &token);

    // Answers TLS with its own certificate; reports the first frame the client sends it.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let impostor_addr = l.local_addr().unwrap().to_string();
    let impostor = std::thread::spawn(move || {
        let mut s = fake_accept(&l).ok()?;
        recv_frame::<Hello>(&mut s)
    });
    let out = run(&mut sync_command("push", a.path(), &impostor_addr, &token, &[]));
    assert_eq!(out.status.code(), Some(8), "{}", out.dump());
    assert!(out.stderr.contains("is not the one this folder trusts"), "{}", out.dump());
    let hello = impostor.join().unwrap();
    assert!(hello.is_none(), "the client sent {hello:?} to a server it does not trust");

    let other = start_server();
    let token2 = add_account(&other.data, "alice");
    let out = sync_cmd("push", a.path(), &other, &token2, &[]);
    assert_eq!(out.status.code(), Some(8), "{}", out.dump());
    assert!(list_tree(&other.files()).is_empty(), "a refused push reached the new server");
    // Trusting it is not yet linking to it: the folder is linked to the first server.
    let out = sync_cmd("push", a.path(), &other, &token2, &["--fingerprint", &other.fingerprint]);
    assert_eq!(out.status.code(), Some(2), "{}", out.dump());
    assert!(out.stderr.contains("--relink"), "{}", out.dump());
    assert!(list_tree(&other.files()).is_empty(), "a refused push reached the new server");
    sync_cmd("push", a.path(), &other, &token2, &["--fingerprint", &other.fingerprint, "--relink"])
        .ok("--fingerprint --relink");
    let b = temp_dir("ds-pin-b-");
    pull(b.path(), &other, &token2);
    assert_same_tree(a.path(), b.path());
}
