//! The steps a plan takes on this computer: conflicts, fetches that need no transfer (a
//! directory, a link, content already here under another name), deletes, and the checks that a
//! path is still what the round's scan saw before anything replaces it.

use super::*;

impl Exec {
    /// Keeps both versions: ours moves to a conflict name (and is uploaded there), theirs comes here.
    pub(super) fn conflict(
        &mut self,
        local: Node,
        remote: Entry,
        jobs: &mut Vec<Job>,
    ) -> Result<(), SyncError> {
        let path = remote.path.clone();
        let now = std::time::SystemTime::now();
        let mut n = 1;
        let cpath = loop {
            let c = crate::sync::conflict::conflict_path(&path, &self.device, now, n)
                .map_err(|e| SyncError::Other(e.to_string()))?;
            if !self.local.contains_key(&c) && std::fs::symlink_metadata(self.full(&c)).is_err() {
                break c;
            }
            n += 1;
        };
        std::fs::rename(self.full(&path), self.full(&cpath)).map_err(|e| self.io_err(&path, e))?;
        // Everything below a renamed directory moved too.
        let moved: Vec<RelPath> = self
            .local
            .range(path.clone()..)
            .map(|(k, _)| k.clone())
            .take_while(|k| k == &path || k.as_str().starts_with(&format!("{path}/")))
            .collect();
        for k in moved {
            if let Some(node) = self.local.remove(&k) {
                let suffix = &k.as_str()[path.as_str().len()..];
                if let Ok(nk) = RelPath::new(format!("{cpath}{suffix}")) {
                    self.local.insert(nk, node);
                }
            }
            self.cache.remove(&k);
        }
        self.report.conflicts.push(format!(
            "conflict: `{path}` changed on both sides; kept the server's version as `{path}` and this computer's as `{cpath}`"
        ));
        self.progress.say(self.report.conflicts.last().map_or("", |s| s.as_str()));
        if self.upload {
            match &local {
                Node::File { hash, size, meta } => jobs.push(Job::Up(Action::Put {
                    path: cpath.clone(),
                    base_rev: 0,
                    hash: *hash,
                    size: *size,
                    meta: *meta,
                    delta_base: None,
                })),
                Node::Symlink { target } => jobs.push(Job::Up(Action::Symlink {
                    path: cpath.clone(),
                    base_rev: 0,
                    target: target.clone(),
                })),
                Node::Dir { .. } => {} // its contents go up on the next round
            }
        }
        self.fetch(remote, jobs)
    }

    /// Brings a server entry here: directories and links directly, files by local copy when the
    /// content is already here, else by download (a delta against the version we hold).
    pub(super) fn fetch(&mut self, entry: Entry, jobs: &mut Vec<Job>) -> Result<(), SyncError> {
        let path = entry.path.clone();
        let full = self.full(&path);
        let Some(node) = entry.node.clone() else {
            return Ok(());
        };
        match &node {
            Node::Dir { mode } => {
                fsutil::ensure_dirs(&self.root, &path).map_err(|e| self.io_err(&path, e))?;
                match std::fs::symlink_metadata(&full) {
                    Ok(md) if md.is_dir() => {}
                    Ok(_) => {
                        // The plan only fetches over an unchanged local version, so the file or
                        // link in the way is one the server replaced by this directory, unless
                        // it changed here since the scan.
                        if !self.as_seen(&path) {
                            self.changed_meanwhile(&path);
                            return Ok(());
                        }
                        std::fs::remove_file(&full).map_err(|e| self.io_err(&path, e))?;
                        self.cache.remove(&path);
                        std::fs::create_dir(&full).map_err(|e| self.io_err(&path, e))?;
                    }
                    Err(_) => std::fs::create_dir(&full).map_err(|e| self.io_err(&path, e))?,
                }
                let _ = fsutil::set_mode(&full, mode | 0o700);
                self.local.insert(path.clone(), node);
                self.record(&entry);
                self.progress.file_done(path.as_str(), "mkdir");
            }
            Node::Symlink { target } => {
                fsutil::ensure_dirs(&self.root, &path).map_err(|e| self.io_err(&path, e))?;
                if !self.make_way(&path) {
                    return Ok(());
                }
                if !self.as_seen(&path) {
                    self.changed_meanwhile(&path);
                    return Ok(());
                }
                let tmp = TempGuard::new(fsutil::temp_path(&self.landings.dir(&self.root, &full)));
                std::os::unix::fs::symlink(target, tmp.path()).map_err(|e| self.io_err(&path, e))?;
                std::fs::rename(tmp.path(), &full).map_err(|e| self.io_err(&path, e))?;
                tmp.keep();
                self.local.insert(path.clone(), node);
                self.record(&entry);
                self.progress.file_done(path.as_str(), "link");
            }
            Node::File { hash, meta, .. } => {
                let here = self.local.get(&path).cloned();
                if let Some(Node::File { hash: h, .. }) = &here
                    && h == hash
                {
                    // Same bytes: only the metadata moves.
                    let _ = fsutil::set_mode(&full, meta.mode);
                    let _ = fsutil::set_mtime(&full, meta.mtime_ns);
                    self.after_local_write(&path, node);
                    self.record(&entry);
                    return Ok(());
                }
                if let Some((src, src_rev, src_size, src_meta)) = self.renamed_away.remove(hash)
                    && self.rename_local(&src, src_size, src_meta, &path, *meta).is_ok()
                {
                    self.local.remove(&src);
                    self.cache.remove(&src);
                    self.batch.synced.push((src.clone(), Synced { rev: src_rev, node: None }));
                    self.renamed_here.insert(src);
                    self.after_local_write(&path, node);
                    self.record(&entry);
                    self.report.moved += 1;
                    self.progress.file_done(path.as_str(), "moved");
                    return Ok(());
                }
                if let Some(src) = self.local_with_hash(hash, &path)
                    && let Ok(file) = self.copy_local(&src, &path, *hash, *meta)
                {
                    // Put in place with the downloads, a batch at a time (see `flush_ready`).
                    self.ready_bytes += file.stat.size;
                    self.ready.push(Ready { got: entry, file });
                    return Ok(());
                }
                let have = match here {
                    Some(Node::File { hash, size, .. }) => Some((hash, size)),
                    _ => None,
                };
                jobs.push(Job::Get { entry, have, land: Landing::Temp });
            }
        }
        Ok(())
    }

    /// A local file other than `not` with this content, to copy instead of downloading. By an
    /// index of the local view's files by hash, made on first use: looking through the whole
    /// view for every download made a pull of many new files into a big folder quadratic. The
    /// index may be stale (files written since); a candidate counts only if the view still has
    /// that content there, and the copy checks the bytes it copied.
    pub(super) fn local_with_hash(&mut self, hash: &ContentHash, not: &RelPath) -> Option<RelPath> {
        let local = &self.local;
        let by_hash = self.by_hash.get_or_insert_with(|| {
            let mut m: HashMap<ContentHash, Vec<RelPath>> = HashMap::new();
            for (p, n) in local {
                if let Node::File { hash, .. } = n {
                    m.entry(*hash).or_default().push(p.clone());
                }
            }
            m
        });
        by_hash
            .get(hash)?
            .iter()
            .find(|p| *p != not && matches!(local.get(*p), Some(Node::File { hash: h, .. }) if h == hash))
            .cloned()
    }

    /// Renames `src` to `dst` if `src` is still the version the plan saw.
    pub(super) fn rename_local(
        &self,
        src: &RelPath,
        size: u64,
        meta: Meta,
        dst: &RelPath,
        new_meta: Meta,
    ) -> std::io::Result<()> {
        fsutil::check_no_symlink_ancestors(&self.root, src)?;
        let from = self.full(src);
        let md = std::fs::symlink_metadata(&from)?;
        if !md.is_file() || md.len() != size || fsutil::mtime_ns(&md) != meta.mtime_ns {
            return Err(std::io::Error::other("changed here"));
        }
        fsutil::ensure_dirs(&self.root, dst)?;
        let to = self.full(dst);
        if std::fs::symlink_metadata(&to).is_ok() && !self.local.contains_key(dst) {
            return Err(std::io::Error::other("something appeared at the destination"));
        }
        std::fs::rename(&from, &to)?;
        fsutil::set_mode(&to, new_meta.mode)?;
        fsutil::set_mtime(&to, new_meta.mtime_ns)?;
        Ok(())
    }

    /// Copies the local file `src` (which the round saw with content `hash`) into a temp file for
    /// `dst`, checks the bytes copied and sets `meta`: ready to be put in place with a batch of
    /// downloads.
    pub(super) fn copy_local(
        &self,
        src: &RelPath,
        dst: &RelPath,
        hash: ContentHash,
        meta: Meta,
    ) -> std::io::Result<Written> {
        let landing = self.landings.prepare(&self.root, dst)?;
        let tmp = TempGuard::new(fsutil::temp_path(&landing));
        std::fs::copy(self.full(src), tmp.path())?;
        if ContentHash::of_file(tmp.path())?.0 != hash {
            return Err(std::io::Error::other("source changed"));
        }
        let f = std::fs::File::open(tmp.path())?;
        fsutil::set_file_meta(&f, meta.mode, meta.mtime_ns)?;
        let md = f.metadata()?;
        Ok(Written::copied(tmp, &md))
    }

    /// Records what a local write left on disk, so the next scan need not re-hash it.
    pub(super) fn after_local_write(&mut self, path: &RelPath, node: Node) {
        let stat = std::fs::symlink_metadata(self.full(path)).ok().map(|md| Stat::of(&md));
        self.after_write(path, node, stat);
    }

    /// [`after_local_write`](Self::after_local_write) where the stat is known (a download's, from
    /// its temp file); without one the path is only hashed again by the next scan.
    pub(super) fn after_write(&mut self, path: &RelPath, node: Node, stat: Option<Stat>) {
        if let (Node::File { hash, .. }, Some(stat)) = (&node, stat) {
            self.cache.insert(path.clone(), (stat, *hash));
        }
        self.local.insert(path.clone(), node);
    }

    /// Whether what is on disk at `path` now is what this round's local view says is there, so a
    /// step may replace it: nothing where nothing was (or where the user deleted it meanwhile),
    /// the file as scanned or last written (stat), the same link. A directory never is: the
    /// server replaced it, so [`make_way`](Self::make_way) must have removed it first. Anything
    /// else was changed here during the round, and the next round syncs it.
    pub(super) fn as_seen(&self, path: &RelPath) -> bool {
        self.expect(path).holds(&self.full(path))
    }

    /// What [`as_seen`](Self::as_seen) expects at `path`, to check on another thread.
    pub(super) fn expect(&self, path: &RelPath) -> Expect {
        match self.local.get(path) {
            None => Expect::Nothing,
            Some(Node::File { size, meta, .. }) => match self.cache.get(path) {
                Some((s, _)) => Expect::File { size: s.size, mtime_ns: s.mtime_ns, inode: Some(s.inode) },
                None => Expect::File { size: *size, mtime_ns: meta.mtime_ns, inode: None },
            },
            Some(Node::Symlink { target }) => Expect::Link(target.clone()),
            Some(Node::Dir { .. }) => Expect::Never,
        }
    }

    pub(super) fn changed_meanwhile(&mut self, path: &RelPath) {
        self.report.notes.push(format!("{path}: changed here while downloading; will sync on the next run"));
    }

    /// The server replaced a directory by a file or link: empties and removes the local
    /// directory (its contents were deleted on the server too). False if it has new files here,
    /// which then survive.
    pub(super) fn make_way(&mut self, path: &RelPath) -> bool {
        // The local view first: a stat only where a directory was.
        if !matches!(self.local.get(path), Some(Node::Dir { .. })) {
            return true;
        }
        let full = self.full(path);
        if !std::fs::symlink_metadata(&full).is_ok_and(|m| m.is_dir()) {
            return true;
        }
        self.delete_pending_under(path);
        if std::fs::remove_dir(&full).is_err() {
            self.report.notes.push(format!("{path}: replaced on the server but has new files here; kept"));
            return false;
        }
        self.local.remove(path);
        true
    }

    pub(super) fn delete_pending_under(&mut self, dir: &RelPath) {
        let prefix = format!("{dir}/");
        let (mut under, rest): (Vec<Action>, Vec<Action>) =
            std::mem::take(&mut self.pending_deletes).into_iter().partition(
                |a| matches!(a, Action::DeleteLocal { path, .. } if path.as_str().starts_with(&prefix)),
            );
        self.pending_deletes = rest;
        under.sort_by_key(|a| match a {
            Action::DeleteLocal { path, .. } => std::cmp::Reverse(path.depth()),
            _ => std::cmp::Reverse(0),
        });
        for a in under {
            if let Action::DeleteLocal { path, rev, expect } = a {
                self.delete_local(path, rev, expect);
            }
        }
    }

    pub(super) fn delete_local(&mut self, path: RelPath, rev: u64, expect: Node) {
        let full = self.full(&path);
        if fsutil::check_no_symlink_ancestors(&self.root, &path).is_err() {
            return;
        }
        let r = match (&expect, std::fs::symlink_metadata(&full)) {
            (_, Err(_)) => Ok(()),
            (Node::Dir { .. }, Ok(md)) if md.is_dir() => match std::fs::remove_dir(&full) {
                Err(e) if e.kind() == std::io::ErrorKind::DirectoryNotEmpty => {
                    // New files inside: they survive, and the directory with them.
                    self.report
                        .notes
                        .push(format!("{path}: deleted on the server but has new files here; kept"));
                    return;
                }
                r => r,
            },
            (Node::File { size, meta, .. }, Ok(md)) => {
                if md.len() != *size || fsutil::mtime_ns(&md) != meta.mtime_ns {
                    self.report.notes.push(format!("{path}: deleted on the server but changed here; kept"));
                    return;
                }
                std::fs::remove_file(&full)
            }
            (Node::Symlink { .. }, Ok(_)) => std::fs::remove_file(&full),
            (_, Ok(_)) => return,
        };
        match r {
            Ok(()) => {
                self.local.remove(&path);
                self.cache.remove(&path);
                self.batch.synced.push((path.clone(), Synced { rev, node: None }));
                self.report.deleted_local += 1;
                self.progress.file_done(path.as_str(), "deleted");
            }
            Err(e) => self.report.error(path.as_str(), format!("cannot delete it on this computer: {e}")),
        }
    }
}

/// What a round's local view says is at a path (see [`Exec::as_seen`]).
pub(super) enum Expect {
    Nothing,
    /// A file of this size and mtime (and inode, if the round stat'ed it).
    File {
        size: u64,
        mtime_ns: i64,
        inode: Option<u64>,
    },
    Link(String),
    /// A directory: never replaced unless [`Exec::make_way`] removed it first.
    Never,
}

impl Expect {
    /// Whether what is at `full` now is what was expected; nothing there always is.
    pub(super) fn holds(&self, full: &Path) -> bool {
        let md = match std::fs::symlink_metadata(full) {
            Ok(md) => md,
            Err(e) => return e.kind() == std::io::ErrorKind::NotFound,
        };
        match self {
            Expect::Nothing | Expect::Never => false, // something appeared here / a directory
            Expect::File { size, mtime_ns, inode } => {
                md.is_file()
                    && md.len() == *size
                    && fsutil::mtime_ns(&md) == *mtime_ns
                    && inode.is_none_or(|i| md.ino() == i)
            }
            Expect::Link(target) => {
                md.file_type().is_symlink()
                    && std::fs::read_link(full).is_ok_and(|t| t.to_str() == Some(target.as_str()))
            }
        }
    }
}
