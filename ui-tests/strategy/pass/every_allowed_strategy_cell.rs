// Every strategy cell the table allows satisfies `Hosts`, and code written before strategies
// existed (`Trainer<P, D>`) is `Trainer<P, D, SingleDevice>`. Compiled as a module of the
// integration tests (see tests/ui.rs); the refused cells fail alone, in ../fail.
use nbit::prelude::*;

fn hosts<D: Hosts<S>, S: Strategy>() -> (nbit::DeviceKind, &'static str) {
    (D::KIND, S::NAME)
}

pub fn main() {
    assert_eq!(
        hosts::<Cpu, SingleDevice>(),
        (nbit::DeviceKind::Cpu, "single_device")
    );
    assert_eq!(
        hosts::<Gpu, SingleDevice>(),
        (nbit::DeviceKind::Gpu, "single_device")
    );
    assert_eq!(
        hosts::<Tpu, SingleDevice>(),
        (nbit::DeviceKind::Tpu, "single_device")
    );
    assert_eq!(hosts::<Cpu, Ddp<Mpi>>(), (nbit::DeviceKind::Cpu, "ddp"));
    assert_eq!(hosts::<Gpu, Ddp<Mpi>>(), (nbit::DeviceKind::Gpu, "ddp"));
    assert_eq!(hosts::<Tpu, Ddp<Mpi>>(), (nbit::DeviceKind::Tpu, "ddp"));
    assert_eq!(hosts::<Gpu, Ddp<Nccl>>(), (nbit::DeviceKind::Gpu, "ddp"));
    // The default strategy: one process.
    let trainer: Trainer<True<F32>, Cpu> = Trainer::<True<F32>, Cpu>::new().unwrap();
    let same: Trainer<True<F32>, Cpu, SingleDevice> = trainer;
    assert_eq!(
        (same.strategy_name(), same.world_size(), same.global_rank()),
        ("single_device", 1, 0)
    );
}
