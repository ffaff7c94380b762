//! The client never diverges, never crashes and never loses a file: replaced node kinds arrive,
//! killed pulls leave no temp files behind, and a broken or hostile server (a small fake one
//! written here with the real protocol types) can neither make it write elsewhere, nor grow it
//! without end, nor hang it, nor make set-uid files.

use std::io::Read;
use std::net::TcpListener;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use deltasync::delta::{Block, encode_whole};
use deltasync::hash::ContentHash;
use deltasync::path::RelPath;
use deltasync::protocol::{ClientMsg, Entry, Hello, Meta, Node, Reply, Request, ServerMsg, Welcome};

use crate::util::*;

/// No pull or push prints this when nothing changed on its computer during the run.
const CHANGED_HERE: &str = "changed here while downloading";

/// Pulls into `b` and checks it arrived with no "changed here" note, twice (the second run must be
/// quiet too: the bug was a note on every run, forever).
fn pull_cleanly(b: &Path, srv: &Server, token: &str) {
    for _ in 0..2 {
        let out = pull(b, srv, token);
        assert!(!out.stdout.contains(CHANGED_HERE) && !out.stderr.contains(CHANGED_HERE), "{}", out.dump());
    }
}

#[test]
fn replaced_symlink_file_or_directory_arrives_on_the_other_computer() {
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let a = temp_dir("ds-a-");
    let b = temp_dir("ds-b-");
    let (a, b) = (a.path(), b.path());
    write(&a.join("target.txt"), "the link's target\n");
    symlink("target.txt", a.join("l")).unwrap();
    write(&a.join("f"), "a regular file\n");
    write(&a.join("d/inside.txt"), "in d\n");
    push(a, &srv, &token);
    pull(b, &srv, &token);
    assert_same_tree(a, b);

    // An editor's atomic save over a link replaces the link by a regular file.
    let tmp = a.join("l.swp");
    write(&tmp, "the link is a file now\n");
    std::fs::rename(&tmp, a.join("l")).unwrap();
    // And the other ways round: a file replaced by a link, a directory by a file.
    std::fs::remove_file(a.join("f")).unwrap();
    symlink("target.txt", a.join("f")).unwrap();
    std::fs::remove_dir_all(a.join("d")).unwrap();
    write(&a.join("d"), "d is a file now\n");
    push(a, &srv, &token);

    pull_cleanly(b, &srv, &token);
    assert_same_tree(a, b);
    assert_eq!(read_string(&b.join("l")), "the link is a file now\n");
    assert!(std::fs::symlink_metadata(b.join("f")).unwrap().file_type().is_symlink());
    assert_eq!(read_string(&b.join("d")), "d is a file now\n");

    // Back again: the file becomes a link, the link a file.
    std::fs::remove_file(a.join("l")).unwrap();
    symlink("target.txt", a.join("l")).unwrap();
    std::fs::remove_file(a.join("f")).unwrap();
    write(&a.join("f"), "f is a file again\n");
    push(a, &srv, &token);
    pull_cleanly(b, &srv, &token);
    assert_same_tree(a, b);
}

/// `.deltasync-tmp-*` files anywhere under `dir`, outside its `.deltasync/`.
/// Everything in `dir` and below it.
fn walkdir(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walkdir(&p));
        }
        out.push(p);
    }
    out
}

fn temp_files(dir: &Path) -> Vec<String> {
    list_tree(dir)
        .into_iter()
        .filter(|p| p.rsplit('/').next().is_some_and(|n| n.starts_with(".deltasync-tmp-")))
        .collect()
}

/// Runs a pull into `b` and kills it (SIGKILL: no destructor runs) once `now()` holds, or after
/// it ends by itself or after two minutes; true if `now()` held.
fn pull_killed_once(b: &Path, srv: &Server, token: &str, now: impl Fn() -> bool) -> bool {
    let mut child = sync_command("pull", b, &srv.address(), token, &[])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn deltasync pull");
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut held = false;
    while Instant::now() < deadline && child.try_wait().unwrap().is_none() {
        if now() {
            held = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    held
}

#[test]
fn killed_pulls_leave_no_temp_files_after_a_later_pull() {
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let a = temp_dir("ds-a-");
    let b = temp_dir("ds-b-");
    let (a, b) = (a.path(), b.path());
    let size = 96 << 20;
    let mut killed_midway = 0;
    for round in 0..4u64 {
        // New content each time, so every pull has a big download to be killed in.
        write(&a.join("sub/big.bin"), random_bytes(100 + round, size));
        push(a, &srv, &token);
        // Killed once the download has written part of its file (in `.deltasync/`, never in the
        // folder itself).
        let seen = pull_killed_once(b, &srv, &token, || {
            std::fs::read_dir(b.join(".deltasync/partial"))
                .into_iter()
                .flatten()
                .flatten()
                .any(|e| e.metadata().is_ok_and(|m| m.len() > 0 && m.len() < size as u64))
        });
        assert_eq!(temp_files(b), Vec::<String>::new(), "a killed pull left temp files in the folder");
        if seen && !b.join("sub/big.bin").exists() {
            killed_midway += 1;
        }
    }
    assert!(killed_midway > 0, "no pull was killed mid-download; the test proves nothing");

    let out = pull(b, &srv, &token);
    assert_eq!(
        temp_files(b),
        Vec::<String>::new(),
        "leftovers stayed after a completed pull\n{}",
        out.dump()
    );
    // The temp folder and its slots (folders a pull's batches take in turn).
    let tmp: Vec<_> = walkdir(&b.join(".deltasync/tmp")).into_iter().filter(|p| !p.is_dir()).collect();
    assert!(tmp.is_empty(), "temp files stayed in .deltasync/tmp: {tmp:?}");
    assert_same_tree(a, b);
}

/// A pull of many small files killed between two batches leaves nothing in the temp folder,
/// even before a later run cleans up: a download to a path where nothing was is written as an
/// unnamed file (`O_TMPFILE`), which the file system frees when the process dies, and is linked
/// into place. (Named temp files stayed in `.deltasync/tmp/` until the next run removed them.)
#[test]
fn a_killed_pull_of_new_files_leaves_nothing_to_clean_up() {
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let a = temp_dir("ds-a-");
    let b = temp_dir("ds-b-");
    let (a, b) = (a.path(), b.path());
    let files = 12_000;
    for i in 0..files {
        write(&a.join(format!("d{}/f{i}.bin", i / 1000)), random_bytes(i as u64, 2048));
    }
    push(a, &srv, &token);
    let placed =
        |b: &Path| walkdir(b).into_iter().filter(|p| p.extension().is_some_and(|e| e == "bin")).count();
    let mut killed_midway = false;
    for _ in 0..3 {
        let _ = std::fs::remove_dir_all(b);
        // Killed once its first batch is in place, while the next ones are being written.
        pull_killed_once(b, &srv, &token, || placed(b) > 0);
        let tmp: Vec<_> = walkdir(&b.join(".deltasync/tmp")).into_iter().filter(|p| !p.is_dir()).collect();
        assert!(tmp.is_empty(), "a killed pull left files in .deltasync/tmp: {tmp:?}");
        assert_eq!(temp_files(b), Vec::<String>::new(), "a killed pull left temp files in the folder");
        let n = placed(b);
        if n > 0 && n < files {
            killed_midway = true;
            break;
        }
    }
    assert!(killed_midway, "no pull was killed between its batches; the test proves nothing");
    pull_cleanly(b, &srv, &token);
    assert_same_tree(a, b);
}

// ---------------------------------------------------------------------------------------------
// A fake server

/// The next request (content frames of uploads are skipped).
fn next_request(s: &mut impl Read) -> Option<(u64, Request)> {
    loop {
        match recv_frame::<ClientMsg>(s)? {
            ClientMsg::Req { id, req } => return Some((id, req)),
            _ => continue,
        }
    }
}

/// Listens on a free port; accepts one client (TLS with the fake servers' certificate), answers
/// its `Hello`, then lets `behave` have the connection. Returns the address for `--server`.
fn fake_server(behave: impl FnOnce(FakeServerStream) + Send + 'static) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        let Ok(mut s) = fake_accept(&l) else { return };
        let Some(_hello) = recv_frame::<Hello>(&mut s) else { return };
        if send_frame(
            &mut s,
            &Welcome::Accepted {
                account: "fake".into(),
                new_token: None,
                server_id: [7; 16],
                seq: 0,
                folder: "default".into(),
            },
        )
        .is_ok()
        {
            behave(s);
        }
    });
    addr
}

/// Reads and drops whatever the client sends until it closes (EOF, or any error: a reset, or
/// over TLS a close without `close_notify`).
fn drain(mut s: FakeServerStream) {
    let mut buf = [0u8; 1 << 16];
    while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
}

fn file_entry(path: &str, rev: u64, data: &[u8]) -> Entry {
    Entry {
        path: RelPath::new(path).unwrap(),
        rev,
        node: Some(Node::File {
            hash: ContentHash::of(data),
            size: data.len() as u64,
            meta: Meta { mtime_ns: 1_000_000_000_000_000_000, mode: 0o644 },
        }),
        device: "elsewhere".into(),
    }
}

fn blocks(data: &[u8]) -> Vec<Block> {
    let mut v = Vec::new();
    encode_whole(data, None, |b, _| {
        v.push(b);
        Ok(())
    })
    .unwrap();
    v
}

/// A pull against `addr` (a fake server) that gives up after 3 s of silence.
fn pull_from(dir: &Path, addr: &str) -> Output {
    run(sync_command("pull", dir, addr, "token", &[]).env("DELTASYNC_IO_TIMEOUT_SECS", "3"))
}

#[test]
fn a_download_answered_with_another_path_is_refused() {
    let data = b"the server's bytes, meant to overwrite something\n".to_vec();
    let addr = fake_server(move |mut s| {
        let Some((id, Request::Changes { .. })) = next_request(&mut s) else { return };
        let page = Reply::Changes { entries: vec![file_entry("wanted.txt", 1, &data)], seq: 1, more: false };
        send_frame(&mut s, &ServerMsg::Resp { id, result: Ok(page) }).unwrap();
        let Some((id, Request::Get { path, .. })) = next_request(&mut s) else { return };
        assert_eq!(path.as_str(), "wanted.txt");
        // The reply names another path: a file this computer never synced.
        let reply = Reply::File { entry: file_entry("victim.txt", 1, &data), base: None };
        let _ = send_frame(&mut s, &ServerMsg::Resp { id, result: Ok(reply) });
        for block in blocks(&data) {
            let _ = send_frame(&mut s, &ServerMsg::Data { id, block });
        }
        let _ = send_frame(&mut s, &ServerMsg::End { id });
        drain(s);
    });
    let b = temp_dir("ds-b-");
    write(&b.path().join("victim.txt"), "precious, never synced\n");
    let out = pull_from(b.path(), &addr);
    assert!(!out.success(), "{}", out.dump());
    assert!(out.stderr.contains("asked for `wanted.txt`, the server sent `victim.txt`"), "{}", out.dump());
    assert_eq!(read_string(&b.path().join("victim.txt")), "precious, never synced\n");
    assert!(!b.path().join("wanted.txt").exists());
    assert_eq!(temp_files(b.path()), Vec::<String>::new());
}

/// A file made here while the server's version of that path was on its way is kept: the
/// download is put in place only where the round saw nothing, in one step that never replaces.
#[test]
fn a_file_made_here_while_it_downloads_is_kept() {
    let data = b"the server's version\n".to_vec();
    let b = temp_dir("ds-b-");
    let here = b.path().join("new.txt");
    let mine = here.clone();
    let addr = fake_server(move |mut s| {
        let Some((id, Request::Changes { .. })) = next_request(&mut s) else { return };
        let page = Reply::Changes { entries: vec![file_entry("new.txt", 1, &data)], seq: 1, more: false };
        send_frame(&mut s, &ServerMsg::Resp { id, result: Ok(page) }).unwrap();
        let Some((id, Request::Get { path, .. })) = next_request(&mut s) else { return };
        assert_eq!(path.as_str(), "new.txt");
        // The round has scanned and seen nothing there; the user saves a file now.
        write(&mine, "made here meanwhile\n");
        let reply = Reply::File { entry: file_entry("new.txt", 1, &data), base: None };
        let _ = send_frame(&mut s, &ServerMsg::Resp { id, result: Ok(reply) });
        for block in blocks(&data) {
            let _ = send_frame(&mut s, &ServerMsg::Data { id, block });
        }
        let _ = send_frame(&mut s, &ServerMsg::End { id });
        drain(s);
    });
    let out =
        run(sync_command("pull", b.path(), &addr, "token", &["-v"]).env("DELTASYNC_IO_TIMEOUT_SECS", "3"));
    assert_eq!(read_string(&here), "made here meanwhile\n", "{}", out.dump());
    assert!(out.stdout.contains(CHANGED_HERE) || out.stderr.contains(CHANGED_HERE), "{}", out.dump());
    assert_eq!(temp_files(b.path()), Vec::<String>::new());
}

/// A folder swapped for a symlink to somewhere else while downloads into it were on their way:
/// nothing lands where the symlink leads. Downloads are renamed into place a batch at a time,
/// later than they are received, so the folder is checked again just before the renames.
#[test]
fn a_folder_swapped_for_a_symlink_during_a_pull_leads_nowhere() {
    let (a, b) = (b"first\n".to_vec(), b"second\n".to_vec());
    let dir = temp_dir("ds-b-");
    let elsewhere = temp_dir("ds-elsewhere-");
    let (sub, target) = (dir.path().join("sub"), elsewhere.path().to_path_buf());
    let addr = fake_server(move |mut s| {
        let Some((id, Request::Changes { .. })) = next_request(&mut s) else { return };
        let dir_entry = Entry {
            path: RelPath::new("sub").unwrap(),
            rev: 1,
            node: Some(Node::Dir { mode: 0o755 }),
            device: "other".into(),
        };
        let entries = vec![dir_entry, file_entry("sub/a.txt", 2, &a), file_entry("sub/b.txt", 3, &b)];
        let page = Reply::Changes { entries, seq: 3, more: false };
        send_frame(&mut s, &ServerMsg::Resp { id, result: Ok(page) }).unwrap();
        let mut gets = Vec::new();
        while gets.len() < 2 {
            let Some((id, Request::Get { path, .. })) = next_request(&mut s) else { return };
            gets.push((id, path));
        }
        for (n, (id, path)) in gets.into_iter().enumerate() {
            let data = if path.as_str() == "sub/a.txt" { &a } else { &b };
            if n == 1 {
                // The first one is in (waiting for its batch's renames): the folder goes.
                std::thread::sleep(Duration::from_millis(300));
                std::fs::remove_dir_all(&sub).unwrap();
                symlink(&target, &sub).unwrap();
            }
            let reply = Reply::File { entry: file_entry(path.as_str(), 2 + n as u64, data), base: None };
            let _ = send_frame(&mut s, &ServerMsg::Resp { id, result: Ok(reply) });
            for block in blocks(data) {
                let _ = send_frame(&mut s, &ServerMsg::Data { id, block });
            }
            let _ = send_frame(&mut s, &ServerMsg::End { id });
        }
        drain(s);
    });
    let out =
        run(sync_command("pull", dir.path(), &addr, "token", &["-v"]).env("DELTASYNC_IO_TIMEOUT_SECS", "3"));
    assert_eq!(
        list_tree(elsewhere.path()),
        Vec::<String>::new(),
        "written through the symlink\n{}",
        out.dump()
    );
    assert!(!out.success(), "{}", out.dump());
    assert!(out.stderr.contains("symlinks are never followed"), "{}", out.dump());
}

#[test]
fn a_silent_server_does_not_hang_the_client() {
    // It takes the requests and never answers.
    let addr = fake_server(drain);
    let b = temp_dir("ds-b-");
    let out = pull_from(b.path(), &addr);
    assert!(!out.success(), "{}", out.dump());
    assert!(out.stderr.contains("nothing came from the server for 3 s"), "{}", out.dump());

    // It answers the list of changes, then reads nothing more of a big upload.
    let addr = fake_server(|mut s| {
        let Some((id, Request::Changes { .. })) = next_request(&mut s) else { return };
        let page = Reply::Changes { entries: vec![], seq: 0, more: false };
        send_frame(&mut s, &ServerMsg::Resp { id, result: Ok(page) }).unwrap();
        // Holds the connection open, unread, until the client gives up and closes it.
        std::thread::sleep(Duration::from_secs(100));
    });
    let a = temp_dir("ds-a-");
    write(&a.path().join("big.bin"), random_bytes(7, 64 << 20));
    let out = run(sync_command("push", a.path(), &addr, "token", &[]).env("DELTASYNC_IO_TIMEOUT_SECS", "3"));
    assert!(!out.success(), "{}", out.dump());
    assert!(out.stderr.contains("nothing came from the server for 3 s"), "{}", out.dump());
}

#[test]
fn endless_pages_of_changes_are_refused() {
    // The same page again and again, each announcing more.
    let addr = fake_server(|mut s| {
        let Some((id, Request::Changes { .. })) = next_request(&mut s) else { return };
        let entries: Vec<Entry> =
            (0..1000).map(|i| file_entry(&format!("dir/file-{i:04}.txt"), 1 + i / 10, b"x")).collect();
        // "Endless": far more than the client should take; a bounded number, so a client without
        // the check is not grown without end by this test.
        for n in 0..500 {
            let page = Reply::Changes { entries: entries.clone(), seq: 100, more: n < 499 };
            if send_frame(&mut s, &ServerMsg::Resp { id, result: Ok(page) }).is_err() {
                return;
            }
        }
        drain(s);
    });
    let b = temp_dir("ds-b-");
    let out = pull_from(b.path(), &addr);
    assert!(!out.success(), "{}", out.dump());
    assert!(out.stderr.contains("the server's list of changes since 0 goes back"), "{}", out.dump());
    assert!(list_tree(b.path()).is_empty(), "{:?}", list_tree(b.path()));
}

#[test]
fn set_uid_set_gid_and_sticky_bits_never_arrive() {
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let a = temp_dir("ds-a-");
    let b = temp_dir("ds-b-");
    let (a, b) = (a.path(), b.path());
    write(&a.join("tool"), "#!/bin/sh\necho set-uid\n");
    std::fs::set_permissions(a.join("tool"), std::fs::Permissions::from_mode(0o4755)).unwrap();
    std::fs::create_dir(a.join("shared")).unwrap();
    std::fs::set_permissions(a.join("shared"), std::fs::Permissions::from_mode(0o1777)).unwrap();
    write(&a.join("shared/inside.txt"), "x");
    // Only meaningful if this file system kept the bits on A.
    assert_eq!(std::fs::metadata(a.join("tool")).unwrap().mode() & 0o7777, 0o4755);
    push(a, &srv, &token);
    pull(b, &srv, &token);
    assert_eq!(std::fs::metadata(b.join("tool")).unwrap().mode() & 0o7777, 0o755);
    assert_eq!(std::fs::metadata(b.join("shared")).unwrap().mode() & 0o7000, 0);
    assert_eq!(read_string(&b.join("tool")), "#!/bin/sh\necho set-uid\n");
    // The server holds no such file either (as an export writes it).
    let files = srv.files();
    for name in ["tool", "shared"] {
        let md = std::fs::metadata(files.join(name)).unwrap();
        assert_eq!(md.mode() & 0o7000, 0, "{name} on the server: {:o}", md.mode());
    }
}

/// Issue 9, "SIGBUS": the client mapped the file it pushed, and a file truncated under the map
/// killed it with SIGBUS at the first page past the new end (six tries of six). Files are read
/// now: a short read is a file that changed, which the next round sends.
#[test]
fn sigbus_a_file_truncated_while_it_is_pushed_never_kills_the_client() {
    use std::os::unix::fs::FileExt;
    use std::os::unix::process::ExitStatusExt;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let a = temp_dir("ds-a-");
    let b = temp_dir("ds-b-");
    let (a, b) = (a.path(), b.path());
    let size = 64 << 20;
    let versions = Arc::new([random_bytes(9001, size), random_bytes(9002, size)]);
    let file = a.join("big.bin");
    write(&file, &versions[0]);
    // On the server first, so the tries below are deltas as well as whole uploads.
    push(a, &srv, &token);

    // Cut the file short, then write it back whole (the other version each time), over and over,
    // in place: the same inode a push has open.
    let stop = Arc::new(AtomicBool::new(false));
    let rewrites = Arc::new(AtomicUsize::new(0));
    let writer = {
        let (stop, rewrites, versions, file) =
            (stop.clone(), rewrites.clone(), versions.clone(), file.clone());
        std::thread::spawn(move || {
            let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
            let cuts = [0u64, 1 << 20, 17 << 20, 40 << 20, 63 << 20];
            let mut k = 0usize;
            while !stop.load(Ordering::Relaxed) {
                // Whole for a while (a push's scan and its open then agree on the size), then cut
                // while it is being read.
                std::thread::sleep(Duration::from_millis(5 + (k as u64 * 7) % 40));
                f.set_len(cuts[k % cuts.len()]).unwrap();
                std::thread::sleep(Duration::from_millis(2));
                f.write_all_at(&versions[k % 2], 0).unwrap();
                k += 1;
                rewrites.store(k, Ordering::Relaxed);
            }
        })
    };
    // At least ten pushes, and on until the file has been cut twenty times.
    let mut attempt = 0;
    while attempt < 10 || (rewrites.load(Ordering::Relaxed) < 20 && attempt < 100) {
        attempt += 1;
        let out = sync_cmd("push", a, &srv, &token, &[]);
        assert!(
            out.status.signal().is_none() && out.status.code().is_some(),
            "try {attempt}: the client was killed ({}) while the file was being truncated\n{}",
            out.status,
            out.dump()
        );
        for word in ["SIGBUS", "signal"] {
            assert!(!out.stderr.contains(word), "try {attempt}: `{word}` in stderr\n{}", out.dump());
        }
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    let cuts = rewrites.load(Ordering::Relaxed);
    assert!(cuts >= 20, "the file was cut only {cuts} times in {attempt} pushes; the test proves little");

    // Left alone, it converges.
    write(&file, &versions[1]);
    push(a, &srv, &token);
    pull(b, &srv, &token);
    assert!(read(&b.join("big.bin")) == versions[1], "the pulled copy differs from the file");
}
