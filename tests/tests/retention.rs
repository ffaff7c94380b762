//! Retention and pruning: `deltasync prune` forgets the versions a policy does not keep, frees
//! the packs nothing kept needs, never touches a current version, and a prune killed at any
//! point leaves every kept version readable (the next prune collects what it left).

use std::path::Path;

use super::util::*;

/// Bytes of pack files in a data folder, and how many.
fn packs(data: &Path) -> (u64, usize) {
    let mut total = (0, 0);
    let Ok(rd) = std::fs::read_dir(data.join("packs")) else { return total };
    for d in rd.flatten() {
        if d.file_name() == "tmp" {
            continue;
        }
        for f in std::fs::read_dir(d.path()).into_iter().flatten().flatten() {
            total.0 += f.metadata().map(|m| m.len()).unwrap_or(0);
            total.1 += 1;
        }
    }
    total
}

fn prune(data: &Path, keep: &str, envs: &[(&str, &str)]) -> Output {
    run(command()
        .args(["prune", "--keep", keep, "--grace", "0s", "--data"])
        .arg(data)
        .envs(envs.iter().copied()))
}

/// What `deltasync log DIR PATH --json` lists: (rev, op) newest first.
fn versions(dir: &Path, path: &str) -> Vec<(u64, String)> {
    let out = run(command().args(["log"]).arg(dir).arg(path).arg("--json")).ok("log");
    out.stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let rev = l.split("\"rev\":").nth(1).and_then(|r| r.split([',', '}']).next()).unwrap_or("?");
            let op = l.split("\"op\":\"").nth(1).and_then(|r| r.split('"').next()).unwrap_or("?");
            (rev.trim().parse().unwrap_or_else(|_| panic!("no rev in {l}")), op.to_string())
        })
        .collect()
}

/// A folder with `big.bin` pushed in three versions (1.5 MiB of random bytes each, so each
/// version's chunks are its own) and `kept.txt` once; returns the folder and the versions.
fn three_versions(srv: &Server, token: &str) -> (tempfile::TempDir, Vec<Vec<u8>>) {
    let a = temp_dir("ds-ret-a-");
    let mut all = Vec::new();
    write(&a.path().join("kept.txt"), "the same all along\n");
    for v in 0..3u64 {
        let bytes = random_bytes(40 + v, 1536 << 10);
        write(&a.path().join("big.bin"), &bytes);
        push(a.path(), srv, token);
        all.push(bytes);
    }
    (a, all)
}

#[test]
fn prune_keeping_current_frees_old_versions_and_never_a_current_one() {
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let (a, all) = three_versions(&srv, &token);
    assert_eq!(versions(a.path(), "big.bin").len(), 3);
    let (before, _) = packs(&srv.data);
    assert!(before >= 3 * (1536 << 10), "three versions should be stored: {before}");

    prune(&srv.data, "current", &[]).ok("prune --keep current");
    let (after, _) = packs(&srv.data);
    assert!(
        after < before - (2 * (1536 << 10)) + (256 << 10),
        "the two old versions were not freed: {before} -> {after} bytes of packs"
    );
    assert_eq!(versions(a.path(), "big.bin").len(), 1, "old versions are still listed");
    // The current versions are whole.
    let b = temp_dir("ds-ret-b-");
    pull(b.path(), &srv, &token);
    assert_eq!(read(&b.path().join("big.bin")), all[2]);
    assert_eq!(read_string(&b.path().join("kept.txt")), "the same all along\n");
    // And a later edit still goes as a delta against the kept version.
    let mut edited = all[2].clone();
    edited[1000..1100].fill(7);
    write(&a.path().join("big.bin"), &edited);
    let out = push(a.path(), &srv, &token);
    assert!(out.stats().0 < 200 << 10, "the edit was not sent as a delta: {}", out.dump());
    pull(b.path(), &srv, &token);
    assert_eq!(read(&b.path().join("big.bin")), edited);
}

#[test]
fn prune_keeping_all_keeps_every_version_restorable() {
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let (a, all) = three_versions(&srv, &token);
    let before = packs(&srv.data);
    prune(&srv.data, "all", &[]).ok("prune --keep all");
    assert_eq!(packs(&srv.data), before, "keep all freed something");
    let revs = versions(a.path(), "big.bin");
    assert_eq!(revs.len(), 3);
    for ((rev, _), want) in revs.iter().rev().zip(&all) {
        let out = temp_dir("ds-ret-to-");
        run(command()
            .args(["restore"])
            .arg(a.path())
            .arg("big.bin")
            .args(["--rev", &rev.to_string(), "--to"])
            .arg(out.path()))
        .ok("restore --to");
        assert_eq!(&read(&out.path().join("big.bin")), want, "version at rev {rev}");
    }
}

#[test]
fn a_deleted_path_is_forgotten_once_its_policy_says_so_and_kept_before() {
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let a = temp_dir("ds-ret-del-");
    write(&a.path().join("gone.txt"), "deleted later\n");
    push(a.path(), &srv, &token);
    std::fs::remove_file(a.path().join("gone.txt")).unwrap();
    push(a.path(), &srv, &token);
    let listed =
        |dir: &Path| run(command().args(["log"]).arg(dir).arg("--deleted")).ok("log --deleted").stdout;
    // A policy that keeps deleted paths a day keeps it...
    prune(&srv.data, "all:1d,deleted:1d", &[]).ok("prune");
    assert!(listed(a.path()).contains("gone.txt"), "{}", listed(a.path()));
    // ...and one that keeps them no time forgets it.
    prune(&srv.data, "all:1d,deleted:0s", &[]).ok("prune");
    assert!(!listed(a.path()).contains("gone.txt"), "{}", listed(a.path()));
}

/// The prune's crash points (built with `--features failpoints`): after its transaction, and
/// after the first pack file was deleted.
#[cfg(feature = "failpoints")]
#[test]
fn a_prune_killed_at_any_point_leaves_every_kept_version_readable() {
    for phase in ["prune-recorded", "prune-deleting"] {
        let srv = start_server();
        let token = add_account(&srv.data, "alice");
        let (a, all) = three_versions(&srv, &token);
        // More packs to delete than one, so the second crash point is reached.
        write(&a.path().join("big.bin"), random_bytes(99, 1536 << 10));
        push(a.path(), &srv, &token);
        let cut = prune(&srv.data, "current", &[("DELTASYNC_FAILPOINT", phase)]);
        assert!(!cut.success(), "{phase}: the prune should have been stopped:\n{}", cut.dump());
        assert!(cut.stderr.contains(&format!("failpoint {phase}")), "{phase}: {}", cut.dump());
        // Every current version reads back whole.
        let b = temp_dir("ds-ret-crash-");
        pull(b.path(), &srv, &token);
        assert_eq!(read(&b.path().join("big.bin")), read(&a.path().join("big.bin")), "{phase}");
        assert_eq!(read_string(&b.path().join("kept.txt")), "the same all along\n", "{phase}");
        // The next prune finishes the job: only what the current versions need stays.
        prune(&srv.data, "current", &[]).ok("prune after the crash");
        let (left, _) = packs(&srv.data);
        assert!(left < 2 * (1536 << 10), "{phase}: {left} bytes of packs left after the second prune");
        let c = temp_dir("ds-ret-crash2-");
        pull(c.path(), &srv, &token);
        assert_same_tree(b.path(), c.path());
        drop(all);
    }
}

/// A session commits a full batch of uploads (2,048) in a task of its own while it receives the
/// next one into a new pack. Content that comes again in the next batch is not looked for in
/// the pack still being committed: it is stored again, and the copy is garbage for a prune.
/// Every file arrives whole on a second computer, and on a third after a prune.
#[test]
fn uploads_committed_while_the_next_batch_arrives_all_arrive_before_and_after_a_prune() {
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let (a, b, c) = (temp_dir("ds-ret-batch-a-"), temp_dir("ds-ret-batch-b-"), temp_dir("ds-ret-batch-c-"));
    // Two full batches and a rest; every third file one of seven contents, repeated through all.
    for i in 0..4500u64 {
        let body = if i % 3 == 0 {
            random_bytes(i % 7, 2000)
        } else {
            random_bytes(1000 + i, 1000 + (i % 3000) as usize)
        };
        write(&a.path().join(format!("d{}/f{i:04}", i / 500)), body);
    }
    let up = push(a.path(), &srv, &token);
    assert!(up.stdout.starts_with("4500 uploaded;"), "{}", up.dump());
    pull(b.path(), &srv, &token);
    assert_same_tree(a.path(), b.path());
    prune(&srv.data, "current", &[]).ok("prune --keep current");
    pull(c.path(), &srv, &token);
    assert_same_tree(a.path(), c.path());
}
