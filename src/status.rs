//! `deltasync status DIR`: what a folder is synced with and what is waiting, read from the
//! index without taking the folder's lock (a running `watch` holds it; SQLite's WAL lets us read).

use std::fmt::Write as _;
use std::path::Path;

use crate::path::RelPath;
use crate::protocol::Node;
use crate::sync::index::{Index, IndexError};
use crate::sync::{SyncError, describe, guard, input, plan, state_dir};

/// How many recent changes and pending paths to list.
const LIST: usize = 10;

/// `folder`: `status --folder`, checked against the folder DIR is linked to.
pub fn status(root: &Path, folder: Option<&str>) -> Result<String, SyncError> {
    let sd = state_dir(root);
    if !sd.join("index.db").exists() {
        return Err(SyncError::Other(format!(
            "{} has never been synced (no .deltasync/ there); run `deltasync push` or `watch` on it first",
            root.display()
        )));
    }
    let index = Index::open(&sd)?;
    let get = |k: &str| index.setting(k).map(|v| v.unwrap_or_else(|| "-".into()));
    let mut out = String::new();
    let _ = writeln!(out, "Folder:   {}", root.display());
    let trust = match index.setting("fingerprint")?.as_deref() {
        Some("ca") => " (certificate checked against the CA roots)".to_string(),
        Some(fp) => format!(" (fingerprint {fp})"),
        None => String::new(),
    };
    let _ = writeln!(out, "Server:   {}{trust}", get("server")?);
    let _ = writeln!(out, "Account:  {}", get("account")?);
    // An index made before folders existed syncs the account's `default` folder.
    let linked = index.setting("folder")?.unwrap_or_else(|| crate::protocol::DEFAULT_FOLDER.to_string());
    if let Some(f) = folder
        && f != linked
    {
        return Err(SyncError::Linked(format!(
            "{} is linked to folder `{linked}` of its account, not `{f}`; run `deltasync status` without --folder \
             (or with --folder {linked}), or push/pull it with --folder {f} --relink to link it to `{f}`",
            root.display()
        )));
    }
    let _ = writeln!(out, "Server folder: {linked}");
    let _ = writeln!(out, "Device:   {}", get("device")?);
    let last = index.setting("last_sync")?.and_then(|s| s.parse::<u64>().ok());
    let _ = writeln!(
        out,
        "Last sync: {}",
        match last {
            Some(t) => {
                let ago = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs())
                    .saturating_sub(t);
                format!("{ago} s ago")
            }
            None => "never".into(),
        }
    );
    let (base, _) = match input::Base::load(&index, false) {
        Ok(b) => b,
        Err(e @ IndexError::Damaged { .. }) => {
            let _ = writeln!(out, "Index: {e}; the next push, pull or watch rebuilds it (deleting nothing)");
            return Ok(out);
        }
        Err(e) => return Err(e.into()),
    };
    let (s, rules, _) = input::scan(root, &index.stat_cache()?, false, &Default::default())
        .map_err(|err| SyncError::Io { path: root.to_path_buf(), err })?;
    let inputs = input::prepare(&s, &rules, base, &[]);
    let remote = &inputs.remote;
    let mut actions = plan::plan(&inputs.local, remote, &inputs.synced);
    let held = guard::check(&mut actions, &inputs.synced, None, 0);
    let pending: Vec<_> =
        actions.iter().filter(|a| a.is_upload() || matches!(a, plan::Action::Conflict { .. })).collect();
    let _ = writeln!(out, "Pending local changes: {}", pending.len());
    for a in pending.iter().take(LIST) {
        let _ = writeln!(out, "  {}", describe(a));
    }
    if let Some(h) = held {
        let _ = writeln!(out, "Held back: {}", h.message(root));
    }
    for sk in s.skipped.iter().chain(&s.special).take(LIST) {
        let _ = writeln!(out, "Skipped (not readable here; left as it is on both sides): {sk}");
    }
    let conflicts: Vec<&RelPath> = s.nodes.keys().filter(|p| p.file_name().contains(" (conflict ")).collect();
    let _ = writeln!(out, "Conflict copies: {}", conflicts.len());
    for c in conflicts.iter().take(LIST) {
        let _ = writeln!(out, "  {c}");
    }
    let mut recent: Vec<_> = remote.values().collect();
    recent.sort_by_key(|e| std::cmp::Reverse(e.rev));
    let _ = writeln!(out, "Recent changes on the server (as last seen):");
    for e in recent.iter().take(LIST) {
        let what = match &e.node {
            None => "deleted",
            Some(Node::File { .. }) => "file",
            Some(Node::Dir { .. }) => "dir",
            Some(Node::Symlink { .. }) => "link",
        };
        let _ = writeln!(out, "  rev {:>6}  {what:<7} {}  by {}", e.rev, e.path, e.device);
    }
    Ok(out)
}
