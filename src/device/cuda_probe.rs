//! "Is a CUDA GPU usable?", answered by loading the driver library at run time.
//!
//! nbit links no CUDA library, so it builds and runs on machines without one. The probe opens the
//! driver (`libcuda.so.1` / `nvcuda.dll`), calls `cuInit(0)` and `cuDeviceGetCount`, and reports
//! why not in words when the answer is no. The result is computed once per process.

use std::sync::OnceLock;

#[cfg(windows)]
const DRIVER_NAMES: &[&str] = &["nvcuda.dll"];
#[cfg(not(windows))]
const DRIVER_NAMES: &[&str] = &["libcuda.so.1", "libcuda.so"];

type CuInit = unsafe extern "C" fn(flags: u32) -> i32;
type CuDeviceGetCount = unsafe extern "C" fn(count: *mut i32) -> i32;

/// The number of CUDA devices, or why none can be used.
pub(crate) fn cuda_device_count() -> Result<usize, String> {
    static PROBE: OnceLock<Result<usize, String>> = OnceLock::new();
    PROBE.get_or_init(probe).clone()
}

fn probe() -> Result<usize, String> {
    // SAFETY: loading the NVIDIA driver runs its initialisers, which is what every CUDA program
    // does; the symbols are looked up with the signatures of the documented driver API.
    unsafe {
        let lib = DRIVER_NAMES
            .iter()
            .find_map(|name| libloading::Library::new(*name).ok())
            .ok_or_else(|| {
                format!(
                    "the CUDA driver library ({}) was not found: install the NVIDIA driver",
                    DRIVER_NAMES.join(" or ")
                )
            })?;
        let init: libloading::Symbol<CuInit> = lib
            .get(b"cuInit\0")
            .map_err(|e| format!("the CUDA driver lacks cuInit: {e}"))?;
        let count: libloading::Symbol<CuDeviceGetCount> = lib
            .get(b"cuDeviceGetCount\0")
            .map_err(|e| format!("the CUDA driver lacks cuDeviceGetCount: {e}"))?;
        let rc = init(0);
        if rc != 0 {
            return Err(format!(
                "cuInit failed with CUDA error {rc} (100 means no device is visible)"
            ));
        }
        let mut n = 0i32;
        let rc = count(&mut n);
        if rc != 0 {
            return Err(format!("cuDeviceGetCount failed with CUDA error {rc}"));
        }
        // The library stays loaded for the life of the process, as the CUDA runtime's does.
        core::mem::forget(lib);
        if n <= 0 {
            return Err("the CUDA driver reports no devices (check CUDA_VISIBLE_DEVICES)".into());
        }
        Ok(n as usize)
    }
}
