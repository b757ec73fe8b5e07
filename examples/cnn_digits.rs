//! A small convolutional network on the 8x8 UCI digits (the 64 columns read as one image),
//! trained through the Trainer under the precision named on the command line.
//!
//! `cargo run --release --example cnn_digits -- bf16-mixed` (the default; any precision string
//! Lightning accepts, such as `32-true`, `bf16-true` or `16-true`, and optionally an accelerator
//! after it: `-- 32-true cpu`).

use std::time::Instant;

use nbit::autocast::Autocast;
use nbit::data::{DataLoader, Dataset, Task};
use nbit::nn::{Conv2d, Flatten, Linear, Module, Relu, Reshape, Sequential};
use nbit::prelude::*;
use nbit::tensor::ConvOptions;

const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/data/digits.csv");

/// Pixels from 0..16 to 0..1: a layer of your own is a `Module` with a forward pass.
struct Scale(f64);

impl<P: Precision, D: Backend> Module<P, D> for Scale {
    fn forward(&self, _: &Autocast<P, D>, x: &Tensor<P::Compute, D>) -> Result<Tensor<P::Compute, D>, Error> {
        Ok(x.mul_scalar(self.0))
    }
}

struct Fit {
    train: DataLoader,
    val: DataLoader,
    epochs: u64,
}

impl RunJob for Fit {
    type Output = (f64, f64, f64);

    fn run<P: Precision, D: Runs<P>>(self) -> Result<(f64, f64, f64), Error> {
        let trainer = Trainer::<P, D>::builder()
            .max_epochs(self.epochs)
            .seed(0)
            .build()?;
        let same = ConvOptions {
            padding: (1, 1),
            ..ConvOptions::default()
        };
        let halve = ConvOptions {
            stride: (2, 2),
            ..same
        };
        let mut model = trainer.init_module(|ctx| {
            Ok(Sequential::new()
                .push(Scale(1.0 / 16.0))
                .push(Reshape::new(&[1, 8, 8]))
                .push(Conv2d::new(ctx, "2", 1, 16, (3, 3), same)?)
                .push(Relu)
                .push(Conv2d::new(ctx, "4", 16, 32, (3, 3), halve)?)
                .push(Relu)
                .push(Flatten)
                .push(Linear::new(ctx, "7", 32 * 4 * 4, 64)?)
                .push(Relu)
                .push(Linear::new(ctx, "9", 64, 10)?))
        })?;
        println!("{}", trainer.summary(&mut model));
        let start = Instant::now();
        let report = trainer.fit(&mut model, &self.train, Some(&self.val))?;
        let secs = start.elapsed().as_secs_f64();
        let metrics = trainer.validate(&mut model, &self.val)?;
        Ok((metrics.accuracy(), metrics.loss(), report.samples as f64 / secs))
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let precision = args.first().map_or("bf16-mixed", String::as_str);
    let accelerator = args.get(1).map_or("cpu", String::as_str);
    if let Err(e) = run(precision, accelerator) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run(precision: &str, accelerator: &str) -> Result<(), Error> {
    let data = Dataset::read_csv(std::path::Path::new(DATA), Task::Classification)?;
    let (train, val) = data.split(0.2, 0)?;
    let job = Fit {
        train: DataLoader::new(train, 32)?.shuffle(true).seed(0),
        val: DataLoader::new(val, 256)?,
        epochs: 25,
    };
    let (accuracy, loss, rate) = nbit::launch(precision, accelerator, job)?;
    println!(
        "{precision} on {accelerator}: validation accuracy {:.2}%, loss {loss:.4}, {rate:.0} samples/s",
        100.0 * accuracy
    );
    Ok(())
}
