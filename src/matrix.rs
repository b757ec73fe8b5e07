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
//! - a *gate* trait for the precision (such as [`RunsMixedF16`]) implemented for exactly those
//!   devices, whose `#[diagnostic::on_unimplemented]` text explains a refused cell and names the
//!   nearest supported choice;
//! - `impl<D: Gate> Supports<Precision> for D`, so `Cpu: Supports<Mixed<F16>>` fails through the
//!   gate and rustc prints the gate's text;
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

use crate::backend::{Backend, BackendJob, WithBackend};
use crate::device::{Cpu, DeviceKind, Gpu, Tpu, parse_accelerator};
use crate::dtype::{BF16, F16, F32, F64};
use crate::precision::{Mixed, PrecisionInput, PrecisionKind, True, parse_precision};
use crate::{Error, Precision};

/// `Self` (a device) can train under the precision `P`.
///
/// Implemented by the table in this module for the built-in precisions, and by users for their
/// own precisions. [`Trainer<P, D>`](crate::Trainer) requires it, so naming a trainer for a
/// refused cell does not compile:
///
/// ```compile_fail,E0277
/// use nbit::prelude::*;
/// // error: 16-mixed (`Mixed<F16>`) does not run on `Cpu` ... use `Mixed<BF16>` ...
/// let trainer = Trainer::<Mixed<F16>, Cpu>::new();
/// ```
///
/// Generic code states the bound once:
///
/// ```
/// use nbit::prelude::*;
/// fn describe<P: Precision, D: Supports<P>>(_: &Trainer<P, D>) -> String {
///     format!("{} on {}", P::NAME, D::KIND)
/// }
/// let t = Trainer::<Mixed<BF16>, Cpu>::new()?;
/// assert_eq!(describe(&t), "bf16-mixed on cpu");
/// # Ok::<(), nbit::Error>(())
/// ```
#[diagnostic::on_unimplemented(
    message = "the precision `{P}` is not supported on `{Self}`",
    label = "`{P}` cannot run on `{Self}`",
    note = "a precision runs on a device only where `Supports<{P}>` is implemented for it; \
            the built-in table is in `nbit::matrix`"
)]
pub trait Supports<P: Precision>: WithBackend {}

/// `Self` (a device) may train under `P` *and* nbit has its kernels: [`Supports<P>`] plus
/// [`Backend`]. The one bound generic training code needs:
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
/// `Supports` is the matrix (what may run where, checked for every device type); `Runs` is what
/// this build of nbit can run: every allowed cell of `Cpu` today. `Gpu` and `Tpu` have no backend
/// yet, so `Runs<_>` is not implemented for them; [`launch`] turns a run-time choice of those into
/// the device's error instead.
pub trait Runs<P: Precision>: Supports<P> + Backend {}

impl<P: Precision, D: Supports<P> + Backend> Runs<P> for D {}

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
        D::with_backend(WithPrecision::<J, P>(self.0, core::marker::PhantomData))?
    }
}

struct WithPrecision<J, P>(J, core::marker::PhantomData<P>);

impl<J: RunJob, P: Precision, D: Supports<P>> BackendJob<D> for WithPrecision<J, P> {
    type Output = Result<J::Output, Error>;
    fn run(self) -> Self::Output
    where
        D: Backend,
    {
        self.0.run::<P, D>()
    }
}

/// Parses a precision and an accelerator as [`dispatch`] does, then runs `job` with the types
/// and the device's kernels. Errors: an unknown string, a refused cell (with advice), or a device
/// this build cannot run (no backend, no hardware), each as a value.
pub fn launch<'a, J: RunJob>(
    precision: impl Into<PrecisionInput<'a>>,
    accelerator: &str,
    job: J,
) -> Result<J::Output, Error> {
    Selection::parse(precision, accelerator)?.launch(job)
}

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
/// same explanation and advice as the compile error for the same types. Use [`Selection::parse`]
/// to see the notice Lightning prints for legacy spellings.
pub fn dispatch<'a, J: Job>(
    precision: impl Into<PrecisionInput<'a>>,
    accelerator: &str,
    job: J,
) -> Result<J::Output, Error> {
    Selection::parse(precision, accelerator)?.run(job)
}

/// Text explaining why a cell is refused and what to use instead, with `{Self}` filled in.
pub(crate) fn refusal(precision: PrecisionKind, device: DeviceKind) -> (String, String) {
    let (why, advice) = refusal_template(precision);
    let fill = |s: &str| s.replace("{Self}", device.type_name());
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
        pub trait $gate: WithBackend {}
        $(impl $gate for $dev {})*
        impl<D: $gate> Supports<$ty> for D {}
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
// is a refused cell; the row's texts say why and what to use instead ({Self} is the device).
support_matrix! {
    /// Devices that run 16-mixed. Missing: `Cpu` (fp16 autocast with loss scaling is a CUDA
    /// feature; CPUs get the same memory savings from bf16 without a scaler) and `Tpu` (XLA
    /// computes in bf16).
    Mixed16 = Mixed<F16> => [Gpu], gate RunsMixedF16,
        refused "16-mixed (`Mixed<F16>`) does not run on `{Self}`: fp16 mixed precision with a dynamic gradient scaler needs a CUDA GPU",
        label "16-mixed is GPU-only",
        instead "use `Mixed<BF16>` (precision \"bf16-mixed\") on `{Self}`, or run `Mixed<F16>` on `Gpu`";
    /// Devices that run bf16-mixed: all of them.
    MixedBf16 = Mixed<BF16> => [Cpu, Gpu, Tpu], gate RunsMixedBf16,
        refused "bf16-mixed (`Mixed<BF16>`) does not run on `{Self}`",
        label "bf16-mixed is not available here",
        instead "use `True<F32>` (precision \"32-true\") on `{Self}`";
    /// Devices that run 16-true: all of them.
    True16 = True<F16> => [Cpu, Gpu, Tpu], gate RunsTrueF16,
        refused "16-true (`True<F16>`) does not run on `{Self}`",
        label "16-true is not available here",
        instead "use `True<F32>` (precision \"32-true\") on `{Self}`";
    /// Devices that run bf16-true: all of them.
    TrueBf16 = True<BF16> => [Cpu, Gpu, Tpu], gate RunsTrueBf16,
        refused "bf16-true (`True<BF16>`) does not run on `{Self}`",
        label "bf16-true is not available here",
        instead "use `True<F32>` (precision \"32-true\") on `{Self}`";
    /// Devices that run 32-true: all of them.
    True32 = True<F32> => [Cpu, Gpu, Tpu], gate RunsTrueF32,
        refused "32-true (`True<F32>`) does not run on `{Self}`",
        label "32-true is not available here",
        instead "use `True<F64>` (precision \"64-true\") on `{Self}`";
    /// Devices that run 64-true. Missing: `Tpu` (TPUs have no float64 arithmetic).
    True64 = True<F64> => [Cpu, Gpu], gate RunsTrueF64,
        refused "64-true (`True<F64>`) does not run on `{Self}`: TPUs have no float64 arithmetic",
        label "64-true is not available on TPUs",
        instead "use `True<F32>` (precision \"32-true\") on `{Self}`, or run `True<F64>` on `Cpu` or `Gpu`";
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
