//! The first start on a data folder of the plain-mirror layout (`accounts/<id>/files/` beside
//! `deltasync.db`, before the versioned store) converts it: every live file's bytes are cut into
//! chunks and packed, every current path becomes its first version in history, in one
//! transaction; only then is the old mirror removed. A crash before the transaction leaves the
//! old layout in place (the next start converts again; the packs written the first time are
//! collected by a prune); a crash after it leaves only a mirror to remove.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use std::sync::Arc;

use super::ServerError;
use super::content::{ChunkKey, ChunkList, Chunker, PackSink};
use super::meta::AccountId;
use super::store::ChunkStore;
use super::store::sqlite::SqliteMeta;
use crate::hash::{ContentHash, Hasher};
use crate::protocol::Node;

const LAYOUT: i64 = 2;

pub fn run(data_dir: &Path, meta: &SqliteMeta, chunks: &Arc<dyn ChunkStore>) -> Result<(), ServerError> {
    let err = |e: &dyn std::fmt::Display| ServerError::Convert(e.to_string());
    let mirror = data_dir.join("accounts");
    if meta.layout().map_err(|e| err(&e))? >= LAYOUT {
        if mirror.exists() {
            // Converted, then stopped before the old mirror was removed.
            std::fs::remove_dir_all(&mirror).map_err(|e| err(&e))?;
        }
        return Ok(());
    }
    if !mirror.exists() && !meta.has_files().map_err(|e| err(&e))? {
        return meta.mark_layout().map_err(|e| err(&e));
    }
    tracing::warn!("converting data folder {} to the versioned store", data_dir.display());
    let files = meta.all_files().map_err(|e| err(&e))?;
    let mut sink = PackSink::new(chunks.clone());
    let mut contents: HashMap<(AccountId, ContentHash), (u64, ChunkList)> = HashMap::new();
    let mut lost = 0;
    for (account, entry) in files {
        let Some(Node::File { hash, size, .. }) = entry.node else { continue };
        if contents.contains_key(&(account, hash)) {
            continue;
        }
        let path = entry.path.under(&mirror.join(account.to_string()).join("files"));
        let converted = (|| -> std::io::Result<Option<Vec<(ChunkKey, u32)>>> {
            let mut f = std::fs::File::open(&path)?;
            let mut w = Chunker::new(&mut sink, meta);
            let mut hasher = Hasher::new();
            let mut buf = vec![0u8; 1 << 20];
            let mut n = 0u64;
            loop {
                let got = f.read(&mut buf)?;
                if got == 0 {
                    break;
                }
                hasher.update(&buf[..got]);
                std::io::Write::write_all(&mut w, &buf[..got])?;
                n += got as u64;
            }
            let list = w.finish()?;
            Ok((hasher.finish() == hash && n == size).then_some(list))
        })();
        match converted {
            Ok(Some(list)) => {
                contents.insert((account, hash), (size, list));
            }
            Ok(None) | Err(_) => {
                // The mirror did not hold what the database says: nothing to keep for it.
                tracing::error!(
                    "account {account}: `{}` in the old mirror is missing or not what the database recorded; its content cannot be converted",
                    entry.path
                );
                lost += 1;
            }
        }
    }
    sink.seal(meta).map_err(|e| err(&e))?;
    let rows: Vec<_> = contents.into_iter().map(|((a, h), (size, list))| (a, h, size, list)).collect();
    meta.convert_mirror(&rows).map_err(|e| err(&e))?;
    std::fs::remove_dir_all(&mirror).map_err(|e| err(&e))?;
    tracing::warn!(
        "converted {} file contents{}",
        rows.len(),
        if lost > 0 { format!("; {lost} could not be read (see above)") } else { String::new() }
    );
    Ok(())
}
