//! bf16-true that trains like f32: how updated 16-bit weights are rounded, side by side.
//!
//! Run with `cargo bench --bench update_rounding`. Three tables from one run:
//! 1. the quickstart's setting (UCI digits, MLP 64-128-10, AdamW, batch 32, 20 epochs, 20% held out);
//! 2. a regression where nearest rounding stalls (a linear model, SGD with a small learning rate,
//!    many steps: most updates are below half a bf16 ulp of the weight);
//! 3. the cost of the update at the big MLP size (784-1024-1024-10, batch 256, AdamW), as
//!    samples/s against nearest rounding in the same run.
//!
//! Columns: validation loss and accuracy, parameter plus optimizer-state bytes, samples/s.

use std::time::Instant;

use nbit::data::{DataLoader, Dataset, Task};
use nbit::optim::{AdamW, Optimization, Sgd, UpdateRounding};
use nbit::prelude::*;

const DIGITS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/data/digits.csv");

/// What one training run gives.
struct Outcome {
    val_loss: f64,
    val_accuracy: Option<f64>,
    bytes: usize,
    samples_per_sec: f64,
}

/// One training setting: the model, the data and how long.
struct Setting<'a> {
    sizes: &'a [usize],
    task: Task,
    train: &'a DataLoader,
    val: Option<&'a DataLoader>,
    optimization: Optimization,
    epochs: Option<u64>,
    steps: Option<u64>,
}

fn train<P: Precision>(s: &Setting, rounding: UpdateRounding) -> Result<Outcome, Error>
where
    Cpu: Supports<P>,
{
    let mut b = Trainer::<P, Cpu>::builder().enable_progress_bar(false).seed(0);
    if let Some(e) = s.epochs {
        b = b.max_epochs(e);
    }
    if let Some(n) = s.steps {
        b = b.max_steps(n);
    }
    let trainer = b.build()?;
    let optimization = s.optimization.update_rounding(rounding);
    let mut model = trainer.init_module(|ctx| MlpModel::new(ctx, s.sizes, s.task, optimization))?;
    let start = Instant::now();
    let fit = trainer.fit(&mut model, s.train, None)?;
    let samples_per_sec = fit.samples as f64 / start.elapsed().as_secs_f64();
    let metrics = s.val.map(|v| trainer.validate(&mut model, v)).transpose()?;
    Ok(Outcome {
        val_loss: metrics.map_or(f64::NAN, |m| m.loss()),
        val_accuracy: metrics
            .filter(|_| s.task == Task::Classification)
            .map(|m| m.accuracy()),
        bytes: fit.parameter_bytes + fit.optimizer_state_bytes,
        samples_per_sec,
    })
}

/// The five rows of a table: 32-true, bf16-mixed, and bf16-true under each rounding.
fn table(title: &str, s: &Setting) -> Result<Vec<(String, Outcome)>, Error> {
    println!("{title}\n");
    println!(
        "{:<28} {:>10} {:>9} {:>22} {:>10}",
        "precision", "val loss", "val acc", "params + state bytes", "samples/s"
    );
    let mut rows = vec![
        (
            "32-true".to_string(),
            train::<True<F32>>(s, UpdateRounding::Nearest)?,
        ),
        (
            "bf16-mixed".to_string(),
            train::<Mixed<BF16>>(s, UpdateRounding::Nearest)?,
        ),
    ];
    for r in UpdateRounding::ALL {
        rows.push((format!("bf16-true, {r}"), train::<True<BF16>>(s, r)?));
    }
    for (name, o) in &rows {
        let acc = o
            .val_accuracy
            .map_or("-".into(), |a| format!("{:.2}%", 100.0 * a));
        println!(
            "{name:<28} {:>10.6} {acc:>9} {:>22} {:>10.0}",
            o.val_loss, o.bytes, o.samples_per_sec
        );
    }
    Ok(rows)
}

/// How far bf16-true compensated lands from 32-true.
fn compare(rows: &[(String, Outcome)]) {
    let get = |name: &str| &rows.iter().find(|(n, _)| n == name).expect("a row").1;
    let (f32_, comp) = (get("32-true"), get("bf16-true, compensated"));
    print!(
        "\nbf16-true compensated vs 32-true: validation loss {:+.1}%",
        100.0 * (comp.val_loss / f32_.val_loss - 1.0)
    );
    if let (Some(a), Some(b)) = (comp.val_accuracy, f32_.val_accuracy) {
        print!(", accuracy {:+.2} points", 100.0 * (a - b));
    }
    println!("\n");
}

/// `y = x . w + 0.5 + noise` with 8 features: a linear model (no hidden layer) fits it to the
/// noise. The noise (variance 8.3e-4) is wide enough that bf16's rounding of the predictions
/// (|y| up to 5: an ulp of 2^-6, variance 2e-5) is not what limits the fit, so the table measures
/// the update's rounding.
fn linear_data(rows: usize, seed: u64) -> Result<Dataset, Error> {
    let mut s = seed;
    let mut next = || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (s >> 11) as f64 / (1u64 << 53) as f64
    };
    let w = [0.9, -0.7, 1.2, 0.6, -1.1, 0.8, 1.0, -0.95];
    let x = ndarray::Array2::from_shape_fn((rows, 8), |_| 2.0 * next() - 1.0);
    let y = ndarray::Array2::from_shape_fn((rows, 1), |(i, _)| {
        let clean: f64 = (0..8).map(|j| x[[i, j]] * w[j]).sum::<f64>() + 0.5;
        clean + 0.1 * (next() - 0.5)
    });
    Dataset::regression(x, y)
}

fn main() -> Result<(), Error> {
    println!(
        "CPU: {}\n",
        std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|c| c
                .lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l[13..].trim().to_string()))
            .unwrap_or_else(|| "unknown".into())
    );
    // 1. The quickstart's setting.
    let digits = Dataset::read_csv(std::path::Path::new(DIGITS), Task::Classification)?;
    let (train_rows, val_rows) = digits.split(0.2, 0)?;
    let train_loader = DataLoader::new(train_rows, 32)?.shuffle(true);
    let val_loader = DataLoader::new(val_rows, 256)?;
    let rows = table(
        "Quickstart setting: digits, MLP 64-128-10, AdamW (PyTorch defaults), batch 32, 20 epochs",
        &Setting {
            sizes: &[64, 128, 10],
            task: Task::Classification,
            train: &train_loader,
            val: Some(&val_loader),
            optimization: Optimization::new(AdamW::default()),
            epochs: Some(20),
            steps: None,
        },
    )?;
    compare(&rows);

    // 2. A regression where nearest rounding stalls.
    let train_loader = DataLoader::new(linear_data(2000, 1)?, 50)?.shuffle(true);
    let val_loader = DataLoader::new(linear_data(500, 2)?, 250)?;
    let rows = table(
        "Regression where nearest stalls: y = x.w + 0.5 + noise (8 features, noise uniform in +-0.05, \
         variance 8.3e-4),\nlinear model, SGD lr 0.002, batch 50, 100 epochs (4000 steps)",
        &Setting {
            sizes: &[8, 1],
            task: Task::Regression,
            train: &train_loader,
            val: Some(&val_loader),
            optimization: Optimization::new(Sgd::new(0.002)),
            epochs: Some(100),
            steps: None,
        },
    )?;
    compare(&rows);

    // 3. The cost of the update at the big MLP size.
    let x =
        ndarray::Array2::from_shape_fn((2048, 784), |(i, j)| ((i * 31 + j * 17) % 97) as f64 / 97.0 - 0.5);
    let y = (0..2048).map(|i| i % 10).collect();
    let big = DataLoader::new(Dataset::classification(x, y)?, 256)?;
    let setting = Setting {
        sizes: &[784, 1024, 1024, 10],
        task: Task::Classification,
        train: &big,
        val: None,
        optimization: Optimization::new(AdamW::default()),
        epochs: None,
        steps: Some(16),
    };
    println!("Update cost at the big MLP size: 784-1024-1024-10, batch 256, AdamW, 16 steps, bf16-true\n");
    println!("{:<14} {:>10} {:>18}", "rounding", "samples/s", "vs nearest");
    // Interleaved, twice, so that drift on a shared machine hits every option alike.
    let mut best = [0.0f64; 3];
    for _ in 0..2 {
        for (i, r) in UpdateRounding::ALL.into_iter().enumerate() {
            best[i] = best[i].max(train::<True<BF16>>(&setting, r)?.samples_per_sec);
        }
    }
    for (i, r) in UpdateRounding::ALL.into_iter().enumerate() {
        println!("{:<14} {:>10.0} {:>17.3}x", r.name(), best[i], best[i] / best[0]);
    }
    println!("\n(best of two interleaved runs each; a ratio of 0.9 means the update costs 10% of step time)");
    Ok(())
}
