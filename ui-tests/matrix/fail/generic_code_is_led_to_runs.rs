// Generic code that builds a trainer without a bound is led to the one bound the docs recommend,
// `D: Runs<P>` (the matrix and the device's kernels), not to `Supports` and then `Backend`.
use nbit::prelude::*;

fn build<P: Precision, D: Device>() -> Result<Trainer<P, D>, Error> {
    Trainer::<P, D>::new()
}

fn main() {}
