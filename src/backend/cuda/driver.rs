//! What the GPU backend asks of a device, as one object-safe trait with two implementations:
//! [`Cuda`] (`nvidia.rs`: the NVIDIA driver and cuBLAS through cudarc, loaded at run time) and
//! [`Host`] (`host.rs`: the same kernels compiled for the CPU with the launch emulation of
//! `host_prelude.h`, loaded from a shared library that [`emulator::build`](super::emulator::build)
//! makes). Every byte the backend moves and every launch it makes goes through this trait, so
//! under the emulation the whole backend (storage, argument marshalling, launch configuration, the
//! kernels themselves) runs in CI without a GPU; only `nvidia.rs` needs one. Also here: which
//! driver a process starts, device failures as values, and the block cache both drivers share.
//!
//! Device pointers are `u64` (a `CUdeviceptr`, or a host address under the emulation). Launch
//! arguments are cuLaunchKernel's `kernelParams`: one pointer to each argument's value.

use core::ffi::c_void;
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Mutex, OnceLock};

use super::host::Host;
use super::nvidia::Cuda;
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

/// One kernel of kernels.cu, named by static parts (`sum_partial` for `f16` is `sum_partial_f16`,
/// the cast from `bf16` to `f32` is `cast_bf16_f32`): a launch formats no string, and the NVIDIA
/// driver looks its function up by this key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Kernel {
    base: &'static str,
    ty: &'static str,
    to: Option<&'static str>,
}

impl Kernel {
    /// Kernel `base` for the element type (or size class) `ty`.
    pub(crate) const fn new(base: &'static str, ty: &'static str) -> Kernel {
        Kernel { base, ty, to: None }
    }
    /// The cast from `from` to `to`.
    pub(crate) const fn cast(from: &'static str, to: &'static str) -> Kernel {
        Kernel {
            base: "cast",
            ty: from,
            to: Some(to),
        }
    }
}

impl core::fmt::Display for Kernel {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}_{}", self.base, self.ty)?;
        match self.to {
            Some(to) => write!(f, "_{to}"),
            None => Ok(()),
        }
    }
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
    /// Host to device, queued behind the work before it: `src` may be reused as soon as this
    /// returns, and the host does not wait for the device (the NVIDIA driver stages the bytes in
    /// pinned memory, and waits only when that is full; a copy from pageable memory would wait for
    /// every queued kernel first).
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
    /// Launches `kernel` on `grid` blocks of `block` threads.
    ///
    /// # Safety
    /// `args` points to values of exactly the kernel's parameter types, and the pointers among
    /// them to device memory the kernel may read and write.
    unsafe fn launch(
        &self,
        kernel: Kernel,
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
    /// Runs `f` with this driver's CUDA context current, for another CUDA library (NCCL) working
    /// on nbit's memory and stream; the emulation, which has no GPU, returns an error instead.
    #[cfg_attr(not(feature = "mpi"), allow(dead_code))]
    fn with_context(&self, f: &mut dyn FnMut() -> Result<(), String>) -> Result<(), String>;
}

/// Counts the host's waits for the device, the cost a training step should pay once. What counts:
/// a copy to the host or a synchronisation by a thread that queued work (a launch, a copy, a
/// product) since its own last wait. Per thread, so what one thread's code costs is not mixed with
/// another's (a thread's wait also waits for other threads' work on the legacy stream, uncounted).
/// Both drivers count their copies and launches the same way, so a test on the emulation counts
/// what a GPU waits for, except one case the emulation never meets: more than 4 MiB uploaded
/// between two waits fills the NVIDIA driver's staging buffer, which then waits (counted there).
pub(super) mod waits {
    use core::cell::Cell;

    std::thread_local! {
        static QUEUED: Cell<bool> = const { Cell::new(false) };
        static COUNT: Cell<u64> = const { Cell::new(0) };
    }

    /// Work (a launch, a copy, a product) was queued.
    pub(in super::super) fn queued() {
        QUEUED.with(|q| q.set(true));
    }
    /// The host waited for everything queued so far.
    pub(in super::super) fn waited() {
        if QUEUED.with(|q| q.replace(false)) {
            COUNT.with(|c| c.set(c.get() + 1));
        }
    }
    pub(in super::super) fn count() -> u64 {
        COUNT.with(Cell::get)
    }
}

/// The environment variable that picks the GPU by its CUDA index (default 0; as
/// `CUDA_VISIBLE_DEVICES` numbers them). One GPU per process for now.
pub const DEVICE_ENV: &str = "NBIT_CUDA_DEVICE";

/// The device index [`DEVICE_ENV`] asks for; when unset, the process's rank on its machine under
/// an MPI launcher (so that data-parallel ranks take a GPU each), else 0.
fn device_ordinal(value: Option<&str>) -> Result<usize, Error> {
    match value.map(str::trim) {
        None | Some("") => Ok(crate::strategy::local_rank().unwrap_or(0)),
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

/// How many times this thread has waited for the GPU to finish work it queued: copies to the host
/// (a loss's value, the scaler's skip decision, a gradient norm) and [`synchronize`]; a copy to
/// the GPU waits only when more than 4 MiB go up between two waits (or where pinned memory cannot
/// be had). An optimizer step of `Trainer::fit` waits once, twice when it clips by norm. For
/// profiling and tests: compare two readings.
pub fn host_waits() -> u64 {
    waits::count()
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
pub(super) struct Blocks {
    /// The size of every live block.
    live: Mutex<HashMap<u64, usize>>,
    /// Freed blocks by size.
    free: Mutex<HashMap<usize, Vec<u64>>>,
}

impl Blocks {
    /// A kept block of `size` bytes, live again, if there is one.
    pub(super) fn reuse(&self, size: usize) -> Option<u64> {
        let ptr = lock(&self.free).get_mut(&size).and_then(Vec::pop)?;
        self.record(ptr, size);
        Some(ptr)
    }
    /// Records a new block of `size` bytes as live.
    pub(super) fn record(&self, ptr: u64, size: usize) {
        lock(&self.live).insert(ptr, size);
    }
    /// Keeps a live block for reuse (a pointer that is not live is ignored).
    pub(super) fn release(&self, ptr: u64) {
        if let Some(size) = lock(&self.live).remove(&ptr) {
            lock(&self.free).entry(size).or_default().push(ptr);
        }
    }
    /// Takes every kept block (to give them back to the driver).
    pub(super) fn drain(&self) -> Vec<u64> {
        lock(&self.free).drain().flat_map(|(_, v)| v).collect()
    }
}

/// A mutex's contents, also after a panic elsewhere poisoned it (every value here stays valid).
pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_names_are_kernels_cu_names() {
        assert_eq!(Kernel::new("sum_partial", "f16").to_string(), "sum_partial_f16");
        assert_eq!(Kernel::cast("bf16", "f32").to_string(), "cast_bf16_f32");
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
}
