//! What a round did, for the summary line, `--stats` and the exit code.

use crate::delta::DeltaStats;

#[derive(Debug, Default)]
pub struct Report {
    pub files_sent: u64,
    pub files_received: u64,
    pub files_copied_locally: u64,
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
    /// A download did not fit on this computer's disk.
    pub local_disk_full: bool,
    /// Server deletes left for a later round because the folder was still changing (`watch`).
    pub deferred_deletes: usize,
    /// Server deletes held back by the mass-delete guard.
    pub held: Option<super::guard::Held>,
}

impl Report {
    pub fn summary(&self) -> String {
        let mut parts = vec![];
        if self.files_sent > 0 {
            parts.push(format!("{} uploaded", self.files_sent));
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
            parts.push("up to date".into());
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
            self.moved + self.files_copied_locally,
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
