//! `Ddp<Nccl>`: gradients summed on the GPUs by NCCL, ranks started and NCCL's id exchanged by MPI.
//!
//! Built with features `cuda` and `mpi`; NCCL itself (`libnccl.so.2`) is loaded at run time.
//! Written against NCCL's API, never run here (no machine with two GPUs has been lent):
//! `tools/gpu-check.sh` has the two-GPU check.

use std::sync::Mutex;

use cudarc::nccl::{result, sys};

use super::comm::{DeviceSum, Group};
use crate::backend::cuda::driver::driver;
use crate::dtype::DType;
use crate::error::Error;

/// An NCCL communicator over every rank of the MPI job, on nbit's CUDA context.
pub(super) struct Nccl {
    /// Serialises calls: a communicator is used by one thread at a time.
    comm: Mutex<Comm>,
}

struct Comm(sys::ncclComm_t);

// SAFETY: the communicator is a handle NCCL allows any thread to use, one at a time; the mutex
// above gives that.
unsafe impl Send for Comm {}

fn unavailable(reason: String) -> Error {
    Error::DeviceUnavailable {
        device: "gpu",
        reason: format!("`Ddp<Nccl>` cannot start: {reason}"),
    }
}

/// Every rank checks that it can run NCCL and the ranks agree (one that cannot would leave the
/// others waiting); then rank 0 asks NCCL for an id, broadcasts it over MPI, and each rank joins
/// the communicator with it.
pub(super) fn connect(group: &Group) -> Result<Nccl, Error> {
    let (rank, size) = (group.rank(), group.size());
    let gpu = driver()?;
    // An emulated GPU has no device memory for NCCL; a missing library would panic in cudarc.
    let ready = gpu.with_context(&mut || Ok(())).and_then(|()| {
        // SAFETY: only looks for the library.
        if unsafe { sys::is_culib_present() } {
            Ok(())
        } else {
            Err(
                "NCCL (libnccl.so.2) was not found: install it (`pip install nvidia-nccl-cu12`, then \
                 put its nvidia/nccl/lib on LD_LIBRARY_PATH), or use `Ddp<Mpi>`, which sums \
                 gradients through host memory"
                    .to_string(),
            )
        }
    });
    let mut not_ready = [f64::from(u8::from(ready.is_err()))];
    group.sum(&mut not_ready);
    if let Err(reason) = ready {
        return Err(unavailable(reason));
    }
    if not_ready[0] > 0.0 {
        return Err(unavailable(format!(
            "{} of the {size} ranks cannot run NCCL (their errors say why)",
            not_ready[0]
        )));
    }
    // [status, id...]: rank 0 says whether NCCL gave it an id.
    let mut message = [0u8; 129];
    let mut failed = None;
    if rank == 0 {
        match result::get_uniqueid() {
            Ok(unique) => {
                for (b, c) in message[1..].iter_mut().zip(unique.internal) {
                    *b = c as u8;
                }
            }
            Err(e) => {
                message[0] = 1;
                failed = Some(format!("ncclGetUniqueId: {e:?}"));
            }
        }
    }
    group.broadcast(&mut message);
    if message[0] != 0 {
        return Err(unavailable(failed.unwrap_or_else(|| {
            "rank 0 could not get an id from NCCL (its error says why)".into()
        })));
    }
    let mut internal = [0 as core::ffi::c_char; 128];
    for (c, b) in internal.iter_mut().zip(&message[1..]) {
        *c = *b as core::ffi::c_char;
    }
    let unique = sys::ncclUniqueId { internal };
    let nranks =
        i32::try_from(size).map_err(|_| unavailable(format!("{size} ranks are more than NCCL takes")))?;
    let me = rank as i32;
    let mut comm: sys::ncclComm_t = core::ptr::null_mut();
    gpu.with_context(&mut || {
        // SAFETY: `comm` is written by NCCL; the id is every rank's same 128 bytes.
        unsafe { result::comm_init_rank(&mut comm, nranks, unique, me) }
            .map(|_| ())
            .map_err(|e| format!("ncclCommInitRank (rank {rank} of {size}): {e:?}"))
    })
    .map_err(unavailable)?;
    Ok(Nccl {
        comm: Mutex::new(Comm(comm)),
    })
}

impl DeviceSum for Nccl {
    unsafe fn sum(&self, ptr: u64, count: usize, dtype: DType) -> Result<(), String> {
        let ty = match dtype {
            DType::F32 => sys::ncclDataType_t::ncclFloat32,
            DType::F64 => sys::ncclDataType_t::ncclFloat64,
            DType::F16 => sys::ncclDataType_t::ncclFloat16,
            DType::BF16 => sys::ncclDataType_t::ncclBfloat16,
            other => return Err(format!("NCCL does not sum {other} gradients")),
        };
        let comm = self
            .comm
            .lock()
            .map_err(|_| "the NCCL communicator's lock was poisoned".to_string())?;
        driver().map_err(|e| e.to_string())?.with_context(&mut || {
            // SAFETY: `ptr` holds `count` elements of `dtype` on this rank's GPU (a gradient's
            // storage); in place, on the legacy stream that orders every nbit launch.
            unsafe {
                result::all_reduce(
                    ptr as *const core::ffi::c_void,
                    ptr as *mut core::ffi::c_void,
                    count,
                    ty,
                    sys::ncclRedOp_t::ncclSum,
                    comm.0,
                    core::ptr::null_mut(),
                )
            }
            .map(|_| ())
            .map_err(|e| format!("ncclAllReduce: {e:?}"))
        })
    }
}

impl Drop for Nccl {
    fn drop(&mut self) {
        if let Ok(c) = self.comm.get_mut() {
            // SAFETY: created by comm_init_rank, not used after this.
            let _ = unsafe { result::comm_destroy(c.0) };
        }
    }
}
