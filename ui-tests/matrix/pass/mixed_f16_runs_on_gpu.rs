// The support matrix allows `Mixed<F16>` on `Gpu`: the type can be named, built and used generically.
use nbit::prelude::*;

fn describe<P: Precision, D: Supports<P>>(_: Option<&Trainer<P, D>>) -> (&'static str, nbit::DeviceKind) {
    (P::NAME, D::KIND)
}

fn main() {
    let trainer: Option<Trainer<Mixed<F16>, Gpu>> = Trainer::new().ok();
    assert_eq!(describe(trainer.as_ref()), ("16-mixed", nbit::DeviceKind::Gpu));
}
