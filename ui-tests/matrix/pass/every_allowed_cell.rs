// Every cell the support matrix allows (15 of 18): each type can be named, built and used
// generically. One program rather than one per cell, so a fresh `cargo test` links one binary;
// a refused cell still fails alone, in ../fail.
use nbit::prelude::*;

fn describe<P: Precision, D: Supports<P>>(_: Option<&Trainer<P, D>>) -> (&'static str, nbit::DeviceKind) {
    (P::NAME, D::KIND)
}

macro_rules! allowed {
    ($($p:ty, $d:ident => $name:literal;)*) => {$(
        let trainer: Option<Trainer<$p, $d>> = Trainer::new().ok();
        assert_eq!(describe(trainer.as_ref()), ($name, nbit::DeviceKind::$d));
    )*};
}

pub fn main() {
    allowed! {
        Mixed<BF16>, Cpu => "bf16-mixed";
        Mixed<BF16>, Gpu => "bf16-mixed";
        Mixed<BF16>, Tpu => "bf16-mixed";
        Mixed<F16>, Gpu => "16-mixed";
        True<BF16>, Cpu => "bf16-true";
        True<BF16>, Gpu => "bf16-true";
        True<BF16>, Tpu => "bf16-true";
        True<F16>, Cpu => "16-true";
        True<F16>, Gpu => "16-true";
        True<F16>, Tpu => "16-true";
        True<F32>, Cpu => "32-true";
        True<F32>, Gpu => "32-true";
        True<F32>, Tpu => "32-true";
        True<F64>, Cpu => "64-true";
        True<F64>, Gpu => "64-true";
    }
}
