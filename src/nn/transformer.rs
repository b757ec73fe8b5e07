//! Attention and the transformer: PyTorch's `nn.MultiheadAttention`,
//! `nn.TransformerEncoderLayer`, `nn.TransformerDecoderLayer`, `nn.TransformerEncoder`,
//! `nn.TransformerDecoder` and `nn.Transformer`, with their constructor arguments, defaults,
//! initialisation and parameter names (`self_attn.in_proj_weight`, `linear1.weight`,
//! `norm1.bias`, ...), so a PyTorch `state_dict` loads by name. And the sinusoidal
//! [`PositionalEncoding`] of PyTorch's word-language-model example.
//!
//! Masks are additive tensors in the precision's `P::Full` dtype (PyTorch's float masks: 0 keeps a
//! position, `-inf` hides it); [`Tensor::to_additive_mask`] turns a 0/1 mask (PyTorch's bool mask,
//! 1 = hidden) into one, and [`Tensor::causal_mask`] is
//! `nn.Transformer.generate_square_subsequent_mask`.
//!
//! Under a mixed precision the projections, the feed-forward layers and the two products of
//! attention run in the compute dtype, the softmax and the layer norms in `P::Full` (see
//! [`Autocast::scaled_dot_product_attention`]), and the residual stream between them stays in
//! `P::Full`, as it does under PyTorch's autocast (a layer norm returns f32, and an f32 + bf16
//! sum is f32).
//!
//! ```
//! use nbit::prelude::*;
//! use nbit::autocast::Autocast;
//! use nbit::nn::{InitCtx, Masks, Transformer, TransformerOptions};
//!
//! let mut ctx = InitCtx::<True<F64>>::new(0);
//! let options = TransformerOptions { d_model: 8, nhead: 2, num_encoder_layers: 1, num_decoder_layers: 1,
//!     dim_feedforward: 16, batch_first: true, ..TransformerOptions::default() };
//! let mut model = Transformer::new(&mut ctx, "", &options)?;
//! let src = Tensor::<f64>::zeros(&[2, 5, 8]);
//! let tgt = Tensor::<f64>::zeros(&[2, 3, 8]);
//! let mask = Tensor::causal_mask(3);
//! let ac = Autocast::new();
//! let out = model.forward(&ac, &src, &tgt, &Masks::none(), &Masks::attn(&mask), &Masks::none())?;
//! assert_eq!(out.shape(), &[2, 3, 8]);
//! assert_eq!(model.parameters_mut().len(), 34); // PyTorch's state_dict has 34 entries too
//! assert!(model.parameters_mut().iter().any(|p| p.name() == "decoder.layers.0.multihead_attn.in_proj_weight"));
//! # Ok::<(), nbit::Error>(())
//! ```

use super::{InitCtx, LayerNorm, Linear, Module, Parameter};
use crate::autocast::Autocast;
use crate::backend::Backend;
use crate::device::Cpu;
use crate::dtype::Float;
use crate::error::Error;
use crate::precision::Precision;
use crate::tensor::Tensor;

type Act<P, D> = Tensor<<P as Precision>::Compute, D>;
type FullT<P, D> = Tensor<<P as Precision>::Full, D>;

/// `prefix.name`, or `name` alone under an empty prefix.
fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// `torch.nn.init.xavier_uniform_`'s bound for a `[out, in]` matrix.
fn xavier(out: usize, inp: usize) -> f64 {
    (6.0 / (out + inp).max(1) as f64).sqrt()
}

/// The masks of one attention: an additive `attn_mask` (`[t, s]`, or `[batch * heads, t, s]` as
/// PyTorch's 3-D form), an additive `key_padding_mask` (`[batch, s]`) and `is_causal`, which adds
/// the causal mask (PyTorch takes it as a hint that `attn_mask` is causal; nbit builds the mask
/// when none is given).
pub struct Masks<'a, P: Precision, D: Backend = Cpu> {
    /// Added to every head's scores `[t, s]` (or per batch and head, `[batch * heads, t, s]`).
    pub attn_mask: Option<&'a FullT<P, D>>,
    /// Added to each batch row's scores over keys, `[batch, s]`.
    pub key_padding_mask: Option<&'a FullT<P, D>>,
    /// Hide every key after the query's position.
    pub is_causal: bool,
}

impl<'a, P: Precision, D: Backend> Masks<'a, P, D> {
    /// No mask.
    pub fn none() -> Self {
        Masks {
            attn_mask: None,
            key_padding_mask: None,
            is_causal: false,
        }
    }

    /// An additive `attn_mask` alone.
    pub fn attn(mask: &'a FullT<P, D>) -> Self {
        Masks {
            attn_mask: Some(mask),
            ..Self::none()
        }
    }

    /// The causal mask alone.
    pub fn causal() -> Self {
        Masks {
            is_causal: true,
            ..Self::none()
        }
    }
}

impl<P: Precision, D: Backend> Clone for Masks<'_, P, D> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<P: Precision, D: Backend> Copy for Masks<'_, P, D> {}

impl<P: Precision, D: Backend> core::fmt::Debug for Masks<'_, P, D> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Masks")
            .field("attn_mask", &self.attn_mask.map(|m| m.shape().to_vec()))
            .field(
                "key_padding_mask",
                &self.key_padding_mask.map(|m| m.shape().to_vec()),
            )
            .field("is_causal", &self.is_causal)
            .finish()
    }
}

impl<P: Precision, D: Backend> Default for Masks<'_, P, D> {
    fn default() -> Self {
        Self::none()
    }
}

/// `torch.nn.MultiheadAttention(embed_dim, num_heads, dropout, batch_first=...)` with its
/// parameters: `in_proj_weight` `[3 E, E]` (Xavier-uniform), `in_proj_bias` `[3 E]` (zeros),
/// `out_proj.weight` `[E, E]` (`Linear`'s init) and `out_proj.bias` (zeros). Always returns the
/// attention output alone (PyTorch's `need_weights=False`).
#[derive(Clone, Debug)]
pub struct MultiheadAttention<P: Precision, D: Backend = Cpu> {
    /// `[3 E, E]`: the query, key and value projections stacked.
    pub in_proj_weight: Parameter<P::Param, D>,
    /// `[3 E]`.
    pub in_proj_bias: Parameter<P::Param, D>,
    /// The output projection `[E, E]`.
    pub out_proj: Linear<P, D>,
    /// The number of heads; `E` is a multiple of it.
    pub num_heads: usize,
    /// Dropout on the attention probabilities (training passes only).
    pub dropout: f64,
    /// Inputs and outputs `[batch, seq, E]` when true, `[seq, batch, E]` (PyTorch's default) when
    /// false.
    pub batch_first: bool,
}

impl<P: Precision, D: Backend> MultiheadAttention<P, D> {
    /// Attention named `prefix` over `embed_dim` features split into `num_heads` heads. An
    /// `embed_dim` that `num_heads` does not divide, or a dropout outside `[0, 1]`, is an error.
    pub fn new(
        ctx: &mut InitCtx<P, D>,
        prefix: &str,
        embed_dim: usize,
        num_heads: usize,
        dropout: f64,
        batch_first: bool,
    ) -> Result<Self, Error> {
        if num_heads == 0 || !embed_dim.is_multiple_of(num_heads) {
            return Err(Error::InvalidArgument {
                name: "num_heads",
                value: format!("{num_heads} for embed_dim {embed_dim}"),
                expected: "a number of heads that divides embed_dim",
            });
        }
        if !(0.0..=1.0).contains(&dropout) {
            return Err(Error::InvalidArgument {
                name: "dropout",
                value: dropout.to_string(),
                expected: "a probability in [0, 1]",
            });
        }
        let e = embed_dim;
        let in_proj_weight = ctx.parameter(join(prefix, "in_proj_weight"), &[3 * e, e], xavier(e, 3 * e))?;
        let in_proj_bias = Parameter::new(join(prefix, "in_proj_bias"), Tensor::zeros(&[3 * e]));
        let mut out_proj = Linear::new(ctx, &join(prefix, "out_proj"), e, e)?;
        out_proj.bias = Parameter::new(join(prefix, "out_proj.bias"), Tensor::zeros(&[e]));
        Ok(MultiheadAttention {
            in_proj_weight,
            in_proj_bias,
            out_proj,
            num_heads,
            dropout,
            batch_first,
        })
    }

    /// The embedding size `E`.
    pub fn embed_dim(&self) -> usize {
        self.out_proj.weight.value().shape()[0]
    }

    /// Attention of `query` (`[batch, t, E]`, or `[t, batch, E]` unless `batch_first`) over
    /// `key` and `value` (`[batch, s, E]`), under `masks`; the output, in the compute dtype, has
    /// the query's shape. Inputs of any dtype are rounded to the compute dtype (matmul class).
    pub fn forward<X: Float>(
        &self,
        ac: &Autocast<P, D>,
        query: &Tensor<X, D>,
        key: &Tensor<X, D>,
        value: &Tensor<X, D>,
        masks: &Masks<'_, P, D>,
    ) -> Result<Act<P, D>, Error> {
        let (query, key, value) = (
            query.cast::<P::Compute>(),
            key.cast::<P::Compute>(),
            value.cast::<P::Compute>(),
        );
        let e = self.embed_dim();
        let (h, dh) = (self.num_heads, e / self.num_heads);
        let batch_first = |x: &Act<P, D>| -> Result<Act<P, D>, Error> {
            if x.shape().len() != 3 || x.shape()[2] != e {
                return Err(crate::tensor::mismatch(
                    "multi-head attention",
                    x.shape(),
                    &[e],
                    "inputs must be [batch, seq, embed_dim] (or [seq, batch, embed_dim])",
                ));
            }
            if self.batch_first {
                Ok(x.clone())
            } else {
                x.swapaxes(0, 1)
            }
        };
        let (q_in, k_in, v_in) = (batch_first(&query)?, batch_first(&key)?, batch_first(&value)?);
        let (b, t, s) = (q_in.shape()[0], q_in.shape()[1], k_in.shape()[1]);
        if k_in.shape()[..2] != v_in.shape()[..2] || k_in.shape()[0] != b {
            return Err(crate::tensor::mismatch(
                "multi-head attention",
                k_in.shape(),
                v_in.shape(),
                "key and value must have one batch and length, and the query's batch",
            ));
        }
        let w = ac.weight(self.in_proj_weight.value());
        let bias = ac.weight(self.in_proj_bias.value());
        // One product per projection, from the rows of the packed weight: the same dot products
        // as PyTorch's one packed product for self-attention, without splitting a `[b, t, 3E]`
        // activation (three copies forward, three full-size gradients backward).
        let proj =
            |x: &Act<P, D>, i: usize| x.linear(&w.narrow(0, i * e, e)?, Some(&bias.narrow(0, i * e, e)?));
        let (q, k, v) = (proj(&q_in, 0)?, proj(&k_in, 1)?, proj(&v_in, 2)?);
        // [b, len, E] -> [b, h, len, dh]
        let heads = |x: Act<P, D>, len: usize| x.reshape(&[b, len, h, dh])?.permute(&[0, 2, 1, 3]);
        let (q, k, v) = (heads(q, t)?, heads(k, s)?, heads(v, s)?);
        let mask = self.combined_mask(masks, b, t, s)?;
        let p = if ac.is_training() { self.dropout } else { 0.0 };
        let o = ac.scaled_dot_product_attention(&q, &k, &v, mask.as_ref(), p, masks.is_causal)?;
        let o = o.permute(&[0, 2, 1, 3])?.reshape(&[b, t, e])?;
        let o = self.out_proj.forward(ac, &o)?;
        if self.batch_first { Ok(o) } else { o.swapaxes(0, 1) }
    }

    /// The attention and key-padding masks as one additive mask broadcasting to `[b, h, t, s]`.
    fn combined_mask(
        &self,
        masks: &Masks<'_, P, D>,
        b: usize,
        t: usize,
        s: usize,
    ) -> Result<Option<FullT<P, D>>, Error> {
        let h = self.num_heads;
        let attn = match masks.attn_mask {
            None => None,
            Some(m) if m.shape() == [t, s] => Some(m.clone()),
            Some(m) if m.shape() == [b * h, t, s] => Some(m.reshape(&[b, h, t, s])?),
            Some(m) => {
                return Err(crate::tensor::mismatch(
                    "attn_mask",
                    m.shape(),
                    &[t, s],
                    "attn_mask must be [target length, source length] or [batch * heads, target, source]",
                ));
            }
        };
        let padding = match masks.key_padding_mask {
            None => None,
            Some(m) if m.shape() == [b, s] => Some(m.reshape(&[b, 1, 1, s])?),
            Some(m) => {
                return Err(crate::tensor::mismatch(
                    "key_padding_mask",
                    m.shape(),
                    &[b, s],
                    "key_padding_mask must be [batch, source length]",
                ));
            }
        };
        Ok(match (attn, padding) {
            (Some(a), Some(p)) => Some(a.add(&p)?),
            (a, p) => a.or(p),
        })
    }

    /// The four parameters, in PyTorch's order.
    pub fn parameters_mut(&mut self) -> Vec<&mut Parameter<P::Param, D>> {
        let mut v = vec![&mut self.in_proj_weight, &mut self.in_proj_bias];
        v.extend(self.out_proj.parameters_mut());
        v
    }
}

impl<P: Precision, D: Backend> Module<P, D> for MultiheadAttention<P, D> {
    /// Self-attention without masks.
    fn forward(&self, ac: &Autocast<P, D>, x: &Act<P, D>) -> Result<Act<P, D>, Error> {
        MultiheadAttention::forward(self, ac, x, x, x, &Masks::none())
    }
    fn parameters_mut(&mut self) -> Vec<&mut Parameter<P::Param, D>> {
        MultiheadAttention::parameters_mut(self)
    }
}

/// The feed-forward activation of a transformer layer (PyTorch's `activation="relu"` or
/// `"gelu"`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Activation {
    /// `max(x, 0)`, PyTorch's default.
    #[default]
    Relu,
    /// GELU with the exact normal CDF.
    Gelu,
}

/// The arguments of a transformer layer after `d_model` and `nhead`, with PyTorch's defaults.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LayerOptions {
    /// The feed-forward width (2048).
    pub dim_feedforward: usize,
    /// Dropout after attention, inside and after the feed-forward block, and on attention
    /// probabilities (0.1).
    pub dropout: f64,
    /// The feed-forward activation (ReLU).
    pub activation: Activation,
    /// The layer norms' epsilon (1e-5).
    pub layer_norm_eps: f64,
    /// `[batch, seq, feature]` inputs when true; `[seq, batch, feature]` (false) is PyTorch's
    /// default.
    pub batch_first: bool,
    /// Layer norm before each block (pre-norm) instead of after the residual sum (false).
    pub norm_first: bool,
}

impl Default for LayerOptions {
    fn default() -> Self {
        LayerOptions {
            dim_feedforward: 2048,
            dropout: 0.1,
            activation: Activation::Relu,
            layer_norm_eps: 1e-5,
            batch_first: false,
            norm_first: false,
        }
    }
}

/// `linear2(dropout(activation(linear1(x))))`, the feed-forward block.
#[derive(Clone, Debug)]
struct FeedForward<P: Precision, D: Backend> {
    linear1: Linear<P, D>,
    linear2: Linear<P, D>,
    activation: Activation,
    dropout: f64,
}

impl<P: Precision, D: Backend> FeedForward<P, D> {
    fn new(ctx: &mut InitCtx<P, D>, prefix: &str, d_model: usize, o: &LayerOptions) -> Result<Self, Error> {
        Ok(FeedForward {
            linear1: Linear::new(ctx, &join(prefix, "linear1"), d_model, o.dim_feedforward)?,
            linear2: Linear::new(ctx, &join(prefix, "linear2"), o.dim_feedforward, d_model)?,
            activation: o.activation,
            dropout: o.dropout,
        })
    }

    fn forward(&self, ac: &Autocast<P, D>, x: &FullT<P, D>) -> Result<FullT<P, D>, Error> {
        let h = self.linear1.forward(ac, x)?;
        let h = match self.activation {
            Activation::Relu => h.relu(),
            Activation::Gelu => h.gelu(),
        };
        let h = dropout(ac, &h, self.dropout)?;
        dropout(ac, &self.linear2.forward(ac, &h)?.cast::<P::Full>(), self.dropout)
    }
}

/// Dropout in training passes, the identity in evaluation.
fn dropout<P: Precision, D: Backend, X: Float>(
    ac: &Autocast<P, D>,
    x: &Tensor<X, D>,
    p: f64,
) -> Result<Tensor<X, D>, Error> {
    match ac.next_seed() {
        Some(seed) if p > 0.0 => x.dropout(p, seed),
        _ => Ok(x.clone()),
    }
}

/// A layer norm in `P::Full` (fp32 class), its output kept there.
fn norm<P: Precision, D: Backend>(
    ac: &Autocast<P, D>,
    n: &LayerNorm<P, D>,
    x: &FullT<P, D>,
) -> Result<FullT<P, D>, Error> {
    ac.layer_norm(x, Some(n.weight.value()), Some(n.bias.value()), n.eps)
}

fn layer_norm<P: Precision, D: Backend>(prefix: &str, name: &str, size: usize, eps: f64) -> LayerNorm<P, D> {
    let mut n = LayerNorm::new(&join(prefix, name), size);
    n.eps = eps;
    n
}

/// `torch.nn.TransformerEncoderLayer(d_model, nhead, ...)`: self-attention and a feed-forward
/// block, each with dropout, a residual connection and a layer norm (after the sum, or before
/// the block when `norm_first`). Parameters `self_attn.*`, `linear1.*`, `linear2.*`, `norm1.*`,
/// `norm2.*`.
#[derive(Clone, Debug)]
pub struct TransformerEncoderLayer<P: Precision, D: Backend = Cpu> {
    /// The self-attention.
    pub self_attn: MultiheadAttention<P, D>,
    ff: FeedForward<P, D>,
    /// Normalises the attention block.
    pub norm1: LayerNorm<P, D>,
    /// Normalises the feed-forward block.
    pub norm2: LayerNorm<P, D>,
    norm_first: bool,
    dropout: f64,
}

impl<P: Precision, D: Backend> TransformerEncoderLayer<P, D> {
    /// A layer named `prefix` of width `d_model` with `nhead` heads.
    pub fn new(
        ctx: &mut InitCtx<P, D>,
        prefix: &str,
        d_model: usize,
        nhead: usize,
        o: &LayerOptions,
    ) -> Result<Self, Error> {
        Ok(TransformerEncoderLayer {
            self_attn: MultiheadAttention::new(
                ctx,
                &join(prefix, "self_attn"),
                d_model,
                nhead,
                o.dropout,
                o.batch_first,
            )?,
            ff: FeedForward::new(ctx, prefix, d_model, o)?,
            norm1: layer_norm(prefix, "norm1", d_model, o.layer_norm_eps),
            norm2: layer_norm(prefix, "norm2", d_model, o.layer_norm_eps),
            norm_first: o.norm_first,
            dropout: o.dropout,
        })
    }

    /// The layer applied to `src` under `masks` (PyTorch's `src_mask`, `src_key_padding_mask`,
    /// `is_causal`). The residual stream is in `P::Full`, as under PyTorch's autocast, where the
    /// layer norms (fp32 class) hand f32 to the residual sums.
    pub fn forward(
        &self,
        ac: &Autocast<P, D>,
        src: &FullT<P, D>,
        masks: &Masks<'_, P, D>,
    ) -> Result<FullT<P, D>, Error> {
        let sa = |x: &FullT<P, D>| {
            let a = self.self_attn.forward(ac, x, x, x, masks)?.cast::<P::Full>();
            dropout(ac, &a, self.dropout)
        };
        if self.norm_first {
            let x = src.add(&sa(&norm(ac, &self.norm1, src)?)?)?;
            x.add(&self.ff.forward(ac, &norm(ac, &self.norm2, &x)?)?)
        } else {
            let x = norm(ac, &self.norm1, &src.add(&sa(src)?)?)?;
            norm(ac, &self.norm2, &x.add(&self.ff.forward(ac, &x)?)?)
        }
    }

    /// Every parameter, in PyTorch's `state_dict` order.
    pub fn parameters_mut(&mut self) -> Vec<&mut Parameter<P::Param, D>> {
        let mut v = self.self_attn.parameters_mut();
        v.extend(self.ff.linear1.parameters_mut());
        v.extend(self.ff.linear2.parameters_mut());
        v.extend([&mut self.norm1.weight, &mut self.norm1.bias]);
        v.extend([&mut self.norm2.weight, &mut self.norm2.bias]);
        v
    }
}

impl<P: Precision, D: Backend> Module<P, D> for TransformerEncoderLayer<P, D> {
    fn forward(&self, ac: &Autocast<P, D>, x: &Act<P, D>) -> Result<Act<P, D>, Error> {
        Ok(TransformerEncoderLayer::forward(self, ac, &x.cast(), &Masks::none())?.cast())
    }
    fn parameters_mut(&mut self) -> Vec<&mut Parameter<P::Param, D>> {
        TransformerEncoderLayer::parameters_mut(self)
    }
}

/// `torch.nn.TransformerDecoderLayer(d_model, nhead, ...)`: masked self-attention, attention
/// over the encoder's output (`multihead_attn`) and a feed-forward block, each with dropout, a
/// residual connection and a layer norm (`norm1`..`norm3`).
#[derive(Clone, Debug)]
pub struct TransformerDecoderLayer<P: Precision, D: Backend = Cpu> {
    /// The self-attention.
    pub self_attn: MultiheadAttention<P, D>,
    /// The attention over the memory (the encoder's output).
    pub multihead_attn: MultiheadAttention<P, D>,
    ff: FeedForward<P, D>,
    /// Normalises the self-attention block.
    pub norm1: LayerNorm<P, D>,
    /// Normalises the memory-attention block.
    pub norm2: LayerNorm<P, D>,
    /// Normalises the feed-forward block.
    pub norm3: LayerNorm<P, D>,
    norm_first: bool,
    dropout: f64,
}

impl<P: Precision, D: Backend> TransformerDecoderLayer<P, D> {
    /// A layer named `prefix` of width `d_model` with `nhead` heads.
    pub fn new(
        ctx: &mut InitCtx<P, D>,
        prefix: &str,
        d_model: usize,
        nhead: usize,
        o: &LayerOptions,
    ) -> Result<Self, Error> {
        let attn = |ctx: &mut InitCtx<P, D>, name| {
            MultiheadAttention::new(ctx, &join(prefix, name), d_model, nhead, o.dropout, o.batch_first)
        };
        Ok(TransformerDecoderLayer {
            self_attn: attn(ctx, "self_attn")?,
            multihead_attn: attn(ctx, "multihead_attn")?,
            ff: FeedForward::new(ctx, prefix, d_model, o)?,
            norm1: layer_norm(prefix, "norm1", d_model, o.layer_norm_eps),
            norm2: layer_norm(prefix, "norm2", d_model, o.layer_norm_eps),
            norm3: layer_norm(prefix, "norm3", d_model, o.layer_norm_eps),
            norm_first: o.norm_first,
            dropout: o.dropout,
        })
    }

    /// The layer applied to `tgt` attending to `memory`, under `tgt_masks` (PyTorch's
    /// `tgt_mask`, `tgt_key_padding_mask`, `tgt_is_causal`) and `memory_masks` (`memory_mask`,
    /// `memory_key_padding_mask`, `memory_is_causal`).
    pub fn forward(
        &self,
        ac: &Autocast<P, D>,
        tgt: &FullT<P, D>,
        memory: &FullT<P, D>,
        tgt_masks: &Masks<'_, P, D>,
        memory_masks: &Masks<'_, P, D>,
    ) -> Result<FullT<P, D>, Error> {
        let sa = |x: &FullT<P, D>| {
            let a = self.self_attn.forward(ac, x, x, x, tgt_masks)?.cast::<P::Full>();
            dropout(ac, &a, self.dropout)
        };
        let mha = |x: &FullT<P, D>| {
            let a = self
                .multihead_attn
                .forward(ac, x, memory, memory, memory_masks)?
                .cast::<P::Full>();
            dropout(ac, &a, self.dropout)
        };
        if self.norm_first {
            let x = tgt.add(&sa(&norm(ac, &self.norm1, tgt)?)?)?;
            let x = x.add(&mha(&norm(ac, &self.norm2, &x)?)?)?;
            x.add(&self.ff.forward(ac, &norm(ac, &self.norm3, &x)?)?)
        } else {
            let x = norm(ac, &self.norm1, &tgt.add(&sa(tgt)?)?)?;
            let x = norm(ac, &self.norm2, &x.add(&mha(&x)?)?)?;
            norm(ac, &self.norm3, &x.add(&self.ff.forward(ac, &x)?)?)
        }
    }

    /// Every parameter, in PyTorch's `state_dict` order.
    pub fn parameters_mut(&mut self) -> Vec<&mut Parameter<P::Param, D>> {
        let mut v = self.self_attn.parameters_mut();
        v.extend(self.multihead_attn.parameters_mut());
        v.extend(self.ff.linear1.parameters_mut());
        v.extend(self.ff.linear2.parameters_mut());
        for n in [&mut self.norm1, &mut self.norm2, &mut self.norm3] {
            v.extend([&mut n.weight, &mut n.bias]);
        }
        v
    }
}

/// A layer of a [`LayerStack`]: built from the stack's arguments, its parameters listed in
/// PyTorch's order.
pub trait StackedLayer<P: Precision, D: Backend>: Sized {
    /// The layer named `prefix` of width `d_model` with `nhead` heads.
    fn build(
        ctx: &mut InitCtx<P, D>,
        prefix: &str,
        d_model: usize,
        nhead: usize,
        o: &LayerOptions,
    ) -> Result<Self, Error>;
    /// Every parameter, in PyTorch's `state_dict` order.
    fn params_mut(&mut self) -> Vec<&mut Parameter<P::Param, D>>;
}

impl<P: Precision, D: Backend> StackedLayer<P, D> for TransformerEncoderLayer<P, D> {
    fn build(
        ctx: &mut InitCtx<P, D>,
        prefix: &str,
        d_model: usize,
        nhead: usize,
        o: &LayerOptions,
    ) -> Result<Self, Error> {
        Self::new(ctx, prefix, d_model, nhead, o)
    }
    fn params_mut(&mut self) -> Vec<&mut Parameter<P::Param, D>> {
        self.parameters_mut()
    }
}

impl<P: Precision, D: Backend> StackedLayer<P, D> for TransformerDecoderLayer<P, D> {
    fn build(
        ctx: &mut InitCtx<P, D>,
        prefix: &str,
        d_model: usize,
        nhead: usize,
        o: &LayerOptions,
    ) -> Result<Self, Error> {
        Self::new(ctx, prefix, d_model, nhead, o)
    }
    fn params_mut(&mut self) -> Vec<&mut Parameter<P::Param, D>> {
        self.parameters_mut()
    }
}

/// `layers.0` .. `layers.{n-1}` applied in turn, then `norm` when present: PyTorch's
/// [`TransformerEncoder`] and [`TransformerDecoder`], which differ only in their layers.
#[derive(Clone, Debug)]
pub struct LayerStack<L, P: Precision, D: Backend = Cpu> {
    /// The layers.
    pub layers: Vec<L>,
    /// The final layer norm.
    pub norm: Option<LayerNorm<P, D>>,
}

/// `torch.nn.TransformerEncoder`.
pub type TransformerEncoder<P, D = Cpu> = LayerStack<TransformerEncoderLayer<P, D>, P, D>;
/// `torch.nn.TransformerDecoder`.
pub type TransformerDecoder<P, D = Cpu> = LayerStack<TransformerDecoderLayer<P, D>, P, D>;

impl<L: StackedLayer<P, D>, P: Precision, D: Backend> LayerStack<L, P, D> {
    /// `num_layers` layers named `prefix.layers.i`, each initialised on its own (PyTorch deep-copies
    /// one layer, then `nn.Transformer` re-initialises every matrix), and a final norm named
    /// `prefix.norm` when `final_norm`.
    pub fn new(
        ctx: &mut InitCtx<P, D>,
        prefix: &str,
        d_model: usize,
        nhead: usize,
        num_layers: usize,
        o: &LayerOptions,
        final_norm: bool,
    ) -> Result<Self, Error> {
        let layers = (0..num_layers)
            .map(|i| L::build(ctx, &join(prefix, &format!("layers.{i}")), d_model, nhead, o))
            .collect::<Result<_, _>>()?;
        Ok(LayerStack {
            layers,
            norm: final_norm.then(|| layer_norm(prefix, "norm", d_model, o.layer_norm_eps)),
        })
    }

    /// `x` through every layer (`f` applies one), then the final norm; in and out in `P::Full`.
    fn run(
        &self,
        ac: &Autocast<P, D>,
        x: &FullT<P, D>,
        f: impl Fn(&L, &FullT<P, D>) -> Result<FullT<P, D>, Error>,
    ) -> Result<FullT<P, D>, Error> {
        let mut x = x.clone();
        for layer in &self.layers {
            x = f(layer, &x)?;
        }
        match &self.norm {
            Some(n) => norm(ac, n, &x),
            None => Ok(x),
        }
    }

    /// Every parameter, in PyTorch's `state_dict` order.
    pub fn parameters_mut(&mut self) -> Vec<&mut Parameter<P::Param, D>> {
        let mut v: Vec<_> = self.layers.iter_mut().flat_map(|l| l.params_mut()).collect();
        if let Some(n) = &mut self.norm {
            v.extend([&mut n.weight, &mut n.bias]);
        }
        v
    }
}

impl<P: Precision, D: Backend> TransformerEncoder<P, D> {
    /// The encoder applied to `src` under `masks` (the same for every layer); in and out in
    /// `P::Full` (see [`TransformerEncoderLayer::forward`]).
    pub fn forward(
        &self,
        ac: &Autocast<P, D>,
        src: &FullT<P, D>,
        masks: &Masks<'_, P, D>,
    ) -> Result<FullT<P, D>, Error> {
        self.run(ac, src, |layer, x| layer.forward(ac, x, masks))
    }
}

impl<P: Precision, D: Backend> Module<P, D> for TransformerEncoder<P, D> {
    fn forward(&self, ac: &Autocast<P, D>, x: &Act<P, D>) -> Result<Act<P, D>, Error> {
        Ok(TransformerEncoder::forward(self, ac, &x.cast(), &Masks::none())?.cast())
    }
    fn parameters_mut(&mut self) -> Vec<&mut Parameter<P::Param, D>> {
        LayerStack::parameters_mut(self)
    }
}

impl<P: Precision, D: Backend> TransformerDecoder<P, D> {
    /// The decoder applied to `tgt` attending to `memory`, in and out in `P::Full`.
    pub fn forward(
        &self,
        ac: &Autocast<P, D>,
        tgt: &FullT<P, D>,
        memory: &FullT<P, D>,
        tgt_masks: &Masks<'_, P, D>,
        memory_masks: &Masks<'_, P, D>,
    ) -> Result<FullT<P, D>, Error> {
        self.run(ac, tgt, |layer, x| {
            layer.forward(ac, x, memory, tgt_masks, memory_masks)
        })
    }
}

/// The arguments of `torch.nn.Transformer`, with its defaults (`d_model` 512, `nhead` 8, six
/// encoder and six decoder layers, and [`LayerOptions::default`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TransformerOptions {
    /// The model width.
    pub d_model: usize,
    /// Attention heads per layer.
    pub nhead: usize,
    /// Encoder layers.
    pub num_encoder_layers: usize,
    /// Decoder layers.
    pub num_decoder_layers: usize,
    /// The feed-forward width.
    pub dim_feedforward: usize,
    /// Dropout everywhere.
    pub dropout: f64,
    /// The feed-forward activation.
    pub activation: Activation,
    /// The layer norms' epsilon.
    pub layer_norm_eps: f64,
    /// `[batch, seq, feature]` inputs when true.
    pub batch_first: bool,
    /// Pre-norm layers.
    pub norm_first: bool,
}

impl Default for TransformerOptions {
    fn default() -> Self {
        let l = LayerOptions::default();
        TransformerOptions {
            d_model: 512,
            nhead: 8,
            num_encoder_layers: 6,
            num_decoder_layers: 6,
            dim_feedforward: l.dim_feedforward,
            dropout: l.dropout,
            activation: l.activation,
            layer_norm_eps: l.layer_norm_eps,
            batch_first: l.batch_first,
            norm_first: l.norm_first,
        }
    }
}

impl TransformerOptions {
    fn layer(&self) -> LayerOptions {
        LayerOptions {
            dim_feedforward: self.dim_feedforward,
            dropout: self.dropout,
            activation: self.activation,
            layer_norm_eps: self.layer_norm_eps,
            batch_first: self.batch_first,
            norm_first: self.norm_first,
        }
    }
}

/// `torch.nn.Transformer`: an encoder and a decoder, each with its final layer norm
/// (`encoder.norm`, `decoder.norm`). As PyTorch's, every parameter matrix is re-initialised
/// Xavier-uniform after the layers are built; vectors keep their layers' initialisation.
#[derive(Clone, Debug)]
pub struct Transformer<P: Precision, D: Backend = Cpu> {
    /// `encoder.*`.
    pub encoder: TransformerEncoder<P, D>,
    /// `decoder.*`.
    pub decoder: TransformerDecoder<P, D>,
    /// The model width.
    pub d_model: usize,
}

impl<P: Precision, D: Backend> Transformer<P, D> {
    /// A transformer named `prefix` (empty for PyTorch's top-level names).
    pub fn new(ctx: &mut InitCtx<P, D>, prefix: &str, o: &TransformerOptions) -> Result<Self, Error> {
        let layer = o.layer();
        let mut t = Transformer {
            encoder: TransformerEncoder::new(
                ctx,
                &join(prefix, "encoder"),
                o.d_model,
                o.nhead,
                o.num_encoder_layers,
                &layer,
                true,
            )?,
            decoder: TransformerDecoder::new(
                ctx,
                &join(prefix, "decoder"),
                o.d_model,
                o.nhead,
                o.num_decoder_layers,
                &layer,
                true,
            )?,
            d_model: o.d_model,
        };
        for p in t.parameters_mut() {
            if let [out, inp] = *p.value().shape() {
                p.set(ctx.uniform(&[out, inp], xavier(out, inp))?)?;
            }
        }
        Ok(t)
    }

    /// `transformer(src, tgt, src_mask, tgt_mask, memory_mask, ...)`: the encoder on `src`
    /// under `src_masks`, then the decoder on `tgt` under `tgt_masks`, attending to the encoded
    /// source under `memory_masks`. Inputs of any dtype; the residual stream and the output are
    /// in `P::Full` (f32 under the mixed precisions, as under PyTorch's autocast, where the last
    /// layer norm returns f32).
    pub fn forward<X: Float>(
        &self,
        ac: &Autocast<P, D>,
        src: &Tensor<X, D>,
        tgt: &Tensor<X, D>,
        src_masks: &Masks<'_, P, D>,
        tgt_masks: &Masks<'_, P, D>,
        memory_masks: &Masks<'_, P, D>,
    ) -> Result<FullT<P, D>, Error> {
        let memory = self.encoder.forward(ac, &src.cast(), src_masks)?;
        self.decoder
            .forward(ac, &tgt.cast(), &memory, tgt_masks, memory_masks)
    }

    /// Every parameter, in PyTorch's `state_dict` order.
    pub fn parameters_mut(&mut self) -> Vec<&mut Parameter<P::Param, D>> {
        let mut v = self.encoder.parameters_mut();
        v.extend(self.decoder.parameters_mut());
        v
    }
}

/// The sinusoidal positional encoding of PyTorch's word-language-model example (and Lightning's
/// demo): `x + pe[:t]` for `x` `[batch, t, d_model]` (`batch_first`), then dropout, where
/// `pe[pos, 2i] = sin(pos / 10000^(2i/d))` and `pe[pos, 2i+1] = cos(..)`, computed in f32 as
/// PyTorch computes it, then rounded to the compute dtype. It has no parameters.
///
/// Lightning's `demos.transformer.PositionalEncoding` adds `pe[:, t]` (the single row at the
/// sequence length) to every position, not `pe[:, :t]`: [`PositionalEncoding::lightning_demo`]
/// reproduces that for parity; [`PositionalEncoding::new`] is the encoding as published.
#[derive(Clone, Debug)]
pub struct PositionalEncoding {
    d_model: usize,
    max_len: usize,
    dropout: f64,
    demo_row: bool,
}

impl PositionalEncoding {
    /// Positions `0..max_len` (PyTorch's example uses 5000) of width `d_model`, dropout `p`.
    pub fn new(d_model: usize, dropout: f64, max_len: usize) -> Result<Self, Error> {
        if !(0.0..=1.0).contains(&dropout) {
            return Err(Error::InvalidArgument {
                name: "dropout",
                value: dropout.to_string(),
                expected: "a probability in [0, 1]",
            });
        }
        Ok(PositionalEncoding {
            d_model,
            max_len,
            dropout,
            demo_row: false,
        })
    }

    /// Lightning's demo behaviour: every position gets the encoding of position `t` (the length).
    pub fn lightning_demo(d_model: usize, dropout: f64) -> Result<Self, Error> {
        Ok(PositionalEncoding {
            demo_row: true,
            ..Self::new(d_model, dropout, 5000)?
        })
    }

    /// `pe[rows]` as a `[rows.len(), d_model]` tensor.
    fn rows<E: crate::Float, D: Backend>(&self, rows: impl Iterator<Item = usize>) -> Tensor<E, D> {
        let d = self.d_model;
        let mut v = Vec::new();
        let mut n = 0;
        for pos in rows {
            n += 1;
            // In f32, step by step as PyTorch's example computes it (`torch.zeros` is float32):
            // `div = exp(2i * (-ln(10000) / d))`, `angle = pos * div`, then sin or cos.
            let scale = (-(10000f64.ln()) / d as f64) as f32;
            v.extend((0..d).map(|j| {
                let div = ((j - j % 2) as f32 * scale).exp();
                let angle = pos as f32 * div;
                E::from_f32(if j % 2 == 0 { angle.sin() } else { angle.cos() })
            }));
        }
        Tensor::from_vec(&[n, d], v).expect("n rows of d values")
    }
}

impl<P: Precision, D: Backend> Module<P, D> for PositionalEncoding {
    fn forward(&self, ac: &Autocast<P, D>, x: &Act<P, D>) -> Result<Act<P, D>, Error> {
        let shape = x.shape();
        let t = if shape.len() == 3 && shape[2] == self.d_model {
            shape[1]
        } else {
            return Err(crate::tensor::mismatch(
                "positional encoding",
                shape,
                &[self.d_model],
                "inputs must be [batch, seq, d_model]",
            ));
        };
        let limit = if self.demo_row { t + 1 } else { t };
        if limit > self.max_len {
            return Err(Error::InvalidArgument {
                name: "sequence length",
                value: t.to_string(),
                expected: "at most the positional encoding's max_len",
            });
        }
        let pe: Tensor<P::Compute, D> = if self.demo_row {
            self.rows(t..t + 1)
        } else {
            self.rows(0..t)
        };
        dropout(ac, &x.add(&pe)?, self.dropout)
    }
}
