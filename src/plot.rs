//! Loss curves as SVG: line charts, side by side, written by `nbit fit --plot` and the
//! quickstart.
//!
//! What the charts do for a reader, and how:
//! - **A long, noisy run reads as a curve.** A [`Series::smoothed`] line is drawn twice: the raw
//!   values as a faint band, and over it their exponential moving average, debiased as
//!   TensorBoard's smoothing is, spanning 2% of the points. With more than two smoothed lines in
//!   one chart (precisions overlaid) the bands are left out: they would hide each other.
//! - **The file stays small.** Every line is decimated to the pixels: per pixel column, the band
//!   keeps the lowest and highest raw value and a line keeps its last point, so a 128 000-step run
//!   draws about as many points as the chart is wide.
//! - **The legend never covers data**: it sits in its own strip under the chart.
//! - **Ticks read as people write them**: `0`, `50k`, `100k`, `1.5M` on a step axis; `0.25`,
//!   `0.001`, `1e-5` on a loss axis; on a [`Chart::log_y`] axis, the powers of ten.
//!
//! A small writer of its own rather than a plotting crate. `plotters` 0.3.7 with only its SVG
//! backend was weighed (issue 21): three crates (plotters, plotters-backend, plotters-svg) and
//! 2.1 s of a clean release build on the 2-core development machine, a small cost. What decided
//! it is what it would leave to write here: it draws the points it is given (no smoothing, no
//! decimation: a 128 000-step run is 128 000 points in the file), its log axis and tick labels
//! would still need the `50k` formatting, and its legend box sits inside the plotting area, over
//! the data. The SVG needs no font or system library to write, and any browser shows it.
//!
//! ```
//! use nbit::plot::{Chart, Series};
//! let chart = Chart::new("bf16-mixed", "step", "loss")
//!     .log_y()
//!     .series(Series::new("training loss", vec![(1.0, 2.3), (2.0, 1.1), (3.0, 0.7)]).smoothed())
//!     .series(Series::new("validation loss", vec![(3.0, 0.8)]).dashed());
//! let svg = nbit::plot::svg(&[chart]);
//! assert!(svg.starts_with("<svg") && svg.contains("validation loss"));
//! ```

use std::fmt::Write as _;
use std::path::Path;

use crate::error::Error;
use crate::trainer::FitReport;

/// How a series is drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Style {
    Line,
    Smoothed,
    Dashed,
}

/// One line: a label and its points (non-finite points are left out, breaking the line).
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    label: String,
    points: Vec<(f64, f64)>,
    style: Style,
}

impl Series {
    /// A solid line through `points`, in order.
    pub fn new(label: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Series {
            label: label.into(),
            points,
            style: Style::Line,
        }
    }

    /// Drawn as its exponential moving average over a faint band of the raw values (for noisy
    /// per-step values such as a training loss).
    pub fn smoothed(mut self) -> Self {
        self.style = Style::Smoothed;
        self
    }

    /// Drawn dashed, with a marker at each point (for sparse series such as per-epoch metrics).
    pub fn dashed(mut self) -> Self {
        self.style = Style::Dashed;
        self
    }
}

/// One chart: a title, axis labels and its lines.
#[derive(Clone, Debug, PartialEq)]
pub struct Chart {
    title: String,
    x_label: String,
    y_label: String,
    log_y: bool,
    series: Vec<Series>,
}

impl Chart {
    /// An empty chart with linear axes.
    pub fn new(title: impl Into<String>, x_label: impl Into<String>, y_label: impl Into<String>) -> Self {
        Chart {
            title: title.into(),
            x_label: x_label.into(),
            y_label: y_label.into(),
            log_y: false,
            series: Vec::new(),
        }
    }

    /// A logarithmic y axis (values that are not positive are left out, breaking the line).
    pub fn log_y(mut self) -> Self {
        self.log_y = true;
        self
    }

    /// Adds a line.
    pub fn series(mut self, s: Series) -> Self {
        self.series.push(s);
        self
    }

    /// Training loss per optimizer step, smoothed, and validation loss per epoch (at the epoch's
    /// last step) when the fit was validated: Lightning's `train_loss` and `val_loss` curves, over
    /// the whole run (a resumed fit's history includes the steps before its checkpoint).
    pub fn from_report(title: impl Into<String>, report: &FitReport) -> Self {
        let mut chart = Chart::new(title, "step", "loss").series(training_loss("training loss", report));
        if let Some(val) = validation_loss("validation loss", report) {
            chart = chart.series(val);
        }
        chart
    }
}

/// A run's training loss per step, [`Series::smoothed`].
pub fn training_loss(label: impl Into<String>, report: &FitReport) -> Series {
    let points = report.history.iter().map(|s| (s.step as f64, s.loss)).collect();
    Series::new(label, points).smoothed()
}

/// A run's validation loss at the last step of each epoch, [`Series::dashed`]; `None` when the
/// fit was not validated.
pub fn validation_loss(label: impl Into<String>, report: &FitReport) -> Option<Series> {
    let epoch_ends = report
        .history
        .iter()
        .enumerate()
        .filter(|(i, s)| report.history.get(i + 1).is_none_or(|n| n.epoch != s.epoch))
        .map(|(_, s)| s.step as f64);
    let points: Vec<(f64, f64)> = epoch_ends
        .zip(&report.validation)
        .map(|(x, m)| (x, m.loss()))
        .collect();
    (!points.is_empty()).then(|| Series::new(label, points).dashed())
}

const PANEL_W: f64 = 480.0;
const PLOT_H: f64 = 300.0;
const LEFT: f64 = 62.0;
const RIGHT: f64 = 16.0;
const TOP: f64 = 30.0;
const BOTTOM: f64 = 42.0;
const LEGEND_ROW: f64 = 16.0;
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

/// Tick positions on a log axis over `[lo, hi]` (both positive): the powers of ten inside, with
/// 2× and 5× between them when the range spans fewer than two decades.
fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let (a, b) = (lo.log10().floor() as i32, hi.log10().ceil() as i32);
    let mults: &[f64] = if b - a <= 2 { &[1.0, 2.0, 5.0] } else { &[1.0] };
    (a..=b)
        .flat_map(|e| mults.iter().map(move |m| m * 10f64.powi(e)))
        .filter(|t| (lo..=hi).contains(t))
        .collect()
}

/// A value on a loss axis: decimals without trailing zeros, or `1e-5` below a thousandth.
fn label(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if a < 1e-3 {
        let s = format!("{v:.1e}");
        s.replace(".0e", "e")
    } else if a >= 1e4 {
        count_label(v)
    } else {
        let s = format!("{v:.4}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// A count (a step number): `950`, `50k`, `1.5M`.
fn count_label(v: f64) -> String {
    let a = v.abs();
    let (scaled, unit) = match a {
        a if a >= 1e9 => (v / 1e9, "G"),
        a if a >= 1e6 => (v / 1e6, "M"),
        a if a >= 1e3 => (v / 1e3, "k"),
        _ => (v, ""),
    };
    let s = format!("{scaled:.2}");
    format!("{}{unit}", s.trim_end_matches('0').trim_end_matches('.'))
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

/// TensorBoard's smoothing: an exponential moving average with weight `w`, debiased (divided by
/// `1 - w^n`) so the curve starts at the data rather than at 0. Non-finite values are skipped.
fn ema(points: &[(f64, f64)], w: f64) -> Vec<(f64, f64)> {
    let (mut acc, mut n) = (0.0, 0);
    points
        .iter()
        .filter(|p| p.1.is_finite())
        .map(|&(x, y)| {
            acc = acc * w + (1.0 - w) * y;
            n += 1;
            (x, acc / (1.0 - w.powi(n)))
        })
        .collect()
}

/// The smoothing weight for `n` points: a span of 2% of them, and at least TensorBoard's default
/// weight, 0.6 (a span of 4 points).
fn ema_weight(n: usize) -> f64 {
    let span = (n as f64 / 50.0).max(4.0);
    1.0 - 2.0 / (span + 1.0)
}

/// The points' runs of finite values, split where one is not; on a log axis (`log`) the values
/// it cannot show (0, negative) are left out without breaking the run, as a loss of exactly 0
/// (an f32 cross-entropy that underflowed) is a point below the axis, not a gap.
fn runs(points: &[(f64, f64)], log: bool) -> Vec<Vec<(f64, f64)>> {
    points
        .split(|p| !(p.0.is_finite() && p.1.is_finite()))
        .map(|r| {
            r.iter()
                .copied()
                .filter(|p| !log || p.1 > 0.0)
                .collect::<Vec<_>>()
        })
        .filter(|r| !r.is_empty())
        .collect()
}

/// The frame a panel draws into: data coordinates to pixels.
struct Frame {
    x0: f64,
    xlo: f64,
    xhi: f64,
    ylo: f64,
    yhi: f64,
    log: bool,
}

impl Frame {
    const W: f64 = PANEL_W - LEFT - RIGHT;
    const H: f64 = PLOT_H - TOP - BOTTOM;

    fn x(&self, x: f64) -> f64 {
        self.x0 + LEFT + (x - self.xlo) / (self.xhi - self.xlo) * Self::W
    }

    fn y(&self, y: f64) -> f64 {
        let t = |v: f64| if self.log { v.log10() } else { v };
        TOP + Self::H - (t(y) - t(self.ylo)) / (t(self.yhi) - t(self.ylo)) * Self::H
    }

    /// A run decimated to the pixels: per pixel column, its last point.
    fn line(&self, run: &[(f64, f64)]) -> Vec<(f64, f64)> {
        let mut out: Vec<(f64, f64)> = Vec::new();
        for &(x, y) in run {
            let p = (self.x(x), self.y(y));
            match out.last_mut() {
                Some(last) if last.0.round() == p.0.round() => *last = p,
                _ => out.push(p),
            }
        }
        out
    }

    /// A run decimated to the pixels as a band: per pixel column, its lowest and highest value.
    fn band(&self, run: &[(f64, f64)]) -> Vec<(f64, f64)> {
        let mut cols: Vec<(f64, f64, f64)> = Vec::new(); // (column, top pixel, bottom pixel)
        for &(x, y) in run {
            let (px, py) = (self.x(x).round(), self.y(y));
            match cols.last_mut() {
                Some(c) if c.0 == px => {
                    c.1 = c.1.min(py);
                    c.2 = c.2.max(py);
                }
                _ => cols.push((px, py, py)),
            }
        }
        cols.iter()
            .flat_map(|&(x, top, bottom)| [(x, top), (x, bottom)])
            .collect()
    }
}

fn polyline(out: &mut String, pts: &[(f64, f64)], attrs: &str) {
    let text: Vec<String> = pts.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
    let _ = write!(
        out,
        r#"<polyline fill="none" {attrs} points="{}"/>"#,
        text.join(" ")
    );
}

fn panel(out: &mut String, chart: &Chart, x0: f64) {
    let log = chart.log_y;
    // Bands of raw values are drawn unless they would hide each other (precisions overlaid).
    let smoothed_lines = chart.series.iter().filter(|s| s.style == Style::Smoothed).count();
    let bands = smoothed_lines <= 2;
    // What each series draws as its line: a smoothed series its moving average.
    let lines: Vec<Vec<(f64, f64)>> = chart
        .series
        .iter()
        .map(|s| match s.style {
            Style::Smoothed => ema(&s.points, ema_weight(s.points.len())),
            _ => s.points.clone(),
        })
        .collect();
    // The axes cover what is drawn: the lines, and the raw values where their bands are shown.
    let drawn = || {
        let raw = chart
            .series
            .iter()
            .filter(|s| bands && s.style == Style::Smoothed)
            .flat_map(|s| s.points.iter());
        lines.iter().flatten().chain(raw)
    };
    let (xlo, xhi) = range(drawn().map(|p| p.0));
    let (ylo, yhi) = if log {
        // range() widens one value by +-0.5, which a log axis cannot take: widen by 2x instead.
        let positive = || drawn().map(|p| p.1).filter(|&y| y.is_finite() && y > 0.0);
        let lo = positive().fold(f64::INFINITY, f64::min);
        let hi = positive().fold(f64::NEG_INFINITY, f64::max);
        let (lo, hi) = match (lo.is_finite(), lo < hi) {
            (false, _) => (1e-3, 1.0),
            (true, false) => (lo / 2.0, hi * 2.0),
            (true, true) => (lo, hi),
        };
        let pad = (hi / lo).powf(0.05);
        (lo / pad, hi * pad)
    } else {
        let (ylo, yhi) = range(drawn().map(|p| p.1));
        let pad = 0.05 * (yhi - ylo);
        (ylo - pad, yhi + pad)
    };
    let f = Frame {
        x0,
        xlo,
        xhi,
        ylo,
        yhi,
        log,
    };
    let (w, h) = (Frame::W, Frame::H);
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
        let x = f.x(t);
        let _ = write!(
            out,
            r##"<line x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{:.1}" stroke="#444"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            TOP + h,
            TOP + h + 4.0,
            TOP + h + 16.0,
            count_label(t)
        );
    }
    // A log axis over less than a decade has too few round powers: take linear round values.
    let yticks = match log_ticks(ylo, yhi) {
        t if log && t.len() >= 3 => t,
        _ => ticks(ylo, yhi),
    };
    for t in yticks {
        let y = f.y(t);
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
    let y_label = if log {
        format!("{} (log scale)", chart.y_label)
    } else {
        chart.y_label.clone()
    };
    let _ = write!(
        out,
        r##"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text><text transform="translate({:.1},{:.1}) rotate(-90)" text-anchor="middle">{}</text>"##,
        x0 + LEFT + w / 2.0,
        PLOT_H - 8.0,
        escape(&chart.x_label),
        x0 + 14.0,
        TOP + h / 2.0,
        escape(&y_label)
    );
    // Bands first, so every line is drawn over every band.
    for (i, s) in chart.series.iter().enumerate() {
        if s.style == Style::Smoothed && bands {
            let colour = COLOURS[i % COLOURS.len()];
            for run in runs(&s.points, log) {
                let attrs = format!(r#"stroke="{colour}" stroke-opacity="0.25" stroke-width="1""#);
                polyline(out, &f.band(&run), &attrs);
            }
        }
    }
    for (i, (s, line)) in chart.series.iter().zip(&lines).enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let runs = runs(line, log);
        let dash = if s.style == Style::Dashed {
            r#" stroke-dasharray="6 4""#
        } else {
            ""
        };
        for run in runs {
            let attrs = format!(r#"stroke="{colour}" stroke-width="1.5"{dash}"#);
            polyline(out, &f.line(&run), &attrs);
            if s.style == Style::Dashed {
                for &(x, y) in &run {
                    let _ = write!(
                        out,
                        r#"<circle cx="{:.1}" cy="{:.1}" r="2.5" fill="{colour}"/>"#,
                        f.x(x),
                        f.y(y)
                    );
                }
            }
        }
        // The legend: a strip of its own under the plot, one row per series.
        let ly = PLOT_H + LEGEND_ROW * (i as f64 + 0.75);
        let lx = x0 + LEFT;
        let what = match s.style {
            Style::Smoothed if bands => " (smoothed; faint: every step)",
            Style::Smoothed => " (smoothed)",
            _ => "",
        };
        let _ = write!(
            out,
            r#"<line x1="{lx:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="{colour}" stroke-width="2"{dash}/><text x="{:.1}" y="{ly:.1}">{}{what}</text>"#,
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
    let rows = charts.iter().map(|c| c.series.len()).max().unwrap_or(0);
    let height = PLOT_H + LEGEND_ROW * rows as f64 + 6.0;
    let mut out = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">"#
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

    /// The numbers in a polyline's `points`.
    fn polylines(svg: &str) -> Vec<Vec<(f64, f64)>> {
        svg.split("points=\"")
            .skip(1)
            .map(|rest| {
                rest.split('"')
                    .next()
                    .unwrap()
                    .split(' ')
                    .map(|p| {
                        let (x, y) = p.split_once(',').unwrap();
                        (x.parse().unwrap(), y.parse().unwrap())
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn ticks_are_round_and_read_as_people_write_them() {
        assert_eq!(ticks(0.0, 10.0), vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0]);
        let labels: Vec<String> = ticks(0.13, 0.61).into_iter().map(label).collect();
        assert_eq!(labels, ["0.2", "0.3", "0.4", "0.5", "0.6"]);
        assert_eq!(ticks(1.0, 450.0), vec![100.0, 200.0, 300.0, 400.0]);
        assert_eq!(label(0.30000000000000004), "0.3");
        assert_eq!(label(2e-5), "2e-5");
        assert_eq!(label(0.001), "0.001");
        // A step axis: no "50000" beside "1e5".
        let steps: Vec<String> = ticks(0.0, 128_000.0).into_iter().map(count_label).collect();
        assert_eq!(steps, ["0", "50k", "100k"]);
        assert_eq!(count_label(1_500_000.0), "1.5M");
        assert_eq!(count_label(950.0), "950");
        // A log axis: the powers of ten, with 2 and 5 between them over a short range.
        assert_eq!(log_ticks(0.004, 30.0), vec![0.01, 0.1, 1.0, 10.0]);
        let short: Vec<String> = log_ticks(0.15, 3.0).into_iter().map(label).collect();
        assert_eq!(short, ["0.2", "0.5", "1", "2"]);
    }

    #[test]
    fn smoothing_is_tensorboards_debiased_moving_average() {
        // The first point is the data itself (debiased), then w * previous + (1 - w) * point.
        let s = ema(&[(0.0, 2.0), (1.0, 4.0), (2.0, f64::NAN), (3.0, 4.0)], 0.5);
        assert_eq!(s[0], (0.0, 2.0));
        assert_eq!(s[1], (1.0, (0.5 * 1.0 + 2.0) / 0.75)); // (0.5*(0.5*2) + 0.5*4) / (1 - 0.25)
        assert_eq!(s.len(), 3, "NaN is skipped");
        assert_eq!(ema_weight(50), 0.6, "few points: TensorBoard's default");
        assert!((ema_weight(128_000) - (1.0 - 2.0 / 2561.0)).abs() < 1e-12);
    }

    #[test]
    fn a_long_run_is_decimated_to_the_pixels_with_its_legend_below_the_data() {
        // 128 000 noisy steps, as the command line's defaults produce.
        let points: Vec<(f64, f64)> = (0..128_000)
            .map(|i| {
                (
                    i as f64,
                    1.0 / (1.0 + i as f64 / 1000.0) + 0.3 * ((i * 7919 % 101) as f64 / 101.0),
                )
            })
            .collect();
        let chart = Chart::new("run", "step", "loss")
            .log_y()
            .series(Series::new("training loss", points).smoothed());
        let s = svg(&[chart]);
        assert!(s.len() < 60_000, "{} bytes", s.len());
        let lines = polylines(&s);
        assert_eq!(lines.len(), 2, "the band and the smoothed line");
        assert!(
            lines[0].len() <= 2 * (Frame::W as usize + 2),
            "band: {} points",
            lines[0].len()
        );
        assert!(
            lines[1].len() <= Frame::W as usize + 2,
            "line: {} points",
            lines[1].len()
        );
        // Every drawn point is inside the plot frame; the legend's text is under it.
        for (x, y) in lines.iter().flatten() {
            assert!((LEFT - 1.0..=PANEL_W - RIGHT + 1.0).contains(x), "x {x}");
            assert!((TOP - 1.0..=TOP + Frame::H + 1.0).contains(y), "y {y}");
        }
        let legend_y: f64 = s
            .split("<text x=\"87.0\" y=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap()
            .parse()
            .unwrap();
        assert!(legend_y > PLOT_H, "legend at y {legend_y}");
        assert!(s.contains(">100k<") && s.contains("loss (log scale)"), "{s}");
        // The smoothed line runs inside the band, not along its edges.
        let (band, line) = (&lines[0], &lines[1]);
        let (top, bottom) = (band[band.len() - 2].1, band[band.len() - 1].1);
        let end = line.last().unwrap().1;
        assert!(top < end && end < bottom, "band {top}..{bottom}, line at {end}");
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
        // A log axis leaves out what it cannot show.
        let log = svg(&[Chart::new("t", "x", "y").log_y().series(Series::new(
            "a",
            vec![(0.0, 1.0), (1.0, 0.0), (2.0, 0.5), (3.0, 0.25)],
        ))]);
        assert_eq!(polylines(&log).iter().map(Vec::len).collect::<Vec<_>>(), [3]);
        // One value, small, on a log axis: drawn inside the frame.
        let one = svg(&[Chart::new("t", "x", "y")
            .log_y()
            .series(Series::new("a", vec![(0.0, 1e-4), (1.0, 1e-4)]))]);
        for (_, y) in polylines(&one).concat() {
            assert!((TOP..=TOP + Frame::H).contains(&y), "y {y}: {one}");
        }
        let empty = svg(&[Chart::new("none", "x", "y")]);
        assert!(empty.ends_with("</svg>\n"));
    }
}
