//! Packs as files in the data folder: `packs/<first two hex digits>/<id>.pack`, written in
//! `packs/tmp/` and renamed into place once durable.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::{ChunkStore, PackId, PackWriter};
use crate::fsutil;

pub struct LocalChunks {
    root: PathBuf,
    tmp: PathBuf,
    /// Packs kept open for reading: a download reads thousands of chunks from few packs.
    open: Mutex<HashMap<PackId, Arc<fs::File>>>,
}

/// Packs kept open at most.
const OPEN_PACKS: usize = 64;

impl LocalChunks {
    pub fn open(dir: &Path) -> io::Result<Self> {
        let tmp = dir.join("tmp");
        fs::create_dir_all(&tmp)?;
        Ok(LocalChunks { root: dir.to_path_buf(), tmp, open: Mutex::default() })
    }

    fn path(&self, id: PackId) -> PathBuf {
        let h = id.hex();
        self.root.join(&h[..2]).join(format!("{h}.pack"))
    }
}

struct LocalPack {
    id: PackId,
    file: io::BufWriter<fsutil::WriteBehind>,
    tmp: fsutil::TempGuard,
    dest: PathBuf,
    len: u64,
}

impl ChunkStore for LocalChunks {
    fn create(&self) -> io::Result<Box<dyn PackWriter>> {
        let id = PackId::random()?;
        let (file, tmp) = fsutil::create_temp(&self.tmp)?;
        Ok(Box::new(LocalPack {
            id,
            file: io::BufWriter::with_capacity(1 << 20, fsutil::WriteBehind::new(file)),
            tmp: fsutil::TempGuard::new(tmp),
            dest: self.path(id),
            len: 0,
        }))
    }

    fn read(&self, pack: PackId, offset: u64, len: u32) -> io::Result<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let cached = self.open.lock().unwrap_or_else(|p| p.into_inner()).get(&pack).cloned();
        let f = match cached {
            Some(f) => f,
            None => {
                let f = Arc::new(fs::File::open(self.path(pack))?);
                let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
                if open.len() >= OPEN_PACKS {
                    open.clear();
                }
                open.insert(pack, f.clone());
                f
            }
        };
        let mut buf = vec![0u8; len as usize];
        f.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    }

    fn delete(&self, pack: PackId) -> io::Result<()> {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).remove(&pack);
        match fs::remove_file(self.path(pack)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    fn list(&self) -> io::Result<Vec<(PackId, u64, u64)>> {
        let mut out = Vec::new();
        let now = std::time::SystemTime::now();
        for d in fs::read_dir(&self.root)? {
            let d = d?;
            if d.file_name() == "tmp" || !d.file_type()?.is_dir() {
                continue;
            }
            for f in fs::read_dir(d.path())? {
                let f = f?;
                let name = f.file_name();
                let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".pack")).and_then(PackId::from_hex)
                else {
                    continue;
                };
                let md = f.metadata()?;
                let age =
                    md.modified().ok().and_then(|m| now.duration_since(m).ok()).map_or(0, |d| d.as_secs());
                out.push((id, md.len(), age));
            }
        }
        Ok(out)
    }

    fn clean_unfinished(&self) -> io::Result<usize> {
        fsutil::clean_temps(&self.tmp)
    }

    fn free_bytes(&self) -> Option<u64> {
        fsutil::free_bytes(&self.tmp).ok()
    }
}

impl PackWriter for LocalPack {
    fn id(&self) -> PackId {
        self.id
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.file.write_all(bytes)?;
        self.len += bytes.len() as u64;
        Ok(())
    }

    fn len(&self) -> u64 {
        self.len
    }

    fn finish(self: Box<Self>) -> io::Result<()> {
        let LocalPack { file, tmp, dest, .. } = *self;
        let f = file.into_inner().map_err(|e| e.into_error())?.into_inner();
        f.sync_all()?;
        drop(f);
        let dir = dest.parent().unwrap_or(Path::new("."));
        let new_dir = !dir.exists();
        fs::create_dir_all(dir)?;
        fs::rename(tmp.path(), &dest)?;
        tmp.keep();
        fsutil::sync_dir(dir)?;
        if new_dir && let Some(up) = dir.parent() {
            fsutil::sync_dir(up)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The local store counts what its recovery removes: the temp file of each unfinished pack.
    #[test]
    fn clean_unfinished_removes_and_counts_the_temp_files() {
        let d = tempfile::tempdir().unwrap();
        let s = LocalChunks::open(d.path()).unwrap();
        for _ in 0..2 {
            let mut w = s.create().unwrap();
            w.write(b"half a pack").unwrap();
            std::mem::forget(w);
        }
        assert_eq!(fs::read_dir(d.path().join("tmp")).unwrap().count(), 2);
        assert_eq!(s.clean_unfinished().unwrap(), 2);
        assert_eq!(fs::read_dir(d.path().join("tmp")).unwrap().count(), 0);
        assert_eq!(s.clean_unfinished().unwrap(), 0);
    }
}
