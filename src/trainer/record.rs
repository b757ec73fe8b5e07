//! What a run has recorded, carried in its checkpoints so that a resumed run continues it: the
//! report's step history and per-epoch validation metrics, the callbacks' state (EarlyStopping's
//! best score and patience counter, ModelCheckpoint's best score and file) and the CSV logger's
//! file (Lightning stores each callback's `state_dict` in its checkpoints the same way).
//!
//! The step history, which grows with every step, is a byte tensor (`nbit.record.history`, 40
//! bytes a step, little-endian); the rest is checkpoint metadata (text), numbers as the
//! hexadecimal bits of their f64 or f32. Every value, NaN included, comes back bit for bit. (In the
//! header, a long run's history outgrew safetensors' 100 MB header limit near 1.7 million steps,
//! which the command line's defaults reach.)

use std::collections::HashMap;
use std::path::PathBuf;

use super::callbacks::{Best, Watch};
use super::checkpoint::{self, Encoded};
use super::{FitReport, Metrics, StepLog};
use crate::error::Error;

/// The history's record tensor (under [`checkpoint::RECORD_PREFIX`]).
pub(crate) const HISTORY: &str = "history";
/// Bytes per step in it: step, epoch, loss bits, scale bits with the skip flag at bit 32, lr bits.
const STEP_BYTES: usize = 40;
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

/// Writes the record of `report` and `callbacks` into checkpoint metadata, and returns the
/// history's record tensor.
pub(crate) fn save(
    report: &FitReport,
    callbacks: &CallbackState,
    meta: &mut HashMap<String, String>,
) -> Encoded {
    let mut history = Vec::with_capacity(report.history.len() * STEP_BYTES);
    for s in &report.history {
        let scale = u64::from(s.scale.to_bits()) | (u64::from(s.skipped) << 32);
        for word in [s.step, s.epoch, s.loss.to_bits(), scale, s.lr.to_bits()] {
            history.extend_from_slice(&word.to_le_bytes());
        }
    }
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
    checkpoint::encode_record(HISTORY, history)
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

/// Reads the record from checkpoint metadata and the history's bytes. A checkpoint written before
/// nbit kept records has none of them: an empty record. A malformed value is an error naming it.
pub(crate) fn load(meta: &HashMap<String, String>, history: Option<&[u8]>) -> Result<Record, Error> {
    let bad = |key: &str| Error::InvalidData(format!("the metadata '{key}' is malformed"));
    let rows = |key: &str| {
        meta.get(key)
            .map(|v| v.split(';').filter(|r| !r.is_empty()).collect::<Vec<_>>())
            .unwrap_or_default()
    };
    let mut r = Record::default();
    let history = history.unwrap_or_default();
    if !history.len().is_multiple_of(STEP_BYTES) {
        return Err(Error::InvalidData(format!(
            "the step history holds {} bytes, not a whole number of {STEP_BYTES}-byte steps",
            history.len()
        )));
    }
    for step in history.chunks_exact(STEP_BYTES) {
        let w = |i: usize| u64::from_le_bytes(step[8 * i..8 * i + 8].try_into().expect("8 bytes"));
        let (scale, skipped) = (w(3) as u32, w(3) >> 32);
        if skipped > 1 {
            return Err(Error::InvalidData(
                "the step history is malformed (a skip flag other than 0 or 1)".into(),
            ));
        }
        r.history.push(StepLog {
            step: w(0),
            epoch: w(1),
            loss: f64::from_bits(w(2)),
            scale: f32::from_bits(scale),
            skipped: skipped == 1,
            lr: f64::from_bits(w(4)),
        });
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
            ..FitReport::default()
        };
        let mut callbacks = CallbackState::default();
        callbacks.watch.best = Some(0.5);
        callbacks.watch.wait = 2;
        callbacks.best.score = Some(0.75);
        let mut meta = HashMap::new();
        let history = save(&report, &callbacks, &mut meta);
        let r = load(&meta, Some(history.bytes())).unwrap();
        assert_eq!(r.history.len(), 2);
        assert_eq!(r.history[0], report.history[0]);
        assert!(r.history[1].loss.is_nan() && r.history[1].skipped && r.history[1].scale == 32768.0);
        assert_eq!(r.validation, report.validation);
        assert_eq!((r.callbacks.watch.best, r.callbacks.watch.wait), (Some(0.5), 2));
        assert_eq!(r.callbacks.best.score, Some(0.75));
        assert_eq!(r.best_model, report.best_model);
        assert_eq!(r.metrics_csv, report.metrics_csv);
        // No record (an older checkpoint): an empty record. Malformed ones: errors.
        assert!(load(&HashMap::new(), None).unwrap().history.is_empty());
        let msg = load(&meta, Some(&history.bytes()[1..])).unwrap_err().to_string();
        assert!(msg.contains("whole number of 40-byte steps"), "{msg}");
        let mut flag = history.bytes().to_vec();
        flag[3 * 8 + 4] = 2;
        assert!(
            load(&meta, Some(&flag))
                .unwrap_err()
                .to_string()
                .contains("skip flag")
        );
        meta.insert(VALIDATION.into(), "1 0 zz".into());
        let msg = load(&meta, Some(history.bytes())).unwrap_err().to_string();
        assert!(msg.contains("record.validation"), "{msg}");
    }

    /// The header (metadata) does not grow with the run: a million steps' history is a tensor
    /// of 40 bytes a step, and the metadata stays the size of the callbacks' state. In the
    /// header, as before, it took 58 bytes a step and broke safetensors' 100 MB header limit near
    /// 1.7 million steps.
    #[test]
    fn a_long_runs_history_stays_out_of_the_header() {
        let step = StepLog {
            step: 1,
            epoch: 0,
            loss: 0.1,
            scale: 1.0,
            skipped: false,
            lr: 0.1,
        };
        let report = FitReport {
            history: vec![step; 1_000_000],
            ..FitReport::default()
        };
        let mut meta = HashMap::new();
        let history = save(&report, &CallbackState::default(), &mut meta);
        let header: usize = meta.iter().map(|(k, v)| k.len() + v.len()).sum();
        assert!(header < 200, "{header} bytes of metadata");
        assert_eq!(history.bytes().len(), 40_000_000);
        assert_eq!(
            load(&meta, Some(history.bytes())).unwrap().history.len(),
            1_000_000
        );
    }
}
