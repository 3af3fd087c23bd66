//! Loaders never panic: random byte mutations of valid model, adapter, config and tokenizer
//! files must give `Ok` or a typed error — never a panic, never an abort.

use std::path::{Path, PathBuf};

use proptest::prelude::*;
use tapelora::autograd::ndarray::{ArrayD, IxDyn};
use tapelora_gpt::hf::load_model;
use tapelora_lora::peft::{inspect_adapter, load_adapter};
use tapelora_lora::LoraModel;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// Applies `edits` (position fraction, new byte) and an optional truncation to `bytes`.
fn mutate(mut bytes: Vec<u8>, edits: &[(f64, u8)], truncate: Option<f64>) -> Vec<u8> {
    for &(at, value) in edits {
        if !bytes.is_empty() {
            let i = ((bytes.len() - 1) as f64 * at) as usize;
            bytes[i] = value;
        }
    }
    if let Some(frac) = truncate {
        bytes.truncate((bytes.len() as f64 * frac) as usize);
    }
    bytes
}

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tapelora-mutate-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn copy_dir(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
    }
}

/// Edits concentrated in the first bytes (the safetensors header length and JSON header) plus
/// anywhere in the file.
fn edits() -> impl Strategy<Value = Vec<(f64, u8)>> {
    prop::collection::vec((prop_oneof![0.0f64..0.02, 0.0f64..1.0], any::<u8>()), 1..6)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn mutated_model_weights_never_panic(e in edits(), truncate in prop::option::of(0.0f64..1.0)) {
        let dir = scratch("weights");
        copy_dir(&fixture("gpt2-tiny"), &dir);
        let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
        std::fs::write(dir.join("model.safetensors"), mutate(bytes, &e, truncate)).unwrap();
        if let Ok(model) = load_model(&dir) {
            // Whatever loads must also run.
            let tape = tapelora::autograd::Tape::new();
            let ids = ArrayD::from_shape_vec(IxDyn(&[1, 3]), vec![1, 2, 3]).unwrap();
            let _ = tape.no_grad(|| model.forward(&tapelora_nn::Ctx::eval(&tape), &ids));
        }
    }

    #[test]
    fn mutated_configs_never_panic(e in edits(), truncate in prop::option::of(0.0f64..1.0)) {
        let dir = scratch("config");
        copy_dir(&fixture("gpt2-tiny"), &dir);
        let bytes = std::fs::read(dir.join("config.json")).unwrap();
        std::fs::write(dir.join("config.json"), mutate(bytes, &e, truncate)).unwrap();
        let _ = load_model(&dir);
    }

    #[test]
    fn mutated_adapters_never_panic(e in edits(), truncate in prop::option::of(0.0f64..1.0), which in 0usize..2) {
        let dir = scratch("adapter");
        copy_dir(&fixture("gpt2-tiny-lora"), &dir);
        let file = ["adapter_model.safetensors", "adapter_config.json"][which];
        let bytes = std::fs::read(dir.join(file)).unwrap();
        std::fs::write(dir.join(file), mutate(bytes, &e, truncate)).unwrap();
        let mut lm = LoraModel::new(load_model(&fixture("gpt2-tiny")).unwrap());
        let _ = load_adapter(&mut lm, "x", &dir);
        let _ = inspect_adapter(&dir);
    }

    #[test]
    fn mutated_char_vocabularies_never_panic(e in edits(), truncate in prop::option::of(0.0f64..1.0)) {
        let dir = scratch("chars");
        let tok = tapelora_gpt::tokenizer::Tokenizer::char_from_text("hello world, this is text.").unwrap();
        tok.save(&dir).unwrap();
        let path = dir.join("tokenizer_chars.json");
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, mutate(bytes, &e, truncate)).unwrap();
        if let Ok(t) = tapelora_gpt::tokenizer::Tokenizer::from_model_dir(&dir, tok.vocab_size()) {
            let _ = t.encode("hello");
            let _ = t.decode(&[0, 1, 2]);
        }
    }
}
