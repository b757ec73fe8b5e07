//! [`Cuda`]: the [`Driver`] of an NVIDIA GPU, through the CUDA driver API and cuBLAS (both loaded
//! at run time by cudarc). The only part of the GPU backend that CI cannot run.

use core::ffi::c_void;
use std::collections::HashMap;
use std::ffi::CString;
use std::sync::Mutex;

use super::driver::{Blocks, DEVICE_ENV, Driver, Gemm, Kernel, lock, waits};
use crate::dtype::DType;
use crate::error::Error;

use cudarc::cublas::sys as cublas_sys;
use cudarc::driver::{result as cu, sys as cu_sys};

/// A GPU through the CUDA driver API and cuBLAS (both loaded at run time by cudarc).
pub(super) struct Cuda {
    ordinal: usize,
    name: String,
    arch: String,
    ctx: cu_sys::CUcontext,
    module: cu_sys::CUmodule,
    functions: Mutex<HashMap<Kernel, usize>>,
    blas: cublas_sys::cublasHandle_t,
    blocks: u32,
    /// Allocations by bucketed size, freed ones reused before asking the driver (cuMemFree
    /// synchronises the device, and cuMemAlloc costs as much as a small kernel). Every launch and
    /// copy is on the legacy stream, in order, so a block freed by one op is safe for the next.
    memory: Blocks,
    /// Pinned host memory that uploads are copied through (see [`Staging`]).
    staging: Mutex<Staging>,
}

/// A pinned host buffer that uploads are copied into before an asynchronous copy to the device,
/// so an upload never waits for the kernels queued before it (a copy from pageable memory does).
/// Filled front to back; every wait for the device (a copy to the host, a synchronisation) has
/// finished every copy out of it, so the next upload starts at the front again. An upload that
/// finds it full waits (counted) and starts at the front; longer ones go through it in pieces.
/// Where pinned memory cannot be had, uploads are plain synchronous copies (each a wait).
struct Staging {
    /// `STAGING_BYTES` of pinned memory, allocated at the first upload (null until then).
    base: *mut u8,
    used: usize,
    /// The pinned allocation failed: copy from pageable memory.
    unpinned: bool,
}

impl Staging {
    /// Whether `len` more bytes (at most [`STAGING_BYTES`]) fit before the next wait.
    fn fits(&self, len: usize) -> bool {
        self.used + len <= STAGING_BYTES
    }
    /// The offset of the next `len` bytes, which [`Staging::fits`] (after a wait, the front).
    fn take(&mut self, len: usize) -> usize {
        debug_assert!(self.fits(len));
        self.used += len;
        self.used - len
    }
    /// Every copy out of the buffer has finished (the host waited for the device).
    fn emptied(&mut self) {
        self.used = 0;
    }
}

/// The staging buffer's size: a batch of a few thousand features, every pointer and length table
/// of a step, many times over.
const STAGING_BYTES: usize = 4 << 20;

/// An allocation's size as the cache buckets it: multiples of 512 bytes up to 1 MiB, of 2 MiB
/// above.
fn bucket(bytes: usize) -> usize {
    let step = if bytes <= 1 << 20 { 512 } else { 2 << 20 };
    bytes.max(1).div_ceil(step) * step
}

// SAFETY: the context, module and cuBLAS handle are process-wide driver objects; every call makes
// the context current first, and cuBLAS calls are serialised by `blas_lock`. The staging buffer's
// pointer is only used under its mutex.
unsafe impl Send for Cuda {}
// SAFETY: as above.
unsafe impl Sync for Cuda {}

static BLAS_LOCK: Mutex<()> = Mutex::new(());

/// The environment variable that lets f32 products use TF32 tensor cores (PyTorch's
/// `torch.set_float32_matmul_precision("high")`): `NBIT_TF32=1`. Off by default, so 32-true
/// means f32.
pub const TF32_ENV: &str = "NBIT_TF32";

impl Cuda {
    /// Opens device `ordinal`: the driver, its primary context, the kernels (NVRTC, once), cuBLAS.
    pub(super) fn start(ordinal: usize) -> Result<Cuda, Error> {
        let unusable = |reason: String| Error::DeviceUnavailable {
            device: "gpu",
            reason,
        };
        // cudarc panics when a library is absent, so probe each before its first call.
        let count = crate::device::cuda_device_count().map_err(unusable)?;
        if ordinal >= count {
            return Err(unusable(format!(
                "{DEVICE_ENV}={ordinal} asks for CUDA device {ordinal}, but the driver reports {count} \
                 (indices 0 to {})",
                count - 1
            )));
        }
        // SAFETY: probing only opens the library.
        if !unsafe { cublas_sys::is_culib_present() } {
            return Err(unusable(
                "cuBLAS (libcublas.so.12) was not found: install the CUDA toolkit, or `pip install \
                 nvidia-cublas-cu12` and add its `nvidia/cublas/lib` folder to LD_LIBRARY_PATH"
                    .into(),
            ));
        }
        super::nvrtc_available()?;
        let driver = |what: &str, e: cu::DriverError| unusable(format!("{what} failed: {}", words(e)));
        cu::init().map_err(|e| driver("cuInit", e))?;
        let dev = cu::device::get(ordinal as i32).map_err(|e| driver("cuDeviceGet", e))?;
        let name = cu::device::get_name(dev).map_err(|e| driver("cuDeviceGetName", e))?;
        let attr = |a| {
            // SAFETY: a valid device and attribute.
            unsafe { cu::device::get_attribute(dev, a) }.map_err(|e| driver("cuDeviceGetAttribute", e))
        };
        use cu_sys::CUdevice_attribute::*;
        let (major, minor) = (
            attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
            attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
        );
        let sms = attr(CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?.max(1) as u32;
        if major < 7 {
            return Err(unusable(format!(
                "{name} has compute capability {major}.{minor}; nbit's kernels need 7.0 (Volta) or newer"
            )));
        }
        // SAFETY: a valid device; the primary context lives as long as the process.
        let ctx =
            unsafe { cu::primary_ctx::retain(dev) }.map_err(|e| driver("cuDevicePrimaryCtxRetain", e))?;
        let before = cu::ctx::get_current().map_err(|e| driver("cuCtxGetCurrent", e))?;
        // SAFETY: a context just retained.
        unsafe { cu::ctx::set_current(ctx) }.map_err(|e| driver("cuCtxSetCurrent", e))?;
        // Another library's context goes back when the start is done.
        let _restore = Current(before.filter(|&c| c != ctx));
        // A cubin for the device's architecture, which any driver of this CUDA major version
        // loads; PTX (compiled again by the driver, which must then be at least as new as NVRTC)
        // only where this NVRTC cannot write a cubin for the device.
        let sm: &'static str = Box::leak(format!("sm_{major}{minor}").into_boxed_str());
        let image = match super::compile_cubin(sm) {
            Ok(cubin) => cubin,
            Err(_) => {
                let compute: &'static str = Box::leak(format!("compute_{major}{minor}").into_boxed_str());
                let ptx = super::compile_ptx(compute)?;
                CString::new(ptx)
                    .map_err(|e| unusable(e.to_string()))?
                    .into_bytes_with_nul()
            }
        };
        // SAFETY: a cubin (an ELF image) or a NUL-terminated PTX image.
        let module = unsafe { cu::module::load_data(image.as_ptr() as *const c_void) }.map_err(|e| {
            if e.0 == cu_sys::CUresult::CUDA_ERROR_UNSUPPORTED_PTX_VERSION {
                unusable(
                    "the NVIDIA driver is older than NVRTC (it cannot load the PTX NVRTC wrote, and \
                     NVRTC could not write machine code for this GPU): update the driver, or use the \
                     NVRTC of the CUDA version `nvidia-smi` reports"
                        .into(),
                )
            } else {
                driver("cuModuleLoadData", e)
            }
        })?;
        let blas = cudarc::cublas::result::create_handle()
            .map_err(|e| unusable(format!("cublasCreate failed: {e:?}")))?;
        // cuBLAS's default math mode lets f16/bf16 GemmEx reduce split-K partial sums in 16 bits;
        // nbit's contract is f32 accumulation with one rounding, so forbid that.
        // SAFETY: the handle just created.
        let mode = unsafe {
            cublas_sys::cublasSetMathMode(
                blas,
                cublas_sys::cublasMath_t::CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION,
            )
        };
        if mode != cublas_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            return Err(unusable(format!("cublasSetMathMode failed: {mode:?}")));
        }
        Ok(Cuda {
            ordinal,
            name,
            arch: format!("sm_{major}{minor}"),
            ctx,
            module,
            functions: Mutex::default(),
            blas,
            blocks: (sms * 4).clamp(1, 1024),
            memory: Blocks::default(),
            staging: Mutex::new(Staging {
                base: core::ptr::null_mut(),
                used: 0,
                unpinned: false,
            }),
        })
    }

    /// Makes nbit's context current on this thread for one call. Another library's context that
    /// was current is put back when the guard drops, so nbit never leaves it switched; where no
    /// context was current, nbit's stays (nothing to disturb, and the next call is one query).
    fn current(&self) -> Result<Current, String> {
        let before = cu::ctx::get_current().map_err(words)?;
        if before == Some(self.ctx) {
            return Ok(Current(None));
        }
        // SAFETY: the context retained in `start`.
        unsafe { cu::ctx::set_current(self.ctx) }.map_err(words)?;
        Ok(Current(before))
    }

    fn function(&self, kernel: Kernel) -> Result<cu_sys::CUfunction, String> {
        let mut f = lock(&self.functions);
        if let Some(&p) = f.get(&kernel) {
            return Ok(p as cu_sys::CUfunction);
        }
        // The name is formatted once per kernel, at its first launch.
        let name = CString::new(kernel.to_string()).map_err(|e| e.to_string())?;
        // SAFETY: the module loaded in `start`.
        let func = unsafe { cu::module::get_function(self.module, name) }
            .map_err(|e| format!("kernel '{kernel}': {}", words(e)))?;
        f.insert(kernel, func as usize);
        Ok(func)
    }
}

/// Restores another library's context that was current before [`Cuda::current`] switched to
/// nbit's.
struct Current(Option<cu_sys::CUcontext>);

impl Drop for Current {
    fn drop(&mut self) {
        if let Some(previous) = self.0 {
            // SAFETY: the context that was current on this thread.
            let _ = unsafe { cu::ctx::set_current(previous) };
        }
    }
}

/// A GEMM size as the `int` cuBLAS takes, or why it does not fit.
fn blas_int(what: &str, n: usize) -> Result<i32, String> {
    i32::try_from(n).map_err(|_| {
        format!("{what} = {n} is larger than cuBLAS's largest size (2^31 - 1): split the product")
    })
}

/// A row-major [`Gemm`] as the column-major call BLAS takes: row-major `c = op(a) op(b)` is
/// column-major `c^T = op(b)^T op(a)^T`, so the first operand is `b` and the second `a`, each
/// read in its column-major view (a row-major `[r, c]` array is a column-major `c x r` one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ColumnMajor {
    trans_first: bool,
    trans_second: bool,
    m: usize,
    n: usize,
    k: usize,
    first: u64,
    ld_first: usize,
    second: u64,
    ld_second: usize,
    ldc: usize,
}

impl ColumnMajor {
    fn of(g: &Gemm) -> ColumnMajor {
        // Leading dimensions are at least 1, as BLAS requires even for an empty k.
        ColumnMajor {
            trans_first: g.tb,
            trans_second: g.ta,
            m: g.n,
            n: g.m,
            k: g.k,
            first: g.b,
            ld_first: if g.tb { g.k } else { g.n }.max(1),
            second: g.a,
            ld_second: if g.ta { g.m } else { g.k }.max(1),
            ldc: g.n.max(1),
        }
    }
}

/// A driver error in words: its name and description.
fn words(e: cu::DriverError) -> String {
    let name = e
        .error_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let text = e
        .error_string()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let hint = if e.0 == cu_sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
        " (reduce the batch size or the model)"
    } else {
        ""
    };
    format!("{name}: {text}{hint}")
}

impl Driver for Cuda {
    fn describe(&self) -> String {
        format!("{} ({}, CUDA device {})", self.name, self.arch, self.ordinal)
    }
    fn ordinal(&self) -> usize {
        self.ordinal
    }
    fn block(&self) -> u32 {
        super::BLOCK
    }
    fn max_blocks(&self) -> u32 {
        self.blocks
    }
    fn alloc(&self, bytes: usize) -> Result<u64, String> {
        let size = bucket(bytes);
        if let Some(p) = self.memory.reuse(size) {
            return Ok(p);
        }
        let _current = self.current()?;
        // SAFETY: plain allocations in the current context.
        let ptr = match unsafe { cu::malloc_sync(size) } {
            Ok(p) => p,
            Err(e) if e.0 == cu_sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY => {
                // Give the cached blocks back to the driver and try once more.
                for p in self.memory.drain() {
                    // SAFETY: cached blocks are allocations no storage holds.
                    let _ = unsafe { cu::free_sync(p) };
                }
                // SAFETY: as above.
                unsafe { cu::malloc_sync(size) }.map_err(words)?
            }
            Err(e) => return Err(words(e)),
        };
        self.memory.record(ptr, size);
        Ok(ptr)
    }
    unsafe fn free(&self, ptr: u64) {
        self.memory.release(ptr);
    }
    unsafe fn upload(&self, dst: u64, src: &[u8]) -> Result<(), String> {
        let _current = self.current()?;
        let mut st = lock(&self.staging);
        if st.base.is_null() && !st.unpinned {
            // SAFETY: a plain pinned allocation, kept for the life of the process.
            match unsafe { cu::malloc_host(STAGING_BYTES, 0) } {
                Ok(p) => st.base = p as *mut u8,
                Err(_) => st.unpinned = true,
            }
        }
        if st.unpinned {
            // SAFETY: the caller's contract; waits for the work queued before it.
            unsafe { cu::memcpy_htod_sync(dst, src) }.map_err(words)?;
            waits::queued();
            waits::waited();
            return Ok(());
        }
        for (i, piece) in src.chunks(STAGING_BYTES).enumerate() {
            if !st.fits(piece.len()) {
                // Every copy out of the buffer is done after this wait.
                cu::ctx::synchronize().map_err(words)?;
                waits::waited();
                st.emptied();
            }
            let at = st.take(piece.len());
            // SAFETY: `take` keeps `at + len <= STAGING_BYTES`, and no queued copy reads this
            // range (it lies past every copy queued since the last wait).
            let staged = unsafe {
                let at = st.base.add(at);
                core::ptr::copy_nonoverlapping(piece.as_ptr(), at, piece.len());
                core::slice::from_raw_parts(at as *const u8, piece.len())
            };
            let to = dst + (i * STAGING_BYTES) as u64;
            // SAFETY: the caller's contract for `dst`; `staged` is pinned and stays untouched
            // until the next wait, which comes after this copy on the legacy stream.
            unsafe { cu::memcpy_htod_async(to, staged, cu::stream::null()) }.map_err(words)?;
            waits::queued();
        }
        Ok(())
    }
    unsafe fn download(&self, dst: &mut [u8], src: u64) -> Result<(), String> {
        // A copy of nothing need not wait for the stream, so it must not empty the buffer.
        if dst.is_empty() {
            return Ok(());
        }
        let _current = self.current()?;
        // Held across the copy, so no upload stages into the buffer while it is being emptied.
        let mut st = lock(&self.staging);
        // SAFETY: the caller's contract; synchronous on the legacy stream, after every launch
        // and copy queued before it.
        unsafe { cu::memcpy_dtoh_sync(dst, src) }.map_err(words)?;
        waits::waited();
        st.emptied();
        Ok(())
    }
    unsafe fn copy(&self, dst: u64, src: u64, bytes: usize) -> Result<(), String> {
        let _current = self.current()?;
        // SAFETY: the caller's contract.
        unsafe { cu::memcpy_dtod_sync(dst, src, bytes) }.map_err(words)?;
        waits::queued();
        Ok(())
    }
    unsafe fn launch(
        &self,
        kernel: Kernel,
        grid: (u32, u32),
        block: u32,
        args: &mut [*mut c_void],
    ) -> Result<(), String> {
        let _current = self.current()?;
        let f = self.function(kernel)?;
        waits::queued();
        // SAFETY: the caller's contract; the null stream orders every launch and copy.
        unsafe { cu::launch_kernel(f, (grid.0, grid.1, 1), (block, 1, 1), 0, cu::stream::null(), args) }
            .map_err(words)
    }
    fn synchronize(&self) -> Result<(), String> {
        let _current = self.current()?;
        let mut st = lock(&self.staging);
        cu::ctx::synchronize().map_err(words)?;
        waits::waited();
        st.emptied();
        Ok(())
    }
    fn with_context(&self, f: &mut dyn FnMut() -> Result<(), String>) -> Result<(), String> {
        let _current = self.current()?;
        f()
    }
    unsafe fn gemm(&self, g: &Gemm) -> Result<(), String> {
        use cublas_sys::cublasComputeType_t::*;
        use cublas_sys::cudaDataType_t::*;
        let _current = self.current()?;
        let (ty, compute) = match g.dtype {
            DType::F16 => (CUDA_R_16F, CUBLAS_COMPUTE_32F),
            DType::BF16 => (CUDA_R_16BF, CUBLAS_COMPUTE_32F),
            DType::F32 if std::env::var(TF32_ENV).is_ok_and(|v| v == "1") => {
                (CUDA_R_32F, CUBLAS_COMPUTE_32F_FAST_TF32)
            }
            DType::F32 => (CUDA_R_32F, CUBLAS_COMPUTE_32F),
            DType::F64 => (CUDA_R_64F, CUBLAS_COMPUTE_64F),
            DType::C128 => (CUDA_C_64F, CUBLAS_COMPUTE_64F),
            other => return Err(format!("no GEMM for {other}")),
        };
        // The bias, already in every row of c (see `Gemm`), is added by beta = 1.
        let cm = ColumnMajor::of(g);
        let op = |t: bool, c: bool| match (t, c) {
            (true, true) => cublas_sys::cublasOperation_t::CUBLAS_OP_C,
            (true, false) => cublas_sys::cublasOperation_t::CUBLAS_OP_T,
            (false, _) => cublas_sys::cublasOperation_t::CUBLAS_OP_N,
        };
        let beta_one = g.bias.is_some();
        let (one32, zero32, one64, zero64) = (1.0f32, 0.0f32, 1.0f64, 0.0f64);
        let (one_c, zero_c) = ([1.0f64, 0.0], [0.0f64, 0.0]);
        let (alpha, beta): (*const c_void, *const c_void) = if g.dtype == DType::C128 {
            (
                one_c.as_ptr() as _,
                if beta_one {
                    one_c.as_ptr() as _
                } else {
                    zero_c.as_ptr() as _
                },
            )
        } else if g.dtype == DType::F64 {
            (
                &one64 as *const f64 as _,
                if beta_one {
                    &one64 as *const f64 as _
                } else {
                    &zero64 as *const f64 as _
                },
            )
        } else {
            (
                &one32 as *const f32 as _,
                if beta_one {
                    &one32 as *const f32 as _
                } else {
                    &zero32 as *const f32 as _
                },
            )
        };
        let (m, n, k) = (blas_int("m", cm.m)?, blas_int("n", cm.n)?, blas_int("k", cm.k)?);
        let (ld_first, ld_second, ldc) = (
            blas_int("a leading dimension", cm.ld_first)?,
            blas_int("a leading dimension", cm.ld_second)?,
            blas_int("a leading dimension", cm.ldc)?,
        );
        let _one_at_a_time = lock(&BLAS_LOCK);
        waits::queued();
        // SAFETY: the caller's contract; sizes as cuBLAS's column-major view of the row-major data.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                self.blas,
                op(cm.trans_first, g.cb),
                op(cm.trans_second, g.ca),
                m,
                n,
                k,
                alpha,
                cm.first as *const c_void,
                ty,
                ld_first,
                cm.second as *const c_void,
                ty,
                ld_second,
                beta,
                g.c as *mut c_void,
                ty,
                ldc,
                compute,
                cublas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| format!("cublasGemmEx: {e:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// BLAS's column-major `gemm` by its definition: `C = op(A) op(B)` with `op(A)` m x k.
    #[allow(clippy::too_many_arguments)]
    fn blas_gemm(
        ta: bool,
        tb: bool,
        m: usize,
        n: usize,
        k: usize,
        a: &[f64],
        lda: usize,
        b: &[f64],
        ldb: usize,
        c: &mut [f64],
        ldc: usize,
    ) {
        for j in 0..n {
            for i in 0..m {
                let mut acc = 0.0;
                for l in 0..k {
                    let av = if ta { a[l + i * lda] } else { a[i + l * lda] };
                    let bv = if tb { b[j + l * ldb] } else { b[l + j * ldb] };
                    acc += av * bv;
                }
                c[i + j * ldc] = acc;
            }
        }
    }

    #[test]
    fn the_row_major_product_maps_to_blas_column_major_arguments() {
        let (m, n, k) = (3usize, 4usize, 5usize);
        let value = |i: usize| (i * 7 % 11) as f64 - 5.0;
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            // Row-major operands: a is [m, k] (or [k, m] when ta), b is [k, n] (or [n, k]).
            let a: Vec<f64> = (0..m * k).map(value).collect();
            let b: Vec<f64> = (0..k * n).map(|i| value(i + 3)).collect();
            let at = |i: usize, l: usize| if ta { a[l * m + i] } else { a[i * k + l] };
            let bt = |l: usize, j: usize| if tb { b[j * k + l] } else { b[l * n + j] };
            let want: Vec<f64> = (0..m * n)
                .map(|ij| (0..k).map(|l| at(ij / n, l) * bt(l, ij % n)).sum())
                .collect();
            let g = Gemm {
                dtype: DType::F64,
                ta,
                tb,
                m,
                n,
                k,
                a: 1,
                b: 2,
                c: 3,
                bias: None,
                ca: false,
                cb: false,
            };
            let cm = ColumnMajor::of(&g);
            let (first, second) = match (cm.first, cm.second) {
                (2, 1) => (&b, &a),
                other => panic!("operands {other:?}"),
            };
            let mut c = vec![0.0; m * n];
            blas_gemm(
                cm.trans_first,
                cm.trans_second,
                cm.m,
                cm.n,
                cm.k,
                first,
                cm.ld_first,
                second,
                cm.ld_second,
                &mut c,
                cm.ldc,
            );
            assert_eq!(c, want, "ta {ta} tb {tb}");
        }
        let empty = ColumnMajor::of(&Gemm {
            dtype: DType::F32,
            ta: false,
            tb: false,
            m: 2,
            n: 3,
            k: 0,
            a: 1,
            b: 2,
            c: 3,
            bias: None,
            ca: false,
            cb: false,
        });
        assert_eq!((empty.ld_first, empty.ld_second, empty.ldc), (3, 1, 3));
    }

    #[test]
    fn staged_uploads_fill_the_buffer_front_to_back_and_wait_only_when_it_is_full() {
        let mut st = Staging {
            base: core::ptr::null_mut(),
            used: 0,
            unpinned: false,
        };
        assert_eq!(st.take(100), 0);
        assert_eq!(st.take(28), 100);
        assert!(st.fits(STAGING_BYTES - 128));
        assert_eq!(st.take(STAGING_BYTES - 128), 128);
        assert!(!st.fits(1), "full: the upload waits first");
        st.emptied(); // after the wait
        assert_eq!(st.take(1), 0);
        assert!(st.fits(STAGING_BYTES - 1) && !st.fits(STAGING_BYTES));
    }

    #[test]
    fn the_cache_buckets_small_sizes_by_512_bytes_and_large_by_2_mib() {
        assert_eq!(bucket(0), 512);
        assert_eq!(bucket(1), 512);
        assert_eq!(bucket(513), 1024);
        assert_eq!(bucket(1 << 20), 1 << 20);
        assert_eq!(bucket((1 << 20) + 1), 2 << 20);
        assert_eq!(bucket(5 << 20), 6 << 20);
    }
}
