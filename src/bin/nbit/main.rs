//! `nbit`: train, validate and predict with an MLP from a CSV file under any precision string,
//! in the spirit of LightningCLI.
//!
//! Every problem with the input is one line on stderr starting with `error:` and exit code 2.

//!
//! One file per stage: `options.rs` (the command line's option groups and the `--config` file),
//! `plan.rs` (options checked and data read, before the precision is known) and `run.rs` (the
//! command run with the selected types, and its report).

mod launch;
mod options;
mod plan;
mod run;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use nbit::{Error, Selection};

use options::{Common, HeldOut, Training};

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
pub(crate) enum Command {
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

fn main() -> ExitCode {
    // No panic is expected; if one happens, say so in one line, without a backtrace.
    std::panic::set_hook(Box::new(|info| {
        eprintln!("error: internal error in nbit ({info}); please report it");
    }));
    let (command, opts) = Cli::parse().command.into_opts();
    let result = (|| {
        let plan = plan::plan(command, opts)?;
        if let Some(l) = &plan.launch {
            return Ok(Err(launch::launch(l)?));
        }
        // validate and predict run the weights under the precision they were saved under (so
        // validate reproduces fit's metrics); fit, or a file without one, under Lightning's default.
        let saved = match (&plan.opts.precision, &plan.opts.init, command) {
            (None, Some(init), "validate" | "predict") => nbit::saved_precision(init)?.map(|p| (p, init)),
            _ => None,
        };
        if let Some((p, init)) = saved {
            eprintln!(
                "note: precision {} from '{}', the precision it was saved under (--precision overrides)",
                p.name(),
                init.display()
            );
        }
        let precision = saved.map_or(plan.opts.precision.as_deref().unwrap_or("32-true"), |(p, _)| {
            p.name()
        });
        let sel = Selection::parse_noted(precision, plan.opts.accelerator.as_deref().unwrap_or("auto"))?;
        let outputs = (
            plan.opts.json,
            plan.opts.log_csv.clone(),
            plan.opts.checkpoint.clone(),
        );
        let report = sel.launch(run::Run(plan))?;
        Ok::<_, Error>(Ok((report, outputs)))
    })();
    match result {
        // A launcher of data-parallel ranks ends as they do.
        Ok(Err(code)) => code,
        // Under data parallel, rank 0 speaks for the job.
        Ok(Ok((report, _))) if report.rank != 0 => match report.interrupted_at_step {
            Some(_) => ExitCode::from(130),
            None => ExitCode::SUCCESS,
        },
        Ok(Ok((report, (json, log, checkpoint)))) => {
            if let Err(e) = run::print_report(&report, json) {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
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
            // A rank of a data-parallel job ends the job (the others would wait for it).
            nbit::strategy::abort_if_distributed(&e);
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}
