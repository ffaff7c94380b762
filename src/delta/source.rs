//! What the encoder and the decoder read: bytes in memory (a slice, the server's map of its own
//! store) or a user's file read with `pread`.
//!
//! A user's file may be truncated or rewritten while we read it. A memory map of it then faults
//! with SIGBUS on the first page past the new end, killing the process, so the client never maps
//! one: the encoder reads the new version through a [`FileWindow`], a buffer that moves forward
//! through the file, and the decoder reads its base through a [`FileBase`]. A read that comes
//! back short is [`DeltaError::ChangedWhileRead`]: the upload is flagged as changed (the next
//! round sends it), a download's delta fails and is fetched whole.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;

use super::DeltaError;
use crate::hash::{ContentHash, Hasher};

/// The new data an encoder reads. Ranges are asked for in a forward-moving window: after
/// [`advance`](Self::advance)`(at)`, nothing before `at` is asked for again.
pub trait Source {
    /// Bytes in all.
    fn size(&self) -> usize;
    /// The bytes of `range`, which lies inside `[0, size)` and not before the last `advance`.
    fn bytes(&mut self, range: Range<usize>) -> Result<&[u8], DeltaError>;
    /// Bytes before `at` are never asked for again.
    fn advance(&mut self, _at: usize) {}
}

impl Source for &[u8] {
    fn size(&self) -> usize {
        self.len()
    }
    fn bytes(&mut self, range: Range<usize>) -> Result<&[u8], DeltaError> {
        Ok(&self[range])
    }
}

/// A [`Source`] seen from byte `from` on: what a resumed transfer sends.
pub struct Skip<S> {
    inner: S,
    from: usize,
}

impl<S: Source> Skip<S> {
    pub fn new(inner: S, from: usize) -> Self {
        let from = from.min(inner.size());
        Skip { inner, from }
    }

    /// The source seen from its start again (to finish a [`FileWindow`]'s hash).
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Source> Source for Skip<S> {
    fn size(&self) -> usize {
        self.inner.size() - self.from
    }
    fn bytes(&mut self, range: Range<usize>) -> Result<&[u8], DeltaError> {
        self.inner.bytes(range.start + self.from..range.end + self.from)
    }
    fn advance(&mut self, at: usize) {
        self.inner.advance(at + self.from)
    }
}

/// The bytes `[from, to)` of a [`Source`], as a source of their own.
pub struct Slice<'a, S> {
    inner: &'a mut S,
    from: usize,
    to: usize,
}

impl<'a, S: Source> Slice<'a, S> {
    pub fn new(inner: &'a mut S, from: usize, to: usize) -> Self {
        let to = to.min(inner.size());
        Slice { inner, from: from.min(to), to }
    }
}

impl<S: Source> Source for Slice<'_, S> {
    fn size(&self) -> usize {
        self.to - self.from
    }
    fn bytes(&mut self, range: Range<usize>) -> Result<&[u8], DeltaError> {
        self.inner.bytes(range.start + self.from..range.end + self.from)
    }
    fn advance(&mut self, at: usize) {
        self.inner.advance(at + self.from)
    }
}

/// Bytes read from the file at a time: enough that system calls cost nothing, small enough that
/// what was just read is still in the CPU's cache when it is hashed.
const READ_STEP: usize = 1 << 20;

/// The window's usual size: the encoder asks for at most a grid span (8 MiB) plus a rolling
/// search (64 KiB and a block) past the point it advanced to. It grows if asked for more.
const WINDOW_CAPACITY: usize = 16 << 20;

/// A file of known length read forward through a buffer, by positional reads. Every byte is read
/// once, in order, and hashed as it is read: [`finish`](Self::finish) gives the content hash of
/// exactly the bytes the encoder saw.
pub struct FileWindow {
    file: File,
    len: usize,
    /// `buf[..filled]` holds the file's bytes from `start`.
    buf: Vec<u8>,
    start: usize,
    filled: usize,
    /// Bytes before this may be dropped.
    keep: usize,
    hasher: Hasher,
}

impl FileWindow {
    /// `len` is the size the scan saw: the window reads that much, and a file that has become
    /// shorter fails with [`DeltaError::ChangedWhileRead`] where it ends.
    pub fn new(file: File, len: u64) -> Self {
        Self::with_capacity(file, len, WINDOW_CAPACITY)
    }

    pub(crate) fn with_capacity(file: File, len: u64, capacity: usize) -> Self {
        let len = len as usize;
        FileWindow {
            file,
            len,
            buf: vec![0; capacity.min(len)],
            start: 0,
            filled: 0,
            keep: 0,
            hasher: Hasher::new(),
        }
    }

    /// A window whose first `from` bytes were read and hashed into `hasher` already (the start of
    /// a resumed upload, read before the transfer began): it reads on from `from`, and
    /// [`finish`](Self::finish) gives the hash of the whole file. Nothing before `from` may be
    /// asked for.
    pub fn resume(file: File, len: u64, from: u64, hasher: Hasher) -> Self {
        let from = from.min(len) as usize;
        let len = len as usize;
        FileWindow {
            file,
            len,
            buf: vec![0; WINDOW_CAPACITY.min(len - from)],
            start: from,
            filled: 0,
            keep: from,
            hasher,
        }
    }

    /// Reads on until the buffer holds the file up to `to`.
    fn fill(&mut self, to: usize) -> Result<(), DeltaError> {
        let end = self.start + self.filled;
        // Drop what is behind `keep` when what is asked for does not fit after it.
        if to - self.start > self.buf.len() {
            let drop = self.keep - self.start;
            self.buf.copy_within(drop..self.filled, 0);
            self.start = self.keep;
            self.filled -= drop;
        }
        if to - self.start > self.buf.len() {
            self.buf.resize(to - self.start, 0);
        }
        let target = (end.max(to).saturating_add(READ_STEP - 1) / READ_STEP * READ_STEP)
            .min(self.start + self.buf.len())
            .min(self.len)
            .max(to);
        while self.start + self.filled < target {
            let at = self.start + self.filled;
            let room = (target - at).min(READ_STEP);
            let piece = &mut self.buf[self.filled..self.filled + room];
            let n = read_full_at(&self.file, piece, at as u64)?;
            self.hasher.update(&piece[..n]);
            self.filled += n;
            if n < room {
                return Err(DeltaError::ChangedWhileRead { at: (at + n) as u64, len: self.len as u64 });
            }
        }
        Ok(())
    }

    /// Reads whatever the encoder did not ask for (nothing, normally) and returns the hash of the
    /// whole file as read.
    pub fn finish(mut self) -> Result<ContentHash, DeltaError> {
        while self.start + self.filled < self.len {
            let to = (self.start + self.filled + READ_STEP).min(self.len);
            self.keep = self.start + self.filled;
            self.fill(to)?;
        }
        Ok(self.hasher.finish())
    }
}

impl Source for FileWindow {
    fn size(&self) -> usize {
        self.len
    }

    fn bytes(&mut self, range: Range<usize>) -> Result<&[u8], DeltaError> {
        if range.start < self.start || range.start > range.end || range.end > self.len {
            debug_assert!(false, "{range:?} outside the window from {} of {}", self.start, self.len);
            return Err(DeltaError::Io(io::Error::other("read outside the encoder's window")));
        }
        if range.end > self.start + self.filled {
            self.fill(range.end)?;
        }
        Ok(&self.buf[range.start - self.start..range.end - self.start])
    }

    fn advance(&mut self, at: usize) {
        self.keep = self.keep.max(at.min(self.start + self.filled));
    }
}

/// Fills as much of `buf` as the file has at `offset`; fewer bytes than asked mean it ends there.
fn read_full_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// The base a delta's copies read from.
pub trait Base {
    /// Bytes in all.
    fn size(&self) -> u64;
    /// `len` bytes at `offset`, which lie inside `[0, size())`; asked for at most
    /// [`COPY_PIECE`] bytes at a time.
    fn read(&mut self, offset: u64, len: usize) -> Result<&[u8], DeltaError>;
}

/// Largest piece of a copy read from the base at once: a copy may stand for gigabytes.
pub const COPY_PIECE: usize = 1 << 20;

impl Base for &[u8] {
    fn size(&self) -> u64 {
        self.len() as u64
    }
    fn read(&mut self, offset: u64, len: usize) -> Result<&[u8], DeltaError> {
        Ok(&self[offset as usize..offset as usize + len])
    }
}

/// No base: a delta against nothing has only literals.
impl<B: Base> Base for Option<B> {
    fn size(&self) -> u64 {
        self.as_ref().map_or(0, B::size)
    }
    fn read(&mut self, offset: u64, len: usize) -> Result<&[u8], DeltaError> {
        match self {
            Some(b) => b.read(offset, len),
            None if len == 0 => Ok(&[]),
            None => Err(DeltaError::CopyOutOfBounds { offset, len: len as u64, base_len: 0 }),
        }
    }
}

/// A local file as a delta's base, read by positional reads through a small cache: copies mostly
/// come in increasing order, so the small ones between edits are served from one read.
pub struct FileBase {
    file: File,
    len: u64,
    buf: Vec<u8>,
    /// `buf[..filled]` holds the file's bytes from `at`.
    at: u64,
    filled: usize,
}

impl FileBase {
    /// The file's length now is the base's length; a file that becomes shorter while copies are
    /// read from it fails with [`DeltaError::ChangedWhileRead`].
    pub fn new(file: File) -> io::Result<Self> {
        let len = file.metadata()?.len();
        Ok(FileBase { file, len, buf: Vec::new(), at: 0, filled: 0 })
    }
}

impl Base for FileBase {
    fn size(&self) -> u64 {
        self.len
    }

    fn read(&mut self, offset: u64, len: usize) -> Result<&[u8], DeltaError> {
        let cached = offset >= self.at && offset + len as u64 <= self.at + self.filled as u64;
        if !cached {
            let want =
                (len.max(COPY_PIECE) as u64).min(self.len.saturating_sub(offset)).max(len as u64) as usize;
            if self.buf.len() < want {
                self.buf.resize(want, 0);
            }
            let n = read_full_at(&self.file, &mut self.buf[..want], offset)?;
            self.at = offset;
            self.filled = n;
            if n < len {
                return Err(DeltaError::ChangedWhileRead { at: offset + n as u64, len: self.len });
            }
        }
        let from = (offset - self.at) as usize;
        Ok(&self.buf[from..from + len])
    }
}

#[cfg(test)]
mod tests {
    use super::super::pseudo_random;
    use super::*;

    fn file_with(data: &[u8]) -> (tempfile::TempDir, File) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        std::fs::write(&p, data).unwrap();
        let f = File::open(&p).unwrap();
        (d, f)
    }

    #[test]
    fn the_window_serves_forward_ranges_and_hashes_the_whole_file() {
        let data = pseudo_random(5 << 20, 1);
        let (_d, f) = file_with(&data);
        // A window smaller than some requests: it grows for them.
        let mut w = FileWindow::with_capacity(f, data.len() as u64, 1 << 20);
        let mut at = 0;
        for (i, step) in [1usize, 4095, 100_000, 3 << 20, 7, 65536].iter().cycle().enumerate() {
            if at >= data.len() {
                break;
            }
            let to = (at + step * 2).min(data.len());
            assert_eq!(w.bytes(at..to).unwrap(), &data[at..to], "request {i}");
            at = (at + step).min(data.len());
            w.advance(at);
        }
        assert_eq!(w.finish().unwrap(), ContentHash::of(&data));
    }

    #[test]
    fn a_resumed_window_reads_on_and_hashes_the_whole_file() {
        let data = pseudo_random(5 << 20, 3);
        let (_d, f) = file_with(&data);
        let from = (2 << 20) + 5;
        let mut h = Hasher::new();
        h.update(&data[..from]);
        let mut w = Skip::new(FileWindow::resume(f, data.len() as u64, from as u64, h), from);
        assert_eq!(w.size(), data.len() - from);
        assert_eq!(w.bytes(0..4096).unwrap(), &data[from..from + 4096]);
        w.advance(1 << 20);
        assert_eq!(w.bytes((1 << 20)..(2 << 20)).unwrap(), &data[from + (1 << 20)..from + (2 << 20)]);
        assert_eq!(w.into_inner().finish().unwrap(), ContentHash::of(&data));
    }

    #[test]
    fn a_file_that_shrank_is_a_changed_file_not_a_crash() {
        // The scan saw 3 MiB; 1 MiB is left when it is read.
        let data = pseudo_random(3 << 20, 2);
        let (d, f) = file_with(&data[..1 << 20]);
        let mut w = FileWindow::new(f.try_clone().unwrap(), data.len() as u64);
        assert!(w.bytes(0..4096).is_ok());
        assert!(
            matches!(w.bytes(0..(2 << 20)), Err(DeltaError::ChangedWhileRead { at, .. }) if at == 1 << 20)
        );

        let mut b = FileBase::new(f).unwrap();
        assert_eq!(b.read(100, 50).unwrap(), &data[100..150]);
        std::fs::OpenOptions::new().write(true).open(d.path().join("f")).unwrap().set_len(1000).unwrap();
        // Served from what was read before the truncation...
        assert_eq!(b.read(200, 50).unwrap(), &data[200..250]);
        // ...or read again where the file still has the bytes...
        assert_eq!(b.read(0, 50).unwrap(), &data[..50]);
        // ...and a read past the new end is refused.
        assert!(matches!(b.read(5000, 50), Err(DeltaError::ChangedWhileRead { .. })));
    }
}
