//! `tapelora eval`: mean next-token cross-entropy and perplexity of a model on a text file.

use std::path::PathBuf;

use clap::Args;
use serde_json::json;
use tapelora_gpt::tokenizer::Tokenizer;
use tapelora_gpt::train::evaluate;

use super::{read_text, CliResult};

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Model folder (Hugging Face GPT-2 layout).
    #[arg(long)]
    pub model: PathBuf,
    /// LoRA adapter folder(s) (PEFT format), `DIR` or `DIR:WEIGHT`; several are summed.
    #[arg(long)]
    pub adapter: Vec<String>,
    /// Text to evaluate on (all of it).
    #[arg(long)]
    pub data: PathBuf,
    /// Window length (default: the model's context).
    #[arg(long)]
    pub block: Option<usize>,
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: EvalArgs) -> CliResult {
    let model = super::lora::load_with_adapters(&args.model, &args.adapter)?;
    let tokenizer = Tokenizer::from_model_dir(&args.model, model.config.vocab_size)
        .map_err(|e| e.to_string())?;
    let text = read_text(&args.data)?;
    let tokens = tokenizer
        .encode(&text)
        .map_err(|e| format!("{}: {e}", args.data.display()))?;
    let block = args.block.unwrap_or(model.config.n_positions);
    if block == 0 || block > model.config.n_positions {
        return Err(format!(
            "--block: must be between 1 and the model's context {}, got {block}",
            model.config.n_positions
        ));
    }
    let r = evaluate(&model, &tokens, block, None)
        .map_err(|e| format!("{}: {e}", args.data.display()))?;
    if args.json {
        println!(
            "{}",
            json!({"loss": r.loss, "perplexity": r.perplexity(), "tokens": r.tokens})
        );
    } else {
        println!(
            "loss {:.4}  perplexity {:.3}  over {} predicted tokens ({} windows of {block})",
            r.loss,
            r.perplexity(),
            r.tokens,
            r.tokens / block
        );
    }
    Ok(())
}
