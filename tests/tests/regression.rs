//! One test per bug found while trying the engine as a new user would (issue 9), each named
//! after the bug it keeps fixed. Real server, real folders, the real binary.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::{Duration, Instant};

use super::util::*;

fn conflict_copies(dir: &Path) -> Vec<String> {
    list_tree(dir).into_iter().filter(|p| p.contains(" (conflict ")).collect()
}

fn status(dir: &Path) -> String {
    run(command().arg("status").arg(dir)).ok("status").stdout
}

/// A pushes a file `build` and deletes it; B creates `build/x.o`; A adds `build/` to
/// `.deltasyncignore` without pulling first. Every push and pull on A used to panic with
/// "record needs an entry" (exit 101), so the rule could never be pushed.
#[test]
fn ignore_rule_over_a_path_deleted_here_and_made_a_folder_elsewhere_does_not_panic() {
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let (a, b) = (temp_dir("a"), temp_dir("b"));
    write(&a.path().join("build"), b"an old build file");
    write(&a.path().join("keep.txt"), b"keep");
    push_as(a.path(), &srv, &token, "A");
    pull_as(b.path(), &srv, &token, "B");
    std::fs::remove_file(a.path().join("build")).unwrap();
    push_as(a.path(), &srv, &token, "A");
    pull_as(b.path(), &srv, &token, "B");
    write(&b.path().join("build/x.o"), b"object");
    push_as(b.path(), &srv, &token, "B");

    write(&a.path().join(".deltasyncignore"), b"build/\n");
    push_as(a.path(), &srv, &token, "A");
    pull_as(a.path(), &srv, &token, "A");
    push_as(a.path(), &srv, &token, "A");
    assert!(!a.path().join("build").exists(), "the ignored folder was not downloaded");
    assert!(status(a.path()).contains("Pending local changes: 0"), "{}", status(a.path()));
    pull_as(b.path(), &srv, &token, "B");
    assert_eq!(read(&b.path().join("build/x.o")), b"object", "B's file stays");
    assert_eq!(read(&b.path().join(".deltasyncignore")), b"build/\n", "the rule reached B");
}

/// After an ignore rule covered a synced file, `push` said up to date while `status` showed a
/// pending server delete: status planned without the ignore filter.
#[test]
fn status_and_push_agree_once_an_ignore_rule_covers_a_synced_file() {
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let a = temp_dir("a");
    write(&a.path().join("notes.tmp"), b"scratch");
    write(&a.path().join("doc.txt"), b"doc");
    push(a.path(), &srv, &token);
    write(&a.path().join(".deltasyncignore"), b"*.tmp\n");
    std::fs::remove_file(a.path().join("notes.tmp")).unwrap();
    push(a.path(), &srv, &token);
    let push_again = push(a.path(), &srv, &token);
    assert!(push_again.stdout.contains("up to date"), "{}", push_again.dump());
    let st = status(a.path());
    assert!(st.contains("Pending local changes: 0"), "status disagrees with push:\n{st}");
    // Ignored here means left alone on the server too.
    let c = temp_dir("c");
    pull(c.path(), &srv, &token);
    assert_eq!(read(&c.path().join("notes.tmp")), b"scratch");
}

/// Index rows that failed to decode were read as "absent", and for an unchanged local file that
/// planned a local delete. Now a damaged or missing index is rebuilt, deleting nothing, and
/// differing content is kept as a conflict copy.
#[test]
fn a_damaged_or_missing_index_deletes_nothing() {
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let (a, b) = (temp_dir("a"), temp_dir("b"));
    for i in 0..5 {
        write(&a.path().join(format!("f{i}.txt")), format!("file {i}"));
    }
    push_as(a.path(), &srv, &token, "A");
    pull_as(b.path(), &srv, &token, "B");

    // Damage every row of B's view of the server.
    let db = rusqlite::Connection::open(b.path().join(".deltasync/index.db")).unwrap();
    db.execute_batch("UPDATE remote SET kind = 9; UPDATE synced SET hash = x'00' WHERE kind = 1;").unwrap();
    drop(db);
    let out = pull_as(b.path(), &srv, &token, "B");
    assert!(
        out.stderr.contains("rebuilding the index") || out.stdout.contains("rebuilding the index"),
        "{}",
        out.dump()
    );
    assert_same_tree(a.path(), b.path());

    // No index at all, and meanwhile the server's version of f0 moved on: both versions stay.
    std::fs::remove_file(b.path().join(".deltasync/index.db")).unwrap();
    write(&a.path().join("f0.txt"), b"file 0, edited on A");
    push_as(a.path(), &srv, &token, "A");
    sync_cmd("push", b.path(), &srv, &token, &["--device", "B"]).ok("push");
    pull_as(b.path(), &srv, &token, "B");
    assert_eq!(read(&b.path().join("f0.txt")), b"file 0, edited on A");
    let copies = conflict_copies(b.path());
    assert_eq!(copies.len(), 1, "B's old version is kept as a conflict copy: {copies:?}");
    assert_eq!(read(&b.path().join(&copies[0])), b"file 0");
    for i in 1..5 {
        assert_eq!(read_string(&b.path().join(format!("f{i}.txt"))), format!("file {i}"));
    }
    let c = temp_dir("c");
    pull(c.path(), &srv, &token);
    assert_eq!(list_tree(c.path()).len(), 6, "nothing was deleted on the server: {:?}", list_tree(c.path()));
}

/// An unreadable file or subfolder (another user's, mode 600) was reported as skipped, then
/// deleted on the server and on every other computer. The client here runs as `nobody`.
#[test]
fn a_path_the_scan_cannot_read_is_not_deleted_anywhere() {
    if euid() != 0 {
        eprintln!("skipped: needs root to run the client as another user");
        return;
    }
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let (a, c) = (temp_dir("a"), temp_dir("c"));
    let root = a.path().join("synced");
    write(&root.join("ok.txt"), b"readable");
    write(&root.join("secret.txt"), b"root only");
    write(&root.join("private/inner.txt"), b"root only, inside");
    push(&root, &srv, &token);
    // Everything but the two private paths belongs to `nobody` from now on.
    std::fs::set_permissions(a.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let chown = |p: &Path| std::os::unix::fs::lchown(p, Some(65534), Some(65534)).unwrap();
    chown(&root);
    chown(&root.join("ok.txt"));
    for e in std::fs::read_dir(root.join(".deltasync")).unwrap() {
        chown(&e.unwrap().path());
    }
    chown(&root.join(".deltasync"));
    // Changed since the last scan, so this scan must read it, and cannot.
    write(&root.join("secret.txt"), b"root only, edited by root");
    set_mode(&root.join("secret.txt"), 0o600);
    set_mode(&root.join("private"), 0o700);
    write(&root.join("ok.txt"), b"readable, edited");
    chown(&root.join("ok.txt"));

    let mut cmd = sync_command("push", &root, &srv.address(), &token, &[]);
    cmd.uid(65534).gid(65534);
    let out = run(&mut cmd);
    assert_eq!(out.status.code(), Some(23), "a partial push exits 23:\n{}", out.dump());
    assert!(
        out.stderr.contains("secret.txt") && out.stderr.contains("private"),
        "says what it skipped:\n{}",
        out.dump()
    );
    pull(c.path(), &srv, &token);
    assert_eq!(read(&c.path().join("ok.txt")), b"readable, edited");
    assert_eq!(read(&c.path().join("secret.txt")), b"root only", "the unreadable file stays on the server");
    assert_eq!(read(&c.path().join("private/inner.txt")), b"root only, inside", "and the unreadable folder");
    let mut cmd = command();
    cmd.arg("status").arg(&root).uid(65534).gid(65534);
    let st = run(&mut cmd).ok("status as nobody").stdout;
    assert!(st.contains("Pending local changes: 0"), "{st}");
}

/// `rm -rf DIR/*` followed by a push emptied the server and every other computer. The guard
/// holds the deletes back, says how to proceed, `status` shows it, `pull --restore-deleted`
/// brings the files back, and `--max-delete` lets a meant delete through.
#[test]
fn deleting_most_of_a_folder_is_held_back_until_allowed() {
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let (a, c) = (temp_dir("a"), temp_dir("c"));
    for i in 0..60 {
        write(&a.path().join(format!("docs/f{i:02}.txt")), format!("doc {i}"));
    }
    push(a.path(), &srv, &token);
    pull(c.path(), &srv, &token);
    for i in 0..60 {
        std::fs::remove_file(a.path().join(format!("docs/f{i:02}.txt"))).unwrap();
    }
    write(&a.path().join("new.txt"), b"a new file still goes up");
    let held = sync_cmd("push", a.path(), &srv, &token, &[]);
    assert_eq!(held.status.code(), Some(9), "{}", held.dump());
    for needle in ["60 of the folder's 60 files", "--max-delete 60", "--restore-deleted"] {
        assert!(held.stderr.contains(needle), "missing `{needle}`:\n{}", held.dump());
    }
    let st = status(a.path());
    assert!(st.contains("Held back"), "{st}");
    pull(c.path(), &srv, &token);
    assert_eq!(list_tree(&c.path().join("docs")).len(), 60, "nothing deleted on the other computer");
    assert_eq!(read(&c.path().join("new.txt")), b"a new file still goes up");

    pull_as_with(a.path(), &srv, &token, &["--restore-deleted"]);
    assert_eq!(read_string(&a.path().join("docs/f07.txt")), "doc 7", "restored from the server");
    assert!(push(a.path(), &srv, &token).stdout.contains("up to date"));

    for i in 0..60 {
        std::fs::remove_file(a.path().join(format!("docs/f{i:02}.txt"))).unwrap();
    }
    assert_eq!(sync_cmd("push", a.path(), &srv, &token, &["--max-delete", "50"]).status.code(), Some(9));
    sync_cmd("push", a.path(), &srv, &token, &["--max-delete", "99%"]).ok("push --max-delete 99%");
    pull(c.path(), &srv, &token);
    assert!(!c.path().join("docs/f07.txt").exists(), "a meant delete goes through");

    // A few deletes in a big folder are never held.
    for i in 0..10 {
        write(&a.path().join(format!("g{i}.txt")), format!("g {i}"));
    }
    push(a.path(), &srv, &token);
    std::fs::remove_file(a.path().join("g3.txt")).unwrap();
    push(a.path(), &srv, &token);
}

fn pull_as_with(dir: &Path, srv: &Server, token: &str, extra: &[&str]) -> Output {
    sync_cmd("pull", dir, srv, token, extra).ok("pull")
}

/// A push killed after the server committed part of it left the client out of step: it did
/// not recognise its own uploads, and the next run made conflict copies of the user's own
/// newer edits (46 to 54 in one run).
#[test]
fn a_push_cut_off_midway_makes_no_false_conflicts_of_its_own_uploads() {
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let a = temp_dir("a");
    const N: usize = 1500;
    let write_all = |v: &str| {
        for i in 0..N {
            write(&a.path().join(format!("d{}/f{i}.txt", i % 10)), format!("{v} {i} {}", "x".repeat(200)));
        }
    };
    write_all("v0");
    push(a.path(), &srv, &token);
    let mut cut_midway = 0;
    for round in 1..=3 {
        write_all(&format!("v{round}"));
        let before = account_changes(&srv.data, "alice");
        let mut child = sync_command("push", a.path(), &srv.address(), &token, &[])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            let now = account_changes(&srv.data, "alice");
            if now > before && now < before + N as u64 {
                let _ = child.kill();
                let _ = child.wait();
                cut_midway += 1;
                break;
            }
            assert!(Instant::now() < deadline, "push hung");
            std::thread::sleep(Duration::from_millis(5));
        }
        // The user edits again before the next run.
        write_all(&format!("v{round}b"));
        // The cut-off session may still be committing on the server while this push plans; a
        // refusal for that (exit 6) says "run again", and the run after it must be clean too.
        for attempt in 0..3 {
            let out = sync_cmd("push", a.path(), &srv, &token, &[]);
            assert!(
                conflict_copies(a.path()).is_empty(),
                "false conflicts after a cut-off push:\n{}",
                out.dump()
            );
            match out.status.code() {
                Some(0) => break,
                Some(6) if attempt < 2 => continue,
                _ => panic!("push after a cut-off one failed:\n{}", out.dump()),
            }
        }
    }
    eprintln!("{cut_midway} of 3 pushes were cut off midway");
    let c = temp_dir("c");
    pull(c.path(), &srv, &token);
    assert_same_tree(a.path(), c.path());
}

/// A conflict cut off after moving the local version aside, before fetching the server's, left
/// the file missing under its real name for every later push (a push did not download).
#[test]
fn a_conflict_cut_off_midway_is_finished_by_the_next_push() {
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let (a, b) = (temp_dir("a"), temp_dir("b"));
    write(&a.path().join("f.txt"), b"v0");
    push_as(a.path(), &srv, &token, "A");
    pull_as(b.path(), &srv, &token, "B");
    write(&b.path().join("f.txt"), b"v1 from B");
    push_as(b.path(), &srv, &token, "B");
    // A's state right after the cut-off: its edit moved to the conflict name, nothing fetched.
    write(&a.path().join("f (conflict A 2026-01-01 000000).txt"), b"v1 from A");
    std::fs::remove_file(a.path().join("f.txt")).unwrap();
    push_as(a.path(), &srv, &token, "A");
    assert_eq!(read(&a.path().join("f.txt")), b"v1 from B");
    pull_as(b.path(), &srv, &token, "B");
    assert_same_tree(a.path(), b.path());
}

/// The server pages the journal by revision and the next page started after the last revision
/// of the previous one, so a commit whose entries (a move's two paths) straddled a page boundary
/// lost the rest of them: a new computer never got the moved file.
#[test]
fn a_move_on_a_journal_page_boundary_reaches_a_new_computer() {
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let (a, c) = (temp_dir("a"), temp_dir("c"));
    // 2,000 entries, then a move: its two entries are the 2,000th and 2,001st (page = 2,000).
    for i in 0..2000 {
        write(&a.path().join(format!("a{i:04}")), format!("{i}"));
    }
    push(a.path(), &srv, &token);
    std::fs::rename(a.path().join("a0000"), a.path().join("zz-moved")).unwrap();
    let out = push(a.path(), &srv, &token);
    assert!(out.stdout.contains("1 moved"), "{}", out.dump());
    pull(c.path(), &srv, &token);
    assert_same_tree(a.path(), c.path());
}

fn copy_tree(from: &Path, to: &Path) {
    let st = std::process::Command::new("cp").arg("-a").arg(from).arg(to).status().unwrap();
    assert!(st.success(), "cp -a {} {}", from.display(), to.display());
}

/// A server restored from an older backup was not noticed: clients said "up to date" and never
/// uploaded again what the server lost. Now its journal going backwards is detected, and every
/// computer puts back what it has that the server lost (no conflicts of its own versions, no
/// deletes), and a fresh computer then gets everything.
#[test]
fn a_server_restored_from_an_older_backup_gets_back_what_it_lost() {
    let mut srv = start_server();
    let token = add_account(&srv.data, "alice");
    let (a, b, c) = (temp_dir("a"), temp_dir("b"), temp_dir("c"));
    for i in 0..3 {
        write(&a.path().join(format!("f{i}.txt")), format!("f{i} v0"));
    }
    write(&a.path().join("gone-later.txt"), b"deleted after the backup");
    push_as(a.path(), &srv, &token, "A");
    pull_as(b.path(), &srv, &token, "B");

    srv.kill_hard();
    let backup = temp_dir("backup");
    copy_tree(&srv.data, &backup.path().join("data"));
    srv.start_again();

    // After the backup: A edits, adds and deletes; B picks it all up.
    write(&a.path().join("f1.txt"), b"f1 v1, after the backup");
    write(&a.path().join("new.txt"), b"new after the backup");
    std::fs::remove_file(a.path().join("gone-later.txt")).unwrap();
    push_as(a.path(), &srv, &token, "A");
    pull_as(b.path(), &srv, &token, "B");
    assert_same_tree(a.path(), b.path());

    // The server's disk dies; it comes back from the backup.
    srv.kill_hard();
    std::fs::remove_dir_all(&srv.data).unwrap();
    copy_tree(&backup.path().join("data"), &srv.data);
    srv.start_again();

    let out = push_as(b.path(), &srv, &token, "B");
    assert!(out.stderr.contains("went backwards"), "the client says what it noticed:\n{}", out.dump());
    push_as(a.path(), &srv, &token, "A");
    pull_as(a.path(), &srv, &token, "A");
    pull_as(b.path(), &srv, &token, "B");
    for d in [a.path(), b.path()] {
        assert!(
            conflict_copies(d).is_empty(),
            "no conflicts of a computer's own versions: {:?}",
            list_tree(d)
        );
    }
    pull_as(c.path(), &srv, &token, "C");
    assert_same_tree(a.path(), c.path());
    assert_same_tree(b.path(), c.path());
    assert_eq!(read(&c.path().join("f1.txt")), b"f1 v1, after the backup");
    assert!(!c.path().join("gone-later.txt").exists(), "a delete made after the backup is made again");
}

/// A full disk on the client: a clear error that says it is this computer's disk (exit 7),
/// nothing torn or left half-written in the folder, and the next run after space is freed
/// converges.
#[test]
fn a_full_disk_on_the_client_is_reported_and_the_next_pull_converges() {
    if euid() != 0 {
        println!("skipped: mounting a small tmpfs for the client's folder needs root");
        return;
    }
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let a = temp_dir("a");
    write(&a.path().join("big.bin"), random_bytes(11, 12 << 20));
    for i in 0..5 {
        write(&a.path().join(format!("small{i}.txt")), format!("small {i}"));
    }
    // Far more than fits: each of these that does not is counted, not each said, and once the
    // disk is full the pull asks for no more of them.
    for i in 0..64 {
        write(&a.path().join(format!("mid/{i:02}.bin")), random_bytes(100 + i, 1 << 20));
    }
    push(a.path(), &srv, &token);

    let (_holder, mnt) = mount_tmpfs("8m");
    let b = mnt.0.join("b");
    let full = sync_cmd("pull", &b, &srv, &token, &[]);
    assert_eq!(full.status.code(), Some(7), "{}", full.dump());
    let received = stat_line(&full.stdout, "Total bytes received")
        .unwrap_or_else(|| panic!("no byte count: {}", full.dump()));
    // 76 MiB on the server: what fit (8 MiB) and what was asked for before the disk filled (the
    // 32 MiB window) came, not the rest.
    assert!(received < 48 << 20, "{received} bytes received onto a full disk: {}", full.dump());
    assert!(full.stderr.contains("this computer's disk is full"), "{}", full.dump());
    let said = full.stderr.lines().filter(|l| l.contains("disk is full")).count();
    assert_eq!(
        said,
        2,
        "one line for the first file that did not fit, one for how many more: {}",
        full.dump()
    );
    assert!(full.stderr.contains("more files did not fit either"), "{}", full.dump());
    assert!(!b.join("big.bin").exists(), "no torn file in place");
    let temps: Vec<String> = list_tree(&b).into_iter().filter(|p| p.contains(".deltasync-tmp-")).collect();
    assert!(temps.is_empty(), "temp files left: {temps:?}");

    mnt.resize("160m");
    pull(&b, &srv, &token);
    assert_same_tree(a.path(), &b);
}

/// Regression: a `watch` that had sent only tiny files (under 64 bytes, never put in the
/// connection's zstd stream) ended a stream it had not begun when it went quiet; the server
/// called the empty frame malformed and closed the connection, and the watch reconnected,
/// trusting the server "on first use" a second time. Both ends of every quiet connection must
/// keep working, whatever went through the stream.
#[test]
fn a_quiet_watch_connection_stays_up_whatever_it_sent() {
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let a = temp_dir("quiet-a");
    let b = temp_dir("quiet-b");
    write(&a.path().join("tiny.txt"), b"tiny");
    write(&b.path().join("text.txt"), "some text to compress ".repeat(50));
    let logs = temp_dir("quiet-log");
    /// Killed when dropped, so a failing assertion leaves no watcher running.
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut watchers = Vec::new();
    for (dir, name) in [(a.path(), "a"), (b.path(), "b")] {
        let log = logs.path().join(format!("{name}.log"));
        let f = std::fs::File::create(&log).unwrap();
        let child = command()
            .arg("watch")
            .arg(dir)
            .args(["--server", &srv.address(), "--token", &token, "--no-progress", "--device", name])
            .stdin(std::process::Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap();
        watchers.push((Killed(child), log));
    }
    let wait = |p: &Path, what: &str| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !p.exists() {
            assert!(Instant::now() < deadline, "{what} never arrived");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait(&b.path().join("tiny.txt"), "tiny.txt on b");
    wait(&a.path().join("text.txt"), "text.txt on a");
    // Both connections go quiet (the streams end after 2 s), then carry more of both kinds.
    std::thread::sleep(Duration::from_secs(4));
    write(&a.path().join("tiny2.txt"), b"tiny 2");
    write(&b.path().join("text2.txt"), "more text to compress ".repeat(50));
    wait(&b.path().join("tiny2.txt"), "tiny2.txt on b");
    wait(&a.path().join("text2.txt"), "text2.txt on a");
    std::thread::sleep(Duration::from_secs(4));
    write(&a.path().join("text3.txt"), "and more text again ".repeat(50));
    wait(&b.path().join("text3.txt"), "text3.txt on b");
    for (child, log) in watchers {
        drop(child);
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(!text.contains("went away"), "the connection was dropped:\n{text}");
        assert_eq!(text.matches("trusting the server").count(), 1, "{text}");
    }
    assert!(!srv.log().contains("malformed"), "{}", srv.log());
}
