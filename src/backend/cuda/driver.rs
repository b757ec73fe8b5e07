//! What the GPU backend asks of a device, as one object-safe trait with two implementations:
//! [`Cuda`] (the NVIDIA driver and cuBLAS through cudarc, loaded at run time) and [`Host`] (the
//! same kernels compiled for the CPU with the launch emulation of `host_prelude.h`, loaded from a
//! shared library that [`emulator::build`](super::emulator::build) makes). Every byte the backend
//! moves and every launch it makes goes through this trait, so under the emulation the whole
//! backend (storage, argument marshalling, launch configuration, the kernels themselves) runs in CI
//! without a GPU; only this file's [`Cuda`] half needs one.
//!
//! Device pointers are `u64` (a `CUdeviceptr`, or a host address under the emulation). Launch
//! arguments are cuLaunchKernel's `kernelParams`: one pointer to each argument's value.

use core::ffi::c_void;
use std::collections::HashMap;
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use crate::dtype::DType;
use crate::error::Error;

/// One GEMM, row-major: `c[m, n] = op(a) @ op(b) (+ bias[n] in every row)`, where `op` transposes
/// `a` (stored `[k, m]`) when `ta` and `b` (stored `[n, k]`) when `tb`. Operands of 16-bit types
/// accumulate in f32; the bias is added before the single rounding. When `bias` is given, `c`
/// already holds it in every row (cuBLAS adds it with beta = 1; the emulation reads `bias`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Gemm {
    pub dtype: DType,
    pub ta: bool,
    pub tb: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: u64,
    pub b: u64,
    pub c: u64,
    pub bias: Option<u64>,
    /// Conjugate `a` (complex only; only together with `ta`: a conjugate transpose).
    pub ca: bool,
    /// Conjugate `b` (as `ca`).
    pub cb: bool,
}

/// A device the GPU backend can run on. Errors are the driver's words.
pub(crate) trait Driver: Send + Sync {
    /// What runs the kernels, for messages and the quickstart's table.
    fn describe(&self) -> String;
    /// The CUDA index of the device (0 under the emulation).
    fn ordinal(&self) -> usize;
    /// Threads per block of the element-wise and reduction kernels (a multiple of 32).
    fn block(&self) -> u32;
    /// The most blocks one launch uses (the kernels loop over the rest).
    fn max_blocks(&self) -> u32;
    /// `bytes` of device memory (at least one byte is allocated for 0).
    fn alloc(&self, bytes: usize) -> Result<u64, String>;
    /// Frees what `alloc` returned.
    ///
    /// # Safety
    /// `ptr` came from this driver's `alloc` and is not used afterwards.
    unsafe fn free(&self, ptr: u64);
    /// Host to device.
    ///
    /// # Safety
    /// `dst` holds at least `src.len()` bytes.
    unsafe fn upload(&self, dst: u64, src: &[u8]) -> Result<(), String>;
    /// Device to host (waits for the work before it).
    ///
    /// # Safety
    /// `src` holds at least `dst.len()` bytes.
    unsafe fn download(&self, dst: &mut [u8], src: u64) -> Result<(), String>;
    /// Device to device.
    ///
    /// # Safety
    /// Both hold at least `bytes` bytes.
    unsafe fn copy(&self, dst: u64, src: u64, bytes: usize) -> Result<(), String>;
    /// Launches kernel `name` of kernels.cu on `grid` blocks of `block` threads.
    ///
    /// # Safety
    /// `args` points to values of exactly the kernel's parameter types, and the pointers among
    /// them to device memory the kernel may read and write.
    unsafe fn launch(
        &self,
        name: &str,
        grid: (u32, u32),
        block: u32,
        args: &mut [*mut c_void],
    ) -> Result<(), String>;
    /// Waits for every launch and copy before it.
    fn synchronize(&self) -> Result<(), String>;
    /// One matrix product (see [`Gemm`]).
    ///
    /// # Safety
    /// The pointers hold the operands of the sizes `g` gives.
    unsafe fn gemm(&self, g: &Gemm) -> Result<(), String>;
}

/// The environment variable that picks the GPU by its CUDA index (default 0; as
/// `CUDA_VISIBLE_DEVICES` numbers them). One GPU per process for now.
pub const DEVICE_ENV: &str = "NBIT_CUDA_DEVICE";

/// The device index [`DEVICE_ENV`] asks for: 0 when unset.
fn device_ordinal(value: Option<&str>) -> Result<usize, Error> {
    match value.map(str::trim) {
        None | Some("") => Ok(0),
        Some(v) => v.parse().map_err(|_| Error::InvalidArgument {
            name: DEVICE_ENV,
            value: format!("'{v}'"),
            expected: "a CUDA device index: 0, 1, ...",
        }),
    }
}

/// The environment variable that points the GPU backend at the host emulation's library instead
/// of a GPU (what [`emulator::build`](super::emulator::build) returns).
pub const EMULATOR_ENV: &str = "NBIT_CUDA_EMULATOR";

/// The driver, once one has started; a failed start is not kept, so a later call (or
/// [`use_emulator`]) may succeed.
static DRIVER: OnceLock<&'static dyn Driver> = OnceLock::new();
/// Serialises starts.
static STARTING: Mutex<()> = Mutex::new(());

/// The driver of this process, started on first use: the emulation when [`EMULATOR_ENV`] names
/// its library (or [`use_emulator`] came first), else the NVIDIA driver.
pub(crate) fn driver() -> Result<&'static dyn Driver, Error> {
    if let Some(&d) = DRIVER.get() {
        return Ok(d);
    }
    start(|| match std::env::var_os(EMULATOR_ENV) {
        Some(path) => Host::load(Path::new(&path)).map(|h| Box::new(h) as Box<dyn Driver>),
        None => device_ordinal(std::env::var(DEVICE_ENV).ok().as_deref())
            .and_then(Cuda::start)
            .map(|c| Box::new(c) as Box<dyn Driver>),
    })
}

fn start(make: impl FnOnce() -> Result<Box<dyn Driver>, Error>) -> Result<&'static dyn Driver, Error> {
    let _one = lock(&STARTING);
    if let Some(&d) = DRIVER.get() {
        return Ok(d);
    }
    // The driver lives as long as the process (storages free through it when they drop).
    let d: &'static dyn Driver = Box::leak(make()?);
    let _ = DRIVER.set(d);
    Ok(d)
}

/// Runs this process's GPU backend on the host emulation in `library` (built by
/// [`emulator::build`](super::emulator::build)) instead of a GPU: slow, but the same kernel source,
/// so code written for `Gpu` can be tested on a machine without one. An error if a GPU (or another
/// emulation library) already started in this process.
pub fn use_emulator(library: &Path) -> Result<(), Error> {
    let d = start(|| Host::load(library).map(|h| Box::new(h) as Box<dyn Driver>))?;
    if d.describe() == Host::describe_path(library) {
        Ok(())
    } else {
        Err(Error::DeviceUnavailable {
            device: "gpu",
            reason: format!("this process already runs its GPU backend on {}", d.describe()),
        })
    }
}

/// Waits until the GPU has finished all work queued so far (for timing; every copy to the host
/// waits anyway).
pub fn synchronize() -> Result<(), Error> {
    driver()?.synchronize().map_err(|reason| Error::DeviceFailed {
        device: "gpu",
        op: "synchronize",
        reason,
    })
}

/// What runs the GPU backend in this process ("NVIDIA H200 (sm_90) ..." or the emulation), or why
/// nothing can.
pub fn describe() -> Result<String, Error> {
    driver().map(|d| d.describe())
}

// ---- failures inside kernels --------------------------------------------------------------------

/// A GPU failure inside an operation whose signature cannot return one ([`Backend`]'s methods are
/// infallible, as the CPU's are): it unwinds to [`catch`], which turns it into
/// [`Error::DeviceFailed`]. Outside `catch` it is an ordinary panic with the same message.
///
/// [`Backend`]: crate::backend::Backend
struct DeviceFailure(Error);

std::thread_local! {
    static CATCHING: core::cell::Cell<u32> = const { core::cell::Cell::new(0) };
}

pub(crate) fn fail(op: &'static str, reason: String) -> ! {
    let e = Error::DeviceFailed {
        device: "gpu",
        op,
        reason,
    };
    if CATCHING.with(|c| c.get()) > 0 {
        // Skips the panic hook: `catch` reports it as an `Err`.
        std::panic::resume_unwind(Box::new(DeviceFailure(e)))
    }
    panic!("{e}")
}

/// Runs `f`, turning a GPU failure inside it into `Err` (other panics go on unwinding).
pub(crate) fn catch<T>(f: impl FnOnce() -> Result<T, Error>) -> Result<T, Error> {
    CATCHING.with(|c| c.set(c.get() + 1));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    CATCHING.with(|c| c.set(c.get() - 1));
    match r {
        Ok(r) => r,
        Err(payload) => match payload.downcast::<DeviceFailure>() {
            Ok(failure) => Err(failure.0),
            Err(other) => std::panic::resume_unwind(other),
        },
    }
}

// ---- device blocks ------------------------------------------------------------------------------

/// The blocks a driver has handed out, by size, and the freed ones it keeps to hand out again
/// (with whatever they held) before asking for more: both drivers' caching allocator.
#[derive(Default)]
struct Blocks {
    /// The size of every live block.
    live: Mutex<HashMap<u64, usize>>,
    /// Freed blocks by size.
    free: Mutex<HashMap<usize, Vec<u64>>>,
}

impl Blocks {
    /// A kept block of `size` bytes, live again, if there is one.
    fn reuse(&self, size: usize) -> Option<u64> {
        let ptr = lock(&self.free).get_mut(&size).and_then(Vec::pop)?;
        self.record(ptr, size);
        Some(ptr)
    }
    /// Records a new block of `size` bytes as live.
    fn record(&self, ptr: u64, size: usize) {
        lock(&self.live).insert(ptr, size);
    }
    /// Keeps a live block for reuse (a pointer that is not live is ignored).
    fn release(&self, ptr: u64) {
        if let Some(size) = lock(&self.live).remove(&ptr) {
            lock(&self.free).entry(size).or_default().push(ptr);
        }
    }
    /// Takes every kept block (to give them back to the driver).
    fn drain(&self) -> Vec<u64> {
        lock(&self.free).drain().flat_map(|(_, v)| v).collect()
    }
}

/// A mutex's contents, also after a panic elsewhere poisoned it (every value here stays valid).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// ---- the host emulation ---------------------------------------------------------------------------

type HostLaunch = unsafe extern "C" fn(*const core::ffi::c_char, u32, u32, u32, *mut *mut c_void) -> i32;

/// The kernels compiled for the host (see the module docs).
struct Host {
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
    fn load(path: &Path) -> Result<Host, Error> {
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
    fn describe_path(path: &Path) -> String {
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
        // SAFETY: the caller's contract; host memory on both sides.
        unsafe { core::ptr::copy_nonoverlapping(src.as_ptr(), dst as *mut u8, src.len()) };
        Ok(())
    }
    unsafe fn download(&self, dst: &mut [u8], src: u64) -> Result<(), String> {
        // SAFETY: as `upload`.
        unsafe { core::ptr::copy_nonoverlapping(src as *const u8, dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }
    unsafe fn copy(&self, dst: u64, src: u64, bytes: usize) -> Result<(), String> {
        // SAFETY: as `upload` (`copy` allows overlap).
        unsafe { core::ptr::copy(src as *const u8, dst as *mut u8, bytes) };
        Ok(())
    }
    unsafe fn launch(
        &self,
        name: &str,
        grid: (u32, u32),
        block: u32,
        args: &mut [*mut c_void],
    ) -> Result<(), String> {
        let c = CString::new(name).map_err(|e| e.to_string())?;
        // SAFETY: the caller's contract; the launch is synchronous.
        match unsafe { (self.launch)(c.as_ptr(), grid.0, grid.1, block, args.as_mut_ptr()) } {
            0 => Ok(()),
            _ => Err(format!("the emulation has no kernel '{name}' (rebuild it)")),
        }
    }
    fn synchronize(&self) -> Result<(), String> {
        Ok(())
    }
    unsafe fn gemm(&self, g: &Gemm) -> Result<(), String> {
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

// ---- the NVIDIA driver ----------------------------------------------------------------------------

use cudarc::cublas::sys as cublas_sys;
use cudarc::driver::{result as cu, sys as cu_sys};

/// A GPU through the CUDA driver API and cuBLAS (both loaded at run time by cudarc).
struct Cuda {
    ordinal: usize,
    name: String,
    arch: String,
    ctx: cu_sys::CUcontext,
    module: cu_sys::CUmodule,
    functions: Mutex<HashMap<String, usize>>,
    blas: cublas_sys::cublasHandle_t,
    blocks: u32,
    /// Allocations by bucketed size, freed ones reused before asking the driver (cuMemFree
    /// synchronises the device, and cuMemAlloc costs as much as a small kernel). Every launch and
    /// copy is on the legacy stream, in order, so a block freed by one op is safe for the next.
    memory: Blocks,
}

/// An allocation's size as the cache buckets it: multiples of 512 bytes up to 1 MiB, of 2 MiB
/// above.
fn bucket(bytes: usize) -> usize {
    let step = if bytes <= 1 << 20 { 512 } else { 2 << 20 };
    bytes.max(1).div_ceil(step) * step
}

// SAFETY: the context, module and cuBLAS handle are process-wide driver objects; every call makes
// the context current first, and cuBLAS calls are serialised by `blas_lock`.
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
    fn start(ordinal: usize) -> Result<Cuda, Error> {
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

    fn function(&self, name: &str) -> Result<cu_sys::CUfunction, String> {
        let mut f = lock(&self.functions);
        if let Some(&p) = f.get(name) {
            return Ok(p as cu_sys::CUfunction);
        }
        // SAFETY: the module loaded in `start`.
        let func =
            unsafe { cu::module::get_function(self.module, CString::new(name).map_err(|e| e.to_string())?) }
                .map_err(|e| format!("kernel '{name}': {}", words(e)))?;
        f.insert(name.to_owned(), func as usize);
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
        // SAFETY: the caller's contract.
        unsafe { cu::memcpy_htod_sync(dst, src) }.map_err(words)
    }
    unsafe fn download(&self, dst: &mut [u8], src: u64) -> Result<(), String> {
        let _current = self.current()?;
        // SAFETY: the caller's contract; synchronous on the legacy stream, after every launch.
        unsafe { cu::memcpy_dtoh_sync(dst, src) }.map_err(words)
    }
    unsafe fn copy(&self, dst: u64, src: u64, bytes: usize) -> Result<(), String> {
        let _current = self.current()?;
        // SAFETY: the caller's contract.
        unsafe { cu::memcpy_dtod_sync(dst, src, bytes) }.map_err(words)
    }
    unsafe fn launch(
        &self,
        name: &str,
        grid: (u32, u32),
        block: u32,
        args: &mut [*mut c_void],
    ) -> Result<(), String> {
        let _current = self.current()?;
        let f = self.function(name)?;
        // SAFETY: the caller's contract; the null stream orders every launch and copy.
        unsafe { cu::launch_kernel(f, (grid.0, grid.1, 1), (block, 1, 1), 0, cu::stream::null(), args) }
            .map_err(words)
    }
    fn synchronize(&self) -> Result<(), String> {
        let _current = self.current()?;
        cu::ctx::synchronize().map_err(words)
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
    fn the_device_index_comes_from_nbit_cuda_device() {
        assert_eq!(device_ordinal(None).unwrap(), 0);
        assert_eq!(device_ordinal(Some(" 1 ")).unwrap(), 1);
        let msg = device_ordinal(Some("gpu1")).unwrap_err().to_string();
        assert!(
            msg.contains("NBIT_CUDA_DEVICE") && msg.contains("'gpu1'") && msg.contains("0, 1"),
            "{msg}"
        );
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

    #[test]
    fn a_failure_is_an_err_inside_catch_and_a_panic_outside() {
        let r: Result<(), Error> = catch(|| fail("matmul", "CUDA_ERROR_OUT_OF_MEMORY".into()));
        let msg = r.unwrap_err().to_string();
        assert_eq!(
            msg,
            "accelerator 'gpu' failed during matmul: CUDA_ERROR_OUT_OF_MEMORY"
        );
        let outside = std::panic::catch_unwind(|| fail("sum", "launch failed".into()));
        let payload = outside.unwrap_err();
        assert_eq!(
            payload.downcast_ref::<String>().map(String::as_str),
            Some("accelerator 'gpu' failed during sum: launch failed")
        );
        // Other panics pass through `catch` unchanged.
        let other = std::panic::catch_unwind(|| catch::<()>(|| panic!("not a device failure")));
        assert!(other.is_err());
    }

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
