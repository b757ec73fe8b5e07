//! In-memory datasets and a loader with batch size, seeded shuffle and `drop_last`, in the shape of
//! PyTorch's `TensorDataset` and `DataLoader`.
//!
//! Features are kept in the dtype they were given in (f64 for anything read from text, which is
//! exact) and converted to the precision's parameter dtype when a batch becomes a tensor.
//! [`Dataset::for_precision`] stores them in that dtype once, up front: a half of the memory under
//! 32-true, a quarter under the 16-bit true precisions, and no conversion per batch.
//!
//! ```
//! use nbit::data::{DataLoader, Dataset};
//! use ndarray::array;
//!
//! let ds = Dataset::classification(array![[0.0, 1.0], [1.0, 0.0], [1.0, 1.0]], vec![0, 1, 1])?;
//! let loader = DataLoader::new(ds, 2)?.shuffle(true).seed(7);
//! assert_eq!(loader.len(), 2); // the last partial batch is kept (drop_last = false)
//! let sizes: Vec<usize> = loader.epoch(0).iter().map(|b| b.len()).collect();
//! assert_eq!(sizes, [2, 1]);
//! # Ok::<(), nbit::Error>(())
//! ```

use std::any::Any;
use std::sync::{Arc, OnceLock};

use half::{bf16, f16};
use ndarray::{Array2, Axis};

mod text;
pub use text::Vocabulary;

use crate::backend::{Backend, uniform};
use crate::dtype::{DType, Element, Float};
use crate::error::Error;
use crate::precision::Precision;
use crate::tensor::Tensor;

/// What a model is trained to do with a dataset's `label` column.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Task {
    /// Class indices, cross-entropy loss, accuracy.
    #[default]
    Classification,
    /// Real targets, mean squared error.
    Regression,
}

impl core::str::FromStr for Task {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "classification" => Ok(Task::Classification),
            "regression" => Ok(Task::Regression),
            _ => Err(Error::InvalidArgument {
                name: "task",
                value: format!("'{s}'"),
                expected: "'classification' or 'regression'",
            }),
        }
    }
}

/// What a dataset's rows are labelled with.
#[derive(Clone, Debug, PartialEq)]
pub enum Targets {
    /// A class index per row.
    Classes(Vec<usize>),
    /// A row of regression targets per row.
    Values(Array2<f64>),
    /// No targets (data to predict on).
    None,
}

/// The column that holds the labels unless another is named (`--label-column`).
pub const DEFAULT_LABEL: &str = "label";

/// The largest class index a CSV label may hold (class counts beyond it could never be trained).
pub const MAX_CLASS_INDEX: u64 = u32::MAX as u64;

/// A dataset's features, `[rows, columns]`, held in one dtype.
///
/// Build one from an `Array2` of any real dtype (`Features::from(array)`, or pass the array
/// straight to [`Dataset::classification`] / [`Dataset::regression`]).
///
/// ```
/// use nbit::data::Features;
/// use nbit::DType;
/// let f = Features::from(ndarray::array![[0.5f32, 1.0], [2.0, 3.0]]);
/// assert_eq!((f.dtype(), f.nbytes()), (DType::F32, 16));
/// let h = f.to_array::<nbit::half::bf16>(); // rounded once, element by element
/// assert_eq!(h[[1, 1]].to_f32(), 3.0);
/// ```
#[derive(Clone, Debug, PartialEq)]
pub enum Features {
    /// f64 (what text and the f64 constructors give).
    F64(Array2<f64>),
    /// f32.
    F32(Array2<f32>),
    /// IEEE half precision.
    F16(Array2<f16>),
    /// bfloat16.
    BF16(Array2<bf16>),
    /// Token ids (`i64`, PyTorch's `LongTensor`): each row a window of a token sequence (see
    /// [`Dataset::token_windows`]), read by a model through [`Batch::tokens`].
    Tokens(Array2<i64>),
}

/// A value features may hold, read as f64 (exact for every one of them; ids up to 2^53).
trait Value: Element {
    fn value(self) -> f64;
}

macro_rules! values {
    ($($ty:ty => $f:expr),*) => {$(
        impl Value for $ty {
            fn value(self) -> f64 {
                ($f)(self)
            }
        }
    )*};
}
values!(f64 => |x| x, f32 => f64::from, f16 => f16::to_f64, bf16 => |x: bf16| x.to_f64(), i64 => |x| x as f64);

/// Runs `$body` with `$a` bound to the features' array, whatever its dtype.
macro_rules! each_dtype {
    ($features:expr, $a:ident => $body:expr) => {
        match $features {
            Features::F64($a) => $body,
            Features::F32($a) => $body,
            Features::F16($a) => $body,
            Features::BF16($a) => $body,
            Features::Tokens($a) => $body,
        }
    };
}

macro_rules! features_from {
    ($($ty:ty => $variant:ident),*) => {$(
        impl From<Array2<$ty>> for Features {
            fn from(a: Array2<$ty>) -> Self {
                Features::$variant(a)
            }
        }
    )*};
}
features_from!(f64 => F64, f32 => F32, f16 => F16, bf16 => BF16, i64 => Tokens);

impl Features {
    /// The dtype the values are held in.
    pub fn dtype(&self) -> DType {
        fn of<E: Element>(_: &Array2<E>) -> DType {
            E::DTYPE
        }
        each_dtype!(self, a => of(a))
    }

    /// `(rows, columns)`.
    pub fn dim(&self) -> (usize, usize) {
        each_dtype!(self, a => a.dim())
    }

    /// Bytes the values take.
    pub fn nbytes(&self) -> usize {
        let (r, c) = self.dim();
        r * c * self.dtype().size_bytes()
    }

    /// The values as an array of `E`: a copy when they are held in `E`, else each value rounded
    /// once to `E` (through f64, which holds every value of the other dtypes exactly).
    pub fn to_array<E: Float>(&self) -> Array2<E> {
        each_dtype!(self, a => match (a as &dyn Any).downcast_ref::<Array2<E>>() {
            Some(same) => same.clone(),
            None => a.mapv(|v| E::from_f64(v.value())),
        })
    }

    /// The features held in `E` (each value rounded once), for a real `E`; any other `E` (a
    /// complex dtype) leaves them as they are.
    fn stored_as<E: Element>(self) -> Features {
        if let Features::Tokens(_) = self {
            return self;
        }
        match E::DTYPE {
            DType::F64 => Features::F64(self.to_array()),
            DType::F32 => Features::F32(self.to_array()),
            DType::F16 => Features::F16(self.to_array()),
            DType::BF16 => Features::BF16(self.to_array()),
            _ => self,
        }
    }

    /// The rows at `indices`, in that order.
    fn select(&self, indices: &[usize]) -> Features {
        each_dtype!(self, a => Features::from(a.select(Axis(0), indices)))
    }

    /// The largest magnitude.
    fn largest(&self) -> f64 {
        each_dtype!(self, a => a.iter().fold(0.0f64, |m, v| m.max(v.value().abs())))
    }

    /// The first value (row, column, value) that is not finite once rounded to `E`.
    fn first_not_finite_in<E: Float>(&self) -> Option<(usize, usize, f64)> {
        each_dtype!(self, a => a
            .indexed_iter()
            .map(|((r, c), v)| (r, c, v.value()))
            .find(|(_, _, v)| !E::from_f64(*v).is_finite()))
    }
}

/// Rows of features with their targets, all in memory.
#[derive(Clone, Debug)]
pub struct Dataset {
    features: Features,
    targets: Targets,
    /// The largest magnitude of the features and of the regression targets, found on the first
    /// [`Dataset::check_representable`] and kept: a `fit` per epoch checks its data once.
    largest: OnceLock<(f64, f64)>,
}

impl PartialEq for Dataset {
    fn eq(&self, other: &Self) -> bool {
        self.features == other.features && self.targets == other.targets
    }
}

fn check_finite(what: &'static str, a: &Features) -> Result<(), Error> {
    if let Some((r, c, v)) = a.first_not_finite_in::<f64>() {
        return Err(Error::InvalidData(format!(
            "{what} at row {r}, column {c} is {v}: NaN and infinite values cannot be trained on; clean or drop that row"
        )));
    }
    Ok(())
}

impl Dataset {
    fn new(features: Features, targets: Targets) -> Self {
        Dataset {
            features,
            targets,
            largest: OnceLock::new(),
        }
    }

    /// Rows of `features` (an `Array2` of f64, f32, f16 or bf16; kept in that dtype) labelled
    /// with class indices.
    pub fn classification(features: impl Into<Features>, labels: Vec<usize>) -> Result<Self, Error> {
        let features = features.into();
        if features.dim().0 != labels.len() {
            return Err(Error::InvalidData(format!(
                "{} feature rows but {} labels: every row needs exactly one label",
                features.dim().0,
                labels.len()
            )));
        }
        check_finite("feature", &features)?;
        Ok(Dataset::new(features, Targets::Classes(labels)))
    }

    /// Rows of `features` (as for [`Dataset::classification`]) with rows of regression `targets`.
    pub fn regression(features: impl Into<Features>, targets: Array2<f64>) -> Result<Self, Error> {
        let features = features.into();
        if features.dim().0 != targets.nrows() {
            return Err(Error::InvalidData(format!(
                "{} feature rows but {} target rows: every row needs its targets",
                features.dim().0,
                targets.nrows()
            )));
        }
        check_finite("feature", &features)?;
        check_finite("target", &Features::F64(targets.clone()))?;
        Ok(Dataset::new(features, Targets::Values(targets)))
    }

    /// Rows of token ids (`[rows, length]`), no targets: a language model reads each row with
    /// [`Batch::tokens`] and predicts every id from the ones before it. A negative id is an
    /// error.
    pub fn tokens(rows: Array2<i64>) -> Result<Self, Error> {
        if let Some(((r, c), v)) = rows.indexed_iter().find(|(_, v)| **v < 0) {
            return Err(Error::InvalidData(format!(
                "token id at row {}, column {} is {v}: ids are 0 or more",
                r + 1,
                c + 1
            )));
        }
        Ok(Dataset::new(Features::Tokens(rows), Targets::None))
    }

    /// A token sequence cut into windows of `seq_len + 1` ids, each window starting where the
    /// last one's final id is (stride `seq_len`), so every id after the first is a next-token
    /// target exactly once: inputs are a window's first `seq_len` ids, targets its last
    /// `seq_len`. The ids that do not fill a last window are dropped.
    ///
    /// ```
    /// use nbit::data::Dataset;
    /// let ds = Dataset::token_windows(&[0, 1, 2, 3, 4, 5, 6], 3)?;
    /// assert_eq!(ds.len(), 2); // [0 1 2 3], [3 4 5 6]
    /// assert!(Dataset::token_windows(&[0, 1], 3).is_err());
    /// # Ok::<(), nbit::Error>(())
    /// ```
    pub fn token_windows(ids: &[i64], seq_len: usize) -> Result<Self, Error> {
        let rows = ids.len().saturating_sub(1).checked_div(seq_len).unwrap_or(0);
        if rows == 0 {
            return Err(Error::InvalidData(format!(
                "{} tokens do not fill one window of {} (sequence length {seq_len} + 1): use a \
                 longer text or a shorter sequence length (at least 1)",
                ids.len(),
                seq_len + 1
            )));
        }
        let windows = Array2::from_shape_fn((rows, seq_len + 1), |(r, c)| ids[r * seq_len + c]);
        Self::tokens(windows)
    }

    /// The dataset with its features held in the dtype precision `P`'s models read
    /// ([`Batch::input`]: `P::Param`), each value rounded once: f32 under 32-true and the mixed
    /// precisions, f16 / bf16 under 16-true / bf16-true, f64 under 64-true. Features read from
    /// text are f64, so this halves their memory under 32-true and quarters it under the 16-bit
    /// true precisions, and no batch is converted again. Training reads the same values either
    /// way (a batch's input is rounded once from whatever is held).
    ///
    /// # Errors
    /// As [`Dataset::check_representable`]: a feature that `P` cannot hold (70000 under 16-true).
    ///
    /// ```
    /// use nbit::prelude::*;
    /// use nbit::data::Dataset;
    /// let ds = Dataset::classification(ndarray::array![[0.1, 2.0]], vec![0])?;
    /// assert_eq!(ds.features().nbytes(), 16);
    /// let ds = ds.for_precision::<True<BF16>>()?;
    /// assert_eq!((ds.features().dtype(), ds.features().nbytes()), (DType::BF16, 4));
    /// # Ok::<(), nbit::Error>(())
    /// ```
    pub fn for_precision<P: Precision>(self) -> Result<Dataset, Error> {
        self.check_representable::<P>()?;
        // The largest magnitude as held: rounding is monotonic, so it is the largest value
        // rounded (65510 held in bf16 is 65536, past f16's range).
        let largest = OnceLock::new();
        if let Some(&(features, values)) = self.largest.get() {
            let _ = largest.set((<P::Param as Float>::from_f64(features).as_f64(), values));
        }
        Ok(Dataset {
            features: self.features.stored_as::<P::Param>(),
            targets: self.targets,
            largest,
        })
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.features.dim().0
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Features per row.
    pub fn num_features(&self) -> usize {
        self.features.dim().1
    }

    /// The largest class index + 1 (0 for regression data).
    pub fn num_classes(&self) -> usize {
        match &self.targets {
            Targets::Classes(c) => c.iter().max().map_or(0, |m| m + 1),
            Targets::Values(_) | Targets::None => 0,
        }
    }

    /// The features, in the dtype they are held in ([`Features::to_array`] reads them in any).
    pub fn features(&self) -> &Features {
        &self.features
    }

    /// The targets.
    pub fn targets(&self) -> &Targets {
        &self.targets
    }

    /// Reads a CSV file with a header row: the column `label` holds the class index (or the target,
    /// for regression), every other column is a feature. Numbers only, no quoted fields. Every
    /// problem is an error naming the file, line and column.
    pub fn read_csv(path: &std::path::Path, task: Task) -> Result<Dataset, Error> {
        Self::read_csv_labelled(path, task, DEFAULT_LABEL)
    }

    /// [`Dataset::read_csv`] with the labels in column `label` (`--label-column`):
    ///
    /// ```
    /// # use nbit::data::{Dataset, Task};
    /// let d = Dataset::parse_csv_labelled("t.csv", "x,target\n0.5,1\n", Task::Classification, "target")?;
    /// assert_eq!((d.len(), d.num_features()), (1, 1));
    /// # Ok::<(), nbit::Error>(())
    /// ```
    pub fn read_csv_labelled(path: &std::path::Path, task: Task, label: &str) -> Result<Dataset, Error> {
        let (name, text) = read_text(path)?;
        Self::parse_csv_labelled(&name, &text, task, label)
    }

    /// Like [`Dataset::read_csv`], but a `label` column is optional (and ignored): rows to predict.
    pub fn read_csv_features(path: &std::path::Path) -> Result<Dataset, Error> {
        Self::read_csv_features_labelled(path, DEFAULT_LABEL)
    }

    /// [`Dataset::read_csv_features`], ignoring column `label` when there is one.
    pub fn read_csv_features_labelled(path: &std::path::Path, label: &str) -> Result<Dataset, Error> {
        let (name, text) = read_text(path)?;
        Self::parse_csv_with(&name, &text, Task::Regression, label, false)
    }

    /// [`Dataset::read_csv`] on text already in memory; `name` is used in messages.
    pub fn parse_csv(name: &str, text: &str, task: Task) -> Result<Dataset, Error> {
        Self::parse_csv_labelled(name, text, task, DEFAULT_LABEL)
    }

    /// [`Dataset::read_csv_labelled`] on text already in memory; `name` is used in messages.
    pub fn parse_csv_labelled(name: &str, text: &str, task: Task, label: &str) -> Result<Dataset, Error> {
        Self::parse_csv_with(name, text, task, label, true)
    }

    fn parse_csv_with(
        name: &str,
        text: &str,
        task: Task,
        label: &str,
        need_label: bool,
    ) -> Result<Dataset, Error> {
        let bad = |msg: String| Err(Error::InvalidData(format!("'{name}' {msg}")));
        // Spreadsheets save UTF-8 CSV with a byte-order mark before the first column's name.
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let mut lines = text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty());
        let Some((_, header)) = lines.next() else {
            return bad(format!(
                "is empty: expected a header row naming the columns, one of them '{label}'"
            ));
        };
        let columns: Vec<&str> = header.split(',').map(str::trim).collect();
        if let Some((i, c)) = columns
            .iter()
            .enumerate()
            .find(|(i, c)| columns[..*i].contains(c))
        {
            return bad(format!(
                "names column '{c}' twice in its header (columns {} and {}): every column needs its own name",
                columns.iter().position(|x| x == c).map_or(0, |p| p + 1),
                i + 1
            ));
        }
        let label_col = columns.iter().position(|c| *c == label);
        if need_label && label_col.is_none() {
            return bad(format!(
                "has no '{label}' column in its header (columns: {}); name the column that holds \
                 the labels with --label-column",
                columns.join(", ")
            ));
        }
        let n_features = columns.len() - usize::from(label_col.is_some());
        if n_features == 0 {
            return bad(format!(
                "has only a '{label}' column: at least one feature column is needed"
            ));
        }
        let (mut features, mut labels) = (Vec::new(), Vec::new());
        for (i, line) in lines {
            let n = i + 1;
            let fields: Vec<&str> = line.split(',').map(str::trim).collect();
            if fields.len() != columns.len() {
                return bad(format!(
                    "line {n} has {} fields, but the header has {}",
                    fields.len(),
                    columns.len()
                ));
            }
            for (c, field) in fields.iter().enumerate() {
                let v: f64 = match field.parse() {
                    Ok(v) => v,
                    Err(_) => {
                        return bad(format!(
                            "line {n}, column {} ('{}'): '{field}' is not a number",
                            c + 1,
                            columns[c]
                        ));
                    }
                };
                if !v.is_finite() {
                    return bad(format!(
                        "line {n}, column {} ('{}'): {field} is not finite; NaN and infinite values cannot be trained on",
                        c + 1,
                        columns[c]
                    ));
                }
                if Some(c) == label_col {
                    if !need_label {
                        continue;
                    }
                    if task == Task::Classification && (v < 0.0 || v.fract() != 0.0) {
                        return bad(format!(
                            "line {n}: label '{field}' is not a class index (a whole number >= 0); \
                             use --task regression for real-valued targets"
                        ));
                    }
                    if task == Task::Classification && v > MAX_CLASS_INDEX as f64 {
                        return bad(format!(
                            "line {n}: label '{field}' is too large for a class index (at most \
                             {MAX_CLASS_INDEX}); number the classes from 0, or use --task regression \
                             for real-valued targets"
                        ));
                    }
                    labels.push(v);
                } else {
                    features.push(v);
                }
            }
        }
        let rows = features.len() / n_features;
        if rows == 0 {
            return bad("has a header but no data rows".into());
        }
        let x = Array2::from_shape_vec((rows, n_features), features).expect("rows x features values");
        if !need_label {
            let x = Features::F64(x);
            check_finite("feature", &x)?;
            return Ok(Dataset::new(x, Targets::None));
        }
        match task {
            Task::Classification => {
                Dataset::classification(x, labels.into_iter().map(|v| v as usize).collect())
            }
            Task::Regression => {
                Dataset::regression(x, Array2::from_shape_vec((rows, 1), labels).expect("rows"))
            }
        }
    }

    /// Checks that every feature is finite in precision `P`'s compute dtype (the matmuls see the
    /// features there) and every regression target in its full dtype (the loss sees them there):
    /// 1e39 overflows f32, 70000 overflows f16. An error names the row, column, value and the
    /// dtype's range, and says what to do. [`Trainer`](crate::Trainer) checks its data with it.
    ///
    /// ```
    /// use nbit::prelude::*;
    /// use nbit::data::Dataset;
    /// let ds = Dataset::classification(ndarray::array![[1.0, 7.0e4]], vec![0])?;
    /// assert!(ds.check_representable::<True<F32>>().is_ok());
    /// let msg = ds.check_representable::<True<F16>>().unwrap_err().to_string();
    /// assert!(msg.contains("row 1, column 2") && msg.contains("70000") && msg.contains("65504"), "{msg}");
    /// # Ok::<(), nbit::Error>(())
    /// ```
    pub fn check_representable<P: Precision>(&self) -> Result<(), Error> {
        fn check<E: Float>(what: &str, a: &Features, largest: f64, precision: &str) -> Result<(), Error> {
            // Rounding is monotonic: if the largest magnitude rounds to a finite value, all do.
            if E::from_f64(largest).is_finite() {
                return Ok(());
            }
            let Some((r, c, v)) = a.first_not_finite_in::<E>() else {
                return Ok(());
            };
            // 1e39 and 3.4028234663852886e38, not forty digits.
            let num = |x: f64| {
                if x.abs() >= 1e16 {
                    format!("{x:e}")
                } else {
                    format!("{x}")
                }
            };
            Err(Error::InvalidData(format!(
                "{what} at row {}, column {} is {}, outside the range of {} (±{}), in which \
                 {precision} computes; normalise the data (for example to mean 0 and standard \
                 deviation 1) or use a wider precision",
                r + 1,
                c + 1,
                num(v),
                E::DTYPE,
                num(E::max_value().as_f64())
            )))
        }
        let (features, values) = *self.largest.get_or_init(|| {
            let values = match &self.targets {
                Targets::Values(v) => v.iter().fold(0.0f64, |m, x| m.max(x.abs())),
                Targets::Classes(_) | Targets::None => 0.0,
            };
            (self.features.largest(), values)
        });
        if !matches!(self.features, Features::Tokens(_)) {
            // Token ids are looked up, never computed with.
            check::<P::Compute>("feature", &self.features, features, P::NAME)?;
        }
        match &self.targets {
            // The targets are copied only to find the one to report.
            Targets::Values(v) if !num_traits::Float::is_finite(<P::Full as Float>::from_f64(values)) => {
                check::<P::Full>("target", &Features::F64(v.clone()), values, P::NAME)
            }
            Targets::Values(_) | Targets::Classes(_) | Targets::None => Ok(()),
        }
    }

    /// The rows at `indices`, in that order.
    ///
    /// # Panics
    /// If an index is not below [`Dataset::len`], as slicing does; [`DataLoader::epoch_indices`]
    /// and [`Dataset::split`] only produce valid ones.
    pub fn subset(&self, indices: &[usize]) -> Dataset {
        let features = self.features.select(indices);
        let targets = match &self.targets {
            Targets::Classes(c) => Targets::Classes(indices.iter().map(|&i| c[i]).collect()),
            Targets::Values(v) => Targets::Values(v.select(Axis(0), indices)),
            Targets::None => Targets::None,
        };
        Dataset::new(features, targets)
    }

    /// A seeded random split: `(rest, held_out)` with `round(fraction * len)` rows held out.
    pub fn split(&self, fraction: f64, seed: u64) -> Result<(Dataset, Dataset), Error> {
        if !(0.0..1.0).contains(&fraction) {
            return Err(Error::InvalidArgument {
                name: "val_split",
                value: fraction.to_string(),
                expected: "a fraction in [0, 1)",
            });
        }
        let order = permutation(self.len(), seed);
        let held = (fraction * self.len() as f64).round() as usize;
        Ok((self.subset(&order[held..]), self.subset(&order[..held])))
    }
}

/// The file's name (for messages) and its text.
fn read_text(path: &std::path::Path) -> Result<(String, String), Error> {
    let name = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(text) => Ok((name, text)),
        Err(e) => Err(Error::Io {
            path: name,
            action: "read",
            reason: e.to_string(),
        }),
    }
}

/// A seeded Fisher-Yates permutation of `0..n`.
fn permutation(n: usize, seed: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (uniform(seed, i as u64) * (i + 1) as f64) as usize;
        order.swap(i, j.min(i));
    }
    order
}

/// One batch of rows.
///
/// Which dtype to read it in follows one rule, Lightning's: **a model's input is in the dtype of
/// its parameters, `P::Param`** ([`Batch::input`]). Under a mixed precision that is f32 (the
/// master weights), and autocast casts to the 16-bit compute dtype inside each matmul-class op,
/// as PyTorch's autocast does with an f32 input; under a true precision it is the precision's own
/// dtype, as Lightning's `convert_input` casts the batch. Regression targets meet the output in
/// the loss, so read them in `P::Full`, the dtype losses are computed in
/// (`batch.values::<P::Full, D>()`, as the built-in models do).
///
/// | precision | `input::<P, D>()` | activations | targets (`P::Full`) |
/// |---|---|---|---|
/// | 16-mixed, bf16-mixed | f32 | f16 / bf16 in matmuls, f32 elsewhere | f32 |
/// | 16-true, bf16-true | f16 / bf16 | f16 / bf16 | f16 / bf16 |
/// | 32-true | f32 | f32 | f32 |
/// | 64-true | f64 | f64 | f64 |
///
/// ```
/// use nbit::prelude::*;
/// use nbit::data::{Batch, Dataset};
/// let batch = Batch::from(Dataset::classification(nbit::ndarray::array![[0.5, 1.0]], vec![1])?);
/// assert_eq!(batch.input::<Mixed<BF16>, Cpu>().dtype(), DType::F32);
/// assert_eq!(batch.input::<True<BF16>, Cpu>().dtype(), DType::BF16);
/// assert_eq!(batch.input::<True<F64>, Cpu>().dtype(), DType::F64);
/// # Ok::<(), nbit::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    data: Dataset,
}

impl From<Dataset> for Batch {
    /// The whole dataset as one batch.
    fn from(data: Dataset) -> Self {
        Batch { data }
    }
}

impl Batch {
    /// Rows in the batch.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The features as a model's input under `P`: a `[rows, features]` tensor of `P::Param`,
    /// the dtype Lightning hands a model (see [`Batch`]).
    pub fn input<P: Precision, D: Backend>(&self) -> Tensor<P::Param, D> {
        self.features::<P::Param, D>()
    }

    /// The features as a `[rows, features]` tensor of `E` (each value rounded once from the
    /// dtype the dataset holds it in). For a model's input, [`Batch::input`] picks `E` by
    /// Lightning's rule.
    pub fn features<E: Float, D: Backend>(&self) -> Tensor<E, D> {
        Tensor::from_array(self.data.features.to_array::<E>().into_dyn())
    }

    /// The token ids, `[rows, length]`, for token data ([`Dataset::tokens`]).
    pub fn tokens<D: Backend>(&self) -> Option<Tensor<i64, D>> {
        match &self.data.features {
            Features::Tokens(t) => Some(Tensor::from_array(t.clone().into_dyn())),
            _ => None,
        }
    }

    /// The class indices, for classification data.
    pub fn classes(&self) -> Option<&[usize]> {
        match &self.data.targets {
            Targets::Classes(c) => Some(c),
            Targets::Values(_) | Targets::None => None,
        }
    }

    /// The regression targets as a `[rows, outputs]` tensor of `E`, for regression data (read
    /// them in `P::Full`, the loss's dtype; see [`Batch`]).
    pub fn values<E: Float, D: Backend>(&self) -> Option<Tensor<E, D>> {
        match &self.data.targets {
            Targets::Values(v) => Some(Tensor::from_array(v.mapv(E::from_f64).into_dyn())),
            Targets::Classes(_) | Targets::None => None,
        }
    }
}

/// Batches of a dataset: PyTorch's `DataLoader(dataset, batch_size, shuffle=False, drop_last=False)`
/// with a seeded shuffle that differs per epoch and repeats across runs.
#[derive(Clone, Debug)]
pub struct DataLoader {
    dataset: Arc<Dataset>,
    batch_size: usize,
    shuffle: bool,
    seed: u64,
    drop_last: bool,
}

impl DataLoader {
    /// A loader over `dataset` in batches of `batch_size` rows (no shuffle, last batch kept).
    pub fn new(dataset: Dataset, batch_size: usize) -> Result<Self, Error> {
        if batch_size == 0 {
            return Err(Error::InvalidArgument {
                name: "batch_size",
                value: "0".into(),
                expected: "at least 1",
            });
        }
        if dataset.is_empty() {
            return Err(Error::InvalidData("the dataset has no rows".into()));
        }
        Ok(DataLoader {
            dataset: Arc::new(dataset),
            batch_size,
            shuffle: false,
            seed: 0,
            drop_last: false,
        })
    }

    /// Shuffle the rows every epoch.
    pub fn shuffle(mut self, on: bool) -> Self {
        self.shuffle = on;
        self
    }

    /// The shuffle seed (epoch `e` uses a permutation derived from `seed` and `e`).
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Drop the last batch when it is smaller than `batch_size`.
    pub fn drop_last(mut self, on: bool) -> Self {
        self.drop_last = on;
        self
    }

    /// The dataset.
    pub fn dataset(&self) -> &Dataset {
        &self.dataset
    }

    /// The batch size.
    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// Batches per epoch.
    pub fn len(&self) -> usize {
        let n = self.dataset.len();
        if self.drop_last {
            n / self.batch_size
        } else {
            n.div_ceil(self.batch_size)
        }
    }

    /// Whether an epoch has no batches (fewer rows than a batch with `drop_last`).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The row indices of each batch of epoch `epoch`.
    pub fn epoch_indices(&self, epoch: u64) -> Vec<Vec<usize>> {
        let n = self.dataset.len();
        let order = if self.shuffle {
            permutation(n, self.seed ^ epoch.wrapping_mul(0xA24B_AED4_963E_E407))
        } else {
            (0..n).collect()
        };
        order
            .chunks(self.batch_size)
            .take(self.len())
            .map(<[usize]>::to_vec)
            .collect()
    }

    /// The rows at `indices` as a batch.
    ///
    /// # Panics
    /// If an index is not a row of the dataset (see [`Dataset::subset`]); the indices of
    /// [`DataLoader::epoch_indices`] always are.
    pub fn batch(&self, indices: &[usize]) -> Batch {
        Batch {
            data: self.dataset.subset(indices),
        }
    }

    /// The batches of epoch `epoch`.
    pub fn epoch(&self, epoch: u64) -> Vec<Batch> {
        self.epoch_indices(epoch)
            .iter()
            .map(|idx| self.batch(idx))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn shuffle_is_a_seeded_permutation_per_epoch() {
        let ds = Dataset::classification(Array2::<f64>::zeros((10, 1)), vec![0; 10]).unwrap();
        let l = DataLoader::new(ds, 3).unwrap().shuffle(true).seed(1);
        let flat = |e| l.epoch_indices(e).concat();
        let mut sorted = flat(0);
        sorted.sort();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>());
        assert_eq!(flat(0), flat(0));
        assert_ne!(flat(0), flat(1));
        assert_eq!(l.clone().drop_last(true).len(), 3);
        assert_eq!(l.len(), 4);
    }

    #[test]
    fn csv_errors_name_line_and_column() {
        let err = |t: &str| {
            Dataset::parse_csv("d.csv", t, Task::Classification)
                .unwrap_err()
                .to_string()
        };
        assert!(err("").contains("is empty"));
        assert!(err("a,label\n").contains("no data rows"));
        assert!(err("a,b\n1,2\n").contains("no 'label' column"));
        assert!(err("a,label\n1,2\n3\n").contains("line 3 has 1 fields, but the header has 2"));
        assert!(err("a,label\n1,2\nx,1\n").contains("line 3, column 1 ('a'): 'x' is not a number"));
        assert!(err("a,label\nnan,1\n").contains("line 2, column 1 ('a'): nan is not finite"));
        assert!(err("a,label\n1,-1\n").contains("line 2: label '-1' is not a class index"));
        assert!(err("a,label\n1,0.5\n").contains("label '0.5'"));
        let ok = Dataset::parse_csv("d.csv", "label,a\r\n1,0.25\r\n0,2\r\n\n", Task::Classification).unwrap();
        assert_eq!((ok.len(), ok.num_features(), ok.num_classes()), (2, 1, 2));
        let r = Dataset::parse_csv("d.csv", "a,label\n1,0.5\n", Task::Regression).unwrap();
        assert_eq!(r.targets(), &Targets::Values(array![[0.5]]));
    }

    #[test]
    fn features_held_in_the_precisions_dtype_give_the_same_batches() {
        use crate::prelude::*;
        let x = array![[0.1, -2.5e-3, 1.0 / 3.0], [7.0, 1e-8, -65504.0]];
        let ds = Dataset::classification(x.clone(), vec![0, 1]).unwrap();
        fn same<P: Precision>(ds: &Dataset, dtype: DType, bytes: usize) {
            let held = ds.clone().for_precision::<P>().unwrap();
            assert_eq!(
                (held.features().dtype(), held.features().nbytes()),
                (dtype, bytes)
            );
            // The input is rounded once from f64 either way, so the batches are the same bits.
            let (a, b) = (Batch::from(ds.clone()), Batch::from(held.clone()));
            assert_eq!(
                a.input::<P, Cpu>().to_vec(),
                b.input::<P, Cpu>().to_vec(),
                "{}",
                P::NAME
            );
            assert_eq!(held.subset(&[1]).features().dtype(), dtype);
            assert!(held.check_representable::<P>().is_ok());
        }
        same::<True<BF16>>(&ds, DType::BF16, 12);
        same::<True<F16>>(&ds, DType::F16, 12);
        same::<Mixed<BF16>>(&ds, DType::F32, 24);
        same::<True<F32>>(&ds, DType::F32, 24);
        same::<True<F64>>(&ds, DType::F64, 48);
        // A value the precision cannot hold is the same error as at fit time.
        let big = Dataset::classification(array![[1.0, 7.0e4]], vec![0]).unwrap();
        let msg = big.clone().for_precision::<True<F16>>().unwrap_err().to_string();
        assert!(msg.contains("row 1, column 2") && msg.contains("70000"), "{msg}");
        // Held in f32, the check still sees what f16 cannot hold (the largest value found
        // travels with the converted data).
        let f32_held = big.for_precision::<Mixed<BF16>>().unwrap();
        assert!(f32_held.check_representable::<True<F16>>().is_err());
        assert!(f32_held.check_representable::<True<BF16>>().is_ok());
        // ... as held: 65510 fits f16 (65504 + half an ulp rounds down), but held in bf16 it
        // is 65536, which does not.
        let edge = Dataset::classification(array![[65510.0]], vec![0]).unwrap();
        assert!(edge.check_representable::<True<F16>>().is_ok());
        let in_bf16 = edge.for_precision::<True<BF16>>().unwrap();
        assert_eq!(in_bf16.features().to_array::<f64>()[[0, 0]], 65536.0);
        let msg = in_bf16
            .check_representable::<True<F16>>()
            .unwrap_err()
            .to_string();
        assert!(msg.contains("65536"), "{msg}");
        // Features given in f32 stay f32.
        let ds32 = Dataset::classification(x.mapv(|v| v as f32), vec![0, 1]).unwrap();
        assert_eq!(ds32.features().dtype(), DType::F32);
        assert!(
            Dataset::classification(array![[f32::NAN]], vec![0])
                .unwrap_err()
                .to_string()
                .contains("NaN")
        );
    }

    #[test]
    fn bad_data_is_an_error() {
        assert!(
            Dataset::classification(array![[1.0, f64::NAN]], vec![0])
                .unwrap_err()
                .to_string()
                .contains("row 0")
        );
        assert!(Dataset::classification(array![[1.0]], vec![0, 1]).is_err());
        let ds = Dataset::classification(array![[1.0]], vec![0]).unwrap();
        assert!(
            DataLoader::new(ds.clone(), 0)
                .unwrap_err()
                .to_string()
                .contains("batch_size")
        );
        assert!(ds.split(1.5, 0).is_err());
    }
}
