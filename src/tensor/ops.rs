//! Differentiable operations. Each checks shapes (an `Err` names both), runs the backend kernel,
//! and records how to send the output gradient back to its inputs.

use std::sync::Arc;

use super::{Tensor, mismatch};
use crate::autograd::Grads;
use crate::backend::{Backend, Binary, Unary, broadcast_shapes};
use crate::dtype::Float;
use crate::error::Error;

/// The inner sizes of `op(a) @ op(b)` agree: the columns of `a`'s last two axes (its rows when
/// transposed) and the rows of `b`'s.
fn inner_sizes_agree(sa: &[usize], sb: &[usize], ta: bool, tb: bool) -> Result<(), Error> {
    let (ra, rb) = (sa.len() - 2, sb.len() - 2);
    let k_a = if ta { sa[ra] } else { sa[ra + 1] };
    let k_b = if tb { sb[rb + 1] } else { sb[rb] };
    if k_a == k_b {
        Ok(())
    } else {
        Err(mismatch(
            "matmul",
            sa,
            sb,
            "the left's columns must equal the right's rows",
        ))
    }
}

impl<E: Float, D: Backend> Tensor<E, D> {
    pub(super) fn unary_op(&self, op: Unary) -> Self {
        let y = Arc::new(D::unary(op, self.storage()));
        let (x, y2) = (self.clone(), y.clone());
        Self::from_op(y, &[self.node()], move |dy, g: &mut Grads| {
            g.accumulate::<E, D>(x.id(), D::unary_backward(op, x.storage(), &y2, dy));
        })
    }

    /// `-x`.
    pub fn neg(&self) -> Self {
        self.unary_op(Unary::Neg)
    }
    /// `x + c`.
    pub fn add_scalar(&self, c: f64) -> Self {
        self.unary_op(Unary::AddScalar(c))
    }
    /// `x * c`.
    pub fn mul_scalar(&self, c: f64) -> Self {
        self.unary_op(Unary::MulScalar(c))
    }
    /// `x ^ p` element-wise.
    pub fn powf(&self, p: f64) -> Self {
        self.unary_op(Unary::Powf(p))
    }
    /// `max(x, 0)`.
    pub fn relu(&self) -> Self {
        self.unary_op(Unary::Relu)
    }
    /// GELU with the exact normal CDF (PyTorch's default).
    pub fn gelu(&self) -> Self {
        self.unary_op(Unary::Gelu)
    }
    /// GELU, tanh approximation (PyTorch's `approximate='tanh'`).
    pub fn gelu_tanh(&self) -> Self {
        self.unary_op(Unary::GeluTanh)
    }
    /// `tanh(x)`.
    pub fn tanh(&self) -> Self {
        self.unary_op(Unary::Tanh)
    }
    /// `|x|`; its gradient is `sign(x)` (0 at 0), as PyTorch's.
    pub fn abs(&self) -> Self {
        self.unary_op(Unary::Abs)
    }
    /// The logistic sigmoid.
    pub fn sigmoid(&self) -> Self {
        self.unary_op(Unary::Sigmoid)
    }
    /// `e^x`.
    pub fn exp(&self) -> Self {
        self.unary_op(Unary::Exp)
    }
    /// `ln x` (NaN for negative x, -inf at 0, as IEEE says).
    pub fn log(&self) -> Self {
        self.unary_op(Unary::Log)
    }

    fn binary_op(&self, op: Binary, other: &Self, name: &'static str) -> Result<Self, Error> {
        let out_shape = broadcast_shapes(name, self.shape(), other.shape())?;
        let data = D::binary(op, self.storage(), other.storage(), &out_shape);
        let (a, b) = (self.clone(), other.clone());
        Ok(Self::from_op(data, &[self.node(), other.node()], move |dy, g| {
            let (sa, sb) = (a.shape().to_vec(), b.shape().to_vec());
            let out = D::shape(dy).to_vec();
            let (da, db) = match op {
                Binary::Add => (dy.clone(), dy.clone()),
                Binary::Sub => (dy.clone(), D::unary(Unary::Neg, dy)),
                Binary::Mul => (
                    D::binary(Binary::Mul, dy, b.storage(), &out),
                    D::binary(Binary::Mul, dy, a.storage(), &out),
                ),
                Binary::Div => {
                    let da = D::binary(Binary::Div, dy, b.storage(), &out);
                    // d(a/b)/db = -(dy/b) * a/b
                    let q = D::binary(Binary::Div, a.storage(), b.storage(), &out);
                    let db = D::unary(Unary::Neg, &D::binary(Binary::Mul, &da, &q, &out));
                    (da, db)
                }
            };
            if a.is_tracked() {
                g.accumulate::<E, D>(a.id(), D::sum_to_shape(&da, &sa));
            }
            if b.is_tracked() {
                g.accumulate::<E, D>(b.id(), D::sum_to_shape(&db, &sb));
            }
        }))
    }

    /// `self + other` with broadcasting.
    pub fn add(&self, other: &Self) -> Result<Self, Error> {
        self.binary_op(Binary::Add, other, "add")
    }
    /// `self - other` with broadcasting.
    pub fn sub(&self, other: &Self) -> Result<Self, Error> {
        self.binary_op(Binary::Sub, other, "sub")
    }
    /// `self * other` element-wise with broadcasting.
    pub fn mul(&self, other: &Self) -> Result<Self, Error> {
        self.binary_op(Binary::Mul, other, "mul")
    }
    /// `self / other` element-wise with broadcasting.
    pub fn div(&self, other: &Self) -> Result<Self, Error> {
        self.binary_op(Binary::Div, other, "div")
    }

    /// `op(self) @ op(other) (+ bias)`: `other` a matrix and `self` a matrix or, untransposed, a
    /// stack of rows (`[.., k]`, its leading axes kept in the result, nothing copied), `op` a
    /// transpose where asked; the bias (`[n]`) is added before the single rounding.
    pub(crate) fn matmul_t(
        &self,
        other: &Self,
        ta: bool,
        tb: bool,
        bias: Option<&Self>,
    ) -> Result<Self, Error> {
        let (sa, sb) = (self.shape(), other.shape());
        if sb.len() != 2 || sa.len() < 2 || (ta && sa.len() != 2) {
            return Err(mismatch("matmul", sa, sb, "both operands must be 2-D"));
        }
        inner_sizes_agree(sa, sb, ta, tb)?;
        let n = if tb { sb[0] } else { sb[1] };
        if let Some(bias) = bias
            && bias.shape() != [n]
        {
            return Err(mismatch(
                "matmul bias",
                &[n],
                bias.shape(),
                "the bias must have one value per output column",
            ));
        }
        Ok(self.product(other, ta, tb, bias, false))
    }

    /// `op(self) @ op(other)` for two tensors of three axes or more with the same leading axes:
    /// one product per matrix.
    fn bmm_t(&self, other: &Self, ta: bool, tb: bool) -> Result<Self, Error> {
        inner_sizes_agree(self.shape(), other.shape(), ta, tb)?;
        Ok(self.product(other, ta, tb, None, true))
    }

    /// The product of checked operands and its backward, on the backend's `bmm` (a batch of
    /// matrices) or `matmul` (rows of a stack times a matrix); the gradients are the same
    /// products either way.
    fn product(&self, other: &Self, ta: bool, tb: bool, bias: Option<&Self>, batched: bool) -> Self {
        let mm =
            move |a: &D::Storage<E>, b: &D::Storage<E>, ta: bool, tb: bool, bias: Option<&D::Storage<E>>| {
                if batched {
                    D::bmm(a, b, ta, tb)
                } else {
                    D::matmul(a, b, ta, tb, bias)
                }
            };
        let data = mm(self.storage(), other.storage(), ta, tb, bias.map(Tensor::storage));
        let (a, b, c) = (self.clone(), other.clone(), bias.cloned());
        let inputs = [self.node(), other.node(), bias.and_then(Tensor::node)];
        Self::from_op(data, &inputs, move |dy, g| {
            if a.is_tracked() {
                let da = if ta {
                    mm(b.storage(), dy, tb, true, None)
                } else {
                    mm(dy, b.storage(), false, !tb, None)
                };
                g.accumulate::<E, D>(a.id(), da);
            }
            if b.is_tracked() {
                // Over a stack, summed over every row: the backend reads `dy` and `a` as matrices.
                let db = if tb {
                    mm(dy, a.storage(), true, ta, None)
                } else {
                    mm(a.storage(), dy, !ta, false, None)
                };
                g.accumulate::<E, D>(b.id(), db);
            }
            if let Some(c) = c.as_ref().filter(|c| c.is_tracked()) {
                g.accumulate::<E, D>(c.id(), D::sum_to_shape(dy, c.shape()));
            }
        })
    }

    /// Matrix product with `torch.matmul`'s rules for operands of two or more axes: the last two
    /// axes multiply (`[.., m, k] @ [.., k, n]` is `[.., m, n]`) and the axes before them
    /// broadcast, so `[b, h, t, d] @ [b, h, d, s]` is one product per batch and head, and
    /// `[b, t, d] @ [d, e]` applies one matrix to every batch. 16-bit operands accumulate in f32.
    /// (A 1-D operand is an error: `unsqueeze` it.)
    ///
    /// ```
    /// use nbit::tensor::Tensor;
    /// let q = Tensor::<f64>::from_vec(&[2, 1, 3], vec![1., 0., 0., 0., 1., 0.])?;
    /// let k = Tensor::<f64>::from_vec(&[2, 2, 3], vec![1., 2., 3., 4., 5., 6., 7., 8., 9., 10., 11., 12.])?;
    /// let scores = q.matmul(&k.swapaxes(1, 2)?)?;   // [2, 1, 2]
    /// assert_eq!(scores.to_vec(), vec![1., 4., 8., 11.]);
    /// # Ok::<(), nbit::Error>(())
    /// ```
    pub fn matmul(&self, other: &Self) -> Result<Self, Error> {
        self.batched_matmul(other, false, false)
    }

    /// [`Tensor::matmul`] of `op(self)` and `op(other)`, `op` a transpose of the last two axes
    /// where asked (without copying the operand).
    pub(crate) fn batched_matmul(&self, other: &Self, ta: bool, tb: bool) -> Result<Self, Error> {
        let (sa, sb) = (self.shape().to_vec(), other.shape().to_vec());
        if sa.len() < 2 || sb.len() < 2 {
            return Err(mismatch(
                "matmul",
                &sa,
                &sb,
                "both operands need at least two axes (unsqueeze a vector)",
            ));
        }
        // A matrix on the right: one product over every row of the left (nothing copied).
        if sb.len() == 2 && (sa.len() == 2 || !ta) {
            return self.matmul_t(other, ta, tb, None);
        }
        let (ra, rb) = (sa.len() - 2, sb.len() - 2);
        let batch = broadcast_shapes("matmul", &sa[..ra], &sb[..rb])?;
        let full = |t: &Self, s: &[usize]| -> Result<Self, Error> {
            let shape: Vec<usize> = batch.iter().chain(&s[s.len() - 2..]).copied().collect();
            t.expand(&shape)
        };
        full(self, &sa)?.bmm_t(&full(other, &sb)?, ta, tb)
    }

    /// `self @ weight^T + bias` over the last axis, as `torch.nn.functional.linear`: `self` is
    /// `[..., in]`, `weight` `[out, in]`, `bias` `[out]`; one product over every row, nothing
    /// copied.
    pub fn linear(&self, weight: &Self, bias: Option<&Self>) -> Result<Self, Error> {
        let shape = self.shape();
        let (ws, input) = (weight.shape(), shape.last().copied().unwrap_or(0));
        if ws.len() != 2 || ws[1] != input || shape.is_empty() {
            return Err(mismatch(
                "linear",
                shape,
                ws,
                "input [..., in] needs weight [out, in]",
            ));
        }
        if let Some(b) = bias
            && b.shape() != [ws[0]]
        {
            return Err(mismatch(
                "linear",
                ws,
                b.shape(),
                "bias must be [out] for weight [out, in]",
            ));
        }
        if shape.len() == 1 {
            // A single row: as PyTorch, the result is `[out]`.
            return self
                .reshape(&[1, input])?
                .matmul_t(weight, false, true, bias)?
                .reshape(&[ws[0]]);
        }
        self.matmul_t(weight, false, true, bias)
    }

    fn reduce(&self, axis: Option<usize>, keepdim: bool, mean: bool) -> Result<Self, Error> {
        let shape = self.shape().to_vec();
        if let Some(ax) = axis
            && ax >= shape.len()
        {
            return Err(mismatch(
                "sum",
                &shape,
                &[ax],
                "the axis must be less than the number of dimensions",
            ));
        }
        let count = axis.map_or(self.numel(), |ax| shape[ax]);
        let scale = if mean { 1.0 / count.max(1) as f64 } else { 1.0 };
        let data = D::sum(self.storage(), axis, keepdim, scale);
        let x = self.clone();
        Ok(Self::from_op(data, &[self.node()], move |dy, g| {
            let kept: Vec<usize> = match axis {
                None => vec![1; shape.len()],
                Some(ax) => shape
                    .iter()
                    .enumerate()
                    .map(|(i, &d)| if i == ax { 1 } else { d })
                    .collect(),
            };
            let spread = D::broadcast_to(&D::reshape(dy, &kept), &shape);
            let dx = if mean {
                D::unary(Unary::MulScalar(scale), &spread)
            } else {
                spread
            };
            g.accumulate::<E, D>(x.id(), dx);
        }))
    }

    /// The sum of all elements, shape `[]`, accumulated in f64.
    pub fn sum(&self) -> Self {
        self.reduce(None, false, false).expect("no axis to check")
    }
    /// The mean of all elements, shape `[]`, accumulated in f64.
    pub fn mean(&self) -> Self {
        self.reduce(None, false, true).expect("no axis to check")
    }
    /// Sum along `axis` (kept as size 1 when `keepdim`).
    pub fn sum_axis(&self, axis: usize, keepdim: bool) -> Result<Self, Error> {
        self.reduce(Some(axis), keepdim, false)
    }
    /// Mean along `axis` (kept as size 1 when `keepdim`).
    pub fn mean_axis(&self, axis: usize, keepdim: bool) -> Result<Self, Error> {
        self.reduce(Some(axis), keepdim, true)
    }

    /// The same elements under a new shape with the same element count.
    pub fn reshape(&self, shape: &[usize]) -> Result<Self, Error> {
        super::same_count(self.shape(), shape)?;
        let old = self.shape().to_vec();
        let x = self.clone();
        Ok(Self::from_op(
            D::reshape(self.storage(), shape),
            &[self.node()],
            move |dy, g| {
                g.accumulate::<E, D>(x.id(), D::reshape(dy, &old));
            },
        ))
    }

    /// Swaps the last two axes.
    pub fn transpose(&self) -> Self {
        let x = self.clone();
        Self::from_op(D::transpose(self.storage()), &[self.node()], move |dy, g| {
            g.accumulate::<E, D>(x.id(), D::transpose(dy));
        })
    }

    /// Converts to element type `B` (rounding to nearest even); the gradient converts back.
    /// Casting to the same type returns this tensor itself, as PyTorch's `.to()` does.
    pub fn cast<B: Float>(&self) -> Tensor<B, D> {
        if E::DTYPE == B::DTYPE {
            let any: Box<dyn std::any::Any> = Box::new(self.clone());
            return *any
                .downcast::<Tensor<B, D>>()
                .expect("same dtype is the same type");
        }
        let x = self.clone();
        Tensor::<B, D>::from_op(D::cast::<E, B>(self.storage()), &[self.node()], move |dy, g| {
            g.accumulate::<E, D>(x.id(), D::cast::<B, E>(dy));
        })
    }

    pub(super) fn softmax_op(&self, log: bool) -> Self {
        let y = Arc::new(D::softmax(self.storage(), log));
        let (x, y2) = (self.clone(), y.clone());
        Self::from_op(y, &[self.node()], move |dy, g| {
            g.accumulate::<E, D>(x.id(), D::softmax_backward(&y2, dy, log));
        })
    }

    /// Softmax over the last axis.
    pub fn softmax(&self) -> Self {
        self.softmax_op(false)
    }
    /// Log-softmax over the last axis.
    pub fn log_softmax(&self) -> Self {
        self.softmax_op(true)
    }

    /// Mean negative log-likelihood of class indices `targets` under log-probabilities `self`
    /// (`[n, classes]`), as `torch.nn.functional.nll_loss`. `targets` are `n` class indices (an
    /// `i64` tensor, or `usize`s: see [`Indices`](super::Indices)).
    pub fn nll_loss(&self, targets: &(impl super::Indices<D> + ?Sized)) -> Result<Self, Error> {
        let shape = self.shape().to_vec();
        let n = targets.index_shape().iter().product::<usize>();
        if shape.len() != 2 || shape[0] != n || targets.index_shape().len() != 1 {
            return Err(mismatch(
                "nll_loss",
                &shape,
                &targets.index_shape(),
                "input [n, classes] needs n targets",
            ));
        }
        let targets = targets.indices(usize::MAX)?;
        if let Some((index, &target)) = targets.iter().enumerate().find(|(_, t)| **t >= shape[1]) {
            return Err(Error::InvalidTarget {
                index,
                target,
                classes: shape[1],
            });
        }
        let data = D::nll_loss(self.storage(), &targets);
        let x = self.clone();
        Ok(Self::from_op(data, &[self.node()], move |dy, g| {
            g.accumulate::<E, D>(x.id(), D::nll_loss_backward(&shape, &targets, dy));
        }))
    }

    /// Cross-entropy of logits `self` (`[n, classes]`) against class indices, averaged over the
    /// batch (`torch.nn.functional.cross_entropy` with its defaults).
    pub fn cross_entropy(&self, targets: &(impl super::Indices<D> + ?Sized)) -> Result<Self, Error> {
        self.log_softmax().nll_loss(targets)
    }

    /// Mean squared error against `target` of the same shape.
    pub fn mse_loss(&self, target: &Self) -> Result<Self, Error> {
        if self.shape() != target.shape() {
            return Err(mismatch(
                "mse_loss",
                self.shape(),
                target.shape(),
                "input and target must have one shape",
            ));
        }
        Ok(self.sub(target)?.powf(2.0).mean())
    }

    /// Mean absolute error against `target` of the same shape (`torch.nn.functional.l1_loss`).
    pub fn l1_loss(&self, target: &Self) -> Result<Self, Error> {
        Ok(self.difference("l1_loss", target)?.abs().mean())
    }

    /// Huber loss against `target` (`torch.nn.functional.huber_loss`): per element `d²/2` where
    /// `|d| <= delta`, else `delta (|d| - delta/2)`, averaged. `delta` must be positive.
    pub fn huber_loss(&self, target: &Self, delta: f64) -> Result<Self, Error> {
        if !(delta.is_finite() && delta > 0.0) {
            return Err(Error::InvalidArgument {
                name: "delta",
                value: delta.to_string(),
                expected: "a finite value > 0",
            });
        }
        Ok(self
            .difference("huber_loss", target)?
            .unary_op(Unary::Huber(delta))
            .mean())
    }

    /// Smooth L1 loss against `target` (`torch.nn.functional.smooth_l1_loss`): Huber's with
    /// threshold `beta`, divided by `beta`; `beta = 0` is the L1 loss, as in PyTorch.
    pub fn smooth_l1_loss(&self, target: &Self, beta: f64) -> Result<Self, Error> {
        if beta == 0.0 {
            return self.l1_loss(target);
        }
        if !(beta.is_finite() && beta > 0.0) {
            return Err(Error::InvalidArgument {
                name: "beta",
                value: beta.to_string(),
                expected: "a finite value >= 0",
            });
        }
        Ok(self.huber_loss(target, beta)?.mul_scalar(1.0 / beta))
    }

    /// Binary cross-entropy of logits `self` against targets in [0, 1] of the same shape,
    /// averaged (`torch.nn.functional.binary_cross_entropy_with_logits`), in PyTorch's stable
    /// form `max(x, 0) - x y + ln(1 + e^-|x|)`.
    pub fn binary_cross_entropy_with_logits(&self, target: &Self) -> Result<Self, Error> {
        self.difference("binary_cross_entropy_with_logits", target)?;
        let softplus = self.abs().neg().exp().add_scalar(1.0).log();
        Ok(self.relu().sub(&self.mul(target)?)?.add(&softplus)?.mean())
    }

    /// `self - target` for two tensors that must have one shape (the element-wise losses).
    fn difference(&self, op: &'static str, target: &Self) -> Result<Self, Error> {
        if self.shape() != target.shape() {
            return Err(mismatch(
                op,
                self.shape(),
                target.shape(),
                "input and target must have one shape",
            ));
        }
        self.sub(target)
    }

    /// Inverted dropout: zeroes each element with probability `p` and scales the rest by
    /// `1/(1-p)`, from a generator seeded by `seed` (reproducible on every backend).
    pub fn dropout(&self, p: f64, seed: u64) -> Result<Self, Error> {
        if !(0.0..=1.0).contains(&p) {
            return Err(Error::InvalidArgument {
                name: "p",
                value: p.to_string(),
                expected: "a probability in [0, 1]",
            });
        }
        if p == 0.0 {
            return Ok(self.clone());
        }
        let mask = Arc::new(D::dropout_mask::<E>(self.shape(), p, seed));
        let shape = self.shape().to_vec();
        let data = D::binary(Binary::Mul, self.storage(), &mask, &shape);
        let x = self.clone();
        Ok(Self::from_op(data, &[self.node()], move |dy, g| {
            g.accumulate::<E, D>(x.id(), D::binary(Binary::Mul, dy, &mask, &shape));
        }))
    }

    /// Layer normalisation over the last axis with optional affine `weight` and `bias` of shape
    /// `[last]` (`torch.nn.functional.layer_norm`); statistics in f64.
    pub fn layer_norm(&self, weight: Option<&Self>, bias: Option<&Self>, eps: f64) -> Result<Self, Error> {
        let last = self.shape().last().copied().unwrap_or(0);
        for p in [weight, bias].into_iter().flatten() {
            if p.shape() != [last] {
                return Err(mismatch(
                    "layer_norm",
                    self.shape(),
                    p.shape(),
                    "weight and bias must be [last dim]",
                ));
            }
        }
        let (y, stats) = D::layer_norm(
            self.storage(),
            weight.map(Tensor::storage),
            bias.map(Tensor::storage),
            eps,
        );
        let (x, w, b) = (self.clone(), weight.cloned(), bias.cloned());
        let inputs = [
            self.node(),
            weight.and_then(Tensor::node),
            bias.and_then(Tensor::node),
        ];
        Ok(Self::from_op(y, &inputs, move |dy, g| {
            let (dx, dw, db) = D::layer_norm_backward(
                x.storage(),
                w.as_ref().map(Tensor::storage),
                &stats,
                dy,
                b.is_some(),
            );
            if x.is_tracked() {
                g.accumulate::<E, D>(x.id(), dx);
            }
            if let (Some(w), Some(dw)) = (&w, dw)
                && w.is_tracked()
            {
                g.accumulate::<E, D>(w.id(), dw);
            }
            if let (Some(b), Some(db)) = (&b, db)
                && b.is_tracked()
            {
                g.accumulate::<E, D>(b.id(), db);
            }
        }))
    }

    /// Whether any element is inf or NaN.
    pub fn has_non_finite(&self) -> bool {
        D::any_non_finite(self.storage())
    }
}
