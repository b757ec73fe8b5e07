//! The command line's option groups, the flat `Opts` a `--config` file may also set, and the
//! merge of the two.

use std::path::PathBuf;

use clap::Args;
use nbit::Error;
use serde::Deserialize;

use crate::Command;

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
            pub(crate) struct $group {
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
        pub(crate) struct Opts {
            $($(pub(crate) $field: $ty,)*)*
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
        /// CSV file with a header row; the column `label` (or --label-column) holds class indices (or targets)
        #[arg(long)]
        data: Option<PathBuf>,
        /// The CSV column that holds the labels [default: label]
        #[arg(long)]
        label_column: Option<String>,
        /// classification or regression [default: classification]
        #[arg(long)]
        task: Option<String>,
        /// 16-mixed, bf16-mixed, 16-true, bf16-true, 32-true, 64-true (or legacy 16, 32, 64, bf16) [default: 32-true]
        #[arg(long)]
        precision: Option<String>,
        /// cpu, gpu, cuda, tpu or auto [default: auto: the GPU when nbit is built with `--features cuda` and one answers, else the CPU]
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
        /// Draw the training loss per step and the validation loss per epoch to this SVG file
        #[arg(long)]
        plot: Option<PathBuf>,
        /// The --plot's loss axis: log or linear [default: log]
        #[arg(long)]
        plot_scale: Option<String>,
        /// Resume training from a checkpoint written by --checkpoint
        #[arg(long)]
        resume: Option<PathBuf>,
        /// Write one row per optimizer step as training runs: step,epoch,loss,scale,skipped,lr
        #[arg(long)]
        log_csv: Option<PathBuf>,
        /// Hide the progress bar
        #[arg(long)]
        no_progress: bool,
        /// auto (one process) or ddp (data parallel over MPI: start under `mpirun -np N`, or give
        /// --devices) [default: auto]
        #[arg(long)]
        strategy: Option<String>,
        /// With --strategy ddp: start this many processes per node through `mpirun` (outside
        /// `mpirun` only)
        #[arg(long)]
        devices: Option<usize>,
        /// With --strategy ddp and --devices: the number of machines, listed in --hostfile
        /// [default: 1]
        #[arg(long)]
        num_nodes: Option<usize>,
        /// With --num-nodes: the MPI hostfile naming the machines (one `host slots=N` per line)
        #[arg(long)]
        hostfile: Option<PathBuf>,
        /// With --strategy ddp: how gradients travel, none, bf16_compress or fp16_compress
        /// (PyTorch's compression hooks) [default: none]
        #[arg(long)]
        ddp_comm_hook: Option<String>,
        /// With --strategy ddp: drop an epoch's last batches that do not deal evenly to the
        /// processes, rather than deal its first batches again
        #[arg(long)]
        ddp_drop_last: bool,
    }
}

impl Command {
    /// The command's name and its options, those of groups it does not take left unset.
    pub(crate) fn into_opts(self) -> (&'static str, Opts) {
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
    pub(crate) fn with_config(self) -> Result<Opts, Error> {
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
