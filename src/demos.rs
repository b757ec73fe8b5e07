//! Lightning's demo language model (`lightning.pytorch.demos.Transformer`), with its parameter
//! names, so a PyTorch user's `state_dict` loads by name and the model trains under any
//! precision with [`Trainer`](crate::Trainer).
//!
//! Deliberate differences, each documented where it lives:
//! - [`Transformer::forward`] is Lightning's `forward(inputs, target, mask)`: the decoder reads
//!   `target`. Trained on next-token targets, that lets the decoder read the very token it
//!   predicts (the causal mask lets position `i` see `target[i]`), so its loss falls towards 0
//!   without learning the language. As a [`Model`] (what the trainer fits) the decoder reads the
//!   inputs instead, and the encoder, the decoder and the attention between them are all causal:
//!   position `i` sees the inputs up to `i` alone, and predicts input `i + 1`.
//! - Its positional encoding is the published one, `pe[:t]`; Lightning's adds the single row
//!   `pe[t]` to every position ([`PositionalEncoding::lightning_demo`] reproduces that).

use crate::autocast::Autocast;
use crate::backend::Backend;
use crate::data::Batch;
use crate::device::Cpu;
use crate::error::Error;
use crate::nn::{
    Embedding, InitCtx, Linear, Masks, Module, Parameter, PositionalEncoding, TransformerOptions,
};
use crate::optim::{Optimization, Sgd};
use crate::precision::Precision;
use crate::tensor::Tensor;
use crate::trainer::{Metrics, Model, StepInfo};

type FullT<P, D> = Tensor<<P as Precision>::Full, D>;
/// Token ids.
type Ids<D> = Tensor<i64, D>;

/// The sizes of Lightning's demo model, with its defaults (`vocab_size` 33278, WikiText-2's;
/// `ninp` 200, `nhead` 2, `nhid` 200, `nlayers` 2, `dropout` 0.2).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TransformerConfig {
    /// Tokens in the vocabulary.
    pub vocab_size: usize,
    /// The model width (`d_model`).
    pub ninp: usize,
    /// Attention heads.
    pub nhead: usize,
    /// The feed-forward width.
    pub nhid: usize,
    /// Encoder layers, and as many decoder layers.
    pub nlayers: usize,
    /// Dropout everywhere.
    pub dropout: f64,
}

impl Default for TransformerConfig {
    fn default() -> Self {
        TransformerConfig {
            vocab_size: 33278,
            ninp: 200,
            nhead: 2,
            nhid: 200,
            nlayers: 2,
            dropout: 0.2,
        }
    }
}

/// `lightning.pytorch.demos.Transformer`: an embedding scaled by `sqrt(ninp)`, a sinusoidal
/// positional encoding with dropout, `nn.Transformer(batch_first=True)`, a linear decoder to the
/// vocabulary and `log_softmax`. Parameters `embedding.weight`, `transformer.*`,
/// `decoder.weight`, `decoder.bias`. Trained (as a [`Model`]) on token windows
/// ([`Dataset::token_windows`](crate::data::Dataset::token_windows)) as a causal language
/// model, with Lightning's SGD (lr 0.1) unless [`Transformer::optimizer`] says otherwise.
#[derive(Clone, Debug)]
pub struct Transformer<P: Precision, D: Backend = Cpu> {
    /// `pos_encoder`.
    pub pos_encoder: PositionalEncoding,
    /// `embedding`: `[vocab_size, ninp]`.
    pub embedding: Embedding<P, D>,
    /// `transformer`.
    pub transformer: crate::nn::Transformer<P, D>,
    /// `decoder`: `[vocab_size, ninp]`.
    pub decoder: Linear<P, D>,
    /// The sizes.
    pub config: TransformerConfig,
    optimization: Optimization,
}

impl<P: Precision, D: Backend> Transformer<P, D> {
    /// The demo model with `config`'s sizes, initialised as PyTorch initialises it.
    pub fn new(ctx: &mut InitCtx<P, D>, config: TransformerConfig) -> Result<Self, Error> {
        let options = TransformerOptions {
            d_model: config.ninp,
            nhead: config.nhead,
            num_encoder_layers: config.nlayers,
            num_decoder_layers: config.nlayers,
            dim_feedforward: config.nhid,
            dropout: config.dropout,
            batch_first: true,
            ..TransformerOptions::default()
        };
        Ok(Transformer {
            pos_encoder: PositionalEncoding::new(config.ninp, config.dropout, 5000)?,
            embedding: Embedding::new(ctx, "embedding", config.vocab_size, config.ninp)?,
            transformer: crate::nn::Transformer::new(ctx, "transformer", &options)?,
            decoder: Linear::new(ctx, "decoder", config.ninp, config.vocab_size)?,
            config,
            optimization: Optimization::new(Sgd::new(0.1)),
        })
    }

    /// The optimizer (and scheduler) training uses.
    pub fn optimizer(mut self, optimization: Optimization) -> Self {
        self.optimization = optimization;
        self
    }

    /// `pos_encoder(embedding(ids) * sqrt(ninp))`, `[batch, t, ninp]` in the compute dtype.
    fn embed(&self, ac: &Autocast<P, D>, ids: &Tensor<i64, D>) -> Result<Tensor<P::Compute, D>, Error> {
        let x = self
            .embedding
            .forward(ac, ids)?
            .mul_scalar((self.config.ninp as f64).sqrt());
        Module::forward(&self.pos_encoder, ac, &x)
    }

    /// Log-probabilities `[batch * t, vocab_size]` of the decoder's output.
    fn head(&self, ac: &Autocast<P, D>, h: &FullT<P, D>) -> Result<FullT<P, D>, Error> {
        let logits = self.decoder.forward(ac, h)?;
        let (b, t) = (h.shape()[0], h.shape()[1]);
        ac.log_softmax(&logits).reshape(&[b * t, self.config.vocab_size])
    }

    /// Lightning's `forward(inputs, target, mask)`: `inputs` and `target` `[batch, t]` ids, the
    /// decoder reading `target` under `mask` (the causal mask when `None`); log-probabilities
    /// `[batch * t, vocab_size]` in `P::Full`.
    pub fn forward(
        &self,
        ac: &Autocast<P, D>,
        inputs: &Tensor<i64, D>,
        target: &Tensor<i64, D>,
        mask: Option<&FullT<P, D>>,
    ) -> Result<FullT<P, D>, Error> {
        let t = inputs.shape().get(1).copied().unwrap_or(0);
        let causal = Tensor::causal_mask(t);
        let (src, tgt) = (self.embed(ac, inputs)?, self.embed(ac, target)?);
        let out = self.transformer.forward(
            ac,
            &src,
            &tgt,
            &Masks::none(),
            &Masks::attn(mask.unwrap_or(&causal)),
            &Masks::none(),
        )?;
        self.head(ac, &out)
    }

    /// The causal language model on `inputs` `[batch, t]`: log-probabilities `[batch * t,
    /// vocab_size]` of each next token, every attention causal (see the module's notes).
    pub fn forward_causal(&self, ac: &Autocast<P, D>, inputs: &Tensor<i64, D>) -> Result<FullT<P, D>, Error> {
        let x = self.embed(ac, inputs)?;
        let c = Masks::causal();
        let out = self.transformer.forward(ac, &x, &x, &c, &c, &c)?;
        self.head(ac, &out)
    }

    /// A batch's inputs and next-token targets (`[batch * t]`).
    fn split(batch: &Batch) -> Result<(Ids<D>, Ids<D>), Error> {
        let tokens = batch.tokens::<D>().ok_or_else(|| {
            Error::InvalidData("the language model trains on token data (Dataset::token_windows)".into())
        })?;
        let (b, len) = (tokens.shape()[0], tokens.shape()[1]);
        if len < 2 {
            return Err(Error::InvalidData(format!(
                "token windows of {len} ids: a language model needs at least 2 (an input and its next token)"
            )));
        }
        let inputs = tokens.narrow(1, 0, len - 1)?;
        let targets = tokens.narrow(1, 1, len - 1)?.reshape(&[b * (len - 1)])?;
        Ok((inputs, targets))
    }
}

impl<P: Precision, D: Backend> Model<P, D> for Transformer<P, D> {
    fn forward(&mut self, ac: &Autocast<P, D>, batch: &Batch) -> Result<FullT<P, D>, Error> {
        self.forward_causal(ac, &Self::split(batch)?.0)
    }

    fn loss(
        &mut self,
        ac: &Autocast<P, D>,
        outputs: &FullT<P, D>,
        batch: &Batch,
    ) -> Result<FullT<P, D>, Error> {
        ac.nll_loss(outputs, &Self::split(batch)?.1)
    }

    /// The mean next-token loss, the batch split into inputs and targets once.
    fn training_step(
        &mut self,
        ac: &Autocast<P, D>,
        batch: &Batch,
        _step: &StepInfo,
    ) -> Result<FullT<P, D>, Error> {
        let (inputs, targets) = Self::split(batch)?;
        ac.nll_loss(&self.forward_causal(ac, &inputs)?, &targets)
    }

    /// Loss summed over every predicted token, and next-token accuracy.
    fn validation_step(&mut self, ac: &Autocast<P, D>, batch: &Batch) -> Result<Metrics, Error> {
        let (inputs, targets) = Self::split(batch)?;
        let outputs = self.forward_causal(ac, &inputs)?;
        let loss = ac.nll_loss(&outputs, &targets)?.item()?;
        let tokens = targets.numel();
        let predicted = outputs.argmax(1)?;
        let correct = predicted
            .iter()
            .zip(targets.to_vec())
            .filter(|&(&p, t)| p as i64 == t)
            .count();
        Ok(Metrics {
            loss_sum: crate::Float::as_f64(loss) * tokens as f64,
            correct,
            count: tokens,
        })
    }

    fn configure_optimizers(&self) -> Optimization {
        self.optimization
    }

    fn parameters_mut(&mut self) -> Vec<&mut Parameter<P::Param, D>> {
        let mut v = self.embedding.parameters_mut();
        v.extend(self.transformer.parameters_mut());
        v.extend(self.decoder.parameters_mut());
        v
    }
}
