//! LAPACK solvers (feature `lapack`): finite-difference gradient checks in f64 and complex128,
//! f32/complex64 against f64, and errors for singular, indefinite and rank-deficient input.
#![cfg(feature = "lapack")]

use crate::common::{fd_check, weigh};
use nbit::Error;
use nbit::linalg::{cholesky, inverse, lstsq, solve};
use nbit::tensor::{ComplexOps, Tensor};
use ndarray::{ArrayD, IxDyn};
use num_complex::Complex;

type R = Tensor<f64>;
type C = Tensor<Complex<f64>>;

fn values(shape: &[usize], seed: u64) -> ArrayD<f64> {
    crate::common::values(shape, seed, -1.0, 1.0)
}

fn check(name: &str, inputs: Vec<ArrayD<f64>>, loss: impl Fn(&[R]) -> Result<R, Error>) {
    fd_check(name, &inputs, loss);
}

/// The same for a complex output, weighting real and imaginary parts differently.
fn weigh_c(out: &C) -> Result<R, Error> {
    weigh(&out.real())?.add(&out.imag().mul(&R::from_array(values(out.shape(), 78)))?.sum())
}

/// A well-conditioned square matrix: leaf + 3 I.
fn shifted(x: &R) -> Result<R, Error> {
    let n = x.shape()[0];
    let eye = R::from_array(ArrayD::from_shape_fn(IxDyn(&[n, n]), |d| {
        if d[0] == d[1] { 3.0 } else { 0.0 }
    }));
    x.add(&eye)
}

#[test]
fn real_gradients_match_finite_differences() {
    check("solve", vec![values(&[3, 3], 1), values(&[3, 2], 2)], |t| {
        weigh(&solve(&shifted(&t[0])?, &t[1])?)
    });
    check("inverse", vec![values(&[3, 3], 3)], |t| {
        weigh(&inverse(&shifted(&t[0])?)?)
    });
    check("cholesky", vec![values(&[3, 3], 4)], |t| {
        // A = X X^T + I is symmetric positive definite for every X.
        let n = t[0].shape()[0];
        let eye = R::from_array(ArrayD::from_shape_fn(IxDyn(&[n, n]), |d| {
            if d[0] == d[1] { 1.0 } else { 0.0 }
        }));
        weigh(&cholesky(&t[0].matmul(&t[0].transpose())?.add(&eye)?)?)
    });
    check("lstsq", vec![values(&[5, 3], 5), values(&[5, 2], 6)], |t| {
        weigh(&lstsq(&t[0], &t[1])?)
    });
}

/// A complex matrix from two real leaves.
fn cx(re: &R, im: &R) -> Result<C, Error> {
    C::complex(re, im)
}

fn shifted_c(z: &C) -> Result<C, Error> {
    let n = z.shape()[0];
    let eye = R::from_array(ArrayD::from_shape_fn(IxDyn(&[n, n]), |d| {
        if d[0] == d[1] { 3.0 } else { 0.0 }
    }));
    z.add(&C::complex(&eye, &R::zeros(&[n, n]))?)
}

#[test]
fn complex_gradients_match_finite_differences_on_both_parts() {
    check(
        "complex solve",
        vec![
            values(&[3, 3], 7),
            values(&[3, 3], 8),
            values(&[3, 1], 9),
            values(&[3, 1], 10),
        ],
        |t| weigh_c(&solve(&shifted_c(&cx(&t[0], &t[1])?)?, &cx(&t[2], &t[3])?)?),
    );
    check(
        "complex inverse",
        vec![values(&[2, 2], 11), values(&[2, 2], 12)],
        |t| weigh_c(&inverse(&shifted_c(&cx(&t[0], &t[1])?)?)?),
    );
    check(
        "complex cholesky",
        vec![values(&[3, 3], 13), values(&[3, 3], 14)],
        |t| {
            // A = M M^H + I is Hermitian positive definite.
            let m = cx(&t[0], &t[1])?;
            let n = 3;
            let eye = R::from_array(ArrayD::from_shape_fn(IxDyn(&[n, n]), |d| {
                if d[0] == d[1] { 1.0 } else { 0.0 }
            }));
            let a = m
                .matmul(&m.conj().transpose())?
                .add(&C::complex(&eye, &R::zeros(&[n, n]))?)?;
            weigh_c(&cholesky(&a)?)
        },
    );
    check(
        "complex lstsq",
        vec![
            values(&[4, 2], 15),
            values(&[4, 2], 16),
            values(&[4, 1], 17),
            values(&[4, 1], 18),
        ],
        |t| weigh_c(&lstsq(&cx(&t[0], &t[1])?, &cx(&t[2], &t[3])?)?),
    );
}

#[test]
fn single_precision_agrees_with_double() {
    let a64 =
        values(&[4, 4], 21) + ArrayD::from_shape_fn(IxDyn(&[4, 4]), |d| if d[0] == d[1] { 3.0 } else { 0.0 });
    let b64 = values(&[4, 2], 22);
    let x64 = solve(&R::from_array(a64.clone()), &R::from_array(b64.clone()))
        .unwrap()
        .to_vec();
    let x32 = solve(
        &Tensor::<f32>::from_array(a64.mapv(|v| v as f32)),
        &Tensor::from_array(b64.mapv(|v| v as f32)),
    )
    .unwrap()
    .to_vec();
    let err = x64
        .iter()
        .zip(&x32)
        .map(|(a, b)| (a - *b as f64).abs())
        .fold(0.0, f64::max);
    assert!(err < 1e-5, "f32 vs f64 solve: {err:e}");
    let z = Tensor::<Complex<f32>>::from_array(a64.mapv(|v| Complex::new(v as f32, 0.5)));
    let inv = inverse(&z).unwrap().to_vec();
    assert_eq!(inv.len(), 16);
    assert_eq!(z.dtype(), nbit::DType::C64);
    let l = cholesky(&Tensor::<f32>::from_vec(&[2, 2], vec![4.0, 2.0, 2.0, 5.0]).unwrap()).unwrap();
    assert_eq!(l.to_vec(), vec![2.0, 0.0, 1.0, 2.0]);
}

#[test]
fn bad_matrices_are_errors_that_say_so() {
    let singular = R::from_vec(&[2, 2], vec![1.0, 2.0, 2.0, 4.0]).unwrap();
    let b = R::from_vec(&[2, 1], vec![1.0, 1.0]).unwrap();
    assert!(solve(&singular, &b).unwrap_err().to_string().contains("singular"));
    assert!(inverse(&singular).unwrap_err().to_string().contains("singular"));
    let indefinite = R::from_vec(&[2, 2], vec![1.0, 2.0, 2.0, 1.0]).unwrap();
    assert!(
        cholesky(&indefinite)
            .unwrap_err()
            .to_string()
            .contains("not positive definite")
    );
    let rank1 = R::from_vec(&[3, 2], vec![1.0, 2.0, 2.0, 4.0, 3.0, 6.0]).unwrap();
    let b3 = R::from_vec(&[3, 1], vec![1.0, 0.0, 1.0]).unwrap();
    assert!(lstsq(&rank1, &b3).unwrap_err().to_string().contains("rank 1 < 2"));
    assert!(
        solve(&R::zeros(&[2, 3]), &b)
            .unwrap_err()
            .to_string()
            .contains("square")
    );
    assert!(
        solve(&singular, &R::zeros(&[3, 1]))
            .unwrap_err()
            .to_string()
            .contains("row count")
    );
}

/// `X = lstsq(A, B)` is linear in `B`, so the gradient of `L(B) = Σ W ⊙ X` with respect to row
/// `i` of a one-column `B` is exactly `L(e_i)`: a reference from the forward solver alone. On a
/// Vandermonde design with condition number ~1e9 the backward pass must agree with it to the
/// forward's own accuracy (cond * eps ~ 1e-7); through the normal equations `(A^T A)^-1`, whose
/// condition number is ~1e18, it would not.
#[test]
fn lstsq_gradient_stays_accurate_when_the_design_is_ill_conditioned() {
    let (m, n) = (40, 12);
    let design = R::from_array(ArrayD::from_shape_fn(IxDyn(&[m, n]), |d| {
        (d[0] as f64 / (m - 1) as f64).powi(d[1] as i32)
    }));
    let b = R::from_array(values(&[m, 1], 7)).requires_grad();
    let grads = weigh(&lstsq(&design, &b).unwrap()).unwrap().backward().unwrap();
    let analytic = grads.get(&b).expect("B has a gradient").to_vec();
    let mut worst: f64 = 0.0;
    let scale = analytic.iter().fold(0.0_f64, |s, g| s.max(g.abs()));
    for (i, g) in analytic.iter().enumerate() {
        let e_i = R::from_array(ArrayD::from_shape_fn(IxDyn(&[m, 1]), |d| {
            (d[0] == i) as u8 as f64
        }));
        let exact = weigh(&lstsq(&design, &e_i).unwrap()).unwrap().item().unwrap();
        worst = worst.max((g - exact).abs() / scale);
    }
    assert!(
        worst < 1e-5,
        "gradient of B off by {worst:e} of its largest entry"
    );
}
