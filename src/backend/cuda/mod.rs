//! The CUDA backend (feature `cuda`): [`Backend`](super::Backend) for [`Gpu`].
//!
//! - `kernels.cu`: every kernel, one source with no CUDA headers, compiled at run time by NVRTC
//!   (`compile_cubin`, once per process) to machine code for the device's architecture.
//! - `driver.rs`: what the backend asks of a device (memory, copies, launches, GEMM), which driver
//!   a process starts, device failures as values; answered by `nvidia.rs` (the NVIDIA driver and
//!   cuBLAS through cudarc, loaded at run time) or `host.rs` (the host emulation).
//! - `gpu.rs`: the storage ([`GpuStorage`]) and the `Backend` implementation, op by op.
//! - `host_prelude.h`, `host_launchers.cpp`, [`emulator`]: the same kernels compiled for the CPU
//!   with an emulation of a launch (one OS thread per CUDA thread, a barrier for
//!   `__syncthreads`), which is how CI runs this whole backend without a GPU.
//!
//! Nothing here needs the CUDA toolkit to build. At run time a GPU needs the NVIDIA driver, NVRTC
//! and cuBLAS (`libnvrtc.so.12`, `libcublas.so.12`: the CUDA toolkit, or the pip packages
//! `nvidia-cuda-nvrtc-cu12` and `nvidia-cublas-cu12` on `LD_LIBRARY_PATH`); each one missing is an
//! [`Error::DeviceUnavailable`] that names it, never a panic. A failure after the start (out of
//! memory) is an [`Error::DeviceFailed`] from the trainer's entry points.
//!
//! f32 products do not use TF32 unless `NBIT_TF32=1` ([`TF32_ENV`], PyTorch's
//! `torch.set_float32_matmul_precision("high")`), so 32-true means f32.

pub(crate) mod driver;
pub mod emulator;
mod gpu;
mod host;
mod nvidia;

pub use driver::{DEVICE_ENV, EMULATOR_ENV, describe, host_waits, synchronize, use_emulator};
pub use gpu::{GpuStorage, NOT_ON_THE_GPU};
pub use nvidia::TF32_ENV;

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use crate::backend::WithBackend;
use crate::device::{Device, DeviceKind, Gpu};
use crate::error::Error;
use crate::{Precision, RunJob, Supports};

impl Device for Gpu {
    const KIND: DeviceKind = DeviceKind::Gpu;
    /// Starts the driver (once per process): the NVIDIA driver, a device, NVRTC, the kernels and
    /// cuBLAS, or the emulation when [`EMULATOR_ENV`] names it.
    fn probe() -> Result<(), Error> {
        driver::driver().map(|_| ()).map_err(|e| match e {
            // What to do instead, as a build without the feature says it.
            Error::DeviceUnavailable { device, reason } if !reason.contains("accelerator 'cpu'") => {
                Error::DeviceUnavailable {
                    device,
                    reason: format!("{reason}; use accelerator 'cpu' (or 'auto') on this machine"),
                }
            }
            e => e,
        })
    }
    fn describe() -> String {
        driver::describe().unwrap_or_else(|e| e.to_string())
    }
}

impl WithBackend for Gpu {
    fn with_backend<P: Precision, J: RunJob>(job: J) -> Result<J::Output, Error>
    where
        Self: Supports<P>,
    {
        Self::probe()?;
        driver::catch(|| job.run::<P, Self>())
    }
}

/// The kernel source NVRTC compiles (no CUDA headers needed). Test support, not API.
#[doc(hidden)]
pub const KERNELS: &str = include_str!("kernels.cu");
/// The host emulation of a launch that [`emulator::build`] compiles `KERNELS` with. Test
/// support, not API.
#[doc(hidden)]
pub const HOST_PRELUDE: &str = include_str!("host_prelude.h");
/// The host emulation's launcher (`nbit_host_launch`: a kernel by name, its arguments as
/// cuLaunchKernel's `kernelParams`). Test support, not API.
#[doc(hidden)]
pub const HOST_LAUNCHERS: &str = include_str!("host_launchers.cpp");
/// The GPU architectures the kernels are compiled and checked for: Ampere (A100) and Hopper
/// (H100, H200).
pub const ARCHS: [&str; 2] = ["sm_80", "sm_90"];

/// Threads per block of the element-wise and reduction kernels on a GPU (a multiple of 32, as
/// the block reduction needs; the emulation uses 32).
pub const BLOCK: u32 = 256;

/// Whether NVRTC can be loaded in this process; otherwise an error that names what to install.
/// cudarc panics when a library is absent, so every NVRTC call here asks this first.
pub fn nvrtc_available() -> Result<(), Error> {
    // SAFETY: only tries to open the library by its candidate names.
    if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(Error::DeviceUnavailable {
            device: "gpu",
            reason: "NVRTC (libnvrtc.so) was not found: install the CUDA toolkit, or `pip install \
                     nvidia-cuda-nvrtc-cu12` and add its `nvidia/cuda_nvrtc/lib` folder to \
                     LD_LIBRARY_PATH"
                .into(),
        })
    }
}

/// [`KERNELS`] compiled to PTX for `arch` (such as `"sm_90"`), once per process and architecture.
/// Compiled without fused multiply-add contraction, so each kernel rounds where the CPU backend
/// does. A compile error carries NVRTC's log.
#[doc(hidden)]
pub fn compile_ptx(arch: &'static str) -> Result<String, Error> {
    static CACHE: OnceLock<Mutex<HashMap<&'static str, Result<String, String>>>> = OnceLock::new();
    nvrtc_available()?;
    let cache = CACHE.get_or_init(Default::default);
    let mut cache = cache.lock().unwrap_or_else(|e| e.into_inner());
    let ptx = cache.entry(arch).or_insert_with(|| {
        let opts = cudarc::nvrtc::CompileOptions {
            arch: Some(arch),
            fmad: Some(false),
            name: Some("nbit_kernels.cu".into()),
            ..Default::default()
        };
        cudarc::nvrtc::compile_ptx_with_opts(KERNELS, opts)
            .map(|p| p.to_src())
            .map_err(|e| format!("{e:?}"))
    });
    ptx.clone().map_err(|log| Error::DeviceUnavailable {
        device: "gpu",
        reason: format!("NVRTC could not compile nbit's kernels for {arch}: {log}"),
    })
}

/// [`KERNELS`] compiled by NVRTC to a cubin (machine code) for the real architecture `arch`
/// (such as `"sm_90"`), with the options of [`compile_ptx`]. A cubin loads on any driver of the
/// same CUDA major version, where PTX needs a driver at least as new as NVRTC (it is compiled
/// again by the driver); so a GPU runs cubins, and PTX only for an architecture this NVRTC does
/// not know. A compile error carries NVRTC's log.
#[doc(hidden)]
pub fn compile_cubin(arch: &'static str) -> Result<Vec<u8>, Error> {
    use cudarc::nvrtc::{result, sys};
    nvrtc_available()?;
    let failed = |why: String| Error::DeviceUnavailable {
        device: "gpu",
        reason: format!("NVRTC could not compile nbit's kernels to a cubin for {arch}: {why}"),
    };
    let src = std::ffi::CString::new(KERNELS).map_err(|e| failed(e.to_string()))?;
    let name = c"nbit_kernels.cu";
    let prog = result::create_program(&src, Some(name)).map_err(|e| failed(format!("{e:?}")))?;
    let options = [format!("--gpu-architecture={arch}"), "--fmad=false".to_string()];
    // SAFETY: a program just created, destroyed once below.
    unsafe {
        let compiled = result::compile_program(prog, &options).map_err(|e| {
            let log = result::get_program_log(prog)
                .map(|l| {
                    std::ffi::CStr::from_ptr(l.as_ptr())
                        .to_string_lossy()
                        .into_owned()
                })
                .unwrap_or_default();
            failed(format!("{e:?}: {log}"))
        });
        let cubin = compiled.and_then(|()| {
            let mut size = 0usize;
            sys::nvrtcGetCUBINSize(prog, &mut size)
                .result()
                .map_err(|e| failed(format!("nvrtcGetCUBINSize: {e:?}")))?;
            let mut bytes = vec![0u8; size];
            sys::nvrtcGetCUBIN(prog, bytes.as_mut_ptr().cast())
                .result()
                .map_err(|e| failed(format!("nvrtcGetCUBIN: {e:?}")))?;
            Ok(bytes)
        });
        let _ = result::destroy_program(prog);
        cubin
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_has_a_host_launcher() {
        let kernels: Vec<&str> = KERNELS
            .match_indices("__global__ void ")
            .map(|(i, m)| KERNELS[i + m.len()..].split('(').next().unwrap_or(""))
            .collect();
        // The kernels defined through macros, by their stems; the launcher's table names each
        // stem (NBIT_E4(stem), NBIT_EB(stem) or NBIT_E(stem...)).
        for stem in [
            "unary_",
            "unary_backward_",
            "binary_",
            "cast_",
            "sum_partial_",
            "sum_finish_",
            "reduce_",
            "softmax_",
            "softmax_backward_",
            "nll_loss_",
            "nll_loss_backward_",
            "unscale_check_",
            "non_finite_",
            "update_scale",
            "dropout_mask_",
            "copy_",
            "fill_",
        ] {
            assert!(kernels.iter().any(|k| k.starts_with(stem)), "no kernel {stem}");
            let name = stem.trim_end_matches('_');
            assert!(
                HOST_LAUNCHERS.contains(&format!("({name})")) || HOST_LAUNCHERS.contains(&format!("({stem}")),
                "no launcher for {stem}"
            );
        }
    }
}
