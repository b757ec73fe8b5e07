//! Training throughput of an MLP (ReLU, cross-entropy, SGD with momentum) through the Trainer.
//!
//! ```text
//! cargo bench --bench bench_mlp -- --precision bf16-mixed --inputs 784 --hidden 1024,1024 \
//!     --classes 10 --batch-size 256 --samples 8192 --epochs 3 --threads 2
//! cargo bench --features cuda --bench bench_mlp -- --precision 16-mixed --accelerator gpu
//! ```
//!
//! Data are seeded synthetic features and labels. Each epoch is one `fit`, timed alone; the
//! first is a warm-up when there are several, and the figure is the median of the rest. The last
//! line is
//! `samples_per_sec=<number>`; `tools/bench_mlp_vs_pytorch.py` runs the same configurations in
//! plain PyTorch and prints the ratio table.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use nbit::data::{DataLoader, Dataset};
use nbit::nn::Task;
use nbit::optim::{Optimization, Sgd};
use nbit::prelude::*;

/// The system allocator, counting calls and bytes: the report gives heap allocations per
/// training step (the steady state, after the warm-up epoch), and the live heap at rest and at
/// its peak.
struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);
static LIVE: AtomicU64 = AtomicU64::new(0);
static PEAK: AtomicU64 = AtomicU64::new(0);

fn grew(bytes: usize) {
    let live = LIVE.fetch_add(bytes as u64, Ordering::Relaxed) + bytes as u64;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

// SAFETY: every call is forwarded to `System` unchanged; the counters are only statistics.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
        grew(layout.size());
        // SAFETY: the caller's contract is System's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as u64, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
        grew(layout.size());
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(new_size as u64, Ordering::Relaxed);
        LIVE.fetch_sub(layout.size() as u64, Ordering::Relaxed);
        grew(new_size);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// The process's peak resident set (VmHWM) in bytes, from /proc/self/status (Linux).
fn peak_rss() -> Option<u64> {
    status_bytes("VmHWM:")
}

/// A size from /proc/self/status (Linux), in bytes.
fn status_bytes(key: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Starts the peak resident set again from the current one (Linux: `5` to clear_refs), so that
/// the peak measured after it is training's, not the data set-up's; whether that worked.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

#[global_allocator]
static GLOBAL: Counting = Counting;

struct Args {
    precision: String,
    inputs: usize,
    hidden: Vec<usize>,
    classes: usize,
    batch: usize,
    samples: usize,
    epochs: u64,
    threads: Option<usize>,
    accelerator: String,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        precision: "32-true".into(),
        inputs: 784,
        hidden: vec![1024, 1024],
        classes: 10,
        batch: 256,
        samples: 8192,
        epochs: 3,
        threads: None,
        accelerator: "cpu".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--bench" {
            continue; // added by `cargo bench`
        }
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let num = |v: &str| v.parse::<usize>().map_err(|e| format!("{flag} {v}: {e}"));
        match flag.as_str() {
            "--precision" => a.precision = value,
            "--inputs" => a.inputs = num(&value)?,
            "--hidden" => a.hidden = value.split(',').map(num).collect::<Result<_, _>>()?,
            "--classes" => a.classes = num(&value)?,
            "--batch-size" => a.batch = num(&value)?,
            "--samples" => a.samples = num(&value)?,
            "--epochs" => a.epochs = num(&value)? as u64,
            "--threads" => a.threads = Some(num(&value)?),
            "--accelerator" => a.accelerator = value,
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    Ok(a)
}

/// The benchmark for the precision and device `nbit::launch` selects.
struct Bench<'a>(&'a Args);

impl RunJob for Bench<'_> {
    type Output = f64;
    fn run<P: Precision, D: Runs<P>>(self) -> Result<f64, Error> {
        run::<P, D>(self.0)
    }
}

fn run<P: Precision, D: Runs<P>>(a: &Args) -> Result<f64, Error> {
    let mut s = 7u64;
    let mut next = || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (s >> 11) as f64 / (1u64 << 53) as f64
    };
    let x = ndarray::Array2::from_shape_fn((a.samples, a.inputs), |_| next() * 2.0 - 1.0);
    let y = (0..a.samples)
        .map(|_| (next() * a.classes as f64) as usize % a.classes)
        .collect();
    // Features held in the dtype the model reads: f32 (32-true, mixed), bf16 / f16 (true
    // 16-bit) or f64.
    let data = DataLoader::new(Dataset::classification(x, y)?.for_precision::<P>()?, a.batch)?;
    let data_bytes = data.dataset().features().nbytes();
    let heap_before_model = LIVE.load(Ordering::Relaxed);
    let mut builder = Trainer::<P, D>::builder().enable_progress_bar(false).seed(1);
    if let Some(t) = a.threads {
        builder = builder.num_threads(t);
    }
    let trainer = builder.max_epochs(1).build()?;
    let mut sizes = vec![a.inputs];
    sizes.extend(&a.hidden);
    sizes.push(a.classes);
    let opt = Optimization::new(Sgd::new(0.01).momentum(0.9));
    let mut model = trainer.init_module(|ctx| MlpModel::new(ctx, &sizes, Task::Classification, opt))?;
    // One `fit` of one epoch at a time, timed separately; the first is a warm-up when there
    // is more than one (kernel choice, first allocations), and the median of the rest is the
    // figure (robust to a noisy neighbour on a shared machine).
    let mut rates = Vec::new();
    let mut last = f64::NAN;
    let (mut allocs, mut bytes, mut steps) = (0u64, 0u64, 0u64);
    let (mut rss_reset, mut rss_at_reset) = (false, None);
    for epoch in 0..a.epochs {
        if epoch == 1 || a.epochs == 1 {
            // The peaks from here on are the timed fits'.
            PEAK.store(LIVE.load(Ordering::Relaxed), Ordering::Relaxed);
            rss_reset = reset_peak_rss();
            rss_at_reset = status_bytes("VmRSS:");
        }
        let (a0, b0) = (ALLOCS.load(Ordering::Relaxed), BYTES.load(Ordering::Relaxed));
        let start = Instant::now();
        let r = trainer.fit(&mut model, &data, None)?;
        rates.push(a.samples as f64 / start.elapsed().as_secs_f64());
        last = r.history.last().map_or(f64::NAN, |s| s.loss);
        if epoch > 0 || a.epochs == 1 {
            allocs += ALLOCS.load(Ordering::Relaxed) - a0;
            bytes += BYTES.load(Ordering::Relaxed) - b0;
            steps += r.history.len() as u64;
        }
    }
    if rates.len() > 1 {
        rates.remove(0);
    }
    rates.sort_by(f64::total_cmp);
    let median = rates[rates.len() / 2];
    println!(
        "{} on {} ({}) {:?} batch {} threads {}: median of {} epochs {median:.0} samples/s, last loss {last:.4}",
        P::NAME,
        D::KIND,
        D::describe(),
        sizes,
        a.batch,
        nbit::backend::num_threads(),
        rates.len(),
    );
    let steps = steps.max(1);
    println!(
        "heap allocations per step: {} ({:.1} MB; timed fits, their set-up included)",
        allocs / steps,
        bytes as f64 / steps as f64 / 1e6
    );
    let mb = |b: u64| b as f64 / 1e6;
    let summary = trainer.summary(&mut model);
    let param_bytes = summary.total * std::mem::size_of::<P::Param>();
    println!(
        "memory (MB): data {:.1} ({} features); parameters {:.1} ({}); optimizer state {:.1}; \
         heap peak in a fit {:.1} (beyond the data: parameters, gradients, optimizer state, \
         activations, workspace); peak RSS {}",
        mb(data_bytes as u64),
        data.dataset().features().dtype(),
        mb(param_bytes as u64),
        <P::Param as nbit::Element>::DTYPE,
        mb(summary.optimizer_state_bytes as u64),
        mb(PEAK.load(Ordering::Relaxed).saturating_sub(heap_before_model)),
        match peak_rss() {
            Some(r) if rss_reset => format!(
                "{:.1} (reset before the timed fits, at {:.1})",
                mb(r),
                mb(rss_at_reset.unwrap_or(0))
            ),
            Some(r) => format!("{:.1} (whole process)", mb(r)),
            None => "unknown".into(),
        }
    );
    Ok(median)
}

fn main() {
    let a = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    let r = nbit::launch(a.precision.as_str(), &a.accelerator, Bench(&a));
    match r {
        Ok(sps) => println!("samples_per_sec={sps:.1}"),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}
