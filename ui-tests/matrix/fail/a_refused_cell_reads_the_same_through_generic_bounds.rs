// A refused cell reached through `Runs` or `Supports` (a generic function's bound) gets the same
// message and advice as building the trainer directly: one error per call, no macro internals.
use nbit::prelude::*;

fn train<P: Precision, D: Runs<P>>() -> Result<Trainer<P, D>, Error> {
    Trainer::<P, D>::new()
}

fn describe<P: Precision, D: Supports<P>>() -> &'static str {
    P::NAME
}

fn main() {
    let _ = train::<Mixed<F16>, Cpu>();
    let _ = describe::<Mixed<F16>, Cpu>();
    let _ = describe::<True<F64>, Tpu>();
}
