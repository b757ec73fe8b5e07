//! The CUDA backend's kernels (feature `cuda`), the first part of issue 12.
//!
//! What exists: the kernel source (`kernels.cu`: element-wise ops and their gradients, casts,
//! f64-accumulated sums, softmax and log-softmax with their gradients, the gradient scaler's fused
//! unscale-and-check and its on-device scale update, the counter-based dropout mask), compiled at
//! run time by NVRTC through cudarc ([`compile_ptx`], once per process and architecture), and a
//! host emulation of a launch (`host_prelude.h`) under which the tests run that same source on the
//! CPU and compare it with the CPU backend element for element.
//!
//! What does not exist yet: device storage, launches on a GPU, cuBLAS products and the
//! [`Backend`](super::Backend) implementation for [`Gpu`](crate::Gpu), so a `Gpu` trainer still
//! returns [`Error::DeviceUnavailable`]. None of this needs the CUDA toolkit to build: cudarc
//! loads NVRTC at run time, and a machine without it gets an `Err` naming what to install.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use crate::error::Error;

/// The kernel source NVRTC compiles (no CUDA headers needed).
pub const KERNELS: &str = include_str!("kernels.cu");
/// The host emulation of a launch that the tests compile `KERNELS` with.
pub const HOST_PRELUDE: &str = include_str!("host_prelude.h");
/// The host entry points the tests call (`host_<kernel>`), one emulated launch each.
pub const HOST_LAUNCHERS: &str = include_str!("host_launchers.cpp");
/// The GPU architectures the kernels are compiled and checked for: Ampere (A100) and Hopper
/// (H100, H200).
pub const ARCHS: [&str; 2] = ["sm_80", "sm_90"];

/// Threads per block of the element-wise and reduction kernels (a multiple of 32, as the block
/// reduction needs).
pub const BLOCK: u32 = 256;

/// The grid and block sizes for `n` elements: one thread per element up to 1024 blocks, then
/// grid-stride loops (the kernels accept any grid). At least one block, so a launch on an empty
/// tensor is valid and writes nothing.
pub fn launch_config(n: usize) -> (u32, u32) {
    let blocks = n.div_ceil(BLOCK as usize).clamp(1, 1024);
    (blocks as u32, BLOCK)
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launches_cover_every_element_with_at_most_1024_blocks() {
        assert_eq!(launch_config(0), (1, 256));
        assert_eq!(launch_config(1), (1, 256));
        assert_eq!(launch_config(257), (2, 256));
        assert_eq!(launch_config(1 << 30), (1024, 256));
        assert_eq!(BLOCK % 32, 0);
    }

    #[test]
    fn every_kernel_has_a_host_launcher() {
        let kernels: Vec<&str> = KERNELS
            .match_indices("__global__ void ")
            .map(|(i, m)| KERNELS[i + m.len()..].split('(').next().unwrap_or(""))
            .collect();
        // The kernels defined through macros, by their stems.
        for stem in [
            "unary_",
            "unary_backward_",
            "binary_",
            "cast_",
            "sum_partial_",
            "sum_finish_",
            "softmax_",
            "softmax_backward_",
            "unscale_check_",
            "update_scale",
            "dropout_mask_",
        ] {
            assert!(kernels.iter().any(|k| k.starts_with(stem)), "no kernel {stem}");
            assert!(
                HOST_LAUNCHERS.contains(&format!("host_{stem}")),
                "no launcher for {stem}"
            );
        }
    }
}
