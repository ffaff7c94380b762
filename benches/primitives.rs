//! Throughput of the delta primitives at 4 MiB and 256 MiB (one file each):
//! - `signature`: fast_rsync `Signature::calculate` with deltasync's options
//!   (`deltasync::delta::signature::compute`: block size from the size rule, 8-byte MD4);
//! - `diff`: `deltasync::delta::encode_delta` of the base with 64 KiB overwritten in the middle;
//! - `diff-unrelated`: the same on data sharing nothing with the base (every byte a miss: the
//!   rolling checksum's worst case);
//! - `apply`: `deltasync::delta::Applier` rebuilding the edited file into a buffer (and hashing
//!   it, as it always does);
//! - `xxh3-128`: `deltasync::hash::ContentHash::of`, for comparison.
//!
//! `cargo bench --bench primitives` (about two minutes); `-- 4MiB` for the small size only.

#[path = "common/fixtures.rs"]
mod fixtures;

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use deltasync::delta::{Applier, Block, encode_delta, signature};
use deltasync::hash::ContentHash;
use fixtures::Rng;

const SIZES: [(usize, &str); 2] = [(4 << 20, "4MiB"), (256 << 20, "256MiB")];

struct Input {
    base: Vec<u8>,
    edited: Vec<u8>,
    unrelated: Vec<u8>,
}

fn input(len: usize) -> Input {
    let base = Rng::new(0xB16).bytes(len);
    let mut edited = base.clone();
    let n = (64 << 10).min(len);
    let at = len / 2 - n / 2;
    Rng::new(1).fill(&mut edited[at..at + n]);
    let unrelated = Rng::new(0xD1FF).bytes(len);
    Input { base, edited, unrelated }
}

fn delta_blocks(sig: &fast_rsync::Signature, data: &[u8]) -> (Vec<Block>, u64) {
    let mut blocks = Vec::new();
    let mut wire = 0u64;
    encode_delta(sig, data, None, |b, _| {
        wire += b.bytes.len() as u64;
        blocks.push(b);
        Ok(())
    })
    .expect("diff");
    (blocks, wire)
}

fn primitives(c: &mut Criterion) {
    for (len, label) in SIZES {
        let inp = input(len);
        let sig = signature::compute(&inp.base);
        let (blocks, wire) = delta_blocks(&sig, &inp.edited);
        eprintln!(
            "{label}: signature {} bytes, delta of a 64 KiB edit {} bytes in {} blocks",
            sig.serialized().len(),
            wire,
            blocks.len()
        );

        let mut g = c.benchmark_group("primitives");
        g.throughput(Throughput::Bytes(len as u64));
        if len > 16 << 20 {
            g.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(8));
        } else {
            g.sample_size(20)
                .warm_up_time(Duration::from_millis(500))
                .measurement_time(Duration::from_secs(3));
        }

        g.bench_function(BenchmarkId::new("signature", label), |b| {
            b.iter(|| signature::compute(black_box(&inp.base)))
        });
        g.bench_function(BenchmarkId::new("diff", label), |b| {
            b.iter(|| {
                encode_delta(&sig, black_box(&inp.edited), None, |blk, _| {
                    black_box(blk);
                    Ok(())
                })
                .expect("diff")
            })
        });
        g.bench_function(BenchmarkId::new("diff-unrelated", label), |b| {
            b.iter(|| {
                encode_delta(&sig, black_box(&inp.unrelated), None, |blk, _| {
                    black_box(blk);
                    Ok(())
                })
                .expect("diff")
            })
        });
        let mut out: Vec<u8> = Vec::with_capacity(len);
        let apply = |out: &mut Vec<u8>| {
            out.clear();
            let mut a = Applier::new(&inp.base, out, len as u64);
            for blk in &blocks {
                a.block(blk).expect("apply");
            }
            a.finish().expect("finish").hash
        };
        assert_eq!(apply(&mut out), ContentHash::of(&inp.edited));
        assert!(out == inp.edited, "apply rebuilt the wrong bytes");
        g.bench_function(BenchmarkId::new("apply", label), |b| b.iter(|| apply(&mut out)));
        g.bench_function(BenchmarkId::new("xxh3-128", label), |b| {
            b.iter(|| ContentHash::of(black_box(&inp.base)))
        });
        g.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().without_plots();
    targets = primitives
}
criterion_main!(benches);
