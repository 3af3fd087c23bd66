//! The runnable lessons run here too, so CI catches an example that stops working.

#[path = "../examples/gradcheck_all.rs"]
mod gradcheck_all;

#[test]
fn gradcheck_all_passes_for_every_op() {
    assert_eq!(gradcheck_all::run(), 0);
}

/// The bench command's matmul and gemm modes and their argument checks (the demo has its own test,
/// tests/demo_quick.rs).
#[test]
fn cli_bench_runs() {
    let exe = env!("CARGO_BIN_EXE_tapelora");
    let out = std::process::Command::new(exe)
        .args([
            "bench", "--mode", "matmul", "--sizes", "64", "--reps", "1", "--json",
        ])
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.trim_start().starts_with('[') && stdout.contains("\"ratio\""),
        "{stdout}"
    );
    let gemm = std::process::Command::new(exe)
        .args([
            "bench",
            "--mode",
            "gemm",
            "--shapes",
            "24x16x40,3×5×7",
            "--reps",
            "2",
            "--json",
        ])
        .output()
        .expect("runs");
    assert!(
        gemm.status.success(),
        "{}",
        String::from_utf8_lossy(&gemm.stderr)
    );
    let stdout = String::from_utf8_lossy(&gemm.stdout);
    let last: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let shapes = last["shapes"].as_array().expect("a list of shapes");
    assert_eq!(shapes.len(), 2, "{stdout}");
    assert_eq!(
        (&shapes[1]["m"], &shapes[1]["k"], &shapes[1]["n"]),
        (&3.into(), &5.into(), &7.into())
    );
    for shape in shapes {
        let (median, best) = (
            shape["median_gflops"].as_f64().unwrap(),
            shape["best_gflops"].as_f64().unwrap(),
        );
        assert!(median > 0.0 && best >= median, "{stdout}");
    }
    for bad_shape in ["2x0x3", "1024x768", "axbxc", "100000x100000x100000"] {
        let bad = std::process::Command::new(exe)
            .args(["bench", "--mode", "gemm", "--shapes", bad_shape])
            .output()
            .expect("runs");
        assert!(!bad.status.success(), "{bad_shape}");
        let stderr = String::from_utf8_lossy(&bad.stderr);
        assert_eq!(stderr.lines().count(), 1, "one-line error: {stderr}");
        assert!(
            stderr.contains("--shapes") && stderr.contains(bad_shape),
            "{stderr}"
        );
    }
    let bad = std::process::Command::new(exe)
        .args(["bench", "--reps", "0"])
        .output()
        .expect("runs");
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(stderr.lines().count(), 1, "one-line error: {stderr}");
    assert!(stderr.contains("--reps"), "{stderr}");
}

#[path = "../examples/lora_by_hand.rs"]
mod lora_by_hand;

#[test]
fn lora_by_hand_lesson_checks_pass() {
    let result = lora_by_hand::run();
    if let Err(e) = &result {
        eprintln!("lora_by_hand failed: {e}");
    }
    assert!(result.is_ok(), "lora_by_hand: {result:?}");
}

#[test]
fn model_benchmarks_print_their_json_line() {
    let exe = env!("CARGO_BIN_EXE_tapelora");
    for (mode, key) in [
        ("full", "\"mfu\""),
        ("lora", "\"peak_rss_mib\""),
        ("generate", "\"tokens_per_sec\""),
        ("infer", "\"merged_ms\""),
        ("lora-vs-full", "\"gemm_flop_share\""),
    ] {
        let out = std::process::Command::new(exe)
            .args([
                "bench",
                "--mode",
                mode,
                "--config",
                "nanogpt-cpu",
                "--batch",
                "2",
                "--block",
                "16",
                "--steps",
                "1",
                "--json",
            ])
            .output()
            .expect("runs");
        assert!(
            out.status.success(),
            "{mode}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let last: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
        assert!(stdout.contains(key) && last.is_object(), "{mode}: {stdout}");
    }
}
