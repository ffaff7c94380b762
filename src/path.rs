//! `RelPath`: the one place where a path from the network, the disk or the user is checked.
//!
//! Every path that crosses the wire is a `RelPath`, so no code below the protocol edge can hold a
//! path that escapes an account's folder. The rules are the union of what Linux, macOS and
//! Windows-minded users meet: `/`-separated, relative, no `.`/`..`/empty components, no NUL, each
//! component at most 255 bytes, the whole at most 4096 bytes, and never inside `.deltasync/`.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The longest file name Linux file systems accept (`NAME_MAX`).
pub const MAX_COMPONENT: usize = 255;
/// Linux `PATH_MAX`; deeper trees are refused rather than half-synced.
pub const MAX_PATH: usize = 4096;
/// The client's own state folder: never synced, never writable from the server.
pub const STATE_DIR: &str = ".deltasync";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PathError {
    #[error("empty path")]
    Empty,
    #[error("path `{0}` is absolute; only paths inside the synced folder are allowed")]
    Absolute(String),
    #[error("path `{0}` has an empty, `.` or `..` component")]
    BadComponent(String),
    #[error("path `{0}` contains a NUL byte")]
    Nul(String),
    #[error("path is longer than {MAX_PATH} bytes or has a name longer than {MAX_COMPONENT} bytes")]
    TooLong,
    #[error("path `{0}` is inside deltasync's own `.deltasync/` folder")]
    Reserved(String),
    #[error("path `{0}` is not valid UTF-8")]
    NotUtf8(String),
}

/// A validated, `/`-separated path relative to the root of a synced folder.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RelPath(String);

impl RelPath {
    pub fn new(s: impl Into<String>) -> Result<Self, PathError> {
        let s = s.into();
        if s.is_empty() {
            return Err(PathError::Empty);
        }
        if s.len() > MAX_PATH {
            return Err(PathError::TooLong);
        }
        if s.contains('\0') {
            return Err(PathError::Nul(s.replace('\0', "\\0")));
        }
        if s.starts_with('/') {
            return Err(PathError::Absolute(s));
        }
        for c in s.split('/') {
            if c.is_empty() || c == "." || c == ".." {
                return Err(PathError::BadComponent(s));
            }
            if c.len() > MAX_COMPONENT {
                return Err(PathError::TooLong);
            }
        }
        if s == STATE_DIR || s.starts_with(".deltasync/") {
            return Err(PathError::Reserved(s));
        }
        Ok(RelPath(s))
    }

    /// The path of `full` relative to `root`, for files found by a local scan.
    pub fn from_local(root: &Path, full: &Path) -> Result<Self, PathError> {
        let rel = full.strip_prefix(root).map_err(|_| PathError::Absolute(full.display().to_string()))?;
        let s = rel.to_str().ok_or_else(|| PathError::NotUtf8(rel.display().to_string()))?;
        RelPath::new(s)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Joins onto a root; safe because the components were checked.
    pub fn under(&self, root: &Path) -> PathBuf {
        root.join(&self.0)
    }

    pub fn parent(&self) -> Option<RelPath> {
        self.0.rsplit_once('/').map(|(p, _)| RelPath(p.to_string()))
    }

    pub fn file_name(&self) -> &str {
        self.0.rsplit_once('/').map_or(&self.0, |(_, n)| n)
    }

    /// Number of components; deletes run deepest first.
    pub fn depth(&self) -> usize {
        self.0.matches('/').count() + 1
    }

    /// All proper ancestors, shallowest first.
    pub fn ancestors(&self) -> impl Iterator<Item = RelPath> + '_ {
        self.0.match_indices('/').map(|(i, _)| RelPath(self.0[..i].to_string()))
    }

    pub fn with_file_name(&self, name: &str) -> Result<RelPath, PathError> {
        match self.parent() {
            Some(p) => RelPath::new(format!("{}/{}", p.0, name)),
            None => RelPath::new(name.to_string()),
        }
    }
}

impl TryFrom<String> for RelPath {
    type Error = PathError;
    fn try_from(s: String) -> Result<Self, PathError> {
        RelPath::new(s)
    }
}

impl From<RelPath> for String {
    fn from(p: RelPath) -> String {
        p.0
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_paths() {
        for p in ["a", "a/b.txt", "with space/été 日本.md", ".hidden", "a/.deltasync"] {
            assert!(RelPath::new(p).is_ok(), "{p}");
        }
    }

    #[test]
    fn rejects_escapes() {
        let long = "x".repeat(256);
        for p in [
            "",
            "/etc/passwd",
            "..",
            "a/../../b",
            "a//b",
            "./a",
            "a/",
            "a\0b",
            ".deltasync",
            ".deltasync/index.db",
            long.as_str(),
        ] {
            assert!(RelPath::new(p).is_err(), "{p:?} should be refused");
        }
    }

    #[test]
    fn ancestors_and_names() {
        let p = RelPath::new("a/b/c.txt").unwrap();
        let a: Vec<_> = p.ancestors().map(|x| x.0).collect();
        assert_eq!(a, ["a", "a/b"]);
        assert_eq!(p.file_name(), "c.txt");
        assert_eq!(p.depth(), 3);
        assert_eq!(p.with_file_name("d").unwrap().as_str(), "a/b/d");
    }
}
