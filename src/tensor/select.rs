//! Differentiable indexing, joining, selection, extreme-value reductions and convolutions, with
//! PyTorch's names and semantics. Indices are host `usize` values; every index and axis is
//! checked, and a bad one is an `Err` that names it.

use ndarray::ArrayD;

use super::{Tensor, mismatch};
use crate::backend::{Backend, Compare, Conv2dGeometry, Unary, broadcast_shapes};
use crate::dtype::Float;
use crate::error::Error;

fn bad_axis(op: &'static str, shape: &[usize], axis: usize) -> Error {
    mismatch(
        op,
        shape,
        &[axis],
        "the axis must be less than the number of dimensions",
    )
}

fn check_axis(op: &'static str, shape: &[usize], axis: usize) -> Result<(), Error> {
    if axis < shape.len() {
        Ok(())
    } else {
        Err(bad_axis(op, shape, axis))
    }
}

fn check_indices(index: &[usize], size: usize) -> Result<(), Error> {
    match index.iter().find(|&&i| i >= size) {
        None => Ok(()),
        Some(i) => Err(Error::InvalidArgument {
            name: "index",
            value: format!("{i} (axis of size {size})"),
            expected: "indices less than the size of the axis",
        }),
    }
}

/// Stride, padding and dilation of a convolution (PyTorch's defaults: 1, 0, 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvOptions {
    /// Step between patches, per spatial axis.
    pub stride: (usize, usize),
    /// Zeros added on each side, per spatial axis.
    pub padding: (usize, usize),
    /// Spacing between kernel taps, per spatial axis.
    pub dilation: (usize, usize),
}

impl Default for ConvOptions {
    fn default() -> Self {
        ConvOptions {
            stride: (1, 1),
            padding: (0, 0),
            dilation: (1, 1),
        }
    }
}

impl<E: Float, D: Backend> Tensor<E, D> {
    /// `sqrt(x)` (NaN for negative x).
    pub fn sqrt(&self) -> Self {
        self.unary_op(Unary::Sqrt)
    }

    /// Every element limited to `[min, max]` (`torch.clamp`); the gradient is passed where
    /// `min <= x <= max` and 0 elsewhere. NaN stays NaN. `min > max` is an error.
    pub fn clamp(&self, min: f64, max: f64) -> Result<Self, Error> {
        if min.is_nan() || max.is_nan() || min > max {
            return Err(Error::InvalidArgument {
                name: "clamp",
                value: format!("min = {min}, max = {max}"),
                expected: "min <= max, neither NaN",
            });
        }
        Ok(self.unary_op(Unary::Clamp(min, max)))
    }

    fn compare(&self, op: Compare, other: &Self, name: &'static str) -> Result<Self, Error> {
        let shape = broadcast_shapes(name, self.shape(), other.shape())?;
        Ok(Self::from_storage(D::compare(
            op,
            self.storage(),
            other.storage(),
            &shape,
        )))
    }

    /// 1 where `self == other`, else 0 (broadcasting; not differentiable, as a bool mask).
    pub fn eq(&self, other: &Self) -> Result<Self, Error> {
        self.compare(Compare::Eq, other, "eq")
    }
    /// 1 where `self != other`, else 0.
    pub fn ne(&self, other: &Self) -> Result<Self, Error> {
        self.compare(Compare::Ne, other, "ne")
    }
    /// 1 where `self < other`, else 0.
    pub fn lt(&self, other: &Self) -> Result<Self, Error> {
        self.compare(Compare::Lt, other, "lt")
    }
    /// 1 where `self <= other`, else 0.
    pub fn le(&self, other: &Self) -> Result<Self, Error> {
        self.compare(Compare::Le, other, "le")
    }
    /// 1 where `self > other`, else 0.
    pub fn gt(&self, other: &Self) -> Result<Self, Error> {
        self.compare(Compare::Gt, other, "gt")
    }
    /// 1 where `self >= other`, else 0.
    pub fn ge(&self, other: &Self) -> Result<Self, Error> {
        self.compare(Compare::Ge, other, "ge")
    }

    /// `torch.where(self, on_true, on_false)`: elements of `on_true` where `self` (the condition)
    /// is non-zero, of `on_false` elsewhere, all three broadcast together. Differentiable in
    /// `on_true` and `on_false`.
    ///
    /// ```
    /// use nbit::prelude::*;
    /// let x = Tensor::<f32>::from_vec(&[4], vec![-2.0, -0.5, 0.5, 2.0])?;
    /// let leaky = x.gt(&Tensor::scalar(0.0))?.where_cond(&x, &x.mul_scalar(0.1))?;
    /// assert_eq!(leaky.to_vec(), vec![-0.2, -0.05, 0.5, 2.0]);
    /// # Ok::<(), nbit::Error>(())
    /// ```
    pub fn where_cond(&self, on_true: &Self, on_false: &Self) -> Result<Self, Error> {
        let ab = broadcast_shapes("where", on_true.shape(), on_false.shape())?;
        let shape = broadcast_shapes("where", self.shape(), &ab)?;
        let data = D::select(self.storage(), on_true.storage(), on_false.storage(), &shape);
        let (c, a, b) = (self.clone(), on_true.clone(), on_false.clone());
        Ok(Self::from_op(
            data,
            &[on_true.node(), on_false.node()],
            move |dy, g| {
                let zero = D::full(&[], E::zero());
                let out = D::shape(dy).to_vec();
                if a.is_tracked() {
                    let da = D::select(c.storage(), dy, &zero, &out);
                    g.accumulate::<E, D>(a.id(), D::sum_to_shape(&da, a.shape()));
                }
                if b.is_tracked() {
                    let db = D::select(c.storage(), &zero, dy, &out);
                    g.accumulate::<E, D>(b.id(), D::sum_to_shape(&db, b.shape()));
                }
            },
        ))
    }

    /// The slices at `index` along `axis`, in that order (`torch.index_select`); an index may
    /// repeat. The gradient adds each slice's gradient back at its index.
    pub fn index_select(&self, axis: usize, index: &[usize]) -> Result<Self, Error> {
        check_axis("index_select", self.shape(), axis)?;
        check_indices(index, self.shape()[axis])?;
        let data = D::index_select(self.storage(), axis, index);
        let (x, index) = (self.clone(), index.to_vec());
        Ok(Self::from_op(data, &[self.node()], move |dy, g| {
            g.accumulate::<E, D>(x.id(), D::index_add(x.shape(), axis, &index, dy));
        }))
    }

    /// `len` elements along `axis` from `start` (`torch.narrow`), as a copy.
    pub fn narrow(&self, axis: usize, start: usize, len: usize) -> Result<Self, Error> {
        check_axis("narrow", self.shape(), axis)?;
        let size = self.shape()[axis];
        if start.checked_add(len).is_none_or(|end| end > size) {
            return Err(Error::InvalidArgument {
                name: "narrow",
                value: format!("start {start}, length {len} on an axis of size {size}"),
                expected: "start + length within the axis",
            });
        }
        self.index_select(axis, &(start..start + len).collect::<Vec<_>>())
    }

    /// `torch.gather`: `out[.., j, ..] = self[.., index[.., j, ..], ..]` along `axis`; `index`
    /// has `self`'s shape except at `axis`, and the output has `index`'s shape.
    pub fn gather(&self, axis: usize, index: &ArrayD<usize>) -> Result<Self, Error> {
        check_axis("gather", self.shape(), axis)?;
        let same_elsewhere = index.ndim() == self.shape().len()
            && (0..index.ndim()).all(|d| d == axis || index.shape()[d] == self.shape()[d]);
        if !same_elsewhere {
            return Err(mismatch(
                "gather",
                self.shape(),
                index.shape(),
                "the index must have the input's shape except along the axis",
            ));
        }
        let flat: Vec<usize> = index.iter().copied().collect();
        check_indices(&flat, self.shape()[axis])?;
        let data = D::gather(self.storage(), axis, &flat, index.shape());
        let x = self.clone();
        Ok(Self::from_op(data, &[self.node()], move |dy, g| {
            g.accumulate::<E, D>(x.id(), D::scatter_add(x.shape(), axis, &flat, dy));
        }))
    }

    /// The tensors joined along `axis` (`torch.cat`); they must agree on every other axis.
    pub fn concat(parts: &[&Self], axis: usize) -> Result<Self, Error> {
        let first = parts.first().ok_or(Error::InvalidArgument {
            name: "concat",
            value: "no tensors".into(),
            expected: "at least one tensor",
        })?;
        check_axis("concat", first.shape(), axis)?;
        for p in parts {
            let agree = p.shape().len() == first.shape().len()
                && (0..p.shape().len()).all(|d| d == axis || p.shape()[d] == first.shape()[d]);
            if !agree {
                return Err(mismatch(
                    "concat",
                    first.shape(),
                    p.shape(),
                    "tensors must have the same shape except along the axis",
                ));
            }
        }
        let storages: Vec<&D::Storage<E>> = parts.iter().map(|p| p.storage()).collect();
        let data = D::concat(&storages, axis);
        let inputs: Vec<_> = parts.iter().map(|p| p.node()).collect();
        let parts: Vec<Self> = parts.iter().map(|&p| p.clone()).collect();
        Ok(Self::from_op(data, &inputs, move |dy, g| {
            let mut start = 0;
            for p in &parts {
                let len = p.shape()[axis];
                if p.is_tracked() {
                    let range: Vec<usize> = (start..start + len).collect();
                    g.accumulate::<E, D>(p.id(), D::index_select(dy, axis, &range));
                }
                start += len;
            }
        }))
    }

    /// The tensors (all of one shape) stacked along a new axis `axis` (`torch.stack`).
    pub fn stack(parts: &[&Self], axis: usize) -> Result<Self, Error> {
        let shape = parts.first().map_or(&[][..], |p| p.shape()).to_vec();
        if axis > shape.len() {
            return Err(bad_axis("stack", &shape, axis));
        }
        let mut grown = shape.clone();
        grown.insert(axis, 1);
        let reshaped = parts
            .iter()
            .map(|p| match p.shape() == shape {
                true => p.reshape(&grown),
                false => Err(mismatch(
                    "stack",
                    &shape,
                    p.shape(),
                    "tensors must have one shape",
                )),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Self::concat(&reshaped.iter().collect::<Vec<_>>(), axis)
    }

    fn extreme(&self, axis: usize, keepdim: bool, largest: bool) -> Result<(Self, Vec<usize>), Error> {
        let op = if largest { "max" } else { "min" };
        check_axis(op, self.shape(), axis)?;
        if self.shape()[axis] == 0 {
            return Err(mismatch(op, self.shape(), &[axis], "the axis must not be empty"));
        }
        let at = D::arg_extreme(self.storage(), axis, largest);
        let mut kept = self.shape().to_vec();
        kept[axis] = 1;
        let values = self.gather(
            axis,
            &ArrayD::from_shape_vec(kept.clone(), at.clone()).expect("one per row"),
        )?;
        if keepdim {
            return Ok((values, at));
        }
        kept.remove(axis);
        Ok((values.reshape(&kept)?, at))
    }

    /// The largest element along `axis` and where it is (`torch.max(x, dim)`): the first on
    /// ties, and NaN propagates. The gradient flows to the chosen elements only.
    pub fn max_axis(&self, axis: usize, keepdim: bool) -> Result<(Self, Vec<usize>), Error> {
        self.extreme(axis, keepdim, true)
    }
    /// The smallest element along `axis` and where it is (`torch.min(x, dim)`).
    pub fn min_axis(&self, axis: usize, keepdim: bool) -> Result<(Self, Vec<usize>), Error> {
        self.extreme(axis, keepdim, false)
    }
    /// The largest element, shape `[]` (`torch.max(x)`); an empty tensor is an error.
    pub fn max(&self) -> Result<Self, Error> {
        Ok(self.reshape(&[self.numel()])?.extreme(0, false, true)?.0)
    }
    /// The smallest element, shape `[]`.
    pub fn min(&self) -> Result<Self, Error> {
        Ok(self.reshape(&[self.numel()])?.extreme(0, false, false)?.0)
    }
    /// Where the largest element along `axis` is, for every position of the other axes in
    /// row-major order (`torch.argmax(x, dim)`).
    pub fn argmax(&self, axis: usize) -> Result<Vec<usize>, Error> {
        check_axis("argmax", self.shape(), axis)?;
        Ok(D::arg_extreme(self.storage(), axis, true))
    }
    /// Where the smallest element along `axis` is (`torch.argmin(x, dim)`).
    pub fn argmin(&self, axis: usize) -> Result<Vec<usize>, Error> {
        check_axis("argmin", self.shape(), axis)?;
        Ok(D::arg_extreme(self.storage(), axis, false))
    }

    /// 2-D convolution (`torch.nn.functional.conv2d`, groups = 1): `self` `[batch, in, h, w]`,
    /// `weight` `[out, in, kh, kw]`, `bias` `[out]`; the result is `[batch, out, oh, ow]`. One
    /// matrix product over unfolded patches, so it accumulates and rounds as `linear` does.
    pub fn conv2d(&self, weight: &Self, bias: Option<&Self>, options: ConvOptions) -> Result<Self, Error> {
        let (xs, ws) = (self.shape().to_vec(), weight.shape().to_vec());
        if xs.len() != 4 || ws.len() != 4 || xs[1] != ws[1] {
            return Err(mismatch(
                "conv2d",
                &xs,
                &ws,
                "input [batch, in, h, w] needs weight [out, in, kh, kw]",
            ));
        }
        let geometry = Conv2dGeometry {
            batch: xs[0],
            channels: xs[1],
            input: (xs[2], xs[3]),
            kernel: (ws[2], ws[3]),
            stride: options.stride,
            padding: options.padding,
            dilation: options.dilation,
        };
        let (oh, ow) = geometry.output().ok_or_else(|| Error::InvalidArgument {
            name: "conv2d",
            value: format!("{options:?} for input {xs:?} and kernel {:?}", (ws[2], ws[3])),
            expected: "strides and dilations of at least 1 and a kernel that fits the padded input",
        })?;
        let x = self.clone();
        let cols = Self::from_op(
            D::unfold2d(self.storage(), &geometry),
            &[self.node()],
            move |dy, g| {
                g.accumulate::<E, D>(x.id(), D::fold2d(dy, &geometry));
            },
        );
        let w2 = weight.reshape(&[ws[0], ws[1] * ws[2] * ws[3]])?;
        // [batch * oh * ow, out] -> [batch, out, oh * ow] -> [batch, out, oh, ow]
        let y = cols.linear(&w2, bias)?;
        y.reshape(&[xs[0], oh * ow, ws[0]])?
            .transpose()
            .reshape(&[xs[0], ws[0], oh, ow])
    }

    /// 1-D convolution (`torch.nn.functional.conv1d`): `self` `[batch, in, length]`, `weight`
    /// `[out, in, k]`; the result is `[batch, out, out_length]`. Options apply to the length
    /// (the second of each pair).
    pub fn conv1d(
        &self,
        weight: &Self,
        bias: Option<&Self>,
        stride: usize,
        padding: usize,
    ) -> Result<Self, Error> {
        let (xs, ws) = (self.shape(), weight.shape());
        if xs.len() != 3 || ws.len() != 3 {
            return Err(mismatch(
                "conv1d",
                xs,
                ws,
                "input [batch, in, length] needs weight [out, in, k]",
            ));
        }
        let options = ConvOptions {
            stride: (1, stride),
            padding: (0, padding),
            dilation: (1, 1),
        };
        let y = self.reshape(&[xs[0], xs[1], 1, xs[2]])?.conv2d(
            &weight.reshape(&[ws[0], ws[1], 1, ws[2]])?,
            bias,
            options,
        )?;
        let s = y.shape().to_vec();
        y.reshape(&[s[0], s[1], s[3]])
    }
}
