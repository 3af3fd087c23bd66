//! `tapelora report` on a run folder with two fine-tunes (one traced).

use std::path::PathBuf;
use std::process::{Command, Output};

fn tapelora(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tapelora"))
        .args(args)
        .output()
        .expect("runs")
}

fn ok(out: Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn report_draws_losses_gradients_spectra_and_similarity() {
    let dir = std::env::temp_dir().join(format!("tapelora-report-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("run")).unwrap();
    let s = |p: PathBuf| p.display().to_string();
    std::fs::write(dir.join("base.txt"), "abcd abdc acbd ".repeat(100)).unwrap();
    std::fs::write(dir.join("task.txt"), "dcba dcab dbca ".repeat(100)).unwrap();
    ok(tapelora(&[
        "train",
        "--data",
        &s(dir.join("base.txt")),
        "--layers",
        "1",
        "--heads",
        "2",
        "--embd",
        "16",
        "--block",
        "16",
        "--batch",
        "4",
        "--steps",
        "20",
        "--out",
        &s(dir.join("base")),
        "--quiet",
    ]));
    for (name, rank, seed) in [("r2", "2", "1"), ("r4", "4", "2")] {
        let mut args: Vec<String> = [
            "finetune",
            "--model",
            &s(dir.join("base")),
            "--data",
            &s(dir.join("task.txt")),
            "--rank",
            rank,
            "--alpha",
            "4",
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        args.extend(
            [
                "--targets",
                "c_attn,c_fc",
                "--steps",
                "20",
                "--eval-every",
                "10",
                "--block",
                "16",
                "--batch",
                "4",
                "--seed",
                seed,
                "--quiet",
            ]
            .map(String::from),
        );
        args.extend(["--out".to_string(), s(dir.join("run").join(name))]);
        if name == "r2" {
            args.extend(["--trace".to_string(), s(dir.join("run").join("r2.jsonl"))]);
        }
        ok(tapelora(
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
        ));
    }
    let report = dir.join("report");
    ok(tapelora(&[
        "report",
        &s(dir.join("run")),
        "--out",
        &s(report.clone()),
    ]));
    let html = std::fs::read_to_string(report.join("index.html")).unwrap();
    for needle in [
        "<table>",
        "Training loss",
        "Validation loss",
        "Gradient norm per layer",
        "Singular values of ΔW — r2",
        "Subspace similarity",
        "random subspaces",
    ] {
        assert!(html.contains(needle), "missing {needle}");
    }
    assert!(html.matches("<svg").count() >= 6);
    assert!(!html.contains("<script"), "no JavaScript");
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let out = tapelora(&["report", &s(empty), "--out", &s(dir.join("r2"))]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("metrics.json"));
    std::fs::remove_dir_all(&dir).unwrap();
}
