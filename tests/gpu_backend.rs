//! The `Gpu` backend end to end (feature `cuda`): every op against the CPU backend, and training
//! runs through the same `Trainer` against the CPU's.
//!
//! Without a GPU (CI) the backend runs on the host emulation of its kernels
//! (`backend::cuda::emulator`): the same kernels.cu, the same storage and launch code; only the
//! driver underneath differs, and GEMMs are the CPU backend's. There the comparisons are exact
//! except where a sum runs in another order. With `NBIT_TEST_GPU=cuda` (tools/gpu-check.sh) the
//! same tests run on the GPU, with per-dtype tolerances for libdevice's transcendental functions
//! and cuBLAS's accumulation order.

use std::path::Path;
use std::sync::OnceLock;

use nbit::backend::cuda;
use nbit::backend::{
    AdamWStep, Backend, Binary, Compare, ComplexBackend, ComplexUnary, Conv2dGeometry, SgdStep, Unary,
};
use nbit::half::{bf16, f16};
use nbit::ndarray::{ArrayD, IxDyn};
use nbit::optim::UpdateRounding;
use nbit::optim::{AdamW, Optimization, Sgd};
use nbit::prelude::*;
use nbit::scaler::DynamicScaler;
use nbit::{Float, Gpu, StepInfo, TrainerBuilder};

use crate::common::{CpuFp16Amp, loader};

/// Whether the tests run on a real GPU (`NBIT_TEST_GPU=cuda`) rather than the emulation.
fn real() -> bool {
    std::env::var("NBIT_TEST_GPU").is_ok_and(|v| v == "cuda")
}

/// Makes `Gpu` usable in this process: the GPU itself, or the emulation.
fn gpu() {
    static READY: OnceLock<()> = OnceLock::new();
    READY.get_or_init(|| {
        if !real() {
            let lib = cuda::emulator::build(Path::new(env!("CARGO_TARGET_TMPDIR")))
                .unwrap_or_else(|e| panic!("{e}"));
            cuda::use_emulator(&lib).unwrap_or_else(|e| panic!("{e}"));
        }
        if let Err(e) = Gpu::probe() {
            panic!("{e}");
        }
    });
}

fn up<E: nbit::Element>(a: &ArrayD<E>) -> <Gpu as Backend>::Storage<E> {
    Gpu::from_array(a.clone())
}

fn down<E: nbit::Element>(s: &<Gpu as Backend>::Storage<E>) -> ArrayD<E> {
    Gpu::to_array(s)
}

/// Deterministic values in [-2, 2), multiples of 1/256 (so f64 sums of them are exact in any order).
fn array<E: Float>(shape: &[usize], seed: u64) -> ArrayD<E> {
    let n: usize = shape.iter().product();
    let v = (0..n)
        .map(|i| E::from_f64((((i as u64 * 2654435761 + seed * 97) % 1000) as f64 / 256.0) - 2.0))
        .collect();
    ArrayD::from_shape_vec(IxDyn(shape), v).unwrap()
}

/// `got` equals `want` element for element, within `tol` relative to `scale` (or exactly, NaN
/// matching NaN, when `tol` is 0).
fn assert_close<E: Float>(what: &str, got: &ArrayD<E>, want: &ArrayD<E>, tol: f64) {
    assert_eq!(got.shape(), want.shape(), "{what}: shape");
    for (i, (g, w)) in got.iter().zip(want.iter()).enumerate() {
        let (g, w) = (g.as_f64(), w.as_f64());
        let ok =
            (g.is_nan() && w.is_nan()) || g == w || (tol > 0.0 && (g - w).abs() <= tol * w.abs().max(1.0));
        assert!(ok, "{what}: element {i}: got {g}, the CPU backend's {w}");
    }
}

/// The type's machine epsilon.
fn eps<E: Float>() -> f64 {
    E::epsilon().as_f64()
}

/// The tolerance of a product on a GPU (cuBLAS's order), 0 under the emulation (the CPU's GEMM).
fn tol<E: Float>(ulps: f64) -> f64 {
    if real() { ulps * eps::<E>() } else { 0.0 }
}

/// The tolerance of an op that calls exp, tanh or erf: glibc's (emulation) or libdevice's (GPU)
/// against the libm of the CPU backend, each within an ulp or two of the truth
/// (tests/cuda_kernels.rs checks them across the range).
fn libm_tol<E: Float>() -> f64 {
    4.0 * eps::<E>()
}

/// The tolerance of an f64 result of an f64 sum: another order moves its last bits (16- and
/// 32-bit results round the f64 sum once, which hides that here).
fn sum_tol<E: Float>() -> f64 {
    if size_of::<E>() == 8 {
        4.0 * eps::<E>()
    } else {
        0.0
    }
}

macro_rules! for_each_float {
    ($f:ident) => {
        $f::<f16>();
        $f::<bf16>();
        $f::<f32>();
        $f::<f64>();
    };
}

fn storage_round_trips_ones<E: Float>() {
    let a = array::<E>(&[3, 0, 2], 1);
    assert_eq!(down(&up(&a)), a);
    let a = array::<E>(&[2, 3, 5], 2);
    let s = up(&a);
    assert_eq!(Gpu::shape(&s), &[2, 3, 5]);
    assert_eq!(down(&s.clone()), a, "a clone is a copy");
    assert_eq!(
        down(&Gpu::full(&[4, 3], E::from_f64(-1.5))),
        Cpu::full(&[4, 3], E::from_f64(-1.5))
    );
    let r = Gpu::reshape(&s, &[6, 5]);
    assert_eq!(down(&r), Cpu::reshape(&a, &[6, 5]));
    assert_eq!(down(&Gpu::transpose(&s)), Cpu::transpose(&a));
    let p = array::<E>(&[2, 3, 4, 5], 5);
    let permuted = Cpu::permute(&p, &[2, 0, 3, 1]);
    assert_eq!(permuted.shape(), &[4, 2, 5, 3]);
    assert_eq!(permuted[[3, 1, 4, 2]], p[[1, 2, 3, 4]]);
    assert_eq!(down(&Gpu::permute(&up(&p), &[2, 0, 3, 1])), permuted);
    assert_eq!(
        down(&Gpu::broadcast_to(&up(&array::<E>(&[3, 1], 3)), &[2, 3, 4])),
        Cpu::broadcast_to(&array::<E>(&[3, 1], 3), &[2, 3, 4])
    );
    let b = array::<E>(&[2, 1, 5], 4);
    assert_eq!(down(&Gpu::concat(&[&s, &up(&b)], 1)), Cpu::concat(&[&a, &b], 1));
}

#[test]
fn storage_round_trips_and_moves_data_like_the_cpu_in_every_dtype() {
    gpu();
    for_each_float!(storage_round_trips_ones);
    // Complex and every dtype's bits survive the round trip.
    let z: ArrayD<num_complex::Complex<f64>> = ArrayD::from_shape_fn(IxDyn(&[3, 2]), |i| {
        num_complex::Complex::new(i[0] as f64 + 0.5, -(i[1] as f64))
    });
    assert_eq!(down(&up(&z)), z);
    assert_eq!(down(&Gpu::transpose(&up(&z))), Cpu::transpose(&z));
    assert_eq!(down(&Gpu::full(&[2], z[[1, 1]])), Cpu::full(&[2], z[[1, 1]]));
    let z32 = z.mapv(|v| num_complex::Complex::new(v.re as f32, v.im as f32));
    assert_eq!(down(&Gpu::transpose(&up(&z32))), Cpu::transpose(&z32));
    let zh = z.mapv(|v| num_complex::Complex::new(f16::from_f64(v.re), f16::from_f64(v.im)));
    assert_eq!(
        down(&Gpu::broadcast_to(&up(&zh), &[2, 3, 2])),
        Cpu::broadcast_to(&zh, &[2, 3, 2])
    );
}

fn casts_ones<A: Float>() {
    fn to<A: Float, B: Float>(a: &ArrayD<A>) {
        assert_eq!(
            down(&Gpu::cast::<A, B>(&up(a))),
            Cpu::cast::<A, B>(a),
            "{} -> {}",
            A::DTYPE,
            B::DTYPE
        );
    }
    let a = array::<A>(&[7, 9], 5).mapv(|v| A::from_f64(v.as_f64() * 1000.123));
    to::<A, f16>(&a);
    to::<A, bf16>(&a);
    to::<A, f32>(&a);
    to::<A, f64>(&a);
}

#[test]
fn casts_round_like_the_cpu() {
    gpu();
    for_each_float!(casts_ones);
}

fn elementwise_ones<E: Float>() {
    let x = array::<E>(&[5, 7], 6);
    for op in [
        Unary::Neg,
        Unary::MulScalar(0.3),
        Unary::Relu,
        Unary::Tanh,
        Unary::Exp,
        Unary::Clamp(-1.0, 0.5),
        Unary::Gelu,
    ] {
        let t = if matches!(op, Unary::Tanh | Unary::Exp | Unary::Gelu) {
            libm_tol::<E>()
        } else {
            0.0
        };
        let y = Gpu::unary(op, &up(&x));
        assert_close(&format!("{op:?} {}", E::DTYPE), &down(&y), &Cpu::unary(op, &x), t);
        let dy = array::<E>(&[5, 7], 7);
        let cy = Cpu::unary(op, &x);
        let g = Gpu::unary_backward(op, &up(&x), &up(&cy), &up(&dy));
        assert_close(
            &format!("{op:?}' {}", E::DTYPE),
            &down(&g),
            &Cpu::unary_backward(op, &x, &cy, &dy),
            t,
        );
    }
    let (a, b) = (array::<E>(&[2, 1, 7], 8), array::<E>(&[3, 1], 9));
    for op in [Binary::Add, Binary::Sub, Binary::Mul, Binary::Div] {
        let got = Gpu::binary(op, &up(&a), &up(&b), &[2, 3, 7]);
        assert_close(
            &format!("{op:?} {}", E::DTYPE),
            &down(&got),
            &Cpu::binary(op, &a, &b, &[2, 3, 7]),
            0.0,
        );
    }
    let mut s = up(&x);
    Gpu::add_in_place(&mut s, &up(&x));
    let mut want = x.clone();
    Cpu::add_in_place(&mut want, &x);
    assert_close("add_in_place", &down(&s), &want, 0.0);
    Gpu::scale_in_place(&mut s, 0.37);
    Cpu::scale_in_place(&mut want, 0.37);
    assert_close("scale_in_place", &down(&s), &want, 0.0);
    Gpu::clamp_in_place(&mut s, 0.7001);
    Cpu::clamp_in_place(&mut want, 0.7001);
    assert_close("clamp_in_place", &down(&s), &want, 0.0);
}

#[test]
fn element_wise_ops_and_in_place_updates_match_the_cpu() {
    gpu();
    for_each_float!(elementwise_ones);
}

fn sums_ones<E: Float>() {
    let x = array::<E>(&[4, 3, 5], 10);
    // Sums of these values are exact in f64, so any order gives the CPU's result.
    for shape in [
        &[4, 3, 5][..],
        &[3, 5],
        &[5],
        &[3, 1],
        &[4, 1, 5],
        &[1, 1, 1],
        &[],
    ] {
        assert_close(
            &format!("sum_to_shape {shape:?}"),
            &down(&Gpu::sum_to_shape(&up(&x), shape)),
            &Cpu::sum_to_shape(&x, shape),
            0.0,
        );
    }
    for axis in [None, Some(0), Some(1), Some(2)] {
        for keepdim in [false, true] {
            let got = Gpu::sum(&up(&x), axis, keepdim, 0.25);
            assert_close(
                &format!("sum {axis:?} {keepdim}"),
                &down(&got),
                &Cpu::sum(&x, axis, keepdim, 0.25),
                0.0,
            );
        }
    }
    assert_eq!(Gpu::sum_squares(&up(&x)), Cpu::sum_squares(&x));
    let big = array::<E>(&[3001], 11);
    assert_close(
        "sum of 3001",
        &down(&Gpu::sum(&up(&big), None, false, 1.0)),
        &Cpu::sum(&big, None, false, 1.0),
        0.0,
    );
}

#[test]
fn sums_accumulate_in_f64_like_the_cpu() {
    gpu();
    for_each_float!(sums_ones);
}

fn matmul_ones<E: Float>() {
    for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
        let (m, k, n) = (5, 7, 3);
        let a = array::<E>(&if ta { [k, m] } else { [m, k] }, 12);
        let b = array::<E>(&if tb { [n, k] } else { [k, n] }, 13);
        let bias = array::<E>(&[n], 14);
        for with_bias in [false, true] {
            let bb = with_bias.then(|| up(&bias));
            let got = Gpu::matmul(&up(&a), &up(&b), ta, tb, bb.as_ref());
            let want = Cpu::matmul(&a, &b, ta, tb, with_bias.then_some(&bias));
            // cuBLAS sums in another order: a few ulps of the result type, relative to |a||b|.
            assert_close(
                &format!("matmul {ta} {tb} {with_bias} {}", E::DTYPE),
                &down(&got),
                &want,
                tol::<E>(8.0) * k as f64,
            );
        }
    }
    // A batch of products, each transposition; every matrix of the batch its own product.
    for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
        let (batch, m, k, n) = (3, 4, 6, 5);
        let a = array::<E>(&if ta { [batch, k, m] } else { [batch, m, k] }, 15);
        let b = array::<E>(&if tb { [batch, n, k] } else { [batch, k, n] }, 16);
        let got = Gpu::bmm(&up(&a), &up(&b), ta, tb);
        let want = Cpu::bmm(&a, &b, ta, tb);
        assert_eq!(want.shape(), &[batch, m, n]);
        let second = Cpu::matmul(
            &a.index_axis(nbit::ndarray::Axis(0), 1).to_owned(),
            &b.index_axis(nbit::ndarray::Axis(0), 1).to_owned(),
            ta,
            tb,
            None,
        );
        assert_eq!(
            want.index_axis(nbit::ndarray::Axis(0), 1),
            second,
            "batch 1 is its own product"
        );
        assert_close(
            &format!("batched matmul {ta} {tb} {}", E::DTYPE),
            &down(&got),
            &want,
            tol::<E>(8.0) * k as f64,
        );
    }
    // A stack of rows times a matrix (a linear layer on [b, t, k]), and the weight's gradient
    // summed over every row: the leading axes are rows, nothing is copied.
    let x = array::<E>(&[2, 3, 7], 17);
    let w = array::<E>(&[5, 7], 18);
    let y = Cpu::matmul(&x, &w, false, true, Some(&array::<E>(&[5], 19)));
    assert_eq!(y.shape(), &[2, 3, 5]);
    let flat = Cpu::matmul(
        &Cpu::reshape(&x, &[6, 7]),
        &w,
        false,
        true,
        Some(&array::<E>(&[5], 19)),
    );
    assert_eq!(
        Cpu::reshape(&y, &[6, 5]),
        flat,
        "rows of a stack are rows of a matrix"
    );
    let got = Gpu::matmul(&up(&x), &up(&w), false, true, Some(&up(&array::<E>(&[5], 19))));
    assert_close(
        &format!("stacked rows {}", E::DTYPE),
        &down(&got),
        &y,
        tol::<E>(8.0) * 7.0,
    );
    let dw = Cpu::matmul(&y, &x, true, false, None);
    assert_eq!(dw.shape(), &[5, 7]);
    let got = Gpu::matmul(&up(&y), &up(&x), true, false, None);
    assert_close(
        &format!("summed rows {}", E::DTYPE),
        &down(&got),
        &dw,
        tol::<E>(8.0) * 6.0 * 4.0,
    );
    // An empty inner dimension is zeros (plus the bias).
    let z = Gpu::matmul(
        &up(&array::<E>(&[2, 0], 1)),
        &up(&array::<E>(&[0, 3], 1)),
        false,
        false,
        None,
    );
    assert_eq!(down(&z), Cpu::full(&[2, 3], E::zero()));
}

#[test]
fn products_match_the_cpu_with_every_transpose_and_bias() {
    gpu();
    for_each_float!(matmul_ones);
}

fn classification_ones<E: Float>() {
    let x = array::<E>(&[6, 10], 15);
    for log in [false, true] {
        let y = Gpu::softmax(&up(&x), log);
        let want = Cpu::softmax(&x, log);
        assert_close("softmax", &down(&y), &want, libm_tol::<E>());
        let dy = array::<E>(&[6, 10], 16);
        let g = Gpu::softmax_backward(&up(&want), &up(&dy), log);
        assert_close(
            "softmax'",
            &down(&g),
            &Cpu::softmax_backward(&want, &dy, log),
            libm_tol::<E>(),
        );
    }
    let targets = [3usize, 0, 9, 9, 1, 4];
    let l = Gpu::nll_loss(&up(&x), &targets);
    assert_close("nll", &down(&l), &Cpu::nll_loss(&x, &targets), sum_tol::<E>());
    let dl = Gpu::nll_loss_backward(&[6, 10], &targets, &l);
    assert_close(
        "nll'",
        &down(&dl),
        &Cpu::nll_loss_backward(&[6, 10], &targets, &down(&l)),
        0.0,
    );
    let mask = Gpu::dropout_mask::<E>(&[33, 3], 0.25, 99);
    assert_eq!(
        down(&mask),
        Cpu::dropout_mask::<E>(&[33, 3], 0.25, 99),
        "the same seeded mask"
    );
}

#[test]
fn softmax_losses_and_dropout_match_the_cpu() {
    gpu();
    for_each_float!(classification_ones);
}

fn scaler_ones<E: Float>() {
    let a = array::<E>(&[40], 17).mapv(|v| E::from_f64(v.as_f64() * 3e3));
    let mut b = array::<E>(&[3, 3], 18);
    assert!(!Gpu::any_non_finite(&up(&a)));
    for poison in [false, true] {
        if poison {
            b[[1, 2]] = E::from_f64(f64::INFINITY);
        }
        assert_eq!(Gpu::any_non_finite(&up(&b)), poison);
        let (mut ga, mut gb) = (up(&a), up(&b));
        let found = Gpu::unscale_check_all(&mut [&mut ga, &mut gb], 1.0 / 1024.0);
        let (mut ca, mut cb) = (a.clone(), b.clone());
        let want = Cpu::unscale_check_all(&mut [&mut ca, &mut cb], 1.0 / 1024.0);
        assert_eq!(found, want);
        assert_close("unscaled a", &down(&ga), &ca, 0.0);
        assert_close("unscaled b", &down(&gb), &cb, 0.0);
    }
}

#[test]
fn the_fused_unscale_and_check_matches_the_cpu() {
    gpu();
    for_each_float!(scaler_ones);
    assert!(!Gpu::unscale_check_all::<f32>(&mut [], 0.5));
}

fn optimizer_ones<E: Float>() {
    let roundings: &[UpdateRounding] = if size_of::<E>() == 2 {
        &UpdateRounding::ALL
    } else {
        &[UpdateRounding::Nearest]
    };
    for &rounding in roundings {
        let comp0 = (rounding == UpdateRounding::Compensated).then(|| Cpu::full(&[37], E::zero()));
        // SGD with weight decay, momentum (the first step initialises the buffer) and Nesterov.
        let (mut p, mut buf, mut comp) = (array::<E>(&[37], 20), Cpu::full(&[37], E::zero()), comp0.clone());
        let (mut gp, mut gbuf, mut gcomp) = (up(&p), up(&buf), comp.as_ref().map(up));
        for step in 0..4u64 {
            let g = array::<E>(&[37], 21 + step);
            let hp = SgdStep {
                lr: 0.01,
                momentum: 0.9,
                dampening: 0.1,
                nesterov: step % 2 == 1,
                weight_decay: 0.05,
                first: step == 0,
                rounding,
                noise_key: 1000 + step,
            };
            Cpu::sgd_step(&mut p, &g, Some(&mut buf), comp.as_mut(), &hp);
            Gpu::sgd_step(&mut gp, &up(&g), Some(&mut gbuf), gcomp.as_mut(), &hp);
            let what = format!("sgd {rounding} {} step {step}", E::DTYPE);
            assert_close(&what, &down(&gp), &p, 0.0);
            assert_close(&what, &down(&gbuf), &buf, 0.0);
            if let (Some(c), Some(gc)) = (&comp, &gcomp) {
                assert_close(&what, &down(gc), c, 0.0);
            }
        }
        // AdamW, with both forms of the first moment's lerp (beta1 below and above 0.5).
        for beta1 in [0.9, 0.3] {
            let (mut p, mut m, mut v, mut comp) = (
                array::<E>(&[37], 30),
                Cpu::full(&[37], E::zero()),
                Cpu::full(&[37], <E::Moment as Float>::from_f64(0.0)),
                comp0.clone(),
            );
            let (mut gp, mut gm, mut gv, mut gcomp) = (up(&p), up(&m), up(&v), comp.as_ref().map(up));
            for step in 1..5u64 {
                let g = array::<E>(&[37], 31 + step);
                let hp = AdamWStep {
                    lr: 0.003,
                    beta1,
                    beta2: 0.999,
                    eps: 1e-8,
                    weight_decay: 0.01,
                    step,
                    rounding,
                    noise_key: 7 + step,
                };
                Cpu::adamw_step(&mut p, &g, &mut m, &mut v, comp.as_mut(), &hp);
                Gpu::adamw_step(&mut gp, &up(&g), &mut gm, &mut gv, gcomp.as_mut(), &hp);
                let what = format!("adamw beta1 {beta1} {rounding} {} step {step}", E::DTYPE);
                assert_close(&what, &down(&gp), &p, 0.0);
                assert_close(&what, &down(&gm), &m, 0.0);
                assert_close(&what, &down(&gv), &v, 0.0);
                if let (Some(c), Some(gc)) = (&comp, &gcomp) {
                    assert_close(&what, &down(gc), c, 0.0);
                }
            }
        }
    }
}

#[test]
fn optimizer_steps_match_the_cpu_bit_for_bit_with_every_rounding() {
    gpu();
    for_each_float!(optimizer_ones);
}

fn indexing_ones<E: Float>() {
    let x = array::<E>(&[3, 5, 4], 40);
    let index = [4usize, 0, 0, 2, 4, 1];
    for axis in 0..3 {
        let idx: Vec<usize> = index.iter().map(|&i| i % x.shape()[axis]).collect();
        let got = Gpu::index_select(&up(&x), axis, &idx);
        let want = Cpu::index_select(&x, axis, &idx);
        assert_close(&format!("index_select {axis}"), &down(&got), &want, 0.0);
        let back = Gpu::index_add(x.shape(), axis, &idx, &up(&want));
        assert_close(
            &format!("index_add {axis}"),
            &down(&back),
            &Cpu::index_add(x.shape(), axis, &idx, &want),
            0.0,
        );
        // gather along the axis with an index of size 2 there.
        let mut shape = x.shape().to_vec();
        shape[axis] = 2;
        let n: usize = shape.iter().product();
        let gidx: Vec<usize> = (0..n).map(|i| (i * 7 + 3) % x.shape()[axis]).collect();
        let got = Gpu::gather(&up(&x), axis, &gidx, &shape);
        let want = Cpu::gather(&x, axis, &gidx, &shape);
        assert_close(&format!("gather {axis}"), &down(&got), &want, 0.0);
        let back = Gpu::scatter_add(x.shape(), axis, &gidx, &up(&want));
        assert_close(
            &format!("scatter_add {axis}"),
            &down(&back),
            &Cpu::scatter_add(x.shape(), axis, &gidx, &want),
            0.0,
        );
        for largest in [false, true] {
            assert_eq!(
                Gpu::arg_extreme(&up(&x), axis, largest),
                Cpu::arg_extreme(&x, axis, largest),
                "arg_extreme {axis}"
            );
        }
    }
    // NaN wins, the first of ties.
    let mut y = array::<E>(&[2, 6], 41);
    y[[1, 3]] = E::from_f64(f64::NAN);
    y[[0, 2]] = E::from_f64(9.0);
    y[[0, 4]] = E::from_f64(9.0);
    assert_eq!(Gpu::arg_extreme(&up(&y), 1, true), Cpu::arg_extreme(&y, 1, true));
    // where and the comparisons, broadcasting.
    let (a, b) = (array::<E>(&[2, 1, 4], 42), array::<E>(&[3, 1], 43));
    let mut c = array::<E>(&[3, 4], 44);
    c[[0, 0]] = E::from_f64(f64::NAN);
    for op in [
        Compare::Eq,
        Compare::Ne,
        Compare::Lt,
        Compare::Le,
        Compare::Gt,
        Compare::Ge,
    ] {
        let got = Gpu::compare(op, &up(&a), &up(&c), &[2, 3, 4]);
        assert_close(
            &format!("{op:?}"),
            &down(&got),
            &Cpu::compare(op, &a, &c, &[2, 3, 4]),
            0.0,
        );
    }
    let cond = Cpu::compare(Compare::Gt, &a, &b, &[2, 3, 4]);
    let got = Gpu::select(&up(&cond), &up(&a), &up(&b), &[2, 3, 4]);
    assert_close("where", &down(&got), &Cpu::select(&cond, &a, &b, &[2, 3, 4]), 0.0);
    let got = Gpu::select(&up(&b), &up(&a), &up(&c), &[2, 3, 4]);
    assert_close(
        "where, broadcast condition",
        &down(&got),
        &Cpu::select(&b, &a, &c, &[2, 3, 4]),
        0.0,
    );
}

#[test]
fn indexing_where_and_argmax_match_the_cpu() {
    gpu();
    for_each_float!(indexing_ones);
}

fn conv_and_norm_ones<E: Float>() {
    let g = Conv2dGeometry {
        batch: 2,
        channels: 3,
        input: (5, 6),
        kernel: (3, 2),
        stride: (2, 1),
        padding: (1, 2),
        dilation: (1, 2),
    };
    let x = array::<E>(&[2, 3, 5, 6], 50);
    let cols = Cpu::unfold2d(&x, &g);
    assert_close("unfold2d", &down(&Gpu::unfold2d(&up(&x), &g)), &cols, 0.0);
    assert_close(
        "fold2d",
        &down(&Gpu::fold2d(&up(&cols), &g)),
        &Cpu::fold2d(&cols, &g),
        0.0,
    );
    let x = array::<E>(&[4, 37], 51);
    let (w, b) = (array::<E>(&[37], 52), array::<E>(&[37], 53));
    let dy = array::<E>(&[4, 37], 54);
    for (with_w, with_b) in [(false, false), (true, false), (true, true)] {
        let (gw, gb) = (with_w.then(|| up(&w)), with_b.then(|| up(&b)));
        let (y, stats) = Gpu::layer_norm(&up(&x), gw.as_ref(), gb.as_ref(), 1e-5);
        let (cy, cstats) = Cpu::layer_norm(&x, with_w.then_some(&w), with_b.then_some(&b), 1e-5);
        let what = format!("layer_norm {with_w} {with_b} {}", E::DTYPE);
        assert_close(&what, &down(&y), &cy, sum_tol::<E>());
        assert_close(&format!("{what}: stats"), &down(&stats), &cstats, 1e-12);
        let (dx, dw, db) = Gpu::layer_norm_backward(&up(&x), gw.as_ref(), &up(&cstats), &up(&dy), with_b);
        let (cdx, cdw, cdb) = Cpu::layer_norm_backward(&x, with_w.then_some(&w), &cstats, &dy, with_b);
        let t = sum_tol::<E>().max(if size_of::<E>() == 8 {
            0.0
        } else {
            2.0 * eps::<E>()
        });
        assert_close(&format!("{what}: dx"), &down(&dx), &cdx, t);
        assert_eq!(dw.is_some(), cdw.is_some());
        assert_eq!(db.is_some(), cdb.is_some());
        if let (Some(g), Some(c)) = (&dw, &cdw) {
            assert_close(&format!("{what}: dw"), &down(g), c, sum_tol::<E>());
        }
        if let (Some(g), Some(c)) = (&db, &cdb) {
            assert_close(&format!("{what}: db"), &down(g), c, 0.0);
        }
    }
}

#[test]
fn convolution_unfold_and_layer_norm_match_the_cpu() {
    gpu();
    for_each_float!(conv_and_norm_ones);
}

/// Deterministic complex values (parts multiples of 1/256 in [-2, 2)).
fn carray<C: nbit::dtype::ComplexElement>(shape: &[usize], seed: u64) -> ArrayD<C> {
    let re = array::<f64>(shape, seed);
    let im = array::<f64>(shape, seed + 100);
    ndarray::Zip::from(&re)
        .and(&im)
        .map_collect(|&r, &i| C::from_parts(r, i))
}

fn complex_ones<C: nbit::dtype::ComplexElement>() {
    let what = |op: &str| format!("{op} {}", C::DTYPE);
    let (a, b) = (carray::<C>(&[2, 1, 5], 60), carray::<C>(&[3, 1], 61));
    for op in [Binary::Add, Binary::Sub, Binary::Mul, Binary::Div] {
        let got = Gpu::cbinary(op, &up(&a), &up(&b), &[2, 3, 5]);
        assert_eq!(
            down(&got),
            Cpu::cbinary(op, &a, &b, &[2, 3, 5]),
            "{}",
            what(&format!("{op:?}"))
        );
    }
    let mut z = carray::<C>(&[4, 6], 62);
    z[[0, 0]] = C::from_parts(0.0, 0.0);
    z[[0, 1]] = C::from_parts(f64::INFINITY, 0.0);
    z[[0, 2]] = C::from_parts(f64::NEG_INFINITY, f64::INFINITY);
    z[[0, 3]] = C::from_parts(f64::NAN, 0.0);
    z[[0, 4]] = C::from_parts(f64::INFINITY, f64::INFINITY);
    for op in [
        ComplexUnary::Neg,
        ComplexUnary::Conj,
        ComplexUnary::Exp,
        ComplexUnary::MulScalar(-0.75),
        ComplexUnary::Sign,
    ] {
        let (got, want) = (down(&Gpu::cunary(op, &up(&z))), Cpu::cunary(op, &z));
        for (g, w) in got.iter().zip(want.iter()) {
            let (g, w) = (g.to_c64(), w.to_c64());
            // exp calls cos and sin: glibc's (the emulation) against Rust's (glibc here too), or
            // libdevice's on a GPU; NaN parts match NaN parts.
            let same = |x: f64, y: f64| {
                (x.is_nan() && y.is_nan())
                    || x == y
                    || (real() && (x - y).abs() <= 4.0 * eps::<C::Real>() * y.abs().max(1.0))
            };
            assert!(
                same(g.re, w.re) && same(g.im, w.im),
                "{}: got {g}, the CPU's {w}",
                what(&format!("{op:?}"))
            );
        }
    }
    // |z| is hypot: glibc's (the emulation, as the CPU's) is correctly rounded here, libdevice's
    // on a GPU is within 2 ulp of the truth (CUDA's math function tables).
    let hypot_tol = if real() { 2.0 * eps::<C::Real>() } else { 0.0 };
    assert_close(
        &what("abs"),
        &down(&Gpu::cabs(&up(&z))),
        &Cpu::cabs(&z),
        hypot_tol,
    );
    let (re, im) = Gpu::complex_parts(&up(&z));
    let (cre, cim) = Cpu::complex_parts(&z);
    assert_close(&what("re"), &down(&re), &cre, 0.0);
    assert_close(&what("im"), &down(&im), &cim, 0.0);
    assert_eq!(
        down(&Gpu::complex_from_parts::<C>(&re, &im))
            .iter()
            .filter(|v| v.to_c64().re.is_nan())
            .count(),
        1
    );
    let w = carray::<C>(&[3, 4, 5], 63);
    for shape in [&[4, 5][..], &[3, 1, 5], &[1]] {
        assert_eq!(
            down(&Gpu::csum_to_shape(&up(&w), shape)),
            Cpu::csum_to_shape(&w, shape),
            "{}",
            what("csum_to_shape")
        );
    }
    for bits in 0..16u8 {
        let [ta, ca, tb, cb] = [bits & 1 != 0, bits & 2 != 0, bits & 4 != 0, bits & 8 != 0];
        let (m, k, n) = (3, 5, 4);
        let a = carray::<C>(&if ta { [k, m] } else { [m, k] }, 64);
        let b = carray::<C>(&if tb { [n, k] } else { [k, n] }, 65);
        let got = down(&Gpu::cmatmul(&up(&a), &up(&b), ta, ca, tb, cb));
        let want = Cpu::cmatmul(&a, &b, ta, ca, tb, cb);
        // Exact products of these parts in f64 (on a GPU, zgemm's order is exact here too).
        assert_eq!(got, want, "{}", what(&format!("cmatmul t{ta} c{ca} t{tb} c{cb}")));
    }
}

#[test]
fn complex_ops_match_the_cpu_in_every_complex_dtype() {
    gpu();
    complex_ones::<num_complex::Complex<f16>>();
    complex_ones::<num_complex::Complex<f32>>();
    complex_ones::<num_complex::Complex<f64>>();
}

/// The gradients of a real loss of complex tensors (matmul, conjugate, exp, division, |z|) with
/// respect to the real and imaginary leaves, on device `D`, in complex `C` with parts `R`.
fn complex_gradients<R: Float, D: ComplexBackend>() -> Vec<Vec<f64>>
where
    num_complex::Complex<R>: nbit::dtype::ComplexElement<Real = R>,
{
    use nbit::tensor::{ComplexOps, Tensor};
    type Z<R, D> = Tensor<num_complex::Complex<R>, D>;
    let leaf =
        |shape: &[usize], seed: u64| Tensor::<R, D>::from_array(array::<R>(shape, seed)).requires_grad();
    let (x, y, u, v) = (
        leaf(&[2, 3], 70),
        leaf(&[2, 3], 71),
        leaf(&[3, 4], 72),
        leaf(&[3, 4], 73),
    );
    let z = Z::<R, D>::complex(&x, &y).unwrap();
    let w = Z::<R, D>::complex(&u, &v).unwrap();
    let p = z.matmul(&w).unwrap();
    let q = p
        .conj()
        .mul_scalar(0.25)
        .exp()
        .div(
            &p.add(&Z::<R, D>::complex(&leaf(&[4], 74), &leaf(&[4], 75)).unwrap())
                .unwrap(),
        )
        .unwrap();
    let loss = q.abs().powf(2.0).sum().add(&q.real().sum()).unwrap();
    let g = loss.backward().unwrap();
    [&x, &y, &u, &v]
        .iter()
        .map(|t| g.get(t).unwrap().to_vec().iter().map(|v| v.as_f64()).collect())
        .collect()
}

#[test]
fn complex_autodiff_on_the_gpu_gives_the_cpus_gradients() {
    gpu();
    let (g, c) = (complex_gradients::<f64, Gpu>(), complex_gradients::<f64, Cpu>());
    let (g32, c32) = (complex_gradients::<f32, Gpu>(), complex_gradients::<f32, Cpu>());
    for ((g, c), t) in [(g, c, 1e-13), (g32, c32, 1e-6)]
        .into_iter()
        .flat_map(|(g, c, t)| g.into_iter().zip(c).map(move |p| (p, t)))
    {
        // exp's cos and sin are glibc's on both sides under the emulation; libdevice's on a GPU.
        let t = if real() { t * 100.0 } else { t };
        for (a, b) in g.iter().zip(&c) {
            assert!((a - b).abs() <= t * b.abs().max(1.0), "gpu {a}, cpu {b}");
        }
    }
}

/// The per-step losses, skips and scales of `P` on device `D` over `steps` steps, with the loss
/// multiplied by 1e30 (fp16 gradients overflow) at the steps in `inject`; `configure` sets the
/// trainer's options beyond the shared ones.
fn losses<P: Precision, D: Runs<P>>(
    steps: u64,
    inject: &[u64],
    opt: Optimization,
    configure: impl FnOnce(TrainerBuilder<P, D>) -> TrainerBuilder<P, D>,
) -> (Vec<f64>, Vec<bool>, Vec<f32>) {
    struct Inject<P: Precision, D: Backend> {
        inner: MlpModel<P, D>,
        at: Vec<u64>,
    }
    impl<P: Precision, D: Backend> Model<P, D> for Inject<P, D> {
        fn training_step(
            &mut self,
            ac: &Autocast<P, D>,
            b: &nbit::data::Batch,
            s: &StepInfo,
        ) -> Result<Tensor<P::Full, D>, nbit::Error> {
            let loss = self.inner.training_step(ac, b, s)?;
            Ok(if self.at.contains(&s.global_step) {
                loss.mul_scalar(1e30)
            } else {
                loss
            })
        }
        fn configure_optimizers(&self) -> Optimization {
            self.inner.configure_optimizers()
        }
        fn parameters_mut(&mut self) -> Vec<&mut nbit::nn::Parameter<P::Param, D>> {
            self.inner.parameters_mut()
        }
    }
    let t = configure(
        Trainer::<P, D>::builder()
            .enable_progress_bar(false)
            .seed(7)
            .max_steps(steps),
    )
    .build()
    .unwrap();
    let mut m = Inject {
        inner: t
            .init_module(|ctx| MlpModel::new(ctx, &[4, 16, 3], nbit::nn::Task::Classification, opt))
            .unwrap(),
        at: inject.to_vec(),
    };
    let r = t.fit(&mut m, &loader(96, 16), None).unwrap();
    (
        r.history.iter().map(|s| s.loss).collect(),
        r.history.iter().map(|s| s.skipped).collect(),
        r.history.iter().map(|s| s.scale).collect(),
    )
}

#[test]
fn sixteen_mixed_on_the_gpu_trains_as_the_cpu_runs_the_same_precision() {
    gpu();
    let opt = Optimization::new(AdamW::new(0.01));
    // 16-mixed (fp16 autocast, f32 masters, a dynamic scaler) against the same precision on the
    // CPU, defined as a test precision there: step for step, with overflow injected at 2 and 4.
    let scaler = || DynamicScaler::new(1024.0, 2.0, 0.5, 3);
    let (gl, gs, gsc) = losses::<Mixed<F16>, Gpu>(12, &[2, 4], opt, |b| b.scaler(scaler()));
    let (cl, cs, csc) = losses::<CpuFp16Amp, Cpu>(12, &[2, 4], opt, |b| b.scaler(scaler()));
    assert_eq!(gs, cs, "the same steps are skipped");
    assert_eq!(gs.iter().filter(|&&s| s).count(), 2);
    assert_eq!(
        gsc, csc,
        "the same scale after every step (backoff, growth every 3)"
    );
    // Under the emulation bit for bit: the same kernels' arithmetic, the CPU's GEMM.
    let t = if real() { gpu_loss_tol::<Mixed<F16>>() } else { 0.0 };
    for (i, (g, c)) in gl.iter().zip(&cl).enumerate() {
        if !gs[i] || t == 0.0 {
            assert!(
                (g - c).abs() <= t * c.abs().max(1.0),
                "step {i}: gpu {g}, cpu {c}"
            );
        }
    }
    assert!(gl[11] < gl[0] * 0.8, "the loss falls: {gl:?}");
}

#[test]
fn every_precision_of_the_gpu_column_trains_like_the_cpu() {
    gpu();
    fn pair<P: Precision>(opt: Optimization)
    where
        Cpu: Runs<P>,
        Gpu: Runs<P>,
    {
        let (gl, ..) = losses::<P, Gpu>(6, &[], opt, |b| b);
        let (cl, ..) = losses::<P, Cpu>(6, &[], opt, |b| b);
        // Under the emulation bit for bit, but for 64-true, whose f64 sums (softmax, the loss) run
        // in another order and move the last bits.
        let t = match (real(), size_of::<P::Full>()) {
            (true, _) => gpu_loss_tol::<P>(),
            (false, 8) => 1e-13,
            (false, _) => 0.0,
        };
        for (i, (g, c)) in gl.iter().zip(&cl).enumerate() {
            assert!(
                (g - c).abs() <= t * c.abs().max(1.0),
                "{} step {i}: gpu {g}, cpu {c}",
                P::NAME
            );
        }
    }
    let opt = Optimization::new(Sgd::new(0.1).momentum(0.9));
    pair::<Mixed<BF16>>(opt);
    pair::<True<F16>>(opt);
    pair::<True<BF16>>(opt);
    pair::<True<F32>>(opt);
    pair::<True<F64>>(opt);
}

/// How far a per-step loss on a real GPU may be from the CPU's: cuBLAS sums products in another
/// order, so activations can differ by an ulp of the compute type, and that moves a loss of about
/// 1 by a few ulps (bf16: 0.031, f16: 0.0039; f32 and f64: 1e-5).
fn gpu_loss_tol<P: Precision>() -> f64 {
    (4.0 * eps::<P::Compute>()).max(1e-5)
}

/// Per-step losses of a small CNN with layer norm and dropout (a `Sequential`) under `P` on `D`.
fn cnn_losses<P: Precision, D: Runs<P>>() -> Vec<f64> {
    use nbit::nn::{Conv2d, Dropout, Flatten, LayerNorm, Linear, Relu, Reshape, Sequential};
    use nbit::tensor::ConvOptions;
    let t = Trainer::<P, D>::builder()
        .enable_progress_bar(false)
        .seed(5)
        .max_steps(6)
        .build()
        .unwrap();
    let pad = ConvOptions {
        padding: (1, 1),
        ..ConvOptions::default()
    };
    let mut model = t
        .init_module(|ctx| {
            Ok::<_, nbit::Error>(
                Sequential::new()
                    .push(Reshape::new(&[1, 2, 2]))
                    .push(Conv2d::new(ctx, "conv", 1, 4, (2, 2), pad)?)
                    .push(Relu)
                    .push(Flatten)
                    .push(LayerNorm::new("norm", 36))
                    .push(Dropout::new(0.2)?)
                    .push(Linear::new(ctx, "out", 36, 3)?)
                    .optimizer(Optimization::new(AdamW::new(0.01))),
            )
        })
        .unwrap();
    let r = t.fit(&mut model, &loader(96, 16), None).unwrap();
    r.history.iter().map(|s| s.loss).collect()
}

#[test]
fn a_cnn_with_layer_norm_and_dropout_trains_on_the_gpu_as_on_the_cpu() {
    gpu();
    // Convolution (unfold/fold), layer norm, dropout's seeded masks, AdamW: every step as on the
    // CPU (bit for bit under the emulation but for f64 sums' order).
    for (g, c, t) in [
        (
            cnn_losses::<Mixed<BF16>, Gpu>(),
            cnn_losses::<Mixed<BF16>, Cpu>(),
            0.0,
        ),
        (
            cnn_losses::<True<F32>, Gpu>(),
            cnn_losses::<True<F32>, Cpu>(),
            0.0,
        ),
        (
            cnn_losses::<True<F64>, Gpu>(),
            cnn_losses::<True<F64>, Cpu>(),
            1e-13,
        ),
    ] {
        let t = if real() { 5e-3 } else { t };
        assert_eq!(g.len(), 6);
        for (i, (g, c)) in g.iter().zip(&c).enumerate() {
            assert!(
                (g - c).abs() <= t * c.abs().max(1.0),
                "step {i}: gpu {g}, cpu {c}"
            );
        }
    }
}

#[test]
fn a_gpu_failure_is_an_error_from_fit_not_a_panic() {
    gpu();
    // More memory than any device (or this host) has: the allocation fails inside a kernel call,
    // and `fit` returns the driver's words.
    struct Huge;
    impl Model<True<F32>, Gpu> for Huge {
        fn training_step(
            &mut self,
            _: &Autocast<True<F32>, Gpu>,
            _: &nbit::data::Batch,
            _: &StepInfo,
        ) -> Result<Tensor<f32, Gpu>, nbit::Error> {
            let t = Tensor::<f32, Gpu>::zeros(&[1 << 30, 1 << 30]);
            Ok(t.sum())
        }
        fn configure_optimizers(&self) -> Optimization {
            Optimization::new(Sgd::new(0.1))
        }
        fn parameters_mut(&mut self) -> Vec<&mut nbit::nn::Parameter<f32, Gpu>> {
            vec![]
        }
    }
    let t = Trainer::<True<F32>, Gpu>::builder()
        .enable_progress_bar(false)
        .max_steps(1)
        .build()
        .unwrap();
    let e = t.fit(&mut Huge, &loader(16, 16), None).unwrap_err().to_string();
    assert!(
        e.contains("'gpu' failed during full") && e.contains("allocating"),
        "{e}"
    );
}

#[test]
fn the_gpu_backend_refuses_what_its_kernels_cannot_take() {
    gpu();
    crate::backend_contract::misuse_is_refused::<Gpu>("gpu");
}

#[test]
fn a_product_over_an_empty_inner_axis_is_zeros_or_the_bias_even_in_a_recycled_block() {
    gpu();
    // Blocks of the output's size, freed with 7s in them, are what the allocator hands out next
    // (the emulation recycles blocks as the real driver's cache does).
    for _ in 0..3 {
        drop(up(&ArrayD::<f32>::from_elem(IxDyn(&[2, 3]), 7.0)));
    }
    let (a, b) = (
        up(&ArrayD::<f32>::zeros(IxDyn(&[2, 0]))),
        up(&ArrayD::<f32>::zeros(IxDyn(&[0, 3]))),
    );
    assert_eq!(
        down(&Gpu::matmul(&a, &b, false, false, None)),
        ArrayD::<f32>::zeros(IxDyn(&[2, 3]))
    );
    let bias = up(&ArrayD::from_shape_vec(IxDyn(&[3]), vec![1.0f32, 2.0, 3.0]).unwrap());
    let with_bias = down(&Gpu::matmul(&a, &b, false, false, Some(&bias)));
    assert_eq!(
        with_bias.into_raw_vec_and_offset().0,
        vec![1.0, 2.0, 3.0, 1.0, 2.0, 3.0]
    );
    let z = |shape: &[usize]| up(&ArrayD::<num_complex::Complex<f64>>::zeros(IxDyn(shape)));
    for _ in 0..3 {
        drop(up(&ArrayD::from_elem(
            IxDyn(&[2, 3]),
            num_complex::Complex::new(7.0, 7.0),
        )));
    }
    let c = down(&Gpu::cmatmul(
        &z(&[2, 0]),
        &z(&[0, 3]),
        false,
        false,
        false,
        false,
    ));
    assert!(c.iter().all(|v| v.re == 0.0 && v.im == 0.0), "{c:?}");
}

/// The host waits for the GPU once per optimizer step (for the scaler's skip decision, or without
/// a scaler for the losses' values), once more when clipping by norm, and never per layer, per
/// micro-batch or per upload: counted by `cuda::host_waits` as the difference between a 6-step
/// and a 3-step fit, so the start and end of `fit` cancel.
#[test]
fn an_optimizer_step_waits_for_the_gpu_once_and_once_more_to_clip_by_norm() {
    gpu();
    fn per_step<P: Precision>(hidden: &[usize], clip: bool, accumulate: usize) -> u64
    where
        Gpu: Runs<P>,
    {
        let waits = |steps: u64| {
            let mut b = Trainer::<P, Gpu>::builder()
                .enable_progress_bar(false)
                .seed(7)
                .max_steps(steps)
                .accumulate_grad_batches(accumulate);
            if clip {
                b = b.gradient_clip_val(0.5);
            }
            let t = b.build().unwrap();
            let sizes: Vec<usize> = [4].iter().chain(hidden).chain(&[3]).copied().collect();
            let opt = Optimization::new(Sgd::new(0.1).momentum(0.9));
            let mut m = t
                .init_module(|ctx| MlpModel::new(ctx, &sizes, nbit::nn::Task::Classification, opt))
                .unwrap();
            let data = loader(96, 8);
            let before = cuda::host_waits();
            t.fit(&mut m, &data, None).unwrap();
            cuda::host_waits() - before
        };
        let (three, six) = (waits(3), waits(6));
        assert_eq!((six - three) % 3, 0, "{}: {three} then {six} waits", P::NAME);
        (six - three) / 3
    }
    for hidden in [&[16][..], &[16, 16, 16, 16]] {
        assert_eq!(
            per_step::<Mixed<F16>>(hidden, false, 1),
            1,
            "16-mixed, {hidden:?}"
        );
        assert_eq!(
            per_step::<Mixed<BF16>>(hidden, false, 1),
            1,
            "bf16-mixed, {hidden:?}"
        );
        assert_eq!(per_step::<True<F32>>(hidden, false, 1), 1, "32-true, {hidden:?}");
        assert_eq!(
            per_step::<Mixed<F16>>(hidden, true, 1),
            2,
            "16-mixed clipped, {hidden:?}"
        );
        assert_eq!(
            per_step::<Mixed<F16>>(hidden, false, 3),
            1,
            "16-mixed accumulating, {hidden:?}"
        );
    }
}

#[test]
fn a_transformer_trains_on_the_gpu_with_the_cpus_numbers() {
    // nn.Transformer (attention's batched products, permutes, masks, softmax, layer norms) forward
    // and backward in f64 on the Gpu backend and on the CPU: the output and every gradient.
    gpu();
    let r = crate::transformer::reference();
    let case = &r["cases"][1];
    let (g, c) = (
        crate::transformer::run::<True<F64>, Gpu>(case),
        crate::transformer::run::<True<F64>, Cpu>(case),
    );
    let tol = if real() { 1e-12 } else { 1e-14 };
    let e = crate::transformer::error(&g.out, &c.out);
    assert!(e < tol, "output differs by {e:e}");
    assert_eq!(g.grads.len(), c.grads.len());
    for (k, v) in &c.grads {
        let e = crate::transformer::error(&g.grads[k], v);
        assert!(e < tol, "gradient of {k} differs by {e:e}");
    }
}

#[test]
fn lightnings_demo_model_trains_under_16_mixed_on_the_gpu() {
    // The column a CPU cannot run: fp16 autocast with the loss scaler, on the demo language
    // model (its numbers against the CPU's: a_transformer_trains_on_the_gpu_with_the_cpus_numbers).
    use nbit::data::{DataLoader, Dataset, Vocabulary};
    gpu();
    let text = "abcde edcba ".repeat(30);
    let vocab = Vocabulary::from_text(&text);
    let data = Dataset::token_windows(&vocab.encode(&text).unwrap(), 12).unwrap();
    let loader = DataLoader::new(data, 8).unwrap().shuffle(true).seed(0);
    // Chance is ln 5 = 1.61 (five characters follow a space or a letter).
    let mixed = crate::transformer::fit_small_lm::<Mixed<F16>, Gpu>(&loader, vocab.len(), 5)
        .1
        .loss();
    println!("demo LM under 16-mixed on the Gpu: validation loss {mixed:.4}");
    assert!(mixed < 0.5, "16-mixed on the GPU: loss {mixed}");
}

#[cfg(not(feature = "mpi"))]
#[test]
fn nccl_data_parallel_needs_the_mpi_feature_too() {
    gpu();
    let msg = nbit::Trainer::<nbit::True<nbit::F32>, Gpu, nbit::Ddp<nbit::Nccl>>::new()
        .unwrap_err()
        .to_string();
    assert!(msg.contains("`cuda` and `mpi` features"), "{msg}");
}
