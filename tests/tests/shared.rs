//! Several `deltasync serve` processes on one PostgreSQL database and one S3 bucket (the real
//! services `.ci/services.sh` starts): a commit made through one process reaches a watcher
//! connected to the other; a process killed mid-upload loses nothing, and the client finishes
//! on the other; both processes agree on the journal. Skipped without the services' variables
//! (failed, with `DELTASYNC_TEST_SERVICES=required`, as in CI).

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::util::*;

fn wait_until(what: &str, deadline: Duration, mut done: impl FnMut() -> bool, log: impl Fn() -> String) {
    let end = Instant::now() + deadline;
    while !done() {
        assert!(Instant::now() < end, "{what} within {deadline:?}\n{}", log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn spawn_watch(dir: &Path, addr: &str, token: &str, device: &str, log: &Path) -> KillOnDrop {
    let out = std::fs::File::create(log).expect("watch log");
    let child = command()
        .arg("watch")
        .arg(dir)
        .args(["--server", addr, "--token", token, "--no-progress", "--device", device])
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("log"))
        .stderr(out)
        .spawn()
        .expect("spawn watch");
    KillOnDrop(child)
}

/// A file pushed through process 2 reaches a `watch` connected to process 1 at once: process 2's
/// commit is announced through the database (LISTEN/NOTIFY) to process 1, which tells its
/// watcher. Without that, the watcher would see it only at its next rescan (5 minutes).
#[test]
fn a_commit_through_one_process_reaches_a_watcher_on_the_other() {
    let Some(srv) = start_shared_pair() else { return };
    let token = add_account(&srv.data, "alice");
    let (one, two) = srv.addresses();
    let (watched, other, logs) = (temp_dir("ds-sh-w-"), temp_dir("ds-sh-o-"), temp_dir("ds-sh-log-"));
    let log = logs.path().join("watch");
    let _w = spawn_watch(watched.path(), &one, &token, "watcher", &log);
    let wlog = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_until("the watcher started", Duration::from_secs(60), || wlog().contains("watching"), wlog);

    for i in 0..3 {
        let name = format!("from-two-{i}.txt");
        write(&other.path().join(&name), format!("pushed through the second process, {i}"));
        run(&mut sync_command("push", other.path(), &two, &token, &["--device", "other"])).ok("push to two");
        let arrived = watched.path().join(&name);
        wait_until(
            &format!("{name}, committed through process 2, reached the watcher on process 1"),
            Duration::from_secs(60),
            || arrived.exists(),
            || format!("watch log:\n{}\nservers:\n{}", wlog(), srv.log()),
        );
        assert_eq!(read_string(&arrived), format!("pushed through the second process, {i}"));
    }
    // And the other way: the watcher's own change, sent through process 1, is seen by process 2.
    write(&watched.path().join("from-one.txt"), "sent by the watcher");
    wait_until(
        "the watcher's file is on the server",
        Duration::from_secs(60),
        || {
            run(&mut sync_command("pull", other.path(), &two, &token, &["--device", "other"]))
                .ok("pull from two");
            other.path().join("from-one.txt").exists()
        },
        || format!("watch log:\n{}\nservers:\n{}", wlog(), srv.log()),
    );
}

/// Process 1 is killed (SIGKILL) while a big upload goes through it: the version committed
/// before stays whole (process 2 serves it), nothing half-written is visible, and the same push
/// run against process 2 finishes the change.
#[test]
fn a_process_killed_mid_upload_loses_nothing_and_the_client_finishes_on_the_other() {
    let Some(mut srv) = start_shared_pair() else { return };
    let token = add_account(&srv.data, "alice");
    let (one, two) = srv.addresses();
    let src = temp_dir("ds-sh-src-");
    write(&src.path().join("small.txt"), "committed before");
    let old = random_bytes(7, 4 << 20);
    write(&src.path().join("big.bin"), &old);
    run(&mut sync_command("push", src.path(), &one, &token, &[])).ok("first push");

    // A new big version, sent slowly through process 1 (1 MiB/s), which dies part-way.
    let new = random_bytes(8, 24 << 20);
    write(&src.path().join("big.bin"), &new);
    let mut slow = sync_command("push", src.path(), &one, &token, &["--bwlimit", "1M"]);
    let mut push = KillOnDrop(slow.stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("spawn push"));
    std::thread::sleep(Duration::from_secs(6));
    srv.kill_first();
    let status = push.0.wait().expect("the push ends");
    assert!(!status.success(), "the push through the killed process cannot have succeeded");

    // Process 2 still serves the version committed before, whole.
    let check = temp_dir("ds-sh-check-");
    run(&mut sync_command("pull", check.path(), &two, &token, &[])).ok("pull from two");
    assert!(read(&check.path().join("big.bin")) == old, "the committed version is torn or lost");
    assert_eq!(read_string(&check.path().join("small.txt")), "committed before");

    // The client finishes on process 2.
    run(&mut sync_command("push", src.path(), &two, &token, &[])).ok("push to two");
    run(&mut sync_command("pull", check.path(), &two, &token, &[])).ok("pull the new version");
    assert!(read(&check.path().join("big.bin")) == new, "the new version did not arrive whole");
    assert_same_tree(src.path(), check.path());
}

/// Uploads through both processes at once to one account: every change committed once, in
/// one journal, and both processes give the same tree.
#[test]
fn both_processes_commit_to_one_journal() {
    let Some(srv) = start_shared_pair() else { return };
    let token = add_account(&srv.data, "alice");
    let (one, two) = srv.addresses();
    let (a, b) = (temp_dir("ds-sh-a-"), temp_dir("ds-sh-b-"));
    for i in 0..40 {
        write(&a.path().join(format!("a/{i}.txt")), format!("a {i}"));
        write(&b.path().join(format!("b/{i}.txt")), format!("b {i}"));
    }
    let spawn = |dir: &Path, addr: &str, device: &str| {
        sync_command("push", dir, addr, &token, &["--device", device])
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn push")
    };
    let (pa, pb) = (spawn(a.path(), &one, "a"), spawn(b.path(), &two, "b"));
    let (mut pa, mut pb) = (KillOnDrop(pa), KillOnDrop(pb));
    assert!(pa.0.wait().expect("push a").success() && pb.0.wait().expect("push b").success());
    // 80 files and their 2 folders: one change each, whichever process committed it.
    assert_eq!(account_changes(&srv.data, "alice"), 82, "{}", srv.log());
    let (x, y) = (temp_dir("ds-sh-x-"), temp_dir("ds-sh-y-"));
    run(&mut sync_command("pull", x.path(), &one, &token, &[])).ok("pull one");
    run(&mut sync_command("pull", y.path(), &two, &token, &[])).ok("pull two");
    assert_same_tree(x.path(), y.path());
    assert_eq!(list_tree(x.path()).iter().filter(|p| p.ends_with(".txt")).count(), 80);
}

/// Cuts one service off from both processes while a push wants it, then brings it back: the push
/// fails with a message that names the service, nothing half-done is committed, and the same
/// processes serve again once it is back (no restart).
fn outage(service: &str) {
    if !services_configured() {
        return;
    }
    let (pg, s3) = service_addrs();
    let real = if service == "database" { pg } else { s3 };
    let fwd = Cuttable::new(real);
    let via = fwd.addr;
    let Some(srv) = start_shared_pair_via(&|a| if a == real { via } else { a }) else { return };
    let token = add_account(&srv.data, "alice");
    let (one, two) = srv.addresses();
    let dir = temp_dir("ds-sh-out-");
    write(&dir.path().join("before.txt"), "before the outage");
    run(&mut sync_command("push", dir.path(), &one, &token, &[])).ok("push before");

    fwd.cut();
    write(&dir.path().join("during.bin"), random_bytes(3, 300 << 10));
    let out = run(&mut sync_command("push", dir.path(), &one, &token, &[]));
    assert!(!out.success(), "a push succeeded with the {service} cut off:\n{}", out.dump());
    let said = out.stderr.to_lowercase();
    let names = if service == "database" {
        said.contains("database")
    } else {
        said.contains("object store") || said.contains("s3 bucket")
    };
    assert!(names, "the failure does not name the {service}:\n{}", out.dump());

    fwd.restore();
    // Back: the same processes serve again (their pools reconnect).
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let out = run(&mut sync_command("push", dir.path(), &two, &token, &[]));
        if out.success() {
            break;
        }
        assert!(
            Instant::now() < end,
            "no push succeeded after the {service} came back:\n{}\n{}",
            out.dump(),
            srv.log()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let check = temp_dir("ds-sh-out-check-");
    run(&mut sync_command("pull", check.path(), &one, &token, &[])).ok("pull after");
    assert_same_tree(dir.path(), check.path());
}

#[test]
fn a_lost_database_is_reported_and_the_processes_recover_when_it_returns() {
    outage("database");
}

#[test]
fn a_lost_object_store_is_reported_and_the_processes_recover_when_it_returns() {
    outage("object store");
}

/// The storage options are checked before anything starts: usage errors (exit 2) that say the
/// expected form.
#[test]
fn storage_options_are_checked() {
    let data = temp_dir("ds-sh-opts-");
    let serve = |args: &[&str]| {
        run(command()
            .args(["serve", "--listen", "127.0.0.1:0", "--data"])
            .arg(data.path())
            .args(args)
            .env_remove("DELTASYNC_METADATA")
            .env_remove("DELTASYNC_STORE"))
    };
    let out = serve(&["--metadata", "mysql://db/x"]);
    assert_eq!(out.status.code(), Some(2), "{}", out.dump());
    assert!(out.stderr.contains("postgres://"), "{}", out.dump());
    let out = serve(&["--store", "s3://packs"]);
    assert_eq!(out.status.code(), Some(2), "--store without --metadata:\n{}", out.dump());
    assert!(out.stderr.contains("--metadata"), "{}", out.dump());
    let out = serve(&["--metadata", "postgres://u@127.0.0.1:1/x", "--store", "packs"]);
    assert_eq!(out.status.code(), Some(2), "{}", out.dump());
    assert!(out.stderr.contains("s3://BUCKET"), "{}", out.dump());
    let out = serve(&["--s3-endpoint", "http://127.0.0.1:1"]);
    assert_eq!(out.status.code(), Some(2), "--s3-endpoint without --store:\n{}", out.dump());
}
