// Every cell the support matrix allows (15 of 18) satisfies `Supports`, and every allowed cell of
// a device with a backend in this build builds a trainer. One program rather than one per cell,
// so a fresh `cargo test` links one binary; a refused cell still fails alone, in ../fail.
use nbit::prelude::*;

fn describe<P: Precision, D: Supports<P>>() -> (&'static str, nbit::DeviceKind) {
    (P::NAME, D::KIND)
}

fn build<P: Precision, D: Runs<P>>() -> Result<Trainer<P, D>, Error> {
    Trainer::<P, D>::new()
}

macro_rules! allowed {
    ($($p:ty, $d:ident => $name:literal;)*) => {$(
        assert_eq!(describe::<$p, $d>(), ($name, nbit::DeviceKind::$d));
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
    // The CPU has kernels in every build: each of its five cells builds a trainer.
    assert_eq!(
        build::<Mixed<BF16>, Cpu>().unwrap().precision_name(),
        "bf16-mixed"
    );
    assert_eq!(build::<True<BF16>, Cpu>().unwrap().precision_name(), "bf16-true");
    assert_eq!(build::<True<F16>, Cpu>().unwrap().precision_name(), "16-true");
    assert_eq!(build::<True<F32>, Cpu>().unwrap().precision_name(), "32-true");
    assert_eq!(build::<True<F64>, Cpu>().unwrap().precision_name(), "64-true");
    // The GPU's six build with the `cuda` feature, or say why not (no driver, no device).
    #[cfg(feature = "cuda")]
    {
        let gpu = [
            build::<Mixed<F16>, Gpu>().map(|t| t.precision_name()),
            build::<Mixed<BF16>, Gpu>().map(|t| t.precision_name()),
            build::<True<F16>, Gpu>().map(|t| t.precision_name()),
            build::<True<BF16>, Gpu>().map(|t| t.precision_name()),
            build::<True<F32>, Gpu>().map(|t| t.precision_name()),
            build::<True<F64>, Gpu>().map(|t| t.precision_name()),
        ];
        for r in gpu {
            match r {
                Ok(name) => assert!(name.ends_with("-mixed") || name.ends_with("-true")),
                Err(e) => assert!(e.to_string().contains("'gpu'"), "{e}"),
            }
        }
    }
}
