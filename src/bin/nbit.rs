//! `nbit`: train, validate and predict with an MLP from a CSV file under any precision string,
//! in the spirit of LightningCLI.
//!
//! Every problem with the input is one line on stderr starting with `error:` and exit code 2.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use nbit::data::{DataLoader, Dataset, Task};
use nbit::optim::{AdamW, Optimization, Sgd};
use nbit::{BackendJob, Error, Float, Job, MlpModel, Precision, Selection, Supports, Trainer};
use serde::Deserialize;

#[derive(Parser, Debug)]
#[command(
    name = "nbit",
    version,
    about = "Train an MLP on a CSV file under N-bit precision (Lightning's precision strings)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Train a model (Lightning's `trainer.fit`).
    Fit(Opts),
    /// Loss and accuracy of the weights given by --init on --data.
    Validate(Opts),
    /// Outputs of the weights given by --init on every row of --data, as CSV on stdout.
    Predict(Opts),
}

/// Options from the command line; a `--config` TOML file may set any of them (same names), and
/// the command line wins.
#[derive(Args, Deserialize, Debug, Default, Clone)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct Opts {
    /// CSV file with a header row; the column `label` holds class indices (or targets)
    #[arg(long)]
    data: Option<PathBuf>,
    /// A separate validation CSV file
    #[arg(long)]
    val_data: Option<PathBuf>,
    /// Hold out this fraction of --data for validation (seeded)
    #[arg(long, allow_hyphen_values = true)]
    val_split: Option<f64>,
    /// Number of classes (default: the largest label + 1)
    #[arg(long)]
    classes: Option<usize>,
    /// classification or regression [default: classification]
    #[arg(long)]
    task: Option<String>,
    /// Hidden layer widths, comma-separated [default: 128]
    #[arg(long, allow_hyphen_values = true)]
    hidden: Option<String>,
    /// 16-mixed, bf16-mixed, 16-true, bf16-true, 32-true, 64-true (or legacy 16, 32, 64, bf16) [default: 32-true]
    #[arg(long)]
    precision: Option<String>,
    /// cpu, gpu, cuda, tpu or auto [default: auto]
    #[arg(long)]
    accelerator: Option<String>,
    /// Maximum epochs [default: 1000, Lightning's]
    #[arg(long)]
    epochs: Option<u64>,
    /// Maximum optimizer steps [default: no limit]
    #[arg(long)]
    max_steps: Option<u64>,
    /// Rows per batch [default: 1, PyTorch's DataLoader]
    #[arg(long, allow_hyphen_values = true)]
    batch_size: Option<i64>,
    /// Learning rate [default: 0.001]
    #[arg(long, allow_hyphen_values = true)]
    lr: Option<f64>,
    /// sgd or adamw [default: adamw]
    #[arg(long)]
    optimizer: Option<String>,
    /// SGD momentum [default: 0]
    #[arg(long, allow_hyphen_values = true)]
    momentum: Option<f64>,
    /// Weight decay [default: 0.01 for AdamW, 0 for SGD, as PyTorch]
    #[arg(long, allow_hyphen_values = true)]
    weight_decay: Option<f64>,
    /// Clip gradients by total norm at this value
    #[arg(long, allow_hyphen_values = true)]
    gradient_clip_val: Option<f64>,
    /// Micro-batches per optimizer step [default: 1]
    #[arg(long)]
    accumulate_grad_batches: Option<usize>,
    /// Seed of initialisation, shuffling and the validation split [default: 0]
    #[arg(long)]
    seed: Option<u64>,
    /// Batches are consecutive rows in file order (the last partial batch kept)
    #[arg(long)]
    #[serde(default)]
    no_shuffle: bool,
    /// Initial weights (safetensors, PyTorch state_dict names: 0.weight, 0.bias, 2.weight, ...)
    #[arg(long)]
    init: Option<PathBuf>,
    /// Write the trained weights here (safetensors that PyTorch loads)
    #[arg(long)]
    save: Option<PathBuf>,
    /// Write a training checkpoint here after every epoch (for --resume)
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Resume training from a checkpoint written by --checkpoint
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Write one row per optimizer step: step,epoch,loss,scale,skipped,lr
    #[arg(long)]
    log_csv: Option<PathBuf>,
    /// Read options from a TOML file (keys as the long options, e.g. batch-size = 32)
    #[arg(long)]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// Print a machine-readable JSON summary instead of the table
    #[arg(long)]
    #[serde(default)]
    json: bool,
    /// Hide the progress bar
    #[arg(long)]
    #[serde(default)]
    no_progress: bool,
}

macro_rules! merge {
    ($cli:expr, $file:expr, [$($opt:ident),*], [$($flag:ident),*]) => {
        Opts {
            $($opt: $cli.$opt.or($file.$opt),)*
            $($flag: $cli.$flag || $file.$flag,)*
            config: None,
        }
    };
}

impl Opts {
    /// These options over those of the --config file.
    fn with_config(self) -> Result<Opts, Error> {
        let Some(path) = self.config.clone() else {
            return Ok(self);
        };
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(&path).map_err(|e| Error::Io {
            path: shown.clone(),
            action: "read",
            reason: e.to_string(),
        })?;
        let file: Opts = toml::from_str(&text)
            .map_err(|e| Error::InvalidData(format!("config '{shown}': {}", e.message().trim())))?;
        Ok(merge!(
            self,
            file,
            [
                data,
                val_data,
                val_split,
                classes,
                task,
                hidden,
                precision,
                accelerator,
                epochs,
                max_steps,
                batch_size,
                lr,
                optimizer,
                momentum,
                weight_decay,
                gradient_clip_val,
                accumulate_grad_batches,
                seed,
                init,
                save,
                checkpoint,
                resume,
                log_csv
            ],
            [no_shuffle, json, no_progress]
        ))
    }
}

fn invalid(name: &'static str, value: impl ToString, expected: &'static str) -> Error {
    Error::InvalidArgument {
        name,
        value: value.to_string(),
        expected,
    }
}

fn parse_hidden(text: &str) -> Result<Vec<usize>, Error> {
    if text.trim().is_empty() {
        return Ok(vec![]);
    }
    text.split(',')
        .map(|w| w.trim().parse::<usize>().ok().filter(|&w| w > 0))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| {
            invalid(
                "--hidden",
                format!("'{text}'"),
                "comma-separated layer widths >= 1, like 128,128",
            )
        })
}

/// Fails early, before any training, if `path` could not be written: its folder must exist and
/// accept a file. Nothing is left behind.
fn check_writable(flag: &'static str, path: &Path) -> Result<(), Error> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let probe = dir.join(format!(".nbit-write-test-{}", std::process::id()));
    match std::fs::File::create(&probe) {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) => Err(Error::Io {
            path: path.display().to_string(),
            action: "write",
            reason: format!("{e} (given to {flag}); choose a path in a writable folder"),
        }),
    }
}

/// Everything resolved from the options before the precision and device are known.
struct Plan {
    command: &'static str,
    opts: Opts,
    task: Task,
    train: Option<Dataset>,
    val: Option<Dataset>,
    sizes: Vec<usize>,
    optimization: Optimization,
    batch_size: usize,
}

fn plan(command: &'static str, opts: Opts) -> Result<Plan, Error> {
    let opts = opts.with_config()?;
    let task: Task = opts.task.as_deref().unwrap_or("classification").parse()?;
    if let Some(f) = opts.val_split {
        if !(0.0..1.0).contains(&f) {
            return Err(invalid("--val-split", f, "a fraction in [0, 1)"));
        }
    }
    let data_path = opts
        .data
        .clone()
        .ok_or_else(|| invalid("--data", "(missing)", "a CSV file to read"))?;
    let batch_size = match opts.batch_size.unwrap_or(1) {
        b if b >= 1 => b as usize,
        b => return Err(invalid("--batch-size", b, "at least 1")),
    };
    for (flag, p) in [
        ("--save", &opts.save),
        ("--log-csv", &opts.log_csv),
        ("--checkpoint", &opts.checkpoint),
    ] {
        if let Some(p) = p {
            check_writable(flag, p)?;
        }
    }
    let (mut train, mut val) = (None, None);
    let features;
    if command == "predict" {
        let d = Dataset::read_csv_features(&data_path)?;
        features = d.num_features();
        train = Some(d);
    } else {
        let d = Dataset::read_csv(&data_path, task)?;
        features = d.num_features();
        if command == "validate" {
            val = Some(d);
        } else {
            match (&opts.val_data, opts.val_split) {
                (Some(_), Some(_)) => {
                    return Err(invalid(
                        "--val-split",
                        opts.val_split.unwrap_or(0.0),
                        "not used together with --val-data",
                    ));
                }
                (Some(p), None) => {
                    let v = Dataset::read_csv(p, task)?;
                    if v.num_features() != features {
                        return Err(Error::InvalidData(format!(
                            "'{}' has {} feature columns but '{}' has {features}",
                            p.display(),
                            v.num_features(),
                            data_path.display()
                        )));
                    }
                    val = Some(v);
                }
                (None, Some(f)) => {
                    let (t, v) = d.split(f, opts.seed.unwrap_or(0))?;
                    if t.is_empty() {
                        return Err(invalid(
                            "--val-split",
                            f,
                            "a fraction that leaves rows to train on",
                        ));
                    }
                    val = Some(v).filter(|v| !v.is_empty());
                    train = Some(t);
                }
                (None, None) => {}
            }
            if train.is_none() {
                train = Some(d);
            }
        }
    }
    let sizes = match (&opts.init, command) {
        // validate and predict take the architecture from the weights.
        (Some(init), "validate" | "predict") => {
            let s = nbit::mlp_sizes(init)?;
            if s[0] != features {
                return Err(Error::InvalidData(format!(
                    "'{}' expects {} features but '{}' has {features}",
                    init.display(),
                    s[0],
                    data_path.display()
                )));
            }
            s
        }
        (None, "validate" | "predict") => {
            return Err(invalid(
                "--init",
                "(missing)",
                "the weights file to evaluate (written by --save or PyTorch)",
            ));
        }
        _ => {
            let outputs = match task {
                Task::Regression => 1,
                Task::Classification => {
                    let seen = [&train, &val]
                        .into_iter()
                        .flatten()
                        .map(Dataset::num_classes)
                        .max()
                        .unwrap_or(0);
                    match opts.classes {
                        Some(c) if c < seen => {
                            return Err(invalid("--classes", c, "more than the largest label in the data"));
                        }
                        Some(0) => return Err(invalid("--classes", 0, "at least 1")),
                        Some(c) => c,
                        None => seen,
                    }
                }
            };
            let mut s = vec![features];
            s.extend(parse_hidden(opts.hidden.as_deref().unwrap_or("128"))?);
            s.push(outputs);
            s
        }
    };
    let lr = opts.lr.unwrap_or(1e-3);
    let optimization = match opts.optimizer.as_deref().unwrap_or("adamw") {
        "sgd" => Optimization::new(
            Sgd::new(lr)
                .momentum(opts.momentum.unwrap_or(0.0))
                .weight_decay(opts.weight_decay.unwrap_or(0.0)),
        ),
        "adamw" => Optimization::new(AdamW::new(lr).weight_decay(opts.weight_decay.unwrap_or(1e-2))),
        other => return Err(invalid("--optimizer", format!("'{other}'"), "'sgd' or 'adamw'")),
    };
    optimization.optimizer.validate()?;
    Ok(Plan {
        command,
        opts,
        task,
        train,
        val,
        sizes,
        optimization,
        batch_size,
    })
}

/// What a run reports (the table, or --json).
#[derive(serde::Serialize, Debug, Default)]
struct Report {
    command: &'static str,
    precision: String,
    accelerator: String,
    layers: Vec<usize>,
    epochs: u64,
    global_step: u64,
    skipped_steps: u64,
    final_loss: Option<f64>,
    val_loss: Option<f64>,
    val_accuracy: Option<f64>,
    samples_per_sec: Option<f64>,
    param_mb: f64,
    parameter_bytes: usize,
    optimizer_state_bytes: usize,
    notes: Vec<String>,
}

struct Run(Plan);

impl Job for Run {
    type Output = Result<Report, Error>;
    fn run<P: Precision, D: Supports<P>>(self) -> Self::Output {
        D::with_backend(OnBackend::<P>(self.0, core::marker::PhantomData))?
    }
}

struct OnBackend<P>(Plan, core::marker::PhantomData<P>);

impl<P: Precision, D: Supports<P>> BackendJob<D> for OnBackend<P> {
    type Output = Result<Report, Error>;
    fn run(self) -> Self::Output
    where
        D: nbit::backend::Backend,
    {
        let plan = self.0;
        let o = &plan.opts;
        let mut b = Trainer::<P, D>::builder()
            .seed(o.seed.unwrap_or(0))
            .enable_progress_bar(!o.no_progress && !o.json)
            .accumulate_grad_batches(o.accumulate_grad_batches.unwrap_or(1));
        if let Some(e) = o.epochs {
            b = b.max_epochs(e);
        }
        if let Some(s) = o.max_steps {
            b = b.max_steps(s);
        }
        if let Some(c) = o.gradient_clip_val {
            b = b.gradient_clip_val(c);
        }
        if let Some(c) = &o.checkpoint {
            b = b.checkpoint_path(c.clone());
        }
        let trainer = b.build()?;
        let mut model =
            trainer.init_module(|ctx| MlpModel::new(ctx, &plan.sizes, plan.task, plan.optimization))?;
        let mut report = Report {
            command: plan.command,
            precision: P::NAME.into(),
            accelerator: D::KIND.name().into(),
            layers: plan.sizes.clone(),
            ..Report::default()
        };
        if let Some(init) = &o.init {
            report.notes.extend(trainer.load_weights(&mut model, init)?);
        }
        let loader = |d: Dataset, shuffle: bool| -> Result<DataLoader, Error> {
            Ok(DataLoader::new(d, plan.batch_size)?
                .shuffle(shuffle)
                .seed(o.seed.unwrap_or(0)))
        };
        let val = plan.val.map(|v| loader(v, false)).transpose()?;
        match plan.command {
            "fit" => {
                let train = loader(plan.train.expect("fit has training data"), !o.no_shuffle)?;
                let start = std::time::Instant::now();
                let fit = match &o.resume {
                    Some(ckpt) => trainer.fit_from(&mut model, &train, val.as_ref(), ckpt)?,
                    None => trainer.fit(&mut model, &train, val.as_ref())?,
                };
                let secs = start.elapsed().as_secs_f64();
                report.samples_per_sec = Some(fit.samples as f64 / secs.max(1e-9));
                report.final_loss = fit.history.last().map(|s| s.loss);
                report.epochs = fit.epochs;
                report.global_step = fit.global_step;
                report.skipped_steps = fit.skipped_steps;
                report.optimizer_state_bytes = fit.optimizer_state_bytes;
                report.notes.extend(fit.notes);
                if let Some(m) = fit.validation.last() {
                    report.val_loss = Some(m.loss());
                    report.val_accuracy = (plan.task == Task::Classification).then(|| m.accuracy());
                }
                if let Some(path) = &o.log_csv {
                    let mut csv = String::from("step,epoch,loss,scale,skipped,lr\n");
                    for s in &fit.history {
                        // The loss in the dtype it was computed in, written exactly (16-bit) or
                        // with round-trip digits; a mean over micro-batches is written as f64.
                        let l = P::Full::from_f64(s.loss);
                        let loss = if l.as_f64() == s.loss {
                            nbit::fmt::exact(l)
                        } else {
                            nbit::fmt::exact(s.loss)
                        };
                        csv.push_str(&format!(
                            "{},{},{loss},{},{},{}\n",
                            s.step,
                            s.epoch,
                            s.scale,
                            u8::from(s.skipped),
                            s.lr
                        ));
                    }
                    nbit::write_atomic(path, csv.as_bytes())?;
                }
                if let Some(path) = &o.save {
                    trainer.save_weights(&model, path)?;
                }
            }
            "validate" => {
                let m = trainer.validate(&mut model, val.as_ref().expect("validate has data"))?;
                report.val_loss = Some(m.loss());
                report.val_accuracy = (plan.task == Task::Classification).then(|| m.accuracy());
            }
            _ => {
                let data = loader(plan.train.expect("predict has data"), false)?;
                let out = trainer.predict(&mut model, &data)?;
                let mut text = String::new();
                let cols = out.ncols();
                let header: Vec<String> = (0..cols).map(|i| format!("output{i}")).collect();
                if plan.task == Task::Classification {
                    text.push_str("prediction,");
                }
                text.push_str(&header.join(","));
                text.push('\n');
                for row in out.rows() {
                    if plan.task == Task::Classification {
                        text.push_str(&format!("{},", nbit::nn::argmax(row.iter().copied())));
                    }
                    let vals: Vec<String> = row.iter().map(|v| v.to_string()).collect();
                    text.push_str(&vals.join(","));
                    text.push('\n');
                }
                let _ = std::io::stdout().write_all(text.as_bytes());
            }
        }
        let params = nbit::Model::<P, D>::parameters(&model);
        report.parameter_bytes = nbit::nn::parameter_bytes(&params);
        report.param_mb = trainer.summary(&model).size_mb;
        Ok(report)
    }
}

fn print_report(r: &Report, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(r).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
        );
        return;
    }
    if r.command == "predict" {
        return;
    }
    let layers: Vec<String> = r.layers.iter().map(usize::to_string).collect();
    println!("precision      {}", r.precision);
    println!("accelerator    {}", r.accelerator);
    println!("layers         {}", layers.join("-"));
    if r.command == "fit" {
        println!("epochs         {}", r.epochs);
        println!("steps          {} ({} skipped)", r.global_step, r.skipped_steps);
        if let Some(l) = r.final_loss {
            println!("final loss     {l:.6}");
        }
        if let Some(s) = r.samples_per_sec {
            println!("samples/s      {s:.0}");
        }
    }
    if let Some(l) = r.val_loss {
        println!("val loss       {l:.6}");
    }
    if let Some(a) = r.val_accuracy {
        println!("val accuracy   {:.2}%", 100.0 * a);
    }
    println!(
        "params         {} bytes ({:.4} MB by Lightning's rule)",
        r.parameter_bytes, r.param_mb
    );
    for n in &r.notes {
        println!("note           {n}");
    }
}

fn main() -> ExitCode {
    // No panic is expected; if one happens, say so in one line, without a backtrace.
    std::panic::set_hook(Box::new(|info| {
        eprintln!("error: internal error in nbit ({info}); please report it");
    }));
    let cli = Cli::parse();
    let (command, opts) = match cli.command {
        Command::Fit(o) => ("fit", o),
        Command::Validate(o) => ("validate", o),
        Command::Predict(o) => ("predict", o),
    };
    let result = (|| {
        let plan = plan(command, opts)?;
        let sel = Selection::parse(
            plan.opts.precision.as_deref().unwrap_or("32-true"),
            plan.opts.accelerator.as_deref().unwrap_or("auto"),
        )?;
        if let Some(n) = sel.notice() {
            eprintln!("note: {n}");
        }
        let json = plan.opts.json;
        let report = sel.run(Run(plan))??;
        Ok::<_, Error>((report, json))
    })();
    match result {
        Ok((report, json)) => {
            print_report(&report, json);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}
