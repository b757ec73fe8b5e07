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
        let style = ProgressStyle::with_template(
            "Epoch {prefix}: {bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}, {per_sec}] {msg}",
        )
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
            b.set_message(format!("loss={loss:.4} skipped={skipped}"));
        }
    }

    pub(crate) fn finish(&self) {
        if let Some(b) = &self.0 {
            b.finish();
        }
    }
}
