//! The runnable lessons run here too, so CI catches an example that stops working.
//!
//! The lessons run as the binaries `cargo test` builds for them (it builds every example before
//! any test runs), not as modules compiled into this test a second time: the f64 gradient checks
//! instantiate every op again, which cost CI over a minute of compiling.

use std::path::PathBuf;

/// Runs the example `name` as built next to the tapelora binary, and returns its stdout; fails
/// the test with the example's output if it exits non-zero.
fn run_example(name: &str) -> String {
    let tapelora_bin = PathBuf::from(env!("CARGO_BIN_EXE_tapelora"));
    let example = tapelora_bin
        .parent()
        .expect("the binary sits in a profile directory")
        .join("examples")
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        example.is_file(),
        "{} is not built: `cargo test` builds the examples (or `cargo build --release --examples`)",
        example.display()
    );
    let out = std::process::Command::new(&example).output().expect("runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{name} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn gradcheck_all_passes_for_every_op() {
    let stdout = run_example("gradcheck_all");
    assert!(
        stdout.contains("all ops pass") && !stdout.contains("FAILED"),
        "{stdout}"
    );
}

/// Runs the tapelora binary with `args`.
fn tapelora(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_tapelora"))
        .args(args)
        .output()
        .expect("runs")
}

/// The stdout of a run that must succeed, and its last line as JSON.
fn json_run(args: &[&str]) -> (String, serde_json::Value) {
    let out = tapelora(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let last = serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{args:?}: last line is not JSON ({e}): {stdout}"));
    (stdout, last)
}

/// A run that must fail with a one-line error naming every one of `names`.
fn assert_one_line_error(args: &[&str], names: &[&str]) {
    let out = tapelora(args);
    assert!(!out.status.success(), "{args:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "one-line error: {stderr}");
    for name in names {
        assert!(stderr.contains(name), "{args:?}: {stderr}");
    }
}

/// The bench command's matmul and gemm modes and their argument checks (the demo has its own
/// test, tests/demo_quick.rs).
#[test]
fn cli_bench_runs() {
    let (stdout, _) = json_run(&[
        "bench", "--mode", "matmul", "--sizes", "64", "--reps", "1", "--json",
    ]);
    assert!(
        stdout.trim_start().starts_with('[') && stdout.contains("\"ratio\""),
        "{stdout}"
    );
    let (stdout, last) = json_run(&[
        "bench",
        "--mode",
        "gemm",
        "--shapes",
        "24x16x40,3×5×7",
        "--reps",
        "2",
        "--json",
    ]);
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
        assert_one_line_error(
            &["bench", "--mode", "gemm", "--shapes", bad_shape],
            &["--shapes", bad_shape],
        );
    }
    assert_one_line_error(&["bench", "--reps", "0"], &["--reps"]);
}

#[test]
fn lora_by_hand_lesson_checks_pass() {
    run_example("lora_by_hand");
}

#[test]
fn model_benchmarks_print_their_json_line() {
    // One short run of a benchmark on a tiny nanogpt-cpu batch, with `extra` arguments.
    let small = |mode: &str, extra: &[&str]| {
        let args = [
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
        ];
        json_run(&[&args[..], extra].concat())
    };
    for (mode, key) in [
        ("full", "\"mfu\""),
        ("lora", "\"peak_rss_mib\""),
        ("generate", "\"alone_share\""),
        ("infer", "\"merged_ms\""),
        ("lora-vs-full", "\"gemm_flop_share\""),
    ] {
        let (stdout, last) = small(mode, &["--json"]);
        assert!(stdout.contains(key) && last.is_object(), "{mode}: {stdout}");
    }
    // The per-op profile on one tape, and on the groups as training records them.
    let (one_tape, _) = small("full", &["--profile"]);
    let (grouped, _) = small("full", &["--profile", "--profile-groups"]);
    // Two groups where the pool has two threads (CI's machine has two cores).
    let threads = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|n| n.parse().ok())
        .filter(|&n: &usize| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let groups = if threads >= 2 {
        "2 groups of sequences side by side, the first group's ops timed"
    } else {
        "one tape per step,"
    };
    for (stdout, recorded) in [
        (&one_tape, "one tape per step while profiling"),
        (&grouped, groups),
    ] {
        assert!(stdout.contains(recorded), "{stdout}");
        assert!(
            stdout.contains("linear_gelu") && stdout.contains("optimizer (AdamW)"),
            "{stdout}"
        );
    }
}
