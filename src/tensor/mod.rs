//! Typed tensors: `Tensor<E, D>` holds elements of type `E` on device `D`.
//!
//! On the CPU the data is an ndarray array; every numeric operation goes through the device's
//! [`Backend`] trait. A tensor is a cheap handle (an `Arc`): cloning it shares data and graph node.
//!
//! ```
//! use nbit::tensor::Tensor;
//! use half::bf16;
//!
//! let w = Tensor::<f32>::from_vec(&[2, 2], vec![1.0, 2.0, 3.0, 4.0])?.requires_grad();
//! let x = Tensor::<f32>::from_vec(&[1, 2], vec![1.0, 1.0])?;
//! let y = x.matmul(&w.cast::<bf16>().cast::<f32>())?.sum();  // a bf16 round trip is exact here
//! assert_eq!(y.item()?, 10.0);
//! let g = y.backward()?;
//! assert_eq!(g.get(&w).unwrap().to_vec(), vec![1.0; 4]);     // gradients come back in f32
//! # Ok::<(), nbit::Error>(())
//! ```

mod complex;

pub use complex::ComplexOps;
pub use ids::Indices;
mod ids;
mod layout;
mod ops;
mod parameter;
pub use parameter::Parameter;
mod select;

pub use select::ConvOptions;

use std::sync::Arc;

use ndarray::{ArrayD, IxDyn};

use crate::autograd::{self, GradFn, Grads, Node};
use crate::backend::Backend;
use crate::device::Cpu;
use crate::dtype::{DType, Element, Float};
use crate::error::Error;

/// A shape error naming both shapes and the rule they break.
pub(crate) fn mismatch(op: &'static str, left: &[usize], right: &[usize], rule: &'static str) -> Error {
    Error::ShapeMismatch {
        op,
        left: left.to_vec(),
        right: right.to_vec(),
        rule,
    }
}

/// `to` holds as many elements as `from` (a reshape's one rule).
fn same_count(from: &[usize], to: &[usize]) -> Result<(), Error> {
    if to.iter().product::<usize>() == from.iter().product::<usize>() {
        Ok(())
    } else {
        Err(mismatch("reshape", from, to, "the element counts must be equal"))
    }
}

pub(crate) struct Inner<E: Element, D: Backend> {
    id: u64,
    data: Arc<D::Storage<E>>,
    requires_grad: bool,
    grad_fn: Option<GradFn<E, D>>,
    /// Keep this (intermediate) tensor's gradient after backward ([`Tensor::retain_grad`]).
    retain: core::sync::atomic::AtomicBool,
}

/// An n-dimensional array of `E` on device `D`, tracked for gradients when asked.
pub struct Tensor<E: Element, D: Backend = Cpu> {
    inner: Arc<Inner<E, D>>,
}

impl<E: Element, D: Backend> Clone for Tensor<E, D> {
    fn clone(&self) -> Self {
        Tensor {
            inner: self.inner.clone(),
        }
    }
}

impl<E: Element, D: Backend> core::fmt::Debug for Tensor<E, D> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Tensor")
            .field("dtype", &E::DTYPE)
            .field("shape", &self.shape())
            .field("requires_grad", &self.inner.requires_grad)
            .finish()
    }
}

impl<E: Element, D: Backend> Tensor<E, D> {
    pub(crate) fn from_storage(data: D::Storage<E>) -> Self {
        Self::from_arc(Arc::new(data))
    }

    fn from_arc(data: Arc<D::Storage<E>>) -> Self {
        Tensor {
            inner: Arc::new(Inner {
                id: autograd::next_id(),
                data,
                requires_grad: false,
                grad_fn: None,
                retain: Default::default(),
            }),
        }
    }

    /// A tensor holding `a` (copied to the device).
    pub fn from_array(a: ArrayD<E>) -> Self {
        Self::from_storage(D::from_array(a))
    }

    /// A tensor of `shape` from row-major `values`, or an error when the counts differ.
    pub fn from_vec(shape: &[usize], values: Vec<E>) -> Result<Self, Error> {
        let n = values.len();
        ArrayD::from_shape_vec(IxDyn(shape), values)
            .map(Self::from_array)
            .map_err(|_| Error::ShapeMismatch {
                op: "from_vec",
                left: vec![n],
                right: shape.to_vec(),
                rule: "the number of values must equal the product of the shape",
            })
    }

    /// A tensor of `shape` with every element `value`.
    pub fn full(shape: &[usize], value: E) -> Self {
        Self::from_storage(D::full(shape, value))
    }

    /// A tensor of `shape` filled with zeros.
    pub fn zeros(shape: &[usize]) -> Self {
        Self::full(shape, E::default())
    }

    /// A shape-`[]` tensor holding `value`.
    pub fn scalar(value: E) -> Self {
        Self::full(&[], value)
    }

    /// This tensor as a leaf that gradients flow to (PyTorch's `requires_grad_()`). The data is
    /// shared, the graph history dropped.
    pub fn requires_grad(self) -> Self {
        Tensor {
            inner: Arc::new(Inner {
                id: autograd::next_id(),
                data: self.inner.data.clone(),
                requires_grad: true,
                grad_fn: None,
                retain: Default::default(),
            }),
        }
    }

    /// Keeps this tensor's gradient in the [`Grads`] of a backward pass even though it is an
    /// intermediate result (PyTorch's `retain_grad()`); without it only leaves (parameters and
    /// inputs made with [`Tensor::requires_grad`]) keep theirs, and an intermediate gradient is
    /// freed as soon as it has been passed on.
    ///
    /// ```
    /// use nbit::tensor::Tensor;
    /// let x = Tensor::<f64>::from_vec(&[2], vec![1.0, 2.0])?.requires_grad();
    /// let h = x.mul_scalar(3.0);
    /// h.retain_grad();
    /// let g = h.sum().backward()?;
    /// assert_eq!(g.get(&h).unwrap().to_vec(), vec![1.0, 1.0]);
    /// assert_eq!(g.get(&x).unwrap().to_vec(), vec![3.0, 3.0]);
    /// # Ok::<(), nbit::Error>(())
    /// ```
    pub fn retain_grad(&self) {
        self.inner
            .retain
            .store(true, core::sync::atomic::Ordering::Relaxed);
    }

    /// Whether gradients flow through this tensor.
    pub fn is_tracked(&self) -> bool {
        self.inner.requires_grad
    }

    /// The same data, cut from the graph.
    pub fn detach(&self) -> Self {
        Self::from_arc(self.inner.data.clone())
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        D::shape(&self.inner.data)
    }

    /// The number of elements.
    pub fn numel(&self) -> usize {
        self.shape().iter().product()
    }

    /// The run-time dtype tag, `E::DTYPE`.
    pub fn dtype(&self) -> DType {
        E::DTYPE
    }

    /// A host copy of the data.
    pub fn to_array(&self) -> ArrayD<E> {
        D::to_array(&self.inner.data)
    }

    /// The elements in row-major order.
    pub fn to_vec(&self) -> Vec<E> {
        self.to_array().iter().copied().collect()
    }

    /// The single element of a one-element tensor.
    pub fn item(&self) -> Result<E, Error> {
        match self.to_vec().as_slice() {
            [v] => Ok(*v),
            _ => Err(Error::ShapeMismatch {
                op: "item",
                left: self.shape().to_vec(),
                right: vec![],
                rule: "item() needs a tensor with exactly one element",
            }),
        }
    }

    /// A stable identity for this graph node (used by [`Grads`] and the autocast cache).
    pub fn id(&self) -> u64 {
        self.inner.id
    }

    pub(crate) fn storage(&self) -> &D::Storage<E> {
        &self.inner.data
    }

    /// Mutable access to the data for in-place updates (optimizers, gradient buffers). Copy-on-write:
    /// when a graph still shares this tensor, it keeps the old data. Identity (`id`) is kept.
    pub(crate) fn storage_mut(&mut self) -> &mut D::Storage<E> {
        if Arc::get_mut(&mut self.inner).is_none() {
            let old = &*self.inner;
            self.inner = Arc::new(Inner {
                id: old.id,
                data: old.data.clone(),
                requires_grad: old.requires_grad,
                grad_fn: None,
                retain: Default::default(),
            });
        }
        let inner = Arc::get_mut(&mut self.inner).expect("uniquely owned after the copy above");
        Arc::make_mut(&mut inner.data)
    }

    pub(crate) fn node(&self) -> Option<Arc<dyn Node>> {
        self.inner
            .requires_grad
            .then(|| self.inner.clone() as Arc<dyn Node>)
    }

    /// The result of an op: tracked, with `backward`, when any input is tracked.
    pub(crate) fn from_op(
        data: impl Into<Arc<D::Storage<E>>>,
        inputs: &[Option<Arc<dyn Node>>],
        backward: impl Fn(&D::Storage<E>, &mut Grads) + Send + Sync + 'static,
    ) -> Self {
        let inputs: Vec<Arc<dyn Node>> = inputs.iter().flatten().cloned().collect();
        if inputs.is_empty() || !autograd::recording() {
            return Self::from_arc(data.into());
        }
        Tensor {
            inner: Arc::new(Inner {
                id: autograd::next_id(),
                data: data.into(),
                requires_grad: true,
                grad_fn: Some(GradFn {
                    inputs,
                    backward: Box::new(backward),
                }),
                retain: Default::default(),
            }),
        }
    }
}

impl<E: Float, D: Backend> Tensor<E, D> {
    /// Gradients of this one-element tensor (a loss) with respect to every tracked tensor it was
    /// computed from.
    pub fn backward(&self) -> Result<Grads, Error> {
        if self.numel() != 1 {
            return Err(Error::ShapeMismatch {
                op: "backward",
                left: self.shape().to_vec(),
                right: vec![],
                rule: "backward() needs a one-element output (a loss); use backward_with for others",
            });
        }
        self.backward_with(&Tensor::full(self.shape(), E::one()))
    }

    /// Backward from an explicit output gradient of this tensor's shape.
    pub fn backward_with(&self, seed: &Tensor<E, D>) -> Result<Grads, Error> {
        autograd::check_seed(self.shape(), seed.shape())?;
        let mut grads = Grads::default();
        if let Some(root) = self.node() {
            grads.accumulate::<E, D>(self.id(), seed.storage().clone());
            autograd::run_backward(root, &mut grads);
        }
        Ok(grads)
    }
}

impl<E: Element, D: Backend> Node for Inner<E, D> {
    fn id(&self) -> u64 {
        self.id
    }

    fn inputs(&self) -> &[Arc<dyn Node>] {
        self.grad_fn.as_ref().map_or(&[], |g| &g.inputs)
    }

    fn propagate(&self, grads: &mut Grads) {
        let Some(f) = &self.grad_fn else { return };
        let Some(g) = grads.remove_raw(self.id) else {
            return;
        };
        if let Some(dy) = g.downcast_ref::<D::Storage<E>>() {
            (f.backward)(dy, grads);
        }
        // An intermediate tensor's gradient is freed once passed on, as PyTorch frees it (unless
        // `retain_grad`): a transformer's activations have hundreds of them. Leaves (parameters,
        // inputs that require gradients) keep theirs.
        if self.retain.load(core::sync::atomic::Ordering::Relaxed) {
            grads.restore(self.id, g);
        }
    }
}
