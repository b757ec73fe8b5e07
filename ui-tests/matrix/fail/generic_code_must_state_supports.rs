// Generic code over trainers must bound `D: Supports<P>`; `D: Device` alone is not enough.
use nbit::prelude::*;

fn name<P: Precision, D: Device>(_: &Trainer<P, D>) -> &'static str {
    P::NAME
}

fn main() {}
