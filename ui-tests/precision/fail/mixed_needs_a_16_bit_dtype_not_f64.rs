// Mixed precision computes in a 16-bit dtype: `Mixed<F64>` is not a precision.
use nbit::prelude::*;

fn main() {
    let _p: Option<Mixed<F64>> = None;
}
