//! Which GPT-2 modules an adapter targets.
//!
//! Module names are GPT-2's: `wte`, and per block `h.{i}.attn.c_attn`, `h.{i}.attn.c_proj`,
//! `h.{i}.mlp.c_fc`, `h.{i}.mlp.c_proj`, plus the slices of the fused attention input
//! `h.{i}.attn.c_attn.q|k|v` (loralib's MergedLinear: LoRA on W_q and W_v only, as in the
//! paper's experiments). A target matches a module when it equals the name or is a suffix
//! after a dot (PEFT's rule): `c_proj` matches both `attn.c_proj` and `mlp.c_proj`.
//! [`ALL_LINEAR`] (PEFT's `target_modules="all-linear"`) names every linear layer of every
//! block — `c_attn`, `attn.c_proj`, `mlp.c_fc`, `mlp.c_proj` — and not the tied `wte`/lm_head.

use crate::config::LoraConfig;
use crate::error::{config_err, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ModuleKind {
    Wte,
    CAttn,
    AttnCProj,
    CFc,
    MlpCProj,
}

impl ModuleKind {
    /// The module's path inside block `layer` (or at the top for `wte`).
    pub fn path(self, layer: usize) -> String {
        match self {
            ModuleKind::Wte => "wte".into(),
            ModuleKind::CAttn => format!("h.{layer}.attn.c_attn"),
            ModuleKind::AttnCProj => format!("h.{layer}.attn.c_proj"),
            ModuleKind::CFc => format!("h.{layer}.mlp.c_fc"),
            ModuleKind::MlpCProj => format!("h.{layer}.mlp.c_proj"),
        }
    }
}

/// One third of the fused `c_attn` output: q, k or v.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Qkv {
    Q,
    K,
    V,
}

impl Qkv {
    pub fn index(self) -> usize {
        self as usize
    }
    pub fn name(self) -> &'static str {
        ["q", "k", "v"][self as usize]
    }
}

/// A resolved target: one module, the whole of it or some q/k/v slices, with its rank and α.
#[derive(Clone, Debug, PartialEq)]
pub struct Target {
    pub kind: ModuleKind,
    pub layer: usize,
    /// Empty: the whole module. Otherwise the c_attn slices adapted (ascending).
    pub slices: Vec<Qkv>,
    pub r: usize,
    pub alpha: f64,
}

impl Target {
    pub fn path(&self) -> String {
        self.kind.path(self.layer)
    }
}

/// Target names accepted, for error messages.
pub const VALID_TARGETS: &str = "c_attn, c_attn.q, c_attn.k, c_attn.v, attn.c_proj, c_fc, mlp.c_proj, c_proj (both projections), wte, all-linear, or a full name such as h.0.attn.c_attn";

/// PEFT's shorthand for every linear layer except the output layer.
pub const ALL_LINEAR: &str = "all-linear";

pub(crate) fn matches(target: &str, name: &str) -> bool {
    name == target || name.ends_with(&format!(".{target}"))
}

pub(crate) fn normalize(target: &str) -> &str {
    let t = target.strip_prefix("base_model.model.").unwrap_or(target);
    t.strip_prefix("transformer.").unwrap_or(t)
}

/// Every adaptable (module, slice) of a model with `n_layer` blocks, with its name.
fn universe(n_layer: usize) -> Vec<(String, ModuleKind, usize, Option<Qkv>)> {
    let mut all = vec![("wte".to_string(), ModuleKind::Wte, 0, None)];
    for layer in 0..n_layer {
        for kind in [
            ModuleKind::CAttn,
            ModuleKind::AttnCProj,
            ModuleKind::CFc,
            ModuleKind::MlpCProj,
        ] {
            all.push((kind.path(layer), kind, layer, None));
        }
        for s in [Qkv::Q, Qkv::K, Qkv::V] {
            all.push((
                format!("{}.{}", ModuleKind::CAttn.path(layer), s.name()),
                ModuleKind::CAttn,
                layer,
                Some(s),
            ));
        }
    }
    all
}

/// Resolves the config's target names against a model of `n_layer` blocks.
pub fn resolve(config: &LoraConfig, n_layer: usize) -> Result<Vec<Target>> {
    let universe = universe(n_layer);
    let mut picked: Vec<(ModuleKind, usize, Option<Qkv>, String)> = Vec::new();
    for raw in &config.target_modules {
        let t = normalize(raw);
        let hits: Vec<_> = universe
            .iter()
            .filter(|(name, kind, _, slice)| {
                if t == ALL_LINEAR {
                    *kind != ModuleKind::Wte && slice.is_none()
                } else {
                    matches(t, name)
                }
            })
            .collect();
        if hits.is_empty() {
            return config_err(
                "target_modules",
                format!("`{raw}` matches no module of GPT-2; valid targets: {VALID_TARGETS}"),
            );
        }
        for (name, kind, layer, slice) in hits {
            if let Some(allowed) = &config.layers_to_transform {
                if *kind != ModuleKind::Wte && !allowed.contains(layer) {
                    continue;
                }
            }
            if !picked
                .iter()
                .any(|(k, l, s, _)| k == kind && l == layer && s == slice)
            {
                picked.push((*kind, *layer, *slice, name.clone()));
            }
        }
    }
    if let Some(allowed) = &config.layers_to_transform {
        if let Some(bad) = allowed.iter().find(|&&l| l >= n_layer) {
            return config_err(
                "layers_to_transform",
                format!("layer {bad} does not exist (the model has {n_layer} blocks)"),
            );
        }
    }
    let mut targets: Vec<Target> = Vec::new();
    for (kind, layer, slice, name) in picked {
        let module = kind.path(layer);
        let pattern_key = |keys: &[String]| {
            keys.iter()
                .position(|k| matches(normalize(k), &module) || matches(normalize(k), &name))
        };
        let rank_keys: Vec<String> = config.rank_pattern.iter().map(|(k, _)| k.clone()).collect();
        let alpha_keys: Vec<String> = config
            .alpha_pattern
            .iter()
            .map(|(k, _)| k.clone())
            .collect();
        let r = pattern_key(&rank_keys).map_or(config.r, |i| config.rank_pattern[i].1);
        let alpha =
            pattern_key(&alpha_keys).map_or(config.lora_alpha, |i| config.alpha_pattern[i].1);
        match targets
            .iter_mut()
            .find(|t| t.kind == kind && t.layer == layer)
        {
            Some(existing) => {
                let whole = existing.slices.is_empty() || slice.is_none();
                if whole {
                    return config_err(
                        "target_modules",
                        format!(
                            "`{module}` is targeted both whole and by its q/k/v slices; choose one"
                        ),
                    );
                }
                existing.slices.push(slice.expect("checked"));
                existing.slices.sort();
            }
            None => targets.push(Target {
                kind,
                layer,
                slices: slice.into_iter().collect(),
                r,
                alpha,
            }),
        }
    }
    targets.sort_by_key(|t| (t.layer, t.kind));
    Ok(targets)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(config: &LoraConfig) -> Vec<String> {
        resolve(config, 2)
            .unwrap()
            .iter()
            .map(|t| {
                format!(
                    "{}{}",
                    t.path(),
                    t.slices
                        .iter()
                        .map(|s| format!(".{}", s.name()))
                        .collect::<String>()
                )
            })
            .collect()
    }

    #[test]
    fn suffix_rule_slices_and_layers() {
        let c = |targets: &[&str]| LoraConfig::new(4, 8.0, targets);
        assert_eq!(
            names(&c(&["c_proj"])),
            [
                "h.0.attn.c_proj",
                "h.0.mlp.c_proj",
                "h.1.attn.c_proj",
                "h.1.mlp.c_proj"
            ]
        );
        assert_eq!(
            names(&c(&["attn.c_proj"])),
            ["h.0.attn.c_proj", "h.1.attn.c_proj"]
        );
        assert_eq!(
            names(&c(&["c_attn.q", "c_attn.v"])),
            ["h.0.attn.c_attn.q.v", "h.1.attn.c_attn.q.v"]
        );
        assert_eq!(
            names(&c(&["transformer.h.1.mlp.c_fc", "wte"])),
            ["wte", "h.1.mlp.c_fc"]
        );
        let only_1 = LoraConfig {
            layers_to_transform: Some(vec![1]),
            ..c(&["c_attn"])
        };
        assert_eq!(names(&only_1), ["h.1.attn.c_attn"]);
        let e = resolve(&c(&["q_proj"]), 2).unwrap_err().to_string();
        assert!(e.contains("q_proj") && e.contains("c_attn.q"), "{e}");
        assert!(resolve(&c(&["c_attn", "c_attn.q"]), 2).is_err());
        assert!(resolve(
            &LoraConfig {
                layers_to_transform: Some(vec![5]),
                ..c(&["c_attn"])
            },
            2
        )
        .is_err());
        assert_eq!(
            names(&c(&[ALL_LINEAR])),
            names(&c(&["c_attn", "c_proj", "c_fc"]))
        );
        assert_eq!(names(&c(&[ALL_LINEAR])).len(), 8);
        assert!(resolve(&c(&[ALL_LINEAR, "c_attn.q"]), 2).is_err());
        let patterned = LoraConfig {
            rank_pattern: vec![("mlp.c_fc".into(), 2)],
            ..c(&["c_fc", "c_attn"])
        };
        let t = resolve(&patterned, 1).unwrap();
        assert_eq!(t.iter().map(|t| t.r).collect::<Vec<_>>(), [4, 2]);
    }
}
