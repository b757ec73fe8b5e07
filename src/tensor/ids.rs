//! Integer tensors (`Tensor<i64, D>`, PyTorch's `LongTensor`) and [`Indices`]: what token ids and
//! class labels may be given as (an `i64` tensor, a slice, a vector or an array of `usize`).

use ndarray::ArrayD;

use super::Tensor;
use crate::backend::Backend;
use crate::error::Error;

/// Indices as a model receives them: token ids for an embedding, class labels for a loss. An
/// `i64` tensor (on any device, read to the host), a `usize` slice, vector or array, or an
/// `ArrayD<usize>`. Each index is checked against the size it indexes; a negative or too large
/// one is an error that names it.
///
/// ```
/// use nbit::prelude::*;
/// let logits = Tensor::<f64>::from_vec(&[2, 3], vec![0.0; 6])?;
/// let ids = Tensor::<i64>::from_vec(&[2], vec![2, 0])?;
/// let a = logits.cross_entropy(&ids)?;
/// let b = logits.cross_entropy(&[2, 0])?;
/// assert_eq!(a.item()?, b.item()?);
/// assert!(logits.cross_entropy(&Tensor::<i64>::from_vec(&[2], vec![-1, 0])?).is_err());
/// # Ok::<(), nbit::Error>(())
/// ```
pub trait Indices<D: Backend> {
    /// The shape of the indices.
    fn index_shape(&self) -> Vec<usize>;
    /// The indices in row-major order, each checked to be below `bound`.
    fn indices(&self, bound: usize) -> Result<Vec<usize>, Error>;
}

fn out_of_range(index: impl core::fmt::Display, bound: usize) -> Error {
    Error::InvalidArgument {
        name: "index",
        value: format!("{index} (for a size of {bound})"),
        expected: "indices from 0 to the size less one (token ids below the vocabulary size, class labels below the number of classes)",
    }
}

fn checked(v: impl Iterator<Item = usize>, bound: usize) -> Result<Vec<usize>, Error> {
    v.map(|i| {
        if i < bound {
            Ok(i)
        } else {
            Err(out_of_range(i, bound))
        }
    })
    .collect()
}

impl<D: Backend> Indices<D> for Tensor<i64, D> {
    fn index_shape(&self) -> Vec<usize> {
        self.shape().to_vec()
    }
    fn indices(&self, bound: usize) -> Result<Vec<usize>, Error> {
        self.to_vec()
            .into_iter()
            .map(|i| match usize::try_from(i) {
                Ok(u) if u < bound => Ok(u),
                _ => Err(out_of_range(i, bound)),
            })
            .collect()
    }
}

impl<D: Backend> Indices<D> for [usize] {
    fn index_shape(&self) -> Vec<usize> {
        vec![self.len()]
    }
    fn indices(&self, bound: usize) -> Result<Vec<usize>, Error> {
        checked(self.iter().copied(), bound)
    }
}

impl<D: Backend, const N: usize> Indices<D> for [usize; N] {
    fn index_shape(&self) -> Vec<usize> {
        vec![N]
    }
    fn indices(&self, bound: usize) -> Result<Vec<usize>, Error> {
        checked(self.iter().copied(), bound)
    }
}

impl<D: Backend> Indices<D> for Vec<usize> {
    fn index_shape(&self) -> Vec<usize> {
        vec![self.len()]
    }
    fn indices(&self, bound: usize) -> Result<Vec<usize>, Error> {
        checked(self.iter().copied(), bound)
    }
}

impl<D: Backend> Indices<D> for ArrayD<usize> {
    fn index_shape(&self) -> Vec<usize> {
        self.shape().to_vec()
    }
    fn indices(&self, bound: usize) -> Result<Vec<usize>, Error> {
        checked(self.iter().copied(), bound)
    }
}

impl<D: Backend> Tensor<i64, D> {
    /// The same ids under a new shape with the same count (ids carry no gradient).
    pub fn reshape(&self, shape: &[usize]) -> Result<Self, Error> {
        super::same_count(self.shape(), shape)?;
        Ok(Self::from_storage(D::reshape(self.storage(), shape)))
    }

    /// `len` ids along `axis` from `start` (`torch.narrow`), as a copy: a window of a token
    /// sequence, or its inputs (`narrow(1, 0, t)`) and next-token targets (`narrow(1, 1, t)`).
    pub fn narrow(&self, axis: usize, start: usize, len: usize) -> Result<Self, Error> {
        let shape = self.shape();
        if axis >= shape.len() || start.checked_add(len).is_none_or(|end| end > shape[axis]) {
            return Err(Error::InvalidArgument {
                name: "narrow",
                value: format!("axis {axis}, start {start}, length {len} of shape {shape:?}"),
                expected: "an axis of the tensor and start + length within it",
            });
        }
        let index: Vec<usize> = (start..start + len).collect();
        Ok(Self::from_storage(D::index_select(self.storage(), axis, &index)))
    }
}
