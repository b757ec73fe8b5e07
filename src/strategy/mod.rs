//! Strategies: how many processes train one model, as Lightning's `Trainer(strategy=...)`.
//!
//! A strategy is the [`Trainer`](crate::Trainer)'s third type parameter, after the precision and
//! the device, with a default: `Trainer<P, D>` is `Trainer<P, D, SingleDevice>`, one process.
//! [`Ddp<Mpi>`] is data parallel over MPI (Lightning's `strategy="ddp"`): every process (a *rank*)
//! holds the whole model, trains on its share of each epoch's batches, and the gradients are summed
//! over the ranks before every optimizer step, so the ranks stay identical.
//!
//! | strategy | `Cpu` | `Gpu` | `Tpu` |
//! |---|---|---|---|
//! | [`SingleDevice`] (default) | yes | yes | yes |
//! | [`Ddp<Mpi>`] (feature `mpi`) | yes | yes, gradients staged through host memory | yes (no TPU runtime yet) |
//! | [`Ddp<Nccl>`] (features `cuda` and `mpi`) | no | yes, not yet run on two GPUs | no |
//!
//! A refused cell does not compile, with the reason and what to use instead:
//!
//! ```compile_fail,E0277
//! use nbit::prelude::*;
//! // error: `Ddp<Nccl>` does not run on `Cpu`: NCCL is NVIDIA's library ... use `Ddp<Mpi>` ...
//! let trainer = Trainer::<True<F32>, Cpu, Ddp<Nccl>>::new();
//! ```
//!
//! # Data parallel, exactly
//!
//! - Rank 0's initial parameters are broadcast to every rank before training, so ranks start
//!   identical whatever their seeds.
//! - Each epoch's batches, in the single-process order (same seed, same shuffle), are dealt
//!   round-robin: batch `i` to rank `i % world_size`. When the count does not divide, the first
//!   batches of the epoch are dealt again to the ranks short of one, as PyTorch's
//!   `DistributedSampler` repeats samples (every rank takes the same number of steps);
//!   [`TrainerBuilder::ddp_drop_last`](crate::TrainerBuilder::ddp_drop_last) drops the last
//!   batches instead.
//! - Each rank's loss is multiplied by `scale / (accumulate_grad_batches * world_size)` before
//!   backward (PyTorch DDP divides by the world size before its all-reduce; here the division is
//!   folded into the loss, with no pass of its own), and the gradients are summed over ranks in the
//!   dtype the optimizer reads (f32 master gradients under mixed precision; 16-bit gradients are
//!   summed in f32 and rounded once), before unscaling and clipping: the scaler's skip decision and
//!   the clip norm are the same on every rank.
//! - So `W` ranks with batch size `b` take the steps of one process with batch size `b` and
//!   `accumulate_grad_batches = W` over the same batches: for `W = 2` bit for bit (the tests
//!   assert it), for more ranks within the reduction order's rounding.
//! - The step loss is the mean over ranks; validation is sharded (without repeats) and each
//!   batch's metrics gathered and merged in batch order, so every rank sees the single-process
//!   metrics bit for bit. [`Trainer::validate`](crate::Trainer::validate) does the same, so every
//!   rank must call it. Rank 0 alone shows progress and writes files (checkpoints, logs,
//!   weights); every rank reads a checkpoint to resume, on any number of ranks that can deal the
//!   rest of its epoch evenly.
//! - An error on any rank during `fit` or `validate` ends the whole job: the rank prints it
//!   (`error: rank r of W: ...`) and aborts MPI with exit code 2, so no rank waits for a partner
//!   that will not come; so does a panic. A program's own errors after MPI has started should go
//!   through [`abort_if_distributed`] (the command line's do).
//! - A stop request ([`Trainer::stop_handle`](crate::Trainer::stop_handle), Ctrl-C) on any rank
//!   stops every rank after the same step.

mod comm;
#[cfg(all(feature = "cuda", feature = "mpi"))]
mod nccl;
pub mod shard;

use core::fmt::Debug;
use core::marker::PhantomData;

pub use comm::CommHook;
pub(crate) use comm::Group;

use crate::Error;
use crate::device::{Device, Gpu};

mod sealed {
    pub trait Sealed {}
}

/// How many processes train, and how they talk: [`SingleDevice`] or [`Ddp`].
pub trait Strategy: sealed::Sealed + Copy + Default + Debug + Send + Sync + 'static {
    /// Lightning's name of the strategy: `"single_device"` or `"ddp"`.
    const NAME: &'static str;

    /// Joins the process group (none for one process); an error says why not and what to do.
    #[doc(hidden)]
    fn connect() -> Result<Option<Group>, Error>;
}

/// One process on one device (Lightning's `"single_device"`): the default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SingleDevice;

/// Distributed data parallel (Lightning's `"ddp"`) over the collective library `C`: [`Mpi`]
/// (CPUs, and GPUs through host memory) or [`Nccl`] (GPUs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Ddp<C>(PhantomData<C>);

/// MPI (OpenMPI, MPICH) through the `mpi` crate: feature `mpi`. Launch with `mpirun -np N`, or
/// let `nbit fit --strategy ddp --devices N` call `mpirun`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Mpi;

/// NVIDIA's NCCL: GPUs only (features `cuda` and `mpi`: MPI starts the ranks and hands them
/// NCCL's id; `libnccl.so.2` is loaded at run time). Each rank uses the GPU of its rank on its
/// machine unless `NBIT_CUDA_DEVICE` says otherwise. Written against NCCL's API but not yet run
/// on two GPUs (`tools/gpu-check.sh` has the check); [`Ddp<Mpi>`] sums GPU gradients through host
/// memory, and is tested on the emulated GPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Nccl;

impl sealed::Sealed for SingleDevice {}
impl sealed::Sealed for Ddp<Mpi> {}
impl sealed::Sealed for Ddp<Nccl> {}

impl Strategy for SingleDevice {
    const NAME: &'static str = "single_device";
    fn connect() -> Result<Option<Group>, Error> {
        Ok(None)
    }
}

impl Strategy for Ddp<Mpi> {
    const NAME: &'static str = "ddp";
    fn connect() -> Result<Option<Group>, Error> {
        comm::mpi_group().map(Some)
    }
}

impl Strategy for Ddp<Nccl> {
    const NAME: &'static str = "ddp";
    #[cfg(all(feature = "cuda", feature = "mpi"))]
    fn connect() -> Result<Option<Group>, Error> {
        let group = comm::mpi_group()?;
        if group.size() == 1 {
            // One rank sums nothing.
            return Ok(Some(group));
        }
        group.with_device(nccl::connect).map(Some)
    }
    #[cfg(not(all(feature = "cuda", feature = "mpi")))]
    fn connect() -> Result<Option<Group>, Error> {
        Err(Error::InvalidArgument {
            name: "strategy",
            value: "`Ddp<Nccl>`".into(),
            expected: "a build of nbit with its `cuda` and `mpi` features (NCCL sums the gradients \
                       on the GPUs; MPI starts the ranks and hands them NCCL's id)",
        })
    }
}

/// `Self` (a device) can train under the strategy `S`. `Ddp<Nccl>` needs a `Gpu`; every other
/// strategy runs on every device.
#[diagnostic::on_unimplemented(
    message = "`{S}` does not run on `{Self}`: NCCL is NVIDIA's library of GPU collectives",
    label = "`{S}` cannot run on `{Self}`",
    note = "use `Ddp<Mpi>` (data parallel over MPI, feature `mpi`) on `{Self}`, or train on `Gpu`"
)]
pub trait Hosts<S: Strategy>: Device {}

impl<D: Device> Hosts<SingleDevice> for D {}
impl<D: Device> Hosts<Ddp<Mpi>> for D {}
impl Hosts<Ddp<Nccl>> for Gpu {}

/// A strategy named at run time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StrategyKind {
    /// [`SingleDevice`].
    SingleDevice,
    /// [`Ddp`] over the collective library the device uses ([`Mpi`] here).
    Ddp,
}

/// Lightning's strategy strings for the command line: `"auto"` and `"single_device"` are one
/// process, `"ddp"` is [`Ddp`].
///
/// ```
/// use nbit::strategy::{parse_strategy, StrategyKind};
/// assert_eq!(parse_strategy("auto")?, StrategyKind::SingleDevice);
/// assert_eq!(parse_strategy("ddp")?, StrategyKind::Ddp);
/// assert!(parse_strategy("fsdp").unwrap_err().to_string().contains("'fsdp'"));
/// # Ok::<(), nbit::Error>(())
/// ```
pub fn parse_strategy(value: &str) -> Result<StrategyKind, Error> {
    match value {
        "auto" | "single_device" => Ok(StrategyKind::SingleDevice),
        "ddp" => Ok(StrategyKind::Ddp),
        _ => Err(Error::InvalidArgument {
            name: "strategy",
            value: format!("'{value}'"),
            expected: "'auto', 'single_device' or 'ddp' (nbit has no fsdp, deepspeed or ddp_spawn)",
        }),
    }
}

/// For a program's last error: where this process is a rank of a data-parallel job of more than
/// one rank (MPI started by nbit), prints the error as this rank's (`error: rank r of W: ...`) and
/// ends the whole job with exit code 2, since the other ranks would wait for this one in their
/// next collective, and this one for them when MPI finalises at exit. Otherwise returns, and the
/// caller reports the error as usual. `nbit`'s command line calls it.
pub fn abort_if_distributed(error: &Error) {
    comm::abort_if_distributed(error);
}

/// This process's rank among the ranks on its machine, as OpenMPI, MPICH or Slurm give it
/// (`None` outside a launcher): the GPU backend's default device under data parallel.
pub fn local_rank() -> Option<usize> {
    ["OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.trim().parse().ok())
}

/// Whether this process was started by an MPI launcher (`mpirun`, `mpiexec`, `srun`), read from
/// the variables OpenMPI, MPICH and Slurm's PMI set, without initialising MPI.
pub fn launched_by_mpi() -> bool {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "PMI_RANK"]
        .iter()
        .any(|v| std::env::var_os(v).is_some())
}
