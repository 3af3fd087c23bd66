//! Parity with transformers (llm.c's `test_gpt2` approach): a tiny random GPT-2 written by
//! `tools/make_fixtures.py` with transformers, and its reference logits, loss and every
//! parameter gradient computed by PyTorch in float64.

use std::path::PathBuf;

use ndarray::ArrayD;
use tapelora_autograd::Tape;
use tapelora_gpt::hf::load_model;
use tapelora_nn::{Ctx, Module, TensorFile};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

/// max |ours − reference| / max |reference|, printed per tensor.
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
        "{name:<48} max|diff| = {max_diff:.3e}   relative = {:.3e}",
        max_diff / scale
    );
    max_diff / scale
}

#[test]
fn logits_loss_and_gradients_match_transformers() {
    let dir = fixture("gpt2-tiny");
    let model = load_model(&dir).expect("fixture loads");
    let reference = TensorFile::open(&dir.join("reference.safetensors")).unwrap();
    let tokens = reference.i64("tokens").unwrap();
    let targets: Vec<i64> = reference.i64("targets").unwrap().iter().copied().collect();
    let ids: ArrayD<usize> = tokens.mapv(|t| t as usize);

    let tape = Tape::new();
    let ctx = Ctx::eval(&tape);
    let logits = model.forward(&ctx, &ids).unwrap();
    let loss = logits.cross_entropy(&targets, Some(-100)).unwrap();
    let mut worst = rel_diff(
        "logits",
        &logits.value().mapv(f64::from),
        &reference.f64("logits").unwrap(),
    );
    assert!(worst <= 1e-5, "logits differ by {worst:e} (relative)");
    let ref_loss = reference
        .f64("loss")
        .unwrap()
        .iter()
        .next()
        .copied()
        .unwrap();
    let loss_rel = (loss.item().unwrap() as f64 - ref_loss).abs() / ref_loss.abs();
    println!(
        "{:<48} ours = {:.7}  reference = {ref_loss:.7}  relative = {loss_rel:.3e}",
        "loss",
        loss.item().unwrap()
    );
    assert!(loss_rel <= 1e-5);

    let grads = tape.backward(&loss).unwrap();
    worst = 0.0;
    let mut checked = 0;
    for p in model.parameters() {
        let ours = grads
            .get_by_name(&p.name)
            .unwrap_or_else(|| panic!("no gradient for {}", p.name));
        let reference = reference
            .f64(&format!("grad.transformer.{}", p.name))
            .unwrap();
        worst = worst.max(rel_diff(
            &format!("grad {}", p.name),
            &ours.mapv(f64::from),
            &reference,
        ));
        checked += 1;
    }
    assert_eq!(checked, 28);
    assert!(worst <= 1e-4, "a gradient differs by {worst:e} (relative)");
    drop(tape);
}
