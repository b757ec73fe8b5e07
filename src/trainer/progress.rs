//! A progress bar per epoch (indicatif), shown only on a terminal and when enabled.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub(crate) struct Bar(Option<ProgressBar>);

impl Bar {
    pub(crate) fn new(enabled: bool, epoch: u64, batches: u64) -> Self {
        if !enabled || !std::io::stderr().is_terminal() {
            return Bar(None);
        }
        let bar = ProgressBar::with_draw_target(Some(batches), ProgressDrawTarget::stderr());
        // Batches per second as a whole number (indicatif's {per_sec} prints 10,257.8925/s), and a
        // line that fits 80 columns, as Lightning's TQDM bar does.
        let style = ProgressStyle::with_template(
            "Epoch {prefix}: {bar:20} {pos}/{len} [{elapsed}<{eta}, {rate}] {msg}",
        )
        .map(|s| {
            s.with_key(
                "rate",
                |state: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                    let _ = write!(w, "{:.0} it/s", state.per_sec());
                },
            )
        })
        .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        bar.set_prefix(epoch.to_string());
        Bar(Some(bar))
    }

    pub(crate) fn advance(&self, n: u64) {
        if let Some(b) = &self.0 {
            b.inc(n);
        }
    }

    pub(crate) fn inc(&self) {
        self.advance(1);
    }

    pub(crate) fn message(&self, loss: f64, skipped: u64) {
        if let Some(b) = &self.0 {
            b.set_message(match skipped {
                0 => format!("loss={loss:.4}"),
                n => format!("loss={loss:.4} skipped={n}"),
            });
        }
    }

    pub(crate) fn finish(&self) {
        if let Some(b) = &self.0 {
            b.finish();
        }
    }
}
