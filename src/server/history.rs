//! Server-side history tools that work on a data folder directly (also while the server runs):
//! `deltasync export` and `deltasync prune`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::batch::failpoint;
use super::content::{ChunkLoc, NewChunk, PACK_TARGET, Reader, Sealed};
use super::meta::Metadata;
use super::store::{ChunkStore, PackId};
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

/// Writes the files of account `account`'s folder `folder` as plain files under `dest` (made
/// if missing; it must be empty), as they are now or, with `at` (Unix seconds), as they were then.
pub fn export(
    storage: &super::Storage,
    account: &str,
    folder: &str,
    dest: &Path,
    at: Option<i64>,
) -> Result<ExportSummary, ServerError> {
    let fail = |e: &dyn std::fmt::Display| ServerError::History(e.to_string());
    check_data_folder(storage)?;
    let (meta, chunks) = super::open_data(storage)?;
    let Some(id) =
        meta.list_accounts().map_err(|e| fail(&e))?.into_iter().find(|a| a.account.name == account)
    else {
        return Err(ServerError::History(format!(
            "no account named `{account}` in {}; see `deltasync account list`",
            storage.describe()
        )));
    };
    let id = id.account.id;
    // Looked up among the folders that exist: `space` would make a new, empty one.
    let folders = meta.folders(id).map_err(|e| fail(&e))?;
    if !folders.iter().any(|(name, ..)| name == folder) {
        let names: Vec<&str> = folders.iter().map(|(n, ..)| n.as_str()).collect();
        return Err(ServerError::History(format!(
            "account `{account}` has no folder `{folder}` (its folders: {}); see `deltasync account list`",
            if names.is_empty() { "none yet".to_string() } else { names.join(", ") }
        )));
    }
    let Some(id) = meta.space(id, folder).map_err(|e| fail(&e))? else {
        return Err(ServerError::History(format!("account `{account}` was removed meanwhile")));
    };
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
    /// Packs whose live chunks were copied into a smaller one.
    pub repacked: u64,
}

/// Forgets the versions `keep` does not keep and deletes the packs no kept version needs.
/// Leftovers of interrupted uploads younger than `grace` are left alone (an upload may still
/// be using them).
pub fn prune(storage: &super::Storage, keep: &Keep, grace: Duration) -> Result<PruneSummary, ServerError> {
    check_data_folder(storage)?;
    let (meta, chunks) = super::open_data(storage)?;
    prune_store(meta.as_ref(), chunks.as_ref(), keep, grace)
}

/// A data folder that holds the metadata must have its database: a typo in `--data` is an
/// error, not a new empty folder.
fn check_data_folder(storage: &super::Storage) -> Result<(), ServerError> {
    if storage.is_local() && !storage.data_dir.join("deltasync.db").exists() {
        return Err(ServerError::History(format!(
            "{} is not a deltasync data folder (no deltasync.db in it); give the folder `serve --data` uses",
            storage.data_dir.display()
        )));
    }
    Ok(())
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
    let pruned = meta.prune(keep, now, grace.as_secs()).map_err(|e| fail(&e))?;
    failpoint("prune-recorded");
    let mut sum = PruneSummary { versions: pruned.versions, ..Default::default() };
    let mut gone = pruned.gone;
    // Packs mostly unused, and small packs: their live chunks are copied (as stored) into new
    // packs of up to PACK_TARGET, several old packs into each.
    let mut written = 0u64;
    let mut group: Vec<(PackId, u64, Vec<NewChunk>)> = Vec::new();
    let mut group_bytes = 0u64;
    let mut candidates = pruned.to_repack.into_iter().peekable();
    while let Some(candidate) = candidates.next() {
        group_bytes += candidate.2.iter().map(|c| u64::from(c.loc.stored)).sum::<u64>();
        group.push(candidate);
        if group_bytes < PACK_TARGET && candidates.peek().is_some() {
            continue;
        }
        // A lone pack that is only small would be copied as it was: left for a later prune,
        // when there are others to merge it with.
        let lone = group.len() == 1 && group_bytes.saturating_mul(2) >= group[0].1;
        if !lone {
            let (forgotten, size) = repack(meta, chunks, &group).map_err(|e| fail(&e))?;
            if !forgotten.is_empty() {
                written += size;
            }
            sum.repacked += forgotten.len() as u64;
            gone.extend(forgotten);
        }
        group.clear();
        group_bytes = 0;
    }
    for (i, (pack, size)) in gone.iter().enumerate() {
        if i == 1 {
            failpoint("prune-deleting");
        }
        chunks.delete(*pack).map_err(|e| fail(&e))?;
        sum.packs += 1;
        sum.bytes += size;
    }
    sum.bytes = sum.bytes.saturating_sub(written);
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

/// The old packs a repack forgot (with their sizes), and the new pack's size.
type Repacked = (Vec<(PackId, u64)>, u64);

/// Copies the live chunks of `group`'s packs into one new pack and records the move; the old
/// packs forgotten (with their sizes) and the new pack's size.
fn repack(
    meta: &Metadata,
    chunks: &dyn ChunkStore,
    group: &[(PackId, u64, Vec<NewChunk>)],
) -> Result<Repacked, Box<dyn std::error::Error>> {
    let mut w = chunks.create()?;
    let mut moved = Vec::new();
    for (_, _, live) in group {
        for c in live {
            let bytes = chunks.read(c.loc.pack, c.loc.offset, c.loc.stored)?;
            let offset = super::content::write_stored(w.as_mut(), &c.key, c.loc.raw, &bytes, c.loc.zstd)?;
            moved.push(NewChunk { key: c.key, loc: ChunkLoc { pack: w.id(), offset, ..c.loc } });
        }
    }
    let new = Sealed { pack: w.id(), size: w.len(), chunks: moved };
    w.finish()?;
    let old: Vec<PackId> = group.iter().map(|g| g.0).collect();
    // A pack not forgotten holds a chunk in use again: its copy waits for a later prune (and
    // a new pack nothing was moved into goes at once).
    let forgotten = meta.repacked(&old, &new)?;
    if forgotten.is_empty() {
        chunks.delete(new.pack)?;
    }
    let sizes = group.iter().filter(|g| forgotten.contains(&g.0)).map(|g| (g.0, g.1)).collect();
    Ok((sizes, new.size))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::delta::pseudo_random;
    use crate::hash::ContentHash;
    use crate::protocol::Meta;
    use crate::server::content::{ChunkKey, Chunker, PackSink};
    use crate::server::meta::{AccountId, Change, Step};
    use crate::server::store::PackId;
    use crate::server::store::local::LocalChunks;
    use crate::server::store::sqlite::SqliteMeta;

    /// Stores `data` in packs of its own; its chunk list.
    fn store(meta: &Metadata, chunks: &Arc<dyn ChunkStore>, data: &[u8]) -> Vec<(ChunkKey, u32)> {
        let mut sink = PackSink::new(chunks.clone());
        let mut w = Chunker::new(&mut sink, meta);
        std::io::Write::write_all(&mut w, data).unwrap();
        let list = w.finish().unwrap();
        sink.seal(meta).unwrap();
        list
    }

    fn put(meta: &Metadata, account: AccountId, path: &str, data: &[u8], list: &[(ChunkKey, u32)]) {
        let node = Node::File {
            hash: ContentHash::of(data),
            size: data.len() as u64,
            meta: Meta { mtime_ns: 0, mode: 0o644 },
        };
        let change = Change {
            path: RelPath::new(path).unwrap(),
            base_rev: 0,
            node: Some(node),
            chunks: Some(list.to_vec()),
        };
        let next = meta.seq(account).unwrap() + 1;
        let step = Step { op: "write", changes: vec![change] };
        assert_eq!(meta.commit(account, "d", &[step]).unwrap(), [Ok(next)]);
    }

    fn read(meta: &Metadata, chunks: &Arc<dyn ChunkStore>, account: AccountId, data: &[u8]) -> Vec<u8> {
        let (size, locs) = meta.content(account, &ContentHash::of(data)).unwrap().unwrap();
        let mut r = Reader::new(chunks.clone(), locs);
        Source::bytes(&mut r, 0..size as usize).unwrap().to_vec()
    }

    fn packs(chunks: &Arc<dyn ChunkStore>) -> std::collections::BTreeSet<PackId> {
        chunks.list().unwrap().into_iter().map(|p| p.0).collect()
    }

    #[test]
    fn a_prune_after_removing_an_account_frees_its_data_and_keeps_what_others_use() {
        let d = tempfile::tempdir().unwrap();
        let sqlite = SqliteMeta::open(&d.path().join("db")).unwrap();
        let meta: &Metadata = &sqlite;
        let chunks: Arc<dyn ChunkStore> = Arc::new(LocalChunks::open(&d.path().join("packs")).unwrap());
        let a = meta.add_account("a", "d", "ta").unwrap().id;
        let b = meta.add_account("b", "d", "tb").unwrap().id;
        // Packs of at least 1 MiB each, so no prune merges them (small packs are merged).
        let (shared, mine, theirs) =
            (pseudo_random(1_100_000, 1), pseudo_random(1_100_000, 2), pseudo_random(1_100_000, 3));
        let shared_list = store(meta, &chunks, &shared);
        let kept = packs(&chunks);
        let mine_list = store(meta, &chunks, &mine);
        let mine_packs: Vec<PackId> = packs(&chunks).difference(&kept).copied().collect();
        let theirs_list = store(meta, &chunks, &theirs);
        put(meta, a, "s", &shared, &shared_list);
        put(meta, a, "m", &mine, &mine_list);
        put(meta, b, "s", &shared, &shared_list);
        put(meta, b, "t", &theirs, &theirs_list);
        // Its signature and a cut-off upload refer to chunks too.
        let sig = pseudo_random(1_100_000, 4);
        let sig_list = store(meta, &chunks, &sig);
        assert!(meta.save_signature(&ContentHash::of(&mine), 4096, &sig_list).unwrap());
        let part = pseudo_random(1_100_000, 5);
        let part_list = store(meta, &chunks, &part);
        let p = RelPath::new("p").unwrap();
        assert!(meta.save_partial(a, &p, &ContentHash::of(b"x"), 1 << 20, None, &part_list).unwrap());
        let before = packs(&chunks);

        // Nothing to free while the account is there.
        let s = prune_store(meta, chunks.as_ref(), &Keep::All, Duration::ZERO).unwrap();
        assert_eq!((s.packs, s.repacked), (0, 0));
        assert_eq!(packs(&chunks), before);

        assert!(meta.remove_account("a").unwrap());
        let s = prune_store(meta, chunks.as_ref(), &Keep::All, Duration::ZERO).unwrap();
        assert_eq!(s.packs, 3, "the account's content, signature and partial upload packs");
        for (key, _) in mine_list.iter().chain(&sig_list).chain(&part_list) {
            assert!(!meta.chunk_exists(key).unwrap(), "a chunk of the removed account is still recorded");
        }
        let after = packs(&chunks);
        assert!(mine_packs.iter().all(|p| !after.contains(p)), "its pack is still on disk");
        assert_eq!(after.len(), before.len() - 3);
        assert!(meta.signature(&ContentHash::of(&mine), 4096).unwrap().is_none());
        // The other account's files, the shared one too, read back whole.
        assert_eq!(read(meta, &chunks, b, &shared), shared);
        assert_eq!(read(meta, &chunks, b, &theirs), theirs);
        for (key, _) in shared_list.iter().chain(&theirs_list) {
            assert!(meta.chunk_exists(key).unwrap());
        }
    }

    /// `watch` commits a file or two at a time, each commit in a pack of its own: a prune merges
    /// such small packs into one, every file reading back the same, and leaves a lone small pack
    /// as it is (copying it would only make the same pack again).
    #[test]
    fn a_prune_merges_small_packs_into_one() {
        let d = tempfile::tempdir().unwrap();
        let sqlite = SqliteMeta::open(&d.path().join("db")).unwrap();
        let meta: &Metadata = &sqlite;
        let chunks: Arc<dyn ChunkStore> = Arc::new(LocalChunks::open(&d.path().join("packs")).unwrap());
        let a = meta.add_account("a", "d", "ta").unwrap().id;
        let files: Vec<Vec<u8>> =
            (0..20).map(|i| pseudo_random(10_000 + i * 1_000, 100 + i as u64)).collect();
        for (i, data) in files.iter().enumerate() {
            let list = store(meta, &chunks, data);
            put(meta, a, &format!("f{i}"), data, &list);
        }
        // One big pack is left alone.
        let big = pseudo_random(2_000_000, 7);
        let big_list = store(meta, &chunks, &big);
        put(meta, a, "big", &big, &big_list);
        let before = packs(&chunks);
        assert_eq!(before.len(), 21);

        let s = prune_store(meta, chunks.as_ref(), &Keep::All, Duration::ZERO).unwrap();
        assert_eq!((s.repacked, s.packs), (20, 20), "{s:?}");
        let after = packs(&chunks);
        assert_eq!(after.len(), 2, "{after:?}");
        assert_eq!(after.intersection(&before).count(), 1, "the big pack was rewritten");
        for data in files.iter().chain([&big]) {
            assert_eq!(&read(meta, &chunks, a, data), data);
        }

        // The merged pack is small but alone: nothing is rewritten.
        let s = prune_store(meta, chunks.as_ref(), &Keep::All, Duration::ZERO).unwrap();
        assert_eq!((s.repacked, s.packs), (0, 0), "{s:?}");
        assert_eq!(packs(&chunks), after);
    }
}
