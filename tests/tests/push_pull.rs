//! Push and pull between "computers" (temp folders) through a real `deltasync serve`.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::Path;

use filetime::FileTime;

use crate::util::*;

/// The mtime given to `old.txt`: 2001-09-09 01:46:40.123456789 UTC.
const OLD_SECS: i64 = 1_000_000_000;
const OLD_NANOS: u32 = 123_456_789;

/// A tree with every kind of thing a folder holds.
fn build_sample_tree(root: &Path) {
    write(&root.join("notes.txt"), "some notes\n");
    write(&root.join("a/b/c/deep.txt"), "deep down\n");
    write(&root.join("a/b/sibling.txt"), "next to c\n");
    fs::create_dir_all(root.join("empty")).unwrap();
    fs::create_dir_all(root.join("a/empty-inner")).unwrap();
    write(&root.join("with space/été 日本.md"), "# unicode name\n");
    write(&root.join("script.sh"), "#!/bin/sh\necho hi\n");
    set_mode(&root.join("script.sh"), 0o755);
    symlink("notes.txt", root.join("link")).unwrap();
    write(&root.join("old.txt"), "written long ago\n");
    filetime::set_file_mtime(root.join("old.txt"), FileTime::from_unix_time(OLD_SECS, OLD_NANOS)).unwrap();
    write(&root.join("zero.bin"), b"");
    write(&root.join("big.bin"), random_bytes(1, 3 << 20));
}

fn conflict_copies(dir: &Path) -> Vec<String> {
    list_tree(dir).into_iter().filter(|p| p.contains("(conflict ")).collect()
}

#[test]
fn push_then_pull_into_new_folder_gives_identical_tree() {
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let a = temp_dir("ds-a-");
    build_sample_tree(a.path());
    push(a.path(), &srv, &token);

    let b_parent = temp_dir("ds-b-");
    let b = b_parent.path().join("not-yet-there");
    pull(&b, &srv, &token);

    assert_same_tree(a.path(), &b);
    // The same facts, spelled out.
    assert_eq!(fs::read_link(b.join("link")).unwrap(), Path::new("notes.txt"));
    assert!(fs::symlink_metadata(b.join("link")).unwrap().file_type().is_symlink());
    assert_eq!(fs::metadata(b.join("script.sh")).unwrap().permissions().mode() & 0o777, 0o755);
    let md = fs::metadata(b.join("old.txt")).unwrap();
    assert_eq!((md.mtime(), md.mtime_nsec()), (OLD_SECS, i64::from(OLD_NANOS)));
    assert!(b.join("empty").is_dir() && fs::read_dir(b.join("empty")).unwrap().next().is_none());
    assert!(b.join("a/empty-inner").is_dir());
    assert_eq!(read_string(&b.join("with space/été 日本.md")), "# unicode name\n");
    assert_eq!(fs::metadata(b.join("zero.bin")).unwrap().len(), 0);
    assert_eq!(read(&b.join("big.bin")), random_bytes(1, 3 << 20));
}

#[test]
fn edits_deletes_and_renames_from_second_computer_come_back() {
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let a = temp_dir("ds-a-");
    build_sample_tree(a.path());
    push(a.path(), &srv, &token);
    let b = temp_dir("ds-b-");
    pull(b.path(), &srv, &token);
    assert_same_tree(a.path(), b.path());

    let b = b.path();
    write(&b.join("notes.txt"), "edited notes, longer than before\n");
    write(&b.join("zero.bin"), "not empty any more");
    fs::remove_file(b.join("a/b/sibling.txt")).unwrap();
    fs::remove_dir_all(b.join("a/b/c")).unwrap();
    fs::remove_dir(b.join("empty")).unwrap();
    fs::create_dir_all(b.join("renamed")).unwrap();
    fs::rename(b.join("with space/été 日本.md"), b.join("renamed/été.md")).unwrap();
    fs::rename(b.join("big.bin"), b.join("big-renamed.bin")).unwrap();
    write(&b.join("new/inner/file.txt"), "brand new\n");
    fs::create_dir_all(b.join("fresh-empty")).unwrap();
    set_mode(&b.join("script.sh"), 0o644);
    fs::remove_file(b.join("link")).unwrap();
    symlink("old.txt", b.join("link")).unwrap();
    filetime::set_file_mtime(b.join("old.txt"), FileTime::from_unix_time(1_200_000_000, 5)).unwrap();
    push(b, &srv, &token);

    pull(a.path(), &srv, &token);
    assert_same_tree(a.path(), b);
    let a = a.path();
    assert!(!a.join("a/b/c").exists() && !a.join("a/b/sibling.txt").exists() && !a.join("empty").exists());
    assert!(!a.join("with space/été 日本.md").exists() && !a.join("big.bin").exists());
    assert_eq!(read_string(&a.join("renamed/été.md")), "# unicode name\n");
    assert_eq!(read(&a.join("big-renamed.bin")), random_bytes(1, 3 << 20));
    assert_eq!(fs::read_link(a.join("link")).unwrap(), Path::new("old.txt"));
    assert_eq!(fs::metadata(a.join("script.sh")).unwrap().permissions().mode() & 0o111, 0);
}

#[test]
fn small_edit_in_big_file_sends_a_small_delta() {
    const SIZE: usize = 10 << 20; // more than one 8 MiB diff window
    const EDIT: usize = 4096;
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let a = temp_dir("ds-a-");
    let mut data = random_bytes(3, SIZE);
    write(&a.path().join("big.bin"), &data);
    let first = push(a.path(), &srv, &token);
    let (sent, _) = first.stats();
    assert!(
        sent > SIZE as u64,
        "the first push sent only {sent} bytes of a {SIZE}-byte file\n{}",
        first.dump()
    );

    let b = temp_dir("ds-b-");
    pull(b.path(), &srv, &token);

    // Overwrite 4 KiB in the middle, not block-aligned, keeping the size.
    let at = SIZE / 2 + 123;
    data[at..at + EDIT].copy_from_slice(&random_bytes(4, EDIT));
    write(&a.path().join("big.bin"), &data);
    let second = push(a.path(), &srv, &token);
    let limit = (4 * EDIT + 8192) as u64;
    assert!(
        second.wire_bytes() < limit,
        "a {EDIT}-byte edit cost {} bytes on the wire (limit {limit})\n{}",
        second.wire_bytes(),
        second.dump()
    );
    assert_eq!(second.stat("Number of files transferred"), 1, "{}", second.dump());

    // The other computer gets the edit as a delta too, and the result is right.
    let down = pull(b.path(), &srv, &token);
    assert!(
        down.wire_bytes() < limit,
        "downloading a {EDIT}-byte edit cost {} bytes on the wire (limit {limit})\n{}",
        down.wire_bytes(),
        down.dump()
    );
    assert_same_tree(a.path(), b.path());

    // The server kept the replaced 10 MiB version aside to free it after replying; it must go.
    let mut left = srv.temp_files();
    for _ in 0..100 {
        if left.is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
        left = srv.temp_files();
    }
    assert!(left.is_empty(), "replaced versions never freed: {left:?}");
}

#[test]
fn rename_into_subfolder_sends_no_content() {
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let a = temp_dir("ds-a-");
    let data = random_bytes(5, 2 << 20);
    write(&a.path().join("big.bin"), &data);
    write(&a.path().join("small.txt"), "small\n");
    push(a.path(), &srv, &token);
    let b = temp_dir("ds-b-");
    pull(b.path(), &srv, &token);

    fs::create_dir(a.path().join("sub")).unwrap();
    fs::rename(a.path().join("big.bin"), a.path().join("sub/big.bin")).unwrap();
    let out = push(a.path(), &srv, &token);
    assert!(out.wire_bytes() < 2000, "a rename cost {} bytes\n{}", out.wire_bytes(), out.dump());
    assert_eq!(out.stat("Literal data"), 0, "{}", out.dump());

    // The other computer moves its own copy instead of downloading it.
    let down = pull(b.path(), &srv, &token);
    assert!(down.wire_bytes() < 2000, "pulling a rename cost {} bytes\n{}", down.wire_bytes(), down.dump());
    assert_same_tree(a.path(), b.path());
    assert_eq!(read(&b.path().join("sub/big.bin")), data);
}

/// A copy made on one computer arrives on the other as a local copy of the file it already
/// has (no content on the wire), put in place with the round's downloads (found in testing: a
/// round with nothing to download then dropped them).
#[test]
fn a_copy_arrives_as_a_local_copy_without_its_content() {
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let a = temp_dir("ds-a-");
    let data = random_bytes(6, 2 << 20);
    write(&a.path().join("orig.bin"), &data);
    push(a.path(), &srv, &token);
    let b = temp_dir("ds-b-");
    pull(b.path(), &srv, &token);

    fs::create_dir(a.path().join("copies")).unwrap();
    for i in 0..3 {
        fs::copy(a.path().join("orig.bin"), a.path().join(format!("copies/copy{i}.bin"))).unwrap();
    }
    // Copied by the server from what it holds: uploads all the same (it said "up to date").
    let up = push(a.path(), &srv, &token);
    assert!(up.stdout.starts_with("3 uploaded;"), "{}", up.dump());
    assert!(up.wire_bytes() < 20_000, "pushing three copies cost {} bytes\n{}", up.wire_bytes(), up.dump());
    let down = sync_cmd("pull", b.path(), &srv, &token, &["-v"]).ok("pull");
    assert!(
        down.wire_bytes() < 20_000,
        "pulling three copies cost {} bytes\n{}",
        down.wire_bytes(),
        down.dump()
    );
    assert!(
        down.stdout.contains("copied copies/copy0.bin") || down.stderr.contains("copied copies/copy0.bin"),
        "{}",
        down.dump()
    );
    assert_same_tree(a.path(), b.path());
    for i in 0..3 {
        assert_eq!(read(&b.path().join(format!("copies/copy{i}.bin"))), data);
    }
}

#[test]
fn accounts_cannot_see_each_other() {
    let srv = start_server();
    let token_a = add_account(&srv.data, "alice");
    let token_b = add_account(&srv.data, "bob");
    let a = temp_dir("ds-a-");
    write(&a.path().join("secret.txt"), "alice's secret\n");
    fs::create_dir(a.path().join("private-dir")).unwrap();
    push(a.path(), &srv, &token_a);

    let parent = temp_dir("ds-b-");
    let b = parent.path().join("bob");
    pull(&b, &srv, &token_b);
    let names: Vec<_> = fs::read_dir(&b).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, [".deltasync"], "bob's empty account showed alice's files");

    // Alice's files are there for alice.
    let a2 = parent.path().join("alice2");
    pull(&a2, &srv, &token_a);
    assert_same_tree(a.path(), &a2);
}

#[test]
fn wrong_token_is_refused_and_never_stored() {
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let bad = hex_token(7);
    assert_ne!(bad, token);

    // A fresh folder.
    let fresh = temp_dir("ds-fresh-");
    write(&fresh.path().join("f.txt"), "hello\n");
    let out = sync_cmd("push", fresh.path(), &srv, &bad, &[]);
    assert!(!out.success(), "push with a wrong token succeeded\n{}", out.dump());
    assert!(out.stderr.contains("authentication failed"), "{}", out.dump());
    let hits = files_containing(&fresh.path().join(".deltasync"), bad.as_bytes());
    assert!(hits.is_empty(), "the rejected token was stored in {hits:?}");

    // A folder that already synced with the right token keeps it.
    let good = temp_dir("ds-good-");
    write(&good.path().join("g.txt"), "good\n");
    push(good.path(), &srv, &token);
    let out = sync_cmd("pull", good.path(), &srv, &bad, &[]);
    assert!(!out.success(), "pull with a wrong token succeeded\n{}", out.dump());
    assert!(out.stderr.contains("authentication failed"), "{}", out.dump());
    let hits = files_containing(&good.path().join(".deltasync"), bad.as_bytes());
    assert!(hits.is_empty(), "the rejected token was stored in {hits:?}");
    // The remembered token still works.
    write(&good.path().join("g2.txt"), "more\n");
    run(command().arg("push").arg(good.path()).args(["--server", &srv.address(), "--no-progress"]))
        .ok("push with the remembered token");
}

fn hex_token(seed: u64) -> String {
    random_bytes(seed, 32).iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn conflicting_edits_keep_both_versions() {
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let x = temp_dir("ds-x-");
    let y = temp_dir("ds-y-");
    let (x, y) = (x.path(), y.path());
    write(&x.join("f.txt"), "base version\n");
    write(&x.join("other.txt"), "untouched\n");
    push_as(x, &srv, &token, "x");
    pull_as(y, &srv, &token, "y");
    assert_same_tree(x, y);

    write(&x.join("f.txt"), "x's version\n");
    push_as(x, &srv, &token, "x");
    write(&y.join("f.txt"), "y's different version\n");
    pull_as(y, &srv, &token, "y");

    assert_eq!(read_string(&y.join("f.txt")), "x's version\n", "y should hold the server's version at f.txt");
    let copies = conflict_copies(y);
    assert_eq!(copies.len(), 1, "expected one conflict copy on y, found {copies:?} in {:?}", list_tree(y));
    assert!(copies[0].starts_with("f (conflict "), "{copies:?}");
    assert_eq!(read_string(&y.join(&copies[0])), "y's different version\n");

    push_as(y, &srv, &token, "y");
    pull_as(x, &srv, &token, "x");
    assert_same_tree(x, y);
    assert_eq!(read_string(&x.join("f.txt")), "x's version\n");
    assert_eq!(read_string(&x.join(&copies[0])), "y's different version\n");
}

#[test]
fn edit_beats_delete() {
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let x = temp_dir("ds-x-");
    let y = temp_dir("ds-y-");
    let (x, y) = (x.path(), y.path());
    write(&x.join("f.txt"), "base version\n");
    write(&x.join("keep.txt"), "keep\n");
    push_as(x, &srv, &token, "x");
    pull_as(y, &srv, &token, "y");

    fs::remove_file(x.join("f.txt")).unwrap();
    push_as(x, &srv, &token, "x");
    write(&y.join("f.txt"), "y edited this before hearing of the delete\n");
    pull_as(y, &srv, &token, "y");
    assert_eq!(read_string(&y.join("f.txt")), "y edited this before hearing of the delete\n");

    push_as(y, &srv, &token, "y");
    pull_as(x, &srv, &token, "x");
    assert_eq!(read_string(&x.join("f.txt")), "y edited this before hearing of the delete\n");
    assert_same_tree(x, y);
    assert!(conflict_copies(x).is_empty(), "{:?}", list_tree(x));
}

#[test]
fn files_added_in_a_deleted_directory_survive() {
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let x = temp_dir("ds-x-");
    let y = temp_dir("ds-y-");
    let (x, y) = (x.path(), y.path());
    write(&x.join("d/old.txt"), "old\n");
    write(&x.join("d/sub/older.txt"), "older\n");
    write(&x.join("other.txt"), "other\n");
    push_as(x, &srv, &token, "x");
    pull_as(y, &srv, &token, "y");

    fs::remove_dir_all(x.join("d")).unwrap();
    push_as(x, &srv, &token, "x");
    write(&y.join("d/new.txt"), "added on y\n");
    write(&y.join("d/sub/newer.txt"), "also added on y\n");
    pull_as(y, &srv, &token, "y");
    assert_eq!(read_string(&y.join("d/new.txt")), "added on y\n");
    assert_eq!(read_string(&y.join("d/sub/newer.txt")), "also added on y\n");
    push_as(y, &srv, &token, "y");
    pull_as(x, &srv, &token, "x");

    for (who, dir) in [("x", x), ("y", y)] {
        assert_eq!(read_string(&dir.join("d/new.txt")), "added on y\n", "on {who}");
        assert_eq!(read_string(&dir.join("d/sub/newer.txt")), "also added on y\n", "on {who}");
        assert!(!dir.join("d/old.txt").exists(), "d/old.txt came back on {who}");
    }
    assert_same_tree(x, y);

    // Another full cycle both ways keeps them.
    push_as(x, &srv, &token, "x");
    pull_as(y, &srv, &token, "y");
    push_as(y, &srv, &token, "y");
    pull_as(x, &srv, &token, "x");
    assert_same_tree(x, y);
    assert!(x.join("d/new.txt").is_file() && y.join("d/new.txt").is_file());
    let fresh = temp_dir("ds-z-");
    pull(fresh.path(), &srv, &token);
    assert_same_tree(x, fresh.path());
}

#[test]
fn unchanged_second_push_transfers_nothing() {
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let a = temp_dir("ds-a-");
    build_sample_tree(a.path());
    let first = push(a.path(), &srv, &token);
    assert!(first.stat("Number of files transferred") > 0, "{}", first.dump());
    let second = push(a.path(), &srv, &token);
    assert_eq!(second.stat("Number of files transferred"), 0, "{}", second.dump());
    assert_eq!(second.stat("Literal data"), 0, "{}", second.dump());
}

#[test]
fn directory_replaced_by_file_or_symlink_syncs() {
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let a = temp_dir("ds-a-");
    let b = temp_dir("ds-b-");
    let (a, b) = (a.path(), b.path());
    write(&a.join("d/inside.txt"), "in d\n");
    write(&a.join("e/inside.txt"), "in e\n");
    write(&a.join("target.txt"), "link target\n");
    push(a, &srv, &token);
    pull(b, &srv, &token);

    fs::remove_dir_all(a.join("d")).unwrap();
    write(&a.join("d"), "d is a file now\n");
    fs::remove_dir_all(a.join("e")).unwrap();
    symlink("target.txt", a.join("e")).unwrap();
    push(a, &srv, &token);
    pull(b, &srv, &token);
    assert_same_tree(a, b);
    let fresh = temp_dir("ds-z-");
    pull(fresh.path(), &srv, &token);
    assert_same_tree(a, fresh.path());
}

#[test]
fn file_or_symlink_replaced_by_directory_syncs() {
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let a = temp_dir("ds-a-");
    let b = temp_dir("ds-b-");
    let (a, b) = (a.path(), b.path());
    write(&a.join("g"), "g is a file\n");
    symlink("g", a.join("l")).unwrap();
    push(a, &srv, &token);
    pull(b, &srv, &token);

    fs::remove_file(a.join("g")).unwrap();
    write(&a.join("g/x.txt"), "g is a directory now\n");
    fs::remove_file(a.join("l")).unwrap();
    write(&a.join("l/y.txt"), "l is a directory now\n");
    push(a, &srv, &token);
    pull(b, &srv, &token);
    assert_same_tree(a, b);
}

/// A first push of more files than `sync::STATS_BESIDE` takes the way that writes the stat cache
/// on a second connection while it uploads: afterwards the cache holds every file beside the
/// round's own index rows, the next push finds nothing to send, and an edit is still seen. (Which
/// connection wrote the rows is not visible from here; the unit test `stat_changes_counts_...`
/// covers the second connection.)
#[test]
fn a_big_first_push_keeps_the_stat_cache_of_every_file() {
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let a = temp_dir("a");
    for i in 0..4200 {
        write(&a.path().join(format!("d{}/f{i}.txt", i / 500)), format!("file {i}"));
    }
    push(a.path(), &srv, &token);
    let count = |table: &str| -> i64 {
        let db = rusqlite::Connection::open(a.path().join(".deltasync/index.db")).unwrap();
        db.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0)).unwrap()
    };
    assert_eq!(count("stat_cache"), 4200);
    assert_eq!(count("synced WHERE kind = 1"), 4200);
    let again = push(a.path(), &srv, &token);
    assert!(again.stdout.contains("up to date"), "{}", again.dump());
    // A change after it is seen and sent.
    write(&a.path().join("d0/f0.txt"), "file 0, edited");
    push(a.path(), &srv, &token);
    let b = temp_dir("b");
    pull(b.path(), &srv, &token);
    assert_same_tree(a.path(), b.path());
}
