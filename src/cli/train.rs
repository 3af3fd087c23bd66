//! `tapelora train`: train a GPT on a text file and write a model folder.

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use rand::SeedableRng;
use serde_json::json;
use tapelora_gpt::data::{num_windows, Dataset};
use tapelora_gpt::hf::{load_model, save_model};
use tapelora_gpt::tokenizer::Tokenizer;
use tapelora_gpt::train::{Checkpointing, TrainConfig, TrainState};
use tapelora_gpt::{Gpt, GptConfig};
use tapelora_nn::{write_atomic, Module};

use super::checkpoint::{
    catch_ctrl_c, check_finite, exit_interrupted, fingerprint, read_state, write_state, RunOptions,
    STOP,
};
use super::progress::train_with_progress;
use super::{check_out_dir, read_text, CliResult};

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenizerKind {
    /// One token per character; the vocabulary comes from the training text.
    Char,
    /// GPT-2's byte-level BPE (50257 tokens), built in.
    Gpt2,
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// UTF-8 text to train on (the first 90% trains, the last 10% validates).
    #[arg(long)]
    pub data: PathBuf,
    /// Tokenizer (default: char, or gpt2 for the gpt2 presets).
    #[arg(long, value_enum)]
    pub tokenizer: Option<TokenizerKind>,
    /// Model size preset: nanogpt-cpu, gpt2, gpt2-medium.
    #[arg(long, default_value = "nanogpt-cpu")]
    pub preset: String,
    #[arg(long)]
    pub layers: Option<usize>,
    #[arg(long)]
    pub heads: Option<usize>,
    #[arg(long)]
    pub embd: Option<usize>,
    /// Context length (block size).
    #[arg(long)]
    pub block: Option<usize>,
    #[arg(long, default_value_t = 12)]
    pub batch: usize,
    #[arg(long, default_value_t = 2000)]
    pub steps: usize,
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    #[arg(long, default_value_t = 1e-4)]
    pub min_lr: f64,
    #[arg(long, default_value_t = 100)]
    pub warmup: usize,
    #[arg(long, default_value_t = 0.1)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = 0.99)]
    pub beta2: f64,
    /// Clip the global gradient norm (0 disables).
    #[arg(long, default_value_t = 1.0)]
    pub clip: f64,
    #[arg(long, default_value_t = 0.0)]
    pub dropout: f64,
    #[arg(long, default_value_t = 1337)]
    pub seed: u64,
    /// Evaluate on (part of) the validation split every N steps (0: only at the end).
    #[arg(long, default_value_t = 250)]
    pub eval_every: usize,
    /// The model folder to write.
    #[arg(long)]
    pub out: PathBuf,
    /// Also write a checkpoint into --out every N steps (0: only when interrupted by Ctrl-C).
    #[arg(long, default_value_t = 0)]
    pub checkpoint_every: usize,
    /// Continue the run whose checkpoint is in this folder (same --data and options).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Check every op's output and gradient for NaN/Inf, so a diverging run names the op (slower).
    #[arg(long)]
    pub detect_anomaly: bool,
    #[command(flatten)]
    pub run: super::trace::RunOutputArgs,
}

/// What a resumed run must share with the interrupted one (the model shape is checked
/// separately, against the checkpoint's config.json).
fn run_options(args: &TrainArgs, text: &str) -> RunOptions {
    vec![
        ("--data", fingerprint(text.as_bytes())),
        ("--batch", args.batch.to_string()),
        ("--lr", args.lr.to_string()),
        ("--min-lr", args.min_lr.to_string()),
        ("--warmup", args.warmup.to_string()),
        ("--weight-decay", args.weight_decay.to_string()),
        ("--beta2", args.beta2.to_string()),
        ("--clip", args.clip.to_string()),
        ("--dropout", args.dropout.to_string()),
        ("--seed", args.seed.to_string()),
    ]
}

pub fn run(args: TrainArgs) -> CliResult {
    let text = read_text(&args.data)?;
    let kind = args
        .tokenizer
        .unwrap_or(if args.preset.starts_with("gpt2") {
            TokenizerKind::Gpt2
        } else {
            TokenizerKind::Char
        });
    let tokenizer = match (&args.resume, kind) {
        (Some(dir), _) => tapelora_gpt::hf::load_config(dir)
            .and_then(|c| {
                Tokenizer::from_model_dir(dir, c.vocab_size)
                    .map_err(|e| tapelora_gpt::GptError::Input(e.to_string()))
            })
            .map_err(|e| format!("--resume: {e}"))?,
        (None, TokenizerKind::Char) => {
            Tokenizer::char_from_text(&text).map_err(|e| format!("{}: {e}", args.data.display()))?
        }
        (None, TokenizerKind::Gpt2) => {
            Tokenizer::gpt2().map_err(|e| format!("{}: {e}", args.data.display()))?
        }
    };
    let tokens = tokenizer
        .encode(&text)
        .map_err(|e| format!("{}: {e}", args.data.display()))?;

    let mut config = GptConfig::preset(&args.preset, Some(tokenizer.vocab_size()))
        .map_err(|e| format!("--preset: {e}"))?;
    config.n_layer = args.layers.unwrap_or(config.n_layer);
    config.n_head = args.heads.unwrap_or(config.n_head);
    if let Some(embd) = args.embd {
        config.n_embd = embd;
        config.n_inner = 4 * embd;
    }
    config.n_positions = args.block.unwrap_or(config.n_positions);
    config.dropout = args.dropout;
    config.validate().map_err(|e| e.to_string())?;
    let train_cfg = TrainConfig {
        batch: args.batch,
        block: config.n_positions,
        steps: args.steps,
        lr: args.lr,
        min_lr: args.min_lr,
        warmup: args.warmup,
        weight_decay: args.weight_decay,
        beta2: args.beta2,
        clip: (args.clip > 0.0).then_some(args.clip),
        seed: args.seed,
        eval_every: args.eval_every,
        detect_anomaly: args.detect_anomaly,
        ..TrainConfig::nanogpt_cpu(args.steps, config.n_positions)
    };
    train_cfg
        .validate(config.n_positions)
        .map_err(|e| e.to_string())?;
    if !(args.lr.is_finite() && args.clip.is_finite()) {
        return Err("--lr and --clip must be finite numbers".into());
    }
    let data = Dataset::split(tokens, 0.1);
    let block = config.n_positions;
    if data.train.len() <= block || num_windows(data.val.len(), block) == 0 {
        return Err(format!(
            "{}: {} tokens are too few: the 90% training part needs more than {block} and the 10% validation part at least {} (one block plus its target)",
            args.data.display(),
            data.train.len() + data.val.len(),
            block + 1
        ));
    }
    check_out_dir(&args.out)?;

    let options = run_options(&args, &text);
    let (mut model, resume) = match &args.resume {
        Some(dir) => {
            let model = load_model(dir).map_err(|e| format!("--resume: {e}"))?;
            if model.config != config {
                return Err(format!("--resume {}: the checkpoint's model differs from the one these options describe; pass the options of the interrupted run", dir.display()));
            }
            (model, Some(read_state(dir, &options)?))
        }
        None => (
            Gpt::new(
                config,
                &mut rand_chacha::ChaCha8Rng::seed_from_u64(args.seed),
            )
            .map_err(|e| e.to_string())?,
            None,
        ),
    };
    eprintln!(
        "training a {}-layer, {}-head, {}-wide GPT ({} parameters) on {} tokens of {} ({} tokenizer, vocabulary {})",
        model.config.n_layer,
        model.config.n_head,
        model.config.n_embd,
        model.num_params(),
        data.train.len(),
        args.data.display(),
        tokenizer.kind(),
        tokenizer.vocab_size()
    );
    let mut hooks = super::trace::hooks(
        args.run.trace.as_deref(),
        args.run.trace_every,
        args.steps,
        args.run.trace_tape,
        &model,
        &[],
    )?;
    catch_ctrl_c();
    let out = args.out.clone();
    let mut save = |m: &Gpt, state: &TrainState| -> tapelora_gpt::Result<()> {
        check_finite(m, state)?;
        save_model(m, &out, |dir| {
            tokenizer
                .save(dir)
                .map_err(|e| tapelora_gpt::GptError::Input(e.to_string()))?;
            write_state(dir, state, &options)
        })
    };
    let checkpointing = Checkpointing {
        resume,
        every: args.checkpoint_every,
        save: &mut save,
        stop: Some(&STOP),
    };
    let (summary, history) = train_with_progress(
        &mut model,
        &data,
        &train_cfg,
        args.run.quiet,
        &mut hooks,
        Some(checkpointing),
    )?;
    if summary.stopped {
        exit_interrupted(&args.out);
    }

    let result = json!({
        "train_loss": summary.train_loss,
        "val_loss": summary.val_loss,
        "seconds": summary.seconds,
        "tokens_per_sec": summary.tokens_per_sec,
        "steps": summary.steps,
        "parameters": model.num_params(),
        "optimizer_state_bytes": summary.optimizer_state_bytes,
    });
    save_model(&model, &args.out, |dir| {
        tokenizer
            .save(dir)
            .map_err(|e| tapelora_gpt::GptError::Input(e.to_string()))?;
        let metrics =
            json!({"summary": result, "config": format!("{train_cfg:?}"), "history": history});
        write_atomic(
            &dir.join("metrics.json"),
            serde_json::to_string(&metrics).expect("JSON").as_bytes(),
        )?;
        Ok(())
    })
    .map_err(|e| e.to_string())?;
    eprintln!(
        "done: train loss {:.4}, val loss {}, {:.1} s ({:.0} tokens/s); model written to {}",
        summary.train_loss,
        summary.val_loss.map_or("-".into(), |v| format!("{v:.4}")),
        summary.seconds,
        summary.tokens_per_sec,
        args.out.display()
    );
    if args.run.json {
        println!("{result}");
    }
    Ok(())
}
