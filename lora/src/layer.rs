//! The LoRA layer: adapters attached to a frozen `Linear` through nn's `LinearAdapter` hook.
//!
//! For input x `[..., in]` and base output y₀ = x·W₀ + b `[..., out]`:
//!
//! ```text
//! y = y₀ + Σ_active  w · s · (dropout(x)·Aᵀ)·Bᵀ        A: [r, in]   B: [out_part, r]
//! ```
//! computed as two thin matmuls (`[..., in]·[in, r]` then `[..., r]·[r, out_part]`); the
//! d×k product B·A is never formed during training. A *part* covers the whole output, or one
//! third of c_attn's fused q|k|v output; parts of one adapter are joined with zeros for the
//! slices they do not touch.

use std::collections::BTreeMap;

use ndarray::{ArrayD, IxDyn};
use tapelora_autograd::{concat, Var};
use tapelora_nn::{Ctx, LinearAdapter, Parameter};

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

/// All adapters attached to one Linear layer, and which of them act.
#[derive(Debug, Default)]
pub struct LoraLinear {
    /// The layer's path, e.g. `h.0.attn.c_attn`.
    pub module: String,
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

impl LoraLinear {
    fn adapter_delta<'t>(
        &self,
        ctx: &Ctx<'t>,
        x: &Var<'t, f32>,
        adapter: &LoraAdapter,
        weight: f64,
    ) -> tapelora_nn::Result<Var<'t, f32>> {
        let x = ctx.dropout(x, adapter.dropout)?;
        let lead: Vec<usize> = x.shape()[..x.ndim() - 1].to_vec();
        let mut pieces: Vec<Var<'t, f32>> = Vec::new();
        let mut covered = 0;
        let mut parts: Vec<&LoraPart> = adapter.parts.iter().collect();
        parts.sort_by_key(|p| p.slice.start);
        for part in parts {
            if part.slice.start > covered {
                pieces.push(zeros(ctx, &lead, part.slice.start - covered));
            }
            let a = part.a.on(ctx.tape).transpose(0, 1)?;
            let b = part.b.on(ctx.tape).transpose(0, 1)?;
            pieces.push(x.matmul(&a)?.matmul(&b)?.scale(part.scaling() * weight)?);
            covered = part.slice.start + part.slice.len;
        }
        if covered < self.out_features {
            pieces.push(zeros(ctx, &lead, self.out_features - covered));
        }
        if pieces.len() == 1 {
            return Ok(pieces.pop().expect("one piece"));
        }
        let refs: Vec<&Var<'t, f32>> = pieces.iter().collect();
        Ok(concat(&refs, lead.len())?)
    }
}

fn zeros<'t>(ctx: &Ctx<'t>, lead: &[usize], width: usize) -> Var<'t, f32> {
    let mut shape = lead.to_vec();
    shape.push(width);
    ctx.tape.constant(ArrayD::zeros(IxDyn(&shape)))
}

impl LinearAdapter for LoraLinear {
    fn forward<'t>(
        &self,
        ctx: &Ctx<'t>,
        x: &Var<'t, f32>,
        base: Var<'t, f32>,
    ) -> tapelora_nn::Result<Var<'t, f32>> {
        if self.disabled {
            return Ok(base);
        }
        let mut out = base;
        for (name, weight) in &self.active {
            if self.merged.contains(name) {
                continue;
            }
            if let Some(adapter) = self.adapters.get(name) {
                out = out.add(&self.adapter_delta(ctx, x, adapter, *weight)?)?;
            }
        }
        Ok(out)
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
