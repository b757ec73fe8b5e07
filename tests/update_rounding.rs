//! Rounding of updated 16-bit weights (issue 14): compensated updates keep what nearest rounding
//! drops, stochastic rounding is unbiased and reproducible, and both are refused where weights are
//! not 16-bit.

use half::{bf16, f16};
use nbit::Float;
use nbit::nn::Parameter;
use nbit::optim::{AdamW, Optimization, OptimizerState, Sgd, UpdateRounding};
use nbit::prelude::*;

/// `steps` SGD steps (lr `lr`, gradient 1 everywhere) on `n` weights starting at 1.0, under
/// `rounding` with stream `seed`: the weights as f64.
fn sgd_steps<E: Float>(rounding: UpdateRounding, n: usize, steps: usize, lr: f64, seed: u64) -> Vec<f64> {
    let mut p = Parameter::new("w", Tensor::<E>::full(&[n], E::one()));
    let config = Optimization::new(Sgd::new(lr)).update_rounding(rounding);
    let mut opt = OptimizerState::new(config, &[&p]).unwrap().with_seed(seed);
    let g = Tensor::<E>::full(&[n], E::one());
    for _ in 0..steps {
        opt.step(&mut [&mut p], &[Some(g.clone())]).unwrap();
    }
    p.value().to_vec().iter().map(|v| v.as_f64()).collect()
}

#[test]
fn a_compensated_update_recovers_what_nearest_rounding_drops() {
    // A bf16 weight at 1.0 moved down by 2^-10 per step: a quarter of the gap below 1.0 (2^-8),
    // so nearest rounding keeps 1.0 forever. f32 ends at 1 - 1000 * 2^-10 = 0.0234375 (exact).
    let f32_end = sgd_steps::<f32>(UpdateRounding::Nearest, 1, 1000, 2f64.powi(-10), 0)[0];
    assert_eq!(f32_end, 0.0234375);
    assert_eq!(
        sgd_steps::<bf16>(UpdateRounding::Nearest, 1, 1000, 2f64.powi(-10), 0)[0],
        1.0
    );
    assert_eq!(
        sgd_steps::<bf16>(UpdateRounding::Compensated, 1, 1000, 2f64.powi(-10), 0)[0],
        f32_end
    );
    // f16 near 1.0 has a gap of 2^-11 below: steps of 2^-13 stall, and compensation keeps them.
    let f32_end = sgd_steps::<f32>(UpdateRounding::Nearest, 1, 3000, 2f64.powi(-13), 0)[0];
    assert_eq!(
        sgd_steps::<f16>(UpdateRounding::Nearest, 1, 3000, 2f64.powi(-13), 0)[0],
        1.0
    );
    assert_eq!(
        sgd_steps::<f16>(UpdateRounding::Compensated, 1, 3000, 2f64.powi(-13), 0)[0],
        f32_end
    );
}

#[test]
fn compensated_adamw_moves_weights_that_nearest_adamw_leaves_in_place() {
    // AdamW moves each weight by about lr per step: 1e-4 is far below half a bf16 ulp at 1.0.
    let run = |rounding| {
        let mut p = Parameter::new("w", Tensor::<bf16>::full(&[64], bf16::ONE));
        let config = Optimization::new(AdamW::new(1e-4).weight_decay(0.0)).update_rounding(rounding);
        let mut opt = OptimizerState::new(config, &[&p]).unwrap();
        for _ in 0..200 {
            opt.step(&mut [&mut p], &[Some(Tensor::full(&[64], bf16::from_f32(0.5)))])
                .unwrap();
        }
        p.value().to_vec()[0].to_f64()
    };
    assert_eq!(run(UpdateRounding::Nearest), 1.0);
    let moved = run(UpdateRounding::Compensated);
    // 200 steps of about 1e-4 each: 0.98, to within a bf16 ulp (2^-8) of the f32 result.
    assert!((moved - (1.0 - 200.0 * 1e-4)).abs() <= 2f64.powi(-8), "{moved}");
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

#[test]
fn stochastic_rounding_is_unbiased_over_many_draws() {
    // One step of 2^-10 from 1.0 in bf16: down to 1 - 2^-8 with probability 1/4, else 1.0. The
    // mean of 100000 weights is 1 - 2^-10 to within four standard errors (2^-8 * sqrt(3/16 / n)).
    let n = 100_000;
    let one = sgd_steps::<bf16>(UpdateRounding::Stochastic, n, 1, 2f64.powi(-10), 7);
    assert!(one.iter().all(|&v| v == 1.0 || v == 1.0 - 2f64.powi(-8)));
    let se = 2f64.powi(-8) * (3.0 / 16.0 / n as f64).sqrt();
    let err = (mean(&one) - (1.0 - 2f64.powi(-10))).abs();
    assert!(err < 4.0 * se, "bias {err:e}, standard error {se:e}");
    // Over 200 steps the mean follows f32's path (1 - 200 * 2^-10) where nearest never moves.
    let many = sgd_steps::<bf16>(UpdateRounding::Stochastic, 20_000, 200, 2f64.powi(-10), 7);
    let f32_end = 1.0 - 200.0 * 2f64.powi(-10);
    assert!(
        (mean(&many) - f32_end).abs() < 2e-4,
        "{} vs {f32_end}",
        mean(&many)
    );
    // f16: one step of 2^-13 from 1.0 (gap 2^-11 below): down with probability 1/4.
    let f16_one = sgd_steps::<f16>(UpdateRounding::Stochastic, n, 1, 2f64.powi(-13), 7);
    let se = 2f64.powi(-11) * (3.0 / 16.0 / n as f64).sqrt();
    let err = (mean(&f16_one) - (1.0 - 2f64.powi(-13))).abs();
    assert!(err < 4.0 * se, "f16 bias {err:e}, standard error {se:e}");
}

#[test]
fn stochastic_rounding_repeats_from_its_seed() {
    let a = sgd_steps::<bf16>(UpdateRounding::Stochastic, 4096, 5, 2f64.powi(-10), 42);
    let b = sgd_steps::<bf16>(UpdateRounding::Stochastic, 4096, 5, 2f64.powi(-10), 42);
    let c = sgd_steps::<bf16>(UpdateRounding::Stochastic, 4096, 5, 2f64.powi(-10), 43);
    assert_eq!(a, b, "same seed, same draws");
    let differ = a.iter().zip(&c).filter(|(x, y)| x != y).count();
    assert!(
        differ > 1000,
        "another seed draws otherwise: {differ} of 4096 differ"
    );
}

#[test]
fn other_roundings_are_refused_where_weights_are_not_16_bit() {
    let p32 = Parameter::new("w", Tensor::<f32>::zeros(&[2]));
    let config = Optimization::new(AdamW::default()).update_rounding(UpdateRounding::Compensated);
    let msg = OptimizerState::new(config, &[&p32]).unwrap_err().to_string();
    assert!(
        msg.contains("'compensated' with float32 parameters") && msg.contains("bf16-true and 16-true"),
        "{msg}"
    );
    // Through the trainer: bf16-mixed keeps f32 master weights, so fit refuses it.
    let t = Trainer::<Mixed<BF16>, Cpu>::builder()
        .enable_progress_bar(false)
        .build()
        .unwrap();
    let mut m = t
        .init_module(|ctx| MlpModel::new(ctx, &[2, 3], nbit::nn::Task::Regression, config))
        .unwrap();
    let data = nbit::data::Dataset::regression(
        ndarray::Array2::<f64>::zeros((4, 2)),
        ndarray::Array2::zeros((4, 3)),
    );
    let loader = nbit::data::DataLoader::new(data.unwrap(), 2).unwrap();
    let msg = t.fit(&mut m, &loader, None).unwrap_err().to_string();
    assert!(msg.contains("update_rounding"), "{msg}");
}

#[test]
fn compensation_is_optimizer_state_counted_in_the_report_and_the_summary() {
    let t = Trainer::<True<BF16>, Cpu>::builder()
        .enable_progress_bar(false)
        .max_steps(2)
        .build()
        .unwrap();
    let x = ndarray::Array2::from_shape_fn((8, 4), |(i, j)| (i + j) as f64 / 10.0);
    let data = nbit::data::Dataset::classification(x, (0..8).map(|i| i % 2).collect()).unwrap();
    let loader = nbit::data::DataLoader::new(data, 4).unwrap();
    let fit = |rounding| {
        let config = Optimization::new(AdamW::default()).update_rounding(rounding);
        let mut m = t
            .init_module(|ctx| MlpModel::new(ctx, &[4, 8, 2], nbit::nn::Task::Classification, config))
            .unwrap();
        let report = t.fit(&mut m, &loader, None).unwrap();
        (report, t.summary(&mut m))
    };
    let (nearest, s_nearest) = fit(UpdateRounding::Nearest);
    let (comp, s_comp) = fit(UpdateRounding::Compensated);
    let (stoch, _) = fit(UpdateRounding::Stochastic);
    // 4*8+8+8*2+2 = 58 parameters: AdamW holds 2 x 2 bytes each, compensation 2 more.
    assert_eq!(nearest.optimizer_state_bytes, 58 * 4);
    assert_eq!(comp.optimizer_state_bytes, 58 * 6);
    assert_eq!(stoch.optimizer_state_bytes, 58 * 4);
    assert_eq!(
        (s_nearest.optimizer_state_bytes, s_comp.optimizer_state_bytes),
        (58 * 4, 58 * 6)
    );
    assert!(
        s_comp
            .to_string()
            .contains("Optimizer state size (MB) (AdamW, compensated rounding)")
    );
}
