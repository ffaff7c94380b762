//! The server under faults (issue 9): refused uploads that keep streaming, modes that are not
//! permissions, uploads that announce more than an account or a disk may hold, paths the server's
//! OS cannot store, peers that stall mid-frame, the handshake's server identity, and a full disk.
//! Every test runs the real `deltasync serve`.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use deltasync::delta::{Block, Codec};
use deltasync::hash::ContentHash;
use deltasync::path::RelPath;
use deltasync::protocol::{
    ClientMsg, FrameReader, FrameWriter, Hello, MAGIC, Meta, Node, PROTOCOL_VERSION, Refusal, RefusalKind,
    Reply, Request, ServerMsg, Welcome,
};
use deltasync::transport::Trust;

use crate::util::*;

const META: Meta = Meta { mtime_ns: 1_600_000_000_000_000_000, mode: 0o644 };

/// An answer, or what happened instead.
#[derive(Debug)]
enum Answer {
    Reply(Reply),
    Refused(Refusal),
    Closed,
}

async fn connect(addr: Endpoint, token: &str) -> (FrameReader, FrameWriter) {
    let (mut rd, mut wr) = addr.frames().await;
    let hello = Hello {
        magic: MAGIC,
        version: PROTOCOL_VERSION,
        token: Some(token.into()),
        device: "raw".into(),
        folder: "default".into(),
    };
    wr.send(&hello).await.expect("send hello");
    match rd.recv::<Welcome>().await.expect("welcome") {
        Some(Welcome::Accepted { .. }) => (rd, wr),
        other => panic!("handshake refused: {other:?}"),
    }
}

/// Sends `msgs` and reads the answer to request `id`; panics if none comes within 60 s (the
/// server hung).
async fn ask(
    rd: &mut FrameReader,
    wr: &mut FrameWriter,
    id: u64,
    msgs: Vec<ClientMsg>,
    what: &str,
) -> Answer {
    let exchange = async {
        for m in &msgs {
            if wr.feed(m).await.is_err() {
                break;
            }
        }
        let _ = wr.flush().await;
        loop {
            return match rd.recv::<ServerMsg>().await {
                Ok(Some(ServerMsg::Resp { id: i, result })) if i == id => match result {
                    Ok(r) => Answer::Reply(r),
                    Err(r) => Answer::Refused(r),
                },
                Ok(Some(ServerMsg::Notify { .. })) => continue,
                Ok(Some(other)) => panic!("{what}: unexpected {other:?}"),
                Ok(None) | Err(_) => Answer::Closed,
            };
        }
    };
    tokio::time::timeout(Duration::from_secs(60), exchange)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer from the server within 60 s (hung)"))
}

/// A Ping on this connection is answered.
async fn assert_serves(rd: &mut FrameReader, wr: &mut FrameWriter, id: u64, what: &str) {
    match ask(rd, wr, id, vec![ClientMsg::Req { id, req: Request::Ping }], what).await {
        Answer::Reply(Reply::Ok) => {}
        other => panic!("{what}: a Ping got {other:?}"),
    }
}

/// An op stream of literal ops carrying `data` (`1 varint(len) bytes`).
fn literal(data: &[u8]) -> Block {
    let mut bytes = vec![1u8];
    varint(&mut bytes, data.len() as u64);
    bytes.extend_from_slice(data);
    Block { codec: Codec::Raw, bytes }
}

/// `n` copy ops of the base's first `len` bytes (`0 varint(offset) varint(len)`).
fn copies(n: usize, len: u64) -> Block {
    let mut bytes = Vec::new();
    for _ in 0..n {
        bytes.extend_from_slice(&[0, 0]);
        varint(&mut bytes, len);
    }
    Block { codec: Codec::Raw, bytes }
}

fn varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push(n as u8 | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn rel(s: &str) -> RelPath {
    RelPath::new(s).expect("valid path")
}

fn put(id: u64, path: &str, base_rev: u64, data: &[u8], mode: u32) -> Vec<ClientMsg> {
    let req = Request::Put {
        path: rel(path),
        base_rev,
        hash: ContentHash::of(data),
        size: data.len() as u64,
        meta: Meta { mode, ..META },
        base: None,
    };
    vec![ClientMsg::Req { id, req }, ClientMsg::Last { id, block: literal(data) }]
}

fn committed(a: Answer, what: &str) -> u64 {
    match a {
        Answer::Reply(Reply::Committed { rev }) => rev,
        other => panic!("{what}: expected Committed, got {other:?}"),
    }
}

fn refused(a: Answer, what: &str) -> Refusal {
    match a {
        Answer::Refused(r) => r,
        other => panic!("{what}: expected a refusal, got {other:?}"),
    }
}

fn files_dir(srv: &Server) -> PathBuf {
    srv.files()
}

// ---------------------------------------------------------------------------------------------
// 1. Session deadlock

/// Two computers push conflicting edits of a 12 MiB file: the second upload is stale, refused
/// before its data is read. The server must still read its 12 blocks, answer `Stale`, and go on
/// serving the connection (it used to stop reading after 4 blocks and never answer).
#[tokio::test]
async fn session_deadlock_stale_upload_of_many_blocks_is_refused_and_session_keeps_serving() {
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let (mut rd, mut wr) = connect(srv.endpoint(), &token).await;
    let data = random_bytes(1, 12 << 20);
    let req = Request::Put {
        path: rel("big.bin"),
        base_rev: 5, // the path is at rev 0: stale
        hash: ContentHash::of(&data),
        size: data.len() as u64,
        meta: META,
        base: None,
    };
    let mut msgs = vec![ClientMsg::Req { id: 1, req }];
    for chunk in data.chunks(1 << 20) {
        msgs.push(ClientMsg::Data { id: 1, block: literal(chunk) });
    }
    msgs.push(ClientMsg::End { id: 1 });
    let r = refused(ask(&mut rd, &mut wr, 1, msgs, "a stale 12-block upload").await, "a stale upload");
    assert_eq!(r.kind, RefusalKind::Stale, "{r:?}");
    assert_serves(&mut rd, &mut wr, 2, "after the stale upload").await;
    // The same with a delta upload whose base the server does not hold.
    let req = Request::Put {
        path: rel("big.bin"),
        base_rev: 0,
        hash: ContentHash::of(&data),
        size: data.len() as u64,
        meta: META,
        base: Some(ContentHash::of(b"not there")),
    };
    let mut msgs = vec![ClientMsg::Req { id: 3, req }];
    for chunk in data.chunks(1 << 20) {
        msgs.push(ClientMsg::Data { id: 3, block: literal(chunk) });
    }
    msgs.push(ClientMsg::End { id: 3 });
    let r = refused(ask(&mut rd, &mut wr, 3, msgs, "a delta upload without base").await, "no base");
    assert_eq!(r.kind, RefusalKind::NotFound, "{r:?}");
    assert_serves(&mut rd, &mut wr, 4, "after the refused delta upload").await;
    assert!(list_tree(&files_dir(&srv)).is_empty(), "a refused upload landed");
    assert!(srv.temp_files().is_empty(), "temp files left: {:?}", srv.temp_files());
}

/// A refused upload that sends far more than its announced size is not drained forever: the
/// session is closed, and the server keeps serving others.
#[tokio::test]
async fn session_deadlock_refused_upload_is_drained_only_to_its_announced_size() {
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let (mut rd, mut wr) = connect(srv.endpoint(), &token).await;
    let block = literal(&random_bytes(2, 1 << 20));
    let req = Request::Put {
        path: rel("liar.bin"),
        base_rev: 9,
        hash: ContentHash::of(b"x"),
        size: 128 << 10,
        meta: META,
        base: Some(ContentHash::of(b"x")),
    };
    let mut msgs = vec![ClientMsg::Req { id: 1, req }];
    msgs.extend((0..32).map(|_| ClientMsg::Data { id: 1, block: block.clone() }));
    msgs.push(ClientMsg::End { id: 1 });
    match ask(&mut rd, &mut wr, 1, msgs, "an upload 256 times longer than announced").await {
        Answer::Closed => {}
        other => panic!("the server kept reading an upload far longer than announced: {other:?}"),
    }
    let (mut rd, mut wr) = connect(srv.endpoint(), &token).await;
    assert_serves(&mut rd, &mut wr, 1, "another connection").await;
}

/// Ctrl-C stops the server although a session is stuck in the middle of an upload whose client
/// went silent (the default 60 s stall timeout has not passed).
#[test]
fn session_deadlock_ctrl_c_stops_the_server_despite_a_stuck_session() {
    let mut srv = start_server();
    let token = add_account(&srv.data, "alice");
    let mut stuck = handshake_std(&srv, &token);
    let data = random_bytes(13, 12 << 20);
    let req = Request::Put {
        path: rel("big.bin"),
        base_rev: 5,
        hash: ContentHash::of(&data),
        size: data.len() as u64,
        meta: META,
        base: None,
    };
    let mut bytes = frame_of(&ClientMsg::Req { id: 1, req });
    for c in data.chunks(1 << 20).take(6) {
        bytes.extend(frame_of(&ClientMsg::Data { id: 1, block: literal(c) }));
    }
    stuck.write_all(&bytes).and_then(|()| stuck.flush()).expect("start of an upload");
    // The server has started on the upload (or is stuck in it); now stop it.
    std::thread::sleep(Duration::from_millis(500));
    let st = srv.interrupt(Duration::from_secs(40));
    let st = st.unwrap_or_else(|| panic!("the server ignored Ctrl-C for 40 s; log:\n{}", srv.log()));
    assert!(st.success(), "the server exited with {st} after Ctrl-C; log:\n{}", srv.log());
}

/// Small uploads are checked and written together (one trip to the blocking pool for many):
/// pipelined without waiting, with a stale one among them and a second version of a path right
/// after the first, every one is answered in order, the refused one alone is refused, and the
/// server ends with the last version of each path.
#[tokio::test]
async fn pipelined_small_uploads_are_answered_in_order_around_a_refused_one() {
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let (mut rd, mut wr) = connect(srv.endpoint(), &token).await;
    let content = |i: u64| format!("small file {i}\n").repeat(i as usize + 1).into_bytes();
    let mut msgs = Vec::new();
    for id in 1..=12u64 {
        let (path, base_rev) = match id {
            5 => ("f5.txt".to_string(), 9), // the path is at rev 0: stale
            8 => ("f3.txt".to_string(), 0), // f3.txt again, right behind its first version
            _ => (format!("f{id}.txt"), 0),
        };
        msgs.extend(put(id, &path, base_rev, &content(id), 0o644));
    }
    for m in &msgs {
        wr.feed(m).await.expect("send");
    }
    wr.flush().await.expect("flush");
    let mut answers = Vec::new();
    while answers.len() < 12 {
        let m = tokio::time::timeout(Duration::from_secs(60), rd.recv::<ServerMsg>())
            .await
            .expect("no answer within 60 s (hung)");
        match m {
            Ok(Some(ServerMsg::Resp { id, result })) => answers.push((id, result)),
            Ok(Some(ServerMsg::Notify { .. })) => {}
            other => panic!("unexpected {other:?} after {answers:?}"),
        }
    }
    let ids: Vec<u64> = answers.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids, (1..=12).collect::<Vec<_>>(), "answers out of order: {answers:?}");
    for (id, result) in &answers {
        match (id, result) {
            (5, Err(r)) => assert_eq!(r.kind, RefusalKind::Stale, "{r:?}"),
            // The first f3.txt committed, so the second (base_rev 0) is stale too.
            (8, Err(r)) => assert_eq!(r.kind, RefusalKind::Stale, "{r:?}"),
            (_, Ok(Reply::Committed { .. })) => {}
            other => panic!("upload {id}: {other:?}"),
        }
    }
    assert_serves(&mut rd, &mut wr, 13, "after the pipelined uploads").await;
    drop((rd, wr));
    let check = temp_dir("ds-faults-check-");
    pull(check.path(), &srv, &token);
    for id in (1..=12u64).filter(|i| ![5, 8].contains(i)) {
        assert_eq!(read(&check.path().join(format!("f{id}.txt"))), content(id), "f{id}.txt");
    }
    assert!(!check.path().join("f5.txt").exists(), "the stale upload landed");
}

// ---------------------------------------------------------------------------------------------
// 2. Mode bits

#[tokio::test]
async fn mode_bits_outside_permissions_are_never_stored_or_applied() {
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let (mut rd, mut wr) = connect(srv.endpoint(), &token).await;
    let small = b"#!/bin/sh\necho hi\n".to_vec();
    let big = random_bytes(3, 200 << 10); // the streamed (not held in memory) upload path
    let cases: [(&str, &[u8], u32); 4] = [
        ("suid.sh", &small, 0o4755),
        ("all.sh", &small, 0xFFFF_FFFF),
        ("suid-big.bin", &big, 0o6755),
        ("all-big.bin", &big, 0xFFFF_FFFF),
    ];
    let mut id = 0;
    for (name, data, mode) in cases {
        id += 1;
        let mut msgs = put(id, name, 0, data, mode);
        if data.len() > 64 << 10 {
            // Send the big one in 64 KiB blocks.
            msgs.truncate(1);
            for c in data.chunks(64 << 10) {
                msgs.push(ClientMsg::Data { id, block: literal(c) });
            }
            msgs.push(ClientMsg::End { id });
        }
        committed(ask(&mut rd, &mut wr, id, msgs, name).await, name);
    }
    id += 1;
    let mkdir = Request::Mkdir { path: rel("dir"), base_rev: 0, mode: 0xFFFF_FFFF };
    committed(ask(&mut rd, &mut wr, id, vec![ClientMsg::Req { id, req: mkdir }], "mkdir").await, "mkdir");
    // SetMeta on an existing file, then a Copy and a Move with set-uid modes.
    id += 1;
    let rev =
        match ask(&mut rd, &mut wr, id, vec![ClientMsg::Req { id, req: Request::Changes { since: 0 } }], "c")
            .await
        {
            Answer::Reply(Reply::Changes { entries, .. }) => {
                entries.iter().find(|e| e.path.as_str() == "suid.sh").map(|e| e.rev).expect("suid.sh listed")
            }
            other => panic!("changes: {other:?}"),
        };
    id += 1;
    let set = Request::SetMeta { path: rel("suid.sh"), base_rev: rev, meta: Meta { mode: 0o7777, ..META } };
    let rev =
        committed(ask(&mut rd, &mut wr, id, vec![ClientMsg::Req { id, req: set }], "setmeta").await, "sm");
    id += 1;
    let copy = Request::Copy {
        hash: ContentHash::of(&small),
        size: small.len() as u64,
        to: rel("copy.sh"),
        to_base_rev: 0,
        meta: Meta { mode: 0o4777, ..META },
    };
    committed(ask(&mut rd, &mut wr, id, vec![ClientMsg::Req { id, req: copy }], "copy").await, "copy");
    id += 1;
    let mv = Request::Move {
        from: rel("suid.sh"),
        from_rev: rev,
        to: rel("moved.sh"),
        to_base_rev: 0,
        meta: Meta { mode: 0o2755, ..META },
    };
    committed(ask(&mut rd, &mut wr, id, vec![ClientMsg::Req { id, req: mv }], "move").await, "move");

    // What the server records...
    id += 1;
    let entries =
        match ask(&mut rd, &mut wr, id, vec![ClientMsg::Req { id, req: Request::Changes { since: 0 } }], "c")
            .await
        {
            Answer::Reply(Reply::Changes { entries, .. }) => entries,
            other => panic!("changes: {other:?}"),
        };
    let mut live = 0;
    for e in &entries {
        let mode = match &e.node {
            Some(Node::File { meta, .. }) => meta.mode,
            Some(Node::Dir { mode }) => *mode,
            _ => continue,
        };
        live += 1;
        assert_eq!(mode & !0o777, 0, "`{}` is recorded with mode {mode:o}", e.path);
    }
    assert_eq!(live, 6, "{entries:?}");
    // ...and what it holds on its disk.
    let files = files_dir(&srv);
    for name in ["moved.sh", "all.sh", "suid-big.bin", "all-big.bin", "copy.sh", "dir"] {
        let mode = std::fs::symlink_metadata(files.join(name)).expect("stored").mode();
        assert_eq!(mode & 0o7000, 0, "`{name}` is stored on the server's disk with mode {mode:o}");
    }
    let mode = std::fs::metadata(files.join("all.sh")).expect("stored").mode();
    assert_eq!(mode & 0o777, 0o777, "the permission bits themselves are kept");
}

// ---------------------------------------------------------------------------------------------
// 3. Bounds per account

/// A delta upload whose copy ops would write far more than the disk holds (16 TiB from a 64 KiB
/// base) is refused before anything is written, and one that announces more than any file may
/// have is refused as invalid.
#[tokio::test]
async fn bounds_per_account_huge_announcements_are_refused_before_writing() {
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let (mut rd, mut wr) = connect(srv.endpoint(), &token).await;
    let base = random_bytes(4, 64 << 10);
    let mut msgs = put(1, "base.bin", 0, &base, 0o644);
    msgs.truncate(1);
    msgs.push(ClientMsg::Data { id: 1, block: literal(&base) });
    msgs.push(ClientMsg::End { id: 1 });
    let rev = committed(ask(&mut rd, &mut wr, 1, msgs, "base").await, "base");
    let huge = |id, size: u64| {
        let req = Request::Put {
            path: rel("base.bin"),
            base_rev: rev,
            hash: ContentHash::of(b"whatever"),
            size,
            meta: META,
            base: Some(ContentHash::of(&base)),
        };
        let mut m = vec![ClientMsg::Req { id, req }];
        // 64 MiB of copies per round: enough to see a temp file grow if nothing stopped it.
        m.extend((0..4).map(|_| ClientMsg::Data { id, block: copies(256, 64 << 10) }));
        m.push(ClientMsg::End { id });
        m
    };
    let r = refused(ask(&mut rd, &mut wr, 2, huge(2, 16 << 40), "16 TiB of copies").await, "16 TiB");
    assert!(r.message.contains("server out of disk space"), "{r:?}");
    let r = refused(ask(&mut rd, &mut wr, 3, huge(3, 1 << 62), "4 EiB").await, "4 EiB");
    assert_eq!(r.kind, RefusalKind::Invalid, "{r:?}");
    assert!(r.message.contains("more than the 16 TiB a file on this server may have"), "{r:?}");
    assert_serves(&mut rd, &mut wr, 4, "after the refusals").await;
    assert!(srv.temp_files().is_empty(), "temp files left: {:?}", srv.temp_files());
    assert_eq!(read(&files_dir(&srv).join("base.bin")), base);
}

/// `account quota` limits what an account may hold: a push past it fails with a message naming
/// the quota and the usage, `account list` shows both, and raising the quota lets the next push
/// converge.
#[test]
fn bounds_per_account_quota_refuses_uploads_past_it() {
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let quota =
        |size: &str| run(command().args(["account", "quota", "alice", size, "--data"]).arg(&srv.data));
    quota("1M").ok("account quota");
    let bad = quota("12X");
    assert!(!bad.success() && bad.stderr.contains("is not a size"), "{}", bad.dump());
    let nobody = run(command().args(["account", "quota", "nobody", "1G", "--data"]).arg(&srv.data));
    assert!(!nobody.success() && nobody.stderr.contains("no account named `nobody`"), "{}", nobody.dump());

    let dir = temp_dir("ds-quota-");
    write(&dir.path().join("a.bin"), random_bytes(5, 600 << 10));
    write(&dir.path().join("small/b.txt"), "fits\n");
    push(dir.path(), &srv, &token);
    // Two more files that each fit alone but not together, and one far too big: one push.
    write(&dir.path().join("c.bin"), random_bytes(6, 200 << 10));
    write(&dir.path().join("d.bin"), random_bytes(7, 200 << 10));
    write(&dir.path().join("e.bin"), random_bytes(8, 2 << 20));
    let out = sync_cmd("push", dir.path(), &srv, &token, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", out.dump());
    assert!(
        out.stderr.contains("account alice is over its quota")
            && out.stderr.contains("of 1 MiB")
            && out.stderr.contains("`deltasync account quota alice SIZE`"),
        "{}",
        out.dump()
    );
    let list = run(command().args(["account", "list", "--data"]).arg(&srv.data)).ok("account list");
    assert!(list.stdout.contains("quota 1 MiB"), "{}", list.dump());
    let used: u64 = list
        .stdout
        .lines()
        .find_map(|l| l.split_once(" used (")?.1.split_once(" bytes")?.0.parse().ok())
        .unwrap_or_else(|| panic!("no usage in {}", list.dump()));
    assert!(used <= 1 << 20, "alice holds {used} bytes over a 1 MiB quota");
    assert!(used >= (600 << 10) + (200 << 10), "usage {used} misses files: {}", list.dump());
    // The first line of each account keeps its format (`NAME\tN changes`).
    assert!(account_changes(&srv.data, "alice") >= 3);

    quota("none").ok("account quota none");
    push(dir.path(), &srv, &token);
    let check = temp_dir("ds-quota-check-");
    pull(check.path(), &srv, &token);
    assert_same_tree(dir.path(), check.path());
    let list = run(command().args(["account", "list", "--data"]).arg(&srv.data)).ok("account list");
    assert!(list.stdout.contains("no quota"), "{}", list.dump());
    let want = (600u64 << 10) + 5 + (400 << 10) + (2 << 20);
    assert!(list.stdout.contains(&format!("({want} bytes)")), "expected {want} bytes used: {}", list.dump());
}

// ---------------------------------------------------------------------------------------------
// 4. Path length

// ---------------------------------------------------------------------------------------------
// 5. Stalls and timeouts

/// Handshake over a blocking TLS connection.
fn handshake_std(srv: &Server, token: &str) -> TlsStream {
    let mut s = srv.tls();
    let hello = Hello {
        magic: MAGIC,
        version: PROTOCOL_VERSION,
        token: Some(token.into()),
        device: "raw".into(),
        folder: "default".into(),
    };
    let body = postcard::to_allocvec(&hello).expect("encode");
    let mut f = (body.len() as u32).to_be_bytes().to_vec();
    f.extend_from_slice(&body);
    s.write_all(&f).and_then(|()| s.flush()).expect("send hello");
    let mut len = [0u8; 4];
    s.read_exact(&mut len).expect("welcome length");
    let mut payload = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut payload).expect("welcome");
    match postcard::from_bytes::<Welcome>(&payload) {
        Ok(Welcome::Accepted { .. }) => s,
        other => panic!("handshake refused: {other:?}"),
    }
}

fn frame_of(msg: &ClientMsg) -> Vec<u8> {
    let body = postcard::to_allocvec(msg).expect("encode");
    let mut f = (body.len() as u32).to_be_bytes().to_vec();
    f.extend_from_slice(&body);
    f
}

/// Waits until the server closes `s`; panics after `deadline`.
fn wait_closed(s: &mut TlsStream, deadline: Duration, what: &str) {
    let end = Instant::now() + deadline;
    s.get_ref().set_read_timeout(Some(Duration::from_millis(200))).expect("timeout");
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) =>
            {
                assert!(
                    Instant::now() <= end,
                    "{what}: the server kept the connection open for {deadline:?}"
                );
            }
            Err(_) => return, // reset, or TLS closed without close_notify: closed too
        }
    }
}

/// A client that asks for a big file and then stops reading held its session forever (the
/// server's write waited with no end). With `DELTASYNC_IO_TIMEOUT_SECS=2` it is dropped.
#[test]
fn stalls_and_timeouts_a_client_that_stops_reading_is_dropped() {
    let srv = start_server_with(None, &[("DELTASYNC_IO_TIMEOUT_SECS", "2")]);
    let token = add_account(&srv.data, "alice");
    let dir = temp_dir("ds-stall-read-");
    let size = 48 << 20;
    write(&dir.path().join("big.bin"), random_bytes(12, size));
    push(dir.path(), &srv, &token);
    let mut s = handshake_std(&srv, &token);
    let path = RelPath::new("big.bin").expect("path");
    s.write_all(&frame_of(&ClientMsg::Req { id: 1, req: Request::Get { path, have: None } }))
        .and_then(|()| s.flush())
        .expect("get");
    std::thread::sleep(Duration::from_secs(6));
    // Everything the server managed to send sits in the socket buffers; then the end.
    s.get_ref().set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
    let mut buf = vec![0u8; 1 << 16];
    let mut got = 0;
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("the server still held the stalled session after sending {got} bytes")
            }
            Err(_) => break, // reset, or TLS closed without close_notify: closed too
        }
    }
    assert!(got < size, "the whole file arrived although the client stopped reading ({got} bytes)");
    let check = temp_dir("ds-stall-read-check-");
    pull(check.path(), &srv, &token);
}

/// With `DELTASYNC_IO_TIMEOUT_SECS=2`: half a frame then silence, or an upload that stops
/// between its blocks, is closed; meanwhile other sessions are served, and a connection idle
/// between frames for longer than that stays open.
#[test]
fn stalls_and_timeouts_half_a_frame_closes_the_session_only() {
    let srv = start_server_with(None, &[("DELTASYNC_IO_TIMEOUT_SECS", "2")]);
    let token = add_account(&srv.data, "alice");
    let idle = handshake_std(&srv, &token);

    let mut half = handshake_std(&srv, &token);
    let ping = frame_of(&ClientMsg::Req { id: 1, req: Request::Ping });
    let big = frame_of(&ClientMsg::Data { id: 1, block: literal(&random_bytes(9, 4096)) });
    half.write_all(&big[..big.len() / 2]).and_then(|()| half.flush()).expect("half a frame");

    let mut mid_upload = handshake_std(&srv, &token);
    let data = random_bytes(10, 1 << 20);
    let mut start = frame_of(&put(1, "stalled.bin", 0, &data, 0o644)[0]);
    start.extend(frame_of(&ClientMsg::Data { id: 1, block: literal(&data[..4096]) }));
    mid_upload.write_all(&start).and_then(|()| mid_upload.flush()).expect("start of an upload");

    // Other sessions work meanwhile.
    let dir = temp_dir("ds-stall-");
    write(&dir.path().join("x.txt"), "served\n");
    push(dir.path(), &srv, &token);

    wait_closed(&mut half, Duration::from_secs(60), "half a frame");
    wait_closed(&mut mid_upload, Duration::from_secs(60), "an upload stalled between blocks");
    assert!(srv.temp_files().is_empty(), "the stalled upload left {:?}", srv.temp_files());

    // The idle connection (longer than the 2 s stall timeout by now) still answers a Ping.
    let mut idle = idle;
    std::thread::sleep(Duration::from_secs(3));
    idle.write_all(&ping).and_then(|()| idle.flush()).expect("ping on the idle connection");
    idle.get_ref().set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    let mut len = [0u8; 4];
    idle.read_exact(&mut len).expect("the idle connection was closed");
    let mut payload = vec![0u8; u32::from_be_bytes(len) as usize];
    idle.read_exact(&mut payload).expect("reply");
    match postcard::from_bytes::<ServerMsg>(&payload) {
        Ok(ServerMsg::Resp { id: 1, result: Ok(Reply::Ok) }) => {}
        other => panic!("the idle connection's Ping got {other:?}"),
    }
    let check = temp_dir("ds-stall-check-");
    pull(check.path(), &srv, &token);
    assert_eq!(list_tree(check.path()), ["x.txt"]);
}

// ---------------------------------------------------------------------------------------------
// 6. Server identity and journal position in the handshake

/// deltasync's own client, connected to `addr` trusting `trust`.
async fn client(addr: &str, token: &str, trust: Trust) -> deltasync::client::Client {
    let c = deltasync::client::Connect {
        addr,
        token: Some(token),
        device: "t",
        folder: "default",
        trust,
        from_flag: false,
        timeout: Duration::from_secs(10),
        bwlimit: Default::default(),
    };
    deltasync::client::Client::connect(&c).await.expect("connect")
}

#[tokio::test]
async fn handshake_carries_server_identity_and_journal_position() {
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let c1 = client(&srv.address(), &token, Trust::New).await;
    assert_ne!(c1.server_id, [0u8; 16]);
    assert_eq!(c1.server_seq, 0);
    assert_eq!(c1.seen.fingerprint, Some(srv.endpoint().fingerprint), "not the certificate it printed");
    let first_id = c1.server_id;
    // Trusted from now on, as a folder remembers it.
    let pinned = Trust::Pinned(c1.seen.fingerprint.expect("seen"));
    drop(c1);
    let (srv, token) = tokio::task::spawn_blocking(move || {
        let dir = temp_dir("ds-id-");
        write(&dir.path().join("a.txt"), "a\n");
        write(&dir.path().join("b/c.txt"), "c\n");
        push(dir.path(), &srv, &token);
        (srv.restart(), token)
    })
    .await
    .expect("push");
    let changes = account_changes(&srv.data, "alice");
    let c2 = client(&srv.address(), &token, pinned.clone()).await;
    assert_eq!(c2.server_seq, changes, "the handshake's seq is not the account's journal position");
    assert!(c2.server_seq >= 3);
    assert_eq!(c2.server_id, first_id, "the server's identity changed across a restart");
    let other = start_server();
    let token2 = add_account(&other.data, "alice");
    let c3 = client(&other.address(), &token2, Trust::New).await;
    assert_ne!(c3.server_id, c2.server_id, "two data folders share an identity");
    assert_ne!(c3.seen.fingerprint, c2.seen.fingerprint, "two data folders share a certificate");
    let c4 = client(&srv.address(), &token, pinned).await;
    assert_eq!(c4.server_id, c2.server_id);
}

// ---------------------------------------------------------------------------------------------
// 7. Server full disk

#[test]
fn server_full_disk_is_reported_and_the_next_push_converges() {
    if euid() != 0 {
        println!("skipped: mounting a small tmpfs for the server's data folder needs root");
        return;
    }
    let (_holder, guard) = mount_tmpfs("8m");
    let mnt = guard.0.clone();
    let data = mnt.join("data");
    let srv = start_server_with(Some(&data), &[]);
    let alice = add_account(&srv.data, "alice");
    let bob = add_account(&srv.data, "bob");
    let bob_dir = temp_dir("ds-full-bob-");
    write(&bob_dir.path().join("bob.txt"), "bob's file\n");
    push(bob_dir.path(), &srv, &bob);
    let dir = temp_dir("ds-full-alice-");
    write(&dir.path().join("first.txt"), "before the disk filled\n");
    push(dir.path(), &srv, &alice);

    // Fill the disk but about 1 MiB, then push two 1.5 MiB files and an edit.
    let filler = mnt.join("filler");
    {
        let mut f = std::fs::File::create(&filler).expect("filler");
        let chunk = vec![0xA5u8; 64 << 10];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
    }
    let len = std::fs::metadata(&filler).expect("filler").len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&filler)
        .and_then(|f| f.set_len(len.saturating_sub(1 << 20)))
        .expect("shrink filler");
    write(&dir.path().join("a.bin"), random_bytes(11, 1536 << 10));
    write(&dir.path().join("b.bin"), random_bytes(12, 1536 << 10));
    write(&dir.path().join("first.txt"), "edited while the disk was full\n");
    let out = sync_cmd("push", dir.path(), &srv, &alice, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", out.dump());
    assert!(out.stderr.contains("server out of disk space"), "{}", out.dump());
    assert!(srv.temp_files().is_empty(), "temp files left on the full disk: {:?}", srv.temp_files());
    // Nothing torn: whatever alice's folder on the server holds is a whole version.
    let files = srv.files();
    for name in list_tree(&files) {
        let got = read(&files.join(&name));
        let want = read(&dir.path().join(&name));
        let old = b"before the disk filled\n".to_vec();
        assert!(got == want || (name == "first.txt" && got == old), "`{name}` is torn on the server");
    }
    // Other accounts keep working.
    let bob_check = temp_dir("ds-full-bob-check-");
    pull(bob_check.path(), &srv, &bob);
    assert_same_tree(bob_dir.path(), bob_check.path());

    std::fs::remove_file(&filler).expect("free space");
    push(dir.path(), &srv, &alice);
    let check = temp_dir("ds-full-check-");
    pull(check.path(), &srv, &alice);
    assert_same_tree(dir.path(), check.path());
    drop(srv);
}
