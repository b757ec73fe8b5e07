//! GEMM throughput of the GPU backend (feature `cuda`): TFLOP/s of `Gpu::matmul` per dtype at
//! n = 4096 and 8192. f32 is without TF32 (nbit's default: 32-true means f32) unless the run has
//! `NBIT_TF32=1`, as `tools/gpu-check.sh`'s second run does.
//!
//! ```text
//! cargo bench --features cuda --bench gpu
//! ```

use std::time::Instant;

use nbit::backend::{Backend, cuda};
use nbit::half::{bf16, f16};
use nbit::ndarray::{ArrayD, IxDyn};
use nbit::{Float, Gpu};

/// Median TFLOP/s of `reps` products of two n x n matrices.
fn tflops<E: Float>(n: usize, reps: usize) -> Result<f64, nbit::Error> {
    let a = ArrayD::from_shape_fn(IxDyn(&[n, n]), |i| {
        E::from_f64(((i[0] * 7 + i[1] * 3) % 17) as f64 / 17.0 - 0.5)
    });
    let (a, b) = (Gpu::from_array(a.clone()), Gpu::from_array(a));
    drop(Gpu::matmul(&a, &b, false, false, None));
    cuda::synchronize()?;
    let mut rates = Vec::new();
    for _ in 0..3 {
        let start = Instant::now();
        for _ in 0..reps {
            drop(Gpu::matmul(&a, &b, false, false, None));
        }
        cuda::synchronize()?;
        rates.push(2.0 * (n as f64).powi(3) * reps as f64 / start.elapsed().as_secs_f64() / 1e12);
    }
    rates.sort_by(f64::total_cmp);
    Ok(rates[1])
}

fn main() {
    if let Err(e) = <Gpu as nbit::Device>::probe() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
    println!("GPU: {}", cuda::describe().unwrap_or_default());
    println!("| n | f16 | bf16 | f32 | f64 | (TFLOP/s of Gpu::matmul, median of 3 runs) |");
    println!("|---|---|---|---|---|---|");
    for (n, reps) in [(4096usize, 20usize), (8192, 5)] {
        let row = (|| -> Result<String, nbit::Error> {
            Ok(format!(
                "| {n} | {:.1} | {:.1} | {:.1} | {:.1} | |",
                tflops::<f16>(n, reps)?,
                tflops::<bf16>(n, reps)?,
                tflops::<f32>(n, reps)?,
                tflops::<f64>(n, reps / 2 + 1)?
            ))
        })();
        match row {
            Ok(r) => println!("{r}"),
            Err(e) => {
                eprintln!("error: {e}");
                std::process::exit(1);
            }
        }
    }
}
