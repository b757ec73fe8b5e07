// NCCL is a GPU library: data parallel on the CPU is `Ddp<Mpi>`, and the error must say so.
use nbit::prelude::*;

fn main() {
    let _trainer = Trainer::<True<F32>, Cpu, Ddp<Nccl>>::new();
}
