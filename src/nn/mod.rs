//! Layers and parameters. Parameters are created by an [`InitCtx`] directly in the precision's
//! storage dtype (`P::Param`) on the device: a `True<F16>` model never holds f32 weights.
//!
//! Layers ([`Linear`], [`Conv1d`], [`Conv2d`], [`Embedding`], [`LayerNorm`], [`Dropout`], the
//! activations) are [`Module`]s that chain in a [`Sequential`], which is itself a model the
//! trainer fits.
//!
//! Names follow `torch.nn.Sequential` of `Linear` and `ReLU` layers (`0.weight` `[out, in]`,
//! `0.bias`, `2.weight`, ...), so weights move between PyTorch and nbit through safetensors.

use core::marker::PhantomData;

mod layers;
mod transformer;

pub use crate::tensor::Parameter;
pub use layers::{
    Conv1d, Conv2d, Dropout, Embedding, Flatten, Gelu, GeluTanh, LayerNorm, Module, Relu, Reshape,
    Sequential, Sigmoid, Tanh,
};
pub use transformer::{
    Activation, LayerOptions, LayerStack, Masks, MultiheadAttention, PositionalEncoding, StackedLayer,
    Transformer, TransformerDecoder, TransformerDecoderLayer, TransformerEncoder, TransformerEncoderLayer,
    TransformerOptions,
};

use crate::autocast::Autocast;
use crate::backend::{Backend, uniform};
use crate::device::Cpu;
use crate::dtype::{ComplexElement, Element, Float};
use crate::error::Error;
use crate::precision::Precision;
use crate::tensor::Tensor;

/// Creates parameters for precision `P` on device `D`, from a seeded generator.
/// Given to [`Trainer::init_module`](crate::Trainer::init_module) and `configure_model`.
#[derive(Debug)]
pub struct InitCtx<P: Precision, D: Backend = Cpu> {
    seed: u64,
    counter: u64,
    _types: PhantomData<(P, D)>,
}

impl<P: Precision, D: Backend> InitCtx<P, D> {
    /// A context whose draws follow from `seed`.
    pub fn new(seed: u64) -> Self {
        InitCtx {
            seed,
            counter: 0,
            _types: PhantomData,
        }
    }

    fn draw(&mut self) -> f64 {
        self.counter += 1;
        uniform(self.seed, self.counter)
    }

    /// A tensor of `P::Param` with elements uniform in `[-bound, bound)`, each drawn in f64 and
    /// rounded once into the storage dtype. A shape too large for memory is
    /// [`Error::OutOfMemory`], before anything is allocated.
    pub fn uniform(&mut self, shape: &[usize], bound: f64) -> Result<Tensor<P::Param, D>, Error> {
        let mut v = reserve::<P::Param>(shape)?;
        v.extend((0..v.capacity()).map(|_| P::Param::from_f64((2.0 * self.draw() - 1.0) * bound)));
        Tensor::from_vec(shape, v)
    }

    /// A tensor of `P::Param` with elements drawn from N(0, std²) (Box-Muller in f64, rounded
    /// once), as `torch.nn.init.normal_`.
    pub fn normal(&mut self, shape: &[usize], std: f64) -> Result<Tensor<P::Param, D>, Error> {
        let mut v = reserve::<P::Param>(shape)?;
        v.extend((0..v.capacity()).map(|_| {
            let (u1, u2) = (1.0 - self.draw(), self.draw());
            let z = (-2.0 * u1.ln()).sqrt() * (2.0 * core::f64::consts::PI * u2).cos();
            P::Param::from_f64(z * std)
        }));
        Tensor::from_vec(shape, v)
    }

    /// A named parameter, uniform in `[-bound, bound)` (see [`InitCtx::uniform`]).
    pub fn parameter(
        &mut self,
        name: impl Into<String>,
        shape: &[usize],
        bound: f64,
    ) -> Result<Parameter<P::Param, D>, Error> {
        Ok(Parameter::new(name, self.uniform(shape, bound)?))
    }

    /// A complex tensor in the precision's complex dtype (complex128 under `True<F64>`), real and
    /// imaginary parts uniform in `[-bound, bound)`. Does not compile under bf16-true, which has no
    /// complex dtype.
    pub fn complex_uniform(&mut self, shape: &[usize], bound: f64) -> Result<Tensor<P::Complex, D>, Error>
    where
        P::Complex: ComplexElement,
    {
        let mut v = reserve::<P::Complex>(shape)?;
        v.extend((0..v.capacity()).map(|_| {
            let re = (2.0 * self.draw() - 1.0) * bound;
            let im = (2.0 * self.draw() - 1.0) * bound;
            P::Complex::from_parts(re, im)
        }));
        Tensor::from_vec(shape, v)
    }
}

/// An empty vector with room for exactly the elements of `shape`, or [`Error::OutOfMemory`] when
/// their count overflows, exceeds the memory available, or the allocator refuses it.
fn reserve<E: Element>(shape: &[usize]) -> Result<Vec<E>, Error> {
    let what = || format!("a tensor of shape {shape:?} and dtype {}", E::DTYPE);
    let n = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    let bytes = n.and_then(|n| (n as u64).checked_mul(E::DTYPE.size_bytes() as u64));
    check_memory(what, bytes)?;
    let mut v = Vec::new();
    v.try_reserve_exact(n.unwrap_or(usize::MAX))
        .map_err(|_| Error::OutOfMemory {
            what: what(),
            needed: bytes,
            available: crate::device::available_memory(),
        })?;
    Ok(v)
}

/// `torch.nn.Linear`: `y = x W^T + b`, `W` `[out, in]`, both initialised uniform in
/// `±1/sqrt(in)` (PyTorch's default, kaiming-uniform with a = sqrt(5)).
#[derive(Clone, Debug)]
pub struct Linear<P: Precision, D: Backend = Cpu> {
    /// `[out, in]`.
    pub weight: Parameter<P::Param, D>,
    /// `[out]`.
    pub bias: Parameter<P::Param, D>,
}

impl<P: Precision, D: Backend> Linear<P, D> {
    /// A layer named `prefix` (`prefix.weight`, `prefix.bias`); sizes too large for memory are
    /// [`Error::OutOfMemory`].
    pub fn new(ctx: &mut InitCtx<P, D>, prefix: &str, inputs: usize, outputs: usize) -> Result<Self, Error> {
        let bound = 1.0 / (inputs.max(1) as f64).sqrt();
        Ok(Linear {
            weight: ctx.parameter(format!("{prefix}.weight"), &[outputs, inputs], bound)?,
            bias: ctx.parameter(format!("{prefix}.bias"), &[outputs], bound)?,
        })
    }

    /// The weight and the bias, in that order.
    pub fn parameters(&self) -> Vec<&Parameter<P::Param, D>> {
        vec![&self.weight, &self.bias]
    }

    /// The weight and the bias, mutably, in the same order.
    pub fn parameters_mut(&mut self) -> Vec<&mut Parameter<P::Param, D>> {
        vec![&mut self.weight, &mut self.bias]
    }

    /// `x W^T + b` in the compute dtype.
    pub fn forward<X: Float>(
        &self,
        ac: &Autocast<P, D>,
        x: &Tensor<X, D>,
    ) -> Result<Tensor<P::Compute, D>, Error> {
        ac.linear(x, self.weight.value(), Some(self.bias.value()))
    }
}

pub use crate::data::Task;

/// A multilayer perceptron: `torch.nn.Sequential(Linear, ReLU, Linear, ..., Linear)`.
#[derive(Clone, Debug)]
pub struct Mlp<P: Precision, D: Backend = Cpu> {
    layers: Vec<Linear<P, D>>,
    task: Task,
}

impl<P: Precision, D: Backend> Mlp<P, D> {
    /// An MLP with layer widths `sizes` (`[inputs, hidden..., outputs]`) for `task`.
    ///
    /// # Panics
    /// If `sizes` has fewer than two entries; [`Mlp::try_new`] returns that as an error.
    pub fn new(ctx: &mut InitCtx<P, D>, sizes: &[usize], task: Task) -> Self {
        Self::try_new(ctx, sizes, task).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`Mlp::new`], with bad sizes as an error, and sizes whose parameters and gradients
    /// would not fit in the memory available as [`Error::OutOfMemory`] (checked before anything
    /// is allocated).
    pub fn try_new(ctx: &mut InitCtx<P, D>, sizes: &[usize], task: Task) -> Result<Self, Error> {
        if sizes.len() < 2 || sizes.contains(&0) {
            return Err(Error::InvalidArgument {
                name: "layer sizes",
                value: format!("{sizes:?}"),
                expected: "at least [inputs, outputs], every size at least 1",
            });
        }
        let bytes =
            mlp_parameter_count(sizes).and_then(|n| n.checked_mul(2 * P::Param::DTYPE.size_bytes() as u64));
        check_memory(
            || format!("an MLP {} under {}", sizes_text(sizes), P::NAME),
            bytes,
        )?;
        let layers = sizes
            .windows(2)
            .enumerate()
            .map(|(i, w)| Linear::new(ctx, &(2 * i).to_string(), w[0], w[1]))
            .collect::<Result<_, _>>()?;
        Ok(Mlp { layers, task })
    }

    /// The task this network is trained for.
    pub fn task(&self) -> Task {
        self.task
    }

    /// The layer widths, `[inputs, hidden..., outputs]`.
    pub fn sizes(&self) -> Vec<usize> {
        let mut s = vec![self.layers[0].weight.value().shape()[1]];
        s.extend(self.layers.iter().map(|l| l.weight.value().shape()[0]));
        s
    }

    /// The outputs (logits or predictions) in the compute dtype.
    pub fn forward<X: Float>(
        &self,
        ac: &Autocast<P, D>,
        x: &Tensor<X, D>,
    ) -> Result<Tensor<P::Compute, D>, Error> {
        let mut h = self.layers[0].forward(ac, x)?;
        for layer in &self.layers[1..] {
            h = layer.forward(ac, &h.relu())?;
        }
        Ok(h)
    }

    /// The parameters in PyTorch's `state_dict` order.
    pub fn parameters(&self) -> Vec<&Parameter<P::Param, D>> {
        self.layers.iter().flat_map(|l| [&l.weight, &l.bias]).collect()
    }

    /// The parameters, mutably, in the same order.
    pub fn parameters_mut(&mut self) -> Vec<&mut Parameter<P::Param, D>> {
        self.layers
            .iter_mut()
            .flat_map(|l| [&mut l.weight, &mut l.bias])
            .collect()
    }

    /// The summary's rows, as PyTorch's `Sequential(Linear, ReLU, ..., Linear)` names them.
    pub fn layers(&self) -> Vec<crate::trainer::LayerSummary> {
        let mut rows = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            let params = l.weight.numel() + l.bias.numel();
            rows.push(crate::trainer::LayerSummary::new(
                (2 * i).to_string(),
                "Linear",
                params,
            ));
            if i + 1 < self.layers.len() {
                rows.push(crate::trainer::LayerSummary::new(
                    (2 * i + 1).to_string(),
                    "ReLU",
                    0,
                ));
            }
        }
        rows
    }
}

/// The index of the first largest value (as `torch.argmax`); 0 for an empty row.
///
/// ```
/// assert_eq!(nbit::nn::argmax([0.5, 2.0, 2.0, -1.0]), 1);
/// ```
pub fn argmax(values: impl IntoIterator<Item = f64>) -> usize {
    let mut best: Option<(usize, f64)> = None;
    for (i, v) in values.into_iter().enumerate() {
        // Replace only on a strictly larger value, so ties and NaN keep the first index.
        if best.is_none_or(|(_, b)| v > b) {
            best = Some((i, v));
        }
    }
    best.map_or(0, |(i, _)| i)
}

/// The parameters of an MLP with layer widths `sizes` (weights and biases), or `None` when the
/// count overflows 64 bits.
pub fn mlp_parameter_count(sizes: &[usize]) -> Option<u64> {
    sizes.windows(2).try_fold(0u64, |n, w| {
        let (i, o) = (w[0] as u64, w[1] as u64);
        n.checked_add(i.checked_mul(o)?.checked_add(o)?)
    })
}

/// Bytes a training run of an MLP with widths `sizes` under `P` needs, estimated before anything
/// is allocated: parameters, their gradient and its accumulation buffer, the compute-dtype weight
/// copies and their gradients under mixed precision, `optimization`'s state, and the activations
/// of a batch of `batch_size` rows (kept for backward, in a few copies). `None` on overflow.
pub fn mlp_training_bytes<P: Precision>(
    sizes: &[usize],
    optimization: &crate::optim::Optimization,
    batch_size: usize,
) -> Option<u64> {
    let n = mlp_parameter_count(sizes)?;
    let (param, compute) = (
        P::Param::DTYPE.size_bytes() as u64,
        P::Compute::DTYPE.size_bytes() as u64,
    );
    let copies = if P::Param::DTYPE == P::Compute::DTYPE {
        0
    } else {
        2 * compute
    };
    let state = optimization.state_bytes_per_parameter::<P::Param>() as u64;
    let per_parameter = 3 * param + copies + state;
    let widths = sizes.iter().try_fold(0u64, |a, &w| a.checked_add(w as u64))?;
    // Each layer's input and output in the compute and full dtypes, and their gradients.
    let activations = (batch_size as u64).checked_mul(widths)?.checked_mul(4 * 8)?;
    n.checked_mul(per_parameter)?.checked_add(activations)
}

/// `Ok` when `needed` bytes fit in the memory available now ([`crate::device::available_memory`];
/// always when the system does not say), otherwise [`Error::OutOfMemory`] naming `what`. `None`
/// (a size that overflows 64 bits) never fits.
pub fn check_memory(what: impl FnOnce() -> String, needed: Option<u64>) -> Result<(), Error> {
    let available = crate::device::available_memory();
    match (needed, available) {
        (Some(n), Some(a)) if n <= a => Ok(()),
        (Some(_), None) => Ok(()),
        (needed, available) => Err(Error::OutOfMemory {
            what: what(),
            needed,
            available,
        }),
    }
}

/// [`check_memory`] for training an MLP of widths `sizes` under `P` with `optimization` on batches of
/// `batch_size` rows (0 when not known yet): [`Error::OutOfMemory`] says what was sized.
pub fn check_mlp_fits<P: Precision>(
    sizes: &[usize],
    optimization: &crate::optim::Optimization,
    batch_size: usize,
) -> Result<(), Error> {
    check_memory(
        || {
            let batch = match batch_size {
                0 => String::new(),
                b => format!(" and batch size {b}"),
            };
            format!(
                "training an MLP {} under {} with {}{batch}",
                sizes_text(sizes),
                P::NAME,
                optimization.optimizer.name()
            )
        },
        mlp_training_bytes::<P>(sizes, optimization, batch_size),
    )
}

/// `64-128-10`.
pub(crate) fn sizes_text(sizes: &[usize]) -> String {
    sizes.iter().map(usize::to_string).collect::<Vec<_>>().join("-")
}

/// Bytes the parameters occupy in storage.
pub fn parameter_bytes<E: Float, D: Backend>(params: &[&Parameter<E, D>]) -> usize {
    params.iter().map(|p| p.numel() * E::DTYPE.size_bytes()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DType, F16, F64, True};

    #[test]
    fn parameters_are_born_in_the_storage_dtype() {
        let mut ctx = InitCtx::<True<F16>>::new(0);
        let mlp = Mlp::new(&mut ctx, &[4, 8, 3], Task::Classification);
        let names: Vec<&str> = mlp.parameters().iter().map(|p| p.name()).collect();
        assert_eq!(names, ["0.weight", "0.bias", "2.weight", "2.bias"]);
        assert!(mlp.parameters().iter().all(|p| p.value().dtype() == DType::F16));
        assert_eq!(mlp.parameters()[2].value().shape(), [3, 8]);
        let bound = 1.0 / 2.0; // 1/sqrt(4)
        assert!(
            mlp.parameters()[0]
                .value()
                .to_vec()
                .iter()
                .all(|v| v.to_f32().abs() <= bound)
        );
        assert_eq!(mlp.sizes(), [4, 8, 3]);
    }

    #[test]
    fn complex_parameters_follow_the_precision() {
        let z = InitCtx::<True<F64>>::new(1)
            .complex_uniform(&[2, 2], 1.0)
            .unwrap();
        assert_eq!(z.dtype(), DType::C128);
        let z = InitCtx::<crate::Mixed<crate::BF16>>::new(1)
            .complex_uniform(&[2], 1.0)
            .unwrap();
        assert_eq!(<num_complex::Complex<f32> as Element>::DTYPE, z.dtype());
    }

    #[test]
    fn bad_sizes_are_errors() {
        let mut ctx = InitCtx::<True<F64>>::new(0);
        assert!(Mlp::try_new(&mut ctx, &[4], Task::Regression).is_err());
        assert!(Mlp::try_new(&mut ctx, &[4, 0, 2], Task::Regression).is_err());
    }

    #[test]
    fn sizes_that_cannot_fit_are_refused_before_allocating() {
        // 64-100000-100000-10 has 1.0e10 parameters: 80 GB of f32 values and gradients, more
        // than any machine this runs on has available; allocating it aborts the process.
        let mut ctx = InitCtx::<True<crate::F32>>::new(0);
        let err = Mlp::try_new(&mut ctx, &[64, 100_000, 100_000, 10], Task::Classification).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(
                err,
                Error::OutOfMemory {
                    needed: Some(80_060_800_080),
                    ..
                }
            ),
            "{msg}"
        );
        assert!(
            msg.contains("64-100000-100000-10 under 32-true needs about 80.1 GB"),
            "{msg}"
        );
        // A count that overflows 64 bits.
        let msg = Mlp::try_new(&mut ctx, &[usize::MAX, usize::MAX], Task::Regression)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("more than 2^64 bytes"), "{msg}");
        assert_eq!(
            mlp_parameter_count(&[64, 128, 10]),
            Some(64 * 128 + 128 + 128 * 10 + 10)
        );
        // The building blocks refuse too: a layer, and a tensor whose count overflows.
        let mut ctx = InitCtx::<True<crate::F32>>::new(0);
        let msg = Linear::new(&mut ctx, "0", 1 << 20, 1 << 20)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("shape [1048576, 1048576] and dtype float32 needs about 4.4 TB"),
            "{msg}"
        );
        let msg = ctx.uniform(&[usize::MAX, 2], 1.0).unwrap_err().to_string();
        assert!(msg.contains("more than 2^64 bytes"), "{msg}");
    }
}
