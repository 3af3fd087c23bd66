//! The LoRA paper's §7 analyses, reproduced in miniature:
//!
//! * trains a small GPT on a base task, then LoRA adapters on W_q and W_v for a downstream task
//!   at r = 8 (two seeds) and r = 64;
//! * prints the subspace similarity φ(A_{r=8}, A_{r=64}, i, j) (§7.2, Figure 3) and between the
//!   two r = 8 seeds (Figure 4), against the random-subspace baseline;
//! * prints the amplification factor ‖ΔW‖_F / ‖UᵀWVᵀ‖_F (§7.3, Table 7) next to W's own top
//!   directions and random ones;
//! * writes the φ heatmaps as SVG.
//!
//!     cargo run --release --example rank_analysis [-- OUT_DIR]

use std::path::{Path, PathBuf};

use ndarray::{s, Array2, Ix2};
use rand::{Rng, SeedableRng};
use tapelora::plot::heatmap;
use tapelora_gpt::data::Dataset;
use tapelora_gpt::train::{train, TrainConfig};
use tapelora_gpt::{Gpt, GptConfig};
use tapelora_lora::analysis::{amplification, random_subspace_similarity, subspace_similarity};
use tapelora_lora::{LoraConfig, LoraModel};

const WORDS: [&str; 12] = [
    "tape", "lora", "rank", "grad", "adam", "norm", "head", "loss", "step", "base", "task", "mask",
];

/// Lines of words (`reverse` = the downstream task: every word spelled backwards).
fn corpus(lines: usize, reverse: bool, seed: u64) -> Vec<u32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let alphabet: Vec<char> = " \nabcdefghijklmnopqrstuvwxyz".chars().collect();
    let mut text = String::new();
    for _ in 0..lines {
        let line: Vec<String> = (0..4)
            .map(|_| {
                let w = WORDS[rng.random_range(0..WORDS.len())];
                if reverse {
                    w.chars().rev().collect()
                } else {
                    w.to_string()
                }
            })
            .collect();
        text += &line.join(" ");
        text.push('\n');
    }
    text.chars()
        .map(|c| {
            alphabet
                .iter()
                .position(|&a| a == c)
                .expect("in the alphabet") as u32
        })
        .collect()
}

fn q_part_a(lm: &LoraModel, layer: usize) -> Array2<f64> {
    let part = &lm.lora_layers()[layer].adapters["default"].parts[0];
    assert_eq!(part.slice.label, Some("q"));
    part.a
        .value
        .view()
        .into_dimensionality::<Ix2>()
        .expect("2-D")
        .mapv(f64::from)
}

/// Runs the analysis; `quick` shrinks the training for the test suite.
pub fn run(out_dir: &Path, quick: bool) -> Result<(), String> {
    let steps = if quick { (60, 40) } else { (800, 400) };
    let config = GptConfig {
        n_layer: 2,
        n_head: 4,
        n_embd: 128,
        n_positions: 32,
        vocab_size: 28,
        n_inner: 256,
        layer_norm_epsilon: 1e-5,
        bias: true,
        dropout: 0.0,
    };
    let mut base = Gpt::new(config, &mut rand_chacha::ChaCha8Rng::seed_from_u64(0))
        .map_err(|e| e.to_string())?;
    let base_data = Dataset::split(corpus(3000, false, 1), 0.1);
    let recipe = |steps| TrainConfig {
        batch: 16,
        block: 32,
        lr: 3e-3,
        min_lr: 3e-4,
        warmup: 20,
        eval_every: 0,
        weight_decay: 0.0,
        ..TrainConfig::nanogpt_cpu(steps, 32)
    };
    let summary =
        train(&mut base, &base_data, &recipe(steps.0), &mut |_| {}).map_err(|e| e.to_string())?;
    println!(
        "base model: val loss {:.3} on the base task after {} steps",
        summary.val_loss.unwrap_or(f64::NAN),
        steps.0
    );

    let task = Dataset::split(corpus(3000, true, 2), 0.1);
    let adapt = |r: usize, seed: u64| -> Result<(LoraModel, f64), String> {
        let mut lm = LoraModel::new(base.copy_weights());
        let cfg = LoraConfig::new(r, 2.0 * r as f64, &["c_attn.q", "c_attn.v"]);
        lm.add_adapter(
            "default",
            &cfg,
            &mut rand_chacha::ChaCha8Rng::seed_from_u64(seed),
        )
        .map_err(|e| e.to_string())?;
        let tc = TrainConfig {
            seed,
            ..recipe(steps.1)
        };
        let s = train(&mut lm.model, &task, &tc, &mut |_| {}).map_err(|e| e.to_string())?;
        Ok((lm, s.val_loss.unwrap_or(f64::NAN)))
    };
    let (r8a, loss8a) = adapt(8, 11)?;
    let (r8b, loss8b) = adapt(8, 22)?;
    let (r64, loss64) = adapt(64, 11)?;
    println!("downstream val loss: r=8 (seed 11) {loss8a:.3}, r=8 (seed 22) {loss8b:.3}, r=64 {loss64:.3}\n");

    std::fs::create_dir_all(out_dir).map_err(|e| format!("{}: {e}", out_dir.display()))?;
    let layer = base.config.n_layer - 1;
    let k = base.config.n_embd;
    let print_grid = |title: &str, phi: &Array2<f64>, cols: &[usize]| {
        println!("{title}");
        print!("{:>6}", "i \\ j");
        for j in cols {
            print!("{j:>7}");
        }
        println!();
        for i in 0..phi.nrows() {
            print!("{:>6}", i + 1);
            for &j in cols {
                print!("{:>7.3}", phi[[i, j - 1]]);
            }
            println!();
        }
        let (i, j) = (phi.nrows(), *cols.last().expect("columns"));
        println!(
            "(random subspaces: φ(·,·,{i},{j}) ≈ {:.3})\n",
            random_subspace_similarity(i, j, k)
        );
    };
    let phi_8_64 = subspace_similarity(&q_part_a(&r8a, layer), &q_part_a(&r64, layer));
    print_grid(
        &format!("φ(A_r=8, A_r=64, i, j) for W_q of block {layer}:"),
        &phi_8_64,
        &[1, 2, 4, 8, 16, 32, 64],
    );
    let phi_seeds = subspace_similarity(&q_part_a(&r8a, layer), &q_part_a(&r8b, layer));
    print_grid(
        &format!("φ(A_r=8 seed 11, A_r=8 seed 22, i, j) for W_q of block {layer}:"),
        &phi_seeds,
        &[1, 2, 4, 8],
    );
    for (name, phi, file) in [
        ("φ(A_r=8, A_r=64)", &phi_8_64, "phi_r8_r64.svg"),
        (
            "φ(A_r=8 seed 11, A_r=8 seed 22)",
            &phi_seeds,
            "phi_r8_seeds.svg",
        ),
    ] {
        let svg = heatmap(&format!("{name}, W_q of block {layer}"), "i", "j", phi);
        std::fs::write(out_dir.join(file), svg).map_err(|e| e.to_string())?;
    }

    // Amplification (Table 7): W_q in [out, in] orientation is the first C columns of c_attn's
    // Conv1D weight, transposed.
    let c_attn = &base.h[layer].attn.c_attn.weight.value;
    let w_q: Array2<f64> = c_attn
        .view()
        .into_dimensionality::<Ix2>()
        .expect("2-D")
        .slice(s![.., 0..k])
        .t()
        .mapv(f64::from);
    println!(
        "amplification of W_q (block {layer}) — ‖ΔW‖_F / ‖UᵀW_qV‖_F on ΔW's top-r directions:"
    );
    println!(
        "{:>6} {:>10} {:>14} {:>14} {:>14} {:>8}",
        "r", "‖ΔW‖_F", "on ΔW's dirs", "on W's dirs", "random dirs", "factor"
    );
    for (r, lm) in [(8usize, &r8a), (64, &r64)] {
        let delta = lm.lora_layers()[layer].adapters["default"].parts[0].delta();
        let a = amplification(&w_q, &delta, r.min(8), 7);
        println!(
            "{:>6} {:>10.4} {:>14.4} {:>14.4} {:>14.4} {:>8.2}",
            r,
            a.delta_norm,
            a.w_on_delta_directions,
            a.w_on_own_directions,
            a.w_on_random_directions,
            a.factor
        );
        if !(a.factor.is_finite() && a.factor > 0.0) {
            return Err(format!("amplification factor for r = {r} is {}", a.factor));
        }
    }
    println!("\nwrote heatmaps to {}", out_dir.display());
    for v in phi_8_64.iter().chain(phi_seeds.iter()) {
        if !(-1e-9..=1.0 + 1e-9).contains(v) {
            return Err(format!("φ = {v} is outside [0, 1]"));
        }
    }
    Ok(())
}

#[allow(dead_code)] // the smoke test includes this file and calls `run`
fn main() {
    let out = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/rank_analysis"));
    if let Err(e) = run(&out, false) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
