//! Everything decided before the precision and device are known: options checked, paths
//! guarded, data read and split, the architecture and the optimizer.

use std::path::{Path, PathBuf};

use nbit::Error;
use nbit::data::{Dataset, Task};
use nbit::optim::{AdamW, Optimization, Sgd};

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
    })
}
