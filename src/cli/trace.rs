//! The per-step audit trail (`--trace FILE`, JSON Lines; schema in docs/TRACE.md) and the
//! one-step tape printout (`--trace-tape` or `TAPELORA_TRACE_TAPE=1`).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::json;
use tapelora_autograd::{Gradients, Tape, Tensor};
use tapelora_gpt::train::StepHook;
use tapelora_gpt::{Gpt, GptError};
use tapelora_lora::analysis::module_reports;
use tapelora_lora::lora_layers_of;
use tapelora_nn::Module;

/// Output options shared by `train` and `finetune`.
#[derive(clap::Args, Debug)]
pub struct RunOutputArgs {
    /// Print a JSON summary as the last line of stdout.
    #[arg(long)]
    pub json: bool,
    /// Plain progress lines instead of a progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Write a JSON Lines audit record per optimizer step to this file (docs/TRACE.md).
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// Compute the ΔW spectra of the trace every N steps (SVDs cost time).
    #[arg(long, default_value_t = 10)]
    pub trace_every: usize,
    /// Print step 0's tape and its backward walk (also: TAPELORA_TRACE_TAPE=1).
    #[arg(long)]
    pub trace_tape: bool,
}

/// FNV-1a over the bit patterns of the values: any change of any bit changes the checksum.
pub fn checksum(t: &Tensor<f32>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for v in t.iter() {
        for b in v.to_bits().to_le_bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

fn l2(t: impl Iterator<Item = f32>) -> f64 {
    t.map(|v| (v as f64) * (v as f64)).sum::<f64>().sqrt()
}

/// Writes one JSON record per optimizer step.
pub struct TraceWriter {
    path: PathBuf,
    file: std::io::BufWriter<std::fs::File>,
    every: usize,
    last_step: usize,
    frozen_at_start: BTreeMap<String, u64>,
    /// Trainable tensors before the update, and their gradient norms.
    before: BTreeMap<String, (Tensor<f32>, f64)>,
}

impl TraceWriter {
    /// Starts a trace of `model`'s training. `watched` are the base tensors whose checksums are
    /// taken now and compared after every step (for a LoRA fine-tune: every base weight).
    pub fn create(
        path: &Path,
        every: usize,
        steps: usize,
        model: &Gpt,
        watched: &[String],
    ) -> Result<Self, String> {
        let file =
            std::fs::File::create(path).map_err(|e| format!("--trace {}: {e}", path.display()))?;
        let frozen_at_start = model
            .parameters()
            .iter()
            .filter(|p| watched.contains(&p.name))
            .map(|p| (p.name.clone(), checksum(&p.value)))
            .collect();
        Ok(TraceWriter {
            path: path.to_path_buf(),
            file: std::io::BufWriter::new(file),
            every: every.max(1),
            last_step: steps.saturating_sub(1),
            frozen_at_start,
            before: BTreeMap::new(),
        })
    }
}

/// Prints step 0's tape (forward order) and its backward walk to stderr.
pub struct TapePrinter;

impl StepHook for TapePrinter {
    fn wants_tape(&self, step: usize) -> bool {
        step == 0
    }
    fn on_tape(&mut self, step: usize, tape: &Tape<f32>) {
        if step == 0 {
            eprintln!(
                "The tape of step 0, in forward order ({} records):\n{tape}\n{}",
                tape.len(),
                tape.backward_walk()
            );
        }
    }
}

/// Runs several hooks in order.
pub struct Hooks(pub Vec<Box<dyn StepHook>>);

impl StepHook for Hooks {
    fn wants_tape(&self, step: usize) -> bool {
        self.0.iter().any(|h| h.wants_tape(step))
    }
    fn on_tape(&mut self, step: usize, tape: &Tape<f32>) {
        self.0.iter_mut().for_each(|h| h.on_tape(step, tape));
    }
    fn before_update(&mut self, step: usize, model: &Gpt, grads: &Gradients<f32>) {
        self.0
            .iter_mut()
            .for_each(|h| h.before_update(step, model, grads));
    }
    fn after_update(
        &mut self,
        step: usize,
        loss: f64,
        lr: f64,
        model: &Gpt,
    ) -> tapelora_gpt::Result<()> {
        for h in &mut self.0 {
            h.after_update(step, loss, lr, model)?;
        }
        Ok(())
    }
}

impl StepHook for TraceWriter {
    fn before_update(&mut self, _step: usize, model: &Gpt, grads: &Gradients<f32>) {
        // Sharing the buffer is enough: the optimizer's in-place update then copies it
        // (copy-on-write), leaving this snapshot as it was.
        self.before = model
            .parameters()
            .iter()
            .filter(|p| p.trainable)
            .map(|p| {
                let g = grads
                    .get_by_name(&p.name)
                    .map_or(0.0, |g| l2(g.iter().copied()));
                (p.name.clone(), (p.value.clone(), g))
            })
            .collect();
    }

    fn after_update(
        &mut self,
        step: usize,
        loss: f64,
        lr: f64,
        model: &Gpt,
    ) -> tapelora_gpt::Result<()> {
        let mut trainable = Vec::new();
        let mut frozen = Vec::new();
        for p in model.parameters() {
            if let Some((old, grad_norm)) = self.before.get(&p.name) {
                let update = l2(p.value.iter().zip(old.iter()).map(|(n, o)| n - o));
                let norm = l2(p.value.iter().copied());
                trainable.push(json!({"name": p.name, "grad_norm": grad_norm, "update_norm": update, "param_norm": norm, "update_ratio": update / norm.max(1e-30)}));
            }
            if let Some(&start) = self.frozen_at_start.get(&p.name) {
                let now = checksum(&p.value);
                frozen.push(json!({"name": p.name, "checksum": format!("{now:016x}"), "unchanged": now == start}));
            }
        }
        self.before.clear();
        let mut record =
            json!({"step": step, "loss": loss, "lr": lr, "trainable": trainable, "frozen": frozen});
        if step.is_multiple_of(self.every) || step == self.last_step {
            let layers = lora_layers_of(model);
            if !layers.is_empty() {
                let modules: Vec<_> = module_reports(&layers, "default", Some(8))
                    .into_iter()
                    .map(|m| json!({"name": m.name, "r": m.r, "delta_fro_norm": m.delta_fro_norm, "rank": m.rank, "singular_values": m.singular_values}))
                    .collect();
                record["lora"] = json!(modules);
            }
        }
        writeln!(self.file, "{record}")
            .and_then(|_| self.file.flush())
            .map_err(|e| GptError::Io {
                path: self.path.clone(),
                source: e,
            })
    }
}

/// The hooks asked for on the command line; `watched` as in [`TraceWriter::create`].
pub fn hooks(
    trace: Option<&Path>,
    every: usize,
    steps: usize,
    print_tape: bool,
    model: &Gpt,
    watched: &[String],
) -> Result<Hooks, String> {
    let print_tape = print_tape || std::env::var("TAPELORA_TRACE_TAPE").is_ok_and(|v| v == "1");
    let mut list: Vec<Box<dyn StepHook>> = Vec::new();
    if print_tape {
        list.push(Box::new(TapePrinter));
    }
    if let Some(path) = trace {
        list.push(Box::new(TraceWriter::create(
            path, every, steps, model, watched,
        )?));
    }
    Ok(Hooks(list))
}
