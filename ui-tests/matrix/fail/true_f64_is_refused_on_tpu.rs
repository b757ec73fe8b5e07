// TPUs have no float64; the error must suggest True<F32>.
use nbit::prelude::*;

fn main() {
    let _trainer = Trainer::<True<F64>, Tpu>::new();
}
