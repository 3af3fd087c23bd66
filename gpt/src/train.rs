//! The training loop (nanoGPT's): random batches, AdamW with a warmup + cosine schedule,
//! gradient clipping, periodic evaluation — and evaluation on consecutive windows.
//!
//! The loop trains whatever parameters of the model are trainable, so the same loop does full
//! training and LoRA fine-tuning (where only the adapters are trainable). A small model's
//! steps record the batch as groups of sequences side by side ([`crate::step`]).

use std::time::Instant;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tapelora_autograd::{Gradients, Tape};
use tapelora_nn::{clip_grad_norm, AdamW, AdamWConfig, CosineSchedule, Ctx, Module, Optimizer};

use crate::data::{num_windows, random_batch, window_batch, Dataset};
use crate::model::Gpt;
use crate::step::{loss_and_gradients_observed, shards_for, TapeOptions};
use crate::{GptError, Result};

/// Hyper-parameters of a run.
#[derive(Clone, Debug)]
pub struct TrainConfig {
    pub batch: usize,
    pub block: usize,
    pub steps: usize,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup: usize,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    /// Clip the global gradient norm to this (None: no clipping).
    pub clip: Option<f64>,
    pub seed: u64,
    /// Evaluate every this many steps (0: only at the end).
    pub eval_every: usize,
    /// Windows used by the periodic evaluations (the final one uses all).
    pub eval_windows: usize,
    /// Anomaly mode on every step's tape: a NaN or infinity stops the run with the step *and*
    /// the op that produced it (slower: every op output and gradient is scanned).
    pub detect_anomaly: bool,
}

impl TrainConfig {
    /// nanoGPT's CPU recipe (`shakespeare_char` on a laptop): batch 12, AdamW lr 1e-3 with
    /// cosine decay to 1e-4, warmup 100, β2 0.99, weight decay 0.1, clip 1.0.
    pub fn nanogpt_cpu(steps: usize, block: usize) -> Self {
        TrainConfig {
            batch: 12,
            block,
            steps,
            lr: 1e-3,
            min_lr: 1e-4,
            warmup: 100,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.99,
            clip: Some(1.0),
            seed: 1337,
            eval_every: 250,
            eval_windows: 200,
            detect_anomaly: false,
        }
    }

    pub fn validate(&self, context: usize) -> Result<()> {
        let bad = |field: &str, msg: String| {
            Err(GptError::Config {
                field: field.into(),
                msg,
            })
        };
        if self.steps == 0 {
            return bad("--steps", "must be at least 1".into());
        }
        if self.batch == 0 {
            return bad("--batch", "must be at least 1".into());
        }
        if self.block == 0 || self.block > context {
            return bad(
                "--block",
                format!(
                    "must be between 1 and the model's context {context}, got {}",
                    self.block
                ),
            );
        }
        for (field, v) in [
            ("--lr", self.lr),
            ("--min-lr", self.min_lr),
            ("--weight-decay", self.weight_decay),
        ] {
            if !(v >= 0.0 && v.is_finite()) {
                return bad(field, format!("must be a finite number ≥ 0, got {v}"));
            }
        }
        if self.lr == 0.0 {
            return bad("--lr", "must be positive".into());
        }
        for (field, v) in [("--beta1", self.beta1), ("--beta2", self.beta2)] {
            if !(0.0..1.0).contains(&v) {
                return bad(field, format!("must be in [0, 1), got {v}"));
            }
        }
        if let Some(c) = self.clip {
            if !(c > 0.0 && c.is_finite()) {
                return bad("--clip", format!("must be positive, got {c}"));
            }
        }
        Ok(())
    }

    pub fn schedule(&self) -> CosineSchedule {
        CosineSchedule {
            max_lr: self.lr,
            min_lr: self.min_lr,
            warmup: self.warmup,
            decay_steps: self.steps,
        }
    }
}

/// What the loop reports as it goes (for progress bars, logs and traces).
#[derive(Clone, Debug)]
pub enum TrainEvent {
    Step {
        step: usize,
        loss: f64,
        lr: f64,
        grad_norm: f64,
        tokens_per_sec: f64,
        elapsed: f64,
    },
    Eval {
        step: usize,
        val_loss: f64,
    },
}

#[derive(Clone, Debug)]
pub struct TrainSummary {
    pub train_loss: f64,
    pub val_loss: Option<f64>,
    pub seconds: f64,
    pub tokens_per_sec: f64,
    /// Steps done by the run (up to `TrainConfig::steps`; fewer if stopped).
    pub steps: usize,
    pub optimizer_state_bytes: usize,
    /// True when the run stopped early on request (a checkpoint was saved first).
    pub stopped: bool,
}

/// Everything besides the weights needed to continue a run exactly: the next step, the batch
/// sampler's RNG position, the optimizer's state, and the last loss.
#[derive(Clone, Debug)]
pub struct TrainState {
    pub next_step: usize,
    /// `ChaCha8Rng::get_word_pos` of the batch sampler (seeded with `TrainConfig::seed`).
    pub rng_word_pos: u128,
    pub optimizer: std::collections::BTreeMap<String, ndarray::ArrayD<f32>>,
    pub last_loss: f64,
}

/// Checkpointing and resuming for [`train_full`].
pub struct Checkpointing<'a> {
    /// Continue from this state (the model must already hold the checkpoint's weights).
    pub resume: Option<TrainState>,
    /// Save every this many steps (0: only when stopping).
    pub every: usize,
    /// Writes a checkpoint (weights + state); called between steps.
    pub save: &'a mut dyn FnMut(&Gpt, &TrainState) -> Result<()>,
    /// When set (e.g. by a SIGINT handler), the run finishes its current step, saves, and stops.
    pub stop: Option<&'a std::sync::atomic::AtomicBool>,
}

/// Mean next-token loss over evaluation windows.
#[derive(Clone, Copy, Debug)]
pub struct EvalResult {
    pub loss: f64,
    /// Predicted targets (windows × block).
    pub tokens: usize,
}

impl EvalResult {
    pub fn perplexity(&self) -> f64 {
        self.loss.exp()
    }
}

/// Mean cross-entropy over the first `max_windows` (all, if None) consecutive non-overlapping
/// windows of `block` tokens. Records nothing on a tape.
pub fn evaluate(
    model: &Gpt,
    tokens: &[u32],
    block: usize,
    max_windows: Option<usize>,
) -> Result<EvalResult> {
    if block == 0 || block > model.config.n_positions {
        return Err(GptError::Config {
            field: "--block".into(),
            msg: format!(
                "must be between 1 and the model's context {}, got {block}",
                model.config.n_positions
            ),
        });
    }
    let windows = num_windows(tokens.len(), block).min(max_windows.unwrap_or(usize::MAX));
    if windows == 0 {
        return Err(GptError::Input(format!(
            "{} tokens are too few for one evaluation window of {block} tokens plus its target",
            tokens.len()
        )));
    }
    let per_batch = (4096 / block).max(1);
    let mut total = 0.0f64;
    let mut first = 0;
    while first < windows {
        let count = per_batch.min(windows - first);
        let (ids, targets) = window_batch(tokens, block, first, count);
        let tape = Tape::new();
        let loss = tape.no_grad(|| -> Result<f64> {
            let logits = model.forward(&Ctx::eval(&tape), &ids)?;
            Ok(logits
                .cross_entropy(&targets, None)?
                .item()
                .unwrap_or(f32::NAN) as f64)
        })?;
        total += loss * count as f64;
        first += count;
    }
    Ok(EvalResult {
        loss: total / windows as f64,
        tokens: windows * block,
    })
}

/// Observes the inside of each optimizer step (audit trails, tape printing). Every method has
/// a do-nothing default. Send: a step may run on any thread of the pool.
pub trait StepHook: Send {
    /// Whether to record value/gradient norms on this step's tape (for [`StepHook::on_tape`]).
    fn wants_tape(&self, _step: usize) -> bool {
        false
    }
    /// The step's tape right after backward (its records, with norms if asked for). A small
    /// model's step records its batch as groups of sequences side by side ([`crate::step`]):
    /// this is then the first group's tape (the batch's first sequences).
    fn on_tape(&mut self, _step: usize, _tape: &Tape<f32>) {}
    /// After backward and clipping, before the optimizer changes the parameters.
    fn before_update(&mut self, _step: usize, _model: &Gpt, _grads: &Gradients<f32>) {}
    /// After the update.
    fn after_update(&mut self, _step: usize, _loss: f64, _lr: f64, _model: &Gpt) -> Result<()> {
        Ok(())
    }
}

struct NoHook;
impl StepHook for NoHook {}

/// Names the step in anomaly-mode errors, which name the op.
fn diverged(step: usize, e: GptError) -> GptError {
    use tapelora_autograd::AutogradError::NonFinite;
    match e {
        GptError::Autograd(e @ NonFinite { .. })
        | GptError::Nn(tapelora_nn::NnError::Autograd(e @ NonFinite { .. })) => {
            GptError::Input(format!("training diverged at step {step}: {e}"))
        }
        other => other,
    }
}

/// The per-step seed of dropout masks, so a resumed run draws the same masks.
fn step_seed(seed: u64, step: usize) -> u64 {
    seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(step as u64)
}

/// Trains the model's trainable parameters on `data` and evaluates on its validation part.
pub fn train(
    model: &mut Gpt,
    data: &Dataset,
    cfg: &TrainConfig,
    on_event: &mut dyn FnMut(&TrainEvent),
) -> Result<TrainSummary> {
    train_with_hook(model, data, cfg, on_event, &mut NoHook)
}

/// [`train`] with a [`StepHook`] looking inside every step.
pub fn train_with_hook(
    model: &mut Gpt,
    data: &Dataset,
    cfg: &TrainConfig,
    on_event: &mut dyn FnMut(&TrainEvent),
    hook: &mut dyn StepHook,
) -> Result<TrainSummary> {
    train_full(model, data, cfg, on_event, hook, None)
}

/// [`train_with_hook`] with checkpoints, stopping on request, and resuming. A resumed run
/// draws the same batches and dropout masks and restores the optimizer exactly, so it ends
/// bit-identical to a run that was never interrupted (same seed, same thread count).
pub fn train_full(
    model: &mut Gpt,
    data: &Dataset,
    cfg: &TrainConfig,
    on_event: &mut dyn FnMut(&TrainEvent),
    hook: &mut dyn StepHook,
    mut checkpointing: Option<Checkpointing<'_>>,
) -> Result<TrainSummary> {
    cfg.validate(model.config.n_positions)?;
    if model.num_trainable_params() == 0 {
        return Err(GptError::Config {
            field: "model".into(),
            msg: "has no trainable parameters".into(),
        });
    }
    let mut optimizer = AdamW::new(
        model.parameters(),
        AdamWConfig {
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            weight_decay: cfg.weight_decay,
            ..AdamWConfig::default()
        },
    );
    let trainable: Vec<String> = optimizer.param_names().map(String::from).collect();
    let schedule = cfg.schedule();
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let start = Instant::now();
    let mut last_loss = f64::NAN;
    let mut first_step = 0;
    if let Some(state) = checkpointing.as_ref().and_then(|c| c.resume.as_ref()) {
        if state.next_step > cfg.steps {
            return Err(GptError::Config {
                field: "--steps".into(),
                msg: format!(
                    "the checkpoint is at step {}, beyond --steps {}",
                    state.next_step, cfg.steps
                ),
            });
        }
        optimizer.load_state_tensors(&state.optimizer)?;
        rng.set_word_pos(state.rng_word_pos);
        (first_step, last_loss) = (state.next_step, state.last_loss);
    }
    let tokens_per_step = (cfg.batch * cfg.block) as f64;
    let mut stopped = false;
    for step in first_step..cfg.steps {
        let (ids, targets) = random_batch(&data.train, cfg.batch, cfg.block, &mut rng)?;
        let non_finite = |value: f64| {
            GptError::Input(format!(
                "training diverged: the loss is {value} at step {step}{}",
                if cfg.detect_anomaly {
                    ""
                } else {
                    " (run with --detect-anomaly to find the op that produced it)"
                }
            ))
        };
        // A small model's batch runs as groups of sequences side by side (crate::step); the
        // hook sees the first group's tape, and anomaly detection watches every group's, so
        // neither changes the numbers.
        let options = TapeOptions {
            detect_anomaly: cfg.detect_anomaly,
            track_norms: hook.wants_tape(step),
            profile: false,
        };
        let (loss, mut grads) = loss_and_gradients_observed(
            model,
            &ids,
            &targets,
            step_seed(cfg.seed, step),
            shards_for(model, cfg.batch, cfg.block),
            options,
            &mut |tape| hook.on_tape(step, tape),
        )
        .map_err(|e| diverged(step, e))?;
        if !loss.is_finite() {
            return Err(non_finite(loss));
        }
        let grad_norm = match cfg.clip {
            Some(max) => clip_grad_norm(&mut grads, trainable.iter().map(String::as_str), max),
            None => clip_grad_norm(
                &mut grads,
                trainable.iter().map(String::as_str),
                f64::INFINITY,
            ),
        };
        let lr = schedule.lr(step);
        hook.before_update(step, model, &grads);
        optimizer.step(&mut model.parameters_mut(), &grads, lr)?;
        hook.after_update(step, loss, lr, model)?;
        last_loss = loss;
        let elapsed = start.elapsed().as_secs_f64();
        on_event(&TrainEvent::Step {
            step,
            loss,
            lr,
            grad_norm,
            tokens_per_sec: tokens_per_step * (step + 1) as f64 / elapsed,
            elapsed,
        });
        let last = step + 1 == cfg.steps;
        if !last
            && cfg.eval_every > 0
            && (step + 1) % cfg.eval_every == 0
            && num_windows(data.val.len(), cfg.block) > 0
        {
            let r = evaluate(model, &data.val, cfg.block, Some(cfg.eval_windows))?;
            on_event(&TrainEvent::Eval {
                step,
                val_loss: r.loss,
            });
        }
        if let Some(c) = checkpointing.as_mut() {
            let stop = c
                .stop
                .is_some_and(|s| s.load(std::sync::atomic::Ordering::SeqCst));
            let due = c.every > 0 && (step + 1) % c.every == 0;
            if (stop || due) && !last {
                let state = TrainState {
                    next_step: step + 1,
                    rng_word_pos: rng.get_word_pos(),
                    optimizer: optimizer.state_tensors().into_iter().collect(),
                    last_loss,
                };
                (c.save)(model, &state)?;
            }
            if stop && !last {
                stopped = true;
                break;
            }
        }
    }
    if stopped {
        let seconds = start.elapsed().as_secs_f64();
        return Ok(TrainSummary {
            train_loss: last_loss,
            val_loss: None,
            seconds,
            tokens_per_sec: f64::NAN,
            steps: 0,
            optimizer_state_bytes: optimizer.state_bytes(),
            stopped: true,
        });
    }
    let seconds = start.elapsed().as_secs_f64();
    let val_loss = if num_windows(data.val.len(), cfg.block) > 0 {
        let r = evaluate(model, &data.val, cfg.block, None)?;
        on_event(&TrainEvent::Eval {
            step: cfg.steps - 1,
            val_loss: r.loss,
        });
        Some(r.loss)
    } else {
        None
    };
    Ok(TrainSummary {
        train_loss: last_loss,
        val_loss,
        seconds,
        tokens_per_sec: tokens_per_step * (cfg.steps - first_step) as f64 / seconds,
        steps: cfg.steps,
        optimizer_state_bytes: optimizer.state_bytes(),
        stopped: false,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::GptConfig;

    /// A one-block model over a 9-token vocabulary, with the given dropout.
    pub(crate) fn tiny(dropout: f64) -> GptConfig {
        GptConfig {
            n_layer: 1,
            n_head: 2,
            n_embd: 8,
            n_positions: 8,
            vocab_size: 9,
            n_inner: 16,
            layer_norm_epsilon: 1e-5,
            bias: true,
            dropout,
        }
    }

    #[test]
    fn a_stopped_and_resumed_run_ends_bit_identical() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let tokens: Vec<u32> = (0..800).map(|i| ((i * 7 + i / 5) % 9) as u32).collect();
        let data = Dataset::split(tokens, 0.1);
        let cfg = tiny(0.1);
        let train_cfg = TrainConfig {
            batch: 4,
            block: 8,
            eval_every: 0,
            warmup: 3,
            ..TrainConfig::nanogpt_cpu(20, 8)
        };
        let fresh = || Gpt::new(cfg.clone(), &mut ChaCha8Rng::seed_from_u64(3)).unwrap();
        let mut whole = fresh();
        let reference = train(&mut whole, &data, &train_cfg, &mut |_| {}).unwrap();

        for stop_at in [0usize, 7, 18] {
            let stop = AtomicBool::new(false);
            let mut saved: Option<(Vec<ndarray::ArrayD<f32>>, TrainState)> = None;
            let mut first = fresh();
            let mut save = |m: &Gpt, st: &TrainState| {
                saved = Some((
                    m.parameters().iter().map(|p| p.value.to_owned()).collect(),
                    st.clone(),
                ));
                Ok(())
            };
            let summary = train_full(
                &mut first,
                &data,
                &train_cfg,
                &mut |e| {
                    if let TrainEvent::Step { step, .. } = e {
                        if *step == stop_at {
                            stop.store(true, Ordering::SeqCst);
                        }
                    }
                },
                &mut NoHook,
                Some(Checkpointing {
                    resume: None,
                    every: 0,
                    save: &mut save,
                    stop: Some(&stop),
                }),
            )
            .unwrap();
            assert!(summary.stopped);
            let (weights, state) = saved.expect("a checkpoint was written");
            assert_eq!(state.next_step, stop_at + 1);
            // A new process: fresh model, weights and state from the checkpoint.
            let mut resumed = fresh();
            for (p, w) in resumed.parameters_mut().into_iter().zip(weights) {
                p.value = w.into_shared();
            }
            let mut no_save = |_: &Gpt, _: &TrainState| Ok(());
            let end = train_full(
                &mut resumed,
                &data,
                &train_cfg,
                &mut |_| {},
                &mut NoHook,
                Some(Checkpointing {
                    resume: Some(state),
                    every: 0,
                    save: &mut no_save,
                    stop: None,
                }),
            )
            .unwrap();
            assert_eq!(
                end.train_loss.to_bits(),
                reference.train_loss.to_bits(),
                "stopped after step {stop_at}"
            );
            for (a, b) in resumed.parameters().iter().zip(whole.parameters()) {
                assert_eq!(a.value, b.value, "{}", a.name);
            }
        }
    }

    #[test]
    fn hooks_reading_the_tape_and_anomaly_detection_do_not_change_the_numbers() {
        // On two threads the batch of 4 runs as two groups of sequences (crate::step); a hook
        // that reads every step's tape (with norms) and anomaly detection must leave the run
        // bit for bit as it was, dropout included.
        struct Reader(Vec<usize>);
        impl StepHook for Reader {
            fn wants_tape(&self, _step: usize) -> bool {
                true
            }
            fn on_tape(&mut self, _step: usize, tape: &Tape<f32>) {
                self.0.push(tape.len());
            }
        }
        let tokens: Vec<u32> = (0..800).map(|i| ((i * 7 + i / 5) % 9) as u32).collect();
        let data = Dataset::split(tokens, 0.1);
        fn run<H: StepHook + Send>(
            data: &Dataset,
            detect_anomaly: bool,
            hook: &mut H,
        ) -> (u64, Vec<ndarray::ArrayD<f32>>) {
            let cfg = TrainConfig {
                batch: 4,
                block: 8,
                eval_every: 0,
                detect_anomaly,
                ..TrainConfig::nanogpt_cpu(5, 8)
            };
            let mut model = Gpt::new(tiny(0.1), &mut ChaCha8Rng::seed_from_u64(3)).unwrap();
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(2)
                .build()
                .unwrap();
            assert_eq!(pool.install(|| crate::step::shards_for(&model, 4, 8)), 2);
            let summary =
                pool.install(|| train_with_hook(&mut model, data, &cfg, &mut |_| {}, hook));
            let weights = model
                .parameters()
                .iter()
                .map(|p| p.value.to_owned())
                .collect();
            (summary.unwrap().train_loss.to_bits(), weights)
        }
        let plain = run(&data, false, &mut NoHook);
        let mut reader = Reader(Vec::new());
        assert_eq!(run(&data, true, &mut reader), plain);
        assert_eq!(
            reader.0.len(),
            5,
            "the hook saw every step's (first group's) tape"
        );
        assert!(reader.0.iter().all(|&records| records > 20));
    }

    #[test]
    fn a_tiny_model_learns_a_repeating_sequence() {
        let tokens: Vec<u32> = (0..600).map(|i| [0, 1, 2, 3, 4, 3, 2, 1][i % 8]).collect();
        let data = Dataset::split(tokens, 0.1);
        let cfg = GptConfig {
            n_layer: 1,
            n_head: 2,
            n_embd: 16,
            n_positions: 16,
            vocab_size: 5,
            n_inner: 64,
            layer_norm_epsilon: 1e-5,
            bias: true,
            dropout: 0.0,
        };
        let mut model = Gpt::new(cfg, &mut ChaCha8Rng::seed_from_u64(0)).unwrap();
        let before = evaluate(&model, &data.val, 16, None).unwrap();
        let train_cfg = TrainConfig {
            batch: 8,
            block: 16,
            steps: 150,
            lr: 1e-2,
            min_lr: 1e-3,
            warmup: 10,
            eval_every: 50,
            ..TrainConfig::nanogpt_cpu(150, 16)
        };
        let mut events = 0;
        let summary = train(&mut model, &data, &train_cfg, &mut |_| events += 1).unwrap();
        assert!(events >= 150);
        let after = summary.val_loss.unwrap();
        assert!(
            after < 0.5 * before.loss,
            "val loss {} → {after}",
            before.loss
        );
        // Same seed, same result, bit for bit.
        let mut again = Gpt::new(model.config.clone(), &mut ChaCha8Rng::seed_from_u64(0)).unwrap();
        let summary2 = train(&mut again, &data, &train_cfg, &mut |_| {}).unwrap();
        assert_eq!(summary.train_loss.to_bits(), summary2.train_loss.to_bits());
        assert!(TrainConfig {
            steps: 0,
            ..train_cfg
        }
        .validate(16)
        .is_err());
    }
}

#[cfg(test)]
mod anomaly_tests {
    use super::tests::tiny;
    use super::*;

    /// A model whose position embedding holds an infinity at position 2.
    fn poisoned() -> (Gpt, Dataset) {
        let cfg = tiny(0.0);
        let mut model = Gpt::new(cfg, &mut ChaCha8Rng::seed_from_u64(3)).unwrap();
        for p in model.parameters_mut() {
            if p.name.ends_with("wpe.weight") {
                p.value_mut()[[2, 5]] = f32::INFINITY;
            }
        }
        let tokens: Vec<u32> = (0..400).map(|i| (i % 9) as u32).collect();
        (model, Dataset::split(tokens, 0.1))
    }

    #[test]
    fn a_non_finite_loss_names_the_step_and_with_anomaly_mode_the_op() {
        let cfg = TrainConfig {
            batch: 2,
            block: 8,
            eval_every: 0,
            ..TrainConfig::nanogpt_cpu(3, 8)
        };
        let (mut model, data) = poisoned();
        let plain = train(&mut model, &data, &cfg, &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(plain.contains("at step 0"), "{plain}");
        assert!(plain.contains("--detect-anomaly"), "{plain}");

        let (mut model, data) = poisoned();
        let cfg = TrainConfig {
            detect_anomaly: true,
            ..cfg
        };
        let found = train(&mut model, &data, &cfg, &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(found.contains("at step 0"), "{found}");
        // The first op whose output is not finite: the lookup of position 2's embedding.
        assert!(found.contains("`embedding`"), "{found}");
        assert!(found.contains("forward"), "{found}");
    }
}
