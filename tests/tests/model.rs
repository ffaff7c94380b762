//! A randomized model test in the style of Dropbox's CanopyCheck/Trinity: three devices (three
//! folders) on one account of a real `deltasync serve`, random file-system operations on random
//! devices interleaved with random `push` and `pull` runs of the real binary (no `watch`, no
//! timing), then every device synced until a full pass changes nothing, and three checks:
//!
//! 1. every device holds the same tree (paths, kinds, contents, link targets, exec bits, mtimes),
//!    with no deltasync temp file left;
//! 2. no run panicked or exited with a code other than 0, or 6 ("changes were refused because the
//!    server's copy moved on meanwhile; run again"), which only asks for another run. Nothing
//!    changes a folder while a run is in it, so a path error (exit 1, e.g. "changed here while
//!    downloading") is always a bug here. The final pass must exit 0 everywhere;
//! 3. no content was lost: every file content and link target that was written and never
//!    superseded is still somewhere in the tree, at its path or as a conflict copy there.
//!
//! **Superseded** is decided by what the device's disk held, never by what the engine did: an
//! operation on device D that overwrites or removes path P (or a directory holding it)
//! supersedes the contents D held there when it ran, because D had seen them. Only writes make
//! versions (a file's content or a link's target); renames, moved directories and chmod carry
//! versions without making or superseding any (renaming a file away and back is no change, for
//! the engine as for the model). Versions are matched by content alone: when D supersedes a
//! content it saw, every version with that content is excused, which can only hide a loss, never
//! invent one. The rules are the README's: a change made after seeing a version replaces it;
//! concurrent changes keep both (conflict copy); a delete loses to a change it had not seen; a
//! directory deleted on one device keeps what another added inside it.
//!
//! Every content written is unique (`<vN>` plus filler), and every write sets a unique mtime, so
//! a change can never hide behind an unchanged (size, mtime, inode) triple and a seed replays the
//! same way (`DELTASYNC_MODEL_REAL_MTIMES=1` keeps the kernel's mtimes instead).
//!
//! A failing seed is shrunk: its operation list (pushes and pulls included) is replayed on fresh
//! accounts with chunks and then single operations removed, keeping every removal after which
//! the same kind of failure still happens; the shortest list is printed with how to rerun it.
//!
//! Environment:
//! - `DELTASYNC_MODEL_SEEDS` (default 300): how many seeds; `DELTASYNC_MODEL_SEED_START`
//!   (default 1): the first one;
//! - `DELTASYNC_MODEL_OPS=basic|full` (default: each test's own): `basic` leaves out symlinks
//!   and every change of a path's kind, and gives files and directories different names;
//! - `DELTASYNC_MODEL_THREADS` (default: 2 × the cores): seeds run in parallel, each on its own
//!   account of one server;
//! - `DELTASYNC_MODEL_SHRINK_SECS` (default 120): time spent shrinking each distinct failure;
//! - `DELTASYNC_MODEL_ACCEPT_EXIT=1` (a comma list): exit codes also accepted before the final
//!   pass, to look past failed paths for what they hide (the final pass must still exit 0).
//!
//! `benches/model_soak.sh N [START]` runs N seeds in release mode.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::util::*;

const DEVICES: usize = 3;
/// File and directory names: few, so devices collide on the same paths often. With
/// [`Mix::Basic`] files take the names with a dot and directories the others, so a path is never
/// a file on one device and a directory on another.
const NAMES: &[&str] = &["a", "b.txt", "c", "d.md"];
/// Paths have at most this many components.
const MAX_DEPTH: usize = 3;
/// Passes of push + pull on every device before the account must be quiet.
const QUIESCE_PASSES: usize = 6;
/// Exit codes a run may end with: 0, and 6 (changes refused because the server moved on: run
/// again). Everything else (1 = some paths failed, 101 = panic, …) is a failure.
const ACCEPTED_EXITS: &[i32] = &[0, 6];

// ---------------------------------------------------------------------------------------------
// Configuration

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mix {
    /// Files, directories, renames, chmod; no symlinks, no change of a path's kind, and files
    /// and directories never share a name.
    Basic,
    /// Everything.
    Full,
}

#[derive(Debug, Clone)]
struct Config {
    seeds: u64,
    start: u64,
    mix: Mix,
    threads: usize,
    shrink: Duration,
    real_mtimes: bool,
    /// [`ACCEPTED_EXITS`] and `DELTASYNC_MODEL_ACCEPT_EXIT`.
    accept: Vec<i32>,
}

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(s) if !s.trim().is_empty() => s.trim().parse().unwrap_or_else(|e| panic!("bad {name}={s:?}: {e}")),
        _ => default,
    }
}

impl Config {
    fn from_env(default_mix: Mix) -> Config {
        let mix = match std::env::var("DELTASYNC_MODEL_OPS").as_deref().map(str::trim) {
            Ok("basic") => Mix::Basic,
            Ok("full") => Mix::Full,
            Ok("") | Err(_) => default_mix,
            Ok(other) => panic!("DELTASYNC_MODEL_OPS must be `basic` or `full`, not {other:?}"),
        };
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Config {
            seeds: env_u64("DELTASYNC_MODEL_SEEDS", 300),
            start: env_u64("DELTASYNC_MODEL_SEED_START", 1),
            mix,
            threads: env_u64("DELTASYNC_MODEL_THREADS", 2 * cores as u64).max(1) as usize,
            shrink: Duration::from_secs(env_u64("DELTASYNC_MODEL_SHRINK_SECS", 120)),
            real_mtimes: std::env::var("DELTASYNC_MODEL_REAL_MTIMES").is_ok_and(|v| v == "1"),
            accept: ACCEPTED_EXITS
                .iter()
                .copied()
                .chain(
                    std::env::var("DELTASYNC_MODEL_ACCEPT_EXIT").unwrap_or_default().split(',').filter_map(
                        |c| {
                            let c = c.trim();
                            (!c.is_empty())
                                .then(|| c.parse().unwrap_or_else(|e| panic!("bad exit code {c:?}: {e}")))
                        },
                    ),
                )
                .collect(),
        }
    }

    fn rerun(&self, seed: u64) -> String {
        let (ops, test) = match self.mix {
            Mix::Basic => ("basic", "three_devices_random_operations_basic"),
            Mix::Full => ("full", "three_devices_random_operations_full -- --ignored"),
        };
        format!(
            "DELTASYNC_MODEL_SEED_START={seed} DELTASYNC_MODEL_SEEDS=1 DELTASYNC_MODEL_OPS={ops} \
             cargo test --test tests model::{test} --nocapture"
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Operations

/// One step of a run: a sync command or a file-system operation on one device. Paths are
/// relative and `/`-separated; `v` numbers a written version (its content and mtime).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    Push(usize),
    Pull(usize),
    Fs(usize, Fs),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Fs {
    Create {
        path: String,
        v: u32,
        len: u32,
    },
    /// Overwrites bytes in place (same inode, usually the same size) with the token `<vN>`.
    Modify {
        path: String,
        v: u32,
        at: u32,
    },
    Append {
        path: String,
        v: u32,
        len: u32,
    },
    /// Cuts the file to `keep`‰ of its length.
    Truncate {
        path: String,
        v: u32,
        keep: u32,
    },
    /// Writes a temp file beside it and renames it over the file (what editors do).
    AtomicSave {
        path: String,
        v: u32,
        len: u32,
    },
    /// Flips the executable bit.
    Chmod {
        path: String,
    },
    Delete {
        path: String,
    },
    Rename {
        from: String,
        to: String,
    },
    Mkdir {
        path: String,
    },
    Rmdir {
        path: String,
    },
    MoveDir {
        from: String,
        to: String,
    },
    Symlink {
        path: String,
        target: String,
    },
    FileToLink {
        path: String,
        target: String,
    },
    LinkToFile {
        path: String,
        v: u32,
        len: u32,
    },
    /// The new directory holds a file `a` when `inner` is set.
    FileToDir {
        path: String,
        inner: Option<(u32, u32)>,
    },
    DirToFile {
        path: String,
        v: u32,
        len: u32,
    },
    LinkToDir {
        path: String,
        inner: Option<(u32, u32)>,
    },
    DirToLink {
        path: String,
        target: String,
    },
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Push(d) => write!(f, "dev{d}: push"),
            Op::Pull(d) => write!(f, "dev{d}: pull"),
            Op::Fs(d, op) => write!(f, "dev{d}: {op}"),
        }
    }
}

impl fmt::Display for Fs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = |i: &Option<(u32, u32)>| match i {
            Some((v, len)) => format!(" holding a (v{v}, {} B)", body(*v, *len as usize).len()),
            None => " (empty)".to_string(),
        };
        match self {
            Fs::Create { path, v, len } => {
                write!(f, "create {path} (v{v}, {} B)", body(*v, *len as usize).len())
            }
            Fs::Modify { path, v, at } => write!(f, "modify {path} in place: <v{v}> at {at} mod len+1"),
            Fs::Append { path, v, len } => {
                write!(f, "append to {path} (v{v}, {} B)", body(*v, *len as usize).len())
            }
            Fs::Truncate { path, v, keep } => write!(f, "truncate {path} to {keep}‰ (v{v})"),
            Fs::AtomicSave { path, v, len } => {
                write!(f, "atomic save {path} (temp + rename; v{v}, {} B)", body(*v, *len as usize).len())
            }
            Fs::Chmod { path } => write!(f, "chmod (flip +x) {path}"),
            Fs::Delete { path } => write!(f, "delete {path}"),
            Fs::Rename { from, to } => write!(f, "rename file {from} -> {to}"),
            Fs::Mkdir { path } => write!(f, "mkdir {path}"),
            Fs::Rmdir { path } => write!(f, "rmdir {path}"),
            Fs::MoveDir { from, to } => write!(f, "move dir {from} -> {to}"),
            Fs::Symlink { path, target } => write!(f, "symlink {path} -> {target}"),
            Fs::FileToLink { path, target } => write!(f, "replace file {path} by link -> {target}"),
            Fs::LinkToFile { path, v, len } => {
                write!(f, "replace link {path} by file (v{v}, {} B)", body(*v, *len as usize).len())
            }
            Fs::FileToDir { path, inner: i } => write!(f, "replace file {path} by dir{}", inner(i)),
            Fs::DirToFile { path, v, len } => write!(
                f,
                "replace dir {path} (and all in it) by file (v{v}, {} B)",
                body(*v, *len as usize).len()
            ),
            Fs::LinkToDir { path, inner: i } => write!(f, "replace link {path} by dir{}", inner(i)),
            Fs::DirToLink { path, target } => {
                write!(f, "replace dir {path} (and all in it) by link -> {target}")
            }
        }
    }
}

/// The content of version `v`: a unique token, then `len` bytes of filler (text or random).
fn body(v: u32, len: usize) -> Vec<u8> {
    let mut out = format!("<v{v}>\n").into_bytes();
    let mut filler = vec![0u8; len];
    if v.is_multiple_of(2) {
        let text = b"the quick brown fox jumps over the lazy dog\n";
        for (i, b) in filler.iter_mut().enumerate() {
            *b = text[i % text.len()];
        }
    } else {
        XorShift::new(u64::from(v)).fill(&mut filler);
    }
    out.extend_from_slice(&filler);
    out
}

// ---------------------------------------------------------------------------------------------
// What a device's disk holds

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    File,
    Dir,
    Link,
}

/// What kind `rel` is on disk, if it exists and every ancestor is a real directory (a path
/// through a symlink does not count).
fn kind_of(root: &Path, rel: &str) -> Option<Kind> {
    if !parent_is_dir(root, rel) {
        return None;
    }
    let md = fs::symlink_metadata(root.join(rel)).ok()?;
    let ft = md.file_type();
    Some(if ft.is_symlink() {
        Kind::Link
    } else if ft.is_dir() {
        Kind::Dir
    } else {
        Kind::File
    })
}

/// Is every ancestor of `rel` a real directory?
fn parent_is_dir(root: &Path, rel: &str) -> bool {
    let mut p = String::new();
    for c in parent_of(rel).split('/').filter(|c| !c.is_empty()) {
        p = join(&p, c);
        match fs::symlink_metadata(root.join(&p)) {
            Ok(md) if md.file_type().is_dir() => {}
            _ => return false,
        }
    }
    true
}

/// A free path: its parent is a real directory and nothing is there.
fn is_free(root: &Path, rel: &str) -> bool {
    parent_is_dir(root, rel) && fs::symlink_metadata(root.join(rel)).is_err()
}

fn is_conflict_copy(rel: &str) -> bool {
    rel.contains(" (conflict ")
}

/// A version's identity: a file's content or a link's target.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Key {
    File(u64),
    Link(PathBuf),
}

fn key_of(item: &Item) -> Option<Key> {
    match item {
        Item::File { hash, .. } => Some(Key::File(*hash)),
        Item::Link(t) => Some(Key::Link(t.clone())),
        Item::Dir => None,
    }
}

/// The versions (path, key) on disk at `rel` and below it.
fn versions_at(root: &Path, rel: &str) -> Vec<(String, Key)> {
    let Some(kind) = kind_of(root, rel) else { return Vec::new() };
    let full = root.join(rel);
    match kind {
        Kind::File => {
            let bytes = fs::read(&full).unwrap_or_else(|e| panic!("read {}: {e}", full.display()));
            vec![(rel.to_string(), Key::File(content_hash(&bytes)))]
        }
        Kind::Link => {
            let t = fs::read_link(&full).unwrap_or_else(|e| panic!("readlink {}: {e}", full.display()));
            vec![(rel.to_string(), Key::Link(t))]
        }
        Kind::Dir => {
            let snap = snapshot(&full).unwrap_or_else(|e| panic!("read {}: {e}", full.display()));
            snap.iter().filter_map(|(p, item)| Some((join(rel, p), key_of(item)?))).collect()
        }
    }
}

/// A version that must survive: written by `op` (1-based, in the list that was run) on `dev`.
#[derive(Debug, Clone)]
struct Live {
    path: String,
    key: Key,
    dev: usize,
    op: usize,
}

// ---------------------------------------------------------------------------------------------
// Failures

#[derive(Debug, Clone)]
struct Failure {
    /// What kind of failure, without paths or numbers: shrinking keeps a removal only if the
    /// failure stays of the same class.
    class: String,
    detail: String,
}

fn fail(class: impl Into<String>, detail: impl Into<String>) -> Failure {
    Failure { class: class.into(), detail: detail.into() }
}

/// Digits → `#`, so messages naming different paths or numbers compare equal.
fn normalize(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if c.is_ascii_digit() {
            if !out.ends_with('#') {
                out.push('#');
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The message of an `error: PATH: MESSAGE` or `deltasync: MESSAGE` line without its path.
fn error_message(stderr: &str) -> String {
    let line = stderr
        .lines()
        .find(|l| l.starts_with("error: "))
        .or_else(|| stderr.lines().find(|l| l.starts_with("deltasync: ")))
        .unwrap_or("");
    let rest = line.strip_prefix("error: ").or_else(|| line.strip_prefix("deltasync: ")).unwrap_or(line);
    // `PATH: message`: our paths are short names without `: `.
    let msg = rest.split_once(": ").map_or(rest, |(_, m)| m);
    normalize(&without_paths(msg))
}

/// Absolute paths (`/tmp/deltasync-srv-XXX/data/accounts/7/files/d.md`, a device's folder…) →
/// `PATH`: they differ from run to run, and the path does not make another kind of failure.
fn without_paths(msg: &str) -> String {
    msg.split(' ').map(|w| if w.starts_with('/') { "PATH" } else { w }).collect::<Vec<_>>().join(" ")
}

fn panic_location(stderr: &str) -> Option<String> {
    let at = stderr.find("panicked at ")?;
    let rest = &stderr[at + "panicked at ".len()..];
    let loc = rest.split([':', '\n']).next().unwrap_or("");
    let msg = rest.lines().nth(1).unwrap_or("");
    Some(format!("{loc}: {}", normalize(msg.trim())))
}

// ---------------------------------------------------------------------------------------------
// A run: one fresh account, three devices

struct Ctx {
    addr: String,
    data: PathBuf,
    cfg: Config,
    accounts: AtomicU64,
}

struct Run<'a> {
    ctx: &'a Ctx,
    account: String,
    token: String,
    dirs: Vec<TempDir>,
    live: Vec<Live>,
    /// Link contents some device replaced after seeing them. Links have no unique token: a link
    /// made elsewhere with the same target is, for the engine as for `same_content`, the same
    /// version, superseded with it even when the replacement came first in time.
    superseded_links: Vec<Key>,
    /// Number of operations applied so far (the 1-based index of the current one).
    step: usize,
    /// One line per command: what ran, its exit code and its error lines.
    log: Vec<String>,
}

impl<'a> Run<'a> {
    fn new(ctx: &'a Ctx) -> Run<'a> {
        let n = ctx.accounts.fetch_add(1, Ordering::Relaxed);
        let account = format!("model{n}");
        let token = add_account(&ctx.data, &account);
        let dirs = (0..DEVICES).map(|d| temp_dir(&format!("ds-model-dev{d}-"))).collect();
        Run {
            ctx,
            account,
            token,
            dirs,
            live: Vec::new(),
            superseded_links: Vec::new(),
            step: 0,
            log: Vec::new(),
        }
    }

    fn root(&self, dev: usize) -> &Path {
        self.dirs[dev].path()
    }

    /// Runs `push` or `pull` on a device; `Ok(exit code)` when the code is acceptable.
    fn sync(&mut self, cmd: &str, dev: usize) -> Result<i32, Failure> {
        let device = format!("dev{dev}");
        let out = run(&mut sync_command(
            cmd,
            self.root(dev),
            &self.ctx.addr,
            &self.token,
            // The mass-delete guard is tested on its own; random deletes of most of a small
            // folder are the model's ordinary business.
            &["--device", &device, "--max-delete", "100%"],
        ));
        let code = out.status.code();
        let errors: Vec<&str> =
            out.stderr.lines().filter(|l| !l.starts_with("note: ") && !l.trim().is_empty()).collect();
        self.log.push(format!(
            "[op {}] dev{dev} {cmd}: exit {} | {} | {}",
            self.step,
            code.map_or("signal".to_string(), |c| c.to_string()),
            out.stdout.lines().next().unwrap_or(""),
            errors.join(" / ")
        ));
        let what = format!("op {}: dev{dev} {cmd}", self.step);
        if let Some(loc) = panic_location(&out.stderr) {
            return Err(fail(format!("panic at {loc}"), format!("{what} panicked:\n{}", out.dump())));
        }
        match code {
            Some(101) => Err(fail("exit 101", format!("{what} exited with 101:\n{}", out.dump()))),
            Some(c) if self.ctx.cfg.accept.contains(&c) => Ok(c),
            Some(c) => Err(fail(
                format!("{cmd} exit {c}: {}", error_message(&out.stderr)),
                format!("{what} exited with {c}:\n{}", out.dump()),
            )),
            None => {
                Err(fail("killed by a signal", format!("{what} was killed: {}\n{}", out.status, out.dump())))
            }
        }
    }

    fn apply(&mut self, op: &Op) -> Result<(), Failure> {
        self.step += 1;
        match op {
            Op::Push(d) => self.sync("push", *d).map(|_| ()),
            Op::Pull(d) => self.sync("pull", *d).map(|_| ()),
            Op::Fs(d, fs_op) => {
                self.fs(*d, fs_op);
                Ok(())
            }
        }
    }

    /// Sets the mtime of a new version (unique per version) unless real mtimes were asked for.
    fn stamp(&self, full: &Path, v: u32) {
        if !self.ctx.cfg.real_mtimes {
            let t = filetime::FileTime::from_unix_time(
                1_600_000_000 + i64::from(v),
                v.wrapping_mul(7919) % 1_000_000_000,
            );
            filetime::set_file_mtime(full, t)
                .unwrap_or_else(|e| panic!("set mtime of {}: {e}", full.display()));
        }
    }

    fn write_version(&self, full: &Path, v: u32, len: u32) {
        fs::write(full, body(v, len as usize)).unwrap_or_else(|e| panic!("write {}: {e}", full.display()));
        self.stamp(full, v);
    }

    fn make_dir(&self, dev: usize, path: &str, inner: &Option<(u32, u32)>) {
        let full = self.root(dev).join(path);
        fs::create_dir(&full).unwrap_or_else(|e| panic!("mkdir {}: {e}", full.display()));
        if let Some((v, len)) = inner {
            self.write_version(&full.join("a"), *v, *len);
        }
    }

    /// Applies a file-system operation if it still applies (a shrunk list may have removed what
    /// it needs; then it does nothing), keeping the record of live versions.
    fn fs(&mut self, dev: usize, op: &Fs) {
        let root = self.root(dev).to_path_buf();
        let is = |p: &str, k: Kind| kind_of(&root, p) == Some(k);
        let applies = match op {
            Fs::Create { path, .. } | Fs::Mkdir { path } | Fs::Symlink { path, .. } => is_free(&root, path),
            Fs::Modify { path, .. }
            | Fs::Append { path, .. }
            | Fs::AtomicSave { path, .. }
            | Fs::Chmod { path }
            | Fs::Delete { path }
            | Fs::FileToLink { path, .. }
            | Fs::FileToDir { path, .. } => is(path, Kind::File),
            Fs::Truncate { path, .. } => {
                is(path, Kind::File) && fs::metadata(root.join(path)).is_ok_and(|m| m.len() > 0)
            }
            Fs::Rename { from, to } => is(from, Kind::File) && is_free(&root, to),
            Fs::Rmdir { path } => {
                is(path, Kind::Dir) && fs::read_dir(root.join(path)).is_ok_and(|mut r| r.next().is_none())
            }
            Fs::MoveDir { from, to } => {
                is(from, Kind::Dir) && is_free(&root, to) && !to.starts_with(&format!("{from}/"))
            }
            Fs::LinkToFile { path, .. } | Fs::LinkToDir { path, .. } => is(path, Kind::Link),
            Fs::DirToFile { path, .. } | Fs::DirToLink { path, .. } => is(path, Kind::Dir),
        };
        if !applies {
            return;
        }
        // `before`: where this device held versions the operation overwrites or removes: it had
        // seen them, so they are superseded. `after`: where it writes new versions. Renames,
        // moved directories and chmod write no content: the versions they carry stay what they
        // were (a rename and back is no change at all, for the engine as for the model).
        let (before, after): (Vec<&str>, Vec<&str>) = match op {
            Fs::Create { path, .. } | Fs::Symlink { path, .. } => (vec![], vec![path]),
            Fs::Mkdir { .. } | Fs::Rmdir { .. } | Fs::Chmod { .. } => (vec![], vec![]),
            Fs::Rename { .. } | Fs::MoveDir { .. } => (vec![], vec![]),
            Fs::Delete { path } => (vec![path], vec![]),
            Fs::Modify { path, .. }
            | Fs::Append { path, .. }
            | Fs::Truncate { path, .. }
            | Fs::AtomicSave { path, .. }
            | Fs::FileToLink { path, .. }
            | Fs::LinkToFile { path, .. }
            | Fs::FileToDir { path, .. }
            | Fs::DirToFile { path, .. }
            | Fs::LinkToDir { path, .. }
            | Fs::DirToLink { path, .. } => (vec![path], vec![path]),
        };
        // By content alone: a content this device saw anywhere it changes is superseded wherever
        // else it is. That can only excuse a loss, never invent one.
        let seen: Vec<Key> = before.iter().flat_map(|p| versions_at(&root, p)).map(|(_, k)| k).collect();
        self.live.retain(|l| !seen.contains(&l.key));
        self.superseded_links.extend(seen.into_iter().filter(|k| matches!(k, Key::Link(_))));

        let full = |p: &str| root.join(p);
        let ctx =
            |what: &str, p: &str, e: std::io::Error| -> ! { panic!("{what} {}: {e}", full(p).display()) };
        match op {
            Fs::Create { path, v, len } => self.write_version(&full(path), *v, *len),
            Fs::Modify { path, v, at } => {
                let old = fs::read(full(path)).unwrap_or_else(|e| ctx("read", path, e));
                let at = u64::from(*at) % (old.len() as u64 + 1);
                let mut f = fs::OpenOptions::new()
                    .write(true)
                    .open(full(path))
                    .unwrap_or_else(|e| ctx("open", path, e));
                f.seek(SeekFrom::Start(at)).unwrap();
                f.write_all(format!("<v{v}>").as_bytes()).unwrap_or_else(|e| ctx("write", path, e));
                drop(f);
                self.stamp(&full(path), *v);
            }
            Fs::Append { path, v, len } => {
                let mut f = fs::OpenOptions::new()
                    .append(true)
                    .open(full(path))
                    .unwrap_or_else(|e| ctx("open", path, e));
                f.write_all(&body(*v, *len as usize)).unwrap_or_else(|e| ctx("append", path, e));
                drop(f);
                self.stamp(&full(path), *v);
            }
            Fs::Truncate { path, v, keep } => {
                let len = fs::metadata(full(path)).unwrap().len();
                let to = (len * u64::from(*keep) / 1000).min(len - 1);
                fs::OpenOptions::new()
                    .write(true)
                    .open(full(path))
                    .and_then(|f| f.set_len(to))
                    .unwrap_or_else(|e| ctx("truncate", path, e));
                self.stamp(&full(path), *v);
            }
            Fs::AtomicSave { path, v, len } => {
                let name = path.rsplit('/').next().expect("a name");
                let tmp = join(parent_of(path), &format!(".{name}.save{v}"));
                let mode = fs::metadata(full(path)).unwrap().permissions();
                self.write_version(&full(&tmp), *v, *len);
                fs::set_permissions(full(&tmp), mode).unwrap();
                fs::rename(full(&tmp), full(path)).unwrap_or_else(|e| ctx("rename over", path, e));
            }
            Fs::Chmod { path } => {
                let mode = fs::metadata(full(path)).unwrap().permissions();
                use std::os::unix::fs::PermissionsExt;
                let m = if mode.mode() & 0o111 != 0 { 0o644 } else { 0o755 };
                set_mode(&full(path), m);
            }
            Fs::Delete { path } => fs::remove_file(full(path)).unwrap_or_else(|e| ctx("delete", path, e)),
            Fs::Rename { from, to } | Fs::MoveDir { from, to } => {
                fs::rename(full(from), full(to)).unwrap_or_else(|e| ctx("rename", from, e))
            }
            Fs::Mkdir { path } => self.make_dir(dev, path, &None),
            Fs::Rmdir { path } => fs::remove_dir(full(path)).unwrap_or_else(|e| ctx("rmdir", path, e)),
            Fs::Symlink { path, target } => {
                symlink(target, full(path)).unwrap_or_else(|e| ctx("symlink", path, e))
            }
            Fs::FileToLink { path, target } => {
                fs::remove_file(full(path)).unwrap_or_else(|e| ctx("delete", path, e));
                symlink(target, full(path)).unwrap_or_else(|e| ctx("symlink", path, e));
            }
            Fs::LinkToFile { path, v, len } => {
                fs::remove_file(full(path)).unwrap_or_else(|e| ctx("remove link", path, e));
                self.write_version(&full(path), *v, *len);
            }
            Fs::FileToDir { path, inner } | Fs::LinkToDir { path, inner } => {
                fs::remove_file(full(path)).unwrap_or_else(|e| ctx("remove", path, e));
                self.make_dir(dev, path, inner);
            }
            Fs::DirToFile { path, v, len } => {
                fs::remove_dir_all(full(path)).unwrap_or_else(|e| ctx("remove dir", path, e));
                self.write_version(&full(path), *v, *len);
            }
            Fs::DirToLink { path, target } => {
                fs::remove_dir_all(full(path)).unwrap_or_else(|e| ctx("remove dir", path, e));
                symlink(target, full(path)).unwrap_or_else(|e| ctx("symlink", path, e));
            }
        }
        for p in after {
            for (path, key) in versions_at(&root, p) {
                self.live.push(Live { path, key, dev, op: self.step });
            }
        }
    }

    fn snaps(&self) -> Vec<Snap> {
        (0..DEVICES).map(|d| snapshot(self.root(d)).unwrap_or_else(|e| panic!("read dev{d}: {e}"))).collect()
    }

    /// Push + pull on every device until a whole pass exits 0 everywhere and changes nothing
    /// (no folder, no server journal), then the three checks.
    fn settle_and_check(&mut self) -> Result<(), Failure> {
        let mut quiet = false;
        for _ in 0..QUIESCE_PASSES {
            let before = (self.snaps(), account_changes(&self.ctx.data, &self.account));
            let mut all_zero = true;
            for d in 0..DEVICES {
                for cmd in ["push", "pull"] {
                    all_zero &= self.sync(cmd, d)? == 0;
                }
            }
            let after = (self.snaps(), account_changes(&self.ctx.data, &self.account));
            if all_zero && before == after {
                quiet = true;
                break;
            }
        }
        let snaps = self.snaps();
        let listing =
            |s: &Snap| s.iter().map(|(p, i)| format!("    {p}: {i:?}")).collect::<Vec<_>>().join("\n");
        if !quiet {
            let last: Vec<&String> = self.log.iter().rev().take(2 * DEVICES).rev().collect();
            return Err(fail(
                "no quiescence",
                format!(
                    "still changing after {QUIESCE_PASSES} passes of push + pull on every device; last pass:\n  {}\ndev0 holds:\n{}",
                    last.iter().map(|s| s.as_str()).collect::<Vec<_>>().join("\n  "),
                    listing(&snaps[0])
                ),
            ));
        }
        // 1. The same tree everywhere, first without mtimes (content), then with.
        for (i, s) in snaps.iter().enumerate().skip(1) {
            let d = snap_diffs(&without_mtimes(&snaps[0]), &without_mtimes(s), "dev0", &format!("dev{i}"));
            if !d.is_empty() {
                return Err(fail(
                    "devices differ",
                    format!(
                        "after quiescence dev0 and dev{i} differ:\n  {}\ndev0 holds:\n{}",
                        d.join("\n  "),
                        listing(&snaps[0])
                    ),
                ));
            }
        }
        for (i, s) in snaps.iter().enumerate().skip(1) {
            let d = snap_diffs(&snaps[0], s, "dev0", &format!("dev{i}"));
            if !d.is_empty() {
                return Err(fail("mtimes differ", format!("dev0 and dev{i}:\n  {}", d.join("\n  "))));
            }
        }
        let temps: Vec<&String> = snaps[0].keys().filter(|p| p.contains(".deltasync-tmp-")).collect();
        if !temps.is_empty() {
            return Err(fail("temp files left", format!("{temps:?}")));
        }
        // 3. Every live version is still there: at its path, as a conflict copy, or wherever a
        // rename took it.
        for l in &self.live {
            if snaps[0].values().any(|i| key_of(i).as_ref() == Some(&l.key))
                || self.superseded_links.contains(&l.key)
            {
                continue;
            }
            return Err(fail(
                "a version that was never superseded is lost",
                format!(
                    "the {} written by op {} on dev{} at {} is nowhere; dev0 holds:\n{}",
                    match &l.key {
                        Key::File(_) => "file content".to_string(),
                        Key::Link(t) => format!("link -> {}", t.display()),
                    },
                    l.op,
                    l.dev,
                    l.path,
                    listing(&snaps[0])
                ),
            ));
        }
        Ok(())
    }
}

/// Runs `ops` on a fresh account and checks the result.
fn replay(ctx: &Ctx, ops: &[Op]) -> Result<(), Failure> {
    let mut r = Run::new(ctx);
    let res = (|| {
        for op in ops {
            r.apply(op)?;
        }
        r.settle_and_check()
    })();
    res.map_err(|mut f| {
        f.detail = format!("{}\ncommands run:\n  {}", f.detail, r.log.join("\n  "));
        f
    })
}

// ---------------------------------------------------------------------------------------------
// Generating operations

struct Gen {
    rng: XorShift,
    mix: Mix,
    /// The next version number.
    v: u32,
}

impl Gen {
    fn below(&mut self, n: usize) -> usize {
        (self.rng.next_u64() % n as u64) as usize
    }

    fn pick<T: Clone>(&mut self, v: &[T]) -> Option<T> {
        if v.is_empty() { None } else { Some(v[self.below(v.len())].clone()) }
    }

    fn version(&mut self) -> (u32, u32) {
        self.v += 1;
        let len = match self.below(10) {
            0..=5 => self.below(200),
            6..=8 => 200 + self.below(4000),
            // At least 16 KiB: sent as deltas.
            _ => 16_384 + self.below(24_000),
        };
        (self.v, len as u32)
    }

    fn target(&mut self) -> String {
        if self.below(2) == 0 {
            NAMES[self.below(NAMES.len())].to_string()
        } else {
            self.v += 1;
            format!("t{}", self.v)
        }
    }

    /// A random operation: a push, a pull, or a file-system operation chosen from what `root`
    /// holds now (never inside a conflict copy, whose name depends on the clock).
    fn op(&mut self, roots: &[&Path]) -> Op {
        match self.below(100) {
            0..=17 => return Op::Push(self.below(DEVICES)),
            18..=35 => return Op::Pull(self.below(DEVICES)),
            _ => {}
        }
        let dev = self.below(DEVICES);
        let snap = snapshot(roots[dev]).unwrap_or_else(|e| panic!("read dev{dev}: {e}"));
        let of = |want: fn(&Item) -> bool| -> Vec<String> {
            snap.iter().filter(|(p, i)| want(i) && !is_conflict_copy(p)).map(|(p, _)| p.clone()).collect()
        };
        let files = of(|i| matches!(i, Item::File { .. }));
        let dirs = of(|i| matches!(i, Item::Dir));
        let links = of(|i| matches!(i, Item::Link(_)));
        let mut parents = vec![String::new()];
        parents.extend(dirs.iter().filter(|d| d.split('/').count() < MAX_DEPTH).cloned());
        for _ in 0..20 {
            if let Some(op) = self.fs_op(&snap, &files, &dirs, &links, &parents) {
                return Op::Fs(dev, op);
            }
        }
        Op::Pull(dev)
    }

    fn fs_op(
        &mut self,
        snap: &Snap,
        files: &[String],
        dirs: &[String],
        links: &[String],
        parents: &[String],
    ) -> Option<Fs> {
        let full = self.mix == Mix::Full;
        // A free path for a file (`dir == false`) or a directory.
        let fresh = |g: &mut Gen, dir: bool| -> Option<String> {
            let parent = g.pick(parents)?;
            let names: Vec<&str> = NAMES.iter().copied().filter(|n| full || n.contains('.') != dir).collect();
            let name = names[g.below(names.len())];
            let p = join(&parent, name);
            (!snap.contains_key(&p)).then_some(p)
        };
        let k = self.below(if full { 100 } else { 75 });
        Some(match k {
            0..=13 => {
                let (v, len) = self.version();
                Fs::Create { path: fresh(self, false)?, v, len }
            }
            14..=21 => {
                self.v += 1;
                Fs::Modify { path: self.pick(files)?, v: self.v, at: self.below(50_000) as u32 }
            }
            22..=26 => {
                let (v, len) = self.version();
                Fs::Append { path: self.pick(files)?, v, len }
            }
            27..=30 => {
                self.v += 1;
                Fs::Truncate { path: self.pick(files)?, v: self.v, keep: self.below(1000) as u32 }
            }
            31..=35 => {
                let (v, len) = self.version();
                Fs::AtomicSave { path: self.pick(files)?, v, len }
            }
            36..=39 => Fs::Chmod { path: self.pick(files)? },
            40..=46 => Fs::Delete { path: self.pick(files)? },
            47..=53 => Fs::Rename { from: self.pick(files)?, to: fresh(self, false)? },
            54..=61 => Fs::Mkdir { path: fresh(self, true)? },
            62..=66 => {
                let empty: Vec<String> = dirs
                    .iter()
                    .filter(|d| !snap.keys().any(|k| k.starts_with(&format!("{d}/"))))
                    .cloned()
                    .collect();
                Fs::Rmdir { path: self.pick(&empty)? }
            }
            67..=74 => {
                let from = self.pick(dirs)?;
                let to = fresh(self, true)?;
                if to.starts_with(&format!("{from}/")) {
                    return None;
                }
                Fs::MoveDir { from, to }
            }
            75..=79 => Fs::Symlink { path: fresh(self, false)?, target: self.target() },
            80..=82 => Fs::FileToLink { path: self.pick(files)?, target: self.target() },
            83..=85 => {
                let (v, len) = self.version();
                Fs::LinkToFile { path: self.pick(links)?, v, len }
            }
            86..=88 => {
                let inner = if self.below(2) == 0 { Some(self.version()) } else { None };
                Fs::FileToDir { path: self.pick(files)?, inner }
            }
            89..=91 => {
                let (v, len) = self.version();
                Fs::DirToFile { path: self.pick(dirs)?, v, len }
            }
            92..=95 => {
                let inner = if self.below(2) == 0 { Some(self.version()) } else { None };
                Fs::LinkToDir { path: self.pick(links)?, inner }
            }
            _ => Fs::DirToLink { path: self.pick(dirs)?, target: self.target() },
        })
    }
}

/// Generates and runs a seed's operations at once (each one is chosen from the disk as it is);
/// returns the list, and the failure if there was one.
fn run_seed(ctx: &Ctx, seed: u64) -> (Vec<Op>, Result<(), Failure>) {
    let mut g = Gen { rng: XorShift::new(seed), mix: ctx.cfg.mix, v: 0 };
    let fs_ops = 15 + g.below(16);
    let mut r = Run::new(ctx);
    let mut ops = Vec::new();
    let mut done = 0;
    let res = (|| {
        while done < fs_ops {
            let roots: Vec<&Path> = r.dirs.iter().map(|d| d.path()).collect();
            let op = g.op(&roots);
            done += usize::from(matches!(op, Op::Fs(..)));
            ops.push(op.clone());
            r.apply(&op)?;
        }
        r.settle_and_check()
    })();
    let res = res.map_err(|mut f| {
        f.detail = format!("{}\ncommands run:\n  {}", f.detail, r.log.join("\n  "));
        f
    });
    (ops, res)
}

// ---------------------------------------------------------------------------------------------
// Shrinking

/// Removes chunks (halves, quarters, … single operations) of `ops` while the replay still fails
/// with `class`; returns the shortest list found, its failure and the number of replays.
fn shrink(ctx: &Ctx, ops: &[Op], class: &str, budget: Duration) -> (Vec<Op>, Option<Failure>, usize) {
    let start = Instant::now();
    let mut ops = ops.to_vec();
    let mut tries = 0;
    let still_fails = |cand: &[Op], tries: &mut usize| -> Option<Failure> {
        *tries += 1;
        match catch(|| replay(ctx, cand)) {
            Err(f) if f.class == class => Some(f),
            _ => None,
        }
    };
    // First: does it fail again at all?
    let mut last = match still_fails(&ops, &mut tries) {
        Some(f) => f,
        None => return (ops, None, tries),
    };
    let mut chunk = ops.len().div_ceil(2);
    loop {
        let mut removed = false;
        let mut i = 0;
        while i < ops.len() && start.elapsed() < budget {
            let end = (i + chunk).min(ops.len());
            let cand: Vec<Op> = ops[..i].iter().chain(&ops[end..]).cloned().collect();
            if let Some(f) = still_fails(&cand, &mut tries) {
                ops = cand;
                last = f;
                removed = true;
            } else {
                i += chunk;
            }
        }
        if start.elapsed() >= budget {
            break;
        }
        if chunk > 1 {
            chunk = chunk.div_ceil(2).max(1).min(chunk - 1).max(1);
        } else if !removed {
            break;
        }
    }
    (ops, Some(last), tries)
}

/// Runs `f`, turning a panic of the harness itself (e.g. a run that hung and was killed) into
/// a failure.
fn catch(f: impl FnOnce() -> Result<(), Failure>) -> Result<(), Failure> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(e) => {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Err(fail(format!("harness panic: {}", normalize(msg.lines().next().unwrap_or(""))), msg))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The tests

fn run_model(default_mix: Mix) {
    let cfg = Config::from_env(default_mix);
    let srv = start_server();
    let ctx =
        Ctx { addr: srv.address(), data: srv.data.clone(), cfg: cfg.clone(), accounts: AtomicU64::new(0) };
    let started = Instant::now();
    let next = AtomicU64::new(cfg.start);
    let end = cfg.start + cfg.seeds;
    // (seed, ops, failure)
    let failures: Mutex<Vec<(u64, Vec<Op>, Failure)>> = Mutex::new(Vec::new());
    let total_ops = AtomicU64::new(0);
    std::thread::scope(|s| {
        for _ in 0..cfg.threads {
            s.spawn(|| {
                loop {
                    let seed = next.fetch_add(1, Ordering::Relaxed);
                    if seed >= end {
                        break;
                    }
                    let mut ops = Vec::new();
                    let res = catch(|| {
                        let (o, r) = run_seed(&ctx, seed);
                        ops = o;
                        r
                    });
                    total_ops.fetch_add(ops.len() as u64, Ordering::Relaxed);
                    if let Err(f) = res {
                        eprintln!("model: seed {seed} failed: {} ({} ops)", f.class, ops.len());
                        failures.lock().unwrap().push((seed, ops, f));
                    }
                }
            });
        }
    });
    let failures = failures.into_inner().unwrap();
    eprintln!(
        "model ({:?}): {} seeds from {} ({} operations) in {:.1?} with {} threads; {} failed",
        cfg.mix,
        cfg.seeds,
        cfg.start,
        total_ops.load(Ordering::Relaxed),
        started.elapsed(),
        cfg.threads,
        failures.len()
    );
    if failures.is_empty() {
        return;
    }
    // One report per class of failure: the seed with the shortest list, shrunk.
    let mut by_class: BTreeMap<String, Vec<(u64, Vec<Op>, Failure)>> = BTreeMap::new();
    for f in failures {
        by_class.entry(f.2.class.clone()).or_default().push(f);
    }
    let reports: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = by_class
            .iter()
            .map(|(class, fs)| {
                let ctx = &ctx;
                s.spawn(move || {
                    let (seed, ops, first) = fs.iter().min_by_key(|(_, o, _)| o.len()).expect("one at least");
                    let seeds: Vec<u64> = fs.iter().map(|(s, _, _)| *s).collect();
                    let t = Instant::now();
                    let (small, failure, tries) = shrink(ctx, ops, class, ctx.cfg.shrink);
                    let list = small.iter().enumerate().map(|(i, o)| format!("  {:>3}. {o}", i + 1)).collect::<Vec<_>>();
                    let how = match &failure {
                        Some(_) => format!(
                            "shrunk from {} to {} operations ({tries} replays, {:.1?}):",
                            ops.len(),
                            small.len(),
                            t.elapsed()
                        ),
                        None => format!(
                            "did NOT fail again on replay (timing-dependent?); the {} operations of the seed:",
                            ops.len()
                        ),
                    };
                    format!(
                        "=== FAILURE: {class}\nseeds: {seeds:?}\nseed {seed}, {how}\n{}\nrerun: {}\n--- detail ({}) ---\n{}\n",
                        list.join("\n"),
                        ctx.cfg.rerun(*seed),
                        if failure.is_some() { "of the shortest replay" } else { "of the original run" },
                        failure.as_ref().unwrap_or(first).detail
                    )
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("shrinking thread")).collect()
    });
    let all = reports.join("\n");
    eprintln!("{all}");
    panic!("{} distinct failures of the model test (see above)", by_class.len());
}

/// Files, directories, renames, chmod, atomic saves: no symlinks and no kind changes, which
/// had bugs (see the next test).
#[test]
fn three_devices_random_operations_basic() {
    run_model(Mix::Basic);
}

/// Every operation, symlinks and every change of a path's kind included, and files and
/// directories sharing names across devices. The bugs it found, each fixed: a link replaced by a
/// file never arrived; the server made missing parent directories without recording them; a
/// directory moved to a conflict name took its planned uploads' paths with it; a directory
/// replaced by a link on the server while a file inside it changed here never converged.
#[test]
fn three_devices_random_operations_full() {
    run_model(Mix::Full);
}
