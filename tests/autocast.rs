//! Dtype flow under each precision: a two-layer MLP forward and backward, every activation, the
//! loss and every gradient, against PyTorch autocast's rules; and its loss against an independent
//! f64 computation, within each precision's tolerance.

use nbit::prelude::*;
use nbit::{DType, Float, Grads};

const X: [[f64; 3]; 4] = [
    [0.5, -1.0, 2.0],
    [1.5, 0.25, -0.5],
    [-2.0, 1.0, 0.75],
    [0.1, 0.2, 0.3],
];
const W1: [[f64; 3]; 5] = [
    [0.2, -0.1, 0.4],
    [-0.3, 0.5, 0.1],
    [0.25, 0.05, -0.2],
    [0.6, -0.4, 0.3],
    [-0.15, 0.35, 0.45],
];
const B1: [f64; 5] = [0.01, -0.02, 0.03, 0.0, 0.05];
const W2: [[f64; 5]; 3] = [
    [0.3, -0.2, 0.1, 0.4, -0.5],
    [-0.1, 0.25, 0.35, -0.3, 0.2],
    [0.05, 0.15, -0.45, 0.2, 0.1],
];
const B2: [f64; 3] = [0.0, 0.1, -0.1];
const Y: [usize; 4] = [2, 0, 1, 2];

fn tensor<E: Float>(shape: &[usize], v: impl IntoIterator<Item = f64>) -> Tensor<E> {
    Tensor::from_vec(shape, v.into_iter().map(E::from_f64).collect()).unwrap()
}

/// Dtypes seen in one training step, in order: input, hidden pre-activation, hidden, logits,
/// loss, then gradients of w1, b1, w2, b2, hidden, logits.
struct Flow {
    dtypes: [DType; 10],
    loss: f64,
    w1_grad: Vec<f64>,
}

fn step<P: Precision>() -> Flow {
    let w1 = tensor::<P::Param>(&[5, 3], W1.iter().flatten().copied()).requires_grad();
    let b1 = tensor::<P::Param>(&[5], B1).requires_grad();
    let w2 = tensor::<P::Param>(&[3, 5], W2.iter().flatten().copied()).requires_grad();
    let b2 = tensor::<P::Param>(&[3], B2).requires_grad();
    let x = tensor::<P::Param>(&[4, 3], X.iter().flatten().copied());

    let ac = Autocast::<P>::new();
    let pre = ac.linear(&x, &w1, Some(&b1)).unwrap();
    let hidden = pre.relu();
    let logits = ac.linear(&hidden, &w2, Some(&b2)).unwrap();
    let loss = ac.cross_entropy(&logits, &Y).unwrap();
    assert_eq!(ac.cached(), 4, "each parameter cast once");
    // Activation gradients are read too: keep them (PyTorch's retain_grad).
    hidden.retain_grad();
    logits.retain_grad();
    let grads: Grads = loss.backward().unwrap();
    let g = |d: Option<DType>| d.expect("gradient flowed");
    Flow {
        dtypes: [
            pre.dtype(),
            hidden.dtype(),
            logits.dtype(),
            loss.dtype(),
            g(grads.get(&w1).map(|t| t.dtype())),
            g(grads.get(&b1).map(|t| t.dtype())),
            g(grads.get(&w2).map(|t| t.dtype())),
            g(grads.get(&b2).map(|t| t.dtype())),
            g(grads.get(&hidden).map(|t| t.dtype())),
            g(grads.get(&logits).map(|t| t.dtype())),
        ],
        loss: loss.item().unwrap().as_f64(),
        w1_grad: grads
            .get(&w1)
            .unwrap()
            .to_vec()
            .into_iter()
            .map(|v| v.as_f64())
            .collect(),
    }
}

/// The same step computed with plain f64 loops: the reference.
fn reference() -> (f64, Vec<f64>) {
    let mut loss = 0.0;
    let mut gw1 = vec![0.0; 15];
    for (x, &y) in X.iter().zip(&Y) {
        let pre: Vec<f64> = (0..5)
            .map(|j| B1[j] + (0..3).map(|k| W1[j][k] * x[k]).sum::<f64>())
            .collect();
        let h: Vec<f64> = pre.iter().map(|v| v.max(0.0)).collect();
        let z: Vec<f64> = (0..3)
            .map(|i| B2[i] + (0..5).map(|j| W2[i][j] * h[j]).sum::<f64>())
            .collect();
        let m = z.iter().cloned().fold(f64::MIN, f64::max);
        let lse = m + z.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
        loss += (lse - z[y]) / 4.0;
        let dz: Vec<f64> = (0..3)
            .map(|i| ((z[i] - lse).exp() - if i == y { 1.0 } else { 0.0 }) / 4.0)
            .collect();
        for j in 0..5 {
            let dh = (0..3).map(|i| dz[i] * W2[i][j]).sum::<f64>();
            let dpre = if pre[j] > 0.0 { dh } else { 0.0 };
            for k in 0..3 {
                gw1[j * 3 + k] += dpre * x[k];
            }
        }
    }
    (loss, gw1)
}

fn check<P: Precision>(expected: [DType; 10], tol: f64) {
    let flow = step::<P>();
    assert_eq!(flow.dtypes, expected, "{}", P::NAME);
    let (loss, gw1) = reference();
    let rel = (flow.loss - loss).abs() / loss.abs();
    assert!(
        rel <= tol,
        "{}: loss {} vs f64 reference {loss} (rel {rel:e} > {tol:e})",
        P::NAME,
        flow.loss
    );
    let norm = gw1.iter().map(|v| v * v).sum::<f64>().sqrt();
    let err = flow
        .w1_grad
        .iter()
        .zip(&gw1)
        .map(|(a, b)| (a - b).powi(2))
        .sum::<f64>()
        .sqrt();
    assert!(
        err / norm <= 10.0 * tol,
        "{}: w1 gradient rel error {:e}",
        P::NAME,
        err / norm
    );
}

use DType::{BF16 as B, F16 as H, F32 as S, F64 as D};

#[test]
fn mixed_f16_runs_matmuls_in_f16_and_keeps_f32_master_grads() {
    // pre, hidden, logits in f16; loss in f32; parameter grads f32; activation grads f16.
    check::<Mixed<F16>>([H, H, H, S, S, S, S, S, H, H], 5e-3);
}

#[test]
fn mixed_bf16_runs_matmuls_in_bf16_and_keeps_f32_master_grads() {
    check::<Mixed<BF16>>([B, B, B, S, S, S, S, S, B, B], 2e-2);
}

#[test]
fn true_precisions_keep_everything_in_one_dtype() {
    check::<True<F16>>([H; 10], 5e-3);
    check::<True<BF16>>([B; 10], 3e-2);
    check::<True<F32>>([S; 10], 1e-6);
    check::<True<F64>>([D; 10], 1e-12);
}

#[test]
fn mixed_loss_differs_from_f32_by_half_precision_rounding() {
    // The mixed losses are not the f32 loss: proof that matmuls really ran in 16 bits.
    let f32_loss = step::<True<F32>>().loss;
    for loss in [step::<Mixed<F16>>().loss, step::<Mixed<BF16>>().loss] {
        assert_ne!(loss, f32_loss);
    }
}

#[test]
fn promotion_and_fp32_ops() {
    let a = Tensor::<half::f16>::full(&[2], half::f16::from_f32(1.5));
    let b = Tensor::<f32>::full(&[2], 0.25);
    let c = Tensor::<half::bf16>::full(&[2], half::bf16::from_f32(2.0));
    let ac = Autocast::<Mixed<F16>>::new();
    let ab = ac.add(&a, &b).unwrap();
    assert_eq!((ab.dtype(), ab.to_vec()), (DType::F32, vec![1.75, 1.75]));
    let ac2 = ac.mul(&a, &c).unwrap(); // f16 x bf16 -> f32, as in PyTorch
    assert_eq!(ac2.dtype(), DType::F32);
    assert_eq!(ac.softmax(&a).dtype(), DType::F32);
    assert_eq!(ac.sum(&c).dtype(), DType::F32);
    assert_eq!(Autocast::<True<F16>>::new().exp(&a).dtype(), DType::F16);
    // Ops outside the lists keep their input dtype.
    assert_eq!(a.relu().dtype(), DType::F16);
}

#[test]
fn a_weight_used_twice_is_cast_once_and_gets_both_gradients() {
    let w = Tensor::<f32>::from_vec(&[2, 2], vec![1.0, 2.0, 3.0, 4.0])
        .unwrap()
        .requires_grad();
    let x = Tensor::<f32>::from_vec(&[1, 2], vec![1.0, 1.0]).unwrap();
    let ac = Autocast::<Mixed<BF16>>::new();
    let h = ac.linear(&x, &w, None).unwrap();
    let y = ac.linear(&h, &w, None).unwrap();
    assert_eq!(ac.cached(), 1);
    let loss = ac.sum(&y);
    let g = loss.backward().unwrap().get(&w).unwrap();
    // h = x W^T = [3, 7]; L = sum(h W^T). Second use: dL/dW_ij = h_j -> [[3, 7], [3, 7]].
    // First use: dL/dh = column sums of W = [4, 6], dL/dW_kj = (dL/dh)_k x_j -> [[4, 4], [6, 6]].
    assert_eq!(g.to_vec(), vec![7.0, 11.0, 9.0, 13.0]);
}

/// Generic over the precision: autocast's binary ops combine a precision's own types without
/// naming a promotion (issue 13, friction 4: `ac.mul(w, w)` on `P::Param` used to need a
/// `Promote` bound the caller could not write).
fn weight_penalty_and_gate<P: Precision>(
    ac: &Autocast<P>,
    w: &Tensor<P::Param>,
    x: &Tensor<P::Compute>,
) -> Result<(Tensor<P::Param>, DType), Error> {
    let squared = ac.mul(w, w)?; // Param x Param -> Param
    let gated = ac.mul(w, x)?; // Param x Compute -> their promotion
    Ok((squared, gated.dtype()))
}

#[test]
fn autocast_binary_ops_work_in_generic_code_over_any_precision() {
    fn run<P: Precision>(expect_gate: DType) {
        let w = Tensor::<P::Param>::from_vec(&[2], vec![P::Param::from_f64(1.5), P::Param::from_f64(-2.0)])
            .unwrap();
        let x =
            Tensor::<P::Compute>::from_vec(&[2], vec![P::Compute::from_f64(2.0), P::Compute::from_f64(0.5)])
                .unwrap();
        let ac = Autocast::<P>::new();
        let (sq, gate) = weight_penalty_and_gate(&ac, &w, &x).unwrap();
        assert_eq!(
            sq.to_vec().iter().map(|v| v.as_f64()).collect::<Vec<_>>(),
            vec![2.25, 4.0]
        );
        assert_eq!(gate, expect_gate, "{}", P::NAME);
    }
    run::<Mixed<BF16>>(DType::F32); // f32 master weight x bf16 activation -> f32
    run::<True<BF16>>(DType::BF16);
    run::<True<F16>>(DType::F16);
    run::<True<F64>>(DType::F64);
}

#[test]
fn the_regression_and_binary_losses_are_fp32_class() {
    // PyTorch's autocast runs these in float32; under bf16-mixed nbit computes them in P::Full.
    let ac = Autocast::<Mixed<BF16>>::new();
    let h = |v: Vec<f64>| {
        Tensor::<half::bf16>::from_vec(&[2, 2], v.into_iter().map(half::bf16::from_f64).collect()).unwrap()
    };
    let (x, y) = (h(vec![0.5, -1.5, 2.0, 0.0]), h(vec![1.0, 0.0, 1.0, 0.5]));
    for loss in [
        ac.l1_loss(&x, &y).unwrap(),
        ac.huber_loss(&x, &y, 1.0).unwrap(),
        ac.smooth_l1_loss(&x, &y, 1.0).unwrap(),
        ac.binary_cross_entropy_with_logits(&x, &y).unwrap(),
    ] {
        assert_eq!(loss.dtype(), DType::F32);
    }
    // Under bf16-true, P::Full is bf16.
    let ac = Autocast::<True<BF16>>::new();
    assert_eq!(ac.l1_loss(&x, &y).unwrap().dtype(), DType::BF16);
}
