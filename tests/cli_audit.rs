//! The audit tools: --trace records, frozen checksums (unchanged under LoRA, changed under
//! --full), --trace-tape, and the graph command on a transformers-written model folder.

use std::path::PathBuf;
use std::process::{Command, Output};

fn tapelora(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tapelora"))
        .args(args)
        .output()
        .expect("runs")
}

fn ok(out: Output) -> Output {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn fixture() -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/gpt2-tiny")
        .display()
        .to_string()
}

fn records(path: &PathBuf) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn trace_graph_and_tape_printout() {
    let dir = std::env::temp_dir().join(format!("tapelora-audit-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let s = |p: PathBuf| p.display().to_string();
    // The fixture's vocabulary has 67 tokens and no tokenizer files: write a char tokenizer
    // of 67 characters next to a copy of it.
    let model = dir.join("model");
    std::fs::create_dir_all(&model).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(PathBuf::from(fixture()).join(f), model.join(f)).unwrap();
    }
    let chars: Vec<String> = (0..67u8)
        .map(|i| ((b'0' + i) as char).to_string())
        .collect();
    std::fs::write(
        model.join("tokenizer_chars.json"),
        serde_json::json!({"type": "char", "chars": chars}).to_string(),
    )
    .unwrap();
    let text: String = (0..3000)
        .map(|i| (b'0' + ((i * 7 + i / 13) % 67) as u8) as char)
        .collect();
    std::fs::write(dir.join("text.txt"), &text).unwrap();

    let trace = dir.join("lora.jsonl");
    let out = ok(tapelora(&[
        "finetune",
        "--model",
        &s(model.clone()),
        "--data",
        &s(dir.join("text.txt")),
        "--rank",
        "2",
        "--targets",
        "c_attn,c_fc",
        "--steps",
        "6",
        "--block",
        "8",
        "--batch",
        "4",
        "--out",
        &s(dir.join("adapter")),
        "--quiet",
        "--trace",
        &s(trace.clone()),
        "--trace-every",
        "3",
        "--trace-tape",
    ]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("The tape of step 0") && stderr.contains("backward, from the loss down"),
        "{stderr}"
    );
    assert!(stderr.contains("skipped") && stderr.contains("(gradient handed to the optimizer)"));
    let recs = records(&trace);
    assert_eq!(recs.len(), 6);
    for (i, r) in recs.iter().enumerate() {
        assert_eq!(r["step"], i);
        assert!(r["loss"].as_f64().unwrap().is_finite() && r["lr"].as_f64().unwrap() > 0.0);
        let trainable = r["trainable"].as_array().unwrap();
        assert_eq!(
            trainable.len(),
            8,
            "A and B for c_attn and c_fc in 2 blocks"
        );
        assert!(trainable
            .iter()
            .all(|t| t["name"].as_str().unwrap().contains(".lora_")));
        // At step 0, B = 0 so ∂L/∂A = 0 and only B moves; afterwards both move.
        let moved = |t: &serde_json::Value| t["update_norm"].as_f64().unwrap() > 0.0;
        let is_a = |t: &serde_json::Value| t["name"].as_str().unwrap().contains("lora_A");
        assert!(trainable.iter().filter(|t| !is_a(t)).all(moved));
        assert_eq!(
            trainable.iter().filter(|t| is_a(t)).all(moved),
            i > 0,
            "step {i}"
        );
        let frozen = r["frozen"].as_array().unwrap();
        assert_eq!(frozen.len(), 28);
        assert!(
            frozen.iter().all(|f| f["unchanged"] == true),
            "LoRA leaves every base tensor untouched"
        );
        assert_eq!(r.get("lora").is_some(), i % 3 == 0 || i == 5);
    }
    let lora = recs[5]["lora"].as_array().unwrap();
    assert_eq!(lora.len(), 4);
    assert!(lora.iter().all(|m| m["rank"].as_u64().unwrap() <= 2));

    let full_trace = dir.join("full.jsonl");
    ok(tapelora(&[
        "finetune",
        "--full",
        "--model",
        &s(model.clone()),
        "--data",
        &s(dir.join("text.txt")),
        "--steps",
        "2",
        "--block",
        "8",
        "--batch",
        "4",
        "--out",
        &s(dir.join("full")),
        "--quiet",
        "--trace",
        &s(full_trace.clone()),
    ]));
    for r in records(&full_trace) {
        assert!(
            r["frozen"]
                .as_array()
                .unwrap()
                .iter()
                .all(|f| f["unchanged"] == false),
            "--full changes the base weights"
        );
    }

    // graph, on the transformers-written folder itself.
    let out = ok(tapelora(&[
        "graph",
        "--model",
        &fixture(),
        "--rank",
        "2",
        "--block",
        "3",
    ]));
    let dot = String::from_utf8_lossy(&out.stdout);
    assert!(dot.starts_with("digraph tape {") && dot.trim_end().ends_with('}'));
    assert!(
        dot.contains("lora_A.default.weight")
            && dot.contains("label=\"no grad\"")
            && dot.contains("frozen")
    );
    let out = ok(tapelora(&["graph", "--model", &fixture(), "--block", "3"]));
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("#dddddd"),
        "without LoRA every weight trains: no frozen leaf"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
