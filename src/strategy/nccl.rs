//! `Ddp<Nccl>`: gradients summed on the GPUs by NCCL, ranks started and NCCL's id exchanged by MPI.
//!
//! Built with features `cuda` and `mpi`; NCCL itself (`libnccl.so.2`) is loaded at run time.
//! Written against NCCL's API, never run here (no machine with two GPUs has been lent):
//! `tools/gpu-check.sh` has the two-GPU check.

use std::sync::Mutex;

use cudarc::nccl::{result, sys};

use super::comm::DeviceSum;
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

/// Rank 0 asks NCCL for an id, `broadcast` gives it to every rank (over MPI), and each rank joins
/// the communicator with it.
pub(super) fn connect(rank: usize, size: usize, broadcast: impl FnOnce(&mut [u8])) -> Result<Nccl, Error> {
    let gpu = driver()?;
    // An emulated GPU has no device memory for NCCL: say so before loading anything.
    gpu.with_context(&mut || Ok(())).map_err(unavailable)?;
    // SAFETY: only looks for the library.
    if !unsafe { sys::is_culib_present() } {
        return Err(unavailable(
            "NCCL (libnccl.so.2) was not found: install it (`pip install nvidia-nccl-cu12`, then put \
             its nvidia/nccl/lib on LD_LIBRARY_PATH), or use `Ddp<Mpi>`, which sums gradients \
             through host memory"
                .into(),
        ));
    }
    let mut id = [0u8; 128];
    if rank == 0 {
        let unique = result::get_uniqueid().map_err(|e| unavailable(format!("ncclGetUniqueId: {e:?}")))?;
        for (b, c) in id.iter_mut().zip(unique.internal) {
            *b = c as u8;
        }
    }
    broadcast(&mut id);
    let unique = sys::ncclUniqueId {
        internal: id.map(|b| b as core::ffi::c_char),
    };
    let (nranks, me) = (
        i32::try_from(size).map_err(|_| unavailable(format!("{size} ranks are more than NCCL takes")))?,
        rank as i32,
    );
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
    fn sum(&self, ptr: u64, count: usize, dtype: DType) -> Result<(), String> {
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
