//! The client's side of history: `deltasync log`, `restore` and `undo`.
//!
//! The server keeps the versions; these commands ask it. `log` and `restore --to DEST` only read:
//! they connect with the folder's remembered server, token and device ([`connect`]) without
//! taking the folder's lock (a running `watch` does not stop them) and never touch the folder.
//! `restore` without `--to` and `undo` make the server commit the old state as new changes
//! ([`restore`], [`undo`]); the binary then runs one pull round, under the folder's lock, exactly
//! as `deltasync pull DIR` does, so the result lands here.
//!
//! `restore --to` lists the state at the point ([`snapshot`], `Request::Snapshot` in pages) and
//! fetches each file's version whole (`Request::GetVersion`, pipelined) into `DEST/<path>`:
//! temp file → verified (xxh3-128 and size) → mode and mtime → made durable → renamed into place;
//! never through a symlink, never outside `DEST`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use crate::client::{Client, ClientError, MAX_CHANGE_ENTRIES, describe, recv_reply};
use crate::delta::Applier;
use crate::fsutil::{self, TempGuard};
use crate::hash::ContentHash;
use crate::path::{RelPath, STATE_DIR};
use crate::protocol::*;
use crate::sync::index::{Index, IndexError};
use crate::sync::{DEFAULT_SERVER, SyncError, hostname, state_dir};

#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    /// The command line asks for something impossible (exit code 2).
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Sync(#[from] SyncError),
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error("{}: {err}", path.display())]
    Io { path: PathBuf, err: std::io::Error },
    #[error("{0}")]
    Other(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> HistoryError + '_ {
    move |err| HistoryError::Io { path: path.to_path_buf(), err }
}

/// `revision 7` or `2026-11-30T14:05:00Z`, for messages.
pub fn describe_point(at: At) -> String {
    match at {
        At::Rev(r) => format!("revision {r}"),
        At::Time(t) => crate::when::format_rfc3339(t),
    }
}

/// A path, or `.` for the whole folder, for messages.
pub fn describe_target(t: &Option<RelPath>) -> String {
    t.as_ref().map_or_else(|| ".".to_string(), RelPath::to_string)
}

// ---------------------------------------------------------------------------------------------
// Paths on the command line

/// A PATH argument of `log` or `restore` as a path in the folder (`None`: the whole folder).
/// Relative paths are relative to the folder's root (`docs/a.txt`; `.` is the whole folder); an
/// absolute path must lie inside `dir` (`restore ~/sync ~/sync/docs/a.txt`).
pub fn target(dir: &Path, arg: &Path) -> Result<Option<RelPath>, HistoryError> {
    let how = "give a path relative to the folder (like docs/a.txt), or `.` for the whole folder";
    if arg.is_absolute() {
        let mut bases = Vec::new();
        if let Ok(d) = std::path::absolute(dir) {
            bases.push(d);
        }
        if let Ok(d) = dir.canonicalize() {
            bases.push(d);
        }
        for base in &bases {
            if let Ok(rest) = arg.strip_prefix(base) {
                let s = rest.to_str().ok_or_else(|| {
                    HistoryError::Usage(format!("`{}` is not valid UTF-8; {how}", arg.display()))
                })?;
                return relative(s, how);
            }
        }
        return Err(HistoryError::Usage(format!(
            "`{}` is not inside the folder {}; {how}",
            arg.display(),
            dir.display()
        )));
    }
    let s = arg
        .to_str()
        .ok_or_else(|| HistoryError::Usage(format!("`{}` is not valid UTF-8; {how}", arg.display())))?;
    relative(s, how)
}

fn relative(s: &str, how: &str) -> Result<Option<RelPath>, HistoryError> {
    let mut t = s;
    while let Some(rest) = t.strip_prefix("./") {
        t = rest.trim_start_matches('/');
    }
    let t = t.trim_end_matches('/');
    if t.is_empty() || t == "." {
        return Ok(None);
    }
    RelPath::new(t).map(Some).map_err(|e| HistoryError::Usage(format!("{e}; {how}")))
}

/// The PATH arguments as targets: duplicates dropped; `.` among them means only the whole folder.
pub fn targets(dir: &Path, args: &[PathBuf]) -> Result<Vec<Option<RelPath>>, HistoryError> {
    let mut out: Vec<Option<RelPath>> = Vec::new();
    for a in args {
        let t = target(dir, a)?;
        if t.is_none() {
            return Ok(vec![None]);
        }
        if !out.contains(&t) {
            out.push(t);
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// The folder's connection

/// Errors unless `dir` was synced before (it has `.deltasync/index.db`).
pub fn require_synced(dir: &Path) -> Result<(), HistoryError> {
    if state_dir(dir).join("index.db").is_file() {
        return Ok(());
    }
    let why = if dir.is_dir() { "has never been synced (no .deltasync/ there)" } else { "is not a folder" };
    Err(HistoryError::Other(format!(
        "{} {why}; history commands work on a synced folder: run `deltasync pull {} --server ADDR --token TOKEN` \
         (or push) on it first",
        dir.display(),
        dir.display()
    )))
}

/// What a folder remembers of its server.
#[derive(Debug, Clone)]
pub struct Remembered {
    pub server: String,
    pub token: Option<String>,
    pub device: String,
    pub account: Option<String>,
    /// The account's folder it syncs with (`default` for an index of a version before folders).
    pub folder: String,
    pub server_id: Option<String>,
    /// The server's certificate, as trusted at the last sync (`fingerprint` setting).
    pub trust: crate::transport::Trust,
}

/// Reads the folder's remembered server, token, device and account, without its lock.
pub fn remembered(dir: &Path) -> Result<Remembered, HistoryError> {
    require_synced(dir)?;
    let index = Index::open(&state_dir(dir))?;
    Ok(Remembered {
        server: index.setting("server")?.unwrap_or_else(|| DEFAULT_SERVER.to_string()),
        token: index.setting("token")?,
        device: index.setting("device")?.unwrap_or_else(hostname),
        account: index.setting("account")?,
        folder: index.setting("folder")?.unwrap_or_else(|| crate::protocol::DEFAULT_FOLDER.to_string()),
        server_id: index.setting("server_id")?,
        trust: crate::transport::Trust::from_setting(index.setting("fingerprint")?.as_deref()),
    })
}

/// Connects with the folder's remembered server and token, as its device, without taking the
/// folder's lock. Also returns a note when the server or account is not the one the folder last
/// synced with.
pub async fn connect(dir: &Path) -> Result<(Client, Option<String>), HistoryError> {
    let r = remembered(dir)?;
    let Some(token) = r.token.as_deref() else {
        return Err(HistoryError::Other(format!(
            "{} has no remembered token (it never connected successfully); run `deltasync pull {} --server {} \
             --token TOKEN` once",
            dir.display(),
            dir.display(),
            r.server
        )));
    };
    let client = Client::connect(&crate::client::Connect {
        addr: &r.server,
        token: Some(token),
        device: &r.device,
        folder: &r.folder,
        trust: r.trust.clone(),
        from_flag: false,
        timeout: crate::client::CONNECT_TIMEOUT,
        bwlimit: Default::default(),
    })
    .await?;
    let mut note = None;
    if r.account.as_deref().is_some_and(|a| a != client.account) {
        note = Some(format!(
            "note: the token remembered for {} now belongs to account `{}`, not `{}` as at the last sync",
            dir.display(),
            client.account,
            r.account.as_deref().unwrap_or("-")
        ));
    } else if r.server_id.as_deref().is_some_and(|id| id != hex::encode(client.server_id)) {
        note = Some(format!(
            "note: the server at {} is not the one {} last synced with (its identity changed); showing its history",
            r.server,
            dir.display()
        ));
    }
    Ok((client, note))
}

fn wrong_reply(got: &ServerMsg, what: &str) -> ClientError {
    ClientError::Unexpected(format!("{} in answer to {what}", describe(got)))
}

// ---------------------------------------------------------------------------------------------
// log

/// One `Log` request: versions newest first, and whether there are more than `limit`.
pub async fn log(
    client: &mut Client,
    path: Option<RelPath>,
    deleted: bool,
    limit: u32,
) -> Result<(Vec<Version>, bool), HistoryError> {
    let limit = limit.clamp(1, MAX_LOG);
    match client.call(Request::Log { path: path.clone(), deleted, limit }).await? {
        Reply::Log { versions, more } => {
            if versions.len() > limit as usize {
                return Err(ClientError::Unexpected(format!(
                    "the server sent {} versions where {limit} were asked for; refusing them (a broken or \
                     malicious server?)",
                    versions.len()
                ))
                .into());
            }
            if let Some(p) = &path
                && !deleted
                && let Some(v) = versions.iter().find(|v| !inside(&v.path, p))
            {
                return Err(ClientError::Unexpected(format!(
                    "asked for the history of `{p}`, the server listed `{}`; refusing it (a broken or malicious \
                     server?)",
                    v.path
                ))
                .into());
            }
            Ok((versions, more))
        }
        other => Err(wrong_reply(&ServerMsg::Resp { id: 0, result: Ok(other) }, "a history request").into()),
    }
}

/// `path` is `top` or lies under it.
fn inside(path: &RelPath, top: &RelPath) -> bool {
    let (p, t) = (path.as_str(), top.as_str());
    p == t || (p.len() > t.len() && p.starts_with(t) && p.as_bytes()[t.len()] == b'/')
}

/// `file`, `dir`, `symlink` or `deleted`.
pub fn kind(node: &Option<Node>) -> &'static str {
    match node {
        Some(Node::File { .. }) => "file",
        Some(Node::Dir { .. }) => "dir",
        Some(Node::Symlink { .. }) => "symlink",
        None => "deleted",
    }
}

/// One version as a JSON object on one line: `rev`, `time` (RFC 3339, UTC), `unix_time`,
/// `device`, `op`, `path`, `kind` (file/dir/symlink/deleted), `size` and `hash` (hex of the
/// 16-byte xxh3; both null for anything but a file), `mode` (null for links and deletes),
/// `mtime_ns` (files only) and `target` (links only).
pub fn json_line(v: &Version) -> String {
    let null = || "null".to_string();
    let (size, hash, mode, mtime, target) = match &v.node {
        Some(Node::File { hash, size, meta }) => (
            size.to_string(),
            json_str(&hash.to_hex()),
            (meta.mode & 0o7777).to_string(),
            meta.mtime_ns.to_string(),
            null(),
        ),
        Some(Node::Dir { mode }) => (null(), null(), (mode & 0o7777).to_string(), null(), null()),
        Some(Node::Symlink { target }) => (null(), null(), null(), null(), json_str(target)),
        None => (null(), null(), null(), null(), null()),
    };
    format!(
        "{{\"rev\":{},\"time\":{},\"unix_time\":{},\"device\":{},\"op\":{},\"path\":{},\"kind\":{},\"size\":{size},\
         \"hash\":{hash},\"mode\":{mode},\"mtime_ns\":{mtime},\"target\":{target}}}",
        v.rev,
        json_str(&crate::when::format_rfc3339(v.time)),
        v.time,
        json_str(&v.device),
        json_str(&v.op),
        json_str(v.path.as_str()),
        json_str(kind(&v.node)),
    )
}

/// A JSON string literal.
pub fn json_str(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            '\r' => o.push_str("\\r"),
            '\t' => o.push_str("\\t"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                let _ = write!(o, "\\u{:04x}", c as u32);
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

/// The versions as aligned lines under a header: revision, time (UTC), device, operation, kind,
/// size, the hash's first 16 hex digits, path (and a link's target).
pub fn table(versions: &[Version]) -> String {
    let header = ["REV", "TIME", "DEVICE", "OP", "KIND", "SIZE", "HASH", "PATH"];
    let mut rows: Vec<[String; 8]> = vec![header.map(String::from)];
    for v in versions {
        let (size, hash) = match &v.node {
            Some(Node::File { hash, size, .. }) => {
                (crate::sync::report::human(*size), hash.to_hex().chars().take(16).collect())
            }
            _ => ("-".to_string(), "-".to_string()),
        };
        let path = match &v.node {
            Some(Node::Symlink { target }) => format!("{} -> {target}", v.path),
            _ => v.path.to_string(),
        };
        rows.push([
            v.rev.to_string(),
            crate::when::format_rfc3339(v.time),
            v.device.clone(),
            v.op.clone(),
            kind(&v.node).to_string(),
            size,
            hash,
            path,
        ]);
    }
    let mut width = [0usize; 8];
    for r in &rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    for r in &rows {
        let _ = writeln!(
            out,
            "{:>w0$}  {:<w1$}  {:<w2$}  {:<w3$}  {:<w4$}  {:>w5$}  {:<w6$}  {}",
            r[0],
            r[1],
            r[2],
            r[3],
            r[4],
            r[5],
            r[6],
            r[7],
            w0 = width[0],
            w1 = width[1],
            w2 = width[2],
            w3 = width[3],
            w4 = width[4],
            w5 = width[5],
            w6 = width[6],
        );
    }
    out
}

// ---------------------------------------------------------------------------------------------
// restore and undo on the server

/// What a restore or an undo changed on the server.
#[derive(Debug, Clone, Default)]
pub struct Reverted {
    /// The revision of its last change (0: nothing changed).
    pub rev: u64,
    pub changed: Vec<RelPath>,
    pub skipped: Vec<RelPath>,
}

fn reverted(reply: Reply, what: &str) -> Result<Reverted, HistoryError> {
    match reply {
        Reply::Reverted { rev, changed, skipped } => Ok(Reverted { rev, changed, skipped }),
        other => Err(wrong_reply(&ServerMsg::Resp { id: 0, result: Ok(other) }, what).into()),
    }
}

/// Makes the server commit `path` (`None`: the whole folder) as it was at `at`, as new changes.
pub async fn restore(client: &mut Client, path: Option<RelPath>, at: At) -> Result<Reverted, HistoryError> {
    let what = format!("the restore of {}", describe_target(&path));
    let r = reverted(client.call(Request::Restore { path: path.clone(), at }).await?, &what)?;
    if let Some(top) = &path
        && let Some(p) = r.changed.iter().find(|p| !inside(p, top))
    {
        return Err(ClientError::Unexpected(format!(
            "the server says the restore of `{top}` changed `{p}`, which is outside it (a broken server?); \
             see `deltasync log` and report it"
        ))
        .into());
    }
    Ok(r)
}

/// Makes the server revert every change `device` made at or after `since` (Unix seconds).
pub async fn undo(client: &mut Client, device: &str, since: i64) -> Result<Reverted, HistoryError> {
    reverted(client.call(Request::Undo { device: device.to_string(), since }).await?, "the undo")
}

// ---------------------------------------------------------------------------------------------
// restore --to DEST

/// The state of `path` (`None`: the whole folder) at `at`, every page of it, in path order.
pub async fn snapshot(
    client: &mut Client,
    path: Option<&RelPath>,
    at: At,
) -> Result<Vec<Version>, HistoryError> {
    let mut all: Vec<Version> = Vec::new();
    let mut after: Option<RelPath> = None;
    let refuse = |why: String| -> HistoryError {
        ClientError::Unexpected(format!(
            "the server's list of {} at {} {why}; refusing it (a broken or malicious server?)",
            describe_target(&path.cloned()),
            describe_point(at)
        ))
        .into()
    };
    loop {
        let req = Request::Snapshot { path: path.cloned(), at, after: after.clone() };
        let (versions, more) = match client.call(req).await? {
            Reply::Snapshot { versions, more } => (versions, more),
            other => {
                return Err(
                    wrong_reply(&ServerMsg::Resp { id: 0, result: Ok(other) }, "a snapshot request").into()
                );
            }
        };
        if more && versions.is_empty() {
            return Err(refuse("has an empty page that announces more".into()));
        }
        for v in versions {
            if let Some(top) = path
                && !inside(&v.path, top)
            {
                return Err(refuse(format!("holds `{}`, which is outside it", v.path)));
            }
            if after.as_ref().is_some_and(|a| v.path <= *a) {
                return Err(refuse(format!("is not in path order (`{}`)", v.path)));
            }
            after = Some(v.path.clone());
            if v.node.is_some() {
                all.push(v);
            }
            if all.len() > MAX_CHANGE_ENTRIES {
                return Err(refuse(format!("holds more than {MAX_CHANGE_ENTRIES} paths")));
            }
        }
        if !more {
            return Ok(all);
        }
    }
}

/// What `restore --to` wrote.
#[derive(Debug, Default)]
pub struct Written {
    pub files: u64,
    pub dirs: u64,
    pub links: u64,
    pub bytes: u64,
    /// One line per path that could not be written (the others were).
    pub errors: Vec<String>,
}

/// Downloads in full, waiting to be made durable together.
const READY_FILES: usize = 256;
const READY_BYTES: u64 = 64 << 20;

/// Writes `targets` as they were at `at` under `dest` (made if missing): `DEST/<path>` for every
/// path, files verified, modes and mtimes set, each write temp → durable → rename. The synced
/// folder is not touched.
pub async fn restore_to(
    client: &mut Client,
    dir: &Path,
    targets: &[Option<RelPath>],
    at: At,
    dest: &Path,
) -> Result<Written, HistoryError> {
    check_dest(dir, dest)?;
    let mut want: BTreeMap<RelPath, Version> = BTreeMap::new();
    let mut written = Written::default();
    for t in targets {
        let versions = snapshot(client, t.as_ref(), at).await?;
        if versions.is_empty() {
            written.errors.push(match t {
                Some(p) => {
                    format!("{p}: did not exist at {}; see `deltasync log DIR {p}`", describe_point(at))
                }
                None => format!("the folder was empty at {}", describe_point(at)),
            });
        }
        want.extend(versions.into_iter().map(|v| (v.path.clone(), v)));
    }
    std::fs::create_dir_all(dest).map_err(io_err(dest))?;
    let dest = dest.canonicalize().map_err(io_err(dest))?;

    let mut dirs: Vec<(RelPath, u32)> = Vec::new();
    let mut files: Vec<Version> = Vec::new();
    let mut touched: std::collections::BTreeSet<PathBuf> = Default::default();
    for v in want.into_values() {
        match &v.node {
            Some(Node::Dir { mode }) => match make_dir(&dest, &v.path) {
                Ok(()) => {
                    written.dirs += 1;
                    dirs.push((v.path.clone(), *mode));
                    touched.insert(parent_of(&dest, &v.path));
                }
                Err(e) => written.errors.push(format!("{}: {e}", v.path)),
            },
            Some(Node::Symlink { target }) => match make_link(&dest, &v.path, target) {
                Ok(()) => {
                    written.links += 1;
                    touched.insert(parent_of(&dest, &v.path));
                }
                Err(e) => written.errors.push(format!("{}: {e}", v.path)),
            },
            Some(Node::File { .. }) => files.push(v),
            None => {}
        }
    }
    fetch_files(client, &dest, files, &mut written, &mut touched).await?;
    // Modes last and deepest first, so a read-only folder was still writable while filled.
    dirs.sort_by_key(|(p, _)| std::cmp::Reverse(p.depth()));
    for (p, mode) in &dirs {
        let full = p.under(&dest);
        let r = match std::fs::symlink_metadata(&full) {
            Ok(md) if md.is_dir() => fsutil::set_mode(&full, *mode),
            Ok(_) => Ok(()),
            Err(e) => Err(e),
        };
        if let Err(e) = r {
            written.errors.push(format!("{p}: cannot set its mode: {e}"));
        }
        touched.insert(full);
    }
    let touched: Vec<PathBuf> = touched.into_iter().collect();
    for (d, r) in touched.iter().zip(fsutil::make_durable(&touched)) {
        if let Err(e) = r {
            written.errors.push(format!("{}: cannot make it durable: {e}", d.display()));
        }
    }
    Ok(written)
}

/// `restore --to` writes beside the synced folder, never over it.
pub fn check_dest(dir: &Path, dest: &Path) -> Result<(), HistoryError> {
    let (Ok(root), Ok(d)) = (dir.canonicalize(), std::path::absolute(dest)) else { return Ok(()) };
    let d = d.canonicalize().unwrap_or(d);
    if d == root {
        return Err(HistoryError::Usage(format!(
            "--to {} is the synced folder itself; to bring the old state back into it, run the restore without --to",
            dest.display()
        )));
    }
    if d.starts_with(root.join(STATE_DIR)) {
        return Err(HistoryError::Usage(format!(
            "--to {} is inside deltasync's own {STATE_DIR}/ folder; choose another folder",
            dest.display()
        )));
    }
    Ok(())
}

fn parent_of(dest: &Path, p: &RelPath) -> PathBuf {
    p.parent().map_or_else(|| dest.to_path_buf(), |q| q.under(dest))
}

/// Makes `dest/p` a directory (and its parents), through no symlink.
fn make_dir(dest: &Path, p: &RelPath) -> std::io::Result<()> {
    fsutil::ensure_dirs(dest, p)?;
    let full = p.under(dest);
    match std::fs::symlink_metadata(&full) {
        Ok(md) if md.is_dir() => Ok(()),
        Ok(_) => Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            format!(
                "{} is already there and is not a folder; move it away or choose another --to",
                full.display()
            ),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::create_dir(&full),
        Err(e) => Err(e),
    }
}

/// Where `p` goes under `dest`, its folders made (never through a symlink); an existing folder
/// there is not replaced.
fn place_for(dest: &Path, p: &RelPath) -> std::io::Result<PathBuf> {
    fsutil::ensure_dirs(dest, p)?;
    let full = p.under(dest);
    if std::fs::symlink_metadata(&full).is_ok_and(|md| md.is_dir()) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            format!("{} is a folder; move it away or choose another --to", full.display()),
        ));
    }
    Ok(full)
}

/// Makes `dest/p` a symlink to `target` (made beside it, then renamed over whatever non-folder
/// is there); the link itself is never followed.
fn make_link(dest: &Path, p: &RelPath, target: &str) -> std::io::Result<()> {
    let full = place_for(dest, p)?;
    let tmp = fsutil::temp_path(&parent_of(dest, p));
    std::os::unix::fs::symlink(target, &tmp)?;
    let guard = TempGuard::new(tmp);
    std::fs::rename(guard.path(), &full)?;
    guard.keep();
    Ok(())
}

/// A file being received into a temp file beside its destination.
struct Incoming {
    ap: Applier<&'static [u8], BufWriter<fsutil::WriteBehind>>,
    tmp: TempGuard,
    full: PathBuf,
}

impl Incoming {
    fn start(dest: &Path, p: &RelPath, size: u64) -> std::io::Result<Incoming> {
        let full = place_for(dest, p)?;
        let (file, t) = fsutil::create_temp(&parent_of(dest, p))?;
        let tmp = TempGuard::new(t);
        let out = BufWriter::with_capacity(1 << 20, fsutil::WriteBehind::new(file));
        // No base: the content comes whole.
        Ok(Incoming { ap: Applier::new(&[], out, size), tmp, full })
    }

    /// Verifies what was written against the version's hash and size and sets mode and mtime.
    fn finish(self, hash: ContentHash, size: u64, meta: Meta) -> Result<(TempGuard, PathBuf), String> {
        let done = self.ap.finish().map_err(|e| e.to_string())?;
        if done.hash != hash || done.len != size {
            return Err(format!(
                "the content the server sent did not verify ({} bytes with hash {}, expected {size} bytes with \
                 hash {}); run the restore again",
                done.len,
                done.hash.to_hex(),
                hash.to_hex()
            ));
        }
        let file = done.out.into_inner().map_err(|e| e.error().to_string())?.into_inner();
        fsutil::set_file_meta(&file, meta.mode, meta.mtime_ns).map_err(|e| e.to_string())?;
        Ok((self.tmp, self.full))
    }
}

/// Fetches every file's version (`GetVersion`, all requests sent ahead while the answers are
/// read) into `dest`.
async fn fetch_files(
    client: &mut Client,
    dest: &Path,
    files: Vec<Version>,
    written: &mut Written,
    touched: &mut std::collections::BTreeSet<PathBuf>,
) -> Result<(), HistoryError> {
    if files.is_empty() {
        return Ok(());
    }
    let ids: Vec<u64> = files.iter().map(|_| client.next_id()).collect();
    let Client { rd, wr, notified, counters, .. } = client;
    let send = async {
        for (v, id) in files.iter().zip(&ids) {
            let req = Request::GetVersion { path: v.path.clone(), rev: v.rev };
            wr.feed(&ClientMsg::Req { id: *id, req }).await.map_err(ClientError::from)?;
        }
        wr.flush().await.map_err(ClientError::from)?;
        Ok::<(), HistoryError>(())
    };
    let receive = async {
        let mut ready: Vec<(TempGuard, PathBuf, u64)> = Vec::new();
        let mut ready_bytes = 0u64;
        for (v, &id) in files.iter().zip(&ids) {
            let Some(Node::File { hash, size, meta }) = v.node.clone() else { continue };
            let what = format!("the download of `{}` at revision {}", v.path, v.rev);
            let msg = recv_reply(rd, notified, counters).await?;
            let got = match msg {
                ServerMsg::Resp { id: i, result: Ok(Reply::File { entry, base }) } if i == id => {
                    if entry.path != v.path || base.is_some() {
                        return Err(ClientError::Unexpected(format!(
                            "asked for `{}` at revision {} whole, the server sent `{}`{}; refusing it and stopping \
                             (a broken or malicious server?)",
                            v.path,
                            v.rev,
                            entry.path,
                            if base.is_some() { " as a delta" } else { "" }
                        ))
                        .into());
                    }
                    entry
                }
                ServerMsg::Resp { id: i, result: Err(r) } if i == id => {
                    written.errors.push(format!("{}: the server refused: {}", v.path, r.message));
                    continue;
                }
                other => return Err(wrong_reply(&other, &what).into()),
            };
            let mut incoming = match &got.node {
                Some(Node::File { hash: h, size: s, .. }) if *h == hash && *s == size => {
                    Incoming::start(dest, &v.path, size).map_err(|e| e.to_string())
                }
                other => Err(format!(
                    "the server sent another version ({other:?}) than its snapshot listed; run the restore again"
                )),
            };
            loop {
                match recv_reply(rd, notified, counters).await? {
                    ServerMsg::Data { id: i, block } if i == id => {
                        if let Ok(inc) = &mut incoming
                            && let Err(e) = inc.ap.block(&block)
                        {
                            incoming = Err(e.to_string());
                        }
                    }
                    ServerMsg::End { id: i } if i == id => break,
                    other => return Err(wrong_reply(&other, &what).into()),
                }
            }
            match incoming.and_then(|inc| inc.finish(hash, size, meta)) {
                Ok((tmp, full)) => {
                    ready_bytes += size;
                    ready.push((tmp, full, size));
                    if ready.len() >= READY_FILES || ready_bytes >= READY_BYTES {
                        place(std::mem::take(&mut ready), written, touched);
                        ready_bytes = 0;
                    }
                }
                Err(e) => written.errors.push(format!("{}: {e}", v.path)),
            }
        }
        place(ready, written, touched);
        Ok::<(), HistoryError>(())
    };
    tokio::try_join!(send, receive)?;
    Ok(())
}

/// Makes the received temp files durable together, then renames each into place.
fn place(
    ready: Vec<(TempGuard, PathBuf, u64)>,
    written: &mut Written,
    touched: &mut std::collections::BTreeSet<PathBuf>,
) {
    let temps: Vec<PathBuf> = ready.iter().map(|(t, _, _)| t.path().to_path_buf()).collect();
    for ((tmp, full, size), synced) in ready.into_iter().zip(fsutil::make_durable(&temps)) {
        let r = synced.and_then(|()| std::fs::rename(tmp.path(), &full));
        match r {
            Ok(()) => {
                tmp.keep();
                written.files += 1;
                written.bytes += size;
                if let Some(p) = full.parent() {
                    touched.insert(p.to_path_buf());
                }
            }
            Err(e) => written.errors.push(format!("{}: {e}", full.display())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::ContentHash;

    #[test]
    fn targets_are_folder_relative_or_absolute_inside_the_folder() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        let t = |s: &str| target(dir, Path::new(s));
        assert_eq!(t("docs/a.txt").unwrap(), Some(RelPath::new("docs/a.txt").unwrap()));
        assert_eq!(t("./docs/").unwrap(), Some(RelPath::new("docs").unwrap()));
        assert_eq!(t(".").unwrap(), None);
        assert_eq!(t("./").unwrap(), None);
        let abs = dir.join("docs/a.txt");
        assert_eq!(target(dir, &abs).unwrap(), Some(RelPath::new("docs/a.txt").unwrap()));
        assert_eq!(target(dir, dir).unwrap(), None);
        for bad in ["../x", "a/../../b", ".deltasync/index.db", "/etc/passwd"] {
            assert!(matches!(t(bad), Err(HistoryError::Usage(_))), "{bad}");
        }
        let all = targets(dir, &[PathBuf::from("a"), PathBuf::from("a"), PathBuf::from("b")]).unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(targets(dir, &[PathBuf::from("a"), PathBuf::from(".")]).unwrap(), vec![None]);
    }

    #[test]
    fn json_lines_escape_and_carry_every_field() {
        let v = Version {
            path: RelPath::new("we\"ird\\name\n.txt").unwrap(),
            rev: 7,
            time: 1_796_040_000,
            device: "lap\ttop".into(),
            op: "write".into(),
            node: Some(Node::File {
                hash: ContentHash::of(b"x"),
                size: 1,
                meta: Meta { mtime_ns: 5, mode: 0o644 },
            }),
        };
        let line = json_line(&v);
        assert!(!line.contains('\n'));
        assert!(line.contains(r#""path":"we\"ird\\name\n.txt""#), "{line}");
        assert!(line.contains(r#""device":"lap\ttop""#), "{line}");
        assert!(line.contains(&format!("\"hash\":\"{}\"", ContentHash::of(b"x").to_hex())), "{line}");
        assert!(line.contains(r#""time":"2026-11-30T"#), "{line}");
        assert!(line.contains(r#""kind":"file","size":1"#), "{line}");
        let gone = Version { node: None, ..v };
        let line = json_line(&gone);
        assert!(line.contains(r#""kind":"deleted","size":null,"hash":null"#), "{line}");
        assert_eq!(json_str("\u{1}"), "\"\\u0001\"");
    }

    #[test]
    fn the_table_is_aligned() {
        let v = |rev, path: &str, node| Version {
            path: RelPath::new(path).unwrap(),
            rev,
            time: 0,
            device: "d".into(),
            op: "write".into(),
            node,
        };
        let file = Some(Node::File {
            hash: ContentHash::of(b"x"),
            size: 123_456,
            meta: Meta { mtime_ns: 0, mode: 0 },
        });
        let t = table(&[
            v(10, "a", file),
            v(9, "b", None),
            v(8, "l", Some(Node::Symlink { target: "a".into() })),
        ]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4);
        let col = |l: &str| l.find("1970").unwrap();
        assert!(lines.iter().skip(1).all(|l| col(l) == col(lines[1])), "{t}");
        assert!(lines[3].ends_with("l -> a"), "{t}");
        assert!(lines[2].contains("deleted"), "{t}");
    }

    #[test]
    fn inside_means_the_path_or_below_it() {
        let p = |s: &str| RelPath::new(s).unwrap();
        assert!(inside(&p("a"), &p("a")));
        assert!(inside(&p("a/b"), &p("a")));
        assert!(!inside(&p("ab"), &p("a")));
        assert!(!inside(&p("a-b/c"), &p("a")));
    }
}
