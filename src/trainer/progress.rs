//! A progress bar per epoch (indicatif), shown only on a terminal and when enabled.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// An epoch's bar, and how to end its line (a newline on the bar's stream).
pub(crate) struct Bar(Option<(ProgressBar, Box<dyn FnMut()>)>);

impl Bar {
    pub(crate) fn new(enabled: bool, epoch: u64, batches: u64) -> Self {
        if !enabled || !std::io::stderr().is_terminal() {
            return Bar(None);
        }
        Bar::drawn_to(ProgressDrawTarget::stderr(), epoch, batches, || eprintln!())
    }

    /// A bar drawn to `target`, whose line `end_line` ends.
    fn drawn_to(
        target: ProgressDrawTarget,
        epoch: u64,
        batches: u64,
        end_line: impl FnMut() + 'static,
    ) -> Self {
        let bar = ProgressBar::with_draw_target(Some(batches), target);
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
        Bar(Some((bar, Box::new(end_line))))
    }

    pub(crate) fn advance(&self, n: u64) {
        if let Some((b, _)) = &self.0 {
            b.inc(n);
        }
    }

    pub(crate) fn inc(&self) {
        self.advance(1);
    }

    pub(crate) fn message(&self, loss: f64, skipped: u64) {
        if let Some((b, _)) = &self.0 {
            b.set_message(match skipped {
                0 => format!("loss={loss:.4}"),
                n => format!("loss={loss:.4} skipped={n}"),
            });
        }
    }

    /// Draws the last frame and ends its line, so whatever is printed next (the next epoch's
    /// bar, the report, an error) starts on a line of its own: indicatif leaves the cursor at the
    /// end of a finished bar.
    pub(crate) fn finish(&mut self) {
        if let Some((b, mut end_line)) = self.0.take() {
            // `finish` would draw the bar full; an epoch cut short (Ctrl-C, max_steps, an error)
            // keeps the position it reached.
            if b.length().is_some_and(|len| b.position() < len) {
                b.abandon();
            } else {
                b.finish();
            }
            end_line();
        }
    }
}

impl Drop for Bar {
    /// A bar left by an error or an interrupt ends its line too.
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use indicatif::TermLike;

    use super::*;

    /// A terminal that records what is written to it.
    #[derive(Debug, Clone, Default)]
    struct Screen(Arc<Mutex<String>>);

    impl Screen {
        fn push(&self, s: &str) {
            self.0.lock().unwrap().push_str(s);
        }
        fn text(&self) -> String {
            self.0.lock().unwrap().clone()
        }
    }

    impl TermLike for Screen {
        fn width(&self) -> u16 {
            80
        }
        fn move_cursor_up(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_down(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_right(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_left(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn write_line(&self, s: &str) -> std::io::Result<()> {
            self.push(s);
            self.push("\n");
            Ok(())
        }
        fn write_str(&self, s: &str) -> std::io::Result<()> {
            self.push(s);
            Ok(())
        }
        fn clear_line(&self) -> std::io::Result<()> {
            self.push("\r");
            Ok(())
        }
        fn flush(&self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn bar(screen: &Screen) -> Bar {
        let target = ProgressDrawTarget::term_like_with_hz(Box::new(screen.clone()), 20);
        let end = screen.clone();
        Bar::drawn_to(target, 3, 4, move || end.push("\n"))
    }

    #[test]
    fn a_finished_bar_ends_its_line_so_the_next_output_starts_on_its_own() {
        let screen = Screen::default();
        let mut b = bar(&screen);
        b.advance(4);
        b.message(0.25, 0);
        b.finish();
        let text = screen.text();
        let last = text.rsplit('\r').next().unwrap();
        assert!(
            last.starts_with("Epoch 3: ") && last.contains("4/4") && last.contains("loss=0.2500"),
            "{text:?}"
        );
        assert!(last.ends_with('\n'), "the last frame must end its line: {text:?}");
        drop(b); // finished once: no second newline
        assert_eq!(screen.text(), text);
    }

    #[test]
    fn a_bar_dropped_mid_epoch_ends_its_line_too() {
        let screen = Screen::default();
        let b = bar(&screen);
        b.advance(2);
        drop(b); // as an error or Ctrl-C leaves the loop
        let text = screen.text();
        let last = text.rsplit('\r').next().unwrap();
        assert!(
            last.contains("2/4") && last.ends_with('\n'),
            "the last frame: {text:?}"
        );
    }
}
