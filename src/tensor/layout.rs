//! Differentiable changes of layout and masking, with PyTorch's names: `permute`, `swapaxes`,
//! `unsqueeze`, `squeeze`, `expand`, `masked_fill`, `triu`/`tril`, softmax along any axis, and
//! the causal mask of a decoder.

use std::sync::Arc;

use ndarray::{Array2, ArrayD};

use super::{Tensor, mismatch};
use crate::backend::{Backend, Binary, broadcast_shapes};
use crate::dtype::Float;
use crate::error::Error;

/// Axis `dim` of an `ndim`-axis tensor, counted from the end when negative (PyTorch's `dim=-1`).
fn axis(op: &'static str, shape: &[usize], dim: isize, extra: usize) -> Result<usize, Error> {
    let n = (shape.len() + extra) as isize;
    let d = if dim < 0 { dim + n } else { dim };
    if (0..n).contains(&d) {
        Ok(d as usize)
    } else {
        Err(Error::InvalidArgument {
            name: op,
            value: format!("dim {dim} for shape {shape:?}"),
            expected: "a dimension in -ndim..ndim",
        })
    }
}

impl<E: Float, D: Backend> Tensor<E, D> {
    /// The axes reordered: axis `i` of the result is axis `axes[i]` of this tensor
    /// (`torch.permute`), as a row-major copy. The gradient is permuted back.
    ///
    /// ```
    /// use nbit::tensor::Tensor;
    /// let x = Tensor::<f32>::zeros(&[2, 3, 4]);
    /// assert_eq!(x.permute(&[2, 0, 1])?.shape(), &[4, 2, 3]);
    /// assert!(x.permute(&[0, 0, 1]).is_err());
    /// # Ok::<(), nbit::Error>(())
    /// ```
    pub fn permute(&self, axes: &[usize]) -> Result<Self, Error> {
        let n = self.shape().len();
        let mut seen = vec![false; n];
        if axes.len() != n
            || !axes
                .iter()
                .all(|&a| a < n && !std::mem::replace(&mut seen[a], true))
        {
            return Err(Error::InvalidArgument {
                name: "permute",
                value: format!("axes {axes:?} for shape {:?}", self.shape()),
                expected: "every axis of the tensor exactly once",
            });
        }
        if axes.iter().enumerate().all(|(i, &a)| i == a) {
            return Ok(self.clone());
        }
        let mut inverse = vec![0; n];
        for (i, &a) in axes.iter().enumerate() {
            inverse[a] = i;
        }
        let x = self.clone();
        Ok(Self::from_op(
            D::permute(self.storage(), axes),
            &[self.node()],
            move |dy, g| {
                g.accumulate::<E, D>(x.id(), D::permute(dy, &inverse));
            },
        ))
    }

    /// Axes `dim0` and `dim1` exchanged (`torch.swapaxes`, PyTorch's `transpose(dim0, dim1)`);
    /// negative dimensions count from the end. [`Tensor::transpose`] swaps the last two.
    pub fn swapaxes(&self, dim0: isize, dim1: isize) -> Result<Self, Error> {
        let (a, b) = (
            axis("swapaxes", self.shape(), dim0, 0)?,
            axis("swapaxes", self.shape(), dim1, 0)?,
        );
        let mut axes: Vec<usize> = (0..self.shape().len()).collect();
        axes.swap(a, b);
        self.permute(&axes)
    }

    /// A new axis of size 1 at `dim` (`torch.unsqueeze`; `-1` appends one).
    pub fn unsqueeze(&self, dim: isize) -> Result<Self, Error> {
        let d = axis("unsqueeze", self.shape(), dim, 1)?;
        let mut shape = self.shape().to_vec();
        shape.insert(d, 1);
        self.reshape(&shape)
    }

    /// Axis `dim` removed when its size is 1, else the tensor unchanged (`torch.squeeze(dim)`).
    pub fn squeeze(&self, dim: isize) -> Result<Self, Error> {
        let d = axis("squeeze", self.shape(), dim, 0)?;
        if self.shape()[d] != 1 {
            return Ok(self.clone());
        }
        let mut shape = self.shape().to_vec();
        shape.remove(d);
        self.reshape(&shape)
    }

    /// This tensor broadcast to `shape` (`torch.expand`, NumPy's rules), as a copy unless the
    /// shape is already `shape`; the gradient is summed back over the broadcast axes.
    pub fn expand(&self, shape: &[usize]) -> Result<Self, Error> {
        if self.shape() == shape {
            return Ok(self.clone());
        }
        if broadcast_shapes("expand", self.shape(), shape)? != shape {
            return Err(mismatch(
                "expand",
                self.shape(),
                shape,
                "every axis must be 1 or the target's size",
            ));
        }
        let (x, old) = (self.clone(), self.shape().to_vec());
        Ok(Self::from_op(
            D::broadcast_to(self.storage(), shape),
            &[self.node()],
            move |dy, g| {
                g.accumulate::<E, D>(x.id(), D::sum_to_shape(dy, &old));
            },
        ))
    }

    /// `value` where `mask` (broadcast to this shape) is non-zero, this tensor elsewhere
    /// (`torch.masked_fill`, with a 0/1 mask of this dtype for PyTorch's bool mask). The gradient
    /// flows where the mask is zero.
    pub fn masked_fill(&self, mask: &Self, value: f64) -> Result<Self, Error> {
        if broadcast_shapes("masked_fill", mask.shape(), self.shape())? != self.shape() {
            return Err(mismatch(
                "masked_fill",
                self.shape(),
                mask.shape(),
                "the mask must broadcast to the input's shape",
            ));
        }
        mask.where_cond(&Tensor::scalar(E::from_f64(value)), self)
    }

    /// The elements on and above diagonal `diagonal` of the last two axes, zeros below
    /// (`torch.triu`; diagonal 1 starts above the main one).
    pub fn triu(&self, diagonal: isize) -> Result<Self, Error> {
        self.band("triu", diagonal, true)
    }

    /// The elements on and below diagonal `diagonal` of the last two axes, zeros above
    /// (`torch.tril`).
    pub fn tril(&self, diagonal: isize) -> Result<Self, Error> {
        self.band("tril", diagonal, false)
    }

    fn band(&self, op: &'static str, diagonal: isize, upper: bool) -> Result<Self, Error> {
        let shape = self.shape();
        if shape.len() < 2 {
            return Err(mismatch(op, shape, &[], "the tensor needs at least two axes"));
        }
        let (rows, cols) = (shape[shape.len() - 2], shape[shape.len() - 1]);
        let keep = Array2::from_shape_fn((rows, cols), |(i, j)| {
            let above = j as isize - i as isize >= diagonal;
            let below = j as isize - i as isize <= diagonal;
            E::from_f64(if (upper && above) || (!upper && below) {
                1.0
            } else {
                0.0
            })
        });
        let mask = Arc::new(D::from_array(keep.into_dyn()));
        let out = shape.to_vec();
        let x = self.clone();
        Ok(Self::from_op(
            D::binary(Binary::Mul, self.storage(), &mask, &out),
            &[self.node()],
            move |dy, g| {
                g.accumulate::<E, D>(x.id(), D::binary(Binary::Mul, dy, &mask, &out));
            },
        ))
    }

    /// The `[size, size]` additive causal mask of a decoder: 0 on and below the diagonal, -inf
    /// above it, so position `i` attends to positions `0..=i` (PyTorch's
    /// `nn.Transformer.generate_square_subsequent_mask`).
    ///
    /// ```
    /// use nbit::tensor::Tensor;
    /// let m = Tensor::<f32>::causal_mask(2);
    /// assert_eq!(m.to_vec(), vec![0.0, f32::NEG_INFINITY, 0.0, 0.0]);
    /// ```
    pub fn causal_mask(size: usize) -> Self {
        let m = ArrayD::from_shape_fn(ndarray::IxDyn(&[size, size]), |ix| {
            E::from_f64(if ix[1] > ix[0] { f64::NEG_INFINITY } else { 0.0 })
        });
        Self::from_array(m)
    }

    /// An additive attention mask from a 0/1 one: -inf where this tensor is non-zero (a masked
    /// position, PyTorch's `True` in a bool mask), 0 elsewhere.
    pub fn to_additive_mask(&self) -> Self {
        let masked = Self::scalar(E::from_f64(f64::NEG_INFINITY));
        self.where_cond(&masked, &Self::scalar(E::zero()))
            .expect("scalars broadcast to any shape")
            .detach()
    }

    /// Softmax along `dim` (negative counts from the end), as `torch.softmax(x, dim)`.
    pub fn softmax_axis(&self, dim: isize) -> Result<Self, Error> {
        self.softmax_along(dim, false)
    }

    /// Log-softmax along `dim`, as `torch.log_softmax(x, dim)`.
    pub fn log_softmax_axis(&self, dim: isize) -> Result<Self, Error> {
        self.softmax_along(dim, true)
    }

    fn softmax_along(&self, dim: isize, log: bool) -> Result<Self, Error> {
        let d = axis("softmax", self.shape(), dim, 0)?;
        let last = self.shape().len() - 1;
        if d == last {
            return Ok(self.softmax_op(log));
        }
        let d = d as isize;
        self.swapaxes(d, -1)?.softmax_op(log).swapaxes(d, -1)
    }
}
