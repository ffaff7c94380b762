//! Big transfers cut off midway continue where they stopped: a push killed halfway through a big
//! upload sends only the rest the next time (the server kept the start), a pull killed halfway
//! through a big download fetches only the rest (the client kept the start in `.deltasync/`), and
//! a pull cut off at any point leaves nothing in the user's folder.
//!
//! To cut a transfer off midway on any machine, however loaded, the client runs in slices of a few
//! milliseconds and is stopped (SIGSTOP) in between: the test looks at how far the transfer got
//! while the client stands still, and kills it once that is far enough. A slice moves the transfer
//! by a few MiB at most (what fits in the socket buffers), so it never ends between two looks.

use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use deltasync::hash::ContentHash;
use deltasync::protocol::{ClientMsg, Hello, Refusal, RefusalKind, Reply, Request, ServerMsg, Welcome};

use crate::util::*;

/// The big file of these tests: far above the 8 MiB from which transfers are resumed, and big
/// enough that a slice of the client's run moves it by a small part only.
const SIZE: usize = 128 << 20;

/// The transfer is cut off once at least this share of the file got across.
const CUT_AT: f64 = 0.40;

/// A continued transfer may move at most this share of the file.
const REST_AT_MOST: f64 = 0.65;

/// How long the client runs between two looks.
const SLICE: Duration = Duration::from_millis(3);

#[allow(unsafe_code)]
fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) on the pid of a child this test spawned and has not reaped yet.
    let _ = unsafe { libc::kill(pid as libc::pid_t, sig) };
}

/// Waits until process `pid` is stopped (or gone), as SIGSTOP is delivered asynchronously.
fn wait_stopped(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return };
        // `pid (comm) S ...`: the state follows the last parenthesis.
        match stat.rsplit_once(')').and_then(|(_, rest)| rest.trim_start().chars().next()) {
            Some('T' | 't' | 'Z' | 'X') | None => return,
            _ => std::thread::sleep(Duration::from_micros(200)),
        }
    }
    panic!("process {pid} did not stop within 10 s");
}

/// Runs `cmd` in slices of [`SLICE`], stopped in between, until `reached()` (asked while it stands
/// still, after the other side took what was in flight) says its transfer got far enough; then
/// sends it `sig` (SIGKILL, or SIGINT as Ctrl-C does) and waits for it to die. Panics if the run
/// ended on its own first.
fn cut_off(cmd: &mut Command, sig: i32, mut reached: impl FnMut() -> bool) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the client");
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        signal(pid, libc::SIGSTOP);
        wait_stopped(pid);
        // What was in flight reaches the other side meanwhile.
        std::thread::sleep(Duration::from_millis(20));
        if let Ok(Some(st)) = child.try_wait() {
            panic!("the client ended ({st}) before its transfer was far enough to be cut off");
        }
        if reached() {
            signal(pid, sig);
            // A stopped process acts on SIGINT only once it runs again (SIGKILL needs no help).
            signal(pid, libc::SIGCONT);
            let st = child.wait().expect("wait for the client");
            assert!(!st.success(), "the client was cut off, yet exited with success");
            return;
        }
        assert!(Instant::now() < deadline, "the transfer did not get far enough in 300 s");
        signal(pid, libc::SIGCONT);
        std::thread::sleep(SLICE);
    }
}

/// Bytes of every file under `dir` (0 if it does not exist).
fn dir_bytes(dir: &Path) -> u64 {
    let mut n = 0;
    let Ok(rd) = std::fs::read_dir(dir) else { return 0 };
    for e in rd.flatten() {
        match e.metadata() {
            Ok(m) if m.is_dir() => n += dir_bytes(&e.path()),
            Ok(m) => n += m.len(),
            Err(_) => {}
        }
    }
    n
}

/// The size of the biggest file anywhere under `dir`.
fn biggest_file(dir: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else { return 0 };
    rd.flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => biggest_file(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .max()
        .unwrap_or(0)
}

/// The files in `dir` (not below), with their sizes.
/// The files in `dir` and its folders (the slots of `.deltasync/tmp/`), by name and size.
fn files_in(dir: &Path) -> Vec<(String, u64)> {
    let Ok(rd) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut v = Vec::new();
    for e in rd.flatten() {
        let Ok(md) = e.metadata() else { continue };
        if md.is_dir() {
            v.extend(files_in(&e.path()));
        } else {
            v.push((e.file_name().to_string_lossy().into_owned(), md.len()));
        }
    }
    v.sort();
    v
}

fn partial_dir(dir: &Path) -> PathBuf {
    dir.join(".deltasync").join("partial")
}

fn state_tmp(dir: &Path) -> PathBuf {
    dir.join(".deltasync").join("tmp")
}

/// Waits for the server to say it kept the start of the cut-off upload of `name`; returns how
/// many bytes.
fn kept_by_server(srv: &Server, name: &str) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    let needle = format!("of a cut-off upload of `{name}`");
    loop {
        let log = srv.log();
        if let Some(line) = log.lines().find(|l| l.contains(&needle)) {
            let n = line.split("kept ").nth(1).and_then(|r| r.split_whitespace().next());
            return n.and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("no byte count in {line:?}"));
        }
        assert!(Instant::now() < deadline, "the server kept nothing of the cut-off upload; log:\n{log}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn share(n: u64) -> f64 {
    n as f64 / SIZE as f64
}

#[test]
fn a_push_killed_midway_sends_only_the_rest_next_time() {
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let a = temp_dir("ds-a-");
    let a = a.path();
    let data = random_bytes(0x5e5, SIZE);
    write(&a.join("big.bin"), &data);
    write(&a.join("small.txt"), "a small file beside it\n");

    let packs = srv.data.join("packs");
    cut_off(&mut sync_command("push", a, &srv.address(), &token, &[]), libc::SIGKILL, || {
        share(dir_bytes(&packs)) >= CUT_AT
    });
    let kept = kept_by_server(&srv, "big.bin");
    assert!(
        share(kept) >= CUT_AT - 0.05 && kept < SIZE as u64,
        "the server kept {kept} bytes of {SIZE}: the cut came elsewhere than midway"
    );

    let out = push(a, &srv, &token);
    let (sent, _) = out.stats();
    println!(
        "push cut off with {:.1}% kept by the server; the next push sent {:.1}%",
        share(kept) * 100.0,
        share(sent) * 100.0
    );
    assert!(
        share(sent) <= REST_AT_MOST,
        "the second push sent {sent} bytes ({:.0}% of the file; the server had kept {kept}): it did not \
         continue the cut-off upload\n{}",
        share(sent) * 100.0,
        out.dump()
    );
    assert!(
        sent >= SIZE as u64 - kept,
        "sent {sent}, less than the {} bytes the server lacked",
        SIZE as u64 - kept
    );

    let b = temp_dir("ds-b-");
    pull(b.path(), &srv, &token);
    assert!(read(&b.path().join("big.bin")) == data, "the pulled file differs from the pushed one");
    assert_same_tree(a, b.path());
}

#[test]
fn a_pull_killed_midway_fetches_only_the_rest_next_time() {
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let a = temp_dir("ds-a-");
    let a = a.path();
    let data = random_bytes(0xd0e, SIZE);
    write(&a.join("sub/big.bin"), &data);
    push(a, &srv, &token);

    let b = temp_dir("ds-b-");
    let b = b.path();
    let partials = partial_dir(b);
    cut_off(&mut sync_command("pull", b, &srv.address(), &token, &[]), libc::SIGKILL, || {
        share(dir_bytes(&partials)) >= CUT_AT
    });
    let kept = files_in(&partials);
    let want = format!("{}-{SIZE}", hex::encode(ContentHash::of(&data).0));
    assert!(
        matches!(&kept[..], [(name, n)] if *name == want && share(*n) >= CUT_AT && (*n as usize) < SIZE),
        "expected the partial download {want} in .deltasync/partial, found {kept:?}"
    );
    assert!(!b.join("sub/big.bin").exists());

    let out = pull(b, &srv, &token);
    let (_, received) = out.stats();
    println!(
        "pull cut off with {:.1}% kept; the next pull received {:.1}%",
        share(kept[0].1) * 100.0,
        share(received) * 100.0
    );
    assert!(
        share(received) <= REST_AT_MOST,
        "the second pull received {received} bytes ({:.0}% of the file; {} bytes were kept): it did not \
         continue the cut-off download\n{}",
        share(received) * 100.0,
        kept[0].1,
        out.dump()
    );
    assert!(read(&b.join("sub/big.bin")) == data, "the continued download differs from the file");
    assert_same_tree(a, b);
    assert_eq!(files_in(&partials), vec![], "the partial download stayed after it completed");
    assert_eq!(files_in(&state_tmp(b)), vec![], "temp files stayed in .deltasync/tmp");
}

/// A kept partial download that does not hold the start of the file (damaged, or written by
/// something else) fails the check of the whole file: it is dropped and the file fetched whole.
#[test]
fn a_partial_download_that_does_not_verify_is_fetched_whole() {
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let a = temp_dir("ds-a-");
    let data = random_bytes(0xbad, 16 << 20);
    write(&a.path().join("big.bin"), &data);
    push(a.path(), &srv, &token);

    let b = temp_dir("ds-b-");
    let name = format!("{}-{}", hex::encode(ContentHash::of(&data).0), data.len());
    let mut wrong = data[..5 << 20].to_vec();
    wrong[4 << 20] ^= 1;
    write(&partial_dir(b.path()).join(name), &wrong);
    let out = sync_cmd("pull", b.path(), &srv, &token, &["-v"]).ok("pull");
    assert!(out.stderr.contains("the continued download did not verify"), "{}", out.dump());
    assert!(read(&b.path().join("big.bin")) == data);
    assert_eq!(files_in(&partial_dir(b.path())), vec![]);
    assert_eq!(files_in(&state_tmp(b.path())), vec![]);
}

/// Ctrl-C in the middle of a pull: nothing is left in the user's folder but the files that were
/// complete, each exactly the server's; the partial download waits in `.deltasync/`.
#[test]
fn a_pull_interrupted_midway_leaves_nothing_in_the_folder() {
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let a = temp_dir("ds-a-");
    let a = a.path();
    for i in 0..20 {
        write(&a.join(format!("docs/note{i}.txt")), format!("note {i}\n"));
    }
    write(&a.join("docs/medium.bin"), random_bytes(0x3ed, 1 << 20));
    write(&a.join("media/big.bin"), random_bytes(0xc1c, SIZE));
    push(a, &srv, &token);

    let b = temp_dir("ds-b-");
    let b = b.path();
    let partials = partial_dir(b);
    // Wherever the download is written.
    cut_off(&mut sync_command("pull", b, &srv.address(), &token, &[]), libc::SIGINT, || {
        share(biggest_file(b)) >= CUT_AT
    });
    // Outside `.deltasync/`: folders, and files that are complete and the server's.
    for p in list_tree(b) {
        let here = b.join(&p);
        if here.is_dir() {
            continue;
        }
        assert!(
            a.join(&p).is_file() && read(&here) == read(&a.join(&p)),
            "the interrupted pull left `{p}` in the folder; it has: {:?}",
            list_tree(b)
        );
    }
    assert!(!b.join("media/big.bin").exists());
    assert_eq!(files_in(&partials).len(), 1, "the partial download should wait in .deltasync/partial");

    let out = pull(b, &srv, &token);
    assert!(share(out.stats().1) <= REST_AT_MOST, "{}", out.dump());
    assert_same_tree(a, b);
    assert_eq!(files_in(&partials), vec![]);
    assert_eq!(files_in(&state_tmp(b)), vec![]);
}

/// Old partial downloads and leftover temp files in `.deltasync/` go at the next round.
#[test]
fn stale_partials_and_temp_files_in_the_state_folder_are_removed() {
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let b = temp_dir("ds-b-");
    let b = b.path();
    write(&b.join("file.txt"), "x\n");
    let old = partial_dir(b).join(format!("{}-{}", "00".repeat(16), 9 << 20));
    let fresh = partial_dir(b).join(format!("{}-{}", "11".repeat(16), 9 << 20));
    let temp = state_tmp(b).join(".deltasync-tmp-1-2-abc");
    // Where a pull's batches write their temp files (slots taken in turn).
    let in_slot = state_tmp(b).join("1/.deltasync-tmp-1-2-abd");
    for p in [&old, &fresh, &temp, &in_slot] {
        write(p, "partial");
    }
    let three_days_ago = std::time::SystemTime::now() - Duration::from_secs(3 * 86_400);
    std::fs::File::options().write(true).open(&old).unwrap().set_modified(three_days_ago).unwrap();
    push(b, &srv, &token);
    assert!(!old.exists(), "a partial download untouched for three days stayed");
    assert!(fresh.exists(), "a recent partial download was removed");
    assert!(!temp.exists(), "a leftover temp file stayed in .deltasync/tmp");
    assert!(!in_slot.exists(), "a leftover temp file stayed in a slot of .deltasync/tmp");
}

// ---------------------------------------------------------------------------------------------
// The server lost the start of the upload between `Resume` and `PutRest`: a fake server.

/// Reads upload `id`'s content to its end; returns the bytes of its blocks.
fn upload_bytes(s: &mut impl Read, id: u64) -> u64 {
    let mut n = 0;
    loop {
        match recv_frame::<ClientMsg>(s).expect("the rest of the upload") {
            ClientMsg::Data { id: i, block } if i == id => n += block.bytes.len() as u64,
            ClientMsg::Last { id: i, block } if i == id => return n + block.bytes.len() as u64,
            ClientMsg::End { id: i } if i == id => return n,
            other => panic!("unexpected {other:?} inside upload {id}"),
        }
    }
}

#[test]
fn a_refused_continuation_is_sent_whole() {
    let size: u64 = 24 << 20;
    let kept: u64 = 10 << 20;
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let server = std::thread::spawn(move || {
        let mut s = fake_accept(&l).unwrap();
        let _hello: Hello = recv_frame(&mut s).unwrap();
        let welcome = Welcome::Accepted {
            account: "fake".into(),
            new_token: None,
            server_id: [9; 16],
            seq: 0,
            folder: "default".into(),
        };
        send_frame(&mut s, &welcome).unwrap();
        let mut seen = Vec::new();
        while let Some(msg) = recv_frame::<ClientMsg>(&mut s) {
            let ClientMsg::Req { id, req } = msg else { panic!("content outside an upload: {msg:?}") };
            let result = match req {
                Request::Changes { .. } => Ok(Reply::Changes { entries: vec![], seq: 0, more: false }),
                Request::Resume { path, size: n, .. } => {
                    assert_eq!((path.as_str(), n), ("big.bin", size));
                    seen.push("resume".to_string());
                    Ok(Reply::Resume { from: kept, base: None })
                }
                Request::PutRest { from, base, .. } => {
                    assert_eq!((from, base), (kept, None));
                    let n = upload_bytes(&mut s, id);
                    seen.push(format!("rest {n}"));
                    // Pruned meanwhile.
                    Err(Refusal::new(RefusalKind::NotFound, "the server no longer holds the start"))
                }
                Request::Put { path, base, .. } => {
                    let n = upload_bytes(&mut s, id);
                    seen.push(format!("put {path} {n} {base:?}"));
                    Ok(Reply::Committed { rev: seen.len() as u64 })
                }
                other => panic!("unexpected request {other:?}"),
            };
            send_frame(&mut s, &ServerMsg::Resp { id, result }).unwrap();
        }
        seen
    });
    let a = temp_dir("ds-a-");
    write(&a.path().join("big.bin"), random_bytes(0xfa, size as usize));
    let out = run(&mut sync_command("push", a.path(), &addr, "token", &["-v"]));
    let seen = server.join().expect("the fake server");
    assert!(out.success(), "{}\nthe server saw {seen:?}", out.dump());
    assert!(out.stderr.contains("could not continue the cut-off upload"), "{}", out.dump());
    let rest: u64 = seen[1].strip_prefix("rest ").and_then(|n| n.parse().ok()).unwrap_or(0);
    assert_eq!(seen[0], "resume", "{seen:?}");
    assert!(rest >= size - kept && rest < size - kept + (1 << 20), "the rest was {rest} bytes: {seen:?}");
    let whole: Vec<&str> = seen[2].split(' ').collect();
    assert_eq!((whole[0], whole[1], whole[3]), ("put", "big.bin", "None"), "{seen:?}");
    let n: u64 = whole[2].parse().unwrap();
    assert!(n >= size && n < size + (1 << 20), "the whole upload was {n} bytes: {seen:?}");
}
