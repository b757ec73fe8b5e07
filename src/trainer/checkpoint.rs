//! Checkpoints and weights as safetensors files.
//!
//! A weights file holds the parameters under PyTorch's `state_dict` names in their stored dtype,
//! so `safetensors.torch.load_file` reads it and `save_file(model.state_dict())` writes one nbit
//! reads. A checkpoint adds the optimizer state (`exp_avg.0.weight`, ...), the run's record
//! (`nbit.record.history`, a byte tensor; see `record.rs`) and, in the header's metadata, the
//! precision, epoch, step, optimizer, scheduler, gradient-scaler and callback state.
//!
//! Writes are atomic: the bytes go to a temporary file beside the target, are synced, then renamed
//! over it, so a crash or a full disk never leaves a half-written file where a good one was.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use safetensors::tensor::{Dtype as StDtype, TensorView};

use crate::backend::Backend;
use crate::dtype::{DType, Float, LeBytes};
use crate::error::Error;
use crate::nn::Parameter;
use crate::tensor::Tensor;

/// The format tag in a checkpoint's metadata.
pub(crate) const FORMAT: &str = "nbit-checkpoint-1";

fn st_dtype(d: DType) -> StDtype {
    match d {
        DType::F16 => StDtype::F16,
        DType::BF16 => StDtype::BF16,
        DType::F64 => StDtype::F64,
        _ => StDtype::F32,
    }
}

/// A named tensor as little-endian bytes in its own dtype, ready to serialise.
pub(crate) struct Encoded {
    name: String,
    dtype: StDtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl Encoded {
    /// The encoded bytes.
    #[cfg(test)]
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

/// The name prefix of a checkpoint's record tensors (see `record.rs`): bytes, not parameters.
pub(crate) const RECORD_PREFIX: &str = "nbit.record.";

/// A record tensor: `bytes` as a U8 tensor named [`RECORD_PREFIX`] + `name`.
pub(crate) fn encode_record(name: &str, bytes: Vec<u8>) -> Encoded {
    Encoded {
        name: format!("{RECORD_PREFIX}{name}"),
        dtype: StDtype::U8,
        shape: vec![bytes.len()],
        bytes,
    }
}

/// Encodes one tensor.
pub(crate) fn encode<E: Float, D: Backend>(name: &str, t: &Tensor<E, D>) -> Encoded {
    let mut bytes = Vec::with_capacity(t.numel() * E::DTYPE.size_bytes());
    for v in t.to_array().iter() {
        v.put_le(&mut bytes);
    }
    Encoded {
        name: name.to_owned(),
        dtype: st_dtype(E::DTYPE),
        shape: t.shape().to_vec(),
        bytes,
    }
}

/// Serialises encoded tensors and metadata to safetensors bytes.
pub(crate) fn to_bytes(tensors: &[Encoded], meta: HashMap<String, String>) -> Result<Vec<u8>, Error> {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|t| {
            TensorView::new(t.dtype, t.shape.clone(), &t.bytes)
                .map(|v| (t.name.clone(), v))
                .map_err(|e| Error::InvalidData(format!("cannot serialise tensor '{}': {e}", t.name)))
        })
        .collect::<Result<_, _>>()?;
    safetensors::serialize(views, Some(meta))
        .map_err(|e| Error::InvalidData(format!("cannot serialise: {e}")))
}

/// Writes `bytes` to `path` atomically: to a temporary file beside it (a name unique to this
/// call), synced, renamed over `path`, and the folder synced so the rename itself survives a
/// crash. On any failure the temporary file is removed and `path` is untouched.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let shown = path.display().to_string();
    let io = |action: &'static str, e: std::io::Error| Error::Io {
        path: shown.clone(),
        action,
        reason: format!("{e}; check that the folder exists and is writable"),
    };
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| io("write", std::io::Error::other("the path names no file")))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}-{}",
        name.to_string_lossy(),
        std::process::id(),
        CALLS.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        // create_new: never write through a file (or link) that is already there.
        let mut f = std::fs::File::options().write(true).create_new(true).open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(io("write", e));
    }
    // The rename is durable once the folder's entry is on disk (where folders can be synced).
    #[cfg(unix)]
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io("sync the folder of", e))?;
    Ok(())
}

/// Tensors read from a file, in the order asked for, with notes on the casts made.
pub(crate) type Read<E, D> = (Vec<Tensor<E, D>>, Vec<String>);

/// A safetensors file read into memory, its header parsed once.
pub(crate) struct Loaded {
    path: String,
    bytes: Vec<u8>,
    /// Where the tensor data starts: the 8-byte length plus the header.
    data_start: usize,
    header: safetensors::tensor::Metadata,
}

impl Loaded {
    /// Reads and validates the header of `path`.
    pub(crate) fn read(path: &Path) -> Result<Self, Error> {
        let shown = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|e| Error::Io {
            path: shown.clone(),
            action: "read",
            reason: e.to_string(),
        })?;
        let (n, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| Error::Checkpoint {
            path: shown.clone(),
            problem: format!("not a valid safetensors file (truncated or corrupted?): {e}"),
        })?;
        Ok(Loaded {
            path: shown,
            bytes,
            data_start: 8 + n,
            header,
        })
    }

    /// The header's metadata.
    pub(crate) fn metadata(&self) -> HashMap<String, String> {
        self.header.metadata().clone().unwrap_or_default()
    }

    /// The dtype, shape and bytes of tensor `name`, if the file has it.
    fn view(&self, name: &str) -> Option<(StDtype, &[usize], &[u8])> {
        let info = self.header.info(name)?;
        let (start, end) = info.data_offsets;
        Some((
            info.dtype,
            &info.shape,
            &self.bytes[self.data_start + start..self.data_start + end],
        ))
    }

    /// The bytes of record tensor `name` (see [`encode_record`]), if the file has it.
    pub(crate) fn record(&self, name: &str) -> Option<&[u8]> {
        match self.view(&format!("{RECORD_PREFIX}{name}"))? {
            (StDtype::U8, _, bytes) => Some(bytes),
            _ => None,
        }
    }

    fn err(&self, problem: String) -> Error {
        Error::Checkpoint {
            path: self.path.clone(),
            problem,
        }
    }

    /// Tensor `name` converted to `E`, checked against `shape`; `Ok(None)` when absent. A note is
    /// pushed when the stored dtype differs.
    pub(crate) fn tensor<E: Float, D: Backend>(
        &self,
        name: &str,
        shape: &[usize],
        notes: &mut Vec<String>,
    ) -> Result<Option<Tensor<E, D>>, Error> {
        let Some((dtype, stored_shape, data)) = self.view(name) else {
            return Ok(None);
        };
        if stored_shape != shape {
            return Err(self.err(format!(
                "tensor '{name}' has shape {stored_shape:?} but the model expects {shape:?}"
            )));
        }
        let (stored, values): (DType, Vec<E>) = match dtype {
            StDtype::F16 => (
                DType::F16,
                data.chunks_exact(2)
                    .map(|b| E::from_f32(half::f16::get_le(b).to_f32()))
                    .collect(),
            ),
            StDtype::BF16 => (
                DType::BF16,
                data.chunks_exact(2)
                    .map(|b| E::from_f32(half::bf16::get_le(b).to_f32()))
                    .collect(),
            ),
            StDtype::F32 => (
                DType::F32,
                data.chunks_exact(4)
                    .map(|b| E::from_f32(f32::get_le(b)))
                    .collect(),
            ),
            StDtype::F64 => (
                DType::F64,
                data.chunks_exact(8)
                    .map(|b| E::from_f64(f64::get_le(b)))
                    .collect(),
            ),
            other => {
                return Err(self.err(format!(
                    "tensor '{name}' has dtype {other:?}; nbit reads F16, BF16, F32 and F64 tensors"
                )));
            }
        };
        if let Some((r, v)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(self.err(format!(
                "tensor '{name}' holds a non-finite value ({:?}) at flat index {r}; the file is corrupted or came from a diverged run",
                v
            )));
        }
        if stored != E::DTYPE {
            notes.push(format!("'{name}' cast from {stored} to {}", E::DTYPE));
        }
        Tensor::from_vec(shape, values).map(Some)
    }

    /// Every parameter's tensor, read and checked but not yet loaded, with notes on casts; a
    /// missing tensor is an error that names it.
    pub(crate) fn read_parameters<E: Float, D: Backend>(
        &self,
        params: &[&Parameter<E, D>],
    ) -> Result<Read<E, D>, Error> {
        let mut notes = Vec::new();
        let mut loaded = Vec::with_capacity(params.len());
        for p in params {
            match self.tensor::<E, D>(p.name(), p.value().shape(), &mut notes)? {
                Some(t) => loaded.push(t),
                None => {
                    return Err(self.err(format!(
                        "tensor '{}' is missing (the file has: {})",
                        p.name(),
                        self.names().join(", ")
                    )));
                }
            }
        }
        Ok((loaded, notes))
    }

    /// The tensor names in the file, sorted.
    fn names(&self) -> Vec<String> {
        let mut have: Vec<String> = self.header.tensors().into_keys().collect();
        have.sort();
        have
    }

    /// Refuses a file with tensors the model does not have, as PyTorch's
    /// `load_state_dict(strict=True)` does, naming them. An nbit checkpoint's optimizer state
    /// (`exp_avg.<param>`, ...) is expected.
    pub(crate) fn check_no_unexpected<E: Float, D: Backend>(
        &self,
        params: &[&Parameter<E, D>],
    ) -> Result<(), Error> {
        let ours: Vec<&str> = params.iter().map(|p| p.name()).collect();
        let is_checkpoint = self.metadata().get("format").map(String::as_str) == Some(FORMAT);
        let expected = |name: &str| {
            ours.contains(&name)
                || (is_checkpoint
                    && (name.starts_with(RECORD_PREFIX)
                        || crate::optim::STATE_PREFIXES
                            .iter()
                            .any(|prefix| name.strip_prefix(prefix).is_some_and(|n| ours.contains(&n)))))
        };
        let unexpected: Vec<String> = self.names().into_iter().filter(|n| !expected(n)).collect();
        if unexpected.is_empty() {
            return Ok(());
        }
        Err(self.err(format!(
            "has tensors the model does not have: {} (the model has: {}); the file holds another \
             architecture: match the model to it (the command line reads it from the file when \
             --hidden is not given)",
            unexpected.join(", "),
            ours.join(", ")
        )))
    }

    /// Loads every parameter by name, strictly (see [`Loaded::check_no_unexpected`]): a missing
    /// or unexpected tensor is an error naming it, and then no parameter changes.
    pub(crate) fn load_parameters<E: Float, D: Backend>(
        &self,
        params: &mut [&mut Parameter<E, D>],
    ) -> Result<Vec<String>, Error> {
        let shared: Vec<&Parameter<E, D>> = params.iter().map(|p| &**p).collect();
        self.check_no_unexpected(&shared)?;
        let (loaded, notes) = self.read_parameters(&shared)?;
        for (p, t) in params.iter_mut().zip(loaded) {
            p.set(t)?;
        }
        Ok(notes)
    }
}

/// The precision a weights file or checkpoint was saved under (`Trainer::save_weights` and
/// checkpoints record it; a file from PyTorch has none: `Ok(None)`).
pub fn saved_precision(path: &Path) -> Result<Option<crate::PrecisionKind>, Error> {
    let file = Loaded::read(path)?;
    match file.metadata().get("precision") {
        None => Ok(None),
        Some(p) => p
            .parse()
            .map(Some)
            .map_err(|e: Error| file.err(format!("its metadata names an unknown precision: {e}"))),
    }
}

/// The layer widths `[inputs, hidden..., outputs]` of an MLP weights file (`0.weight`, `2.weight`,
/// ... as `torch.nn.Sequential` of Linear and ReLU writes them).
pub fn mlp_sizes(path: &Path) -> Result<Vec<usize>, Error> {
    let file = Loaded::read(path)?;
    let mut sizes = Vec::new();
    for i in (0..).step_by(2) {
        let Some((_, shape, _)) = file.view(&format!("{i}.weight")) else {
            break;
        };
        if shape.len() != 2 || sizes.last().is_some_and(|&prev| prev != shape[1]) {
            return Err(file.err(format!(
                "tensor '{i}.weight' has shape {shape:?}, which does not follow the previous layer"
            )));
        }
        if sizes.is_empty() {
            sizes.push(shape[1]);
        }
        sizes.push(shape[0]);
    }
    if sizes.is_empty() {
        return Err(file.err("has no tensor '0.weight': not the weights of an MLP".into()));
    }
    Ok(sizes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leftovers(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".tmp-"))
            .collect()
    }

    #[test]
    fn concurrent_atomic_writes_never_mix_and_leave_no_temporary_files() {
        let dir = std::env::temp_dir().join(format!("nbit-atomic-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("weights.safetensors");
        // Eight writers of distinct contents and lengths, all to the same file, many times.
        std::thread::scope(|s| {
            for w in 0..8u8 {
                let path = &path;
                s.spawn(move || {
                    let bytes = vec![w; 4096 * (w as usize + 1)];
                    for _ in 0..25 {
                        write_atomic(path, &bytes).unwrap();
                    }
                });
            }
        });
        let got = std::fs::read(&path).unwrap();
        let w = got[0];
        assert_eq!(
            got,
            vec![w; 4096 * (w as usize + 1)],
            "one writer's whole content"
        );
        assert!(leftovers(&dir).is_empty(), "{:?}", leftovers(&dir));
    }

    #[test]
    fn a_failed_write_removes_its_temporary_file_and_keeps_the_target() {
        let dir = std::env::temp_dir().join(format!("nbit-atomic-fail-{}", std::process::id()));
        let target = dir.join("occupied");
        std::fs::create_dir_all(target.join("inside")).unwrap();
        // Renaming a file over a non-empty folder fails after the temporary file is written.
        let msg = write_atomic(&target, b"data").unwrap_err().to_string();
        assert!(msg.contains("occupied"), "{msg}");
        assert!(target.join("inside").is_dir());
        assert!(leftovers(&dir).is_empty(), "{:?}", leftovers(&dir));
    }
}
