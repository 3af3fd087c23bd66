//! `LoraConfig` (PEFT's fields) and the resolution of target names to GPT-2 modules.

use crate::error::{config_err, Result};

/// Which biases train alongside the adapters (PEFT's `bias`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoraBias {
    /// No bias trains.
    None,
    /// Every bias of the model trains.
    All,
    /// Biases of adapted layers train.
    LoraOnly,
}

impl LoraBias {
    pub fn as_str(self) -> &'static str {
        match self {
            LoraBias::None => "none",
            LoraBias::All => "all",
            LoraBias::LoraOnly => "lora_only",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "none" => Ok(LoraBias::None),
            "all" => Ok(LoraBias::All),
            "lora_only" => Ok(LoraBias::LoraOnly),
            other => config_err(
                "bias",
                format!("`{other}` is not one of none, all, lora_only"),
            ),
        }
    }
}

/// How A is initialised (B starts at zero, so the adapted model starts exactly at the base).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InitA {
    /// kaiming_uniform(a = √5), as `nn.Linear` and PEFT's default.
    KaimingUniform,
    /// N(0, 1/r), PEFT's `init_lora_weights="gaussian"`.
    Gaussian,
}

/// One adapter's configuration, with PEFT's meaning for each field.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub lora_alpha: f64,
    /// Scale α/√r instead of α/r (rank-stabilised LoRA).
    pub use_rslora: bool,
    pub lora_dropout: f64,
    /// Module names, matched by PEFT's suffix rule (see [`crate::target`]).
    pub target_modules: Vec<String>,
    /// Only these block indices (None: all).
    pub layers_to_transform: Option<Vec<usize>>,
    pub bias: LoraBias,
    pub init_a: InitA,
    /// Start B ~ N(0, 0.02²)·… random instead of zero (tests and debugging: a non-trivial
    /// adapter at step 0).
    pub random_b: bool,
    /// Per-module rank and alpha overrides (PEFT's `rank_pattern` / `alpha_pattern`), keyed by
    /// a target name matched like `target_modules`.
    pub rank_pattern: Vec<(String, usize)>,
    pub alpha_pattern: Vec<(String, f64)>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            r: 8,
            lora_alpha: 16.0,
            use_rslora: false,
            lora_dropout: 0.0,
            target_modules: vec!["c_attn".into()],
            layers_to_transform: None,
            bias: LoraBias::None,
            init_a: InitA::KaimingUniform,
            random_b: false,
            rank_pattern: Vec::new(),
            alpha_pattern: Vec::new(),
        }
    }
}

/// The scale s applied to B·A: α/r, or α/√r with rsLoRA.
pub fn scaling(alpha: f64, r: usize, use_rslora: bool) -> f64 {
    if use_rslora {
        alpha / (r as f64).sqrt()
    } else {
        alpha / r as f64
    }
}

impl LoraConfig {
    pub fn new(r: usize, lora_alpha: f64, targets: &[&str]) -> Self {
        LoraConfig {
            r,
            lora_alpha,
            target_modules: targets.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            return config_err("r", "the rank must be at least 1");
        }
        if !(self.lora_alpha > 0.0 && self.lora_alpha.is_finite()) {
            return config_err(
                "lora_alpha",
                format!("must be a positive number, got {}", self.lora_alpha),
            );
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return config_err(
                "lora_dropout",
                format!("must be in [0, 1), got {}", self.lora_dropout),
            );
        }
        if self.target_modules.is_empty() {
            return config_err("target_modules", "name at least one module to adapt");
        }
        for (name, r) in &self.rank_pattern {
            if *r == 0 {
                return config_err(
                    "rank_pattern",
                    format!("rank for `{name}` must be at least 1"),
                );
            }
        }
        for (name, a) in &self.alpha_pattern {
            if !(*a > 0.0 && a.is_finite()) {
                return config_err(
                    "alpha_pattern",
                    format!("alpha for `{name}` must be positive, got {a}"),
                );
            }
        }
        Ok(())
    }
}
