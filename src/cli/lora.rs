//! LoRA commands: `finetune` (LoRA or `--full`), `merge`, `inspect`, and loading `--adapter`s
//! for `eval` / `generate`.

use std::path::{Path, PathBuf};

use clap::{Args, ValueEnum};
use rand::SeedableRng;
use serde_json::json;
use tapelora_gpt::data::{num_windows, Dataset};
use tapelora_gpt::hf::{load_model, save_model};
use tapelora_gpt::tokenizer::Tokenizer;
use tapelora_gpt::train::{Checkpointing, TrainConfig, TrainState};
use tapelora_gpt::Gpt;
use tapelora_lora::peft::{inspect_adapter, load_adapter, save_adapter, save_adapter_with};
use tapelora_lora::{thousands, InitA, LoraBias, LoraConfig, LoraModel};
use tapelora_nn::{write_atomic, Module, TensorFile};

use super::checkpoint::{
    catch_ctrl_c, check_finite, exit_interrupted, fingerprint, read_state, read_trainable,
    weights_fingerprint, write_state, write_trainable, RunOptions, STOP,
};
use super::progress::train_with_progress;
use super::{check_out_dir, read_text, CliResult};

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum BiasArg {
    None,
    All,
    LoraOnly,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum InitArg {
    Kaiming,
    Gaussian,
}

#[derive(Args, Debug)]
pub struct FinetuneArgs {
    /// The base model folder (never written to).
    #[arg(long)]
    pub model: PathBuf,
    /// UTF-8 text to fine-tune on (90% train, 10% validation).
    #[arg(long)]
    pub data: PathBuf,
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    /// LoRA α (the update is scaled by α/r, or α/√r with --rslora).
    #[arg(long, default_value_t = 16.0)]
    pub alpha: f64,
    /// Modules to adapt, comma-separated: c_attn, c_attn.q, c_attn.k, c_attn.v, attn.c_proj,
    /// c_fc, mlp.c_proj, c_proj, or all-linear (every linear layer of every block).
    #[arg(long, value_delimiter = ',', default_value = "c_attn.q,c_attn.v")]
    pub targets: Vec<String>,
    /// Only adapt these blocks (comma-separated indices).
    #[arg(long, value_delimiter = ',')]
    pub layers: Option<Vec<usize>>,
    #[arg(long, default_value_t = 0.0)]
    pub dropout: f64,
    #[arg(long)]
    pub rslora: bool,
    #[arg(long, value_enum, default_value_t = BiasArg::None)]
    pub bias: BiasArg,
    #[arg(long, value_enum, default_value_t = InitArg::Kaiming)]
    pub init: InitArg,
    /// Fine-tune every weight instead (the baseline LoRA is compared with); writes a model folder.
    #[arg(long)]
    pub full: bool,
    #[arg(long, default_value_t = 500)]
    pub steps: usize,
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    #[arg(long)]
    pub min_lr: Option<f64>,
    #[arg(long, default_value_t = 50)]
    pub warmup: usize,
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = 12)]
    pub batch: usize,
    /// Window length (default: the model's context, at most 256).
    #[arg(long)]
    pub block: Option<usize>,
    #[arg(long, default_value_t = 1.0)]
    pub clip: f64,
    #[arg(long, default_value_t = 1337)]
    pub seed: u64,
    #[arg(long, default_value_t = 100)]
    pub eval_every: usize,
    /// The adapter folder (PEFT format) to write, or a model folder with --full.
    #[arg(long)]
    pub out: PathBuf,
    /// Also write a checkpoint into --out every N steps (0: only when interrupted by Ctrl-C).
    #[arg(long, default_value_t = 0)]
    pub checkpoint_every: usize,
    /// Continue the run whose checkpoint is in this folder (same --model, --data and options).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Check every op's output and gradient for NaN/Inf, so a diverging run names the op (slower).
    #[arg(long)]
    pub detect_anomaly: bool,
    #[command(flatten)]
    pub run: super::trace::RunOutputArgs,
}

/// What a resumed fine-tune must share with the interrupted one.
fn finetune_options(args: &FinetuneArgs, text: &str, base: &Gpt) -> RunOptions {
    vec![
        ("--model", weights_fingerprint(base)),
        ("--data", fingerprint(text.as_bytes())),
        ("--full", args.full.to_string()),
        ("--rank", args.rank.to_string()),
        ("--alpha", args.alpha.to_string()),
        ("--targets", args.targets.join(",")),
        ("--layers", format!("{:?}", args.layers)),
        ("--dropout", args.dropout.to_string()),
        ("--rslora", args.rslora.to_string()),
        ("--bias", format!("{:?}", args.bias)),
        ("--init", format!("{:?}", args.init)),
        ("--lr", args.lr.to_string()),
        ("--min-lr", format!("{:?}", args.min_lr)),
        ("--warmup", args.warmup.to_string()),
        ("--weight-decay", args.weight_decay.to_string()),
        ("--batch", args.batch.to_string()),
        ("--block", format!("{:?}", args.block)),
        ("--clip", args.clip.to_string()),
        ("--seed", args.seed.to_string()),
    ]
}

fn same_folder(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

pub fn finetune(args: FinetuneArgs) -> CliResult {
    if same_folder(&args.model, &args.out) {
        return Err(format!(
            "--out {}: is the base model folder; choose another folder (the base is never written)",
            args.out.display()
        ));
    }
    let model = load_model(&args.model).map_err(|e| e.to_string())?;
    let tokenizer = Tokenizer::from_model_dir(&args.model, model.config.vocab_size)
        .map_err(|e| e.to_string())?;
    let text = read_text(&args.data)?;
    let options = finetune_options(&args, &text, &model);
    let tokens = tokenizer
        .encode(&text)
        .map_err(|e| format!("{}: {e}", args.data.display()))?;
    let block = args.block.unwrap_or(model.config.n_positions.min(256));
    let train_cfg = TrainConfig {
        batch: args.batch,
        block,
        steps: args.steps,
        lr: args.lr,
        min_lr: args.min_lr.unwrap_or(args.lr / 10.0),
        warmup: args.warmup,
        weight_decay: args.weight_decay,
        clip: (args.clip > 0.0).then_some(args.clip),
        seed: args.seed,
        eval_every: args.eval_every,
        detect_anomaly: args.detect_anomaly,
        ..TrainConfig::nanogpt_cpu(args.steps, block)
    };
    train_cfg
        .validate(model.config.n_positions)
        .map_err(|e| e.to_string())?;
    let data = Dataset::split(tokens, 0.1);
    if data.train.len() <= block || num_windows(data.val.len(), block) == 0 {
        return Err(format!("{}: {} tokens are too few for windows of {block} tokens in both the 90% and the 10% split", args.data.display(), data.train.len() + data.val.len()));
    }
    check_out_dir(&args.out)?;

    let base_tensors: Vec<String> = model.parameters().iter().map(|p| p.name.clone()).collect();
    let mut lm = LoraModel::new(model);
    if args.full {
        lm.model.unfreeze();
    } else {
        let config = LoraConfig {
            r: args.rank,
            lora_alpha: args.alpha,
            use_rslora: args.rslora,
            lora_dropout: args.dropout,
            target_modules: args.targets.clone(),
            layers_to_transform: args.layers.clone(),
            bias: match args.bias {
                BiasArg::None => LoraBias::None,
                BiasArg::All => LoraBias::All,
                BiasArg::LoraOnly => LoraBias::LoraOnly,
            },
            init_a: match args.init {
                InitArg::Kaiming => InitA::KaimingUniform,
                InitArg::Gaussian => InitA::Gaussian,
            },
            ..LoraConfig::default()
        };
        let option_name = |field: &str| {
            match field {
                "r" => "--rank",
                "lora_alpha" => "--alpha",
                "lora_dropout" => "--dropout",
                "target_modules" => "--targets",
                "layers_to_transform" => "--layers",
                other => other,
            }
            .to_string()
        };
        lm.add_adapter(
            "default",
            &config,
            &mut rand_chacha::ChaCha8Rng::seed_from_u64(args.seed),
        )
        .map_err(|e| match e {
            tapelora_lora::LoraError::Config { field, msg } => {
                format!("{}: {msg}", option_name(&field))
            }
            other => other.to_string(),
        })?;
    }
    let resume = match &args.resume {
        None => None,
        Some(dir) => {
            // The options first: a mismatch is best reported by the option's name.
            let state = read_state(dir, &options)?;
            if args.full {
                let checkpoint = load_model(dir).map_err(|e| format!("--resume: {e}"))?;
                if checkpoint.config != lm.model.config {
                    return Err(format!(
                        "--resume {}: the checkpoint's model differs from --model's",
                        dir.display()
                    ));
                }
                lm.model = checkpoint;
                lm.model.unfreeze();
            } else {
                read_trainable(dir, &mut lm.model)?;
            }
            Some(state)
        }
    };
    let trainable = lm.model.num_trainable_params();
    let trainable_tensors = lm.model.parameters().iter().filter(|p| p.trainable).count();
    eprintln!("{}", lm.trainable_parameters_line());
    eprintln!(
        "optimizer state (AdamW): {} bytes",
        thousands(trainable * 8 + trainable_tensors * 8)
    );
    let mut hooks = super::trace::hooks(
        args.run.trace.as_deref(),
        args.run.trace_every,
        args.steps,
        args.run.trace_tape,
        &lm.model,
        &base_tensors,
    )?;
    catch_ctrl_c();
    let adapter_config = lm.configs.get("default").cloned();
    let base_name = args.model.display().to_string();
    let out = args.out.clone();
    let mut save = |m: &Gpt, state: &TrainState| -> tapelora_gpt::Result<()> {
        check_finite(m, state)?;
        match &adapter_config {
            None => save_model(m, &out, |dir| {
                tokenizer
                    .save(dir)
                    .map_err(|e| tapelora_gpt::GptError::Input(e.to_string()))?;
                write_state(dir, state, &options)
            }),
            Some(config) => save_adapter_with(m, config, "default", &out, &base_name, |dir| {
                write_trainable(dir, m)?;
                write_state(dir, state, &options)
            })
            .map_err(|e| tapelora_gpt::GptError::Input(e.to_string())),
        }
    };
    let checkpointing = Checkpointing {
        resume,
        every: args.checkpoint_every,
        save: &mut save,
        stop: Some(&STOP),
    };
    let (summary, history) = train_with_progress(
        &mut lm.model,
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
        "trainable_params": trainable,
        "all_params": lm.model.num_params(),
        "optimizer_state_bytes": summary.optimizer_state_bytes,
        "method": if args.full { "full" } else { "lora" },
    });
    let metrics = json!({"summary": result, "history": history});
    let metrics_bytes = serde_json::to_string(&metrics).expect("JSON");
    if args.full {
        let model = lm.merge_and_unload().map_err(|e| e.to_string())?;
        save_model(&model, &args.out, |dir| {
            tokenizer
                .save(dir)
                .map_err(|e| tapelora_gpt::GptError::Input(e.to_string()))?;
            write_atomic(&dir.join("metrics.json"), metrics_bytes.as_bytes())?;
            Ok(())
        })
        .map_err(|e| e.to_string())?;
    } else {
        save_adapter(&lm, "default", &args.out, &args.model.display().to_string())
            .map_err(|e| e.to_string())?;
        write_atomic(&args.out.join("metrics.json"), metrics_bytes.as_bytes())
            .map_err(|e| e.to_string())?;
    }
    eprintln!(
        "done: train loss {:.4}, val loss {}, {:.1} s; {} written to {}",
        summary.train_loss,
        summary.val_loss.map_or("-".into(), |v| format!("{v:.4}")),
        summary.seconds,
        if args.full { "model" } else { "adapter" },
        args.out.display()
    );
    if args.run.json {
        println!("{result}");
    }
    Ok(())
}

/// Loads a model folder plus `--adapter DIR[:WEIGHT]` adapters (several: a weighted sum).
pub fn load_with_adapters(model_dir: &Path, adapters: &[String]) -> Result<Gpt, String> {
    Ok(load_lora_model(model_dir, adapters)?.model)
}

fn load_lora_model(model_dir: &Path, adapters: &[String]) -> Result<LoraModel, String> {
    let mut lm = LoraModel::new(load_model(model_dir).map_err(|e| e.to_string())?);
    let mut weighted = Vec::new();
    for (i, spec) in adapters.iter().enumerate() {
        let (dir, weight) = match spec.rsplit_once(':') {
            Some((dir, w)) if !w.is_empty() && w.parse::<f64>().is_ok() => {
                (dir, w.parse::<f64>().expect("checked"))
            }
            _ => (spec.as_str(), 1.0),
        };
        if !weight.is_finite() {
            return Err(format!(
                "--adapter {spec}: the weight must be a finite number"
            ));
        }
        let name = format!("adapter{i}");
        load_adapter(&mut lm, &name, Path::new(dir)).map_err(|e| e.to_string())?;
        weighted.push((name, weight));
    }
    if !weighted.is_empty() {
        lm.set_weighted_adapters(&weighted)
            .map_err(|e| e.to_string())?;
    }
    Ok(lm)
}

#[derive(Args, Debug)]
pub struct MergeArgs {
    #[arg(long)]
    pub model: PathBuf,
    /// Adapter folder(s), `DIR` or `DIR:WEIGHT`.
    #[arg(long, required = true)]
    pub adapter: Vec<String>,
    /// The merged model folder to write.
    #[arg(long)]
    pub out: PathBuf,
}

pub fn merge(args: MergeArgs) -> CliResult {
    if same_folder(&args.model, &args.out) {
        return Err(format!(
            "--out {}: is the base model folder; choose another folder",
            args.out.display()
        ));
    }
    let base = load_model(&args.model).map_err(|e| e.to_string())?;
    let tokenizer = Tokenizer::from_model_dir(&args.model, base.config.vocab_size)
        .map_err(|e| e.to_string())?;
    drop(base);
    check_out_dir(&args.out)?;
    let merged = load_lora_model(&args.model, &args.adapter)?
        .merge_and_unload()
        .map_err(|e| e.to_string())?;
    save_model(&merged, &args.out, |dir| {
        tokenizer
            .save(dir)
            .map_err(|e| tapelora_gpt::GptError::Input(e.to_string()))
    })
    .map_err(|e| e.to_string())?;
    eprintln!(
        "merged {} adapter(s) into {}",
        args.adapter.len(),
        args.out.display()
    );
    Ok(())
}

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// An adapter folder (adapter_config.json) or a model folder (config.json).
    pub path: PathBuf,
    #[arg(long)]
    pub json: bool,
}

pub fn inspect(args: InspectArgs) -> CliResult {
    let path = &args.path;
    if path.join(tapelora_lora::peft::ADAPTER_CONFIG).exists() {
        let report = inspect_adapter(path).map_err(|e| e.to_string())?;
        if args.json {
            let modules: Vec<_> = report.modules.iter().map(|m| json!({"name": m.name, "r": m.r, "rank": m.rank, "delta_fro_norm": m.delta_fro_norm, "singular_values": m.singular_values})).collect();
            println!(
                "{}",
                json!({"trainable_params": report.trainable_params, "modules": modules})
            );
        } else {
            let c = &report.config;
            println!(
                "LoRA adapter {}: r={} alpha={} rslora={} targets={:?} — {} trainable params",
                path.display(),
                c.r,
                c.lora_alpha,
                c.use_rslora,
                c.target_modules,
                thousands(report.trainable_params)
            );
            println!(
                "{:<24} {:>4} {:>5} {:>12}  top singular values of ΔW",
                "module", "r", "rank", "‖ΔW‖_F"
            );
            for m in &report.modules {
                let sv: Vec<String> = m
                    .singular_values
                    .iter()
                    .take(6)
                    .map(|s| format!("{s:.3e}"))
                    .collect();
                println!(
                    "{:<24} {:>4} {:>5} {:>12.4e}  {}",
                    m.name,
                    m.r,
                    m.rank,
                    m.delta_fro_norm,
                    sv.join(" ")
                );
            }
        }
        return Ok(());
    }
    let config = tapelora_gpt::hf::load_config(path).map_err(|e| e.to_string())?;
    let weights = path.join(tapelora_gpt::hf::WEIGHTS_FILE);
    let file = TensorFile::open(&weights).map_err(|e| e.to_string())?;
    let tensors: Vec<(String, String, Vec<usize>)> = file
        .names()
        .into_iter()
        .map(|n| {
            let (dtype, shape) = file.info(&n).expect("listed");
            (n, format!("{dtype:?}"), shape)
        })
        .collect();
    let total: usize = tensors
        .iter()
        .map(|(_, _, s)| s.iter().product::<usize>())
        .sum();
    if args.json {
        let list: Vec<_> = tensors.iter().map(|(n, d, s)| json!({"name": n, "dtype": d, "shape": s, "numel": s.iter().product::<usize>()})).collect();
        println!(
            "{}",
            json!({"config": config.to_hf_json(), "total_params": total, "tensors": list})
        );
    } else {
        println!("model {}: {} layers, {} heads, {} wide, context {}, vocab {} — {} parameters in {} tensors", path.display(), config.n_layer, config.n_head, config.n_embd, config.n_positions, config.vocab_size, thousands(total), tensors.len());
        for (n, d, s) in &tensors {
            println!("  {n:<44} {d:<5} {s:?}");
        }
    }
    Ok(())
}
