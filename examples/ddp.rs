//! Data-parallel training over MPI (`Trainer<P, Cpu, Ddp<Mpi>>`), measured and checked.
//!
//! ```text
//! cargo run --release --features mpi --example ddp              # the table: 1 process x 2 threads
//!                                                               # against 2 ranks x 1 thread
//! cargo run --release --features mpi --example ddp -- --precision bf16-mixed --steps 60
//! ```
//!
//! Started outside `mpirun`, the example times one process, then runs itself under
//! `mpirun -np 2` for the data-parallel figures, and prints both with their ratio. The two train the
//! same steps: a global batch of `B` rows per step, as one batch of `B` on 2 threads or as 2 ranks
//! with `B / 2` rows each on 1 thread.
//!
//! Two more modes serve the tests (`tests/ddp.rs`): `check DIR PRECISION [ACCUMULATE [HOOK]]` trains the
//! digits MLP and writes, per rank, a digest of the parameters and gradients at every step and the
//! final parameters (`DIR/rank<r>.txt`); `fail` makes rank 1 return an error at its third step,
//! and `die` makes it abort there. With the `cuda` feature, `check-nccl DIR [ACCUMULATE]` is
//! `check` under bf16-mixed on GPUs under `Ddp<Nccl>` (`tools/gpu-check.sh`, two GPUs).

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use nbit::autocast::Autocast;
use nbit::data::{Batch, DataLoader, Dataset, Task};
use nbit::nn::{InitCtx, Parameter};
use nbit::optim::{Optimization, Sgd};
use nbit::prelude::*;
use nbit::{LayerSummary, Metrics, StepInfo, launch};

/// An MLP that, as the test mode asks, records a digest of its parameters and gradients before
/// every optimizer step, or fails on one rank.
struct Probe<P: Precision, D: Backend> {
    mlp: MlpModel<P, D>,
    digests: Vec<u64>,
    /// Whether every gradient the optimizer has seen was a bf16 value (what the bf16
    /// compression hook delivers).
    grads_bf16: bool,
    fail_on_rank: Option<usize>,
    /// Whether the failing rank dies (aborts) rather than returning an error.
    dies: bool,
    rank: usize,
}

/// FNV-1a over the values' f64 bits: equal digests mean equal values (to the digest's odds).
fn digest(h: &mut u64, values: impl Iterator<Item = f64>) {
    for v in values {
        for b in v.to_bits().to_le_bytes() {
            *h = (*h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
    }
}

impl<P: Precision, D: Backend> Model<P, D> for Probe<P, D> {
    fn configure_model(&mut self, ctx: &mut InitCtx<P, D>) -> Result<(), Error> {
        Model::<P, D>::configure_model(&mut self.mlp, ctx)
    }
    fn training_step(
        &mut self,
        ac: &Autocast<P, D>,
        batch: &Batch,
        step: &StepInfo,
    ) -> Result<Tensor<P::Full, D>, Error> {
        if self.fail_on_rank == Some(self.rank) && step.global_step == 2 {
            if self.dies {
                eprintln!("rank {} dies (the ddp example's die mode)", self.rank);
                std::process::abort();
            }
            return Err(Error::InvalidData(format!(
                "rank {} cannot read its batch {} (a failure the ddp example makes on purpose)",
                self.rank, step.batch_idx
            )));
        }
        self.mlp.training_step(ac, batch, step)
    }
    fn validation_step(&mut self, ac: &Autocast<P, D>, batch: &Batch) -> Result<Metrics, Error> {
        self.mlp.validation_step(ac, batch)
    }
    fn configure_optimizers(&self) -> Optimization {
        self.mlp.configure_optimizers()
    }
    fn on_before_optimizer_step(&mut self, grads: &[(&str, &Tensor<P::Param, D>)]) {
        let mut h = 0xcbf2_9ce4_8422_2325;
        for p in self.mlp.parameters_mut() {
            digest(&mut h, p.value().to_vec().into_iter().map(|v| v.as_f64()));
        }
        for (_, g) in grads {
            let values: Vec<f64> = g.to_vec().into_iter().map(|v| v.as_f64()).collect();
            self.grads_bf16 &= values
                .iter()
                .all(|&v| nbit::half::bf16::from_f64(v).to_f64() == v);
            digest(&mut h, values.into_iter());
        }
        self.digests.push(h);
    }
    fn parameters_mut(&mut self) -> Vec<&mut Parameter<P::Param, D>> {
        self.mlp.parameters_mut()
    }
    fn layers(&mut self) -> Vec<LayerSummary> {
        self.mlp.layers()
    }
}

/// `check` and `fail`: the digits MLP under `Ddp<Mpi>` (or one process accumulating `accumulate`
/// batches per step, the reference), each rank writing what the tests compare.
struct Check {
    dir: Option<PathBuf>,
    accumulate: usize,
    fail: bool,
    dies: bool,
    hook: nbit::strategy::CommHook,
}

impl RunJob for Check {
    type Output = ();
    fn run<P: Precision, D: Runs<P>>(self) -> Result<(), Error> {
        // The reference (one process accumulating) is a plain single-device run.
        if self.accumulate > 1 {
            self.train::<P, D, SingleDevice>()
        } else {
            self.train::<P, D, Ddp<Mpi>>()
        }
    }
}

impl Check {
    /// Trains under `P` on `D` with the strategy `S` and writes this rank's file.
    fn train<P: Precision, D: Runs<P> + Hosts<S>, S: Strategy>(self) -> Result<(), Error> {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/data/digits.csv");
        let data = Dataset::read_csv_labelled(path.as_ref(), Task::Classification, "label")?;
        let (train, val) = data.split(0.2, 0)?;
        // 1438 rows in batches of 30: 48 batches, even, so 2 or 4 ranks deal them evenly.
        let loader = DataLoader::new(train.for_precision::<P>()?, 30)?
            .shuffle(true)
            .seed(3);
        let val = DataLoader::new(val.for_precision::<P>()?, 64)?;
        let trainer = Trainer::<P, D, S>::builder()
            .max_epochs(2)
            .accumulate_grad_batches(self.accumulate)
            .ddp_comm_hook(self.hook)
            .enable_progress_bar(false)
            .build()?;
        // Each rank draws other initial weights from its own seed: the broadcast must fix that.
        let rank = trainer.global_rank();
        let mut model = trainer.init_module(|ctx| -> Result<_, Error> {
            let opt = Optimization::new(Sgd::new(0.05).momentum(0.9));
            let mlp = MlpModel::new(ctx, &[64, 32, 10], Task::Classification, opt)?;
            Ok(Probe {
                mlp,
                digests: Vec::new(),
                grads_bf16: true,
                fail_on_rank: self.fail.then_some(1),
                dies: self.dies,
                rank,
            })
        })?;
        let _ = model.mlp.parameters_mut()[0].set(Tensor::from_vec(
            &[32, 64],
            (0..32 * 64)
                .map(|i| P::Param::from_f64(((i * 7 + rank * 13) % 17) as f64 / 40.0 - 0.2))
                .collect(),
        )?);
        let report = trainer.fit(&mut model, &loader, Some(&val))?;
        let Some(dir) = self.dir else { return Ok(()) };
        let mut text = String::new();
        for (s, d) in report.history.iter().zip(&model.digests) {
            let _ = writeln!(text, "step {} loss {:?} digest {d:016x}", s.step, s.loss);
        }
        let m = report.validation.last().copied().unwrap_or_default();
        let _ = writeln!(
            text,
            "val_loss {:?} correct {} count {}",
            m.loss(),
            m.correct,
            m.count
        );
        let _ = writeln!(text, "grads_bf16 {}", model.grads_bf16);
        let params: Vec<String> = model
            .parameters_mut()
            .iter()
            .flat_map(|p| p.value().to_vec())
            .map(|v| format!("{:?}", v.as_f64()))
            .collect();
        let _ = writeln!(text, "params {}", params.join(" "));
        nbit::write_atomic(&dir.join(format!("rank{rank}.txt")), text.as_bytes())
    }
}

/// One measurement: samples/s of `steps` steps of `global` rows on the MLP `sizes`.
struct Measure {
    sizes: Vec<usize>,
    global: usize,
    steps: usize,
}

/// Samples/s, and the share of the time spent in collectives (rank 0's).
impl RunJob for Measure {
    type Output = (f64, f64, usize);
    fn run<P: Precision, D: Runs<P>>(self) -> Result<(f64, f64, usize), Error> {
        // One process never starts MPI: a process that has (as a job of one) passes its MPI
        // settings to the `mpirun` it starts next, which then fails.
        if nbit::strategy::launched_by_mpi() {
            measure::<P, D, Ddp<Mpi>>(self, 1)
        } else {
            measure::<P, D, SingleDevice>(self, 2)
        }
    }
}

/// [`Measure`] under the strategy `S` with `threads` threads per process.
fn measure<P: Precision, D: Runs<P> + Hosts<S>, S: Strategy>(
    m: Measure,
    threads: usize,
) -> Result<(f64, f64, usize), Error> {
    let trainer = Trainer::<P, D, S>::builder()
        .max_epochs(1)
        .enable_progress_bar(false)
        .num_threads(threads)
        .build()?;
    let (world, rank) = (trainer.world_size(), trainer.global_rank());
    let batch = m.global / world;
    let (inputs, classes) = (m.sizes[0], m.sizes[m.sizes.len() - 1]);
    // One warm-up step of every rank's batches, then the timed steps.
    let rows = batch * world * (m.steps + 1);
    let mut s = 7u64;
    let mut next = || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (s >> 11) as f64 / (1u64 << 53) as f64
    };
    let x = nbit::ndarray::Array2::from_shape_fn((rows, inputs), |_| next() * 2.0 - 1.0);
    let y = (0..rows)
        .map(|_| (next() * classes as f64) as usize % classes)
        .collect();
    let all = Dataset::classification(x, y)?.for_precision::<P>()?;
    let warm = all.subset(&(0..batch * world).collect::<Vec<_>>());
    let timed = all.subset(&(batch * world..rows).collect::<Vec<_>>());
    let opt = Optimization::new(Sgd::new(0.01).momentum(0.9));
    let mut model = trainer.init_module(|ctx| MlpModel::new(ctx, &m.sizes, Task::Classification, opt))?;
    trainer.fit(&mut model, &DataLoader::new(warm, batch)?, None)?;
    let start = Instant::now();
    let r = trainer.fit(&mut model, &DataLoader::new(timed, batch)?, None)?;
    let secs = start.elapsed().as_secs_f64();
    Ok((r.samples as f64 / secs, r.communication_seconds / secs, rank))
}

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("check") => {
            let dir = PathBuf::from(args.get(1).expect("check DIR PRECISION [ACCUMULATE [HOOK]]"));
            let precision = args.get(2).map_or("32-true", String::as_str);
            let accumulate = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(1);
            let hook = args.get(4).map_or(Ok(Default::default()), |h| h.parse())?;
            let check = Check {
                dir: Some(dir),
                accumulate,
                fail: false,
                dies: false,
                hook,
            };
            return launch(precision, "cpu", check);
        }
        // The same on GPUs, gradients summed by NCCL (tools/gpu-check.sh, two GPUs).
        #[cfg(feature = "cuda")]
        Some("check-nccl") => {
            let dir = PathBuf::from(args.get(1).expect("check-nccl DIR [ACCUMULATE]"));
            let accumulate = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(1);
            let check = Check {
                dir: Some(dir),
                accumulate,
                fail: false,
                dies: false,
                hook: Default::default(),
            };
            if accumulate > 1 {
                return check.train::<Mixed<BF16>, Gpu, SingleDevice>();
            }
            return check.train::<Mixed<BF16>, Gpu, Ddp<Nccl>>();
        }
        Some(mode @ ("fail" | "die")) => {
            let check = Check {
                dir: None,
                accumulate: 1,
                fail: true,
                dies: mode == "die",
                hook: Default::default(),
            };
            return launch("32-true", "cpu", check);
        }
        _ => {}
    }
    let precision = arg(&args, "--precision", "32-true".to_string());
    let steps = arg(&args, "--steps", 40usize);
    let cases: [(&str, Vec<usize>, usize); 2] = [
        ("small 64-128-128-10", vec![64, 128, 128, 10], 128),
        ("big 784-1024-1024-10", vec![784, 1024, 1024, 10], 256),
    ];
    if nbit::strategy::launched_by_mpi() {
        // A rank of the measurement below: rank 0 prints one line per case.
        for (_, sizes, global) in cases {
            let (rate, comm, rank) = launch(&*precision, "cpu", Measure { sizes, global, steps })?;
            if rank == 0 {
                println!("{rate} {comm}");
            }
        }
        return Ok(());
    }
    let mut one = Vec::new();
    for (_, sizes, global) in cases.clone() {
        one.push(launch(&*precision, "cpu", Measure { sizes, global, steps })?.0);
    }
    let me = std::env::current_exe().map_err(|e| Error::InvalidData(e.to_string()))?;
    let out = std::process::Command::new("mpirun")
        .args(["-np", "2", "--allow-run-as-root"])
        .arg(&me)
        .args(&args)
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .output()
        .map_err(|e| Error::InvalidData(format!("mpirun: {e} (apt-get install openmpi-bin)")))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<(f64, f64)> = text
        .lines()
        .filter_map(|l| {
            let mut v = l.split_whitespace().map(|x| x.parse::<f64>());
            Some((v.next()?.ok()?, v.next()?.ok()?))
        })
        .collect();
    if !out.status.success() || lines.len() != cases.len() {
        return Err(Error::InvalidData(format!(
            "mpirun -np 2 failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    println!(
        "data parallel over MPI on {} ({steps} steps per case, {precision})",
        Cpu::describe()
    );
    println!(
        "| case | 1 process x 2 threads (samples/s) | 2 ranks x 1 thread (samples/s) | ratio | all-reduce share of a rank's step |"
    );
    println!("|---|---|---|---|---|");
    for (((name, _, global), one), (two, comm)) in cases.iter().zip(one).zip(lines) {
        println!(
            "| {name}, {global} rows per step | {one:.0} | {two:.0} | {:.2} | {:.1}% |",
            two / one,
            100.0 * comm
        );
    }
    Ok(())
}
