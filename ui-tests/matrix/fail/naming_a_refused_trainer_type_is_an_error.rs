// The bound sits on the type: even an unused annotation of a refused pair does not compile.
use nbit::prelude::*;

fn main() {
    let _nothing: Option<Trainer<True<F64>, Tpu>> = None;
}
