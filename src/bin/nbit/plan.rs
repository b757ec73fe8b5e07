//! Everything decided before the precision and device are known: options checked, paths
//! guarded, data read and split, the architecture and the optimizer.

use std::path::{Path, PathBuf};

use nbit::Error;
use nbit::data::{Dataset, Task};
use nbit::optim::{AdamW, Optimization, Sgd};
use nbit::strategy::{StrategyKind, parse_strategy};

use crate::options::Opts;

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
        ("--plot", &o.plot),
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
pub(crate) struct Plan {
    pub(crate) command: &'static str,
    /// Whether --plot draws the loss on a log axis (--plot-scale).
    pub(crate) plot_log: bool,
    pub(crate) opts: Opts,
    pub(crate) task: Task,
    pub(crate) train: Option<Dataset>,
    pub(crate) val: Option<Dataset>,
    pub(crate) sizes: Vec<usize>,
    pub(crate) optimization: Optimization,
    pub(crate) batch_size: usize,
    /// One process, or data parallel.
    pub(crate) strategy: StrategyKind,
    /// Processes to start through `mpirun` (--devices x --num-nodes), when this process launches
    /// the job rather than being one of its ranks.
    pub(crate) launch: Option<Launch>,
}

/// What `nbit fit --strategy ddp --devices N` asks `mpirun` for.
#[derive(Debug, Clone)]
pub(crate) struct Launch {
    pub(crate) per_node: usize,
    pub(crate) nodes: usize,
    pub(crate) hostfile: Option<PathBuf>,
}

/// Set in the ranks a `--devices` launch starts, so they train rather than launch again.
pub(crate) const LAUNCHED: &str = "NBIT_DDP_LAUNCHED";

/// The strategy options checked: the strategy, and the launch `--devices` asks for.
fn strategy(opts: &Opts) -> Result<(StrategyKind, Option<Launch>), Error> {
    let kind = parse_strategy(opts.strategy.as_deref().unwrap_or("auto"))?;
    if let Some(h) = &opts.ddp_comm_hook {
        h.parse::<nbit::strategy::CommHook>()?;
    }
    let ddp_only = [
        ("--devices", opts.devices.is_some()),
        ("--num-nodes", opts.num_nodes.is_some()),
        ("--hostfile", opts.hostfile.is_some()),
        ("--ddp-comm-hook", opts.ddp_comm_hook.is_some()),
        ("--ddp-drop-last", opts.ddp_drop_last),
    ];
    if kind == StrategyKind::SingleDevice {
        if let Some((flag, _)) = ddp_only.iter().find(|(_, set)| *set) {
            return Err(invalid(
                flag,
                "(set)",
                "--strategy ddp as well (it sets data-parallel training)",
            ));
        }
        return Ok((kind, None));
    }
    if !cfg!(feature = "mpi") {
        return Err(invalid(
            "--strategy",
            "'ddp'",
            "a build of nbit with its `mpi` feature (`cargo install nbit --features mpi`, which needs \
             an MPI library: apt-get install libopenmpi-dev openmpi-bin libclang-dev); or leave \
             --strategy out to train in one process",
        ));
    }
    let nodes = match opts.num_nodes {
        Some(0) => return Err(invalid("--num-nodes", 0, "at least 1")),
        Some(n) => n,
        None => 1,
    };
    if nodes > 1 && opts.hostfile.is_none() {
        return Err(invalid(
            "--num-nodes",
            nodes,
            "a --hostfile naming the machines (lines such as `node1 slots=2`)",
        ));
    }
    let launch = match opts.devices {
        Some(0) => return Err(invalid("--devices", 0, "at least 1")),
        // A rank started by a launch: train.
        Some(_) if std::env::var_os(LAUNCHED).is_some() => None,
        Some(_) if nbit::strategy::launched_by_mpi() => {
            return Err(invalid(
                "--devices",
                "(set under mpirun)",
                "no --devices under mpirun, whose -np sets the number of processes",
            ));
        }
        Some(n) => Some(Launch {
            per_node: n,
            nodes,
            hostfile: opts.hostfile.clone(),
        }),
        None if nodes > 1 => {
            return Err(invalid(
                "--num-nodes",
                nodes,
                "--devices as well (processes per machine)",
            ));
        }
        None => None,
    };
    Ok((kind, launch))
}

/// The CSV column of the labels (--label-column).
fn label(opts: &Opts) -> &str {
    opts.label_column.as_deref().unwrap_or(nbit::data::DEFAULT_LABEL)
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
            let v = Dataset::read_csv_labelled(p, task, label(opts))?;
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

pub(crate) fn plan(command: &'static str, opts: Opts) -> Result<Plan, Error> {
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
    let plot_log = match opts.plot_scale.as_deref().unwrap_or("log") {
        "log" => true,
        "linear" => false,
        other => return Err(invalid("--plot-scale", other, "log or linear")),
    };
    let batch_size = match opts.batch_size.unwrap_or(1) {
        b if b >= 1 => b as usize,
        b => return Err(invalid("--batch-size", b, "at least 1")),
    };
    let hidden = opts.hidden.as_deref().map(parse_hidden).transpose()?;
    let (strategy, launch) = strategy(&opts)?;
    check_paths(&opts)?;
    for (flag, p) in [
        ("--save", &opts.save),
        ("--log-csv", &opts.log_csv),
        ("--checkpoint", &opts.checkpoint),
        ("--plot", &opts.plot),
    ] {
        if let Some(p) = p {
            check_writable(flag, p)?;
        }
    }
    let (train, val) = if command == "predict" {
        (
            Dataset::read_csv_features_labelled(&data_path, label(&opts))?,
            None,
        )
    } else {
        let data = Dataset::read_csv_labelled(&data_path, task, label(&opts))?;
        held_out(&opts, data, &data_path, task)?
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
        plot_log,
        opts,
        task,
        train,
        val,
        sizes,
        optimization,
        batch_size,
        strategy,
        launch,
    })
}
