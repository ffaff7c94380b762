//! Server-side history tools that work on a data folder directly (also while the server runs):
//! `deltasync export` and `deltasync prune`.

use std::path::Path;
use std::time::Duration;

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

/// Writes account `account`'s files as plain files under `dest` (made if missing; it must be
/// empty), as they are now or, with `at` (Unix seconds), as they were then.
pub fn export(
    data_dir: &Path,
    account: &str,
    dest: &Path,
    at: Option<i64>,
) -> Result<ExportSummary, ServerError> {
    let _ = (data_dir, account, dest, at);
    Err(ServerError::History("export is not built yet".into()))
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
}

/// Forgets the versions `keep` does not keep and deletes the packs no kept version needs.
/// Leftovers of interrupted uploads younger than `grace` are left alone (an upload may still
/// be using them).
pub fn prune(data_dir: &Path, keep: &Keep, grace: Duration) -> Result<PruneSummary, ServerError> {
    let _ = (data_dir, keep, grace);
    Err(ServerError::History("prune is not built yet".into()))
}
