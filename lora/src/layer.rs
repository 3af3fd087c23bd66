//! The LoRA layer: adapters attached to a frozen `Linear` through nn's `LinearAdapter` hook.
//!
//! For input x `[..., in]` and base output y₀ = x·W₀ + b `[..., out]`:
//!
//! ```text
//! y = y₀ + Σ_active  w · s · (dropout(x)·Aᵀ)·Bᵀ        A: [r, in]   B: [out_part, r]
//! ```
//! computed as two thin matmuls (`[..., in]·[in, r]` then `[..., r]·[r, out_part]`); the
//! d×k product B·A is never formed during training. A *part* covers the whole output, or one
//! third of c_attn's fused q|k|v output; each part's product lands in its own columns of the
//! output, summed inside the base's GEMM for the first active adapter (`Var::linear_lora`,
//! which also computes u; `Var::linear_low_rank` when dropout gives the adapter its own x) and
//! added by one GEMM per part for any other (`Var::add_low_rank_columns`).

use std::collections::BTreeMap;

use tapelora_autograd::{LoraTerm, Var};
use tapelora_nn::{BaseLinear, Ctx, LinearAdapter, Parameter};

/// A contiguous range of the layer's output columns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutSlice {
    /// "q", "k", "v" for c_attn slices; None for the whole output.
    pub label: Option<&'static str>,
    pub start: usize,
    pub len: usize,
}

/// One (A, B) pair.
#[derive(Clone, Debug)]
pub struct LoraPart {
    pub slice: OutSlice,
    /// `[r, in]` (PEFT's `lora_A.weight`).
    pub a: Parameter,
    /// `[slice.len, r]` (PEFT's `lora_B.weight`).
    pub b: Parameter,
    pub r: usize,
    pub alpha: f64,
    pub use_rslora: bool,
}

impl LoraPart {
    pub fn scaling(&self) -> f64 {
        crate::config::scaling(self.alpha, self.r, self.use_rslora)
    }

    /// ΔW of this part in PEFT's orientation, `[slice.len, in]` = s·B·A, computed in f64.
    pub fn delta(&self) -> ndarray::Array2<f64> {
        let a = self
            .a
            .value
            .view()
            .into_dimensionality::<ndarray::Ix2>()
            .expect("A is 2-D")
            .mapv(f64::from);
        let b = self
            .b
            .value
            .view()
            .into_dimensionality::<ndarray::Ix2>()
            .expect("B is 2-D")
            .mapv(f64::from);
        b.dot(&a) * self.scaling()
    }
}

/// One named adapter on one layer: its parts and its dropout.
#[derive(Clone, Debug)]
pub struct LoraAdapter {
    pub parts: Vec<LoraPart>,
    pub dropout: f64,
}

/// What a [`LoraLinear`] is attached to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LayerKind {
    #[default]
    Linear,
    /// The token embedding: A `[r, vocab]`, B `[dim, r]`; the row of Aᵀ for each id, times Bᵀ.
    Embedding,
}

/// All adapters attached to one layer (a Linear, or the token embedding), and which act.
#[derive(Debug, Default)]
pub struct LoraLinear {
    /// The layer's path, e.g. `h.0.attn.c_attn`.
    pub module: String,
    pub kind: LayerKind,
    pub in_features: usize,
    pub out_features: usize,
    pub adapters: BTreeMap<String, LoraAdapter>,
    /// Adapters applied in forward, with their weights (1.0 for a single active adapter).
    pub active: Vec<(String, f64)>,
    /// When true, forward returns the base output (PEFT's `disable_adapter`).
    pub disabled: bool,
    /// Adapters currently merged into the base weight (they are then skipped in forward).
    pub merged: Vec<String>,
}

impl LinearAdapter for LoraLinear {
    fn forward<'t>(
        &self,
        ctx: &Ctx<'t>,
        x: &Var<'t, f32>,
        base: BaseLinear<'_, 't>,
    ) -> tapelora_nn::Result<Var<'t, f32>> {
        // Per adapter: u = x·[A₁; A₂; …]ᵀ, one thin matmul (one pass over x) for all its parts
        // (q and v of c_attn), then each part's s·u[.., block]·Bᵀ in its columns of the
        // output — no delta tensor at all. The first adapter's terms are summed inside the
        // base's own GEMM: `linear_lora` takes the A's and B's as stored, so no tape op runs
        // between the layer norm before and this product (the pool's idle thread would fall
        // asleep meanwhile). With dropout making the adapter's x another tensor it is
        // `linear_low_rank` given u; any further active adapter is added to that output by
        // one accumulating GEMM per part (`add_low_rank_columns`).
        let mut base = Some(base);
        let mut out: Option<Var<'t, f32>> = None;
        for (adapter, weight) in self.acting().filter(|(a, _)| !a.parts.is_empty()) {
            let a_parts: Vec<Var<'t, f32>> =
                adapter.parts.iter().map(|p| p.a.on(ctx.tape)).collect();
            let b_parts: Vec<Var<'t, f32>> =
                adapter.parts.iter().map(|p| p.b.on(ctx.tape)).collect();
            let scale = |p: &LoraPart| p.scaling() * weight;
            // Without dropout the adapter reads the base's own x, and the first adapter's
            // whole product is one op whose backward gives x one gradient (`linear_lora`).
            if adapter.dropout == 0.0 || !ctx.train {
                if let Some(base) = base.take() {
                    let terms: Vec<LoraTerm<'_, 't, f32>> = adapter
                        .parts
                        .iter()
                        .zip(a_parts.iter().zip(&b_parts))
                        .map(|(p, (a, b))| LoraTerm {
                            a,
                            b,
                            start: p.slice.start,
                            scale: scale(p),
                        })
                        .collect();
                    out = Some(base.with_lora(&terms)?);
                    continue;
                }
            }
            let x = ctx.dropout(x, adapter.dropout)?;
            let a_all = match a_parts.as_slice() {
                [a] => a.clone(),
                parts => tapelora_autograd::concat(&parts.iter().collect::<Vec<_>>(), 0)?,
            };
            let u = x.matmul(&a_all.transpose(0, 1)?)?;
            let b_transposed: Vec<Var<'t, f32>> = b_parts
                .iter()
                .map(|b| b.transpose(0, 1))
                .collect::<Result<_, _>>()?;
            let parts: Vec<_> = adapter
                .parts
                .iter()
                .zip(&b_transposed)
                .map(|(p, bt)| (bt, p.slice.start, scale(p)))
                .collect();
            out = Some(match (base.take(), out) {
                (Some(base), _) => base.with_low_rank(&u, &parts)?,
                (None, Some(out)) => out.add_low_rank_columns(&u, &parts)?,
                (None, None) => unreachable!("the base is taken only to make an output"),
            });
        }
        match (out, base) {
            (Some(out), _) => Ok(out),
            (None, Some(base)) => base.output(),
            (None, None) => unreachable!("the base is taken only to make an output"),
        }
    }

    fn visit<'a>(&'a self, f: &mut dyn FnMut(&'a Parameter)) {
        for adapter in self.adapters.values() {
            for part in &adapter.parts {
                f(&part.a);
                f(&part.b);
            }
        }
    }

    fn visit_mut(&mut self, f: &mut dyn FnMut(&mut Parameter)) {
        for adapter in self.adapters.values_mut() {
            for part in &mut adapter.parts {
                f(&mut part.a);
                f(&mut part.b);
            }
        }
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

impl tapelora_nn::EmbeddingAdapter for LoraLinear {
    /// rows + Σ w·s·(Aᵀ[ids])·Bᵀ — the embedding's LoRA (loralib's `Embedding`), no dropout.
    fn forward<'t>(
        &self,
        ctx: &Ctx<'t>,
        ids: &ndarray::ArrayD<usize>,
        base: Var<'t, f32>,
    ) -> tapelora_nn::Result<Var<'t, f32>> {
        let mut out = base;
        for (adapter, weight) in self.acting() {
            for part in &adapter.parts {
                let rows = part.a.on(ctx.tape).transpose(0, 1)?.embedding(ids)?;
                let delta = rows
                    .matmul(&part.b.on(ctx.tape).transpose(0, 1)?)?
                    .scale(part.scaling() * weight)?;
                out = out.add(&delta)?;
            }
        }
        Ok(out)
    }

    /// The tied lm_head sees the same adapted table: x·(W + s·(B·A)ᵀ)ᵀ = x·Wᵀ + s·(x·B)·A.
    fn tied_output_delta<'t>(
        &self,
        ctx: &Ctx<'t>,
        x: &Var<'t, f32>,
    ) -> tapelora_nn::Result<Option<Var<'t, f32>>> {
        let mut total: Option<Var<'t, f32>> = None;
        for (adapter, weight) in self.acting() {
            for part in &adapter.parts {
                let delta = x
                    .matmul(&part.b.on(ctx.tape))?
                    .matmul(&part.a.on(ctx.tape))?
                    .scale(part.scaling() * weight)?;
                total = Some(match total {
                    Some(t) => t.add(&delta)?,
                    None => delta,
                });
            }
        }
        Ok(total)
    }

    fn visit<'a>(&'a self, f: &mut dyn FnMut(&'a Parameter)) {
        <Self as LinearAdapter>::visit(self, f)
    }
    fn visit_mut(&mut self, f: &mut dyn FnMut(&mut Parameter)) {
        <Self as LinearAdapter>::visit_mut(self, f)
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

impl LoraLinear {
    /// The adapters that act in forward, with their weights (none when disabled; merged ones
    /// are already in the base weight).
    fn acting(&self) -> impl Iterator<Item = (&LoraAdapter, f64)> {
        self.active
            .iter()
            .filter(move |(name, _)| !self.disabled && !self.merged.contains(name))
            .filter_map(move |(name, w)| self.adapters.get(name).map(|a| (a, *w)))
    }
}
