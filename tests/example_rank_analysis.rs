//! The §7 example runs (shortened) in the test suite, so CI notices if it breaks.

#[path = "../examples/rank_analysis.rs"]
mod rank_analysis;

#[test]
fn rank_analysis_example_runs_and_writes_heatmaps() {
    let out = std::env::temp_dir().join(format!("tapelora-rank-analysis-{}", std::process::id()));
    rank_analysis::run(&out, true).expect("the example's checks pass");
    for file in ["phi_r8_r64.svg", "phi_r8_seeds.svg"] {
        let svg = std::fs::read_to_string(out.join(file)).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.matches("<rect").count() >= 64,
            "{file}"
        );
    }
    std::fs::remove_dir_all(&out).unwrap();
}
