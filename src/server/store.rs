//! Content storage: per account a plain mirror of the folder (a user can walk in and copy files
//! out), a temp area on the same file system, and the signature cache.
//!
//! All file I/O of the server goes through here, so an object-storage backend is one more
//! implementation of this module. Paths are `RelPath`s and no operation follows a symlink: every
//! ancestor is checked to be a real directory, and links are only ever created, read or removed.

use std::fs;
use std::io;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use crate::delta::SigCache;
use crate::fsutil;
use crate::path::RelPath;
use crate::protocol::Meta;

use super::meta::AccountId;

#[derive(Clone)]
pub struct Store {
    root: PathBuf,
}

/// One account's rooms.
#[derive(Clone)]
pub struct AccountStore {
    pub files: PathBuf,
    pub tmp: PathBuf,
    pub sigs: SigCache,
}

impl Store {
    pub fn open(data_dir: &Path) -> io::Result<Self> {
        let root = data_dir.join("accounts");
        fs::create_dir_all(&root)?;
        Ok(Store { root })
    }

    pub fn account(&self, id: AccountId) -> io::Result<AccountStore> {
        let base = self.root.join(id.to_string());
        let files = base.join("files");
        let tmp = base.join("tmp");
        fs::create_dir_all(&files)?;
        fs::create_dir_all(&tmp)?;
        Ok(AccountStore { files, tmp, sigs: SigCache::new(base.join("sigs"))? })
    }

    /// Removes temp files left by interrupted uploads; returns how many.
    pub fn clean_temps(&self) -> io::Result<usize> {
        let mut n = 0;
        for e in fs::read_dir(&self.root)? {
            n += fsutil::clean_temps(&e?.path().join("tmp"))?;
        }
        Ok(n)
    }
}

/// Replaced files at least this big are kept aside by [`AccountStore::place`].
const KEEP_ASIDE_FROM: u64 = 8 << 20;

/// A replaced version, still linked in the temp area. Renaming over a big file frees its blocks
/// inside the rename (about 60 ms for 256 MiB on ext4 here), on the path of the upload's reply;
/// linked aside first, the rename is instant and the blocks are freed by [`Replaced::free`]
/// after the reply. A crash in between leaves a temp file, removed at the next start.
pub struct Replaced(PathBuf);

impl Replaced {
    pub fn free(self) {
        if let Err(e) = fs::remove_file(&self.0) {
            tracing::warn!("could not remove the replaced version {}: {e}", self.0.display());
        }
    }
}

impl AccountStore {
    /// The on-disk path of `rel`, after checking that no ancestor is a symlink or a file.
    pub fn resolve(&self, rel: &RelPath) -> io::Result<PathBuf> {
        fsutil::check_no_symlink_ancestors(&self.files, rel)?;
        Ok(rel.under(&self.files))
    }

    pub fn new_temp(&self) -> io::Result<(fs::File, PathBuf)> {
        fsutil::create_temp(&self.tmp)
    }

    /// Renames a verified, already durable temp file into place and returns the directory that
    /// must be fsynced to make the rename durable, and the replaced version if it was kept aside
    /// (see [`Replaced`]). An empty directory in the way is replaced (the session refuses to
    /// replace a non-empty one).
    pub fn place(&self, tmp: &Path, rel: &RelPath) -> io::Result<(PathBuf, Option<Replaced>)> {
        require_parent(&self.files, rel)?;
        let dest = rel.under(&self.files);
        let mut old = None;
        match fs::symlink_metadata(&dest) {
            Ok(md) if md.is_dir() => fs::remove_dir(&dest)?,
            Ok(md) if md.is_file() && md.len() >= KEEP_ASIDE_FROM => {
                let aside = fsutil::temp_path(&self.tmp);
                fs::hard_link(&dest, &aside)?;
                old = Some(Replaced(aside));
            }
            _ => {}
        }
        fs::rename(tmp, &dest)?;
        Ok((dest.parent().unwrap_or(&self.files).to_path_buf(), old))
    }

    pub fn mkdir(&self, rel: &RelPath, mode: u32) -> io::Result<()> {
        require_parent(&self.files, rel)?;
        let p = rel.under(&self.files);
        match fs::symlink_metadata(&p) {
            Ok(md) if md.is_dir() => {}
            Ok(_) => {
                fs::remove_file(&p)?;
                fs::create_dir(&p)?;
            }
            Err(_) => fs::create_dir(&p)?,
        }
        if mode != 0 {
            fsutil::set_mode(&p, mode | 0o700)?;
        }
        Ok(())
    }

    pub fn symlink(&self, rel: &RelPath, target: &str) -> io::Result<()> {
        require_parent(&self.files, rel)?;
        let tmp = fsutil::temp_path(&self.tmp);
        symlink(target, &tmp)?;
        let dest = rel.under(&self.files);
        if let Ok(md) = fs::symlink_metadata(&dest)
            && md.is_dir()
        {
            fs::remove_dir(&dest)?;
        }
        fs::rename(&tmp, &dest)?;
        fsutil::sync_dir(dest.parent().unwrap_or(&self.files))
    }

    /// Removes a file, link or empty directory; a missing one is fine (already gone).
    pub fn remove(&self, rel: &RelPath) -> io::Result<()> {
        let p = self.resolve(rel)?;
        match fs::symlink_metadata(&p) {
            Ok(md) if md.is_dir() => fs::remove_dir(&p)?,
            Ok(_) => fs::remove_file(&p)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        }
        fsutil::sync_dir(p.parent().unwrap_or(&self.files))
    }

    pub fn rename(&self, from: &RelPath, to: &RelPath, meta: Meta) -> io::Result<()> {
        let src = self.resolve(from)?;
        require_parent(&self.files, to)?;
        let dest = to.under(&self.files);
        // An empty directory in the way is replaced (the session refuses a non-empty one).
        if fs::symlink_metadata(&dest).is_ok_and(|m| m.is_dir()) {
            fs::remove_dir(&dest)?;
        }
        fs::rename(&src, &dest)?;
        fsutil::set_mode(&dest, meta.mode)?;
        fsutil::set_mtime(&dest, meta.mtime_ns)?;
        fsutil::sync_dir(dest.parent().unwrap_or(&self.files))?;
        fsutil::sync_dir(src.parent().unwrap_or(&self.files))
    }

    pub fn set_meta(&self, rel: &RelPath, meta: Meta) -> io::Result<()> {
        let p = self.resolve(rel)?;
        if fs::symlink_metadata(&p)?.file_type().is_symlink() {
            return Ok(());
        }
        fsutil::set_mode(&p, meta.mode)?;
        fsutil::set_mtime(&p, meta.mtime_ns)
    }

    /// Opens a stored file for reading without following a final symlink.
    pub fn open(&self, rel: &RelPath) -> io::Result<fs::File> {
        use std::os::unix::fs::OpenOptionsExt;
        let p = self.resolve(rel)?;
        fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(p)
    }
}

/// A path's parent is not a directory on the server: it was deleted, or replaced by a file or
/// link, after the client planned. Never made implicitly: a directory the journal does not know
/// would hide what is stored inside it from every other computer.
#[derive(Debug)]
pub struct NoParent(pub String);

impl std::fmt::Display for NoParent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NoParent {}

impl NoParent {
    /// The `NoParent` inside an I/O error from the store, if that is what it is.
    pub fn of(e: &io::Error) -> Option<&NoParent> {
        e.get_ref().and_then(|inner| inner.downcast_ref())
    }
}

/// Errors with [`NoParent`] unless every ancestor of `rel` is a real directory under `root`.
fn require_parent(root: &Path, rel: &RelPath) -> io::Result<()> {
    for a in rel.ancestors() {
        match fs::symlink_metadata(a.under(root)) {
            Ok(md) if md.is_dir() => {}
            Ok(_) => {
                return Err(io::Error::other(NoParent(format!(
                    "`{a}` is not a directory on the server any more (another computer replaced it)"
                ))));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(io::Error::other(NoParent(format!(
                    "directory `{a}` does not exist on the server any more (another computer deleted it)"
                ))));
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
