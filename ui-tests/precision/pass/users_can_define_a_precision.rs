// `Precision` is open: a user's type becomes a precision and opts into devices with `Supports`,
// Lightning's custom precision plugin in types. Here: fp16 autocast with a scaler, on the CPU.
use nbit::prelude::*;
use nbit::scaler::{DynamicScaler, GradScaler};

#[derive(Clone, Copy, Debug, Default)]
struct CpuFp16Amp;

impl Precision for CpuFp16Amp {
    type Param = f32;
    type Compute = half::f16;
    type Full = f32;
    type Complex = num_complex::Complex<f32>;
    type Scaler = DynamicScaler;
    const NAME: &'static str = "cpu-16-mixed";
}

impl Supports<CpuFp16Amp> for Cpu {}

fn scale_of<P: Precision, D: Supports<P>>(_: &Trainer<P, D>) -> f32 {
    P::Scaler::default().scale()
}

pub fn main() {
    let trainer = Trainer::<CpuFp16Amp, Cpu>::new().unwrap();
    assert_eq!(scale_of(&trainer), 65536.0);
    assert_eq!(<CpuFp16Amp as Precision>::MODEL_BITS, 32);
}
