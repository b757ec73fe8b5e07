//! A custom model trained through one generic function with one bound, `D: Runs<P>`, for the
//! precision and accelerator named on the command line (default: bf16-mixed on the CPU).
//!
//! `cargo run --manifest-path examples/user-crate/Cargo.toml -- 32-true cpu`

use nbit::data::{Batch, DataLoader, Dataset};
use nbit::nn::{InitCtx, Linear, Parameter};
use nbit::optim::{AdamW, Optimization};
use nbit::prelude::*;

/// A residual tanh network for regression: `y = out(h + tanh(mid(h)))`, `h = tanh(inp(x))`.
struct Residual<P: Precision, D: Backend> {
    inp: Linear<P, D>,
    mid: Linear<P, D>,
    out: Linear<P, D>,
}

impl<P: Precision, D: Backend> Residual<P, D> {
    fn new(ctx: &mut InitCtx<P, D>, width: usize) -> Result<Self, Error> {
        Ok(Residual {
            inp: Linear::new(ctx, "inp", 1, width)?,
            mid: Linear::new(ctx, "mid", width, width)?,
            out: Linear::new(ctx, "out", width, 1)?,
        })
    }
}

impl<P: Precision, D: Backend> Model<P, D> for Residual<P, D> {
    fn forward(&mut self, ac: &Autocast<P, D>, batch: &Batch) -> Result<Tensor<P::Full, D>, Error> {
        let h = self.inp.forward(ac, &batch.input::<P, D>())?.tanh();
        let h = h.add(&self.mid.forward(ac, &h)?.tanh())?;
        Ok(self.out.forward(ac, &h)?.cast())
    }

    /// A custom loss: mean absolute error (the default would be MSE for values).
    fn loss(
        &mut self,
        ac: &Autocast<P, D>,
        outputs: &Tensor<P::Full, D>,
        batch: &Batch,
    ) -> Result<Tensor<P::Full, D>, Error> {
        let target = batch.values::<P::Full, D>().ok_or(Error::InvalidData("no targets".into()))?;
        ac.l1_loss(outputs, &target)
    }

    fn configure_optimizers(&self) -> Optimization {
        Optimization::new(AdamW::new(0.01))
    }

    fn parameters_mut(&mut self) -> Vec<&mut Parameter<P::Param, D>> {
        let mut p = self.inp.parameters_mut();
        p.extend(self.mid.parameters_mut());
        p.extend(self.out.parameters_mut());
        p
    }
}

/// The generic function: any precision, any device that runs it. One bound.
fn train<P: Precision, D: Runs<P>>(data: &DataLoader) -> Result<(f64, f64), Error> {
    let trainer = Trainer::<P, D>::builder()
        .max_epochs(150)
        .enable_progress_bar(false)
        .seed(1)
        .build()?;
    let mut model = trainer.init_module(|ctx| Residual::new(ctx, 16))?;
    let before = trainer.validate(&mut model, data)?.loss();
    trainer.fit(&mut model, data, None)?;
    Ok((before, trainer.validate(&mut model, data)?.loss()))
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let precision = args.first().map_or("bf16-mixed", String::as_str);
    let accelerator = args.get(1).map_or("cpu", String::as_str);
    // The user's own ndarray 0.16 builds the data; nbit takes it through its own re-export.
    let xs: ndarray::Array1<f64> = ndarray::Array1::linspace(-2.0, 2.0, 128);
    let x = nbit::ndarray::Array2::from_shape_fn((128, 1), |(i, _)| xs[i]);
    let y = nbit::ndarray::Array2::from_shape_fn((128, 1), |(i, _)| (1.5 * xs[i]).sin());
    let run = Dataset::regression(x, y)
        .and_then(|ds| DataLoader::new(ds, 32))
        // `launch!` calls `train` with the types the two strings name.
        .and_then(|data| nbit::launch!(precision, accelerator, |P, D| train::<P, D>(&data)));
    match run {
        Ok((before, after)) => {
            println!("{precision} on {accelerator}: mean absolute error {before:.4} -> {after:.4}");
            if after >= before / 4.0 {
                eprintln!("error: training did not reduce the error fourfold");
                std::process::exit(1);
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}
