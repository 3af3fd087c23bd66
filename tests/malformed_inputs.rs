//! Bad input, through the CLI: every case exits non-zero with a short error (at most a few
//! lines) naming the file, tensor or option, never panics, and leaves no output folder.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
    }
}

/// The tiny model fixture plus a 67-character vocabulary, so every command can run on it.
fn model_copy(root: &Path, name: &str) -> PathBuf {
    let dir = root.join(name);
    copy_dir(&fixture("gpt2-tiny"), &dir);
    let chars: Vec<String> = (0..67u8)
        .map(|i| ((b'0' + i) as char).to_string())
        .collect();
    std::fs::write(
        dir.join("tokenizer_chars.json"),
        serde_json::json!({"type": "char", "chars": chars}).to_string(),
    )
    .unwrap();
    dir
}

fn edit_json(path: &Path, f: impl FnOnce(&mut Value)) {
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, v.to_string()).unwrap();
}

/// Rewrites a safetensors file's JSON header with `f` (data kept as it is).
fn edit_header(path: &Path, f: impl FnOnce(&mut serde_json::Map<String, Value>)) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Map<String, Value> =
        serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    f(&mut header);
    let mut text = Value::Object(header).to_string().into_bytes();
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend(text);
    out.extend(&bytes[8 + n..]);
    std::fs::write(path, out).unwrap();
}

/// Rewrites a safetensors file through tapelora's own writer after `f` edits its tensors.
fn rewrite_tensors(
    path: &Path,
    f: impl FnOnce(&mut std::collections::BTreeMap<String, tapelora::autograd::ndarray::ArrayD<f32>>),
) {
    let file = tapelora_nn::TensorFile::open(path).unwrap();
    let mut tensors: std::collections::BTreeMap<_, _> = file
        .names()
        .into_iter()
        .map(|n| {
            let t = file.f32(&n).unwrap();
            (n, t)
        })
        .collect();
    f(&mut tensors);
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    tapelora_nn::save_safetensors(
        path,
        tensors.iter().map(|(n, t)| (n.as_str(), t.view())),
        Some(meta),
    )
    .unwrap();
}

struct Case {
    what: &'static str,
    args: Vec<String>,
    mentions: &'static str,
}

#[test]
fn thirty_malformed_inputs_fail_cleanly() {
    let root = std::env::temp_dir().join(format!("tapelora-malformed-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    let s = |p: &Path| p.display().to_string();
    let text = root.join("text.txt");
    let body: String = (0..2000)
        .map(|i| (b'0' + ((i * 7) % 67) as u8) as char)
        .collect();
    std::fs::write(&text, &body).unwrap();
    let out = root.join("out");
    let mut cases: Vec<Case> = Vec::new();
    let eval_case = |what: &'static str, model: &Path, mentions: &'static str| Case {
        what,
        args: vec![
            "eval".into(),
            "--model".into(),
            s(model),
            "--data".into(),
            s(&text),
        ],
        mentions,
    };

    // Model folders.
    cases.push(eval_case("missing folder", &root.join("nope"), "nope"));
    let m = model_copy(&root, "no-config");
    std::fs::remove_file(m.join("config.json")).unwrap();
    cases.push(eval_case("missing config.json", &m, "config.json"));
    let m = model_copy(&root, "no-weights");
    std::fs::remove_file(m.join("model.safetensors")).unwrap();
    cases.push(eval_case(
        "missing model.safetensors",
        &m,
        "model.safetensors",
    ));
    let m = model_copy(&root, "config-not-json");
    std::fs::write(m.join("config.json"), "{ not json").unwrap();
    cases.push(eval_case("config.json not JSON", &m, "config.json"));
    let m = model_copy(&root, "config-wrong-type");
    edit_json(&m.join("config.json"), |v| v["n_layer"] = "two".into());
    cases.push(eval_case("config.json wrong type", &m, "n_layer"));
    let m = model_copy(&root, "config-heads");
    edit_json(&m.join("config.json"), |v| v["n_head"] = 7.into());
    cases.push(eval_case("n_embd not divisible by n_head", &m, "n_head"));
    let m = model_copy(&root, "config-vocab");
    edit_json(&m.join("config.json"), |v| v["vocab_size"] = 68.into());
    cases.push(eval_case("vocab mismatch with tensors", &m, "wte"));
    let m = model_copy(&root, "config-activation");
    edit_json(&m.join("config.json"), |v| {
        v["activation_function"] = "relu".into()
    });
    cases.push(eval_case(
        "unsupported activation",
        &m,
        "activation_function",
    ));
    let m = model_copy(&root, "truncated");
    let bytes = std::fs::read(m.join("model.safetensors")).unwrap();
    std::fs::write(m.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    cases.push(eval_case("truncated weights", &m, "model.safetensors"));
    let m = model_copy(&root, "random-bytes");
    std::fs::write(
        m.join("model.safetensors"),
        (0..5000u32)
            .map(|i| (i.wrapping_mul(2654435761u32) >> 13) as u8)
            .collect::<Vec<_>>(),
    )
    .unwrap();
    cases.push(eval_case("random bytes", &m, "model.safetensors"));
    let m = model_copy(&root, "header-too-big");
    let mut bytes = std::fs::read(m.join("model.safetensors")).unwrap();
    bytes[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    std::fs::write(m.join("model.safetensors"), bytes).unwrap();
    cases.push(eval_case(
        "header claims more than the file holds",
        &m,
        "model.safetensors",
    ));
    let m = model_copy(&root, "wrong-dtype");
    edit_header(&m.join("model.safetensors"), |h| {
        let t = h.get_mut("transformer.ln_f.bias").unwrap();
        t["dtype"] = "I32".into();
    });
    cases.push(eval_case("wrong dtype", &m, "ln_f.bias"));
    let m = model_copy(&root, "missing-tensor");
    rewrite_tensors(&m.join("model.safetensors"), |t| {
        t.remove("transformer.ln_f.bias");
    });
    cases.push(eval_case("missing tensor", &m, "ln_f.bias"));
    let m = model_copy(&root, "extra-tensor");
    rewrite_tensors(&m.join("model.safetensors"), |t| {
        let extra = t["transformer.ln_f.bias"].clone();
        t.insert("transformer.h.9.extra".into(), extra);
    });
    cases.push(eval_case("extra tensor", &m, "h.9.extra"));
    let m = model_copy(&root, "wrong-shape");
    edit_header(&m.join("model.safetensors"), |h| {
        h.get_mut("transformer.h.0.attn.c_proj.weight").unwrap()["shape"] =
            serde_json::json!([15, 60]);
    });
    cases.push(eval_case("wrong shape", &m, "c_proj.weight"));

    // Adapters.
    let base = model_copy(&root, "base");
    let adapter_case = |what: &'static str, dir: &Path, mentions: &'static str| Case {
        what,
        args: vec![
            "eval".into(),
            "--model".into(),
            s(&base),
            "--adapter".into(),
            s(dir),
            "--data".into(),
            s(&text),
        ],
        mentions,
    };
    let a = root.join("a-r0");
    copy_dir(&fixture("gpt2-tiny-lora"), &a);
    edit_json(&a.join("adapter_config.json"), |v| v["r"] = 0.into());
    cases.push(adapter_case(
        "adapter with r = 0",
        &a,
        "adapter_config.json",
    ));
    let a = root.join("a-shape");
    copy_dir(&fixture("gpt2-tiny-lora"), &a);
    edit_header(&a.join("adapter_model.safetensors"), |h| {
        h.get_mut("base_model.model.transformer.h.0.mlp.c_fc.lora_B.weight")
            .unwrap()["shape"] = serde_json::json!([60, 8]);
    });
    cases.push(adapter_case(
        "adapter shapes that do not fit the base",
        &a,
        "c_fc.lora_B",
    ));
    let a = root.join("a-target");
    copy_dir(&fixture("gpt2-tiny-lora"), &a);
    edit_json(&a.join("adapter_config.json"), |v| {
        v["target_modules"] = serde_json::json!(["q_proj", "v_proj"])
    });
    cases.push(adapter_case("targets the base does not have", &a, "q_proj"));
    let a = root.join("a-truncated");
    copy_dir(&fixture("gpt2-tiny-lora"), &a);
    let bytes = std::fs::read(a.join("adapter_model.safetensors")).unwrap();
    std::fs::write(
        a.join("adapter_model.safetensors"),
        &bytes[..bytes.len() - 100],
    )
    .unwrap();
    cases.push(adapter_case(
        "truncated adapter weights",
        &a,
        "adapter_model.safetensors",
    ));
    let a = root.join("a-dora");
    copy_dir(&fixture("gpt2-tiny-lora"), &a);
    edit_json(&a.join("adapter_config.json"), |v| {
        v["use_dora"] = true.into()
    });
    cases.push(adapter_case(
        "a setting tapelora cannot honour (DoRA)",
        &a,
        "DoRA",
    ));

    // Data files.
    let train = |what: &'static str, data: &Path, mentions: &'static str| Case {
        what,
        args: vec![
            "train".into(),
            "--data".into(),
            s(data),
            "--out".into(),
            s(&out),
            "--quiet".into(),
            "--steps".into(),
            "2".into(),
        ],
        mentions,
    };
    let empty = root.join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    cases.push(train("empty data file", &empty, "empty"));
    let short = root.join("short.txt");
    std::fs::write(&short, "to be or not").unwrap();
    cases.push(train("data shorter than one block", &short, "too few"));
    let binary = root.join("binary.txt");
    std::fs::write(&binary, [0x61, 0x62, 0xc3, 0x28]).unwrap();
    cases.push(train("data not UTF-8", &binary, "UTF-8"));
    let unseen = root.join("unseen.txt");
    std::fs::write(
        &unseen,
        "~~~~ characters the model's vocabulary has never seen ~~~~",
    )
    .unwrap();
    cases.push(Case {
        what: "characters a char tokenizer has never seen",
        args: vec![
            "eval".into(),
            "--model".into(),
            s(&base),
            "--data".into(),
            s(&unseen),
        ],
        mentions: "'~'",
    });

    // Options out of range.
    let finetune = |what: &'static str, extra: &[&str], mentions: &'static str| {
        let mut args: Vec<String> = [
            "finetune",
            "--model",
            &s(&base),
            "--data",
            &s(&text),
            "--out",
            &s(&out),
            "--quiet",
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        for (flag, default) in [("--steps", "2"), ("--block", "8")] {
            if !extra.contains(&flag) {
                args.extend([flag.to_string(), default.to_string()]);
            }
        }
        args.extend(extra.iter().map(|a| a.to_string()));
        Case {
            what,
            args,
            mentions,
        }
    };
    cases.push(finetune("rank 0", &["--rank", "0"], "--rank"));
    let nowhere = s(&root.join("no-checkpoint"));
    cases.push(finetune(
        "--resume from a missing folder",
        &["--resume", &nowhere],
        "training_state.safetensors",
    ));
    let base_dir = s(&base);
    cases.push(finetune(
        "--resume from a folder without training state",
        &["--resume", &base_dir],
        "training_state.safetensors",
    ));
    let m = model_copy(&root, "bad-state");
    std::fs::write(
        m.join("training_state.safetensors"),
        b"\x08\0\0\0\0\0\0\0{}",
    )
    .unwrap();
    let bad_state = s(&m);
    cases.push(finetune(
        "--resume with a truncated training state",
        &["--resume", &bad_state],
        "training_state.safetensors",
    ));
    cases.push(finetune(
        "rank above min(d, k)",
        &["--rank", "31"],
        "min(d, k)",
    ));
    cases.push(finetune("alpha ≤ 0", &["--alpha=0"], "--alpha"));
    cases.push(finetune("lr NaN", &["--lr", "NaN"], "--lr"));
    cases.push(finetune("lr negative", &["--lr=-0.1"], "--lr"));
    cases.push(finetune("steps 0", &["--steps", "0"], "--steps"));
    cases.push(finetune(
        "unknown target",
        &["--targets", "q_proj"],
        "c_attn.q",
    ));
    cases.push(finetune(
        "block above the context",
        &["--block", "40"],
        "--block",
    ));
    cases.push(Case {
        what: "unknown preset",
        args: vec![
            "train".into(),
            "--data".into(),
            s(&text),
            "--preset".into(),
            "gpt9".into(),
            "--out".into(),
            s(&out),
        ],
        mentions: "gpt9",
    });

    assert!(cases.len() >= 30, "{} cases", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        let o = Command::new(env!("CARGO_BIN_EXE_tapelora"))
            .args(&case.args)
            .output()
            .expect("runs");
        let stderr = String::from_utf8_lossy(&o.stderr);
        let ok = !o.status.success()
            && stderr.trim_end().lines().count() <= 3
            && stderr.contains(case.mentions)
            && !stderr.contains("panicked")
            && !out.exists();
        if !ok {
            failures.push(format!(
                "{}: exit {:?}, stderr: {}",
                case.what,
                o.status.code(),
                stderr.trim_end()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases misbehaved:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    std::fs::remove_dir_all(&root).unwrap();
}
