//! The quickstart: train an MLP on real data (UCI handwritten digits, shipped in
//! `examples/data/`) under every precision the CPU supports, and print what each costs and gains.
//!
//! Run with `cargo run --release --example quickstart`.

use std::time::Instant;

use nbit::data::{DataLoader, Dataset, Task};
use nbit::optim::{AdamW, Optimization};
use nbit::plot::{Chart, Series};
use nbit::{Device, DeviceKind, Error, MlpModel, Precision, PrecisionKind, RunJob, Runs, Selection, Trainer};

const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/data/digits.csv");
const EPOCHS: u64 = 20;
const BATCH: usize = 32;
const PLOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/target/quickstart-loss.svg");

/// One row of the table.
struct Row {
    precision: &'static str,
    val_accuracy: f64,
    final_loss: f64,
    samples_per_sec: f64,
    param_mb: f64,
    skipped: u64,
    train_curve: Series,
    val_curve: Option<Series>,
}

/// Trains under whatever precision and device `dispatch` selected.
struct Train<'a> {
    train: &'a Dataset,
    val: &'a Dataset,
}

impl RunJob for Train<'_> {
    type Output = Row;
    fn run<P: Precision, D: Runs<P>>(self) -> Result<Row, Error> {
        let Train { train, val } = self;
        let trainer = Trainer::<P, D>::builder()
            .max_epochs(EPOCHS)
            .enable_progress_bar(false)
            .seed(0)
            .build()?;
        let mut model = trainer.init_module(|ctx| {
            MlpModel::new(
                ctx,
                &[64, 128, 10],
                Task::Classification,
                Optimization::new(AdamW::default()),
            )
        })?;
        // The features held in the dtype the model reads (f32, or bf16 under bf16-true).
        let train_loader = DataLoader::new(train.clone().for_precision::<P>()?, BATCH)?
            .shuffle(true)
            .seed(0);
        let val_loader = DataLoader::new(val.clone().for_precision::<P>()?, 256)?;
        let start = Instant::now();
        let report = trainer.fit(&mut model, &train_loader, Some(&val_loader))?;
        let secs = start.elapsed().as_secs_f64();
        Ok(Row {
            precision: P::NAME,
            val_accuracy: trainer.validate(&mut model, &val_loader)?.accuracy(),
            final_loss: report.final_loss().unwrap_or(f64::NAN),
            samples_per_sec: report.samples as f64 / secs,
            param_mb: trainer.summary(&mut model).size_mb,
            skipped: report.skipped_steps,
            train_curve: nbit::plot::training_loss(P::NAME, &report),
            val_curve: nbit::plot::validation_loss(P::NAME, &report),
        })
    }
}

fn main() -> Result<(), Error> {
    let data = Dataset::read_csv(std::path::Path::new(DATA), Task::Classification)?;
    let (train, val) = data.split(0.2, 0)?;
    println!(
        "UCI handwritten digits (8x8, 10 classes, CC BY 4.0): {} train / {} validation rows",
        train.len(),
        val.len()
    );
    println!(
        "MLP 64-128-10, AdamW (PyTorch defaults), batch {BATCH}, {EPOCHS} epochs, on the CPU ({})\n",
        nbit::Cpu::describe()
    );
    println!(
        "{:<12} {:>10} {:>11} {:>10} {:>9} {:>8}",
        "precision", "val acc", "final loss", "samples/s", "param MB", "skipped"
    );
    let mut curves: Vec<(Series, Option<Series>)> = Vec::new();
    for kind in PrecisionKind::ALL {
        match Selection::new(kind, DeviceKind::Cpu) {
            Ok(sel) => {
                let r = sel.launch(Train {
                    train: &train,
                    val: &val,
                })?;
                println!(
                    "{:<12} {:>9.2}% {:>11.4} {:>10.0} {:>9.4} {:>8}",
                    r.precision,
                    100.0 * r.val_accuracy,
                    r.final_loss,
                    r.samples_per_sec,
                    r.param_mb,
                    r.skipped
                );
                curves.push((r.train_curve, r.val_curve));
            }
            Err(e) => println!("{:<12} refused: {e}", kind.name()),
        }
    }
    // With the `cuda` feature and a GPU that answers: the precision the GPU column exists for.
    match DeviceKind::Gpu.probe() {
        Ok(()) => {
            let r = Selection::new(PrecisionKind::Mixed16, DeviceKind::Gpu)?.launch(Train {
                train: &train,
                val: &val,
            })?;
            println!(
                "{:<12} {:>9.2}% {:>11.4} {:>10.0} {:>9.4} {:>8}   (on {})",
                r.precision,
                100.0 * r.val_accuracy,
                r.final_loss,
                r.samples_per_sec,
                r.param_mb,
                r.skipped,
                nbit::Gpu::describe()
            );
            curves.push((r.train_curve, r.val_curve));
        }
        Err(e) => println!("\n16-mixed on the GPU: not run ({e})"),
    }
    println!(
        "\n16-mixed (fp16 with a loss scaler) needs a CUDA GPU: on the CPU use bf16-mixed, which keeps f32 master\n\
         weights and needs no scaler. In code, Trainer::<Mixed<F16>, Cpu>::new() does not compile."
    );
    println!("param MB follows Lightning's rule: parameters x bits (32 for mixed precisions) / 8 / 1e6.");
    let plot = std::path::Path::new(PLOT);
    let _ = std::fs::create_dir_all(plot.parent().expect("a folder"));
    // One chart per curve with every precision overlaid on a log axis, where their differences
    // (bf16's coarser rounding, 16-true's stall) stay visible after the first epochs.
    let mut train_chart = Chart::new("Training loss by precision", "step", "loss").log_y();
    let mut val_chart = Chart::new("Validation loss by precision", "step", "loss").log_y();
    for (t, v) in curves {
        train_chart = train_chart.series(t);
        if let Some(v) = v {
            val_chart = val_chart.series(v);
        }
    }
    nbit::plot::write_svg(plot, &[train_chart, val_chart])?;
    println!("Training and validation loss of every precision, overlaid: {PLOT}");
    Ok(())
}
