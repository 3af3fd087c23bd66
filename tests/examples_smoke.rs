//! The runnable lessons run here too, so CI catches an example that stops working.

#[path = "../examples/gradcheck_all.rs"]
mod gradcheck_all;

#[test]
fn gradcheck_all_passes_for_every_op() {
    assert_eq!(gradcheck_all::run(), 0);
}

#[test]
fn cli_demo_and_bench_run() {
    let exe = env!("CARGO_BIN_EXE_tapelora");
    let out = std::process::Command::new(exe)
        .arg("demo")
        .output()
        .expect("runs");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("tapelora"));
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
    let bad = std::process::Command::new(exe)
        .args(["bench", "--reps", "0"])
        .output()
        .expect("runs");
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(stderr.lines().count(), 1, "one-line error: {stderr}");
    assert!(stderr.contains("--reps"), "{stderr}");
}
