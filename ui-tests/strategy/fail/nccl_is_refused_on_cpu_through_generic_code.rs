// Generic training code names the strategy bound; a refused cell reads the same through it.
use nbit::prelude::*;

fn build<P: Precision, D: Runs<P> + Hosts<S>, S: Strategy>() -> Result<Trainer<P, D, S>, Error> {
    Trainer::<P, D, S>::builder().build()
}

fn main() {
    let _trainer = build::<Mixed<BF16>, Cpu, Ddp<Nccl>>();
}
