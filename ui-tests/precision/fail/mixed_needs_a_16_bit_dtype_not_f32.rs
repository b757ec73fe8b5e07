// Mixed precision computes in a 16-bit dtype: `Mixed<F32>` is not a precision.
use nbit::prelude::*;

fn main() {
    let _p: Option<Mixed<F32>> = None;
}
