//! Adapters written by PEFT load in tapelora with PEFT's outputs and gradients; tapelora's
//! adapters written back out in PEFT's format reload to the same outputs. Fixtures come from
//! `tools/make_fixtures.py` (PEFT on a tiny random GPT-2, references in float64).

use std::path::PathBuf;

use ndarray::ArrayD;
use tapelora_autograd::Tape;
use tapelora_gpt::hf::load_model;
use tapelora_lora::peft::{load_adapter, save_adapter};
use tapelora_lora::LoraModel;
use tapelora_nn::{Ctx, TensorFile};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

fn rel_diff(name: &str, ours: &ArrayD<f64>, reference: &ArrayD<f64>) -> f64 {
    assert_eq!(ours.shape(), reference.shape(), "{name}: shape");
    let max_diff = ours
        .iter()
        .zip(reference)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    let scale = reference
        .iter()
        .map(|v| v.abs())
        .fold(0.0, f64::max)
        .max(1e-30);
    println!(
        "{name:<60} max|diff| = {max_diff:.3e}   relative = {:.3e}",
        max_diff / scale
    );
    max_diff / scale
}

fn lora_model_with(adapter: &str) -> LoraModel {
    lora_model_from(&fixture(adapter))
}

/// The tiny base with the adapter folder `dir` loaded as "default".
fn lora_model_from(dir: &std::path::Path) -> LoraModel {
    let mut lm = LoraModel::new(load_model(&fixture("gpt2-tiny")).unwrap());
    load_adapter(&mut lm, "default", dir).unwrap();
    lm
}

fn logits_and_loss(lm: &LoraModel, reference: &TensorFile) -> (ArrayD<f64>, f64) {
    let tokens = reference.i64("tokens").unwrap().mapv(|t| t as usize);
    let targets: Vec<i64> = reference.i64("targets").unwrap().iter().copied().collect();
    let tape = Tape::new();
    tape.no_grad(|| {
        let logits = lm.model.forward(&Ctx::eval(&tape), &tokens).unwrap();
        let loss = logits
            .cross_entropy(&targets, Some(-100))
            .unwrap()
            .item()
            .unwrap() as f64;
        (logits.value().mapv(f64::from), loss)
    })
}

#[test]
fn peft_adapter_gives_peft_logits_loss_and_gradients() {
    let lm = lora_model_with("gpt2-tiny-lora");
    assert_eq!(lm.lora_layers().len(), 8);
    let reference = TensorFile::open(&fixture("gpt2-tiny-lora/reference.safetensors")).unwrap();
    let tokens = reference.i64("tokens").unwrap().mapv(|t| t as usize);
    let targets: Vec<i64> = reference.i64("targets").unwrap().iter().copied().collect();
    let tape = Tape::new();
    let logits = lm.model.forward(&Ctx::eval(&tape), &tokens).unwrap();
    let loss = logits.cross_entropy(&targets, Some(-100)).unwrap();
    assert!(
        rel_diff(
            "logits",
            &logits.value().mapv(f64::from),
            &reference.f64("logits").unwrap()
        ) <= 1e-5
    );
    let ref_loss = reference
        .f64("loss")
        .unwrap()
        .iter()
        .next()
        .copied()
        .unwrap();
    assert!((loss.item().unwrap() as f64 - ref_loss).abs() / ref_loss <= 1e-5);
    let grads = tape.backward(&loss).unwrap();
    let mut checked = 0;
    for key in reference.names().iter().filter(|k| k.starts_with("grad.")) {
        let module = key.trim_start_matches("grad.base_model.model.transformer.");
        let ours_name = module
            .replace(".lora_A.weight", ".lora_A.default.weight")
            .replace(".lora_B.weight", ".lora_B.default.weight");
        let ours = grads
            .get_by_name(&ours_name)
            .unwrap_or_else(|| panic!("no gradient for {ours_name}"));
        assert!(rel_diff(key, &ours.mapv(f64::from), &reference.f64(key).unwrap()) <= 1e-4);
        checked += 1;
    }
    assert_eq!(checked, 16);
    // Only adapter weights get gradients: the base is frozen.
    assert_eq!(grads.len(), 16);
}

/// PEFT's `target_modules="all-linear"` (a string, as a user writes it in a config) names the
/// same modules as the fixture's `["c_attn", "c_fc", "c_proj"]`, so it loads to PEFT's logits.
#[test]
fn all_linear_shorthand_loads_the_same_adapter() {
    let dir = std::env::temp_dir().join(format!("tapelora-all-linear-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(fixture("gpt2-tiny-lora")).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
    }
    let config_path = dir.join("adapter_config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    assert_eq!(
        config["target_modules"],
        serde_json::json!(["c_attn", "c_fc", "c_proj"])
    );
    config["target_modules"] = "all-linear".into();
    std::fs::write(&config_path, config.to_string()).unwrap();
    let lm = lora_model_from(&dir);
    assert_eq!(lm.lora_layers().len(), 8);
    let reference = TensorFile::open(&fixture("gpt2-tiny-lora/reference.safetensors")).unwrap();
    let (logits, _) = logits_and_loss(&lm, &reference);
    assert!(
        rel_diff(
            "logits (all-linear)",
            &logits,
            &reference.f64("logits").unwrap()
        ) <= 1e-5
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn rslora_and_layers_to_transform_fixture() {
    let lm = lora_model_with("gpt2-tiny-lora-rslora");
    let layers = lm.lora_layers();
    assert_eq!(layers.len(), 1);
    assert_eq!(layers[0].module, "h.1.attn.c_attn");
    let reference =
        TensorFile::open(&fixture("gpt2-tiny-lora-rslora/reference.safetensors")).unwrap();
    let (logits, loss) = logits_and_loss(&lm, &reference);
    assert!(rel_diff("rslora logits", &logits, &reference.f64("logits").unwrap()) <= 1e-5);
    let ref_loss = reference
        .f64("loss")
        .unwrap()
        .iter()
        .next()
        .copied()
        .unwrap();
    assert!((loss - ref_loss).abs() / ref_loss <= 1e-5);
}

#[test]
fn merged_logits_match_peft_merge_and_unload() {
    let lm = lora_model_with("gpt2-tiny-lora");
    let reference = TensorFile::open(&fixture("gpt2-tiny-lora/reference.safetensors")).unwrap();
    let merged = LoraModel::new(lm.merge_and_unload().unwrap());
    let (logits, _) = logits_and_loss(&merged, &reference);
    assert!(
        rel_diff(
            "merged logits",
            &logits,
            &reference.f64("merged_logits").unwrap()
        ) <= 1e-5
    );
}

#[test]
fn saved_adapters_reload_with_the_same_outputs() {
    let lm = lora_model_with("gpt2-tiny-lora");
    let reference = TensorFile::open(&fixture("gpt2-tiny-lora/reference.safetensors")).unwrap();
    let dir = std::env::temp_dir().join(format!("tapelora-peft-roundtrip-{}", std::process::id()));
    save_adapter(&lm, "default", &dir, "gpt2-tiny").unwrap();
    let mut again = LoraModel::new(load_model(&fixture("gpt2-tiny")).unwrap());
    load_adapter(&mut again, "default", &dir).unwrap();
    let (a, _) = logits_and_loss(&lm, &reference);
    let (b, _) = logits_and_loss(&again, &reference);
    assert_eq!(a, b, "a saved adapter reloads bit for bit");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The reverse direction: an adapter written by tapelora (q and v slices of c_attn, exported
/// as a zero-padded rank-6 c_attn adapter, plus c_fc at rank 2 via rank_pattern) was loaded by
/// PEFT, whose logits `tools/make_fixtures.py --peft-logits` stored. tapelora's own logits from
/// before the export are in `tapelora_reference.safetensors`.
#[test]
fn peft_reads_tapelora_adapters_exactly_as_tapelora_does() {
    let dir = fixture("tapelora-qv-adapter");
    let lm = lora_model_with("tapelora-qv-adapter");
    let peft = TensorFile::open(&dir.join("peft_reference.safetensors")).unwrap();
    let ours_before_export = TensorFile::open(&dir.join("tapelora_reference.safetensors")).unwrap();
    let tokens = peft.i64("tokens").unwrap().mapv(|t| t as usize);
    let tape = Tape::new();
    let logits = tape.no_grad(|| {
        lm.model
            .forward(&Ctx::eval(&tape), &tokens)
            .unwrap()
            .value()
            .mapv(f64::from)
    });
    assert!(
        rel_diff(
            "tapelora (reloaded) vs PEFT",
            &logits,
            &peft.f64("logits").unwrap()
        ) <= 1e-5
    );
    assert!(
        rel_diff(
            "tapelora (q/v slices, before export) vs PEFT",
            &ours_before_export.f64("logits").unwrap(),
            &peft.f64("logits").unwrap()
        ) <= 1e-5
    );
}
