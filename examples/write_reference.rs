//! Writes a random tiny GPT-2 folder with tapelora plus `tapelora_reference.safetensors`
//! (token ids and tapelora's logits for them), for checking that transformers loads the folder
//! and computes the same logits:
//!
//!     cargo run --release --example write_reference -- /tmp/tapelora-ref [--no-bias]
//!     python tools/make_fixtures.py --check-model /tmp/tapelora-ref

use std::collections::HashMap;

use ndarray::{ArrayD, IxDyn};
use rand::{Rng, SeedableRng};
use tapelora::autograd::Tape;
use tapelora_gpt::hf::save_model;
use tapelora_gpt::{Gpt, GptConfig};
use tapelora_nn::{init, stored_to_safetensors_bytes, Ctx, Module, Stored};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = std::path::PathBuf::from(
        args.next()
            .ok_or("usage: write_reference DIR [--no-bias]")?,
    );
    let bias = args.next().as_deref() != Some("--no-bias");
    let config = GptConfig {
        n_layer: 2,
        n_head: 3,
        n_embd: 24,
        n_positions: 16,
        vocab_size: 53,
        n_inner: 40,
        layer_norm_epsilon: 1e-5,
        bias,
        dropout: 0.0,
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let mut model = Gpt::new(config, &mut rng)?;
    // Move every parameter away from its init so that no tensor can be silently ignored.
    model.visit_mut(&mut |p| {
        if p.shape().len() == 1 {
            let base = p.value.clone();
            init::normal_(p, 0.1, &mut rng);
            p.value = (&p.value + &base).into_shared();
        }
    });
    let tokens = ArrayD::from_shape_simple_fn(IxDyn(&[2, 9]), || rng.random_range(0..53usize));
    let tape = Tape::new();
    let logits = tape.no_grad(|| model.forward(&Ctx::eval(&tape), &tokens))?;
    save_model(&model, &dir, |_| Ok(()))?;
    // The reference file: tokens as I64, logits as F32.
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
    println!(
        "wrote {} (bias: {bias}); check with: python tools/make_fixtures.py --check-model {}",
        dir.display(),
        dir.display()
    );
    Ok(())
}
