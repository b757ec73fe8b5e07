//! What several test modules share: the finite-difference gradient check and a test precision.
#![allow(dead_code)]

use nbit::Error;
use nbit::data::{DataLoader, Dataset};
use nbit::prelude::*;
use nbit::scaler::DynamicScaler;
use nbit::tensor::Tensor;
use ndarray::{ArrayD, IxDyn};

/// Deterministic values in [lo, hi).
pub fn values(shape: &[usize], seed: u64, lo: f64, hi: f64) -> ArrayD<f64> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    ArrayD::from_shape_fn(IxDyn(shape), |_| {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        lo + (hi - lo) * ((s >> 11) as f64 / (1u64 << 53) as f64)
    })
}

/// Central differences `(L(x+h) - L(x-h)) / 2h`, h = 1e-6, over every element of every leaf of a
/// scalar `loss`, against the gradients `backward` gives. The relative error
/// `|analytic - numeric| / max(|analytic|, |numeric|, 0.01)` must be at most 1e-6.
pub fn fd_check(
    name: &str,
    inputs: &[ArrayD<f64>],
    loss: impl Fn(&[Tensor<f64>]) -> Result<Tensor<f64>, Error>,
) {
    let leaves: Vec<Tensor<f64>> = inputs
        .iter()
        .map(|a| Tensor::from_array(a.clone()).requires_grad())
        .collect();
    let grads = loss(&leaves).unwrap().backward().unwrap();
    let h = 1e-6;
    for (i, leaf) in leaves.iter().enumerate() {
        let analytic = grads
            .get(leaf)
            .map(|g| g.to_vec())
            .unwrap_or_else(|| vec![0.0; leaf.numel()]);
        for (j, &a) in analytic.iter().enumerate() {
            let at = |delta: f64| {
                let ts: Vec<Tensor<f64>> = inputs
                    .iter()
                    .enumerate()
                    .map(|(k, x)| {
                        let mut x = x.clone();
                        if k == i {
                            x.as_slice_mut().unwrap()[j] += delta;
                        }
                        Tensor::from_array(x)
                    })
                    .collect();
                loss(&ts).unwrap().item().unwrap()
            };
            let numeric = (at(h) - at(-h)) / (2.0 * h);
            let rel = (a - numeric).abs() / a.abs().max(numeric.abs()).max(1e-2);
            assert!(
                rel <= 1e-6,
                "{name}: leaf {i} element {j}: analytic {a} numeric {numeric} (rel {rel:e})"
            );
        }
    }
}

/// `Σ r ⊙ out` with fixed weights `r` in [0.5, 1.5): a scalar in which every element of `out` matters.
pub fn weigh(out: &Tensor<f64>) -> Result<Tensor<f64>, Error> {
    Ok(out
        .mul(&Tensor::from_array(values(out.shape(), 99, 0.5, 1.5)))?
        .sum())
}

/// fp16 compute with f32 master weights and a dynamic scaler, allowed on the CPU: 16-mixed in all
/// but name, defined outside the crate (which also proves users can add precisions).
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuFp16Amp;

impl Precision for CpuFp16Amp {
    type Param = f32;
    type Compute = half::f16;
    type Full = f32;
    type Complex = num_complex::Complex<f32>;
    type Scaler = DynamicScaler;
    const NAME: &'static str = "cpu-16-mixed";
}

impl Supports<CpuFp16Amp> for Cpu {}

/// Three Gaussian-ish blobs in 4 dimensions, deterministic.
pub fn blobs(n: usize) -> Dataset {
    let mut s = 12345u64;
    let mut next = || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (s >> 11) as f64 / (1u64 << 53) as f64 - 0.5
    };
    let centers = [
        [1.0, 0.0, -1.0, 0.5],
        [-1.0, 1.0, 0.0, -0.5],
        [0.0, -1.0, 1.0, 0.0],
    ];
    let labels: Vec<usize> = (0..n).map(|i| i % 3).collect();
    let x = ndarray::Array2::from_shape_fn((n, 4), |(i, j)| centers[i % 3][j] + 0.8 * next());
    Dataset::classification(x, labels).unwrap()
}

pub fn loader(n: usize, batch: usize) -> DataLoader {
    DataLoader::new(blobs(n), batch).unwrap().shuffle(true).seed(3)
}

/// This test process's scratch folder `nbit-<name>-<pid>` in the temporary directory, emptied on
/// its first use in the process: process ids are reused (pid_max is 32768 here), and a file an
/// earlier process left under the same id (a loss log a test waits on, a checkpoint) must not pass
/// for this run's.
pub fn scratch(name: &str) -> std::path::PathBuf {
    static EMPTIED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let d = std::env::temp_dir().join(format!("nbit-{name}-{}", std::process::id()));
    let mut done = EMPTIED.lock().unwrap_or_else(|e| e.into_inner());
    if !done.iter().any(|n| n == name) {
        let _ = std::fs::remove_dir_all(&d);
        done.push(name.to_string());
    }
    std::fs::create_dir_all(&d).unwrap();
    d
}
