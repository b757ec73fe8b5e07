//! Loss curves as SVG: line charts, side by side, written by `nbit fit --plot` and the
//! quickstart.
//!
//! A small writer of its own rather than a plotting crate: the charts nbit draws are lines on two
//! linear axes with a legend, which takes about two hundred lines, and a dependency here would add
//! to every first build (one of the costs issue 13 asks to cut). The SVG needs no font or system
//! library to write, and any browser shows it.
//!
//! ```
//! use nbit::plot::{Chart, Series};
//! let chart = Chart::new("bf16-mixed", "step", "loss")
//!     .series(Series::new("training loss", vec![(1.0, 2.3), (2.0, 1.1), (3.0, 0.7)]))
//!     .series(Series::new("validation loss", vec![(3.0, 0.8)]).dashed());
//! let svg = nbit::plot::svg(&[chart]);
//! assert!(svg.starts_with("<svg") && svg.contains("validation loss"));
//! ```

use std::fmt::Write as _;
use std::path::Path;

use crate::error::Error;
use crate::trainer::FitReport;

/// One line: a label and its points (non-finite points are left out, breaking the line).
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    label: String,
    points: Vec<(f64, f64)>,
    dashed: bool,
}

impl Series {
    /// A solid line through `points`, in order.
    pub fn new(label: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Series {
            label: label.into(),
            points,
            dashed: false,
        }
    }

    /// Drawn dashed, with a marker at each point (for sparse series such as per-epoch metrics).
    pub fn dashed(mut self) -> Self {
        self.dashed = true;
        self
    }
}

/// One chart: a title, axis labels and its lines.
#[derive(Clone, Debug, PartialEq)]
pub struct Chart {
    title: String,
    x_label: String,
    y_label: String,
    series: Vec<Series>,
}

impl Chart {
    /// An empty chart.
    pub fn new(title: impl Into<String>, x_label: impl Into<String>, y_label: impl Into<String>) -> Self {
        Chart {
            title: title.into(),
            x_label: x_label.into(),
            y_label: y_label.into(),
            series: Vec::new(),
        }
    }

    /// Adds a line.
    pub fn series(mut self, s: Series) -> Self {
        self.series.push(s);
        self
    }

    /// Training loss per optimizer step, and validation loss per epoch (at the epoch's last step)
    /// when the fit was validated: Lightning's `train_loss` and `val_loss` curves.
    pub fn from_report(title: impl Into<String>, report: &FitReport) -> Self {
        let train: Vec<(f64, f64)> = report.history.iter().map(|s| (s.step as f64, s.loss)).collect();
        let mut epoch_ends: Vec<u64> = Vec::new();
        for (i, s) in report.history.iter().enumerate() {
            let last = report.history.get(i + 1).is_none_or(|n| n.epoch != s.epoch);
            if last {
                epoch_ends.push(s.step);
            }
        }
        let val: Vec<(f64, f64)> = epoch_ends
            .iter()
            .zip(&report.validation)
            .map(|(&step, m)| (step as f64, m.loss()))
            .collect();
        let mut chart = Chart::new(title, "step", "loss").series(Series::new("training loss", train));
        if !val.is_empty() {
            chart = chart.series(Series::new("validation loss", val).dashed());
        }
        chart
    }
}

const PANEL_W: f64 = 420.0;
const PANEL_H: f64 = 300.0;
const LEFT: f64 = 58.0;
const RIGHT: f64 = 14.0;
const TOP: f64 = 30.0;
const BOTTOM: f64 = 42.0;
/// Matplotlib's default colour cycle.
const COLOURS: [&str; 6] = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"];

/// Round tick positions covering `[lo, hi]`: steps of 1, 2 or 5 times a power of ten.
fn ticks(lo: f64, hi: f64) -> Vec<f64> {
    let span = (hi - lo).max(f64::MIN_POSITIVE);
    let raw = span / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| span / s <= 6.0)
        .unwrap_or(10.0 * mag);
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    (first..=last).map(|i| i as f64 * step).collect()
}

fn label(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if !(1e-3..1e5).contains(&a) {
        format!("{v:.0e}")
    } else {
        let s = format!("{v:.4}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// The range of finite values, widened when empty or a single value.
fn range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(v), b.max(v))
        });
    if lo > hi {
        (0.0, 1.0)
    } else if lo == hi {
        (lo - 0.5, hi + 0.5)
    } else {
        (lo, hi)
    }
}

fn panel(out: &mut String, chart: &Chart, x0: f64) {
    let points = || chart.series.iter().flat_map(|s| s.points.iter());
    let (xlo, xhi) = range(points().map(|p| p.0));
    let (ylo, yhi) = range(points().map(|p| p.1));
    let pad = 0.05 * (yhi - ylo);
    let (ylo, yhi) = (ylo - pad, yhi + pad);
    let (w, h) = (PANEL_W - LEFT - RIGHT, PANEL_H - TOP - BOTTOM);
    let px = |x: f64| x0 + LEFT + (x - xlo) / (xhi - xlo) * w;
    let py = |y: f64| TOP + h - (y - ylo) / (yhi - ylo) * h;
    let _ = write!(
        out,
        r##"<text x="{:.1}" y="18" text-anchor="middle" font-weight="bold">{}</text>"##,
        x0 + LEFT + w / 2.0,
        escape(&chart.title)
    );
    let _ = write!(
        out,
        r##"<rect x="{:.1}" y="{TOP}" width="{w:.1}" height="{h:.1}" fill="none" stroke="#444"/>"##,
        x0 + LEFT
    );
    for t in ticks(xlo, xhi) {
        let x = px(t);
        let _ = write!(
            out,
            r##"<line x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{:.1}" stroke="#444"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            TOP + h,
            TOP + h + 4.0,
            TOP + h + 16.0,
            label(t)
        );
    }
    for t in ticks(ylo, yhi) {
        let y = py(t);
        let _ = write!(
            out,
            r##"<line x1="{:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            x0 + LEFT,
            x0 + LEFT + w,
            x0 + LEFT - 4.0,
            y + 4.0,
            label(t)
        );
    }
    let _ = write!(
        out,
        r##"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text><text transform="translate({:.1},{:.1}) rotate(-90)" text-anchor="middle">{}</text>"##,
        x0 + LEFT + w / 2.0,
        PANEL_H - 8.0,
        escape(&chart.x_label),
        x0 + 14.0,
        TOP + h / 2.0,
        escape(&chart.y_label)
    );
    for (i, s) in chart.series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let dash = if s.dashed {
            r#" stroke-dasharray="6 4""#
        } else {
            ""
        };
        // A new polyline after every non-finite point.
        for run in s.points.split(|p| !(p.0.is_finite() && p.1.is_finite())) {
            if run.is_empty() {
                continue;
            }
            let pts: Vec<String> = run
                .iter()
                .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
                .collect();
            let _ = write!(
                out,
                r#"<polyline fill="none" stroke="{colour}" stroke-width="1.5"{dash} points="{}"/>"#,
                pts.join(" ")
            );
            if s.dashed {
                for &(x, y) in run {
                    let _ = write!(
                        out,
                        r#"<circle cx="{:.1}" cy="{:.1}" r="2.5" fill="{colour}"/>"#,
                        px(x),
                        py(y)
                    );
                }
            }
        }
        let ly = TOP + 14.0 + 16.0 * i as f64;
        let lx = x0 + LEFT + w - 130.0;
        let _ = write!(
            out,
            r#"<line x1="{lx:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="{colour}" stroke-width="2"{dash}/><text x="{:.1}" y="{ly:.1}">{}</text>"#,
            ly - 4.0,
            lx + 20.0,
            ly - 4.0,
            lx + 25.0,
            escape(&s.label)
        );
    }
}

/// The charts side by side, as one SVG document.
pub fn svg(charts: &[Chart]) -> String {
    let width = PANEL_W * charts.len().max(1) as f64;
    let mut out = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{PANEL_H}" viewBox="0 0 {width} {PANEL_H}" font-family="sans-serif" font-size="11">"#
    );
    out.push_str(r#"<rect width="100%" height="100%" fill="white"/>"#);
    for (i, c) in charts.iter().enumerate() {
        panel(&mut out, c, PANEL_W * i as f64);
    }
    out.push_str("</svg>\n");
    out
}

/// Writes [`svg`] of `charts` to `path`, atomically (an existing file is replaced whole or not
/// at all).
pub fn write_svg(path: &Path, charts: &[Chart]) -> Result<(), Error> {
    crate::write_atomic(path, svg(charts).as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        assert_eq!(ticks(0.0, 10.0), vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0]);
        let labels: Vec<String> = ticks(0.13, 0.61).into_iter().map(label).collect();
        assert_eq!(labels, ["0.2", "0.3", "0.4", "0.5", "0.6"]);
        assert_eq!(ticks(1.0, 450.0), vec![100.0, 200.0, 300.0, 400.0]);
        assert_eq!(label(0.30000000000000004), "0.3");
        assert_eq!(label(2e-5), "2e-5");
    }

    #[test]
    fn points_map_into_the_frame_and_nan_breaks_the_line() {
        let chart = Chart::new("t", "x", "y").series(Series::new(
            "a<b",
            vec![(0.0, 1.0), (1.0, f64::NAN), (2.0, 3.0), (3.0, 2.0)],
        ));
        let s = svg(&[chart]);
        assert_eq!(s.matches("<polyline").count(), 2, "{s}");
        assert!(s.contains("a&lt;b"));
        // x = 0 is the frame's left edge; the largest y (3, plus 5% padding) is near its top.
        assert!(s.contains(&format!("{:.1},", LEFT)), "{s}");
        let empty = svg(&[Chart::new("none", "x", "y")]);
        assert!(empty.ends_with("</svg>\n"));
    }
}
