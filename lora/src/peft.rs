//! PEFT adapter folders, both ways: `adapter_config.json` + `adapter_model.safetensors` with
//! PEFT's keys (`base_model.model.transformer.h.0.attn.c_attn.lora_A.weight` `[r, in]`,
//! `….lora_B.weight` `[out, r]`).
//!
//! q/k/v-slice adapters have no PEFT counterpart; they are exported exactly as a c_attn
//! adapter of rank k·r (k slices): A stacks the slices' A's, B places each slice's B in its
//! rows and columns with zeros elsewhere, and α is chosen so the scale s is unchanged. PEFT then
//! computes the same ΔW; read back, it is a (zero-padded) full c_attn adapter.
//!
//! Reading accepts PEFT's extra config keys; settings tapelora cannot honour (DoRA,
//! `modules_to_save`, LoRA biases, regex targets, other layer patterns) are errors.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use ndarray::{s, Array2, ArrayD};
use rand::SeedableRng;
use serde_json::{json, Map, Value};
use tapelora_nn::{save_safetensors, write_atomic, Module, TensorFile};

use crate::config::{LoraBias, LoraConfig};
use crate::error::{LoraError, Result};
use crate::layer::LoraPart;
use crate::model::LoraModel;
use crate::target::ModuleKind;

pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
const KEY_PREFIX: &str = "base_model.model.transformer.";

fn format_err(path: &Path, msg: impl Into<String>) -> LoraError {
    LoraError::Format {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// One module's adapter in PEFT's form: A `[r, in]`, B `[out, r]`, rank and α.
struct Exported {
    module: String,
    a: Array2<f32>,
    b: Array2<f32>,
    alpha: f64,
}

fn to2(p: &tapelora_nn::Parameter) -> Array2<f32> {
    p.value
        .view()
        .into_dimensionality()
        .expect("2-D")
        .to_owned()
}

/// Folds one layer's parts into a single full-module (A, B, α) with the same ΔW.
fn export_module(
    module: &str,
    out_features: usize,
    parts: &[LoraPart],
    use_rslora: bool,
) -> Exported {
    if parts.len() == 1 && parts[0].slice.label.is_none() {
        return Exported {
            module: module.into(),
            a: to2(&parts[0].a),
            b: to2(&parts[0].b),
            alpha: parts[0].alpha,
        };
    }
    let r: usize = parts.iter().map(|p| p.r).sum();
    let d_in = parts[0].a.shape()[1];
    let mut a = Array2::<f32>::zeros((r, d_in));
    let mut b = Array2::<f32>::zeros((out_features, r));
    let mut row = 0;
    for p in parts {
        a.slice_mut(s![row..row + p.r, ..]).assign(&to2(&p.a));
        b.slice_mut(s![
            p.slice.start..p.slice.start + p.slice.len,
            row..row + p.r
        ])
        .assign(&to2(&p.b));
        row += p.r;
    }
    // Keep s: α' = s·r' (or s·√r' with rsLoRA). All parts share one scale.
    let s = parts[0].scaling();
    let alpha = if use_rslora {
        s * (r as f64).sqrt()
    } else {
        s * r as f64
    };
    Exported {
        module: module.into(),
        a,
        b,
        alpha,
    }
}

/// PEFT's keys for a module's A and B (`lora_embedding_A` / `_B`, without `.weight`, on the
/// embedding).
fn peft_keys(module: &str) -> (String, String) {
    if module == "wte" {
        (
            format!("{KEY_PREFIX}wte.lora_embedding_A"),
            format!("{KEY_PREFIX}wte.lora_embedding_B"),
        )
    } else {
        (
            format!("{KEY_PREFIX}{module}.lora_A.weight"),
            format!("{KEY_PREFIX}{module}.lora_B.weight"),
        )
    }
}

/// Writes adapter `name` as a PEFT folder into `dir` (atomically: a temporary folder renamed).
pub fn save_adapter(lm: &LoraModel, name: &str, dir: &Path, base_model_name: &str) -> Result<()> {
    let config = lm
        .configs
        .get(name)
        .ok_or_else(|| LoraError::Adapter(format!("no adapter named `{name}`")))?;
    save_adapter_with(&lm.model, config, name, dir, base_model_name, |_| Ok(()))
}

/// [`save_adapter`] from a model holding adapter `name` (made with `config`), with `extra`
/// adding files to the folder before it replaces `dir` (a training checkpoint's state).
pub fn save_adapter_with(
    model: &tapelora_gpt::Gpt,
    config: &LoraConfig,
    name: &str,
    dir: &Path,
    base_model_name: &str,
    extra: impl FnOnce(&Path) -> tapelora_gpt::Result<()>,
) -> Result<()> {
    let mut exported = Vec::new();
    for layer in crate::model::lora_layers_of(model) {
        if let Some(adapter) = layer.adapters.get(name) {
            exported.push(export_module(
                &layer.module,
                layer.out_features,
                &adapter.parts,
                config.use_rslora,
            ));
        }
    }
    let Some(first) = exported.first() else {
        return Err(LoraError::Adapter(format!(
            "adapter `{name}` adapts no module"
        )));
    };
    let (r, alpha) = (first.a.nrows(), first.alpha);
    let mut rank_pattern = Map::new();
    let mut alpha_pattern = Map::new();
    for e in &exported {
        if e.a.nrows() != r {
            rank_pattern.insert(e.module.clone(), json!(e.a.nrows()));
        }
        if (e.alpha - alpha).abs() > 1e-12 * alpha.abs() {
            alpha_pattern.insert(e.module.clone(), json!(e.alpha));
        }
    }
    // Target names: a module kind adapted in every block is named by its suffix, otherwise
    // each module by its full path.
    let n_layer = model.config.n_layer;
    let mut targets: Vec<String> = Vec::new();
    if exported.iter().any(|e| e.module == "wte") {
        targets.push("wte".into());
    }
    for (suffix, kind) in [
        ("attn.c_attn", ModuleKind::CAttn),
        ("attn.c_proj", ModuleKind::AttnCProj),
        ("mlp.c_fc", ModuleKind::CFc),
        ("mlp.c_proj", ModuleKind::MlpCProj),
    ] {
        let layers: Vec<usize> = (0..n_layer)
            .filter(|&l| exported.iter().any(|e| e.module == kind.path(l)))
            .collect();
        if layers.len() == n_layer {
            targets.push(suffix.into());
        } else {
            targets.extend(layers.iter().map(|&l| kind.path(l)));
        }
    }
    let config_json = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name,
        "r": r,
        "lora_alpha": alpha,
        "target_modules": targets,
        "lora_dropout": config.lora_dropout,
        "bias": config.bias.as_str(),
        "fan_in_fan_out": true,
        "use_rslora": config.use_rslora,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "init_lora_weights": true,
        "inference_mode": true,
        "modules_to_save": null,
        "layers_to_transform": null,
        "layers_pattern": null,
        "use_dora": false,
        "lora_bias": false,
    });
    let mut tensors: Vec<(String, ArrayD<f32>)> = Vec::new();
    for e in exported {
        let (a_key, b_key) = peft_keys(&e.module);
        tensors.push((a_key, e.a.into_dyn()));
        tensors.push((b_key, e.b.into_dyn()));
    }
    if config.bias != LoraBias::None {
        for p in model.parameters() {
            if p.trainable && p.name.ends_with(".bias") && !p.name.contains(".lora_") {
                tensors.push((format!("{KEY_PREFIX}{}", p.name), p.value.to_owned()));
            }
        }
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    tapelora_gpt::hf::write_dir_atomic(dir, |tmp| {
        write_atomic(
            &tmp.join(ADAPTER_CONFIG),
            serde_json::to_string_pretty(&config_json)
                .expect("JSON")
                .as_bytes(),
        )?;
        let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
        save_safetensors(
            &tmp.join(ADAPTER_WEIGHTS),
            tensors.iter().map(|(n, t)| (n.as_str(), t.view())),
            Some(metadata),
        )?;
        extra(tmp)
    })?;
    Ok(())
}

/// Reads `adapter_config.json` into a [`LoraConfig`].
pub fn read_adapter_config(dir: &Path) -> Result<LoraConfig> {
    tapelora_gpt::hf::recover_dir(dir);
    if !dir.is_dir() {
        return Err(format_err(
            dir,
            "not a folder (expected a PEFT adapter folder with adapter_config.json)",
        ));
    }
    let path = dir.join(ADAPTER_CONFIG);
    let text = std::fs::read_to_string(&path).map_err(|e| format_err(&path, e.to_string()))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| format_err(&path, format!("not valid JSON: {e}")))?;
    let obj = v
        .as_object()
        .ok_or_else(|| format_err(&path, "expected a JSON object"))?;
    let field = |k: &str| obj.get(k).filter(|v| !v.is_null());
    let err = |msg: String| format_err(&path, msg);
    match field("peft_type").and_then(Value::as_str) {
        Some("LORA") => {}
        other => return Err(err(format!("peft_type is {other:?}, expected \"LORA\""))),
    }
    let r = field("r")
        .and_then(Value::as_u64)
        .ok_or_else(|| err("field `r` must be a positive integer".into()))? as usize;
    let lora_alpha = field("lora_alpha")
        .and_then(Value::as_f64)
        .ok_or_else(|| err("field `lora_alpha` must be a number".into()))?;
    let target_modules: Vec<String> = match field("target_modules") {
        Some(Value::Array(list)) => list.iter().map(|t| t.as_str().map(String::from).ok_or_else(|| err(format!("target_modules entry {t} is not a string")))).collect::<Result<_>>()?,
        Some(Value::String(s)) if s == crate::target::ALL_LINEAR || s.chars().all(|c| c.is_alphanumeric() || c == '_' || c == '.') => vec![s.clone()],
        Some(other) => return Err(err(format!("target_modules {other} is not supported (give a list of module names or \"all-linear\"; regular expressions are not supported)"))),
        None => return Err(err("missing field `target_modules`".into())),
    };
    for (k, why) in [
        ("use_dora", "DoRA"),
        ("lora_bias", "LoRA biases (lora_bias)"),
    ] {
        if field(k).and_then(Value::as_bool) == Some(true) {
            return Err(err(format!("{why} is not supported")));
        }
    }
    if let Some(m) = field("modules_to_save") {
        if m.as_array().is_none_or(|a| !a.is_empty()) {
            return Err(err(format!("modules_to_save {m} is not supported")));
        }
    }
    if let Some(p) = field("layers_pattern") {
        let ok = p.as_str() == Some("h")
            || p.as_array()
                .is_some_and(|a| a.iter().all(|x| x.as_str() == Some("h")));
        if !ok {
            return Err(err(format!(
                "layers_pattern {p} is not supported (GPT-2's blocks are `h`)"
            )));
        }
    }
    let layers_to_transform = match field("layers_to_transform") {
        None => None,
        Some(Value::Number(n)) => Some(vec![n
            .as_u64()
            .ok_or_else(|| err("layers_to_transform must be ≥ 0".into()))?
            as usize]),
        Some(Value::Array(list)) => Some(
            list.iter()
                .map(|x| {
                    x.as_u64().map(|n| n as usize).ok_or_else(|| {
                        err(format!("layers_to_transform entry {x} is not an index"))
                    })
                })
                .collect::<Result<_>>()?,
        ),
        Some(other) => {
            return Err(err(format!(
                "layers_to_transform {other} is not an index or a list"
            )))
        }
    };
    let pattern = |key: &str| -> Result<Vec<(String, f64)>> {
        match field(key) {
            None => Ok(Vec::new()),
            Some(Value::Object(m)) => m
                .iter()
                .map(|(k, v)| {
                    v.as_f64()
                        .map(|x| (k.clone(), x))
                        .ok_or_else(|| err(format!("{key}[{k}] is not a number")))
                })
                .collect(),
            Some(other) => Err(err(format!("{key} {other} is not an object"))),
        }
    };
    let config = LoraConfig {
        r,
        lora_alpha,
        use_rslora: field("use_rslora")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        lora_dropout: field("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0),
        target_modules,
        layers_to_transform,
        bias: LoraBias::parse(field("bias").and_then(Value::as_str).unwrap_or("none"))
            .map_err(|e| err(e.to_string()))?,
        rank_pattern: pattern("rank_pattern")?
            .into_iter()
            .map(|(k, v)| (k, v as usize))
            .collect(),
        alpha_pattern: pattern("alpha_pattern")?,
        ..LoraConfig::default()
    };
    config.validate().map_err(|e| err(e.to_string()))?;
    Ok(config)
}

/// Loads the PEFT adapter in `dir` into `lm` under `name` (and makes it active).
pub fn load_adapter(lm: &mut LoraModel, name: &str, dir: &Path) -> Result<()> {
    let mut config = read_adapter_config(dir)?;
    let path = dir.join(ADAPTER_WEIGHTS);
    let file = TensorFile::open(&path)?;
    // Ranks come from the tensors themselves (A is [r, in]); a module whose rank differs from
    // the global r gets an exact rank_pattern entry.
    let mut lora_tensors: BTreeMap<String, (String, String)> = BTreeMap::new();
    let mut biases: Vec<(String, String)> = Vec::new();
    for key in file.names() {
        let short = key.strip_prefix("base_model.model.").unwrap_or(&key);
        let short = short
            .strip_prefix("transformer.")
            .unwrap_or(short)
            .to_string();
        if let Some(module) = short
            .strip_suffix(".lora_A.weight")
            .or_else(|| short.strip_suffix(".lora_embedding_A"))
        {
            lora_tensors.entry(module.to_string()).or_default().0 = key.clone();
        } else if let Some(module) = short
            .strip_suffix(".lora_B.weight")
            .or_else(|| short.strip_suffix(".lora_embedding_B"))
        {
            lora_tensors.entry(module.to_string()).or_default().1 = key.clone();
        } else if short.ends_with(".bias") && config.bias != LoraBias::None {
            biases.push((short, key.clone()));
        } else {
            return Err(format_err(&path, format!("unexpected tensor `{key}` (expected PEFT LoRA keys such as base_model.model.transformer.h.0.attn.c_attn.lora_A.weight)")));
        }
    }
    for (module, (a_key, b_key)) in &lora_tensors {
        if a_key.is_empty() || b_key.is_empty() {
            return Err(format_err(
                &path,
                format!("`{module}` has only one of lora_A / lora_B"),
            ));
        }
        let (_, a_shape) = file.info(a_key).expect("listed");
        if a_shape.len() != 2 {
            return Err(format_err(
                &path,
                format!("tensor `{a_key}` has shape {a_shape:?}, expected [r, in]"),
            ));
        }
        if a_shape[0] != config.r {
            config.rank_pattern.insert(0, (module.clone(), a_shape[0]));
        }
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    lm.add_adapter(name, &config, &mut rng)
        .map_err(|e| format_err(&dir.join(ADAPTER_CONFIG), e.to_string()))?;
    let fill = |lm: &mut LoraModel| -> Result<()> {
        let mut expected: Vec<String> = Vec::new();
        let mut assignments: Vec<(String, ArrayD<f32>)> = Vec::new();
        for layer in lm.lora_layers() {
            let Some(adapter) = layer.adapters.get(name) else {
                continue;
            };
            expected.push(layer.module.clone());
            let (a_key, b_key) = lora_tensors.get(&layer.module).ok_or_else(|| {
                format_err(
                    &path,
                    format!(
                        "no weights for `{}` (lora_A / lora_B missing)",
                        layer.module
                    ),
                )
            })?;
            let part = &adapter.parts[0];
            for (key, param) in [(a_key, &part.a), (b_key, &part.b)] {
                let t = file.f32(key)?;
                if t.shape() != param.shape() {
                    return Err(format_err(
                        &path,
                        format!(
                            "tensor `{key}` has shape {:?}, expected {:?} for the base model",
                            t.shape(),
                            param.shape()
                        ),
                    ));
                }
                if t.iter().any(|v| !v.is_finite()) {
                    return Err(format_err(
                        &path,
                        format!("tensor `{key}` holds NaN or infinite values"),
                    ));
                }
                assignments.push((param.name.clone(), t));
            }
        }
        if let Some(extra) = lora_tensors.keys().find(|m| !expected.contains(m)) {
            return Err(format_err(&path, format!("weights for `{extra}`, which the config's target_modules do not adapt in this base model")));
        }
        let mut by_name: BTreeMap<String, ArrayD<f32>> = assignments.into_iter().collect();
        for (short, key) in &biases {
            by_name.insert(short.clone(), file.f32(key)?);
        }
        let mut missing_bias = None;
        lm.model.visit_mut(&mut |p| {
            if let Some(t) = by_name.remove(&p.name) {
                if t.shape() == p.shape() {
                    p.value = t.into_shared();
                } else {
                    missing_bias = Some(p.name.clone());
                }
            }
        });
        if let Some(bad) = missing_bias.or_else(|| by_name.keys().next().cloned()) {
            return Err(format_err(
                &path,
                format!("tensor for `{bad}` does not fit the base model"),
            ));
        }
        Ok(())
    };
    if let Err(e) = fill(lm) {
        let _ = lm.delete_adapter(name);
        return Err(e);
    }
    Ok(())
}

/// What `tapelora inspect` reports for an adapter folder, computed from its files alone.
#[derive(Clone, Debug)]
pub struct AdapterReport {
    pub trainable_params: usize,
    pub config: LoraConfig,
    pub modules: Vec<crate::analysis::ModuleReport>,
}

/// Reads a PEFT adapter folder and computes, per module, ΔW = s·B·A, its Frobenius norm,
/// numerical rank and singular values (no base model needed).
pub fn inspect_adapter(dir: &Path) -> Result<AdapterReport> {
    use crate::analysis::{frobenius, numerical_rank, singular_values};
    use crate::target::{matches, normalize};
    let config = read_adapter_config(dir)?;
    let path = dir.join(ADAPTER_WEIGHTS);
    let file = TensorFile::open(&path)?;
    let mut trainable_params = 0;
    let mut modules = Vec::new();
    for key in file.names() {
        let (a_key_stem, b_key) = match (
            key.strip_suffix(".lora_A.weight"),
            key.strip_suffix(".lora_embedding_A"),
        ) {
            (Some(stem), _) => (stem, format!("{stem}.lora_B.weight")),
            (None, Some(stem)) => (stem, format!("{stem}.lora_embedding_B")),
            _ => continue,
        };
        let a = file.f64(&key)?;
        let b = file
            .f64(&b_key)
            .map_err(|_| format_err(&path, format!("`{key}` has no matching `{b_key}`")))?;
        let (a, b) = match (
            a.into_dimensionality::<ndarray::Ix2>(),
            b.into_dimensionality::<ndarray::Ix2>(),
        ) {
            (Ok(a), Ok(b)) if a.nrows() == b.ncols() => (a, b),
            _ => {
                return Err(format_err(
                    &path,
                    format!("`{key}` and `{b_key}` are not [r, in] and [out, r]"),
                ))
            }
        };
        let module = a_key_stem
            .strip_prefix("base_model.model.")
            .unwrap_or(a_key_stem);
        let module = module
            .strip_prefix("transformer.")
            .unwrap_or(module)
            .to_string();
        let r = a.nrows();
        let alpha = config
            .alpha_pattern
            .iter()
            .find(|(k, _)| matches(normalize(k), &module))
            .map_or(config.lora_alpha, |(_, v)| *v);
        let delta = b.dot(&a) * crate::config::scaling(alpha, r, config.use_rslora);
        let sv = singular_values(&delta);
        trainable_params += a.len() + b.len();
        modules.push(crate::analysis::ModuleReport {
            name: module,
            r,
            rank: numerical_rank(&sv),
            delta_fro_norm: frobenius(&delta),
            singular_values: sv.into_iter().take(r).collect(),
        });
    }
    if modules.is_empty() {
        return Err(format_err(&path, "holds no lora_A / lora_B tensors"));
    }
    Ok(AdapterReport {
        trainable_params,
        config,
        modules,
    })
}
