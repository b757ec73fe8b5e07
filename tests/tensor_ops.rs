//! Values of the indexing, joining, extreme-value and convolution ops against PyTorch 2.15
//! (`torch.nn.functional.conv2d` and friends, printed by a script in float64 and under CPU
//! bf16 autocast), their edge cases (ties, NaN, bounds) as PyTorch defines them, and the `nn`
//! layers built on them. Gradients are checked in `tests/gradcheck.rs`.

use nbit::autocast::Autocast;
use nbit::ndarray::ArrayD;
use nbit::nn::{Dropout, Embedding, InitCtx, LayerNorm, Module};
use nbit::prelude::*;
use nbit::tensor::ConvOptions;

fn seq(shape: &[usize], f: impl Fn(usize) -> f64) -> Tensor<f64> {
    let n = shape.iter().product();
    Tensor::from_vec(shape, (0..n).map(f).collect()).unwrap()
}

fn conv_inputs() -> (Tensor<f64>, Tensor<f64>, Tensor<f64>) {
    (
        seq(&[2, 3, 5, 4], |i| (0.37 * i as f64).sin()),
        seq(&[4, 3, 3, 2], |i| 0.5 * (0.21 * i as f64).cos()),
        seq(&[4], |i| 0.1 * i as f64 - 0.2),
    )
}

const STRIDED: ConvOptions = ConvOptions {
    stride: (2, 1),
    padding: (1, 2),
    dilation: (1, 2),
};

/// `y.flatten()[::7]` from PyTorch.
const CONV2D_TORCH: [f64; 21] = [
    -0.4157167633764115,
    0.6111225771200224,
    -2.7167397851816655,
    -0.20837941807122684,
    -0.95407736634316,
    0.9592752592933508,
    1.1310083517989764,
    -0.6664522123271552,
    2.5319311794904857,
    -2.400348586809451,
    0.6192498959507244,
    -1.5543895312748222,
    1.1989831607980677,
    -0.36784858818388166,
    2.094063757813206,
    -2.4473179052077545,
    0.4147905801953815,
    -0.9177557026670647,
    -1.0683870682061354,
    1.175052710905158,
    -0.31378446315126696,
];

#[test]
fn conv2d_matches_pytorch_in_f64() {
    let (x, w, b) = conv_inputs();
    let y = x.conv2d(&w, Some(&b), STRIDED).unwrap();
    assert_eq!(y.shape(), [2, 4, 3, 6]);
    let got: Vec<f64> = y.to_vec().into_iter().step_by(7).collect();
    for (g, t) in got.iter().zip(CONV2D_TORCH) {
        assert!((g - t).abs() < 1e-13, "{g} vs {t}");
    }
}

#[test]
fn conv2d_under_bf16_autocast_runs_in_bf16_like_pytorch() {
    let torch_bf16: [f64; 21] = [
        -0.416015625,
        0.61328125,
        -2.71875,
        -0.2080078125,
        -0.953125,
        0.95703125,
        1.1328125,
        -0.66796875,
        2.53125,
        -2.40625,
        0.6171875,
        -1.5546875,
        1.1953125,
        -0.3671875,
        2.09375,
        -2.453125,
        0.4140625,
        -0.91796875,
        -1.0703125,
        1.1796875,
        -0.314453125,
    ];
    let (x, w, b) = conv_inputs();
    let ac = Autocast::<Mixed<BF16>>::new();
    let y = ac
        .conv2d(
            &x.cast::<f32>(),
            &w.cast::<f32>(),
            Some(&b.cast::<f32>()),
            STRIDED,
        )
        .unwrap();
    assert_eq!(y.dtype(), DType::BF16);
    let got: Vec<f64> = y.to_vec().into_iter().step_by(7).map(|v| v.as_f64()).collect();
    // Both round an f32 accumulation once; the summation orders differ, so a value may land on
    // the neighbouring bf16 (one unit in the last place: 2^-7 relative).
    let mut exact = 0;
    for (g, t) in got.iter().zip(torch_bf16) {
        assert!((g - t).abs() <= t.abs() * 2f64.powi(-7), "{g} vs {t}");
        exact += usize::from(*g == t);
    }
    assert!(exact >= 19, "only {exact} of 21 bit-exact");
}

#[test]
fn conv1d_matches_pytorch() {
    let torch = [
        0.17647079705953822,
        0.47753530110622605,
        0.4353711299522346,
        0.09799749886227498,
        0.18968177112366194,
        0.1482261229686764,
        -0.25362433164439063,
        -0.38266933803116077,
        0.19820395010342295,
        0.05638744561851953,
        -0.4545827329369639,
        -0.5490023377817276,
        -0.32715960892643947,
        -0.577101924686978,
        -0.6473735573024549,
        -0.4430200762249402,
    ];
    let x = seq(&[2, 3, 7], |i| (0.37 * i as f64).sin());
    let w = seq(&[2, 3, 3], |i| 0.5 * (0.21 * i as f64).cos());
    let b = seq(&[2], |i| 0.1 * i as f64 - 0.2);
    let y = x.conv1d(&w, Some(&b), 2, 1).unwrap();
    assert_eq!(y.shape(), [2, 2, 4]);
    for (g, t) in y.to_vec().iter().zip(torch) {
        assert!((g - t).abs() < 1e-14, "{g} vs {t}");
    }
}

#[test]
fn bad_convolutions_are_errors_that_say_why() {
    let (x, w, _) = conv_inputs();
    let big = seq(&[4, 3, 7, 2], |_| 0.0);
    let e = x
        .conv2d(&big, None, ConvOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("kernel that fits"), "{e}");
    let zero_stride = ConvOptions {
        stride: (0, 1),
        ..ConvOptions::default()
    };
    assert!(x.conv2d(&w, None, zero_stride).is_err());
    let e = x
        .conv2d(&seq(&[4, 2, 3, 2], |_| 0.0), None, ConvOptions::default())
        .unwrap_err();
    assert!(e.to_string().contains("[out, in, kh, kw]"), "{e}");
}

#[test]
fn max_and_min_take_the_first_extreme_and_propagate_nan() {
    let x = Tensor::<f32>::from_vec(&[2, 3], vec![1.0, 3.0, 3.0, f32::NAN, 2.0, f32::NAN]).unwrap();
    let (values, at) = x.max_axis(1, false).unwrap();
    assert_eq!(at, vec![1, 0]);
    let v = values.to_vec();
    assert_eq!(v[0], 3.0);
    assert!(v[1].is_nan());
    let y = Tensor::<f32>::from_vec(&[2, 2], vec![4.0, -1.0, -1.0, 2.0]).unwrap();
    assert_eq!(y.argmin(0).unwrap(), vec![1, 0]);
    assert_eq!(y.argmax(1).unwrap(), vec![0, 1]);
    assert_eq!(y.min().unwrap().item().unwrap(), -1.0);
    assert_eq!(y.max_axis(0, true).unwrap().0.shape(), [1, 2]);
    // The gradient reaches the chosen element only (the first of the tied 3s).
    let t = Tensor::<f64>::from_vec(&[3], vec![3.0, 1.0, 3.0])
        .unwrap()
        .requires_grad();
    let g = t.max().unwrap().backward().unwrap();
    assert_eq!(g.get(&t).unwrap().to_vec(), vec![1.0, 0.0, 0.0]);
    assert!(Tensor::<f32>::zeros(&[0]).max().is_err());
    assert!(y.argmax(2).unwrap_err().to_string().contains("axis"));
}

#[test]
fn clamp_passes_the_gradient_at_the_bounds_and_keeps_nan() {
    let x = Tensor::<f64>::from_vec(&[4], vec![-1.0, 0.0, 2.0, f64::NAN])
        .unwrap()
        .requires_grad();
    let y = x.clamp(-1.0, 1.0).unwrap();
    let v = y.to_vec();
    assert_eq!(&v[..3], &[-1.0, 0.0, 1.0]);
    assert!(v[3].is_nan());
    let g = y.narrow(0, 0, 3).unwrap().sum().backward().unwrap();
    assert_eq!(g.get(&x).unwrap().to_vec(), vec![1.0, 1.0, 0.0, 0.0]);
    assert!(x.clamp(1.0, -1.0).is_err());
}

#[test]
fn indexing_joins_and_comparisons() {
    let x = seq(&[3, 4], |i| i as f64);
    assert_eq!(
        x.index_select(0, &[2, 2, 0]).unwrap().to_vec()[..4],
        [8.0, 9.0, 10.0, 11.0]
    );
    assert_eq!(
        x.narrow(1, 1, 2).unwrap().to_vec(),
        vec![1.0, 2.0, 5.0, 6.0, 9.0, 10.0]
    );
    let idx = ArrayD::from_shape_vec(vec![3, 1], vec![3, 0, 2]).unwrap();
    assert_eq!(x.gather(1, &idx).unwrap().to_vec(), vec![3.0, 4.0, 10.0]);
    let e = x.index_select(0, &[3]).unwrap_err().to_string();
    assert!(e.contains("index = 3 (axis of size 3)"), "{e}");
    assert!(x.narrow(1, 3, 2).is_err());
    assert!(
        x.gather(1, &ArrayD::from_shape_vec(vec![2, 1], vec![0, 0]).unwrap())
            .is_err()
    );

    let c = Tensor::concat(&[&x, &x.narrow(0, 0, 1).unwrap()], 0).unwrap();
    assert_eq!(c.shape(), [4, 4]);
    assert_eq!(c.to_vec()[12..], [0.0, 1.0, 2.0, 3.0]);
    let s = Tensor::stack(&[&x, &x], 2).unwrap();
    assert_eq!(s.shape(), [3, 4, 2]);
    assert_eq!(s.to_vec()[..4], [0.0, 0.0, 1.0, 1.0]);
    assert!(Tensor::concat(&[&x, &seq(&[3, 3], |_| 0.0)], 0).is_err());
    assert!(Tensor::<f64>::concat(&[], 0).is_err());

    let a = Tensor::<f32>::from_vec(&[3], vec![1.0, f32::NAN, 3.0]).unwrap();
    let b = Tensor::<f32>::scalar(1.0);
    assert_eq!(a.eq(&b).unwrap().to_vec(), vec![1.0, 0.0, 0.0]);
    assert_eq!(a.ne(&b).unwrap().to_vec(), vec![0.0, 1.0, 1.0]);
    assert_eq!(a.ge(&b).unwrap().to_vec(), vec![1.0, 0.0, 1.0]);
    assert_eq!(a.lt(&b).unwrap().to_vec(), vec![0.0, 0.0, 0.0]);
    // where: NaN and inf in the branch not taken do not leak (no arithmetic mask).
    let w = a
        .gt(&b)
        .unwrap()
        .where_cond(&a, &Tensor::scalar(f32::INFINITY))
        .unwrap();
    assert_eq!(w.to_vec(), vec![f32::INFINITY, f32::INFINITY, 3.0]);
}

#[test]
fn layers_embedding_layer_norm_and_dropout() {
    let mut ctx = InitCtx::<Mixed<BF16>>::new(3);
    let emb = Embedding::new(&mut ctx, "emb", 10, 4).unwrap();
    let table = emb.weight.value().to_vec();
    let mean = table.iter().sum::<f32>() / 40.0;
    assert!(mean.abs() < 0.5, "N(0, 1) init, mean {mean}");
    let ac = Autocast::<Mixed<BF16>>::new();
    let ids = ArrayD::from_shape_vec(vec![2, 3], vec![0, 9, 9, 1, 0, 5]).unwrap();
    let out = emb.forward(&ac, &ids).unwrap();
    assert_eq!((out.shape(), out.dtype()), (&[2, 3, 4][..], DType::BF16));
    assert_eq!(
        out.to_vec()[4].as_f64(),
        nbit::half::bf16::from_f32(table[36]).as_f64()
    );
    let bad = ArrayD::from_shape_vec(vec![1], vec![10]).unwrap();
    assert!(emb.forward(&ac, &bad).is_err());

    let ln = LayerNorm::<Mixed<BF16>>::new("ln", 4);
    let x = Tensor::<nbit::half::bf16>::from_vec(
        &[1, 4],
        [1.0f32, 2.0, 3.0, 4.0].map(nbit::half::bf16::from_f32).to_vec(),
    )
    .unwrap();
    let y = Module::forward(&ln, &ac, &x).unwrap();
    assert_eq!(y.dtype(), DType::BF16);
    // (x - 2.5) / sqrt(1.25 + 1e-5), rounded to bf16 once.
    assert_eq!(
        y.to_vec()[0].as_f64(),
        nbit::half::bf16::from_f64(-1.5 / 1.25001f64.sqrt()).as_f64()
    );

    let drop = Dropout::new(0.5).unwrap();
    let ones = Tensor::<nbit::half::bf16>::full(&[1000], nbit::half::bf16::from_f32(1.0));
    let eval = Module::<Mixed<BF16>>::forward(&drop, &ac, &ones).unwrap();
    assert_eq!(
        eval.to_vec(),
        ones.to_vec(),
        "dropout is the identity in evaluation"
    );
    let train = Autocast::<Mixed<BF16>>::training(7);
    let first = Module::<Mixed<BF16>>::forward(&drop, &train, &ones)
        .unwrap()
        .to_vec();
    let second = Module::<Mixed<BF16>>::forward(&drop, &train, &ones)
        .unwrap()
        .to_vec();
    let kept = first.iter().filter(|v| v.as_f64() == 2.0).count();
    assert!((400..600).contains(&kept), "{kept} of 1000 kept at p = 0.5");
    assert!(first.iter().all(|v| [0.0, 2.0].contains(&v.as_f64())));
    assert_ne!(first, second, "each dropout call draws its own mask");
    let again = Autocast::<Mixed<BF16>>::training(7);
    assert_eq!(
        Module::<Mixed<BF16>>::forward(&drop, &again, &ones)
            .unwrap()
            .to_vec(),
        first
    );
    assert!(Dropout::new(1.5).is_err());
}

#[test]
fn batched_products_are_the_products_of_their_matrices_in_every_dtype() {
    fn each<E: nbit::Float>() {
        let a = Tensor::<f64>::from_vec(
            &[2, 3, 3, 4],
            (0..72).map(|i| ((i * 37) % 23) as f64 / 7.0 - 1.5).collect(),
        )
        .unwrap()
        .cast::<E>();
        let b = Tensor::<f64>::from_vec(
            &[3, 4, 5],
            (0..60).map(|i| ((i * 11) % 19) as f64 / 5.0 - 2.0).collect(),
        )
        .unwrap()
        .cast::<E>();
        let c = a.matmul(&b).unwrap();
        assert_eq!(c.shape(), &[2, 3, 3, 5]);
        for i in 0..2 {
            for j in 0..3 {
                let ai = a
                    .narrow(0, i, 1)
                    .unwrap()
                    .narrow(1, j, 1)
                    .unwrap()
                    .reshape(&[3, 4])
                    .unwrap();
                let bj = b.narrow(0, j, 1).unwrap().reshape(&[4, 5]).unwrap();
                let want = ai.matmul(&bj).unwrap().to_vec();
                let got = c.narrow(0, i, 1).unwrap().narrow(1, j, 1).unwrap().to_vec();
                assert_eq!(got, want, "{} matrix ({i}, {j})", E::DTYPE);
            }
        }
    }
    each::<f64>();
    each::<f32>();
    each::<nbit::half::bf16>();
    each::<nbit::half::f16>();
    // Enough small products (attention's heads) to split the batch across threads: the same bits.
    let x = Tensor::<f32>::from_vec(
        &[600, 16, 32],
        (0..600 * 512).map(|i| ((i * 13) % 31) as f32 / 8.0).collect(),
    )
    .unwrap();
    let y = x.matmul(&x.transpose()).unwrap();
    for i in [0, 299, 599] {
        let xi = x.narrow(0, i, 1).unwrap().reshape(&[16, 32]).unwrap();
        assert_eq!(
            y.narrow(0, i, 1).unwrap().to_vec(),
            xi.matmul(&xi.transpose()).unwrap().to_vec()
        );
    }
}

#[test]
fn layout_ops_masks_and_their_errors() -> Result<(), Error> {
    let x = seq(&[2, 3, 4], |i| i as f64);
    let p = x.permute(&[2, 0, 1])?;
    assert_eq!(p.shape(), &[4, 2, 3]);
    assert_eq!(
        p.narrow(0, 3, 1)?.to_vec(),
        vec![3.0, 7.0, 11.0, 15.0, 19.0, 23.0]
    );
    assert_eq!(x.swapaxes(0, -1)?.shape(), &[4, 3, 2]);
    // The last axis kept in place (whole rows move): element (i, j, k) lands at (j, i, k).
    let y = x.permute(&[1, 0, 2])?.to_vec();
    for (i, j, k) in (0..2).flat_map(|i| (0..3).flat_map(move |j| (0..4).map(move |k| (i, j, k)))) {
        assert_eq!(y[(j * 2 + i) * 4 + k], (i * 12 + j * 4 + k) as f64);
    }
    assert_eq!(x.unsqueeze(-1)?.shape(), &[2, 3, 4, 1]);
    assert_eq!(x.unsqueeze(0)?.squeeze(0)?.shape(), &[2, 3, 4]);
    assert_eq!(x.squeeze(1)?.shape(), &[2, 3, 4], "only a size-1 axis goes");
    assert_eq!(
        seq(&[3], |i| i as f64).expand(&[2, 3])?.to_vec(),
        vec![0., 1., 2., 0., 1., 2.]
    );
    let m = seq(&[2, 2], |i| i as f64).triu(0)?;
    assert_eq!(m.to_vec(), vec![0.0, 1.0, 0.0, 3.0]);
    let causal = Tensor::<f64>::causal_mask(3);
    assert_eq!(causal.to_vec()[1], f64::NEG_INFINITY);
    assert_eq!(causal.to_vec()[3], 0.0);
    let scores = seq(&[3, 3], |_| 1.0).add(&causal)?.softmax_axis(-1)?;
    assert_eq!(
        scores.to_vec(),
        vec![1.0, 0.0, 0.0, 0.5, 0.5, 0.0, 1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0]
    );
    let pad = Tensor::<f64>::from_vec(&[1, 3], vec![0.0, 0.0, 1.0])?.to_additive_mask();
    assert_eq!(pad.to_vec(), vec![0.0, 0.0, f64::NEG_INFINITY]);
    let filled =
        seq(&[2, 3], |i| i as f64).masked_fill(&Tensor::from_vec(&[3], vec![1.0, 0.0, 0.0])?, 9.0)?;
    assert_eq!(filled.to_vec(), vec![9.0, 1.0, 2.0, 9.0, 4.0, 5.0]);
    // Softmax along a middle axis sums to one along it.
    let s = x.mul_scalar(0.1).softmax_axis(1)?.sum_axis(1, false)?;
    assert!(s.to_vec().iter().all(|v| (v - 1.0).abs() < 1e-12));

    let msg = |e: Error| e.to_string();
    assert!(msg(x.permute(&[0, 1]).unwrap_err()).contains("every axis"));
    assert!(msg(x.swapaxes(0, 3).unwrap_err()).contains("dim 3"));
    assert!(msg(x.expand(&[2, 5, 4]).unwrap_err()).contains("expand"));
    assert!(msg(seq(&[3], |i| i as f64).matmul(&x).unwrap_err()).contains("at least two axes"));
    assert!(msg(x.matmul(&seq(&[2, 5, 2], |i| i as f64)).unwrap_err()).contains("columns"));
    assert!(msg(x.matmul(&seq(&[3, 4, 2], |i| i as f64)).unwrap_err()).contains("broadcast"));
    assert!(msg(x.masked_fill(&seq(&[5], |_| 1.0), 0.0).unwrap_err()).contains("masked_fill"));
    assert!(seq(&[3], |i| i as f64).triu(0).is_err());
    Ok(())
}
