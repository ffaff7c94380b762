//! Deterministic test trees for deltasync's benchmarks.
//!
//! Included by benches with `#[path = "common/fixtures.rs"] mod fixtures;`. Every byte comes from
//! a seeded xorshift64* generator, so the same scenario at the same scale is the same trees on
//! every machine and run.
//!
//! A [`Scenario`] makes two trees, `base` (what both ends already have) and `new` (what the
//! client has after the change). Files edited between the two get [`EDIT_MTIME`]; every other
//! file keeps [`BASE_MTIME`], so a stat-based scanner (deltasync's, rsync's quick check) sees
//! exactly the edited files as changed.
//!
//! `scale` shrinks totals (file sizes, appended amounts, file and folder counts); the size of one
//! edit (64 KiB overwrite, 1 KiB insert, 100 B scattered edits, 64 B small-file edits) and the
//! 4 KiB small-file size stay as they are. `DELTASYNC_BENCH_SCALE=0.05` gives a quick run.
//!
//! [`copy_tree`] and [`mirror_into`] turn a folder holding `base` into one holding `new` the way a
//! user's edits would: unchanged files are not touched (same inode and mtime), changed ones are
//! rewritten, moved ones are renamed.

// Each bench uses a different part of this module.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use filetime::FileTime;

/// mtime (seconds since the epoch) of every file in `base` and of unchanged files in `new`.
pub const BASE_MTIME: i64 = 1_700_000_000;
/// mtime of files that changed between `base` and `new`: one hour later.
pub const EDIT_MTIME: i64 = BASE_MTIME + 3600;

const MIB: u64 = 1 << 20;
const KIB: u64 = 1 << 10;

/// xorshift64*: small, fast, and good enough for incompressible test data.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        // splitmix64 once, so nearby seeds give unrelated streams and the state is never zero.
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        Rng(if z == 0 { 1 } else { z })
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..n` (`n > 0`); the tiny modulo bias does not matter here.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let last = self.next_u64().to_le_bytes();
        rest.copy_from_slice(&last[..rest.len()]);
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.fill(&mut v);
        v
    }

    fn pick<'a>(&mut self, words: &[&'a str]) -> &'a str {
        words[self.below(words.len() as u64) as usize]
    }
}

/// The benchmark scenarios, each a `base` tree and a `new` tree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    /// 256 MiB random file; 64 KiB overwritten in the middle.
    BigMidEdit,
    /// 256 MiB random file; 1 KiB inserted at one third.
    BigInsert,
    /// 256 MiB random file; 1 MiB appended.
    BigAppend,
    /// 256 MiB random file; 100 edits of 100 B at random offsets.
    BigScattered,
    /// 64 MiB text log; 256 KiB of log lines appended.
    LogAppend,
    /// 256 MiB random file; moved into a subfolder.
    BigRename,
    /// 10,000 × 4 KiB text files in 100 folders; 64 B changed in every 100th file.
    Small1Pct,
    /// Empty; then the 10,000 small files.
    InitialSmall,
    /// Empty; then the 256 MiB file.
    InitialBig,
}

/// Sizes and counts of one scale.
#[derive(Clone, Copy, Debug)]
pub struct Sizes {
    pub big: u64,
    pub big_append: u64,
    pub log: u64,
    pub log_append: u64,
    pub small_files: u64,
    pub small_folders: u64,
    pub small_file_len: u64,
    pub mid_edit: u64,
    pub insert: u64,
    pub scattered_edits: u64,
    pub scattered_len: u64,
    pub small_edit: u64,
    /// Every how many small files one is edited.
    pub small_edit_every: u64,
}

impl Sizes {
    pub fn at(scale: f64) -> Sizes {
        let s = |full: u64, min: u64| ((full as f64 * scale).round() as u64).max(min);
        Sizes {
            big: s(256 * MIB, 256 * KIB),
            big_append: s(MIB, 4 * KIB),
            log: s(64 * MIB, 64 * KIB),
            log_append: s(256 * KIB, 4 * KIB),
            small_files: s(10_000, 1),
            small_folders: s(100, 1),
            small_file_len: 4 * KIB,
            mid_edit: 64 * KIB,
            insert: KIB,
            scattered_edits: 100,
            scattered_len: 100,
            small_edit: 64,
            small_edit_every: 100,
        }
    }

    fn small_edited(&self) -> u64 {
        self.small_files.div_ceil(self.small_edit_every)
    }
}

/// Scale from `DELTASYNC_BENCH_SCALE` (default 1.0).
pub fn scale_from_env() -> f64 {
    std::env::var("DELTASYNC_BENCH_SCALE")
        .ok()
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|s| *s > 0.0 && s.is_finite())
        .unwrap_or(1.0)
}

impl Scenario {
    pub fn all() -> [Scenario; 9] {
        use Scenario::*;
        [
            BigMidEdit,
            BigInsert,
            BigAppend,
            BigScattered,
            LogAppend,
            BigRename,
            Small1Pct,
            InitialSmall,
            InitialBig,
        ]
    }

    pub fn name(self) -> &'static str {
        match self {
            Scenario::BigMidEdit => "big-mid-edit",
            Scenario::BigInsert => "big-insert",
            Scenario::BigAppend => "big-append",
            Scenario::BigScattered => "big-scattered",
            Scenario::LogAppend => "log-append",
            Scenario::BigRename => "big-rename",
            Scenario::Small1Pct => "small-1pct",
            Scenario::InitialSmall => "initial-small",
            Scenario::InitialBig => "initial-big",
        }
    }

    pub fn from_name(name: &str) -> Option<Scenario> {
        Scenario::all().into_iter().find(|s| s.name() == name)
    }

    /// Bytes of content that differ between `base` and `new` (what an ideal delta must carry).
    pub fn changed_bytes(self, scale: f64) -> u64 {
        let z = Sizes::at(scale);
        match self {
            Scenario::BigMidEdit => z.mid_edit.min(z.big),
            Scenario::BigInsert => z.insert,
            Scenario::BigAppend => z.big_append,
            Scenario::BigScattered => z.scattered_edits * z.scattered_len,
            Scenario::LogAppend => z.log_append,
            Scenario::BigRename => 0,
            Scenario::Small1Pct => z.small_edited() * z.small_edit,
            Scenario::InitialSmall => z.small_files * z.small_file_len,
            Scenario::InitialBig => z.big,
        }
    }

    /// Makes `dir/base` and `dir/new` (both created fresh) and returns their paths.
    pub fn generate(self, dir: &Path, scale: f64) -> (PathBuf, PathBuf) {
        self.try_generate(dir, scale)
            .unwrap_or_else(|e| panic!("generating {} in {}: {e}", self.name(), dir.display()))
    }

    pub fn try_generate(self, dir: &Path, scale: f64) -> io::Result<(PathBuf, PathBuf)> {
        let z = Sizes::at(scale);
        let base = dir.join("base");
        let new = dir.join("new");
        for d in [&base, &new] {
            if d.exists() {
                fs::remove_dir_all(d)?;
            }
            fs::create_dir_all(d)?;
        }
        let big = || Rng::new(0xB16).bytes(z.big as usize);
        match self {
            Scenario::BigMidEdit => {
                let mut data = big();
                write_file(&base.join("big.bin"), &data, BASE_MTIME)?;
                let len = z.mid_edit.min(z.big) as usize;
                let at = data.len() / 2 - len / 2;
                Rng::new(1).fill(&mut data[at..at + len]);
                write_file(&new.join("big.bin"), &data, EDIT_MTIME)?;
            }
            Scenario::BigInsert => {
                let mut data = big();
                write_file(&base.join("big.bin"), &data, BASE_MTIME)?;
                let at = data.len() / 3;
                data.splice(at..at, Rng::new(2).bytes(z.insert as usize));
                write_file(&new.join("big.bin"), &data, EDIT_MTIME)?;
            }
            Scenario::BigAppend => {
                let mut data = big();
                write_file(&base.join("big.bin"), &data, BASE_MTIME)?;
                data.extend_from_slice(&Rng::new(3).bytes(z.big_append as usize));
                write_file(&new.join("big.bin"), &data, EDIT_MTIME)?;
            }
            Scenario::BigScattered => {
                let mut data = big();
                write_file(&base.join("big.bin"), &data, BASE_MTIME)?;
                let mut rng = Rng::new(4);
                let n = z.scattered_len as usize;
                for _ in 0..z.scattered_edits {
                    let at = rng.below((data.len() - n) as u64) as usize;
                    rng.fill(&mut data[at..at + n]);
                }
                write_file(&new.join("big.bin"), &data, EDIT_MTIME)?;
            }
            Scenario::LogAppend => {
                let mut log = LogWriter::new(5);
                let mut data = Vec::with_capacity((z.log + z.log_append + 4096) as usize);
                log.lines_until(&mut data, z.log as usize);
                write_file(&base.join("app.log"), &data, BASE_MTIME)?;
                log.lines_until(&mut data, (z.log + z.log_append) as usize);
                write_file(&new.join("app.log"), &data, EDIT_MTIME)?;
            }
            Scenario::BigRename => {
                let data = big();
                write_file(&base.join("big.bin"), &data, BASE_MTIME)?;
                // A move keeps the file's mtime.
                write_file(&new.join("archive").join("big.bin"), &data, BASE_MTIME)?;
            }
            Scenario::Small1Pct => {
                small_files(&z, &base, false)?;
                small_files(&z, &new, true)?;
            }
            Scenario::InitialSmall => {
                small_files(&z, &new, false)?;
            }
            Scenario::InitialBig => {
                write_file(&new.join("big.bin"), &big(), BASE_MTIME)?;
            }
        }
        Ok((base, new))
    }
}

/// Writes `data` to `path` (creating parent folders) and sets its mtime and atime.
pub fn write_file(path: &Path, data: &[u8], mtime: i64) -> io::Result<()> {
    if let Some(p) = path.parent() {
        fs::create_dir_all(p)?;
    }
    let mut f = fs::File::create(path)?;
    f.write_all(data)?;
    drop(f);
    set_mtime(path, mtime)
}

fn set_mtime(path: &Path, secs: i64) -> io::Result<()> {
    let t = FileTime::from_unix_time(secs, 0);
    filetime::set_file_times(path, t, t)
}

const WORDS: &[&str] = &[
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "that",
    "for",
    "it",
    "as",
    "with",
    "was",
    "on",
    "be",
    "by",
    "this",
    "are",
    "from",
    "at",
    "or",
    "an",
    "but",
    "not",
    "which",
    "have",
    "one",
    "all",
    "were",
    "they",
    "their",
    "file",
    "folder",
    "server",
    "client",
    "block",
    "delta",
    "signature",
    "checksum",
    "network",
    "latency",
    "bandwidth",
    "window",
    "offset",
    "literal",
    "match",
    "rolling",
    "hash",
    "version",
    "journal",
    "conflict",
    "rename",
    "upload",
    "download",
    "index",
    "cache",
    "stream",
    "buffer",
    "queue",
    "request",
    "response",
    "account",
    "token",
    "device",
    "meeting",
    "notes",
    "budget",
    "report",
    "quarter",
    "project",
    "draft",
    "review",
    "summary",
    "results",
    "chapter",
    "section",
    "figure",
    "table",
    "appendix",
    "reference",
    "example",
    "quickly",
    "slowly",
    "carefully",
    "usually",
    "rarely",
    "always",
    "never",
    "again",
    "later",
    "before",
    "after",
    "because",
    "although",
    "however",
    "therefore",
    "meanwhile",
    "small",
    "large",
    "new",
    "old",
    "first",
    "last",
    "next",
    "previous",
    "same",
    "different",
];

/// One 4 KiB-ish text file's content: sentences of common words, exactly `len` ASCII bytes.
fn text(rng: &mut Rng, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 64);
    while out.len() < len {
        let words = 6 + rng.below(12);
        for i in 0..words {
            let w = rng.pick(WORDS);
            if i == 0 {
                let mut c = w.chars();
                if let Some(f) = c.next() {
                    out.extend(f.to_uppercase().to_string().bytes());
                    out.extend(c.as_str().bytes());
                }
            } else {
                out.push(b' ');
                out.extend_from_slice(w.as_bytes());
            }
        }
        out.extend_from_slice(if rng.below(5) == 0 { b".\n\n" } else { b". " });
    }
    out.truncate(len);
    if let Some(last) = out.last_mut() {
        *last = b'\n';
    }
    out
}

/// The small-files tree: `d00/f0000.txt` … spread round-robin over the folders. With `edited`,
/// every `small_edit_every`-th file has `small_edit` bytes overwritten by other text.
fn small_files(z: &Sizes, root: &Path, edited: bool) -> io::Result<()> {
    let len = z.small_file_len as usize;
    for i in 0..z.small_files {
        let folder = i % z.small_folders;
        let path = root.join(format!("d{folder:03}")).join(format!("f{i:05}.txt"));
        let mut rng = Rng::new(0x5_0000 + i);
        let mut data = text(&mut rng, len);
        let mut mtime = BASE_MTIME;
        if edited && i % z.small_edit_every == 0 {
            let n = (z.small_edit as usize).min(len);
            let mut erng = Rng::new(0x6_0000 + i);
            let at = erng.below((len - n + 1) as u64) as usize;
            let patch = text(&mut erng, n);
            data[at..at + n].copy_from_slice(&patch);
            mtime = EDIT_MTIME;
        }
        write_file(&path, &data, mtime)?;
    }
    Ok(())
}

/// Generates plausible application log lines with increasing timestamps.
struct LogWriter {
    rng: Rng,
    /// Milliseconds since the epoch.
    now_ms: u64,
    line: String,
}

const RESOURCES: &[&str] =
    &["users", "orders", "items", "invoices", "sessions", "files", "folders", "reports"];
const USERS: &[&str] = &["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy"];
const JOBS: &[&str] = &["compact-journal", "rotate-logs", "send-digest", "reindex", "gc-temp", "backup"];
const ERRORS: &[&str] = &[
    "connection reset by peer",
    "deadline exceeded",
    "database is locked",
    "upstream returned 502",
    "invalid token",
];

impl LogWriter {
    fn new(seed: u64) -> Self {
        LogWriter {
            rng: Rng::new(seed),
            now_ms: 1_709_251_200_000, // 2024-03-01T00:00:00Z
            line: String::with_capacity(256),
        }
    }

    /// Appends whole lines until `out` is at least `len` bytes long.
    fn lines_until(&mut self, out: &mut Vec<u8>, len: usize) {
        while out.len() < len {
            self.next_line();
            out.extend_from_slice(self.line.as_bytes());
        }
    }

    fn next_line(&mut self) {
        use std::fmt::Write as _;
        self.now_ms += self.rng.below(250);
        let r = &mut self.rng;
        let l = &mut self.line;
        l.clear();
        timestamp(l, self.now_ms);
        let worker = r.below(16);
        let req = r.next_u64();
        let _ = match r.below(100) {
            0..=54 => writeln!(
                l,
                " INFO  [http-worker-{worker}] GET /api/v1/{}/{} -> 200 in {}.{}ms ({} bytes) req={req:016x}",
                r.pick(RESOURCES),
                r.below(100_000),
                r.below(80),
                r.below(10),
                200 + r.below(20_000),
            ),
            55..=69 => writeln!(
                l,
                " INFO  [auth] user {} logged in from 203.0.113.{} (session {:08x})",
                r.pick(USERS),
                1 + r.below(254),
                r.next_u64() as u32,
            ),
            70..=89 => writeln!(
                l,
                " DEBUG [db-pool] acquired connection {} after {}us (active={}, idle={})",
                r.below(32),
                r.below(5000),
                r.below(32),
                r.below(32),
            ),
            90..=96 => writeln!(
                l,
                " WARN  [scheduler] job {}#{} took {}.{}s, above its {}s budget",
                r.pick(JOBS),
                r.below(10_000),
                r.below(120),
                r.below(10),
                5 * (1 + r.below(6)),
            ),
            _ => writeln!(
                l,
                " ERROR [http-worker-{worker}] POST /api/v1/{} -> 500: {} req={req:016x}",
                r.pick(RESOURCES),
                r.pick(ERRORS),
            ),
        };
    }
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` for `ms` since the epoch (proleptic Gregorian, UTC).
fn timestamp(out: &mut String, ms: u64) {
    use std::fmt::Write as _;
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = deltasync::sync::conflict::civil_from_days(days);
    let _ = write!(
        out,
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        ms % 1000
    );
}

/// Size and mtime of a file, the quick check of rsync and of deltasync's scanner.
type Stat = (u64, i64);

/// Every regular file under `root` by relative path, skipping top-level names in `skip`.
fn list_files(root: &Path, skip: &[&str]) -> io::Result<BTreeMap<PathBuf, Stat>> {
    fn walk(root: &Path, rel: &Path, skip: &[&str], out: &mut BTreeMap<PathBuf, Stat>) -> io::Result<()> {
        for e in fs::read_dir(root.join(rel))? {
            let e = e?;
            let name = e.file_name();
            if rel.as_os_str().is_empty() && skip.iter().any(|s| name == *s) {
                continue;
            }
            let r = rel.join(&name);
            let md = fs::symlink_metadata(root.join(&r))?;
            if md.is_dir() {
                walk(root, &r, skip, out)?;
            } else if md.is_file() {
                let mt = FileTime::from_last_modification_time(&md).unix_seconds();
                out.insert(r, (md.len(), mt));
            }
        }
        Ok(())
    }
    let mut out = BTreeMap::new();
    walk(root, Path::new(""), skip, &mut out)?;
    Ok(out)
}

/// Copies a file's bytes, permissions and mtime.
fn copy_file(src: &Path, dst: &Path, mtime: i64) -> io::Result<()> {
    if let Some(p) = dst.parent() {
        fs::create_dir_all(p)?;
    }
    fs::copy(src, dst)?;
    set_mtime(dst, mtime)
}

/// Copies the tree `src` into `dst` (created if missing), keeping mtimes.
pub fn copy_tree(src: &Path, dst: &Path) -> io::Result<()> {
    fs::create_dir_all(dst)?;
    for (rel, (_, mtime)) in list_files(src, &[])? {
        copy_file(&src.join(&rel), &dst.join(&rel), mtime)?;
    }
    Ok(())
}

fn same_content(a: &Path, b: &Path) -> io::Result<bool> {
    use std::io::Read;
    let (mut fa, mut fb) = (fs::File::open(a)?, fs::File::open(b)?);
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = fa.read(&mut ba)?;
        if n == 0 {
            return Ok(fb.read(&mut bb[..1])? == 0);
        }
        fb.read_exact(&mut bb[..n])?;
        if ba[..n] != bb[..n] {
            return Ok(false);
        }
    }
}

/// What [`mirror_into`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MirrorStats {
    pub unchanged: u64,
    pub rewritten: u64,
    pub created: u64,
    pub renamed: u64,
    pub deleted: u64,
}

/// Makes `dest` hold the same files as `src`, as a user's edits would, ignoring top-level names
/// in `skip` (such as `.deltasync`) on both sides:
/// - a file with the same size and mtime is left alone (rsync's quick check);
/// - a changed file is rewritten through a temp file and a rename (as editors save);
/// - a file that only moved (same size, mtime and bytes) is renamed, keeping its inode;
/// - new files are copied, gone files deleted, and folders left empty removed.
pub fn mirror_into(src: &Path, dest: &Path, skip: &[&str]) -> io::Result<MirrorStats> {
    let want = list_files(src, skip)?;
    let have = list_files(dest, skip)?;
    let mut extra: Vec<(PathBuf, Stat)> =
        have.iter().filter(|(p, _)| !want.contains_key(*p)).map(|(p, s)| (p.clone(), *s)).collect();
    let mut st = MirrorStats::default();
    for (rel, stat) in &want {
        let (s, d) = (src.join(rel), dest.join(rel));
        match have.get(rel) {
            Some(h) if h == stat => st.unchanged += 1,
            Some(_) => {
                let tmp = d.with_file_name(format!(
                    ".{}.mirror-tmp",
                    rel.file_name().unwrap_or_default().to_string_lossy()
                ));
                copy_file(&s, &tmp, stat.1)?;
                fs::rename(&tmp, &d)?;
                st.rewritten += 1;
            }
            None => {
                let mut moved = None;
                for (i, (old, ostat)) in extra.iter().enumerate() {
                    if ostat == stat && same_content(&dest.join(old), &s)? {
                        moved = Some(i);
                        break;
                    }
                }
                if let Some(i) = moved {
                    let (old, _) = extra.swap_remove(i);
                    if let Some(p) = d.parent() {
                        fs::create_dir_all(p)?;
                    }
                    fs::rename(dest.join(&old), &d)?;
                    prune_empty_parents(dest, &old);
                    st.renamed += 1;
                } else {
                    copy_file(&s, &d, stat.1)?;
                    st.created += 1;
                }
            }
        }
    }
    for (old, _) in extra {
        fs::remove_file(dest.join(&old))?;
        prune_empty_parents(dest, &old);
        st.deleted += 1;
    }
    Ok(st)
}

/// Removes the folders above `rel` that are now empty, up to (not including) `root`.
fn prune_empty_parents(root: &Path, rel: &Path) {
    let mut dir = rel.parent();
    while let Some(d) = dir.filter(|d| !d.as_os_str().is_empty()) {
        if fs::remove_dir(root.join(d)).is_err() {
            break;
        }
        dir = d.parent();
    }
}

/// Total size of the files under `root`.
pub fn tree_size(root: &Path, skip: &[&str]) -> io::Result<u64> {
    Ok(list_files(root, skip)?.values().map(|(l, _)| l).sum())
}
