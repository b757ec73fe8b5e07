//! Numerics that a careless 16-bit implementation gets wrong: accumulation, single rounding,
//! half-precision results against f64, IEEE special values, and shape errors as values.

use half::{bf16, f16};
use nbit::prelude::*;
use nbit::{Error, Float};

fn ones<E: Float>(shape: &[usize]) -> Tensor<E> {
    Tensor::full(shape, E::one())
}

#[test]
fn sixteen_bit_running_sums_would_stall_but_ours_do_not() {
    // What a 16-bit accumulator gives: bf16 stops at 256, f16 at 2048.
    let naive_bf16 = (0..4096).fold(bf16::ZERO, |s, _| s + bf16::ONE);
    let naive_f16 = (0..4096).fold(f16::ZERO, |s, _| s + f16::ONE);
    assert_eq!((naive_bf16.to_f32(), naive_f16.to_f32()), (256.0, 2048.0));

    assert_eq!(ones::<bf16>(&[4096]).sum().item().unwrap().to_f32(), 4096.0);
    assert_eq!(ones::<f16>(&[4096]).sum().item().unwrap().to_f32(), 4096.0);
    assert_eq!(ones::<bf16>(&[4096]).mean().item().unwrap().to_f32(), 1.0);
    assert_eq!(
        ones::<bf16>(&[2, 4096]).sum_axis(1, false).unwrap().to_vec(),
        vec![bf16::from_f32(4096.0); 2]
    );
    // Under bf16-true the fp32-class ops run in bf16 but still accumulate wide.
    assert_eq!(
        Autocast::<True<BF16>>::new()
            .sum(&ones::<bf16>(&[4096]))
            .item()
            .unwrap()
            .to_f32(),
        4096.0
    );
}

#[test]
fn half_precision_gemms_accumulate_in_f32() {
    let a = ones::<bf16>(&[1, 4096]);
    let b = ones::<bf16>(&[4096, 1]);
    assert_eq!(a.matmul(&b).unwrap().item().unwrap().to_f32(), 4096.0);
    let a = ones::<f16>(&[1, 4096]);
    let b = ones::<f16>(&[4096, 1]);
    assert_eq!(a.matmul(&b).unwrap().item().unwrap().to_f32(), 4096.0);
    // 4096 terms of (1 + 2^-7)^2 sum to 4160.03..., which rounds to 4160 in bf16 (not 256 or a stall).
    let x = Tensor::<bf16>::full(&[1, 4096], bf16::from_f32(1.0 + 1.0 / 128.0));
    let y = Tensor::<bf16>::full(&[4096, 1], bf16::from_f32(1.0 + 1.0 / 128.0));
    assert_eq!(x.matmul(&y).unwrap().item().unwrap().to_f32(), 4160.0);
}

#[test]
fn softmax_and_losses_use_wide_denominators() {
    let p = Tensor::<bf16>::zeros(&[1, 4096]).softmax();
    assert!(p.to_vec().iter().all(|v| v.to_f32() == 1.0 / 4096.0));
    let ce = Tensor::<bf16>::zeros(&[2, 1000])
        .cross_entropy(&[3, 999])
        .unwrap();
    let exact = 1000f64.ln();
    assert_eq!(
        ce.item().unwrap(),
        bf16::from_f64(exact),
        "ln(1000) rounded once to bf16"
    );
}

#[test]
fn log_softmax_keeps_the_row_sum_and_its_log_in_the_element_type_as_pytorch_does() {
    // Expected values are torch 2.15's torch.log_softmax on CPU for these rows. Rounding
    // x - max - ln(sum) once would give -0.9375 (bf16) and -1.2939453125 (f16) instead.
    fn log_softmax<E: Float>(row: [f64; 3]) -> Vec<f64> {
        let t = Tensor::<E>::from_vec(&[1, 3], row.map(E::from_f64).to_vec()).unwrap();
        t.log_softmax().to_vec().iter().map(|v| v.as_f64()).collect()
    }
    assert_eq!(
        log_softmax::<bf16>([0.0, 0.0, 0.25]),
        [-1.1875, -1.1875, -0.94140625]
    );
    assert_eq!(
        log_softmax::<f16>([0.0, 0.0, 0.5]),
        [-1.294921875, -1.294921875, -0.79443359375]
    );
}

/// Deterministic values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f64> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            2.0 * ((s >> 11) as f64 / (1u64 << 53) as f64) - 1.0
        })
        .collect()
}

/// max |C_E - C_f64| / max |C_f64| for a 64x256 @ 256x48 product of E-representable inputs.
fn gemm_error<E: Float>() -> f64 {
    let a: Vec<E> = values(64 * 256, 1).into_iter().map(E::from_f64).collect();
    let b: Vec<E> = values(256 * 48, 2).into_iter().map(E::from_f64).collect();
    let wide = |v: &[E]| v.iter().map(|x| x.as_f64()).collect::<Vec<_>>();
    let exact = Tensor::<f64>::from_vec(&[64, 256], wide(&a))
        .unwrap()
        .matmul(&Tensor::<f64>::from_vec(&[256, 48], wide(&b)).unwrap())
        .unwrap()
        .to_vec();
    let got = Tensor::<E>::from_vec(&[64, 256], a)
        .unwrap()
        .matmul(&Tensor::from_vec(&[256, 48], b).unwrap())
        .unwrap();
    let scale = exact.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    got.to_vec()
        .iter()
        .zip(&exact)
        .map(|(g, e)| (g.as_f64() - e).abs())
        .fold(0.0, f64::max)
        / scale
}

#[test]
fn half_precision_results_are_within_per_precision_tolerance_of_f64() {
    // Tolerances: one output rounding (bf16 2^-8, f16 2^-11, f32 2^-24) plus f32 accumulation.
    let (e_bf16, e_f16, e_f32) = (gemm_error::<bf16>(), gemm_error::<f16>(), gemm_error::<f32>());
    eprintln!("GEMM max error / max value: bf16 {e_bf16:e}, f16 {e_f16:e}, f32 {e_f32:e}");
    assert!(e_bf16 <= 4e-3, "bf16 GEMM error {e_bf16:e}");
    assert!(e_f16 <= 6e-4, "f16 GEMM error {e_f16:e}");
    assert!(e_f32 <= 2e-6, "f32 GEMM error {e_f32:e}");
    assert!(
        e_bf16 > e_f16 && e_f16 > e_f32,
        "precision ordering {e_bf16:e} {e_f16:e} {e_f32:e}"
    );
}

#[test]
fn element_wise_kernels_round_once() {
    // gelu in bf16 equals the f32 result rounded once to bf16, for every input tried.
    let xs: Vec<f32> = (0..2000).map(|i| -6.0 + i as f32 * 0.006).collect();
    let t = Tensor::<bf16>::from_vec(&[xs.len()], xs.iter().map(|&x| bf16::from_f32(x)).collect()).unwrap();
    for (x, y) in t.to_vec().iter().zip(t.gelu().to_vec()) {
        let x = x.to_f32();
        let want = bf16::from_f32(0.5 * x * (1.0 + libm::erff(x / std::f32::consts::SQRT_2)));
        assert_eq!(y, want, "gelu({x})");
    }
}

/// 1000 values (three full 256-element chunks of the f16 kernels and a partial one) spread over
/// [-4, 4), with some of each sign and size.
fn spread(seed: u64) -> Vec<f32> {
    values(1000, seed).iter().map(|v| 4.0 * *v as f32).collect()
}

#[test]
fn f16_chunked_kernels_equal_the_scalar_formula_rounded_once() {
    // f16 kernels widen and round whole chunks with F16C; every result must still be the f32
    // formula on the widened inputs, rounded once, element by element.
    let (xs, ys) = (spread(11), spread(12));
    let h = |v: &[f32]| Tensor::<f16>::from_vec(&[v.len()], v.iter().map(|&x| f16::from_f32(x)).collect());
    let (x, y) = (h(&xs).unwrap(), h(&ys).unwrap());
    let pairs: Vec<(f32, f32)> = x
        .to_vec()
        .iter()
        .zip(y.to_vec())
        .map(|(a, b)| (a.to_f32(), b.to_f32()))
        .collect();
    let check = |name: &str, got: Tensor<f16>, want: &dyn Fn(f32, f32) -> f32| {
        for ((a, b), g) in pairs.iter().zip(got.to_vec()) {
            assert_eq!(
                g.to_bits(),
                f16::from_f32(want(*a, *b)).to_bits(),
                "{name}({a}, {b})"
            );
        }
    };
    check("tanh", x.tanh(), &|a, _| a.tanh());
    check("gelu", x.gelu(), &|a, _| {
        0.5 * a * (1.0 + libm::erff(a / std::f32::consts::SQRT_2))
    });
    check("mul", x.mul(&y).unwrap(), &|a, b| a * b);
    check("div", x.div(&y).unwrap(), &|a, b| a / b);
    // An outer product: every entry is one exact f32 product, rounded once to f16.
    let cols = y.reshape(&[1000, 1]).unwrap().to_vec()[..8].to_vec();
    let outer = x
        .reshape(&[1000, 1])
        .unwrap()
        .matmul(&Tensor::from_vec(&[1, 8], cols.clone()).unwrap())
        .unwrap();
    for (i, row) in outer.to_vec().chunks(8).enumerate() {
        for (j, g) in row.iter().enumerate() {
            let want = f16::from_f32(pairs[i].0 * cols[j].to_f32());
            assert_eq!(g.to_bits(), want.to_bits(), "outer[{i}][{j}]");
        }
    }
}

/// Asserts `got` and `want` are the same values bit for bit, naming the first element that is not.
fn same_bits<E: Float>(got: &[E], want: &[E], what: &str) {
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.as_f64().to_bits(), w.as_f64().to_bits(), "{what}: element {i}");
    }
}

/// One AdamW step as PyTorch's in-place ops take it, element by element in f32: decay rounded
/// to the parameter dtype, `exp_avg` (dtype `E`) rounded as stored, `exp_avg_sq` and the
/// denominator rounded (`round_v`) after each op that writes them, the update reading the stored
/// moments. `1 - beta` is taken in f64, as Python computes it; `lerp_` and `addcmul_` fuse their
/// multiply-add, as PyTorch's vectorised kernels do. (tests/pytorch_reference.rs checks
/// f32 and bf16 against PyTorch's own numbers.)
fn adamw_reference<E: Float>(
    p: &mut [E],
    g: &[E],
    m: &mut [E],
    v: &mut [f32],
    t: i32,
    round_v: fn(f32) -> f32,
) {
    let (lr, b1, b2, eps, wd) = (1e-3f64, 0.9f64, 0.999f64, 1e-8f64, 1e-2f64);
    let (decay, step, b2s) = (
        (1.0 - lr * wd) as f32,
        (lr / (1.0 - b1.powf(t as f64))) as f32,
        (1.0 - b2.powf(t as f64)).sqrt() as f32,
    );
    let (one_minus_b1, one_minus_b2) = ((1.0 - b1) as f32, (1.0 - b2) as f32);
    let r = |x: f32| E::from_f32(x).as_f32();
    for i in 0..p.len() {
        let gi = g[i].as_f32();
        let pa = r(p[i].as_f32() * decay);
        m[i] = E::from_f32(one_minus_b1.mul_add(gi - m[i].as_f32(), m[i].as_f32()));
        v[i] = round_v((one_minus_b2 * gi).mul_add(gi, round_v(v[i] * b2 as f32)));
        let denom = round_v(round_v(round_v(v[i].sqrt()) / b2s) + eps as f32);
        p[i] = E::from_f32(pa - step * m[i].as_f32() / denom);
    }
}

fn adamw_matches_reference<E: Float>(round_v: fn(f32) -> f32) {
    use nbit::nn::Parameter;
    use nbit::optim::{AdamW, Optimization, OptimizerState};
    let to = |v: Vec<f32>| v.into_iter().map(E::from_f32).collect::<Vec<E>>();
    let (mut p, mut m, mut v) = (to(spread(21)), vec![E::zero(); 1000], vec![0f32; 1000]);
    let mut param = Parameter::new("w", Tensor::<E>::from_vec(&[1000], p.clone()).unwrap());
    let mut opt = OptimizerState::new(Optimization::new(AdamW::default()), &[&param]).unwrap();
    for t in 1..=3 {
        // Gradients up to 0.4, 0.04, then 0.004: small ones are where an f16 second moment would
        // underflow.
        let g = to(spread(30 + t as u64)
            .iter()
            .map(|x| x * 10f32.powi(-(t % 4)))
            .collect());
        opt.step(
            &mut [&mut param],
            &[Some(Tensor::from_vec(&[1000], g.clone()).unwrap())],
        )
        .unwrap();
        adamw_reference(&mut p, &g, &mut m, &mut v, t, round_v);
        same_bits(&param.value().to_vec(), &p, &format!("{:?} step {t}", E::DTYPE));
    }
}

/// SGD steps as PyTorch's tensor ops take them, element by element in f32, each tensor PyTorch
/// keeps (the decayed gradient, the momentum buffer, the Nesterov gradient) rounded to `E`, each
/// `add(x, alpha=a)` fused. (tests/pytorch_reference.rs checks f32 against PyTorch's own numbers.)
fn sgd_matches_reference<E: Float>(momentum: f64, dampening: f64, nesterov: bool, wd: f64) {
    use nbit::nn::Parameter;
    use nbit::optim::{Optimization, OptimizerState, Sgd};
    let to = |v: Vec<f32>| v.into_iter().map(E::from_f32).collect::<Vec<E>>();
    let r = |x: f32| E::from_f32(x).as_f32();
    let (neg_lr, mom, damp, wd32) = (-0.05f32, momentum as f32, (1.0 - dampening) as f32, wd as f32);
    let mut p = to(spread(41));
    let mut buf = vec![0f32; p.len()];
    let mut param = Parameter::new("w", Tensor::<E>::from_vec(&[1000], p.clone()).unwrap());
    let sgd = Sgd::new(0.05)
        .momentum(momentum)
        .dampening(dampening)
        .nesterov(nesterov)
        .weight_decay(wd);
    let mut opt = OptimizerState::new(Optimization::new(sgd), &[&param]).unwrap();
    for t in 1..=3 {
        let g = to(spread(50 + t).iter().map(|x| x / 4.0).collect());
        opt.step(
            &mut [&mut param],
            &[Some(Tensor::from_vec(&[1000], g.clone()).unwrap())],
        )
        .unwrap();
        for i in 0..p.len() {
            let pa = p[i].as_f32();
            // PyTorch's add(x, alpha=a) is a fused multiply-add.
            let d = if wd != 0.0 {
                r(wd32.mul_add(pa, g[i].as_f32()))
            } else {
                g[i].as_f32()
            };
            let s = if momentum == 0.0 {
                d
            } else {
                buf[i] = if t == 1 {
                    d
                } else {
                    r(damp.mul_add(d, r(mom * buf[i])))
                };
                if nesterov {
                    r(mom.mul_add(buf[i], d))
                } else {
                    buf[i]
                }
            };
            p[i] = E::from_f32(neg_lr.mul_add(s, pa));
        }
        let what = format!(
            "{:?} momentum {momentum} nesterov {nesterov} wd {wd}: step {t}",
            E::DTYPE
        );
        same_bits(&param.value().to_vec(), &p, &what);
    }
}

#[test]
fn sgd_on_16_bit_parameters_rounds_like_pytorchs_tensor_ops() {
    fn all<E: Float>() {
        sgd_matches_reference::<E>(0.0, 0.0, false, 0.0);
        sgd_matches_reference::<E>(0.0, 0.0, false, 0.01);
        sgd_matches_reference::<E>(0.9, 0.0, false, 0.0);
        sgd_matches_reference::<E>(0.9, 0.1, false, 0.01);
        sgd_matches_reference::<E>(0.9, 0.0, true, 0.01);
    }
    all::<f16>();
    all::<bf16>();
    all::<f32>();
}

#[test]
fn adamw_on_16_bit_parameters_rounds_like_pytorchs_in_place_ops() {
    // 16-true keeps exp_avg_sq in f32; bf16-true keeps it in bf16.
    adamw_matches_reference::<f16>(|x| x);
    adamw_matches_reference::<bf16>(|x| bf16::from_f32(x).to_f32());
    adamw_matches_reference::<f32>(|x| x);
}

#[test]
fn nan_and_inf_propagate_as_ieee_says() {
    let t = Tensor::<f32>::from_vec(&[4], vec![f32::NAN, f32::INFINITY, 0.0, -1.0]).unwrap();
    let relu = t.relu().to_vec();
    assert!(relu[0].is_nan() && relu[1] == f32::INFINITY && relu[3] == 0.0);
    let log = t.log().to_vec();
    assert!(log[0].is_nan() && log[1] == f32::INFINITY && log[2] == f32::NEG_INFINITY && log[3].is_nan());
    assert!(t.sum().item().unwrap().is_nan());
    assert!(t.has_non_finite());
    let sm = Tensor::<f32>::from_vec(&[1, 2], vec![f32::INFINITY, 1.0])
        .unwrap()
        .softmax()
        .to_vec();
    assert!(sm[0].is_nan(), "inf - inf is NaN, as in PyTorch");
    let m = Tensor::<bf16>::from_vec(&[1, 2], vec![bf16::NAN, bf16::ONE]).unwrap();
    assert!(m.matmul(&ones::<bf16>(&[2, 1])).unwrap().item().unwrap().is_nan());
    assert!(!ones::<f16>(&[3]).has_non_finite());
}

#[test]
fn shape_errors_name_both_shapes() {
    let a = Tensor::<f32>::zeros(&[2, 3]);
    let b = Tensor::<f32>::zeros(&[4, 5]);
    let msg = a.matmul(&b).unwrap_err().to_string();
    assert!(msg.contains("[2, 3]") && msg.contains("[4, 5]"), "{msg}");
    let msg = Tensor::<f32>::zeros(&[3, 4])
        .add(&Tensor::zeros(&[5]))
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("[3, 4]") && msg.contains("[5]") && msg.contains("broadcast"),
        "{msg}"
    );
    let msg = a.linear(&Tensor::zeros(&[7, 4]), None).unwrap_err().to_string();
    assert!(msg.contains("[2, 3]") && msg.contains("[7, 4]"), "{msg}");
    assert!(a.reshape(&[5]).unwrap_err().to_string().contains("[5]"));
    assert!(matches!(
        Tensor::<f32>::from_vec(&[2, 2], vec![1.0; 3]),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(a.mse_loss(&Tensor::zeros(&[3, 2])).is_err());
    assert!(a.sum_axis(2, false).is_err());
    assert!(a.backward().unwrap_err().to_string().contains("one-element"));
}

#[test]
fn bad_targets_and_probabilities_are_errors() {
    let logits = Tensor::<f32>::zeros(&[2, 3]);
    let msg = logits.cross_entropy(&[0, 3]).unwrap_err().to_string();
    assert!(msg.contains("target 3 at row 1") && msg.contains("0..3"), "{msg}");
    assert!(logits.cross_entropy(&[0]).is_err());
    let msg = logits.dropout(1.5, 0).unwrap_err().to_string();
    assert!(msg.contains("p = 1.5"), "{msg}");
}

#[test]
fn dropout_is_seeded_and_unbiased() {
    let x = ones::<f32>(&[100, 100]);
    let a = x.dropout(0.25, 42).unwrap().to_vec();
    assert_eq!(a, x.dropout(0.25, 42).unwrap().to_vec());
    assert_ne!(a, x.dropout(0.25, 43).unwrap().to_vec());
    let kept = a.iter().filter(|v| **v != 0.0).count() as f64 / 10_000.0;
    assert!((kept - 0.75).abs() < 0.02, "kept {kept}");
    assert!(a.iter().all(|v| *v == 0.0 || (*v - 4.0 / 3.0).abs() < 1e-6));
    assert_eq!(x.dropout(0.0, 1).unwrap().to_vec(), x.to_vec());
}

#[test]
fn complex_tensors_hold_complex128() {
    use num_complex::Complex;
    let z = Tensor::<ComplexOf<True<F64>>>::from_vec(
        &[2],
        vec![Complex::new(1.0, 2.0), Complex::new(-0.5, 0.25)],
    )
    .unwrap();
    assert_eq!(z.dtype(), DType::C128);
    assert_eq!(z.to_vec()[0], Complex::new(1.0, 2.0));
    assert_eq!(Tensor::<ComplexOf<True<F32>>>::zeros(&[3]).dtype(), DType::C64);
}
