//! `deltasync watch`: continuous sync between several "computers" (temp folders), each watched by
//! its own `deltasync watch` child process, through a real `deltasync serve`.
//!
//! Every test waits for convergence by polling with a generous deadline, never by sleeping a
//! fixed time, and compares the folders (and the server's plain mirror) with an independent model
//! of what the test did, so a watcher that "converges" by losing a change still fails.
//!
//! - random operations on one computer (seeded), then three computers writing at once;
//! - offline edits on two computers (conflict copy; an edit beats a delete);
//! - a path that cannot be applied locally must not stall a watcher;
//! - the server killed and restarted on the same port;
//! - a directory is committed before what goes into it (the deterministic root of a divergence);
//! - no echo: a downloaded file is never sent back;
//! - `.deltasyncignore`.
//!
//! Seeds: `DELTASYNC_WATCH_SEEDS=7,8,9 cargo test --test tests watch::` runs the random tests with
//! other seeds (a failing run prints its seed, and keeps the watchers' logs).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::util::*;

/// How long any convergence may take. Generous: CI machines are slow and share their cores.
const CONVERGE: Duration = Duration::from_secs(60);
/// How long a watcher may take to exit after SIGINT.
const STOP: Duration = Duration::from_secs(30);
/// Seeds of the random tests unless `DELTASYNC_WATCH_SEEDS` says otherwise.
const DEFAULT_SEEDS: &[u64] = &[1, 2, 3];

fn seeds() -> Vec<u64> {
    match std::env::var("DELTASYNC_WATCH_SEEDS") {
        Ok(s) if !s.trim().is_empty() => s
            .split(',')
            .map(|x| {
                x.trim().parse().unwrap_or_else(|e| panic!("bad seed {x:?} in DELTASYNC_WATCH_SEEDS: {e}"))
            })
            .collect(),
        _ => DEFAULT_SEEDS.to_vec(),
    }
}

/// Prints the seed if the test panics while this is alive.
struct SeedGuard(&'static str, u64);

impl Drop for SeedGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "\n*** {} failed with seed {} (rerun: DELTASYNC_WATCH_SEEDS={} cargo test --test tests {}) ***\n",
                self.0, self.1, self.1, self.0
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Watchers

/// A `deltasync watch` child process. Killed (SIGKILL) on drop; its log is printed if the test is
/// failing.
struct Watcher {
    device: String,
    dir: PathBuf,
    addr: String,
    token: String,
    log: PathBuf,
    /// Set in the watcher's environment (failpoints).
    env: Vec<(&'static str, &'static str)>,
    child: Option<Child>,
    /// The log's folder: removed after a passing test, kept after a failing one.
    logs: Option<TempDir>,
}

impl Watcher {
    fn start(dir: &Path, srv: &Server, token: &str, device: &str) -> Watcher {
        Watcher::start_with(dir, srv, token, device, &[])
    }

    fn start_with(
        dir: &Path,
        srv: &Server,
        token: &str,
        device: &str,
        env: &[(&'static str, &'static str)],
    ) -> Watcher {
        let logs = temp_dir("ds-watch-log-");
        let mut w = Watcher {
            device: device.to_string(),
            dir: dir.to_path_buf(),
            addr: srv.address(),
            token: token.to_string(),
            log: logs.path().join("watch.log"),
            env: env.to_vec(),
            child: None,
            logs: Some(logs),
        };
        w.spawn();
        w
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "watcher {} is running already", self.device);
        let log = fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("open watch log");
        let child = command()
            .arg("watch")
            .arg(&self.dir)
            .args(["--server", &self.addr, "--token", &self.token, "--no-progress", "-v"])
            .args(["--device", &self.device])
            .envs(self.env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log)
            .spawn()
            .expect("spawn deltasync watch");
        self.child = Some(child);
    }

    /// Starts the watcher again after [`Watcher::stop`], with the same folder and options.
    fn restart(&mut self) {
        let _ = fs::OpenOptions::new()
            .append(true)
            .open(&self.log)
            .and_then(|mut f| writeln!(f, "===== test: restarting the watcher ====="));
        self.spawn();
    }

    /// Stops it as Ctrl-C does (SIGINT) and asserts that it exits with status 0.
    fn stop(&mut self) {
        let child = self.child.as_mut().unwrap_or_else(|| panic!("watcher {} is not running", self.device));
        let pid = child.id().to_string();
        let st = Command::new("kill").args(["-INT", &pid]).status().expect("run kill");
        assert!(st.success(), "kill -INT {pid} failed: {st}");
        let deadline = Instant::now() + STOP;
        let status = loop {
            if let Some(s) = child.try_wait().expect("wait for watcher") {
                break s;
            }
            // Still running: Drop kills it.
            assert!(
                Instant::now() < deadline,
                "watcher {} did not exit within {STOP:?} of SIGINT; log:\n{}",
                self.device,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        self.child = None;
        assert!(
            status.success(),
            "watcher {} exited with {status} after SIGINT (expected 0); log:\n{}",
            self.device,
            self.log()
        );
    }

    /// Panics (with its log) if the watcher exited on its own.
    fn assert_alive(&mut self) {
        let exited: Option<ExitStatus> =
            self.child.as_mut().and_then(|c| c.try_wait().expect("try_wait on watcher"));
        if let Some(st) = exited {
            self.child = None;
            panic!("watcher {} exited unexpectedly ({st}); log:\n{}", self.device, self.log());
        }
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `n` lines of the log.
    fn log_tail(&self, n: usize) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            let kept = self.logs.take().map(|d| d.keep());
            eprintln!(
                "----- log of watcher {} (last 150 lines; all of it is kept in {}) -----\n{}",
                self.device,
                kept.map(|d| d.join("watch.log").display().to_string()).unwrap_or_default(),
                self.log_tail(150)
            );
        }
    }
}

/// The server's files as plain files (an export, refreshed by [`wait_converged`] on each
/// look), once the account exists.
fn mirror(srv: &mut Server) -> PathBuf {
    let deadline = Instant::now() + CONVERGE;
    loop {
        srv.assert_running();
        if (!srv.storage().is_local() || srv.data.join("deltasync.db").exists()) && account_exists(srv) {
            return srv.files();
        }
        assert!(
            Instant::now() < deadline,
            "the server made no account within {CONVERGE:?}; server log:\n{}",
            srv.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn account_exists(srv: &Server) -> bool {
    deltasync::server::open_metadata(&srv.storage())
        .ok()
        .and_then(|m| m.list_accounts().ok())
        .is_some_and(|a| !a.is_empty())
}

fn wait_converged(
    what: &str,
    srv: &mut Server,
    sides: &[(&str, &Path)],
    watchers: &mut [&mut Watcher],
    also: &dyn Fn(&Snap) -> Result<(), String>,
    context: &dyn Fn(&Server) -> String,
) -> Snap {
    let start = Instant::now();
    let mut last: Vec<String>;
    loop {
        srv.assert_running();
        for w in watchers.iter_mut() {
            w.assert_alive();
        }
        if sides.iter().any(|(name, _)| *name == "server") {
            srv.files();
        }
        last = Vec::new();
        let snaps: Vec<std::io::Result<Snap>> = sides.iter().map(|(_, p)| snapshot(p)).collect();
        match &snaps[0] {
            Err(e) => last.push(format!("cannot read {}: {e}", sides[0].0)),
            Ok(first) => {
                for ((name, _), s) in sides.iter().zip(&snaps).skip(1) {
                    match s {
                        Err(e) => last.push(format!("cannot read {name}: {e}")),
                        Ok(s) => last.extend(snap_diffs(first, s, sides[0].0, name)),
                    }
                }
                if last.is_empty() {
                    match also(first) {
                        Ok(()) => return first.clone(),
                        Err(e) => last.push(e),
                    }
                }
            }
        }
        if start.elapsed() > CONVERGE {
            let shown: Vec<&String> = last.iter().take(60).collect();
            panic!(
                "{what}: no convergence within {CONVERGE:?}; {} differences, first ones:\n{}\n{}\nserver log:\n{}",
                last.len(),
                shown.iter().map(|s| s.as_str()).collect::<Vec<_>>().join("\n"),
                context(srv),
                srv.log()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn no_extra(_: &Snap) -> Result<(), String> {
    Ok(())
}

fn no_context(_: &Server) -> String {
    String::new()
}

/// After convergence, the strict comparison of the shared helper, and no leftovers.
fn assert_all_same(sides: &[(&str, &Path)]) {
    for (_, p) in &sides[1..] {
        assert_same_tree(sides[0].1, p);
    }
    for (name, p) in sides {
        let bad: Vec<String> = list_tree(p)
            .into_iter()
            .filter(|x| x.contains(".deltasync-tmp-") || x.contains("(conflict "))
            .collect();
        assert!(bad.is_empty(), "{name} holds temp files or conflict copies: {bad:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// A model of what the test did, and random operations that keep it

#[derive(Debug, Clone, PartialEq, Eq)]
enum M {
    Dir,
    File { content: Vec<u8>, exec: bool },
    Link(String),
}

/// What a folder must hold (without mtimes), as a snapshot.
fn model_snap(model: &BTreeMap<String, M>) -> Snap {
    model
        .iter()
        .map(|(p, m)| {
            let i = match m {
                M::Dir => Item::Dir,
                M::Link(t) => Item::Link(PathBuf::from(t)),
                M::File { content, exec } => Item::File {
                    len: content.len() as u64,
                    hash: content_hash(content),
                    exec: *exec,
                    mtime_ns: 0,
                },
            };
            (p.clone(), i)
        })
        .collect()
}

fn assert_matches_model(what: &str, dir: &Path, model: &BTreeMap<String, M>, ops: &[String]) {
    let got = without_mtimes(&snapshot(dir).unwrap_or_else(|e| panic!("read {what}: {e}")));
    let d = snap_diffs(&model_snap(model), &got, "model", what);
    assert!(
        d.is_empty(),
        "{what} does not hold what the test wrote ({} differences):\n{}\nops:\n{}",
        d.len(),
        d.iter().take(60).cloned().collect::<Vec<_>>().join("\n"),
        ops.join("\n")
    );
}

/// Random file-system operations below `base` of one folder, mirrored in `model`.
struct Writer {
    root: PathBuf,
    /// Every operation stays below this directory ("" = the whole folder); it is never removed.
    base: String,
    model: BTreeMap<String, M>,
    rng: XorShift,
    ops: Vec<String>,
    bursts: u32,
}

impl Writer {
    fn new(root: &Path, base: &str, seed: u64) -> Writer {
        let mut w = Writer {
            root: root.to_path_buf(),
            base: base.to_string(),
            model: BTreeMap::new(),
            rng: XorShift::new(seed),
            ops: Vec::new(),
            bursts: 0,
        };
        if !base.is_empty() {
            fs::create_dir_all(root.join(base)).expect("create base");
            w.model.insert(base.to_string(), M::Dir);
        }
        w
    }

    fn below(&mut self, n: usize) -> usize {
        (self.rng.next_u64() % n as u64) as usize
    }

    fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }

    fn full(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    fn content(&mut self) -> Vec<u8> {
        let len = match self.below(10) {
            0 => 0,
            1..=6 => self.below(2000),
            7 | 8 => 2000 + self.below(30_000),
            _ => 20_000 + self.below(130_000),
        };
        let mut v = vec![0u8; len];
        if self.chance(2) {
            // Text-like, so zstd has something to do.
            for (i, b) in v.iter_mut().enumerate() {
                *b = b"lorem ipsum dolor sit amet\n"[i % 27];
            }
            if len > 0 {
                let i = self.below(len);
                v[i] = b'#';
            }
        } else {
            self.rng.fill(&mut v);
        }
        v
    }

    /// Directories (as model paths; `base` itself included) below `base`.
    fn dirs(&self) -> Vec<String> {
        let mut v = vec![self.base.clone()];
        v.extend(
            self.model.iter().filter(|(p, m)| **m == M::Dir && **p != self.base).map(|(p, _)| p.clone()),
        );
        v
    }

    fn files(&self) -> Vec<String> {
        self.model.iter().filter(|(_, m)| matches!(m, M::File { .. })).map(|(p, _)| p.clone()).collect()
    }

    fn pick<T: Clone>(&mut self, v: &[T]) -> Option<T> {
        if v.is_empty() { None } else { Some(v[self.below(v.len())].clone()) }
    }

    /// A name not used yet in `parent`.
    fn fresh_name(&mut self, parent: &str, prefix: &str, ext: &str) -> String {
        loop {
            let n = self.below(1000);
            let p = join(parent, &format!("{prefix}{n}{ext}"));
            if !self.model.contains_key(&p) && fs::symlink_metadata(self.full(&p)).is_err() {
                return p;
            }
        }
    }

    fn log(&mut self, s: String) {
        self.ops.push(s);
    }

    fn write_file(&mut self, rel: &str, content: Vec<u8>) {
        let full = self.full(rel);
        fs::write(&full, &content).unwrap_or_else(|e| panic!("write {rel}: {e}"));
        let exec = match self.model.get(rel) {
            Some(M::File { exec, .. }) => *exec,
            _ => false,
        };
        self.model.insert(rel.to_string(), M::File { content, exec });
    }

    fn create_file(&mut self) {
        let dirs = self.dirs();
        let parent = self.pick(&dirs).expect("base exists");
        let ext = [".txt", ".bin", "", ".md"][self.below(4)];
        let p = self.fresh_name(&parent, "f", ext);
        let c = self.content();
        self.log(format!("create {p} ({} bytes)", c.len()));
        self.write_file(&p, c);
    }

    fn overwrite(&mut self, f: &str) {
        let c = self.content();
        self.log(format!("overwrite {f} ({} bytes)", c.len()));
        self.write_file(f, c);
    }

    fn edit_in_place(&mut self, f: &str) {
        let Some(M::File { content, exec }) = self.model.get(f).cloned() else { return };
        if content.is_empty() {
            return self.append(f);
        }
        let mut content = content;
        let at = self.below(content.len());
        let n = (1 + self.below(64)).min(content.len() - at);
        let mut patch = vec![0u8; n];
        self.rng.fill(&mut patch);
        content[at..at + n].copy_from_slice(&patch);
        self.log(format!("edit {f} in place at {at} ({n} bytes)"));
        let mut file = fs::OpenOptions::new().write(true).open(self.full(f)).expect("open for edit");
        file.seek(SeekFrom::Start(at as u64)).unwrap();
        file.write_all(&patch).unwrap();
        self.model.insert(f.to_string(), M::File { content, exec });
    }

    fn append(&mut self, f: &str) {
        let Some(M::File { mut content, exec }) = self.model.get(f).cloned() else { return };
        let n = 1 + self.below(5000);
        let mut more = vec![0u8; n];
        self.rng.fill(&mut more);
        self.log(format!("append {n} bytes to {f}"));
        let mut file = fs::OpenOptions::new().append(true).open(self.full(f)).expect("open for append");
        file.write_all(&more).unwrap();
        content.extend_from_slice(&more);
        self.model.insert(f.to_string(), M::File { content, exec });
    }

    fn truncate(&mut self, f: &str) {
        let Some(M::File { mut content, exec }) = self.model.get(f).cloned() else { return };
        let n = if content.is_empty() { 0 } else { self.below(content.len()) };
        self.log(format!("truncate {f} to {n} bytes"));
        fs::OpenOptions::new().write(true).open(self.full(f)).expect("open").set_len(n as u64).unwrap();
        content.truncate(n);
        self.model.insert(f.to_string(), M::File { content, exec });
    }

    fn delete(&mut self, f: &str) {
        self.log(format!("delete {f}"));
        fs::remove_file(self.full(f)).unwrap_or_else(|e| panic!("delete {f}: {e}"));
        self.model.remove(f);
    }

    fn rename_file(&mut self, f: &str, to_dir: &str) {
        let ext = if f.ends_with(".txt") { ".txt" } else { "" };
        let to = self.fresh_name(to_dir, "r", ext);
        self.log(format!("rename {f} -> {to}"));
        fs::rename(self.full(f), self.full(&to)).unwrap_or_else(|e| panic!("rename {f}: {e}"));
        let m = self.model.remove(f).expect("in model");
        self.model.insert(to, m);
    }

    fn mkdir(&mut self) {
        let dirs = self.dirs();
        let parent = self.pick(&dirs).expect("base exists");
        let d = self.fresh_name(&parent, "d", "");
        self.log(format!("mkdir {d}"));
        fs::create_dir(self.full(&d)).unwrap_or_else(|e| panic!("mkdir {d}: {e}"));
        self.model.insert(d, M::Dir);
    }

    fn rmdir_empty(&mut self) {
        let empty: Vec<String> = self
            .dirs()
            .into_iter()
            .filter(|d| *d != self.base && !self.model.keys().any(|k| k.starts_with(&format!("{d}/"))))
            .collect();
        match self.pick(&empty) {
            Some(d) => {
                self.log(format!("rmdir {d}"));
                fs::remove_dir(self.full(&d)).unwrap_or_else(|e| panic!("rmdir {d}: {e}"));
                self.model.remove(&d);
            }
            None => self.mkdir(),
        }
    }

    /// Renames a directory with everything in it, sometimes into another directory.
    fn rename_dir(&mut self) {
        let candidates: Vec<String> = self.dirs().into_iter().filter(|d| *d != self.base).collect();
        let Some(d) = self.pick(&candidates) else { return self.mkdir() };
        let inside = format!("{d}/");
        let targets: Vec<String> =
            self.dirs().into_iter().filter(|t| *t != d && !t.starts_with(&inside)).collect();
        let parent = if self.chance(3) {
            self.pick(&targets).expect("base is a target")
        } else {
            parent_of(&d).to_string()
        };
        let to = self.fresh_name(&parent, "d", "");
        self.log(format!("rename directory {d} -> {to}"));
        fs::rename(self.full(&d), self.full(&to)).unwrap_or_else(|e| panic!("rename {d}: {e}"));
        let moved: Vec<String> =
            self.model.keys().filter(|k| **k == d || k.starts_with(&inside)).cloned().collect();
        for k in moved {
            let m = self.model.remove(&k).expect("listed");
            self.model.insert(format!("{to}{}", &k[d.len()..]), m);
        }
    }

    fn chmod(&mut self, f: &str) {
        let Some(M::File { content, exec }) = self.model.get(f).cloned() else { return };
        let exec = !exec;
        self.log(format!("chmod {} {f}", if exec { "+x" } else { "-x" }));
        set_mode(&self.full(f), if exec { 0o755 } else { 0o644 });
        self.model.insert(f.to_string(), M::File { content, exec });
    }

    /// What editors do: write the new version beside the file, then rename it over the original.
    fn editor_save(&mut self, f: &str) {
        let Some(M::File { exec, .. }) = self.model.get(f).cloned() else { return };
        let c = self.content();
        let name = f.rsplit('/').next().expect("name");
        let tmp = join(parent_of(f), &format!(".{name}.swp"));
        self.log(format!("editor save {f} via {tmp} ({} bytes)", c.len()));
        fs::write(self.full(&tmp), &c).unwrap();
        set_mode(&self.full(&tmp), if exec { 0o755 } else { 0o644 });
        fs::rename(self.full(&tmp), self.full(f)).unwrap();
        self.model.insert(f.to_string(), M::File { content: c, exec });
    }

    /// Creates a relative symlink (to a sibling, or dangling), or removes one.
    fn symlink_op(&mut self) {
        let links: Vec<String> =
            self.model.iter().filter(|(_, m)| matches!(m, M::Link(_))).map(|(p, _)| p.clone()).collect();
        if !links.is_empty() && self.chance(3) {
            let l = self.pick(&links).expect("not empty");
            self.log(format!("remove link {l}"));
            fs::remove_file(self.full(&l)).unwrap_or_else(|e| panic!("remove link {l}: {e}"));
            self.model.remove(&l);
            return;
        }
        let dirs = self.dirs();
        let parent = self.pick(&dirs).expect("base exists");
        let siblings: Vec<String> = self
            .model
            .keys()
            .filter(|k| parent_of(k) == parent && **k != parent)
            .map(|k| k.rsplit('/').next().expect("name").to_string())
            .collect();
        let target = match self.pick(&siblings) {
            Some(t) if !self.chance(4) => t,
            _ => "no-such-target".to_string(),
        };
        let l = self.fresh_name(&parent, "l", "");
        self.log(format!("symlink {l} -> {target}"));
        std::os::unix::fs::symlink(&target, self.full(&l)).unwrap_or_else(|e| panic!("symlink {l}: {e}"));
        self.model.insert(l, M::Link(target));
    }

    /// Replaces a file by a directory of the same name (holding a file), or a directory (with
    /// everything in it) by a file.
    fn replace_kind(&mut self) {
        let files = self.files();
        let dirs: Vec<String> = self.dirs().into_iter().filter(|d| *d != self.base).collect();
        if self.chance(2)
            && let Some(f) = self.pick(&files)
        {
            let inner = format!("{f}/inner.txt");
            self.log(format!("replace file {f} by a directory holding {inner}"));
            fs::remove_file(self.full(&f)).unwrap();
            fs::create_dir(self.full(&f)).unwrap();
            self.model.insert(f.clone(), M::Dir);
            let c = self.content();
            self.write_file(&inner, c);
        } else if let Some(d) = self.pick(&dirs) {
            self.log(format!("replace directory {d} (and all in it) by a file"));
            fs::remove_dir_all(self.full(&d)).unwrap();
            let inside = format!("{d}/");
            self.model.retain(|k, _| *k != d && !k.starts_with(&inside));
            let c = self.content();
            self.write_file(&d, c);
        } else {
            self.create_file();
        }
    }

    /// Many small files in a new directory at once (like an unpacked archive).
    fn burst(&mut self, n: usize) {
        self.bursts += 1;
        let dirs = self.dirs();
        let parent = self.pick(&dirs).expect("base exists");
        let d = self.fresh_name(&parent, "burst", "");
        self.log(format!("burst: {n} files in {d}"));
        fs::create_dir(self.full(&d)).unwrap();
        self.model.insert(d.clone(), M::Dir);
        for i in 0..n {
            // A few empty and duplicate files among them, which share content on the server.
            let content = match i % 50 {
                0 => Vec::new(),
                1 => b"same in every burst\n".to_vec(),
                _ => {
                    let len = self.below(300);
                    let mut v = vec![0u8; len];
                    self.rng.fill(&mut v);
                    v
                }
            };
            let p = format!("{d}/s{i:03}");
            fs::write(self.full(&p), &content).unwrap();
            self.model.insert(p, M::File { content, exec: false });
        }
    }

    /// One random operation of any kind.
    fn random_op(&mut self, burst_size: usize) {
        let files = self.files();
        let f = self.pick(&files);
        let op = self.below(100);
        match (op, f) {
            (_, None) | (0..=9, _) => self.create_file(),
            (10 | 11, _) => self.symlink_op(),
            (12 | 13, _) => self.replace_kind(),
            (14..=21, Some(f)) => self.overwrite(&f),
            (22..=29, Some(f)) => self.edit_in_place(&f),
            (30..=35, Some(f)) => self.append(&f),
            (36..=40, Some(f)) => self.truncate(&f),
            (41..=48, Some(f)) => self.delete(&f),
            (49..=54, Some(f)) => {
                let p = parent_of(&f).to_string();
                self.rename_file(&f, &p)
            }
            (55..=61, Some(f)) => {
                let dirs = self.dirs();
                let to = self.pick(&dirs).expect("base exists");
                self.rename_file(&f, &to)
            }
            (62..=67, _) => self.mkdir(),
            (68..=72, _) => self.rmdir_empty(),
            (73..=78, _) => self.rename_dir(),
            (79..=85, Some(f)) => self.chmod(&f),
            (86..=94, Some(f)) => self.editor_save(&f),
            (_, Some(_)) => {
                if self.bursts < 2 {
                    self.burst(burst_size)
                } else {
                    self.create_file()
                }
            }
        }
    }

    /// A start: a few files in a few directories, an executable, an empty directory and one
    /// bigger file (deltas).
    fn initial_tree(&mut self, files: usize) {
        for _ in 0..3 {
            self.mkdir();
        }
        for _ in 0..files {
            self.create_file();
        }
        let big = join(&self.base, "big.bin");
        let mut v = vec![0u8; 300_000];
        self.rng.fill(&mut v);
        self.log(format!("create {big} (300000 bytes)"));
        self.write_file(&big, v);
        let script = join(&self.base, "run.sh");
        self.write_file(&script, b"#!/bin/sh\necho hello\n".to_vec());
        self.chmod(&script);
        self.mkdir();
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Random operations on one computer reach the two others and the server

#[test]
fn three_watchers_converge_under_random_operations() {
    for seed in seeds() {
        let started = Instant::now();
        random_operations_with_seed(seed);
        eprintln!(
            "three_watchers_converge_under_random_operations: seed {seed} took {:?}",
            started.elapsed()
        );
    }
}

fn random_operations_with_seed(seed: u64) {
    let _guard = SeedGuard("watch::three_watchers_converge_under_random_operations", seed);
    let mut srv = start_server();
    let token = add_account(&srv.data, "alice");
    let (ta, tb, tc) = (temp_dir("ds-wa-"), temp_dir("ds-wb-"), temp_dir("ds-wc-"));
    let (a, b, c) = (ta.path(), tb.path(), tc.path());
    let mut w = Writer::new(a, "", seed);
    w.initial_tree(25);

    let mut wa = Watcher::start(a, &srv, &token, "A");
    let mut wb = Watcher::start(b, &srv, &token, "B");
    let mut wc = Watcher::start(c, &srv, &token, "C");
    let m = mirror(&mut srv);
    let sides = [("A", a), ("B", b), ("C", c), ("server", m.as_path())];
    wait_converged("initial tree", &mut srv, &sides, &mut [&mut wa, &mut wb, &mut wc], &no_extra, &|_| {
        format!("seed {seed}")
    });
    assert_matches_model("A", a, &w.model, &w.ops);
    assert_all_same(&sides);

    let total = 60;
    for i in 0..total {
        w.random_op(200);
        // Most operations follow each other at once; a short pause now and then lets rounds start
        // in the middle of the sequence, and sometimes everything settles first.
        if w.chance(4) {
            let ms = w.below(150) as u64;
            std::thread::sleep(Duration::from_millis(ms));
        }
        if w.chance(15) && i + 1 < total {
            w.log("(wait for convergence)".into());
            let ops = w.ops.join("\n");
            wait_converged(
                "intermediate state",
                &mut srv,
                &sides,
                &mut [&mut wa, &mut wb, &mut wc],
                &no_extra,
                &|_| format!("seed {seed}; ops so far:\n{ops}"),
            );
            assert_matches_model("A", a, &w.model, &w.ops);
        }
    }
    let ops = w.ops.join("\n");
    wait_converged("final state", &mut srv, &sides, &mut [&mut wa, &mut wb, &mut wc], &no_extra, &|_| {
        format!("seed {seed}; ops:\n{ops}")
    });
    assert_matches_model("A", a, &w.model, &w.ops);
    assert_all_same(&sides);
    for wt in [&mut wa, &mut wb, &mut wc] {
        wt.stop();
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Three computers write at once, each in its own subfolder

#[test]
fn three_watchers_writing_at_once_in_different_subfolders_converge() {
    for seed in seeds() {
        let started = Instant::now();
        concurrent_writers_with_seed(seed);
        eprintln!(
            "three_watchers_writing_at_once_in_different_subfolders_converge: seed {seed} took {:?}",
            started.elapsed()
        );
    }
}

fn concurrent_writers_with_seed(seed: u64) {
    let _guard = SeedGuard("watch::three_watchers_writing_at_once_in_different_subfolders_converge", seed);
    let mut srv = start_server();
    let token = add_account(&srv.data, "alice");
    let (ta, tb, tc) = (temp_dir("ds-wa-"), temp_dir("ds-wb-"), temp_dir("ds-wc-"));
    let (a, b, c) = (ta.path(), tb.path(), tc.path());
    let mut wa = Watcher::start(a, &srv, &token, "A");
    let mut wb = Watcher::start(b, &srv, &token, "B");
    let mut wc = Watcher::start(c, &srv, &token, "C");
    let m = mirror(&mut srv);
    let sides = [("A", a), ("B", b), ("C", c), ("server", m.as_path())];
    wait_converged("empty start", &mut srv, &sides, &mut [&mut wa, &mut wb, &mut wc], &no_extra, &no_context);

    // Each computer works in its own subfolder, all three at the same time.
    let writers: Vec<Writer> = std::thread::scope(|s| {
        let handles: Vec<_> = [(a, "from-a"), (b, "from-b"), (c, "from-c")]
            .into_iter()
            .enumerate()
            .map(|(i, (root, base))| {
                s.spawn(move || {
                    let mut w = Writer::new(root, base, seed * 1000 + i as u64);
                    w.initial_tree(10);
                    for _ in 0..40 {
                        w.random_op(100);
                        if w.chance(4) {
                            let ms = w.below(100) as u64;
                            std::thread::sleep(Duration::from_millis(ms));
                        }
                    }
                    w
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("writer thread panicked")).collect()
    });
    let mut model = BTreeMap::new();
    let mut ops = Vec::new();
    for w in &writers {
        model.extend(w.model.clone());
        ops.push(format!("--- on {} ---", w.root.display()));
        ops.extend(w.ops.clone());
    }
    let ops_text = ops.join("\n");
    wait_converged(
        "after concurrent writes",
        &mut srv,
        &sides,
        &mut [&mut wa, &mut wb, &mut wc],
        &no_extra,
        &|_| format!("seed {seed}; ops:\n{ops_text}"),
    );
    for (name, dir) in &sides {
        assert_matches_model(name, dir, &model, &ops);
    }
    assert_all_same(&sides);
    for wt in [&mut wa, &mut wb, &mut wc] {
        wt.stop();
    }
}

// ---------------------------------------------------------------------------------------------
// 3. Offline edits on two computers

fn conflict_copies(s: &Snap) -> Vec<String> {
    s.keys().filter(|p| p.contains("(conflict ")).cloned().collect()
}

#[test]
fn offline_edits_on_two_computers_keep_both_and_edit_beats_delete() {
    let mut srv = start_server();
    let token = add_account(&srv.data, "alice");
    let (tx, ty) = (temp_dir("ds-wx-"), temp_dir("ds-wy-"));
    let (x, y) = (tx.path(), ty.path());
    write(&x.join("f.txt"), "the original f\n");
    write(&x.join("g.txt"), "the original g\n");
    write(&x.join("other.txt"), "nobody touches this\n");
    let mut wx = Watcher::start(x, &srv, &token, "X");
    let mut wy = Watcher::start(y, &srv, &token, "Y");
    let m = mirror(&mut srv);
    let sides = [("X", x), ("Y", y), ("server", m.as_path())];
    wait_converged("first sync", &mut srv, &sides, &mut [&mut wx, &mut wy], &no_extra, &no_context);

    // Both computers go offline (the watchers stop), and both are edited.
    wx.stop();
    wy.stop();
    let x_f = "f as edited on X while offline\n";
    let y_f = "f as edited on Y while offline, which differs\n";
    let y_g = "g as edited on Y while X deleted it\n";
    write(&x.join("f.txt"), x_f);
    fs::remove_file(x.join("g.txt")).unwrap();
    write(&y.join("f.txt"), y_f);
    write(&y.join("g.txt"), y_g);

    wx.restart();
    wy.restart();
    let done = |s: &Snap| -> Result<(), String> {
        if conflict_copies(s).is_empty() || !s.contains_key("g.txt") {
            return Err(format!("not resolved yet: {:?}", s.keys().collect::<Vec<_>>()));
        }
        Ok(())
    };
    let snap =
        wait_converged("after both came back", &mut srv, &sides, &mut [&mut wx, &mut wy], &done, &no_context);
    assert_same_tree(x, y);
    assert_same_tree(x, &m);

    let copies = conflict_copies(&snap);
    assert_eq!(copies.len(), 1, "expected exactly one conflict copy, found {copies:?}");
    assert!(
        copies[0].starts_with("f (conflict X ") || copies[0].starts_with("f (conflict Y "),
        "unexpected conflict copy name {:?}",
        copies[0]
    );
    assert!(copies[0].ends_with(").txt"), "conflict copy keeps the extension: {:?}", copies[0]);
    for (name, dir) in [("X", x), ("Y", y)] {
        let both: BTreeSet<String> =
            [read_string(&dir.join("f.txt")), read_string(&dir.join(&copies[0]))].into_iter().collect();
        let want: BTreeSet<String> = [x_f.to_string(), y_f.to_string()].into_iter().collect();
        assert_eq!(both, want, "on {name}: f.txt and its conflict copy must hold both offline edits");
        assert_eq!(read_string(&dir.join("g.txt")), y_g, "on {name}: Y's edit of g must beat X's delete");
        assert_eq!(read_string(&dir.join("other.txt")), "nobody touches this\n", "on {name}");
    }
    // The copy is named after the computer whose version lost the name.
    let loser = if copies[0].starts_with("f (conflict X ") { x_f } else { y_f };
    assert_eq!(read_string(&x.join(&copies[0])), loser, "the conflict copy is named after the wrong device");
    assert_eq!(snap.len(), 4, "unexpected paths: {:?}", snap.keys().collect::<Vec<_>>());
    wx.stop();
    wy.stop();
}

/// A path the executor cannot carry out must not stop the watcher: here the server has a new
/// directory `d/sub` (made on X) while Y, offline, replaced the directory `d` by a file. Y must
/// keep both (the README: a directory deleted on one computer keeps what was added inside it on
/// another; a change is never silently lost) and, above all, keep syncing everything else.
#[test]
fn a_watcher_keeps_syncing_when_a_directory_it_replaced_by_a_file_gained_a_subdirectory() {
    let mut srv = start_server();
    let token = add_account(&srv.data, "alice");
    let (tx, ty) = (temp_dir("ds-wx-"), temp_dir("ds-wy-"));
    let (x, y) = (tx.path(), ty.path());
    write(&x.join("d/f.txt"), "inside d\n");
    let mut wx = Watcher::start(x, &srv, &token, "X");
    let mut wy = Watcher::start(y, &srv, &token, "Y");
    let m = mirror(&mut srv);
    let sides = [("X", x), ("Y", y), ("server", m.as_path())];
    wait_converged("first sync", &mut srv, &sides, &mut [&mut wx, &mut wy], &no_extra, &no_context);

    wy.stop();
    fs::remove_dir_all(y.join("d")).unwrap();
    write(&y.join("d"), "d is a file on Y now\n");
    fs::create_dir(x.join("d/sub")).unwrap();
    let on_server = |s: &Snap| {
        if s.get("d/sub") == Some(&Item::Dir) {
            Ok(())
        } else {
            Err("d/sub not on the server yet".to_string())
        }
    };
    wait_converged(
        "d/sub on the server",
        &mut srv,
        &[("server", m.as_path())],
        &mut [],
        &on_server,
        &no_context,
    );

    wy.restart();
    write(&y.join("unrelated.txt"), "written on Y after it came back\n");
    let done = |s: &Snap| -> Result<(), String> {
        match (s.get("unrelated.txt"), s.get("d/sub")) {
            (Some(Item::File { .. }), Some(Item::Dir)) => Ok(()),
            _ => Err(format!("not there yet: {:?}", s.keys().collect::<Vec<_>>())),
        }
    };
    let snap =
        wait_converged("after Y came back", &mut srv, &sides, &mut [&mut wx, &mut wy], &done, &no_context);
    assert_same_tree(x, y);
    assert_same_tree(x, &m);
    let kept: Vec<PathBuf> = files_containing(x, b"d is a file on Y now")
        .into_iter()
        .filter(|p| !p.starts_with(x.join(".deltasync")))
        .collect();
    assert_eq!(
        kept.len(),
        1,
        "Y's file `d` must survive (as a conflict copy): {:?}",
        snap.keys().collect::<Vec<_>>()
    );
    assert!(!snap.contains_key("d/f.txt"), "Y deleted d/f.txt: {:?}", snap.keys().collect::<Vec<_>>());
    wx.stop();
    wy.stop();
}

// ---------------------------------------------------------------------------------------------
// 4. The server goes away and comes back

/// A server on a port outside the kernel's ephemeral range. While this server is down for a
/// restart on the same port, no other test's `--listen 127.0.0.1:0` (nor any client's source port,
/// both taken from that range) can take its port.
fn start_server_outside_ephemeral_ports() -> Server {
    let low: u64 = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    let (from, to) = if low > 12_000 { (10_000, low) } else { (61_000, 65_000) };
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    let mut rng = XorShift::new(now.as_nanos() as u64 ^ u64::from(std::process::id()));
    for _ in 0..100 {
        let port = from + rng.next_u64() % (to - from);
        if let Some(s) = start_server_at(&format!("127.0.0.1:{port}")) {
            return s;
        }
    }
    panic!("no free port in {from}..{to} for the server");
}

#[test]
fn watchers_reconnect_after_server_restart() {
    let mut srv = start_server_outside_ephemeral_ports();
    let token = add_account(&srv.data, "alice");
    let (ta, tb) = (temp_dir("ds-wa-"), temp_dir("ds-wb-"));
    let (a, b) = (ta.path(), tb.path());
    for name in ["a-edit.txt", "a-del.txt", "a-ren.txt", "b-edit.txt", "b-del.txt", "keep.txt"] {
        write(&a.join(name), format!("{name}: first version\n"));
    }
    let big = random_bytes(40, 400_000);
    write(&a.join("big.bin"), &big);
    let mut wa = Watcher::start(a, &srv, &token, "A");
    let mut wb = Watcher::start(b, &srv, &token, "B");
    let m = mirror(&mut srv);
    let sides = [("A", a), ("B", b), ("server", m.as_path())];
    wait_converged("first sync", &mut srv, &sides, &mut [&mut wa, &mut wb], &no_extra, &no_context);

    srv.kill_hard();
    // Both notice (the idle connection closes, or a round in flight loses it) and keep running.
    let noticed = |w: &Watcher| {
        let log = w.log();
        log.contains("went away") || log.contains("connection lost")
    };
    let deadline = Instant::now() + CONVERGE;
    while !(noticed(&wa) && noticed(&wb)) {
        wa.assert_alive();
        wb.assert_alive();
        assert!(Instant::now() < deadline, "the watchers did not notice the server going away");
        std::thread::sleep(Duration::from_millis(20));
    }

    // Changes on both sides while the server is down.
    write(&a.join("a-new/new.txt"), "made on A while the server was down\n");
    write(&a.join("a-edit.txt"), "a-edit.txt: edited on A while the server was down\n");
    fs::remove_file(a.join("a-del.txt")).unwrap();
    fs::rename(a.join("a-ren.txt"), a.join("a-new/renamed.txt")).unwrap();
    let mut big2 = big.clone();
    big2[200_000..200_100].copy_from_slice(&random_bytes(41, 100));
    write(&a.join("big.bin"), &big2);
    write(&b.join("b-new/new.txt"), "made on B while the server was down\n");
    write(&b.join("b-edit.txt"), "b-edit.txt: edited on B while the server was down\n");
    fs::remove_file(b.join("b-del.txt")).unwrap();
    fs::create_dir(b.join("b-empty")).unwrap();

    srv.start_again();
    let expected: BTreeMap<&str, Option<&[u8]>> = BTreeMap::from([
        ("a-new/new.txt", Some(&b"made on A while the server was down\n"[..])),
        ("a-new/renamed.txt", Some(&b"a-ren.txt: first version\n"[..])),
        ("a-edit.txt", Some(&b"a-edit.txt: edited on A while the server was down\n"[..])),
        ("b-new/new.txt", Some(&b"made on B while the server was down\n"[..])),
        ("b-edit.txt", Some(&b"b-edit.txt: edited on B while the server was down\n"[..])),
        ("keep.txt", Some(&b"keep.txt: first version\n"[..])),
        ("big.bin", Some(&big2[..])),
        ("a-del.txt", None),
        ("a-ren.txt", None),
        ("b-del.txt", None),
    ]);
    let check = |s: &Snap| -> Result<(), String> {
        for (p, want) in &expected {
            let got = s.get(*p);
            let ok = match (want, got) {
                (None, None) => true,
                (Some(c), Some(Item::File { hash, .. })) => *hash == content_hash(c),
                _ => false,
            };
            if !ok {
                return Err(format!("{p}: want {:?}, have {got:?}", want.map(|c| c.len())));
            }
        }
        if s.get("b-empty") != Some(&Item::Dir) {
            return Err("b-empty/ missing".into());
        }
        Ok(())
    };
    let snap = wait_converged(
        "after the server came back",
        &mut srv,
        &sides,
        &mut [&mut wa, &mut wb],
        &check,
        &no_context,
    );
    let paths: Vec<&str> = snap.keys().map(|s| s.as_str()).collect();
    let want = [
        "a-edit.txt",
        "a-new",
        "a-new/new.txt",
        "a-new/renamed.txt",
        "b-edit.txt",
        "b-empty",
        "b-new",
        "b-new/new.txt",
        "big.bin",
        "keep.txt",
    ];
    assert_eq!(paths, want, "paths after the server came back");
    assert_same_tree(a, b);
    assert_same_tree(a, &m);
    for w in [&wa, &wb] {
        assert!(
            w.log().contains("reconnected"),
            "watcher {} did not say it reconnected:\n{}",
            w.device,
            w.log()
        );
    }
    wa.stop();
    wb.stop();
}

/// The deterministic root of a divergence the concurrent tests catch now and then: a directory
/// must be committed before anything placed inside it. Otherwise another watcher that reads the
/// journal between the two commits creates the directory implicitly, without a base, and when
/// the directory is then renamed or deleted it uploads it again: the directory comes back on
/// every computer.
#[test]
fn a_new_directory_is_committed_before_what_moves_or_is_copied_into_it() {
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let x = temp_dir("ds-wx-");
    let x = x.path();
    write(&x.join("moved.txt"), "this file moves into a new directory\n");
    write(&x.join("copied.txt"), "this content is copied into a new directory\n");
    push(x, &srv, &token);
    fs::create_dir_all(x.join("new/deeper")).unwrap();
    fs::rename(x.join("moved.txt"), x.join("new/deeper/moved.txt")).unwrap();
    fs::copy(x.join("copied.txt"), x.join("new/copy.txt")).unwrap();
    push(x, &srv, &token);

    // `status` lists the server's entries as this folder last saw them, with their revisions.
    let out = run(command().arg("status").arg(x)).ok("status");
    let rev = |path: &str| -> u64 {
        out.stdout
            .lines()
            .find_map(|l| {
                let rest = l.trim().strip_prefix("rev")?;
                let mut w = rest.split_whitespace();
                let rev = w.next()?.parse().ok()?;
                let _kind = w.next()?;
                (w.next()? == path).then_some(rev)
            })
            .unwrap_or_else(|| panic!("no revision of {path} in `status`:\n{}", out.stdout))
    };
    let (new, deeper) = (rev("new"), rev("new/deeper"));
    let (moved, copied) = (rev("new/deeper/moved.txt"), rev("new/copy.txt"));
    assert!(
        new < deeper && deeper < moved && new < copied,
        "a directory was committed after what went into it: new at rev {new}, new/deeper at {deeper}, \
         new/deeper/moved.txt at {moved}, new/copy.txt at {copied}\n{}",
        out.stdout
    );
}

// ---------------------------------------------------------------------------------------------
// 5. A downloaded file is not sent back

/// Journal lines (seq, op, path, device) for failure messages; empty if the schema changed.
fn journal(srv: &Server) -> String {
    let Ok(c) = rusqlite::Connection::open_with_flags(
        srv.data.join("deltasync.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    ) else {
        return String::new();
    };
    let Ok(mut st) = c.prepare("SELECT seq, op, path, device FROM journal ORDER BY seq") else {
        return String::new();
    };
    let rows = st.query_map([], |r| {
        Ok(format!(
            "{:>4} {:<8} {:<30} by {}",
            r.get::<_, i64>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, String>(3)?
        ))
    });
    match rows {
        Ok(rows) => rows.filter_map(|r| r.ok()).collect::<Vec<_>>().join("\n"),
        Err(_) => String::new(),
    }
}

/// Waits until the account's change count is `want` and stays there for a second (the one place
/// a settle time is needed: an echo would come a moment later). Fails at once if it goes past.
fn assert_changes_settle_at(srv: &Server, want: u64, after: &str) {
    let start = Instant::now();
    let mut since = Instant::now();
    let mut last = u64::MAX;
    loop {
        let n = account_changes(&srv.data, "alice");
        assert!(
            n <= want,
            "after {after}: the server has {n} changes, expected {want}: something was sent back\njournal:\n{}",
            journal(srv)
        );
        if n != last {
            last = n;
            since = Instant::now();
        }
        if n == want && since.elapsed() >= Duration::from_secs(1) {
            return;
        }
        assert!(
            start.elapsed() < CONVERGE,
            "after {after}: the server has {n} changes, expected {want}\njournal:\n{}",
            journal(srv)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Has the watcher of `dir` finished a round (`status` shows a last sync)?
fn synced_once(dir: &Path) -> bool {
    if !dir.join(".deltasync/index.db").exists() {
        return false;
    }
    let out = run(command().arg("status").arg(dir));
    out.success() && out.stdout.lines().any(|l| l.starts_with("Last sync:") && !l.contains("never"))
}

/// Puts a finished file or directory at `dest` in one rename (staged outside the folder), so a
/// round never sees it half-written and the number of commits it causes is exact.
fn place(stage: &Path, dest: &Path, build: impl FnOnce(&Path)) {
    let tmp = stage.join(format!("staged-{}", dest.file_name().unwrap().to_string_lossy()));
    build(&tmp);
    fs::rename(&tmp, dest).unwrap();
}

#[test]
fn no_echo_of_downloaded_files() {
    let mut srv = start_server();
    let token = add_account(&srv.data, "alice");
    let (ta, tb, stage) = (temp_dir("ds-wa-"), temp_dir("ds-wb-"), temp_dir("ds-stage-"));
    let (a, b) = (ta.path(), tb.path());
    let mut wa = Watcher::start(a, &srv, &token, "A");
    let mut wb = Watcher::start(b, &srv, &token, "B");
    let deadline = Instant::now() + CONVERGE;
    while !(synced_once(a) && synced_once(b)) {
        wa.assert_alive();
        wb.assert_alive();
        assert!(Instant::now() < deadline, "the watchers did not finish a first round");
        std::thread::sleep(Duration::from_millis(50));
    }
    let m = mirror(&mut srv);
    let sides = [("A", a), ("B", b), ("server", m.as_path())];
    assert_changes_settle_at(&srv, 0, "starting on empty folders");

    // Each step: what it does, and how many server commits it must cost (the origin's own).
    type Step<'a> = (&'a str, u64, Box<dyn Fn() + 'a>);
    let st = stage.path();
    let steps: Vec<Step> = vec![
        (
            "A creates hello.txt",
            1,
            Box::new(|| place(st, &a.join("hello.txt"), |p| write(p, "hello from A\n"))),
        ),
        (
            "A replaces hello.txt",
            1,
            Box::new(|| place(st, &a.join("hello.txt"), |p| write(p, "hello again from A, longer\n"))),
        ),
        (
            "A adds directory sub/ holding inner.bin (mkdir + put)",
            2,
            Box::new(|| place(st, &a.join("sub"), |p| write(&p.join("inner.bin"), random_bytes(50, 50_000)))),
        ),
        (
            "A moves hello.txt into sub/",
            1,
            Box::new(|| fs::rename(a.join("hello.txt"), a.join("sub/hello.txt")).unwrap()),
        ),
        ("A makes sub/hello.txt executable", 1, Box::new(|| set_mode(&a.join("sub/hello.txt"), 0o755))),
        (
            "B creates from-b.txt",
            1,
            Box::new(|| place(st, &b.join("from-b.txt"), |p| write(p, "hello from B\n"))),
        ),
        (
            "B edits sub/inner.bin (a delta)",
            1,
            Box::new(|| {
                let mut v = random_bytes(50, 50_000);
                v[30_000..30_010].copy_from_slice(b"B was here");
                place(st, &b.join("sub/inner.bin"), |p| write(p, &v));
            }),
        ),
        ("A deletes sub/hello.txt", 1, Box::new(|| fs::remove_file(a.join("sub/hello.txt")).unwrap())),
    ];
    let mut want = 0;
    for (what, commits, step) in steps {
        step();
        want += commits;
        wait_converged(what, &mut srv, &sides, &mut [&mut wa, &mut wb], &no_extra, &journal);
        assert_changes_settle_at(&srv, want, what);
    }
    assert_all_same(&sides);
    wa.stop();
    wb.stop();
}

// ---------------------------------------------------------------------------------------------
// 6. .deltasyncignore

#[test]
fn ignore_rules_are_respected() {
    let mut srv = start_server();
    let token = add_account(&srv.data, "alice");
    let (ta, tb) = (temp_dir("ds-wa-"), temp_dir("ds-wb-"));
    let (a, b) = (ta.path(), tb.path());
    write(&a.join(".deltasyncignore"), "*.tmp\nbuild/\n");
    write(&a.join("start.txt"), "start\n");
    let mut wa = Watcher::start(a, &srv, &token, "A");
    let mut wb = Watcher::start(b, &srv, &token, "B");
    let m = mirror(&mut srv);
    let sides = [("A", a), ("B", b), ("server", m.as_path())];
    wait_converged(
        "the rules file reached B",
        &mut srv,
        &sides,
        &mut [&mut wa, &mut wb],
        &no_extra,
        &no_context,
    );
    assert_eq!(read_string(&b.join(".deltasyncignore")), "*.tmp\nbuild/\n");

    // Ignored files on A, then a normal one: once that one is on B, the round that saw them ran.
    let a_ignored = ["scratch.tmp", "docs/notes.tmp", "build/out.bin", "build/deep/x.txt", "docs/build/y.o"];
    for p in a_ignored {
        write(&a.join(p), format!("{p} stays on A\n"));
    }
    write(&a.join("docs/readme.txt"), "synced\n");
    wait_for_file(&b.join("docs/readme.txt"), "synced\n", &mut [&mut wa, &mut wb]);

    // The same the other way, and an ignored file on B with a name that A also ignores.
    let b_ignored = ["b-scratch.tmp", "build/from-b.bin", "scratch.tmp"];
    for p in b_ignored {
        write(&b.join(p), format!("{p} stays on B\n"));
    }
    write(&b.join("from-b.txt"), "synced too\n");
    wait_for_file(&a.join("from-b.txt"), "synced too\n", &mut [&mut wa, &mut wb]);
    // And one more round each way, so late rounds had their chance to send what they should not.
    write(&a.join("last-a.txt"), "a\n");
    write(&b.join("last-b.txt"), "b\n");
    wait_for_file(&b.join("last-a.txt"), "a\n", &mut [&mut wa, &mut wb]);
    wait_for_file(&a.join("last-b.txt"), "b\n", &mut [&mut wa, &mut wb]);

    let synced = [
        ".deltasyncignore",
        "start.txt",
        "docs",
        "docs/readme.txt",
        "from-b.txt",
        "last-a.txt",
        "last-b.txt",
    ];
    let strip = |dir: &Path| -> Vec<String> {
        list_tree(dir)
            .into_iter()
            .filter(|p| !p.ends_with(".tmp") && !p.starts_with("build") && !p.contains("/build"))
            .collect()
    };
    let want: BTreeSet<&str> = synced.into_iter().collect();
    for (name, dir) in [("A", a), ("B", b)] {
        let got: BTreeSet<String> = strip(dir).into_iter().collect();
        assert_eq!(got, want.iter().map(|s| s.to_string()).collect(), "synced paths on {name}");
    }
    // Ignored files stayed where they were written, untouched, and went nowhere else.
    for p in a_ignored {
        assert_eq!(read_string(&a.join(p)), format!("{p} stays on A\n"), "A's ignored {p} was changed");
    }
    for p in b_ignored {
        assert_eq!(read_string(&b.join(p)), format!("{p} stays on B\n"), "B's ignored {p} was changed");
    }
    for p in ["docs/notes.tmp", "build/out.bin", "build/deep/x.txt", "docs/build/y.o"] {
        assert!(!b.join(p).exists(), "A's ignored {p} reached B");
    }
    for p in ["b-scratch.tmp", "build/from-b.bin"] {
        assert!(!a.join(p).exists(), "B's ignored {p} reached A");
    }
    let on_server: BTreeSet<String> = list_tree(&srv.files()).into_iter().collect();
    assert_eq!(on_server, want.iter().map(|s| s.to_string()).collect(), "paths on the server");
    wa.stop();
    wb.stop();
}

/// The watch is set up once the first round is over (so that round's reads and downloads raise no
/// events): a file written after that round and before the watch is in place raises no event, and
/// still goes, in the round the end of the setup starts (not at the rescan, 300 s away).
#[cfg(feature = "failpoints")]
#[test]
fn a_file_written_before_the_watch_is_in_place_still_goes() {
    let mut srv = start_server();
    let token = add_account(&srv.data, "alice");
    let ta = temp_dir("ds-late-");
    let a = ta.path();
    write(&a.join("first.txt"), "there from the start\n");
    // The setup takes 5 s more than it would: the write below falls before it ends.
    let mut w = Watcher::start_with(a, &srv, &token, "A", &[("DELTASYNC_FAILPOINT", "watcher-slow")]);
    let deadline = Instant::now() + CONVERGE;
    while !synced_once(a) {
        w.assert_alive();
        assert!(Instant::now() < deadline, "the watcher did not finish a first round");
        std::thread::sleep(Duration::from_millis(50));
    }
    write(&a.join("late.txt"), "written before the watch was in place\n");
    mirror(&mut srv);
    loop {
        let files = srv.files();
        if fs::read_to_string(files.join("late.txt"))
            .is_ok_and(|c| c == "written before the watch was in place\n")
        {
            assert_eq!(read_string(&files.join("first.txt")), "there from the start\n");
            break;
        }
        w.assert_alive();
        assert!(Instant::now() < deadline, "late.txt never reached the server; log:\n{}", w.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    w.stop();
}

/// Polls until `path` holds `content`.
fn wait_for_file(path: &Path, content: &str, watchers: &mut [&mut Watcher]) {
    let deadline = Instant::now() + CONVERGE;
    loop {
        if fs::read_to_string(path).is_ok_and(|c| c == content) {
            return;
        }
        for w in watchers.iter_mut() {
            w.assert_alive();
        }
        assert!(Instant::now() < deadline, "{} did not arrive within {CONVERGE:?}", path.display());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `watch` holds a mass delete back, says so once, keeps syncing everything else, and `status`
/// shows the held deletes while it runs.
#[test]
fn watch_holds_a_mass_delete_back_and_keeps_syncing_the_rest() {
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let (a, b) = (temp_dir("ds-held-a-"), temp_dir("ds-held-b-"));
    for i in 0..60 {
        write(&a.path().join(format!("docs/f{i:02}.txt")), format!("doc {i}"));
    }
    push(a.path(), &srv, &token);
    pull(b.path(), &srv, &token);
    // A file the watcher's first round uploads: once it is on B, the watcher is running steady
    // (a delete racing its start-up scan is a round of its own, not what this test is about).
    write(&a.path().join("new0.txt"), "uploaded by the first round");
    let mut w = Watcher::start(a.path(), &srv, &token, "A");
    let arrived = |name: &str, w: &mut Watcher| {
        let deadline = Instant::now() + CONVERGE;
        while !b.path().join(name).exists() {
            w.assert_alive();
            assert!(Instant::now() < deadline, "{name} never arrived; log:\n{}", w.log());
            std::thread::sleep(Duration::from_millis(100));
            pull(b.path(), &srv, &token);
        }
    };
    arrived("new0.txt", &mut w);
    for i in 0..60 {
        fs::remove_file(a.path().join(format!("docs/f{i:02}.txt"))).expect("delete");
    }
    write(&a.path().join("new1.txt"), "synced while the deletes wait");
    arrived("new1.txt", &mut w);
    // Once the folder is quiet, the deletes' round: held back, and said.
    let deadline = Instant::now() + CONVERGE;
    while !w.log().contains("held back 60 deletes") {
        w.assert_alive();
        assert!(Instant::now() < deadline, "the held deletes were never reported; log:\n{}", w.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    // More rounds (another change, and the held deletes' own retry once it is quiet again).
    write(&a.path().join("new2.txt"), "synced while the deletes wait");
    arrived("new2.txt", &mut w);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(read_string(&b.path().join("docs/f07.txt")), "doc 7", "the deletes were held back");
    let said = w.log().matches("held back 60 deletes").count();
    assert_eq!(said, 1, "said once, not every round; log:\n{}", w.log());
    let st = run(command().arg("status").arg(a.path())).ok("status").stdout;
    assert!(st.contains("Held back"), "{st}");
    w.stop();
}

// ---------------------------------------------------------------------------------------------
// 7. When a round starts: a file its writer closed goes at once, a file still open waits for quiet

/// Two watchers on one account, both past their first round.
fn two_synced_watchers(srv: &Server, token: &str, a: &Path, b: &Path) -> (Watcher, Watcher) {
    let mut wa = Watcher::start(a, srv, token, "A");
    let mut wb = Watcher::start(b, srv, token, "B");
    let deadline = Instant::now() + CONVERGE;
    while !(synced_once(a) && synced_once(b)) {
        wa.assert_alive();
        wb.assert_alive();
        assert!(Instant::now() < deadline, "the watchers did not finish a first round");
        std::thread::sleep(Duration::from_millis(50));
    }
    (wa, wb)
}

/// A saved file (created, written, closed; then overwritten in place and closed) is sent by the
/// round its close starts, not left for the periodic rescan (300 s, beyond the test's deadline).
#[test]
fn a_file_written_and_closed_is_sent_at_once() {
    let mut srv = start_server();
    let token = add_account(&srv.data, "alice");
    let (ta, tb) = (temp_dir("ds-close-a-"), temp_dir("ds-close-b-"));
    let (a, b) = (ta.path(), tb.path());
    let (mut wa, mut wb) = two_synced_watchers(&srv, &token, a, b);

    fs::write(a.join("saved.txt"), "saved and closed\n").expect("write saved.txt");
    wait_for_file(&b.join("saved.txt"), "saved and closed\n", &mut [&mut wa, &mut wb]);

    // Overwritten in place (truncate, write, close), as many editors save.
    let mut f = fs::OpenOptions::new().write(true).truncate(true).open(a.join("saved.txt")).expect("open");
    f.write_all(b"saved again, in place\n").expect("write");
    drop(f);
    wait_for_file(&b.join("saved.txt"), "saved again, in place\n", &mut [&mut wa, &mut wb]);

    // Into a subfolder made just before (its own watch is added as it appears).
    fs::create_dir(a.join("new")).expect("mkdir");
    fs::write(a.join("new/inner.txt"), "inside a new folder\n").expect("write inner.txt");
    wait_for_file(&b.join("new/inner.txt"), "inside a new folder\n", &mut [&mut wa, &mut wb]);

    let m = mirror(&mut srv);
    assert_eq!(read_string(&m.join("saved.txt")), "saved again, in place\n");
    assert_all_same(&[("A", a), ("B", b)]);
    wa.stop();
    wb.stop();
}

/// A file kept open and written in pieces over ~300 ms still syncs once its writes pause (a log
/// that is never closed must not wait forever), and what ends on the other computer and the
/// server is its final content, with no conflict copy.
#[test]
fn a_file_held_open_and_written_in_pieces_arrives_with_its_final_content() {
    let mut srv = start_server();
    let token = add_account(&srv.data, "alice");
    let (ta, tb) = (temp_dir("ds-open-a-"), temp_dir("ds-open-b-"));
    let (a, b) = (ta.path(), tb.path());
    let (mut wa, mut wb) = two_synced_watchers(&srv, &token, a, b);

    let pieces: Vec<Vec<u8>> = (0..4).map(|i| random_bytes(100 + i, 64 << 10)).collect();
    let whole: Vec<u8> = pieces.concat();
    let mut f = fs::File::create(a.join("growing.bin")).expect("create growing.bin");
    for (i, p) in pieces.iter().enumerate() {
        if i > 0 {
            std::thread::sleep(Duration::from_millis(100));
        }
        f.write_all(p).expect("write a piece");
    }
    // Still open: it arrives all the same, whole.
    let deadline = Instant::now() + CONVERGE;
    while !fs::read(b.join("growing.bin")).is_ok_and(|c| c == whole) {
        wa.assert_alive();
        wb.assert_alive();
        assert!(
            Instant::now() < deadline,
            "growing.bin (held open by its writer) did not arrive whole within {CONVERGE:?}; A's log:\n{}",
            wa.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(f);
    // The close starts one more round: it finds nothing new, and nothing else changes.
    fs::write(a.join("after.txt"), "after the close\n").expect("write after.txt");
    wait_for_file(&b.join("after.txt"), "after the close\n", &mut [&mut wa, &mut wb]);
    assert_eq!(read(&b.join("growing.bin")), whole, "B's growing.bin is not the final content");
    let m = mirror(&mut srv);
    assert_eq!(read(&m.join("growing.bin")), whole, "the server's growing.bin is not the final content");
    assert_all_same(&[("A", a), ("B", b)]);
    wa.stop();
    wb.stop();
}
