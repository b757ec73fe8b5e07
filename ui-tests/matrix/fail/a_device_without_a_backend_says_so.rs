// An allowed cell on a device this build has no kernels for is one error that says so and what to
// use instead: `Tpu` has no backend yet, and `Gpu` needs the `cuda` feature (these snapshots are of
// a default build; tests/ui.rs does not run them with `cuda`).
use nbit::prelude::*;

fn main() {
    let _ = Trainer::<True<F32>, Tpu>::new();
    let _ = Trainer::<Mixed<F16>, Gpu>::builder();
}
