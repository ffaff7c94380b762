//! Server-side history tools that work on a data folder directly (also while the server runs):
//! `deltasync export` and `deltasync prune`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::batch::failpoint;
use super::content::Reader;
use super::meta::Metadata;
use super::store::ChunkStore;
use crate::delta::Source;
use crate::fsutil;
use crate::hash::Hasher;
use crate::path::RelPath;
use crate::protocol::{At, MAX_LOG, Node};

use super::ServerError;
use super::retention::Keep;

/// What an export wrote.
#[derive(Debug, Default, Clone, Copy)]
pub struct ExportSummary {
    pub files: u64,
    pub dirs: u64,
    pub links: u64,
    pub bytes: u64,
}

/// Writes account `account`'s files as plain files under `dest` (made if missing; it must be
/// empty), as they are now or, with `at` (Unix seconds), as they were then.
pub fn export(
    data_dir: &Path,
    account: &str,
    dest: &Path,
    at: Option<i64>,
) -> Result<ExportSummary, ServerError> {
    let fail = |e: &dyn std::fmt::Display| ServerError::History(e.to_string());
    if !data_dir.join("deltasync.db").exists() {
        return Err(ServerError::History(format!(
            "{} is not a deltasync data folder (no deltasync.db in it); give the folder `serve --data` uses",
            data_dir.display()
        )));
    }
    let (meta, chunks) = super::open_data(data_dir)?;
    let Some(id) =
        meta.list_accounts().map_err(|e| fail(&e))?.into_iter().find(|a| a.account.name == account)
    else {
        return Err(ServerError::History(format!(
            "no account named `{account}` in {}; see `deltasync account list --data {}`",
            data_dir.display(),
            data_dir.display()
        )));
    };
    let id = id.account.id;
    std::fs::create_dir_all(dest).map_err(|e| fail(&format!("cannot make {}: {e}", dest.display())))?;
    if std::fs::read_dir(dest)
        .map_err(|e| fail(&format!("cannot read {}: {e}", dest.display())))?
        .next()
        .is_some()
    {
        return Err(ServerError::History(format!(
            "{} is not empty; export into a new or empty folder",
            dest.display()
        )));
    }
    let rev = match at {
        Some(t) => meta.rev_at(id, At::Time(t)).map_err(|e| fail(&e))?,
        None => meta.seq(id).map_err(|e| fail(&e))?,
    };
    let mut sum = ExportSummary::default();
    let mut after: Option<RelPath> = None;
    let mut dirs: Vec<(PathBuf, u32)> = Vec::new();
    loop {
        let page = meta.snapshot(id, None, rev, after.as_ref(), MAX_LOG).map_err(|e| fail(&e))?;
        let more = page.len() as u32 >= MAX_LOG;
        after = page.last().map(|v| v.path.clone());
        for v in page {
            let target = v.path.under(dest);
            let wrote = (|| -> Result<(), String> {
                match &v.node {
                    Some(Node::Dir { mode }) => {
                        std::fs::create_dir_all(&target).map_err(|e| e.to_string())?;
                        dirs.push((target.clone(), *mode));
                        sum.dirs += 1;
                    }
                    Some(Node::Symlink { target: to }) => {
                        std::os::unix::fs::symlink(to, &target).map_err(|e| e.to_string())?;
                        sum.links += 1;
                    }
                    Some(Node::File { hash, size, meta: m }) => {
                        let Some((n, locs)) = meta.content(id, hash).map_err(|e| e.to_string())? else {
                            return Err("its content is not kept any more".into());
                        };
                        if n != *size {
                            return Err("its stored content has the wrong size".into());
                        }
                        let dir = target.parent().unwrap_or(dest);
                        let (f, tmp) = fsutil::create_temp(dir).map_err(|e| e.to_string())?;
                        let guard = fsutil::TempGuard::new(tmp);
                        let mut out = std::io::BufWriter::with_capacity(1 << 20, f);
                        let mut reader = Reader::new(chunks.clone(), locs);
                        let mut h = Hasher::new();
                        let mut at = 0usize;
                        while at < *size as usize {
                            let to = (at + (1 << 20)).min(*size as usize);
                            let b = Source::bytes(&mut reader, at..to).map_err(|e| e.to_string())?;
                            h.update(b);
                            std::io::Write::write_all(&mut out, b).map_err(|e| e.to_string())?;
                            at = to;
                        }
                        if h.finish() != *hash {
                            return Err("its stored content does not match its hash".into());
                        }
                        let f = out.into_inner().map_err(|e| e.to_string())?;
                        fsutil::set_file_meta(&f, m.mode, m.mtime_ns).map_err(|e| e.to_string())?;
                        f.sync_all().map_err(|e| e.to_string())?;
                        std::fs::rename(guard.path(), &target).map_err(|e| e.to_string())?;
                        guard.keep();
                        sum.files += 1;
                        sum.bytes += size;
                    }
                    None => {}
                }
                Ok(())
            })();
            if let Err(e) = wrote {
                return Err(ServerError::History(format!("cannot export `{}`: {e}", v.path)));
            }
        }
        if !more {
            break;
        }
    }
    // Directory modes last, deepest first, so a read-only directory does not stop its children.
    for (d, mode) in dirs.iter().rev() {
        if *mode != 0 {
            let _ = fsutil::set_mode(d, *mode | 0o700);
        }
    }
    Ok(sum)
}

/// What a prune freed.
#[derive(Debug, Default, Clone, Copy)]
pub struct PruneSummary {
    /// Versions forgotten by the policy.
    pub versions: u64,
    /// Pack files deleted.
    pub packs: u64,
    /// Bytes of pack files deleted.
    pub bytes: u64,
}

/// Forgets the versions `keep` does not keep and deletes the packs no kept version needs.
/// Leftovers of interrupted uploads younger than `grace` are left alone (an upload may still
/// be using them).
pub fn prune(data_dir: &Path, keep: &Keep, grace: Duration) -> Result<PruneSummary, ServerError> {
    if !data_dir.join("deltasync.db").exists() {
        return Err(ServerError::History(format!(
            "{} is not a deltasync data folder (no deltasync.db in it); give the folder `serve --data` uses",
            data_dir.display()
        )));
    }
    let (meta, chunks) = super::open_data(data_dir)?;
    prune_store(meta.as_ref(), chunks.as_ref(), keep, grace)
}

/// [`prune`] on an open store (the server's background prune).
pub fn prune_store(
    meta: &Metadata,
    chunks: &dyn ChunkStore,
    keep: &Keep,
    grace: Duration,
) -> Result<PruneSummary, ServerError> {
    let fail = |e: &dyn std::fmt::Display| ServerError::History(format!("prune failed: {e}"));
    let now = crate::when::now_secs();
    let (versions, gone) = meta.prune(keep, now, grace.as_secs()).map_err(|e| fail(&e))?;
    failpoint("prune-recorded");
    let mut sum = PruneSummary { versions, ..Default::default() };
    for (i, (pack, size)) in gone.iter().enumerate() {
        if i == 1 {
            failpoint("prune-deleting");
        }
        chunks.delete(*pack).map_err(|e| fail(&e))?;
        sum.packs += 1;
        sum.bytes += size;
    }
    // Packs finished but never recorded (a crash between the two): nothing refers to them.
    for (pack, size, age) in chunks.list().map_err(|e| fail(&e))? {
        if age >= grace.as_secs() && !meta.pack_known(pack).map_err(|e| fail(&e))? {
            chunks.delete(pack).map_err(|e| fail(&e))?;
            sum.packs += 1;
            sum.bytes += size;
        }
    }
    Ok(sum)
}
