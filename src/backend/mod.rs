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

mod check;
mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

#[cfg(not(feature = "cuda"))]
use crate::device::Gpu;
use crate::device::{Cpu, Device, Tpu};
use crate::dtype::{ComplexElement, Element, Float};
use crate::error::Error;
use crate::matrix::{RunJob, Supports};
use crate::precision::Precision;

pub use cpu::{
    GEMM_KERNEL_ENV, THREADS_ENV, gemm_kernel_from_env, kernel_name, num_threads, retain_freed_memory,
    set_num_threads, threads_from_env,
};

/// Every device: runs a [`RunJob`] with its kernels where this build has them, or says why not.
/// Lets code generic over any `D: Supports<P>` (such as a [`Job`](crate::Job) from
/// [`dispatch`](crate::dispatch)) reach `Trainer::fit`, which needs [`Runs<P>`](crate::Runs);
/// [`launch()`](crate::launch()) is built on it.
pub trait WithBackend: Device {
    /// Runs `job` under `P` with this device's kernels, or returns why this device cannot run it
    /// (no backend in this build, no hardware).
    fn with_backend<P: Precision, J: RunJob>(job: J) -> Result<J::Output, Error>
    where
        Self: Supports<P>;
}

impl WithBackend for Cpu {
    fn with_backend<P: Precision, J: RunJob>(job: J) -> Result<J::Output, Error>
    where
        Self: Supports<P>,
    {
        job.run::<P, Self>()
    }
}

/// For devices without a backend: the probe's reason, else that the backend is missing.
fn no_backend<D: Device, T>(device: &'static str, reason: &str) -> Result<T, Error> {
    D::probe()?;
    Err(Error::DeviceUnavailable {
        device,
        reason: reason.into(),
    })
}

#[cfg(not(feature = "cuda"))]
impl WithBackend for Gpu {
    fn with_backend<P: Precision, J: RunJob>(_job: J) -> Result<J::Output, Error>
    where
        Self: Supports<P>,
    {
        no_backend::<Self, _>("gpu", "nbit has no backend for it in this build")
    }
}

impl WithBackend for Tpu {
    fn with_backend<P: Precision, J: RunJob>(_job: J) -> Result<J::Output, Error>
    where
        Self: Supports<P>,
    {
        no_backend::<Self, _>("tpu", "nbit has no backend for it yet")
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

/// Panics naming the op, the device and why its arguments are wrong, when `check` failed.
#[inline]
#[track_caller]
fn require<D: Device>(op: &'static str, check: check::Check) {
    #[cold]
    #[track_caller]
    fn broken(op: &str, device: &str, why: String) -> ! {
        panic!("nbit::backend::Backend::{op} on {device}: {why}")
    }
    if let Err(why) = check {
        broken(op, D::KIND.name(), why)
    }
}

/// The kernels of one device.
///
/// Every method is safe to call: where a kernel assumes something of its arguments (operands of
/// agreeing shapes, indices in range, buffers as long as the parameter), the safe method checks it
/// on the host and panics with a message naming the op, the device and the shapes, before any
/// memory is touched; then it calls the backend's `unsafe` `*_unchecked` kernel. The checks live
/// once, here, for every backend. [`Tensor`](crate::tensor::Tensor)'s methods check the same
/// things first and return an [`Error`] instead, so code that goes through tensors never sees
/// these panics; they are for code that calls the seam directly, as slice indexing panics.
///
/// A backend implements the `*_unchecked` kernels (the checks are provided) and the methods
/// without preconditions.
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
    fn reshape<E: Element>(s: &Self::Storage<E>, shape: &[usize]) -> Self::Storage<E> {
        require::<Self>("reshape", check::reshape(Self::shape(s), shape));
        // SAFETY: the arguments passed the checks of `reshape_unchecked`'s contract.
        unsafe { Self::reshape_unchecked(s, shape) }
    }
    /// [`Backend::reshape`] without its checks: the kernel each backend implements.
    ///
    /// # Safety
    /// The arguments must pass the checks that [`Backend::reshape`] makes; the kernel may read
    /// or write out of bounds otherwise.
    unsafe fn reshape_unchecked<E: Element>(s: &Self::Storage<E>, shape: &[usize]) -> Self::Storage<E>;
    /// Swaps the last two axes (materialised): [`Backend::permute`] with those two exchanged.
    fn transpose<E: Element>(s: &Self::Storage<E>) -> Self::Storage<E> {
        let shape = Self::shape(s);
        require::<Self>("transpose", check::matrix_axes(shape));
        let n = shape.len();
        let mut axes: Vec<usize> = (0..n).collect();
        axes.swap(n - 2, n - 1);
        // SAFETY: `axes` is a permutation of the axes of `s` (it has at least two).
        unsafe { Self::permute_unchecked(s, &axes) }
    }
    /// The axes reordered (materialised, row-major): axis `i` of the result is axis `axes[i]` of
    /// `s`, as `torch.permute`.
    fn permute<E: Element>(s: &Self::Storage<E>, axes: &[usize]) -> Self::Storage<E> {
        require::<Self>("permute", check::permutation(Self::shape(s), axes));
        // SAFETY: the arguments passed the checks of `permute_unchecked`'s contract.
        unsafe { Self::permute_unchecked(s, axes) }
    }
    /// [`Backend::permute`] without its checks: the kernel each backend implements.
    ///
    /// # Safety
    /// The arguments must pass the checks that [`Backend::permute`] makes; the kernel may read
    /// or write out of bounds otherwise.
    unsafe fn permute_unchecked<E: Element>(s: &Self::Storage<E>, axes: &[usize]) -> Self::Storage<E>;
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
    ) -> Self::Storage<E> {
        require::<Self>(
            "unary_backward",
            check::same("x", Self::shape(x), "y", Self::shape(y)).and(check::same(
                "x",
                Self::shape(x),
                "dy",
                Self::shape(dy),
            )),
        );
        // SAFETY: the arguments passed the checks of `unary_backward_unchecked`'s contract.
        unsafe { Self::unary_backward_unchecked(op, x, y, dy) }
    }
    /// [`Backend::unary_backward`] without its checks: the kernel each backend implements.
    ///
    /// # Safety
    /// The arguments must pass the checks that [`Backend::unary_backward`] makes; the kernel may read
    /// or write out of bounds otherwise.
    unsafe fn unary_backward_unchecked<E: Float>(
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
    ) -> Self::Storage<E> {
        require::<Self>(
            "binary",
            check::operands(Self::shape(a), Self::shape(b), out_shape),
        );
        // SAFETY: the arguments passed the checks of `binary_unchecked`'s contract.
        unsafe { Self::binary_unchecked(op, a, b, out_shape) }
    }
    /// [`Backend::binary`] without its checks: the kernel each backend implements.
    ///
    /// # Safety
    /// The arguments must pass the checks that [`Backend::binary`] makes; the kernel may read
    /// or write out of bounds otherwise.
    unsafe fn binary_unchecked<E: Float>(
        op: Binary,
        a: &Self::Storage<E>,
        b: &Self::Storage<E>,
        out_shape: &[usize],
    ) -> Self::Storage<E>;
    /// Sums a broadcast gradient back down to `shape` (the reverse of broadcasting).
    fn sum_to_shape<E: Float>(s: &Self::Storage<E>, shape: &[usize]) -> Self::Storage<E> {
        require::<Self>(
            "sum_to_shape",
            check::broadcasts("the target shape", shape, Self::shape(s)),
        );
        // SAFETY: the arguments passed the checks of `sum_to_shape_unchecked`'s contract.
        unsafe { Self::sum_to_shape_unchecked(s, shape) }
    }
    /// [`Backend::sum_to_shape`] without its checks: the kernel each backend implements.
    ///
    /// # Safety
    /// The arguments must pass the checks that [`Backend::sum_to_shape`] makes; the kernel may read
    /// or write out of bounds otherwise.
    unsafe fn sum_to_shape_unchecked<E: Float>(s: &Self::Storage<E>, shape: &[usize]) -> Self::Storage<E>;
    /// Repeats `s` along broadcast axes to `shape`.
    fn broadcast_to<E: Element>(s: &Self::Storage<E>, shape: &[usize]) -> Self::Storage<E> {
        require::<Self>(
            "broadcast_to",
            check::broadcasts("the tensor", Self::shape(s), shape),
        );
        // SAFETY: the arguments passed the checks of `broadcast_to_unchecked`'s contract.
        unsafe { Self::broadcast_to_unchecked(s, shape) }
    }
    /// [`Backend::broadcast_to`] without its checks: the kernel each backend implements.
    ///
    /// # Safety
    /// The arguments must pass the checks that [`Backend::broadcast_to`] makes; the kernel may read
    /// or write out of bounds otherwise.
    unsafe fn broadcast_to_unchecked<E: Element>(s: &Self::Storage<E>, shape: &[usize]) -> Self::Storage<E>;
    /// `scale * sum`, over all elements (`axis: None`, shape `[]`) or one axis (kept as size 1
    /// when `keepdim`), accumulated in f64 and rounded once.
    fn sum<E: Float>(
        s: &Self::Storage<E>,
        axis: Option<usize>,
        keepdim: bool,
        scale: f64,
    ) -> Self::Storage<E> {
        require::<Self>(
            "sum",
            axis.map_or(Ok(()), |axis| check::axis(Self::shape(s), axis)),
        );
        // SAFETY: the arguments passed the checks of `sum_unchecked`'s contract.
        unsafe { Self::sum_unchecked(s, axis, keepdim, scale) }
    }
    /// [`Backend::sum`] without its checks: the kernel each backend implements.
    ///
    /// # Safety
    /// The arguments must pass the checks that [`Backend::sum`] makes; the kernel may read
    /// or write out of bounds otherwise.
    unsafe fn sum_unchecked<E: Float>(
        s: &Self::Storage<E>,
        axis: Option<usize>,
        keepdim: bool,
        scale: f64,
    ) -> Self::Storage<E>;

    /// `op(a) @ op(b) (+ bias)`, optionally transposing either operand first; `bias` (`[n]`) is
    /// added to every row before the single rounding, as PyTorch's `addmm` does in `linear`.
    /// 16-bit operands accumulate in f32. Each operand (two axes or more) is read as a matrix
    /// whose columns are its last axis and whose rows are all its other axes merged, with nothing
    /// copied: a `[b, t, k]` activation is a `[b t, k]` matrix. The result keeps `a`'s leading
    /// axes (`[.., n]`) when `a` is not transposed, and is `[m, n]` when it is (a weight's
    /// gradient, `dy^T x`, sums over every row).
    fn matmul<E: Float>(
        a: &Self::Storage<E>,
        b: &Self::Storage<E>,
        ta: bool,
        tb: bool,
        bias: Option<&Self::Storage<E>>,
    ) -> Self::Storage<E> {
        require::<Self>(
            "matmul",
            check::matmul(
                Self::shape(a),
                Self::shape(b),
                ta,
                tb,
                bias.map(|v| Self::shape(v)),
            ),
        );
        // SAFETY: the arguments passed the checks of `matmul_unchecked`'s contract.
        unsafe { Self::matmul_unchecked(a, b, ta, tb, bias) }
    }
    /// [`Backend::matmul`] without its checks: the kernel each backend implements.
    ///
    /// # Safety
    /// The arguments must pass the checks that [`Backend::matmul`] makes; the kernel may read
    /// or write out of bounds otherwise.
    unsafe fn matmul_unchecked<E: Float>(
        a: &Self::Storage<E>,
        b: &Self::Storage<E>,
        ta: bool,
        tb: bool,
        bias: Option<&Self::Storage<E>>,
    ) -> Self::Storage<E>;

    /// A batch of products, as PyTorch's `bmm`: `a` `[.., m, k]` and `b` `[.., k, n]` with the
    /// same leading axes (one or more; the transpositions apply to the last two axes) give
    /// `[.., m, n]`, one product per matrix, accumulating as [`Backend::matmul`] does.
    fn bmm<E: Float>(a: &Self::Storage<E>, b: &Self::Storage<E>, ta: bool, tb: bool) -> Self::Storage<E> {
        require::<Self>("bmm", check::bmm(Self::shape(a), Self::shape(b), ta, tb));
        // SAFETY: the arguments passed the checks of `bmm_unchecked`'s contract.
        unsafe { Self::bmm_unchecked(a, b, ta, tb) }
    }
    /// [`Backend::bmm`] without its checks: the kernel each backend implements.
    ///
    /// # Safety
    /// The arguments must pass the checks that [`Backend::bmm`] makes; the kernel may read or
    /// write out of bounds otherwise.
    unsafe fn bmm_unchecked<E: Float>(
        a: &Self::Storage<E>,
        b: &Self::Storage<E>,
        ta: bool,
        tb: bool,
    ) -> Self::Storage<E>;

    /// Softmax (or log-softmax when `log`) over the last axis; max-subtracted, f64 denominators.
    fn softmax<E: Float>(x: &Self::Storage<E>, log: bool) -> Self::Storage<E>;
    /// The input gradient of [`Backend::softmax`] from its output `y` and output gradient `dy`.
    fn softmax_backward<E: Float>(
        y: &Self::Storage<E>,
        dy: &Self::Storage<E>,
        log: bool,
    ) -> Self::Storage<E> {
        require::<Self>(
            "softmax_backward",
            check::same("y", Self::shape(y), "dy", Self::shape(dy)),
        );
        // SAFETY: the arguments passed the checks of `softmax_backward_unchecked`'s contract.
        unsafe { Self::softmax_backward_unchecked(y, dy, log) }
    }
    /// [`Backend::softmax_backward`] without its checks: the kernel each backend implements.
    ///
    /// # Safety
    /// The arguments must pass the checks that [`Backend::softmax_backward`] makes; the kernel may read
    /// or write out of bounds otherwise.
    unsafe fn softmax_backward_unchecked<E: Float>(
        y: &Self::Storage<E>,
        dy: &Self::Storage<E>,
        log: bool,
    ) -> Self::Storage<E>;
    /// Mean negative log-likelihood of `targets` (one class index per row) under log-probabilities
    /// `logp` of shape `[n, classes]`; a shape-`[]` result. Targets are checked to be in range.
    fn nll_loss<E: Float>(logp: &Self::Storage<E>, targets: &[usize]) -> Self::Storage<E> {
        require::<Self>("nll_loss", check::nll(Self::shape(logp), targets));
        // SAFETY: the arguments passed the checks of `nll_loss_unchecked`'s contract.
        unsafe { Self::nll_loss_unchecked(logp, targets) }
    }
    /// [`Backend::nll_loss`] without its checks: the kernel each backend implements.
    ///
    /// # Safety
    /// The arguments must pass the checks that [`Backend::nll_loss`] makes; the kernel may read
    /// or write out of bounds otherwise.
    unsafe fn nll_loss_unchecked<E: Float>(logp: &Self::Storage<E>, targets: &[usize]) -> Self::Storage<E>;
    /// The gradient of [`Backend::nll_loss`] with respect to `logp`, given the scalar `dy`.
    fn nll_loss_backward<E: Float>(
        shape: &[usize],
        targets: &[usize],
        dy: &Self::Storage<E>,
    ) -> Self::Storage<E> {
        require::<Self>(
            "nll_loss_backward",
            check::nll(shape, targets).and(check::scalar("dy", Self::shape(dy))),
        );
        // SAFETY: the arguments passed the checks of `nll_loss_backward_unchecked`'s contract.
        unsafe { Self::nll_loss_backward_unchecked(shape, targets, dy) }
    }
    /// [`Backend::nll_loss_backward`] without its checks: the kernel each backend implements.
    ///
    /// # Safety
    /// The arguments must pass the checks that [`Backend::nll_loss_backward`] makes; the kernel may read
    /// or write out of bounds otherwise.
    unsafe fn nll_loss_backward_unchecked<E: Float>(
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
    ) -> (Self::Storage<E>, Self::Storage<f64>) {
        require::<Self>(
            "layer_norm",
            check::layer_norm(
                Self::shape(x),
                weight.map(|w| Self::shape(w)),
                bias.map(|b| Self::shape(b)),
            ),
        );
        // SAFETY: the arguments passed the checks of `layer_norm_unchecked`'s contract.
        unsafe { Self::layer_norm_unchecked(x, weight, bias, eps) }
    }
    /// [`Backend::layer_norm`] without its checks: the kernel each backend implements.
    ///
    /// # Safety
    /// The arguments must pass the checks that [`Backend::layer_norm`] makes; the kernel may read
    /// or write out of bounds otherwise.
    unsafe fn layer_norm_unchecked<E: Float>(
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
    ) {
        require::<Self>(
            "layer_norm_backward",
            check::layer_norm_backward(
                Self::shape(x),
                weight.map(|w| Self::shape(w)),
                Self::shape(stats),
                Self::shape(dy),
            ),
        );
        // SAFETY: the arguments passed the checks of `layer_norm_backward_unchecked`'s contract.
        unsafe { Self::layer_norm_backward_unchecked(x, weight, stats, dy, with_bias) }
    }
    /// [`Backend::layer_norm_backward`] without its checks: the kernel each backend implements.
    ///
    /// # Safety
    /// The arguments must pass the checks that [`Backend::layer_norm_backward`] makes; the kernel may read
    /// or write out of bounds otherwise.
    #[allow(clippy::type_complexity)]
    unsafe fn layer_norm_backward_unchecked<E: Float>(
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
    /// result has `index.len()` at `axis`. Indices are checked to be in range.
    fn index_select<E: Element>(s: &Self::Storage<E>, axis: usize, index: &[usize]) -> Self::Storage<E> {
        require::<Self>(
            "index_select",
            check::axis(Self::shape(s), axis)
                .and_then(|()| check::indices(index, Self::shape(s)[axis], axis)),
        );
        // SAFETY: the arguments passed the checks of `index_select_unchecked`'s contract.
        unsafe { Self::index_select_unchecked(s, axis, index) }
    }
    /// [`Backend::index_select`] without its checks: the kernel each backend implements.
    ///
    /// # Safety
    /// The arguments must pass the checks that [`Backend::index_select`] makes; the kernel may read
    /// or write out of bounds otherwise.
    unsafe fn index_select_unchecked<E: Element>(
        s: &Self::Storage<E>,
        axis: usize,
        index: &[usize],
    ) -> Self::Storage<E>;
    /// Zeros of `shape` with slice `i` of `src` along `axis` added at `index[i]` (the gradient of
    /// [`Backend::index_select`], `torch.index_add`), accumulated in f64 and rounded once.
    fn index_add<E: Float>(
        shape: &[usize],
        axis: usize,
        index: &[usize],
        src: &Self::Storage<E>,
    ) -> Self::Storage<E> {
        require::<Self>(
            "index_add",
            check::index_add(shape, axis, index, Self::shape(src)),
        );
        // SAFETY: the arguments passed the checks of `index_add_unchecked`'s contract.
        unsafe { Self::index_add_unchecked(shape, axis, index, src) }
    }
    /// [`Backend::index_add`] without its checks: the kernel each backend implements.
    ///
    /// # Safety
    /// The arguments must pass the checks that [`Backend::index_add`] makes; the kernel may read
    /// or write out of bounds otherwise.
    unsafe fn index_add_unchecked<E: Float>(
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
    ) -> Self::Storage<E> {
        require::<Self>("gather", check::gather(Self::shape(s), axis, index, index_shape));
        // SAFETY: the arguments passed the checks of `gather_unchecked`'s contract.
        unsafe { Self::gather_unchecked(s, axis, index, index_shape) }
    }
    /// [`Backend::gather`] without its checks: the kernel each backend implements.
    ///
    /// # Safety
    /// The arguments must pass the checks that [`Backend::gather`] makes; the kernel may read
    /// or write out of bounds otherwise.
    unsafe fn gather_unchecked<E: Element>(
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
    ) -> Self::Storage<E> {
        require::<Self>("scatter_add", check::gather(shape, axis, index, Self::shape(src)));
        // SAFETY: the arguments passed the checks of `scatter_add_unchecked`'s contract.
        unsafe { Self::scatter_add_unchecked(shape, axis, index, src) }
    }
    /// [`Backend::scatter_add`] without its checks: the kernel each backend implements.
    ///
    /// # Safety
    /// The arguments must pass the checks that [`Backend::scatter_add`] makes; the kernel may read
    /// or write out of bounds otherwise.
    unsafe fn scatter_add_unchecked<E: Float>(
        shape: &[usize],
        axis: usize,
        index: &[usize],
        src: &Self::Storage<E>,
    ) -> Self::Storage<E>;
    /// The parts joined along `axis` (same shapes elsewhere; at least one part).
    fn concat<E: Element>(parts: &[&Self::Storage<E>], axis: usize) -> Self::Storage<E> {
        require::<Self>(
            "concat",
            check::concat(&parts.iter().map(|p| Self::shape(*p)).collect::<Vec<_>>(), axis),
        );
        // SAFETY: the arguments passed the checks of `concat_unchecked`'s contract.
        unsafe { Self::concat_unchecked(parts, axis) }
    }
    /// [`Backend::concat`] without its checks: the kernel each backend implements.
    ///
    /// # Safety
    /// The arguments must pass the checks that [`Backend::concat`] makes; the kernel may read
    /// or write out of bounds otherwise.
    unsafe fn concat_unchecked<E: Element>(parts: &[&Self::Storage<E>], axis: usize) -> Self::Storage<E>;
    /// Where the largest (or, when `!largest`, smallest) element along `axis` is, for every
    /// position of the other axes in row-major order: the first on ties, and NaN counts as the
    /// extreme (as `torch.max(x, dim)`). Returned to the host.
    fn arg_extreme<E: Float>(s: &Self::Storage<E>, axis: usize, largest: bool) -> Vec<usize> {
        require::<Self>("arg_extreme", check::axis(Self::shape(s), axis));
        // SAFETY: the arguments passed the checks of `arg_extreme_unchecked`'s contract.
        unsafe { Self::arg_extreme_unchecked(s, axis, largest) }
    }
    /// [`Backend::arg_extreme`] without its checks: the kernel each backend implements.
    ///
    /// # Safety
    /// The arguments must pass the checks that [`Backend::arg_extreme`] makes; the kernel may read
    /// or write out of bounds otherwise.
    unsafe fn arg_extreme_unchecked<E: Float>(s: &Self::Storage<E>, axis: usize, largest: bool)
    -> Vec<usize>;
    /// `cond != 0 ? a : b` element-wise with broadcasting to `out_shape` (`torch.where`).
    fn select<E: Float>(
        cond: &Self::Storage<E>,
        a: &Self::Storage<E>,
        b: &Self::Storage<E>,
        out_shape: &[usize],
    ) -> Self::Storage<E> {
        require::<Self>(
            "select",
            check::broadcasts("cond", Self::shape(cond), out_shape).and(check::operands(
                Self::shape(a),
                Self::shape(b),
                out_shape,
            )),
        );
        // SAFETY: the arguments passed the checks of `select_unchecked`'s contract.
        unsafe { Self::select_unchecked(cond, a, b, out_shape) }
    }
    /// [`Backend::select`] without its checks: the kernel each backend implements.
    ///
    /// # Safety
    /// The arguments must pass the checks that [`Backend::select`] makes; the kernel may read
    /// or write out of bounds otherwise.
    unsafe fn select_unchecked<E: Float>(
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
    ) -> Self::Storage<E> {
        require::<Self>(
            "compare",
            check::operands(Self::shape(a), Self::shape(b), out_shape),
        );
        // SAFETY: the arguments passed the checks of `compare_unchecked`'s contract.
        unsafe { Self::compare_unchecked(op, a, b, out_shape) }
    }
    /// [`Backend::compare`] without its checks: the kernel each backend implements.
    ///
    /// # Safety
    /// The arguments must pass the checks that [`Backend::compare`] makes; the kernel may read
    /// or write out of bounds otherwise.
    unsafe fn compare_unchecked<E: Float>(
        op: Compare,
        a: &Self::Storage<E>,
        b: &Self::Storage<E>,
        out_shape: &[usize],
    ) -> Self::Storage<E>;
    /// The patches of a `[batch, channels, h, w]` input as rows: `[batch * oh * ow, channels *
    /// kh * kw]`, columns in `(channel, ky, kx)` order so that a convolution is one product with
    /// the weight `[out, channels * kh * kw]` (im2col); padding reads as 0.
    fn unfold2d<E: Float>(x: &Self::Storage<E>, geometry: &Conv2dGeometry) -> Self::Storage<E> {
        require::<Self>("unfold2d", check::unfold(Self::shape(x), geometry));
        // SAFETY: the arguments passed the checks of `unfold2d_unchecked`'s contract.
        unsafe { Self::unfold2d_unchecked(x, geometry) }
    }
    /// [`Backend::unfold2d`] without its checks: the kernel each backend implements.
    ///
    /// # Safety
    /// The arguments must pass the checks that [`Backend::unfold2d`] makes; the kernel may read
    /// or write out of bounds otherwise.
    unsafe fn unfold2d_unchecked<E: Float>(
        x: &Self::Storage<E>,
        geometry: &Conv2dGeometry,
    ) -> Self::Storage<E>;
    /// The adjoint of [`Backend::unfold2d`] (col2im): every column value added back to the
    /// input position it came from, accumulated in f64 and rounded once; `[batch, channels, h, w]`.
    fn fold2d<E: Float>(cols: &Self::Storage<E>, geometry: &Conv2dGeometry) -> Self::Storage<E> {
        require::<Self>("fold2d", check::fold(Self::shape(cols), geometry));
        // SAFETY: the arguments passed the checks of `fold2d_unchecked`'s contract.
        unsafe { Self::fold2d_unchecked(cols, geometry) }
    }
    /// [`Backend::fold2d`] without its checks: the kernel each backend implements.
    ///
    /// # Safety
    /// The arguments must pass the checks that [`Backend::fold2d`] makes; the kernel may read
    /// or write out of bounds otherwise.
    unsafe fn fold2d_unchecked<E: Float>(
        cols: &Self::Storage<E>,
        geometry: &Conv2dGeometry,
    ) -> Self::Storage<E>;

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
    /// [`Backend::sum_squares`] of each tensor, in order: the GPU reads them all in one copy (one
    /// wait for the device per gradient-norm clip, not one per parameter).
    fn sums_of_squares<E: Float>(tensors: &[&Self::Storage<E>]) -> Vec<f64> {
        tensors.iter().map(|s| Self::sum_squares(s)).collect()
    }
    /// `a += b` in place, same shapes (gradient accumulation).
    fn add_in_place<E: Float>(a: &mut Self::Storage<E>, b: &Self::Storage<E>) {
        require::<Self>(
            "add_in_place",
            check::same("a", Self::shape(a), "b", Self::shape(b)),
        );
        // SAFETY: the arguments passed the checks of `add_in_place_unchecked`'s contract.
        unsafe { Self::add_in_place_unchecked(a, b) }
    }
    /// [`Backend::add_in_place`] without its checks: the kernel each backend implements.
    ///
    /// # Safety
    /// The arguments must pass the checks that [`Backend::add_in_place`] makes; the kernel may read
    /// or write out of bounds otherwise.
    unsafe fn add_in_place_unchecked<E: Float>(a: &mut Self::Storage<E>, b: &Self::Storage<E>);

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
    ) {
        require::<Self>(
            "sgd_step",
            check::optimizer(
                Self::shape(param),
                Self::shape(grad),
                &[
                    (
                        "the momentum buffer",
                        momentum_buffer.as_deref().map(|b| Self::shape(b)),
                    ),
                    (
                        "the compensation buffer",
                        compensation.as_deref().map(|c| Self::shape(c)),
                    ),
                ],
            ),
        );
        // SAFETY: the arguments passed the checks of `sgd_step_unchecked`'s contract.
        unsafe { Self::sgd_step_unchecked(param, grad, momentum_buffer, compensation, hp) }
    }
    /// [`Backend::sgd_step`] without its checks: the kernel each backend implements.
    ///
    /// # Safety
    /// The arguments must pass the checks that [`Backend::sgd_step`] makes; the kernel may read
    /// or write out of bounds otherwise.
    unsafe fn sgd_step_unchecked<E: Float>(
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
    ) {
        require::<Self>(
            "adamw_step",
            check::optimizer(
                Self::shape(param),
                Self::shape(grad),
                &[
                    ("exp_avg", Some(Self::shape(exp_avg))),
                    ("exp_avg_sq", Some(Self::shape(exp_avg_sq))),
                    (
                        "the compensation buffer",
                        compensation.as_deref().map(|c| Self::shape(c)),
                    ),
                ],
            ),
        );
        // SAFETY: the arguments passed the checks of `adamw_step_unchecked`'s contract.
        unsafe { Self::adamw_step_unchecked(param, grad, exp_avg, exp_avg_sq, compensation, hp) }
    }
    /// [`Backend::adamw_step`] without its checks: the kernel each backend implements.
    ///
    /// # Safety
    /// The arguments must pass the checks that [`Backend::adamw_step`] makes; the kernel may read
    /// or write out of bounds otherwise.
    unsafe fn adamw_step_unchecked<E: Float>(
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
    ) -> Self::Storage<C> {
        require::<Self>(
            "cmatmul",
            check::matmul_2d(Self::shape(a), Self::shape(b), ta, tb, None),
        );
        // SAFETY: the arguments passed the checks of `cmatmul_unchecked`'s contract.
        unsafe { Self::cmatmul_unchecked(a, b, ta, ca, tb, cb) }
    }
    /// [`ComplexBackend::cmatmul`] without its checks: the kernel each backend implements.
    ///
    /// # Safety
    /// The arguments must pass the checks that [`ComplexBackend::cmatmul`] makes; the kernel may read
    /// or write out of bounds otherwise.
    unsafe fn cmatmul_unchecked<C: ComplexElement>(
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
    ) -> Self::Storage<C> {
        require::<Self>(
            "cbinary",
            check::operands(Self::shape(a), Self::shape(b), out_shape),
        );
        // SAFETY: the arguments passed the checks of `cbinary_unchecked`'s contract.
        unsafe { Self::cbinary_unchecked(op, a, b, out_shape) }
    }
    /// [`ComplexBackend::cbinary`] without its checks: the kernel each backend implements.
    ///
    /// # Safety
    /// The arguments must pass the checks that [`ComplexBackend::cbinary`] makes; the kernel may read
    /// or write out of bounds otherwise.
    unsafe fn cbinary_unchecked<C: ComplexElement>(
        op: Binary,
        a: &Self::Storage<C>,
        b: &Self::Storage<C>,
        out_shape: &[usize],
    ) -> Self::Storage<C>;
    /// `op(z)` element-wise.
    fn cunary<C: ComplexElement>(op: ComplexUnary, z: &Self::Storage<C>) -> Self::Storage<C>;
    /// Sums a broadcast gradient back down to `shape`.
    fn csum_to_shape<C: ComplexElement>(s: &Self::Storage<C>, shape: &[usize]) -> Self::Storage<C> {
        require::<Self>(
            "csum_to_shape",
            check::broadcasts("the target shape", shape, Self::shape(s)),
        );
        // SAFETY: the arguments passed the checks of `csum_to_shape_unchecked`'s contract.
        unsafe { Self::csum_to_shape_unchecked(s, shape) }
    }
    /// [`ComplexBackend::csum_to_shape`] without its checks: the kernel each backend implements.
    ///
    /// # Safety
    /// The arguments must pass the checks that [`ComplexBackend::csum_to_shape`] makes; the kernel may read
    /// or write out of bounds otherwise.
    unsafe fn csum_to_shape_unchecked<C: ComplexElement>(
        s: &Self::Storage<C>,
        shape: &[usize],
    ) -> Self::Storage<C>;
    /// The real and imaginary parts.
    fn complex_parts<C: ComplexElement>(
        z: &Self::Storage<C>,
    ) -> (Self::Storage<C::Real>, Self::Storage<C::Real>);
    /// A complex tensor from its parts (same shapes).
    fn complex_from_parts<C: ComplexElement>(
        re: &Self::Storage<C::Real>,
        im: &Self::Storage<C::Real>,
    ) -> Self::Storage<C> {
        require::<Self>(
            "complex_from_parts",
            check::same("re", Self::shape(re), "im", Self::shape(im)),
        );
        // SAFETY: the arguments passed the checks of `complex_from_parts_unchecked`'s contract.
        unsafe { Self::complex_from_parts_unchecked(re, im) }
    }
    /// [`ComplexBackend::complex_from_parts`] without its checks: the kernel each backend implements.
    ///
    /// # Safety
    /// The arguments must pass the checks that [`ComplexBackend::complex_from_parts`] makes; the kernel may read
    /// or write out of bounds otherwise.
    unsafe fn complex_from_parts_unchecked<C: ComplexElement>(
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

/// An operand of [`Backend::matmul`] as a matrix: `(rows, columns)`, its last axis the columns and
/// every other axis merged into the rows.
pub(crate) fn as_matrix(shape: &[usize]) -> (usize, usize) {
    match shape.split_last() {
        Some((&cols, lead)) => (lead.iter().product(), cols),
        None => (1, 1),
    }
}

/// The shape of [`Backend::matmul`]'s result: `a`'s leading axes and `n` columns, or `[m, n]`
/// when `a` is transposed.
pub(crate) fn matmul_shape(a: &[usize], b: &[usize], ta: bool, tb: bool) -> Vec<usize> {
    let n = if tb { as_matrix(b).0 } else { as_matrix(b).1 };
    if ta {
        vec![as_matrix(a).1, n]
    } else {
        a[..a.len().saturating_sub(1)]
            .iter()
            .copied()
            .chain([n])
            .collect()
    }
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
