//! One task, every CPU precision: final loss, parameter and optimizer-state bytes, skipped steps.
//!
//! Run with `cargo bench --bench precisions`. The last row is a precision defined in
//! this file (fp16 compute, f32 master weights, dynamic loss scaling) to show the scaled
//! pipeline on the CPU, where the built-in 16-mixed is refused.

use nbit::data::{DataLoader, Dataset};
use nbit::nn::Task;
use nbit::optim::{Optimization, Sgd};
use nbit::prelude::*;
use nbit::scaler::DynamicScaler;

#[derive(Clone, Copy, Debug, Default)]
struct CpuFp16Amp;

impl Precision for CpuFp16Amp {
    type Param = f32;
    type Compute = half::f16;
    type Full = f32;
    type Complex = num_complex::Complex<f32>;
    type Scaler = DynamicScaler;
    const NAME: &'static str = "cpu-16-mixed*";
}

impl Supports<CpuFp16Amp> for Cpu {}

/// Three noisy clusters in 8 dimensions; deterministic.
fn task() -> DataLoader {
    let mut s = 2024u64;
    let mut noise = || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (s >> 11) as f64 / (1u64 << 53) as f64 - 0.5
    };
    let n = 1200;
    let x = ndarray::Array2::from_shape_fn((n, 8), |(i, j)| {
        ((i % 3 + j) % 4) as f64 * 0.5 - 0.75 + 4.0 * noise()
    });
    let y = (0..n).map(|i| i % 3).collect();
    DataLoader::new(Dataset::classification(x, y).expect("finite"), 32)
        .expect("rows")
        .shuffle(true)
        .seed(1)
}

fn run<P: Precision>(data: &DataLoader, scaler: Option<P::Scaler>) -> Result<(), Error>
where
    Cpu: Supports<P>,
{
    let mut builder = Trainer::<P, Cpu>::builder()
        .max_epochs(10)
        .enable_progress_bar(false)
        .seed(5);
    if let Some(s) = scaler {
        builder = builder.scaler(s);
    }
    let trainer = builder.build()?;
    let opt = Optimization::new(Sgd::new(0.05).momentum(0.9));
    let mut model =
        trainer.init_module(|ctx| MlpModel::new(ctx, &[8, 128, 128, 3], Task::Classification, opt))?;
    let start = std::time::Instant::now();
    let r = trainer.fit(&mut model, data, None)?;
    let secs = start.elapsed().as_secs_f64();
    let last: Vec<f64> = r
        .history
        .iter()
        .filter(|s| s.epoch == r.epochs - 1)
        .map(|s| s.loss)
        .collect();
    let acc = trainer.validate(&mut model, data)?.accuracy();
    println!(
        "{:<14} {:>10.4} {:>9.1}% {:>12} {:>12} {:>8} {:>10.0}",
        P::NAME,
        last.iter().sum::<f64>() / last.len() as f64,
        100.0 * acc,
        r.parameter_bytes,
        r.optimizer_state_bytes,
        r.skipped_steps,
        (data.dataset().len() as f64 * r.epochs as f64) / secs,
    );
    Ok(())
}

fn main() -> Result<(), Error> {
    let data = task();
    println!("MLP 8-128-128-3, SGD(lr=0.05, momentum=0.9), batch 32, 10 epochs, 1200 rows\n");
    println!(
        "{:<14} {:>10} {:>10} {:>12} {:>12} {:>8} {:>10}",
        "precision", "final loss", "train acc", "param bytes", "state bytes", "skipped", "samples/s"
    );
    run::<Mixed<BF16>>(&data, None)?;
    run::<True<F16>>(&data, None)?;
    run::<True<BF16>>(&data, None)?;
    run::<True<F32>>(&data, None)?;
    run::<True<F64>>(&data, None)?;
    // growth_interval 10 instead of 2000, so this short run reaches scales that overflow f16.
    run::<CpuFp16Amp>(&data, Some(DynamicScaler::new(65536.0, 2.0, 0.5, 10)))?;
    println!(
        "\n* defined in this example: fp16 matmuls, f32 master weights, DynamicScaler(init 65536, growth_interval 10)."
    );
    println!("16-mixed itself is refused on the CPU at compile time; use bf16-mixed there.");
    Ok(())
}
