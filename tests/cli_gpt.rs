//! The train / eval / generate commands end to end on a small generated text.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn tapelora(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tapelora"))
        .args(args)
        .output()
        .expect("the binary runs")
}

fn temp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tapelora-cli-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A text with learnable structure: counting words.
fn corpus() -> String {
    let words = ["one", "two", "three", "four", "five", "six"];
    (0..400)
        .map(|i| format!("{} {}.\n", words[i % 6], words[(i + 1) % 6]))
        .collect()
}

fn last_json(out: &Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().expect("a JSON line")).expect("valid JSON")
}

fn assert_one_line_error(out: &Output, mentions: &str) {
    assert!(!out.status.success(), "expected failure");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "one-line error, got: {stderr}"
    );
    assert!(
        stderr.contains(mentions),
        "error should mention {mentions:?}: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn train_eval_generate_round_trip() {
    let dir = temp("roundtrip");
    let data = dir.join("text.txt");
    std::fs::write(&data, corpus()).unwrap();
    let model = dir.join("model");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let out = tapelora(&[
        "train",
        "--data",
        &s(&data),
        "--layers",
        "1",
        "--heads",
        "2",
        "--embd",
        "16",
        "--block",
        "16",
        "--batch",
        "8",
        "--steps",
        "60",
        "--warmup",
        "5",
        "--lr",
        "3e-3",
        "--eval-every",
        "20",
        "--out",
        &s(&model),
        "--json",
        "--quiet",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = last_json(&out);
    for key in ["train_loss", "val_loss", "seconds", "tokens_per_sec"] {
        assert!(summary[key].as_f64().is_some(), "{key} in {summary}");
    }
    assert!(
        summary["val_loss"].as_f64().unwrap() < 2.0,
        "learns something: {summary}"
    );
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer_chars.json",
        "metrics.json",
    ] {
        assert!(model.join(file).exists(), "{file}");
    }

    let out = tapelora(&[
        "eval",
        "--model",
        &s(&model),
        "--data",
        &s(&data),
        "--block",
        "8",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let eval = last_json(&out);
    let len = corpus().chars().count();
    assert_eq!(eval["tokens"].as_u64().unwrap() as usize, (len - 1) / 8 * 8);
    let loss = eval["loss"].as_f64().unwrap();
    assert!((eval["perplexity"].as_f64().unwrap() - loss.exp()).abs() < 1e-9);

    let out = tapelora(&[
        "generate",
        "--model",
        &s(&model),
        "--prompt",
        "one two",
        "--max-new-tokens",
        "20",
        "--seed",
        "3",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("one two") && text.trim_end().chars().count() >= 20,
        "{text}"
    );

    // Bad input: one line naming the problem, non-zero exit, nothing left behind.
    let out = tapelora(&["generate", "--model", &s(&model), "--prompt", "Zebra"]);
    assert_one_line_error(&out, "'Z'");
    let out = tapelora(&[
        "eval",
        "--model",
        &s(&model),
        "--data",
        &s(&data),
        "--block",
        "17",
    ]);
    assert_one_line_error(&out, "--block");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn train_rejects_bad_input_without_leaving_an_output_folder() {
    let dir = temp("bad");
    let data = dir.join("text.txt");
    std::fs::write(&data, corpus()).unwrap();
    let out_dir = dir.join("out");
    let (d, o) = (data.to_str().unwrap(), out_dir.to_str().unwrap());
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--data", "/nonexistent/text.txt"],
            "/nonexistent/text.txt",
        ),
        (vec!["--data", d, "--steps", "0"], "--steps"),
        (vec!["--data", d, "--preset", "gpt7"], "gpt7"),
        (vec!["--data", d, "--lr=-1"], "--lr"),
        (vec!["--data", d, "--heads", "3", "--embd", "16"], "n_embd"),
        (vec!["--data", d, "--block", "4096"], "too few"),
    ];
    for (args, mentions) in cases {
        let mut full = vec!["train", "--out", o, "--quiet"];
        full.extend(args);
        assert_one_line_error(&tapelora(&full), mentions);
        assert!(
            !out_dir.exists(),
            "no output folder after a failed run ({full:?})"
        );
    }
    let not_utf8 = dir.join("bin.txt");
    std::fs::write(&not_utf8, [0x66, 0x6f, 0xff, 0xfe]).unwrap();
    assert_one_line_error(
        &tapelora(&["train", "--data", not_utf8.to_str().unwrap(), "--out", o]),
        "UTF-8",
    );
    std::fs::create_dir_all(out_dir.join("precious")).unwrap();
    assert_one_line_error(
        &tapelora(&["train", "--data", d, "--out", o, "--steps", "1"]),
        "not a model folder",
    );
    assert!(out_dir.join("precious").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}
