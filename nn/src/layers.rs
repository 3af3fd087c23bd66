//! Layers: Linear (both weight layouts), Embedding, LayerNorm, Dropout, GELU.

use ndarray::{ArrayD, IxDyn};
use tapelora_autograd::{LoraTerm, Var};

use crate::module::{EmbeddingAdapter, LinearAdapter, Module};
use crate::parameter::Parameter;
use crate::{Ctx, Result};

/// How a linear layer stores its weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightLayout {
    /// `[in, out]`, y = x·W + b — GPT-2's `Conv1D` (what Hugging Face GPT-2 checkpoints hold).
    InOut,
    /// `[out, in]`, y = x·Wᵀ + b — PyTorch's `nn.Linear`. Wᵀ is a stride view, not a copy.
    OutIn,
}

/// An affine map, optionally with an adapter (e.g. LoRA) that adds to its output.
#[derive(Debug)]
pub struct Linear {
    pub weight: Parameter,
    pub bias: Option<Parameter>,
    pub layout: WeightLayout,
    pub in_features: usize,
    pub out_features: usize,
    pub adapter: Option<Box<dyn LinearAdapter>>,
}

impl Linear {
    /// A zero-initialised layer named `prefix.weight` / `prefix.bias`.
    pub fn new(
        prefix: &str,
        in_features: usize,
        out_features: usize,
        bias: bool,
        layout: WeightLayout,
    ) -> Self {
        let shape = match layout {
            WeightLayout::InOut => [in_features, out_features],
            WeightLayout::OutIn => [out_features, in_features],
        };
        Linear {
            weight: Parameter::new(format!("{prefix}.weight"), ArrayD::zeros(IxDyn(&shape))),
            bias: bias.then(|| {
                Parameter::new(
                    format!("{prefix}.bias"),
                    ArrayD::zeros(IxDyn(&[out_features])),
                )
            }),
            layout,
            in_features,
            out_features,
            adapter: None,
        }
    }

    /// `x·W + b` over the last axis of `x` (`[..., in] → [..., out]`), then the adapter if any
    /// (which gets the base output uncomputed: see [`BaseLinear`]).
    pub fn forward<'t>(&self, ctx: &Ctx<'t>, x: &Var<'t, f32>) -> Result<Var<'t, f32>> {
        let base = self.base(ctx, x)?;
        match &self.adapter {
            Some(adapter) => adapter.forward(ctx, x, base),
            None => base.output(),
        }
    }

    /// `residual + forward(x)`: a projection onto the residual stream. Without an adapter
    /// one op adds the residual as the GEMM stores its output and hands the upstream
    /// gradient to the residual uncopied ([`Var::linear_residual`]); with one, an add.
    pub fn forward_onto<'t>(
        &self,
        ctx: &Ctx<'t>,
        x: &Var<'t, f32>,
        residual: &Var<'t, f32>,
    ) -> Result<Var<'t, f32>> {
        if self.adapter.is_some() {
            return Ok(residual.add(&self.forward(ctx, x)?)?);
        }
        let base = self.base(ctx, x)?;
        Ok(x.linear_residual(&base.w, base.bias.as_ref(), residual)?)
    }

    /// `gelu(forward(x))`: an MLP's first projection and activation. Without an adapter one
    /// op applies GELU as the GEMM stores its output, saving GELU's derivative instead of
    /// the pre-activation ([`Var::linear_gelu`]); with one, the adapted output then `gelu`.
    pub fn forward_gelu<'t>(&self, ctx: &Ctx<'t>, x: &Var<'t, f32>) -> Result<Var<'t, f32>> {
        if self.adapter.is_some() {
            return Ok(self.forward(ctx, x)?.gelu()?);
        }
        let base = self.base(ctx, x)?;
        Ok(x.linear_gelu(&base.w, base.bias.as_ref())?)
    }

    /// The layer without its adapter.
    pub fn forward_base<'t>(&self, ctx: &Ctx<'t>, x: &Var<'t, f32>) -> Result<Var<'t, f32>> {
        self.base(ctx, x)?.output()
    }

    fn base<'a, 't>(&self, ctx: &Ctx<'t>, x: &'a Var<'t, f32>) -> Result<BaseLinear<'a, 't>> {
        let w = self.weight.on(ctx.tape);
        Ok(BaseLinear {
            x,
            w: match self.layout {
                WeightLayout::InOut => w,
                WeightLayout::OutIn => w.transpose(0, 1)?,
            },
            bias: self.bias.as_ref().map(|b| b.on(ctx.tape)),
        })
    }
}

/// A linear layer's base output `x·W + b`, not computed yet, as its adapter receives it: the
/// adapter either takes it as it is ([`BaseLinear::output`]) or has it computed together with
/// low-rank terms of its own ([`BaseLinear::with_low_rank`]: LoRA's `s·(x·Aᵀ)·Bᵀ` summed
/// inside the base's GEMM instead of added to its output afterwards).
pub struct BaseLinear<'a, 't> {
    x: &'a Var<'t, f32>,
    /// `[in, out]` (a transposed view for [`WeightLayout::OutIn`]).
    w: Var<'t, f32>,
    bias: Option<Var<'t, f32>>,
}

impl<'t> BaseLinear<'_, 't> {
    /// `x·W + b`.
    pub fn output(self) -> Result<Var<'t, f32>> {
        Ok(self.x.linear(&self.w, self.bias.as_ref())?)
    }

    /// `x·W + b` plus, per part `(v, start, scale)`, `scale · u[..., cols] · v` in the output
    /// columns `start .. start + w` (see [`Var::linear_low_rank`]).
    pub fn with_low_rank(
        self,
        u: &Var<'t, f32>,
        parts: &[(&Var<'t, f32>, usize, f64)],
    ) -> Result<Var<'t, f32>> {
        Ok(self
            .x
            .linear_low_rank(&self.w, self.bias.as_ref(), u, parts)?)
    }

    /// `x·W + b` plus each LoRA term `scale · (x·Aᵀ)·Bᵀ` in its columns, with A and B as
    /// stored and u computed by the op itself, so that backward sums both paths into x in
    /// one GEMM (see [`Var::linear_lora`]). For an adapter that reads x itself, without dropout.
    pub fn with_lora(self, terms: &[LoraTerm<'_, 't, f32>]) -> Result<Var<'t, f32>> {
        Ok(self.x.linear_lora(&self.w, self.bias.as_ref(), terms)?)
    }
}

impl Module for Linear {
    fn visit<'a>(&'a self, f: &mut dyn FnMut(&'a Parameter)) {
        f(&self.weight);
        if let Some(b) = &self.bias {
            f(b);
        }
        if let Some(a) = &self.adapter {
            a.visit(f);
        }
    }
    fn visit_mut(&mut self, f: &mut dyn FnMut(&mut Parameter)) {
        f(&mut self.weight);
        if let Some(b) = &mut self.bias {
            f(b);
        }
        if let Some(a) = &mut self.adapter {
            a.visit_mut(f);
        }
    }
}

/// A lookup table `[num, dim]`.
#[derive(Debug)]
pub struct Embedding {
    pub weight: Parameter,
    pub adapter: Option<Box<dyn EmbeddingAdapter>>,
}

impl Embedding {
    pub fn new(name: &str, num: usize, dim: usize) -> Self {
        Embedding {
            weight: Parameter::new(format!("{name}.weight"), ArrayD::zeros(IxDyn(&[num, dim]))),
            adapter: None,
        }
    }

    pub fn forward<'t>(&self, ctx: &Ctx<'t>, ids: &ArrayD<usize>) -> Result<Var<'t, f32>> {
        let base = self.weight.on(ctx.tape).embedding(ids)?;
        match &self.adapter {
            Some(adapter) => adapter.forward(ctx, ids, base),
            None => Ok(base),
        }
    }

    /// `x · Wᵀ` (the table used as a tied output layer), plus the adapter's share if any.
    pub fn forward_tied_output<'t>(&self, ctx: &Ctx<'t>, x: &Var<'t, f32>) -> Result<Var<'t, f32>> {
        let logits = x.matmul(&self.weight.on(ctx.tape).transpose(0, 1)?)?;
        match &self.adapter {
            Some(adapter) => match adapter.tied_output_delta(ctx, x)? {
                Some(delta) => Ok(logits.add(&delta)?),
                None => Ok(logits),
            },
            None => Ok(logits),
        }
    }
}

impl Module for Embedding {
    fn visit<'a>(&'a self, f: &mut dyn FnMut(&'a Parameter)) {
        f(&self.weight);
        if let Some(a) = &self.adapter {
            a.visit(f);
        }
    }
    fn visit_mut(&mut self, f: &mut dyn FnMut(&mut Parameter)) {
        f(&mut self.weight);
        if let Some(a) = &mut self.adapter {
            a.visit_mut(f);
        }
    }
}

/// Layer norm over the last axis; weight 1 and bias 0 at init. Without a bias parameter
/// (nanoGPT's `bias=False`) a zero bias is used.
#[derive(Debug)]
pub struct LayerNorm {
    pub weight: Parameter,
    pub bias: Option<Parameter>,
    pub eps: f64,
}

impl LayerNorm {
    pub fn new(prefix: &str, dim: usize, bias: bool, eps: f64) -> Self {
        LayerNorm {
            weight: Parameter::new(format!("{prefix}.weight"), ArrayD::ones(IxDyn(&[dim]))),
            bias: bias
                .then(|| Parameter::new(format!("{prefix}.bias"), ArrayD::zeros(IxDyn(&[dim])))),
            eps,
        }
    }

    pub fn forward<'t>(&self, ctx: &Ctx<'t>, x: &Var<'t, f32>) -> Result<Var<'t, f32>> {
        let w = self.weight.on(ctx.tape);
        let b = match &self.bias {
            Some(b) => b.on(ctx.tape),
            None => ctx.tape.constant(ArrayD::zeros(IxDyn(self.weight.shape()))),
        };
        Ok(x.layer_norm(&w, &b, self.eps)?)
    }
}

impl Module for LayerNorm {
    fn visit<'a>(&'a self, f: &mut dyn FnMut(&'a Parameter)) {
        f(&self.weight);
        if let Some(b) = &self.bias {
            f(b);
        }
    }
    fn visit_mut(&mut self, f: &mut dyn FnMut(&mut Parameter)) {
        f(&mut self.weight);
        if let Some(b) = &mut self.bias {
            f(b);
        }
    }
}

/// Inverted dropout with probability `p` (active only in training mode).
#[derive(Clone, Copy, Debug)]
pub struct Dropout {
    pub p: f64,
}

impl Dropout {
    pub fn forward<'t>(&self, ctx: &Ctx<'t>, x: &Var<'t, f32>) -> Result<Var<'t, f32>> {
        ctx.dropout(x, self.p)
    }
}

/// GELU, GPT-2's tanh approximation.
#[derive(Clone, Copy, Debug, Default)]
pub struct Gelu;

impl Gelu {
    pub fn forward<'t>(&self, x: &Var<'t, f32>) -> Result<Var<'t, f32>> {
        Ok(x.gelu()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tapelora_autograd::Tape;

    #[test]
    fn both_layouts_compute_the_same_map() {
        let mut conv = Linear::new("c", 3, 2, true, WeightLayout::InOut);
        let mut lin = Linear::new("l", 3, 2, true, WeightLayout::OutIn);
        let w = ndarray::arr2(&[[1.0f32, 2.0], [3.0, 4.0], [5.0, 6.0]]);
        conv.weight.value = w.clone().into_dyn().into_shared();
        lin.weight.value = w.t().to_owned().into_dyn().into_shared();
        for b in [&mut conv.bias, &mut lin.bias] {
            b.as_mut().unwrap().value = ndarray::arr1(&[0.5f32, -0.5]).into_dyn().into_shared();
        }
        let tape = Tape::new();
        let ctx = Ctx::eval(&tape);
        let x = tape.constant(ndarray::arr2(&[[1.0f32, 0.0, -1.0]]).into_dyn());
        let a = conv.forward(&ctx, &x).unwrap();
        let b = lin.forward(&ctx, &x).unwrap();
        assert_eq!(a.value(), b.value());
        assert_eq!(a.value()[[0, 0]], 1.0 - 5.0 + 0.5);
        let names: Vec<_> = conv.parameters().iter().map(|p| p.name.clone()).collect();
        assert_eq!(names, ["c.weight", "c.bias"]);
    }

    #[test]
    fn fused_forwards_have_the_bits_of_forward_then_gelu_or_add() {
        // 40 rows × 64 outputs: the GEMM kernel applies GELU / adds the residual as it stores.
        for layout in [WeightLayout::InOut, WeightLayout::OutIn] {
            let mut lin = Linear::new("l", 48, 64, true, layout);
            let fill = |shape: &[usize], salt: usize| {
                let mut i = 0usize;
                ArrayD::from_shape_fn(IxDyn(shape), |_| {
                    i += 1;
                    ((i * 37 + salt) % 23) as f32 / 11.0 - 1.0
                })
                .into_shared()
            };
            lin.weight.value = fill(lin.weight.value.shape(), 1);
            lin.bias.as_mut().unwrap().value = fill(&[64], 2);
            let tape = Tape::new();
            let ctx = Ctx::train(&tape, 0);
            let x = tape.param("x", fill(&[2, 20, 48], 3));
            let residual = tape.param("r", fill(&[2, 20, 64], 4));
            let plain = lin.forward(&ctx, &x).unwrap();
            let fused = lin.forward_gelu(&ctx, &x).unwrap();
            assert_eq!(fused.value(), plain.gelu().unwrap().value(), "{layout:?}");
            let onto = lin.forward_onto(&ctx, &x, &residual).unwrap();
            assert_eq!(onto.value(), residual.add(&plain).unwrap().value());
        }
    }

    #[test]
    fn frozen_parameters_get_no_gradient() {
        let mut lin = Linear::new("l", 2, 2, true, WeightLayout::OutIn);
        lin.weight.trainable = false;
        let tape = Tape::new();
        let ctx = Ctx::train(&tape, 0);
        let x = tape.constant(ndarray::arr2(&[[1.0f32, 2.0]]).into_dyn());
        let loss = lin.forward(&ctx, &x).unwrap().sum_all().unwrap();
        let grads = tape.backward(&loss).unwrap();
        assert!(grads.get_by_name("l.weight").is_none());
        assert!(grads.get_by_name("l.bias").is_some());
        assert_eq!(lin.num_trainable_params(), 2);
        assert_eq!(lin.num_params(), 6);
    }
}
