//! [`Host`]: the [`Driver`] that runs nbit's CUDA kernels on the CPU. `kernels.cu` compiled with
//! the launch emulation of `host_prelude.h` into a shared library ([`emulator::build`]), loaded
//! here; device memory is host memory, products are the CPU backend's. How CI runs the whole GPU
//! backend without a GPU.
//!
//! [`emulator::build`]: super::emulator::build

use core::ffi::c_void;
use std::ffi::CString;
use std::path::{Path, PathBuf};

use super::driver::{Blocks, Driver, EMULATOR_ENV, Gemm, Kernel, waits};
use crate::dtype::DType;
use crate::error::Error;

type HostLaunch = unsafe extern "C" fn(*const core::ffi::c_char, u32, u32, u32, *mut *mut c_void) -> i32;

/// The kernels compiled for the host (see the module docs).
pub(super) struct Host {
    path: PathBuf,
    launch: HostLaunch,
    _lib: libloading::Library,
    /// Freed blocks are handed out again as they are, as the real driver's caching allocator
    /// does: a kernel that reads memory it has not written sees old data (or, in a new block,
    /// NaN bytes) and fails its test here, not first on a GPU. Never returned to the system: the
    /// emulation lives as long as the process, as the real cache does.
    blocks: Blocks,
}

/// What a new block of the emulation holds before anything writes it: all ones, a NaN in every
/// float type and an out-of-range index in every integer one.
const DIRTY: u8 = 0xFF;

impl Host {
    pub(super) fn load(path: &Path) -> Result<Host, Error> {
        let unusable = |why: String| Error::DeviceUnavailable {
            device: "gpu",
            reason: format!(
                "the CUDA emulation library {} {why}; build it with \
                 nbit::backend::cuda::emulator::build, or unset {EMULATOR_ENV}",
                path.display()
            ),
        };
        // SAFETY: a library of nbit's own kernels (emulator::build), with no initialisers beyond
        // the C++ runtime's.
        let lib = unsafe { libloading::Library::new(path) }
            .map_err(|e| unusable(format!("cannot be loaded: {e}")))?;
        // SAFETY: host_launchers.cpp defines the symbol with this signature.
        let launch = unsafe { lib.get::<HostLaunch>(b"nbit_host_launch\0") }
            .map(|s| *s)
            .map_err(|e| unusable(format!("is not nbit's: {e}")))?;
        Ok(Host {
            path: path.to_owned(),
            launch,
            _lib: lib,
            blocks: Blocks::default(),
        })
    }

    fn layout(bytes: usize) -> std::alloc::Layout {
        std::alloc::Layout::from_size_align(bytes.max(1), 16).expect("sizes come from tensors that exist")
    }
}

impl Host {
    pub(super) fn describe_path(path: &Path) -> String {
        format!("the host emulation of nbit's CUDA kernels ({})", path.display())
    }
}

impl Driver for Host {
    fn describe(&self) -> String {
        Host::describe_path(&self.path)
    }
    fn ordinal(&self) -> usize {
        0
    }
    fn block(&self) -> u32 {
        // The emulation starts one OS thread per CUDA thread: the smallest block the kernels allow.
        32
    }
    fn max_blocks(&self) -> u32 {
        2
    }
    fn alloc(&self, bytes: usize) -> Result<u64, String> {
        if let Some(p) = self.blocks.reuse(bytes) {
            return Ok(p);
        }
        let layout = Self::layout(bytes);
        // SAFETY: a non-zero size.
        let p = unsafe { std::alloc::alloc(layout) };
        if p.is_null() {
            return Err(format!("out of host memory for {bytes} bytes"));
        }
        // SAFETY: `p` holds `layout.size()` bytes.
        unsafe { core::ptr::write_bytes(p, DIRTY, layout.size()) };
        self.blocks.record(p as u64, bytes);
        Ok(p as u64)
    }
    unsafe fn free(&self, ptr: u64) {
        self.blocks.release(ptr);
    }
    unsafe fn upload(&self, dst: u64, src: &[u8]) -> Result<(), String> {
        waits::queued();
        // SAFETY: the caller's contract; host memory on both sides.
        unsafe { core::ptr::copy_nonoverlapping(src.as_ptr(), dst as *mut u8, src.len()) };
        Ok(())
    }
    unsafe fn download(&self, dst: &mut [u8], src: u64) -> Result<(), String> {
        waits::waited();
        // SAFETY: as `upload`.
        unsafe { core::ptr::copy_nonoverlapping(src as *const u8, dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }
    unsafe fn copy(&self, dst: u64, src: u64, bytes: usize) -> Result<(), String> {
        waits::queued();
        // SAFETY: as `upload` (`copy` allows overlap).
        unsafe { core::ptr::copy(src as *const u8, dst as *mut u8, bytes) };
        Ok(())
    }
    unsafe fn launch(
        &self,
        kernel: Kernel,
        grid: (u32, u32),
        block: u32,
        args: &mut [*mut c_void],
    ) -> Result<(), String> {
        waits::queued();
        let c = CString::new(kernel.to_string()).map_err(|e| e.to_string())?;
        // SAFETY: the caller's contract; the launch is synchronous.
        match unsafe { (self.launch)(c.as_ptr(), grid.0, grid.1, block, args.as_mut_ptr()) } {
            0 => Ok(()),
            _ => Err(format!("the emulation has no kernel '{kernel}' (rebuild it)")),
        }
    }
    fn synchronize(&self) -> Result<(), String> {
        waits::waited();
        Ok(())
    }
    fn with_context(&self, _f: &mut dyn FnMut() -> Result<(), String>) -> Result<(), String> {
        Err(format!(
            "{} has no GPU for another CUDA library (NCCL) to work on",
            self.describe()
        ))
    }
    unsafe fn gemm(&self, g: &Gemm) -> Result<(), String> {
        waits::queued();
        // An empty k writes nothing, as the weakest reading of cuBLAS allows (C is left as the
        // block held it), so the backend must not rely on a GEMM to zero its output.
        if g.k == 0 {
            return Ok(());
        }
        // The CPU backend's product on the same memory: cuBLAS's role, with the CPU's numerics.
        // SAFETY: the caller's contract.
        unsafe {
            match g.dtype {
                DType::F16 => host_gemm::<half::f16>(g),
                DType::BF16 => host_gemm::<half::bf16>(g),
                DType::F32 => host_gemm::<f32>(g),
                DType::F64 => host_gemm::<f64>(g),
                DType::C128 => host_cgemm(g),
                other => return Err(format!("no GEMM for {other}")),
            }
        }
        Ok(())
    }
}

/// `rows x cols` values of `T` at host address `p`, copied into an array.
///
/// # Safety
/// `p` holds that many values (under the emulation, device memory is host memory).
unsafe fn host_view<T: Clone>(p: u64, rows: usize, cols: usize) -> ndarray::ArrayD<T> {
    // SAFETY: the caller's contract.
    let s = unsafe { core::slice::from_raw_parts(p as *const T, rows * cols) };
    ndarray::ArrayD::from_shape_vec(vec![rows, cols], s.to_vec()).expect("sizes match")
}

/// The operands of `g` as host arrays (`a` is `[k, m]` when transposed, `b` `[n, k]`).
///
/// # Safety
/// As [`Driver::gemm`].
unsafe fn host_operands<T: Clone>(g: &Gemm) -> (ndarray::ArrayD<T>, ndarray::ArrayD<T>) {
    let (ar, ac) = if g.ta { (g.k, g.m) } else { (g.m, g.k) };
    let (br, bc) = if g.tb { (g.n, g.k) } else { (g.k, g.n) };
    // SAFETY: the caller's contract.
    unsafe { (host_view(g.a, ar, ac), host_view(g.b, br, bc)) }
}

/// Writes the product `c` to `g.c`.
///
/// # Safety
/// As [`Driver::gemm`].
unsafe fn host_store<T: Clone>(g: &Gemm, c: ndarray::ArrayD<T>) {
    let c = c.as_standard_layout();
    let out = c.as_slice().expect("standard layout");
    // SAFETY: `g.c` holds m * n values.
    unsafe { core::ptr::copy_nonoverlapping(out.as_ptr(), g.c as *mut T, out.len()) };
}

/// [`Host::gemm`] for one real type: the CPU backend's product, bias included.
unsafe fn host_gemm<E: crate::dtype::Float>(g: &Gemm) {
    use super::super::Backend;
    // SAFETY: the caller's contract.
    unsafe {
        let (a, b) = host_operands::<E>(g);
        let bias = g.bias.map(|p| {
            host_view::<E>(p, 1, g.n)
                .into_shape_with_order(vec![g.n])
                .expect("n elements")
        });
        host_store(g, crate::Cpu::matmul(&a, &b, g.ta, g.tb, bias.as_ref()));
    }
}

/// [`Host::gemm`] for complex128: the CPU backend's complex product.
unsafe fn host_cgemm(g: &Gemm) {
    use super::super::ComplexBackend;
    // SAFETY: the caller's contract.
    unsafe {
        let (a, b) = host_operands::<num_complex::Complex<f64>>(g);
        host_store(g, crate::Cpu::cmatmul(&a, &b, g.ta, g.ca, g.tb, g.cb));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_emulator_library_that_is_not_there_is_an_error_naming_it() {
        let msg = Host::load(Path::new("/nonexistent/libnbit_emulator.so"))
            .err()
            .unwrap()
            .to_string();
        assert!(
            msg.contains("/nonexistent/libnbit_emulator.so") && msg.contains("emulator::build"),
            "{msg}"
        );
    }
}
