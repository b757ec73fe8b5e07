//! The [`Trainer`]: where a precision meets a device.

use core::marker::PhantomData;

use crate::device::DeviceKind;
use crate::{Error, Precision, Supports};

/// Trains models under the precision `P` on the device `D`, like Lightning's
/// `Trainer(precision=..., accelerator=...)`.
///
/// The bound `D: Supports<P>` sits on the type itself, so a refused pair cannot even be named:
/// `Trainer<Mixed<F16>, Cpu>` and `Trainer<True<F64>, Tpu>` are compile errors that say what to use
/// instead. Hardware presence is checked when the trainer is built.
///
/// ```
/// use nbit::prelude::*;
/// let trainer = Trainer::<True<F64>, Cpu>::new()?;
/// assert_eq!(trainer.precision_name(), "64-true");
/// assert!(Trainer::<True<F32>, Tpu>::new().unwrap_err().to_string().contains("no TPU runtime"));
/// # Ok::<(), nbit::Error>(())
/// ```
#[derive(Debug)]
pub struct Trainer<P: Precision, D: Supports<P>> {
    _types: PhantomData<fn() -> (P, D)>,
}

impl<P: Precision, D: Supports<P>> Trainer<P, D> {
    /// A trainer for `P` on `D`, or [`Error::DeviceUnavailable`] when the device is not usable in
    /// this process (no CUDA driver or device for `Gpu`; always for `Tpu`, which has no runtime yet).
    pub fn new() -> Result<Self, Error> {
        D::probe()?;
        Ok(Trainer { _types: PhantomData })
    }

    /// Lightning's name of the precision, e.g. `"bf16-mixed"`.
    pub fn precision_name(&self) -> &'static str {
        P::NAME
    }

    /// The device this trainer runs on.
    pub fn device(&self) -> DeviceKind {
        D::KIND
    }
}
