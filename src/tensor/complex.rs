//! Complex tensors and their gradients, by PyTorch's convention: for a real loss `L` of a complex
//! `z = x + iy`, the gradient is `∂L/∂x + i ∂L/∂y` (the conjugate Wirtinger derivative, times 2),
//! so gradient descent on it descends `L`.
//!
//! Complex parameters are trained as their real and imaginary parts (two real parameters,
//! combined with [`Tensor::complex`]), which is what PyTorch's optimizers do through
//! `view_as_real`: SGD and AdamW update each part exactly as they would a real tensor.
//!
//! ```
//! use nbit::tensor::{ComplexOps, Tensor};
//! use num_complex::Complex;
//!
//! let re = Tensor::<f64>::from_vec(&[2], vec![3.0, 0.0])?.requires_grad();
//! let im = Tensor::<f64>::from_vec(&[2], vec![4.0, 1.0])?.requires_grad();
//! let z = Tensor::<Complex<f64>>::complex(&re, &im)?; // [3+4i, i], complex128
//! let loss = z.abs().sum();                          // |3+4i| + |i| = 6
//! assert_eq!(loss.item()?, 6.0);
//! let g = loss.backward()?;
//! assert_eq!(g.get(&re).unwrap().to_vec(), vec![0.6, 0.0]);   // ∂|z|/∂x = x/|z|
//! assert_eq!(g.get(&im).unwrap().to_vec(), vec![0.8, 1.0]);   // ∂|z|/∂y = y/|z|
//! # Ok::<(), nbit::Error>(())
//! ```

use super::{Tensor, mismatch};
use crate::backend::{Binary, ComplexBackend, ComplexUnary, broadcast_shapes};
use crate::dtype::ComplexElement;
use crate::error::Error;

/// Complex tensor operations, implemented for `Tensor<C, D>` for every complex element `C`
/// (`Complex<f16>`, `Complex<f32>`, `Complex<f64>`). A trait so that generic code can name it:
/// `where P::Complex: ComplexElement<Real = P::Param>`, then `Tensor::<P::Complex>::complex(..)`.
/// Methods that share a name with the real tensors' (`add`, `matmul`, ...) resolve by element type.
pub trait ComplexOps<C: ComplexElement, D: ComplexBackend>: Sized {
    /// A complex tensor from real and imaginary parts of one shape (differentiable in both).
    fn complex(re: &Tensor<C::Real, D>, im: &Tensor<C::Real, D>) -> Result<Self, Error>;

    /// The real part.
    fn real(&self) -> Tensor<C::Real, D>;

    /// The imaginary part (its gradient flows to `z` as `i * grad`).
    fn imag(&self) -> Tensor<C::Real, D>;

    /// `|z|` (gradient `grad * z / |z|`, 0 at 0).
    fn abs(&self) -> Tensor<C::Real, D>;

    /// `conj(z)`.
    fn conj(&self) -> Self;

    /// Swaps the last two axes (`.mT`; with [`ComplexOps::conj`], the conjugate transpose).
    fn transpose(&self) -> Self;

    /// `e^z`.
    fn exp(&self) -> Self;

    /// `-z`.
    fn neg(&self) -> Self;

    /// `z * c` for a real `c`.
    fn mul_scalar(&self, c: f64) -> Self;

    /// `a + b` with broadcasting.
    fn add(&self, other: &Self) -> Result<Self, Error>;

    /// `a - b` with broadcasting.
    fn sub(&self, other: &Self) -> Result<Self, Error>;

    /// `a * b` with broadcasting.
    fn mul(&self, other: &Self) -> Result<Self, Error>;

    /// `a / b` with broadcasting.
    fn div(&self, other: &Self) -> Result<Self, Error>;

    /// `a @ b` for 2-D complex tensors (gradients `grad @ b^H` and `a^H @ grad`).
    fn matmul(&self, other: &Self) -> Result<Self, Error>;

    /// The sum of all elements (shape `[]`), accumulated in complex128.
    fn sum(&self) -> Self;

    /// The sum along `axis` (removed).
    fn sum_axis(&self, axis: usize) -> Result<Self, Error>;
}

impl<C: ComplexElement, D: ComplexBackend> ComplexOps<C, D> for Tensor<C, D> {
    fn complex(re: &Tensor<C::Real, D>, im: &Tensor<C::Real, D>) -> Result<Self, Error> {
        if re.shape() != im.shape() {
            return Err(mismatch(
                "complex",
                re.shape(),
                im.shape(),
                "real and imaginary parts need one shape",
            ));
        }
        let data = D::complex_from_parts::<C>(re.storage(), im.storage());
        let (r, i) = (re.clone(), im.clone());
        Ok(Self::from_op(data, &[re.node(), im.node()], move |dy, g| {
            let (gr, gi) = D::complex_parts::<C>(dy);
            if r.is_tracked() {
                g.accumulate::<C::Real, D>(r.id(), gr);
            }
            if i.is_tracked() {
                g.accumulate::<C::Real, D>(i.id(), gi);
            }
        }))
    }

    fn real(&self) -> Tensor<C::Real, D> {
        let (re, _) = D::complex_parts::<C>(self.storage());
        let z = self.clone();
        Tensor::from_op(re, &[self.node()], move |dy, g| {
            let zero = D::full(D::shape(dy), <C::Real as num_traits::Zero>::zero());
            g.accumulate_complex::<C, D>(z.id(), D::complex_from_parts::<C>(dy, &zero));
        })
    }

    fn imag(&self) -> Tensor<C::Real, D> {
        let (_, im) = D::complex_parts::<C>(self.storage());
        let z = self.clone();
        Tensor::from_op(im, &[self.node()], move |dy, g| {
            let zero = D::full(D::shape(dy), <C::Real as num_traits::Zero>::zero());
            g.accumulate_complex::<C, D>(z.id(), D::complex_from_parts::<C>(&zero, dy));
        })
    }

    fn abs(&self) -> Tensor<C::Real, D> {
        let z = self.clone();
        Tensor::from_op(D::cabs::<C>(self.storage()), &[self.node()], move |dy, g| {
            let zero = D::full(D::shape(dy), <C::Real as num_traits::Zero>::zero());
            let gc = D::complex_from_parts::<C>(dy, &zero);
            let sign = D::cunary(ComplexUnary::Sign, z.storage());
            let shape = D::shape(&sign).to_vec();
            g.accumulate_complex::<C, D>(z.id(), D::cbinary(Binary::Mul, &gc, &sign, &shape));
        })
    }

    fn transpose(&self) -> Self {
        let z = self.clone();
        Tensor::from_op(D::transpose(self.storage()), &[self.node()], move |dy, g| {
            g.accumulate_complex::<C, D>(z.id(), D::transpose(dy));
        })
    }

    fn conj(&self) -> Self {
        cunary_op(self, ComplexUnary::Conj)
    }

    fn exp(&self) -> Self {
        cunary_op(self, ComplexUnary::Exp)
    }

    fn neg(&self) -> Self {
        cunary_op(self, ComplexUnary::Neg)
    }

    fn mul_scalar(&self, c: f64) -> Self {
        cunary_op(self, ComplexUnary::MulScalar(c))
    }

    fn add(&self, other: &Self) -> Result<Self, Error> {
        cbinary_op(self, Binary::Add, other, "add")
    }

    fn sub(&self, other: &Self) -> Result<Self, Error> {
        cbinary_op(self, Binary::Sub, other, "sub")
    }

    fn mul(&self, other: &Self) -> Result<Self, Error> {
        cbinary_op(self, Binary::Mul, other, "mul")
    }

    fn div(&self, other: &Self) -> Result<Self, Error> {
        cbinary_op(self, Binary::Div, other, "div")
    }

    fn matmul(&self, other: &Self) -> Result<Self, Error> {
        let (sa, sb) = (self.shape(), other.shape());
        if sa.len() != 2 || sb.len() != 2 || sa[1] != sb[0] {
            return Err(mismatch(
                "matmul",
                sa,
                sb,
                "2-D operands, the left's columns equal to the right's rows",
            ));
        }
        let data = D::cmatmul(self.storage(), other.storage(), false, false, false, false);
        let (a, b) = (self.clone(), other.clone());
        Ok(Self::from_op(data, &[self.node(), other.node()], move |dy, g| {
            if a.is_tracked() {
                g.accumulate_complex::<C, D>(a.id(), D::cmatmul(dy, b.storage(), false, false, true, true));
            }
            if b.is_tracked() {
                g.accumulate_complex::<C, D>(b.id(), D::cmatmul(a.storage(), dy, true, true, false, false));
            }
        }))
    }

    fn sum(&self) -> Self {
        let shape = self.shape().to_vec();
        let z = self.clone();
        Self::from_op(
            D::csum_to_shape(self.storage(), &[]),
            &[self.node()],
            move |dy, g| {
                g.accumulate_complex::<C, D>(z.id(), D::broadcast_to(dy, &shape));
            },
        )
    }

    fn sum_axis(&self, axis: usize) -> Result<Self, Error> {
        let shape = self.shape().to_vec();
        if axis >= shape.len() {
            return Err(mismatch(
                "sum",
                &shape,
                &[axis],
                "the axis must be less than the number of dimensions",
            ));
        }
        let kept: Vec<usize> = shape
            .iter()
            .enumerate()
            .map(|(i, &d)| if i == axis { 1 } else { d })
            .collect();
        let out: Vec<usize> = shape
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != axis)
            .map(|(_, &d)| d)
            .collect();
        let data = D::reshape(&D::csum_to_shape(self.storage(), &kept), &out);
        let z = self.clone();
        Ok(Self::from_op(data, &[self.node()], move |dy, g| {
            g.accumulate_complex::<C, D>(z.id(), D::broadcast_to(&D::reshape(dy, &kept), &shape));
        }))
    }
}

fn cunary_op<C: ComplexElement, D: ComplexBackend>(x: &Tensor<C, D>, op: ComplexUnary) -> Tensor<C, D> {
    let out = std::sync::Arc::new(D::cunary(op, x.storage()));
    let (z, y) = (x.clone(), out.clone());
    Tensor::from_op(out, &[x.node()], move |dy, g| {
        let shape = D::shape(dy).to_vec();
        let dz = match op {
            ComplexUnary::Conj | ComplexUnary::Neg => D::cunary(op, dy),
            ComplexUnary::MulScalar(_) => D::cunary(op, dy),
            // d e^z: grad * conj(e^z)
            ComplexUnary::Exp => D::cbinary(Binary::Mul, dy, &D::cunary(ComplexUnary::Conj, &y), &shape),
            // Not reachable through the public methods; its gradient is not needed.
            ComplexUnary::Sign => D::cunary(ComplexUnary::MulScalar(0.0), dy),
        };
        g.accumulate_complex::<C, D>(z.id(), dz);
    })
}

fn cbinary_op<C: ComplexElement, D: ComplexBackend>(
    x: &Tensor<C, D>,
    op: Binary,
    other: &Tensor<C, D>,
    name: &'static str,
) -> Result<Tensor<C, D>, Error> {
    let out_shape = broadcast_shapes(name, x.shape(), other.shape())?;
    let data = D::cbinary(op, x.storage(), other.storage(), &out_shape);
    let (a, b) = (x.clone(), other.clone());
    Ok(Tensor::from_op(data, &[x.node(), other.node()], move |dy, g| {
        let out = D::shape(dy).to_vec();
        let conj = |t: &Tensor<C, D>| D::cunary(ComplexUnary::Conj, t.storage());
        let (da, db) = match op {
            Binary::Add => (dy.clone(), dy.clone()),
            Binary::Sub => (dy.clone(), D::cunary(ComplexUnary::Neg, dy)),
            // PyTorch: grad_a = grad * conj(b), grad_b = grad * conj(a)
            Binary::Mul => (
                D::cbinary(Binary::Mul, dy, &conj(&b), &out),
                D::cbinary(Binary::Mul, dy, &conj(&a), &out),
            ),
            // grad_a = grad / conj(b); grad_b = -grad * conj(a / b) / conj(b) = -grad_a * conj(a / b)
            Binary::Div => {
                let da = D::cbinary(Binary::Div, dy, &conj(&b), &out);
                let q = D::cunary(
                    ComplexUnary::Conj,
                    &D::cbinary(Binary::Div, a.storage(), b.storage(), &out),
                );
                (
                    da.clone(),
                    D::cunary(ComplexUnary::Neg, &D::cbinary(Binary::Mul, &da, &q, &out)),
                )
            }
        };
        if a.is_tracked() {
            g.accumulate_complex::<C, D>(a.id(), D::csum_to_shape(&da, a.shape()));
        }
        if b.is_tracked() {
            g.accumulate_complex::<C, D>(b.id(), D::csum_to_shape(&db, b.shape()));
        }
    }))
}
