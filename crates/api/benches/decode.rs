//! Hot path of ingest: decoding a gRPC push of 1000 pairs and validating it.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use prost::Message;
use std::hint::black_box;
use userseg_domain::{validate_batch, Limits, RawPair, Window};
use userseg_proto::v1::{Pair, PushRequest};

fn bench(c: &mut Criterion) {
    let now = 1_800_000_000;
    let req = PushRequest {
        pairs: (0..1000)
            .map(|i| Pair {
                user_id: format!("user-{i:010}"),
                segment: format!("segment-{:03}", i % 500),
                ts: Some(now - i64::from(i)),
            })
            .collect(),
    };
    let bytes = req.encode_to_vec();
    let mut g = c.benchmark_group("ingest");
    g.throughput(Throughput::Elements(1000));
    g.bench_function("decode_and_validate_1000_pairs", |b| {
        b.iter(|| {
            let req = PushRequest::decode(black_box(bytes.as_slice())).expect("decode");
            let raw: Vec<RawPair> = req
                .pairs
                .into_iter()
                .map(|p| RawPair {
                    user_id: p.user_id,
                    segment: p.segment,
                    ts: p.ts,
                })
                .collect();
            black_box(validate_batch(
                raw,
                now,
                Window::DEFAULT,
                &Limits::default(),
            ))
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
