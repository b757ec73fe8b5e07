//! Autocast: the dtype each class of op runs in under a precision (PyTorch's `torch.autocast`
//! op lists, reduced to the ops nbit has).
//!
//! | op class | runs in | ops |
//! |---|---|---|
//! | lower precision | `P::Compute` | matmul (batched too), linear, conv1d, conv2d (bias add included), the products of scaled_dot_product_attention |
//! | fp32 | `P::Full` (inputs cast up) | softmax, log_softmax (along any axis), attention's softmax, cross_entropy, nll_loss, mse_loss, l1_loss, huber_loss, smooth_l1_loss, binary_cross_entropy_with_logits, sum, mean, exp, log, pow, layer_norm |
//! | promote | the wider input dtype ([`Promote`]) | add, sub, mul, div on different dtypes |
//! | everything else | its input dtype | relu, gelu, tanh, abs, sigmoid, dropout, reshape, transpose (call the tensor method) |
//!
//! Parameters stay in `P::Param` (f32 under the mixed precisions). [`Autocast::weight`] casts a
//! parameter to `P::Compute` once per forward pass and reuses the copy, as autocast's weight cache
//! does; build one `Autocast` per forward pass. It also says whether the pass is training
//! ([`Autocast::training`], made by the trainer for `training_step`) or evaluation
//! ([`Autocast::new`]), which is what [`Dropout`](crate::nn::Dropout) reads, as `model.train()` /
//! `model.eval()` would in PyTorch. Backward runs each op in its forward dtype and each
//! cast's backward casts the gradient back, so under `Mixed<H>` parameter gradients are f32 while
//! activation gradients are 16-bit.
//!
//! ```
//! use nbit::prelude::*;
//! use nbit::autocast::Autocast;
//! use nbit::tensor::Tensor;
//!
//! let w = Tensor::<f32>::from_vec(&[2, 3], vec![0.1, -0.2, 0.3, 0.4, 0.5, -0.6])?.requires_grad();
//! let x = Tensor::<f32>::from_vec(&[1, 3], vec![1.0, 2.0, 3.0])?;
//! let ac = Autocast::<Mixed<BF16>>::new();
//! let logits = ac.linear(&x, &w, None)?;          // Tensor<bf16>
//! let loss = ac.cross_entropy(&logits, &[1])?;    // Tensor<f32>
//! assert_eq!((logits.dtype(), loss.dtype()), (DType::BF16, DType::F32));
//! let grads = loss.backward()?;
//! assert_eq!(grads.get(&w).unwrap().dtype(), DType::F32); // master-weight gradient
//! # Ok::<(), nbit::Error>(())
//! ```

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::marker::PhantomData;

use crate::backend::Backend;
use crate::device::Cpu;
use crate::dtype::{Float, Promote};
use crate::error::Error;
use crate::precision::Precision;
use crate::tensor::Tensor;

type Compute<P, D> = Tensor<<P as Precision>::Compute, D>;
type Full<P, D> = Tensor<<P as Precision>::Full, D>;

/// The autocast policy of precision `P` for one forward pass, with its weight-cast cache.
pub struct Autocast<P: Precision, D: Backend = Cpu> {
    cache: RefCell<HashMap<u64, Box<dyn Any>>>,
    /// While training: the seed of the pass and how many dropout seeds were handed out.
    training: Option<(u64, Cell<u64>)>,
    _types: PhantomData<(P, D)>,
}

impl<P: Precision, D: Backend> Default for Autocast<P, D> {
    fn default() -> Self {
        Self::new()
    }
}

impl<P: Precision, D: Backend> core::fmt::Debug for Autocast<P, D> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Autocast")
            .field("precision", &P::NAME)
            .field("cached", &self.cached())
            .finish()
    }
}

macro_rules! fp32_unary {
    ($($(#[$doc:meta])* $name:ident => $method:ident $(($arg:ident: $ty:ty))?;)*) => {$(
        $(#[$doc])*
        pub fn $name<X: Float>(&self, x: &Tensor<X, D>$(, $arg: $ty)?) -> Full<P, D> {
            x.cast::<P::Full>().$method($($arg)?)
        }
    )*};
}

macro_rules! promoting_binary {
    ($($(#[$doc:meta])* $name:ident;)*) => {$(
        $(#[$doc])*
        pub fn $name<A: Promote<B>, B: Float>(
            &self,
            a: &Tensor<A, D>,
            b: &Tensor<B, D>,
        ) -> Result<Tensor<<A as Promote<B>>::Output, D>, Error> {
            a.cast::<<A as Promote<B>>::Output>().$name(&b.cast::<<A as Promote<B>>::Output>())
        }
    )*};
}

impl<P: Precision, D: Backend> Autocast<P, D> {
    /// A fresh policy with an empty weight cache for an evaluation pass (dropout off); make one
    /// per forward pass.
    pub fn new() -> Self {
        Autocast {
            cache: RefCell::new(HashMap::new()),
            training: None,
            _types: PhantomData,
        }
    }

    /// A policy for a training pass (dropout on), whose dropout draws follow from `seed`.
    pub fn training(seed: u64) -> Self {
        Autocast {
            training: Some((seed, Cell::new(0))),
            ..Self::new()
        }
    }

    /// Whether this is a training pass.
    pub fn is_training(&self) -> bool {
        self.training.is_some()
    }

    /// While training, a seed for the next dropout mask: different for every call in the pass,
    /// the same for the same call in a rerun. `None` when evaluating.
    pub fn next_seed(&self) -> Option<u64> {
        self.training.as_ref().map(|(seed, n)| {
            n.set(n.get() + 1);
            crate::backend::mix64(seed ^ n.get().wrapping_mul(0x9E37_79B9_7F4A_7C15))
        })
    }

    /// How many parameter casts are cached.
    pub fn cached(&self) -> usize {
        self.cache.borrow().len()
    }

    /// Parameter `w` in the compute dtype, cast at most once per `Autocast` (autocast's cache).
    pub fn weight(&self, w: &Tensor<P::Param, D>) -> Compute<P, D> {
        if let Some(hit) = self.cache.borrow().get(&w.id())
            && let Some(t) = hit.downcast_ref::<Compute<P, D>>()
        {
            return t.clone();
        }
        let cast = w.cast::<P::Compute>();
        self.cache.borrow_mut().insert(w.id(), Box::new(cast.clone()));
        cast
    }

    /// `a @ b` in the compute dtype.
    pub fn matmul<A: Float, B: Float>(
        &self,
        a: &Tensor<A, D>,
        b: &Tensor<B, D>,
    ) -> Result<Compute<P, D>, Error> {
        a.cast::<P::Compute>().matmul(&b.cast::<P::Compute>())
    }

    /// `x @ weight^T + bias` in the compute dtype, from parameters stored in `P::Param`.
    pub fn linear<X: Float>(
        &self,
        x: &Tensor<X, D>,
        weight: &Tensor<P::Param, D>,
        bias: Option<&Tensor<P::Param, D>>,
    ) -> Result<Compute<P, D>, Error> {
        let b = bias.map(|b| self.weight(b));
        x.cast::<P::Compute>().linear(&self.weight(weight), b.as_ref())
    }

    /// 2-D convolution in the compute dtype (matmul class, as in PyTorch's autocast lists), from
    /// parameters stored in `P::Param`.
    pub fn conv2d<X: Float>(
        &self,
        x: &Tensor<X, D>,
        weight: &Tensor<P::Param, D>,
        bias: Option<&Tensor<P::Param, D>>,
        options: crate::tensor::ConvOptions,
    ) -> Result<Compute<P, D>, Error> {
        let b = bias.map(|b| self.weight(b));
        x.cast::<P::Compute>()
            .conv2d(&self.weight(weight), b.as_ref(), options)
    }

    /// 1-D convolution in the compute dtype (matmul class).
    pub fn conv1d<X: Float>(
        &self,
        x: &Tensor<X, D>,
        weight: &Tensor<P::Param, D>,
        bias: Option<&Tensor<P::Param, D>>,
        stride: usize,
        padding: usize,
    ) -> Result<Compute<P, D>, Error> {
        let b = bias.map(|b| self.weight(b));
        x.cast::<P::Compute>()
            .conv1d(&self.weight(weight), b.as_ref(), stride, padding)
    }

    fp32_unary! {
        /// Softmax over the last axis, in `P::Full`.
        softmax => softmax;
        /// Log-softmax over the last axis, in `P::Full`.
        log_softmax => log_softmax;
        /// Sum of all elements, in `P::Full`.
        sum => sum;
        /// Mean of all elements, in `P::Full`.
        mean => mean;
        /// `e^x`, in `P::Full`.
        exp => exp;
        /// `ln x`, in `P::Full`.
        log => log;
        /// `x ^ p`, in `P::Full`.
        powf => powf(p: f64);
    }

    /// Softmax along `dim` (negative counts from the end), in `P::Full`.
    pub fn softmax_axis<X: Float>(&self, x: &Tensor<X, D>, dim: isize) -> Result<Full<P, D>, Error> {
        x.cast::<P::Full>().softmax_axis(dim)
    }

    /// Log-softmax along `dim`, in `P::Full`.
    pub fn log_softmax_axis<X: Float>(&self, x: &Tensor<X, D>, dim: isize) -> Result<Full<P, D>, Error> {
        x.cast::<P::Full>().log_softmax_axis(dim)
    }

    /// `torch.nn.functional.scaled_dot_product_attention`: `softmax(q k^T / sqrt(d) + mask) v`
    /// over the last two axes of `q` `[.., t, d]`, `k` `[.., s, d]` and `v` `[.., s, dv]`, the
    /// leading axes broadcast (batch, heads). As in PyTorch's math path, `q` is scaled in the
    /// compute dtype and both products run there (matmul class), while the mask is added and the
    /// softmax taken in `P::Full` (fp32 class), the probabilities rounded once to the compute
    /// dtype. (PyTorch's fused CPU kernel keeps the scores in f32 instead; measured on
    /// `nn.Transformer` in tests/transformer.rs, the two are equally far from f64.)
    /// `mask` is additive (`-inf` hides a position; see [`Tensor::causal_mask`] and
    /// [`Tensor::to_additive_mask`]) and broadcasts to `[.., t, s]`; `is_causal` adds the causal
    /// mask. Dropout on the probabilities with probability `dropout_p` in training passes only.
    pub fn scaled_dot_product_attention(
        &self,
        q: &Compute<P, D>,
        k: &Compute<P, D>,
        v: &Compute<P, D>,
        mask: Option<&Full<P, D>>,
        dropout_p: f64,
        is_causal: bool,
    ) -> Result<Compute<P, D>, Error> {
        let d = q.shape().last().copied().unwrap_or(1);
        let scores = q
            .mul_scalar(1.0 / (d.max(1) as f64).sqrt())
            .batched_matmul(k, false, true)?
            .cast::<P::Full>();
        let mut scores = match mask {
            Some(m) => scores.add(m)?,
            None => scores,
        };
        if is_causal {
            let (t, s) = (
                scores.shape()[scores.shape().len() - 2],
                k.shape()[k.shape().len() - 2],
            );
            let causal = Tensor::<P::Full, D>::causal_mask(t.max(s))
                .narrow(0, 0, t)?
                .narrow(1, 0, s)?;
            scores = scores.add(&causal)?;
        }
        let mut probs = scores.softmax_axis(-1)?.cast::<P::Compute>();
        if dropout_p > 0.0
            && let Some(seed) = self.next_seed()
        {
            probs = probs.dropout(dropout_p, seed)?;
        }
        probs.matmul(v)
    }

    /// Cross-entropy of logits against class indices, in `P::Full`.
    pub fn cross_entropy<X: Float>(
        &self,
        logits: &Tensor<X, D>,
        targets: &(impl crate::tensor::Indices<D> + ?Sized),
    ) -> Result<Full<P, D>, Error> {
        logits.cast::<P::Full>().cross_entropy(targets)
    }

    /// Mean negative log-likelihood, in `P::Full`.
    pub fn nll_loss<X: Float>(
        &self,
        logp: &Tensor<X, D>,
        targets: &(impl crate::tensor::Indices<D> + ?Sized),
    ) -> Result<Full<P, D>, Error> {
        logp.cast::<P::Full>().nll_loss(targets)
    }

    /// Mean squared error, in `P::Full`.
    pub fn mse_loss<X: Float, T: Float>(
        &self,
        x: &Tensor<X, D>,
        target: &Tensor<T, D>,
    ) -> Result<Full<P, D>, Error> {
        x.cast::<P::Full>().mse_loss(&target.cast::<P::Full>())
    }

    /// Mean absolute error, in `P::Full`.
    pub fn l1_loss<X: Float, T: Float>(
        &self,
        x: &Tensor<X, D>,
        target: &Tensor<T, D>,
    ) -> Result<Full<P, D>, Error> {
        x.cast::<P::Full>().l1_loss(&target.cast::<P::Full>())
    }

    /// Huber loss with threshold `delta`, in `P::Full`.
    pub fn huber_loss<X: Float, T: Float>(
        &self,
        x: &Tensor<X, D>,
        target: &Tensor<T, D>,
        delta: f64,
    ) -> Result<Full<P, D>, Error> {
        x.cast::<P::Full>().huber_loss(&target.cast::<P::Full>(), delta)
    }

    /// Smooth L1 loss with threshold `beta`, in `P::Full`.
    pub fn smooth_l1_loss<X: Float, T: Float>(
        &self,
        x: &Tensor<X, D>,
        target: &Tensor<T, D>,
        beta: f64,
    ) -> Result<Full<P, D>, Error> {
        x.cast::<P::Full>()
            .smooth_l1_loss(&target.cast::<P::Full>(), beta)
    }

    /// Binary cross-entropy of logits against targets in [0, 1], in `P::Full`.
    pub fn binary_cross_entropy_with_logits<X: Float, T: Float>(
        &self,
        logits: &Tensor<X, D>,
        target: &Tensor<T, D>,
    ) -> Result<Full<P, D>, Error> {
        logits
            .cast::<P::Full>()
            .binary_cross_entropy_with_logits(&target.cast::<P::Full>())
    }

    /// Layer normalisation over the last axis, in `P::Full`, with parameters in `P::Param`.
    pub fn layer_norm<X: Float>(
        &self,
        x: &Tensor<X, D>,
        weight: Option<&Tensor<P::Param, D>>,
        bias: Option<&Tensor<P::Param, D>>,
        eps: f64,
    ) -> Result<Full<P, D>, Error> {
        let w = weight.map(|w| w.cast::<P::Full>());
        let b = bias.map(|b| b.cast::<P::Full>());
        x.cast::<P::Full>().layer_norm(w.as_ref(), b.as_ref(), eps)
    }

    promoting_binary! {
        /// `a + b` in the wider of the two dtypes.
        add;
        /// `a - b` in the wider of the two dtypes.
        sub;
        /// `a * b` in the wider of the two dtypes.
        mul;
        /// `a / b` in the wider of the two dtypes.
        div;
    }
}
