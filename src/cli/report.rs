//! `tapelora report RUN_DIR --out REPORT_DIR`: a self-contained `index.html` (inline SVG
//! charts, no JavaScript) from what training left in a run folder:
//!
//! * `metrics.json` (written by `train` / `finetune` into their output folder) in `RUN_DIR`
//!   or its subfolders → train/val loss curves and the summary table;
//! * `*.jsonl` traces (`--trace`) → gradient norm per layer over time;
//! * PEFT adapter folders → singular-value spectra of each ΔW, and the subspace-similarity
//!   heatmap φ (the paper's §7.2) between the first two adapters, on their first shared module.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clap::Args;
use ndarray::Array2;
use serde_json::Value;
use tapelora_lora::analysis::{random_subspace_similarity, subspace_similarity};
use tapelora_lora::peft::{inspect_adapter, ADAPTER_CONFIG, ADAPTER_WEIGHTS};
use tapelora_nn::TensorFile;

use super::CliResult;
use crate::plot::{escape, heatmap, line_chart, Series};

#[derive(Args, Debug)]
pub struct ReportArgs {
    /// A run folder: an output folder of train/finetune, or a folder holding several.
    pub run_dir: PathBuf,
    /// Where to write index.html and the SVG files.
    #[arg(long)]
    pub out: PathBuf,
}

struct Run {
    name: String,
    dir: PathBuf,
    metrics: Value,
}

fn folders(root: &Path) -> Vec<PathBuf> {
    let mut out = vec![root.to_path_buf()];
    if let Ok(entries) = std::fs::read_dir(root) {
        let mut subs: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir())
            .collect();
        subs.sort();
        out.extend(subs);
    }
    out
}

fn run_name(root: &Path, dir: &Path) -> String {
    dir.strip_prefix(root)
        .ok()
        .and_then(|p| p.to_str())
        .filter(|s| !s.is_empty())
        .unwrap_or("run")
        .to_string()
}

fn read_json(path: &Path) -> Result<Value, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: not valid JSON: {e}", path.display()))
}

fn folder_bytes(dir: &Path) -> u64 {
    [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
        .iter()
        .filter_map(|f| std::fs::metadata(dir.join(f)).ok())
        .map(|m| m.len())
        .sum()
}

fn lora_a(dir: &Path, module: &str) -> Option<Array2<f64>> {
    let file = TensorFile::open(&dir.join(ADAPTER_WEIGHTS)).ok()?;
    let key = if module == "wte" {
        "base_model.model.transformer.wte.lora_embedding_A".to_string()
    } else {
        format!("base_model.model.transformer.{module}.lora_A.weight")
    };
    file.f64(&key).ok()?.into_dimensionality().ok()
}

pub fn run(args: ReportArgs) -> CliResult {
    if !args.run_dir.is_dir() {
        return Err(format!(
            "{}: not a folder (expected a run folder with metrics.json)",
            args.run_dir.display()
        ));
    }
    let dirs = folders(&args.run_dir);
    let mut runs = Vec::new();
    for dir in &dirs {
        let path = dir.join("metrics.json");
        if path.exists() {
            runs.push(Run {
                name: run_name(&args.run_dir, dir),
                dir: dir.clone(),
                metrics: read_json(&path)?,
            });
        }
    }
    let traces: Vec<PathBuf> = dirs
        .iter()
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flat_map(|entries| entries.filter_map(|e| e.ok().map(|e| e.path())))
        .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .collect();
    let adapters: Vec<PathBuf> = dirs
        .iter()
        .filter(|d| d.join(ADAPTER_CONFIG).exists())
        .cloned()
        .collect();
    if runs.is_empty() && adapters.is_empty() && traces.is_empty() {
        return Err(format!(
            "{}: holds no metrics.json, trace (*.jsonl) or adapter folder to report on",
            args.run_dir.display()
        ));
    }

    let mut sections: Vec<(String, String)> = Vec::new(); // (title, svg)
                                                          // Loss curves.
    let mut train_series = Vec::new();
    let mut val_series = Vec::new();
    for run in &runs {
        let history = run.metrics["history"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let pts = |key: &str| -> Vec<(f64, f64)> {
            history
                .iter()
                .filter_map(|h| Some((h["step"].as_f64()?, h[key].as_f64()?)))
                .collect()
        };
        train_series.push((run.name.clone(), pts("loss")));
        val_series.push((run.name.clone(), pts("val_loss")));
    }
    if !runs.is_empty() {
        let series: Vec<Series<'_>> = train_series
            .iter()
            .map(|(n, p)| Series {
                label: n,
                points: p.clone(),
            })
            .collect();
        sections.push((
            "Training loss".into(),
            line_chart("train loss per step", "step", "loss", &series, false),
        ));
        let series: Vec<Series<'_>> = val_series
            .iter()
            .filter(|(_, p)| !p.is_empty())
            .map(|(n, p)| Series {
                label: n,
                points: p.clone(),
            })
            .collect();
        if !series.is_empty() {
            sections.push((
                "Validation loss".into(),
                line_chart("validation loss", "step", "val loss", &series, false),
            ));
        }
    }
    // Gradient norm per layer over time, from the traces.
    for trace in &traces {
        let text =
            std::fs::read_to_string(trace).map_err(|e| format!("{}: {e}", trace.display()))?;
        let mut per_layer: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
        for (n, line) in text.lines().enumerate() {
            let rec: Value = serde_json::from_str(line)
                .map_err(|e| format!("{}: line {}: not valid JSON: {e}", trace.display(), n + 1))?;
            let step = rec["step"].as_f64().unwrap_or(n as f64);
            let mut sums: BTreeMap<String, f64> = BTreeMap::new();
            for t in rec["trainable"].as_array().into_iter().flatten() {
                let name = t["name"].as_str().unwrap_or("");
                let layer = name
                    .split('.')
                    .take(if name.starts_with("h.") { 2 } else { 1 })
                    .collect::<Vec<_>>()
                    .join(".");
                *sums.entry(layer).or_default() += t["grad_norm"].as_f64().unwrap_or(0.0).powi(2);
            }
            for (layer, sq) in sums {
                per_layer.entry(layer).or_default().push((step, sq.sqrt()));
            }
        }
        let series: Vec<Series<'_>> = per_layer
            .iter()
            .map(|(l, p)| Series {
                label: l,
                points: p.clone(),
            })
            .collect();
        let title = format!(
            "Gradient norm per layer — {}",
            trace
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("trace")
        );
        sections.push((
            title,
            line_chart(
                "‖∂loss/∂θ‖ per layer (trainable tensors)",
                "step",
                "grad norm",
                &series,
                true,
            ),
        ));
    }
    // Spectra of ΔW per adapter.
    let mut reports = Vec::new();
    for dir in &adapters {
        let report = inspect_adapter(dir).map_err(|e| e.to_string())?;
        let series: Vec<Series<'_>> = report
            .modules
            .iter()
            .map(|m| Series {
                label: &m.name,
                points: m
                    .singular_values
                    .iter()
                    .enumerate()
                    .map(|(i, &s)| ((i + 1) as f64, s))
                    .collect(),
            })
            .collect();
        sections.push((
            format!("Singular values of ΔW — {}", run_name(&args.run_dir, dir)),
            line_chart("σᵢ(ΔW) per module", "i", "σ", &series, true),
        ));
        reports.push((dir.clone(), report));
    }
    // Subspace similarity between the first two adapters.
    let mut phi_note = String::from("needs two adapter folders in the run folder");
    if reports.len() >= 2 {
        let (d1, r1) = &reports[0];
        let (d2, r2) = &reports[1];
        if let Some(module) = r1
            .modules
            .iter()
            .map(|m| m.name.clone())
            .find(|n| r2.modules.iter().any(|m| &m.name == n))
        {
            if let (Some(a1), Some(a2)) = (lora_a(d1, &module), lora_a(d2, &module)) {
                let phi = subspace_similarity(&a1, &a2);
                let (i, j) = (a1.nrows(), a2.nrows());
                let title = format!(
                    "φ(A₁, A₂, i, j) at {module}: {} (rows) vs {} (cols)",
                    run_name(&args.run_dir, d1),
                    run_name(&args.run_dir, d2)
                );
                phi_note = format!(
                    "φ between {} and {} at {module} (white = 0, dark blue = 1); φ at i = {i}, j = {j} is {:.3}, against {:.3} for random subspaces of ℝ^{}",
                    run_name(&args.run_dir, d1),
                    run_name(&args.run_dir, d2),
                    phi[[i - 1, j - 1]],
                    random_subspace_similarity(i, j, a1.ncols()),
                    a1.ncols()
                );
                sections.push((
                    "Subspace similarity (§7.2)".into(),
                    heatmap(&title, "i", "j", &phi),
                ));
            }
        }
    }

    // Summary table.
    let mut rows = String::new();
    for run in &runs {
        let s = &run.metrics["summary"];
        let steps = s["steps"].as_f64().unwrap_or(0.0);
        let ms_per_step = if steps > 0.0 {
            s["seconds"].as_f64().unwrap_or(0.0) * 1000.0 / steps
        } else {
            f64::NAN
        };
        let trainable = s["trainable_params"]
            .as_u64()
            .or(s["parameters"].as_u64())
            .unwrap_or(0);
        let disk = if run.dir.join(ADAPTER_CONFIG).exists() {
            format!("{} bytes", folder_bytes(&run.dir))
        } else {
            "—".into()
        };
        rows += &format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.1}</td><td>{}</td><td>{}</td></tr>\n",
            escape(&run.name),
            escape(s["method"].as_str().unwrap_or("train")),
            trainable,
            s["optimizer_state_bytes"].as_u64().unwrap_or(0),
            disk,
            ms_per_step,
            s["train_loss"].as_f64().map_or("—".into(), |v| format!("{v:.4}")),
            s["val_loss"].as_f64().map_or("—".into(), |v| format!("{v:.4}")),
        );
    }

    std::fs::create_dir_all(&args.out).map_err(|e| format!("{}: {e}", args.out.display()))?;
    let mut body = String::new();
    for (k, (title, svg)) in sections.iter().enumerate() {
        let file = format!("chart{k}.svg");
        tapelora_nn::write_atomic(&args.out.join(&file), svg.as_bytes())
            .map_err(|e| e.to_string())?;
        body += &format!("<section><h2>{}</h2>\n{svg}\n</section>\n", escape(title));
    }
    let html = format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>tapelora report</title>\n<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}} table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}} th{{background:#f3f3f3}} section{{margin:1.5em 0}}</style></head>\n<body>\n<h1>tapelora report — {}</h1>\n<h2>Summary</h2>\n<table><tr><th>run</th><th>method</th><th>trainable params</th><th>optimizer state (bytes)</th><th>adapter on disk</th><th>ms/step</th><th>final train loss</th><th>val loss</th></tr>\n{rows}</table>\n<p>Subspace similarity: {}</p>\n{body}</body></html>\n",
        escape(&args.run_dir.display().to_string()),
        escape(&phi_note)
    );
    tapelora_nn::write_atomic(&args.out.join("index.html"), html.as_bytes())
        .map_err(|e| e.to_string())?;
    eprintln!(
        "wrote {} ({} charts)",
        args.out.join("index.html").display(),
        sections.len()
    );
    Ok(())
}
