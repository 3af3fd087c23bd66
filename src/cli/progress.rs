//! Training progress on stderr: an indicatif bar on a terminal, plain lines otherwise (or with
//! `--quiet`), so logs stay readable in CI and when piped.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use tapelora_gpt::data::Dataset;
use tapelora_gpt::train::{
    train_full, Checkpointing, StepHook, TrainConfig, TrainEvent, TrainSummary,
};
use tapelora_gpt::Gpt;

pub struct Progress {
    bar: Option<ProgressBar>,
    every: usize,
    steps: usize,
}

impl Progress {
    pub fn new(steps: usize, quiet: bool) -> Self {
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::new(steps as u64);
            bar.set_style(
                ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  ETA {eta}")
                    .expect("valid template"),
            );
            bar
        });
        Progress {
            bar,
            every: (steps / 20).max(1),
            steps,
        }
    }

    pub fn on_event(&mut self, event: &TrainEvent) {
        match (event, &self.bar) {
            (
                TrainEvent::Step {
                    step,
                    loss,
                    tokens_per_sec,
                    ..
                },
                Some(bar),
            ) => {
                bar.set_position(*step as u64 + 1);
                bar.set_message(format!("loss {loss:.4}  {tokens_per_sec:.0} tok/s"));
            }
            (
                TrainEvent::Step {
                    step,
                    loss,
                    lr,
                    tokens_per_sec,
                    elapsed,
                    ..
                },
                None,
            ) => {
                if (step + 1) % self.every == 0 || *step == 0 || step + 1 == self.steps {
                    eprintln!(
                        "step {:>6}/{}  loss {loss:.4}  lr {lr:.2e}  {tokens_per_sec:.0} tok/s  {elapsed:.1}s",
                        step + 1,
                        self.steps
                    );
                }
            }
            (TrainEvent::Eval { step, val_loss }, bar) => {
                let line = format!("step {:>6}  val loss {val_loss:.4}", step + 1);
                match bar {
                    Some(bar) => bar.println(line),
                    None => eprintln!("{line}"),
                }
            }
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// Trains with a progress display and returns the summary and the history of events (the
/// `history` of `metrics.json`: `{step, loss, lr, grad_norm}` and `{step, val_loss}` entries).
pub fn train_with_progress(
    model: &mut Gpt,
    data: &Dataset,
    cfg: &TrainConfig,
    quiet: bool,
    hook: &mut dyn StepHook,
    checkpointing: Option<Checkpointing<'_>>,
) -> Result<(TrainSummary, Vec<Value>), String> {
    let mut progress = Progress::new(cfg.steps, quiet);
    let mut history = Vec::new();
    let summary = train_full(
        model,
        data,
        cfg,
        &mut |e| {
            progress.on_event(e);
            history.push(match e {
                TrainEvent::Step {
                    step,
                    loss,
                    lr,
                    grad_norm,
                    ..
                } => json!({"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm}),
                TrainEvent::Eval { step, val_loss } => json!({"step": step, "val_loss": val_loss}),
            });
        },
        hook,
        checkpointing,
    )
    .map_err(|e| e.to_string())?;
    progress.finish();
    Ok((summary, history))
}
