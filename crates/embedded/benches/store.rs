//! Hot paths of the embedded store: applying a batch, estimating all segments.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use std::hint::black_box;
use userseg_domain::{Pair, Window};
use userseg_embedded::MemStore;

const NOW: i64 = 1_800_000_000;

fn pairs(n: usize, users: usize, segments: usize, seed: u64) -> Vec<Pair> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            Pair {
                user_id: format!("user-{:010}", x as usize % users),
                segment: format!("segment-{:03}", (x >> 32) as usize % segments),
                ts: NOW - (x >> 40) as i64 % 86_400,
            }
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let store = MemStore::new(Window::DEFAULT);
    for chunk in pairs(2_000_000, 400_000, 500, 7).chunks(100_000) {
        store.apply(chunk).expect("apply");
    }
    let mut g = c.benchmark_group("store");
    // Fresh copies each time (dropped outside the timing), so the allocator's work on the
    // batch is not measured: 10k pairs (one producer request) and 100k (a processor batch,
    // applied on all cores).
    for (name, n, seed) in [
        ("apply_10k_pairs_into_2M", 10_000, 11),
        ("apply_100k_pairs_into_2M", 100_000, 13),
    ] {
        let batch = pairs(n, 400_000, 500, seed);
        g.throughput(Throughput::Elements(batch.len() as u64));
        g.bench_function(name, |b| {
            b.iter_batched_ref(
                || batch.clone(),
                |batch| store.apply(black_box(batch)),
                BatchSize::LargeInput,
            )
        });
    }
    g.throughput(Throughput::Elements(500));
    g.bench_function("count_all_500_segments", |b| {
        b.iter(|| black_box(store.count_all(black_box(NOW))))
    });
    g.throughput(Throughput::Elements(1));
    g.bench_function("count_one_segment", |b| {
        b.iter(|| black_box(store.count(black_box("segment-042"), NOW)))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
