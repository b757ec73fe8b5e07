//! Optimizers and learning-rate schedulers with PyTorch's update formulas and defaults.
//!
//! State lives in the parameters' storage dtype: f32 under the mixed precisions (f32 master
//! weights), `H` under `True<H>`. Updates are computed in f32 (f64 for f64 parameters) and rounded
//! where PyTorch's single-tensor implementations round: once per in-place tensor op, into the
//! dtype of the tensor it writes (`tests/pytorch_reference.rs` compares f32 and bf16 AdamW with
//! PyTorch's own output bit for bit). A parameter whose gradient is `None` in a step is skipped,
//! as PyTorch skips one whose `.grad` is None, and AdamW counts steps per parameter.
//!
//! One deliberate difference from PyTorch: under `True<F16>`, AdamW's second moment
//! (`exp_avg_sq`, about `0.001 g²`) is stored in f32 ([`Float::Moment`]). In f16 it underflows
//! to 0 for |g| below about 8e-3, and the next step divides the first moment by `eps` alone: the
//! weights jump, and PyTorch's 16-true AdamW diverges to NaN on the quickstart's data. The first
//! moment stays in f16; bf16 has f32's range and keeps both moments in bf16.
//!
//! ```
//! use nbit::optim::{AdamW, Optimization, Scheduler, Sgd};
//! let o = Optimization::new(Sgd::new(0.1).momentum(0.9)).with_scheduler(Scheduler::step_lr(10, 0.5));
//! assert_eq!(o.scheduler.unwrap().lr(0.1, 20), 0.025);
//! assert_eq!(AdamW::default().lr, 1e-3);
//! ```

use std::collections::HashMap;

pub use crate::backend::UpdateRounding;
use crate::backend::{AdamWStep, Backend, SgdStep, mix64};
use crate::dtype::Float;
use crate::error::Error;
use crate::tensor::Parameter;
use crate::tensor::Tensor;

/// `torch.optim.SGD`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sgd {
    /// Learning rate.
    pub lr: f64,
    /// Momentum factor (default 0).
    pub momentum: f64,
    /// Dampening for momentum (default 0).
    pub dampening: f64,
    /// Nesterov momentum (default false).
    pub nesterov: bool,
    /// L2 penalty (default 0).
    pub weight_decay: f64,
}

impl Sgd {
    /// Plain SGD with learning rate `lr` and PyTorch's other defaults.
    pub fn new(lr: f64) -> Self {
        Sgd {
            lr,
            momentum: 0.0,
            dampening: 0.0,
            nesterov: false,
            weight_decay: 0.0,
        }
    }
    /// Sets the momentum.
    pub fn momentum(mut self, m: f64) -> Self {
        self.momentum = m;
        self
    }
    /// Sets the dampening.
    pub fn dampening(mut self, d: f64) -> Self {
        self.dampening = d;
        self
    }
    /// Enables Nesterov momentum.
    pub fn nesterov(mut self, on: bool) -> Self {
        self.nesterov = on;
        self
    }
    /// Sets the weight decay.
    pub fn weight_decay(mut self, wd: f64) -> Self {
        self.weight_decay = wd;
        self
    }
}

/// `torch.optim.AdamW` (decoupled weight decay).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamW {
    /// Learning rate (default 1e-3).
    pub lr: f64,
    /// `(beta1, beta2)` (default (0.9, 0.999)).
    pub betas: (f64, f64),
    /// Denominator term (default 1e-8).
    pub eps: f64,
    /// Decoupled weight decay (default 1e-2).
    pub weight_decay: f64,
}

impl Default for AdamW {
    fn default() -> Self {
        AdamW {
            lr: 1e-3,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 1e-2,
        }
    }
}

impl AdamW {
    /// AdamW with learning rate `lr` and PyTorch's other defaults.
    pub fn new(lr: f64) -> Self {
        AdamW {
            lr,
            ..Self::default()
        }
    }
    /// Sets the weight decay.
    pub fn weight_decay(mut self, wd: f64) -> Self {
        self.weight_decay = wd;
        self
    }
}

/// An optimizer choice.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Optimizer {
    /// Stochastic gradient descent.
    Sgd(Sgd),
    /// Adam with decoupled weight decay.
    AdamW(AdamW),
}

impl From<Sgd> for Optimizer {
    fn from(o: Sgd) -> Self {
        Optimizer::Sgd(o)
    }
}

impl From<AdamW> for Optimizer {
    fn from(o: AdamW) -> Self {
        Optimizer::AdamW(o)
    }
}

impl Optimizer {
    /// The base learning rate.
    pub fn lr(&self) -> f64 {
        match self {
            Optimizer::Sgd(o) => o.lr,
            Optimizer::AdamW(o) => o.lr,
        }
    }

    /// PyTorch's name, as stored in checkpoints.
    pub fn name(&self) -> &'static str {
        match self {
            Optimizer::Sgd(_) => "SGD",
            Optimizer::AdamW(_) => "AdamW",
        }
    }

    /// Checks the hyperparameters as PyTorch's constructors do.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |name, value: f64, expected| {
            Err(Error::InvalidArgument {
                name,
                value: value.to_string(),
                expected,
            })
        };
        if !(self.lr() >= 0.0 && self.lr().is_finite()) {
            return bad("lr", self.lr(), "a finite learning rate >= 0");
        }
        match *self {
            Optimizer::Sgd(o) => {
                if o.momentum.is_nan() || o.momentum < 0.0 {
                    return bad("momentum", o.momentum, "a momentum >= 0");
                }
                if o.weight_decay.is_nan() || o.weight_decay < 0.0 {
                    return bad("weight_decay", o.weight_decay, "a weight decay >= 0");
                }
                if o.nesterov && (o.momentum <= 0.0 || o.dampening != 0.0) {
                    return bad(
                        "momentum",
                        o.momentum,
                        "momentum > 0 and dampening 0 for Nesterov momentum",
                    );
                }
            }
            Optimizer::AdamW(o) => {
                for (name, b) in [("beta1", o.betas.0), ("beta2", o.betas.1)] {
                    if !(0.0..1.0).contains(&b) {
                        return bad(name, b, "a beta in [0, 1)");
                    }
                }
                if o.eps.is_nan() || o.eps < 0.0 {
                    return bad("eps", o.eps, "an eps >= 0");
                }
                if o.weight_decay.is_nan() || o.weight_decay < 0.0 {
                    return bad("weight_decay", o.weight_decay, "a weight decay >= 0");
                }
            }
        }
        Ok(())
    }
}

/// When a scheduler steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Interval {
    /// After every epoch (Lightning's default).
    Epoch,
    /// After every optimizer step that was not skipped by the gradient scaler.
    Step,
}

/// A learning-rate schedule, as a closed form of the number of scheduler steps taken.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Scheduler {
    /// `torch.optim.lr_scheduler.StepLR`: multiply by `gamma` every `step_size` steps.
    StepLr {
        /// Steps between decays.
        step_size: u64,
        /// The decay factor.
        gamma: f64,
        /// When it steps.
        interval: Interval,
    },
    /// `torch.optim.lr_scheduler.CosineAnnealingLR`: from the base rate down to `eta_min` over
    /// `t_max` steps.
    CosineAnnealing {
        /// The half-period in steps.
        t_max: u64,
        /// The minimum learning rate.
        eta_min: f64,
        /// When it steps.
        interval: Interval,
    },
}

impl Scheduler {
    /// StepLR stepping per epoch.
    pub fn step_lr(step_size: u64, gamma: f64) -> Self {
        Scheduler::StepLr {
            step_size: step_size.max(1),
            gamma,
            interval: Interval::Epoch,
        }
    }

    /// Cosine annealing stepping per epoch.
    pub fn cosine(t_max: u64, eta_min: f64) -> Self {
        Scheduler::CosineAnnealing {
            t_max: t_max.max(1),
            eta_min,
            interval: Interval::Epoch,
        }
    }

    /// The same schedule stepping at `interval`.
    pub fn every(self, interval: Interval) -> Self {
        match self {
            Scheduler::StepLr { step_size, gamma, .. } => Scheduler::StepLr {
                step_size,
                gamma,
                interval,
            },
            Scheduler::CosineAnnealing { t_max, eta_min, .. } => Scheduler::CosineAnnealing {
                t_max,
                eta_min,
                interval,
            },
        }
    }

    /// When this scheduler steps.
    pub fn interval(&self) -> Interval {
        match self {
            Scheduler::StepLr { interval, .. } | Scheduler::CosineAnnealing { interval, .. } => *interval,
        }
    }

    /// The learning rate after `t` scheduler steps from base rate `base`.
    pub fn lr(&self, base: f64, t: u64) -> f64 {
        match *self {
            Scheduler::StepLr { step_size, gamma, .. } => base * gamma.powi((t / step_size) as i32),
            Scheduler::CosineAnnealing { t_max, eta_min, .. } => {
                eta_min
                    + (base - eta_min) * (1.0 + (core::f64::consts::PI * t as f64 / t_max as f64).cos()) / 2.0
            }
        }
    }
}

/// What `configure_optimizers` returns: an optimizer and an optional scheduler.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Optimization {
    /// The optimizer.
    pub optimizer: Optimizer,
    /// The learning-rate scheduler, if any.
    pub scheduler: Option<Scheduler>,
    /// How updated 16-bit weights are rounded (default: to nearest, as PyTorch).
    pub update_rounding: UpdateRounding,
}

impl Optimization {
    /// An optimizer without a scheduler, rounding updates to nearest.
    pub fn new(optimizer: impl Into<Optimizer>) -> Self {
        Optimization {
            optimizer: optimizer.into(),
            scheduler: None,
            update_rounding: UpdateRounding::Nearest,
        }
    }

    /// Adds a scheduler.
    pub fn with_scheduler(mut self, s: Scheduler) -> Self {
        self.scheduler = Some(s);
        self
    }

    /// Rounds updated 16-bit weights as `rounding` says (bf16-true and 16-true only).
    ///
    /// ```
    /// use nbit::optim::{AdamW, Optimization, UpdateRounding};
    /// let o = Optimization::new(AdamW::default()).update_rounding(UpdateRounding::Compensated);
    /// assert_eq!(o.state_bytes_per_parameter::<half::bf16>(), 6); // exp_avg, exp_avg_sq, compensation
    /// ```
    pub fn update_rounding(mut self, rounding: UpdateRounding) -> Self {
        self.update_rounding = rounding;
        self
    }

    /// Bytes of optimizer state per parameter of type `E` once every parameter has stepped:
    /// AdamW's two moments, SGD's momentum buffer when momentum is used, and the compensation
    /// buffer under [`UpdateRounding::Compensated`].
    pub fn state_bytes_per_parameter<E: Float>(&self) -> usize {
        let (e, moment) = (
            E::DTYPE.size_bytes(),
            <E::Moment as crate::Element>::DTYPE.size_bytes(),
        );
        let optimizer = match self.optimizer {
            Optimizer::AdamW(_) => e + moment,
            Optimizer::Sgd(o) if o.momentum != 0.0 => e,
            Optimizer::Sgd(_) => 0,
        };
        optimizer + e * usize::from(self.update_rounding == UpdateRounding::Compensated)
    }
}

/// The state of one parameter, named as PyTorch's optimizer `state_dict` names it.
#[derive(Clone, Debug)]
enum Slot<E: Float, D: Backend> {
    /// No state yet (before the first step) or none needed (plain SGD).
    Empty,
    /// SGD's `momentum_buffer`.
    Momentum(Tensor<E, D>),
    /// AdamW's `exp_avg`, `exp_avg_sq` (in `E::Moment`) and `step`, the number of updates this
    /// parameter has had (PyTorch keeps it per parameter: a step without a gradient skips it).
    Adam(Tensor<E, D>, Tensor<E::Moment, D>, u64),
}

/// Optimizer state as named tensors, for checkpoints: `(name, tensor)` in the parameters' dtype
/// and in the second-moment dtype.
pub(crate) type Exported<E, D> = (
    Vec<(String, Tensor<E, D>)>,
    Vec<(String, Tensor<<E as Float>::Moment, D>)>,
    HashMap<String, String>,
);

/// The checkpoint metadata key of [`OptimizerState::settings`].
pub(crate) const SETTINGS: &str = "optimizer_settings";

/// An optimizer with its per-parameter state.
#[derive(Clone, Debug)]
pub struct OptimizerState<E: Float, D: Backend> {
    config: Optimization,
    slots: Vec<Slot<E, D>>,
    /// The compensation buffers of [`UpdateRounding::Compensated`], made at a parameter's first
    /// update.
    compensation: Vec<Option<Tensor<E, D>>>,
    names: Vec<String>,
    steps: u64,
    scheduler_steps: u64,
    seed: u64,
}

impl<E: Float, D: Backend> OptimizerState<E, D> {
    /// Fresh state for parameters `params`.
    /// Fresh state for parameters `params`. An update rounding other than nearest on parameters
    /// that are not 16-bit is an error naming the precisions where it applies.
    pub fn new(config: Optimization, params: &[&Parameter<E, D>]) -> Result<Self, Error> {
        config.optimizer.validate()?;
        let sixteen_bit = E::DTYPE.size_bytes() == 2;
        if config.update_rounding != UpdateRounding::Nearest && !sixteen_bit {
            return Err(Error::InvalidArgument {
                name: "update_rounding",
                value: format!("'{}' with {} parameters", config.update_rounding, E::DTYPE),
                expected: "'nearest': compensated and stochastic rounding apply to 16-bit parameters, \
                           under bf16-true and 16-true (32-true, 64-true and the mixed precisions keep \
                           f32 or f64 weights, which need neither)",
            });
        }
        Ok(OptimizerState {
            config,
            slots: vec![Slot::Empty; params.len()],
            compensation: vec![None; params.len()],
            names: params.iter().map(|p| p.name().to_owned()).collect(),
            steps: 0,
            scheduler_steps: 0,
            seed: 0,
        })
    }

    /// Seeds the stochastic-rounding draws (the trainer passes its seed).
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// The configuration.
    pub fn config(&self) -> &Optimization {
        &self.config
    }

    /// The learning rate in effect now.
    pub fn lr(&self) -> f64 {
        let base = self.config.optimizer.lr();
        self.config
            .scheduler
            .map_or(base, |s| s.lr(base, self.scheduler_steps))
    }

    /// Optimizer steps taken (skipped steps are not counted, as in PyTorch).
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Scheduler steps taken.
    pub fn scheduler_steps(&self) -> u64 {
        self.scheduler_steps
    }

    /// Advances the scheduler if it steps at `interval`.
    pub fn scheduler_step(&mut self, interval: Interval) {
        if self.config.scheduler.is_some_and(|s| s.interval() == interval) {
            self.scheduler_steps += 1;
        }
    }

    /// Bytes of optimizer state held (compensation buffers included).
    pub fn state_bytes(&self) -> usize {
        let (e, m) = (
            E::DTYPE.size_bytes(),
            <E::Moment as crate::Element>::DTYPE.size_bytes(),
        );
        let slots: usize = self
            .slots
            .iter()
            .map(|s| match s {
                Slot::Empty => 0,
                Slot::Momentum(b) => b.numel() * e,
                Slot::Adam(a, v, _) => a.numel() * e + v.numel() * m,
            })
            .sum();
        slots
            + self
                .compensation
                .iter()
                .flatten()
                .map(|c| c.numel() * e)
                .sum::<usize>()
    }

    /// Updates every parameter from its gradient (`grads[i]` for `params[i]`). A parameter whose
    /// gradient is `None` (the loss did not use it) is not touched: no weight decay, no momentum,
    /// no moment decay, as PyTorch skips parameters whose `.grad` is None. A gradient whose shape
    /// differs from its parameter's is an error, and then nothing is updated.
    pub fn step(
        &mut self,
        params: &mut [&mut Parameter<E, D>],
        grads: &[Option<Tensor<E, D>>],
    ) -> Result<(), Error> {
        if params.len() != grads.len() || params.len() != self.slots.len() {
            return Err(Error::InvalidArgument {
                name: "grads",
                value: format!("{} gradients for {} parameters", grads.len(), params.len()),
                expected: "one gradient (or None) per parameter the optimizer was created for",
            });
        }
        for (p, g) in params.iter().zip(grads) {
            if let Some(g) = g.as_ref().filter(|g| g.shape() != p.value().shape()) {
                return Err(Error::ShapeMismatch {
                    op: "optimizer step",
                    left: p.value().shape().to_vec(),
                    right: g.shape().to_vec(),
                    rule: "a gradient has the shape of its parameter",
                });
            }
        }
        let lr = self.lr();
        self.steps += 1;
        let rounding = self.config.update_rounding;
        let slots = self.slots.iter_mut().zip(&mut self.compensation);
        for (i, ((p, g), (slot, comp))) in params.iter_mut().zip(grads).zip(slots).enumerate() {
            let Some(g) = g else { continue };
            let param = p.value_mut().storage_mut();
            if rounding == UpdateRounding::Compensated && comp.is_none() {
                *comp = Some(Tensor::zeros(g.shape()));
            }
            let comp = comp.as_mut().map(|c| c.storage_mut());
            // A key per (seed, parameter, step): the draws repeat across runs and resumes.
            let noise_key = mix64(self.seed ^ mix64(((i as u64) << 40) ^ self.steps));
            match self.config.optimizer {
                Optimizer::Sgd(o) => {
                    let first = matches!(slot, Slot::Empty);
                    if first && o.momentum != 0.0 {
                        *slot = Slot::Momentum(Tensor::zeros(g.shape()));
                    }
                    let hp = SgdStep {
                        lr,
                        momentum: o.momentum,
                        dampening: o.dampening,
                        nesterov: o.nesterov,
                        weight_decay: o.weight_decay,
                        first,
                        rounding,
                        noise_key,
                    };
                    let buf = match slot {
                        Slot::Momentum(b) => Some(b.storage_mut()),
                        _ => None,
                    };
                    D::sgd_step(param, g.storage(), buf, comp, &hp);
                }
                Optimizer::AdamW(o) => {
                    if matches!(slot, Slot::Empty) {
                        *slot = Slot::Adam(Tensor::zeros(g.shape()), Tensor::zeros(g.shape()), 0);
                    }
                    if let Slot::Adam(m, v, step) = slot {
                        *step += 1;
                        let hp = AdamWStep {
                            lr,
                            beta1: o.betas.0,
                            beta2: o.betas.1,
                            eps: o.eps,
                            weight_decay: o.weight_decay,
                            step: *step,
                            rounding,
                            noise_key,
                        };
                        let (m, v) = (m.storage_mut(), v.storage_mut());
                        D::adamw_step(param, g.storage(), m, v, comp, &hp);
                    }
                }
            }
        }
        Ok(())
    }

    /// The optimizer, its settings, the scheduler and the update rounding, as a checkpoint
    /// records them (under [`SETTINGS`]) to compare on resume.
    pub(crate) fn settings(&self) -> String {
        let mut kv: Vec<(&str, String)> = match self.config.optimizer {
            Optimizer::Sgd(o) => vec![
                ("lr", o.lr.to_string()),
                ("momentum", o.momentum.to_string()),
                ("dampening", o.dampening.to_string()),
                ("nesterov", o.nesterov.to_string()),
                ("weight_decay", o.weight_decay.to_string()),
            ],
            Optimizer::AdamW(o) => vec![
                ("lr", o.lr.to_string()),
                ("betas", format!("({}, {})", o.betas.0, o.betas.1)),
                ("eps", o.eps.to_string()),
                ("weight_decay", o.weight_decay.to_string()),
            ],
        };
        let scheduler = self.config.scheduler.map_or("none".into(), |s| format!("{s:?}"));
        kv.push(("scheduler", scheduler));
        kv.push(("update_rounding", self.config.update_rounding.name().into()));
        kv.iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// The settings that differ between two [`OptimizerState::settings`] strings, as
    /// `lr 0.01 -> 0.001`.
    pub(crate) fn settings_changes(theirs: &str, ours: &str) -> Vec<String> {
        let pairs = |s: &str| -> Vec<(String, String)> {
            s.split("; ")
                .map(|kv| kv.split_once('=').unwrap_or((kv, "")))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect()
        };
        let (theirs, ours) = (pairs(theirs), pairs(ours));
        let mut changes: Vec<String> = ours
            .iter()
            .filter_map(|(k, v)| match theirs.iter().find(|(tk, _)| tk == k) {
                Some((_, tv)) if tv != v => Some(format!("{k} {tv} -> {v}")),
                None => Some(format!("{k} (new) {v}")),
                _ => None,
            })
            .collect();
        changes.extend(
            theirs
                .iter()
                .filter(|(k, _)| !ours.iter().any(|(ok, _)| ok == k))
                .map(|(k, v)| format!("{k} {v} -> (none)")),
        );
        changes
    }

    /// The state as named tensors (`exp_avg.0.weight`, ...) and scalars, for checkpoints.
    pub(crate) fn export(&self) -> Exported<E, D> {
        let (mut first, mut second, mut steps) = (Vec::new(), Vec::new(), Vec::new());
        for (name, comp) in self.names.iter().zip(&self.compensation) {
            if let Some(c) = comp {
                first.push((format!("{COMPENSATION}{name}"), c.clone()));
            }
        }
        for (name, slot) in self.names.iter().zip(&self.slots) {
            match slot {
                Slot::Empty => {}
                Slot::Momentum(b) => first.push((format!("{MOMENTUM}{name}"), b.clone())),
                Slot::Adam(m, v, step) => {
                    first.push((format!("{EXP_AVG}{name}"), m.clone()));
                    second.push((format!("{EXP_AVG_SQ}{name}"), v.clone()));
                    steps.push((format!("step.{name}"), step.to_string()));
                }
            }
        }
        let mut meta: HashMap<String, String> = steps.into_iter().collect();
        meta.insert("optimizer".into(), self.config.optimizer.name().into());
        meta.insert(
            "update_rounding".into(),
            self.config.update_rounding.name().into(),
        );
        meta.insert("optimizer_steps".into(), self.steps.to_string());
        meta.insert("scheduler_steps".into(), self.scheduler_steps.to_string());
        meta.insert(SETTINGS.into(), self.settings());
        (first, second, meta)
    }

    /// The state exported by [`OptimizerState::export`], restored into a copy of this one (which
    /// stays as it is when anything is wrong); `first` and `second` find a named tensor of the
    /// given shape in the parameters' and the second-moment dtype. A checkpoint of another
    /// optimizer, or with a missing or unparsable step count, is an error.
    #[allow(clippy::type_complexity)]
    pub(crate) fn import(
        &self,
        meta: &HashMap<String, String>,
        mut first: impl FnMut(&str, &[usize]) -> Result<Option<Tensor<E, D>>, Error>,
        mut second: impl FnMut(&str, &[usize]) -> Result<Option<Tensor<E::Moment, D>>, Error>,
        shapes: &[Vec<usize>],
    ) -> Result<Self, Error> {
        let ours = self.config.optimizer.name();
        match meta.get("optimizer") {
            Some(theirs) if theirs == ours => {}
            Some(theirs) => {
                return Err(Error::InvalidData(format!(
                    "the checkpoint holds the state of optimizer {theirs}, but the model is configured \
                     with {ours}: resume with the optimizer it was trained with (--optimizer {})",
                    theirs.to_lowercase()
                )));
            }
            None => {
                return Err(Error::InvalidData(
                    "the checkpoint has no 'optimizer' entry".into(),
                ));
            }
        }
        let mut out = self.clone();
        out.steps = meta_value(meta, "optimizer_steps")?;
        out.scheduler_steps = meta_value(meta, "scheduler_steps")?;
        // Compensation buffers resume with compensated rounding; a checkpoint without them (saved
        // under another rounding) starts them at zero.
        let compensated = out.config.update_rounding == UpdateRounding::Compensated;
        for ((name, comp), shape) in out.names.iter().zip(&mut out.compensation).zip(shapes) {
            *comp = match compensated {
                true => first(&format!("{COMPENSATION}{name}"), shape)?,
                false => None,
            };
        }
        for ((name, slot), shape) in out.names.iter().zip(&mut out.slots).zip(shapes) {
            *slot = match out.config.optimizer {
                Optimizer::Sgd(_) => match first(&format!("{MOMENTUM}{name}"), shape)? {
                    Some(b) => Slot::Momentum(b),
                    None => Slot::Empty,
                },
                Optimizer::AdamW(_) => {
                    let (m, v) = (
                        first(&format!("{EXP_AVG}{name}"), shape)?,
                        second(&format!("{EXP_AVG_SQ}{name}"), shape)?,
                    );
                    match (m, v) {
                        (Some(m), Some(v)) => {
                            // Checkpoints from before per-parameter steps: every parameter had
                            // stepped on every optimizer step.
                            let key = format!("step.{name}");
                            let step = match meta.contains_key(&key) {
                                true => meta_value(meta, &key)?,
                                false => out.steps,
                            };
                            Slot::Adam(m, v, step)
                        }
                        (None, None) => Slot::Empty,
                        _ => {
                            return Err(Error::InvalidData(format!(
                                "the checkpoint has only one of '{EXP_AVG}{name}' and '{EXP_AVG_SQ}{name}'"
                            )));
                        }
                    }
                }
            };
        }
        Ok(out)
    }
}

/// The checkpoint names of optimizer state: a prefix, then the parameter's name.
pub(crate) const MOMENTUM: &str = "momentum_buffer.";
/// AdamW's first moment.
pub(crate) const EXP_AVG: &str = "exp_avg.";
/// AdamW's second moment.
pub(crate) const EXP_AVG_SQ: &str = "exp_avg_sq.";
/// The compensation buffer of [`UpdateRounding::Compensated`].
pub(crate) const COMPENSATION: &str = "kahan_comp.";
/// Every prefix above: the tensors a checkpoint may hold beside the parameters.
pub(crate) const STATE_PREFIXES: [&str; 4] = [MOMENTUM, EXP_AVG, EXP_AVG_SQ, COMPENSATION];

/// Metadata entry `key` parsed as `T`; a missing or unparsable entry is an error naming it.
pub(crate) fn meta_value<T: core::str::FromStr>(
    meta: &HashMap<String, String>,
    key: &str,
) -> Result<T, Error> {
    let value = meta
        .get(key)
        .ok_or_else(|| Error::InvalidData(format!("the checkpoint has no '{key}' entry")))?;
    value.parse().map_err(|_| {
        Error::InvalidData(format!(
            "the checkpoint's '{key}' entry is '{value}', which is not a valid {}",
            core::any::type_name::<T>()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::Cpu;

    fn param(v: Vec<f64>) -> Parameter<f64, Cpu> {
        Parameter::new("w", Tensor::from_vec(&[v.len()], v).unwrap())
    }

    #[test]
    fn sgd_with_momentum_matches_pytorch_by_hand() {
        // PyTorch: buf = g (first), then buf = 0.9 buf + g; p -= lr * buf.
        let mut p = param(vec![1.0]);
        let mut opt = OptimizerState::new(Optimization::new(Sgd::new(0.1).momentum(0.9)), &[&p]).unwrap();
        let g = Some(Tensor::from_vec(&[1], vec![0.5]).unwrap());
        opt.step(&mut [&mut p], std::slice::from_ref(&g)).unwrap();
        assert_eq!(p.value().to_vec(), vec![1.0 - 0.1 * 0.5]);
        opt.step(&mut [&mut p], std::slice::from_ref(&g)).unwrap();
        assert_eq!(p.value().to_vec(), vec![0.95 - 0.1 * (0.9 * 0.5 + 0.5)]);
        assert_eq!(opt.state_bytes(), 8);
    }

    #[test]
    fn adamw_first_step_moves_by_lr() {
        // After one step m_hat = g, v_hat = g^2, so the update is lr * g / (|g| + eps) ~ lr.
        let mut p = param(vec![1.0, -2.0]);
        let mut opt =
            OptimizerState::new(Optimization::new(AdamW::new(0.01).weight_decay(0.0)), &[&p]).unwrap();
        let g = Tensor::from_vec(&[2], vec![0.3, -4.0]).unwrap();
        opt.step(&mut [&mut p], &[Some(g)]).unwrap();
        let v = p.value().to_vec();
        assert!((v[0] - 0.99).abs() < 1e-9 && (v[1] + 1.99).abs() < 1e-9, "{v:?}");
    }

    #[test]
    fn a_gradient_of_the_wrong_shape_is_an_error_and_changes_nothing() {
        let mut p = param(vec![1.0, 2.0]);
        let mut opt = OptimizerState::new(Optimization::new(AdamW::default()), &[&p]).unwrap();
        let g = Tensor::from_vec(&[3], vec![0.1, 0.2, 0.3]).unwrap();
        let msg = opt.step(&mut [&mut p], &[Some(g)]).unwrap_err().to_string();
        assert!(msg.contains("[2]") && msg.contains("[3]"), "{msg}");
        assert_eq!(
            (p.value().to_vec(), opt.steps(), opt.state_bytes()),
            (vec![1.0, 2.0], 0, 0)
        );
        let msg = opt.step(&mut [&mut p], &[]).unwrap_err().to_string();
        assert!(msg.contains("0 gradients for 1 parameters"), "{msg}");
    }

    #[test]
    fn adamw_counts_steps_per_parameter_as_pytorch_does() {
        // A parameter that skips a step has its own bias correction: its second update equals
        // the second update of a parameter that never skipped.
        let (mut a, mut b) = (param(vec![1.0]), param(vec![1.0]));
        let mut opt = OptimizerState::new(Optimization::new(AdamW::new(0.1)), &[&a, &b]).unwrap();
        let g = || Some(Tensor::from_vec(&[1], vec![0.5]).unwrap());
        opt.step(&mut [&mut a, &mut b], &[g(), None]).unwrap();
        opt.step(&mut [&mut a, &mut b], &[g(), g()]).unwrap();
        let mut c = param(vec![1.0]);
        let mut alone = OptimizerState::new(Optimization::new(AdamW::new(0.1)), &[&c]).unwrap();
        alone.step(&mut [&mut c], &[g()]).unwrap();
        assert_eq!(b.value().to_vec(), c.value().to_vec());
        assert_ne!(a.value().to_vec(), c.value().to_vec());
    }

    #[test]
    fn bad_hyperparameters_are_errors() {
        assert!(
            Optimizer::from(Sgd::new(-1.0))
                .validate()
                .unwrap_err()
                .to_string()
                .contains("lr = -1")
        );
        assert!(Optimizer::from(Sgd::new(0.1).nesterov(true)).validate().is_err());
        let mut a = AdamW::default();
        a.betas.1 = 1.0;
        assert!(
            Optimizer::from(a)
                .validate()
                .unwrap_err()
                .to_string()
                .contains("beta2")
        );
    }

    #[test]
    fn schedulers_follow_pytorch_closed_forms() {
        let s = Scheduler::step_lr(2, 0.1);
        let lrs: Vec<f64> = (0..5).map(|t| s.lr(1.0, t)).collect();
        assert_eq!(lrs, [1.0, 1.0, 0.1, 0.1, 0.010000000000000002]);
        let c = Scheduler::cosine(10, 0.0);
        assert!((c.lr(1.0, 5) - 0.5).abs() < 1e-15 && c.lr(1.0, 10).abs() < 1e-15);
    }
}
