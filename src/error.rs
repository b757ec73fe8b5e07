//! The one error type of nbit.

use crate::kinds::{ACCELERATORS, DeviceKind, PrecisionKind};

/// Everything that can go wrong in nbit, each with a message that names the bad value and the fix.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Error {
    /// A precision string or number Lightning would not accept either.
    UnknownPrecision {
        /// The value given.
        value: String,
        /// A valid value the input resembles, if any.
        suggestion: Option<&'static str>,
    },
    /// An accelerator string that is not one of [`ACCELERATORS`].
    UnknownAccelerator {
        /// The value given.
        value: String,
    },
    /// A precision and device that the support matrix refuses (the run-time twin of the compile
    /// error).
    Unsupported {
        /// The precision asked for.
        precision: PrecisionKind,
        /// The device asked for.
        device: DeviceKind,
        /// Why the matrix refuses the pair.
        why: String,
        /// The nearest supported choice.
        advice: String,
        /// Set when accelerator `auto` chose the device: why it could not choose the GPU.
        auto: Option<String>,
    },
    /// A device that exists as a type but cannot run work in this process.
    DeviceUnavailable {
        /// `"gpu"` or `"tpu"`.
        device: &'static str,
        /// Why, and what to do instead.
        reason: String,
    },
    /// A device that started but failed during an operation (out of memory, a failed launch).
    DeviceFailed {
        /// `"gpu"`.
        device: &'static str,
        /// The operation that failed, e.g. `"matmul"`.
        op: &'static str,
        /// The driver's words, and what to do.
        reason: String,
    },
    /// Tensor shapes that an operation cannot combine.
    ShapeMismatch {
        /// The operation, e.g. `"matmul"`.
        op: &'static str,
        /// The first operand's shape.
        left: Vec<usize>,
        /// The second operand's shape (or the requested shape).
        right: Vec<usize>,
        /// The rule the shapes break.
        rule: &'static str,
    },
    /// A class index outside `0..classes` in a classification loss.
    InvalidTarget {
        /// The row holding the bad target.
        index: usize,
        /// The target given.
        target: usize,
        /// The number of classes (the logits' last dimension).
        classes: usize,
    },
    /// Data that cannot be trained on (the message names the row, column or count).
    InvalidData(String),
    /// A file that could not be read or written.
    Io {
        /// The file.
        path: String,
        /// What was being done: "read", "write", ...
        action: &'static str,
        /// The operating system's reason.
        reason: String,
    },
    /// A checkpoint or weights file that is not what it should be.
    Checkpoint {
        /// The file.
        path: String,
        /// What is wrong, naming the tensor where there is one.
        problem: String,
    },
    /// A linear-algebra problem without an answer: a singular or not positive-definite matrix, a
    /// rank-deficient least-squares problem, or a matrix of the wrong shape.
    LinearAlgebra {
        /// The operation, e.g. `"solve"`.
        op: &'static str,
        /// What is wrong, and what the operation needs.
        problem: String,
    },
    /// A training value became inf or NaN under a precision without a gradient scaler (which
    /// would skip such a step), so training stopped before the value could reach the weights:
    /// Lightning's `EarlyStopping(check_finite=True)`.
    NonFinite {
        /// What became non-finite: `"training loss"` or `"gradient norm"`.
        what: &'static str,
        /// Its value.
        value: f64,
        /// The 1-based optimizer step that produced it.
        step: u64,
        /// The epoch, from 0.
        epoch: u64,
        /// The precision's name.
        precision: &'static str,
    },
    /// A model whose steps cannot be trained: a loss that is not a scalar, or one that depends on
    /// no parameter.
    InvalidModel(String),
    /// A model or run that needs more memory than this machine has available.
    OutOfMemory {
        /// What was being sized, e.g. `"an MLP 64-100000-100000-10 under 32-true"`.
        what: String,
        /// Bytes needed (estimated), or `None` when the size overflows a 64-bit count.
        needed: Option<u64>,
        /// Bytes the operating system reports available, when it reports them.
        available: Option<u64>,
    },
    /// A parameter outside its valid range.
    InvalidArgument {
        /// The parameter's name.
        name: &'static str,
        /// The value given.
        value: String,
        /// What is accepted.
        expected: &'static str,
    },
}

impl core::fmt::Display for Error {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Error::UnknownPrecision { value, suggestion } => {
                write!(f, "precision '{value}' is not valid")?;
                if let Some(s) = suggestion {
                    write!(f, " (did you mean '{s}'?)")?;
                }
                let valid: Vec<&str> = PrecisionKind::ALL.iter().map(|k| k.name()).collect();
                write!(f, "; use one of: {} (legacy: 16, 32, 64, bf16)", valid.join(", "))
            }
            Error::UnknownAccelerator { value } => write!(
                f,
                "accelerator '{value}' is not valid; use one of: {}",
                ACCELERATORS.join(", ")
            ),
            Error::Unsupported {
                precision,
                device,
                why,
                advice,
                auto,
            } => {
                write!(
                    f,
                    "precision '{precision}' is not supported on accelerator '{device}'"
                )?;
                if let Some(no_gpu) = auto {
                    write!(f, " (which accelerator 'auto' chose: {no_gpu})")?;
                }
                write!(f, ": {why}; {advice}")
            }
            Error::DeviceUnavailable { device, reason } => {
                write!(f, "accelerator '{device}' is not usable here: {reason}")
            }
            Error::DeviceFailed { device, op, reason } => {
                write!(f, "accelerator '{device}' failed during {op}: {reason}")
            }
            Error::ShapeMismatch {
                op,
                left,
                right,
                rule,
            } => {
                write!(f, "{op}: shapes {left:?} and {right:?} do not fit: {rule}")
            }
            Error::InvalidTarget {
                index,
                target,
                classes,
            } => write!(
                f,
                "target {target} at row {index} is not a class index: expected 0..{classes} (the logits have {classes} classes)"
            ),
            Error::InvalidData(msg) => f.write_str(msg),
            Error::LinearAlgebra { op, problem } => write!(f, "{op}: {problem}"),
            Error::Io { path, action, reason } => write!(f, "cannot {action} '{path}': {reason}"),
            Error::Checkpoint { path, problem } => write!(f, "'{path}': {problem}"),
            Error::InvalidArgument {
                name,
                value,
                expected,
            } => {
                write!(f, "{name} = {value} is not valid: expected {expected}")
            }
            Error::NonFinite {
                what,
                value,
                step,
                epoch,
                precision,
            } => write!(
                f,
                "the {what} became {value} at step {step} (epoch {epoch}); training stopped before it \
                 reached the weights, which are those after step {}. {precision} has no gradient scaler \
                 to skip such steps: lower the learning rate, clip gradients (gradient_clip_val), \
                 normalise the data, or use a wider precision (bf16-mixed, 32-true)",
                step.saturating_sub(1)
            ),
            Error::InvalidModel(msg) => f.write_str(msg),
            Error::OutOfMemory {
                what,
                needed,
                available,
            } => {
                match needed {
                    Some(n) => write!(f, "{what} needs about {}", crate::fmt::bytes(*n))?,
                    None => write!(f, "{what} needs more than 2^64 bytes")?,
                }
                match available {
                    Some(a) => write!(f, ", but this machine has {} available", crate::fmt::bytes(*a))?,
                    None => write!(f, ", more than this machine can address")?,
                }
                f.write_str("; use fewer or narrower layers, fewer classes, or a smaller batch")
            }
        }
    }
}

impl std::error::Error for Error {}
