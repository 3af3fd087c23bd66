//! Model sizes: `GptConfig`, its presets, and its Hugging Face `config.json` form.

use std::path::Path;

use serde_json::{json, Map, Value};

use crate::{GptError, Result};

/// The sizes and switches of a GPT-2-style model.
#[derive(Clone, Debug, PartialEq)]
pub struct GptConfig {
    pub n_layer: usize,
    pub n_head: usize,
    pub n_embd: usize,
    /// Context length (`block_size` in nanoGPT, `n_positions` in transformers).
    pub n_positions: usize,
    pub vocab_size: usize,
    /// Width of the MLP's hidden layer (`n_inner`; 4·n_embd when absent).
    pub n_inner: usize,
    pub layer_norm_epsilon: f64,
    /// Biases in Linear and LayerNorm layers (GPT-2: yes; nanoGPT's CPU recipe: no).
    pub bias: bool,
    /// Dropout on embeddings and residual branches (training only).
    pub dropout: f64,
}

impl GptConfig {
    /// A small test model's config: two heads, a 4× MLP, biases, no dropout.
    #[cfg(test)]
    pub(crate) fn small(
        n_layer: usize,
        n_embd: usize,
        n_positions: usize,
        vocab_size: usize,
    ) -> Self {
        GptConfig {
            n_layer,
            n_head: 2,
            n_embd,
            n_positions,
            vocab_size,
            n_inner: 4 * n_embd,
            layer_norm_epsilon: 1e-5,
            bias: true,
            dropout: 0.0,
        }
    }

    /// A config of the named preset: `nanogpt-cpu` (4 layers, 4 heads, 128 wide, block 64, no
    /// biases; its vocabulary comes from the char tokenizer), `gpt2` (124M), `gpt2-medium`.
    pub fn preset(name: &str, vocab_size: Option<usize>) -> Result<Self> {
        let base = |n_layer, n_head, n_embd, n_positions, vocab_size: usize, bias| GptConfig {
            n_layer,
            n_head,
            n_embd,
            n_positions,
            vocab_size,
            n_inner: 4 * n_embd,
            layer_norm_epsilon: 1e-5,
            bias,
            dropout: 0.0,
        };
        match name {
            "nanogpt-cpu" => Ok(base(4, 4, 128, 64, vocab_size.unwrap_or(65), false)),
            "gpt2" => Ok(base(12, 12, 768, 1024, vocab_size.unwrap_or(50257), true)),
            "gpt2-medium" => Ok(base(24, 16, 1024, 1024, vocab_size.unwrap_or(50257), true)),
            other => Err(GptError::Config {
                field: "preset".into(),
                msg: format!("unknown preset `{other}` (known: nanogpt-cpu, gpt2, gpt2-medium)"),
            }),
        }
    }

    /// Checks the sizes fit together.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, msg: String| {
            Err(GptError::Config {
                field: field.into(),
                msg,
            })
        };
        for (field, v) in [
            ("n_layer", self.n_layer),
            ("n_head", self.n_head),
            ("n_embd", self.n_embd),
            ("n_positions", self.n_positions),
            ("vocab_size", self.vocab_size),
            ("n_inner", self.n_inner),
        ] {
            if v == 0 {
                return bad(field, "must be at least 1".into());
            }
        }
        if !self.n_embd.is_multiple_of(self.n_head) {
            return bad(
                "n_embd",
                format!(
                    "{} is not divisible by n_head = {}",
                    self.n_embd, self.n_head
                ),
            );
        }
        if !(self.layer_norm_epsilon > 0.0 && self.layer_norm_epsilon.is_finite()) {
            return bad(
                "layer_norm_epsilon",
                format!("must be a positive number, got {}", self.layer_norm_epsilon),
            );
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad(
                "dropout",
                format!("must be in [0, 1), got {}", self.dropout),
            );
        }
        Ok(())
    }

    /// Number of parameters (with the tied lm_head counted once).
    pub fn num_params(&self) -> usize {
        let (c, l, b) = (self.n_embd, self.n_layer, self.bias as usize);
        let block = 2 * (c + b * c)
            + (c * 3 * c + b * 3 * c)
            + (c * c + b * c)
            + (c * self.n_inner + b * self.n_inner)
            + (self.n_inner * c + b * c);
        self.vocab_size * c + self.n_positions * c + l * block + c + b * c
    }

    /// The Hugging Face `config.json` object for this config.
    pub fn to_hf_json(&self) -> Value {
        let mut v = json!({
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "activation_function": "gelu_new",
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "n_embd": self.n_embd,
            "n_positions": self.n_positions,
            "n_ctx": self.n_positions,
            "n_inner": if self.n_inner == 4 * self.n_embd { Value::Null } else { json!(self.n_inner) },
            "vocab_size": self.vocab_size,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "resid_pdrop": self.dropout,
            "embd_pdrop": self.dropout,
            "attn_pdrop": 0.0,
            "initializer_range": 0.02,
            "scale_attn_weights": true,
            "tie_word_embeddings": true,
            "bos_token_id": self.vocab_size.saturating_sub(1),
            "eos_token_id": self.vocab_size.saturating_sub(1),
        });
        if !self.bias {
            // transformers ignores unknown keys; its GPT-2 always has biases, which tapelora
            // writes as zeros so the model computes the same function there.
            v["tapelora_bias"] = json!(false);
        }
        v
    }

    /// Parses a Hugging Face GPT-2 `config.json` (its path is used in error messages).
    /// Settings tapelora cannot honour are errors, not silently ignored.
    pub fn from_hf_json(value: &Value, path: &Path) -> Result<Self> {
        let err = |msg: String| GptError::Format {
            path: path.to_path_buf(),
            msg,
        };
        let obj: &Map<String, Value> = value
            .as_object()
            .ok_or_else(|| err("expected a JSON object".into()))?;
        let usize_field = |key: &str, alt: Option<&str>| -> Result<Option<usize>> {
            let v = obj.get(key).or_else(|| alt.and_then(|a| obj.get(a)));
            match v {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v.as_u64().map(|n| Some(n as usize)).ok_or_else(|| {
                    err(format!(
                        "field `{key}` must be a non-negative integer, got {v}"
                    ))
                }),
            }
        };
        let f64_field = |key: &str| -> Result<Option<f64>> {
            match obj.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v
                    .as_f64()
                    .map(Some)
                    .ok_or_else(|| err(format!("field `{key}` must be a number, got {v}"))),
            }
        };
        let bool_field = |key: &str| -> Result<Option<bool>> {
            match obj.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v
                    .as_bool()
                    .map(Some)
                    .ok_or_else(|| err(format!("field `{key}` must be true or false, got {v}"))),
            }
        };
        let required = |key: &str, alt: Option<&str>| -> Result<usize> {
            usize_field(key, alt)?.ok_or_else(|| err(format!("missing field `{key}`")))
        };
        if let Some(t) = obj.get("model_type") {
            if t.as_str() != Some("gpt2") {
                return Err(err(format!("model_type {t} is not \"gpt2\"")));
            }
        }
        if let Some(act) = obj.get("activation_function") {
            match act.as_str() {
                Some("gelu_new" | "gelu_pytorch_tanh" | "gelu_fast") => {}
                _ => return Err(err(format!("activation_function {act} is not supported (tapelora implements GPT-2's tanh GELU, \"gelu_new\")"))),
            }
        }
        if bool_field("scale_attn_by_inverse_layer_idx")? == Some(true) {
            return Err(err(
                "scale_attn_by_inverse_layer_idx = true is not supported".into(),
            ));
        }
        if bool_field("scale_attn_weights")? == Some(false) {
            return Err(err("scale_attn_weights = false is not supported".into()));
        }
        if bool_field("tie_word_embeddings")? == Some(false) {
            return Err(err(
                "tie_word_embeddings = false is not supported (GPT-2 ties lm_head to wte)".into(),
            ));
        }
        let n_embd = required("n_embd", Some("hidden_size"))?;
        let config = GptConfig {
            n_layer: required("n_layer", Some("num_hidden_layers"))?,
            n_head: required("n_head", Some("num_attention_heads"))?,
            n_embd,
            n_positions: required("n_positions", Some("n_ctx"))?,
            vocab_size: required("vocab_size", None)?,
            n_inner: usize_field("n_inner", None)?.unwrap_or(4 * n_embd),
            layer_norm_epsilon: f64_field("layer_norm_epsilon")?.unwrap_or(1e-5),
            bias: bool_field("tapelora_bias")?.unwrap_or(true),
            dropout: f64_field("resid_pdrop")?.unwrap_or(0.0),
        };
        config.validate().map_err(|e| err(e.to_string()))?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_and_parameter_counts() {
        let gpt2 = GptConfig::preset("gpt2", None).unwrap();
        assert_eq!(gpt2.num_params(), 124_439_808);
        assert!(GptConfig::preset("gpt5", None)
            .unwrap_err()
            .to_string()
            .contains("nanogpt-cpu"));
        let cpu = GptConfig::preset("nanogpt-cpu", Some(65)).unwrap();
        assert_eq!(
            (
                cpu.n_layer,
                cpu.n_head,
                cpu.n_embd,
                cpu.n_positions,
                cpu.bias
            ),
            (4, 4, 128, 64, false)
        );
    }

    #[test]
    fn hf_json_round_trip_and_errors_name_the_field() {
        let path = Path::new("m/config.json");
        let cfg = GptConfig {
            n_inner: 100,
            ..GptConfig::preset("nanogpt-cpu", Some(50)).unwrap()
        };
        assert_eq!(
            GptConfig::from_hf_json(&cfg.to_hf_json(), path).unwrap(),
            cfg
        );
        let mut bad = cfg.to_hf_json();
        bad["n_head"] = json!(3);
        let e = GptConfig::from_hf_json(&bad, path).unwrap_err().to_string();
        assert!(e.contains("m/config.json") && e.contains("n_head"), "{e}");
        bad["n_head"] = json!("four");
        assert!(GptConfig::from_hf_json(&bad, path)
            .unwrap_err()
            .to_string()
            .contains("`n_head` must be"));
        let mut exact_gelu = cfg.to_hf_json();
        exact_gelu["activation_function"] = json!("gelu");
        assert!(GptConfig::from_hf_json(&exact_gelu, path).is_err());
        assert!(GptConfig::from_hf_json(&json!([1]), path).is_err());
    }
}
