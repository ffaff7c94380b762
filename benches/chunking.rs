//! Chunk sizes from measurements (README, "Chunk sizes"): for each candidate (min/avg/max),
//! the bytes a 64 KiB overwrite at a random offset of a 256 MiB random file adds to the store
//! (new chunks) and the bytes of the new version's chunk list (~6 bytes a chunk), averaged over
//! 40 edits; and the chunking speed.
//!
//!     cargo bench --bench chunking

use std::collections::HashSet;
use std::time::Instant;

use deltasync::server::content::{Sizes, cut_all, key_of};

fn random(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut v = vec![0u8; n];
    for c in v.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        c.copy_from_slice(&b[..c.len()]);
    }
    v
}

fn keys(data: &[u8], sizes: Sizes) -> Vec<([u8; 32], usize)> {
    let mut at = 0;
    cut_all(data, sizes)
        .into_iter()
        .map(|n| {
            let k = key_of(&data[at..at + n]);
            at += n;
            (k, n)
        })
        .collect()
}

fn main() {
    let original = random(256 << 20, 1);
    let edits = 40;
    println!(
        "{:>22} {:>8} {:>14} {:>14} {:>12}",
        "min/avg/max KiB", "chunks", "new bytes/edit", "list bytes", "MiB/s"
    );
    for (min, avg, max) in [(4, 16, 64), (8, 32, 128), (16, 64, 256), (32, 128, 512), (64, 256, 1024)] {
        let sizes = Sizes { min: min << 10, avg: avg << 10, max: max << 10 };
        let mut data = original.clone();
        let t = Instant::now();
        let first = keys(&data, sizes);
        let speed = 256.0 / t.elapsed().as_secs_f64();
        let mut have: HashSet<[u8; 32]> = first.iter().map(|(k, _)| *k).collect();
        let mut x = 12345u64;
        let mut new_bytes = 0usize;
        let mut chunks = first.len();
        for e in 0..edits {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let off = (x >> 16) as usize % (data.len() - (64 << 10));
            data[off..off + (64 << 10)].copy_from_slice(&random(64 << 10, 100 + e));
            let now = keys(&data, sizes);
            chunks = now.len();
            for (k, n) in now {
                if have.insert(k) {
                    new_bytes += n;
                }
            }
        }
        println!(
            "{:>22} {:>8} {:>14} {:>14} {:>12.0}",
            format!("{min}/{avg}/{max}"),
            chunks,
            new_bytes / edits as usize,
            chunks * 6,
            speed
        );
    }
}
