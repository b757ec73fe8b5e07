//! Differentiable linear algebra through LAPACK (feature `lapack`; needs the system OpenBLAS:
//! `apt-get install libopenblas-dev`): [`solve`], [`inverse`], [`cholesky`] and [`lstsq`] for
//! f32, f64, complex64 and complex128 matrices on the CPU.
//!
//! Gradients follow PyTorch's formulas (conjugate transposes for complex). A singular matrix, a
//! matrix that is not positive definite, or a rank-deficient least-squares problem is an error
//! that says so; a result that is not finite is never passed on. Matrices reach LAPACK in
//! column-major order, as from NumPy and PyTorch, so the factorisations are theirs.
//!
//! ```
//! use nbit::linalg;
//! use nbit::tensor::Tensor;
//!
//! let a = Tensor::<f64>::from_vec(&[2, 2], vec![4.0, 1.0, 1.0, 3.0])?.requires_grad();
//! let b = Tensor::<f64>::from_vec(&[2, 1], vec![1.0, 2.0])?;
//! let x = linalg::solve(&a, &b)?;                       // [1/11, 7/11]
//! assert!((x.to_vec()[1] - 7.0 / 11.0).abs() < 1e-15);
//! let singular = Tensor::<f64>::from_vec(&[2, 2], vec![1.0, 2.0, 2.0, 4.0])?;
//! assert!(linalg::solve(&singular, &b).unwrap_err().to_string().contains("singular"));
//! # Ok::<(), nbit::Error>(())
//! ```

use ndarray::{Array2, ArrayD, Ix2, OwnedRepr, ShapeBuilder};
use ndarray_linalg::{
    Cholesky, Diag, Factorize, Inverse, LUFactorized, LeastSquaresSvd, QR, Scalar, Solve, SolveTriangular,
    UPLO,
};
use num_complex::Complex;
use num_traits::Float as _;

use crate::autograd::Grads;
use crate::device::Cpu;
use crate::dtype::Element;
use crate::error::Error;
use crate::tensor::Tensor;

/// An element LAPACK works on: f32, f64, `Complex<f32>`, `Complex<f64>`.
pub trait LinalgElement: Element + Scalar + ndarray_linalg::Lapack {
    #[doc(hidden)]
    fn accumulate(g: &mut Grads, id: u64, grad: ArrayD<Self>);
}

impl LinalgElement for f32 {
    fn accumulate(g: &mut Grads, id: u64, grad: ArrayD<Self>) {
        g.accumulate::<f32, Cpu>(id, grad);
    }
}
impl LinalgElement for f64 {
    fn accumulate(g: &mut Grads, id: u64, grad: ArrayD<Self>) {
        g.accumulate::<f64, Cpu>(id, grad);
    }
}
impl LinalgElement for Complex<f32> {
    fn accumulate(g: &mut Grads, id: u64, grad: ArrayD<Self>) {
        g.accumulate_complex::<Complex<f32>, Cpu>(id, grad);
    }
}
impl LinalgElement for Complex<f64> {
    fn accumulate(g: &mut Grads, id: u64, grad: ArrayD<Self>) {
        g.accumulate_complex::<Complex<f64>, Cpu>(id, grad);
    }
}

fn problem(op: &'static str, text: impl Into<String>) -> Error {
    Error::LinearAlgebra {
        op,
        problem: text.into(),
    }
}

/// The data of a 2-D tensor in column-major order (an error naming the shape otherwise).
///
/// LAPACK is column-major. Given a row-major matrix, ndarray-linalg factorises its transpose
/// instead (LQ of `A^T` for QR, LU of `A^T` for a solve): the same mathematics, but a different
/// order of roundings, and on an ill-conditioned matrix a different answer (a degree-14
/// Vandermonde least-squares fit moves by 3e-8 in f64). PyTorch and NumPy hand LAPACK
/// column-major copies, so nbit does too, and its factorisations are the ones they compute.
fn matrix<T: LinalgElement>(op: &'static str, t: &Tensor<T>) -> Result<Array2<T>, Error> {
    let a = t
        .storage()
        .view()
        .into_dimensionality::<Ix2>()
        .map_err(|_| problem(op, format!("expected a 2-D matrix, got shape {:?}", t.shape())))?;
    let mut f = Array2::zeros(a.raw_dim().f());
    f.assign(&a);
    Ok(f)
}

fn square<T: LinalgElement>(op: &'static str, t: &Tensor<T>) -> Result<Array2<T>, Error> {
    let a = matrix(op, t)?;
    if a.nrows() != a.ncols() {
        return Err(problem(
            op,
            format!("expected a square matrix, got shape {:?}", t.shape()),
        ));
    }
    Ok(a)
}

fn h<T: LinalgElement>(a: &Array2<T>) -> Array2<T> {
    a.t().mapv(|x| x.conj())
}

fn finite<T: LinalgElement>(op: &'static str, a: Array2<T>, what: &str) -> Result<Array2<T>, Error> {
    if a.iter().all(|v| v.re().is_finite() && v.im().is_finite()) {
        Ok(a)
    } else {
        Err(problem(op, format!("the result is not finite: {what}")))
    }
}

type Lu<T> = LUFactorized<OwnedRepr<T>>;

/// The LU factorisation of a square `A` (an error saying it is singular otherwise).
fn lu<T: LinalgElement>(op: &'static str, a: &Array2<T>) -> Result<Lu<T>, Error> {
    a.factorize().map_err(|e| {
        problem(
            op,
            format!("the matrix is singular ({e}); {op} needs an invertible matrix"),
        )
    })
}

/// `A^-1 B`, or `A^-H B` when `adjoint`, column by column from `A`'s LU factorisation (a
/// backward pass reuses the forward's factorisation, as PyTorch's does).
fn lu_apply<T: LinalgElement>(
    op: &'static str,
    lu: &Lu<T>,
    b: &Array2<T>,
    adjoint: bool,
) -> Result<Array2<T>, Error> {
    let mut x = Array2::<T>::zeros(b.raw_dim().f());
    for (j, col) in b.columns().into_iter().enumerate() {
        let sol = if adjoint { lu.solve_h(&col) } else { lu.solve(&col) }
            .map_err(|e| problem(op, format!("the matrix is singular ({e})")))?;
        x.column_mut(j).assign(&sol);
    }
    finite(
        op,
        x,
        "the matrix is singular or too ill-conditioned for this precision",
    )
}

fn output<T: LinalgElement>(
    data: Array2<T>,
    inputs: &[&Tensor<T>],
    backward: impl Fn(&Array2<T>, &mut Grads) + Send + Sync + 'static,
) -> Tensor<T> {
    let nodes: Vec<_> = inputs.iter().map(|t| t.node()).collect();
    let data = data.as_standard_layout().into_owned();
    Tensor::from_op(data.into_dyn(), &nodes, move |dy: &ArrayD<T>, g: &mut Grads| {
        let dy = dy
            .clone()
            .into_dimensionality::<Ix2>()
            .expect("gradient has the output's 2-D shape");
        backward(&dy, g);
    })
}

/// `X = A^-1 B` for square `A` `[n, n]` and `B` `[n, k]` (`torch.linalg.solve`). Gradients:
/// `gB = A^-H G`, `gA = -gB X^H`.
pub fn solve<T: LinalgElement>(a: &Tensor<T>, b: &Tensor<T>) -> Result<Tensor<T>, Error> {
    let (am, bm) = (square("solve", a)?, matrix("solve", b)?);
    if bm.nrows() != am.nrows() {
        return Err(problem(
            "solve",
            format!(
                "A is {:?} but B is {:?}: B needs A's row count",
                a.shape(),
                b.shape()
            ),
        ));
    }
    let lu = lu("solve", &am)?;
    let x = lu_apply("solve", &lu, &bm, false)?;
    let (at, bt, xs) = (a.clone(), b.clone(), x.clone());
    Ok(output(x, &[a, b], move |gx, g| {
        let Ok(gb) = lu_apply("solve", &lu, gx, true) else {
            return;
        };
        if at.is_tracked() {
            T::accumulate(g, at.id(), (-gb.dot(&h(&xs))).into_dyn());
        }
        if bt.is_tracked() {
            T::accumulate(g, bt.id(), gb.into_dyn());
        }
    }))
}

/// `A^-1` (`torch.linalg.inv`). Gradient: `gA = -Y^H G Y^H` with `Y = A^-1`.
pub fn inverse<T: LinalgElement>(a: &Tensor<T>) -> Result<Tensor<T>, Error> {
    let am = square("inverse", a)?;
    let y = am.inv().map_err(|e| {
        problem(
            "inverse",
            format!("the matrix is singular ({e}); it has no inverse"),
        )
    })?;
    let y = finite(
        "inverse",
        y,
        "the matrix is singular or too ill-conditioned for this precision",
    )?;
    let (at, yh) = (a.clone(), h(&y));
    Ok(output(y, &[a], move |gy, g| {
        T::accumulate(g, at.id(), (-yh.dot(gy).dot(&yh)).into_dyn());
    }))
}

/// The lower Cholesky factor `L` with `A = L L^H` of a Hermitian positive-definite `A`
/// (`torch.linalg.cholesky`). Gradient (PyTorch's): `gA = sym(L^-H Φ(L^H G) L^-1)`, `Φ` taking the
/// lower triangle with the diagonal halved, `sym(X) = (X + X^H) / 2`.
pub fn cholesky<T: LinalgElement>(a: &Tensor<T>) -> Result<Tensor<T>, Error> {
    let am = square("cholesky", a)?;
    let l = am
        .cholesky(UPLO::Lower)
        .map_err(|e| problem("cholesky", format!("the matrix is not positive definite ({e})")))?;
    let l = finite("cholesky", l, "the matrix is not positive definite")?;
    let (at, ls) = (a.clone(), l.clone());
    Ok(output(l, &[a], move |gl, g| {
        let Ok(linv) = ls.inv() else { return };
        let half = T::from_real(T::real(0.5));
        let mut phi = h(&ls).dot(gl);
        let n = phi.nrows();
        for i in 0..n {
            for j in 0..n {
                if j > i {
                    phi[[i, j]] = T::zero();
                } else if i == j {
                    phi[[i, j]] *= half;
                }
            }
        }
        let ga = h(&linv).dot(&phi).dot(&linv);
        let sym = (&ga + &h(&ga)).mapv(|v| v * half);
        T::accumulate(g, at.id(), sym.into_dyn());
    }))
}

/// The least-squares solution `X = argmin ||A X - B||` for `A` `[m, n]` of full column rank
/// (`m >= n`) and `B` `[m, k]`, by LAPACK's SVD solver (`torch.linalg.lstsq`). Gradients, with
/// `Z = (A^H A)^-1 G` (from a QR of `A`, never the normal equations) and residual `R = B - A X`:
/// `gB = A Z`, `gA = R Z^H - gB X^H`.
pub fn lstsq<T: LinalgElement>(a: &Tensor<T>, b: &Tensor<T>) -> Result<Tensor<T>, Error> {
    let (am, bm) = (matrix("lstsq", a)?, matrix("lstsq", b)?);
    let (m, n) = am.dim();
    if bm.nrows() != m || m < n {
        return Err(problem(
            "lstsq",
            format!(
                "A is {:?} and B is {:?}: B needs A's row count, and A at least as many rows as columns",
                a.shape(),
                b.shape()
            ),
        ));
    }
    let res = am
        .least_squares(&bm)
        .map_err(|e| problem("lstsq", format!("LAPACK failed: {e}")))?;
    if (res.rank as usize) < n {
        return Err(problem(
            "lstsq",
            format!(
                "A has rank {} < {n} columns: the solution is not unique",
                res.rank
            ),
        ));
    }
    let x = finite(
        "lstsq",
        res.solution,
        "A is too ill-conditioned for this precision",
    )?;
    let (at, bt, xs) = (a.clone(), b.clone(), x.clone());
    Ok(output(x, &[a, b], move |gx, g| {
        // Z = (A^H A)^-1 G = R^-1 R^-H G from A = Q R: two triangular solves, so the gradient
        // sees cond(A), not the cond(A)^2 of the normal equations.
        let Ok((_, r)) = am.qr() else { return };
        let Ok(w) = h(&r).solve_triangular(UPLO::Lower, Diag::NonUnit, gx) else {
            return;
        };
        let Ok(z) = r.solve_triangular(UPLO::Upper, Diag::NonUnit, &w) else {
            return;
        };
        let gb = am.dot(&z);
        if at.is_tracked() {
            let resid = &bm - &am.dot(&xs);
            T::accumulate(g, at.id(), (resid.dot(&h(&z)) - gb.dot(&h(&xs))).into_dyn());
        }
        if bt.is_tracked() {
            T::accumulate(g, bt.id(), gb.into_dyn());
        }
    }))
}
