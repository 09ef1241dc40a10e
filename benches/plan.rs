//! Planner benchmarks: one host's plan in a mesh of 1,000 and 10,000 hosts, with and without
//! parsing/validating the metadata file, with and without key derivation.
//! Run: `cargo bench --bench plan`.

use std::hint::black_box;
use std::path::Path;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};

use ipsec_mesh::metadata::file;
use ipsec_mesh::plan::{self, PlanOptions, Psk};

mod common;

fn document(n: usize) -> Vec<u8> {
    serde_json::to_vec(&common::raw_mesh(n, Some("ipsec"))).unwrap()
}

fn bench(c: &mut Criterion) {
    let psk = Psk::from_bytes(&[0x42; 32]);
    let opts = PlanOptions::default();
    let mut g = c.benchmark_group("plan");
    g.sample_size(20);
    for n in [1_000usize, 10_000] {
        let doc = document(n);
        let cluster = file::parse(Path::new("bench.json"), &doc).unwrap();
        let me = "host-00007";
        g.bench_with_input(BenchmarkId::new("plan_only/no_psk", n), &n, |b, _| {
            b.iter(|| plan::plan(black_box(&cluster), me, &opts, None).unwrap())
        });
        g.bench_with_input(BenchmarkId::new("plan_only/psk", n), &n, |b, _| {
            b.iter(|| plan::plan(black_box(&cluster), me, &opts, Some(&psk)).unwrap())
        });
        g.bench_with_input(
            BenchmarkId::new("parse_validate_plan/psk", n),
            &n,
            |b, _| {
                b.iter(|| {
                    let c = file::parse(Path::new("bench.json"), black_box(&doc)).unwrap();
                    plan::plan(&c, me, &opts, Some(&psk)).unwrap()
                })
            },
        );
        g.bench_with_input(BenchmarkId::new("parse_validate", n), &n, |b, _| {
            b.iter(|| file::parse(Path::new("bench.json"), black_box(&doc)).unwrap())
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
