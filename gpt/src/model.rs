//! The GPT-2 model: token + learned position embeddings, pre-LN transformer blocks with fused
//! `c_attn` (q|k|v) and causal attention, GELU MLPs, a final layer norm and an lm_head tied to
//! the token embedding.
//!
//! Shapes, in llm.c's names: B batch, T time, C = n_embd, H heads, V vocab.
//!
//! ```text
//! ids [B,T] → wte(ids) + wpe(0..T)            x [B,T,C]
//! per block:  x = x + c_proj(attention(split(c_attn(ln_1(x)))))   c_attn: [B,T,3C]
//!             x = x + c_proj(gelu(c_fc(ln_2(x))))                  c_fc:   [B,T,4C]
//! logits = ln_f(x) · wteᵀ                     [B,T,V]   (wteᵀ is a stride view)
//! ```
//! Parameter names are Hugging Face's without the `transformer.` prefix
//! (`h.0.attn.c_attn.weight`); weights are in Conv1D layout `[in, out]`.

use ndarray::{s, Array2, ArrayD, Axis, IxDyn, Slice};
use rand::Rng;
use tapelora_autograd::{attention, attention_qkv, Tape, Tensor, Var};
use tapelora_nn::{init, Ctx, Embedding, LayerNorm, Linear, Module, Parameter, WeightLayout};

use crate::config::GptConfig;
use crate::{GptError, Result};

#[derive(Debug)]
pub struct Attention {
    pub c_attn: Linear,
    pub c_proj: Linear,
    pub n_head: usize,
}

#[derive(Debug)]
pub struct Mlp {
    pub c_fc: Linear,
    pub c_proj: Linear,
}

#[derive(Debug)]
pub struct Block {
    pub ln_1: LayerNorm,
    pub attn: Attention,
    pub ln_2: LayerNorm,
    pub mlp: Mlp,
}

#[derive(Debug)]
pub struct Gpt {
    pub config: GptConfig,
    pub wte: Embedding,
    pub wpe: Embedding,
    pub h: Vec<Block>,
    pub ln_f: LayerNorm,
}

/// Keys and values of earlier positions, per layer, for incremental decoding.
pub struct KvCache {
    /// Per layer: `[B, max_T, C]` buffers for k and v. Attention reads a narrowed view of
    /// them (no copy); by the next step that view is gone, so writing does not copy either.
    keys: Vec<Tensor<f32>>,
    values: Vec<Tensor<f32>>,
    len: usize,
}

impl KvCache {
    pub fn new(config: &GptConfig, batch: usize) -> Self {
        let shape = [batch, config.n_positions, config.n_embd];
        KvCache {
            keys: (0..config.n_layer)
                .map(|_| Tensor::zeros(IxDyn(&shape)))
                .collect(),
            values: (0..config.n_layer)
                .map(|_| Tensor::zeros(IxDyn(&shape)))
                .collect(),
            len: 0,
        }
    }

    /// Positions cached so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Attention {
    /// Causal self-attention; with a cache, `x` holds only the new positions and attends to
    /// the cached ones too.
    fn forward<'t>(
        &self,
        ctx: &Ctx<'t>,
        x: &Var<'t, f32>,
        cache: Option<(&mut KvCache, usize)>,
        dropout: f64,
        residual: &Var<'t, f32>,
    ) -> Result<Var<'t, f32>> {
        let c = x.shape()[2];
        let qkv = self.c_attn.forward(ctx, x)?; // [B, T, 3C]
        let y = match cache {
            None => attention_qkv(&qkv, self.n_head, true)?,
            Some((cache, layer)) => {
                let q = qkv.narrow(2, 0, c)?;
                let (k, v) = (qkv.narrow(2, c, c)?, qkv.narrow(2, 2 * c, c)?);
                let (start, new) = (cache.len, x.shape()[1]);
                let end = start + new;
                cache.keys[layer]
                    .slice_mut(s![.., start..end, ..])
                    .assign(k.value());
                cache.values[layer]
                    .slice_mut(s![.., start..end, ..])
                    .assign(v.value());
                let past = |t: &Tensor<f32>| {
                    let mut view = t.clone();
                    view.slice_axis_inplace(Axis(1), Slice::from(0..end));
                    ctx.tape.constant(view)
                };
                let (past_k, past_v) = (past(&cache.keys[layer]), past(&cache.values[layer]));
                attention(&q, &past_k, &past_v, self.n_head, true)?
            }
        };
        project_onto(ctx, &self.c_proj, &y, dropout, residual)
    }
}

/// `residual + dropout(c_proj(y))`. Without dropout the projection adds the residual itself
/// ([`Linear::forward_onto`]: no separate add pass, no gradient copy).
fn project_onto<'t>(
    ctx: &Ctx<'t>,
    c_proj: &Linear,
    y: &Var<'t, f32>,
    dropout: f64,
    residual: &Var<'t, f32>,
) -> Result<Var<'t, f32>> {
    if dropout == 0.0 || !ctx.train {
        return Ok(c_proj.forward_onto(ctx, y, residual)?);
    }
    let y = ctx.dropout(&c_proj.forward(ctx, y)?, dropout)?;
    Ok(residual.add(&y)?)
}

impl Mlp {
    fn forward<'t>(
        &self,
        ctx: &Ctx<'t>,
        x: &Var<'t, f32>,
        dropout: f64,
        residual: &Var<'t, f32>,
    ) -> Result<Var<'t, f32>> {
        let h = self.c_fc.forward_gelu(ctx, x)?;
        project_onto(ctx, &self.c_proj, &h, dropout, residual)
    }
}

impl Gpt {
    /// A model with GPT-2's initialisation (nanoGPT's `_init_weights`): every weight
    /// N(0, 0.02), residual projections (`c_proj`) N(0, 0.02/√(2·n_layer)), biases 0, layer
    /// norms 1/0.
    pub fn new(config: GptConfig, rng: &mut impl Rng) -> Result<Self> {
        let mut model = Self::zeros(config)?;
        let residual_std = 0.02 / (2.0 * model.config.n_layer as f64).sqrt();
        model.visit_mut(&mut |p: &mut Parameter| {
            let is_weight = p.name.ends_with(".weight") && p.shape().len() == 2;
            if is_weight {
                let std = if p.name.ends_with("c_proj.weight") {
                    residual_std
                } else {
                    0.02
                };
                init::normal_(p, std, rng);
            }
        });
        Ok(model)
    }

    /// A model of the given sizes with zero weights and unit layer norms (to be loaded into).
    pub fn zeros(config: GptConfig) -> Result<Self> {
        config.validate()?;
        let (c, bias, eps) = (config.n_embd, config.bias, config.layer_norm_epsilon);
        let h = (0..config.n_layer)
            .map(|i| {
                let p = format!("h.{i}");
                Block {
                    ln_1: LayerNorm::new(&format!("{p}.ln_1"), c, bias, eps),
                    attn: Attention {
                        c_attn: Linear::new(
                            &format!("{p}.attn.c_attn"),
                            c,
                            3 * c,
                            bias,
                            WeightLayout::InOut,
                        ),
                        c_proj: Linear::new(
                            &format!("{p}.attn.c_proj"),
                            c,
                            c,
                            bias,
                            WeightLayout::InOut,
                        ),
                        n_head: config.n_head,
                    },
                    ln_2: LayerNorm::new(&format!("{p}.ln_2"), c, bias, eps),
                    mlp: Mlp {
                        c_fc: Linear::new(
                            &format!("{p}.mlp.c_fc"),
                            c,
                            config.n_inner,
                            bias,
                            WeightLayout::InOut,
                        ),
                        c_proj: Linear::new(
                            &format!("{p}.mlp.c_proj"),
                            config.n_inner,
                            c,
                            bias,
                            WeightLayout::InOut,
                        ),
                    },
                }
            })
            .collect();
        Ok(Gpt {
            wte: Embedding::new("wte", config.vocab_size, c),
            wpe: Embedding::new("wpe", config.n_positions, c),
            h,
            ln_f: LayerNorm::new("ln_f", c, bias, eps),
            config,
        })
    }

    /// A plain copy of the model's own weights (no adapters), every parameter trainable. The
    /// buffers are shared copy-on-write: the first in-place update of either model copies the
    /// tensor it changes, so the two never affect each other.
    pub fn copy_weights(&self) -> Gpt {
        let mut copy =
            Gpt::zeros(self.config.clone()).expect("a config that built a model is valid");
        let mine: std::collections::HashMap<&str, &Parameter> = self
            .parameters()
            .into_iter()
            .map(|p| (p.name.as_str(), p))
            .collect();
        copy.visit_mut(&mut |p| {
            if let Some(src) = mine.get(p.name.as_str()) {
                p.value = src.value.clone();
            }
        });
        copy
    }

    pub(crate) fn check_ids(&self, ids: &ArrayD<usize>, past: usize) -> Result<(usize, usize)> {
        if ids.ndim() != 2 || ids.is_empty() {
            return Err(GptError::Input(format!(
                "token ids must be a non-empty [batch, time] array, got shape {:?}",
                ids.shape()
            )));
        }
        let (b, t) = (ids.shape()[0], ids.shape()[1]);
        if past + t > self.config.n_positions {
            return Err(GptError::Input(format!(
                "{} positions exceed the model's context of {}",
                past + t,
                self.config.n_positions
            )));
        }
        if let Some(&bad) = ids.iter().find(|&&i| i >= self.config.vocab_size) {
            return Err(GptError::Input(format!(
                "token id {bad} is outside the vocabulary of {}",
                self.config.vocab_size
            )));
        }
        Ok((b, t))
    }

    /// Logits `[B, T, V]` for token ids `[B, T]`.
    pub fn forward<'t>(&self, ctx: &Ctx<'t>, ids: &ArrayD<usize>) -> Result<Var<'t, f32>> {
        let x = self.trunk(ctx, ids, None)?;
        self.lm_head(ctx, &x)
    }

    /// Mean next-token cross-entropy of `ids` against `targets` (same shape; −1 = ignore).
    pub fn forward_loss<'t>(
        &self,
        ctx: &Ctx<'t>,
        ids: &ArrayD<usize>,
        targets: &[i64],
    ) -> Result<Var<'t, f32>> {
        let logits = self.forward(ctx, ids)?;
        Ok(logits.cross_entropy(targets, Some(-1))?)
    }

    /// Incremental decoding: logits `[B, V]` for the last of the new positions `ids [B, T_new]`,
    /// given (and extending) the cache. Records nothing.
    pub fn forward_cached(&self, ids: &ArrayD<usize>, cache: &mut KvCache) -> Result<Array2<f32>> {
        let tape = Tape::new();
        tape.no_grad(|| {
            let ctx = Ctx::eval(&tape);
            let last = self.last_position_normed(&ctx, ids, cache)?;
            Ok(rows_of_one_position(
                self.wte.forward_tied_output(&ctx, &last)?,
            ))
        })
    }

    /// As [`Gpt::forward_cached`], but stops before the lm_head: the last new position's
    /// hidden state after `ln_f`, `[B, C]` (greedy decoding finds the top logit from it
    /// without computing them all).
    pub fn forward_cached_hidden(
        &self,
        ids: &ArrayD<usize>,
        cache: &mut KvCache,
    ) -> Result<Array2<f32>> {
        let tape = Tape::new();
        tape.no_grad(|| {
            let ctx = Ctx::eval(&tape);
            Ok(rows_of_one_position(
                self.last_position_normed(&ctx, ids, cache)?,
            ))
        })
    }

    /// The cached trunk's last new position after `ln_f`: `[B, 1, C]`.
    fn last_position_normed<'t>(
        &self,
        ctx: &Ctx<'t>,
        ids: &ArrayD<usize>,
        cache: &mut KvCache,
    ) -> Result<Var<'t, f32>> {
        let x = self.trunk(ctx, ids, Some(cache))?;
        let t = x.shape()[1];
        Ok(self.ln_f.forward(ctx, &x.narrow(1, t - 1, 1)?)?)
    }

    /// Embeddings and blocks: the hidden states `[B, T, C]` before `ln_f`.
    fn trunk<'t>(
        &self,
        ctx: &Ctx<'t>,
        ids: &ArrayD<usize>,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Var<'t, f32>> {
        let past = cache.as_ref().map_or(0, |c| c.len);
        let (_, t) = self.check_ids(ids, past)?;
        let positions = ArrayD::from_shape_fn(IxDyn(&[t]), |i| past + i[0]);
        let tok = self.wte.forward(ctx, ids)?;
        let pos = self.wpe.forward(ctx, &positions)?;
        let mut x = ctx.dropout(&tok.add(&pos)?, self.config.dropout)?;
        for (layer, block) in self.h.iter().enumerate() {
            let cache_slot = cache.as_deref_mut().map(|c| (c, layer));
            x = block.attn.forward(
                ctx,
                &block.ln_1.forward(ctx, &x)?,
                cache_slot,
                self.config.dropout,
                &x,
            )?;
            x = block
                .mlp
                .forward(ctx, &block.ln_2.forward(ctx, &x)?, self.config.dropout, &x)?;
        }
        if let Some(c) = cache {
            c.len += t;
        }
        Ok(x)
    }

    fn lm_head<'t>(&self, ctx: &Ctx<'t>, x: &Var<'t, f32>) -> Result<Var<'t, f32>> {
        let x = self.ln_f.forward(ctx, x)?;
        Ok(self.wte.forward_tied_output(ctx, &x)?)
    }
}

/// `[B, 1, X]` → `[B, X]`.
fn rows_of_one_position(x: Var<'_, f32>) -> Array2<f32> {
    x.value()
        .index_axis(Axis(1), 0)
        .to_owned()
        .into_dimensionality()
        .expect("[B, X]")
}

impl Module for Gpt {
    fn visit<'a>(&'a self, f: &mut dyn FnMut(&'a Parameter)) {
        self.wte.visit(f);
        self.wpe.visit(f);
        for b in &self.h {
            b.ln_1.visit(f);
            b.attn.c_attn.visit(f);
            b.attn.c_proj.visit(f);
            b.ln_2.visit(f);
            b.mlp.c_fc.visit(f);
            b.mlp.c_proj.visit(f);
        }
        self.ln_f.visit(f);
    }

    fn visit_mut(&mut self, f: &mut dyn FnMut(&mut Parameter)) {
        self.wte.visit_mut(f);
        self.wpe.visit_mut(f);
        for b in &mut self.h {
            b.ln_1.visit_mut(f);
            b.attn.c_attn.visit_mut(f);
            b.attn.c_proj.visit_mut(f);
            b.ln_2.visit_mut(f);
            b.mlp.c_fc.visit_mut(f);
            b.mlp.c_proj.visit_mut(f);
        }
        self.ln_f.visit_mut(f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn tiny() -> Gpt {
        let cfg = GptConfig::small(2, 8, 12, 11);
        Gpt::new(cfg, &mut rand_chacha::ChaCha8Rng::seed_from_u64(0)).unwrap()
    }

    #[test]
    fn copies_share_buffers_until_one_changes() {
        let m = tiny();
        let mut c = m.copy_weights();
        assert_eq!(c.parameters()[2].value, m.parameters()[2].value);
        c.parameters_mut()[2].value_mut().fill(7.0);
        assert!(
            m.parameters()[2].value.iter().all(|&v| v != 7.0),
            "the original is untouched"
        );
    }

    #[test]
    fn parameter_names_and_count_match_gpt2() {
        let m = tiny();
        let names: Vec<_> = m.parameters().iter().map(|p| p.name.clone()).collect();
        assert_eq!(
            &names[..4],
            [
                "wte.weight",
                "wpe.weight",
                "h.0.ln_1.weight",
                "h.0.ln_1.bias"
            ]
        );
        assert!(names.contains(&"h.1.mlp.c_proj.weight".to_string()));
        assert_eq!(m.num_params(), m.config.num_params());
    }

    #[test]
    fn cached_logits_equal_full_recompute() {
        let m = tiny();
        let ids = ArrayD::from_shape_vec(
            IxDyn(&[2, 7]),
            vec![1, 5, 3, 9, 0, 2, 2, 4, 4, 8, 10, 1, 6, 3],
        )
        .unwrap();
        let tape = Tape::new();
        let full = tape.no_grad(|| {
            m.forward(&Ctx::eval(&tape), &ids)
                .unwrap()
                .value()
                .to_owned()
        });
        let mut cache = KvCache::new(&m.config, 2);
        // A prompt of 3, then one token at a time.
        let step = m
            .forward_cached(&ids.slice(s![.., ..3]).to_owned().into_dyn(), &mut cache)
            .unwrap();
        let mut max_diff = (&step - &full.slice(s![.., 2, ..]))
            .mapv(f32::abs)
            .fold(0.0f32, |a, &b| a.max(b));
        for t in 3..7 {
            let step = m
                .forward_cached(
                    &ids.slice(s![.., t..t + 1]).to_owned().into_dyn(),
                    &mut cache,
                )
                .unwrap();
            let diff = (&step - &full.slice(s![.., t, ..]))
                .mapv(f32::abs)
                .fold(0.0f32, |a, &b| a.max(b));
            max_diff = max_diff.max(diff);
        }
        assert!(max_diff < 1e-5, "max |cached − full| = {max_diff}");
        assert_eq!(cache.len(), 7);
        let too_long = ArrayD::zeros(IxDyn(&[2, 6]));
        assert!(m
            .forward_cached(&too_long, &mut cache)
            .unwrap_err()
            .to_string()
            .contains("context"));
    }
}
