//! The `tapelora` command line: argument parsing (clap) and one module per command. Library
//! errors arrive here as typed errors and leave as one-line messages.

pub mod bench;
pub mod checkpoint;
pub mod eval;
pub mod generate;
pub mod graph;
pub mod lora;
pub mod progress;
pub mod report;
pub mod trace;
pub mod train;

use std::path::Path;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "tapelora",
    version,
    about = "Tape-based autodiff, GPT-2 and LoRA in pure Rust"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// LoRA end to end on a generated arithmetic corpus: pretrain, adapt, compare, swap, merge.
    Demo {
        /// A sub-minute version (smaller budgets) for smoke tests.
        #[arg(long)]
        quick: bool,
        #[arg(long, default_value_t = 1337)]
        seed: u64,
        /// The run folder to (re)create.
        #[arg(long, default_value = "runs/demo")]
        out: std::path::PathBuf,
    },
    /// Train a GPT on a text file and write a Hugging Face-style model folder.
    Train(train::TrainArgs),
    /// Loss and perplexity of a model on a text file.
    Eval(eval::EvalArgs),
    /// Continue a prompt.
    Generate(generate::GenerateArgs),
    /// LoRA-fine-tune a model on a text file and write a PEFT adapter folder (or `--full`).
    Finetune(lora::FinetuneArgs),
    /// Merge adapter(s) into a model and write a plain model folder.
    Merge(lora::MergeArgs),
    /// Draw a run folder (metrics, traces, adapters) as a self-contained HTML report.
    Report(report::ReportArgs),
    /// Print one training step's tape as Graphviz DOT (or SVG via `dot`).
    Graph(graph::GraphArgs),
    /// Describe an adapter (ΔW per module: norm, rank, singular values) or a model folder.
    Inspect(lora::InspectArgs),
    /// Speed measurements, side by side in one run.
    Bench {
        /// What to measure.
        #[arg(long, value_enum, default_value_t = BenchMode::Matmul)]
        mode: BenchMode,
        /// Model for the full/lora/generate/infer modes: nanogpt-cpu or gpt2 (random weights).
        #[arg(long, default_value = "nanogpt-cpu")]
        config: String,
        /// LoRA rank (on c_attn.q and c_attn.v, α = 2r).
        #[arg(long, default_value_t = 8)]
        rank: usize,
        /// Sequences per step (default: 12 for nanogpt-cpu, 4 for gpt2).
        #[arg(long)]
        batch: Option<usize>,
        /// Tokens per sequence (default: 64 for nanogpt-cpu, 256 for gpt2).
        #[arg(long)]
        block: Option<usize>,
        /// Timed steps (default: 20 for nanogpt-cpu, 3 for gpt2).
        #[arg(long)]
        steps: Option<usize>,
        /// Square matrix sizes for `--mode matmul`.
        #[arg(long, value_delimiter = ',', default_values_t = vec![512, 768, 1024])]
        sizes: Vec<usize>,
        /// Product shapes M×K×N for `--mode gemm` (default: GPT-2 B4×T256's four linears).
        #[arg(long, value_delimiter = ',', default_values_t = bench::GPT2_LINEAR_SHAPES.map(String::from).to_vec())]
        shapes: Vec<String>,
        /// Timed repetitions (the median is reported).
        #[arg(long, default_value_t = 7)]
        reps: usize,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Also print wall time per op (forward and backward) over the timed steps.
        #[arg(long)]
        profile: bool,
        /// With --profile: record a small model's batch as training does, in groups of
        /// sequences side by side, and time the first group's ops (by default the profiled
        /// step records the whole batch on one tape).
        #[arg(long, requires = "profile")]
        profile_groups: bool,
        /// Override the model's width (heads = width / 64), for scaling tables.
        #[arg(long)]
        embd: Option<usize>,
        /// Override the number of blocks.
        #[arg(long)]
        layers: Option<usize>,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchMode {
    /// The tape's matmul against raw matrixmultiply sgemm.
    Matmul,
    /// Our GEMM alone on --shapes (row-major operands, all threads): GFLOP/s per shape.
    Gemm,
    /// Training steps updating every weight (forward + backward + AdamW).
    Full,
    /// Training steps with LoRA on c_attn.q and c_attn.v.
    Lora,
    /// Greedy generation with the KV cache: batch 1, 16-token prompt, 128 new tokens.
    Generate,
    /// Forward latency: base vs LoRA unmerged vs merged.
    Infer,
    /// Full and LoRA steps alternated: the LoRA step's share of the full step's time.
    LoraVsFull,
}

pub type CliResult = Result<(), String>;

/// Reads a UTF-8 text file; errors name the file.
pub fn read_text(path: &Path) -> Result<String, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        format!(
            "{}: not UTF-8 text (invalid byte at offset {})",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })?;
    if text.is_empty() {
        return Err(format!("{}: the file is empty", path.display()));
    }
    Ok(text)
}

/// Refuses to replace a folder that is not a model/adapter folder (so a mistyped `--out`
/// never deletes someone's files).
pub fn check_out_dir(dir: &Path) -> Result<(), String> {
    if !dir.exists() {
        return Ok(());
    }
    if !dir.is_dir() {
        return Err(format!(
            "--out {}: exists and is not a folder",
            dir.display()
        ));
    }
    let empty = std::fs::read_dir(dir)
        .map(|mut d| d.next().is_none())
        .unwrap_or(false);
    let ours = dir.join("config.json").exists() || dir.join("adapter_config.json").exists();
    if empty || ours {
        Ok(())
    } else {
        Err(format!(
            "--out {}: exists and is not a model folder; choose a new or empty folder",
            dir.display()
        ))
    }
}

pub fn run(cli: Cli) -> Result<(), String> {
    match cli.command {
        Command::Train(args) => train::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Finetune(args) => lora::finetune(args),
        Command::Merge(args) => lora::merge(args),
        Command::Inspect(args) => lora::inspect(args),
        Command::Graph(args) => graph::run(args),
        Command::Report(args) => report::run(args),
        Command::Demo { quick, seed, out } => crate::demo::run(quick, seed, &out),
        Command::Bench {
            mode,
            config,
            rank,
            batch,
            block,
            steps,
            sizes,
            shapes,
            reps,
            json,
            profile,
            profile_groups,
            embd,
            layers,
        } => {
            if reps == 0 {
                return Err("bench: --reps must be at least 1".into());
            }
            if sizes.contains(&0) {
                return Err("bench: --sizes must all be at least 1".into());
            }
            let model = bench::ModelBench {
                config,
                rank,
                batch,
                block,
                steps,
                json,
                profile,
                profile_groups,
                embd,
                layers,
            };
            match mode {
                BenchMode::Matmul => bench::matmul(&sizes, reps, json),
                BenchMode::Gemm => bench::gemm(&bench::parse_shapes(&shapes)?, reps, json),
                BenchMode::Full => model.train(false),
                BenchMode::Lora => model.train(true),
                BenchMode::Generate => model.generate(),
                BenchMode::Infer => model.infer(),
                BenchMode::LoraVsFull => model.lora_vs_full(),
            }
        }
    }
}
