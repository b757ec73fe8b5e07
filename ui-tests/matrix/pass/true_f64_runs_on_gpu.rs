// The support matrix allows `True<F64>` on `Gpu`: the type can be named, built and used generically.
use nbit::prelude::*;

fn describe<P: Precision, D: Supports<P>>(_: Option<&Trainer<P, D>>) -> (&'static str, nbit::DeviceKind) {
    (P::NAME, D::KIND)
}

fn main() {
    let trainer: Option<Trainer<True<F64>, Gpu>> = Trainer::new().ok();
    assert_eq!(describe(trainer.as_ref()), ("64-true", nbit::DeviceKind::Gpu));
}
