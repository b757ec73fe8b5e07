//! The model trait in Lightning's shape, and a ready MLP model.

use crate::autocast::Autocast;
use crate::backend::Backend;
use crate::data::Batch;
use crate::device::Cpu;
use crate::dtype::Float;
use crate::error::Error;
use crate::nn::{InitCtx, Mlp, Parameter, Task};
use crate::optim::{AdamW, Optimization};
use crate::precision::Precision;
use crate::tensor::Tensor;

/// Where the loop is when it calls a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepInfo {
    /// The epoch, from 0.
    pub epoch: u64,
    /// The batch within the epoch, from 0.
    pub batch_idx: usize,
    /// Optimizer steps taken before this batch (skipped ones included, as Lightning counts).
    pub global_step: u64,
    /// The trainer's seed.
    pub seed: u64,
}

impl StepInfo {
    /// A dropout seed unique to this batch and reproducible across runs and resumes.
    pub fn dropout_seed(&self) -> u64 {
        self.seed ^ (self.epoch << 40) ^ ((self.batch_idx as u64) << 8) ^ 0x5EED
    }
}

/// Sums over a validation pass: loss and, for classification, correct predictions.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Metrics {
    /// Sum over rows of the per-row loss (batch mean × batch size).
    pub loss_sum: f64,
    /// Correct top-1 predictions (classification).
    pub correct: usize,
    /// Rows seen.
    pub count: usize,
}

impl Metrics {
    /// Mean loss per row.
    pub fn loss(&self) -> f64 {
        self.loss_sum / self.count.max(1) as f64
    }

    /// Fraction of rows predicted correctly.
    pub fn accuracy(&self) -> f64 {
        self.correct as f64 / self.count.max(1) as f64
    }

    /// Adds another batch's sums.
    pub fn merge(&mut self, other: Metrics) {
        self.loss_sum += other.loss_sum;
        self.correct += other.correct;
        self.count += other.count;
    }
}

/// A trainable model, as a `LightningModule`: its parameters, its steps and its optimizer.
///
/// One method is required: [`Model::parameters_mut`], which lists the trainable parameters once
/// (a layer's own `parameters_mut`, or several chained; the trainer reads them through it too).
/// Give [`Model::forward`] and every step has a default: training minimises [`Model::loss`]
/// (cross-entropy against class labels, mean squared error against target values), validation
/// reports that loss and, for class labels, top-1 accuracy, and prediction returns the outputs.
/// Override [`Model::loss`] for another loss, or any step for full control.
///
/// ```
/// use nbit::prelude::*;
/// use nbit::data::{Batch, DataLoader, Dataset};
/// use nbit::nn::{Linear, Parameter};
/// use nbit::optim::{Optimization, Sgd};
///
/// /// Logistic regression: one Linear layer, cross-entropy from the defaults.
/// struct Logistic<P: Precision> { layer: Linear<P> }
///
/// impl<P: Precision> Model<P> for Logistic<P> {
///     fn forward(&mut self, ac: &Autocast<P>, batch: &Batch) -> Result<Tensor<P::Full>, Error> {
///         Ok(self.layer.forward(ac, &batch.input::<P, Cpu>())?.cast())
///     }
///     fn parameters_mut(&mut self) -> Vec<&mut Parameter<P::Param>> { self.layer.parameters_mut() }
///     fn configure_optimizers(&self) -> Optimization { Optimization::new(Sgd::new(0.5)) }
/// }
///
/// let x = nbit::ndarray::Array2::from_shape_fn((64, 2), |(i, j)| ((i * 7 + j * 3) % 11) as f64 / 11.0 - 0.5);
/// let y: Vec<usize> = x.rows().into_iter().map(|r| usize::from(r[0] + r[1] > 0.0)).collect();
/// let data = DataLoader::new(Dataset::classification(x, y)?, 16)?;
/// let trainer = Trainer::<Mixed<BF16>, Cpu>::builder().max_epochs(40).enable_progress_bar(false).build()?;
/// let mut model = trainer.init_module(|ctx| Linear::new(ctx, "0", 2, 2).map(|layer| Logistic { layer }))?;
/// trainer.fit(&mut model, &data, None)?;
/// assert!(trainer.validate(&mut model, &data)?.accuracy() > 0.9);
/// # Ok::<(), nbit::Error>(())
/// ```
pub trait Model<P: Precision, D: Backend = Cpu> {
    /// Creates parameters that should be made under the trainer's precision and device (called
    /// once by [`Trainer::fit`](crate::Trainer::fit) before training; must be idempotent).
    fn configure_model(&mut self, _ctx: &mut InitCtx<P, D>) -> Result<(), Error> {
        Ok(())
    }

    /// The model's outputs on one batch, `[rows, outputs]` in `P::Full`: logits for
    /// classification, predictions for regression. The default steps are built on it; a model
    /// that writes its own steps need not give it.
    fn forward(&mut self, _ac: &Autocast<P, D>, _batch: &Batch) -> Result<Tensor<P::Full, D>, Error> {
        Err(Error::InvalidModel(
            "this model has no forward(): implement Model::forward, or training_step, \
             validation_step and predict_step"
                .into(),
        ))
    }

    /// The loss of `outputs` (from [`Model::forward`]) on `batch`, one element. Default:
    /// cross-entropy against the batch's class labels, or mean squared error against its target
    /// values, as `torch.nn.functional` computes them.
    fn loss(
        &mut self,
        ac: &Autocast<P, D>,
        outputs: &Tensor<P::Full, D>,
        batch: &Batch,
    ) -> Result<Tensor<P::Full, D>, Error> {
        match batch.classes() {
            Some(classes) => ac.cross_entropy(outputs, classes),
            None => {
                let target = batch.values::<P::Full, D>().ok_or_else(|| {
                    Error::InvalidData("the batch has neither class labels nor target values".into())
                })?;
                ac.mse_loss(outputs, &target)
            }
        }
    }

    /// The loss of one batch (already reduced to one element). Default: [`Model::loss`] of
    /// [`Model::forward`].
    fn training_step(
        &mut self,
        ac: &Autocast<P, D>,
        batch: &Batch,
        _step: &StepInfo,
    ) -> Result<Tensor<P::Full, D>, Error> {
        let outputs = self.forward(ac, batch)?;
        self.loss(ac, &outputs, batch)
    }

    /// Loss sums and correct counts on one batch. Default: [`Model::loss`] of
    /// [`Model::forward`], and top-1 accuracy where the batch has class labels.
    fn validation_step(&mut self, ac: &Autocast<P, D>, batch: &Batch) -> Result<Metrics, Error> {
        let outputs = self.forward(ac, batch)?;
        let loss = self.loss(ac, &outputs, batch)?;
        Ok(Metrics {
            loss_sum: loss.item()?.as_f64() * batch.len() as f64,
            correct: batch.classes().map_or(0, |c| correct_predictions(&outputs, c)),
            count: batch.len(),
        })
    }

    /// The model's outputs on one batch, in `P::Full`. Default: [`Model::forward`].
    fn predict_step(&mut self, ac: &Autocast<P, D>, batch: &Batch) -> Result<Tensor<P::Full, D>, Error> {
        self.forward(ac, batch)
    }

    /// The optimizer and scheduler (Lightning's `configure_optimizers`). Default: AdamW, PyTorch's
    /// defaults.
    fn configure_optimizers(&self) -> Optimization {
        Optimization::new(AdamW::default())
    }

    /// Sees the unscaled gradients just before the optimizer step, before clipping.
    fn on_before_optimizer_step(&mut self, _grads: &[(&str, &Tensor<P::Param, D>)]) {}

    /// Called after each training epoch (`epoch` from 0) with the mean of its step losses, before
    /// validation (Lightning's `on_train_epoch_end`).
    fn on_train_epoch_end(&mut self, _epoch: u64, _train_loss: f64) {}

    /// Called after each epoch's validation with its metrics (Lightning's
    /// `on_validation_epoch_end`).
    fn on_validation_epoch_end(&mut self, _epoch: u64, _metrics: &Metrics) {}

    /// The trainable parameters, in a fixed order (their names are the checkpoint's keys). The
    /// trainer reads and updates them through this one list.
    fn parameters_mut(&mut self) -> Vec<&mut Parameter<P::Param, D>>;

    /// The rows of [`Trainer::summary`](crate::Trainer::summary): each layer's name, type and
    /// parameter count, parameterless layers included (Lightning's `ModelSummary`). Default: one
    /// row per parameter-name prefix (`"0"` for `0.weight` and `0.bias`), of unknown type (`-`), as
    /// the parameter list cannot tell a type or see a layer without parameters;
    /// [`Sequential`](crate::nn::Sequential) and [`MlpModel`] list their layers.
    fn layers(&mut self) -> Vec<LayerSummary> {
        let mut rows: Vec<LayerSummary> = Vec::new();
        for p in self.parameters_mut() {
            let name = p.name().rsplit_once('.').map_or(p.name(), |(l, _)| l);
            match rows.last_mut() {
                Some(row) if row.name == name => row.params += p.numel(),
                _ => rows.push(LayerSummary::new(name, "-", p.numel())),
            }
        }
        rows
    }
}

/// One row of a model summary: a layer's name, its type and its parameter count.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerSummary {
    /// The layer's name (its parameters' prefix, or its index in a `Sequential`).
    pub name: String,
    /// The layer's type, as PyTorch names it (`Linear`, `ReLU`), or `-` where unknown.
    pub kind: String,
    /// Its trainable parameters (0 for an activation, a reshape).
    pub params: usize,
}

impl LayerSummary {
    /// A row.
    pub fn new(name: impl Into<String>, kind: impl Into<String>, params: usize) -> Self {
        LayerSummary {
            name: name.into(),
            kind: kind.into(),
            params,
        }
    }
}

/// Rows whose largest output (first on ties) is at the row's class: top-1 accuracy's numerator.
fn correct_predictions<E: Float, D: Backend>(outputs: &Tensor<E, D>, classes: &[usize]) -> usize {
    let out = outputs.to_array();
    let cols = out.shape().last().copied().unwrap_or(1).max(1);
    let flat: Vec<f64> = out.iter().map(|v| v.as_f64()).collect();
    flat.chunks(cols)
        .zip(classes)
        .filter(|&(row, &y)| crate::nn::argmax(row.iter().copied()) == y)
        .count()
}

/// An [`Mlp`] with its loss and optimizer: the model the command line and the quickstart train.
#[derive(Clone, Debug)]
pub struct MlpModel<P: Precision, D: Backend = Cpu> {
    /// The network.
    pub net: Mlp<P, D>,
    /// The optimizer and scheduler.
    pub optimization: Optimization,
}

impl<P: Precision, D: Backend> MlpModel<P, D> {
    /// A model of layer widths `sizes` for `task`, optimised by `optimization`. Sizes whose
    /// training state (parameters, gradients, optimizer state) would not fit in the memory
    /// available are [`Error::OutOfMemory`], before anything is allocated.
    pub fn new(
        ctx: &mut InitCtx<P, D>,
        sizes: &[usize],
        task: Task,
        optimization: Optimization,
    ) -> Result<Self, Error> {
        crate::nn::check_mlp_fits::<P>(sizes, &optimization, 0)?;
        Ok(MlpModel {
            net: Mlp::try_new(ctx, sizes, task)?,
            optimization,
        })
    }
}

impl<P: Precision, D: Backend> Model<P, D> for MlpModel<P, D> {
    fn forward(&mut self, ac: &Autocast<P, D>, batch: &Batch) -> Result<Tensor<P::Full, D>, Error> {
        Ok(self.net.forward(ac, &batch.input::<P, D>())?.cast())
    }

    /// The network's task decides the loss (cross-entropy or MSE); a batch with the other kind of
    /// target is an error that says so. Training, validation and prediction are the defaults.
    fn loss(
        &mut self,
        ac: &Autocast<P, D>,
        outputs: &Tensor<P::Full, D>,
        batch: &Batch,
    ) -> Result<Tensor<P::Full, D>, Error> {
        match self.net.task() {
            Task::Classification => {
                let classes = batch.classes().ok_or_else(|| {
                    Error::InvalidData(
                        "classification needs class labels, but the batch has regression targets".into(),
                    )
                })?;
                ac.cross_entropy(outputs, classes)
            }
            Task::Regression => {
                let target = batch.values::<P::Full, D>().ok_or_else(|| {
                    Error::InvalidData(
                        "regression needs target values, but the batch has class labels".into(),
                    )
                })?;
                ac.mse_loss(outputs, &target)
            }
        }
    }

    fn configure_optimizers(&self) -> Optimization {
        self.optimization
    }

    fn parameters_mut(&mut self) -> Vec<&mut Parameter<P::Param, D>> {
        self.net.parameters_mut()
    }

    fn layers(&mut self) -> Vec<LayerSummary> {
        self.net.layers()
    }
}
