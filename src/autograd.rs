//! Reverse-mode automatic differentiation.
//!
//! The graph lives in the tensors, as in PyTorch and candle: an op whose inputs require grad
//! returns a tensor holding a *grad function*, a closure that maps the output's gradient to its
//! inputs' gradients, and (type-erased) handles on those inputs. [`Tensor::backward`] sorts the
//! graph topologically from the loss and runs the closures in reverse, accumulating gradients into
//! [`Grads`]. Tensors of different dtypes live in one graph (f32 master weights, f16 activations):
//! each node's gradient has the dtype of its forward value, and a cast's grad function casts back.

use std::any::Any;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::backend::{Backend, Binary};
use crate::dtype::{Element, Float};
use crate::error::Error;
use crate::tensor::Tensor;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// Whether ops on this thread record the graph (see [`no_grad`]).
    static RECORDING: core::cell::Cell<bool> = const { core::cell::Cell::new(true) };
}

/// Runs `f` without recording the graph, as PyTorch's `torch.no_grad()`: every op's result is a
/// plain tensor, so nothing is kept for a backward pass and memory is freed as soon as a value is
/// no longer used. The trainer evaluates (validation, prediction) this way. Applies to ops run on
/// this thread; nests.
///
/// ```
/// use nbit::tensor::Tensor;
/// let w = Tensor::<f32>::from_vec(&[2], vec![1.0, 2.0])?.requires_grad();
/// let y = nbit::autograd::no_grad(|| w.mul_scalar(3.0));
/// assert!(!y.is_tracked());
/// assert!(w.mul_scalar(3.0).is_tracked());
/// # Ok::<(), nbit::Error>(())
/// ```
pub fn no_grad<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            RECORDING.with(|r| r.set(self.0));
        }
    }
    let _restore = Restore(RECORDING.with(|r| r.replace(false)));
    f()
}

/// Whether ops on this thread record the graph now.
pub(crate) fn recording() -> bool {
    RECORDING.with(|r| r.get())
}

pub(crate) fn next_id() -> u64 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

/// Computes the inputs' gradients from the output's gradient.
pub(crate) type BackwardFn<E, D> = Box<dyn Fn(&<D as Backend>::Storage<E>, &mut Grads) + Send + Sync>;

pub(crate) struct GradFn<E: Element, D: Backend> {
    pub(crate) inputs: Vec<Arc<dyn Node>>,
    pub(crate) backward: BackwardFn<E, D>,
}

/// A graph node with its dtype erased.
pub(crate) trait Node: Send + Sync {
    fn id(&self) -> u64;
    fn inputs(&self) -> &[Arc<dyn Node>];
    fn propagate(&self, grads: &mut Grads);
}

/// Gradients from one backward pass, keyed by tensor.
///
/// ```
/// use nbit::tensor::Tensor;
/// let x = Tensor::<f64>::from_vec(&[3], vec![1.0, 2.0, 3.0])?.requires_grad();
/// let y = x.mul(&x)?.sum();               // y = Σ x²
/// let grads = y.backward()?;
/// assert_eq!(grads.get(&x).unwrap().to_vec(), vec![2.0, 4.0, 6.0]);
/// # Ok::<(), nbit::Error>(())
/// ```
#[derive(Default)]
pub struct Grads {
    map: HashMap<u64, Box<dyn Any + Send + Sync>>,
}

impl core::fmt::Debug for Grads {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Grads").field("tensors", &self.map.len()).finish()
    }
}

impl Grads {
    /// The gradient of `t` (same dtype and shape), or `None` if nothing flowed to it.
    pub fn get<E: Element, D: Backend>(&self, t: &Tensor<E, D>) -> Option<Tensor<E, D>> {
        self.storage::<E, D>(t.id())
            .map(|s| Tensor::from_storage(s.clone()))
    }

    /// Removes and returns the gradient of `t`.
    pub fn take<E: Element, D: Backend>(&mut self, t: &Tensor<E, D>) -> Option<Tensor<E, D>> {
        let b = self.map.remove(&t.id())?;
        b.downcast::<D::Storage<E>>()
            .ok()
            .map(|s| Tensor::from_storage(*s))
    }

    /// Number of tensors holding a gradient.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether no gradient was recorded.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub(crate) fn storage<E: Element, D: Backend>(&self, id: u64) -> Option<&D::Storage<E>> {
        self.map.get(&id).and_then(|b| b.downcast_ref::<D::Storage<E>>())
    }

    /// Adds `g` to the gradient of tensor `id` (the sum rule for tensors used more than once).
    pub(crate) fn accumulate<E: Float, D: Backend>(&mut self, id: u64, g: D::Storage<E>) {
        let sum = match self.storage::<E, D>(id) {
            Some(old) => {
                let shape = D::shape(old).to_vec();
                D::binary(Binary::Add, old, &g, &shape)
            }
            None => g,
        };
        self.map.insert(id, Box::new(sum));
    }

    /// [`Grads::accumulate`] for complex gradients.
    pub(crate) fn accumulate_complex<C: crate::dtype::ComplexElement, D: crate::backend::ComplexBackend>(
        &mut self,
        id: u64,
        g: D::Storage<C>,
    ) {
        let sum = match self.storage::<C, D>(id) {
            Some(old) => {
                let shape = D::shape(old).to_vec();
                D::cbinary(Binary::Add, old, &g, &shape)
            }
            None => g,
        };
        self.map.insert(id, Box::new(sum));
    }

    pub(crate) fn remove_raw(&mut self, id: u64) -> Option<Box<dyn Any + Send + Sync>> {
        self.map.remove(&id)
    }

    /// Puts back a gradient taken by `remove_raw` (a retained intermediate's).
    pub(crate) fn restore(&mut self, id: u64, g: Box<dyn Any + Send + Sync>) {
        self.map.insert(id, g);
    }
}

/// Runs backward from `root`, whose gradient is already in `grads`.
pub(crate) fn run_backward(root: Arc<dyn Node>, grads: &mut Grads) {
    // Iterative post-order DFS: every node comes after all nodes that consume it when reversed.
    let mut order: Vec<Arc<dyn Node>> = Vec::new();
    let mut seen: HashSet<u64> = HashSet::new();
    let mut stack: Vec<(Arc<dyn Node>, usize)> = vec![(root, 0)];
    seen.insert(stack[0].0.id());
    while let Some((node, next)) = stack.pop() {
        if let Some(child) = node.inputs().get(next).cloned() {
            stack.push((node, next + 1));
            if seen.insert(child.id()) {
                stack.push((child, 0));
            }
        } else {
            order.push(node);
        }
    }
    for node in order.iter().rev() {
        node.propagate(grads);
    }
}

/// Checks that a gradient seed has the output's shape.
pub(crate) fn check_seed(out: &[usize], seed: &[usize]) -> Result<(), Error> {
    if out == seed {
        Ok(())
    } else {
        Err(Error::ShapeMismatch {
            op: "backward",
            left: out.to_vec(),
            right: seed.to_vec(),
            rule: "the output gradient must have the output's shape",
        })
    }
}
