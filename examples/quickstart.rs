//! The quickstart: what each precision is, where it runs, and how strings reach the types.
//!
//! Run with `cargo run --release --example quickstart`.

use nbit::prelude::*;
use nbit::{DeviceKind, PrecisionKind, Selection};

/// Describes the precision and device it is run with: the types a `Trainer<P, D>` would use.
struct Describe;

impl Job for Describe {
    type Output = String;
    fn run<P: Precision, D: Supports<P>>(self) -> String {
        use nbit::scaler::GradScaler;
        let scaler = if <P::Scaler as GradScaler>::ENABLED {
            "dynamic"
        } else {
            "none"
        };
        format!(
            "Trainer<{}, {}>: params {}, matmuls {}, reductions {}, scaler {scaler}",
            std::any::type_name::<P>()
                .replace("nbit::precision::", "")
                .replace("nbit::dtype::", ""),
            D::KIND.type_name(),
            <P::Param as Element>::DTYPE,
            <P::Compute as Element>::DTYPE,
            <P::Full as Element>::DTYPE,
        )
    }
}

fn main() {
    println!("nbit support matrix (precision x accelerator)\n");
    println!(
        "{:<12} {:<12} {:>5} {:>5} {:>5}",
        "precision", "type", "cpu", "gpu", "tpu"
    );
    for p in PrecisionKind::ALL {
        let cell = |d: DeviceKind| if p.supported_on(d) { "yes" } else { "no" };
        println!(
            "{:<12} {:<12} {:>5} {:>5} {:>5}",
            p.name(),
            p.type_name(),
            cell(DeviceKind::Cpu),
            cell(DeviceKind::Gpu),
            cell(DeviceKind::Tpu)
        );
    }

    println!("\nWhat each precision stores and computes in (model size at Lightning's bits/param)\n");
    println!(
        "{:<12} {:<10} {:<10} {:<10} {:<12} {:>5}",
        "precision", "params", "matmuls", "reductions", "loss scaler", "bits"
    );
    for p in PrecisionKind::ALL {
        let [param, compute, full] = p.dtypes();
        let scaler = if p.scales_loss() { "dynamic" } else { "none" };
        println!(
            "{:<12} {:<10} {:<10} {:<10} {:<12} {:>5}",
            p.name(),
            param.name(),
            compute.name(),
            full.name(),
            scaler,
            p.model_bits()
        );
    }

    println!("\nDispatching strings as a config file or command line would give them\n");
    let requests: [(&str, &str); 8] = [
        ("bf16-mixed", "cpu"),
        ("16", "cpu"),
        ("16-mixed", "gpu"),
        ("64", "auto"),
        ("64-true", "tpu"),
        ("bf16", "tpu"),
        ("8-true", "cpu"),
        ("32-true", "mps"),
    ];
    for (precision, accelerator) in requests {
        print!("precision={precision:<11} accelerator={accelerator:<5} -> ");
        match Selection::parse(precision, accelerator) {
            Ok(sel) => {
                let described = sel.run(Describe).unwrap_or_else(|e| e.to_string());
                println!("{described}");
                if let Some(notice) = sel.notice() {
                    println!("{:>44}note: {notice}", "");
                }
                if let Err(e) = sel.device().probe() {
                    println!("{:>44}but: {e}", "");
                }
            }
            Err(e) => println!("error: {e}"),
        }
    }

    println!("\nIn code, the refused cells do not compile:");
    println!(
        "  Trainer::<Mixed<F16>, Cpu>::new()  -> error[E0277]: 16-mixed (`Mixed<F16>`) does not run on `Cpu` ..."
    );
    println!(
        "  Trainer::<True<F64>, Tpu>::new()   -> error[E0277]: 64-true (`True<F64>`) does not run on `Tpu` ..."
    );
    println!(
        "16-mixed is refused on the CPU (Lightning would silently switch to bf16-mixed): use bf16-mixed there."
    );
}
