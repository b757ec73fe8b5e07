//! What a run has recorded, carried in its checkpoints so that a resumed run continues it: the
//! report's step history and per-epoch validation metrics, the callbacks' state (EarlyStopping's
//! best score and patience counter, ModelCheckpoint's best score and file) and the CSV logger's
//! file (Lightning stores each callback's `state_dict` in its checkpoints the same way).
//!
//! Everything is checkpoint metadata (text): numbers as the hexadecimal bits of their f64 or f32,
//! so every value, NaN included, comes back bit for bit.

use std::collections::HashMap;
use std::path::PathBuf;

use super::callbacks::{Best, Watch};
use super::{FitReport, Metrics, StepLog};
use crate::error::Error;

const HISTORY: &str = "record.history";
const VALIDATION: &str = "record.validation";
const EARLY_STOPPING: &str = "record.early_stopping";
const BEST_SCORE: &str = "record.model_checkpoint.best_score";
const BEST_MODEL: &str = "record.model_checkpoint.best_model";
const METRICS_CSV: &str = "record.csv_logger.metrics_csv";

/// The callbacks' state between epochs of a fit.
#[derive(Debug, Default)]
pub(crate) struct CallbackState {
    /// EarlyStopping's best value and epochs without improvement, with the metric it watches.
    pub watch: Watch,
    /// ModelCheckpoint's best score.
    pub best: Best,
}

fn bits(x: f64) -> String {
    format!("{:x}", x.to_bits())
}

fn unbits(s: &str) -> Option<f64> {
    u64::from_str_radix(s, 16).ok().map(f64::from_bits)
}

fn optional(x: Option<f64>) -> String {
    x.map_or("none".into(), bits)
}

fn unoptional(s: &str) -> Option<Option<f64>> {
    if s == "none" {
        Some(None)
    } else {
        unbits(s).map(Some)
    }
}

/// Writes the record of `report` and `callbacks` into checkpoint metadata.
pub(crate) fn save(report: &FitReport, callbacks: &CallbackState, meta: &mut HashMap<String, String>) {
    let history: Vec<String> = report
        .history
        .iter()
        .map(|s| {
            format!(
                "{} {} {} {:x} {} {}",
                s.step,
                s.epoch,
                bits(s.loss),
                s.scale.to_bits(),
                u8::from(s.skipped),
                bits(s.lr)
            )
        })
        .collect();
    meta.insert(HISTORY.into(), history.join(";"));
    let validation: Vec<String> = report
        .validation
        .iter()
        .map(|m| format!("{} {} {}", bits(m.loss_sum), m.correct, m.count))
        .collect();
    meta.insert(VALIDATION.into(), validation.join(";"));
    meta.insert(
        EARLY_STOPPING.into(),
        format!("{} {}", optional(callbacks.watch.best), callbacks.watch.wait),
    );
    meta.insert(BEST_SCORE.into(), optional(callbacks.best.score));
    if let Some((path, score)) = &report.best_model {
        meta.insert(BEST_MODEL.into(), format!("{} {}", bits(*score), path.display()));
    }
    if let Some(path) = &report.metrics_csv {
        meta.insert(METRICS_CSV.into(), path.display().to_string());
    }
}

/// What [`load`] read from a checkpoint.
#[derive(Debug, Default)]
pub(crate) struct Record {
    pub history: Vec<StepLog>,
    pub validation: Vec<Metrics>,
    pub callbacks: CallbackState,
    pub best_model: Option<(PathBuf, f64)>,
    pub metrics_csv: Option<PathBuf>,
}

/// Reads the record from checkpoint metadata. A checkpoint written before nbit kept records has
/// none of its keys: an empty record. A malformed value is an error naming the key.
pub(crate) fn load(meta: &HashMap<String, String>) -> Result<Record, Error> {
    let bad = |key: &str| Error::InvalidData(format!("the metadata '{key}' is malformed"));
    let rows = |key: &str| {
        meta.get(key)
            .map(|v| v.split(';').filter(|r| !r.is_empty()).collect::<Vec<_>>())
            .unwrap_or_default()
    };
    let mut r = Record::default();
    for row in rows(HISTORY) {
        let f: Vec<&str> = row.split(' ').collect();
        let step = || -> Option<StepLog> {
            let [step, epoch, loss, scale, skipped, lr] = f.as_slice() else {
                return None;
            };
            Some(StepLog {
                step: step.parse().ok()?,
                epoch: epoch.parse().ok()?,
                loss: unbits(loss)?,
                scale: f32::from_bits(u32::from_str_radix(scale, 16).ok()?),
                skipped: match *skipped {
                    "0" => false,
                    "1" => true,
                    _ => return None,
                },
                lr: unbits(lr)?,
            })
        };
        r.history.push(step().ok_or_else(|| bad(HISTORY))?);
    }
    for row in rows(VALIDATION) {
        let f: Vec<&str> = row.split(' ').collect();
        let m = || -> Option<Metrics> {
            let [loss_sum, correct, count] = f.as_slice() else {
                return None;
            };
            Some(Metrics {
                loss_sum: unbits(loss_sum)?,
                correct: correct.parse().ok()?,
                count: count.parse().ok()?,
            })
        };
        r.validation.push(m().ok_or_else(|| bad(VALIDATION))?);
    }
    if let Some(v) = meta.get(EARLY_STOPPING) {
        let (best, wait) = v.split_once(' ').ok_or_else(|| bad(EARLY_STOPPING))?;
        r.callbacks.watch.best = unoptional(best).ok_or_else(|| bad(EARLY_STOPPING))?;
        r.callbacks.watch.wait = wait.parse().map_err(|_| bad(EARLY_STOPPING))?;
    }
    if let Some(v) = meta.get(BEST_SCORE) {
        r.callbacks.best.score = unoptional(v).ok_or_else(|| bad(BEST_SCORE))?;
    }
    if let Some(v) = meta.get(BEST_MODEL) {
        let (score, path) = v.split_once(' ').ok_or_else(|| bad(BEST_MODEL))?;
        r.best_model = Some((PathBuf::from(path), unbits(score).ok_or_else(|| bad(BEST_MODEL))?));
    }
    r.metrics_csv = meta.get(METRICS_CSV).map(PathBuf::from);
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_comes_back_bit_for_bit_nan_included() {
        let report = FitReport {
            history: vec![
                StepLog {
                    step: 1,
                    epoch: 0,
                    loss: 0.1,
                    scale: 65536.0,
                    skipped: false,
                    lr: 1e-3,
                },
                StepLog {
                    step: 2,
                    epoch: 0,
                    loss: f64::NAN,
                    scale: 32768.0,
                    skipped: true,
                    lr: 1e-3,
                },
            ],
            validation: vec![Metrics {
                loss_sum: 12.5,
                correct: 7,
                count: 9,
            }],
            best_model: Some((PathBuf::from("dir with space/best.safetensors"), 0.75)),
            metrics_csv: Some(PathBuf::from("logs/version_3/metrics.csv")),
            ..FitReport::empty()
        };
        let mut callbacks = CallbackState::default();
        callbacks.watch.best = Some(0.5);
        callbacks.watch.wait = 2;
        callbacks.best.score = Some(0.75);
        let mut meta = HashMap::new();
        save(&report, &callbacks, &mut meta);
        let r = load(&meta).unwrap();
        assert_eq!(r.history.len(), 2);
        assert_eq!(r.history[0], report.history[0]);
        assert!(r.history[1].loss.is_nan() && r.history[1].skipped && r.history[1].scale == 32768.0);
        assert_eq!(r.validation, report.validation);
        assert_eq!((r.callbacks.watch.best, r.callbacks.watch.wait), (Some(0.5), 2));
        assert_eq!(r.callbacks.best.score, Some(0.75));
        assert_eq!(r.best_model, report.best_model);
        assert_eq!(r.metrics_csv, report.metrics_csv);
        // No record keys (an older checkpoint): an empty record. A malformed one: an error.
        assert!(load(&HashMap::new()).unwrap().history.is_empty());
        meta.insert(HISTORY.into(), "1 0 zz".into());
        assert!(load(&meta).unwrap_err().to_string().contains("record.history"));
    }
}
