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
use nbit::{BackendJob, Error, Job, MlpModel, Precision, Selection, Supports, Trainer};
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

// Parsed once at start-up: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
enum Command {
    /// Train a model (Lightning's `trainer.fit`).
    Fit {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        held_out: HeldOut,
        #[command(flatten)]
        training: Training,
    },
    /// Loss and accuracy of the weights given by --init on the validation rows (--val-data,
    /// --val-split as in fit, or all of --data).
    Validate {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        held_out: HeldOut,
    },
    /// Outputs of the weights given by --init on every row of --data, as CSV on stdout.
    Predict {
        #[command(flatten)]
        common: Common,
    },
}

/// Merges a command-line value over a config file's.
trait Over {
    fn over(self, file: Self) -> Self;
}

impl<T> Over for Option<T> {
    fn over(self, file: Self) -> Self {
        self.or(file)
    }
}

impl Over for bool {
    fn over(self, file: Self) -> Self {
        self || file
    }
}

/// Declares the command line's option groups (each command flattens the groups it uses, so its
/// `--help` lists only its options) and `Opts`, every option in one flat struct: what `plan`
/// reads, and what a `--config` file may set under the same names.
macro_rules! option_groups {
    ($($(#[$gm:meta])* $group:ident { $($(#[$m:meta])* $field:ident: $ty:ty,)* })*) => {
        $(
            $(#[$gm])*
            #[derive(Args, Debug, Default, Clone)]
            struct $group {
                $($(#[$m])* $field: $ty,)*
            }

            impl $group {
                fn set(self, o: &mut Opts) {
                    $(o.$field = self.$field;)*
                }
            }
        )*

        #[derive(Deserialize, Debug, Default, Clone)]
        #[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
        struct Opts {
            $($($field: $ty,)*)*
        }

        impl Opts {
            /// These options (from the command line) over those of a config file.
            fn over(self, file: Opts) -> Opts {
                Opts {
                    $($($field: self.$field.over(file.$field),)*)*
                }
            }
        }
    };
}

option_groups! {
    /// Options of every command.
    Common {
        /// CSV file with a header row; the column `label` holds class indices (or targets)
        #[arg(long)]
        data: Option<PathBuf>,
        /// classification or regression [default: classification]
        #[arg(long)]
        task: Option<String>,
        /// 16-mixed, bf16-mixed, 16-true, bf16-true, 32-true, 64-true (or legacy 16, 32, 64, bf16) [default: 32-true]
        #[arg(long)]
        precision: Option<String>,
        /// cpu, gpu, cuda, tpu or auto [default: auto]
        #[arg(long)]
        accelerator: Option<String>,
        /// Rows per batch [default: 1, PyTorch's DataLoader]
        #[arg(long, allow_hyphen_values = true)]
        batch_size: Option<i64>,
        /// Weights (safetensors, PyTorch state_dict names: 0.weight, 0.bias, 2.weight, ...); fit
        /// starts from them and takes the layer widths from them unless --hidden is given
        #[arg(long)]
        init: Option<PathBuf>,
        /// Read options from a TOML file (keys as the long options, e.g. batch-size = 32)
        #[arg(long)]
        config: Option<PathBuf>,
        /// Print a machine-readable JSON summary instead of the table
        #[arg(long)]
        json: bool,
        /// Threads of the CPU kernels [default: NBIT_NUM_THREADS, else every core]
        #[arg(long, allow_hyphen_values = true)]
        num_threads: Option<i64>,
    }

    /// Which rows are held out for validation (fit and validate split alike).
    HeldOut {
        /// A separate validation CSV file
        #[arg(long)]
        val_data: Option<PathBuf>,
        /// Hold out this fraction of --data for validation (seeded)
        #[arg(long, allow_hyphen_values = true)]
        val_split: Option<f64>,
        /// Seed of initialisation, shuffling and the validation split [default: 0]
        #[arg(long)]
        seed: Option<u64>,
    }

    /// Training options.
    Training {
        /// Number of classes (default: the largest label + 1)
        #[arg(long)]
        classes: Option<usize>,
        /// Hidden layer widths, comma-separated [default: 128, or those of --init]
        #[arg(long, allow_hyphen_values = true)]
        hidden: Option<String>,
        /// Maximum epochs [default: 1000, Lightning's]
        #[arg(long)]
        epochs: Option<u64>,
        /// Maximum optimizer steps [default: no limit]
        #[arg(long)]
        max_steps: Option<u64>,
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
        /// Clip gradients by total norm at this value (0: no clipping, as in Lightning)
        #[arg(long, allow_hyphen_values = true)]
        gradient_clip_val: Option<f64>,
        /// Micro-batches per optimizer step [default: 1]
        #[arg(long)]
        accumulate_grad_batches: Option<usize>,
        /// How updated 16-bit weights are rounded under bf16-true and 16-true: nearest,
        /// compensated (Kahan summation) or stochastic [default: nearest]
        #[arg(long)]
        update_rounding: Option<String>,
        /// Batches are consecutive rows in file order (the last partial batch kept)
        #[arg(long)]
        no_shuffle: bool,
        /// Write the trained weights here (safetensors that PyTorch loads)
        #[arg(long)]
        save: Option<PathBuf>,
        /// Write a training checkpoint here after every epoch (for --resume)
        #[arg(long)]
        checkpoint: Option<PathBuf>,
        /// Resume training from a checkpoint written by --checkpoint
        #[arg(long)]
        resume: Option<PathBuf>,
        /// Write one row per optimizer step as training runs: step,epoch,loss,scale,skipped,lr
        #[arg(long)]
        log_csv: Option<PathBuf>,
        /// Hide the progress bar
        #[arg(long)]
        no_progress: bool,
    }
}

impl Command {
    /// The command's name and its options, those of groups it does not take left unset.
    fn into_opts(self) -> (&'static str, Opts) {
        let mut o = Opts::default();
        let name = match self {
            Command::Fit {
                common,
                held_out,
                training,
            } => {
                common.set(&mut o);
                held_out.set(&mut o);
                training.set(&mut o);
                "fit"
            }
            Command::Validate { common, held_out } => {
                common.set(&mut o);
                held_out.set(&mut o);
                "validate"
            }
            Command::Predict { common } => {
                common.set(&mut o);
                "predict"
            }
        };
        (name, o)
    }
}

impl Opts {
    /// These options over those of the --config file. A key of a command's option that this
    /// command does not take is ignored, so one file serves fit, validate and predict.
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
        let file: Opts = toml::from_str(&text).map_err(|e| {
            // Name the line and the key, which toml's message alone does not.
            let place = e.span().map_or(String::new(), |span| {
                let line = text[..span.start].matches('\n').count() + 1;
                let row = text.lines().nth(line - 1).unwrap_or("");
                match row.split_once('=') {
                    Some((key, _)) => format!(", line {line}, key '{}'", key.trim()),
                    None => format!(", line {line}"),
                }
            });
            Error::InvalidData(format!("config '{shown}'{place}: {}", e.message().trim()))
        })?;
        if file.config.is_some() {
            return Err(Error::InvalidData(format!(
                "config '{shown}' sets 'config': a config file cannot name another; merge them into one"
            )));
        }
        Ok(self.over(file))
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

/// Where `path` is, resolved through links and `..` (for a file not yet written, its folder).
fn resolved(path: &Path) -> PathBuf {
    path.canonicalize().unwrap_or_else(|_| {
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        match (dir.canonicalize(), path.file_name()) {
            (Ok(d), Some(name)) => d.join(name),
            _ => path.to_owned(),
        }
    })
}

/// Refuses, before anything is read or written, an output that would overwrite an input or
/// another output. Resuming from the file that --checkpoint keeps writing is the one overlap
/// allowed: it is how a run continues.
fn check_paths(o: &Opts) -> Result<(), Error> {
    let inputs = [
        ("--data", &o.data),
        ("--val-data", &o.val_data),
        ("--init", &o.init),
        ("--resume", &o.resume),
        ("--config", &o.config),
    ];
    let outputs = [
        ("--save", &o.save),
        ("--log-csv", &o.log_csv),
        ("--checkpoint", &o.checkpoint),
    ];
    for (i, (out, out_path)) in outputs.iter().enumerate() {
        let Some(out_path) = out_path else { continue };
        let here = resolved(out_path);
        let others = outputs[i + 1..].iter().chain(inputs.iter());
        for (other, other_path) in others {
            let Some(other_path) = other_path else { continue };
            if (*out, *other) == ("--checkpoint", "--resume") || resolved(other_path) != here {
                continue;
            }
            return Err(Error::InvalidData(format!(
                "{out} and {other} both name '{}': writing {out} would overwrite it; give {out} \
                 another path",
                out_path.display()
            )));
        }
    }
    Ok(())
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

/// The rows to train on and to validate on, as fit chooses them; validate chooses the same
/// validation rows, so it reproduces fit's validation metrics.
fn held_out(
    opts: &Opts,
    data: Dataset,
    data_path: &Path,
    task: Task,
) -> Result<(Dataset, Option<Dataset>), Error> {
    match (&opts.val_data, opts.val_split) {
        (Some(_), Some(f)) => Err(invalid("--val-split", f, "not used together with --val-data")),
        (Some(p), None) => {
            let v = Dataset::read_csv(p, task)?;
            if v.num_features() != data.num_features() {
                return Err(Error::InvalidData(format!(
                    "'{}' has {} feature columns but '{}' has {}",
                    p.display(),
                    v.num_features(),
                    data_path.display(),
                    data.num_features()
                )));
            }
            Ok((data, Some(v)))
        }
        (None, Some(f)) if f > 0.0 => {
            let rows = data.len();
            let (t, v) = data.split(f, opts.seed.unwrap_or(0))?;
            if t.is_empty() {
                return Err(invalid(
                    "--val-split",
                    f,
                    "a fraction that leaves rows to train on",
                ));
            }
            if v.is_empty() {
                return Err(Error::InvalidData(format!(
                    "--val-split = {f} holds out no row of the {rows} in '{}' (it rounds to 0); use \
                     at least {}, or leave --val-split out to validate on nothing",
                    data_path.display(),
                    (0.5 / rows as f64 * 1e6).ceil() / 1e6
                )));
            }
            Ok((t, Some(v)))
        }
        (None, _) => Ok((data, None)),
    }
}

fn plan(command: &'static str, opts: Opts) -> Result<Plan, Error> {
    let opts = opts.with_config()?;
    let task: Task = opts.task.as_deref().unwrap_or("classification").parse()?;
    if let Some(f) = opts.val_split
        && !(0.0..1.0).contains(&f)
    {
        return Err(invalid("--val-split", f, "a fraction in [0, 1)"));
    }
    let data_path = opts
        .data
        .clone()
        .ok_or_else(|| invalid("--data", "(missing)", "a CSV file to read"))?;
    let batch_size = match opts.batch_size.unwrap_or(1) {
        b if b >= 1 => b as usize,
        b => return Err(invalid("--batch-size", b, "at least 1")),
    };
    let hidden = opts.hidden.as_deref().map(parse_hidden).transpose()?;
    check_paths(&opts)?;
    for (flag, p) in [
        ("--save", &opts.save),
        ("--log-csv", &opts.log_csv),
        ("--checkpoint", &opts.checkpoint),
    ] {
        if let Some(p) = p {
            check_writable(flag, p)?;
        }
    }
    let (train, val) = if command == "predict" {
        (Dataset::read_csv_features(&data_path)?, None)
    } else {
        held_out(&opts, Dataset::read_csv(&data_path, task)?, &data_path, task)?
    };
    let features = train.num_features();
    let (train, val) = match command {
        // validate scores the held-out rows, or all of --data when none are held out.
        "validate" => (None, Some(val.unwrap_or(train))),
        _ => (Some(train), val),
    };
    let seen_classes = [&train, &val]
        .into_iter()
        .flatten()
        .map(Dataset::num_classes)
        .max()
        .unwrap_or(0);
    // The architecture: from --init (validate and predict always, fit unless --hidden is given),
    // or from the data and --hidden.
    let sizes = match (&opts.init, hidden) {
        (Some(init), None) => {
            let s = nbit::mlp_sizes(init)?;
            if s[0] != features {
                return Err(Error::InvalidData(format!(
                    "'{}' expects {} features but '{}' has {features}",
                    init.display(),
                    s[0],
                    data_path.display()
                )));
            }
            let outputs = s[s.len() - 1];
            if task == Task::Classification && seen_classes > outputs {
                return Err(Error::InvalidData(format!(
                    "'{}' has labels up to {} but the weights in '{}' have {outputs} outputs",
                    data_path.display(),
                    seen_classes - 1,
                    init.display()
                )));
            }
            s
        }
        (None, _) if command != "fit" => {
            return Err(invalid(
                "--init",
                "(missing)",
                "the weights file to evaluate (written by --save or PyTorch)",
            ));
        }
        (_, hidden) => {
            let outputs = match task {
                Task::Regression => 1,
                Task::Classification => match opts.classes {
                    Some(c) if c < seen_classes => {
                        return Err(invalid("--classes", c, "more than the largest label in the data"));
                    }
                    Some(0) => return Err(invalid("--classes", 0, "at least 1")),
                    Some(c) => c,
                    None => seen_classes,
                },
            };
            let mut s = vec![features];
            s.extend(hidden.unwrap_or_else(|| vec![128]));
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
    let optimization = match opts.update_rounding.as_deref() {
        Some(r) => optimization.update_rounding(r.parse()?),
        None => optimization,
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
    /// Training stopped on Ctrl-C after this many steps in total.
    #[serde(skip_serializing_if = "Option::is_none")]
    interrupted_at_step: Option<u64>,
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
        if let Some(l) = &o.log_csv {
            b = b.log_csv(l.clone());
        }
        if let Some(t) = o.num_threads {
            let n = usize::try_from(t)
                .ok()
                .filter(|&n| n >= 1)
                .ok_or_else(|| Error::InvalidArgument {
                    name: "--num-threads",
                    value: t.to_string(),
                    expected: "a whole number of threads of at least 1",
                })?;
            b = b.num_threads(n);
        }
        let trainer = b.build()?;
        if plan.command == "fit" {
            let batch = plan.batch_size.min(plan.train.as_ref().map_or(0, Dataset::len));
            nbit::nn::check_mlp_fits::<P>(&plan.sizes, &plan.optimization, batch)?;
            // Ctrl-C stops after the step in progress (the log and checkpoint written so far stay);
            // a second Ctrl-C quits at once. Without a handler (one already set), Ctrl-C kills.
            let stop = trainer.stop_handle();
            let _ = ctrlc::set_handler(move || {
                if stop.swap(true, std::sync::atomic::Ordering::SeqCst) {
                    std::process::exit(130);
                }
            });
        }
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
                if fit.interrupted {
                    // As Lightning on KeyboardInterrupt: what follows fit (--save) does not run.
                    report.interrupted_at_step = Some(fit.global_step);
                } else if let Some(path) = &o.save {
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
    let (command, opts) = Cli::parse().command.into_opts();
    let result = (|| {
        let plan = plan(command, opts)?;
        let sel = Selection::parse(
            plan.opts.precision.as_deref().unwrap_or("32-true"),
            plan.opts.accelerator.as_deref().unwrap_or("auto"),
        )?;
        if let Some(n) = sel.notice() {
            eprintln!("note: {n}");
        }
        let outputs = (
            plan.opts.json,
            plan.opts.log_csv.clone(),
            plan.opts.checkpoint.clone(),
        );
        let report = sel.run(Run(plan))??;
        Ok::<_, Error>((report, outputs))
    })();
    match result {
        Ok((report, (json, log, checkpoint))) => {
            print_report(&report, json);
            let Some(step) = report.interrupted_at_step else {
                return ExitCode::SUCCESS;
            };
            let mut kept = Vec::new();
            if let Some(l) = log {
                kept.push(format!("the loss log of {step} steps is in '{}'", l.display()));
            }
            if let Some(c) = checkpoint {
                kept.push(format!(
                    "'{}' resumes from step {step} with --resume",
                    c.display()
                ));
            }
            let kept = if kept.is_empty() {
                String::new()
            } else {
                format!("; {}", kept.join("; "))
            };
            eprintln!("interrupted: training stopped on Ctrl-C after step {step}, weights not saved{kept}");
            ExitCode::from(130)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}
