//! Ignore rules: `DIR/.deltasyncignore` in gitignore syntax, matched by the `ignore` crate (the
//! matcher ripgrep uses). Ignored paths are not synced in either direction, as in Syncthing.
//! The rules file itself is synced, so every computer of the account ignores the same things.
//! `.deltasync/` and deltasync's temp files are always ignored (see `scan::is_ignored_name`).

use std::path::Path;

use ignore::gitignore::{Gitignore, GitignoreBuilder};

use crate::path::RelPath;

pub const IGNORE_FILE: &str = ".deltasyncignore";

#[derive(Default)]
pub struct IgnoreRules {
    matcher: Option<Gitignore>,
}

impl IgnoreRules {
    /// Loads the rules; a malformed line is reported and skipped, never fatal.
    pub fn load(root: &Path) -> (IgnoreRules, Option<String>) {
        let file = root.join(IGNORE_FILE);
        if !file.exists() {
            return (IgnoreRules::default(), None);
        }
        let mut b = GitignoreBuilder::new(root);
        let warning = b.add(&file).map(|e| format!("{}: {e}", file.display()));
        match b.build() {
            Ok(m) => (IgnoreRules { matcher: Some(m) }, warning),
            Err(e) => {
                (IgnoreRules::default(), Some(format!("{}: {e}; no ignore rules applied", file.display())))
            }
        }
    }

    /// No rules: nothing is ignored.
    pub fn is_empty(&self) -> bool {
        self.matcher.is_none()
    }

    pub fn is_ignored(&self, path: &RelPath, is_dir: bool) -> bool {
        match &self.matcher {
            Some(m) => m.matched_path_or_any_parents(path.as_str(), is_dir).is_ignore(),
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gitignore_syntax() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(IGNORE_FILE), "*.tmp\nbuild/\n!keep.tmp\n").unwrap();
        let (r, w) = IgnoreRules::load(d.path());
        assert!(w.is_none());
        let p = |s| RelPath::new(s).unwrap();
        assert!(r.is_ignored(&p("a/x.tmp"), false));
        assert!(!r.is_ignored(&p("keep.tmp"), false));
        assert!(r.is_ignored(&p("build"), true));
        assert!(r.is_ignored(&p("build/out/bin"), false));
        assert!(!r.is_ignored(&p("src/main.rs"), false));
    }
}
