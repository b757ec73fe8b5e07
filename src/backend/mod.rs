//! The backend seam: every numeric kernel nbit runs, as one trait a device implements.
//!
//! Autograd and `nn` call only this trait, never ndarray, so the CUDA backend implements the same
//! methods over device buffers and nothing above it changes. Element-wise operations are data
//! ([`Unary`], [`Binary`]) rather than closures so a GPU backend can compile one kernel per variant.
//!
//! Numerics every backend must keep (DESIGN.md section 1):
//! - element-wise kernels widen to [`Float::Acc`] (f32 for 16-bit types), compute, and round once;
//! - reductions (sums, means, softmax denominators, losses, norms) accumulate in f64;
//! - GEMMs on 16-bit operands accumulate in f32 (never in the 16-bit type).
//!
//! The CPU backend (`cpu/`): `cpu/mod.rs` implements the trait over ndarray arrays, `cpu/gemm.rs`
//! is the blocked GEMM and its micro-kernels, `cpu/parallel.rs` the thread count and the one way
//! work is split across threads.

mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

#[cfg(not(feature = "cuda"))]
use crate::device::Gpu;
use crate::device::{Cpu, Device, Tpu};
use crate::dtype::{ComplexElement, Element, Float};
use crate::error::Error;

pub use cpu::{
    THREADS_ENV, kernel_name, num_threads, retain_freed_memory, set_num_threads, threads_from_env,
};

/// Work that needs a device's kernels; see [`WithBackend::with_backend`].
pub trait BackendJob<D> {
    /// What the job returns.
    type Output;
    /// Runs the job (only called for devices that have a backend).
    fn run(self) -> Self::Output
    where
        D: Backend;
}

/// Every device: runs a [`BackendJob`] with its kernels where nbit has them, or says why not. Lets
/// code generic over any `D: Supports<P>` (such as a [`Job`](crate::Job) from
/// [`dispatch`](crate::dispatch)) reach `Trainer::fit`, which needs a [`Backend`];
/// [`launch`](crate::launch) is built on it.
pub trait WithBackend: Device {
    /// Runs `job` with this device's kernels, or returns why this device cannot run it (no
    /// backend yet, no hardware).
    fn with_backend<J: BackendJob<Self>>(job: J) -> Result<J::Output, Error>;
}

impl WithBackend for Cpu {
    fn with_backend<J: BackendJob<Self>>(job: J) -> Result<J::Output, Error> {
        Ok(job.run())
    }
}

/// For devices without a backend: the probe's reason, else that the backend is missing.
fn no_backend<D: Device, T>(device: &'static str) -> Result<T, Error> {
    D::probe()?;
    Err(Error::DeviceUnavailable {
        device,
        reason: "nbit has no backend for it yet".into(),
    })
}

#[cfg(not(feature = "cuda"))]
impl WithBackend for Gpu {
    fn with_backend<J: BackendJob<Self>>(_job: J) -> Result<J::Output, Error> {
        no_backend::<Self, _>("gpu")
    }
}

impl WithBackend for Tpu {
    fn with_backend<J: BackendJob<Self>>(_job: J) -> Result<J::Output, Error> {
        no_backend::<Self, _>("tpu")
    }
}

/// A one-input element-wise operation.
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub enum Unary {
    /// `-x`
    Neg,
    /// `x + c`
    AddScalar(f64),
    /// `x * c`
    MulScalar(f64),
    /// `x ^ c`
    Powf(f64),
    /// `max(x, 0)`
    Relu,
    /// `x * Φ(x)` with the exact normal CDF (PyTorch's `approximate='none'`).
    Gelu,
    /// The tanh approximation of GELU (PyTorch's `approximate='tanh'`).
    GeluTanh,
    /// `tanh(x)`
    Tanh,
    /// `1 / (1 + e^-x)`
    Sigmoid,
    /// `e^x`
    Exp,
    /// `ln x`
    Log,
    /// `|x|` (gradient `sign(x)`, 0 at 0, as PyTorch)
    Abs,
    /// Huber's function with threshold `delta`: `x²/2` for `|x| <= delta`, else
    /// `delta (|x| - delta/2)` (PyTorch's `huber_loss` before the reduction)
    Huber(f64),
    /// `sqrt(x)`
    Sqrt,
    /// `min(max(x, lo), hi)`; the gradient passes where `lo <= x <= hi` (as PyTorch's `clamp`),
    /// NaN stays NaN
    Clamp(f64, f64),
}

/// A comparison, element-wise with broadcasting; the result is 1 where it holds and 0 elsewhere
/// (NaN compares false except under `Ne`, as IEEE says).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Compare {
    /// `a == b`
    Eq,
    /// `a != b`
    Ne,
    /// `a < b`
    Lt,
    /// `a <= b`
    Le,
    /// `a > b`
    Gt,
    /// `a >= b`
    Ge,
}

/// The shape of one 2-D convolution (PyTorch's `conv2d` arguments), for the unfold kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2dGeometry {
    /// Batch size.
    pub batch: usize,
    /// Input channels.
    pub channels: usize,
    /// Input height and width.
    pub input: (usize, usize),
    /// Kernel height and width.
    pub kernel: (usize, usize),
    /// Stride along height and width.
    pub stride: (usize, usize),
    /// Zero padding on each side along height and width.
    pub padding: (usize, usize),
    /// Dilation along height and width.
    pub dilation: (usize, usize),
}

impl Conv2dGeometry {
    /// Output height and width: `(in + 2 pad - dilation (k - 1) - 1) / stride + 1`, or `None`
    /// when the kernel does not fit the padded input or a stride or kernel size is 0.
    pub fn output(&self) -> Option<(usize, usize)> {
        let dim = |i: usize, k: usize, s: usize, p: usize, d: usize| {
            let span = d.checked_mul(k.checked_sub(1)?)?.checked_add(1)?;
            if s == 0 || k == 0 || d == 0 {
                return None;
            }
            Some((i + 2 * p).checked_sub(span)? / s + 1)
        };
        Some((
            dim(
                self.input.0,
                self.kernel.0,
                self.stride.0,
                self.padding.0,
                self.dilation.0,
            )?,
            dim(
                self.input.1,
                self.kernel.1,
                self.stride.1,
                self.padding.1,
                self.dilation.1,
            )?,
        ))
    }
}

/// A two-input element-wise operation with NumPy broadcasting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Binary {
    /// `a + b`
    Add,
    /// `a - b`
    Sub,
    /// `a * b`
    Mul,
    /// `a / b`
    Div,
}

/// The kernels of one device. Shapes are checked by the caller (the tensor layer), so kernels may
/// assume them valid.
pub trait Backend: Device {
    /// A tensor's data on this device.
    type Storage<E: Element>: Clone + core::fmt::Debug + Send + Sync + 'static;

    /// Copies a host array to the device.
    fn from_array<E: Element>(a: ndarray::ArrayD<E>) -> Self::Storage<E>;
    /// Copies device data to a host array.
    fn to_array<E: Element>(s: &Self::Storage<E>) -> ndarray::ArrayD<E>;
    /// The shape of the data.
    fn shape<E: Element>(s: &Self::Storage<E>) -> &[usize];
    /// A tensor of the given shape filled with `value`.
    fn full<E: Element>(shape: &[usize], value: E) -> Self::Storage<E>;
    /// The same elements in row-major order under a new shape with the same element count.
    fn reshape<E: Element>(s: &Self::Storage<E>, shape: &[usize]) -> Self::Storage<E>;
    /// Swaps the last two axes (materialised).
    fn transpose<E: Element>(s: &Self::Storage<E>) -> Self::Storage<E>;
    /// Converts every element, rounding to nearest even.
    fn cast<A: Float, B: Float>(s: &Self::Storage<A>) -> Self::Storage<B>;

    /// `op(x)` element-wise.
    fn unary<E: Float>(op: Unary, x: &Self::Storage<E>) -> Self::Storage<E>;
    /// `dy * op'(x)`, given the forward input `x` and output `y`.
    fn unary_backward<E: Float>(
        op: Unary,
        x: &Self::Storage<E>,
        y: &Self::Storage<E>,
        dy: &Self::Storage<E>,
    ) -> Self::Storage<E>;
    /// `op(a, b)` element-wise with broadcasting to `out_shape`.
    fn binary<E: Float>(
        op: Binary,
        a: &Self::Storage<E>,
        b: &Self::Storage<E>,
        out_shape: &[usize],
    ) -> Self::Storage<E>;
    /// Sums a broadcast gradient back down to `shape` (the reverse of broadcasting).
    fn sum_to_shape<E: Float>(s: &Self::Storage<E>, shape: &[usize]) -> Self::Storage<E>;
    /// Repeats `s` along broadcast axes to `shape`.
    fn broadcast_to<E: Element>(s: &Self::Storage<E>, shape: &[usize]) -> Self::Storage<E>;
    /// `scale * sum`, over all elements (`axis: None`, shape `[]`) or one axis (kept as size 1
    /// when `keepdim`), accumulated in f64 and rounded once.
    fn sum<E: Float>(
        s: &Self::Storage<E>,
        axis: Option<usize>,
        keepdim: bool,
        scale: f64,
    ) -> Self::Storage<E>;

    /// `a @ b (+ bias)` for 2-D operands, optionally transposing either first; `bias` (`[n]`) is
    /// added to every row before the single rounding, as PyTorch's `addmm` does in `linear`.
    /// 16-bit operands accumulate in f32.
    fn matmul<E: Float>(
        a: &Self::Storage<E>,
        b: &Self::Storage<E>,
        ta: bool,
        tb: bool,
        bias: Option<&Self::Storage<E>>,
    ) -> Self::Storage<E>;

    /// Softmax (or log-softmax when `log`) over the last axis; max-subtracted, f64 denominators.
    fn softmax<E: Float>(x: &Self::Storage<E>, log: bool) -> Self::Storage<E>;
    /// The input gradient of [`Backend::softmax`] from its output `y` and output gradient `dy`.
    fn softmax_backward<E: Float>(y: &Self::Storage<E>, dy: &Self::Storage<E>, log: bool)
    -> Self::Storage<E>;
    /// Mean negative log-likelihood of `targets` (one class index per row) under log-probabilities
    /// `logp` of shape `[n, classes]`; a shape-`[]` result. Targets are in range (checked above).
    fn nll_loss<E: Float>(logp: &Self::Storage<E>, targets: &[usize]) -> Self::Storage<E>;
    /// The gradient of [`Backend::nll_loss`] with respect to `logp`, given the scalar `dy`.
    fn nll_loss_backward<E: Float>(
        shape: &[usize],
        targets: &[usize],
        dy: &Self::Storage<E>,
    ) -> Self::Storage<E>;

    /// Layer normalisation over the last axis: `(x - mean) / sqrt(var + eps)` (biased variance),
    /// then `* weight + bias` when given. Returns `y` and the statistics, `[rows, 2]` in f64: each
    /// row's mean and `rstd` (kept on the device, for the backward pass).
    fn layer_norm<E: Float>(
        x: &Self::Storage<E>,
        weight: Option<&Self::Storage<E>>,
        bias: Option<&Self::Storage<E>>,
        eps: f64,
    ) -> (Self::Storage<E>, Self::Storage<f64>);
    /// Gradients of [`Backend::layer_norm`]: `(dx, dweight, dbias)` (the latter when `weight` /
    /// bias were given).
    #[allow(clippy::type_complexity)]
    fn layer_norm_backward<E: Float>(
        x: &Self::Storage<E>,
        weight: Option<&Self::Storage<E>>,
        stats: &Self::Storage<f64>,
        dy: &Self::Storage<E>,
        with_bias: bool,
    ) -> (
        Self::Storage<E>,
        Option<Self::Storage<E>>,
        Option<Self::Storage<E>>,
    );

    /// The slices of `s` at `index` along `axis`, in that order (`torch.index_select`); the
    /// result has `index.len()` at `axis`. Indices are in range (checked above).
    fn index_select<E: Element>(s: &Self::Storage<E>, axis: usize, index: &[usize]) -> Self::Storage<E>;
    /// Zeros of `shape` with slice `i` of `src` along `axis` added at `index[i]` (the gradient of
    /// [`Backend::index_select`], `torch.index_add`), accumulated in f64 and rounded once.
    fn index_add<E: Float>(
        shape: &[usize],
        axis: usize,
        index: &[usize],
        src: &Self::Storage<E>,
    ) -> Self::Storage<E>;
    /// `out[.., j, ..] = s[.., index[.., j, ..], ..]` along `axis` (`torch.gather`); `index` is
    /// row-major with shape `index_shape`, which equals `s`'s shape except at `axis`.
    fn gather<E: Element>(
        s: &Self::Storage<E>,
        axis: usize,
        index: &[usize],
        index_shape: &[usize],
    ) -> Self::Storage<E>;
    /// Zeros of `shape` with `src[.., j, ..]` added at `[.., index[.., j, ..], ..]` (the gradient
    /// of [`Backend::gather`], `torch.scatter_add`), accumulated in f64 and rounded once.
    fn scatter_add<E: Float>(
        shape: &[usize],
        axis: usize,
        index: &[usize],
        src: &Self::Storage<E>,
    ) -> Self::Storage<E>;
    /// The parts joined along `axis` (same shapes elsewhere; at least one part).
    fn concat<E: Element>(parts: &[&Self::Storage<E>], axis: usize) -> Self::Storage<E>;
    /// Where the largest (or, when `!largest`, smallest) element along `axis` is, for every
    /// position of the other axes in row-major order: the first on ties, and NaN counts as the
    /// extreme (as `torch.max(x, dim)`). Returned to the host.
    fn arg_extreme<E: Float>(s: &Self::Storage<E>, axis: usize, largest: bool) -> Vec<usize>;
    /// `cond != 0 ? a : b` element-wise with broadcasting to `out_shape` (`torch.where`).
    fn select<E: Float>(
        cond: &Self::Storage<E>,
        a: &Self::Storage<E>,
        b: &Self::Storage<E>,
        out_shape: &[usize],
    ) -> Self::Storage<E>;
    /// 1 where `op(a, b)` holds, else 0, with broadcasting to `out_shape`.
    fn compare<E: Float>(
        op: Compare,
        a: &Self::Storage<E>,
        b: &Self::Storage<E>,
        out_shape: &[usize],
    ) -> Self::Storage<E>;
    /// The patches of a `[batch, channels, h, w]` input as rows: `[batch * oh * ow, channels *
    /// kh * kw]`, columns in `(channel, ky, kx)` order so that a convolution is one product with
    /// the weight `[out, channels * kh * kw]` (im2col); padding reads as 0.
    fn unfold2d<E: Float>(x: &Self::Storage<E>, geometry: &Conv2dGeometry) -> Self::Storage<E>;
    /// The adjoint of [`Backend::unfold2d`] (col2im): every column value added back to the
    /// input position it came from, accumulated in f64 and rounded once; `[batch, channels, h, w]`.
    fn fold2d<E: Float>(cols: &Self::Storage<E>, geometry: &Conv2dGeometry) -> Self::Storage<E>;

    /// A dropout mask: each element `1 / (1 - p)` with probability `1 - p`, else 0, drawn from a
    /// counter-based generator seeded by `seed` (the same on every backend).
    fn dropout_mask<E: Float>(shape: &[usize], p: f64, seed: u64) -> Self::Storage<E>;

    /// Whether any element is inf or NaN (the gradient scaler's check).
    fn any_non_finite<E: Float>(s: &Self::Storage<E>) -> bool;

    /// Multiplies every element by `factor` (as f32, like PyTorch's inverse scale) in place and
    /// reports whether any element was inf or NaN before the multiply: the gradient scaler's fused
    /// unscale-and-check, one pass.
    fn unscale_check<E: Float>(s: &mut Self::Storage<E>, factor: f32) -> bool;
    /// [`Backend::unscale_check`] over every gradient of one dtype, reporting whether any had an
    /// inf or NaN: one fused launch and one host synchronisation on a GPU.
    fn unscale_check_all<E: Float>(grads: &mut [&mut Self::Storage<E>], factor: f32) -> bool {
        grads
            .iter_mut()
            .fold(false, |found, g| Self::unscale_check(g, factor) | found)
    }
    /// Multiplies every element by `factor` in place (gradient-norm clipping).
    fn scale_in_place<E: Float>(s: &mut Self::Storage<E>, factor: f64);
    /// Clamps every element to `[-limit, limit]` in place (gradient-value clipping).
    fn clamp_in_place<E: Float>(s: &mut Self::Storage<E>, limit: f64);
    /// The sum of squares, accumulated in f64 (gradient norms of 16-bit tensors computed wide).
    fn sum_squares<E: Float>(s: &Self::Storage<E>) -> f64;
    /// `a += b` in place, same shapes (gradient accumulation).
    fn add_in_place<E: Float>(a: &mut Self::Storage<E>, b: &Self::Storage<E>);

    /// One SGD update of `param` from `grad`, with the momentum buffer when momentum is used.
    /// Computed in `E::Acc` (f32 for 16-bit parameters); the new weight is rounded into storage
    /// as `hp.rounding` says, with `compensation` (same shape as `param`) under
    /// [`UpdateRounding::Compensated`].
    fn sgd_step<E: Float>(
        param: &mut Self::Storage<E>,
        grad: &Self::Storage<E>,
        momentum_buffer: Option<&mut Self::Storage<E>>,
        compensation: Option<&mut Self::Storage<E>>,
        hp: &SgdStep,
    );
    /// One AdamW update of `param` and its moment estimates, computed in `E::Acc`; the second
    /// moment is stored in `E::Moment`; the new weight is rounded as in [`Backend::sgd_step`].
    fn adamw_step<E: Float>(
        param: &mut Self::Storage<E>,
        grad: &Self::Storage<E>,
        exp_avg: &mut Self::Storage<E>,
        exp_avg_sq: &mut Self::Storage<E::Moment>,
        compensation: Option<&mut Self::Storage<E>>,
        hp: &AdamWStep,
    );

    /// Runs `f`, returning a failure of this device inside it (a GPU out of memory, a failed
    /// launch) as an `Err` rather than a panic. The kernels' signatures cannot return one, so a
    /// device that can fail unwinds to here; the trainer's entry points (`fit`, `validate`,
    /// `predict`) run under it. The CPU cannot fail this way: `f()`.
    fn catch_device_failures<T>(f: impl FnOnce() -> Result<T, Error>) -> Result<T, Error> {
        f()
    }
}

/// A one-input element-wise operation on complex values.
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub enum ComplexUnary {
    /// `-z`
    Neg,
    /// `conj(z)`
    Conj,
    /// `e^z`
    Exp,
    /// `z * c` for a real `c`
    MulScalar(f64),
    /// `z / |z|` (0 at 0): the direction of `z`, for the gradient of `abs`.
    Sign,
}

/// Complex kernels: a second family beside the real ones, computed in complex128 and rounded once
/// per part. PyTorch's conventions: gradients are conjugate Wirtinger derivatives.
pub trait ComplexBackend: Backend {
    /// `op(a) @ op(b)` for 2-D operands, where `op` transposes when `t*` and conjugates when `c*`
    /// (so `ta && ca` is the conjugate transpose).
    fn cmatmul<C: ComplexElement>(
        a: &Self::Storage<C>,
        b: &Self::Storage<C>,
        ta: bool,
        ca: bool,
        tb: bool,
        cb: bool,
    ) -> Self::Storage<C>;
    /// `op(a, b)` element-wise with broadcasting to `out_shape`.
    fn cbinary<C: ComplexElement>(
        op: Binary,
        a: &Self::Storage<C>,
        b: &Self::Storage<C>,
        out_shape: &[usize],
    ) -> Self::Storage<C>;
    /// `op(z)` element-wise.
    fn cunary<C: ComplexElement>(op: ComplexUnary, z: &Self::Storage<C>) -> Self::Storage<C>;
    /// Sums a broadcast gradient back down to `shape`.
    fn csum_to_shape<C: ComplexElement>(s: &Self::Storage<C>, shape: &[usize]) -> Self::Storage<C>;
    /// The real and imaginary parts.
    fn complex_parts<C: ComplexElement>(
        z: &Self::Storage<C>,
    ) -> (Self::Storage<C::Real>, Self::Storage<C::Real>);
    /// A complex tensor from its parts (same shapes).
    fn complex_from_parts<C: ComplexElement>(
        re: &Self::Storage<C::Real>,
        im: &Self::Storage<C::Real>,
    ) -> Self::Storage<C>;
    /// `|z|`, computed without overflow (hypot).
    fn cabs<C: ComplexElement>(z: &Self::Storage<C>) -> Self::Storage<C::Real>;
}

/// How an optimizer rounds each updated weight into a 16-bit parameter. A bf16 weight near 1.0
/// cannot move by less than 2^-8, so with `Nearest` an update below half of that is lost, and small
/// learning rates stall pure 16-bit training; the other two keep those updates.
///
/// f32 and f64 parameters (32-true, 64-true and the mixed precisions' master weights) always round
/// to nearest: [`OptimizerState::new`](crate::optim::OptimizerState::new) refuses the others there.
///
/// ```
/// use nbit::optim::UpdateRounding;
/// assert_eq!("compensated".parse::<UpdateRounding>()?, UpdateRounding::Compensated);
/// assert_eq!(UpdateRounding::default(), UpdateRounding::Nearest);
/// # Ok::<(), nbit::Error>(())
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum UpdateRounding {
    /// Round to nearest even, as PyTorch does (the default).
    #[default]
    Nearest,
    /// Kahan summation: a compensation buffer per parameter, in the parameter's dtype, carries
    /// the part of each update that rounding dropped into the next (as `optimi`'s `kahan_sum`).
    /// Costs one more 16-bit value per parameter.
    Compensated,
    /// Round up or down with probability by distance, so the expected weight is the exact one;
    /// the draws come from a counter-based generator keyed by the trainer's seed, the parameter
    /// and the step, so a run (and a resumed run) repeats exactly. No extra memory.
    Stochastic,
}

impl UpdateRounding {
    /// Every option, in the order the command line lists them.
    pub const ALL: [UpdateRounding; 3] = [
        UpdateRounding::Nearest,
        UpdateRounding::Compensated,
        UpdateRounding::Stochastic,
    ];

    /// `"nearest"`, `"compensated"` or `"stochastic"`.
    pub const fn name(self) -> &'static str {
        match self {
            UpdateRounding::Nearest => "nearest",
            UpdateRounding::Compensated => "compensated",
            UpdateRounding::Stochastic => "stochastic",
        }
    }
}

impl core::str::FromStr for UpdateRounding {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Self::ALL
            .into_iter()
            .find(|r| r.name() == s)
            .ok_or_else(|| Error::InvalidArgument {
                name: "update_rounding",
                value: format!("'{s}'"),
                expected: "'nearest', 'compensated' or 'stochastic'",
            })
    }
}

impl core::fmt::Display for UpdateRounding {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

/// The scalars of one SGD update (PyTorch's `torch.optim.SGD`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SgdStep {
    /// Learning rate.
    pub lr: f64,
    /// Momentum factor (0 disables the buffer).
    pub momentum: f64,
    /// Dampening of the momentum.
    pub dampening: f64,
    /// Nesterov momentum.
    pub nesterov: bool,
    /// L2 penalty added to the gradient.
    pub weight_decay: f64,
    /// True on the first update, when the buffer is initialised to the gradient.
    pub first: bool,
    /// How the new weight is rounded into storage.
    pub rounding: UpdateRounding,
    /// The key of this update's stochastic-rounding draws (element `i` draws
    /// `uniform(noise_key, i)`).
    pub noise_key: u64,
}

/// The scalars of one AdamW update (PyTorch's `torch.optim.AdamW`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWStep {
    /// Learning rate.
    pub lr: f64,
    /// Decay of the first moment.
    pub beta1: f64,
    /// Decay of the second moment.
    pub beta2: f64,
    /// Added to the denominator.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// The 1-based step count (bias correction).
    pub step: u64,
    /// How the new weight is rounded into storage.
    pub rounding: UpdateRounding,
    /// The key of this update's stochastic-rounding draws.
    pub noise_key: u64,
}

/// The f64 scalars of one AdamW update, derived from [`AdamWStep`] as PyTorch derives them in
/// Python floats; every backend converts each to its compute type once.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct AdamWScalars {
    /// `1 - lr * weight_decay`
    pub decay: f64,
    /// `1 - beta1`
    pub one_minus_b1: f64,
    /// `beta2`
    pub beta2: f64,
    /// `1 - beta2`
    pub one_minus_b2: f64,
    /// `lr / (1 - beta1^step)`
    pub step_size: f64,
    /// `sqrt(1 - beta2^step)`
    pub bias2_sqrt: f64,
    /// `eps`
    pub eps: f64,
}

impl AdamWStep {
    pub(crate) fn scalars(&self) -> AdamWScalars {
        // Python's `beta ** step` (C pow on a float step), not repeated multiplication.
        let t = self.step as f64;
        AdamWScalars {
            decay: 1.0 - self.lr * self.weight_decay,
            one_minus_b1: 1.0 - self.beta1,
            beta2: self.beta2,
            one_minus_b2: 1.0 - self.beta2,
            step_size: self.lr / (1.0 - self.beta1.powf(t)),
            bias2_sqrt: (1.0 - self.beta2.powf(t)).sqrt(),
            eps: self.eps,
        }
    }
}

/// `(rows, cols)`: the last axis is the columns, the rest the rows (a 0-D tensor is one row of
/// one; an empty last axis has no rows).
pub(crate) fn rows_of(shape: &[usize]) -> (usize, usize) {
    let cols = shape.last().copied().unwrap_or(1);
    let rows = shape.iter().product::<usize>().checked_div(cols).unwrap_or(0);
    (rows, cols)
}

/// `(outer, n, inner)`: the sizes before, at and after `axis`.
pub(crate) fn split(shape: &[usize], axis: usize) -> (usize, usize, usize) {
    let outer = shape[..axis].iter().product();
    let inner = shape[axis + 1..].iter().product();
    (outer, shape[axis], inner)
}

/// The shape two shapes broadcast to (NumPy rules), or an error naming both.
pub(crate) fn broadcast_shapes(op: &'static str, a: &[usize], b: &[usize]) -> Result<Vec<usize>, Error> {
    let n = a.len().max(b.len());
    let mut out = vec![0; n];
    for i in 0..n {
        let da = if i + a.len() >= n { a[i + a.len() - n] } else { 1 };
        let db = if i + b.len() >= n { b[i + b.len() - n] } else { 1 };
        out[i] = match (da, db) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => {
                return Err(Error::ShapeMismatch {
                    op,
                    left: a.to_vec(),
                    right: b.to_vec(),
                    rule: "shapes must be equal or 1 in every trailing dimension (broadcasting)",
                });
            }
        };
    }
    Ok(out)
}

/// SplitMix64 of `seed + index`: a counter-based uniform draw in [0, 1), identical on every
/// backend (a GPU thread computes its element's draw from its index alone).
#[inline]
pub(crate) fn uniform(seed: u64, index: u64) -> f64 {
    (random_bits(seed, index) >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// The 64 random bits of draw `index` of stream `seed` (SplitMix64: `seed + (index + 1) * golden`,
/// finalised by [`mix64`]).
#[inline]
pub(crate) fn random_bits(seed: u64, index: u64) -> u64 {
    mix64(seed.wrapping_add(index.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15)))
}

/// SplitMix64's finaliser: 64 well-mixed bits from any 64 bits.
#[inline]
pub(crate) fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
