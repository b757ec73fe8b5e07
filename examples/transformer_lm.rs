//! Lightning's demo transformer (`lightning.pytorch.demos.Transformer`) trained as a
//! character-level language model on the English text shipped in `examples/data/`, under the
//! precision named on the command line.
//!
//! `cargo run --release --example transformer_lm -- bf16-mixed` (the default; any precision
//! string Lightning accepts, and optionally an accelerator after it: `-- 32-true cpu`).
//! Options: `--steps N` (300), `--batch-size N` (32), `--seq-len N` (64), `--update-rounding
//! nearest|compensated|stochastic` (how bf16-true and 16-true round updated weights; nearest, as
//! PyTorch), `--sample N` (after training, continue "The " by N characters drawn from the model),
//! `--json` (one JSON object instead of the table line, for other programs to run the same
//! configuration).
//!
//! The model has the demo's sizes (`ninp` 200, `nhead` 2, `nhid` 200, `nlayers` 2, dropout 0.2)
//! and trains with AdamW (lr 1e-3) as a causal language model (see `nbit::demos` for how that
//! differs from the demo's own forward). 5% of the windows are held out for validation.

use std::time::Instant;

use nbit::data::{DataLoader, Dataset, Vocabulary};
use nbit::demos::{Transformer, TransformerConfig};
use nbit::optim::{AdamW, Optimization, UpdateRounding};
use nbit::prelude::*;

/// The text: see examples/data/README.md for its source and licence.
const TEXT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/data/jargon.txt.gz");

struct Settings {
    steps: u64,
    batch_size: usize,
    seq_len: usize,
    rounding: UpdateRounding,
    sample: usize,
    json: bool,
}

struct Fit {
    train: DataLoader,
    val: DataLoader,
    config: TransformerConfig,
    steps: u64,
    rounding: UpdateRounding,
    /// Ids to continue, and how many to add after training (0: none).
    prompt: Vec<i64>,
    sample: usize,
}

struct Outcome {
    val_loss: f64,
    tokens_per_sec: f64,
    steps: u64,
    sample: Vec<i64>,
}

impl RunJob for Fit {
    type Output = Outcome;

    fn run<P: Precision, D: Runs<P>>(self) -> Result<Outcome, Error> {
        let trainer = Trainer::<P, D>::builder()
            .max_steps(self.steps)
            .max_epochs(u64::MAX)
            .seed(0)
            .log_every_n_steps(10)
            .build()?;
        let (config, rounding) = (self.config, self.rounding);
        let optimization = Optimization::new(AdamW::new(1e-3)).update_rounding(rounding);
        let mut model =
            trainer.init_module(|ctx| Ok(Transformer::new(ctx, config)?.optimizer(optimization)))?;
        let start = Instant::now();
        let report = trainer.fit(&mut model, &self.train, None)?;
        let secs = start.elapsed().as_secs_f64();
        let tokens = report.samples as f64 * (self.train.dataset().num_features() - 1) as f64;
        let metrics = trainer.validate(&mut model, &self.val)?;
        let window = self.train.dataset().num_features() - 1;
        let sample = continue_text(&model, self.prompt, self.sample, window)?;
        Ok(Outcome {
            val_loss: metrics.loss(),
            tokens_per_sec: tokens / secs,
            steps: report.history.len() as u64,
            sample,
        })
    }
}

/// `ids` continued by `count` ids drawn one at a time from the model's next-token distribution at
/// temperature 0.8 (seeded, so a run repeats), reading at most the last `window` ids.
fn continue_text<P: Precision, D: Runs<P>>(
    model: &Transformer<P, D>,
    mut ids: Vec<i64>,
    count: usize,
    window: usize,
) -> Result<Vec<i64>, Error> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let ac = nbit::autocast::Autocast::<P, D>::new();
    for _ in 0..count {
        let context = &ids[ids.len().saturating_sub(window)..];
        let input = Tensor::<i64, D>::from_vec(&[1, context.len()], context.to_vec())?;
        let logp = nbit::autograd::no_grad(|| model.forward_causal(&ac, &input))?.to_vec();
        let vocab = model.config.vocab_size;
        let last: Vec<f64> = logp[logp.len() - vocab..]
            .iter()
            .map(|v| v.as_f64() / 0.8)
            .collect();
        let top = last.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let weights: Vec<f64> = last.iter().map(|l| (l - top).exp()).collect();
        // xorshift64*: a uniform draw in [0, 1).
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        let u = (state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64;
        let mut left = u * weights.iter().sum::<f64>();
        let next = weights.iter().position(|w| {
            left -= w;
            left < 0.0
        });
        ids.push(next.unwrap_or(vocab - 1) as i64);
    }
    Ok(ids)
}

/// The process's peak resident set (VmHWM) in bytes, where Linux reports it.
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn read_text() -> Result<String, Error> {
    let io = |e: std::io::Error| Error::Io {
        path: TEXT.into(),
        action: "read",
        reason: e.to_string(),
    };
    let file = std::fs::File::open(TEXT).map_err(io)?;
    let mut text = String::new();
    std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(file), &mut text).map_err(io)?;
    Ok(text)
}

fn parse(args: &[String]) -> Result<(String, String, Settings), Error> {
    let mut s = Settings {
        steps: 300,
        batch_size: 32,
        seq_len: 64,
        rounding: UpdateRounding::Nearest,
        sample: 0,
        json: false,
    };
    let mut positional = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut number = |name: &'static str| -> Result<usize, Error> {
            let v = it.next().map(String::as_str).unwrap_or("");
            v.parse::<usize>()
                .ok()
                .filter(|&n| n > 0)
                .ok_or(Error::InvalidArgument {
                    name,
                    value: format!("'{v}'"),
                    expected: "a whole number of at least 1",
                })
        };
        match a.as_str() {
            "--json" => s.json = true,
            "--steps" => s.steps = number("--steps")? as u64,
            "--batch-size" => s.batch_size = number("--batch-size")?,
            "--seq-len" => s.seq_len = number("--seq-len")?,
            "--sample" => s.sample = number("--sample")?,
            "--update-rounding" => s.rounding = it.next().map(String::as_str).unwrap_or("").parse()?,
            other if other.starts_with("--") => {
                return Err(Error::InvalidArgument {
                    name: "option",
                    value: other.into(),
                    expected: "--steps N, --batch-size N, --seq-len N, --update-rounding R, --sample N or --json",
                });
            }
            other => positional.push(other.to_string()),
        }
    }
    let precision = positional.first().cloned().unwrap_or_else(|| "bf16-mixed".into());
    let accelerator = positional.get(1).cloned().unwrap_or_else(|| "cpu".into());
    Ok((precision, accelerator, s))
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Err(e) = run(&args) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run(args: &[String]) -> Result<(), Error> {
    let (precision, accelerator, s) = parse(args)?;
    let text = read_text()?;
    let vocab = Vocabulary::from_text(&text);
    let ids = vocab.encode(&text)?;
    let (train, val) = Dataset::token_windows(&ids, s.seq_len)?.split(0.05, 0)?;
    let config = TransformerConfig {
        vocab_size: vocab.len(),
        ..TransformerConfig::default()
    };
    let job = Fit {
        train: DataLoader::new(train, s.batch_size)?
            .shuffle(true)
            .seed(0)
            .drop_last(true),
        val: DataLoader::new(val, 64)?,
        config,
        steps: s.steps,
        rounding: s.rounding,
        prompt: vocab.encode("The ")?,
        sample: s.sample,
    };
    let out = nbit::launch(&precision, &accelerator, job)?;
    let perplexity = out.val_loss.exp();
    let rss = peak_rss();
    if s.json {
        let object = serde_json::json!({
            "precision": precision,
            "vocab_size": config.vocab_size,
            "d_model": config.ninp,
            "nhead": config.nhead,
            "num_layers": config.nlayers,
            "dim_feedforward": config.nhid,
            "seq_len": s.seq_len,
            "batch_size": s.batch_size,
            "steps": out.steps,
            "update_rounding": s.rounding.name(),
            "val_loss": out.val_loss,
            "val_perplexity": perplexity,
            "tokens_per_sec": out.tokens_per_sec,
            "peak_rss_bytes": rss,
        });
        println!("{object}");
    } else {
        println!(
            "{precision} on {accelerator}: {} steps of {} x {} tokens, validation loss {:.4}, perplexity {perplexity:.3}, {:.0} tokens/s, peak RSS {}",
            out.steps,
            s.batch_size,
            s.seq_len,
            out.val_loss,
            out.tokens_per_sec,
            rss.map_or("unknown".into(), |b| format!("{:.0} MB", b as f64 / 1e6))
        );
        if s.sample > 0 {
            println!("sample: {:?}", vocab.decode(&out.sample)?);
        }
    }
    Ok(())
}
