//! `tapelora graph`: run one training step of a model (with LoRA if asked) on a tiny batch and
//! print its tape as Graphviz DOT — ops, shapes, which inputs need gradients, which gradients
//! were computed and which were skipped (frozen paths drawn dashed).

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use clap::{Args, ValueEnum};
use ndarray::{ArrayD, IxDyn};
use rand::SeedableRng;
use tapelora_autograd::{DotOptions, Tape};
use tapelora_gpt::hf::load_model;
use tapelora_lora::{LoraConfig, LoraModel};
use tapelora_nn::{Ctx, Module};

use super::CliResult;

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum GraphFormat {
    Dot,
    /// Rendered by Graphviz's `dot` program (must be installed).
    Svg,
}

#[derive(Args, Debug)]
pub struct GraphArgs {
    #[arg(long)]
    pub model: PathBuf,
    /// Add a LoRA adapter of this rank first (random B, so every gradient is non-zero).
    #[arg(long)]
    pub rank: Option<usize>,
    #[arg(long, value_delimiter = ',', default_value = "c_attn.q,c_attn.v")]
    pub targets: Vec<String>,
    #[arg(long, value_enum, default_value_t = GraphFormat::Dot)]
    pub format: GraphFormat,
    /// Tokens per sequence of the tiny batch (2 sequences).
    #[arg(long, default_value_t = 4)]
    pub block: usize,
    /// Write to this file instead of stdout.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn run(args: GraphArgs) -> CliResult {
    let model = load_model(&args.model).map_err(|e| e.to_string())?;
    if args.block == 0 || args.block > model.config.n_positions {
        return Err(format!(
            "--block: must be between 1 and the model's context {}",
            model.config.n_positions
        ));
    }
    let mut lm = LoraModel::new(model);
    match args.rank {
        Some(r) => {
            let config = LoraConfig {
                random_b: true,
                ..LoraConfig::new(
                    r,
                    2.0 * r as f64,
                    &args.targets.iter().map(String::as_str).collect::<Vec<_>>(),
                )
            };
            lm.add_adapter(
                "default",
                &config,
                &mut rand_chacha::ChaCha8Rng::seed_from_u64(0),
            )
            .map_err(|e| e.to_string())?;
        }
        None => lm.model.unfreeze(),
    }
    let vocab = lm.model.config.vocab_size;
    let ids = ArrayD::from_shape_fn(IxDyn(&[2, args.block]), |i| (i[0] * 7 + i[1] * 3) % vocab);
    let targets: Vec<i64> = ids.iter().map(|&t| ((t + 1) % vocab) as i64).collect();
    let tape = Tape::new();
    tape.set_track_norms(true);
    let loss = lm
        .model
        .forward_loss(&Ctx::train(&tape, 0), &ids, &targets)
        .map_err(|e| e.to_string())?;
    tape.backward(&loss).map_err(|e| e.to_string())?;
    let dot = tape.to_dot(&DotOptions { norms: true });
    let bytes = match args.format {
        GraphFormat::Dot => dot.into_bytes(),
        GraphFormat::Svg => render_svg(&dot)?,
    };
    match &args.out {
        Some(path) => tapelora_nn::write_atomic(path, &bytes).map_err(|e| e.to_string())?,
        None => std::io::stdout()
            .write_all(&bytes)
            .map_err(|e| e.to_string())?,
    }
    Ok(())
}

fn render_svg(dot: &str) -> Result<Vec<u8>, String> {
    let mut child = Command::new("dot")
        .arg("-Tsvg")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("--format svg needs Graphviz's `dot` program ({e}); use --format dot and render it elsewhere"))?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(dot.as_bytes())
        .map_err(|e| e.to_string())?;
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "dot failed: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .next()
                .unwrap_or("")
        ));
    }
    Ok(out.stdout)
}
