//! Checkpoints shared by `train` and `finetune`: Ctrl-C handling, the training state file, and
//! the check that `--resume` continues the run it claims to (same options, same data).
//!
//! A checkpoint folder is what the command writes at the end (a model folder, or a PEFT adapter
//! folder) plus `training_state.safetensors`: the optimizer's tensors, and in its metadata the
//! next step, the batch sampler's RNG position, the last loss and the run's options. A LoRA
//! checkpoint also holds `adapter_state.safetensors`, the trainable tensors under their
//! in-model names (the PEFT export folds q/v slices into c_attn, so it cannot be read back
//! into the optimizer's parameters one to one).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use tapelora_gpt::train::TrainState;
use tapelora_gpt::{Gpt, GptError};
use tapelora_nn::{save_safetensors, Module, TensorFile};

pub const STATE_FILE: &str = "training_state.safetensors";
pub const ADAPTER_STATE_FILE: &str = "adapter_state.safetensors";

/// Set by Ctrl-C: the run finishes its step, writes a checkpoint and stops.
pub static STOP: AtomicBool = AtomicBool::new(false);

pub fn catch_ctrl_c() {
    // Fails only if a handler is already installed (a second run in one process): keep it.
    let _ = ctrlc::set_handler(|| STOP.store(true, Ordering::SeqCst));
}

/// After a Ctrl-C checkpoint: says how to continue and exits with 130 (128 + SIGINT).
pub fn exit_interrupted(out: &Path) -> ! {
    eprintln!(
        "interrupted: checkpoint written to {o}; continue with the same command plus `--resume {o}`",
        o = out.display()
    );
    std::process::exit(130);
}

/// The options a resumed run must share with the interrupted one, as (option, value).
pub type RunOptions = Vec<(&'static str, String)>;

/// A short fingerprint (FNV-1a, 64 bit) of some bytes: the training text, the base weights.
#[derive(Clone, Copy)]
pub struct Fingerprint(u64);

impl Default for Fingerprint {
    fn default() -> Self {
        Fingerprint(0xcbf2_9ce4_8422_2325)
    }
}

impl Fingerprint {
    pub fn update(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
    }

    pub fn hex(&self) -> String {
        format!("{:016x}", self.0)
    }
}

pub fn fingerprint(bytes: &[u8]) -> String {
    let mut f = Fingerprint::default();
    f.update(bytes);
    f.hex()
}

/// Fingerprint of a model's weights (names and values), to tell one base model from another.
pub fn weights_fingerprint(model: &Gpt) -> String {
    let mut f = Fingerprint::default();
    for p in model.parameters() {
        f.update(p.name.as_bytes());
        for x in p.value.iter() {
            f.update(&x.to_le_bytes());
        }
    }
    f.hex()
}

/// Refuses to checkpoint weights holding NaN or infinity (they could never be resumed).
pub fn check_finite(model: &Gpt, state: &TrainState) -> tapelora_gpt::Result<()> {
    match model
        .parameters()
        .into_iter()
        .find(|p| p.value.iter().any(|v| !v.is_finite()))
    {
        Some(p) => Err(GptError::Input(format!(
            "not writing a checkpoint at step {}: `{}` holds NaN or infinite values",
            state.next_step, p.name
        ))),
        None => Ok(()),
    }
}

pub fn write_state(
    dir: &Path,
    state: &TrainState,
    options: &RunOptions,
) -> tapelora_gpt::Result<()> {
    let options: BTreeMap<&str, &str> = options.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let meta = HashMap::from([
        ("next_step".to_string(), state.next_step.to_string()),
        ("rng_word_pos".to_string(), state.rng_word_pos.to_string()),
        (
            "last_loss_bits".to_string(),
            state.last_loss.to_bits().to_string(),
        ),
        (
            "options".to_string(),
            serde_json::to_string(&options).expect("JSON"),
        ),
    ]);
    let tensors: Vec<(&str, ndarray::ArrayViewD<'_, f32>)> = state
        .optimizer
        .iter()
        .map(|(n, t)| (n.as_str(), t.view()))
        .collect();
    save_safetensors(&dir.join(STATE_FILE), tensors, Some(meta))?;
    Ok(())
}

/// Reads a checkpoint's training state, refusing one made with other options.
pub fn read_state(dir: &Path, options: &RunOptions) -> Result<TrainState, String> {
    let path = dir.join(STATE_FILE);
    let file = TensorFile::open(&path).map_err(|e| format!("--resume: {e}"))?;
    let field = |key: &str| {
        file.metadata().get(key).cloned().ok_or_else(|| {
            format!(
                "--resume: {}: missing `{key}` in the metadata",
                path.display()
            )
        })
    };
    let bad = |key: &str| format!("--resume: {}: `{key}` is not a number", path.display());
    let stored: BTreeMap<String, String> =
        serde_json::from_str(&field("options")?).map_err(|_| {
            format!(
                "--resume: {}: `options` is not a JSON object of strings",
                path.display()
            )
        })?;
    for (option, value) in options {
        match stored.get(*option) {
            Some(then) if then != value => {
                return Err(format!(
                    "--resume {}: the checkpoint was made with {option} {then}, this run has {value}; pass the options of the interrupted run",
                    dir.display()
                ))
            }
            None => {
                return Err(format!(
                    "--resume {}: the checkpoint does not record {option}; it was made by another command",
                    dir.display()
                ))
            }
            _ => {}
        }
    }
    let mut optimizer = BTreeMap::new();
    for name in file.names() {
        let t = file.f32(&name).map_err(|e| format!("--resume: {e}"))?;
        optimizer.insert(name, t);
    }
    Ok(TrainState {
        next_step: field("next_step")?.parse().map_err(|_| bad("next_step"))?,
        rng_word_pos: field("rng_word_pos")?
            .parse()
            .map_err(|_| bad("rng_word_pos"))?,
        last_loss: f64::from_bits(
            field("last_loss_bits")?
                .parse()
                .map_err(|_| bad("last_loss_bits"))?,
        ),
        optimizer,
    })
}

/// Writes the trainable tensors under their in-model names.
pub fn write_trainable(dir: &Path, model: &Gpt) -> tapelora_gpt::Result<()> {
    let params = model.parameters();
    let tensors: Vec<(&str, ndarray::ArrayViewD<'_, f32>)> = params
        .iter()
        .filter(|p| p.trainable)
        .map(|p| (p.name.as_str(), p.value.view()))
        .collect();
    save_safetensors(&dir.join(ADAPTER_STATE_FILE), tensors, None)?;
    Ok(())
}

/// Loads the trainable tensors written by [`write_trainable`]; the names and shapes must be
/// exactly the model's trainable ones.
pub fn read_trainable(dir: &Path, model: &mut Gpt) -> Result<(), String> {
    let path = dir.join(ADAPTER_STATE_FILE);
    let file = TensorFile::open(&path).map_err(|e| format!("--resume: {e}"))?;
    let mut stored: std::collections::BTreeSet<String> = file.names().into_iter().collect();
    for p in model.parameters_mut() {
        if !p.trainable {
            continue;
        }
        if !stored.remove(&p.name) {
            return Err(format!(
                "--resume: {}: no tensor `{}`; the checkpoint's adapter differs from the one these options describe",
                path.display(),
                p.name
            ));
        }
        let t = file.f32(&p.name).map_err(|e| format!("--resume: {e}"))?;
        if t.shape() != p.value.shape() {
            return Err(format!(
                "--resume: {}: `{}` has shape {:?}, expected {:?}",
                path.display(),
                p.name,
                t.shape(),
                p.value.shape()
            ));
        }
        p.value_mut().assign(&t);
    }
    if let Some(extra) = stored.into_iter().next() {
        return Err(format!(
            "--resume: {}: `{extra}` is not a trainable tensor of this run; the checkpoint's adapter differs from the one these options describe",
            path.display()
        ));
    }
    Ok(())
}
