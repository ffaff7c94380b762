//! What a round did, for the summary line, `--stats`, `--json` and the exit code.

use std::time::Duration;

use crate::delta::DeltaStats;

/// A path a round left out or could not carry out, and why (in words that say on which computer).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PathIssue {
    pub path: String,
    pub cause: String,
}

impl std::fmt::Display for PathIssue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.cause)
    }
}

/// Why a file here could not be read, naming this computer, so it is not taken for the server's.
pub fn local_cause(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::PermissionDenied => format!(
            "permission denied on this computer ({e}); give your user read access to it, or add it to \
             .deltasyncignore"
        ),
        std::io::ErrorKind::NotFound => "vanished on this computer while it was read".to_string(),
        _ => format!("cannot be read on this computer: {e}"),
    }
}

#[derive(Debug, Default)]
pub struct Report {
    pub files_sent: u64,
    pub files_received: u64,
    pub files_copied_locally: u64,
    /// Uploads made by the server copying content it already held (no bytes sent).
    pub files_copied_remote: u64,
    pub moved: u64,
    pub deleted_remote: u64,
    pub deleted_local: u64,
    pub delta: DeltaStats,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Files in the folder and their total size after the round.
    pub total_files: u64,
    pub total_size: u64,
    /// Changes left for the other command (push leaves downloads, pull leaves uploads).
    pub pending_other_way: u64,
    /// Conflicts resolved by keeping both versions.
    pub conflicts: Vec<String>,
    /// Changes the server refused because the path moved on meanwhile: run again.
    pub unresolved: Vec<String>,
    pub notes: Vec<String>,
    pub errors: Vec<String>,
    /// The paths among `errors` whose path is known, for `--json`.
    pub failed: Vec<PathIssue>,
    /// Paths left out of the round, each listed with its cause (unreadable here, vanished while
    /// read, refused by the server as invalid): the round is partial (exit code 23).
    pub skipped: Vec<PathIssue>,
    /// A download did not fit on this computer's disk.
    pub local_disk_full: bool,
    /// Downloads that did not fit either, after the first (which is in `errors`): in `failed`,
    /// counted, not each said (a pull onto a full disk said so once per file, thousands of lines).
    pub disk_full_more: usize,
    /// Server deletes left for a later round because the folder was still changing (`watch`).
    pub deferred_deletes: usize,
    /// Server deletes held back by the mass-delete guard.
    pub held: Option<super::guard::Held>,
}

impl Report {
    /// One path failed: said with its path, and kept by path for `--json`.
    pub fn error(&mut self, path: &str, cause: impl Into<String>) {
        let issue = PathIssue { path: path.to_string(), cause: cause.into() };
        self.errors.push(issue.to_string());
        self.failed.push(issue);
    }

    /// One path was left out of the round.
    pub fn skip(&mut self, path: &str, cause: impl Into<String>) {
        self.skipped.push(PathIssue { path: path.to_string(), cause: cause.into() });
    }

    /// What failed, a line each: every error, then how many more downloads did not fit.
    pub fn error_lines(&self) -> Vec<String> {
        let mut lines = self.errors.clone();
        match self.disk_full_more {
            0 => {}
            1 => lines.push("1 more file did not fit either: this computer's disk is full".into()),
            n => lines.push(format!("{n} more files did not fit either: this computer's disk is full")),
        }
        lines
    }

    /// How many paths failed.
    pub fn failures(&self) -> usize {
        self.errors.len() + self.disk_full_more
    }

    /// Did anything fail, get skipped or stay unresolved?
    pub fn incomplete(&self) -> bool {
        !self.errors.is_empty() || !self.skipped.is_empty() || !self.unresolved.is_empty()
    }

    /// The closing line: what changed (`up to date` only when nothing did and nothing failed),
    /// the bytes each way and, given the round's `elapsed` time, how long it took and the average
    /// rate. Scripts match its start (`N uploaded`, `up to date`, `... sent, ... received`).
    pub fn summary_in(&self, elapsed: Option<Duration>) -> String {
        let mut line = self.summary();
        if let Some(t) = elapsed {
            let secs = t.as_secs_f64();
            let rate =
                if secs > 0.0 { ((self.bytes_sent + self.bytes_received) as f64 / secs) as u64 } else { 0 };
            line.push_str(&format!(" in {secs:.1} s ({}/s)", human(rate)));
        }
        line
    }

    pub fn summary(&self) -> String {
        let mut parts = vec![];
        if self.files_sent + self.files_copied_remote > 0 {
            parts.push(format!("{} uploaded", self.files_sent + self.files_copied_remote));
        }
        if self.files_received + self.files_copied_locally > 0 {
            parts.push(format!("{} downloaded", self.files_received + self.files_copied_locally));
        }
        if self.moved > 0 {
            parts.push(format!("{} moved", self.moved));
        }
        if self.deleted_remote + self.deleted_local > 0 {
            parts.push(format!("{} deleted", self.deleted_remote + self.deleted_local));
        }
        if !self.conflicts.is_empty() {
            parts.push(format!("{} conflicts kept as copies", self.conflicts.len()));
        }
        if parts.is_empty() {
            parts.push(if self.incomplete() { "nothing changed" } else { "up to date" }.into());
        }
        format!(
            "{}; {} sent, {} received",
            parts.join(", "),
            human(self.bytes_sent),
            human(self.bytes_received)
        )
    }

    /// rsync's `--stats` block, with the same labels where the meaning is the same.
    pub fn stats(&self) -> String {
        let wire = self.bytes_sent + self.bytes_received;
        let transferred = self.delta.literal + self.delta.matched;
        let speedup = if wire == 0 { 0.0 } else { self.total_size as f64 / wire as f64 };
        let saved = transferred.saturating_sub(self.delta.literal);
        format!(
            "Number of files: {}\n\
             Number of files transferred: {}\n\
             Number of files moved or copied without transfer: {}\n\
             Number of deleted files: {}\n\
             Total file size: {} bytes\n\
             Total transferred file size: {} bytes\n\
             Literal data: {} bytes\n\
             Matched data: {} bytes\n\
             Delta saved: {} bytes\n\
             Total bytes sent: {}\n\
             Total bytes received: {}\n\
             \n\
             sent {} bytes  received {} bytes\n\
             total size is {}  speedup is {:.2}",
            self.total_files,
            self.files_sent + self.files_received,
            self.moved + self.files_copied_locally + self.files_copied_remote,
            self.deleted_local + self.deleted_remote,
            self.total_size,
            transferred,
            self.delta.literal,
            self.delta.matched,
            saved,
            self.bytes_sent,
            self.bytes_received,
            self.bytes_sent,
            self.bytes_received,
            self.total_size,
            speedup
        )
    }
}

pub fn human(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{n} B") } else { format!("{v:.1} {}", UNITS[u]) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn up_to_date_is_never_said_beside_a_failure_or_a_skip() {
        let mut r = Report::default();
        assert!(r.summary().starts_with("up to date; "), "{}", r.summary());
        r.skip("a.txt", "permission denied on this computer");
        assert!(!r.summary().contains("up to date"), "{}", r.summary());
        let mut r = Report::default();
        r.error("b.txt", "the server's disk is full");
        assert!(r.summary().starts_with("nothing changed; "), "{}", r.summary());
        assert_eq!(r.errors, ["b.txt: the server's disk is full"]);
    }

    #[test]
    fn copies_without_transfer_count_as_changes() {
        let r = Report { files_copied_remote: 3, ..Report::default() };
        assert!(r.summary().starts_with("3 uploaded; "), "{}", r.summary());
        assert!(r.stats().contains("Number of files moved or copied without transfer: 3"), "{}", r.stats());
        let r = Report { files_copied_locally: 2, ..Report::default() };
        assert!(r.summary().starts_with("2 downloaded; "), "{}", r.summary());
    }

    #[test]
    fn the_summary_gives_elapsed_time_and_rate() {
        let r = Report { files_sent: 2, bytes_sent: 3 << 20, bytes_received: 1024, ..Report::default() };
        assert_eq!(
            r.summary_in(Some(Duration::from_millis(1500))),
            "2 uploaded; 3.0 MiB sent, 1.0 KiB received in 1.5 s (2.0 MiB/s)"
        );
    }
}
