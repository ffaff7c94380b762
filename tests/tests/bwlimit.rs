//! `--bwlimit`: pushes and pulls through a real server on loopback with a limit on either end
//! take at least as long as the limit allows. Lower bounds only (the machine is shared and
//! loaded; achieved rates against the limit are in README, from `benches/bwlimit.sh`).

use std::path::Path;
use std::time::{Duration, Instant};

use crate::util::*;

/// 512 KiB/s, the limit the tests use.
const RATE: u64 = 512 << 10;
/// 1.5 MiB of random data: about 3 s at [`RATE`], well under 0.5 s without a limit.
const SIZE: usize = 3 << 19;
/// What may pass at once at [`RATE`]: the bucket's depth (the larger of 16 KiB and 50 ms of the
/// rate), with room to spare.
const DEPTH: u64 = 32 << 10;

/// The least time moving [`SIZE`] bytes can take at [`RATE`].
fn floor() -> Duration {
    Duration::from_secs_f64((SIZE as u64 - DEPTH) as f64 / RATE as f64)
}

fn timed(cmd: &str, dir: &Path, srv: &Server, token: &str, extra: &[&str]) -> (Output, Duration) {
    let t0 = Instant::now();
    let out = sync_cmd(cmd, dir, srv, token, extra).ok(cmd);
    (out, t0.elapsed())
}

/// A folder holding the random file, pushed without a limit; returns the folder.
fn pushed(srv: &Server, token: &str) -> tempfile::TempDir {
    let a = temp_dir("ds-bw-a-");
    write(&a.path().join("big.bin"), random_bytes(12, SIZE));
    push(a.path(), srv, token);
    a
}

fn pulled_matches(srv: &Server, token: &str, extra: &[&str]) -> Duration {
    let b = temp_dir("ds-bw-b-");
    let (out, took) = timed("pull", b.path(), srv, token, extra);
    assert_eq!(read(&b.path().join("big.bin")), random_bytes(12, SIZE), "pulled content differs");
    assert!(out.stats().1 >= SIZE as u64, "received fewer bytes than the file: {}", out.dump());
    took
}

#[test]
fn push_with_bwlimit_takes_at_least_size_over_rate() {
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let a = temp_dir("ds-bw-a-");
    write(&a.path().join("big.bin"), random_bytes(11, SIZE));
    let (out, took) = timed("push", a.path(), &srv, &token, &["--bwlimit", "512K"]);
    assert!(out.stats().0 >= SIZE as u64, "sent fewer bytes than the file: {}", out.dump());
    assert!(took >= floor(), "a push of {SIZE} bytes at 512 KiB/s took {took:?}, less than {:?}", floor());
    // And it arrived whole.
    let b = temp_dir("ds-bw-b-");
    pull(b.path(), &srv, &token);
    assert_eq!(read(&b.path().join("big.bin")), random_bytes(11, SIZE));
}

#[test]
fn pull_with_a_download_limit_takes_at_least_size_over_rate() {
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let _a = pushed(&srv, &token);
    // Download limited only (upload unlimited).
    let took = pulled_matches(&srv, &token, &["--bwlimit", "0:512K"]);
    assert!(took >= floor(), "a pull of {SIZE} bytes at 512 KiB/s took {took:?}, less than {:?}", floor());
}

/// `serve --bwlimit` limits each connection from the server's side: what it receives (a
/// client's push) and what it sends (a client's pull), the clients themselves unlimited.
#[test]
fn serve_bwlimit_limits_pushes_and_pulls() {
    let srv = start_server_args(&["--bwlimit", "512K"]);
    let token = add_account(&srv.data, "alice");
    let a = temp_dir("ds-bw-a-");
    write(&a.path().join("big.bin"), random_bytes(12, SIZE));
    let (_, took) = timed("push", a.path(), &srv, &token, &[]);
    assert!(
        took >= floor(),
        "a push of {SIZE} bytes to a 512 KiB/s server took {took:?}, less than {:?}",
        floor()
    );
    let took = pulled_matches(&srv, &token, &[]);
    assert!(
        took >= floor(),
        "a pull of {SIZE} bytes from a 512 KiB/s server took {took:?}, less than {:?}",
        floor()
    );
}

/// `serve --bwlimit SEND:RECEIVE` is from the server's side: `0:512K` limits what it receives
/// (pushes), not what it sends.
#[test]
fn serve_bwlimit_receive_side_limits_pushes() {
    let srv = start_server_args(&["--bwlimit", "0:512K"]);
    let token = add_account(&srv.data, "alice");
    let a = temp_dir("ds-bw-a-");
    write(&a.path().join("big.bin"), random_bytes(13, SIZE));
    let (_, took) = timed("push", a.path(), &srv, &token, &[]);
    assert!(took >= floor(), "a push of {SIZE} bytes to a server receiving at 512 KiB/s took {took:?}");
}

#[test]
fn malformed_bwlimit_is_a_usage_error_naming_the_form() {
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let a = temp_dir("ds-bw-a-");
    for bad in ["fast", "2X", "1:2:3", "-1M", "512B", ""] {
        for cmd in ["push", "pull"] {
            let out = sync_cmd(cmd, a.path(), &srv, &token, &[&format!("--bwlimit={bad}")]);
            assert_eq!(out.status.code(), Some(2), "{cmd} --bwlimit {bad:?}: {}", out.dump());
            assert!(
                out.stderr.contains("--bwlimit"),
                "{bad:?}: the message names the option: {}",
                out.stderr
            );
            assert!(
                out.stderr.contains("500K") || out.stderr.contains("1K (1 KiB/s)"),
                "{bad:?}: the message says the expected form: {}",
                out.stderr
            );
        }
    }
    let out = run(command().args(["watch"]).arg(a.path()).args(["--bwlimit", "2 Mbit"]));
    assert_eq!(out.status.code(), Some(2), "{}", out.dump());
    assert!(out.stderr.contains("500K"), "{}", out.stderr);
    let data = temp_dir("ds-bw-srv-");
    let out = run(command()
        .args(["serve", "--listen", "127.0.0.1:0", "--bwlimit", "lots", "--data"])
        .arg(data.path()));
    assert_eq!(out.status.code(), Some(2), "{}", out.dump());
    assert!(out.stderr.contains("--bwlimit") && out.stderr.contains("500K"), "{}", out.stderr);
}

/// A child killed when dropped, so a failing assertion leaves no process running.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A server on a port outside the ephemeral range, so it can come back on the same port after a
/// restart (as in watch.rs).
fn start_server_on_a_fixed_port() -> Server {
    let low: u64 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    let (from, to) = if low > 12_000 { (10_000, low) } else { (61_000, 65_000) };
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    let mut rng = XorShift::new(now.as_nanos() as u64 ^ u64::from(std::process::id()) ^ 0xb3);
    for _ in 0..100 {
        let port = from + rng.next_u64() % (to - from);
        if let Some(s) = start_server_at(&format!("127.0.0.1:{port}")) {
            return s;
        }
    }
    panic!("no free port in {from}..{to} for the server");
}

/// The account's change count, from `account list` (read from the data folder, no connection).
fn changes(srv: &Server, name: &str) -> u64 {
    let out = run(command().args(["account", "list", "--data"]).arg(&srv.data)).ok("account list");
    out.stdout
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}\t"))?.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no line for {name} in `account list`: {}", out.dump()))
}

/// Waits until the account has `n` changes; how long that took.
fn until_changes(srv: &Server, n: u64, watch: &mut Killed, log: &Path) -> Duration {
    let t0 = Instant::now();
    while changes(srv, "alice") < n {
        if let Ok(Some(st)) = watch.0.try_wait() {
            panic!("watch exited ({st}): {}", std::fs::read_to_string(log).unwrap_or_default());
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the upload did not arrive: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    t0.elapsed()
}

/// `watch --bwlimit` limits its rounds, and still after it reconnected to a restarted server.
#[test]
fn watch_keeps_its_bwlimit_across_reconnects() {
    let mut srv = start_server_on_a_fixed_port();
    let token = add_account(&srv.data, "alice");
    let a = temp_dir("ds-bw-w-");
    let logs = temp_dir("ds-bw-log-");
    let log = logs.path().join("watch.log");
    let log_file = std::fs::File::create(&log).unwrap();
    write(&a.path().join("first.bin"), random_bytes(14, SIZE));
    let child = command()
        .arg("watch")
        .arg(a.path())
        .args(["--server", &srv.address(), "--token", &token, "--no-progress", "--bwlimit", "512K"])
        .stdin(std::process::Stdio::null())
        .stdout(log_file.try_clone().unwrap())
        .stderr(log_file)
        .spawn()
        .expect("spawn watch");
    let mut watch = Killed(child);
    let took = until_changes(&srv, 1, &mut watch, &log);
    assert!(
        took >= floor(),
        "watch's first round sent {SIZE} bytes at 512 KiB/s in {took:?}, less than {:?}",
        floor()
    );

    srv.kill_hard();
    srv.start_again();
    let t0 = Instant::now();
    while !std::fs::read_to_string(&log).unwrap_or_default().contains("reconnected") {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "watch did not reconnect: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        if let Ok(Some(st)) = watch.0.try_wait() {
            panic!("watch exited ({st}): {}", std::fs::read_to_string(&log).unwrap_or_default());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    write(&a.path().join("second.bin"), random_bytes(15, SIZE));
    let took = until_changes(&srv, 2, &mut watch, &log);
    assert!(
        took >= floor(),
        "after a reconnect, watch sent {SIZE} bytes at 512 KiB/s in {took:?}, less than {:?}",
        floor()
    );
}
