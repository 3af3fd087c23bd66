//! `tapelora demo`: LoRA end to end in a few minutes, on a corpus it generates itself.
//!
//! 1. pretrain a small GPT on two-digit addition ([`tasks`]);
//! 2. adapt it to task 1 (subtraction) under one step budget: full fine-tuning; LoRA r = 8 on
//!    W_q, W_v (the paper's placement); LoRA r = 1, 2, 4, 8 on every linear layer (c_attn,
//!    attn.c_proj, mlp.c_fc, mlp.c_proj — PEFT's "all-linear" for GPT-2). r = 2 on all of them
//!    trains exactly as many parameters as r = 8 on W_q, W_v: the paper's Table 5 question in
//!    miniature;
//! 3. print trainable parameters, optimizer memory, adapter size, speed, task-1 accuracy and
//!    base-task accuracy afterwards (forgetting);
//! 4. train a task-2 adapter (the sum plus one), swap adapters on one base, merge one and time base,
//!    unmerged and merged inference side by side;
//! 5. write the run folder: PEFT adapters, metrics, a trace and the HTML report.

pub mod tasks;

use std::path::Path;
use std::time::Instant;

use ndarray::{ArrayD, IxDyn};
use rand::SeedableRng;
use serde_json::json;
use tapelora_gpt::data::Dataset;
use tapelora_gpt::hf::save_model;
use tapelora_gpt::tokenizer::Tokenizer;
use tapelora_gpt::train::{StepHook, TrainConfig};
use tapelora_gpt::{Gpt, GptConfig, KvCache};
use tapelora_lora::peft::{load_adapter, save_adapter};
use tapelora_lora::{thousands, LoraConfig, LoraModel};
use tapelora_nn::{write_atomic, Module};

use crate::cli::progress::train_with_progress;
use tasks::{split_pairs, text, Task};

/// Sizes and budgets of one demo run.
#[derive(Clone, Debug)]
pub struct DemoPlan {
    pub held_out: usize,
    pub pretrain_steps: usize,
    /// Task 1's budget, the same for every method.
    pub finetune_steps: usize,
    /// Task 2's budget (a changed rule, learnt much faster than a new operation).
    pub task2_steps: usize,
    pub config: GptConfig,
}

impl DemoPlan {
    pub fn new(quick: bool, vocab: usize) -> Self {
        let config = GptConfig {
            n_layer: 3,
            n_head: 4,
            n_embd: 64,
            n_positions: 30,
            vocab_size: vocab,
            n_inner: 256,
            layer_norm_epsilon: 1e-5,
            bias: true,
            dropout: 0.0,
        };
        if quick {
            DemoPlan {
                held_out: 200,
                pretrain_steps: 300,
                finetune_steps: 60,
                task2_steps: 60,
                config,
            }
        } else {
            DemoPlan {
                held_out: 500,
                pretrain_steps: 3000,
                finetune_steps: 1500,
                task2_steps: 500,
                config,
            }
        }
    }
}

fn tokens(tok: &Tokenizer, s: &str) -> Vec<u32> {
    tok.encode(s)
        .expect("the demo's texts use the demo vocabulary")
}

/// Exact-match accuracy: prompt `47+85=`, greedy decoding of the three answer characters.
pub fn accuracy(model: &Gpt, tok: &Tokenizer, task: Task, pairs: &[(u32, u32)]) -> f64 {
    let mut correct = 0;
    for chunk in pairs.chunks(256) {
        let prompts: Vec<(Vec<u32>, String)> = chunk
            .iter()
            .map(|&(a, b)| {
                let (p, ans) = task.problem(a, b);
                (tokens(tok, &p), ans)
            })
            .collect();
        let n = prompts.len();
        let t = prompts[0].0.len();
        let mut ids = ArrayD::from_shape_fn(IxDyn(&[n, t]), |i| prompts[i[0]].0[i[1]] as usize);
        let mut cache = KvCache::new(&model.config, n);
        let mut answers = vec![Vec::new(); n];
        for _ in 0..3 {
            let logits = model
                .forward_cached(&ids, &mut cache)
                .expect("prompts fit the context");
            let next: Vec<usize> = logits
                .rows()
                .into_iter()
                .map(|row| {
                    row.iter()
                        .enumerate()
                        .fold(
                            (0, f32::NEG_INFINITY),
                            |b, (i, &v)| if v > b.1 { (i, v) } else { b },
                        )
                        .0
                })
                .collect();
            for (ans, &id) in answers.iter_mut().zip(&next) {
                ans.push(id as u32);
            }
            ids = ArrayD::from_shape_fn(IxDyn(&[n, 1]), |i| next[i[0]]);
        }
        for ((_, want), got) in prompts.iter().zip(&answers) {
            if tok.decode(got).map(|s| &s == want).unwrap_or(false) {
                correct += 1;
            }
        }
    }
    correct as f64 / pairs.len() as f64
}

/// The paper's placement: the query and value projections.
const QV: [&str; 2] = ["c_attn.q", "c_attn.v"];
/// Every linear layer of every block (PEFT's shorthand; GPT-2's `c_attn`, `attn.c_proj`,
/// `mlp.c_fc`, `mlp.c_proj`).
const ALL_LINEAR: [&str; 1] = [tapelora_lora::target::ALL_LINEAR];
/// The task-1 adapter that is traced, swapped and merged.
const TRACED: &str = "task1-lora-r8-all";
/// Learning rates, each tuned for its method on seeds 1, 2 and 1337 (full fine-tuning at the
/// pretraining rate; LoRA's B starts at zero and wants a larger one, as in the paper).
const FULL_LR: f64 = 3e-3;
const LORA_LR: f64 = 1e-2;

fn recipe(steps: usize, lr: f64, seed: u64, block: usize) -> TrainConfig {
    TrainConfig {
        batch: 32,
        block,
        steps,
        lr,
        min_lr: lr / 10.0,
        warmup: (steps / 20).max(1),
        weight_decay: 0.0,
        eval_every: 0,
        seed,
        ..TrainConfig::nanogpt_cpu(steps, block)
    }
}

/// One row of the results table.
struct Row {
    method: String,
    trainable: usize,
    total: usize,
    optimizer_bytes: usize,
    disk_bytes: Option<u64>,
    ms_per_step: f64,
    task_acc: f64,
    base_acc_after: f64,
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

struct Quiet;
impl StepHook for Quiet {}

/// Trains `model`'s trainable parameters with a progress display; returns (summary, history).
fn fit(
    model: &mut Gpt,
    data: &Dataset,
    cfg: &TrainConfig,
    label: &str,
    hook: &mut dyn StepHook,
) -> Result<(tapelora_gpt::train::TrainSummary, Vec<serde_json::Value>), String> {
    eprintln!("· {label}");
    train_with_progress(model, data, cfg, false, hook, None)
}

fn write_metrics(
    dir: &Path,
    summary: serde_json::Value,
    history: Vec<serde_json::Value>,
) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    write_atomic(
        &dir.join("metrics.json"),
        json!({"summary": summary, "history": history})
            .to_string()
            .as_bytes(),
    )
    .map_err(|e| e.to_string())
}

/// Median wall time of `reps` calls of `f`, in milliseconds.
fn median_ms(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

pub fn run(quick: bool, seed: u64, out: &Path) -> Result<(), String> {
    let start = Instant::now();
    let tok = Tokenizer::char_from_text(tasks::VOCAB).map_err(|e| e.to_string())?;
    let plan = DemoPlan::new(quick, tok.vocab_size());
    let block = plan.config.n_positions;
    let (train_pairs, test_pairs) = split_pairs(seed, plan.held_out);
    let data = |task: Task| Dataset {
        train: tokens(&tok, &text(task, &train_pairs, 4, seed + task as u64)),
        val: tokens(&tok, &text(task, &test_pairs, 1, seed)),
    };
    if out.exists() {
        std::fs::remove_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    }
    std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    println!(
        "tapelora demo — LoRA end to end{} (seed {seed})\n",
        if quick { ", quick version" } else { "" }
    );
    println!(
        "Tasks (two-digit arithmetic as text, {} training pairs, {} held-out pairs):",
        train_pairs.len(),
        test_pairs.len()
    );
    for task in [Task::Add, Task::Subtract, Task::AddOne] {
        let (p, a) = task.problem(47, 85);
        println!("  {:<9} {p}{a}", task.name());
    }

    // 1. Pretrain on addition.
    let mut base = Gpt::new(
        plan.config.clone(),
        &mut rand_chacha::ChaCha8Rng::seed_from_u64(seed),
    )
    .map_err(|e| e.to_string())?;
    let add = data(Task::Add);
    let label = format!(
        "pretraining a {}-parameter GPT on addition ({} steps)",
        thousands(base.num_params()),
        plan.pretrain_steps
    );
    let (pre, pre_hist) = fit(
        &mut base,
        &add,
        &recipe(plan.pretrain_steps, 3e-3, seed, block),
        &label,
        &mut Quiet,
    )?;
    let base_add = accuracy(&base, &tok, Task::Add, &test_pairs);
    let base_sub = accuracy(&base, &tok, Task::Subtract, &test_pairs);
    let base_one = accuracy(&base, &tok, Task::AddOne, &test_pairs);
    println!("\nbase model: addition exact match {:.1}% on held-out pairs (subtract {:.1}%, add-one {:.1}% before adaptation); {:.1} ms/step\n", 100.0 * base_add, 100.0 * base_sub, 100.0 * base_one, pre.seconds * 1e3 / pre.steps as f64);
    let base_dir = out.join("base");
    save_model(&base, &base_dir, |dir| {
        tok.save(dir)
            .map_err(|e| tapelora_gpt::GptError::Input(e.to_string()))
    })
    .map_err(|e| e.to_string())?;
    write_metrics(
        &base_dir,
        json!({"method": "pretrain", "train_loss": pre.train_loss, "val_loss": pre.val_loss, "seconds": pre.seconds, "steps": pre.steps, "parameters": base.num_params(), "optimizer_state_bytes": pre.optimizer_state_bytes}),
        pre_hist,
    )?;

    // 2. Task 1 under one step budget.
    let sub = data(Task::Subtract);
    let steps = plan.finetune_steps;
    let mut rows = Vec::new();
    {
        let mut full = base.copy_weights();
        let (s, hist) = fit(
            &mut full,
            &sub,
            &recipe(steps, FULL_LR, seed, block),
            "task 1, full fine-tuning",
            &mut Quiet,
        )?;
        let dir = out.join("task1-full");
        save_model(&full, &dir, |d| {
            tok.save(d)
                .map_err(|e| tapelora_gpt::GptError::Input(e.to_string()))
        })
        .map_err(|e| e.to_string())?;
        write_metrics(
            &dir,
            json!({"method": "full", "train_loss": s.train_loss, "val_loss": s.val_loss, "seconds": s.seconds, "steps": s.steps, "trainable_params": full.num_params(), "optimizer_state_bytes": s.optimizer_state_bytes}),
            hist,
        )?;
        rows.push(Row {
            method: "full fine-tuning".into(),
            trainable: full.num_params(),
            total: full.num_params(),
            optimizer_bytes: s.optimizer_state_bytes,
            disk_bytes: None,
            ms_per_step: s.seconds * 1e3 / steps as f64,
            task_acc: accuracy(&full, &tok, Task::Subtract, &test_pairs),
            base_acc_after: accuracy(&full, &tok, Task::Add, &test_pairs),
        });
    }
    // (label, rank, targets, folder name)
    let variants: Vec<(String, usize, &[&str], String)> = std::iter::once((
        "LoRA r=8 (q,v)".to_string(),
        8,
        &QV[..],
        "task1-lora-r8-qv".to_string(),
    ))
    .chain([1, 2, 4, 8].map(|r| {
        (
            format!("LoRA r={r} (all linear)"),
            r,
            &ALL_LINEAR[..],
            format!("task1-lora-r{r}-all"),
        )
    }))
    .collect();
    for (label, r, targets, slug) in &variants {
        let mut lm = LoraModel::new(base.copy_weights());
        let cfg = LoraConfig::new(*r, 2.0 * *r as f64, targets);
        lm.add_adapter(
            "default",
            &cfg,
            &mut rand_chacha::ChaCha8Rng::seed_from_u64(seed),
        )
        .map_err(|e| e.to_string())?;
        let dir = out.join(slug);
        let base_names: Vec<String> = base.parameters().iter().map(|p| p.name.clone()).collect();
        let mut hook: Box<dyn StepHook> = if slug == TRACED {
            Box::new(crate::cli::trace::TraceWriter::create(
                &out.join(format!("{slug}.trace.jsonl")),
                (steps / 10).max(1),
                steps,
                &lm.model,
                &base_names,
            )?)
        } else {
            Box::new(Quiet)
        };
        let (s, hist) = fit(
            &mut lm.model,
            &sub,
            &recipe(steps, LORA_LR, seed, block),
            &format!("task 1, {label}"),
            hook.as_mut(),
        )?;
        save_adapter(&lm, "default", &dir, "base").map_err(|e| e.to_string())?;
        let task_acc = accuracy(&lm.model, &tok, Task::Subtract, &test_pairs);
        lm.set_adapters_disabled(true);
        let base_acc_after = accuracy(&lm.model, &tok, Task::Add, &test_pairs);
        lm.set_adapters_disabled(false);
        write_metrics(
            &dir,
            json!({"method": label, "train_loss": s.train_loss, "val_loss": s.val_loss, "seconds": s.seconds, "steps": s.steps, "trainable_params": lm.model.num_trainable_params(), "optimizer_state_bytes": s.optimizer_state_bytes}),
            hist,
        )?;
        rows.push(Row {
            method: label.clone(),
            trainable: lm.model.num_trainable_params(),
            total: lm.model.num_params(),
            optimizer_bytes: s.optimizer_state_bytes,
            disk_bytes: Some(
                dir_bytes(&dir)
                    - std::fs::metadata(dir.join("metrics.json"))
                        .map(|m| m.len())
                        .unwrap_or(0),
            ),
            ms_per_step: s.seconds * 1e3 / steps as f64,
            task_acc,
            base_acc_after,
        });
    }
    println!("\nTask 1 (subtraction), {steps} steps each, held-out exact match:\n");
    println!("| method | trainable params | optimizer state | adapter on disk | ms/step | task 1 accuracy | addition afterwards |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} ({:.2}%) | {} B | {} | {:.1} | {:.1}% | {:.1}% |",
            r.method,
            thousands(r.trainable),
            100.0 * r.trainable as f64 / r.total as f64,
            thousands(r.optimizer_bytes),
            r.disk_bytes.map_or("— (whole model)".into(), |b| format!(
                "{} B",
                thousands(b as usize)
            )),
            r.ms_per_step,
            100.0 * r.task_acc,
            100.0 * r.base_acc_after
        );
    }
    println!("\n(all linear: c_attn, attn.c_proj, mlp.c_fc and mlp.c_proj in every block; addition afterwards: the LoRA rows disable the adapter, which restores the base model exactly)");

    // 3. Task 2 adapter, swapping and merging.
    let one = data(Task::AddOne);
    {
        let mut lm = LoraModel::new(base.copy_weights());
        lm.add_adapter(
            "default",
            &LoraConfig::new(8, 16.0, &QV),
            &mut rand_chacha::ChaCha8Rng::seed_from_u64(seed + 1),
        )
        .map_err(|e| e.to_string())?;
        let (s, hist) = fit(
            &mut lm.model,
            &one,
            &recipe(plan.task2_steps, LORA_LR, seed, block),
            &format!(
                "task 2 (add-one), LoRA r=8 (q,v), {} steps",
                plan.task2_steps
            ),
            &mut Quiet,
        )?;
        let dir = out.join("task2-lora-r8-qv");
        save_adapter(&lm, "default", &dir, "base").map_err(|e| e.to_string())?;
        write_metrics(
            &dir,
            json!({"method": "LoRA r=8 (q,v), task 2", "train_loss": s.train_loss, "val_loss": s.val_loss, "seconds": s.seconds, "steps": s.steps, "trainable_params": lm.model.num_trainable_params(), "optimizer_state_bytes": s.optimizer_state_bytes}),
            hist,
        )?;
    }
    let mut lm = LoraModel::new(base.copy_weights());
    load_adapter(&mut lm, "subtract", &out.join(TRACED)).map_err(|e| e.to_string())?;
    load_adapter(&mut lm, "add-one", &out.join("task2-lora-r8-qv")).map_err(|e| e.to_string())?;
    println!("\nOne base, two adapters, swapped in place (held-out exact match; task 1: r = 8 on all linear layers, task 2: r = 8 on q, v, {} steps):\n", plan.task2_steps);
    println!("| active adapter | subtract | add-one | addition |");
    println!("|---|---:|---:|---:|");
    let mut swap_rows = Vec::new();
    for active in ["subtract", "add-one", "subtract", "none"] {
        if active == "none" {
            lm.set_adapters_disabled(true);
        } else {
            lm.set_adapters_disabled(false);
            lm.set_adapter(active).map_err(|e| e.to_string())?;
        }
        let accs = [Task::Subtract, Task::AddOne, Task::Add]
            .map(|t| accuracy(&lm.model, &tok, t, &test_pairs));
        println!(
            "| {active} | {:.1}% | {:.1}% | {:.1}% |",
            100.0 * accs[0],
            100.0 * accs[1],
            100.0 * accs[2]
        );
        swap_rows.push(accs);
    }
    if swap_rows[0] != swap_rows[2] {
        return Err("switching subtract → add-one → subtract changed the results".into());
    }
    lm.set_adapters_disabled(false);
    lm.set_adapter("subtract").map_err(|e| e.to_string())?;
    let unmerged_acc = accuracy(&lm.model, &tok, Task::Subtract, &test_pairs);
    let batch = ArrayD::from_shape_fn(IxDyn(&[64, block]), |i| {
        (i[0] * 7 + i[1] * 3) % plan.config.vocab_size
    });
    let forward = |m: &Gpt| {
        let tape = tapelora_autograd::Tape::new();
        tape.no_grad(|| {
            m.forward(&tapelora_nn::Ctx::eval(&tape), &batch)
                .expect("fits");
        });
    };
    let plain = base.copy_weights();
    let reps = if quick { 5 } else { 21 };
    let mut t_base = Vec::new();
    let mut t_unmerged = Vec::new();
    let mut t_merged = Vec::new();
    let mut merged_lm = LoraModel::new(base.copy_weights());
    load_adapter(&mut merged_lm, "subtract", &out.join(TRACED)).map_err(|e| e.to_string())?;
    let merged = merged_lm.merge_and_unload().map_err(|e| e.to_string())?;
    let merged_acc = accuracy(&merged, &tok, Task::Subtract, &test_pairs);
    // Interleaved rounds, so that load on the machine affects all three alike.
    for _ in 0..3 {
        t_base.push(median_ms(reps, || forward(&plain)));
        t_unmerged.push(median_ms(reps, || forward(&lm.model)));
        t_merged.push(median_ms(reps, || forward(&merged)));
    }
    let best = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
    let (tb, tu, tm) = (best(&t_base), best(&t_unmerged), best(&t_merged));
    println!(
        "\nMerging W ← W₀ + (α/r)·B·A: subtraction accuracy unmerged {:.1}%, merged {:.1}%",
        100.0 * unmerged_acc,
        100.0 * merged_acc
    );
    println!("forward latency (64 × {block} tokens, best of 3 medians): base {tb:.2} ms, LoRA unmerged {tu:.2} ms ({:+.1}%), merged {tm:.2} ms ({:+.1}%)", 100.0 * (tu / tb - 1.0), 100.0 * (tm / tb - 1.0));
    save_model(&merged, &out.join("task1-merged"), |d| {
        tok.save(d)
            .map_err(|e| tapelora_gpt::GptError::Input(e.to_string()))
    })
    .map_err(|e| e.to_string())?;

    // 4. Report.
    let report_dir = out.join("report");
    crate::cli::report::run(crate::cli::report::ReportArgs {
        run_dir: out.to_path_buf(),
        out: report_dir.clone(),
    })?;
    let summary = json!({
        "seed": seed, "quick": quick, "seconds": start.elapsed().as_secs_f64(),
        "base_addition_accuracy": base_add,
        "task1": rows.iter().map(|r| json!({"method": r.method, "trainable_params": r.trainable, "optimizer_state_bytes": r.optimizer_bytes, "adapter_bytes": r.disk_bytes, "ms_per_step": r.ms_per_step, "task_accuracy": r.task_acc, "base_accuracy_after": r.base_acc_after})).collect::<Vec<_>>(),
        "merged_accuracy": merged_acc, "unmerged_accuracy": unmerged_acc,
        "latency_ms": {"base": tb, "unmerged": tu, "merged": tm},
    });
    write_atomic(
        &out.join("demo.json"),
        serde_json::to_string_pretty(&summary)
            .expect("JSON")
            .as_bytes(),
    )
    .map_err(|e| e.to_string())?;
    let o = out.display();
    println!("\nDone in {:.0} s. The run folder {o} holds the base model, PEFT adapters, metrics, a trace and the report.", start.elapsed().as_secs_f64());
    println!("Next:");
    println!("  open {o}/report/index.html");
    println!("  cargo run --release -- inspect {o}/{TRACED}");
    println!("  cargo run --release -- generate --model {o}/base --adapter {o}/{TRACED} --prompt '85-47=' --max-new-tokens 4 --temperature 0");
    println!("  cargo run --release -- report {o} --out {o}/report");
    Ok(())
}
