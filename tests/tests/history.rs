//! History through the real binary: `log`, `restore` (in place, at a revision or a time, a file,
//! a subtree or the whole folder, and `--to DEST`), `undo --device`, and the usage errors.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::Path;
use std::time::Duration;

use deltasync::hash::ContentHash;
use deltasync::when;
use filetime::FileTime;

use crate::util::*;

/// `deltasync ARGS...` with the folder's remembered server and token, not checked.
fn ds<S: AsRef<OsStr>>(args: &[S]) -> Output {
    run(command().args(args))
}

fn arg(p: &Path) -> &OsStr {
    p.as_os_str()
}

/// A value of a flat JSON object.
#[derive(Debug, Clone, PartialEq)]
enum J {
    S(String),
    N(i64),
    Null,
}

impl J {
    fn s(&self) -> &str {
        match self {
            J::S(s) => s,
            other => panic!("expected a string, got {other:?}"),
        }
    }
    fn n(&self) -> i64 {
        match self {
            J::N(n) => *n,
            other => panic!("expected a number, got {other:?}"),
        }
    }
}

/// Parses one line of `log --json`: a flat object of strings, integers and nulls (a parser of
/// our own: the test needs no JSON crate, and a stray character fails the test).
fn parse_object(line: &str) -> BTreeMap<String, J> {
    let b: Vec<char> = line.trim().chars().collect();
    let mut i = 0;
    let bad = |i: usize, why: &str| -> ! { panic!("not a JSON object ({why} at {i}): {line}") };
    let string = |i: &mut usize| -> String {
        if b.get(*i) != Some(&'"') {
            bad(*i, "expected a string");
        }
        *i += 1;
        let mut s = String::new();
        loop {
            match b.get(*i) {
                Some('"') => {
                    *i += 1;
                    return s;
                }
                Some('\\') => {
                    let c = match b.get(*i + 1) {
                        Some('"') => '"',
                        Some('\\') => '\\',
                        Some('/') => '/',
                        Some('n') => '\n',
                        Some('r') => '\r',
                        Some('t') => '\t',
                        Some('u') => {
                            let hex: String = b
                                .get(*i + 2..*i + 6)
                                .unwrap_or_else(|| bad(*i, "short \\u"))
                                .iter()
                                .collect();
                            *i += 4;
                            char::from_u32(
                                u32::from_str_radix(&hex, 16).unwrap_or_else(|_| bad(*i, "bad \\u")),
                            )
                            .unwrap_or_else(|| bad(*i, "bad \\u"))
                        }
                        _ => bad(*i, "bad escape"),
                    };
                    s.push(c);
                    *i += 2;
                }
                Some(c) if (*c as u32) < 0x20 => bad(*i, "raw control character"),
                Some(c) => {
                    s.push(*c);
                    *i += 1;
                }
                None => bad(*i, "unterminated string"),
            }
        }
    };
    let mut out = BTreeMap::new();
    if b.first() != Some(&'{') {
        bad(0, "no `{`");
    }
    i += 1;
    if b.get(i) == Some(&'}') {
        return out;
    }
    loop {
        let key = string(&mut i);
        if b.get(i) != Some(&':') {
            bad(i, "expected `:`");
        }
        i += 1;
        let value = match b.get(i) {
            Some('"') => J::S(string(&mut i)),
            Some('n') if b.get(i..i + 4) == Some(&['n', 'u', 'l', 'l']) => {
                i += 4;
                J::Null
            }
            Some(c) if c.is_ascii_digit() || *c == '-' => {
                let start = i;
                i += 1;
                while b.get(i).is_some_and(|c| c.is_ascii_digit()) {
                    i += 1;
                }
                let n: String = b[start..i].iter().collect();
                J::N(n.parse().unwrap_or_else(|_| bad(start, "bad number")))
            }
            _ => bad(i, "expected a value"),
        };
        assert!(out.insert(key.clone(), value).is_none(), "key `{key}` twice: {line}");
        match b.get(i) {
            Some(',') => i += 1,
            Some('}') if i + 1 == b.len() => return out,
            _ => bad(i, "expected `,` or `}`"),
        }
    }
}

/// `deltasync log DIR EXTRA... --json`, parsed.
fn log_json(dir: &Path, extra: &[&str]) -> Vec<BTreeMap<String, J>> {
    let mut args = vec![OsStr::new("log"), arg(dir), OsStr::new("--json")];
    args.extend(extra.iter().map(OsStr::new));
    let out = ds(&args).ok("log --json");
    out.stdout.lines().map(parse_object).collect()
}

/// The newest revision of the account, from the folder's log.
fn newest_rev(dir: &Path) -> u64 {
    log_json(dir, &[]).iter().map(|j| j["rev"].n() as u64).max().expect("some history")
}

/// Waits until the clock's second moves past `t`.
fn wait_past(t: i64) {
    while when::now_secs() <= t {
        std::thread::sleep(Duration::from_millis(50));
    }
}

const VERSIONS: [&str; 3] = ["first\n", "second, longer\n", "third, the longest of them all\n"];

/// `docs/a.txt` pushed in three versions by device `devA`.
fn three_versions(dir: &Path, srv: &Server, token: &str) {
    for v in VERSIONS {
        write(&dir.join("docs/a.txt"), v);
        push_as(dir, srv, token, "devA");
    }
}

#[test]
fn log_lists_a_files_versions_newest_first_with_every_field() {
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let a = temp_dir("ds-ha-");
    let start = when::now_secs();
    three_versions(a.path(), &srv, &token);

    let out = ds(&[OsStr::new("log"), arg(a.path()), OsStr::new("docs/a.txt")]).ok("log");
    let lines: Vec<&str> = out.stdout.lines().filter(|l| !l.trim_start().starts_with("REV")).collect();
    assert_eq!(lines.len(), 3, "one line per version:\n{}", out.dump());
    for l in &lines {
        assert!(l.contains("devA") && l.ends_with("docs/a.txt") && l.contains("file"), "{l}");
    }

    let js = log_json(a.path(), &["docs/a.txt"]);
    assert_eq!(js.len(), 3, "{js:?}");
    for (j, content) in js.iter().zip(VERSIONS.iter().rev()) {
        assert_eq!(j["path"].s(), "docs/a.txt");
        assert_eq!(j["device"].s(), "devA");
        assert_eq!(j["kind"].s(), "file");
        assert!(!j["op"].s().is_empty(), "{j:?}");
        assert_eq!(j["size"].n(), content.len() as i64, "{j:?}");
        assert_eq!(j["hash"].s(), ContentHash::of(content.as_bytes()).to_hex(), "{j:?}");
        let t = when::parse_rfc3339(j["time"].s()).unwrap_or_else(|| panic!("time is not RFC 3339: {j:?}"));
        assert!(t >= start - 2 && t <= when::now_secs() + 2, "{j:?}");
    }
    let revs: Vec<i64> = js.iter().map(|j| j["rev"].n()).collect();
    assert!(revs.windows(2).all(|w| w[0] > w[1]), "newest first: {revs:?}");

    let two = log_json(a.path(), &["docs/a.txt", "--limit", "2"]);
    assert_eq!(two, js[..2].to_vec());

    // The folder's log holds the directory too, with neither size nor hash.
    let all = log_json(a.path(), &[]);
    let d = all.iter().find(|j| j["path"].s() == "docs").unwrap_or_else(|| panic!("no docs in {all:?}"));
    assert_eq!((d["kind"].s(), &d["size"], &d["hash"]), ("dir", &J::Null, &J::Null), "{d:?}");
}

#[test]
fn log_deleted_lists_what_can_be_brought_back() {
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let a = temp_dir("ds-ha-");
    write(&a.path().join("kept.txt"), "kept\n");
    write(&a.path().join("gone.txt"), "gone soon\n");
    write(&a.path().join("dir/inner.txt"), "inner\n");
    push_as(a.path(), &srv, &token, "devA");
    fs::remove_file(a.path().join("gone.txt")).unwrap();
    fs::remove_dir_all(a.path().join("dir")).unwrap();
    push_as(a.path(), &srv, &token, "devA");

    let js = log_json(a.path(), &["--deleted"]);
    let paths: Vec<&str> = js.iter().map(|j| j["path"].s()).collect();
    assert!(paths.contains(&"gone.txt") && paths.contains(&"dir/inner.txt"), "{js:?}");
    assert!(!paths.contains(&"kept.txt"), "{js:?}");
    assert!(js.iter().all(|j| j["kind"].s() == "deleted"), "{js:?}");
    let human = ds(&[OsStr::new("log"), arg(a.path()), OsStr::new("--deleted")]).ok("log --deleted");
    assert!(human.stdout.contains("gone.txt"), "{}", human.dump());

    // As the note says: the revision before the delete brings it back.
    let gone = js.iter().find(|j| j["path"].s() == "gone.txt").expect("gone.txt");
    let before = (gone["rev"].n() - 1).to_string();
    ds(&[
        OsStr::new("restore"),
        arg(a.path()),
        OsStr::new("gone.txt"),
        OsStr::new("--rev"),
        OsStr::new(&before),
    ])
    .ok("restore a deleted file");
    assert_eq!(read_string(&a.path().join("gone.txt")), "gone soon\n");
    assert!(!a.path().join("dir").exists(), "only the path asked for comes back");
}

#[test]
fn restore_a_file_at_a_revision_here_and_on_the_other_computer() {
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let a = temp_dir("ds-ha-");
    let b = temp_dir("ds-hb-");
    three_versions(a.path(), &srv, &token);
    pull_as(b.path(), &srv, &token, "devB");
    let js = log_json(a.path(), &["docs/a.txt"]);
    let first = js[2]["rev"].n().to_string();

    let out = ds(&[
        OsStr::new("restore"),
        arg(a.path()),
        OsStr::new("docs/a.txt"),
        OsStr::new("--rev"),
        OsStr::new(&first),
    ])
    .ok("restore --rev");
    assert!(out.stdout.contains("restored docs/a.txt"), "{}", out.dump());
    assert_eq!(read_string(&a.path().join("docs/a.txt")), VERSIONS[0]);
    let after = log_json(a.path(), &["docs/a.txt"]);
    assert_eq!(after.len(), 4, "the restore is a new version: {after:?}");
    assert_eq!(after[0]["hash"].s(), ContentHash::of(VERSIONS[0].as_bytes()).to_hex());
    assert_eq!(after[0]["op"].s(), "restore", "{after:?}");
    pull_as(b.path(), &srv, &token, "devB");
    assert_eq!(read_string(&b.path().join("docs/a.txt")), VERSIONS[0]);

    // An absolute path inside the folder works as well; the newest version comes back.
    let newest = js[0]["rev"].n().to_string();
    let abs = a.path().join("docs/a.txt");
    ds(&[OsStr::new("restore"), arg(a.path()), arg(&abs), OsStr::new("--rev"), OsStr::new(&newest)])
        .ok("restore by absolute path");
    assert_eq!(read_string(&a.path().join("docs/a.txt")), VERSIONS[2]);
}

#[test]
fn restore_a_subtree_as_it_was_at_a_time() {
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let a = temp_dir("ds-ha-");
    write(&a.path().join("docs/x.txt"), "x before\n");
    write(&a.path().join("docs/y.txt"), "y before\n");
    write(&a.path().join("other.txt"), "other before\n");
    push_as(a.path(), &srv, &token, "devA");
    let t = when::now_secs();
    wait_past(t);
    write(&a.path().join("docs/x.txt"), "x after, changed\n");
    write(&a.path().join("docs/z.txt"), "z made after\n");
    write(&a.path().join("other.txt"), "other after, changed\n");
    push_as(a.path(), &srv, &token, "devA");

    // RFC 3339 with an offset: the same instant as `t` in UTC.
    let at = when::format_rfc3339(t + 3600).replace('Z', "+01:00");
    let out =
        ds(&[OsStr::new("restore"), arg(a.path()), OsStr::new("docs"), OsStr::new("--at"), OsStr::new(&at)])
            .ok("restore --at");
    assert_eq!(read_string(&a.path().join("docs/x.txt")), "x before\n", "{}", out.dump());
    assert_eq!(read_string(&a.path().join("docs/y.txt")), "y before\n");
    assert!(!a.path().join("docs/z.txt").exists(), "made after the point: {}", out.dump());
    assert_eq!(read_string(&a.path().join("other.txt")), "other after, changed\n", "outside the subtree");
}

#[test]
fn restore_the_whole_folder_removes_what_came_later() {
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let a = temp_dir("ds-ha-");
    let b = temp_dir("ds-hb-");
    write(&a.path().join("a.txt"), "a at the point\n");
    write(&a.path().join("keep/b.txt"), "b at the point\n");
    push_as(a.path(), &srv, &token, "devA");
    let point = newest_rev(a.path()).to_string();
    write(&a.path().join("a.txt"), "a later\n");
    write(&a.path().join("new.txt"), "new later\n");
    write(&a.path().join("newdir/deep/c.txt"), "c later\n");
    fs::remove_file(a.path().join("keep/b.txt")).unwrap();
    push_as(a.path(), &srv, &token, "devA");
    pull_as(b.path(), &srv, &token, "devB");
    assert!(b.path().join("newdir/deep/c.txt").exists());

    ds(&[OsStr::new("restore"), arg(a.path()), OsStr::new("."), OsStr::new("--rev"), OsStr::new(&point)])
        .ok("restore .");
    assert_eq!(list_tree(a.path()), ["a.txt", "keep", "keep/b.txt"]);
    assert_eq!(read_string(&a.path().join("a.txt")), "a at the point\n");
    assert_eq!(read_string(&a.path().join("keep/b.txt")), "b at the point\n");
    pull_as(b.path(), &srv, &token, "devB");
    assert_same_tree(a.path(), b.path());
}

#[test]
fn restore_to_dest_writes_plain_files_and_leaves_the_folder_alone() {
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let a = temp_dir("ds-ha-");
    let out_parent = temp_dir("ds-hout-");
    write(&a.path().join("docs/a.txt"), "a at the point\n");
    filetime::set_file_mtime(a.path().join("docs/a.txt"), FileTime::from_unix_time(1_000_000_000, 5))
        .unwrap();
    write(&a.path().join("run.sh"), "#!/bin/sh\necho hi\n");
    set_mode(&a.path().join("run.sh"), 0o755);
    symlink("docs/a.txt", a.path().join("link")).unwrap();
    fs::create_dir(a.path().join("empty")).unwrap();
    write(&a.path().join("big.bin"), random_bytes(7, 3 << 20));
    push_as(a.path(), &srv, &token, "devA");
    let point = newest_rev(a.path()).to_string();
    write(&a.path().join("docs/a.txt"), "a later\n");
    fs::remove_file(a.path().join("run.sh")).unwrap();
    write(&a.path().join("later.txt"), "later\n");
    push_as(a.path(), &srv, &token, "devA");
    let before = snapshot(a.path()).unwrap();

    let out = out_parent.path().join("out");
    let r = ds(&[
        OsStr::new("restore"),
        arg(a.path()),
        OsStr::new("."),
        OsStr::new("--rev"),
        OsStr::new(&point),
        OsStr::new("--to"),
        arg(&out),
    ])
    .ok("restore . --to");
    assert_eq!(snapshot(a.path()).unwrap(), before, "the synced folder was touched: {}", r.dump());
    assert_eq!(list_tree(&out), ["big.bin", "docs", "docs/a.txt", "empty", "link", "run.sh"], "{}", r.dump());
    assert_eq!(read_string(&out.join("docs/a.txt")), "a at the point\n");
    let md = fs::metadata(out.join("docs/a.txt")).unwrap();
    assert_eq!((md.mtime(), md.mtime_nsec()), (1_000_000_000, 5));
    assert_eq!(fs::metadata(out.join("run.sh")).unwrap().permissions().mode() & 0o777, 0o755);
    assert_eq!(fs::read_link(out.join("link")).unwrap(), Path::new("docs/a.txt"));
    assert!(fs::symlink_metadata(out.join("link")).unwrap().file_type().is_symlink());
    assert!(out.join("empty").is_dir());
    assert_eq!(read(&out.join("big.bin")), random_bytes(7, 3 << 20));
    let temps: Vec<String> = list_tree(&out).into_iter().filter(|p| p.contains(".deltasync-tmp")).collect();
    assert!(temps.is_empty(), "temp files left: {temps:?}");

    // One file: DEST/<path> and nothing else.
    let out2 = out_parent.path().join("out2");
    ds(&[
        OsStr::new("restore"),
        arg(a.path()),
        OsStr::new("docs/a.txt"),
        OsStr::new("--rev"),
        OsStr::new(&point),
        OsStr::new("--to"),
        arg(&out2),
    ])
    .ok("restore a file --to");
    assert_eq!(list_tree(&out2), ["docs", "docs/a.txt"]);
    assert_eq!(read_string(&out2.join("docs/a.txt")), "a at the point\n");

    // A symlink inside DEST is never followed out of it.
    let elsewhere = temp_dir("ds-helse-");
    let out3 = out_parent.path().join("out3");
    fs::create_dir(&out3).unwrap();
    symlink(elsewhere.path(), out3.join("docs")).unwrap();
    let r = ds(&[
        OsStr::new("restore"),
        arg(a.path()),
        OsStr::new("docs/a.txt"),
        OsStr::new("--rev"),
        OsStr::new(&point),
        OsStr::new("--to"),
        arg(&out3),
    ]);
    assert_eq!(r.status.code(), Some(1), "{}", r.dump());
    assert!(
        list_tree(elsewhere.path()).is_empty(),
        "wrote through a symlink: {:?}",
        list_tree(elsewhere.path())
    );
    assert_eq!(snapshot(a.path()).unwrap(), before);
}

#[test]
fn undo_reverts_a_devices_changes_and_skips_what_another_changed_later() {
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let a = temp_dir("ds-ha-");
    let b = temp_dir("ds-hb-");
    for f in ["f1", "f2", "f3"] {
        write(&a.path().join(f), format!("{f} by A\n"));
    }
    push_as(a.path(), &srv, &token, "devA");
    pull_as(b.path(), &srv, &token, "devB");
    write(&b.path().join("f1"), "f1 changed by B\n");
    write(&b.path().join("f2"), "f2 changed by B\n");
    fs::remove_file(b.path().join("f3")).unwrap();
    write(&b.path().join("f4"), "f4 made by B\n");
    push_as(b.path(), &srv, &token, "devB");
    pull_as(a.path(), &srv, &token, "devA");
    write(&a.path().join("f2"), "f2 changed by A after B\n");
    push_as(a.path(), &srv, &token, "devA");

    let out = ds(&[OsStr::new("undo"), arg(a.path()), OsStr::new("--device"), OsStr::new("devB")]).ok("undo");
    for f in ["f1", "f3", "f4"] {
        assert!(out.stdout.contains(&format!("reverted {f}")), "{f}: {}", out.dump());
    }
    assert!(out.stdout.contains("skipped f2: changed later by another device"), "{}", out.dump());
    assert_eq!(read_string(&a.path().join("f1")), "f1 by A\n");
    assert_eq!(read_string(&a.path().join("f2")), "f2 changed by A after B\n");
    assert_eq!(read_string(&a.path().join("f3")), "f3 by A\n");
    assert!(!a.path().join("f4").exists());
    pull_as(b.path(), &srv, &token, "devB");
    assert_same_tree(a.path(), b.path());
}

#[test]
fn bad_input_is_a_usage_error_with_a_clear_message() {
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let a = temp_dir("ds-ha-");
    write(&a.path().join("f"), "f\n");
    push_as(a.path(), &srv, &token, "devA");
    let usage = |args: &[&OsStr], says: &str| {
        let r = ds(args);
        assert_eq!(r.status.code(), Some(2), "{args:?}: {}", r.dump());
        assert!(r.stderr.contains(says), "{args:?} should say `{says}`: {}", r.dump());
    };
    let (restore, dir, f) = (OsStr::new("restore"), arg(a.path()), OsStr::new("f"));
    usage(&[restore, dir, f], "--rev");
    usage(&[restore, dir, f, OsStr::new("--at"), OsStr::new("yesterday")], "is not a time");
    usage(
        &[restore, dir, f, OsStr::new("--rev"), OsStr::new("1"), OsStr::new("--at"), OsStr::new("2h")],
        "cannot be used with",
    );
    usage(&[restore, dir, OsStr::new("../f"), OsStr::new("--rev"), OsStr::new("1")], "`..`");
    usage(
        &[restore, dir, OsStr::new("/etc/passwd"), OsStr::new("--rev"), OsStr::new("1")],
        "not inside the folder",
    );
    usage(&[restore, dir, f, OsStr::new("--rev"), OsStr::new("1"), OsStr::new("--to"), dir], "without --to");
    usage(
        &[
            OsStr::new("undo"),
            dir,
            OsStr::new("--device"),
            OsStr::new("x"),
            OsStr::new("--since"),
            OsStr::new("soon"),
        ],
        "is not a time",
    );
    usage(&[OsStr::new("log"), dir, OsStr::new("--limit"), OsStr::new("0")], "--limit");
    usage(&[OsStr::new("serve"), OsStr::new("--keep"), OsStr::new("forever")], "is not a retention rule");
    usage(&[OsStr::new("prune"), OsStr::new("--grace"), OsStr::new("long")], "is not an age");

    // A folder that was never synced: exit 1 and what to do.
    let fresh = temp_dir("ds-hfresh-");
    let r = ds(&[OsStr::new("log"), arg(fresh.path())]);
    assert_eq!(r.status.code(), Some(1), "{}", r.dump());
    assert!(r.stderr.contains("never been synced") && r.stderr.contains("deltasync pull"), "{}", r.dump());
    assert!(!fresh.path().join(".deltasync").exists(), "log made the folder a synced one");
    let r = ds(&[OsStr::new("undo"), arg(fresh.path()), OsStr::new("--device"), OsStr::new("x")]);
    assert_eq!(r.status.code(), Some(1), "{}", r.dump());
    assert!(r.stderr.contains("never been synced"), "{}", r.dump());
}
