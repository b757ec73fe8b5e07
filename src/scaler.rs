//! Gradient scalers, chosen statically by [`Precision::Scaler`](crate::Precision::Scaler).
//!
//! `Mixed<F16>` gets [`DynamicScaler`], PyTorch's `torch.amp.GradScaler` algorithm; every other
//! built-in precision gets the zero-sized [`NoScaler`], whose methods compile to nothing, so the
//! training loop never branches on the precision.
//!
//! ```
//! use nbit::scaler::{DynamicScaler, GradScaler};
//!
//! // PyTorch's defaults: init_scale 2^16, growth 2.0, backoff 0.5, growth_interval 2000.
//! let mut s = DynamicScaler::default();
//! assert_eq!(s.scale(), 65536.0);
//! s.update(true); // a step with inf/NaN gradients halves the scale
//! assert_eq!(s.scale(), 32768.0);
//! ```

use core::fmt::Debug;

/// What the training loop asks of a gradient scaler. Implemented by [`DynamicScaler`] and
/// [`NoScaler`]; a custom precision may bring its own.
pub trait GradScaler: Clone + Debug + Default + Send + Sync + 'static {
    /// `false` for scalers that never scale, so the loop can skip the inf/NaN scan at compile time.
    const ENABLED: bool;
    /// The factor the loss is multiplied by before backward.
    fn scale(&self) -> f32;
    /// Records the outcome of one optimizer step: `found_inf` is true when any scaled gradient was
    /// inf or NaN (and the optimizer step was skipped).
    fn update(&mut self, found_inf: bool);
    /// The state a checkpoint keeps (`None` for scalers without state).
    fn state(&self) -> Option<ScalerState> {
        None
    }
    /// Restores a state saved by [`GradScaler::state`].
    fn load_state(&mut self, _state: &ScalerState) {}
}

/// A dynamic scaler's checkpointed state: PyTorch's `GradScaler.state_dict()` fields.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ScalerState {
    /// The current scale.
    pub scale: f32,
    /// The growth factor (f64, as PyTorch's `_amp_update_scale_` takes it).
    pub growth_factor: f64,
    /// The backoff factor (f64).
    pub backoff_factor: f64,
    /// Finite steps needed to grow.
    pub growth_interval: u32,
    /// Consecutive finite steps so far.
    pub growth_tracker: u32,
}

/// The scaler of every precision that needs none (bf16, true precisions). Zero-sized; scale is 1.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NoScaler;

impl GradScaler for NoScaler {
    const ENABLED: bool = false;
    #[inline(always)]
    fn scale(&self) -> f32 {
        1.0
    }
    #[inline(always)]
    fn update(&mut self, _found_inf: bool) {}
}

/// PyTorch's dynamic loss scaler (`torch.amp.GradScaler`), step for step.
///
/// On a step with non-finite gradients the scale is multiplied by `backoff_factor` and the growth
/// tracker resets. After `growth_interval` consecutive finite steps the scale is multiplied by
/// `growth_factor`, but only if the result is finite in f32; the tracker resets either way.
/// PyTorch has no lower bound on the scale; [`DynamicScaler::with_min_scale`] adds one (off by
/// default).
///
/// The factors are f64 and each update multiplies the f32 scale by one of them in f64 and rounds
/// once to f32, as `torch._amp_update_scale_` does: with init 1000, growth 1.1, backoff 0.9 and
/// interval 2, the found-inf flags 1,0,0,1,0,0 end at 980.09998 (`0x44750666`), where f32 factors
/// would give 980.10004.
///
/// ```
/// use nbit::scaler::{DynamicScaler, GradScaler};
/// let mut s = DynamicScaler::new(1000.0, 1.1, 0.9, 2);
/// for inf in [true, false, false, true, false, false] {
///     s.update(inf);
/// }
/// assert_eq!(s.scale().to_bits(), 0x4475_0666);
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct DynamicScaler {
    scale: f32,
    growth_factor: f64,
    backoff_factor: f64,
    growth_interval: u32,
    growth_tracker: u32,
    min_scale: Option<f32>,
}

impl Default for DynamicScaler {
    /// PyTorch's defaults: init_scale 65536, growth 2.0, backoff 0.5, growth_interval 2000.
    fn default() -> Self {
        Self::new(65536.0, 2.0, 0.5, 2000)
    }
}

impl DynamicScaler {
    /// A scaler with PyTorch's four parameters.
    ///
    /// # Panics
    /// If `init_scale` is not finite and positive, `growth_factor <= 1`, `backoff_factor` is not in
    /// (0, 1), or `growth_interval` is 0. [`DynamicScaler::try_new`] returns these as errors.
    pub fn new(init_scale: f32, growth_factor: f64, backoff_factor: f64, growth_interval: u32) -> Self {
        match Self::try_new(init_scale, growth_factor, backoff_factor, growth_interval) {
            Ok(s) => s,
            Err(e) => panic!("{e}"),
        }
    }

    /// Like [`DynamicScaler::new`], returning bad parameters as an error that names them.
    pub fn try_new(
        init_scale: f32,
        growth_factor: f64,
        backoff_factor: f64,
        growth_interval: u32,
    ) -> Result<Self, crate::Error> {
        let bad = |name: &'static str, value: String, expected: &'static str| {
            Err(crate::Error::InvalidArgument {
                name,
                value,
                expected,
            })
        };
        if !(init_scale.is_finite() && init_scale > 0.0) {
            return bad("init_scale", init_scale.to_string(), "a finite number > 0");
        }
        if !(growth_factor.is_finite() && growth_factor > 1.0) {
            return bad("growth_factor", growth_factor.to_string(), "a finite number > 1");
        }
        if !(backoff_factor > 0.0 && backoff_factor < 1.0) {
            return bad("backoff_factor", backoff_factor.to_string(), "a number in (0, 1)");
        }
        if growth_interval == 0 {
            return bad("growth_interval", "0".into(), "at least 1");
        }
        Ok(Self {
            scale: init_scale,
            growth_factor,
            backoff_factor,
            growth_interval,
            growth_tracker: 0,
            min_scale: None,
        })
    }

    /// Never back off below `min_scale` (jmp uses 1.0). PyTorch has no floor.
    pub fn with_min_scale(mut self, min_scale: f32) -> Self {
        self.min_scale = Some(min_scale);
        self.scale = self.scale.max(min_scale);
        self
    }

    /// Consecutive finite steps since the last growth or backoff.
    pub fn growth_tracker(&self) -> u32 {
        self.growth_tracker
    }

    /// The multiplier applied on growth.
    pub fn growth_factor(&self) -> f64 {
        self.growth_factor
    }

    /// The multiplier applied on a non-finite step.
    pub fn backoff_factor(&self) -> f64 {
        self.backoff_factor
    }

    /// Finite steps needed before the scale grows.
    pub fn growth_interval(&self) -> u32 {
        self.growth_interval
    }

    /// The floor set by [`DynamicScaler::with_min_scale`], if any.
    pub fn min_scale(&self) -> Option<f32> {
        self.min_scale
    }
}

impl GradScaler for DynamicScaler {
    const ENABLED: bool = true;

    #[inline]
    fn scale(&self) -> f32 {
        self.scale
    }

    fn state(&self) -> Option<ScalerState> {
        Some(ScalerState {
            scale: self.scale,
            growth_factor: self.growth_factor,
            backoff_factor: self.backoff_factor,
            growth_interval: self.growth_interval,
            growth_tracker: self.growth_tracker,
        })
    }

    fn load_state(&mut self, s: &ScalerState) {
        self.scale = s.scale;
        self.growth_factor = s.growth_factor;
        self.backoff_factor = s.backoff_factor;
        self.growth_interval = s.growth_interval;
        self.growth_tracker = s.growth_tracker;
    }

    fn update(&mut self, found_inf: bool) {
        // f32 scale times f64 factor, rounded once to f32 (PyTorch's CPU and CUDA kernels).
        if found_inf {
            self.scale = (self.scale as f64 * self.backoff_factor) as f32;
            if let Some(floor) = self.min_scale {
                self.scale = self.scale.max(floor);
            }
            self.growth_tracker = 0;
            return;
        }
        let successful = self.growth_tracker + 1;
        if successful == self.growth_interval {
            let grown = (self.scale as f64 * self.growth_factor) as f32;
            if grown.is_finite() {
                self.scale = grown;
            }
            self.growth_tracker = 0;
        } else {
            self.growth_tracker = successful;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reproduces_pytorch_test_vector() {
        let mut s = DynamicScaler::new(65536.0, 2.0, 0.5, 3);
        let mut scales = vec![];
        let mut trackers = vec![];
        for found_inf in [true, false, false, false, false, true] {
            s.update(found_inf);
            scales.push(s.scale());
            trackers.push(s.growth_tracker());
        }
        assert_eq!(scales, [32768.0, 32768.0, 32768.0, 65536.0, 65536.0, 32768.0]);
        assert_eq!(trackers, [0, 1, 2, 0, 1, 0]);
    }

    #[test]
    fn refuses_growth_that_overflows_f32() {
        let mut s = DynamicScaler::new(f32::MAX / 1.5, 2.0, 0.5, 1);
        s.update(false);
        assert_eq!(s.scale(), f32::MAX / 1.5);
        assert_eq!(s.growth_tracker(), 0);
    }

    #[test]
    fn backs_off_without_floor_unless_asked() {
        let mut s = DynamicScaler::new(1.0, 2.0, 0.5, 2000);
        for _ in 0..200 {
            s.update(true);
        }
        assert_eq!(s.scale(), 0.0, "PyTorch has no floor: 0.5^200 underflows f32");
        let mut s = DynamicScaler::new(4.0, 2.0, 0.5, 2000).with_min_scale(1.0);
        for _ in 0..10 {
            s.update(true);
        }
        assert_eq!(s.scale(), 1.0);
    }

    #[test]
    fn bad_parameters_are_errors_naming_them() {
        let e = DynamicScaler::try_new(65536.0, 0.9, 0.5, 10)
            .unwrap_err()
            .to_string();
        assert!(e.contains("growth_factor") && e.contains("0.9"), "{e}");
        let e = DynamicScaler::try_new(f32::NAN, 2.0, 0.5, 10)
            .unwrap_err()
            .to_string();
        assert!(e.contains("init_scale") && e.contains("NaN"), "{e}");
    }

    #[test]
    fn no_scaler_is_zero_sized_and_inert() {
        assert_eq!(core::mem::size_of::<NoScaler>(), 0);
        let mut s = NoScaler;
        s.update(true);
        assert_eq!(s.scale(), 1.0);
    }
}
