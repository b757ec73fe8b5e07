// The support matrix allows `Mixed<BF16>` on `Cpu`: the type can be named, built and used generically.
use nbit::prelude::*;

fn describe<P: Precision, D: Supports<P>>(_: Option<&Trainer<P, D>>) -> (&'static str, nbit::DeviceKind) {
    (P::NAME, D::KIND)
}

fn main() {
    let trainer: Option<Trainer<Mixed<BF16>, Cpu>> = Trainer::new().ok();
    assert_eq!(describe(trainer.as_ref()), ("bf16-mixed", nbit::DeviceKind::Cpu));
}
