//! Several folders per account (`--folder NAME`): one token syncs separate trees, each with its
//! own history and journal; a local folder linked to one folder (or account) refuses another
//! unless `--relink`; a data folder of the previous schema keeps its files as `default`.

use std::fs;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::util::*;

/// A child killed when dropped, so a failing assertion leaves no process running.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn with_folder(cmd: &str, dir: &Path, srv: &Server, token: &str, folder: &str, extra: &[&str]) -> Output {
    let mut args = vec!["--folder", folder];
    args.extend_from_slice(extra);
    sync_cmd(cmd, dir, srv, token, &args)
}

fn ok_with_folder(cmd: &str, dir: &Path, srv: &Server, token: &str, folder: &str) -> Output {
    with_folder(cmd, dir, srv, token, folder, &[]).ok(cmd)
}

fn log(dir: &Path) -> Output {
    run(command().arg("log").arg(dir)).ok("log")
}

#[test]
fn two_folders_of_one_account_keep_separate_trees_and_histories() {
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let docs = temp_dir("fold-docs");
    write(&docs.path().join("report.txt"), "the report\n");
    write(&docs.path().join("sub/notes.txt"), "notes\n");
    let pics = temp_dir("fold-pics");
    write(&pics.path().join("cat.jpg"), random_bytes(3, 20_000));
    ok_with_folder("push", docs.path(), &srv, &token, "docs");
    ok_with_folder("push", pics.path(), &srv, &token, "pics");

    // Each folder pulled into an empty directory brings only its own files.
    let d2 = temp_dir("fold-docs2");
    ok_with_folder("pull", d2.path(), &srv, &token, "docs");
    assert_eq!(list_tree(d2.path()), ["report.txt", "sub", "sub/notes.txt"]);
    let p2 = temp_dir("fold-pics2");
    ok_with_folder("pull", p2.path(), &srv, &token, "pics");
    assert_eq!(list_tree(p2.path()), ["cat.jpg"]);
    // The account's default folder holds neither.
    let e = temp_dir("fold-default");
    pull(e.path(), &srv, &token);
    assert!(list_tree(e.path()).is_empty(), "the default folder got {:?}", list_tree(e.path()));

    // History is per folder too: `log` on a folder names only its paths.
    let dl = log(d2.path());
    assert!(dl.stdout.contains("report.txt") && !dl.stdout.contains("cat.jpg"), "{}", dl.dump());
    let pl = log(p2.path());
    assert!(pl.stdout.contains("cat.jpg") && !pl.stdout.contains("report.txt"), "{}", pl.dump());

    // A change in one folder reaches its other copy and not the other folder's.
    write(&docs.path().join("report.txt"), "the report, v2\n");
    push(docs.path(), &srv, &token);
    pull(d2.path(), &srv, &token);
    assert_eq!(read_string(&d2.path().join("report.txt")), "the report, v2\n");
    pull(p2.path(), &srv, &token);
    assert_eq!(list_tree(p2.path()), ["cat.jpg"]);

    // `account list` shows one account (no row per folder), with its folders under it.
    let list = run(command().args(["account", "list", "--data"]).arg(&srv.data)).ok("account list");
    let accounts: Vec<&str> = list.stdout.lines().filter(|l| !l.starts_with(' ')).collect();
    assert_eq!(accounts.len(), 1, "{}", list.dump());
    assert!(accounts[0].starts_with("alice\t"), "{}", list.dump());
    assert!(list.stdout.contains("folder docs:") && list.stdout.contains("folder pics:"), "{}", list.dump());
    // `export --folder` writes that folder's files; a folder the account does not have is
    // refused, naming the ones it has, and makes none.
    let out = temp_dir("fold-export");
    let pics_out = out.path().join("pics");
    let ex = run(command()
        .args(["export", "--account", "alice", "--folder", "pics", "--data"])
        .arg(&srv.data)
        .arg(&pics_out))
    .ok("export --folder pics");
    assert!(ex.stdout.contains("folder `pics` of account `alice`"), "{}", ex.dump());
    assert_eq!(list_tree(&pics_out), ["cat.jpg"]);
    assert_eq!(fs::read(pics_out.join("cat.jpg")).unwrap(), random_bytes(3, 20_000));
    let def_out = out.path().join("default");
    run(command().args(["export", "--account", "alice", "--data"]).arg(&srv.data).arg(&def_out)).ok("export");
    assert!(list_tree(&def_out).is_empty(), "the default folder's export got {:?}", list_tree(&def_out));
    let bad = run(command()
        .args(["export", "--account", "alice", "--folder", "music", "--data"])
        .arg(&srv.data)
        .arg(out.path().join("m")));
    assert_eq!(bad.status.code(), Some(1), "{}", bad.dump());
    assert!(bad.stderr.contains("no folder `music`") && bad.stderr.contains("docs, pics"), "{}", bad.dump());
    let after = run(command().args(["account", "list", "--data"]).arg(&srv.data)).ok("account list");
    assert!(!after.stdout.contains("folder music"), "the refused export made a folder:\n{}", after.dump());

    // Removing the account removes its folders.
    run(command().args(["account", "remove", "alice", "--yes", "--data"]).arg(&srv.data))
        .ok("account remove");
    let conn = rusqlite::Connection::open(srv.data.join("deltasync.db")).unwrap();
    for table in ["accounts", "files", "history"] {
        let n: i64 = conn.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0)).unwrap();
        assert_eq!(n, 0, "rows of the removed account's folders left in {table}");
    }
}

#[test]
fn the_quota_counts_every_folder_of_the_account() {
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    run(command().args(["account", "quota", "alice", "1M", "--data"]).arg(&srv.data)).ok("account quota");
    let docs = temp_dir("fold-qdocs");
    write(&docs.path().join("a.bin"), random_bytes(1, 700 << 10));
    ok_with_folder("push", docs.path(), &srv, &token, "docs");
    let pics = temp_dir("fold-qpics");
    write(&pics.path().join("b.bin"), random_bytes(2, 700 << 10));
    let out = with_folder("push", pics.path(), &srv, &token, "pics", &[]);
    assert_eq!(out.status.code(), Some(1), "{}", out.dump());
    assert!(out.stderr.contains("account alice is over its quota"), "{}", out.dump());
}

#[test]
fn a_watch_on_one_folder_gets_its_pushes_and_not_the_other_folders() {
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let w = temp_dir("fold-watch");
    let logs = temp_dir("fold-watch-log");
    let log = logs.path().join("watch.log");
    let logf = fs::File::create(&log).unwrap();
    let mut watch = Killed(
        command()
            .arg("watch")
            .arg(w.path())
            .args(["--server", &srv.address(), "--token", &token, "--no-progress", "--folder", "docs"])
            .stdin(Stdio::null())
            .stdout(logf.try_clone().unwrap())
            .stderr(logf)
            .spawn()
            .unwrap(),
    );
    // Wait until the watch is connected (it records its link then).
    let deadline = Instant::now() + Duration::from_secs(60);
    while !run(command().arg("status").arg(w.path())).stdout.contains("Server folder: docs") {
        assert!(Instant::now() < deadline, "the watch never synced: {}", fs::read_to_string(&log).unwrap());
        assert!(
            watch.0.try_wait().unwrap().is_none(),
            "the watch exited: {}",
            fs::read_to_string(&log).unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // A push to pics first, then one to docs: the watch brings the docs file, and the pics one
    // never (its round after docs' push would have brought both if they shared a journal).
    let pics = temp_dir("fold-wpics");
    write(&pics.path().join("pic.txt"), "a picture\n");
    ok_with_folder("push", pics.path(), &srv, &token, "pics");
    let docs = temp_dir("fold-wdocs");
    write(&docs.path().join("doc.txt"), "a document\n");
    ok_with_folder("push", docs.path(), &srv, &token, "docs");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !w.path().join("doc.txt").exists() {
        assert!(
            Instant::now() < deadline,
            "the watch never got doc.txt: {}",
            fs::read_to_string(&log).unwrap()
        );
        assert!(
            watch.0.try_wait().unwrap().is_none(),
            "the watch exited: {}",
            fs::read_to_string(&log).unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(list_tree(w.path()), ["doc.txt"], "log: {}", fs::read_to_string(&log).unwrap());
    // And what the watch uploads goes to docs.
    write(&w.path().join("from-watch.txt"), "written while watched\n");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !docs.path().join("from-watch.txt").exists() {
        assert!(
            Instant::now() < deadline,
            "the watch's upload never reached docs: {}",
            fs::read_to_string(&log).unwrap()
        );
        pull(docs.path(), &srv, &token);
        std::thread::sleep(Duration::from_millis(100));
    }
    pull(pics.path(), &srv, &token);
    assert_eq!(list_tree(pics.path()), ["pic.txt"]);
}

#[test]
fn a_folder_linked_to_one_folder_refuses_another_unless_relinked() {
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let a = temp_dir("fold-link");
    write(&a.path().join("doc.txt"), "a document\n");
    ok_with_folder("push", a.path(), &srv, &token, "docs");
    let st = run(command().arg("status").arg(a.path())).ok("status");
    assert!(st.stdout.contains("Server folder: docs"), "{}", st.dump());

    // Another --folder: refused (usage, exit 2) before anything is sent, naming both and --relink.
    for cmd in ["push", "pull"] {
        let out = with_folder(cmd, a.path(), &srv, &token, "pics", &[]);
        assert_eq!(out.status.code(), Some(2), "{}", out.dump());
        assert!(
            out.stderr.contains("folder `docs`")
                && out.stderr.contains("folder `pics`")
                && out.stderr.contains("--relink"),
            "{}",
            out.dump()
        );
    }
    let st = run(command().args(["status", "--folder", "pics"]).arg(a.path()));
    assert_eq!(st.status.code(), Some(2), "{}", st.dump());
    assert!(st.stderr.contains("`docs`") && st.stderr.contains("--relink"), "{}", st.dump());
    let p = temp_dir("fold-link-pics");
    ok_with_folder("pull", p.path(), &srv, &token, "pics");
    assert!(list_tree(p.path()).is_empty(), "the refused run changed pics: {:?}", list_tree(p.path()));
    // Without --folder it goes on with its link.
    write(&a.path().join("more.txt"), "more\n");
    push(a.path(), &srv, &token);

    // A token of another account: refused as well.
    let bob = add_account(&srv.data, "bob");
    let out = sync_cmd("push", a.path(), &srv, &bob, &[]);
    assert_eq!(out.status.code(), Some(2), "{}", out.dump());
    assert!(
        out.stderr.contains("account `alice`")
            && out.stderr.contains("account `bob`")
            && out.stderr.contains("--relink"),
        "{}",
        out.dump()
    );
    let b = temp_dir("fold-link-bob");
    pull(b.path(), &srv, &bob);
    assert!(list_tree(b.path()).is_empty(), "the refused run changed bob's files: {:?}", list_tree(b.path()));

    // With --relink it syncs with pics: the trees merge (pics' own file stays, nothing deleted).
    write(&p.path().join("pic.txt"), "a picture\n");
    push(p.path(), &srv, &token);
    with_folder("push", a.path(), &srv, &token, "pics", &["--relink"]).ok("push --relink");
    with_folder("pull", a.path(), &srv, &token, "pics", &[]).ok("pull");
    assert_eq!(list_tree(a.path()), ["doc.txt", "more.txt", "pic.txt"]);
    pull(p.path(), &srv, &token);
    assert_eq!(list_tree(p.path()), ["doc.txt", "more.txt", "pic.txt"]);
    // The new link is remembered: no flag needed, and docs is now the other folder.
    let st = run(command().arg("status").arg(a.path())).ok("status");
    assert!(st.stdout.contains("Server folder: pics"), "{}", st.dump());
    let out = with_folder("push", a.path(), &srv, &token, "docs", &[]);
    assert_eq!(out.status.code(), Some(2), "{}", out.dump());
}

#[test]
fn the_default_folder_needs_no_flag_and_old_indexes_are_default() {
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let a = temp_dir("fold-def");
    write(&a.path().join("one.txt"), "one\n");
    push(a.path(), &srv, &token);
    let st = run(command().args(["status", "--folder", "default"]).arg(a.path())).ok("status");
    assert!(st.stdout.contains("Server folder: default"), "{}", st.dump());
    let b = temp_dir("fold-def2");
    ok_with_folder("pull", b.path(), &srv, &token, "default");
    assert_eq!(list_tree(b.path()), ["one.txt"]);
    // The environment variable names it too.
    let c = temp_dir("fold-def3");
    run(sync_command("pull", c.path(), &srv.address(), &token, &[]).env("DELTASYNC_FOLDER", "default"))
        .ok("pull");
    assert_eq!(list_tree(c.path()), ["one.txt"]);

    // An index made before folders existed (no `folder` setting) is linked to `default`.
    let db = a.path().join(".deltasync/index.db");
    let conn = rusqlite::Connection::open(&db).unwrap();
    assert_eq!(conn.execute("DELETE FROM settings WHERE key='folder'", []).unwrap(), 1);
    drop(conn);
    write(&a.path().join("two.txt"), "two\n");
    ok_with_folder("push", a.path(), &srv, &token, "default");
    let out = with_folder("push", a.path(), &srv, &token, "docs", &[]);
    assert_eq!(out.status.code(), Some(2), "{}", out.dump());
    assert!(out.stderr.contains("folder `default`"), "{}", out.dump());
    pull(b.path(), &srv, &token);
    assert_eq!(list_tree(b.path()), ["one.txt", "two.txt"]);
}

#[test]
fn bad_folder_names_are_refused_with_what_is_allowed() {
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let a = temp_dir("fold-bad");
    write(&a.path().join("one.txt"), "one\n");
    let long = "x".repeat(65);
    for bad in ["", ".hidden", "a/b", "../up", "with space", long.as_str(), "é"] {
        let out = with_folder("push", a.path(), &srv, &token, bad, &[]);
        assert_eq!(out.status.code(), Some(2), "--folder {bad:?}: {}", out.dump());
        assert!(out.stderr.contains("invalid folder name"), "--folder {bad:?}: {}", out.dump());
        assert!(out.stderr.contains("1 to 64 letters"), "--folder {bad:?}: {}", out.dump());
    }
    assert!(!a.path().join(".deltasync").exists(), "a refused name still touched the folder");
    ok_with_folder("push", a.path(), &srv, &token, "Photos_2024-v1.0");
}

#[test]
fn a_data_folder_of_schema_3_keeps_its_files_as_the_default_folder() {
    let tmp = temp_dir("fold-v3");
    let data = tmp.path().join("data");
    let a = temp_dir("fold-v3-a");
    write(&a.path().join("kept.txt"), "kept across the upgrade\n");
    let token;
    {
        let srv = start_server_with(Some(&data), &[]);
        token = add_account(&srv.data, "alice");
        push(a.path(), &srv, &token);
    }
    // Back to the previous release's schema: no folder columns, user_version 3.
    let db = data.join("deltasync.db");
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute_batch(
        "ALTER TABLE accounts DROP COLUMN owner; ALTER TABLE accounts DROP COLUMN folder; PRAGMA user_version = 3;",
    )
    .unwrap();
    drop(conn);

    let srv = start_server_with(Some(&data), &[]);
    let conn = rusqlite::Connection::open(&db).unwrap();
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
    assert_eq!(version, 4);
    drop(conn);
    let b = temp_dir("fold-v3-b");
    pull(b.path(), &srv, &token);
    assert_eq!(list_tree(b.path()), ["kept.txt"]);
    let c = temp_dir("fold-v3-c");
    ok_with_folder("pull", c.path(), &srv, &token, "default");
    assert_eq!(read_string(&c.path().join("kept.txt")), "kept across the upgrade\n");
    // The old folder goes on syncing, and a new folder of the account works beside it.
    write(&a.path().join("new.txt"), "new\n");
    push(a.path(), &srv, &token);
    let d = temp_dir("fold-v3-d");
    write(&d.path().join("other.txt"), "other\n");
    ok_with_folder("push", d.path(), &srv, &token, "other");
    pull(b.path(), &srv, &token);
    assert_eq!(list_tree(b.path()), ["kept.txt", "new.txt"]);
}

/// The server checks the name too (a client of its own may send anything): a bad one is
/// refused in the handshake with the rule, and nothing is made for it.
#[test]
fn the_server_refuses_a_bad_folder_name_in_the_hello() {
    use deltasync::protocol::*;
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    for bad in ["../x", ".git", "a/b", ""] {
        let mut s = srv.tls();
        let hello = Hello {
            magic: MAGIC,
            version: PROTOCOL_VERSION,
            token: Some(token.clone()),
            device: "raw".into(),
            folder: bad.into(),
        };
        send_frame(&mut s, &hello).expect("send hello");
        match recv_frame::<Welcome>(&mut s) {
            Some(Welcome::Rejected { reason: Rejection::Folder, message, .. }) => {
                assert!(message.contains("invalid folder name"), "{message}")
            }
            other => panic!("folder {bad:?}: {other:?}"),
        }
    }
    let list = run(command().args(["account", "list", "--data"]).arg(&srv.data)).ok("account list");
    assert!(!list.stdout.contains("folder "), "{}", list.dump());
}

/// A client of the version before folders (its `Hello` has no folder) is told the versions
/// differ (exit 5 on its side), not that it is no deltasync client.
#[test]
fn a_client_of_protocol_5_gets_the_version_mismatch() {
    use deltasync::protocol::*;
    #[derive(serde::Serialize)]
    struct HelloV5 {
        magic: [u8; 8],
        version: u32,
        token: Option<String>,
        device: String,
    }
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let mut s = srv.tls();
    let hello = HelloV5 { magic: MAGIC, version: 5, token: Some(token), device: "old".into() };
    send_frame(&mut s, &hello).expect("send hello");
    match recv_frame::<Welcome>(&mut s) {
        Some(Welcome::Rejected { reason: Rejection::Version, message, server_version }) => {
            assert_eq!(server_version, PROTOCOL_VERSION);
            assert!(message.contains("protocol version mismatch"), "{message}");
        }
        other => panic!("{other:?}"),
    }
}
