//! The [`Trainer`]: Lightning's training loop with its precision plugins, in types.
//!
//! One optimizer step, for a precision `P` on a device `D`:
//!
//! 1. for each micro-batch: `loss = model.training_step(autocast)`, multiplied by the scaler's
//!    scale (1 and skipped at compile time for [`NoScaler`](crate::scaler::NoScaler)) and divided
//!    by `accumulate_grad_batches`; backward; gradients added into per-parameter buffers in
//!    `P::Param` (f32 master gradients under mixed precision);
//! 2. at the accumulation boundary: unscale fused with the inf/NaN check, one pass per gradient;
//!    `on_before_optimizer_step` sees the unscaled gradients; clipping by norm (computed in f64)
//!    or value; the optimizer step and a per-step scheduler step, both skipped when a gradient was
//!    non-finite; the scaler's update.

mod callbacks;
mod checkpoint;
mod model;
mod progress;
mod record;

use core::marker::PhantomData;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::autocast::Autocast;
use crate::backend::Backend;
use crate::data::DataLoader;
use crate::device::DeviceKind;
use crate::dtype::Float;
use crate::error::Error;
use crate::nn::{InitCtx, Parameter};
use crate::optim::{Interval, Optimization, OptimizerState, meta_value};
use crate::precision::Precision;
use crate::scaler::{GradScaler, ScalerState};
use crate::strategy::{CommHook, Group, Hosts, SingleDevice, Strategy, shard};
use crate::tensor::Tensor;
use crate::{Device, Runs};

pub use callbacks::{EarlyStopping, Mode, ModelCheckpoint, Monitor};
pub use checkpoint::{mlp_sizes, saved_precision, write_atomic};
pub use model::{LayerSummary, Metrics, MlpModel, Model, StepInfo};

/// How gradients are clipped (Lightning's `gradient_clip_algorithm`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ClipAlgorithm {
    /// Scale all gradients so their total L2 norm is at most the clip value (the default).
    #[default]
    Norm,
    /// Clamp every gradient element to `[-value, value]`.
    Value,
}

impl core::str::FromStr for ClipAlgorithm {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "norm" => Ok(ClipAlgorithm::Norm),
            "value" => Ok(ClipAlgorithm::Value),
            _ => Err(Error::InvalidArgument {
                name: "gradient_clip_algorithm",
                value: format!("'{s}'"),
                expected: "'norm' or 'value'",
            }),
        }
    }
}

/// The trainer's settings, with Lightning's defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainerConfig {
    /// Stop after this many epochs (Lightning: 1000 when neither limit is set).
    pub max_epochs: Option<u64>,
    /// Stop after this many optimizer steps (Lightning: -1, no limit).
    pub max_steps: Option<u64>,
    /// Clip gradients at this value (Lightning: none).
    pub gradient_clip_val: Option<f64>,
    /// How to clip (Lightning: norm).
    pub gradient_clip_algorithm: ClipAlgorithm,
    /// Micro-batches per optimizer step (Lightning: 1).
    pub accumulate_grad_batches: usize,
    /// Seed of parameter initialisation and dropout (Lightning has none by default; nbit uses 0
    /// so that runs repeat).
    pub seed: u64,
    /// Show a progress bar on a terminal (Lightning: true).
    pub enable_progress_bar: bool,
    /// Refresh the progress bar's loss every this many steps (Lightning: 50).
    pub log_every_n_steps: usize,
    /// Where checkpoints go by default (Lightning: the working directory).
    pub default_root_dir: PathBuf,
    /// Save a checkpoint here after every epoch and at the end of `fit`.
    pub checkpoint_path: Option<PathBuf>,
    /// Stream one CSV row per optimizer step here as training runs (`step,epoch,loss,scale,
    /// skipped,lr`); the rows written so far survive an error or an interruption.
    pub log_csv: Option<PathBuf>,
    /// Threads of the CPU kernels, set process-wide when training starts, as
    /// `torch.set_num_threads` (default: `NBIT_NUM_THREADS`, else every core available).
    pub num_threads: Option<usize>,
    /// Keep memory freed by one training step for the next rather than returning it to the
    /// operating system ([`crate::backend::retain_freed_memory`]; glibc on Linux; default true).
    pub retain_freed_memory: bool,
    /// Stop when a metric stops improving (Lightning's `EarlyStopping` callback).
    pub early_stopping: Option<EarlyStopping>,
    /// Save the best and the last checkpoint (Lightning's `ModelCheckpoint` callback).
    pub model_checkpoint: Option<ModelCheckpoint>,
    /// Write epoch metrics to `<dir>/version_<n>/metrics.csv`, `n` the first unused, as
    /// Lightning's `CSVLogger(save_dir=dir)` does.
    pub csv_logger: Option<PathBuf>,
    /// Under data parallel: how gradients travel between ranks (default: in the optimizer's
    /// dtype; PyTorch's bf16/fp16 compression hooks).
    pub ddp_comm_hook: CommHook,
    /// Under data parallel: drop an epoch's last `batches % world_size` batches rather than deal
    /// its first batches again (default false, as PyTorch's `DistributedSampler`).
    pub ddp_drop_last: bool,
}

impl Default for TrainerConfig {
    fn default() -> Self {
        TrainerConfig {
            max_epochs: None,
            max_steps: None,
            gradient_clip_val: None,
            gradient_clip_algorithm: ClipAlgorithm::Norm,
            accumulate_grad_batches: 1,
            seed: 0,
            enable_progress_bar: true,
            log_every_n_steps: 50,
            default_root_dir: PathBuf::from("."),
            checkpoint_path: None,
            log_csv: None,
            num_threads: None,
            retain_freed_memory: true,
            early_stopping: None,
            model_checkpoint: None,
            csv_logger: None,
            ddp_comm_hook: CommHook::None,
            ddp_drop_last: false,
        }
    }
}

/// The type parameters a trainer and its builder carry (no values; `Send` and `Sync` whatever
/// they are).
type Types<P, D, S> = PhantomData<fn() -> (P, D, S)>;

/// Builds a [`Trainer`]; every setting defaults to Lightning's.
#[derive(Debug)]
pub struct TrainerBuilder<P: Precision, D: Device, S: Strategy = SingleDevice> {
    cfg: TrainerConfig,
    scaler: Option<P::Scaler>,
    _types: Types<P, D, S>,
}

macro_rules! setters {
    ($($(#[$doc:meta])* $name:ident: $ty:ty => $field:ident $(wrap $wrap:ident)?;)*) => {$(
        $(#[$doc])*
        pub fn $name(mut self, value: $ty) -> Self {
            self.cfg.$field = setters!(@wrap value $($wrap)?);
            self
        }
    )*};
    (@wrap $v:ident) => { $v };
    (@wrap $v:ident Some) => { Some($v) };
}

impl<P: Precision, D: Runs<P> + Hosts<S>, S: Strategy> TrainerBuilder<P, D, S> {
    setters! {
        /// Stop after this many epochs.
        max_epochs: u64 => max_epochs wrap Some;
        /// Stop after this many optimizer steps.
        max_steps: u64 => max_steps wrap Some;
        /// Clip gradients at this value (see [`TrainerBuilder::gradient_clip_algorithm`]); 0
        /// means no clipping, as in Lightning.
        gradient_clip_val: f64 => gradient_clip_val wrap Some;
        /// Clip by total norm (default) or by value.
        gradient_clip_algorithm: ClipAlgorithm => gradient_clip_algorithm;
        /// Accumulate gradients over this many micro-batches per optimizer step.
        accumulate_grad_batches: usize => accumulate_grad_batches;
        /// Seed of initialisation and dropout.
        seed: u64 => seed;
        /// Show a progress bar (only on a terminal).
        enable_progress_bar: bool => enable_progress_bar;
        /// Progress-bar refresh interval in steps.
        log_every_n_steps: usize => log_every_n_steps;
        /// Default folder for outputs.
        default_root_dir: PathBuf => default_root_dir;
        /// Save a checkpoint to this file after every epoch and at the end of `fit`.
        checkpoint_path: PathBuf => checkpoint_path wrap Some;
        /// Stream the per-step log to this CSV file as training runs.
        log_csv: PathBuf => log_csv wrap Some;
        /// Threads of the CPU kernels (process-wide, as `torch.set_num_threads`; default
        /// `NBIT_NUM_THREADS`, else every core).
        num_threads: usize => num_threads wrap Some;
        /// Keep memory a step frees for the next step (default true; see
        /// [`crate::backend::retain_freed_memory`]).
        retain_freed_memory: bool => retain_freed_memory;
        /// Stop when a metric stops improving (Lightning's `EarlyStopping`).
        early_stopping: EarlyStopping => early_stopping wrap Some;
        /// Save the best and the last checkpoint (Lightning's `ModelCheckpoint`).
        model_checkpoint: ModelCheckpoint => model_checkpoint wrap Some;
        /// Write epoch metrics (epoch, step, train_loss, val_loss, val_acc) to
        /// `<dir>/version_<n>/metrics.csv`, as Lightning's `CSVLogger`.
        csv_logger: PathBuf => csv_logger wrap Some;
        /// Under data parallel, how gradients travel: [`CommHook::None`] (default), or PyTorch's
        /// bf16/fp16 compression hooks.
        ddp_comm_hook: CommHook => ddp_comm_hook;
        /// Under data parallel, drop an epoch's last `batches % world_size` batches rather than
        /// deal its first batches again (see [`crate::strategy`]).
        ddp_drop_last: bool => ddp_drop_last;
    }

    /// Uses `scaler` instead of `P::Scaler::default()` (e.g. a `DynamicScaler` with other
    /// constants).
    pub fn scaler(mut self, scaler: P::Scaler) -> Self {
        self.scaler = Some(scaler);
        self
    }

    /// Checks the settings and the device: an error names a bad value, or says why the device is
    /// not usable here.
    pub fn build(self) -> Result<Trainer<P, D, S>, Error> {
        let c = &self.cfg;
        let bad = |name, value: String, expected| {
            Err(Error::InvalidArgument {
                name,
                value,
                expected,
            })
        };
        if c.accumulate_grad_batches == 0 {
            return bad("accumulate_grad_batches", "0".into(), "at least 1");
        }
        if let Some(v) = c.gradient_clip_val
            && !(v.is_finite() && v >= 0.0)
        {
            return bad("gradient_clip_val", v.to_string(), "a finite value >= 0");
        }
        if c.log_every_n_steps == 0 {
            return bad("log_every_n_steps", "0".into(), "at least 1");
        }
        if c.num_threads == Some(0) {
            return bad("num_threads", "0".into(), "at least 1");
        }
        crate::backend::threads_from_env()?;
        crate::backend::gemm_kernel_from_env()?;
        D::probe()?;
        let group = S::connect()?;
        Ok(Trainer {
            cfg: self.cfg,
            scaler: self.scaler.unwrap_or_default(),
            should_stop: Arc::default(),
            group,
            _types: PhantomData,
        })
    }
}

/// Trains models under the precision `P` on the device `D`, like Lightning's
/// `Trainer(precision=..., accelerator=...)`.
///
/// Building one needs `D: Runs<P>`: the support matrix allows the pair and this build has the
/// device's kernels. So `Trainer::<Mixed<F16>, Cpu>::new()` is a compile error that says why and
/// what to use instead, and so is a trainer for a device without a backend in this build (`Tpu`;
/// `Gpu` without the `cuda` feature); `Trainer::<True<F64>, Tpu>::new()` is both, two errors with
/// the matrix's first. The bound is
/// on the constructors rather than on the type so that each mistake is one error: a bound on the
/// type is checked again by every method call, which repeats the error. Hardware presence is
/// checked when the trainer is built.
///
/// ```
/// use nbit::prelude::*;
/// use nbit::data::{DataLoader, Dataset};
/// use nbit::nn::Task;
/// use nbit::optim::{Optimization, Sgd};
///
/// let x = ndarray::Array2::from_shape_fn((64, 2), |(i, j)| ((i * 7 + j * 3) % 11) as f64 / 11.0 - 0.5);
/// let y: Vec<usize> = x.rows().into_iter().map(|r| usize::from(r[0] + r[1] > 0.0)).collect();
/// let train = DataLoader::new(Dataset::classification(x, y)?, 16)?.shuffle(true);
///
/// let trainer = Trainer::<Mixed<BF16>, Cpu>::builder().max_epochs(30).enable_progress_bar(false).build()?;
/// let mut model = trainer.init_module(|ctx| MlpModel::new(ctx, &[2, 16, 2], Task::Classification,
///     Optimization::new(Sgd::new(0.5))))?;
/// let report = trainer.fit(&mut model, &train, None)?;
/// assert!(report.history.last().unwrap().loss < report.history[0].loss);
/// # Ok::<(), nbit::Error>(())
/// ```
#[derive(Debug)]
pub struct Trainer<P: Precision, D: Device, S: Strategy = SingleDevice> {
    cfg: TrainerConfig,
    scaler: P::Scaler,
    should_stop: Arc<AtomicBool>,
    /// The data-parallel process group (`None` for one process).
    group: Option<Group>,
    _types: Types<P, D, S>,
}

/// One optimizer step in [`FitReport::history`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepLog {
    /// The 1-based global step.
    pub step: u64,
    /// The epoch it belongs to.
    pub epoch: u64,
    /// The mean training loss of the step's batch (mean over micro-batches), before the update.
    pub loss: f64,
    /// The loss scale used for the step (1 without a dynamic scaler).
    pub scale: f32,
    /// Whether the optimizer step was skipped for non-finite gradients.
    pub skipped: bool,
    /// The learning rate used (or that would have been).
    pub lr: f64,
}

/// What [`Trainer::fit`] did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FitReport {
    /// Every optimizer step of the run, in order (a resumed run's includes the steps before the
    /// checkpoint, read from it).
    pub history: Vec<StepLog>,
    /// Epochs completed in total (including those before a resume).
    pub epochs: u64,
    /// Optimizer steps taken in total, skipped ones included.
    pub global_step: u64,
    /// Steps skipped for non-finite gradients, in total.
    pub skipped_steps: u64,
    /// Validation metrics after each epoch of the run (a resumed run's includes earlier epochs'),
    /// when validation data was given.
    pub validation: Vec<Metrics>,
    /// Bytes of parameter storage.
    pub parameter_bytes: usize,
    /// Bytes of optimizer state.
    pub optimizer_state_bytes: usize,
    /// Notes from loading a checkpoint (dtype casts), if resumed.
    pub notes: Vec<String>,
    /// Training rows processed by this call (for samples/s).
    pub samples: usize,
    /// Whether training stopped early because [`Trainer::stop_handle`] was set (Ctrl-C).
    pub interrupted: bool,
    /// Why [`EarlyStopping`] stopped training, if it did.
    pub stopped_early: Option<String>,
    /// The best checkpoint [`ModelCheckpoint`] wrote, and its metric's value.
    pub best_model: Option<(PathBuf, f64)>,
    /// The `metrics.csv` the CSV logger wrote, if one was set.
    pub metrics_csv: Option<PathBuf>,
    /// Under data parallel: seconds this rank spent summing gradients (and the step's loss)
    /// over ranks, waits for slower ranks included; 0 in one process.
    pub communication_seconds: f64,
}

impl FitReport {
    /// The training loss a run ends at: the mean loss of the last epoch's steps, the epoch cut
    /// short included (Lightning's epoch-level `train_loss`), over the steps whose loss is finite
    /// (NaN when none is). One step's loss is too noisy to report (at batch size 1 it is often
    /// 0.000000); `None` before any step.
    ///
    /// ```
    /// # use nbit::{FitReport, StepLog};
    /// let step = |epoch, loss| StepLog { step: 0, epoch, loss, scale: 1.0, skipped: false, lr: 0.1 };
    /// let mut r = FitReport::default();
    /// r.history = vec![step(0, 9.0), step(1, 0.5), step(1, 0.0), step(1, f64::INFINITY)];
    /// assert_eq!(r.final_loss(), Some(0.25));
    /// ```
    pub fn final_loss(&self) -> Option<f64> {
        let last = self.history.last()?.epoch;
        let losses: Vec<f64> = self
            .history
            .iter()
            .filter(|s| s.epoch == last && s.loss.is_finite())
            .map(|s| s.loss)
            .collect();
        // An epoch without one finite loss (a diverged run) ends at NaN, not at nothing.
        Some(match losses.len() {
            0 => f64::NAN,
            n => losses.iter().sum::<f64>() / n as f64,
        })
    }
}

/// A checkpoint's metadata keys for [`ScalerState`]'s fields, in their order.
const SCALER_KEYS: [&str; 5] = [
    "scaler.scale",
    "scaler.growth_factor",
    "scaler.backoff_factor",
    "scaler.growth_interval",
    "scaler.growth_tracker",
];

/// Where a fit is: everything a checkpoint must restore for an exact resume.
struct LoopState<P: Precision, D: Backend> {
    /// The training loader's batch size (recorded in checkpoints to compare on resume).
    batch_size: usize,
    /// The training loader's batches per epoch.
    batches_per_epoch: usize,
    epoch: u64,
    batch_in_epoch: usize,
    global_step: u64,
    skipped: u64,
    scaler: P::Scaler,
    optimizer: OptimizerState<P::Param, D>,
    callbacks: record::CallbackState,
    /// Whether any rank was asked to stop (Ctrl-C) by the last optimizer step.
    stop: bool,
    /// Time spent in collectives (summing gradients and figures over ranks) by this run.
    communication: std::time::Duration,
}

impl<P: Precision, D: Device, S: Strategy> Trainer<P, D, S> {
    /// A trainer with Lightning's defaults, or [`Error::DeviceUnavailable`] when the device is not
    /// usable in this process (no CUDA driver or device for `Gpu`).
    pub fn new() -> Result<Self, Error>
    where
        D: Runs<P> + Hosts<S>,
    {
        Self::builder().build()
    }

    /// A builder with Lightning's defaults.
    pub fn builder() -> TrainerBuilder<P, D, S>
    where
        D: Runs<P> + Hosts<S>,
    {
        TrainerBuilder {
            cfg: TrainerConfig::default(),
            scaler: None,
            _types: PhantomData,
        }
    }
}

impl<P: Precision, D: Runs<P>, S: Strategy> Trainer<P, D, S> {
    /// The settings.
    pub fn config(&self) -> &TrainerConfig {
        &self.cfg
    }

    /// Lightning's name of the precision, e.g. `"bf16-mixed"`.
    pub fn precision_name(&self) -> &'static str {
        P::NAME
    }

    /// The device this trainer runs on.
    pub fn device(&self) -> DeviceKind {
        D::KIND
    }

    /// Lightning's name of the strategy: `"single_device"` or `"ddp"`.
    pub fn strategy_name(&self) -> &'static str {
        S::NAME
    }

    /// This process's rank in a data-parallel job (Lightning's `trainer.global_rank`); 0 in one
    /// process.
    pub fn global_rank(&self) -> usize {
        self.group.as_ref().map_or(0, Group::rank)
    }

    /// The number of processes training together (Lightning's `trainer.world_size`); 1 in one
    /// process.
    pub fn world_size(&self) -> usize {
        self.group.as_ref().map_or(1, Group::size)
    }

    /// Whether this process is rank 0, the one that shows progress and writes files (Lightning's
    /// `trainer.is_global_zero`).
    pub fn is_global_zero(&self) -> bool {
        self.global_rank() == 0
    }

    /// The process group when more than one process trains.
    fn ranks(&self) -> Option<&Group> {
        self.group.as_ref().filter(|g| g.size() > 1)
    }

    /// Under data parallel, an error on one rank ends the job (the others would wait for it);
    /// in one process it is returned.
    fn settle<T>(&self, result: Result<T, Error>) -> Result<T, Error> {
        match (result, self.ranks()) {
            (Err(e), Some(g)) => g.abort(&e),
            (r, _) => r,
        }
    }

    /// A flag that, once set (from a Ctrl-C handler or another thread), makes `fit` stop after the
    /// optimizer step in progress, write its checkpoint if one is configured, and return with
    /// [`FitReport::interrupted`] set: Lightning's `trainer.should_stop`.
    ///
    /// ```
    /// use nbit::prelude::*;
    /// let trainer = Trainer::<True<F32>, Cpu>::new()?;
    /// let stop = trainer.stop_handle();
    /// stop.store(true, std::sync::atomic::Ordering::Relaxed); // fit now stops after one step
    /// # Ok::<(), nbit::Error>(())
    /// ```
    pub fn stop_handle(&self) -> Arc<AtomicBool> {
        self.should_stop.clone()
    }

    /// Builds a model with its parameters created directly in `P::Param` on `D` (Lightning's
    /// `with trainer.init_module():`).
    pub fn init_module<M>(&self, build: impl FnOnce(&mut InitCtx<P, D>) -> M) -> M {
        build(&mut InitCtx::new(self.cfg.seed))
    }

    /// Trains `model` on `train`, validating on `val` after each epoch.
    pub fn fit<M: Model<P, D>>(
        &self,
        model: &mut M,
        train: &DataLoader,
        val: Option<&DataLoader>,
    ) -> Result<FitReport, Error> {
        self.settle(D::catch_device_failures(|| self.run(model, train, val, None)))
    }

    /// Resumes training from a checkpoint written by this trainer's `checkpoint_path` (Lightning's
    /// `fit(ckpt_path=...)`). A checkpoint from another precision loads with a cast, listed in
    /// [`FitReport::notes`].
    pub fn fit_from<M: Model<P, D>>(
        &self,
        model: &mut M,
        train: &DataLoader,
        val: Option<&DataLoader>,
        checkpoint: &Path,
    ) -> Result<FitReport, Error> {
        self.settle(D::catch_device_failures(|| {
            self.run(model, train, val, Some(checkpoint))
        }))
    }

    fn run<M: Model<P, D>>(
        &self,
        model: &mut M,
        train: &DataLoader,
        val: Option<&DataLoader>,
        resume: Option<&Path>,
    ) -> Result<FitReport, Error> {
        for data in [Some(train), val].into_iter().flatten() {
            data.dataset().check_representable::<P>()?;
        }
        if let Some(n) = self.cfg.num_threads {
            crate::backend::set_num_threads(n);
        }
        if self.cfg.retain_freed_memory {
            crate::backend::retain_freed_memory();
        }
        let monitors = [
            self.cfg.early_stopping.as_ref().map(|e| e.monitor),
            self.cfg.model_checkpoint.as_ref().and_then(|m| m.monitor),
        ];
        if let Some(m) = monitors.into_iter().flatten().find(|m| m.needs_validation())
            && val.is_none()
        {
            return Err(Error::InvalidArgument {
                name: "monitor",
                value: m.name().into(),
                expected: "a metric fit can compute: pass validation data to fit, or monitor train_loss",
            });
        }
        let mut ctx = InitCtx::new(self.cfg.seed);
        model.configure_model(&mut ctx)?;
        if let Some(g) = self.ranks() {
            // Every rank starts from rank 0's parameters, whatever its seed.
            g.broadcast_parameters(&mut model.parameters_mut())?;
        }
        let optimizer =
            OptimizerState::new(model.configure_optimizers(), &params(model))?.with_seed(self.cfg.seed);
        let mut st = LoopState::<P, D> {
            batch_size: train.batch_size(),
            batches_per_epoch: self.my_batches(train.len()).len(),
            epoch: 0,
            batch_in_epoch: 0,
            global_step: 0,
            skipped: 0,
            scaler: self.scaler.clone(),
            optimizer,
            callbacks: record::CallbackState::default(),
            stop: false,
            communication: std::time::Duration::ZERO,
        };
        if st.batches_per_epoch == 0
            && let Some(g) = self.ranks()
        {
            return Err(Error::InvalidArgument {
                name: "ddp_drop_last",
                value: format!(
                    "true with {} batches per epoch on {} ranks",
                    train.len(),
                    g.size()
                ),
                expected: "at least one batch per rank: fewer ranks, a smaller batch size, or ddp_drop_last(false)",
            });
        }
        let mut report = FitReport::default();
        if let Some(path) = resume {
            report.notes = self.restore(model, &mut st, &mut report, path)?;
            // Lightning trains nothing then and says "`max_epochs=N` reached": say it too.
            let done = match (self.cfg.max_steps, self.cfg.max_epochs) {
                (Some(m), _) if st.global_step >= m => Some(format!(
                    "the checkpoint is at step {} and max_steps is {m}: nothing left to train \
                     (`max_steps={m}` reached); raise max_steps (--max-steps) to train on",
                    st.global_step
                )),
                (_, Some(m)) if st.epoch >= m => Some(format!(
                    "the checkpoint has {} epochs done and max_epochs is {m}: nothing left to train \
                     (`max_epochs={m}` reached); raise max_epochs (--epochs) to train on",
                    st.epoch
                )),
                _ => None,
            };
            report.notes.extend(done);
        }
        // A resumed run's step log starts with the steps before the checkpoint.
        let mut log = match &self.cfg.log_csv {
            Some(path) if self.is_global_zero() => Some(StepCsv::create::<P>(path, &report.history)?),
            _ => None,
        };
        let result = self.epochs(model, train, val, &mut st, &mut report, log.as_mut());
        // The rows logged so far reach the disk whether training finished, failed or stopped.
        let flushed = log.as_mut().map_or(Ok(()), StepCsv::flush);
        result?;
        flushed?;
        report.epochs = st.epoch;
        report.global_step = st.global_step;
        report.skipped_steps = st.skipped;
        report.parameter_bytes = crate::nn::parameter_bytes(&params(model));
        report.optimizer_state_bytes = st.optimizer.state_bytes();
        report.communication_seconds = st.communication.as_secs_f64();
        Ok(report)
    }

    /// The epoch loop of [`Trainer::fit`], recording into `report`.
    fn epochs<M: Model<P, D>>(
        &self,
        model: &mut M,
        train: &DataLoader,
        val: Option<&DataLoader>,
        st: &mut LoopState<P, D>,
        report: &mut FitReport,
        mut log: Option<&mut StepCsv>,
    ) -> Result<(), Error> {
        let max_epochs = match (self.cfg.max_epochs, self.cfg.max_steps) {
            (Some(e), _) => e,
            (None, Some(_)) => u64::MAX,
            (None, None) => 1000,
        };
        let accumulate = self.cfg.accumulate_grad_batches;
        // Each rank's loss is divided by the ranks too: their summed gradients are the mean.
        let divisor = (accumulate * self.world_size()) as f64;
        let mut done = self.cfg.max_steps.is_some_and(|m| st.global_step >= m);
        while !done && st.epoch < max_epochs {
            let epoch = train.epoch_indices(st.epoch);
            // This rank's batches, with their indices in the epoch (all of them in one process).
            let batches: Vec<(usize, &Vec<usize>)> = self
                .my_batches(epoch.len())
                .into_iter()
                .map(|i| (i, &epoch[i]))
                .collect();
            let show = self.cfg.enable_progress_bar && self.is_global_zero();
            let mut bar = progress::Bar::new(show, st.epoch, batches.len() as u64);
            // Gradients are None until the loss reaches a parameter (PyTorch's `.grad is None`).
            let mut bufs: Vec<Option<Tensor<P::Param, D>>> = vec![None; model.parameters_mut().len()];
            let mut micro = 0usize;
            let mut losses: Vec<Tensor<P::Full, D>> = Vec::new();
            let start = st.batch_in_epoch;
            bar.advance(start.min(batches.len()) as u64);
            let mut rows = 0;
            for (bi, &(in_epoch, idx)) in batches.iter().enumerate().skip(start) {
                let batch = train.batch(idx);
                rows += batch.len();
                let info = StepInfo {
                    epoch: st.epoch,
                    // The batch's place in the epoch, so dropout masks do not depend on the ranks.
                    batch_idx: in_epoch,
                    global_step: st.global_step,
                    seed: self.cfg.seed,
                };
                let ac = Autocast::<P, D>::training(info.dropout_seed());
                let loss = model.training_step(&ac, &batch, &info)?;
                scalar_loss(&loss)?;
                // Its value is read at the optimizer step, after the backward pass is queued: on
                // a GPU, reading it here would make the host wait between forward and backward.
                losses.push(loss.detach());
                let factor = st.scaler.scale() as f64 / divisor;
                let scaled = if factor == 1.0 {
                    loss
                } else {
                    loss.mul_scalar(factor)
                };
                let mut grads = scaled.backward()?;
                drop(scaled);
                let mut reached = false;
                for (buf, p) in bufs.iter_mut().zip(params(model)) {
                    let Some(g) = grads.take(p.value()) else {
                        continue;
                    };
                    reached = true;
                    match buf {
                        Some(b) => D::add_in_place(b.storage_mut(), g.storage()),
                        None => *buf = Some(g.detach()),
                    }
                }
                // Release the graph's other gradients and autocast's weight copies now: while
                // they live, the optimizer's in-place update would copy every weight first
                // (copy-on-write), and they hold memory the next step needs.
                drop(grads);
                drop(ac);
                if !reached {
                    return Err(Error::InvalidModel(
                        "training_step returned a loss that depends on no parameter of the model \
                         (PyTorch: \"element 0 of tensors does not require grad\"); compute it from \
                         the parameters' values, not from detached copies"
                            .into(),
                    ));
                }
                micro += 1;
                st.batch_in_epoch = bi + 1;
                bar.inc();
                if micro < accumulate && bi + 1 < batches.len() {
                    continue;
                }
                let grads: Vec<Option<Tensor<P::Param, D>>> = bufs.iter_mut().map(Option::take).collect();
                let local = (std::mem::take(&mut losses), std::mem::take(&mut rows));
                let (step, samples) = self.optimizer_step(model, st, grads, local)?;
                report.samples += samples;
                if let Some(log) = log.as_deref_mut() {
                    log.row::<P>(&step)?;
                }
                report.history.push(step);
                micro = 0;
                // Every step, as Lightning's bar shows the latest loss.
                bar.message(step.loss, st.skipped);
                if self.cfg.max_steps.is_some_and(|m| st.global_step >= m) {
                    done = true;
                    break;
                }
                // In one process the request is read after the step, as Lightning reads
                // `should_stop`; under data parallel all ranks agreed on it during the step.
                if st.stop || (self.ranks().is_none() && self.should_stop.load(Ordering::Relaxed)) {
                    report.interrupted = true;
                    done = true;
                    break;
                }
            }
            bar.finish();
            if st.batch_in_epoch >= batches.len() {
                st.optimizer.scheduler_step(Interval::Epoch);
                st.epoch += 1;
                st.batch_in_epoch = 0;
                let finished = st.epoch - 1;
                let losses = report
                    .history
                    .iter()
                    .filter(|s| s.epoch == finished)
                    .map(|s| s.loss);
                let (sum, n) = losses.fold((0.0, 0usize), |(s, n), l| (s + l, n + 1));
                let train_loss = sum / n.max(1) as f64;
                model.on_train_epoch_end(finished, train_loss);
                if let Some(v) = val {
                    let metrics = self.evaluate(model, v)?;
                    model.on_validation_epoch_end(finished, &metrics);
                    report.validation.push(metrics);
                }
                if self.epoch_end_callbacks(model, st, report, (val.is_some(), train_loss))? {
                    done = true;
                }
            }
            if let Some(log) = log.as_deref_mut() {
                log.flush()?;
            }
            if let Some(path) = &self.cfg.checkpoint_path
                && self.is_global_zero()
            {
                self.save_checkpoint(model, st, report, path)?;
            }
        }
        Ok(())
    }

    /// After a completed epoch (and its validation): `ModelCheckpoint`, then `EarlyStopping`.
    /// Returns whether training should stop.
    fn epoch_end_callbacks<M: Model<P, D>>(
        &self,
        model: &mut M,
        st: &mut LoopState<P, D>,
        report: &mut FitReport,
        (validated, train_loss): (bool, f64),
    ) -> Result<bool, Error> {
        let finished = st.epoch - 1;
        let value = |m: Monitor| -> f64 {
            match m {
                Monitor::ValLoss => report.validation.last().map_or(f64::NAN, Metrics::loss),
                Monitor::ValAcc => report.validation.last().map_or(f64::NAN, Metrics::accuracy),
                Monitor::TrainLoss => train_loss,
            }
        };
        // Rank 0 writes; every rank keeps the same callback state.
        let writes = self.is_global_zero();
        if let Some(dir) = &self.cfg.csv_logger
            && writes
        {
            let path = match &report.metrics_csv {
                Some(p) => p.clone(),
                None => {
                    let p = new_version_dir(dir)?.join("metrics.csv");
                    append(&p, b"epoch,step,train_loss,val_loss,val_acc\n")?;
                    report.metrics_csv = Some(p.clone());
                    p
                }
            };
            let val = report.validation.last().filter(|_| validated);
            let row = format!(
                "{finished},{},{},{},{}\n",
                st.global_step,
                value(Monitor::TrainLoss),
                val.map_or(String::new(), |m| m.loss().to_string()),
                val.map_or(String::new(), |m| m.accuracy().to_string()),
            );
            append(&path, row.as_bytes())?;
        }
        if let Some(mc) = &self.cfg.model_checkpoint {
            if writes {
                std::fs::create_dir_all(&mc.dirpath).map_err(|e| Error::Io {
                    path: mc.dirpath.display().to_string(),
                    action: "create",
                    reason: format!("{e}; ModelCheckpoint needs a folder it can write"),
                })?;
            }
            if let Some(m) = mc.monitor {
                let v = value(m);
                if st.callbacks.best.improves(mc.mode, v) {
                    let path = mc.dirpath.join("best.safetensors");
                    report.best_model = Some((path.clone(), v));
                    if writes {
                        self.save_checkpoint(model, st, report, &path)?;
                    }
                }
            }
            if mc.save_last && writes {
                self.save_checkpoint(model, st, report, &mc.dirpath.join("last.safetensors"))?;
            }
        }
        if let Some(es) = &self.cfg.early_stopping
            && let Some(why) = st.callbacks.watch.update(es, value(es.monitor))
        {
            report.stopped_early = Some(why);
            return Ok(true);
        }
        Ok(false)
    }

    fn non_finite(&self, what: &'static str, value: f64, st: &LoopState<P, D>) -> Error {
        Error::NonFinite {
            what,
            value,
            step: st.global_step + 1,
            epoch: st.epoch,
            precision: P::NAME,
        }
    }

    /// Unscale and check, read the losses, hook, clip, step (unless non-finite), scaler update.
    /// On a GPU the host waits for the device once here, for the skip decision (or, without a
    /// scaler, for the losses' values), and once more when clipping by norm.
    /// Under data parallel, the gradients are first summed over ranks, with the losses, the
    /// rows and the stop requests. Returns the step and the rows it trained on (all ranks').
    fn optimizer_step<M: Model<P, D>>(
        &self,
        model: &mut M,
        st: &mut LoopState<P, D>,
        mut grads: Vec<Option<Tensor<P::Param, D>>>,
        (losses, rows): (Vec<Tensor<P::Full, D>>, usize),
    ) -> Result<(StepLog, usize), Error> {
        // The losses' sum, or without a scaler the first non-finite loss as an error.
        let (step, epoch) = (st.global_step + 1, st.epoch);
        let read_losses = |losses: &[Tensor<P::Full, D>]| -> Result<f64, Error> {
            let mut sum = 0.0;
            for l in losses {
                let value = l.item()?.as_f64();
                if !<P::Scaler as GradScaler>::ENABLED && !value.is_finite() {
                    return Err(Error::NonFinite {
                        what: "training loss",
                        value,
                        step,
                        epoch,
                        precision: P::NAME,
                    });
                }
                sum += value;
            }
            Ok(sum)
        };
        let count = losses.len() as f64;
        let (mut loss_sum, mut count, mut rows) = (None, count, rows as f64);
        if let Some(g) = self.ranks() {
            let stop = self.should_stop.load(Ordering::Relaxed);
            let start = std::time::Instant::now();
            // [reached per parameter..., loss sum, losses, rows, stop requests], summed.
            let mut figures: Vec<f64> = grads.iter().map(|g| f64::from(u8::from(g.is_some()))).collect();
            figures.extend([read_losses(&losses)?, count, rows, f64::from(u8::from(stop))]);
            g.sum(&mut figures);
            let n = grads.len();
            let reached: Vec<bool> = figures[..n].iter().map(|&r| r > 0.0).collect();
            let shapes: Vec<Vec<usize>> = params(model).iter().map(|p| p.value().shape().to_vec()).collect();
            g.sum_gradients(&mut grads, &shapes, &reached, self.cfg.ddp_comm_hook)?;
            loss_sum = Some(figures[n]);
            (count, rows) = (figures[n + 1], figures[n + 2]);
            // Every rank stops after the same step when any was asked to.
            st.stop = figures[n + 3] > 0.0;
            st.communication += start.elapsed();
        }
        let scale = st.scaler.scale();
        let mut found_inf = false;
        if <P::Scaler as GradScaler>::ENABLED {
            // PyTorch: inverse scale computed in f64, then used as f32.
            let inv = (1.0f64 / scale as f64) as f32;
            let mut storages: Vec<_> = grads.iter_mut().flatten().map(|g| g.storage_mut()).collect();
            found_inf = D::unscale_check_all(&mut storages, inv);
        }
        // In one process the losses are read after the skip decision: one wait for a GPU.
        let loss = match loss_sum {
            Some(sum) => sum,
            None => read_losses(&losses)?,
        } / count.max(1.0);
        if !<P::Scaler as GradScaler>::ENABLED && !loss.is_finite() {
            return Err(self.non_finite("training loss", loss, st));
        }
        {
            let names: Vec<String> = params(model).iter().map(|p| p.name().to_owned()).collect();
            let named: Vec<(&str, &Tensor<P::Param, D>)> = names
                .iter()
                .zip(&grads)
                .filter_map(|(n, g)| Some((n.as_str(), g.as_ref()?)))
                .collect();
            model.on_before_optimizer_step(&named);
        }
        // Lightning: a clip value of 0 (or less) means no clipping.
        if let Some(limit) = self.cfg.gradient_clip_val.filter(|&v| v > 0.0) {
            let norm = clip(&mut grads, limit, self.cfg.gradient_clip_algorithm);
            if let Some(norm) = norm.filter(|n| !n.is_finite())
                && !<P::Scaler as GradScaler>::ENABLED
            {
                return Err(self.non_finite("gradient norm", norm, st));
            }
        }
        let lr = st.optimizer.lr();
        if found_inf {
            st.skipped += 1;
        } else {
            let mut params = model.parameters_mut();
            st.optimizer.step(&mut params, &grads)?;
            st.optimizer.scheduler_step(Interval::Step);
        }
        st.scaler.update(found_inf);
        st.global_step += 1;
        let log = StepLog {
            step: st.global_step,
            epoch: st.epoch,
            loss,
            scale,
            skipped: found_inf,
            lr,
        };
        Ok((log, rows as usize))
    }

    /// Mean loss and accuracy of `model` on `data`.
    pub fn validate<M: Model<P, D>>(&self, model: &mut M, data: &DataLoader) -> Result<Metrics, Error> {
        data.dataset().check_representable::<P>()?;
        self.settle(D::catch_device_failures(|| self.evaluate(model, data)))
    }

    /// [`Trainer::validate`] on data already checked (by `fit`, once, not every epoch).
    /// Under data parallel each rank evaluates its share of the batches; the batches' metrics
    /// are gathered (a sum over ranks of vectors that are zero but for each rank's own batches,
    /// exact) and merged in batch order, so every rank returns the single-process metrics, bit
    /// for bit.
    fn evaluate<M: Model<P, D>>(&self, model: &mut M, data: &DataLoader) -> Result<Metrics, Error> {
        let batches = data.epoch_indices(0);
        let Some(g) = self.ranks() else {
            let mut m = Metrics::default();
            for idx in &batches {
                m.merge(self.evaluate_batch(model, data, idx)?);
            }
            return Ok(m);
        };
        // [loss_sum, correct, count] per batch; counts below 2^53 are exact in f64.
        let mut per_batch = vec![0.0; 3 * batches.len()];
        for i in shard::shard_evaluation(batches.len(), g.rank(), g.size()) {
            let b = self.evaluate_batch(model, data, &batches[i])?;
            per_batch[3 * i..3 * i + 3].copy_from_slice(&[b.loss_sum, b.correct as f64, b.count as f64]);
        }
        g.sum(&mut per_batch);
        let mut m = Metrics::default();
        for b in per_batch.chunks_exact(3) {
            m.merge(Metrics {
                loss_sum: b[0],
                correct: b[1] as usize,
                count: b[2] as usize,
            });
        }
        Ok(m)
    }

    fn evaluate_batch<M: Model<P, D>>(
        &self,
        model: &mut M,
        data: &DataLoader,
        indices: &[usize],
    ) -> Result<Metrics, Error> {
        let batch = data.batch(indices);
        crate::autograd::no_grad(|| model.validation_step(&Autocast::new(), &batch))
    }

    /// A checkpoint's batches done in its epoch, counted per rank of the job that wrote it, as
    /// this job's ranks count them; an error where the epoch's batches done do not deal evenly.
    fn rank_batches_done(&self, meta: &HashMap<String, String>, done: usize) -> Result<usize, Error> {
        let theirs = match meta.get("world_size") {
            Some(_) => meta_value::<usize>(meta, "world_size")?.max(1),
            None => 1,
        };
        let ours = self.world_size();
        if theirs == ours || done == 0 {
            return Ok(done);
        }
        let in_epoch = done * theirs;
        if !in_epoch.is_multiple_of(ours) {
            return Err(Error::InvalidData(format!(
                "it stopped after {done} batches per rank on {theirs} ranks ({in_epoch} batches of its \
                 epoch), which {ours} ranks cannot continue evenly; resume it on {theirs} ranks, or from \
                 a checkpoint written at the end of an epoch"
            )));
        }
        Ok(in_epoch / ours)
    }

    /// The indices in an epoch of `batches` batches that this rank trains on.
    fn my_batches(&self, batches: usize) -> Vec<usize> {
        match self.ranks() {
            Some(g) => shard::shard(batches, g.rank(), g.size(), self.cfg.ddp_drop_last),
            None => (0..batches).collect(),
        }
    }

    /// The model's outputs on every row of `data`, in order, as `[rows, outputs]` (f64 copies of
    /// `P::Full` values).
    pub fn predict<M: Model<P, D>>(
        &self,
        model: &mut M,
        data: &DataLoader,
    ) -> Result<ndarray::Array2<f64>, Error> {
        data.dataset().check_representable::<P>()?;
        let mut rows: Vec<f64> = Vec::new();
        let mut cols = 0;
        D::catch_device_failures(|| {
            for idx in data.epoch_indices(0) {
                let batch = data.batch(&idx);
                let out = crate::autograd::no_grad(|| model.predict_step(&Autocast::new(), &batch))?;
                cols = out.shape().last().copied().unwrap_or(1);
                rows.extend(out.to_vec().iter().map(|v| v.as_f64()));
            }
            Ok(())
        })?;
        let n = rows.len() / cols.max(1);
        ndarray::Array2::from_shape_vec((n, cols), rows).map_err(|e| Error::InvalidData(e.to_string()))
    }

    /// A summary of `model`'s parameters (Lightning's `ModelSummary`), with the optimizer state
    /// its `configure_optimizers` will hold.
    pub fn summary<M: Model<P, D>>(&self, model: &mut M) -> Summary {
        let optimization = model.configure_optimizers();
        let layers = model.layers();
        Summary::new::<P, D>(layers, &params(model), &optimization)
    }

    /// Writes the parameters as a safetensors file with PyTorch's `state_dict` names, in their
    /// stored dtype (atomically). Under data parallel, rank 0 writes and the others do nothing
    /// (their parameters are the same), as Lightning's `trainer.save_checkpoint`.
    pub fn save_weights<M: Model<P, D>>(&self, model: &mut M, path: &Path) -> Result<(), Error> {
        if !self.is_global_zero() {
            return Ok(());
        }
        let tensors: Vec<checkpoint::Encoded> = params(model)
            .iter()
            .map(|p| checkpoint::encode(p.name(), p.value()))
            .collect();
        let mut meta = HashMap::new();
        meta.insert("precision".into(), P::NAME.into());
        checkpoint::write_atomic(path, &checkpoint::to_bytes(&tensors, meta)?)
    }

    /// Loads parameters from a safetensors file (for example PyTorch's
    /// `save_file(model.state_dict())`); returns notes on dtype casts. A missing tensor or a shape
    /// mismatch is an error naming the tensor; the model is unchanged unless all tensors load.
    pub fn load_weights<M: Model<P, D>>(&self, model: &mut M, path: &Path) -> Result<Vec<String>, Error> {
        checkpoint::Loaded::read(path)?.load_parameters(&mut model.parameters_mut())
    }

    fn save_checkpoint<M: Model<P, D>>(
        &self,
        model: &mut M,
        st: &LoopState<P, D>,
        report: &FitReport,
        path: &Path,
    ) -> Result<(), Error> {
        let (state, second, mut meta) = st.optimizer.export();
        let history = record::save(report, &st.callbacks, &mut meta);
        let mut tensors: Vec<checkpoint::Encoded> = params(model)
            .iter()
            .map(|p| checkpoint::encode(p.name(), p.value()))
            .collect();
        tensors.push(history);
        tensors.extend(state.iter().map(|(n, t)| checkpoint::encode(n, t)));
        tensors.extend(second.iter().map(|(n, t)| checkpoint::encode(n, t)));
        meta.insert("format".into(), checkpoint::FORMAT.into());
        meta.insert("precision".into(), P::NAME.into());
        meta.insert("epoch".into(), st.epoch.to_string());
        meta.insert("batch_in_epoch".into(), st.batch_in_epoch.to_string());
        // Under data parallel `batch_in_epoch` counts each rank's batches: a resume with another
        // number of ranks converts it.
        meta.insert("world_size".into(), self.world_size().to_string());
        meta.insert("global_step".into(), st.global_step.to_string());
        meta.insert("skipped_steps".into(), st.skipped.to_string());
        meta.insert("batch_size".into(), st.batch_size.to_string());
        meta.insert(
            "accumulate_grad_batches".into(),
            self.cfg.accumulate_grad_batches.to_string(),
        );
        if let Some(s) = st.scaler.state() {
            let values = [
                s.scale.to_string(),
                s.growth_factor.to_string(),
                s.backoff_factor.to_string(),
                s.growth_interval.to_string(),
                s.growth_tracker.to_string(),
            ];
            meta.extend(SCALER_KEYS.iter().map(|k| k.to_string()).zip(values));
        }
        checkpoint::write_atomic(path, &checkpoint::to_bytes(&tensors, meta)?)
    }

    /// Notes for what this run sets differently from the checkpoint it resumes (checkpoints
    /// from before these were recorded have nothing to compare): the optimizer's settings, which
    /// apply from here on (Lightning would restore the checkpoint's learning rate instead), the
    /// batch size, and gradient accumulation. A different optimizer is refused by its import.
    fn changed_since(
        &self,
        meta: &HashMap<String, String>,
        st: &LoopState<P, D>,
        epoch: u64,
        batch_in_epoch: usize,
    ) -> Result<Vec<String>, Error> {
        let mut notes = Vec::new();
        let ours = st.optimizer.settings();
        let changes = meta.get(crate::optim::SETTINGS).map_or(Vec::new(), |theirs| {
            OptimizerState::<P::Param, D>::settings_changes(theirs, &ours)
        });
        if !changes.is_empty() {
            notes.push(format!(
                "the optimizer's settings differ from the checkpoint's ({}): this run continues \
                 the checkpoint's optimizer state with its own settings (Lightning would keep the \
                 checkpoint's learning rate)",
                changes.join(", ")
            ));
        }
        if meta.contains_key("batch_size") {
            let theirs = meta_value::<usize>(meta, "batch_size")?;
            let ours = st.batch_size;
            if theirs != ours {
                notes.push(match batch_in_epoch {
                    0 => format!("the checkpoint's steps used batch size {theirs}; this run continues at batch size {ours}"),
                    n if n >= st.batches_per_epoch => format!(
                        "the checkpoint stopped after {n} batches of {theirs} rows in epoch {epoch}; at batch \
                         size {ours} the epoch has {} batches, so this run starts at epoch {} and continues \
                         at batch size {ours}",
                        st.batches_per_epoch,
                        epoch + 1
                    ),
                    n => format!(
                        "the checkpoint stopped after {n} batches of {theirs} rows in epoch {epoch}; at batch \
                         size {ours} this run skips that epoch's first {n} batches ({} rows, where the \
                         checkpoint had seen {}) and continues at batch size {ours}",
                        n * ours,
                        n * theirs
                    ),
                });
            }
        }
        if meta.contains_key("accumulate_grad_batches") {
            let theirs = meta_value::<usize>(meta, "accumulate_grad_batches")?;
            let ours = self.cfg.accumulate_grad_batches;
            if theirs != ours {
                notes.push(format!(
                    "the checkpoint's steps accumulated {theirs} batches each; this run accumulates {ours}"
                ));
            }
        }
        Ok(notes)
    }

    /// Reads everything a resume needs from `path` and checks it, then writes it into `model`
    /// and `st`: a checkpoint that fails any check leaves both exactly as they were.
    fn restore<M: Model<P, D>>(
        &self,
        model: &mut M,
        st: &mut LoopState<P, D>,
        report: &mut FitReport,
        path: &Path,
    ) -> Result<Vec<String>, Error> {
        let file = checkpoint::Loaded::read(path)?;
        let meta = file.metadata();
        let shown = path.display().to_string();
        let bad = |e: Error| Error::Checkpoint {
            path: shown.clone(),
            problem: e.to_string(),
        };
        if meta.get("format").map(String::as_str) != Some(checkpoint::FORMAT) {
            return Err(bad(Error::InvalidData(
                "not an nbit checkpoint (no training state); use load_weights for a weights file".into(),
            )));
        }
        file.check_no_unexpected(&params(model))?;
        let (values, mut notes) = file.read_parameters(&params(model))?;
        let from = meta.get("precision").filter(|p| p.as_str() != P::NAME);
        if let Some(from) = from {
            notes.insert(
                0,
                format!("checkpoint saved under {from}, loaded under {}", P::NAME),
            );
        }
        let shapes: Vec<Vec<usize>> = params(model).iter().map(|p| p.value().shape().to_vec()).collect();
        let (mut first_notes, mut second_notes) = (Vec::new(), Vec::new());
        let optimizer = st
            .optimizer
            .import(
                &meta,
                |name, shape| file.tensor::<P::Param, D>(name, shape, &mut first_notes),
                |name, shape| file.tensor(name, shape, &mut second_notes),
                &shapes,
            )
            .map_err(bad)?;
        notes.extend(first_notes);
        notes.extend(second_notes);
        let counter = |key| meta_value::<u64>(&meta, key).map_err(bad);
        let (epoch, global_step, skipped) = (
            counter("epoch")?,
            counter("global_step")?,
            counter("skipped_steps")?,
        );
        let batch_in_epoch = meta_value::<usize>(&meta, "batch_in_epoch").map_err(bad)?;
        let batch_in_epoch = self.rank_batches_done(&meta, batch_in_epoch).map_err(bad)?;
        notes.extend(
            self.changed_since(&meta, st, epoch, batch_in_epoch)
                .map_err(bad)?,
        );
        let mut scaler = st.scaler.clone();
        if scaler.state().is_some() {
            if SCALER_KEYS.iter().any(|k| meta.contains_key(*k)) || from.is_none() {
                let state = ScalerState {
                    scale: meta_value(&meta, SCALER_KEYS[0]).map_err(bad)?,
                    growth_factor: meta_value(&meta, SCALER_KEYS[1]).map_err(bad)?,
                    backoff_factor: meta_value(&meta, SCALER_KEYS[2]).map_err(bad)?,
                    growth_interval: meta_value(&meta, SCALER_KEYS[3]).map_err(bad)?,
                    growth_tracker: meta_value(&meta, SCALER_KEYS[4]).map_err(bad)?,
                };
                scaler.load_state(&state);
            } else {
                notes.push(format!(
                    "the checkpoint has no gradient-scaler state ({} uses none); the scaler starts fresh",
                    from.map_or("its precision", String::as_str)
                ));
            }
        }
        let mut rec = record::load(&meta, file.record(record::HISTORY)).map_err(bad)?;
        // Lightning's rule: a callback's state carries over only to the same callback (the same
        // folder for ModelCheckpoint and the CSV logger); otherwise it starts fresh, with a note.
        let mc_dir = self.cfg.model_checkpoint.as_ref().map(|m| m.dirpath.as_path());
        if rec.best_model.as_ref().is_some_and(|(p, _)| p.parent() != mc_dir) {
            notes.push(
                "ModelCheckpoint's folder differs from the checkpoint's: its best score starts fresh".into(),
            );
            rec.best_model = None;
            rec.callbacks.best = callbacks::Best::default();
        }
        let log_dir = self.cfg.csv_logger.as_deref();
        if let Some(csv) = &rec.metrics_csv
            && csv.parent().and_then(Path::parent) != log_dir
        {
            notes.push(
                "the CSV logger's folder differs from the checkpoint's: it starts a new version".into(),
            );
            rec.metrics_csv = None;
        }
        // Everything is read and checked: now write.
        for (p, v) in model.parameters_mut().into_iter().zip(values) {
            p.set(v)?;
        }
        *st = LoopState {
            batch_size: st.batch_size,
            batches_per_epoch: st.batches_per_epoch,
            epoch,
            batch_in_epoch,
            global_step,
            skipped,
            scaler,
            optimizer,
            callbacks: rec.callbacks,
            stop: false,
            communication: st.communication,
        };
        report.history = rec.history;
        report.validation = rec.validation;
        report.best_model = rec.best_model;
        report.metrics_csv = rec.metrics_csv;
        Ok(notes)
    }
}

/// A loss that can be trained on is a one-element tensor.
fn scalar_loss<E: Float, D: Backend>(loss: &Tensor<E, D>) -> Result<(), Error> {
    if loss.numel() != 1 {
        return Err(Error::InvalidModel(format!(
            "training_step must return a scalar loss (shape []), got {:?}; reduce it with mean() or sum()",
            loss.shape()
        )));
    }
    Ok(())
}

/// One CSV row per optimizer step, streamed to a file as training runs.
/// The first `<dir>/version_<n>` that does not exist yet, created (Lightning's versioning, so a
/// new run never overwrites an earlier run's metrics).
fn new_version_dir(dir: &Path) -> Result<PathBuf, Error> {
    let io = |p: &Path, e: std::io::Error| Error::Io {
        path: p.display().to_string(),
        action: "create",
        reason: format!("{e}; the CSV logger needs a folder it can write"),
    };
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    for n in 0u64.. {
        let v = dir.join(format!("version_{n}"));
        match std::fs::create_dir(&v) {
            Ok(()) => return Ok(v),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io(&v, e)),
        }
    }
    unreachable!("u64 versions run out")
}

/// Appends `bytes` to the file at `path` (created if missing) and flushes, so each epoch's row
/// is on disk when the next epoch starts.
fn append(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let io = |e| StepCsv::io(path, e);
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io)?;
    f.write_all(bytes).map_err(io)
}

struct StepCsv {
    path: PathBuf,
    out: std::io::BufWriter<std::fs::File>,
}

impl StepCsv {
    /// A new log at `path` with a row for each step of `history` (a resumed run's earlier steps).
    fn create<P: Precision>(path: &Path, history: &[StepLog]) -> Result<Self, Error> {
        let mut log = std::fs::File::create(path)
            .map(|f| StepCsv {
                path: path.to_owned(),
                out: std::io::BufWriter::new(f),
            })
            .map_err(|e| Self::io(path, e))?;
        log.write(b"step,epoch,loss,scale,skipped,lr\n")?;
        for step in history {
            log.row::<P>(step)?;
        }
        Ok(log)
    }

    fn io(path: &Path, e: std::io::Error) -> Error {
        Error::Io {
            path: path.display().to_string(),
            action: "write",
            reason: e.to_string(),
        }
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), Error> {
        self.out.write_all(bytes).map_err(|e| Self::io(&self.path, e))
    }

    /// The loss in the dtype it was computed in, written exactly (16-bit) or with round-trip
    /// digits; a mean over micro-batches is written as f64.
    fn row<P: Precision>(&mut self, s: &StepLog) -> Result<(), Error> {
        let l = P::Full::from_f64(s.loss);
        let loss = if l.as_f64() == s.loss || s.loss.is_nan() {
            crate::fmt::exact(l)
        } else {
            crate::fmt::exact(s.loss)
        };
        let line = format!(
            "{},{},{loss},{},{},{}\n",
            s.step,
            s.epoch,
            s.scale,
            u8::from(s.skipped),
            s.lr
        );
        self.write(line.as_bytes())
    }

    fn flush(&mut self) -> Result<(), Error> {
        self.out.flush().map_err(|e| Self::io(&self.path, e))
    }
}

/// Clips gradients in place, by value or by total L2 norm (computed in f64 over all gradients,
/// PyTorch's `clip_grad_norm_` with its 1e-6); returns the norm when clipping by norm.
///
/// As in PyTorch, the coefficient `min(limit / (norm + 1e-6), 1)` is applied even when the norm is
/// not finite: a NaN norm makes every gradient NaN, an infinite one zeroes the finite gradients
/// (and the infinite ones become NaN), so a bad step cannot pass for a good one.
fn clip<E: Float, D: Backend>(
    grads: &mut [Option<Tensor<E, D>>],
    limit: f64,
    algorithm: ClipAlgorithm,
) -> Option<f64> {
    let grads = grads.iter_mut().flatten();
    match algorithm {
        ClipAlgorithm::Value => {
            grads.for_each(|g| D::clamp_in_place(g.storage_mut(), limit));
            None
        }
        ClipAlgorithm::Norm => {
            let mut grads: Vec<&mut Tensor<E, D>> = grads.collect();
            let storages: Vec<_> = grads.iter().map(|g| g.storage()).collect();
            let norm = D::sums_of_squares(&storages).into_iter().sum::<f64>().sqrt();
            // torch.clamp(coef, max=1.0) keeps a NaN, where f64::min would drop it.
            let coef = limit / (norm + 1e-6);
            let coef = if coef.is_nan() { coef } else { coef.min(1.0) };
            if coef != 1.0 {
                grads
                    .iter_mut()
                    .for_each(|g| D::scale_in_place(g.storage_mut(), coef));
            }
            Some(norm)
        }
    }
}

/// A model summary: Lightning's `ModelSummary` table, its totals, and the optimizer state. The
/// model size follows Lightning's rule: parameters × the precision's bits (32 for the mixed
/// precisions, whose weights are f32) / 8 / 1e6 MB.
///
/// ```
/// use nbit::prelude::*;
/// use nbit::nn::Task;
/// use nbit::optim::{AdamW, Optimization};
/// let trainer = Trainer::<Mixed<BF16>, Cpu>::new()?;
/// let mut model = trainer.init_module(|ctx| {
///     MlpModel::new(ctx, &[4, 8, 3], Task::Classification, Optimization::new(AdamW::default()))
/// })?;
/// let summary = trainer.summary(&mut model);
/// assert_eq!(summary.to_string().lines().take(5).collect::<Vec<_>>(), [
///     "  | Name | Type   | Params",
///     "--------------------------",
///     "0 | 0    | Linear | 40",
///     "1 | 1    | ReLU   | 0",
///     "2 | 2    | Linear | 27",
/// ]);
/// assert!(summary.to_string().contains("67        Trainable params"));
/// # Ok::<(), nbit::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    /// The model's layers in order, parameterless ones included ([`Model::layers`]).
    pub layers: Vec<LayerSummary>,
    /// All parameters.
    pub total: usize,
    /// Estimated size in MB.
    pub size_mb: f64,
    /// The precision's name.
    pub precision: &'static str,
    /// Bytes of optimizer state once every parameter has stepped (moments, momentum,
    /// compensation buffers).
    pub optimizer_state_bytes: usize,
    /// The optimizer and its update rounding, e.g. `"AdamW, compensated rounding"`.
    pub optimizer: String,
}

impl Summary {
    fn new<P: Precision, D: Backend>(
        layers: Vec<LayerSummary>,
        params: &[&Parameter<P::Param, D>],
        optimization: &Optimization,
    ) -> Self {
        let total = params.iter().map(|p| p.numel()).sum::<usize>();
        Summary {
            layers,
            total,
            size_mb: total as f64 * P::MODEL_BITS as f64 / 8.0 / 1e6,
            precision: P::NAME,
            optimizer_state_bytes: total * optimization.state_bytes_per_parameter::<P::Param>(),
            optimizer: format!(
                "{}, {} rounding",
                optimization.optimizer.name(),
                optimization.update_rounding
            ),
        }
    }
}

/// A parameter count as Lightning prints it (`get_human_readable_count`): `131`, `38.3 K`, `123 K`,
/// `1.2 M`.
pub(crate) fn readable_count(n: usize) -> String {
    const UNITS: [&str; 5] = [" ", "K", "M", "B", "T"];
    let digits = if n == 0 { 1 } else { n.ilog10() as usize + 1 };
    let groups = digits.div_ceil(3).min(UNITS.len());
    let scaled = n as f64 / 10f64.powi(3 * (groups as i32 - 1));
    if groups == 1 || scaled >= 100.0 {
        format!("{} {}", scaled as u64, UNITS[groups - 1])
    } else {
        format!("{scaled:.1} {}", UNITS[groups - 1])
    }
}

impl core::fmt::Display for Summary {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let counts: Vec<String> = self.layers.iter().map(|l| readable_count(l.params)).collect();
        let width =
            |header: &str, cells: &mut dyn Iterator<Item = usize>| cells.fold(header.len(), usize::max);
        let wi = (self.layers.len().max(1) - 1).to_string().len();
        let wn = width("Name", &mut self.layers.iter().map(|l| l.name.len()));
        let wt = width("Type", &mut self.layers.iter().map(|l| l.kind.len()));
        let wp = width("Params", &mut counts.iter().map(String::len));
        let header = format!("{:wi$} | {:wn$} | {:wt$} | {:wp$}", "", "Name", "Type", "Params");
        let rule = "-".repeat(header.len());
        writeln!(f, "{}", header.trim_end())?;
        writeln!(f, "{rule}")?;
        for (i, (l, n)) in self.layers.iter().zip(&counts).enumerate() {
            let row = format!("{i:<wi$} | {:wn$} | {:wt$} | {n:wp$}", l.name, l.kind);
            writeln!(f, "{}", row.trim_end())?;
        }
        writeln!(f, "{rule}")?;
        let total = readable_count(self.total);
        writeln!(f, "{total:<10}Trainable params")?;
        writeln!(f, "{:<10}Non-trainable params", readable_count(0))?;
        writeln!(f, "{total:<10}Total params")?;
        writeln!(
            f,
            "{:<10.3}Total estimated model params size (MB) under {}",
            self.size_mb, self.precision
        )?;
        write!(
            f,
            "{:<10.3}Optimizer state size (MB) ({})",
            self.optimizer_state_bytes as f64 / 1e6,
            self.optimizer
        )
    }
}

/// The model's parameters, read-only (the one list [`Model::parameters_mut`] gives).
fn params<P: Precision, D: Backend, M: Model<P, D>>(model: &mut M) -> Vec<&Parameter<P::Param, D>> {
    model.parameters_mut().into_iter().map(|p| &*p).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Cpu, F32, Mixed, True};

    #[test]
    fn parameter_counts_read_as_lightning_prints_them() {
        // Lightning's get_human_readable_count for the same numbers.
        let cases = [
            (0, "0  "),
            (131, "131  "),
            (999, "999  "),
            (1000, "1.0 K"),
            (4640, "4.6 K"),
            (38282, "38.3 K"),
            (123_456, "123 K"),
            (1_234_567, "1.2 M"),
            (9_999_999_999, "10.0 B"),
        ];
        for (n, want) in cases {
            assert_eq!(readable_count(n), want, "{n}");
        }
    }

    #[test]
    fn defaults_are_lightnings() {
        let t = Trainer::<True<F32>, Cpu>::new().unwrap();
        let c = t.config();
        assert_eq!(
            (c.max_epochs, c.max_steps, c.gradient_clip_val),
            (None, None, None)
        );
        assert_eq!(
            (
                c.accumulate_grad_batches,
                c.log_every_n_steps,
                c.enable_progress_bar
            ),
            (1, 50, true)
        );
        assert_eq!(c.gradient_clip_algorithm, ClipAlgorithm::Norm);
    }

    #[test]
    fn a_non_finite_norm_reaches_every_gradient_as_in_clip_grad_norm() {
        let t = |v: Vec<f32>| Some(Tensor::<f32, Cpu>::from_vec(&[v.len()], v).unwrap());
        let mut grads = vec![t(vec![1.0, f32::NAN]), None, t(vec![3.0])];
        let norm = clip(&mut grads, 1.0, ClipAlgorithm::Norm).unwrap();
        assert!(norm.is_nan());
        for g in grads.iter().flatten() {
            assert!(g.to_vec().iter().all(|v| v.is_nan()), "{:?}", g.to_vec());
        }
        // An infinite norm: coefficient 0, so finite gradients become 0 and infinite ones NaN.
        let mut grads = vec![t(vec![2.0, f32::INFINITY]), t(vec![-3.0])];
        assert_eq!(clip(&mut grads, 1.0, ClipAlgorithm::Norm), Some(f64::INFINITY));
        let v: Vec<Vec<f32>> = grads.iter().flatten().map(|g| g.to_vec()).collect();
        assert!(v[0][0] == 0.0 && v[0][1].is_nan() && v[1][0] == 0.0, "{v:?}");
        // A small norm leaves gradients exactly as they were.
        let mut grads = vec![t(vec![0.3, -0.4])];
        let norm = clip(&mut grads, 1.0, ClipAlgorithm::Norm).unwrap();
        assert!((norm - 0.5).abs() < 1e-7, "{norm}");
        assert_eq!(grads[0].as_ref().unwrap().to_vec(), vec![0.3, -0.4]);
    }

    #[test]
    fn bad_settings_are_errors() {
        let e = Trainer::<Mixed<crate::BF16>, Cpu>::builder()
            .accumulate_grad_batches(0)
            .build()
            .unwrap_err();
        assert!(e.to_string().contains("accumulate_grad_batches"));
        let e = Trainer::<True<F32>, Cpu>::builder()
            .gradient_clip_val(f64::NAN)
            .build()
            .unwrap_err();
        assert!(e.to_string().contains("gradient_clip_val"));
        assert!(
            "max"
                .parse::<ClipAlgorithm>()
                .unwrap_err()
                .to_string()
                .contains("'norm' or 'value'")
        );
    }
}
