//! A complex-valued model trained with the Trainer under 32-true and 64-true: fit the residues of
//! a linear system's frequency response `H(w) = sum_k r_k / (i w - p_k)` from 400 samples, with the
//! poles `p_k` known. The residues are complex parameters (complex64 under 32-true, complex128
//! under 64-true), trained as their real and imaginary parts, as PyTorch's optimizers do.
//!
//! Run with `cargo run --release --example complex_fit`. It prints the relative error of the
//! learned residues for each precision.

use nbit::data::{Batch, DataLoader, Dataset};
use nbit::dtype::ComplexElement;
use nbit::nn::{InitCtx, Parameter};
use nbit::optim::{Optimization, Sgd};
use nbit::prelude::*;
use nbit::{Float, Metrics, StepInfo};
use num_complex::Complex;

const POLES: [(f64, f64); 4] = [(-0.5, 2.0), (-0.5, -2.0), (-1.0, 5.0), (-2.0, 0.5)];
const RESIDUES: [(f64, f64); 4] = [(1.0, -0.5), (1.0, 0.5), (-0.3, 2.0), (0.7, 0.0)];

fn basis(w: f64) -> [Complex<f64>; 4] {
    POLES.map(|(a, b)| Complex::new(1.0, 0.0) / (Complex::new(0.0, w) - Complex::new(a, b)))
}

fn samples() -> Dataset {
    let n = 400;
    let w = ndarray::Array2::from_shape_fn((n, 1), |(i, _)| -10.0 + 20.0 * i as f64 / (n - 1) as f64);
    let h = ndarray::Array2::from_shape_fn((n, 2), |(i, part)| {
        let z: Complex<f64> = basis(w[[i, 0]])
            .iter()
            .zip(RESIDUES)
            .map(|(b, (re, im))| b * Complex::new(re, im))
            .sum();
        if part == 0 { z.re } else { z.im }
    });
    Dataset::regression(w, h).expect("finite samples")
}

/// The residues as two real parameters; the forward pass makes them one complex vector.
struct Residues<P: Precision> {
    re: Parameter<P::Param>,
    im: Parameter<P::Param>,
}

impl<P: Precision> Residues<P>
where
    P::Complex: ComplexElement<Real = P::Param>,
{
    fn new(ctx: &mut InitCtx<P>) -> Result<Self, Error> {
        Ok(Residues {
            re: ctx.parameter("residues.re", &[4, 1], 0.1)?,
            im: ctx.parameter("residues.im", &[4, 1], 0.1)?,
        })
    }

    /// Squared error |H_pred - H|^2 per sample, in the precision's real dtype.
    fn squared_error(&self, batch: &Batch) -> Result<Tensor<P::Param>, Error> {
        let w = batch.features::<f64, Cpu>().to_vec();
        let n = w.len();
        let parts = |f: fn(Complex<f64>) -> f64| {
            let v = w
                .iter()
                .flat_map(|&w| basis(w).map(f))
                .map(P::Param::from_f64)
                .collect();
            Tensor::<P::Param>::from_vec(&[n, 4], v)
        };
        let b = Tensor::<P::Complex>::complex(&parts(|z| z.re)?, &parts(|z| z.im)?)?;
        let h = batch.values::<f64, Cpu>().expect("regression targets").to_vec();
        let target = |part: usize| {
            Tensor::<P::Param>::from_vec(
                &[n, 1],
                (0..n).map(|i| P::Param::from_f64(h[2 * i + part])).collect(),
            )
        };
        let h = Tensor::<P::Complex>::complex(&target(0)?, &target(1)?)?;
        let r = Tensor::<P::Complex>::complex(self.re.value(), self.im.value())?;
        Ok(b.matmul(&r)?.sub(&h)?.abs().powf(2.0))
    }

    fn error(&self) -> f64 {
        let (re, im) = (self.re.value().to_vec(), self.im.value().to_vec());
        let (mut num, mut den) = (0.0, 0.0);
        for k in 0..4 {
            let d = Complex::new(re[k].as_f64(), im[k].as_f64()) - Complex::new(RESIDUES[k].0, RESIDUES[k].1);
            num += d.norm_sqr();
            den += RESIDUES[k].0.powi(2) + RESIDUES[k].1.powi(2);
        }
        (num / den).sqrt()
    }
}

impl<P: Precision> Model<P> for Residues<P>
where
    P::Complex: ComplexElement<Real = P::Param>,
{
    fn training_step(
        &mut self,
        _: &Autocast<P>,
        batch: &Batch,
        _: &StepInfo,
    ) -> Result<Tensor<P::Full>, Error> {
        Ok(self.squared_error(batch)?.mean().cast::<P::Full>())
    }
    fn validation_step(&mut self, _: &Autocast<P>, batch: &Batch) -> Result<Metrics, Error> {
        let loss = self.squared_error(batch)?.mean().item()?.as_f64();
        Ok(Metrics {
            loss_sum: loss * batch.len() as f64,
            correct: 0,
            count: batch.len(),
        })
    }
    fn predict_step(&mut self, _: &Autocast<P>, batch: &Batch) -> Result<Tensor<P::Full>, Error> {
        Ok(self.squared_error(batch)?.cast::<P::Full>())
    }
    fn configure_optimizers(&self) -> Optimization {
        Optimization::new(Sgd::new(0.5).momentum(0.9))
    }
    fn parameters_mut(&mut self) -> Vec<&mut Parameter<P::Param>> {
        vec![&mut self.re, &mut self.im]
    }
}

fn run<P: Precision>(data: &DataLoader) -> Result<(), Error>
where
    Cpu: Supports<P>,
    P::Complex: ComplexElement<Real = P::Param>,
{
    let trainer = Trainer::<P, Cpu>::builder()
        .max_epochs(3000)
        .enable_progress_bar(false)
        .build()?;
    let mut model = trainer.init_module(Residues::<P>::new)?;
    let report = trainer.fit(&mut model, data, None)?;
    println!(
        "{:<10} {:<11} {:>14.3e} {:>14.3e}",
        P::NAME,
        <P::Complex as Element>::DTYPE.name(),
        report.history.last().map_or(f64::NAN, |s| s.loss),
        model.error()
    );
    Ok(())
}

fn main() -> Result<(), Error> {
    let data = DataLoader::new(samples(), 400)?;
    println!(
        "Residues of H(w) = sum_k r_k / (iw - p_k) from 400 samples, SGD(0.5, momentum 0.9), 3000 full-batch steps\n"
    );
    println!(
        "{:<10} {:<11} {:>14} {:>14}",
        "precision", "parameters", "final loss", "residue error"
    );
    run::<True<F32>>(&data)?;
    run::<True<F64>>(&data)?;
    println!("\nresidue error = ||r - r_true|| / ||r_true||");
    Ok(())
}
