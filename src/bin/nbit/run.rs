//! The command run with the selected precision and device types, and what it reports.

use std::io::Write;

use nbit::data::{DataLoader, Dataset, Task};
use nbit::strategy::StrategyKind;
use nbit::{Ddp, Error, Hosts, MlpModel, Mpi, Precision, RunJob, Runs, SingleDevice, Strategy, Trainer};

use crate::plan::Plan;

/// What a run reports (the table, or --json).
#[derive(serde::Serialize, Debug, Default)]
pub(crate) struct Report {
    pub(crate) command: &'static str,
    pub(crate) precision: String,
    pub(crate) accelerator: String,
    /// Lightning's strategy name: single_device or ddp.
    pub(crate) strategy: &'static str,
    /// Processes training together (1 in one process).
    pub(crate) world_size: usize,
    /// This process's rank: only rank 0 prints the report.
    #[serde(skip)]
    pub(crate) rank: usize,
    /// The hardware in words (`Device::describe`).
    pub(crate) device: String,
    /// The CPU micro-kernel of the precision's matrix products (`nbit::backend::kernel_name`),
    /// chosen from what the CPU reports or by `NBIT_GEMM_KERNEL`; absent on other devices.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) gemm_kernel: Option<String>,
    pub(crate) layers: Vec<usize>,
    pub(crate) epochs: u64,
    pub(crate) global_step: u64,
    pub(crate) skipped_steps: u64,
    pub(crate) final_loss: Option<f64>,
    pub(crate) val_loss: Option<f64>,
    pub(crate) val_accuracy: Option<f64>,
    pub(crate) samples_per_sec: Option<f64>,
    pub(crate) param_mb: f64,
    pub(crate) parameter_bytes: usize,
    pub(crate) optimizer_state_bytes: usize,
    pub(crate) notes: Vec<String>,
    /// Training stopped on Ctrl-C after this many steps in total.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) interrupted_at_step: Option<u64>,
}

pub(crate) struct Run(pub(crate) Plan);

impl RunJob for Run {
    type Output = Report;
    fn run<P: Precision, D: Runs<P>>(self) -> Result<Report, Error> {
        match self.0.strategy {
            StrategyKind::SingleDevice => run::<P, D, SingleDevice>(self.0),
            StrategyKind::Ddp => run::<P, D, Ddp<Mpi>>(self.0),
        }
    }
}

/// The command under the precision `P`, on the device `D`, with the strategy `S`.
fn run<P: Precision, D: Runs<P> + Hosts<S>, S: Strategy>(plan: Plan) -> Result<Report, Error> {
    let o = &plan.opts;
    let mut b = Trainer::<P, D, S>::builder()
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
    b = b.ddp_drop_last(o.ddp_drop_last);
    if let Some(h) = &o.ddp_comm_hook {
        b = b.ddp_comm_hook(h.parse()?);
    }
    let trainer = b.build()?;
    if plan.command == "fit" {
        let batch = plan.batch_size.min(plan.train.as_ref().map_or(0, Dataset::len));
        nbit::nn::check_mlp_fits::<P>(&plan.sizes, &plan.optimization, batch)?;
        // Ctrl-C (or SIGTERM) stops after the step in progress (the log and checkpoint written so
        // far stay); a second one quits at once. Without a handler (one already set), Ctrl-C
        // kills. A rank of a data-parallel job stops with the others after the step whatever it
        // gets: SIGUSR1 from `nbit --devices` through mpirun, or SIGTERM from mpirun itself
        // (which kills it if it must).
        let stop = trainer.stop_handle();
        let patient = trainer.world_size() > 1;
        if patient {
            crate::launch::stop_on_request(stop.clone());
        }
        let _ = ctrlc::set_handler(move || {
            if stop.swap(true, std::sync::atomic::Ordering::SeqCst) && !patient {
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
        strategy: trainer.strategy_name(),
        world_size: trainer.world_size(),
        rank: trainer.global_rank(),
        device: D::describe(),
        gemm_kernel: (D::KIND == nbit::DeviceKind::Cpu)
            .then(|| nbit::backend::kernel_name::<P::Compute>().to_string()),
        layers: plan.sizes.clone(),
        ..Report::default()
    };
    if let Some(init) = &o.init {
        report.notes.extend(trainer.load_weights(&mut model, init)?);
    }
    let loader = |d: Dataset, shuffle: bool| -> Result<DataLoader, Error> {
        Ok(DataLoader::new(d.for_precision::<P>()?, plan.batch_size)?
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
            report.final_loss = fit.final_loss();
            report.epochs = fit.epochs;
            report.global_step = fit.global_step;
            report.skipped_steps = fit.skipped_steps;
            report.optimizer_state_bytes = fit.optimizer_state_bytes;
            report.notes.extend(fit.notes.iter().cloned());
            if let Some(m) = fit.validation.last() {
                report.val_loss = Some(m.loss());
                report.val_accuracy = (plan.task == Task::Classification).then(|| m.accuracy());
            }
            if let Some(path) = o.plot.as_ref().filter(|_| trainer.is_global_zero()) {
                let sizes: Vec<String> = plan.sizes.iter().map(usize::to_string).collect();
                let title = format!("MLP {} under {}", sizes.join("-"), P::NAME);
                let mut chart = nbit::plot::Chart::from_report(title, &fit);
                if plan.plot_log {
                    chart = chart.log_y();
                }
                nbit::plot::write_svg(path, &[chart])?;
            }
            if fit.interrupted {
                // As Lightning on KeyboardInterrupt: what follows fit (--save) does not run.
                report.interrupted_at_step = Some(fit.global_step);
            } else if let Some(path) = &o.save {
                trainer.save_weights(&mut model, path)?;
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
            // Every rank predicts every row; rank 0 prints them.
            if trainer.is_global_zero() {
                emit(&text)?;
            }
        }
    }
    report.parameter_bytes = nbit::nn::parameter_bytes(&model.net.parameters());
    report.param_mb = trainer.summary(&mut model).size_mb;
    Ok(report)
}

/// Writes `text` to stdout. A reader that has gone (`nbit fit | head -1`) ends the output quietly,
/// as other command-line tools do; any other failure (a full disk) is an error.
pub(crate) fn emit(text: &str) -> Result<(), Error> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(Error::Io {
            path: "standard output".into(),
            action: "write",
            reason: e.to_string(),
        }),
        _ => Ok(()),
    }
}

/// A loss with six decimals, or in scientific notation where six decimals would show 0.000000.
fn loss_text(l: f64) -> String {
    if l != 0.0 && l.abs() < 5e-7 {
        format!("{l:.3e}")
    } else {
        format!("{l:.6}")
    }
}

/// The report as a table (or JSON) on stdout.
pub(crate) fn print_report(r: &Report, json: bool) -> Result<(), Error> {
    if json {
        let text = serde_json::to_string_pretty(r).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
        return emit(&(text + "\n"));
    }
    if r.command == "predict" {
        return Ok(());
    }
    let layers: Vec<String> = r.layers.iter().map(usize::to_string).collect();
    let mut lines = Vec::new();
    lines.push(format!("precision      {}", r.precision));
    lines.push(format!("accelerator    {} ({})", r.accelerator, r.device));
    if r.world_size > 1 {
        lines.push(format!(
            "strategy       {} ({} processes)",
            r.strategy, r.world_size
        ));
    }
    lines.push(format!("layers         {}", layers.join("-")));
    if r.command == "fit" {
        lines.push(format!("epochs         {}", r.epochs));
        lines.push(format!(
            "steps          {} ({} skipped)",
            r.global_step, r.skipped_steps
        ));
        if let Some(l) = r.final_loss {
            lines.push(format!(
                "final loss     {} (mean of the last epoch's steps)",
                loss_text(l)
            ));
        }
        if let Some(s) = r.samples_per_sec {
            lines.push(format!("samples/s      {s:.0}"));
        }
    }
    if let Some(l) = r.val_loss {
        lines.push(format!("val loss       {l:.6}"));
    }
    if let Some(a) = r.val_accuracy {
        lines.push(format!("val accuracy   {:.2}%", 100.0 * a));
    }
    lines.push(format!(
        "params         {} bytes ({:.4} MB by Lightning's rule)",
        r.parameter_bytes, r.param_mb
    ));
    for n in &r.notes {
        lines.push(format!("note           {n}"));
    }
    emit(&(lines.join("\n") + "\n"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_tiny_loss_is_not_printed_as_zero() {
        assert_eq!(super::loss_text(0.036968), "0.036968");
        assert_eq!(super::loss_text(3.2e-9), "3.200e-9");
        assert_eq!(super::loss_text(0.0), "0.000000");
    }
}
