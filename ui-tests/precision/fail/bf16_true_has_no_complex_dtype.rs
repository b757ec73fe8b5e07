// PyTorch has no bfloat16 complex type; under bf16-true, complex parameters are not an element type.
use nbit::prelude::*;

fn dtype_of<E: Element>() -> DType {
    E::DTYPE
}

fn main() {
    let _ = dtype_of::<ComplexOf<True<BF16>>>();
}
