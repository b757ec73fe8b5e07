//! # nbit: N-bit precision training with the precision and the device in the type
//!
//! nbit trains numeric models under the precisions of PyTorch Lightning's
//! `Trainer(precision=...)`, with one difference that is the point: precision and device are type
//! parameters, `Trainer<Mixed<BF16>, Cpu>`, and the table of which precision runs on which
//! accelerator is a set of trait impls. A combination the table refuses is a compile error that
//! says what to use instead, not a surprise at run time.
//!
//! ## A tour
//!
//! Pick a precision and a device as types:
//!
//! ```
//! use nbit::prelude::*;
//!
//! let trainer = Trainer::<Mixed<BF16>, Cpu>::new()?;
//! assert_eq!(trainer.precision_name(), "bf16-mixed");
//!
//! // What each precision means is in its associated types:
//! // bf16-mixed keeps f32 master weights and runs matmuls in bf16, with no loss scaling.
//! type P = Mixed<BF16>;
//! assert_eq!(<ParamOf<P> as Element>::DTYPE, DType::F32);
//! assert_eq!(<ComputeOf<P> as Element>::DTYPE, DType::BF16);
//! // Complex parameters follow the precision: complex128 under 64-true.
//! assert_eq!(<ComplexOf<True<F64>> as Element>::DTYPE, DType::C128);
//! # Ok::<(), nbit::Error>(())
//! ```
//!
//! A pair the matrix refuses does not compile, and the error says why and what to use:
//!
//! ```compile_fail,E0277
//! use nbit::prelude::*;
//! // error[E0277]: 16-mixed (`Mixed<F16>`) does not run on `Cpu`: fp16 mixed precision with a
//! //               dynamic gradient scaler needs a CUDA GPU
//! //   = note: use `Mixed<BF16>` (precision "bf16-mixed") on `Cpu`, or run `Mixed<F16>` on `Gpu`
//! let trainer = Trainer::<Mixed<F16>, Cpu>::new();
//! ```
//!
//! Neither does a mixed precision that is not 16-bit:
//!
//! ```compile_fail,E0277
//! use nbit::prelude::*;
//! // error[E0277]: `Mixed<F32>` is not a precision: mixed precision computes in a 16-bit dtype
//! let p = Mixed::<F32>::default();
//! ```
//!
//! Configuration files and command lines give strings. [`dispatch`] maps them to the same types,
//! through the same table, and returns the same advice as a value:
//!
//! ```
//! use nbit::prelude::*;
//!
//! struct Report;
//! impl Job for Report {
//!     type Output = String;
//!     fn run<P: Precision, D: Supports<P>>(self) -> String {
//!         format!("{} on {}, model size at {} bits/param", P::NAME, D::KIND, P::MODEL_BITS)
//!     }
//! }
//! assert_eq!(nbit::dispatch("bf16-mixed", "cpu", Report)?, "bf16-mixed on cpu, model size at 32 bits/param");
//! assert_eq!(nbit::dispatch(64, "cpu", Report)?, "64-true on cpu, model size at 64 bits/param");
//!
//! let err = nbit::dispatch("16-mixed", "cpu", Report).unwrap_err();
//! assert!(err.to_string().contains("use `Mixed<BF16>` (precision \"bf16-mixed\")"));
//! # Ok::<(), nbit::Error>(())
//! ```
//!
//! ## Tensors, gradients and autocast
//!
//! [`tensor::Tensor<E, D>`](tensor::Tensor) holds elements `E` (f16, bf16, f32, f64, complex; i64 ids) on a
//! device; on the CPU the data is an ndarray array and every kernel sits behind the
//! [`backend::Backend`] trait. Gradients come from [`tensor::Tensor::backward`]. [`autocast::Autocast`]
//! runs each op in the dtype the precision gives it, so one forward pass under `Mixed<BF16>` does its
//! matmuls in bf16, its loss in f32, and hands f32 gradients to the f32 master weights:
//!
//! ```
//! use nbit::prelude::*;
//!
//! let w = Tensor::<f32>::from_vec(&[3, 2], vec![0.5, -0.5, 0.25, 0.75, -1.0, 1.0])?.requires_grad();
//! let x = Tensor::<f32>::from_vec(&[2, 2], vec![1.0, 2.0, 3.0, 4.0])?;
//! let ac = Autocast::<Mixed<BF16>>::new();
//! let logits = ac.linear(&x, &w, None)?;          // matmul-class: bf16
//! let loss = ac.cross_entropy(&logits, &[0, 2])?; // fp32-class: f32
//! logits.retain_grad();                           // keep an intermediate's gradient, as PyTorch
//! let grads = loss.backward()?;
//! assert_eq!(logits.dtype(), DType::BF16);
//! assert_eq!(grads.get(&logits).unwrap().dtype(), DType::BF16); // activation gradient: 16-bit
//! assert_eq!(grads.get(&w).unwrap().dtype(), DType::F32);       // master-weight gradient: f32
//! # Ok::<(), nbit::Error>(())
//! ```
//!
//! Complex tensors ([`tensor::ComplexOps`]) differentiate by PyTorch's convention, and with the
//! `lapack` feature `linalg` adds differentiable `solve`, `inverse`, `cholesky` and `lstsq`.
//!
//! Transformers: batched [`tensor::Tensor::matmul`], `permute`, masks and `i64` token ids under
//! PyTorch's [`nn::MultiheadAttention`] and [`nn::Transformer`] (their names, defaults and
//! `state_dict` keys), [`autocast::Autocast::scaled_dot_product_attention`], and Lightning's demo
//! language model, [`demos::Transformer`], which `examples/transformer_lm.rs` trains on a text.
//!
//! Numerics follow PyTorch's kernels: element-wise ops widen 16-bit inputs to f32 and round once;
//! sums, means, softmax denominators, losses and norms accumulate in f64; 16-bit GEMMs accumulate
//! in f32 and round each output once.
//!
//! ## Your own model
//!
//! A [`Model`] gives its forward pass and lists its parameters once
//! ([`Model::parameters_mut`]); training, validation (loss, and accuracy for class labels) and
//! prediction have defaults. [`nn`] has PyTorch's layers ([`nn::Linear`], [`nn::Conv2d`],
//! [`nn::Conv1d`], [`nn::Embedding`], [`nn::LayerNorm`], [`nn::Dropout`], the activations), each an
//! [`nn::Module`], and [`nn::Sequential`] chains them into a model. Code generic over the
//! precision and device takes one bound, [`Runs<P>`](Runs), and [`launch()`] (or [`launch!`]) runs it for strings
//! from a command line. `examples/cnn_digits.rs` and `examples/user-crate/` show both.
//!
//! ## CPU kernels and threads
//!
//! Matrix products run on nbit's own blocked GEMM (packed panels, a register-blocked micro-kernel
//! for AVX-512, AVX2+FMA or a portable one, chosen at run time), or on the `gemm-f64` / `gemm-f32` kernels (of the `gemm` family) for f64 and
//! row-major f32, where it measured faster. bf16 and f16 operands are widened exactly to f32 while
//! they are packed, so a 16-bit product runs at f32 speed with f32 accumulation. Where the CPU has
//! AVX-512 BF16, a `vdpbf16ps` kernel can multiply bf16 pairs instead, and where it has AMX (Intel
//! Sapphire Rapids and later, on Linux) a tile kernel (`tdpbf16ps`, through `asm!`). Which kernel
//! runs is decided once per process from what CPUID reports, never by timing, so every process on a
//! machine makes the same choice and a seeded run writes the same bits: the AMX tiles wherever the
//! CPU has them; else the dot-product kernel on AMD Zen 4 and Zen 5 (families 25 and 26), where it
//! runs at twice the f32 FMA rate; widening everywhere else (on Intel Xeon with AVX512-FP16 the
//! dot product runs at half the FMA rate). `NBIT_GEMM_KERNEL`
//! names another kernel ([`backend::GEMM_KERNEL_ENV`]); [`backend::kernel_name`] tells which kernel
//! a dtype uses, and `nbit fit --json` reports it as `gemm_kernel`.
//!
//! Subnormal bf16 inputs: widening keeps them (exact f32 arithmetic). `vdpbf16ps` and AMX treat them as
//! zero and flushes subnormal results to zero whatever MXCSR says (2^-130 x 2^100 gives 0, not
//! 2^-30). PyTorch does the same on these CPUs: oneDNN's bf16 matmul runs on `vdpbf16ps` or, on
//! Intel with AMX, on `tdpbf16ps`, which flush alike; measured with PyTorch 2.15 on an Intel Xeon
//! with AMX, a bf16 product of 64 x 64 or more flushed 2^-130 x 2^100 to 0, while 16 x 16 and
//! smaller (its non-oneDNN path) kept 2^-30.
//!
//! Products, element-wise kernels, casts and optimizer steps above a size threshold split across
//! threads: `NBIT_NUM_THREADS`, [`TrainerBuilder::num_threads`] or `nbit --num-threads` set how many
//! (default: every core available). Every output is computed by one thread in one order, so any
//! thread count gives the same bits. A training step frees and allocates the same large buffers
//! every time; [`TrainerConfig::retain_freed_memory`] (default on) keeps glibc from returning them
//! to the operating system between steps. `benches/bench_mlp.rs` measures training throughput and
//! `tools/bench_mlp_vs_pytorch.py` compares it with PyTorch (README, "Speed on the CPU").
//!
//! ## The precisions
//!
//! | Lightning string | type | parameters | matmul-class ops | fp32-class ops | loss scaling |
//! |---|---|---|---|---|---|
//! | `"16-mixed"` | `Mixed<F16>` | f32 | f16 | f32 | [`DynamicScaler`](scaler::DynamicScaler) |
//! | `"bf16-mixed"` | `Mixed<BF16>` | f32 | bf16 | f32 | none |
//! | `"16-true"` | `True<F16>` | f16 | f16 | f16 | none |
//! | `"bf16-true"` | `True<BF16>` | bf16 | bf16 | bf16 | none |
//! | `"32-true"` (default) | `True<F32>` | f32 | f32 | f32 | none |
//! | `"64-true"` | `True<F64>` | f64 | f64 | f64 | none |
//!
//! Legacy values are accepted as Lightning accepts them: `32`/`"32"` and `64`/`"64"` silently,
//! `16`/`"16"` (16-mixed) and `"bf16"` (bf16-mixed) with a notice ([`Selection::notice`]).
//! [`Precision`] is an open trait: a type of yours can be a precision, Lightning's custom
//! precision plugin in types.
//!
//! ## The support matrix
//!
//! | precision | Cpu | Gpu | Tpu |
//! |---|---|---|---|
//! | `Mixed<F16>` | no | yes | no |
//! | `Mixed<BF16>` | yes | yes | yes |
//! | `True<F16>` | yes | yes | yes |
//! | `True<BF16>` | yes | yes | yes |
//! | `True<F32>` | yes | yes | yes |
//! | `True<F64>` | yes | yes | no |
//!
//! (A test reads this table and checks it against the trait impls.) It lives in one file,
//! `src/matrix.rs`, documented at [`matrix`].
//!
//! ## Data parallel
//!
//! A third type parameter, the [`Strategy`], defaults to one process: `Trainer<P, D>` is
//! `Trainer<P, D, SingleDevice>`. `Trainer<P, Cpu, Ddp<Mpi>>` (feature `mpi`) trains one model in
//! several processes started by `mpirun`, each on its share of every epoch's batches, with the
//! gradients summed over the processes before each step; two processes take exactly the steps of
//! one process accumulating two batches per step. `Ddp<Nccl>` runs only on `Gpu`, so it is a
//! compile error on `Cpu` that points to `Ddp<Mpi>`. The semantics are in [`strategy`].
//!
//! ```no_run
//! use nbit::prelude::*;
//! // Run as `mpirun -np 2 my-program`: every rank builds the same trainer.
//! let trainer = Trainer::<Mixed<BF16>, Cpu, Ddp<Mpi>>::builder().max_epochs(10).build()?;
//! println!("rank {} of {}", trainer.global_rank(), trainer.world_size());
//! # Ok::<(), nbit::Error>(())
//! ```
//!
//! ## Where nbit differs from Lightning, on purpose
//!
//! - **16-mixed on the CPU is refused.** Lightning silently switches it to bf16-mixed with a
//!   warning; nbit makes `Trainer::<Mixed<F16>, Cpu>::new()` a compile error and the string pair an `Err`,
//!   both naming bf16-mixed as the fix. A precision should mean what it says.
//! - **The TPU column follows the seed documentation** (bf16-mixed allowed, 16-mixed and 64-true
//!   refused). Current Lightning rejects both mixed modes on TPU.
//! - **There is no TPU backend yet.** The [`Tpu`] type exists so code can be written and checked
//!   against its column (`Supports`); it lacks [`Runs`], so building a trainer on it is a compile
//!   error that says so, and [`launch()`] with `"tpu"` returns [`Error::DeviceUnavailable`].
//! - **`"auto"` never picks a device nbit cannot run on**: not a TPU, and a GPU only when nbit was
//!   built with its `cuda` feature and the driver, a device, NVRTC and cuBLAS answer; otherwise
//!   `cpu`.
//! - **The GPU backend (feature `cuda`) has not yet run on a GPU.** It runs in CI on a host
//!   emulation of its kernels (`backend::cuda`), where every precision of the GPU column trains
//!   as on the CPU; `tools/gpu-check.sh` is the check on hardware.
//! - **A non-finite loss stops training** under a precision without a gradient scaler
//!   ([`Error::NonFinite`], naming the step), as Lightning's `EarlyStopping(check_finite=True)`
//!   would; under 16-mixed the scaler skips such steps instead.
//!
//! ## bf16-true that trains like f32
//!
//! Under bf16-true a weight near 1.0 cannot move by less than 2^-8, so updates below half of that
//! are lost. [`optim::UpdateRounding`] on the optimizer chooses how updated 16-bit weights round:
//! to nearest (PyTorch's), with Kahan compensation (a 16-bit buffer per parameter), or
//! stochastically (seeded). The README's table, from `benches/update_rounding.rs`: on the
//! quickstart's setting compensated bf16-true lands 3.4% from 32-true's validation loss where
//! nearest lands 27% away, in two thirds of bf16-mixed's memory.
//!
//! ```
//! use nbit::prelude::*;
//! use nbit::optim::{AdamW, Optimization, UpdateRounding};
//! let trainer = Trainer::<True<BF16>, Cpu>::new()?;
//! let mut model = trainer.init_module(|ctx| {
//!     MlpModel::new(ctx, &[4, 8, 2], nbit::nn::Task::Classification,
//!         Optimization::new(AdamW::default()).update_rounding(UpdateRounding::Compensated))
//! })?;
//! assert!(trainer.summary(&mut model).to_string().contains("AdamW, compensated rounding"));
//! # Ok::<(), nbit::Error>(())
//! ```
//!
//! ## Where nbit's numerics differ from PyTorch's CPU kernels, on purpose
//!
//! PyTorch's behaviour is the specification, and nbit follows its kernels' structure where that is
//! consistent (a linear layer's bias added before its one rounding, log-softmax keeping the row's
//! exp-sum and its log in the element type, optimizer state rounded as in-place ops round it,
//! AdamW's `lerp_` and `addcmul_` fused as PyTorch's vectorised kernels fuse them).
//! `tools/compare_with_pytorch.py` measures the agreement. Where PyTorch 2.15 rounds more often
//! or inconsistently, nbit rounds once:
//!
//! - **Reductions accumulate in f64** (PyTorch: f32 for 16-bit inputs, and 16-bit partial sums
//!   in `nll_loss`), so a reported 16-bit loss can differ from PyTorch's by an ulp; gradients do
//!   not depend on it.
//! - **`p + alpha * g` rounds once.** PyTorch's CPU `add_(g, alpha=...)` on bf16/f16 rounds
//!   `alpha * g` first for the elements past the last full SIMD vector (a tensor of 10 elements:
//!   all of them), and once for the rest.
//! - **f64 to f16/bf16 rounds once**; PyTorch converts through f32 (see [`Float`]).
//! - **16-true AdamW keeps `exp_avg_sq` in f32** (see [`optim`]): in f16 it underflows.
//! - **`sqrt` is correctly rounded.** PyTorch's f32 `sqrt` on large CPU tensors goes through MKL's
//!   vector math, accurate to 1 ulp; f32 AdamW matches `torch.optim.AdamW` bit for bit except
//!   where that sqrt is off (about 1 element in 100; `tests/pytorch_reference.rs`).

#![warn(missing_docs)]

pub mod autocast;
pub mod autograd;
pub mod backend;
pub mod data;
pub mod demos;
pub mod device;
pub mod dtype;
mod error;
pub mod fmt;
pub mod kinds;
#[cfg(feature = "lapack")]
pub mod linalg;
pub mod matrix;
pub mod nn;
pub mod optim;
pub mod plot;
pub mod precision;
pub mod scaler;
pub mod strategy;
pub mod tensor;
mod trainer;

pub use autograd::Grads;
pub use backend::WithBackend;
pub use device::{Cpu, Device, DeviceKind, Gpu, Tpu, parse_accelerator};
pub use dtype::{BF16, DType, Dtype, Element, F16, F32, F64, Float, HalfDtype, Promote};
pub use error::Error;
pub use matrix::{Job, RunJob, Runs, Selection, Supports, dispatch, launch};
pub use precision::{
    ComplexOf, ComputeOf, Mixed, NoComplex, ParamOf, Parsed, Precision, PrecisionInput, PrecisionKind, True,
    parse_precision,
};
pub use strategy::{Ddp, Hosts, Mpi, Nccl, SingleDevice, Strategy};
pub use trainer::{
    ClipAlgorithm, EarlyStopping, FitReport, LayerSummary, Metrics, MlpModel, Mode, Model, ModelCheckpoint,
    Monitor, StepInfo, StepLog, Summary, Trainer, TrainerBuilder, TrainerConfig, mlp_sizes, saved_precision,
    write_atomic,
};

/// The names most programs need: `use nbit::prelude::*;`. The `ndarray` and `half` that nbit's
/// API uses are re-exported as `nbit::ndarray` and `nbit::half`, so a program needs neither as a
/// dependency of its own (and cannot end up with a second version of either):
///
/// ```
/// use nbit::prelude::*;
/// use nbit::ndarray::array;
///
/// let ds = nbit::data::Dataset::classification(array![[0.5, -1.0], [2.0, 0.25]], vec![0, 1])?;
/// let x: Tensor<nbit::half::bf16> = nbit::data::Batch::from(ds).features();
/// assert_eq!(x.to_vec()[0].as_f64(), 0.5); // `Float` is in the prelude
/// # Ok::<(), nbit::Error>(())
/// ```
pub mod prelude {
    pub use crate::autocast::Autocast;
    pub use crate::backend::Backend;
    pub use crate::tensor::{ComplexOps, Tensor};
    pub use crate::{
        BF16, ComplexOf, ComputeOf, Cpu, DType, Device, Element, Error, F16, F32, F64, Float, Gpu, Job,
        Mixed, MlpModel, Model, ParamOf, Precision, RunJob, Runs, Supports, Tpu, Trainer, True,
    };
    pub use crate::{Ddp, Hosts, Mpi, Nccl, SingleDevice, Strategy};
}

/// The `ndarray` nbit's API takes and returns (`Array2`, `ArrayD`): use `nbit::ndarray` rather than
/// a dependency of your own, so the versions always agree.
pub use ndarray;

/// The `half` crate whose `f16` and `bf16` are nbit's 16-bit element types.
pub use half;
