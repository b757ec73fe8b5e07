// 64-true on a TPU through a generic `Runs` bound is two facts, each said once: the matrix refuses
// the cell, and this build has no TPU backend. The matrix's explanation comes first.
use nbit::prelude::*;

fn train<P: Precision, D: Runs<P>>() {}

fn main() {
    train::<True<F64>, Tpu>();
}
