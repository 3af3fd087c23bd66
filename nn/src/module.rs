//! The `Module` trait: anything with named parameters, visited in a fixed order.

use tapelora_autograd::Var;

use crate::parameter::Parameter;

/// What every layer and model implements: its parameters, in a stable order, with their full
/// hierarchical names.
pub trait Module {
    /// Visits every parameter (trainable and frozen).
    fn visit<'a>(&'a self, f: &mut dyn FnMut(&'a Parameter));
    /// Visits every parameter mutably.
    fn visit_mut(&mut self, f: &mut dyn FnMut(&mut Parameter));

    fn parameters(&self) -> Vec<&Parameter> {
        let mut out = Vec::new();
        self.visit(&mut |p| out.push(p));
        out
    }

    fn parameters_mut(&mut self) -> Vec<&mut Parameter> {
        let mut out: Vec<*mut Parameter> = Vec::new();
        self.visit_mut(&mut |p| out.push(p as *mut Parameter));
        // SAFETY: `visit_mut` yields each parameter exactly once, so the pointers are distinct
        // and each one is borrowed mutably only once, for as long as `self` is.
        out.into_iter().map(|p| unsafe { &mut *p }).collect()
    }

    /// Number of elements over all parameters.
    fn num_params(&self) -> usize {
        self.parameters().iter().map(|p| p.numel()).sum()
    }

    /// Number of elements over trainable parameters.
    fn num_trainable_params(&self) -> usize {
        self.parameters()
            .iter()
            .filter(|p| p.trainable)
            .map(|p| p.numel())
            .sum()
    }

    /// Marks every parameter frozen (no gradient, no optimizer state).
    fn freeze(&mut self) {
        self.visit_mut(&mut |p| p.trainable = false);
    }

    /// Marks every parameter trainable.
    fn unfreeze(&mut self) {
        self.visit_mut(&mut |p| p.trainable = true);
    }
}

/// A hook that adds to a [`crate::Linear`] layer's output — how LoRA adapters attach to a base
/// layer without the base knowing about LoRA (PEFT's module-replacement idea, as composition).
pub trait LinearAdapter: Send + Sync + std::fmt::Debug {
    /// Returns the layer's output given its input `x` and the frozen base output `base`, not
    /// computed yet: the adapter takes it as it is or fused with low-rank terms of its own.
    fn forward<'t>(
        &self,
        ctx: &crate::Ctx<'t>,
        x: &Var<'t, f32>,
        base: crate::BaseLinear<'_, 't>,
    ) -> crate::Result<Var<'t, f32>>;
    fn visit<'a>(&'a self, f: &mut dyn FnMut(&'a Parameter));
    fn visit_mut(&mut self, f: &mut dyn FnMut(&mut Parameter));
    fn as_any(&self) -> &dyn std::any::Any;
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any;
}

/// A hook on an [`crate::Embedding`] (LoRA on a token embedding). Because GPT-2 ties its
/// lm_head to the token embedding, the adapter also says what it adds to the tied output
/// projection, so that the adapted embedding is used consistently in both places.
pub trait EmbeddingAdapter: Send + Sync + std::fmt::Debug {
    /// The embedding's output given the looked-up `ids` and the base rows `base`.
    fn forward<'t>(
        &self,
        ctx: &crate::Ctx<'t>,
        ids: &ndarray::ArrayD<usize>,
        base: Var<'t, f32>,
    ) -> crate::Result<Var<'t, f32>>;
    /// What the adapter adds to `x · Wᵀ` when the table W is used as a tied output layer.
    fn tied_output_delta<'t>(
        &self,
        ctx: &crate::Ctx<'t>,
        x: &Var<'t, f32>,
    ) -> crate::Result<Option<Var<'t, f32>>>;
    fn visit<'a>(&'a self, f: &mut dyn FnMut(&'a Parameter));
    fn visit_mut(&mut self, f: &mut dyn FnMut(&mut Parameter));
    fn as_any(&self) -> &dyn std::any::Any;
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any;
}
