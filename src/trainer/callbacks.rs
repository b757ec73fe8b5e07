//! Lightning's `EarlyStopping` and `ModelCheckpoint`, as Trainer options.

use std::path::PathBuf;

use crate::error::Error;

/// A metric the loop records once per epoch, by the name Lightning users log it under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Monitor {
    /// `"val_loss"`: mean validation loss per row.
    ValLoss,
    /// `"val_acc"`: validation top-1 accuracy.
    ValAcc,
    /// `"train_loss"`: mean of the epoch's step losses.
    TrainLoss,
}

impl Monitor {
    /// The name, as in Lightning's logs.
    pub fn name(self) -> &'static str {
        match self {
            Monitor::ValLoss => "val_loss",
            Monitor::ValAcc => "val_acc",
            Monitor::TrainLoss => "train_loss",
        }
    }

    /// Parses `"val_loss"`, `"val_acc"` or `"train_loss"`.
    pub fn parse(s: &str) -> Result<Self, Error> {
        match s {
            "val_loss" => Ok(Monitor::ValLoss),
            "val_acc" => Ok(Monitor::ValAcc),
            "train_loss" => Ok(Monitor::TrainLoss),
            _ => Err(Error::InvalidArgument {
                name: "monitor",
                value: s.into(),
                expected: "val_loss, val_acc or train_loss",
            }),
        }
    }

    /// Whether the metric needs validation data.
    pub fn needs_validation(self) -> bool {
        self != Monitor::TrainLoss
    }
}

/// Whether smaller or larger is better (Lightning's `mode="min"` / `"max"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Mode {
    /// Smaller is better (Lightning's default).
    #[default]
    Min,
    /// Larger is better (for accuracy).
    Max,
}

impl Mode {
    /// Whether `current` beats `best` by more than `min_delta` (Lightning's comparison).
    fn improves(self, current: f64, best: Option<f64>, min_delta: f64) -> bool {
        match best {
            None => current.is_finite(),
            Some(b) => match self {
                Mode::Min => current < b - min_delta,
                Mode::Max => current > b + min_delta,
            },
        }
    }
}

/// Stops training when a metric stops improving (`lightning.pytorch.callbacks.EarlyStopping`).
/// Defaults are Lightning's: patience 3, mode min, min_delta 0, check_finite true.
///
/// ```
/// use nbit::{EarlyStopping, Mode, Monitor};
/// let stop = EarlyStopping::new(Monitor::ValAcc).mode(Mode::Max).patience(5);
/// assert_eq!(stop.patience, 5);
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct EarlyStopping {
    /// The metric watched.
    pub monitor: Monitor,
    /// Epochs without improvement before stopping.
    pub patience: u64,
    /// Whether smaller or larger is better.
    pub mode: Mode,
    /// The least change that counts as an improvement.
    pub min_delta: f64,
    /// Stop as soon as the metric is NaN or infinite.
    pub check_finite: bool,
}

impl EarlyStopping {
    /// Watches `monitor` with Lightning's defaults.
    pub fn new(monitor: Monitor) -> Self {
        EarlyStopping {
            monitor,
            patience: 3,
            mode: Mode::Min,
            min_delta: 0.0,
            check_finite: true,
        }
    }

    /// Epochs without improvement before stopping.
    pub fn patience(mut self, epochs: u64) -> Self {
        self.patience = epochs;
        self
    }

    /// Whether smaller or larger is better.
    pub fn mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }

    /// The least change that counts as an improvement (at least 0).
    pub fn min_delta(mut self, delta: f64) -> Self {
        self.min_delta = delta;
        self
    }

    /// Whether a NaN or infinite metric stops training.
    pub fn check_finite(mut self, on: bool) -> Self {
        self.check_finite = on;
        self
    }
}

/// Saves checkpoints as training runs (`lightning.pytorch.callbacks.ModelCheckpoint`): the best
/// by a monitored metric as `best.safetensors` and, with `save_last`, the latest as
/// `last.safetensors`, both in `dirpath` and both resumable with `Trainer::fit_from`.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelCheckpoint {
    /// The folder the files go to (created if missing).
    pub dirpath: PathBuf,
    /// The metric that decides "best"; `None` keeps only the last checkpoint.
    pub monitor: Option<Monitor>,
    /// Whether smaller or larger is better.
    pub mode: Mode,
    /// Also write `last.safetensors` after every epoch.
    pub save_last: bool,
}

impl ModelCheckpoint {
    /// Checkpoints in `dirpath`: the best by `val_loss` (mode min) and the last.
    pub fn new(dirpath: impl Into<PathBuf>) -> Self {
        ModelCheckpoint {
            dirpath: dirpath.into(),
            monitor: Some(Monitor::ValLoss),
            mode: Mode::Min,
            save_last: true,
        }
    }

    /// The metric that decides the best checkpoint (`None`: only the last).
    pub fn monitor(mut self, monitor: Option<Monitor>) -> Self {
        self.monitor = monitor;
        self
    }

    /// Whether smaller or larger is better.
    pub fn mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }

    /// Whether to write `last.safetensors` after every epoch.
    pub fn save_last(mut self, on: bool) -> Self {
        self.save_last = on;
        self
    }
}

/// The early-stopping state across epochs of a fit (kept in checkpoints, so a resume continues it).
#[derive(Debug, Default)]
pub(crate) struct Watch {
    pub(crate) best: Option<f64>,
    pub(crate) wait: u64,
}

impl Watch {
    /// Records this epoch's value; `Some(reason)` when training should stop.
    pub(crate) fn update(&mut self, es: &EarlyStopping, value: f64) -> Option<String> {
        let name = es.monitor.name();
        if es.check_finite && !value.is_finite() {
            return Some(format!(
                "monitored metric {name} = {value} is not finite; previous best {}",
                self.best.map_or("none".into(), |b| format!("{b:.6}"))
            ));
        }
        if es.mode.improves(value, self.best, es.min_delta) {
            self.best = Some(value);
            self.wait = 0;
            return None;
        }
        self.wait += 1;
        (self.wait >= es.patience).then(|| {
            format!(
                "monitored metric {name} did not improve in the last {} epochs; best {:.6}",
                self.wait,
                self.best.unwrap_or(f64::NAN)
            )
        })
    }
}

/// The best-checkpoint state across epochs of a fit (kept in checkpoints).
#[derive(Debug, Default)]
pub(crate) struct Best {
    pub(crate) score: Option<f64>,
}

impl Best {
    /// Whether `value` is a new best under `mode`.
    pub(crate) fn improves(&mut self, mode: Mode, value: f64) -> bool {
        let better = mode.improves(value, self.score, 0.0);
        if better {
            self.score = Some(value);
        }
        better
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn early_stopping_counts_epochs_without_improvement_as_lightning_does() {
        let es = EarlyStopping::new(Monitor::ValLoss).patience(2).min_delta(0.01);
        let mut w = Watch::default();
        assert_eq!(w.update(&es, 1.0), None); // first value: best
        assert_eq!(w.update(&es, 0.995), None); // within min_delta: wait 1
        assert_eq!(w.update(&es, 0.5), None); // improves: wait 0
        assert_eq!(w.update(&es, 0.6), None); // wait 1
        let why = w.update(&es, 0.7).expect("wait 2 = patience");
        assert!(
            why.contains("val_loss did not improve in the last 2 epochs; best 0.500000"),
            "{why}"
        );
        let mut w = Watch::default();
        let es = EarlyStopping::new(Monitor::ValAcc).mode(Mode::Max).patience(1);
        assert_eq!(w.update(&es, 0.5), None);
        assert!(w.update(&es, 0.4).is_some());
        let why = Watch::default().update(&es, f64::NAN).expect("NaN stops");
        assert!(why.contains("val_acc = NaN is not finite"), "{why}");
        assert!(
            Monitor::parse("val_accuracy")
                .unwrap_err()
                .to_string()
                .contains("val_loss, val_acc or train_loss")
        );
    }
}
