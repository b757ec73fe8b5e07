//! Prints GEMM GFLOP/s per dtype at n = 256..2048 and the ratio to a baseline measured in the
//! same run: ndarray's own f32 `.dot()` (the matrixmultiply crate).
//!
//! Run with `cargo bench --bench gemm` (`-- --csv` for one `n,dtype,gflops` line per cell). Each
//! figure is the best of several runs.

use std::time::Instant;

use half::{bf16, f16};
use nbit::Float;
use nbit::tensor::Tensor;

/// Best seconds per call of `f` over repeated runs (at least 3, and at least ~0.5 s in total).
fn best_secs(mut f: impl FnMut()) -> f64 {
    let (mut best, mut total, mut runs) = (f64::INFINITY, 0.0, 0);
    while runs < 3 || total < 0.5 {
        let t = Instant::now();
        f();
        let s = t.elapsed().as_secs_f64();
        best = best.min(s);
        total += s;
        runs += 1;
    }
    best
}

fn square<E: Float>(n: usize, seed: f64) -> Tensor<E> {
    let v = (0..n * n)
        .map(|i| E::from_f64(((i as f64 * 0.618 + seed).fract() - 0.5) * 0.1))
        .collect();
    Tensor::from_vec(&[n, n], v).expect("n*n values")
}

fn nbit_secs<E: Float>(n: usize) -> f64 {
    let (a, b) = (square::<E>(n, 0.1), square::<E>(n, 0.7));
    best_secs(|| {
        std::hint::black_box(a.matmul(&b).expect("square"));
    })
}

fn main() {
    // `--csv`: one `n,dtype,gflops` line per cell (what tools/bench_mlp_vs_pytorch.py --gemm reads).
    if std::env::args().any(|a| a == "--csv") {
        println!("n,dtype,gflops");
        for n in [512usize, 1024, 2048] {
            let flops = 2.0 * (n as f64).powi(3);
            for (name, secs) in [
                ("f32", nbit_secs::<f32>(n)),
                ("f64", nbit_secs::<f64>(n)),
                ("bf16", nbit_secs::<bf16>(n)),
                ("f16", nbit_secs::<f16>(n)),
            ] {
                println!("{n},{name},{:.1}", flops / secs / 1e9);
            }
        }
        return;
    }
    println!(
        "GEMM throughput, GFLOP/s (ratio to ndarray f32 .dot() in the same run); threads: {}",
        nbit::backend::num_threads()
    );
    println!(
        "micro-kernels: f32 {}, f64 {}, bf16 {}, f16 {}",
        nbit::backend::kernel_name::<f32>(),
        nbit::backend::kernel_name::<f64>(),
        nbit::backend::kernel_name::<bf16>(),
        nbit::backend::kernel_name::<f16>(),
    );
    println!(
        "{:>6} {:>16} {:>16} {:>16} {:>16} {:>16}",
        "n", "ndarray f32", "nbit f32", "nbit f64", "nbit bf16", "nbit f16"
    );
    for n in [256usize, 512, 1024, 2048] {
        let flops = 2.0 * (n as f64).powi(3);
        let a = ndarray::Array2::<f32>::from_shape_fn((n, n), |(i, j)| {
            ((i * n + j) as f32 * 0.618).fract() - 0.5
        });
        let b = a.t().to_owned();
        let base = best_secs(|| {
            std::hint::black_box(a.dot(&b));
        });
        let cell = |s: f64| format!("{:7.1} ({:4.2}x)", flops / s / 1e9, base / s);
        println!(
            "{n:>6} {:>16} {:>16} {:>16} {:>16} {:>16}",
            format!("{:7.1} (1.00x)", flops / base / 1e9),
            cell(nbit_secs::<f32>(n)),
            cell(nbit_secs::<f64>(n)),
            cell(nbit_secs::<bf16>(n)),
            cell(nbit_secs::<f16>(n)),
        );
    }
}
