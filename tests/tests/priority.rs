//! Priorities: small files are never stuck behind a big one. A round moves big files after the
//! small ones, and `watch` sends big files over a lane of their own, so a file saved while a
//! big upload is in flight goes out at once beside it. On loopback with `--bwlimit` on, so the
//! big transfer lasts seconds; no timing is asserted, only what arrived first.

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::util::*;

/// Bigger than the client's threshold for big files (4 MiB).
const BIG: usize = 6 << 20;

/// A child killed when the test ends, passing or not.
struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `watch DIR` with `args` and `env`, its output into `log`; killed when dropped.
fn spawn_watch(
    dir: &Path,
    srv: &Server,
    token: &str,
    args: &[&str],
    env: &[(&str, &str)],
    log: &Path,
) -> Kill {
    let log = std::fs::File::create(log).expect("log");
    Kill(
        command()
            .arg("watch")
            .arg(dir)
            .args(["--server", &srv.address(), "--token", token, "--no-progress"])
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn watch"),
    )
}

/// The paths a `--json` run reports, in the order it reports them, with their action.
fn json_files(out: &Output) -> Vec<(String, String)> {
    out.stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["type"] == "file")
        .map(|v| {
            (v["path"].as_str().unwrap_or("").to_string(), v["action"].as_str().unwrap_or("").to_string())
        })
        .collect()
}

fn folder_with_big_and_small(dir: &Path) {
    // Named to come first in the plan's path order.
    write(&dir.join("a-big.bin"), random_bytes(31, BIG));
    for i in 0..20 {
        write(&dir.join(format!("z/small-{i:02}.txt")), format!("small file {i}\n"));
    }
}

/// Every small file is done before the big one starts, in a push and in a pull.
#[test]
fn a_round_moves_small_files_before_a_big_one() {
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let a = temp_dir("ds-prio-a-");
    folder_with_big_and_small(a.path());
    let out = run(command().arg("push").arg(a.path()).args([
        "--server",
        &srv.address(),
        "--token",
        &token,
        "--json",
    ]))
    .ok("push --json");
    let sent = json_files(&out);
    let files: Vec<&String> =
        sent.iter().filter(|(p, _)| p.ends_with(".txt") || p.ends_with(".bin")).map(|(p, _)| p).collect();
    assert_eq!(files.len(), 21, "{}", out.dump());
    assert_eq!(
        files.last().map(|s| s.as_str()),
        Some("a-big.bin"),
        "the big file went before small ones: {files:?}"
    );

    let b = temp_dir("ds-prio-b-");
    let out = run(command().arg("pull").arg(b.path()).args([
        "--server",
        &srv.address(),
        "--token",
        &token,
        "--json",
    ]))
    .ok("pull --json");
    let got = json_files(&out);
    let files: Vec<&String> =
        got.iter().filter(|(p, _)| p.ends_with(".txt") || p.ends_with(".bin")).map(|(p, _)| p).collect();
    assert_eq!(files.len(), 21, "{}", out.dump());
    assert_eq!(
        files.last().map(|s| s.as_str()),
        Some("a-big.bin"),
        "the big file came before small ones: {files:?}"
    );
    assert_same_tree(a.path(), b.path());
}

/// `watch` with a big upload in flight (held to 1 MiB/s, so it lasts about 6 s): a small file
/// saved meanwhile is on the server while the big one is still on its way.
#[test]
fn watch_sends_a_small_file_beside_a_big_upload_in_flight() {
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let a = temp_dir("ds-prio-wa-");
    let logs = temp_dir("ds-prio-log-");
    let _w =
        spawn_watch(a.path(), &srv, &token, &["-v", "--bwlimit", "1M"], &[], &logs.path().join("watch.log"));
    let watch_log = || std::fs::read_to_string(logs.path().join("watch.log")).unwrap_or_default();
    let b = temp_dir("ds-prio-wb-");
    let pull_b = || {
        run(command().arg("pull").arg(b.path()).args(["--server", &srv.address(), "--token", &token, "-q"]))
            .ok("pull")
    };
    // The watch's first round (an empty folder) is done once the server knows the account's
    // device; a pull then is up to date.
    pull_b();
    write(&a.path().join("big.bin"), random_bytes(32, BIG));
    // The upload is in flight once the server writes its chunks.
    let t0 = Instant::now();
    while srv.temp_files().iter().all(|(_, len)| *len == 0) {
        assert!(t0.elapsed() < Duration::from_secs(60), "the big upload never started\n{}", watch_log());
        std::thread::sleep(Duration::from_millis(20));
    }
    write(&a.path().join("small.txt"), b"saved during the big upload\n");
    let t0 = Instant::now();
    loop {
        pull_b();
        if b.path().join("small.txt").exists() {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(120), "small.txt never arrived\n{}", watch_log());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !b.path().join("big.bin").exists(),
        "small.txt arrived only once the big upload was done: it waited behind it\n{}",
        watch_log()
    );
    assert_eq!(read(&b.path().join("small.txt")), b"saved during the big upload\n");
    // And the big one arrives whole.
    let t0 = Instant::now();
    while !b.path().join("big.bin").exists() {
        assert!(t0.elapsed() < Duration::from_secs(120), "big.bin never arrived\n{}", watch_log());
        std::thread::sleep(Duration::from_millis(200));
        pull_b();
    }
    assert_eq!(read(&b.path().join("big.bin")), random_bytes(32, BIG));
}

/// A big file `watch` downloads over its lane is known afterwards as written: the round the
/// lane's end starts (and every later one) does not read it again to hash it.
#[test]
fn a_big_download_over_the_lane_is_not_hashed_again() {
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let (a, b, logs) = (temp_dir("ds-prio-la-"), temp_dir("ds-prio-lb-"), temp_dir("ds-prio-llog-"));
    // At debug, the scan names each file it hashes.
    let debug = [("RUST_LOG", "deltasync=debug")];
    let _w = spawn_watch(b.path(), &srv, &token, &[], &debug, &logs.path().join("watch.log"));
    let watch_log = || std::fs::read_to_string(logs.path().join("watch.log")).unwrap_or_default();
    let wait_for = |what: &dyn Fn() -> bool, context: &str| {
        let t0 = Instant::now();
        while !what() {
            assert!(t0.elapsed() < Duration::from_secs(120), "{context}\n{}", watch_log());
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait_for(&|| watch_log().contains("watching"), "the watch never started");
    let push_a = || {
        run(command().arg("push").arg(a.path()).args(["--server", &srv.address(), "--token", &token, "-q"]))
            .ok("push")
    };
    write(&a.path().join("big.bin"), random_bytes(33, BIG));
    push_a();
    wait_for(&|| b.path().join("big.bin").exists(), "big.bin never arrived");
    // A later change: its round on B scans after the lane's download ended.
    write(&a.path().join("later.txt"), b"later\n");
    push_a();
    wait_for(&|| b.path().join("later.txt").exists(), "later.txt never arrived");
    assert_eq!(read(&b.path().join("big.bin")), random_bytes(33, BIG));
    assert!(
        watch_log().contains("downloaded big.bin"),
        "big.bin did not come over the watch\n{}",
        watch_log()
    );
    assert!(!watch_log().contains("hashed big.bin"), "big.bin was read again to hash it\n{}", watch_log());
}
