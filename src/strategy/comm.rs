//! The process group of a data-parallel run: rank, world size and the few collectives training
//! needs (broadcast the initial parameters, sum gradients, sum a few f64 figures), over MPI.

use std::any::Any;
use std::sync::Mutex;

use ndarray::ArrayD;

use crate::backend::Backend;
use crate::dtype::{DType, Float};
use crate::error::Error;
use crate::tensor::{Parameter, Tensor};

/// How gradients travel between ranks (PyTorch DDP's communication hooks).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum CommHook {
    /// In the dtype the optimizer reads (f32 under mixed precision; 16-bit gradients summed in
    /// f32): the default, and what makes `W = 2` ranks equal one process bit for bit.
    #[default]
    None,
    /// PyTorch's `bf16_compress_hook`: each rank's (already divided) gradient is rounded to bf16,
    /// the ranks' values are summed in bf16 (half the bytes on the wire), and the sum is cast back.
    Bf16Compress,
    /// PyTorch's `fp16_compress_hook`: the same through f16.
    Fp16Compress,
}

impl core::str::FromStr for CommHook {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "none" => Ok(CommHook::None),
            "bf16" | "bf16_compress" => Ok(CommHook::Bf16Compress),
            "fp16" | "fp16_compress" => Ok(CommHook::Fp16Compress),
            _ => Err(Error::InvalidArgument {
                name: "ddp_comm_hook",
                value: format!("'{s}'"),
                expected: "'none', 'bf16_compress' or 'fp16_compress'",
            }),
        }
    }
}

/// The collectives, on host buffers. Every rank calls each in the same order.
trait Collective: Send + Sync {
    /// The sum over ranks of `send` into `sum` (of the same length).
    fn sum_f32(&self, send: &[f32], sum: &mut [f32]);
    fn sum_f64(&self, send: &[f64], sum: &mut [f64]);
    /// Sums 16-bit floats given as bits (`bf16` or f16), each addition rounded to that format.
    fn sum_16(&self, send: &[u16], sum: &mut [u16], bf16: bool);
    /// Rank 0's bytes into every rank's `buf` (parameters, NCCL's id).
    fn broadcast_bytes(&self, buf: &mut [u8]);
    /// Ends every process of the job with `code`.
    fn abort(&self, code: i32) -> !;
}

/// This process's place in a data-parallel job.
pub struct Group {
    rank: usize,
    size: usize,
    comm: Box<dyn Collective>,
    /// One buffer per gradient that the next sum lands in, so steps reuse memory rather than
    /// zero and fault in fresh pages (swapped with the gradient's own buffer after each sum).
    spare: Mutex<Spare>,
    /// Sums gradients where they live, on the GPU (NCCL), when the strategy has one.
    #[cfg(feature = "cuda")]
    device: Option<Box<dyn DeviceSum>>,
}

/// Sums device memory over ranks in place (NCCL's all-reduce).
#[cfg(feature = "cuda")]
pub(crate) trait DeviceSum: Send + Sync {
    /// Sums `count` elements of `dtype` at the device address `ptr` over ranks.
    ///
    /// # Safety
    /// `ptr` is the GPU backend's memory, on this process's device, of at least `count` elements
    /// of `dtype`.
    unsafe fn sum(&self, ptr: u64, count: usize, dtype: DType) -> Result<(), String>;
}

#[derive(Default)]
struct Spare {
    f32: Vec<ArrayD<f32>>,
    f64: Vec<ArrayD<f64>>,
}

impl core::fmt::Debug for Group {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "Group {{ rank: {}, size: {} }}", self.rank, self.size)
    }
}

impl Group {
    /// This process's rank, 0-based.
    pub(crate) fn rank(&self) -> usize {
        self.rank
    }

    /// The number of ranks.
    pub(crate) fn size(&self) -> usize {
        self.size
    }

    /// Sums `values` over ranks in place (losses, counts, flags).
    pub(crate) fn sum(&self, values: &mut [f64]) {
        let send = values.to_vec();
        self.comm.sum_f64(&send, values);
    }

    /// Prints `error` as this rank's and ends the whole job with exit code 2 (MPI_Abort), so no
    /// rank waits for a partner that will not come.
    pub(crate) fn abort(&self, error: &Error) -> ! {
        print_rank_error(self.rank, self.size, error);
        self.comm.abort(2)
    }

    /// Joins a GPU collective (NCCL) over this group's ranks; `connect` may use the group's
    /// collectives (every rank calls it).
    #[cfg(all(feature = "cuda", feature = "mpi"))]
    pub(crate) fn with_device<S: DeviceSum + 'static>(
        mut self,
        connect: impl FnOnce(&Self) -> Result<S, Error>,
    ) -> Result<Self, Error> {
        let device = connect(&self)?;
        self.device = Some(Box::new(device));
        Ok(self)
    }

    /// Rank 0's bytes into every rank's `buf`.
    #[cfg(all(feature = "cuda", feature = "mpi"))]
    pub(crate) fn broadcast(&self, buf: &mut [u8]) {
        self.comm.broadcast_bytes(buf);
    }

    /// Rank 0's parameter values into every rank's parameters, exactly: as f64 bytes (every
    /// element type widens to f64 without rounding, and narrows back to itself).
    pub(crate) fn broadcast_parameters<E: Float, D: Backend>(
        &self,
        params: &mut [&mut Parameter<E, D>],
    ) -> Result<(), Error> {
        for p in params.iter_mut() {
            let shape = p.value().shape().to_vec();
            let mut bytes: Vec<u8> = p
                .value()
                .to_vec()
                .iter()
                .flat_map(|v| v.as_f64().to_le_bytes())
                .collect();
            self.comm.broadcast_bytes(&mut bytes);
            let values = bytes
                .chunks_exact(8)
                .map(|b| E::from_f64(f64::from_le_bytes(b.try_into().unwrap_or_default())))
                .collect();
            p.set(Tensor::from_vec(&shape, values)?)?;
        }
        Ok(())
    }

    /// Sums each gradient over ranks, one parameter at a time (an MLP's layer is a weight and a
    /// bias: bucketing them would save little). `reached_anywhere[i]` says whether some rank has a
    /// gradient for parameter `i`: one no rank reached stays `None`, one that only some ranks
    /// reached counts as zeros on the others. `shapes` are the parameters' shapes.
    ///
    /// f32 and f64 gradients in host memory are summed straight from their storage, with one copy
    /// back; others (16-bit, a GPU's, a compression hook) go through a host copy in f32 or f64.
    pub(crate) fn sum_gradients<E: Float, D: Backend>(
        &self,
        grads: &mut [Option<Tensor<E, D>>],
        shapes: &[Vec<usize>],
        reached_anywhere: &[bool],
        hook: CommHook,
    ) -> Result<(), Error> {
        for (i, ((g, shape), &any)) in grads.iter_mut().zip(shapes).zip(reached_anywhere).enumerate() {
            if !any {
                *g = None;
                continue;
            }
            let t = g.get_or_insert_with(|| Tensor::zeros(shape));
            if hook == CommHook::None
                && (self.sum_on_device::<E, D>(t.storage_mut())? || self.sum_host_storage(t.storage_mut(), i))
            {
                continue;
            }
            let values = t.to_vec();
            let summed: Vec<E> = match hook {
                CommHook::Bf16Compress | CommHook::Fp16Compress => {
                    let bf16 = hook == CommHook::Bf16Compress;
                    let (encode, decode) = wire16(bf16);
                    let bits: Vec<u16> = values.iter().map(|v| encode(v.as_f64())).collect();
                    let mut sum = vec![0; bits.len()];
                    self.comm.sum_16(&bits, &mut sum, bf16);
                    sum.iter().map(|&b| E::from_f32(decode(b))).collect()
                }
                CommHook::None if E::DTYPE == DType::F64 => {
                    let wide: Vec<f64> = values.iter().map(|v| v.as_f64()).collect();
                    let mut sum = vec![0.0; wide.len()];
                    self.comm.sum_f64(&wide, &mut sum);
                    sum.into_iter().map(E::from_f64).collect()
                }
                // 16-bit gradients are summed in f32 and rounded once.
                CommHook::None => {
                    let wide: Vec<f32> = values.iter().map(|v| v.as_f32()).collect();
                    let mut sum = vec![0.0; wide.len()];
                    self.comm.sum_f32(&wide, &mut sum);
                    sum.into_iter().map(E::from_f32).collect()
                }
            };
            *g = Some(Tensor::from_vec(shape, summed)?);
        }
        Ok(())
    }

    /// Sums `storage` on the GPU where the group has a device collective and `storage` is the
    /// GPU backend's; `Ok(false)` otherwise.
    #[allow(unused_variables)]
    fn sum_on_device<E: Float, D: Backend>(&self, storage: &mut D::Storage<E>) -> Result<bool, Error> {
        #[cfg(feature = "cuda")]
        if let Some(device) = &self.device
            && let Some(s) = (storage as &mut dyn Any).downcast_mut::<crate::backend::cuda::GpuStorage<E>>()
        {
            let (ptr, count) = s.device_slice();
            // SAFETY: the storage's own allocation: `count` elements of `E` on this device.
            unsafe { device.sum(ptr, count, E::DTYPE) }.map_err(|reason| Error::DeviceUnavailable {
                device: "gpu",
                reason,
            })?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Sums `storage` over ranks where it is an f32 or f64 array in host memory (the CPU
    /// backend's storage), from the array itself into gradient `slot`'s spare buffer, which then
    /// becomes the array's (no copy). `false` otherwise.
    fn sum_host_storage<S: 'static>(&self, storage: &mut S, slot: usize) -> bool {
        let any = storage as &mut dyn Any;
        let Ok(mut spare) = self.spare.lock() else {
            return false;
        };
        if let Some(a) = any.downcast_mut::<ArrayD<f32>>() {
            return sum_swapping(a, spare_slot(&mut spare.f32, slot), |s, d| {
                self.comm.sum_f32(s, d)
            });
        }
        if let Some(a) = any.downcast_mut::<ArrayD<f64>>() {
            return sum_swapping(a, spare_slot(&mut spare.f64, slot), |s, d| {
                self.comm.sum_f64(s, d)
            });
        }
        false
    }
}

/// `error: rank r of W: ...` on stderr, in one write, so that the launcher does not interleave
/// it with another process's lines.
fn print_rank_error(rank: usize, size: usize, error: &Error) {
    let line = format!("error: rank {rank} of {size}: {error}\n");
    let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
}

/// A 16-bit format as bits: from f64 (rounded once), and to f32 (exact).
type Wire16 = (fn(f64) -> u16, fn(u16) -> f32);

/// The compression hooks' formats: bf16 or f16.
fn wire16(bf16: bool) -> Wire16 {
    if bf16 {
        (
            |v| half::bf16::from_f64(v).to_bits(),
            |b| half::bf16::from_bits(b).to_f32(),
        )
    } else {
        (
            |v| half::f16::from_f64(v).to_bits(),
            |b| half::f16::from_bits(b).to_f32(),
        )
    }
}

fn spare_slot<T: Clone + num_traits::Zero>(spares: &mut Vec<ArrayD<T>>, slot: usize) -> &mut ArrayD<T> {
    if spares.len() <= slot {
        spares.resize_with(slot + 1, || ArrayD::zeros(ndarray::IxDyn(&[0])));
    }
    &mut spares[slot]
}

/// `sum(a's values, spare's)`, then `spare` and `a` trade places (no copy). `false` (nothing
/// done) unless `a` is contiguous in row-major order.
fn sum_swapping<T: Copy + num_traits::Zero>(
    a: &mut ArrayD<T>,
    spare: &mut ArrayD<T>,
    sum: impl FnOnce(&[T], &mut [T]),
) -> bool {
    let Some(values) = a.as_slice() else {
        return false;
    };
    if spare.shape() != a.shape() || !spare.is_standard_layout() {
        *spare = ArrayD::zeros(a.raw_dim());
    }
    let Some(out) = spare.as_slice_mut() else {
        return false;
    };
    sum(values, out);
    std::mem::swap(a, spare);
    true
}

/// Joins the MPI job this process was started in (initialising MPI once per process, finalised
/// at exit); a process started without `mpirun` is a job of one rank.
#[cfg(feature = "mpi")]
pub(crate) fn mpi_group() -> Result<Group, Error> {
    mpi_impl::group()
}

/// Where this process is a rank of a data-parallel job of more than one rank: prints `error` as
/// this rank's and ends the whole job with exit code 2. Otherwise returns.
pub(crate) fn abort_if_distributed(error: &Error) {
    #[cfg(feature = "mpi")]
    mpi_impl::abort_if_distributed(error);
    #[cfg(not(feature = "mpi"))]
    let _ = error;
}

#[cfg(not(feature = "mpi"))]
pub(crate) fn mpi_group() -> Result<Group, Error> {
    Err(Error::InvalidArgument {
        name: "strategy",
        value: "'ddp' (`Ddp<Mpi>`)".into(),
        expected: "a build of nbit with its `mpi` feature (`cargo build --features mpi`, which needs \
                   an MPI library: `apt-get install libopenmpi-dev openmpi-bin libclang-dev`); \
                   without it, train in one process (strategy 'auto')",
    })
}

#[cfg(feature = "mpi")]
mod mpi_impl {
    use std::sync::{Mutex, OnceLock};

    use mpi::collective::{CommunicatorCollectives, Root, SystemOperation, UserOperation};
    use mpi::datatype::{DynBuffer, DynBufferMut};
    use mpi::environment::{Threading, Universe};
    use mpi::topology::{Communicator, SimpleCommunicator};

    use super::{Collective, Group};
    use crate::error::Error;

    /// The universe nbit initialised, finalised by an `atexit` handler: MPI can be initialised
    /// once per process, and a process that exits without finalising fails its job.
    static UNIVERSE: OnceLock<Mutex<Option<Universe>>> = OnceLock::new();

    unsafe extern "C" {
        fn atexit(callback: extern "C" fn()) -> core::ffi::c_int;
    }

    extern "C" fn finalize() {
        if let Some(u) = UNIVERSE.get()
            && let Ok(mut u) = u.lock()
        {
            drop(u.take());
        }
    }

    pub(super) fn group() -> Result<Group, Error> {
        let mut failed = None;
        UNIVERSE.get_or_init(|| {
            if mpi::environment::is_initialized() {
                // The program initialised MPI itself and finalises it.
                return Mutex::new(None);
            }
            match mpi::initialize_with_threading(Threading::Serialized) {
                Some((u, _)) => {
                    // SAFETY: registers a function with no arguments, as `atexit` requires.
                    unsafe { atexit(finalize) };
                    abort_on_panic();
                    Mutex::new(Some(u))
                }
                None => {
                    failed = Some(());
                    Mutex::new(None)
                }
            }
        });
        if failed.is_some() || mpi::environment::is_finalized() {
            return Err(Error::DeviceUnavailable {
                device: "mpi",
                reason: "MPI could not be initialised in this process (or was already finalised); \
                         start the program with `mpirun -np N`"
                    .into(),
            });
        }
        let world = SimpleCommunicator::world();
        Ok(Group {
            rank: world.rank() as usize,
            size: world.size() as usize,
            comm: Box::new(MpiWorld),
            spare: Mutex::default(),
            #[cfg(feature = "cuda")]
            device: None,
        })
    }

    /// A panic on one rank would leave the others waiting in a collective, and its exit would
    /// wait in `MPI_Finalize` for them: after the panic's message, end the whole job.
    fn abort_on_panic() {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            previous(info);
            if mpi::environment::is_initialized() && !mpi::environment::is_finalized() && world().size() > 1 {
                world().abort(101);
            }
        }));
    }

    pub(super) fn abort_if_distributed(error: &Error) {
        if UNIVERSE.get().is_some()
            && mpi::environment::is_initialized()
            && !mpi::environment::is_finalized()
            && world().size() > 1
        {
            super::print_rank_error(world().rank() as usize, world().size() as usize, error);
            world().abort(2);
        }
    }

    /// `MPI_COMM_WORLD`, looked up at each call (its handle is not `Send`).
    struct MpiWorld;

    fn world() -> SimpleCommunicator {
        SimpleCommunicator::world()
    }

    /// A sum of two 16-bit values, in f32 (exact for two of them) and rounded once.
    fn add16(bf16: bool) -> impl Fn(DynBuffer, DynBufferMut) + Sync {
        let (encode, decode) = super::wire16(bf16);
        move |a: DynBuffer, b: DynBufferMut| {
            let (Some(a), Some(b)) = (a.downcast::<u16>(), b.downcast::<u16>()) else {
                return;
            };
            for (x, y) in a.iter().zip(b.iter_mut()) {
                *y = encode(f64::from(decode(*x) + decode(*y)));
            }
        }
    }

    impl Collective for MpiWorld {
        fn sum_f32(&self, send: &[f32], sum: &mut [f32]) {
            world().all_reduce_into(send, sum, SystemOperation::sum());
        }
        fn sum_f64(&self, send: &[f64], sum: &mut [f64]) {
            world().all_reduce_into(send, sum, SystemOperation::sum());
        }
        fn sum_16(&self, send: &[u16], sum: &mut [u16], bf16: bool) {
            let op = UserOperation::commutative(add16(bf16));
            world().all_reduce_into(send, sum, &op);
        }
        fn broadcast_bytes(&self, buf: &mut [u8]) {
            world().process_at_rank(0).broadcast_into(buf);
        }
        fn abort(&self, code: i32) -> ! {
            world().abort(code)
        }
    }
}
