//! PyTorch's layers as [`Module`]s, and [`Sequential`] to chain them into a model.
//!
//! A module's activations are in the precision's compute dtype (`P::Compute`: bf16 under
//! bf16-mixed, f32 under 32-true); its parameters stay in `P::Param`. Each layer runs its op in
//! the dtype autocast gives it (convolutions and linear layers in `P::Compute`, layer norm in
//! `P::Full`, rounded back to `P::Compute` at its output), so a `Sequential` under a mixed
//! precision computes what the same `torch.nn.Sequential` computes under `torch.autocast`, with
//! one difference: an fp32-class layer's output is rounded to the compute dtype before the next
//! layer, where PyTorch would pass it on in f32 (the next matmul-class layer rounds it the same
//! way; an element-wise layer in between sees the rounded value).
//!
//! Parameter names follow PyTorch's (`<prefix>.weight`, `<prefix>.bias`), with the prefix you
//! give, so a `Sequential` whose prefixes are its indices loads PyTorch's `state_dict`.

use super::{InitCtx, Linear, Parameter};
use crate::autocast::Autocast;
use crate::backend::Backend;
use crate::data::Batch;
use crate::device::Cpu;
use crate::error::Error;
use crate::optim::{AdamW, Optimization};
use crate::precision::Precision;
use crate::tensor::{ConvOptions, Tensor};
use crate::trainer::{LayerSummary, Model};

type Act<P, D> = Tensor<<P as Precision>::Compute, D>;

/// A layer: a forward pass on activations in the compute dtype, and its parameters (listed
/// once). Implement it for your own blocks to put them in a [`Sequential`].
pub trait Module<P: Precision, D: Backend = Cpu> {
    /// The output for input `x`.
    fn forward(&self, ac: &Autocast<P, D>, x: &Act<P, D>) -> Result<Act<P, D>, Error>;

    /// The trainable parameters, in a fixed order. Default: none.
    fn parameters_mut(&mut self) -> Vec<&mut Parameter<P::Param, D>> {
        Vec::new()
    }

    /// The layer's type in a model summary. Default: the Rust type's name without its path or
    /// type parameters (`Conv2d`); nbit's activations give PyTorch's (`ReLU`, `GELU`).
    fn kind(&self) -> &'static str {
        short_type_name(core::any::type_name::<Self>())
    }
}

/// `a::b::Name<X, Y>` as `Name`.
fn short_type_name(full: &'static str) -> &'static str {
    let plain = full.split('<').next().unwrap_or(full);
    plain.rsplit("::").next().unwrap_or(plain)
}

impl<P: Precision, D: Backend> Module<P, D> for Linear<P, D> {
    fn forward(&self, ac: &Autocast<P, D>, x: &Act<P, D>) -> Result<Act<P, D>, Error> {
        Linear::forward(self, ac, x)
    }
    fn parameters_mut(&mut self) -> Vec<&mut Parameter<P::Param, D>> {
        Linear::parameters_mut(self)
    }
}

/// `torch.nn.Conv2d` (groups 1): input `[batch, in, h, w]`, weight `[out, in, kh, kw]`, bias
/// `[out]`, both uniform in `±1/sqrt(in * kh * kw)` as PyTorch initialises them.
#[derive(Clone, Debug)]
pub struct Conv2d<P: Precision, D: Backend = Cpu> {
    /// `[out, in, kh, kw]`.
    pub weight: Parameter<P::Param, D>,
    /// `[out]`.
    pub bias: Parameter<P::Param, D>,
    /// Stride, padding and dilation.
    pub options: ConvOptions,
}

impl<P: Precision, D: Backend> Conv2d<P, D> {
    /// A layer named `prefix` from `inputs` to `outputs` channels with a `kernel` (height,
    /// width); `options` as [`ConvOptions::default`] for PyTorch's defaults.
    pub fn new(
        ctx: &mut InitCtx<P, D>,
        prefix: &str,
        inputs: usize,
        outputs: usize,
        kernel: (usize, usize),
        options: ConvOptions,
    ) -> Result<Self, Error> {
        let fan_in = inputs * kernel.0 * kernel.1;
        let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
        Ok(Conv2d {
            weight: ctx.parameter(
                format!("{prefix}.weight"),
                &[outputs, inputs, kernel.0, kernel.1],
                bound,
            )?,
            bias: ctx.parameter(format!("{prefix}.bias"), &[outputs], bound)?,
            options,
        })
    }
}

impl<P: Precision, D: Backend> Module<P, D> for Conv2d<P, D> {
    fn forward(&self, ac: &Autocast<P, D>, x: &Act<P, D>) -> Result<Act<P, D>, Error> {
        ac.conv2d(x, self.weight.value(), Some(self.bias.value()), self.options)
    }
    fn parameters_mut(&mut self) -> Vec<&mut Parameter<P::Param, D>> {
        vec![&mut self.weight, &mut self.bias]
    }
}

/// `torch.nn.Conv1d` (groups 1, dilation 1): input `[batch, in, length]`, weight `[out, in, k]`.
#[derive(Clone, Debug)]
pub struct Conv1d<P: Precision, D: Backend = Cpu> {
    /// `[out, in, k]`.
    pub weight: Parameter<P::Param, D>,
    /// `[out]`.
    pub bias: Parameter<P::Param, D>,
    /// Step between windows.
    pub stride: usize,
    /// Zeros added at each end.
    pub padding: usize,
}

impl<P: Precision, D: Backend> Conv1d<P, D> {
    /// A layer named `prefix` from `inputs` to `outputs` channels with kernel size `kernel`.
    pub fn new(
        ctx: &mut InitCtx<P, D>,
        prefix: &str,
        inputs: usize,
        outputs: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self, Error> {
        let bound = 1.0 / ((inputs * kernel).max(1) as f64).sqrt();
        Ok(Conv1d {
            weight: ctx.parameter(format!("{prefix}.weight"), &[outputs, inputs, kernel], bound)?,
            bias: ctx.parameter(format!("{prefix}.bias"), &[outputs], bound)?,
            stride,
            padding,
        })
    }
}

impl<P: Precision, D: Backend> Module<P, D> for Conv1d<P, D> {
    fn forward(&self, ac: &Autocast<P, D>, x: &Act<P, D>) -> Result<Act<P, D>, Error> {
        ac.conv1d(
            x,
            self.weight.value(),
            Some(self.bias.value()),
            self.stride,
            self.padding,
        )
    }
    fn parameters_mut(&mut self) -> Vec<&mut Parameter<P::Param, D>> {
        vec![&mut self.weight, &mut self.bias]
    }
}

/// `torch.nn.Embedding`: a table `[num, dim]` initialised from N(0, 1), looked up by index. Its
/// input is ids (an `i64` tensor, as PyTorch's `LongTensor`), not activations, so it is the first
/// layer of a model rather than a [`Module`] of a [`Sequential`]: call [`Embedding::forward`]
/// and feed the result to the next layer.
#[derive(Clone, Debug)]
pub struct Embedding<P: Precision, D: Backend = Cpu> {
    /// `[num, dim]`.
    pub weight: Parameter<P::Param, D>,
}

impl<P: Precision, D: Backend> Embedding<P, D> {
    /// A table named `prefix` (`prefix.weight`) of `num` vectors of size `dim`.
    pub fn new(ctx: &mut InitCtx<P, D>, prefix: &str, num: usize, dim: usize) -> Result<Self, Error> {
        Ok(Embedding {
            weight: Parameter::new(format!("{prefix}.weight"), ctx.normal(&[num, dim], 1.0)?),
        })
    }

    /// The vectors of `ids` (an `i64` tensor or `usize`s: see
    /// [`Indices`](crate::tensor::Indices)), shape `ids.shape() + [dim]`, in the compute dtype
    /// (the lookup runs in `P::Param`, as PyTorch's autocast leaves embedding alone, then rounds
    /// once). An id out of range is an error naming it.
    pub fn forward(
        &self,
        ac: &Autocast<P, D>,
        ids: &(impl crate::tensor::Indices<D> + ?Sized),
    ) -> Result<Act<P, D>, Error> {
        let flat = ids.indices(self.weight.value().shape()[0])?;
        let rows = ac.weight(self.weight.value()).index_select(0, &flat)?;
        let mut shape = ids.index_shape();
        shape.push(self.weight.value().shape()[1]);
        rows.reshape(&shape)
    }

    /// The table.
    pub fn parameters_mut(&mut self) -> Vec<&mut Parameter<P::Param, D>> {
        vec![&mut self.weight]
    }
}

/// `torch.nn.LayerNorm` over the last axis, with weight 1 and bias 0 to start; computed in
/// `P::Full` (fp32 class under autocast) with f64 statistics.
#[derive(Clone, Debug)]
pub struct LayerNorm<P: Precision, D: Backend = Cpu> {
    /// `[size]`.
    pub weight: Parameter<P::Param, D>,
    /// `[size]`.
    pub bias: Parameter<P::Param, D>,
    /// Added to the variance (PyTorch's default 1e-5).
    pub eps: f64,
}

impl<P: Precision, D: Backend> LayerNorm<P, D> {
    /// A layer named `prefix` normalising a last axis of `size`, `eps` 1e-5.
    pub fn new(prefix: &str, size: usize) -> Self {
        use crate::dtype::Float;
        LayerNorm {
            weight: Parameter::new(
                format!("{prefix}.weight"),
                Tensor::full(&[size], P::Param::from_f64(1.0)),
            ),
            bias: Parameter::new(format!("{prefix}.bias"), Tensor::zeros(&[size])),
            eps: 1e-5,
        }
    }
}

impl<P: Precision, D: Backend> Module<P, D> for LayerNorm<P, D> {
    fn forward(&self, ac: &Autocast<P, D>, x: &Act<P, D>) -> Result<Act<P, D>, Error> {
        let y = ac.layer_norm(x, Some(self.weight.value()), Some(self.bias.value()), self.eps)?;
        Ok(y.cast())
    }
    fn parameters_mut(&mut self) -> Vec<&mut Parameter<P::Param, D>> {
        vec![&mut self.weight, &mut self.bias]
    }
}

/// `torch.nn.Dropout(p)`: active in training passes ([`Autocast::training`]), the identity in
/// evaluation, with a fresh counter-based mask per call.
#[derive(Clone, Copy, Debug)]
pub struct Dropout {
    p: f64,
}

impl Dropout {
    /// Zeroes each element with probability `p` in `[0, 1]` (else an error).
    pub fn new(p: f64) -> Result<Self, Error> {
        if !(0.0..=1.0).contains(&p) {
            return Err(Error::InvalidArgument {
                name: "dropout p",
                value: p.to_string(),
                expected: "a probability in [0, 1]",
            });
        }
        Ok(Dropout { p })
    }
}

impl<P: Precision, D: Backend> Module<P, D> for Dropout {
    fn forward(&self, ac: &Autocast<P, D>, x: &Act<P, D>) -> Result<Act<P, D>, Error> {
        match ac.next_seed() {
            Some(seed) => x.dropout(self.p, seed),
            None => Ok(x.clone()),
        }
    }
}

macro_rules! activations {
    ($($(#[$doc:meta])* $name:ident => $method:ident, $torch:literal;)*) => {$(
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, Default)]
        pub struct $name;

        impl<P: Precision, D: Backend> Module<P, D> for $name {
            fn forward(&self, _ac: &Autocast<P, D>, x: &Act<P, D>) -> Result<Act<P, D>, Error> {
                Ok(x.$method())
            }
            fn kind(&self) -> &'static str {
                $torch
            }
        }
    )*};
}

activations! {
    /// `torch.nn.ReLU`.
    Relu => relu, "ReLU";
    /// `torch.nn.GELU()` (exact).
    Gelu => gelu, "GELU";
    /// `torch.nn.GELU(approximate='tanh')`.
    GeluTanh => gelu_tanh, "GELU";
    /// `torch.nn.Tanh`.
    Tanh => tanh, "Tanh";
    /// `torch.nn.Sigmoid`.
    Sigmoid => sigmoid, "Sigmoid";
}

/// Reshapes every row: `[batch, ...]` to `[batch, shape...]` (`torch.nn.Unflatten(1, shape)`
/// after a flat input; `Reshape::new(&[])` with [`Flatten`] reverses it).
#[derive(Clone, Debug)]
pub struct Reshape(Vec<usize>);

impl Reshape {
    /// Rows reshaped to `shape`.
    pub fn new(shape: &[usize]) -> Self {
        Reshape(shape.to_vec())
    }
}

impl<P: Precision, D: Backend> Module<P, D> for Reshape {
    fn forward(&self, _ac: &Autocast<P, D>, x: &Act<P, D>) -> Result<Act<P, D>, Error> {
        let mut shape = vec![x.shape().first().copied().unwrap_or(1)];
        shape.extend(&self.0);
        x.reshape(&shape)
    }
}

/// `torch.nn.Flatten()`: `[batch, ...]` to `[batch, rest]`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Flatten;

impl<P: Precision, D: Backend> Module<P, D> for Flatten {
    fn forward(&self, _ac: &Autocast<P, D>, x: &Act<P, D>) -> Result<Act<P, D>, Error> {
        let batch = x.shape().first().copied().unwrap_or(1);
        x.reshape(&[batch, x.numel() / batch.max(1)])
    }
}

/// `torch.nn.Sequential`: modules applied in order. It is also a [`Model`]: its input is the
/// batch's features and its loss the default (cross-entropy against class labels, MSE against
/// values), optimised by AdamW unless [`Sequential::optimizer`] says otherwise.
///
/// ```
/// use nbit::prelude::*;
/// use nbit::data::{DataLoader, Dataset};
/// use nbit::nn::{Linear, Relu, Sequential};
/// use nbit::optim::{AdamW, Optimization};
///
/// let x = nbit::ndarray::Array2::from_shape_fn((64, 2), |(i, j)| ((i * 7 + j * 3) % 11) as f64 / 11.0 - 0.5);
/// let y: Vec<usize> = x.rows().into_iter().map(|r| usize::from(r[0] * r[1] > 0.0)).collect();
/// let data = DataLoader::new(Dataset::classification(x, y)?, 16)?;
/// let trainer = Trainer::<Mixed<BF16>, Cpu>::builder().max_epochs(60).enable_progress_bar(false).build()?;
/// let mut model = trainer.init_module(|ctx| {
///     Ok(Sequential::new()
///         .push(Linear::new(ctx, "0", 2, 16)?)
///         .push(Relu)
///         .push(Linear::new(ctx, "2", 16, 2)?)
///         .optimizer(Optimization::new(AdamW::new(0.02))))
/// })?;
/// trainer.fit(&mut model, &data, None)?;
/// assert!(trainer.validate(&mut model, &data)?.accuracy() > 0.95);
/// # Ok::<(), nbit::Error>(())
/// ```
pub struct Sequential<P: Precision, D: Backend = Cpu> {
    modules: Vec<Box<dyn Module<P, D>>>,
    optimization: Optimization,
}

impl<P: Precision, D: Backend> Default for Sequential<P, D> {
    fn default() -> Self {
        Self::new()
    }
}

impl<P: Precision, D: Backend> core::fmt::Debug for Sequential<P, D> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Sequential")
            .field("modules", &self.modules.len())
            .field("optimization", &self.optimization)
            .finish()
    }
}

impl<P: Precision, D: Backend> Sequential<P, D> {
    /// No modules yet; optimised by AdamW with PyTorch's defaults.
    pub fn new() -> Self {
        Sequential {
            modules: Vec::new(),
            optimization: Optimization::new(AdamW::default()),
        }
    }

    /// Appends `module`.
    pub fn push(mut self, module: impl Module<P, D> + 'static) -> Self {
        self.modules.push(Box::new(module));
        self
    }

    /// The optimizer (and scheduler) training uses.
    pub fn optimizer(mut self, optimization: Optimization) -> Self {
        self.optimization = optimization;
        self
    }

    /// How many modules.
    pub fn len(&self) -> usize {
        self.modules.len()
    }

    /// Whether there are no modules.
    pub fn is_empty(&self) -> bool {
        self.modules.is_empty()
    }
}

impl<P: Precision, D: Backend> Module<P, D> for Sequential<P, D> {
    fn forward(&self, ac: &Autocast<P, D>, x: &Act<P, D>) -> Result<Act<P, D>, Error> {
        let mut h = x.clone();
        for m in &self.modules {
            h = m.forward(ac, &h)?;
        }
        Ok(h)
    }
    fn parameters_mut(&mut self) -> Vec<&mut Parameter<P::Param, D>> {
        self.modules.iter_mut().flat_map(|m| m.parameters_mut()).collect()
    }
}

impl<P: Precision, D: Backend> Model<P, D> for Sequential<P, D> {
    fn layers(&mut self) -> Vec<LayerSummary> {
        self.modules
            .iter_mut()
            .enumerate()
            .map(|(i, m)| {
                let params = m.parameters_mut().iter().map(|p| p.numel()).sum();
                LayerSummary::new(i.to_string(), m.kind(), params)
            })
            .collect()
    }
    fn forward(&mut self, ac: &Autocast<P, D>, batch: &Batch) -> Result<Tensor<P::Full, D>, Error> {
        // The input as Lightning hands it over (`P::Param`), then rounded once to the activations'
        // dtype, as autocast rounds an f32 input at the first matmul-class layer.
        let x = batch.input::<P, D>().cast::<P::Compute>();
        Ok(Module::forward(self, ac, &x)?.cast())
    }
    fn configure_optimizers(&self) -> Optimization {
        self.optimization
    }
    fn parameters_mut(&mut self) -> Vec<&mut Parameter<P::Param, D>> {
        Module::parameters_mut(self)
    }
}
