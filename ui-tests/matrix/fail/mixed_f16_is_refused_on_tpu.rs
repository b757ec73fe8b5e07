// 16-mixed needs a CUDA GPU; the error must suggest Mixed<BF16>.
use nbit::prelude::*;

fn main() {
    let _trainer = Trainer::<Mixed<F16>, Tpu>::new();
}
