//! finetune / inspect / merge / eval --adapter end to end on a small model the test trains.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn tapelora(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tapelora"))
        .args(args)
        .output()
        .expect("the binary runs")
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn json_line(stdout: &str) -> serde_json::Value {
    serde_json::from_str(stdout.lines().last().expect("a line")).expect("JSON")
}

fn folder_bytes(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| (p.display().to_string(), std::fs::read(&p).unwrap()))
        .collect()
}

#[test]
fn finetune_inspect_merge_and_eval_with_adapters() {
    let dir = std::env::temp_dir().join(format!("tapelora-cli-lora-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let p = |name: &str| -> PathBuf { dir.join(name) };
    let s = |path: PathBuf| path.to_str().unwrap().to_string();
    // Base task: "ab" repeated patterns; downstream: a different order of the same letters.
    std::fs::write(p("base.txt"), "abcd abdc acbd ".repeat(120)).unwrap();
    std::fs::write(p("task.txt"), "dcba dcab dbca ".repeat(120)).unwrap();
    ok(tapelora(&[
        "train",
        "--data",
        &s(p("base.txt")),
        "--layers",
        "2",
        "--heads",
        "2",
        "--embd",
        "16",
        "--block",
        "16",
        "--batch",
        "8",
        "--steps",
        "40",
        "--out",
        &s(p("base")),
        "--quiet",
    ]));
    let base_before = folder_bytes(&p("base"));

    let out = ok(tapelora(&[
        "finetune",
        "--model",
        &s(p("base")),
        "--data",
        &s(p("task.txt")),
        "--rank",
        "2",
        "--alpha",
        "6",
        "--targets",
        "c_attn.q,c_attn.v,c_fc",
        "--steps",
        "40",
        "--block",
        "16",
        "--batch",
        "8",
        "--out",
        &s(p("adapter")),
        "--json",
        "--quiet",
    ]));
    let summary = json_line(&out);
    // q,v: 2 layers × 2 slices × 2·(16+16); c_fc: 2 layers × 2·(16+64).
    assert_eq!(summary["trainable_params"], 2 * 2 * 2 * 32 + 2 * 2 * 80);
    assert_eq!(
        folder_bytes(&p("base")),
        base_before,
        "finetune never writes to the base folder"
    );
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "metrics.json",
    ] {
        assert!(p("adapter").join(f).exists(), "{f}");
    }
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(p("adapter").join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["fan_in_fan_out"], true);

    let report = json_line(&ok(tapelora(&["inspect", &s(p("adapter")), "--json"])));
    let modules = report["modules"].as_array().unwrap();
    assert_eq!(modules.len(), 4);
    for m in modules {
        assert!(m["rank"].as_u64().unwrap() <= m["r"].as_u64().unwrap());
        assert!(m["delta_fro_norm"].as_f64().unwrap() > 0.0);
        assert!(!m["singular_values"].as_array().unwrap().is_empty());
    }
    let model_report = json_line(&ok(tapelora(&["inspect", &s(p("base")), "--json"])));
    assert!(model_report["total_params"].as_u64().unwrap() > 0);

    let eval = |model: PathBuf, adapter: Option<&str>| {
        let mut args = vec![
            "eval".to_string(),
            "--model".into(),
            s(model),
            "--data".into(),
            s(p("task.txt")),
            "--json".into(),
        ];
        if let Some(a) = adapter {
            args.extend(["--adapter".into(), a.to_string()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        json_line(&ok(tapelora(&args)))["loss"].as_f64().unwrap()
    };
    let base_loss = eval(p("base"), None);
    let adapted = eval(p("base"), Some(&s(p("adapter"))));
    assert!(
        adapted < base_loss,
        "the adapter helps on its task: {base_loss} → {adapted}"
    );
    ok(tapelora(&[
        "merge",
        "--model",
        &s(p("base")),
        "--adapter",
        &s(p("adapter")),
        "--out",
        &s(p("merged")),
    ]));
    let merged = eval(p("merged"), None);
    assert!(
        (merged - adapted).abs() < 1e-4 * adapted,
        "merged {merged} vs unmerged {adapted}"
    );
    let half = eval(p("base"), Some(&format!("{}:0.5", s(p("adapter")))));
    assert!(half != adapted);

    // Bad input.
    let fail = |args: &[&str], mentions: &str| {
        let out = tapelora(args);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(mentions) && !err.contains("panicked"), "{err}");
    };
    let base = s(p("base"));
    let task = s(p("task.txt"));
    fail(
        &[
            "finetune", "--model", &base, "--data", &task, "--out", &base,
        ],
        "base model folder",
    );
    fail(
        &[
            "finetune",
            "--model",
            &base,
            "--data",
            &task,
            "--rank",
            "0",
            "--out",
            &s(p("x")),
        ],
        "--rank",
    );
    fail(
        &[
            "finetune",
            "--model",
            &base,
            "--data",
            &task,
            "--rank",
            "40",
            "--out",
            &s(p("x")),
        ],
        "min(d, k)",
    );
    fail(
        &[
            "finetune",
            "--model",
            &base,
            "--data",
            &task,
            "--alpha=-1",
            "--out",
            &s(p("x")),
        ],
        "--alpha",
    );
    fail(
        &[
            "finetune",
            "--model",
            &base,
            "--data",
            &task,
            "--targets",
            "q_proj",
            "--out",
            &s(p("x")),
        ],
        "c_attn.q",
    );
    assert!(!p("x").exists());
    fail(
        &[
            "eval",
            "--model",
            &base,
            "--adapter",
            &s(p("nope")),
            "--data",
            &task,
        ],
        "nope",
    );

    // PEFT's "all-linear": every linear layer of both blocks, saved under their own names.
    let out = ok(tapelora(&[
        "finetune",
        "--model",
        &base,
        "--data",
        &task,
        "--rank",
        "2",
        "--targets",
        "all-linear",
        "--steps",
        "2",
        "--block",
        "16",
        "--batch",
        "4",
        "--out",
        &s(p("all-linear")),
        "--json",
        "--quiet",
    ]));
    // 2 layers × r·((16+48) + (16+16) + (16+64) + (64+16)).
    assert_eq!(json_line(&out)["trainable_params"], 2 * 2 * 256);
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(p("all-linear").join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        cfg["target_modules"],
        serde_json::json!(["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"])
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
