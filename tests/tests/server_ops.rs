//! Running the server: the per-session log line, log levels and formats, SIGTERM (what
//! `systemctl stop` sends), and `account add` on a data folder no server has opened.

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::util::*;

/// Waits (at most 30 s: the server writes a session's line once it notices the client left)
/// until the server's log has `n` lines containing `needle`; returns those lines.
fn wait_lines(srv: &Server, needle: &str, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let lines: Vec<String> =
            srv.log().lines().filter(|l| l.contains(needle)).map(str::to_string).collect();
        if lines.len() >= n || Instant::now() > deadline {
            return lines;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A folder of three small files.
fn three_files() -> tempfile::TempDir {
    let dir = temp_dir("ops-src");
    write(&dir.path().join("a.txt"), b"alpha\n");
    write(&dir.path().join("b.txt"), b"bravo bravo\n");
    write(&dir.path().join("sub/c.txt"), b"charlie charlie charlie\n");
    dir
}

/// SIGTERM stops the server as Ctrl-C does: exit 0, `deltasync: stopped`, and the sessions it
/// closed are logged as ended by the shutdown.
#[test]
fn sigterm_stops_the_server_cleanly() {
    let mut srv = start_server();
    let token = add_account(&srv.data, "alice");
    let dir = three_files();
    push(dir.path(), &srv, &token).ok("push");
    // A session still open when the signal comes.
    let mut open = srv.tls();
    let hello = deltasync::protocol::Hello {
        magic: deltasync::protocol::MAGIC,
        version: deltasync::protocol::PROTOCOL_VERSION,
        token: Some(token.clone()),
        device: "idle".into(),
        folder: "default".into(),
    };
    send_frame(&mut open, &hello).expect("send hello");
    let welcome: Option<deltasync::protocol::Welcome> = recv_frame(&mut open);
    assert!(
        matches!(welcome, Some(deltasync::protocol::Welcome::Accepted { .. })),
        "not welcomed: {welcome:?}\n{}",
        srv.log()
    );
    let status = srv.signal("TERM", Duration::from_secs(30));
    let log = srv.log();
    let status =
        status.unwrap_or_else(|| panic!("the server did not stop on SIGTERM within 30 s; log:\n{log}"));
    assert!(status.success(), "SIGTERM: the server exited with {status} (not 0); log:\n{log}");
    assert!(log.contains("deltasync: stopped"), "no `deltasync: stopped` after SIGTERM; log:\n{log}");
    assert!(
        log.lines().any(|l| l.contains("session ended")
            && l.contains("label=idle")
            && l.contains("reason=\"shutdown\"")),
        "the open session was not logged as ended by the shutdown; log:\n{log}"
    );
}

/// A child process killed (and reaped) when the test ends, even by a failed assertion.
struct Kid(Option<Child>);

impl Drop for Kid {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// SIGTERM stops `watch` as Ctrl-C does: exit 0 and `deltasync: stopped watching`.
#[test]
fn sigterm_stops_watch_cleanly() {
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let dir = three_files();
    let logs = temp_dir("ops-watch-log");
    let log_path = logs.path().join("watch.log");
    let log_file = fs::File::create(&log_path).expect("watch log");
    let child = command()
        .args(["watch"])
        .arg(dir.path())
        .args([
            "--server",
            &srv.address(),
            "--token",
            &token,
            "--no-progress",
            "--fingerprint",
            &srv.fingerprint,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .expect("spawn watch");
    let mut kid = Kid(Some(child));
    // Its first round has uploaded the folder: it is running, not starting.
    let deadline = Instant::now() + Duration::from_secs(60);
    while account_changes(&srv.data, "alice") < 3 {
        let log = fs::read_to_string(&log_path).unwrap_or_default();
        assert!(Instant::now() < deadline, "watch did not upload the folder within 60 s; its log:\n{log}");
        if let Some(Ok(Some(st))) = kid.0.as_mut().map(|c| c.try_wait()) {
            panic!("watch exited early ({st}); its log:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut c = kid.0.take().expect("running");
    let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Ok(Some(st)) = c.try_wait() {
            break st;
        }
        if Instant::now() > deadline {
            kid.0 = Some(c);
            panic!(
                "watch did not stop on SIGTERM within 30 s; its log:\n{}",
                fs::read_to_string(&log_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let log = fs::read_to_string(&log_path).unwrap_or_default();
    assert!(status.success(), "SIGTERM: watch exited with {status} (not 0); its log:\n{log}");
    assert!(log.contains("stopped watching"), "no `stopped watching` after SIGTERM; its log:\n{log}");
}

/// After a push and a pull, the server has logged exactly one INFO line for each session, naming
/// the account, the device, the address, the files and the bytes each way (the same bytes the
/// client's `--stats` counted on its socket), how long it took and why it ended.
#[test]
fn one_info_line_per_session() {
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let dir = three_files();
    let up = push(dir.path(), &srv, &token).ok("push");
    let lines = wait_lines(&srv, "session ended", 1);
    assert_eq!(lines.len(), 1, "expected one session line after a push; log:\n{}", srv.log());
    let line = &lines[0];
    let (sent, received) = up.stats();
    for want in [
        "INFO".to_string(),
        "account=alice".to_string(),
        "device=first".to_string(),
        "peer=127.0.0.1:".to_string(),
        "files_up=3".to_string(),
        "files_down=0".to_string(),
        format!("bytes_received={sent} "),
        format!("bytes_sent={received} "),
        "duration_ms=".to_string(),
        "reason=\"client closed\"".to_string(),
    ] {
        assert!(line.contains(&want), "the session line lacks `{want}`: {line}\n--- push ---\n{}", up.dump());
    }
    let copy = temp_dir("ops-copy");
    pull(copy.path(), &srv, &token).ok("pull");
    let lines = wait_lines(&srv, "session ended", 2);
    assert_eq!(lines.len(), 2, "expected a second session line after a pull; log:\n{}", srv.log());
    assert!(
        lines[1].contains("files_up=0") && lines[1].contains("files_down=3"),
        "the pull's line: {}",
        lines[1]
    );
}

/// `--log-format json`: every line the server writes to stderr is a JSON object, and the session
/// line carries its fields as JSON fields.
#[test]
fn json_log_lines() {
    let mut srv = start_server_args(&["--log-format", "json"]);
    let token = add_account(&srv.data, "alice");
    let dir = three_files();
    push(dir.path(), &srv, &token).ok("push");
    assert_eq!(wait_lines(&srv, "session ended", 1).len(), 1, "no session line; log:\n{}", srv.log());
    // A warning too (a failed authentication).
    let bad = sync_cmd("push", dir.path(), &srv, &"0".repeat(64), &[]);
    assert_eq!(bad.status.code(), Some(4), "a wrong token: {}", bad.dump());
    assert!(!wait_lines(&srv, "authentication failed", 1).is_empty(), "no warning; log:\n{}", srv.log());
    let status = srv.signal("TERM", Duration::from_secs(30));
    assert!(status.is_some_and(|s| s.success()), "the server did not stop cleanly: {status:?}");
    let log = srv.log();
    let mut session = None;
    for line in log.lines().filter(|l| !l.starts_with("deltasync: ")) {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("a log line is not JSON ({e}): {line}\nlog:\n{log}"));
        assert!(v.is_object(), "not an object: {line}");
        assert!(v.get("timestamp").is_some() && v.get("level").is_some(), "no timestamp or level: {line}");
        if v["message"] == "session ended" {
            session = Some(v);
        }
    }
    let s = session.unwrap_or_else(|| panic!("no session line; log:\n{log}"));
    assert_eq!(s["level"], "INFO", "{s}");
    assert_eq!(s["account"], "alice", "{s}");
    assert_eq!(s["device"], "first", "{s}");
    assert_eq!(s["files_up"], 3, "{s}");
    assert_eq!(s["files_down"], 0, "{s}");
    assert_eq!(s["reason"], "client closed", "{s}");
    assert!(s["bytes_received"].as_u64().is_some_and(|n| n > 0), "{s}");
    assert!(s["bytes_sent"].as_u64().is_some_and(|n| n > 0), "{s}");
    assert!(s["peer"].as_str().is_some_and(|p| p.starts_with("127.0.0.1:")), "{s}");
}

/// A log that goes to a file (not a terminal) has no colour codes, even where `NO_COLOR` is unset.
#[test]
fn no_colour_codes_when_stderr_is_not_a_terminal() {
    let srv = start_server_with(None, &[("NO_COLOR", "")]);
    let token = add_account(&srv.data, "alice");
    let dir = three_files();
    push(dir.path(), &srv, &token).ok("push");
    assert_eq!(wait_lines(&srv, "session ended", 1).len(), 1, "no session line; log:\n{}", srv.log());
    let log = srv.log();
    assert!(!log.contains("\x1b["), "colour codes in a log file:\n{log:?}");
}

/// `--log-level warn` leaves out the INFO session lines; so does `RUST_LOG=warn`; `-v` and
/// `--log-level` together are a usage error.
#[test]
fn log_level_and_rust_log() {
    for (args, envs) in [(&["--log-level", "warn"][..], &[][..]), (&[][..], &[("RUST_LOG", "warn")][..])] {
        let mut srv = if envs.is_empty() { start_server_args(args) } else { start_server_with(None, envs) };
        let token = add_account(&srv.data, "alice");
        let dir = three_files();
        push(dir.path(), &srv, &token).ok("push");
        let bad = sync_cmd("push", dir.path(), &srv, &"0".repeat(64), &[]);
        assert_eq!(bad.status.code(), Some(4), "a wrong token: {}", bad.dump());
        // Stopping the server ends every session, so everything it would log is in the file.
        let status = srv.signal("TERM", Duration::from_secs(30));
        assert!(status.is_some_and(|s| s.success()), "the server did not stop cleanly: {status:?}");
        let log = srv.log();
        assert!(!log.contains("session ended"), "{args:?} {envs:?}: an INFO line was logged:\n{log}");
        assert!(
            log.contains("WARN") && log.contains("authentication failed"),
            "{args:?} {envs:?}: no WARN:\n{log}"
        );
    }
    let data = temp_dir("ops-usage");
    let out = run(command().args(["serve", "-v", "--log-level", "info", "--data"]).arg(data.path()));
    assert_eq!(out.status.code(), Some(2), "-v with --log-level: {}", out.dump());
}

/// `account add` on a folder that does not exist warns that it made a new, empty data folder
/// (a token made there is not known to a server running elsewhere); on the folder a server has
/// opened it does not. `account token` on a missing folder fails without making one.
#[test]
fn account_add_warns_about_a_new_data_folder() {
    let root = temp_dir("ops-data");
    let fresh = root.path().join("new-data");
    let out = run(command().args(["account", "add", "alice", "--data"]).arg(&fresh)).ok("account add");
    assert!(
        out.stderr.contains("warning:")
            && out.stderr.contains("did not exist")
            && out.stderr.contains("--data"),
        "no warning for a new data folder: {}",
        out.dump()
    );
    // Made but never served: still warned.
    let again = run(command().args(["account", "add", "bob", "--data"]).arg(&fresh)).ok("account add");
    assert!(
        again.stderr.contains("no server has opened"),
        "no warning for an unserved folder: {}",
        again.dump()
    );

    let srv = start_server();
    let served = run(command().args(["account", "add", "carol", "--data"]).arg(&srv.data)).ok("account add");
    assert!(!served.stderr.contains("warning"), "a warning for the server's own folder: {}", served.dump());
    let token =
        run(command().args(["account", "token", "carol", "--device", "laptop", "--data"]).arg(&srv.data))
            .ok("account token");
    assert!(!token.stderr.contains("warning"), "a warning for the server's own folder: {}", token.dump());

    let missing = root.path().join("typo");
    let out =
        run(command().args(["account", "token", "alice", "--device", "laptop", "--data"]).arg(&missing));
    assert_eq!(out.status.code(), Some(1), "account token on a missing folder: {}", out.dump());
    assert!(out.stderr.contains("not a deltasync data folder"), "{}", out.dump());
    assert!(!Path::new(&missing).exists(), "account token made a data folder");
}
