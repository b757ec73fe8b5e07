//! The training loop end to end: scaled pipeline, skipped steps, memory, convergence, resume,
//! clipping order, accumulation, checkpoints and the summary.

use std::path::PathBuf;

use crate::common::{CpuFp16Amp, blobs, loader};
use nbit::data::{DataLoader, Dataset};
use nbit::nn::Task;
use nbit::optim::{AdamW, Optimization, Sgd};
use nbit::prelude::*;
use nbit::scaler::DynamicScaler;
use nbit::{EarlyStopping, Float, Grads, Metrics, Mode, ModelCheckpoint, Monitor, StepInfo};

fn tmp(name: &str) -> PathBuf {
    crate::common::scratch("test").join(name)
}

fn params<P: Precision, M: Model<P>>(m: &mut M) -> Vec<Vec<f64>> {
    m.parameters_mut()
        .iter()
        .map(|p| p.value().to_vec().iter().map(|v| v.as_f64()).collect())
        .collect()
}

fn mlp<P: Precision>(t: &Trainer<P, Cpu>, opt: Optimization) -> MlpModel<P>
where
    Cpu: Supports<P>,
{
    t.init_module(|ctx| MlpModel::new(ctx, &[4, 16, 3], Task::Classification, opt))
        .unwrap()
}

fn quiet<P: Precision>() -> nbit::TrainerBuilder<P, Cpu>
where
    Cpu: Supports<P>,
{
    Trainer::<P, Cpu>::builder().enable_progress_bar(false).seed(7)
}

/// A model around an MLP for probing the loop: it multiplies its loss by 1e30 at chosen global
/// steps (fp16 gradients overflow) and records the gradient norm its hook sees; optionally it has
/// an extra parameter `extra` and bends its loss (`odd`): to the wrong shape (`"matrix"`), to a
/// constant that reaches no parameter (`"constant"`), or plus the square root of `extra` (finite at
/// 0, with an infinite gradient: `"sqrt"`).
struct Inject<P: Precision> {
    inner: MlpModel<P>,
    at: Vec<u64>,
    hook_norms: Vec<f64>,
    extra: Option<nbit::nn::Parameter<P::Param>>,
    odd: &'static str,
}

impl<P: Precision> Model<P> for Inject<P> {
    fn training_step(
        &mut self,
        ac: &Autocast<P>,
        b: &nbit::data::Batch,
        s: &StepInfo,
    ) -> Result<Tensor<P::Full>, Error> {
        let mut loss = self.inner.training_step(ac, b, s)?;
        if self.at.contains(&s.global_step) {
            loss = loss.mul_scalar(1e30);
        }
        Ok(match (self.odd, &self.extra) {
            ("matrix", _) => loss.add(&Tensor::zeros(&[4, 2]))?,
            ("constant", _) => Tensor::scalar(loss.item()?),
            ("sqrt", Some(e)) => loss.add(&e.value().cast::<P::Full>().powf(0.5).sum())?,
            _ => loss,
        })
    }
    fn validation_step(&mut self, ac: &Autocast<P>, b: &nbit::data::Batch) -> Result<Metrics, Error> {
        self.inner.validation_step(ac, b)
    }
    fn predict_step(&mut self, ac: &Autocast<P>, b: &nbit::data::Batch) -> Result<Tensor<P::Full>, Error> {
        self.inner.predict_step(ac, b)
    }
    fn configure_optimizers(&self) -> Optimization {
        self.inner.configure_optimizers()
    }
    fn on_before_optimizer_step(&mut self, grads: &[(&str, &Tensor<P::Param>)]) {
        let sq: f64 = grads
            .iter()
            .flat_map(|(_, g)| g.to_vec())
            .map(|v| v.as_f64().powi(2))
            .sum();
        self.hook_norms.push(sq.sqrt());
    }
    fn parameters_mut(&mut self) -> Vec<&mut nbit::nn::Parameter<P::Param>> {
        let mut p = self.inner.parameters_mut();
        p.extend(&mut self.extra);
        p
    }
}

fn inject<P: Precision>(t: &Trainer<P, Cpu>, at: &[u64], opt: Optimization) -> Inject<P>
where
    Cpu: Supports<P>,
{
    Inject {
        inner: mlp(t, opt),
        at: at.to_vec(),
        hook_norms: vec![],
        extra: None,
        odd: "",
    }
}

/// [`Inject`] with a 3-element parameter `extra` of value `at` and the loss bent as `odd` says.
fn odd<P: Precision>(t: &Trainer<P, Cpu>, odd: &'static str, opt: Optimization, at: f64) -> Inject<P>
where
    Cpu: Supports<P>,
{
    let v = P::Param::from_f64(at);
    Inject {
        extra: Some(nbit::nn::Parameter::new(
            "extra",
            Tensor::from_vec(&[3], vec![v; 3]).unwrap(),
        )),
        odd,
        ..inject(t, &[], opt)
    }
}

#[test]
fn injected_inf_gradients_skip_exactly_those_steps_and_touch_nothing() {
    let trainer = |steps| {
        quiet::<CpuFp16Amp>()
            .max_steps(steps)
            .scaler(DynamicScaler::new(1024.0, 2.0, 0.5, 2000))
            .checkpoint_path(tmp(&format!("skip-{steps}.safetensors")))
            .build()
            .unwrap()
    };
    let data = loader(96, 16);
    let opt = Optimization::new(AdamW::new(0.01));
    // Steps 0 and 1 train; step 2 (and 4) get inf gradients.
    let t2 = trainer(2);
    let mut a = inject(&t2, &[2, 4], opt);
    t2.fit(&mut a, &data, None).unwrap();
    let t3 = trainer(3);
    let mut b = inject(&t3, &[2, 4], opt);
    let rb = t3.fit(&mut b, &data, None).unwrap();
    assert_eq!(
        params(&mut a),
        params(&mut b),
        "a skipped step leaves the weights bit-for-bit untouched"
    );
    let state = |p: &str| {
        let bytes = std::fs::read(tmp(p)).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut v: Vec<(String, Vec<u8>)> = st
            .tensors()
            .into_iter()
            .filter(|(n, _)| n.starts_with("exp_avg"))
            .map(|(n, t)| (n, t.data().to_vec()))
            .collect();
        v.sort();
        let meta = safetensors::SafeTensors::read_metadata(&bytes)
            .unwrap()
            .1
            .metadata()
            .clone()
            .unwrap();
        (v, meta["optimizer_steps"].clone())
    };
    assert_eq!(
        state("skip-2.safetensors"),
        state("skip-3.safetensors"),
        "optimizer state untouched"
    );

    let t6 = quiet::<CpuFp16Amp>()
        .max_steps(6)
        .scaler(DynamicScaler::new(1024.0, 2.0, 0.5, 2000))
        .build()
        .unwrap();
    let mut c = inject(&t6, &[2, 4], opt);
    let r = t6.fit(&mut c, &data, None).unwrap();
    let skipped: Vec<bool> = r.history.iter().map(|s| s.skipped).collect();
    assert_eq!(skipped, [false, false, true, false, true, false]);
    assert_eq!(r.skipped_steps, 2);
    let scales: Vec<f32> = r.history.iter().map(|s| s.scale).collect();
    assert_eq!(
        scales,
        [1024.0, 1024.0, 1024.0, 512.0, 512.0, 256.0],
        "backoff after each skip"
    );
    assert!(rb.history[2].skipped);
}

#[test]
fn the_hook_sees_unscaled_gradients() {
    let data = loader(48, 48);
    let opt = Optimization::new(Sgd::new(0.1));
    let t = quiet::<CpuFp16Amp>().max_steps(1).build().unwrap(); // scale 65536
    let mut scaled = inject(&t, &[], opt);
    t.fit(&mut scaled, &data, None).unwrap();
    let r = quiet::<True<F32>>().max_steps(1).build().unwrap();
    let mut reference = inject(&r, &[], opt);
    r.fit(&mut reference, &data, None).unwrap();
    let (a, b) = (scaled.hook_norms[0], reference.hook_norms[0]);
    assert!(
        (a / b - 1.0).abs() < 1e-2,
        "hook norm {a} vs f32 {b}: gradients must be unscaled"
    );
}

#[test]
fn clipping_happens_after_unscaling() {
    // SGD with lr 1: the update is exactly the clipped gradient, of norm clip_val. Clipping the
    // scaled gradients first would leave an update 65536 times smaller.
    let data = loader(48, 48);
    let t = quiet::<CpuFp16Amp>()
        .max_steps(1)
        .gradient_clip_val(1e-3)
        .build()
        .unwrap();
    let mut m = mlp(&t, Optimization::new(Sgd::new(1.0)));
    let before = params(&mut m);
    t.fit(&mut m, &data, None).unwrap();
    let step: f64 = before
        .iter()
        .flatten()
        .zip(params(&mut m).iter().flatten())
        .map(|(a, b)| (a - b).powi(2))
        .sum::<f64>()
        .sqrt();
    assert!((step - 1e-3).abs() < 1e-5, "update norm {step}");
}

#[test]
fn clip_by_value_bounds_every_update() {
    let data = loader(48, 48);
    let t = quiet::<True<F64>>()
        .max_steps(1)
        .gradient_clip_val(1e-4)
        .gradient_clip_algorithm(nbit::ClipAlgorithm::Value)
        .build()
        .unwrap();
    let mut m = mlp(&t, Optimization::new(Sgd::new(1.0)));
    let before = params(&mut m);
    t.fit(&mut m, &data, None).unwrap();
    let max = before
        .iter()
        .flatten()
        .zip(params(&mut m).iter().flatten())
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!((max - 1e-4).abs() < 1e-12, "largest update {max}");
}

#[test]
fn half_precisions_hold_half_the_parameter_memory() {
    fn bytes<P: Precision>() -> (usize, usize)
    where
        Cpu: Supports<P>,
    {
        let t = quiet::<P>().max_steps(1).build().unwrap();
        let mut m = mlp(&t, Optimization::new(AdamW::default()));
        let r = t.fit(&mut m, &loader(48, 16), None).unwrap();
        (r.parameter_bytes, r.optimizer_state_bytes)
    }
    let (p32, s32) = bytes::<True<F32>>();
    assert_eq!(p32, (4 * 16 + 16 + 16 * 3 + 3) * 4);
    // AdamW keeps exp_avg in f16 but exp_avg_sq in f32 under 16-true (f16 underflows it).
    assert_eq!(bytes::<True<F16>>(), (p32 / 2, s32 / 4 + s32 / 2));
    assert_eq!(bytes::<True<BF16>>(), (p32 / 2, s32 / 2));
    assert_eq!(bytes::<True<F64>>(), (p32 * 2, s32 * 2));
    assert_eq!(
        bytes::<Mixed<BF16>>(),
        (p32, s32),
        "mixed keeps f32 master weights and state"
    );
}

fn loss_falls<P: Precision>() -> (f64, f64)
where
    Cpu: Supports<P>,
{
    let t = quiet::<P>().max_epochs(15).build().unwrap();
    let mut m = mlp(&t, Optimization::new(Sgd::new(0.05).momentum(0.9)));
    let r = t.fit(&mut m, &loader(96, 16), None).unwrap();
    let per_epoch = |e| {
        let l: Vec<f64> = r
            .history
            .iter()
            .filter(|s| s.epoch == e)
            .map(|s| s.loss)
            .collect();
        l.iter().sum::<f64>() / l.len() as f64
    };
    (per_epoch(0), per_epoch(14))
}

#[test]
fn training_loss_falls_in_all_five_cpu_precisions() {
    for (name, (first, last)) in [
        ("bf16-mixed", loss_falls::<Mixed<BF16>>()),
        ("16-true", loss_falls::<True<F16>>()),
        ("bf16-true", loss_falls::<True<BF16>>()),
        ("32-true", loss_falls::<True<F32>>()),
        ("64-true", loss_falls::<True<F64>>()),
    ] {
        assert!(
            last < 0.5 * first,
            "{name}: first-epoch loss {first}, last {last}"
        );
    }
}

fn resume_matches<P: Precision>(tag: &str, opt: Optimization)
where
    Cpu: Supports<P>,
{
    let data = loader(80, 16); // 5 batches per epoch
    let full = quiet::<P>().max_steps(12).build().unwrap();
    let mut a = mlp(&full, opt);
    let ra = full.fit(&mut a, &data, None).unwrap();

    // Stop mid-epoch (step 7 is batch 2 of epoch 1), then resume in a fresh trainer and model.
    let ckpt = tmp(&format!("resume-{tag}.safetensors"));
    let first = quiet::<P>()
        .max_steps(7)
        .checkpoint_path(ckpt.clone())
        .build()
        .unwrap();
    let mut b = mlp(&first, opt);
    first.fit(&mut b, &data, None).unwrap();
    let second = quiet::<P>().max_steps(12).build().unwrap();
    let mut c = mlp(&second, opt);
    let rc = second.fit_from(&mut c, &data, None, &ckpt).unwrap();
    assert_eq!(params(&mut a), params(&mut c), "{tag}: resumed weights differ");
    // The resumed report holds the whole run: the steps before the checkpoint, then its own.
    assert_eq!(ra.history, rc.history, "{tag}: resumed losses differ");
}

#[test]
fn resume_continues_bit_for_bit() {
    use nbit::optim::{Scheduler, UpdateRounding};
    let sgd = Optimization::new(Sgd::new(0.1).momentum(0.9)).with_scheduler(Scheduler::step_lr(1, 0.7));
    resume_matches::<True<F32>>("f32", sgd);
    resume_matches::<True<F64>>("f64", sgd);
    resume_matches::<CpuFp16Amp>("amp", sgd);
    // The update roundings of 16-bit weights: compensation buffers and the stochastic draws'
    // stream resume exactly too (AdamW: per-parameter steps and moments as well).
    let adamw = Optimization::new(AdamW::new(0.01));
    for (tag, r) in [
        ("comp", UpdateRounding::Compensated),
        ("stoch", UpdateRounding::Stochastic),
    ] {
        resume_matches::<True<BF16>>(&format!("bf16-{tag}-sgd"), sgd.update_rounding(r));
        resume_matches::<True<BF16>>(&format!("bf16-{tag}-adamw"), adamw.update_rounding(r));
        resume_matches::<True<F16>>(&format!("f16-{tag}-adamw"), adamw.update_rounding(r));
    }
}

#[test]
fn accumulation_equals_one_big_batch_in_f64() {
    let data = DataLoader::new(blobs(8), 4).unwrap();
    let big = DataLoader::new(blobs(8), 8).unwrap();
    let opt = Optimization::new(Sgd::new(0.5));
    let t = quiet::<True<F64>>()
        .max_steps(1)
        .accumulate_grad_batches(2)
        .build()
        .unwrap();
    let mut a = mlp(&t, opt);
    t.fit(&mut a, &data, None).unwrap();
    let u = quiet::<True<F64>>().max_steps(1).build().unwrap();
    let mut b = mlp(&u, opt);
    u.fit(&mut b, &big, None).unwrap();
    let diff = params(&mut a)
        .iter()
        .flatten()
        .zip(params(&mut b).iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max);
    assert!(diff < 1e-15, "max difference {diff}");
    assert_ne!(
        params(&mut a),
        params(&mut mlp(&u, opt)),
        "the step moved the weights"
    );
}

#[test]
fn checkpoints_load_across_precisions_with_a_note() {
    let data = loader(48, 16);
    let path = tmp("cross.safetensors");
    let t = quiet::<True<F32>>()
        .max_steps(2)
        .checkpoint_path(path.clone())
        .build()
        .unwrap();
    let mut m = mlp(&t, Optimization::new(AdamW::default()));
    t.fit(&mut m, &data, None).unwrap();
    let u = quiet::<True<BF16>>().max_steps(3).build().unwrap();
    let mut n = mlp(&u, Optimization::new(AdamW::default()));
    let r = u.fit_from(&mut n, &data, None, &path).unwrap();
    assert!(
        r.notes[0].contains("saved under 32-true, loaded under bf16-true"),
        "{:?}",
        r.notes
    );
    assert!(
        r.notes
            .iter()
            .any(|n| n.contains("'0.weight' cast from float32 to bfloat16")),
        "{:?}",
        r.notes
    );
    // Two steps read from the checkpoint, one taken here.
    assert_eq!((r.global_step, r.history.len()), (3, 3));
    assert_eq!(r.history.iter().map(|s| s.step).collect::<Vec<_>>(), [1, 2, 3]);
}

#[test]
fn bad_checkpoints_are_errors_naming_the_problem() {
    let t = quiet::<True<F32>>().max_steps(1).build().unwrap();
    let mut m = mlp(&t, Optimization::new(AdamW::default()));
    let good = tmp("good.safetensors");
    t.save_weights(&mut m, &good).unwrap();
    let bytes = std::fs::read(&good).unwrap();

    let truncated = tmp("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() - 10]).unwrap();
    let msg = t.load_weights(&mut m, &truncated).unwrap_err().to_string();
    assert!(
        msg.contains("truncated") && msg.contains("truncated.safetensors"),
        "{msg}"
    );

    let garbage = tmp("garbage.safetensors");
    std::fs::write(&garbage, b"label,x\n1,2\n").unwrap();
    assert!(
        t.load_weights(&mut m, &garbage)
            .unwrap_err()
            .to_string()
            .contains("not a valid safetensors")
    );

    // A file with a tensor missing, and one with a tensor of the wrong shape.
    let small = quiet::<True<F32>>().build().unwrap();
    let mut other = small
        .init_module(|ctx| {
            MlpModel::new(
                ctx,
                &[4, 8, 3],
                Task::Classification,
                Optimization::new(AdamW::default()),
            )
        })
        .unwrap();
    let wrong = tmp("wrong.safetensors");
    small.save_weights(&mut other, &wrong).unwrap();
    let msg = t.load_weights(&mut m, &wrong).unwrap_err().to_string();
    assert!(
        msg.contains("'0.weight'") && msg.contains("[8, 4]") && msg.contains("[16, 4]"),
        "{msg}"
    );
    // A file that lacks the second layer.
    let partial = tmp("partial.safetensors");
    let w = vec![0u8; 16 * 4 * 4];
    let b = vec![0u8; 16 * 4];
    let views = vec![
        (
            "0.weight",
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![16, 4], &w).unwrap(),
        ),
        (
            "0.bias",
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![16], &b).unwrap(),
        ),
    ];
    std::fs::write(&partial, safetensors::serialize(views, None).unwrap()).unwrap();
    let before = params(&mut m);
    let msg = t.load_weights(&mut m, &partial).unwrap_err().to_string();
    assert!(
        msg.contains("'2.weight' is missing") && msg.contains("0.bias, 0.weight"),
        "{msg}"
    );
    assert_eq!(params(&mut m), before, "a failed load changes nothing");

    let missing = tmp("does-not-exist.safetensors");
    assert!(
        t.load_weights(&mut m, &missing)
            .unwrap_err()
            .to_string()
            .contains("cannot read")
    );
    // A weights file is not a training checkpoint.
    let msg = t
        .fit_from(&mut m, &loader(16, 16), None, &good)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("not an nbit checkpoint"), "{msg}");
}

#[test]
fn an_unwritable_path_is_an_error_and_leaves_nothing_behind() {
    let t = quiet::<True<F32>>().build().unwrap();
    let mut m = mlp(&t, Optimization::new(AdamW::default()));
    let dir = tmp("no-such-dir").join("deeper");
    let msg = t
        .save_weights(&mut m, &dir.join("w.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("cannot write") && msg.contains("w.safetensors"),
        "{msg}"
    );
    // Overwriting keeps the old file intact until the new one is complete: write, then rewrite.
    // (In a folder of its own: other tests write checkpoints in parallel.)
    let own = tmp("atomic");
    std::fs::create_dir_all(&own).unwrap();
    let path = own.join("atomic.safetensors");
    t.save_weights(&mut m, &path).unwrap();
    t.save_weights(&mut m, &path).unwrap();
    let leftovers: Vec<_> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

#[test]
fn summary_counts_parameters_and_sizes_by_lightnings_rule() {
    let t = quiet::<Mixed<BF16>>().build().unwrap();
    let mut m = mlp(&t, Optimization::new(AdamW::default()));
    let s = t.summary(&mut m);
    let rows: Vec<(&str, &str, usize)> = s
        .layers
        .iter()
        .map(|l| (l.name.as_str(), l.kind.as_str(), l.params))
        .collect();
    assert_eq!(rows, [("0", "Linear", 80), ("1", "ReLU", 0), ("2", "Linear", 51)]);
    assert_eq!(s.total, 131);
    assert_eq!(
        s.size_mb,
        131.0 * 32.0 / 8.0 / 1e6,
        "32 bits per parameter under mixed precision"
    );
    let t16 = quiet::<True<BF16>>().build().unwrap();
    assert_eq!(
        t16.summary(&mut mlp(&t16, Optimization::new(AdamW::default())))
            .size_mb,
        131.0 * 2.0 / 1e6
    );
    let text = s.to_string();
    assert!(text.contains("\n1 | 1    | ReLU   | 0\n"), "{text}");
    assert!(
        text.contains(
            "\n131       Trainable params\n0         Non-trainable params\n131       Total params\n"
        ),
        "{text}"
    );
}

#[test]
fn validation_and_prediction() {
    let t = quiet::<True<F32>>().max_epochs(20).build().unwrap();
    let mut m = mlp(&t, Optimization::new(AdamW::new(0.02)));
    let val = DataLoader::new(blobs(30), 10).unwrap();
    let r = t.fit(&mut m, &loader(96, 16), Some(&val)).unwrap();
    assert_eq!(r.validation.len(), 20);
    let last = r.validation.last().unwrap();
    assert_eq!(last.count, 30);
    assert!(last.accuracy() > 0.9, "accuracy {}", last.accuracy());
    let out = t.predict(&mut m, &val).unwrap();
    assert_eq!(out.dim(), (30, 3));
    let _: Grads = Tensor::<f32>::scalar(1.0).requires_grad().backward().unwrap();
}

#[test]
fn a_clip_value_of_zero_means_no_clipping_as_in_lightning() {
    let run = |clip: Option<f64>| {
        let mut b = quiet::<Mixed<BF16>>().max_epochs(2);
        if let Some(c) = clip {
            b = b.gradient_clip_val(c);
        }
        let t = b.build().unwrap();
        let mut m = mlp(&t, Optimization::new(Sgd::new(0.1)));
        let first = params(&mut m);
        let fit = t.fit(&mut m, &loader(60, 10), None).unwrap();
        (first, params(&mut m), fit.history.last().unwrap().loss)
    };
    let (first, unclipped, loss) = run(None);
    let (_, zero, zero_loss) = run(Some(0.0));
    assert_ne!(first, unclipped, "training moved the weights");
    assert_eq!(zero, unclipped, "clip value 0 trains exactly as no clipping");
    assert_eq!(zero_loss, loss);
}

#[test]
fn a_parameter_without_a_gradient_is_not_touched_by_the_optimizer() {
    // AdamW with weight decay and SGD with momentum and weight decay: PyTorch skips parameters
    // whose .grad is None, so their values (and state) stay as they were.
    for opt in [
        Optimization::new(AdamW::new(0.01).weight_decay(0.1)),
        Optimization::new(Sgd::new(0.1).momentum(0.9).weight_decay(0.1)),
    ] {
        let t = quiet::<True<F32>>().max_epochs(2).build().unwrap();
        let mut m = odd(&t, "", opt, 0.75);
        let fit = t.fit(&mut m, &loader(30, 10), None).unwrap();
        assert_eq!(
            m.extra.as_ref().unwrap().value().to_vec(),
            vec![0.75f32; 3],
            "{opt:?}"
        );
        assert!(fit.global_step == 6 && fit.optimizer_state_bytes > 0);
        // Only the MLP's parameters have state: 4*16+16+16*3+3 = 131 values per buffer.
        let per_buffer = 131 * 4;
        let buffers = if matches!(opt.optimizer, nbit::optim::Optimizer::AdamW(_)) {
            2
        } else {
            1
        };
        assert_eq!(fit.optimizer_state_bytes, buffers * per_buffer, "{opt:?}");
    }
}

#[test]
fn a_non_finite_loss_without_a_scaler_stops_naming_the_step_and_keeps_the_last_good_weights() {
    let ckpt = tmp("nonfinite.ckpt");
    let opt = Optimization::new(Sgd::new(0.1));
    // 4 steps per epoch; step 7 (global_step 6 before it) multiplies the loss by 1e30, which
    // overflows to inf in f16 (16-true has no scaler).
    let t16 = quiet::<True<F16>>()
        .max_epochs(3)
        .checkpoint_path(ckpt.clone())
        .build()
        .unwrap();
    let mut m16 = inject(&t16, &[6], opt);
    let err = t16.fit(&mut m16, &loader(16, 4), None).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(
            err,
            Error::NonFinite {
                step: 7,
                epoch: 1,
                what: "training loss",
                ..
            }
        ),
        "{msg}"
    );
    assert!(
        msg.contains("at step 7 (epoch 1)") && msg.contains("after step 6") && msg.contains("16-true"),
        "{msg}"
    );
    // The weights are those after step 6, as a run of 6 steps leaves them.
    let t6 = quiet::<True<F16>>().max_steps(6).build().unwrap();
    let mut six = inject(&t6, &[], opt);
    t6.fit(&mut six, &loader(16, 4), None).unwrap();
    assert_eq!(params(&mut m16), params(&mut six));
    // The checkpoint of epoch 0 (4 steps) is still there, finite, and resumable.
    let again = quiet::<True<F16>>().max_epochs(1).build().unwrap();
    let mut resumed = inject(&again, &[], opt);
    let fit = again.fit_from(&mut resumed, &loader(16, 4), None, &ckpt).unwrap();
    assert_eq!((fit.epochs, fit.global_step), (1, 4));
    // Under a precision with a dynamic scaler, the same step is skipped, not an error.
    let amp = quiet::<CpuFp16Amp>().max_epochs(3).build().unwrap();
    let mut m_amp = inject(&amp, &[6], opt);
    let fit = amp.fit(&mut m_amp, &loader(16, 4), None).unwrap();
    assert_eq!(fit.skipped_steps, 1);
}

#[test]
fn an_infinite_gradient_norm_stops_before_the_weights_change() {
    // sqrt of a zero parameter: the loss is finite, its gradient infinite. Clipping by norm sees
    // it; without clipping the weights become NaN and the next step's loss stops the run.
    let opt = Optimization::new(Sgd::new(0.1));
    let t = quiet::<True<F32>>()
        .max_epochs(1)
        .gradient_clip_val(1.0)
        .build()
        .unwrap();
    let mut m = odd(&t, "sqrt", opt, 0.0);
    let before = params(&mut m);
    let err = t.fit(&mut m, &loader(16, 4), None).unwrap_err();
    assert!(
        matches!(
            err,
            Error::NonFinite {
                what: "gradient norm",
                step: 1,
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string().contains("gradient norm became inf at step 1"),
        "{err}"
    );
    assert_eq!(params(&mut m), before, "nothing was applied");
    let t = quiet::<True<F32>>().max_epochs(1).build().unwrap();
    let mut m = odd(&t, "sqrt", opt, 0.0);
    let err = t.fit(&mut m, &loader(16, 4), None).unwrap_err();
    assert!(
        matches!(
            err,
            Error::NonFinite {
                what: "training loss",
                step: 2,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn losses_that_cannot_be_trained_are_errors_in_pytorchs_words() {
    let opt = Optimization::new(Sgd::new(0.1));
    let t = quiet::<True<F32>>().max_epochs(1).build().unwrap();
    let mut m = odd(&t, "matrix", opt, 1.0);
    let msg = t.fit(&mut m, &loader(16, 4), None).unwrap_err().to_string();
    assert!(
        msg.contains("training_step must return a scalar loss (shape []), got [4, 2]"),
        "{msg}"
    );
    let mut m = odd(&t, "constant", opt, 1.0);
    let msg = t.fit(&mut m, &loader(16, 4), None).unwrap_err().to_string();
    assert!(
        msg.contains("depends on no parameter") && msg.contains("does not require grad"),
        "{msg}"
    );
}

/// A copy of checkpoint `src` at `dst` with its metadata changed by `edit`.
fn edited_checkpoint(
    src: &std::path::Path,
    dst: &std::path::Path,
    edit: impl FnOnce(&mut std::collections::HashMap<String, String>),
) {
    let file = std::fs::read(src).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&file).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&file).unwrap();
    let mut meta = header.metadata().clone().unwrap();
    edit(&mut meta);
    std::fs::write(
        dst,
        safetensors::serialize(tensors.tensors(), Some(meta)).unwrap(),
    )
    .unwrap();
}

#[test]
fn a_refused_resume_leaves_the_model_exactly_as_it_was() {
    let ckpt = tmp("adamw.ckpt");
    let t = quiet::<True<F32>>()
        .max_steps(3)
        .checkpoint_path(ckpt.clone())
        .build()
        .unwrap();
    let mut m = mlp(&t, Optimization::new(AdamW::default()));
    t.fit(&mut m, &loader(16, 4), None).unwrap();
    // An AdamW checkpoint resumed by an SGD model.
    let t2 = quiet::<True<F32>>().max_steps(6).build().unwrap();
    let mut sgd = mlp(&t2, Optimization::new(Sgd::new(0.1)));
    let before = params(&mut sgd);
    let msg = t2
        .fit_from(&mut sgd, &loader(16, 4), None, &ckpt)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("optimizer AdamW") && msg.contains("SGD") && msg.contains("--optimizer adamw"),
        "{msg}"
    );
    assert_eq!(params(&mut sgd), before);
    // A checkpoint of a deeper model whose first layers match: its extra layer is named, not
    // silently dropped.
    let deep_ckpt = tmp("deep.ckpt");
    let deep = quiet::<True<F32>>()
        .max_steps(1)
        .checkpoint_path(deep_ckpt.clone())
        .build()
        .unwrap();
    let mut m3 = deep
        .init_module(|ctx| {
            MlpModel::new(
                ctx,
                &[4, 16, 3, 3],
                Task::Classification,
                Optimization::new(AdamW::default()),
            )
        })
        .unwrap();
    deep.fit(&mut m3, &loader(16, 4), None).unwrap();
    let mut adam = mlp(&t2, Optimization::new(AdamW::default()));
    let before = params(&mut adam);
    let msg = t2
        .fit_from(&mut adam, &loader(16, 4), None, &deep_ckpt)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("tensors the model does not have: 4.bias, 4.weight"),
        "{msg}"
    );
    assert_eq!(params(&mut adam), before);
    // The same checkpoint with a counter missing, then one unparsable: errors naming the key.
    for (key, value) in [("epoch", None), ("global_step", Some("three"))] {
        let broken = tmp(&format!("broken-{key}.ckpt"));
        edited_checkpoint(&ckpt, &broken, |meta| match value {
            Some(v) => drop(meta.insert(key.into(), v.into())),
            None => drop(meta.remove(key)),
        });
        let mut adam = mlp(&t2, Optimization::new(AdamW::default()));
        let before = params(&mut adam);
        let msg = t2
            .fit_from(&mut adam, &loader(16, 4), None, &broken)
            .unwrap_err()
            .to_string();
        assert!(msg.contains(&format!("'{key}'")), "{key}: {msg}");
        assert_eq!(
            params(&mut adam),
            before,
            "{key}: a failed resume changes nothing"
        );
    }
    // 32-true has no scaler, so its checkpoint needs no scaler state; under a precision with a
    // scaler, a missing scaler key is an error.
    let amp_ckpt = tmp("amp.ckpt");
    let amp = quiet::<CpuFp16Amp>()
        .max_steps(2)
        .checkpoint_path(amp_ckpt.clone())
        .build()
        .unwrap();
    let mut m = mlp(&amp, Optimization::new(AdamW::default()));
    amp.fit(&mut m, &loader(16, 4), None).unwrap();
    edited_checkpoint(&amp_ckpt, &amp_ckpt, |meta| {
        drop(meta.remove("scaler.growth_tracker"))
    });
    let amp4 = quiet::<CpuFp16Amp>().max_steps(4).build().unwrap();
    let mut m = mlp(&amp4, Optimization::new(AdamW::default()));
    let before = params(&mut m);
    let msg = amp4
        .fit_from(&mut m, &loader(16, 4), None, &amp_ckpt)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("'scaler.growth_tracker'"), "{msg}");
    assert_eq!(params(&mut m), before);
}

#[test]
fn the_step_log_streams_to_disk_and_a_stop_request_ends_after_the_current_step() {
    let log = tmp("steps.csv");
    let t = quiet::<True<F32>>()
        .max_epochs(100)
        .log_csv(log.clone())
        .build()
        .unwrap();
    let stop = t.stop_handle();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut m = mlp(&t, Optimization::new(Sgd::new(0.1)));
    let fit = t.fit(&mut m, &loader(16, 4), None).unwrap();
    assert!(fit.interrupted);
    assert_eq!((fit.global_step, fit.history.len()), (1, 1));
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(text.lines().count(), 2, "{text}");
    assert!(
        text.starts_with("step,epoch,loss,scale,skipped,lr\n1,0,"),
        "{text}"
    );
}

#[test]
fn model_constructors_refuse_sizes_that_cannot_fit_instead_of_aborting() {
    let t = quiet::<Mixed<BF16>>().build().unwrap();
    let err = t
        .init_module(|ctx| {
            MlpModel::new(
                ctx,
                &[64, 100_000, 100_000, 10],
                Task::Classification,
                Optimization::new(AdamW::default()),
            )
        })
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::OutOfMemory { needed: Some(_), .. }), "{msg}");
    assert!(
        msg.contains("training an MLP 64-100000-100000-10 under bf16-mixed with AdamW needs about"),
        "{msg}"
    );
}

/// Trains an MLP large enough that its products and element-wise kernels split across threads,
/// on `threads` threads; returns every final weight's bits.
fn weights_after_training_on<P: Precision>(threads: usize) -> Vec<Vec<u64>>
where
    Cpu: Supports<P>,
{
    let n = 512;
    let x = ndarray::Array2::from_shape_fn((n, 64), |(i, j)| ((i * 37 + j * 11) % 97) as f64 / 48.5 - 1.0);
    let y = (0..n).map(|i| i % 10).collect();
    let data = DataLoader::new(Dataset::classification(x, y).unwrap(), 256).unwrap();
    let trainer = Trainer::<P, Cpu>::builder()
        .max_epochs(1)
        .enable_progress_bar(false)
        .num_threads(threads)
        .build()
        .unwrap();
    let opt = Optimization::new(Sgd::new(0.05).momentum(0.9));
    let mut model = trainer
        .init_module(|ctx| MlpModel::new(ctx, &[64, 256, 256, 10], Task::Classification, opt))
        .unwrap();
    trainer.fit(&mut model, &data, None).unwrap();
    model
        .parameters_mut()
        .iter()
        .map(|p| p.value().to_vec().iter().map(|v| v.as_f64().to_bits()).collect())
        .collect()
}

#[test]
fn the_thread_count_does_not_change_a_single_bit_of_training() {
    // Each output of a product is summed by one thread in one order, and element-wise kernels
    // are element-wise, so any thread count gives the same bits (as a reproducible run needs).
    assert_eq!(
        weights_after_training_on::<True<F32>>(1),
        weights_after_training_on::<True<F32>>(3)
    );
    assert_eq!(
        weights_after_training_on::<Mixed<BF16>>(1),
        weights_after_training_on::<Mixed<BF16>>(2)
    );
    assert_eq!(
        weights_after_training_on::<True<BF16>>(1),
        weights_after_training_on::<True<BF16>>(4)
    );
}

#[test]
fn a_thread_count_of_zero_is_refused() {
    let err = Trainer::<True<F32>, Cpu>::builder()
        .num_threads(0)
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("num_threads = 0"), "{err}");
}

fn callback_data() -> (DataLoader, DataLoader) {
    let (train, val) = blobs(300).split(0.2, 3).unwrap();
    (
        DataLoader::new(train, 30).unwrap().shuffle(true),
        DataLoader::new(val, 60).unwrap(),
    )
}

#[test]
fn early_stopping_stops_after_patience_epochs_without_improvement() {
    let (train, val) = callback_data();
    // A learning rate too small to move the validation loss by min_delta: the first epoch sets
    // the best, the next two do not improve it, and patience 2 stops there (epoch 3 of 50).
    let trainer = Trainer::<True<F32>, Cpu>::builder()
        .max_epochs(50)
        .enable_progress_bar(false)
        .early_stopping(EarlyStopping::new(Monitor::ValLoss).patience(2).min_delta(1e-3))
        .build()
        .unwrap();
    let opt = Optimization::new(Sgd::new(1e-9));
    let mut model = trainer
        .init_module(|ctx| MlpModel::new(ctx, &[4, 8, 3], Task::Classification, opt))
        .unwrap();
    let r = trainer.fit(&mut model, &train, Some(&val)).unwrap();
    assert_eq!(r.epochs, 3);
    let why = r.stopped_early.expect("stopped early");
    assert!(
        why.contains("val_loss did not improve in the last 2 epochs"),
        "{why}"
    );
    // A model that keeps improving trains to max_epochs.
    let trainer = Trainer::<True<F32>, Cpu>::builder()
        .max_epochs(4)
        .enable_progress_bar(false)
        .early_stopping(EarlyStopping::new(Monitor::TrainLoss).patience(1))
        .build()
        .unwrap();
    let opt = Optimization::new(Sgd::new(0.1).momentum(0.9));
    let mut model = trainer
        .init_module(|ctx| MlpModel::new(ctx, &[4, 8, 3], Task::Classification, opt))
        .unwrap();
    let r = trainer.fit(&mut model, &train, None).unwrap();
    assert_eq!((r.epochs, r.stopped_early), (4, None));
}

#[test]
fn model_checkpoint_keeps_the_best_and_the_last_and_the_best_resumes() {
    let (train, val) = callback_data();
    let dir = std::env::temp_dir().join(format!("nbit-mc-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let trainer = Trainer::<Mixed<BF16>, Cpu>::builder()
        .max_epochs(6)
        .enable_progress_bar(false)
        .model_checkpoint(
            ModelCheckpoint::new(&dir)
                .monitor(Some(Monitor::ValAcc))
                .mode(Mode::Max),
        )
        .build()
        .unwrap();
    let opt = Optimization::new(Sgd::new(0.05).momentum(0.9));
    let mut model = trainer
        .init_module(|ctx| MlpModel::new(ctx, &[4, 8, 3], Task::Classification, opt))
        .unwrap();
    let r = trainer.fit(&mut model, &train, Some(&val)).unwrap();
    let (path, score) = r.best_model.clone().expect("a best checkpoint");
    assert_eq!(path, dir.join("best.safetensors"));
    let best_acc = r.validation.iter().map(|m| m.accuracy()).fold(f64::MIN, f64::max);
    assert_eq!(score, best_acc);
    assert!(dir.join("last.safetensors").exists());
    // The best checkpoint resumes like any checkpoint.
    let trainer2 = Trainer::<Mixed<BF16>, Cpu>::builder()
        .max_epochs(7)
        .enable_progress_bar(false)
        .build()
        .unwrap();
    let mut again = trainer2
        .init_module(|ctx| MlpModel::new(ctx, &[4, 8, 3], Task::Classification, opt))
        .unwrap();
    let resumed = trainer2.fit_from(&mut again, &train, Some(&val), &path).unwrap();
    assert_eq!(resumed.epochs, 7);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_validation_metric_without_validation_data_is_an_error_naming_it() {
    let (train, _) = callback_data();
    let trainer = Trainer::<True<F32>, Cpu>::builder()
        .max_epochs(2)
        .enable_progress_bar(false)
        .early_stopping(EarlyStopping::new(Monitor::ValAcc))
        .build()
        .unwrap();
    let opt = Optimization::new(Sgd::new(0.1));
    let mut model = trainer
        .init_module(|ctx| MlpModel::new(ctx, &[4, 8, 3], Task::Classification, opt))
        .unwrap();
    let err = trainer.fit(&mut model, &train, None).unwrap_err().to_string();
    assert!(
        err.contains("monitor = val_acc") && err.contains("pass validation data"),
        "{err}"
    );
}

#[test]
fn the_csv_logger_writes_one_row_per_epoch_in_a_new_version_folder() {
    let (train, val) = callback_data();
    let dir = std::env::temp_dir().join(format!("nbit-csvlog-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let run = || {
        let trainer = Trainer::<True<F32>, Cpu>::builder()
            .max_epochs(3)
            .enable_progress_bar(false)
            .csv_logger(dir.clone())
            .build()
            .unwrap();
        let opt = Optimization::new(Sgd::new(0.1));
        let mut model = trainer
            .init_module(|ctx| MlpModel::new(ctx, &[4, 8, 3], Task::Classification, opt))
            .unwrap();
        trainer.fit(&mut model, &train, Some(&val)).unwrap()
    };
    let first = run();
    let path = first.metrics_csv.clone().unwrap();
    assert_eq!(path, dir.join("version_0").join("metrics.csv"));
    let text = std::fs::read_to_string(&path).unwrap();
    let rows: Vec<&str> = text.lines().collect();
    assert_eq!(rows[0], "epoch,step,train_loss,val_loss,val_acc");
    assert_eq!(rows.len(), 4);
    for (e, row) in rows[1..].iter().enumerate() {
        let cells: Vec<&str> = row.split(',').collect();
        assert_eq!(cells[0], e.to_string());
        assert_eq!(
            cells[1],
            ((e + 1) * 8).to_string(),
            "240 rows / 30 per batch = 8 steps per epoch"
        );
        let mean: f64 = first
            .history
            .iter()
            .filter(|s| s.epoch == e as u64)
            .map(|s| s.loss)
            .sum::<f64>()
            / 8.0;
        assert_eq!(cells[2].parse::<f64>().unwrap(), mean);
        assert_eq!(cells[3].parse::<f64>().unwrap(), first.validation[e].loss());
        assert_eq!(cells[4].parse::<f64>().unwrap(), first.validation[e].accuracy());
    }
    // A second run does not overwrite the first.
    assert_eq!(
        run().metrics_csv.unwrap(),
        dir.join("version_1").join("metrics.csv")
    );
    assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Files under `dir`, relative, with their contents.
fn files_under(dir: &std::path::Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((
                    p.strip_prefix(dir).unwrap().to_path_buf(),
                    std::fs::read(&p).unwrap(),
                ));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn a_run_stopped_at_any_epoch_and_resumed_ends_as_the_uninterrupted_run_with_every_callback() {
    let (train, val) = callback_data();
    let opt = Optimization::new(Sgd::new(0.05).momentum(0.9));
    // Every callback at once: the best by val_acc and the last (ModelCheckpoint), EarlyStopping on
    // val_loss (patience 2, min_delta large enough that it stops before max_epochs), the CSV
    // logger, and the step log. Each run works in its own folder, under the same names.
    let build = |dir: &std::path::Path, epochs: u64| {
        Trainer::<Mixed<BF16>, Cpu>::builder()
            .max_epochs(epochs)
            .enable_progress_bar(false)
            .seed(11)
            .model_checkpoint(
                ModelCheckpoint::new(dir.join("ckpt"))
                    .monitor(Some(Monitor::ValAcc))
                    .mode(Mode::Max),
            )
            .early_stopping(EarlyStopping::new(Monitor::ValLoss).patience(2).min_delta(0.02))
            .csv_logger(dir.join("logs"))
            .log_csv(dir.join("steps.csv"))
            .checkpoint_path(dir.join("resume.safetensors"))
            .build()
            .unwrap()
    };
    let model = |t: &Trainer<Mixed<BF16>, Cpu>| {
        t.init_module(|ctx| MlpModel::new(ctx, &[4, 8, 3], Task::Classification, opt))
            .unwrap()
    };
    let whole_dir = tmp("resume-callbacks-whole");
    let _ = std::fs::remove_dir_all(&whole_dir);
    std::fs::create_dir_all(&whole_dir).unwrap();
    let whole = build(&whole_dir, 30);
    let mut a = model(&whole);
    let ra = whole.fit(&mut a, &train, Some(&val)).unwrap();
    let stopped_at = ra.epochs;
    assert!(
        ra.stopped_early.is_some() && stopped_at >= 4,
        "epochs {stopped_at}: {:?}",
        ra.stopped_early
    );
    assert!(ra.best_model.is_some());
    let whole_files = files_under(&whole_dir);
    for cut in 1..stopped_at {
        let dir = tmp(&format!("resume-callbacks-{cut}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let first = build(&dir, cut);
        let mut b = model(&first);
        let rb = first.fit(&mut b, &train, Some(&val)).unwrap();
        assert_eq!(rb.epochs, cut);
        let second = build(&dir, 30);
        let mut c = model(&second);
        let rc = second
            .fit_from(&mut c, &train, Some(&val), &dir.join("resume.safetensors"))
            .unwrap();
        let at = format!("stopped after epoch {cut}");
        assert_eq!(params(&mut a), params(&mut c), "{at}: weights");
        assert_eq!(ra.history, rc.history, "{at}: history");
        assert_eq!(ra.validation, rc.validation, "{at}: validation");
        assert_eq!(ra.epochs, rc.epochs, "{at}: epochs");
        assert_eq!(ra.stopped_early, rc.stopped_early, "{at}: early stopping");
        let relative = |r: &nbit::FitReport, d: &std::path::Path| {
            r.best_model
                .as_ref()
                .map(|(p, s)| (p.strip_prefix(d).unwrap().to_path_buf(), *s))
        };
        assert_eq!(relative(&ra, &whole_dir), relative(&rc, &dir), "{at}: best model");
        // The same files: the step log, metrics.csv (one version folder), best and last weights.
        let files = files_under(&dir);
        let names = |f: &[(PathBuf, Vec<u8>)]| f.iter().map(|(p, _)| p.clone()).collect::<Vec<_>>();
        assert_eq!(names(&whole_files), names(&files), "{at}: file names");
        for ((name, want), (_, got)) in whole_files.iter().zip(&files) {
            if name.extension().is_some_and(|e| e == "csv") {
                assert_eq!(
                    String::from_utf8_lossy(want),
                    String::from_utf8_lossy(got),
                    "{at}: {}",
                    name.display()
                );
            }
        }
        let weights = |d: &std::path::Path, f: &str| {
            let t = build(d, 1);
            let mut m = model(&t);
            t.load_weights(&mut m, &d.join("ckpt").join(f)).unwrap();
            params(&mut m)
        };
        for f in ["best.safetensors", "last.safetensors"] {
            assert_eq!(weights(&whole_dir, f), weights(&dir, f), "{at}: {f}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
    std::fs::remove_dir_all(&whole_dir).unwrap();
}
