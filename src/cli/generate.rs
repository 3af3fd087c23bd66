//! `tapelora generate`: continue a prompt with a model folder.

use std::path::PathBuf;

use clap::Args;
use tapelora_gpt::generate::{generate, SamplingConfig};
use tapelora_gpt::tokenizer::Tokenizer;

use super::CliResult;

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[arg(long)]
    pub model: PathBuf,
    /// LoRA adapter folder(s) (PEFT format), `DIR` or `DIR:WEIGHT`; several are summed.
    #[arg(long)]
    pub adapter: Vec<String>,
    #[arg(long)]
    pub prompt: String,
    #[arg(long, default_value_t = 200)]
    pub max_new_tokens: usize,
    /// Sampling temperature (0: greedy).
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f64,
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long)]
    pub top_p: Option<f64>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn run(args: GenerateArgs) -> CliResult {
    let model = super::lora::load_with_adapters(&args.model, &args.adapter)?;
    let tokenizer = Tokenizer::from_model_dir(&args.model, model.config.vocab_size)
        .map_err(|e| e.to_string())?;
    let prompt = tokenizer
        .encode(&args.prompt)
        .map_err(|e| format!("--prompt: {e}"))?;
    let cfg = SamplingConfig {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
        stop_token: tokenizer.eot_token(),
        use_cache: true,
    };
    let new = generate(&model, &prompt, &cfg).map_err(|e| e.to_string())?;
    let new: Vec<u32> = new
        .into_iter()
        .take_while(|&t| Some(t) != tokenizer.eot_token())
        .collect();
    let text = tokenizer.decode(&new).map_err(|e| e.to_string())?;
    println!("{}{text}", args.prompt);
    Ok(())
}
