//! The README's main command, in its quick form: it runs end to end, writes the run folder, and
//! gives the same results for the same seed.

use std::process::Command;

fn demo(out: &std::path::Path) -> (String, serde_json::Value) {
    let o = Command::new(env!("CARGO_BIN_EXE_tapelora"))
        .args([
            "demo",
            "--quick",
            "--seed",
            "7",
            "--out",
            out.to_str().unwrap(),
        ])
        .output()
        .expect("runs");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("demo.json")).unwrap()).unwrap();
    (String::from_utf8_lossy(&o.stdout).into_owned(), summary)
}

/// The results without wall-clock timings.
fn results(v: &serde_json::Value) -> serde_json::Value {
    let mut v = v.clone();
    v.as_object_mut().unwrap().remove("seconds");
    v.as_object_mut().unwrap().remove("latency_ms");
    for row in v["task1"].as_array_mut().unwrap() {
        row.as_object_mut().unwrap().remove("ms_per_step");
    }
    v
}

#[test]
fn quick_demo_runs_writes_its_folder_and_is_deterministic() {
    let root = std::env::temp_dir().join(format!("tapelora-demo-{}", std::process::id()));
    let (stdout, first) = demo(&root.join("a"));
    for needle in [
        "| full fine-tuning |",
        "| LoRA r=1 (all linear) |",
        "| LoRA r=8 (q,v) |",
        "| LoRA r=8 (all linear) |",
        "swapped in place",
        "merged",
        "report/index.html",
    ] {
        assert!(stdout.contains(needle), "missing {needle:?} in:\n{stdout}");
    }
    let a = root.join("a");
    for path in [
        "base/config.json",
        "task1-lora-r8-qv/adapter_config.json",
        "task1-lora-r2-all/adapter_model.safetensors",
        "task2-lora-r8-qv/adapter_model.safetensors",
        "task1-lora-r8-all.trace.jsonl",
        "report/index.html",
        "task1-merged/model.safetensors",
    ] {
        assert!(a.join(path).exists(), "{path}");
    }
    assert_eq!(first["merged_accuracy"], first["unmerged_accuracy"]);
    // The Table 5 comparison holds the budget fixed: r = 2 on every linear layer trains exactly as
    // many parameters as r = 8 on W_q and W_v.
    let trainable = |method: &str| {
        first["task1"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["method"] == method)
            .unwrap_or_else(|| panic!("no row {method}"))["trainable_params"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(
        trainable("LoRA r=2 (all linear)"),
        trainable("LoRA r=8 (q,v)")
    );
    // 3 blocks × (W_q + W_v) × r·(64 + 64): both adapters really are this small.
    assert_eq!(trainable("LoRA r=8 (q,v)"), 3 * 2 * 8 * 128);
    let (_, second) = demo(&root.join("b"));
    assert_eq!(results(&first), results(&second), "same seed, same results");
    std::fs::remove_dir_all(&root).unwrap();
}
