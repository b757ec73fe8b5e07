//! Finite-difference gradient checks in f64 for every differentiable op.
//!
//! Each check builds `L = Σ r ⊙ f(inputs)` with fixed pseudo-random weights `r` (so every output
//! element matters), takes the analytic gradient by `backward`, and compares it with central
//! differences `(L(x+h) - L(x-h)) / 2h`, h = 1e-6. The relative error
//! `|analytic - numeric| / max(|analytic|, |numeric|, 0.01)` must be at most 1e-6.

use crate::common::{fd_check, values, weigh};
use nbit::Error;
use nbit::tensor::Tensor;
use ndarray::ArrayD;

type T = Tensor<f64>;

/// Checks `f` through `L = Σ r ⊙ f(inputs)`.
fn check(name: &str, inputs: Vec<ArrayD<f64>>, f: impl Fn(&[T]) -> Result<T, Error>) {
    fd_check(name, &inputs, |t| weigh(&f(t)?));
}

fn v(shape: &[usize], seed: u64) -> ArrayD<f64> {
    values(shape, seed, -1.0, 1.0)
}

/// Values away from a kink (relu at 0).
fn away_from_zero(shape: &[usize], seed: u64) -> ArrayD<f64> {
    v(shape, seed).mapv(|x| if x.abs() < 0.1 { x + 0.3 } else { x })
}

#[test]
fn matmul_and_linear() {
    check("matmul", vec![v(&[3, 4], 1), v(&[4, 5], 2)], |t| {
        t[0].matmul(&t[1])
    });
    check("linear", vec![v(&[3, 4], 3), v(&[2, 4], 4), v(&[2], 5)], |t| {
        t[0].linear(&t[1], Some(&t[2]))
    });
    check("linear, no bias", vec![v(&[3, 4], 6), v(&[2, 4], 7)], |t| {
        t[0].linear(&t[1], None)
    });
    check(
        "linear, 3-D input",
        vec![v(&[2, 3, 4], 8), v(&[5, 4], 9), v(&[5], 10)],
        |t| t[0].linear(&t[1], Some(&t[2])),
    );
}

#[test]
fn broadcasting_binary_ops() {
    let pos = |s: &[usize], seed| values(s, seed, 0.5, 2.0);
    check("add", vec![v(&[3, 4], 11), v(&[4], 12)], |t| t[0].add(&t[1]));
    check("sub", vec![v(&[3, 1], 13), v(&[1, 4], 14)], |t| t[0].sub(&t[1]));
    check("mul", vec![v(&[2, 3, 4], 15), v(&[3, 1], 16)], |t| {
        t[0].mul(&t[1])
    });
    check("div", vec![v(&[3, 4], 17), pos(&[4], 18)], |t| t[0].div(&t[1]));
    check("div, scalar numerator", vec![v(&[], 19), pos(&[2, 3], 20)], |t| {
        t[0].div(&t[1])
    });
    check("same tensor twice", vec![v(&[3], 21)], |t| t[0].mul(&t[0]));
}

#[test]
fn element_wise_ops() {
    check("neg", vec![v(&[5], 22)], |t| Ok(t[0].neg()));
    check("add_scalar", vec![v(&[5], 23)], |t| Ok(t[0].add_scalar(0.7)));
    check("mul_scalar", vec![v(&[5], 24)], |t| Ok(t[0].mul_scalar(-1.3)));
    check("relu", vec![away_from_zero(&[8], 25)], |t| Ok(t[0].relu()));
    check("gelu", vec![values(&[8], 26, -3.0, 3.0)], |t| Ok(t[0].gelu()));
    check("gelu tanh", vec![values(&[8], 27, -3.0, 3.0)], |t| {
        Ok(t[0].gelu_tanh())
    });
    check("tanh", vec![values(&[8], 28, -2.0, 2.0)], |t| Ok(t[0].tanh()));
    check("sigmoid", vec![values(&[8], 29, -4.0, 4.0)], |t| {
        Ok(t[0].sigmoid())
    });
    check("exp", vec![v(&[8], 30)], |t| Ok(t[0].exp()));
    check("log", vec![values(&[8], 31, 0.2, 3.0)], |t| Ok(t[0].log()));
    check("pow 3", vec![v(&[8], 32)], |t| Ok(t[0].powf(3.0)));
    check(
        "pow 0.5",
        vec![values(&[8], 33, 0.2, 3.0)],
        |t| Ok(t[0].powf(0.5)),
    );
}

#[test]
fn softmax_family_and_losses() {
    check("softmax", vec![values(&[3, 5], 34, -2.0, 2.0)], |t| {
        Ok(t[0].softmax())
    });
    check("log_softmax", vec![values(&[3, 5], 35, -2.0, 2.0)], |t| {
        Ok(t[0].log_softmax())
    });
    check("cross_entropy", vec![values(&[4, 3], 36, -2.0, 2.0)], |t| {
        t[0].cross_entropy(&[0, 2, 1, 2])
    });
    check("nll_loss", vec![v(&[4, 3], 37)], |t| t[0].nll_loss(&[1, 1, 0, 2]));
    check("mse_loss", vec![v(&[3, 2], 38), v(&[3, 2], 39)], |t| {
        t[0].mse_loss(&t[1])
    });
    // Differences kept away from the kink of |d| at 0.
    let small = |s: &[usize], seed| values(s, seed, -0.05, 0.05);
    check("abs", vec![away_from_zero(&[3, 4], 60)], |t| Ok(t[0].abs()));
    check(
        "l1_loss",
        vec![away_from_zero(&[3, 2], 61), small(&[3, 2], 62)],
        |t| t[0].l1_loss(&t[1]),
    );
    let wide = |s: &[usize], seed| values(s, seed, -2.0, 2.0);
    check("huber_loss", vec![wide(&[4, 3], 63), v(&[4, 3], 64)], |t| {
        t[0].huber_loss(&t[1], 0.5)
    });
    check("smooth_l1_loss", vec![wide(&[4, 3], 65), v(&[4, 3], 66)], |t| {
        t[0].smooth_l1_loss(&t[1], 0.75)
    });
    check(
        "binary_cross_entropy_with_logits",
        vec![values(&[3, 4], 67, -3.0, 3.0), values(&[3, 4], 68, 0.0, 1.0)],
        |t| t[0].binary_cross_entropy_with_logits(&t[1]),
    );
}

#[test]
fn the_new_losses_match_torch_nn_functional() {
    // torch 2.15, float64: F.l1_loss, F.huber_loss(delta=0.5), F.smooth_l1_loss(beta=0.5) and
    // F.binary_cross_entropy_with_logits of these inputs.
    let x = T::from_vec(&[2, 3], vec![-2.0, 0.5, 3.0, 0.25, -0.75, 1.5]).unwrap();
    let t = T::from_vec(&[2, 3], vec![0.0, 1.0, 0.25, 1.0, 0.0, 0.5]).unwrap();
    let close = |a: T, b: f64| {
        assert!(
            (a.item().unwrap() - b).abs() < 1e-15,
            "{} vs {b}",
            a.item().unwrap()
        )
    };
    close(x.l1_loss(&t).unwrap(), 1.2916666666666667);
    close(x.huber_loss(&t, 0.5).unwrap(), 0.5208333333333334);
    close(x.smooth_l1_loss(&t, 0.5).unwrap(), 1.0416666666666667);
    close(
        x.binary_cross_entropy_with_logits(&t).unwrap(),
        0.8023026751288862,
    );
    // beta = 0 is the L1 loss; a bad threshold or a shape mismatch is an error naming it.
    close(x.smooth_l1_loss(&t, 0.0).unwrap(), 1.2916666666666667);
    assert!(x.huber_loss(&t, 0.0).unwrap_err().to_string().contains("delta"));
    assert!(
        x.smooth_l1_loss(&t, f64::NAN)
            .unwrap_err()
            .to_string()
            .contains("beta")
    );
    let other = T::from_vec(&[3, 2], vec![0.0; 6]).unwrap();
    assert!(
        x.binary_cross_entropy_with_logits(&other)
            .unwrap_err()
            .to_string()
            .contains("binary_cross_entropy_with_logits")
    );
}

#[test]
fn reductions_and_shapes() {
    check("sum", vec![v(&[3, 4], 40)], |t| Ok(t[0].sum()));
    check("mean", vec![v(&[3, 4], 41)], |t| Ok(t[0].mean()));
    check("sum axis 0", vec![v(&[3, 4], 42)], |t| t[0].sum_axis(0, false));
    check("sum axis 1 keepdim", vec![v(&[3, 4], 43)], |t| {
        t[0].sum_axis(1, true)
    });
    check("mean axis 1", vec![v(&[2, 3, 4], 44)], |t| {
        t[0].mean_axis(1, false)
    });
    check("reshape", vec![v(&[3, 4], 45)], |t| t[0].reshape(&[2, 6]));
    check("transpose", vec![v(&[3, 4], 46)], |t| Ok(t[0].transpose()));
    check("transpose 3-D", vec![v(&[2, 3, 4], 47)], |t| Ok(t[0].transpose()));
    check("permute", vec![v(&[2, 3, 4], 120)], |t| t[0].permute(&[2, 0, 1]));
    check("swapaxes", vec![v(&[2, 3, 4, 2], 121)], |t| t[0].swapaxes(1, -1));
    check("unsqueeze, squeeze", vec![v(&[2, 3], 122)], |t| {
        t[0].unsqueeze(1)?.mul(&t[0].unsqueeze(-1)?)?.squeeze(1)
    });
    check("expand", vec![v(&[3, 1], 123)], |t| t[0].expand(&[2, 3, 4]));
    check("triu", vec![v(&[2, 3, 4], 124)], |t| t[0].triu(1));
    check("tril", vec![v(&[4, 3], 125)], |t| t[0].tril(-1));
    check("masked_fill", vec![v(&[3, 4], 126)], |t| {
        let mask = T::from_vec(&[4], vec![0.0, 1.0, 0.0, 1.0])?;
        t[0].masked_fill(&mask, -7.0)
    });
}

#[test]
fn batched_matmul_and_softmax_along_an_axis() {
    check(
        "batched matmul",
        vec![v(&[2, 3, 4], 130), v(&[2, 4, 5], 131)],
        |t| t[0].matmul(&t[1]),
    );
    check(
        "matmul broadcasting batch axes",
        vec![v(&[2, 1, 3, 4], 132), v(&[3, 4, 2], 133)],
        |t| t[0].matmul(&t[1]),
    );
    check(
        "matmul of a batch and a matrix",
        vec![v(&[2, 3, 4], 134), v(&[4, 5], 135)],
        |t| t[0].matmul(&t[1]),
    );
    check("softmax along axis 1", vec![v(&[2, 3, 4], 136)], |t| {
        t[0].softmax_axis(1)
    });
    check("log_softmax along axis 0", vec![v(&[3, 4], 137)], |t| {
        t[0].log_softmax_axis(0)
    });
}

#[test]
fn dropout_and_layer_norm() {
    check("dropout", vec![v(&[4, 6], 48)], |t| t[0].dropout(0.3, 7));
    check(
        "layer_norm affine",
        vec![v(&[3, 5], 49), v(&[5], 50), v(&[5], 51)],
        |t| t[0].layer_norm(Some(&t[1]), Some(&t[2]), 1e-5),
    );
    check("layer_norm plain", vec![v(&[2, 3, 4], 52)], |t| {
        t[0].layer_norm(None, None, 1e-5)
    });
}

#[test]
fn a_composite_mlp() {
    check(
        "mlp",
        vec![
            v(&[4, 3], 53),
            v(&[5, 3], 54),
            v(&[5], 55),
            v(&[2, 5], 56),
            v(&[2], 57),
        ],
        |t| {
            let h = t[0].linear(&t[1], Some(&t[2]))?.tanh();
            t[3].linear(&t[3], None)?; // unrelated op on a leaf must not disturb its gradient
            h.linear(&t[3], Some(&t[4]))?.cross_entropy(&[0, 1, 1, 0])
        },
    );
}

#[test]
fn cast_sends_the_gradient_back_in_the_source_dtype() {
    // Rounding to f32 makes finite differences meaningless at 1e-6; the cast's gradient is the
    // identity cast back, which a linear function shows exactly.
    let x = T::from_vec(&[3], vec![0.1, 0.2, 0.3]).unwrap().requires_grad();
    let y = x.cast::<f32>().mul_scalar(3.0).cast::<half::bf16>().sum();
    let g = y.backward().unwrap().get(&x).unwrap();
    assert_eq!(g.dtype(), nbit::DType::F64);
    assert_eq!(g.to_vec(), vec![3.0; 3]);
}

#[test]
fn selection_joining_and_extremes() {
    check("sqrt", vec![values(&[8], 60, 0.2, 3.0)], |t| Ok(t[0].sqrt()));
    // Away from the bounds, where the gradient is 1 or 0.
    let spread = values(&[10], 61, -3.0, 3.0);
    check("clamp", vec![spread], |t| t[0].clamp(-1.0, 1.5));
    check("index_select, repeats", vec![v(&[4, 3], 62)], |t| {
        t[0].index_select(0, &[2, 0, 2, 3])
    });
    check("index_select axis 1", vec![v(&[2, 5, 3], 63)], |t| {
        t[0].index_select(1, &[4, 1])
    });
    check("narrow", vec![v(&[3, 6], 64)], |t| t[0].narrow(1, 2, 3));
    let idx = ndarray::ArrayD::from_shape_vec(vec![3, 2], vec![1, 0, 3, 3, 0, 2]).unwrap();
    check("gather axis 1", vec![v(&[3, 4], 65)], |t| t[0].gather(1, &idx));
    let idx0 = ndarray::ArrayD::from_shape_vec(vec![2, 4], vec![0, 2, 1, 0, 2, 2, 0, 1]).unwrap();
    check("gather axis 0", vec![v(&[3, 4], 66)], |t| t[0].gather(0, &idx0));
    check(
        "concat",
        vec![v(&[2, 3], 67), v(&[2, 1], 68), v(&[2, 2], 69)],
        |t| Tensor::concat(&[&t[0], &t[1], &t[2]], 1),
    );
    check("stack", vec![v(&[2, 3], 70), v(&[2, 3], 71)], |t| {
        Tensor::stack(&[&t[0], &t[1]], 1)
    });
    check("max axis", vec![v(&[3, 5], 72)], |t| {
        Ok(t[0].max_axis(1, false)?.0)
    });
    check("min axis keepdim", vec![v(&[4, 3], 73)], |t| {
        Ok(t[0].min_axis(0, true)?.0)
    });
    check("max", vec![v(&[2, 3], 74)], |t| t[0].max());
    check("where", vec![v(&[3, 4], 75), v(&[4], 76)], |t| {
        t[0].gt(&Tensor::scalar(0.0))?.where_cond(&t[0], &t[1])
    });
}

#[test]
fn convolutions() {
    use nbit::tensor::ConvOptions;
    check(
        "conv2d",
        vec![v(&[2, 3, 5, 4], 80), v(&[4, 3, 3, 2], 81), v(&[4], 82)],
        |t| t[0].conv2d(&t[1], Some(&t[2]), ConvOptions::default()),
    );
    let strided = ConvOptions {
        stride: (2, 1),
        padding: (1, 2),
        dilation: (1, 2),
    };
    check(
        "conv2d strided, padded, dilated",
        vec![v(&[1, 2, 6, 5], 83), v(&[3, 2, 3, 2], 84)],
        |t| t[0].conv2d(&t[1], None, strided),
    );
    check(
        "conv1d",
        vec![v(&[2, 3, 7], 85), v(&[2, 3, 3], 86), v(&[2], 87)],
        |t| t[0].conv1d(&t[1], Some(&t[2]), 2, 1),
    );
}
