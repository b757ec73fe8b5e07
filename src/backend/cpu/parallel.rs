//! How many threads the CPU kernels use, and the one way they split work across them.
//!
//! The count is, in order: the last [`set_num_threads`] (the Trainer's `num_threads` option),
//! the `NBIT_NUM_THREADS` environment variable, or the cores available to the process. Work runs
//! on rayon's global pool (the pool the `gemm-f32` / `gemm-f64` kernels already use), so no thread is spawned per
//! call.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::error::Error;

/// 0: not set by the program; the environment or the core count decides.
static SET: AtomicUsize = AtomicUsize::new(0);

/// The environment variable that sets the thread count (as PyTorch's `OMP_NUM_THREADS`).
pub const THREADS_ENV: &str = "NBIT_NUM_THREADS";

/// Reads `NBIT_NUM_THREADS`: `None` when unset or empty, an error naming the value when it is
/// not a whole number of at least 1.
pub fn threads_from_env() -> Result<Option<usize>, Error> {
    match std::env::var(THREADS_ENV) {
        Ok(v) if v.trim().is_empty() => Ok(None),
        Ok(v) => match v.trim().parse::<usize>() {
            Ok(n) if n >= 1 => Ok(Some(n)),
            _ => Err(Error::InvalidArgument {
                name: THREADS_ENV,
                value: v,
                expected: "a whole number of threads of at least 1 (unset it to use every core)",
            }),
        },
        Err(_) => Ok(None),
    }
}

/// The threads the CPU kernels use now (at least 1).
pub fn num_threads() -> usize {
    match SET.load(Ordering::Relaxed) {
        0 => default_threads(),
        n => n,
    }
}

/// Sets the threads the CPU kernels use from now on in this process; 0 goes back to the default
/// (`NBIT_NUM_THREADS`, else every core available).
pub fn set_num_threads(n: usize) {
    SET.store(n, Ordering::Relaxed);
}

/// `NBIT_NUM_THREADS` when valid, else the cores available; asked of the operating system once
/// (on Linux the answer reads cgroup files, which cost more than a small kernel).
fn default_threads() -> usize {
    static DEFAULT: OnceLock<usize> = OnceLock::new();
    *DEFAULT.get_or_init(|| {
        threads_from_env()
            .ok()
            .flatten()
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    })
}

/// Asks the C allocator to keep memory that a training step frees for the next step, instead of
/// returning it to the operating system (and faulting it back in, page by page, at the next
/// step). A step allocates and frees the same large buffers every time; with glibc's defaults
/// (dynamic mmap threshold, heap trimming) that churn cost about a third of the step time of a
/// 784-1024-1024-10 MLP under bf16-mixed on the development machine. Once per process; glibc on
/// Linux only (elsewhere the allocator is left alone). The memory kept is what one step used
/// at its peak, which the next step needs again.
pub fn retain_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            unsafe extern "C" {
                fn mallopt(param: i32, value: i32) -> i32;
            }
            // glibc's malloc.h: M_TRIM_THRESHOLD -1, M_MMAP_THRESHOLD -3. Blocks up to 32 MiB
            // (glibc's largest threshold) come from the heap; the heap top is trimmed only past
            // 1 GiB of free memory.
            // SAFETY: `mallopt` is glibc's, linked by std on this target; it takes the
            // allocator's lock and only changes tuning parameters.
            unsafe {
                mallopt(-3, 32 << 20);
                mallopt(-1, 1 << 30);
            }
        });
    }
}

/// Element count below which an element-wise kernel runs on one thread: waking a pool thread
/// and waiting for it costs tens of microseconds on a shared 2-core machine, about what one core
/// takes to stream this many elements.
pub(crate) const PARALLEL_MIN_ELEMENTS: usize = 1 << 18;

/// Products with fewer multiply-adds than this run on the calling thread only (about 30 us of
/// one core's work). Measured with bench_mlp on the 64-128-128-10 MLP, batch 64: with 2^19
/// the small products went to two threads and training ran at 155k samples/s against 282k on
/// one thread.
pub(crate) const PARALLEL_MIN_FMAS: usize = 1 << 22;

/// Runs `f(start..end)` over `0..len` split into at most [`num_threads`] contiguous ranges whose
/// boundaries are multiples of `align` (the last may be shorter); one range, on the calling
/// thread, when `len < min_len` or one thread is set.
pub(crate) fn for_ranges(len: usize, min_len: usize, align: usize, f: impl Fn(usize, usize) + Sync) {
    for_ranges_with(num_threads(), len, min_len, align, f)
}

/// [`for_ranges`] over a given number of threads.
pub(crate) fn for_ranges_with(
    threads: usize,
    len: usize,
    min_len: usize,
    align: usize,
    f: impl Fn(usize, usize) + Sync,
) {
    let align = align.max(1);
    let units = len.div_ceil(align);
    let parts = threads.min(units).max(1);
    if parts == 1 || len < min_len {
        f(0, len);
        return;
    }
    let per = units.div_ceil(parts) * align;
    rayon::scope(|s| {
        let f = &f;
        let mut start = per;
        while start < len {
            let end = (start + per).min(len);
            s.spawn(move |_| f(start, end));
            start = end;
        }
        f(0, per.min(len));
    });
}

/// A mutable slice shared by threads that each take a different range of it (the ranges of
/// [`for_ranges`]).
pub(crate) struct Disjoint<'a, T> {
    ptr: *mut T,
    len: usize,
    _borrow: core::marker::PhantomData<&'a mut [T]>,
}

// SAFETY: a `Disjoint` hands out `&mut` sub-slices only through `range`, whose caller promises
// they do not overlap; moving those to other threads is as safe as sending `&mut [T]`.
unsafe impl<T: Send> Send for Disjoint<'_, T> {}
unsafe impl<T: Send> Sync for Disjoint<'_, T> {}

impl<'a, T> Disjoint<'a, T> {
    pub(crate) fn new(s: &'a mut [T]) -> Self {
        Disjoint {
            ptr: s.as_mut_ptr(),
            len: s.len(),
            _borrow: core::marker::PhantomData,
        }
    }

    /// Elements `lo..hi`.
    ///
    /// # Safety
    /// No two slices returned by one `Disjoint` and alive at the same time overlap.
    pub(crate) unsafe fn range(&self, lo: usize, hi: usize) -> &'a mut [T] {
        assert!(lo <= hi && hi <= self.len, "range {lo}..{hi} of {}", self.len);
        // SAFETY: inside the borrowed slice (asserted); exclusive by the caller's promise.
        unsafe { core::slice::from_raw_parts_mut(self.ptr.add(lo), hi - lo) }
    }
}

/// `f(offset, part)` over disjoint parts of `out` on up to [`num_threads`] threads, each part
/// starting at a multiple of `align`; on the calling thread alone below `min_len` elements.
pub(crate) fn par_parts<T: Send>(
    out: &mut [T],
    min_len: usize,
    align: usize,
    f: impl Fn(usize, &mut [T]) + Sync,
) {
    let len = out.len();
    let shared = Disjoint::new(out);
    // SAFETY: `for_ranges` passes disjoint ranges.
    for_ranges(len, min_len, align, |lo, hi| {
        f(lo, unsafe { shared.range(lo, hi) })
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_cover_the_length_once_on_aligned_boundaries() {
        for len in [0usize, 1, 7, 100, 1000, 70_000] {
            let seen = std::sync::Mutex::new(Vec::new());
            for_ranges(len, 0, 16, |a, b| seen.lock().unwrap().push((a, b)));
            let mut v = seen.into_inner().unwrap();
            v.sort();
            let mut at = 0;
            for (a, b) in v {
                assert_eq!(a, at);
                assert!(a % 16 == 0 && b > a || len == 0);
                at = b;
            }
            assert_eq!(at, len);
        }
    }
}
