//! What push, pull and watch print and how they exit, as scripts and cron read them: exit code 23
//! for a partial round, `-q`, `--json`, address errors, `watch --dry-run`, one line per change in
//! `watch`, completions and the man page, and the words for a full disk on the server.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::util::*;

/// `deltasync CMD DIR --server ADDR --token TOK EXTRA...` (no `--stats`, unlike `sync_command`).
fn plain(cmd: &str, dir: &Path, addr: &str, token: &str, extra: &[&str]) -> Command {
    let mut c = command();
    c.arg(cmd).arg(dir).args(["--server", addr, "--token", token]).args(extra);
    c
}

/// A child killed when the test ends, passing or not.
struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A push that cannot read one file (mode 600, another user's: the client runs as `nobody` when
/// the tests run as root, where permissions do not stop reads) uploads the rest, lists the file
/// with its cause, never says "up to date", and exits 23.
#[test]
fn a_push_that_skips_an_unreadable_file_exits_23_and_lists_it() {
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let (a, c) = (temp_dir("ds-out-a-"), temp_dir("ds-out-c-"));
    let root = a.path().join("synced");
    write(&root.join("ok.txt"), b"readable");
    write(&root.join("sub/also.txt"), b"readable too");
    write(&root.join("secret.txt"), b"not for this user");
    let as_root = euid() == 0;
    let mut cmd = plain("push", &root, &srv.address(), &token, &["--no-progress"]);
    if as_root {
        fs::set_permissions(a.path(), fs::Permissions::from_mode(0o755)).unwrap();
        for p in [root.clone(), root.join("ok.txt"), root.join("sub"), root.join("sub/also.txt")] {
            std::os::unix::fs::lchown(&p, Some(65534), Some(65534)).unwrap();
        }
        set_mode(&root.join("secret.txt"), 0o600);
        cmd.uid(65534).gid(65534);
    } else {
        set_mode(&root.join("secret.txt"), 0o000);
    }
    let out = run(&mut cmd);
    assert_eq!(out.status.code(), Some(23), "{}", out.dump());
    assert!(
        out.stderr.contains("skipped secret.txt: permission denied on this computer"),
        "names the path and that the cause is here:\n{}",
        out.dump()
    );
    assert!(out.stderr.contains("1 path skipped"), "{}", out.dump());
    assert!(!out.stdout.contains("up to date") && !out.stderr.contains("up to date"), "{}", out.dump());
    assert!(out.stdout.starts_with("2 uploaded;"), "{}", out.dump());
    pull(c.path(), &srv, &token);
    assert_eq!(read(&c.path().join("ok.txt")), b"readable");
    assert_eq!(read(&c.path().join("sub/also.txt")), b"readable too");
    assert!(!c.path().join("secret.txt").exists(), "the unreadable file was not uploaded");
    // Still skipped on the next run, and still not "up to date".
    let mut again = plain("push", &root, &srv.address(), &token, &["--no-progress", "-q"]);
    if as_root {
        again.uid(65534).gid(65534);
    }
    let again = run(&mut again);
    assert_eq!(again.status.code(), Some(23), "{}", again.dump());
    assert!(again.stderr.contains("skipped secret.txt"), "-q still lists failures:\n{}", again.dump());
    assert!(again.stdout.is_empty(), "{}", again.dump());
}

/// `-q` prints nothing at all on success: not on the first connection (trust, new folder), not
/// on a round with changes, not when up to date.
#[test]
fn a_quiet_push_and_pull_print_nothing_on_success() {
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let (a, c) = (temp_dir("ds-out-a-"), temp_dir("ds-out-c-"));
    write(&a.path().join("a.txt"), b"a");
    write(&a.path().join("d/b.txt"), b"b");
    for (cmd, dir) in [("push", a.path()), ("push", a.path()), ("pull", c.path())] {
        let out = run(&mut plain(cmd, dir, &srv.address(), &token, &["-q"])).ok(cmd);
        assert!(out.stdout.is_empty() && out.stderr.is_empty(), "{cmd} -q printed:\n{}", out.dump());
    }
    assert_eq!(read(&c.path().join("d/b.txt")), b"b");
    let loud = run(&mut plain("push", a.path(), &srv.address(), &token, &[])).ok("push");
    assert!(loud.stdout.starts_with("up to date; "), "{}", loud.dump());
    assert!(loud.stdout.contains(" in ") && loud.stdout.contains("/s)"), "time and rate: {}", loud.dump());
}

/// `--json`: only JSON lines on stdout, one per file with its action, then a summary.
#[test]
fn a_json_push_prints_one_object_per_file_and_a_summary() {
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let a = temp_dir("ds-out-a-");
    write(&a.path().join("a.txt"), b"a");
    write(&a.path().join("b.txt"), b"bb");
    write(&a.path().join("d/c.txt"), b"ccc");
    let out = run(&mut plain("push", a.path(), &srv.address(), &token, &["--json"])).ok("push --json");
    let objs: Vec<serde_json::Value> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}\n{}", out.dump())))
        .collect();
    let (summary, files) = objs.split_last().expect("at least the summary");
    assert_eq!(summary["type"], "summary", "{}", out.dump());
    assert_eq!(summary["uploaded"], 3);
    assert_eq!(summary["exit_code"], 0);
    assert!(summary["bytes_sent"].as_u64().unwrap() > 0);
    assert!(summary["elapsed_secs"].as_f64().is_some());
    let mut got: Vec<(String, String)> = files
        .iter()
        .map(|f| {
            assert_eq!(f["type"], "file", "{f}");
            (f["path"].as_str().unwrap().to_string(), f["action"].as_str().unwrap().to_string())
        })
        .collect();
    got.sort();
    let want = [("a.txt", "uploaded"), ("b.txt", "uploaded"), ("d", "mkdir"), ("d/c.txt", "uploaded")];
    assert_eq!(got, want.map(|(p, w)| (p.to_string(), w.to_string())), "{}", out.dump());
    assert!(!out.stderr.contains("uploaded"), "no human lines: {}", out.dump());

    let again = run(&mut plain("push", a.path(), &srv.address(), &token, &["--json"])).ok("push --json");
    let last: serde_json::Value = serde_json::from_str(again.stdout.trim()).expect("one summary line");
    assert_eq!(last["up_to_date"], true, "{}", again.dump());
}

/// A URL or a malformed address is a usage error that shows the expected form; a host without a
/// port means port 7700.
#[test]
fn server_addresses_are_checked_and_the_port_defaults_to_7700() {
    let a = temp_dir("ds-out-a-");
    write(&a.path().join("a.txt"), b"a");
    for bad in ["http://127.0.0.1:7700", "a:b:c", "127.0.0.1:99999", "https://backup.example.org"] {
        let out = run(&mut plain("push", a.path(), bad, "tok", &[]));
        assert_eq!(out.status.code(), Some(2), "{bad}: {}", out.dump());
        assert!(
            out.stderr.contains("HOST[:PORT]") && out.stderr.contains("192.168.1.5:7700"),
            "{bad}: {}",
            out.dump()
        );
        assert!(!out.stderr.contains("running there"), "{bad}: {}", out.dump());
    }
    // The environment variable is read the same way.
    let out = run(plain("push", a.path(), "127.0.0.1:1", "tok", &[])
        .env("DELTASYNC_SERVER", "http://x")
        .args(["--server", "http://y"]));
    assert_eq!(out.status.code(), Some(2), "{}", out.dump());
    // Nothing listens on 7700 in most runs; if something does, it is not ours to judge.
    let free = std::net::TcpListener::bind("127.0.0.1:7700").is_ok();
    let out = run(&mut plain("push", a.path(), "127.0.0.1", "tok", &["--timeout", "5"]));
    assert!(out.stderr.contains("127.0.0.1:7700"), "{}", out.dump());
    if free {
        assert_eq!(out.status.code(), Some(3), "{}", out.dump());
    }
}

/// `watch --dry-run` used to upload; it is refused, and nothing reaches the server.
#[test]
fn watch_refuses_a_dry_run_and_uploads_nothing() {
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let a = temp_dir("ds-out-a-");
    write(&a.path().join("a.txt"), b"a");
    let out = run(&mut plain("watch", a.path(), &srv.address(), &token, &["--dry-run", "--no-progress"]));
    assert_eq!(out.status.code(), Some(2), "{}", out.dump());
    assert!(out.stderr.contains("push --dry-run"), "{}", out.dump());
    assert_eq!(account_changes(&srv.data, "alice"), 0, "nothing was uploaded");
}

/// `watch` says each change it sends or receives in one line by default; `-q` says nothing.
#[test]
fn watch_prints_one_line_per_change() {
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let (a, b, logs) = (temp_dir("ds-out-a-"), temp_dir("ds-out-b-"), temp_dir("ds-out-log-"));
    let spawn = |dir: &Path, name: &str, extra: &[&str]| {
        let log = fs::File::create(logs.path().join(name)).expect("log");
        let child = plain("watch", dir, &srv.address(), &token, &["--no-progress"])
            .args(extra)
            .args(["--device", name])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn watch");
        Kill(child)
    };
    let _wa = spawn(a.path(), "A", &[]);
    let _wb = spawn(b.path(), "B", &["-q"]);
    let log = |name: &str| fs::read_to_string(logs.path().join(name)).unwrap_or_default();
    let wait_for = |what: &dyn Fn() -> bool, context: &str| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !what() {
            assert!(Instant::now() < deadline, "{context}\nA:\n{}\nB:\n{}", log("A"), log("B"));
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait_for(&|| log("A").contains("watching"), "A never started");
    let mut f = fs::File::create(a.path().join("new.txt")).expect("create");
    f.write_all(b"hello").expect("write");
    drop(f);
    wait_for(&|| b.path().join("new.txt").exists(), "new.txt never reached B");
    wait_for(&|| log("A").contains("uploaded new.txt"), "A did not say what it uploaded");
    write(&b.path().join("from-b.txt"), b"from B");
    wait_for(&|| log("A").contains("downloaded from-b.txt"), "A did not say what it downloaded");
    assert_eq!(log("A").matches("uploaded new.txt").count(), 1, "one line per change:\n{}", log("A"));
    // Folders deleted on B, here and by a change from A: the watcher drops their watches, which
    // its library logs at INFO (said once with -q, found in testing).
    fs::create_dir_all(a.path().join("gone/deeper")).expect("mkdir");
    write(&a.path().join("gone/deeper/f.txt"), b"f");
    fs::create_dir_all(b.path().join("here/deeper")).expect("mkdir");
    wait_for(&|| b.path().join("gone/deeper/f.txt").exists(), "gone/deeper/f.txt never reached B");
    wait_for(&|| a.path().join("here/deeper").is_dir(), "here/deeper never reached A");
    fs::remove_dir_all(a.path().join("gone")).expect("rm");
    fs::remove_dir_all(b.path().join("here")).expect("rm");
    wait_for(&|| !b.path().join("gone").exists(), "the delete of gone never reached B");
    wait_for(&|| !a.path().join("here").exists(), "the delete of here never reached A");
    assert!(log("B").is_empty(), "watch -q printed:\n{}", log("B"));
}

#[test]
fn completions_and_the_man_page_are_printed() {
    let bash = run(command().args(["completions", "bash"])).ok("completions bash");
    for needle in ["push", "pull", "watch", "--no-progress", "--max-delete", "--quiet", "--json"] {
        assert!(bash.stdout.contains(needle), "bash completions lack `{needle}`");
    }
    for shell in ["zsh", "fish", "elvish", "powershell"] {
        let out = run(command().args(["completions", shell])).ok(shell);
        assert!(out.stdout.contains("push"), "{shell}");
    }
    let bad = run(command().args(["completions", "tcsh"]));
    assert_eq!(bad.status.code(), Some(2), "{}", bad.dump());
    let man = run(command().arg("man")).ok("man");
    assert!(
        man.stdout.starts_with(".TH") || man.stdout.contains("\n.TH "),
        "{}",
        &man.stdout[..200.min(man.stdout.len())]
    );
    assert!(man.stdout.contains("deltasync"), "{}", man.dump());
}

/// The server's disk fills (a small tmpfs, root only): the push says whose disk is full, in
/// those words.
#[test]
fn a_full_disk_on_the_server_is_said_to_be_the_servers() {
    if euid() != 0 {
        println!("skipped: mounting a small tmpfs for the server's data folder needs root");
        return;
    }
    let (_holder, mnt) = mount_tmpfs("8m");
    let srv = start_server_with(Some(&mnt.0.join("data")), &[]);
    let token = add_account(&srv.data, "alice");
    let a = temp_dir("ds-out-a-");
    write(&a.path().join("first.txt"), b"first");
    push(a.path(), &srv, &token);
    let filler = mnt.0.join("filler");
    {
        let mut f = fs::File::create(&filler).expect("filler");
        let chunk = vec![0x5Au8; 64 << 10];
        while f.write_all(&chunk).is_ok() {}
    }
    // About 1 MiB left: the session still opens (its database writes fit), two 1.5 MiB files do not.
    let len = fs::metadata(&filler).expect("filler").len();
    fs::OpenOptions::new()
        .write(true)
        .open(&filler)
        .and_then(|f| f.set_len(len.saturating_sub(1 << 20)))
        .expect("shrink filler");
    write(&a.path().join("big.bin"), random_bytes(3, 1536 << 10));
    write(&a.path().join("big2.bin"), random_bytes(4, 1536 << 10));
    let out = run(&mut plain("push", a.path(), &srv.address(), &token, &["--no-progress"]));
    assert_eq!(out.status.code(), Some(1), "{}", out.dump());
    assert!(out.stderr.contains(".bin: the server's disk is full"), "{}", out.dump());
    assert!(!out.stderr.contains("bad upload data"), "{}", out.dump());
    assert!(!out.stdout.contains("up to date"), "{}", out.dump());
    drop(srv);
}

/// On a terminal 80 columns wide (a pty from `script`), no line of the bars is wider than the
/// terminal, they show a percentage, and `-v` prints its per-file lines (above them) instead of
/// being ignored.
#[test]
fn bars_fit_an_80_column_terminal_and_verbose_lines_go_above_them() {
    if Command::new("script").arg("--version").output().is_err() {
        println!("skipped: `script` (util-linux) is needed for a pseudo-terminal");
        return;
    }
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let a = temp_dir("ds-out-a-");
    write(&a.path().join("big.bin"), random_bytes(5, 96 << 20));
    for i in 0..20 {
        write(&a.path().join(format!("a folder with a rather long name/and another one/file {i}.txt")), b"x");
    }
    let inner = format!(
        "stty cols 80 rows 24; exec {BIN} push '{}' --server {} --token {token} -v",
        a.path().display(),
        srv.address()
    );
    let out = run(Command::new("script").args(["-qfec", &inner, "/dev/null"]).env("NO_COLOR", "1"));
    assert!(out.success(), "{}", out.dump());
    // Each escape sequence (cursor moves, clears) and each \r or \n ends a piece of a line.
    let mut pieces = vec![String::new()];
    let mut chars = out.stdout.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => {
                if chars.peek() == Some(&'[') {
                    chars.next();
                    while chars.next().is_some_and(|c| !c.is_ascii_alphabetic()) {}
                }
                pieces.push(String::new());
            }
            '\r' | '\n' => pieces.push(String::new()),
            c => pieces.last_mut().expect("a piece").push(c),
        }
    }
    // indicatif pads every line to the terminal's width and lets the terminal wrap it: cut the
    // pieces into rows of 80 columns. A bar line wider than that spills its end (the count of
    // files) onto the next row.
    let rows: Vec<String> = pieces
        .iter()
        .flat_map(|p| {
            p.chars().collect::<Vec<char>>().chunks(80).map(|r| r.iter().collect()).collect::<Vec<String>>()
        })
        .collect();
    let bars: Vec<&String> = rows.iter().filter(|r| r.contains("ETA")).collect();
    assert!(!bars.is_empty(), "no bar was drawn:\n{}", out.stdout);
    for b in &bars {
        assert!(
            b.contains("% ") && b.contains(" files"),
            "a bar line wider than 80 columns: {b:?}\n{bars:#?}"
        );
    }
    assert!(bars.iter().any(|b| b.contains(" files ")), "{bars:?}");
    assert!(rows.iter().any(|p| p.trim_end() == "uploaded big.bin"), "-v lines:\n{}", out.stdout);
    assert!(
        rows.iter().any(|p| p
            .trim_end()
            .starts_with("uploaded a folder with a rather long name/and another one/file")),
        "{}",
        out.stdout
    );
}

/// `restore -q` and `undo -q` print nothing on success either.
#[test]
fn a_quiet_restore_and_undo_print_nothing_on_success() {
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let a = temp_dir("ds-out-a-");
    write(&a.path().join("f.txt"), b"one");
    push(a.path(), &srv, &token);
    write(&a.path().join("f.txt"), b"two, longer");
    push(a.path(), &srv, &token);
    let out =
        run(command().arg("restore").arg(a.path()).args(["f.txt", "--rev", "1", "-q"])).ok("restore -q");
    assert!(out.stdout.is_empty() && out.stderr.is_empty(), "{}", out.dump());
    assert_eq!(read(&a.path().join("f.txt")), b"one");
    let out =
        run(command().arg("undo").arg(a.path()).args(["--device", "nobody-made-this", "-q"])).ok("undo -q");
    assert!(out.stdout.is_empty() && out.stderr.is_empty(), "{}", out.dump());
}
