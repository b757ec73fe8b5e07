//! Bit-for-bit against numbers PyTorch itself produced (tests/data/pytorch_reference.json, written
//! by tools/make_pytorch_reference.py with torch 2.15), not against a re-derivation that could share
//! nbit's constants.

use half::bf16;
use nbit::Float;
use nbit::nn::Parameter;
use nbit::optim::{AdamW, Optimization, OptimizerState};
use nbit::prelude::*;
use nbit::scaler::{DynamicScaler, GradScaler};
use serde_json::Value;

fn reference() -> Value {
    let text = include_str!("data/pytorch_reference.json");
    serde_json::from_str(text).expect("tests/data/pytorch_reference.json is JSON")
}

fn ints(v: &Value) -> Vec<u64> {
    v.as_array()
        .expect("an array")
        .iter()
        .map(|x| x.as_u64().expect("a non-negative integer"))
        .collect()
}

#[test]
fn the_dynamic_scaler_matches_torch_amp_update_scale_for_400_steps_with_inexact_factors() {
    let r = &reference()["scaler"];
    let f = |k: &str| r[k].as_f64().unwrap();
    let mut s = DynamicScaler::new(
        f("init_scale") as f32,
        f("growth_factor"),
        f("backoff_factor"),
        r["growth_interval"].as_u64().unwrap() as u32,
    );
    let (flags, scales, trackers) = (
        ints(&r["found_inf"]),
        ints(&r["scale_bits"]),
        ints(&r["growth_tracker"]),
    );
    assert_eq!(flags.len(), 400);
    for (i, ((&inf, &scale), &tracker)) in flags.iter().zip(&scales).zip(&trackers).enumerate() {
        s.update(inf == 1);
        assert_eq!(
            u64::from(s.scale().to_bits()),
            scale,
            "step {i}: nbit {} vs PyTorch {}",
            s.scale(),
            f32::from_bits(scale as u32)
        );
        assert_eq!(u64::from(s.growth_tracker()), tracker, "step {i}");
    }
}

/// `torch.optim.AdamW` over 3 steps on 1000 parameters of dtype `E`, bit for bit after every step,
/// except where PyTorch's own `sqrt` was not correctly rounded (listed by the script: MKL's vector
/// sqrt is accurate to 1 ulp); there, and in the steps after, within 4 ulp.
fn adamw_matches_pytorch<E: Float>(case: &Value, from_bits: fn(u64) -> E) {
    let vals = |v: &Value| ints(v).into_iter().map(from_bits).collect::<Vec<E>>();
    let betas = case["betas"].as_array().unwrap();
    let adamw = AdamW {
        lr: case["lr"].as_f64().unwrap(),
        betas: (betas[0].as_f64().unwrap(), betas[1].as_f64().unwrap()),
        eps: case["eps"].as_f64().unwrap(),
        weight_decay: case["weight_decay"].as_f64().unwrap(),
    };
    let init = vals(&case["initial"]);
    let mut param = Parameter::new("w", Tensor::<E>::from_vec(&[init.len()], init).unwrap());
    let mut opt = OptimizerState::new(Optimization::new(adamw), &[&param]).unwrap();
    let grads = case["grads"].as_array().unwrap();
    let after = case["after"].as_array().unwrap();
    let inexact = case["sqrt_inexact"].as_array().unwrap();
    let mut pytorch_off = std::collections::BTreeSet::new();
    for (t, ((g, want), off)) in grads.iter().zip(after).zip(inexact).enumerate() {
        let g = vals(g);
        opt.step(
            &mut [&mut param],
            &[Some(Tensor::from_vec(&[g.len()], g).unwrap())],
        )
        .unwrap();
        pytorch_off.extend(ints(off));
        let got = param.value().to_vec();
        let mut exact = 0;
        for (i, (a, b)) in got.iter().zip(vals(want)).enumerate() {
            let (a, b) = (a.as_f64(), b.as_f64());
            if pytorch_off.contains(&(i as u64)) {
                let ulp = E::epsilon().as_f64() * b.abs();
                assert!(
                    (a - b).abs() <= 4.0 * ulp,
                    "{:?} step {}: element {i}: {a} vs PyTorch {b}",
                    E::DTYPE,
                    t + 1
                );
            } else {
                assert_eq!(
                    a.to_bits(),
                    b.to_bits(),
                    "{:?} step {}: element {i}: {a} vs PyTorch {b}",
                    E::DTYPE,
                    t + 1
                );
                exact += 1;
            }
        }
        assert!(
            exact >= got.len() - 20,
            "{:?} step {}: only {exact} compared exactly",
            E::DTYPE,
            t + 1
        );
    }
}

#[test]
fn adamw_matches_torch_optim_adamw_bit_for_bit_in_f32() {
    adamw_matches_pytorch::<f32>(&reference()["adamw"]["f32"], |b| f32::from_bits(b as u32));
}

#[test]
fn adamw_matches_torch_optim_adamw_bit_for_bit_in_bf16_true() {
    adamw_matches_pytorch::<bf16>(&reference()["adamw"]["bf16"], |b| bf16::from_bits(b as u16));
}

#[test]
fn the_reference_is_the_issue_s_vector_too() {
    // init 1000, growth 1.1, backoff 0.9, interval 2, found-inf 1,0,0,1,0,0: PyTorch 0x44750666.
    let mut s = DynamicScaler::new(1000.0, 1.1, 0.9, 2);
    for inf in [true, false, false, true, false, false] {
        s.update(inf);
    }
    assert_eq!(s.scale().to_bits(), 0x4475_0666);
}

#[test]
fn sgd_matches_torch_optim_sgd_bit_for_bit_in_f32() {
    use nbit::optim::Sgd;
    for case in reference()["sgd"].as_array().unwrap() {
        let f = |k: &str| case[k].as_f64().unwrap();
        let vals = |v: &Value| {
            ints(v)
                .into_iter()
                .map(|b| f32::from_bits(b as u32))
                .collect::<Vec<_>>()
        };
        let sgd = Sgd::new(f("lr"))
            .momentum(f("momentum"))
            .dampening(f("dampening"))
            .nesterov(case["nesterov"].as_bool().unwrap())
            .weight_decay(f("weight_decay"));
        let init = vals(&case["initial"]);
        let mut param = Parameter::new("w", Tensor::<f32>::from_vec(&[init.len()], init).unwrap());
        let mut opt = OptimizerState::new(Optimization::new(sgd), &[&param]).unwrap();
        let steps = case["grads"]
            .as_array()
            .unwrap()
            .iter()
            .zip(case["after"].as_array().unwrap());
        for (t, (g, want)) in steps.enumerate() {
            let g = vals(g);
            opt.step(
                &mut [&mut param],
                &[Some(Tensor::from_vec(&[g.len()], g).unwrap())],
            )
            .unwrap();
            let got = param.value().to_vec();
            let differ = got
                .iter()
                .zip(vals(want))
                .filter(|(a, b)| a.to_bits() != b.to_bits())
                .count();
            assert_eq!(
                differ,
                0,
                "{sgd:?} step {}: {differ} of 1000 differ from PyTorch",
                t + 1
            );
        }
    }
}
