//! Writes a tapelora adapter on the committed tiny GPT-2 fixture — LoRA on the q and v slices
//! of c_attn (exported to PEFT as a zero-padded rank-2r c_attn adapter) plus c_fc at another
//! rank (exported with rank_pattern) — and `tapelora_reference.safetensors` with tapelora's
//! logits, for checking that PEFT loads it to the same outputs:
//!
//!     cargo run --release --example write_adapter_reference -- tests/fixtures/tapelora-qv-adapter
//!     python tools/make_fixtures.py --check-adapter tests/fixtures/gpt2-tiny tests/fixtures/tapelora-qv-adapter
//!     python tools/make_fixtures.py --peft-logits tests/fixtures/gpt2-tiny tests/fixtures/tapelora-qv-adapter

use std::collections::HashMap;
use std::path::PathBuf;

use ndarray::{ArrayD, IxDyn};
use rand::{Rng, SeedableRng};
use tapelora::autograd::Tape;
use tapelora_gpt::hf::load_model;
use tapelora_lora::peft::save_adapter;
use tapelora_lora::{LoraConfig, LoraModel};
use tapelora_nn::{stored_to_safetensors_bytes, Ctx, Stored};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = PathBuf::from(
        std::env::args()
            .nth(1)
            .ok_or("usage: write_adapter_reference DIR")?,
    );
    let base = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gpt2-tiny");
    let mut lm = LoraModel::new(load_model(&base)?);
    let config = LoraConfig {
        random_b: true,
        rank_pattern: vec![("mlp.c_fc".into(), 2)],
        alpha_pattern: vec![("mlp.c_fc".into(), 5.0)],
        ..LoraConfig::new(3, 7.0, &["c_attn.q", "c_attn.v", "c_fc"])
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    lm.add_adapter("default", &config, &mut rng)?;
    let tokens = ArrayD::from_shape_simple_fn(IxDyn(&[2, 7]), || rng.random_range(0..67usize));
    let tape = Tape::new();
    let logits = tape.no_grad(|| lm.model.forward(&Ctx::eval(&tape), &tokens))?;
    save_adapter(&lm, "default", &dir, "gpt2-tiny")?;
    let ids = tokens.mapv(|t| t as i64);
    let stored = [
        ("tokens", Stored::I64(ids.view())),
        ("logits", Stored::F32(logits.value().view())),
    ];
    let bytes = stored_to_safetensors_bytes(
        stored,
        Some(HashMap::from([("format".into(), "pt".into())])),
    )?;
    std::fs::write(dir.join("tapelora_reference.safetensors"), bytes)?;
    println!("wrote {}", dir.display());
    Ok(())
}
