//! GEMM throughput per dtype at n = 256, 512, 1024, 2048 (criterion).
//!
//! `cargo bench --bench gemm` prints, for each size, `thrpt` in Gelem/s where one element is one
//! floating-point operation (2n^3 per product), i.e. GFLOP/s. The baseline in the same group is
//! ndarray's own f32 `.dot()` (the matrixmultiply crate), the path an ndarray user would take.
//! `cargo run --release --example gemm_table` prints the same comparison as one table of ratios.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use half::{bf16, f16};
use nbit::Float;
use nbit::tensor::Tensor;
use std::hint::black_box;

fn square<E: Float>(n: usize, seed: f64) -> Tensor<E> {
    let v = (0..n * n)
        .map(|i| E::from_f64(((i as f64 * 0.618 + seed).fract() - 0.5) * 0.1))
        .collect();
    Tensor::from_vec(&[n, n], v).expect("n*n values")
}

fn bench_dtype<E: Float>(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    n: usize,
) {
    let (a, b) = (square::<E>(n, 0.1), square::<E>(n, 0.7));
    g.bench_with_input(BenchmarkId::new(name, n), &n, |bch, _| {
        bch.iter(|| black_box(a.matmul(&b).expect("square")))
    });
}

fn gemm(c: &mut Criterion) {
    for n in [256usize, 512, 1024, 2048] {
        let mut g = c.benchmark_group(format!("gemm n={n}"));
        g.throughput(Throughput::Elements(2 * (n as u64).pow(3)));
        g.sample_size(10);
        g.measurement_time(std::time::Duration::from_secs(if n >= 1024 { 6 } else { 2 }));
        let a = ndarray::Array2::<f32>::from_shape_fn((n, n), |(i, j)| {
            ((i * n + j) as f32 * 0.618).fract() - 0.5
        });
        let b = a.t().to_owned();
        g.bench_with_input(BenchmarkId::new("ndarray-dot-f32 (baseline)", n), &n, |bch, _| {
            bch.iter(|| black_box(a.dot(&b)))
        });
        bench_dtype::<f32>(&mut g, "nbit-f32", n);
        bench_dtype::<f64>(&mut g, "nbit-f64", n);
        bench_dtype::<bf16>(&mut g, "nbit-bf16", n);
        bench_dtype::<f16>(&mut g, "nbit-f16", n);
        g.finish();
    }
}

criterion_group!(benches, gemm);
criterion_main!(benches);
