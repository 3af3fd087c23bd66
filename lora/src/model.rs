//! `LoraModel`: a frozen GPT-2 with named LoRA adapters — inject, switch, disable, delete,
//! merge, unmerge, merge-and-unload, and PEFT's trainable-parameter report.

use std::collections::BTreeMap;

use ndarray::{s, Ix2};
use rand::Rng;
use tapelora_autograd::gemm::gemm;
use tapelora_gpt::Gpt;
use tapelora_nn::{init, Embedding, Linear, Module, Parameter, WeightLayout};

use crate::config::{InitA, LoraBias, LoraConfig};
use crate::error::{config_err, LoraError, Result};
use crate::layer::{LayerKind, LoraAdapter, LoraLinear, LoraPart, OutSlice};
use crate::target::{resolve, ModuleKind, Target};

/// A base model whose weights are frozen, plus LoRA adapters by name.
#[derive(Debug)]
pub struct LoraModel {
    pub model: Gpt,
    /// Each adapter's configuration, by adapter name.
    pub configs: BTreeMap<String, LoraConfig>,
}

fn linear_mut(model: &mut Gpt, kind: ModuleKind, layer: usize) -> Option<&mut Linear> {
    let block = model.h.get_mut(layer)?;
    Some(match kind {
        ModuleKind::CAttn => &mut block.attn.c_attn,
        ModuleKind::AttnCProj => &mut block.attn.c_proj,
        ModuleKind::CFc => &mut block.mlp.c_fc,
        ModuleKind::MlpCProj => &mut block.mlp.c_proj,
        ModuleKind::Wte => return None,
    })
}

/// A layer LoRA can attach to: one of the block Linears, or the token embedding.
enum Host<'a> {
    Linear(&'a mut Linear),
    Wte(&'a mut Embedding),
}

impl Host<'_> {
    fn lora(&self) -> Option<&LoraLinear> {
        match self {
            Host::Linear(l) => lora_of(l),
            Host::Wte(e) => e
                .adapter
                .as_ref()
                .and_then(|a| a.as_any().downcast_ref::<LoraLinear>()),
        }
    }
    fn lora_mut(&mut self) -> Option<&mut LoraLinear> {
        match self {
            Host::Linear(l) => l
                .adapter
                .as_mut()
                .and_then(|a| a.as_any_mut().downcast_mut::<LoraLinear>()),
            Host::Wte(e) => e
                .adapter
                .as_mut()
                .and_then(|a| a.as_any_mut().downcast_mut::<LoraLinear>()),
        }
    }
    fn remove_adapter(&mut self) {
        match self {
            Host::Linear(l) => l.adapter = None,
            Host::Wte(e) => e.adapter = None,
        }
    }
    /// `W ← W + sign·s·ΔW` for one part, in the layer's own weight layout, in place.
    fn apply_delta(&mut self, part: &LoraPart, sign: f32) {
        // The embedding table [vocab, dim] takes ΔWᵀ like a Conv1D weight [in, out].
        let (weight, layout) = match self {
            Host::Linear(l) => (&mut l.weight, l.layout),
            Host::Wte(e) => (&mut e.weight, WeightLayout::InOut),
        };
        let scale = sign * part.scaling() as f32;
        let a = part
            .a
            .value
            .view()
            .into_dimensionality::<Ix2>()
            .expect("A is 2-D");
        let b = part
            .b
            .value
            .view()
            .into_dimensionality::<Ix2>()
            .expect("B is 2-D");
        let (start, end) = (part.slice.start, part.slice.start + part.slice.len);
        let mut w = weight.value_mut();
        let mut w = w.view_mut().into_dimensionality::<Ix2>().expect("W is 2-D");
        match layout {
            // Conv1D [in, out]: W[:, slice] += s·Aᵀ·Bᵀ
            WeightLayout::InOut => gemm(scale, a.t(), b.t(), 1.0, w.slice_mut(s![.., start..end])),
            // nn.Linear [out, in]: W[slice, :] += s·B·A
            WeightLayout::OutIn => gemm(scale, b, a, 1.0, w.slice_mut(s![start..end, ..])),
        }
    }
}

fn hosts(model: &mut Gpt) -> Vec<Host<'_>> {
    let mut out = vec![Host::Wte(&mut model.wte)];
    for b in &mut model.h {
        out.extend([
            Host::Linear(&mut b.attn.c_attn),
            Host::Linear(&mut b.attn.c_proj),
            Host::Linear(&mut b.mlp.c_fc),
            Host::Linear(&mut b.mlp.c_proj),
        ]);
    }
    out
}

pub(crate) fn lora_of(linear: &Linear) -> Option<&LoraLinear> {
    linear
        .adapter
        .as_ref()
        .and_then(|a| a.as_any().downcast_ref::<LoraLinear>())
}

/// Every LoRA layer of a model, embedding first, then block by block.
pub fn lora_layers_of(model: &Gpt) -> Vec<&LoraLinear> {
    let wte = model
        .wte
        .adapter
        .as_ref()
        .and_then(|a| a.as_any().downcast_ref::<LoraLinear>());
    let linears = model
        .h
        .iter()
        .flat_map(|b| [&b.attn.c_attn, &b.attn.c_proj, &b.mlp.c_fc, &b.mlp.c_proj])
        .filter_map(lora_of);
    wte.into_iter().chain(linears).collect()
}

impl LoraModel {
    /// Wraps a model, freezing every one of its parameters.
    pub fn new(mut model: Gpt) -> Self {
        model.freeze();
        LoraModel {
            model,
            configs: BTreeMap::new(),
        }
    }

    pub fn adapter_names(&self) -> Vec<String> {
        self.configs.keys().cloned().collect()
    }

    /// Adds a named adapter (A random, B zero unless `random_b`) and makes it the active,
    /// trainable one.
    pub fn add_adapter(
        &mut self,
        name: &str,
        config: &LoraConfig,
        rng: &mut impl Rng,
    ) -> Result<()> {
        config.validate()?;
        if name.is_empty() || name.contains('.') || name.contains('/') {
            return config_err(
                "adapter name",
                format!("`{name}` must be non-empty without '.' or '/'"),
            );
        }
        if self.configs.contains_key(name) {
            return Err(LoraError::Adapter(format!(
                "an adapter named `{name}` exists already"
            )));
        }
        let targets = resolve(config, self.model.config.n_layer)?;
        let c = self.model.config.n_embd;
        // Check every target before changing anything.
        let mut plans: Vec<(Target, Vec<OutSlice>, usize)> = Vec::new();
        for t in targets {
            let (d_in, d_out) = match linear_mut(&mut self.model, t.kind, t.layer) {
                Some(linear) => (linear.in_features, linear.out_features),
                // The embedding: A [r, vocab], B [dim, r] (PEFT's lora_embedding_A / _B).
                None => (self.model.config.vocab_size, c),
            };
            let slices: Vec<OutSlice> = if t.slices.is_empty() {
                vec![OutSlice {
                    label: None,
                    start: 0,
                    len: d_out,
                }]
            } else {
                t.slices
                    .iter()
                    .map(|q| OutSlice {
                        label: Some(q.name()),
                        start: q.index() * c,
                        len: c,
                    })
                    .collect()
            };
            let max_rank = slices.iter().map(|s| s.len.min(d_in)).min().unwrap_or(0);
            if t.r > max_rank {
                return config_err(
                    "r",
                    format!(
                        "rank {} exceeds min(d, k) = {max_rank} of `{}`",
                        t.r,
                        t.path()
                    ),
                );
            }
            plans.push((t, slices, d_in));
        }
        for (t, slices, d_in) in plans {
            let module = t.path();
            let parts = slices
                .into_iter()
                .map(|slice| {
                    let stem = match slice.label {
                        Some(l) => format!("{module}.{l}"),
                        None => module.clone(),
                    };
                    let mut a = Parameter::new(
                        format!("{stem}.lora_A.{name}.weight"),
                        ndarray::ArrayD::zeros(ndarray::IxDyn(&[t.r, d_in])),
                    );
                    let mut b = Parameter::new(
                        format!("{stem}.lora_B.{name}.weight"),
                        ndarray::ArrayD::zeros(ndarray::IxDyn(&[slice.len, t.r])),
                    );
                    if t.kind == ModuleKind::Wte {
                        // loralib / PEFT for embeddings: A = 0, B ~ N(0, 1).
                        init::normal_(&mut b, 1.0, rng);
                        if config.random_b {
                            init::normal_(&mut a, 0.02, rng);
                        }
                    } else {
                        match config.init_a {
                            InitA::KaimingUniform => {
                                init::kaiming_uniform_(&mut a, 5f64.sqrt(), d_in, rng)
                            }
                            InitA::Gaussian => init::normal_(&mut a, 1.0 / t.r as f64, rng),
                        }
                        if config.random_b {
                            init::normal_(&mut b, 0.02, rng);
                        }
                    }
                    LoraPart {
                        slice,
                        a,
                        b,
                        r: t.r,
                        alpha: t.alpha,
                        use_rslora: config.use_rslora,
                    }
                })
                .collect();
            let kind = if t.kind == ModuleKind::Wte {
                LayerKind::Embedding
            } else {
                LayerKind::Linear
            };
            let fresh = || LoraLinear {
                module: module.clone(),
                kind,
                in_features: d_in,
                ..Default::default()
            };
            let adapter = LoraAdapter {
                parts,
                dropout: config.lora_dropout,
            };
            match linear_mut(&mut self.model, t.kind, t.layer) {
                Some(linear) => {
                    let out_features = linear.out_features;
                    let slot = linear.adapter.get_or_insert_with(|| {
                        Box::new(LoraLinear {
                            out_features,
                            ..fresh()
                        })
                    });
                    let lora = slot
                        .as_any_mut()
                        .downcast_mut::<LoraLinear>()
                        .ok_or_else(|| {
                            LoraError::Adapter(format!("`{module}` already has a non-LoRA adapter"))
                        })?;
                    lora.adapters.insert(name.to_string(), adapter);
                    if config.bias == LoraBias::LoraOnly {
                        if let Some(bias) = &mut linear.bias {
                            bias.trainable = true;
                        }
                    }
                }
                None => {
                    let out_features = self.model.config.n_embd;
                    let slot = self.model.wte.adapter.get_or_insert_with(|| {
                        Box::new(LoraLinear {
                            out_features,
                            ..fresh()
                        })
                    });
                    let lora = slot
                        .as_any_mut()
                        .downcast_mut::<LoraLinear>()
                        .ok_or_else(|| {
                            LoraError::Adapter("`wte` already has a non-LoRA adapter".into())
                        })?;
                    lora.adapters.insert(name.to_string(), adapter);
                }
            }
        }
        if config.bias == LoraBias::All {
            self.model.visit_mut(&mut |p| {
                if p.name.ends_with(".bias") && !p.name.contains(".lora_") {
                    p.trainable = true;
                }
            });
        }
        self.configs.insert(name.to_string(), config.clone());
        self.set_adapter(name)
    }

    /// Makes `name` the single active adapter; its parameters train, every other adapter's
    /// are frozen (PEFT's `set_adapter`).
    pub fn set_adapter(&mut self, name: &str) -> Result<()> {
        self.set_weighted_adapters(&[(name.to_string(), 1.0)])?;
        for mut host in hosts(&mut self.model) {
            if let Some(lora) = host.lora_mut() {
                for (adapter_name, adapter) in lora.adapters.iter_mut() {
                    for part in &mut adapter.parts {
                        part.a.trainable = adapter_name == name;
                        part.b.trainable = adapter_name == name;
                    }
                }
            }
        }
        Ok(())
    }

    /// Activates several adapters at once, each scaled by its weight (inference-time
    /// combination; nothing is made trainable).
    pub fn set_weighted_adapters(&mut self, adapters: &[(String, f64)]) -> Result<()> {
        for (name, _) in adapters {
            if !self.configs.contains_key(name) {
                return Err(LoraError::Adapter(format!(
                    "no adapter named `{name}` (have: {})",
                    self.adapter_names().join(", ")
                )));
            }
        }
        for mut host in hosts(&mut self.model) {
            if let Some(lora) = host.lora_mut() {
                lora.active = adapters
                    .iter()
                    .filter(|(n, _)| lora.adapters.contains_key(n))
                    .cloned()
                    .collect();
            }
        }
        Ok(())
    }

    /// The names of the active adapters.
    pub fn active_adapters(&self) -> Vec<String> {
        let mut names: Vec<String> = lora_layers_of(&self.model)
            .into_iter()
            .flat_map(|l| l.active.iter().map(|(n, _)| n.clone()))
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// With `disabled`, forward computes exactly the base model (adapters kept).
    pub fn set_adapters_disabled(&mut self, disabled: bool) {
        for mut host in hosts(&mut self.model) {
            if let Some(lora) = host.lora_mut() {
                lora.disabled = disabled;
            }
        }
    }

    /// Removes an adapter (unmerging it first if merged).
    pub fn delete_adapter(&mut self, name: &str) -> Result<()> {
        if !self.configs.contains_key(name) {
            return Err(LoraError::Adapter(format!("no adapter named `{name}`")));
        }
        if self.is_merged(name) {
            self.unmerge_adapter(name)?;
        }
        for mut host in hosts(&mut self.model) {
            let now_empty = match host.lora_mut() {
                Some(lora) => {
                    lora.adapters.remove(name);
                    lora.active.retain(|(n, _)| n != name);
                    lora.adapters.is_empty()
                }
                None => false,
            };
            if now_empty {
                host.remove_adapter();
            }
        }
        self.configs.remove(name);
        Ok(())
    }

    pub fn is_merged(&self, name: &str) -> bool {
        lora_layers_of(&self.model)
            .into_iter()
            .any(|l| l.merged.iter().any(|m| m == name))
    }

    /// W ← W + s·B·A in every adapted layer; forward then skips the adapter (same output, the
    /// base model's speed).
    pub fn merge_adapter(&mut self, name: &str) -> Result<()> {
        self.merge_or_unmerge(name, true)
    }

    /// W ← W − s·B·A: the inverse of [`LoraModel::merge_adapter`] (up to rounding).
    pub fn unmerge_adapter(&mut self, name: &str) -> Result<()> {
        self.merge_or_unmerge(name, false)
    }

    fn merge_or_unmerge(&mut self, name: &str, merge: bool) -> Result<()> {
        if !self.configs.contains_key(name) {
            return Err(LoraError::Adapter(format!("no adapter named `{name}`")));
        }
        if merge == self.is_merged(name) {
            return Err(LoraError::Adapter(format!(
                "adapter `{name}` is {} merged",
                if merge { "already" } else { "not" }
            )));
        }
        for mut host in hosts(&mut self.model) {
            let Some(adapter) = host.lora().and_then(|l| l.adapters.get(name)).cloned() else {
                continue;
            };
            for part in &adapter.parts {
                host.apply_delta(part, if merge { 1.0 } else { -1.0 });
            }
            let lora = host.lora_mut().expect("has the adapter");
            if merge {
                lora.merged.push(name.to_string());
            } else {
                lora.merged.retain(|m| m != name);
            }
        }
        Ok(())
    }

    /// Merges the active adapters (with their weights) and returns the plain model, all its
    /// parameters frozen no longer: a standalone model folder can be written from it.
    pub fn merge_and_unload(mut self) -> Result<Gpt> {
        for mut host in hosts(&mut self.model) {
            if let Some(lora) = host.lora() {
                let todo: Vec<(LoraAdapter, f64)> = lora
                    .active
                    .iter()
                    .filter(|(n, _)| !lora.merged.contains(n) && !lora.disabled)
                    .filter_map(|(n, w)| lora.adapters.get(n).map(|a| (a.clone(), *w)))
                    .collect();
                for (adapter, weight) in todo {
                    for part in &adapter.parts {
                        host.apply_delta(part, weight as f32);
                    }
                }
            }
            host.remove_adapter();
        }
        self.model.unfreeze();
        Ok(self.model)
    }

    /// The LoRA layers, in model order.
    pub fn lora_layers(&self) -> Vec<&LoraLinear> {
        lora_layers_of(&self.model)
    }

    /// PEFT's line: `trainable params: 2,304 || all params: … || trainable%: …`.
    pub fn trainable_parameters_line(&self) -> String {
        let (trainable, all) = (self.model.num_trainable_params(), self.model.num_params());
        format!(
            "trainable params: {} || all params: {} || trainable%: {:.4}",
            thousands(trainable),
            thousands(all),
            100.0 * trainable as f64 / all.max(1) as f64
        )
    }
}

/// 1234567 → "1,234,567".
pub fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}
