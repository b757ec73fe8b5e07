//! The support matrix: which precision runs on which device, in one place.
//!
//! | precision | Cpu | Gpu | Tpu |
//! |---|---|---|---|
//! | `Mixed<F16>` (16-mixed) | no | yes | no |
//! | `Mixed<BF16>` (bf16-mixed) | yes | yes | yes |
//! | `True<F16>` (16-true) | yes | yes | yes |
//! | `True<BF16>` (bf16-true) | yes | yes | yes |
//! | `True<F32>` (32-true) | yes | yes | yes |
//! | `True<F64>` (64-true) | yes | yes | no |
//!
//! The `support_matrix!` invocation at the bottom of this file is the only source of this table.
//! Each row names a precision and the devices it runs on, and generates:
//!
//! - a *gate* trait for the precision (such as [`RunsMixedF16`]), implemented for the
//!   `(precision, device)` pairs of exactly those devices, whose `#[diagnostic::on_unimplemented]`
//!   text explains a refused cell and names the nearest supported choice;
//! - `impl<D> Supports<Precision> for D where (Precision, D): Gate<D>`, so `Cpu: Supports<Mixed<F16>>`
//!   fails through the gate and rustc prints the gate's text.
//!
//!   Why a pair and not the device: rustc reports the bound the user wrote (`D: Runs<P>`) in place
//!   of the one that failed when both are about the same type, and that would hide the gate's text
//!   behind a generic one. A gate on the pair is about another type, so its text is the error
//!   whichever way the cell is reached. The gate impls are `#[diagnostic::do_not_recommend]`, so the
//!   error does not list them (with the macro's source) as "other types that implement" the gate;
//! - the run-time table ([`PrecisionKind::supported_on`]) and the arms of [`dispatch`], so strings
//!   from a config file reach exactly the same cells and get the same advice.
//!
//! A custom precision skips the gates: it implements [`Supports`] directly for the devices it
//! allows (see [`Precision`]).
//!
//! Two cells differ from what Lightning does at run time, deliberately: Lightning turns
//! 16-mixed on CPU into bf16-mixed with a warning, where nbit refuses (at compile time for types,
//! with an `Err` for strings); and current Lightning rejects both mixed modes on TPU, where nbit
//! follows the seed documentation's table (bf16-mixed allowed).

use crate::backend::{Backend, WithBackend};
use crate::device::{Cpu, DeviceKind, Gpu, Tpu, parse_accelerator};
use crate::dtype::{BF16, F16, F32, F64};
use crate::precision::{Mixed, PrecisionInput, PrecisionKind, True, parse_precision};
use crate::{Error, Precision};

/// `Self` (a device) may train under the precision `P`: the support matrix.
///
/// Implemented by the table in this module for the built-in precisions, and by users for their
/// own precisions. Building a trainer for a refused cell does not compile, and the error is the
/// cell's own explanation and advice, however the pair is reached (directly, through [`Runs`],
/// or through a generic function):
///
/// ```compile_fail,E0277
/// use nbit::prelude::*;
/// // error: 16-mixed (`Mixed<F16>`) does not run on `Cpu` ... use `Mixed<BF16>` ...
/// let trainer = Trainer::<Mixed<F16>, Cpu>::new();
/// ```
///
/// `Supports` is the matrix alone, checked for every device type whether or not this build has
/// its kernels (a [`Job`] from [`dispatch`] is generic over it). Code that trains states
/// [`Runs<P>`](Runs) instead: the matrix plus the device's kernels.
#[diagnostic::on_unimplemented(
    message = "the precision `{P}` is not supported on `{Self}`",
    label = "`{P}` cannot run on `{Self}`",
    note = "a precision runs on a device only where `Supports<{P}>` is implemented for it (the built-in \
            table is in `nbit::matrix`); code that trains states `{Self}: Runs<{P}>`, which includes it"
)]
pub trait Supports<P: Precision>: WithBackend {}

/// `Self` (a device) may train under `P` *and* this build has its kernels: [`Supports<P>`] plus
/// [`Backend`]. The one bound generic training code needs, and what [`Trainer::new`](crate::Trainer::new)
/// requires:
///
/// ```
/// use nbit::prelude::*;
/// use nbit::data::{DataLoader, Dataset};
/// use nbit::nn::Task;
/// use nbit::optim::{AdamW, Optimization};
///
/// fn train<P: Precision, D: Runs<P>>(data: &DataLoader) -> Result<f64, Error> {
///     let trainer = Trainer::<P, D>::builder().max_epochs(2).enable_progress_bar(false).build()?;
///     let mut model = trainer.init_module(|ctx| {
///         MlpModel::new(ctx, &[2, 8, 2], Task::Classification, Optimization::new(AdamW::default()))
///     })?;
///     trainer.fit(&mut model, data, None)?;
///     Ok(trainer.validate(&mut model, data)?.loss())
/// }
/// let x = nbit::ndarray::array![[0.0, 1.0], [1.0, 0.0], [0.5, 0.5], [1.0, 1.0]];
/// let data = DataLoader::new(Dataset::classification(x, vec![0, 1, 0, 1])?, 2)?;
/// assert!(train::<Mixed<BF16>, Cpu>(&data)?.is_finite());
/// # Ok::<(), nbit::Error>(())
/// ```
///
/// Called for a refused cell, `train::<Mixed<F16>, Cpu>` fails with the matrix's message for that
/// cell, as naming the trainer directly does. `Cpu` has kernels in every build, `Gpu` with the
/// `cuda` feature, `Tpu` not yet; for a device without them the error says so and what to use.
/// [`launch`] turns a run-time choice of such a device into the device's error instead.
#[cfg_attr(
    feature = "cuda",
    diagnostic::on_unimplemented(
        message = "`{Self}` cannot train `{P}` in this build of nbit",
        label = "`{Self}` has no `Runs<{P}>` in this build",
        note = "`Runs<{P}>` is the support matrix (`Supports<{P}>`) plus the device's kernels (`Backend`)",
        note = "`Cpu` and `Gpu` have kernels in this build, `Tpu` has no backend yet: train on `Cpu` or `Gpu`, \
                or choose the device at run time with `nbit::launch`, which returns this as an error"
    )
)]
#[cfg_attr(
    not(feature = "cuda"),
    diagnostic::on_unimplemented(
        message = "`{Self}` cannot train `{P}` in this build of nbit",
        label = "`{Self}` has no `Runs<{P}>` in this build",
        note = "`Runs<{P}>` is the support matrix (`Supports<{P}>`) plus the device's kernels (`Backend`)",
        note = "`Cpu` has kernels in every build, `Gpu` when nbit is built with its `cuda` feature \
                (`features = [\"cuda\"]`), `Tpu` has no backend yet: train on `Cpu`, or choose the \
                device at run time with `nbit::launch`, which returns this as an error"
    )
)]
pub trait Runs<P: Precision>: Supports<P> + Backend {}

// One impl per device, not a blanket `impl<D: Supports<P> + Backend>`: for a type parameter no
// impl applies, so rustc asks for `D: Runs<P>` itself (through a blanket impl it would ask for
// `Supports` and `Backend` separately). For a concrete device rustc looks through the impl: to the
// matrix's gate, whose text is the cell's explanation, then to the kernels, whose absence (`Tpu`;
// `Gpu` without `cuda`) is `Runs`'s own message.
//
// The kernels bound is `for<'a> D: HasBackend`: a bound on no type parameter that does not hold
// (`Tpu: Backend` today) is an error where it is written, and the binder makes it a bound rustc
// checks where the impl is used instead. `HasBackend` is `Backend` one step removed, so rustc
// reaches it after the gate and the matrix's explanation is the first error.
// (Written out rather than generated, so that rustc's "`Runs<P>` is implemented for `Cpu`" hint
// shows this line, not a macro.)
#[rustfmt::skip]
impl<P: Precision> Runs<P> for Cpu where Cpu: Supports<P>, for<'a> Cpu: HasBackend {}
#[rustfmt::skip]
impl<P: Precision> Runs<P> for Gpu where Gpu: Supports<P>, for<'a> Gpu: HasBackend {}
#[rustfmt::skip]
impl<P: Precision> Runs<P> for Tpu where Tpu: Supports<P>, for<'a> Tpu: HasBackend {}

/// [`Backend`], one step removed: the kernels part of a device's [`Runs`] impl, implemented for
/// every `Backend`, so that rustc reports a refused cell before a missing backend. Not a bound for
/// user code: state `Runs<P>` or `Backend`.
#[doc(hidden)]
pub trait HasBackend: Backend {}

impl<D: Backend> HasBackend for D {}

/// Work that needs a device's kernels (a training run), started by [`launch`] for the precision
/// and accelerator a user named at run time:
///
/// ```
/// use nbit::prelude::*;
/// struct Fit;
/// impl RunJob for Fit {
///     type Output = String;
///     fn run<P: Precision, D: Runs<P>>(self) -> Result<String, Error> {
///         let trainer = Trainer::<P, D>::builder().build()?;
///         Ok(format!("{} on {}", P::NAME, trainer.device()))
///     }
/// }
/// assert_eq!(nbit::launch("bf16-mixed", "cpu", Fit)?, "bf16-mixed on cpu");
/// // An allowed cell without a backend in this build is the device's error, not a panic:
/// assert!(nbit::launch("bf16-mixed", "tpu", Fit).unwrap_err().to_string().contains("tpu"));
/// # Ok::<(), nbit::Error>(())
/// ```
pub trait RunJob {
    /// What the job returns.
    type Output;
    /// Runs the job with the selected types.
    fn run<P: Precision, D: Runs<P>>(self) -> Result<Self::Output, Error>;
}

/// Adapts a [`RunJob`] to [`dispatch`]: reaches the device's backend, or its error.
struct OnBackend<J>(J);

impl<J: RunJob> Job for OnBackend<J> {
    type Output = Result<J::Output, Error>;
    fn run<P: Precision, D: Supports<P>>(self) -> Self::Output {
        D::with_backend::<P, J>(self.0)
    }
}

/// Parses a precision and an accelerator as [`dispatch`] does, then runs `job` with the types
/// and the device's kernels. Errors: an unknown string, a refused cell (with advice), or a device
/// this build cannot run (no backend, no hardware), each as a value. A legacy spelling (`"bf16"`,
/// `16`) prints Lightning's notice on stderr, as the command line does; [`Selection::parse`] hands
/// it to the caller instead. [`launch!`](crate::launch!) is the closure form.
pub fn launch<'a, J: RunJob>(
    precision: impl Into<PrecisionInput<'a>>,
    accelerator: &str,
    job: J,
) -> Result<J::Output, Error> {
    Selection::parse_noted(precision, accelerator)?.launch(job)
}

/// Runs an expression with the precision and device types a user named as strings: the closure
/// form of [`launch()`].
///
/// `nbit::launch!(precision, accelerator, |P, D| body)` parses both values as [`launch()`] does,
/// then evaluates `body` with `P` and `D` naming the chosen types (`D: Runs<P>` holds). `body`
/// returns `Result<T, nbit::Error>`, and so does the macro, with the same errors as `launch`.
///
/// ```
/// use nbit::prelude::*;
/// use nbit::data::{DataLoader, Dataset};
/// use nbit::nn::Task;
/// use nbit::optim::{Optimization, Sgd};
///
/// fn train<P: Precision, D: Runs<P>>(data: &DataLoader) -> Result<f64, Error> {
///     let trainer = Trainer::<P, D>::builder().max_epochs(2).enable_progress_bar(false).build()?;
///     let opt = Optimization::new(Sgd::new(0.1));
///     let mut model = trainer.init_module(|ctx| MlpModel::new(ctx, &[2, 4, 2], Task::Classification, opt))?;
///     Ok(trainer.fit(&mut model, data, None)?.history.len() as f64)
/// }
/// let x = nbit::ndarray::array![[0.0, 1.0], [1.0, 0.0]];
/// let data = DataLoader::new(Dataset::classification(x, vec![0, 1])?, 1)?;
///
/// let steps = nbit::launch!("bf16-mixed", "cpu", |P, D| train::<P, D>(&data))?;
/// assert_eq!(steps, 4.0);
/// let name = nbit::launch!(64, "cpu", |P, D| Ok(format!("{} on {}", P::NAME, D::KIND)))?;
/// assert_eq!(name, "64-true on cpu");
/// let refused = nbit::launch!("16-mixed", "cpu", |P, D| train::<P, D>(&data)).unwrap_err();
/// assert!(refused.to_string().contains("bf16-mixed"));
/// # Ok::<(), nbit::Error>(())
/// ```
///
/// Rust has no generic closures, so the macro writes one arm per cell this build can run, each a
/// plain closure over that cell's concrete types: `body` borrows or moves local variables as a
/// closure does, is compiled once per cell, and must return the same type in every cell. `P` and
/// `D` are type aliases of those concrete types, not type parameters: `P::NAME`, `D::KIND` and
/// generic calls such as `train::<P, D>()` work, while an associated type is written
/// [`ParamOf<P>`](crate::ParamOf) (or `<P as Precision>::Param`), as `P::Param` is ambiguous for
/// a concrete type. For a job that needs a name or its own type parameters, implement [`RunJob`].
#[macro_export]
macro_rules! launch {
    ($precision:expr, $accelerator:expr, |$p:ident, $d:ident| $body:expr $(,)?) => {
        $crate::matrix::Selection::parse_noted($precision, $accelerator).and_then(
            |__nbit_selection: $crate::matrix::Selection| {
                $crate::__launch_cell!(__nbit_selection, MixedBf16 = Mixed<BF16> on Cpu, $p, $d, $body);
                $crate::__launch_cell!(__nbit_selection, TrueBf16 = True<BF16> on Cpu, $p, $d, $body);
                $crate::__launch_cell!(__nbit_selection, True16 = True<F16> on Cpu, $p, $d, $body);
                $crate::__launch_cell!(__nbit_selection, True32 = True<F32> on Cpu, $p, $d, $body);
                $crate::__launch_cell!(__nbit_selection, True64 = True<F64> on Cpu, $p, $d, $body);
                $crate::__launch_gpu_cells!(__nbit_selection, $p, $d, $body);
                ::core::result::Result::Err(__nbit_selection.unlaunched())
            },
        )
    };
}

/// One arm of [`launch!`]: runs `body` with `P` and `D` when the selection is this cell. The
/// arm fails to compile if the cell lacks `Runs`.
#[doc(hidden)]
#[macro_export]
macro_rules! __launch_cell {
    ($sel:ident, $kind:ident = $prec:ident<$dt:ident> on $dev:ident, $p:ident, $d:ident, $body:expr) => {
        if $sel.precision() == $crate::PrecisionKind::$kind && $sel.device() == $crate::DeviceKind::$dev {
            #[allow(unused_imports)]
            use $crate::{Device as _, Precision as _};
            #[allow(non_camel_case_types, dead_code)]
            type $p = $crate::$prec<$crate::$dt>;
            #[allow(non_camel_case_types, dead_code)]
            type $d = $crate::$dev;
            $crate::matrix::assert_runs::<$p, $d>();
            // As `launch` does: the device must answer, and its failures are errors, not panics.
            if let ::core::result::Result::Err(e) = <$d as $crate::Device>::probe() {
                return ::core::result::Result::Err(e);
            }
            return <$d as $crate::backend::Backend>::catch_device_failures(|| $body);
        }
    };
}

/// The GPU's arms of [`launch!`]: none without the `cuda` feature (the selection's error then
/// says to build with it).
#[cfg(not(feature = "cuda"))]
#[doc(hidden)]
#[macro_export]
macro_rules! __launch_gpu_cells {
    ($sel:ident, $p:ident, $d:ident, $body:expr) => {};
}

/// The GPU's arms of [`launch!`].
#[cfg(feature = "cuda")]
#[doc(hidden)]
#[macro_export]
macro_rules! __launch_gpu_cells {
    ($sel:ident, $p:ident, $d:ident, $body:expr) => {
        $crate::__launch_cell!($sel, Mixed16 = Mixed<F16> on Gpu, $p, $d, $body);
        $crate::__launch_cell!($sel, MixedBf16 = Mixed<BF16> on Gpu, $p, $d, $body);
        $crate::__launch_cell!($sel, TrueBf16 = True<BF16> on Gpu, $p, $d, $body);
        $crate::__launch_cell!($sel, True16 = True<F16> on Gpu, $p, $d, $body);
        $crate::__launch_cell!($sel, True32 = True<F32> on Gpu, $p, $d, $body);
        $crate::__launch_cell!($sel, True64 = True<F64> on Gpu, $p, $d, $body);
    };
}

/// Compiles only for a cell with `Runs`: [`launch!`]'s check of its own arms.
#[doc(hidden)]
pub fn assert_runs<P: Precision, D: Runs<P>>() {}

/// A generic computation over a precision and device, run by [`dispatch`] for the pair a user
/// named at run time.
///
/// ```
/// use nbit::prelude::*;
/// struct Describe;
/// impl Job for Describe {
///     type Output = String;
///     fn run<P: Precision, D: Supports<P>>(self) -> String {
///         format!("{} on {:?}", P::NAME, D::KIND)
///     }
/// }
/// assert_eq!(nbit::dispatch("bf16", "cpu", Describe)?, "bf16-mixed on Cpu");
/// let err = nbit::dispatch("16-mixed", "cpu", Describe).unwrap_err().to_string();
/// assert!(err.contains("Mixed<BF16>"));
/// # Ok::<(), nbit::Error>(())
/// ```
pub trait Job {
    /// What the job returns.
    type Output;
    /// Runs the job with the selected types.
    fn run<P: Precision, D: Supports<P>>(self) -> Self::Output;
}

/// A validated run-time choice of precision and device, with any legacy-spelling notice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selection {
    precision: PrecisionKind,
    device: DeviceKind,
    notice: Option<String>,
}

impl Selection {
    /// Checks the pair against the support matrix.
    pub fn new(precision: PrecisionKind, device: DeviceKind) -> Result<Self, Error> {
        if precision.supported_on(device) {
            Ok(Selection {
                precision,
                device,
                notice: None,
            })
        } else {
            Err(unsupported(precision, device))
        }
    }

    /// Parses a precision (any value Lightning accepts) and an accelerator string, then checks the
    /// pair. `"auto"` probes for a CUDA GPU.
    pub fn parse<'a>(precision: impl Into<PrecisionInput<'a>>, accelerator: &str) -> Result<Self, Error> {
        let parsed = parse_precision(precision)?;
        let device = parse_accelerator(accelerator)?;
        let mut sel = Selection::new(parsed.kind, device).map_err(|mut e| {
            // Say that `auto` chose the device, and why not the GPU.
            if let Error::Unsupported { auto, .. } = &mut e
                && accelerator == "auto"
            {
                *auto = Some(match <crate::device::Gpu as crate::device::Device>::probe() {
                    Err(Error::DeviceUnavailable { reason, .. }) => {
                        // The reason without its advice to use the CPU, which is what happened.
                        let reason = reason.split("; use accelerator").next().unwrap_or(&reason);
                        format!("no usable GPU, as {reason}")
                    }
                    _ => "no usable GPU".into(),
                });
            }
            e
        })?;
        sel.notice = parsed.notice;
        Ok(sel)
    }

    /// [`Selection::parse`], then Lightning's notice for a legacy spelling printed on stderr as
    /// `note: ...` (what [`launch()`], [`dispatch`] and the command line do).
    pub fn parse_noted<'a>(
        precision: impl Into<PrecisionInput<'a>>,
        accelerator: &str,
    ) -> Result<Self, Error> {
        let sel = Selection::parse(precision, accelerator)?;
        if let Some(n) = sel.notice() {
            eprintln!("note: {n}");
        }
        Ok(sel)
    }

    /// Why [`launch!`](crate::launch!) has no arm for this selection: the device's error (no
    /// backend in this build, no hardware), as [`launch()`] returns it.
    #[doc(hidden)]
    pub fn unlaunched(&self) -> Error {
        struct Nothing;
        impl RunJob for Nothing {
            type Output = ();
            fn run<P: Precision, D: Runs<P>>(self) -> Result<(), Error> {
                Ok(())
            }
        }
        match self.launch(Nothing) {
            Err(e) => e,
            Ok(()) => Error::DeviceUnavailable {
                device: self.device.name(),
                reason: format!(
                    "nbit::launch! has no arm for {} on it (a bug in nbit)",
                    self.precision.name()
                ),
            },
        }
    }

    /// The precision chosen.
    pub fn precision(&self) -> PrecisionKind {
        self.precision
    }

    /// The device chosen (`auto` already resolved).
    pub fn device(&self) -> DeviceKind {
        self.device
    }

    /// The deprecation notice for a legacy spelling (`16`, `"bf16"`), for the caller to show.
    pub fn notice(&self) -> Option<&str> {
        self.notice.as_deref()
    }

    /// Runs `job` with the `Trainer<P, D>` types of this selection.
    pub fn run<J: Job>(&self, job: J) -> Result<J::Output, Error> {
        run_cell(self.precision, self.device, job)
    }

    /// Runs `job` with the types of this selection and the device's kernels (see [`launch`]).
    pub fn launch<J: RunJob>(&self, job: J) -> Result<J::Output, Error> {
        self.run(OnBackend(job))?
    }
}

/// Maps a precision value and an accelerator string to their types and runs `job` with them.
///
/// Every error is a value: an unknown string lists the valid ones; a refused pair carries the
/// same explanation and advice as the compile error for the same types. A legacy spelling prints
/// Lightning's notice on stderr, as [`launch()`] does; [`Selection::parse`] returns it instead.
pub fn dispatch<'a, J: Job>(
    precision: impl Into<PrecisionInput<'a>>,
    accelerator: &str,
    job: J,
) -> Result<J::Output, Error> {
    Selection::parse_noted(precision, accelerator)?.run(job)
}

/// Text explaining why a cell is refused and what to use instead, with `{D}` filled in.
pub(crate) fn refusal(precision: PrecisionKind, device: DeviceKind) -> (String, String) {
    let (why, advice) = refusal_template(precision);
    let fill = |s: &str| s.replace("{D}", device.type_name());
    (fill(why), fill(advice))
}

/// The error for a refused cell, with the matrix's explanation and advice.
fn unsupported(precision: PrecisionKind, device: DeviceKind) -> Error {
    let (why, advice) = refusal(precision, device);
    Error::Unsupported {
        precision,
        device,
        why,
        advice,
        auto: None,
    }
}

macro_rules! support_matrix {
    ($(
        $(#[$doc:meta])*
        $kind:ident = $ty:ty => [$($dev:ident),*], gate $gate:ident,
        refused $why:literal, label $label:literal, instead $advice:literal;
    )*) => {
        $(support_matrix!(@row $(#[$doc])* $ty, [$($dev),*], $gate, $why, $label, $advice);)*

        const TABLE: [(PrecisionKind, &[DeviceKind]); PrecisionKind::ALL.len()] =
            [$((PrecisionKind::$kind, &[$(DeviceKind::$dev),*])),*];

        fn refusal_template(precision: PrecisionKind) -> (&'static str, &'static str) {
            match precision { $(PrecisionKind::$kind => ($why, $advice)),* }
        }

        fn run_cell<J: Job>(precision: PrecisionKind, device: DeviceKind, job: J) -> Result<J::Output, Error> {
            $(support_matrix!(@arms precision, device, job, $kind, $ty, [$($dev),*]);)*
            Err(unsupported(precision, device))
        }
    };
    (@row $(#[$doc:meta])* $ty:ty, [$($dev:ident),*], $gate:ident, $why:literal, $label:literal, $advice:literal) => {
        $(#[$doc])*
        #[diagnostic::on_unimplemented(message = $why, label = $label, note = $advice)]
        pub trait $gate<D> {}
        $(
            #[diagnostic::do_not_recommend]
            impl $gate<$dev> for ($ty, $dev) {}
        )*
        impl<D: WithBackend> Supports<$ty> for D where ($ty, D): $gate<D> {}
    };
    (@arms $p:ident, $d:ident, $job:ident, $kind:ident, $ty:ty, [$($dev:ident),*]) => {
        $(
            if $p == PrecisionKind::$kind && $d == DeviceKind::$dev {
                return Ok($job.run::<$ty, $dev>());
            }
        )*
    };
}

impl PrecisionKind {
    /// Whether this precision runs on `device`, by the support matrix.
    pub fn supported_on(self, device: DeviceKind) -> bool {
        TABLE
            .iter()
            .any(|(p, devices)| *p == self && devices.contains(&device))
    }
}

// THE SUPPORT MATRIX. One row per precision: the devices it runs on. A device missing from a row
// is a refused cell; the row's texts say why and what to use instead ({D} is the device).
support_matrix! {
    /// Devices that run 16-mixed. Missing: `Cpu` (fp16 autocast with loss scaling is a CUDA
    /// feature; CPUs get the same memory savings from bf16 without a scaler) and `Tpu` (XLA
    /// computes in bf16).
    Mixed16 = Mixed<F16> => [Gpu], gate RunsMixedF16,
        refused "16-mixed (`Mixed<F16>`) does not run on `{D}`: fp16 mixed precision with a dynamic gradient scaler needs a CUDA GPU",
        label "16-mixed is GPU-only",
        instead "use `Mixed<BF16>` (precision \"bf16-mixed\") on `{D}`, or run `Mixed<F16>` on `Gpu`";
    /// Devices that run bf16-mixed: all of them.
    MixedBf16 = Mixed<BF16> => [Cpu, Gpu, Tpu], gate RunsMixedBf16,
        refused "bf16-mixed (`Mixed<BF16>`) does not run on `{D}`",
        label "bf16-mixed is not available here",
        instead "use `True<F32>` (precision \"32-true\") on `{D}`";
    /// Devices that run 16-true: all of them.
    True16 = True<F16> => [Cpu, Gpu, Tpu], gate RunsTrueF16,
        refused "16-true (`True<F16>`) does not run on `{D}`",
        label "16-true is not available here",
        instead "use `True<F32>` (precision \"32-true\") on `{D}`";
    /// Devices that run bf16-true: all of them.
    TrueBf16 = True<BF16> => [Cpu, Gpu, Tpu], gate RunsTrueBf16,
        refused "bf16-true (`True<BF16>`) does not run on `{D}`",
        label "bf16-true is not available here",
        instead "use `True<F32>` (precision \"32-true\") on `{D}`";
    /// Devices that run 32-true: all of them.
    True32 = True<F32> => [Cpu, Gpu, Tpu], gate RunsTrueF32,
        refused "32-true (`True<F32>`) does not run on `{D}`",
        label "32-true is not available here",
        instead "use `True<F64>` (precision \"64-true\") on `{D}`";
    /// Devices that run 64-true. Missing: `Tpu` (TPUs have no float64 arithmetic).
    True64 = True<F64> => [Cpu, Gpu], gate RunsTrueF64,
        refused "64-true (`True<F64>`) does not run on `{D}`: TPUs have no float64 arithmetic",
        label "64-true is not available on TPUs",
        instead "use `True<F32>` (precision \"32-true\") on `{D}`, or run `True<F64>` on `Cpu` or `Gpu`";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_table_is_the_seed_table() {
        let yes: Vec<Vec<bool>> = PrecisionKind::ALL
            .iter()
            .map(|p| DeviceKind::ALL.iter().map(|d| p.supported_on(*d)).collect())
            .collect();
        let seed = [
            [false, true, false],
            [true, true, true],
            [true, true, true],
            [true, true, true],
            [true, true, true],
            [true, true, false],
        ];
        assert_eq!(yes, seed);
    }

    #[test]
    fn refusals_name_precision_device_and_alternative() {
        let (why, advice) = refusal(PrecisionKind::Mixed16, DeviceKind::Tpu);
        assert!(why.contains("16-mixed") && why.contains("`Tpu`"), "{why}");
        assert!(
            advice.contains("Mixed<BF16>") && advice.contains("bf16-mixed"),
            "{advice}"
        );
        let (why, advice) = refusal(PrecisionKind::True64, DeviceKind::Tpu);
        assert!(why.contains("64-true") && why.contains("`Tpu`"), "{why}");
        assert!(advice.contains("True<F32>"), "{advice}");
    }
}
