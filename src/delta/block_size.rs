//! The block-size rule, one place for both ends.
//!
//! rsync picks about sqrt(size) so the signature it must send stays small. Here the signature
//! normally stays home (both ends cache it), so we can afford blocks sixteen times smaller than
//! rsync's: a smaller block means less literal data around each edit (100 scattered 100-byte edits
//! in 256 MiB cost ~430 KB of literal data at 4 KiB blocks, ~150 KB at 1 KiB). The price is a
//! signature of 12 bytes per block on disk (12 MiB for a 4 GiB file) and its index in memory
//! while diffing. Powers of two keep windows aligned.
//!
//! | file size | block |
//! |---|---|
//! | < 256 MiB | 1 KiB |
//! | 4 GiB | 4 KiB |
//! | ≥ 1 TiB | 64 KiB |

/// Files smaller than this always travel whole (zstd-compressed): a delta would save at most a
/// few KiB and would cost a signature per file in both caches.
pub const WHOLE_FILE_BELOW: u64 = 16 << 10;

const MIN_BLOCK: u32 = 1 << 10;
const MAX_BLOCK: u32 = 64 << 10;

pub fn block_size(file_len: u64) -> u32 {
    let target = ((file_len as f64).sqrt() / 16.0) as u64;
    let pow2 = if target == 0 { 1 } else { 1u64 << (63 - target.leading_zeros()) };
    pow2.clamp(MIN_BLOCK as u64, MAX_BLOCK as u64) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_in_the_docs_holds() {
        assert_eq!(block_size(0), 1024);
        assert_eq!(block_size(12 << 20), 1024);
        assert_eq!(block_size(256 << 20), 1024);
        assert_eq!(block_size(4 << 30), 4096);
        assert_eq!(block_size(1 << 40), 65536);
    }
}
