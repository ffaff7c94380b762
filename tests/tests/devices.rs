//! A credential per device: issue, list, revoke (cutting off a running watch), remove an
//! account; guessing tokens is slowed; open registration is limited; names are checked.

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

fn account(data: &Path, args: &[&str]) -> Output {
    let mut c = command();
    c.arg("account").args(args).arg("--data").arg(data).stdin(Stdio::null());
    run(&mut c)
}

fn new_device(data: &Path, name: &str, device: &str) -> String {
    let out = account(data, &["token", name, "--device", device]);
    assert!(out.success(), "{}", out.dump());
    assert!(out.stdout.contains("fingerprint: "), "the new device is given the fingerprint: {}", out.dump());
    out.stdout.lines().last().unwrap().trim().to_string()
}

#[test]
fn a_revoked_device_is_cut_off_while_its_watch_runs_and_the_others_go_on() {
    let srv = start_server();
    let first = add_account(&srv.data, "alice");
    let laptop = new_device(&srv.data, "alice", "laptop");
    assert_ne!(first, laptop);
    let a = temp_dir("dev-a");
    write(&a.path().join("one.txt"), b"one");
    assert!(push(a.path(), &srv, &first).success());

    let b = temp_dir("dev-b");
    let logs = temp_dir("dev-log");
    let log = logs.path().join("watch.log");
    let logf = fs::File::create(&log).unwrap();
    let mut watch = Killed(
        command()
            .arg("watch")
            .arg(b.path())
            .args(["--server", &srv.address(), "--token", &laptop, "--no-progress"])
            .stdin(Stdio::null())
            .stdout(logf.try_clone().unwrap())
            .stderr(logf)
            .spawn()
            .unwrap(),
    );
    let watch = &mut watch.0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !b.path().join("one.txt").exists() {
        assert!(
            Instant::now() < deadline,
            "the watch never synced; log:\n{}",
            fs::read_to_string(&log).unwrap()
        );
        assert!(
            watch.try_wait().unwrap().is_none(),
            "the watch exited: {}",
            fs::read_to_string(&log).unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let listed = account(&srv.data, &["devices", "alice"]);
    assert!(listed.success(), "{}", listed.dump());
    let laptop_line = listed.stdout.lines().find(|l| l.starts_with("laptop\t")).expect("laptop listed");
    assert!(laptop_line.contains("active") && laptop_line.contains("from 127.0.0.1"), "{}", listed.dump());

    let out = account(&srv.data, &["revoke", "alice", "laptop"]);
    assert!(out.success(), "{}", out.dump());
    let status = loop {
        if let Some(s) = watch.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline + Duration::from_secs(30) {
            let _ = watch.kill();
            panic!("the revoked watch kept running; log:\n{}", fs::read_to_string(&log).unwrap());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(4), "exit 4, authentication failed; log:\n{text}");
    assert!(text.contains("authentication failed") && text.contains("revoked"), "{text}");

    // The revoked token is refused from now on; the first device is untouched.
    let c = temp_dir("dev-c");
    let out = sync_cmd("pull", c.path(), &srv, &laptop, &[]);
    assert_eq!(out.status.code(), Some(4), "{}", out.dump());
    write(&a.path().join("two.txt"), b"two");
    assert!(push(a.path(), &srv, &first).success());
    let listed = account(&srv.data, &["devices", "alice"]);
    assert!(listed.stdout.lines().any(|l| l.starts_with("laptop\trevoked")), "{}", listed.dump());
    // Its name can be issued again, with a new token.
    let again = new_device(&srv.data, "alice", "laptop");
    assert!(pull(c.path(), &srv, &again).success());
    assert_eq!(read(&c.path().join("two.txt")), b"two");
}

#[test]
fn guessing_tokens_is_slowed_and_each_failure_logged_with_the_address() {
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let d = temp_dir("dev-guess");
    write(&d.path().join("f"), b"x");
    for i in 0..8 {
        let out = sync_cmd("push", d.path(), &srv, &format!("{i:064x}"), &[]);
        assert_eq!(out.status.code(), Some(4), "{}", out.dump());
    }
    let log = srv.log();
    let fails: Vec<&str> =
        log.lines().filter(|l| l.contains("authentication failed from 127.0.0.1:")).collect();
    assert_eq!(fails.len(), 8, "one line per failure:\n{log}");
    let waits: Vec<u64> = fails
        .iter()
        .map(|l| {
            l.split("next attempt waits ").nth(1).and_then(|r| r.split(' ').next()).unwrap().parse().unwrap()
        })
        .collect();
    assert_eq!(waits[..4], [0, 0, 0, 0], "a few mistakes cost nothing: {waits:?}");
    assert!(
        waits[4] > 0 && waits.windows(2).skip(4).all(|w| w[1] > w[0]),
        "then slower and slower: {waits:?}"
    );
    // The right token still gets in (after its wait).
    assert!(push(d.path(), &srv, &token).success());
}

#[test]
fn removing_an_account_asks_first_then_deletes_its_tokens_files_and_data() {
    let srv = start_server();
    let alice = add_account(&srv.data, "alice");
    let bob = add_account(&srv.data, "bob");
    let a = temp_dir("dev-rm-a");
    let mine = random_bytes(77, 256 << 10);
    write(&a.path().join("mine.bin"), &mine);
    assert!(push(a.path(), &srv, &alice).success());
    let b = temp_dir("dev-rm-b");
    write(&b.path().join("bob.txt"), b"bob's");
    assert!(push(b.path(), &srv, &bob).success());
    let stored = || files_containing(&srv.data, &mine[1000..1064]);
    assert!(!stored().is_empty(), "the data is where the test looks for it");

    let out = account(&srv.data, &["remove", "alice"]);
    assert_eq!(out.status.code(), Some(2), "no confirmation, no removal: {}", out.dump());
    assert!(out.stderr.contains("--yes"), "{}", out.dump());
    assert!(pull(temp_dir("dev-rm-c").path(), &srv, &alice).success(), "still there");

    let out = account(&srv.data, &["remove", "alice", "--yes"]);
    assert!(out.success(), "{}", out.dump());
    let out = sync_cmd("pull", temp_dir("dev-rm-d").path(), &srv, &alice, &[]);
    assert_eq!(out.status.code(), Some(4), "its tokens are gone: {}", out.dump());
    let listed = account(&srv.data, &["list"]);
    assert!(!listed.stdout.contains("alice"), "{}", listed.dump());

    let mut prune = command();
    prune.args(["prune", "--grace", "0m", "--data"]).arg(&srv.data);
    let out = run(&mut prune);
    assert!(out.success(), "{}", out.dump());
    assert!(stored().is_empty(), "its data was freed: {:?}", stored());
    let e = temp_dir("dev-rm-e");
    assert!(pull(e.path(), &srv, &bob).success());
    assert_eq!(read(&e.path().join("bob.txt")), b"bob's");
}

#[test]
fn names_with_control_characters_are_refused_or_cleaned() {
    let srv = start_server_args(&["--open-registration"]);
    let out = account(&srv.data, &["add", "evil\n\x1b[31mname"]);
    assert!(!out.success(), "{}", out.dump());
    assert!(out.stderr.contains("account name"), "says what is wrong: {}", out.dump());
    let out = account(&srv.data, &["token", "nobody", "--device", "a b"]);
    assert!(!out.success() && out.stderr.contains("device name"), "{}", out.dump());

    // Open registration: at most a few accounts per address, named safely.
    let mut made = 0;
    for i in 0..5 {
        let d = temp_dir("dev-open");
        write(&d.path().join("f"), b"x");
        let mut c = command();
        c.args(["push", "--no-progress", "--server", &srv.address(), "--device", &format!("pc{i}\n\x1b[2J")])
            .arg(d.path());
        let out = run(&mut c);
        if out.success() {
            made += 1;
        } else {
            assert_eq!(out.status.code(), Some(4), "{}", out.dump());
            assert!(out.stderr.contains("only a few accounts per address"), "{}", out.dump());
        }
    }
    assert_eq!(made, 3, "three accounts from one address, then no more for a while");
    let listed = account(&srv.data, &["list"]);
    assert_eq!(listed.stdout.lines().filter(|l| !l.starts_with(' ')).count(), 3, "{}", listed.dump());
    assert!(!listed.stdout.contains('\x1b'), "no terminal escapes in names: {:?}", listed.stdout);
    let log = srv.log();
    assert!(log.contains("open registration refused"), "{log}");
}
