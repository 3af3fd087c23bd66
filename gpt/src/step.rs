//! One training step's loss and gradients, with a small model's batch cut into groups of
//! sequences that run side by side, each on its own tape and thread.
//!
//! A small model's ops are too short to split across threads well (nanogpt-cpu: 768 × 128
//! activations, 64 × 32 attention heads, ≈ 150 parallel sections per step): each waits for
//! its slower half and wakes the pool again. Recording the batch as `shards` groups of whole
//! sequences instead — each group's forward and backward on its own [`Tape`], the groups side
//! by side on the thread pool — keeps every thread on long runs of its own work: 1.07–1.12×
//! on nanogpt-cpu's forward + backward called from a worker of the pool, as the CLI calls it
//! (1.12–1.22× from a plain main thread, where one tape is slower too; full and LoRA, medians
//! of 200 alternated steps in one process), and no gain on GPT-2 124M at B4×T256 trained
//! whole, whose backward already runs ∂x and ∂W side by side ([`shards_for`] picks one group
//! there, and wherever the groups' extra gradient copies would pass 64 MiB) — but 1.12× for
//! its LoRA step, whose frozen layers have no ∂W to pair ∂x with. Inside a group every
//! product runs whole on the group's thread while the other groups run
//! ([`products_on_this_thread_while_others_run`]): split in halves, each half packed all of B
//! again, and the halves ran one after the other anyway. Once the other groups are done, the
//! last group's products split over the idle threads again: groups rarely end together (a
//! core slowed by another process), and the step waited for the slower one with a thread
//! idle (medians of alternated runs on an AVX2 machine: nanogpt-cpu full 1.10–1.12×, LoRA
//! 1.01–1.15×; GPT-2 LoRA 0.97× and 1.14×, 6 of 7 pairs quicker). Anomaly detection and a hook
//! reading the tape (the first group's) do not change the groups, so they do not change the
//! numbers.
//!
//! The loss is the whole batch's mean: each group's mean is weighted by its share of the
//! batch's counted targets (`n_g / N`, targets of −1 are not counted), before backward, so the
//! gradients are summed as they are ([`Gradients::add_named`], in group order: the same bits
//! for the same number of groups).

use std::sync::atomic::{AtomicUsize, Ordering};

use ndarray::{s, ArrayD};
use tapelora_autograd::gemm::products_on_this_thread_while_others_run;
use tapelora_autograd::{Gradients, Tape};
use tapelora_nn::{Ctx, Module};

use crate::{Gpt, GptError, Result};

/// Multiply-adds of the MLP's first product for the whole batch (tokens × C × 4C) below which
/// a step that trains most of the weights runs in groups: nanogpt-cpu's B12×T64 is 50 M
/// (grouped: 1.07–1.12×), GPT-2's B4×T256 2.4 G (0.98–1.03×: its backward already runs each
/// layer's ∂x and ∂W side by side, one whole product per thread). A step whose weights are
/// mostly frozen (LoRA) has no ∂W to pair ∂x with, so each of its products splits across the
/// threads; there groups pay at any size (GPT-2 LoRA at B4×T256 on an AVX2 machine: 1.12×,
/// three alternated pairs, docs/BENCHMARKS.md session 29).
const GROUPED_MAX_MLP_MACS: usize = 1 << 27;

/// Most floats of gradients the extra groups may hold at once (each group holds a gradient
/// for every trainable parameter until they are summed): 64 MiB.
const GROUPED_MAX_EXTRA_GRADIENT_FLOATS: usize = 1 << 24;

/// One group's weighted loss and its gradients.
type GroupResult = Result<(f64, Gradients<f32>)>;

/// Who looks at a recorded tape, if anyone.
type Observer<'a> = Option<&'a mut (dyn FnMut(&Tape<f32>) + Send)>;

/// How many groups of sequences a training step of `model` on `batch × block` tokens runs
/// side by side: one per thread of the current pool when the extra gradient copies stay small
/// and either the model is small (see the module docs) or most of its weights are frozen
/// ([`GROUPED_MAX_MLP_MACS`]), else 1.
pub fn shards_for(model: &Gpt, batch: usize, block: usize) -> usize {
    let config = &model.config;
    let threads = rayon::current_num_threads().min(batch);
    let mlp_macs = batch
        .saturating_mul(block)
        .saturating_mul(config.n_embd)
        .saturating_mul(config.n_inner);
    let trainable = model.num_trainable_params();
    let extra_gradients = threads.saturating_sub(1).saturating_mul(trainable);
    let mostly_trainable = 2 * trainable >= model.num_params();
    if threads < 2
        || (mlp_macs >= GROUPED_MAX_MLP_MACS && mostly_trainable)
        || extra_gradients > GROUPED_MAX_EXTRA_GRADIENT_FLOATS
    {
        1
    } else {
        threads
    }
}

/// The dropout seed of group `g` (group 0 keeps the step's own seed).
fn group_seed(seed: u64, g: usize) -> u64 {
    seed.wrapping_add((g as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// Mean next-token cross-entropy of `ids [B, T]` against `targets` (B·T of them, −1 =
/// ignored) and its gradients for every trainable parameter, recorded as `shards` groups of
/// sequences side by side (1: one tape, as [`Gpt::forward_loss`] + backward). Dropout masks
/// are drawn from `seed` (group g's from a seed derived from it).
pub fn loss_and_gradients(
    model: &Gpt,
    ids: &ArrayD<usize>,
    targets: &[i64],
    seed: u64,
    shards: usize,
) -> Result<(f64, Gradients<f32>)> {
    let options = TapeOptions::default();
    loss_and_gradients_observed(model, ids, targets, seed, shards, options, &mut |_| {})
}

/// What a step's tapes record besides the ops ([`loss_and_gradients_observed`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct TapeOptions {
    /// Anomaly detection on every group's tape (the first op to produce a non-finite value is
    /// named).
    pub detect_anomaly: bool,
    /// Value and gradient norms on the first group's tape.
    pub track_norms: bool,
    /// Per-op wall times on the first group's tape (`Tape::profile`; with one group, the whole
    /// step's).
    pub profile: bool,
}

/// [`loss_and_gradients`] with `options` set on the tapes, and `first_tape` called with the
/// first group's tape right after its backward (the tape of the batch's first sequences;
/// of the whole batch when there is one group). Neither changes the numbers: the groups are
/// the same with or without them.
pub fn loss_and_gradients_observed(
    model: &Gpt,
    ids: &ArrayD<usize>,
    targets: &[i64],
    seed: u64,
    shards: usize,
    options: TapeOptions,
    first_tape: &mut (dyn FnMut(&Tape<f32>) + Send),
) -> Result<(f64, Gradients<f32>)> {
    // Checked up front: a group with no counted targets is never recorded.
    let (batch, block) = model.check_ids(ids, 0)?;
    if targets.len() != batch * block {
        return Err(GptError::Input(format!(
            "{} targets for {batch} × {block} token ids",
            targets.len()
        )));
    }
    let n = shards.clamp(1, batch);
    let groups: Vec<(std::ops::Range<usize>, usize)> = (0..n)
        .map(|g| {
            let rows = g * batch / n..(g + 1) * batch / n;
            let counted = targets[rows.start * block..rows.end * block]
                .iter()
                .filter(|&&t| t != -1)
                .count();
            (rows, counted)
        })
        .collect();
    let total: usize = groups.iter().map(|(_, counted)| counted).sum();
    if n == 1 || total == 0 {
        return record(model, ids, targets, seed, 1.0, options, Some(first_tape));
    }
    // One group's loss (weighted by its share of the counted targets) and gradients; None
    // for a group with no counted targets, which adds nothing to either.
    let run = |g: usize, observe: Observer<'_>| {
        let (rows, counted) = &groups[g];
        (*counted > 0).then(|| {
            let group_ids = ids.slice(s![rows.clone(), ..]).to_owned().into_dyn();
            let group_targets = &targets[rows.start * block..rows.end * block];
            let share = *counted as f64 / total as f64;
            let options = TapeOptions {
                track_norms: options.track_norms && observe.is_some(),
                profile: options.profile && observe.is_some(),
                ..options
            };
            let seed = group_seed(seed, g);
            record(
                model,
                &group_ids,
                group_targets,
                seed,
                share,
                options,
                observe,
            )
        })
    };
    // Each group's products run whole on its thread while the other threads have groups of
    // their own; the last group still running splits them over the idle threads again (see
    // `tapelora_autograd::gemm::products_on_this_thread_while_others_run`).
    let running = AtomicUsize::new(if split_from_the_start() { 1 } else { n });
    let run = |g: usize, observe: Observer<'_>| {
        let result = products_on_this_thread_while_others_run(&running, || run(g, observe));
        let one_less = |running: usize| Some(running.saturating_sub(1));
        let _ = running.fetch_update(Ordering::Release, Ordering::Relaxed, one_less);
        result
    };
    let slots: Vec<std::sync::Mutex<Option<GroupResult>>> =
        (0..n).map(|_| std::sync::Mutex::new(None)).collect();
    // The other groups go to the pool; the first runs in the scope's body — on this thread
    // when it is one of the pool's (a caller outside the pool waits while a worker runs it,
    // so that the groups' own parallel sections run inline on their threads, not queued
    // behind the other group's).
    rayon::scope(|scope| {
        for (g, slot) in slots.iter().enumerate().skip(1) {
            let run = &run;
            scope.spawn(move |_| *slot.lock().expect("not poisoned") = run(g, None));
        }
        *slots[0].lock().expect("not poisoned") = run(0, Some(first_tape));
    });
    let mut sum: Option<(f64, Gradients<f32>)> = None;
    for slot in slots {
        let Some(result) = slot.into_inner().expect("not poisoned") else {
            continue;
        };
        let (value, grads) = result?;
        sum = Some(match sum {
            None => (value, grads),
            Some((loss, mut acc)) => {
                acc.add_named(&grads)?;
                (loss + value, acc)
            }
        });
    }
    Ok(sum.expect("total > 0, so some group has counted targets"))
}

/// Records one tape: forward, the loss times `share`, backward; `observe` sees the tape.
fn record(
    model: &Gpt,
    ids: &ArrayD<usize>,
    targets: &[i64],
    seed: u64,
    share: f64,
    options: TapeOptions,
    observe: Observer<'_>,
) -> GroupResult {
    let tape = Tape::new();
    tape.set_anomaly_detection(options.detect_anomaly);
    tape.set_track_norms(options.track_norms);
    tape.set_profiling(options.profile);
    let loss = model.forward_loss(&Ctx::train(&tape, seed), ids, targets)?;
    let value = loss.item().map_or(f64::NAN, f64::from);
    let grads = if share == 1.0 {
        tape.backward(&loss)?
    } else {
        tape.backward(&loss.scale(share)?)?
    };
    if let Some(observe) = observe {
        observe(&tape);
    }
    Ok((value * share, grads))
}

/// Whether every group splits its products from the start, as the last group running does:
/// never, except in a test that compares the two ways bit for bit.
#[cfg(not(test))]
fn split_from_the_start() -> bool {
    false
}

#[cfg(test)]
fn split_from_the_start() -> bool {
    tests::SPLIT_FROM_THE_START.with(|flag| flag.get())
}

#[cfg(test)]
mod tests {
    use super::*;

    thread_local! {
        /// Set by a test on the thread that starts a step's groups (see
        /// `split_from_the_start`).
        pub(super) static SPLIT_FROM_THE_START: std::cell::Cell<bool> =
            const { std::cell::Cell::new(false) };
    }

    use crate::GptConfig;
    use rand::SeedableRng;
    use tapelora_nn::Module;

    /// A two-block model (no dropout) and a batch of five sequences with some ignored targets.
    fn setup() -> (Gpt, ArrayD<usize>, Vec<i64>) {
        let config = crate::train::tests::tiny(0.0);
        let mut model = Gpt::new(config, &mut rand_chacha::ChaCha8Rng::seed_from_u64(3)).unwrap();
        model.unfreeze();
        let (batch, block, vocab) = (5, 7, model.config.vocab_size);
        let ids = ArrayD::from_shape_fn(ndarray::IxDyn(&[batch, block]), |i| {
            (i[0] * 5 + i[1] * 3) % vocab
        });
        let targets = (0..batch * block)
            .map(|i| {
                if i % 6 == 4 {
                    -1
                } else {
                    ((i * 7 + 1) % vocab) as i64
                }
            })
            .collect();
        (model, ids, targets)
    }

    #[test]
    fn grouped_steps_give_the_whole_batch_loss_and_gradients() {
        let (model, ids, targets) = setup();
        let (loss, grads) = loss_and_gradients(&model, &ids, &targets, 0, 1).unwrap();
        // Groups of 2 + 3, of 1 + 1 + 1 + 2 and one per sequence (uneven counted targets).
        for shards in [2, 4, 5, 9] {
            let (grouped_loss, grouped) =
                loss_and_gradients(&model, &ids, &targets, 0, shards).unwrap();
            assert!(
                (grouped_loss - loss).abs() <= 1e-6 * loss.abs(),
                "{shards} groups: loss {grouped_loss} vs {loss}"
            );
            let mut names = 0;
            for name in grads.names() {
                let (want, got) = (&grads.get_by_name(name).unwrap(), grouped.get_by_name(name));
                let got = got.unwrap_or_else(|| panic!("{shards} groups: no gradient {name}"));
                let scale = want.iter().fold(1e-6f32, |m, x| m.max(x.abs()));
                let diff = (*want - got).iter().fold(0.0f32, |m, x| m.max(x.abs()));
                assert!(
                    diff <= 1e-4 * scale,
                    "{shards} groups, {name}: {diff} of {scale}"
                );
                names += 1;
            }
            assert_eq!(names, grouped.names().count());
            assert!(names > 10);
        }
    }

    #[test]
    fn grouped_steps_repeat_bit_for_bit_and_skip_groups_with_no_targets() {
        let (model, ids, mut targets) = setup();
        let run = |targets: &[i64]| loss_and_gradients(&model, &ids, targets, 7, 2).unwrap();
        let ((a, ga), (b, gb)) = (run(&targets), run(&targets));
        assert_eq!(a.to_bits(), b.to_bits());
        for name in ga.names() {
            assert_eq!(ga.get_by_name(name), gb.get_by_name(name), "{name}");
        }
        // The first two sequences (group 0 of 2) all ignored: the loss is group 1's alone.
        targets[..2 * 7].fill(-1);
        let (grouped, _) = run(&targets);
        let (whole, _) = loss_and_gradients(&model, &ids, &targets, 7, 1).unwrap();
        assert!(
            (grouped - whole).abs() <= 1e-6 * whole.abs(),
            "{grouped} vs {whole}"
        );
    }

    #[test]
    fn groups_give_the_same_bits_whether_their_products_split_or_not() {
        // When the other groups are done, the last group's products split over the idle
        // threads: the moment that happens depends on the machine, so the split must not
        // change a bit. At nanogpt-cpu's step trained whole (B12 × T64, C = 128) and at the
        // demo's model (B32 × T30, C = 64, 4 heads of 16) mostly frozen: products large
        // enough to split, down to 64 × 64.
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let nanogpt = GptConfig::preset("nanogpt-cpu", Some(65)).unwrap();
        let demo = GptConfig {
            n_layer: 3,
            n_head: 4,
            n_embd: 64,
            n_positions: 30,
            vocab_size: 20,
            n_inner: 256,
            layer_norm_epsilon: 1e-5,
            bias: true,
            dropout: 0.0,
        };
        for (config, batch, frozen) in [(nanogpt, 12, false), (demo, 32, true)] {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
            let mut model = Gpt::new(config, &mut rng).unwrap();
            model.unfreeze();
            if frozen {
                // As under LoRA, most layers frozen: their backward has ∂x products only.
                model.visit_mut(&mut |p| {
                    p.trainable = p.name.starts_with("h.0.attn.c_attn") || p.name == "ln_f.weight"
                });
                assert!(2 * model.num_trainable_params() < model.num_params());
            }
            let block = model.config.n_positions.min(64);
            let vocab = model.config.vocab_size;
            let ids = ArrayD::from_shape_fn(ndarray::IxDyn(&[batch, block]), |i| {
                (i[0] * 7 + i[1] * 13) % vocab
            });
            let targets: Vec<i64> = (0..batch * block)
                .map(|i| ((i * 5 + 3) % vocab) as i64)
                .collect();
            let step = |split: bool| {
                pool.install(|| {
                    SPLIT_FROM_THE_START.with(|flag| flag.set(split));
                    let shards = shards_for(&model, batch, block);
                    assert_eq!(shards, 2);
                    let result = loss_and_gradients(&model, &ids, &targets, 1, shards).unwrap();
                    SPLIT_FROM_THE_START.with(|flag| flag.set(false));
                    result
                })
            };
            let ((held_loss, held), (split_loss, split)) = (step(false), step(true));
            assert_eq!(held_loss.to_bits(), split_loss.to_bits());
            let mut names = 0;
            for name in held.names() {
                assert_eq!(held.get_by_name(name), split.get_by_name(name), "{name}");
                names += 1;
            }
            assert!(names >= 2);
        }
    }

    #[test]
    fn bad_batches_are_errors_and_small_models_run_in_groups() {
        let (model, ids, mut targets) = setup();
        let flat = ArrayD::from_elem(ndarray::IxDyn(&[35]), 0usize);
        assert!(loss_and_gradients(&model, &flat, &targets, 0, 2).is_err());
        assert!(loss_and_gradients(&model, &ids, &targets[1..], 0, 2).is_err());
        // A bad id in a group with no counted targets (never recorded) is still an error.
        let mut bad = ids.clone();
        bad[[0, 0]] = model.config.vocab_size;
        targets[..2 * 7].fill(-1);
        let err = loss_and_gradients(&model, &bad, &targets, 0, 2).unwrap_err();
        assert!(err.to_string().contains("outside the vocabulary"), "{err}");

        let pool = |threads| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
        };
        let built = |name: &str, trainable: bool| {
            let config = GptConfig::preset(name, Some(65)).unwrap();
            let mut model =
                Gpt::new(config, &mut rand_chacha::ChaCha8Rng::seed_from_u64(0)).unwrap();
            if trainable {
                model.unfreeze();
            } else {
                model.freeze();
            }
            model
        };
        let nano = built("nanogpt-cpu", true);
        pool(2).install(|| {
            assert_eq!(shards_for(&nano, 12, 64), 2);
            assert_eq!(shards_for(&nano, 1, 64), 1);
        });
        pool(3).install(|| assert_eq!(shards_for(&nano, 2, 64), 2));
        pool(1).install(|| assert_eq!(shards_for(&nano, 12, 64), 1));
        // GPT-2: trained whole, its products are large enough at B4×T256 (and at a tiny batch
        // the extra gradient copy, 124 M floats, is too large); frozen (as under LoRA), its
        // backward has no ∂W products to pair ∂x with, and it runs in groups at any size.
        let (gpt2_full, gpt2_frozen) = (built("gpt2", true), built("gpt2", false));
        pool(2).install(|| {
            assert_eq!(shards_for(&gpt2_full, 4, 256), 1);
            assert_eq!(shards_for(&gpt2_full, 2, 16), 1);
            assert_eq!(shards_for(&gpt2_frozen, 4, 256), 2);
            assert_eq!(shards_for(&gpt2_frozen, 2, 16), 2);
        });
    }

    #[test]
    fn dropout_masks_differ_between_groups_and_repeat_with_the_seed() {
        let config = crate::train::tests::tiny(0.5);
        let mut model = Gpt::new(config, &mut rand_chacha::ChaCha8Rng::seed_from_u64(3)).unwrap();
        model.unfreeze();
        // Two identical sequences, one per group: their losses differ only if the two groups
        // drew different dropout masks.
        let ids = ArrayD::from_shape_fn(ndarray::IxDyn(&[2, 7]), |i| (i[1] * 3) % 9);
        let targets: Vec<i64> = (0..14).map(|i| ((i % 7) * 5 % 9) as i64).collect();
        let group = |g: usize| {
            let one_ids = ids.slice(s![g..g + 1, ..]).to_owned().into_dyn();
            let tape = Tape::new();
            let ctx = Ctx::train(&tape, group_seed(9, g));
            let loss = model.forward_loss(&ctx, &one_ids, &targets[..7]).unwrap();
            loss.item().unwrap() as f64
        };
        assert_ne!(group(0), group(1), "groups drew the same dropout masks");
        let (grouped, _) = loss_and_gradients(&model, &ids, &targets, 9, 2).unwrap();
        assert!((grouped - (group(0) + group(1)) / 2.0).abs() < 1e-6);
        let (again, _) = loss_and_gradients(&model, &ids, &targets, 9, 2).unwrap();
        assert_eq!(grouped.to_bits(), again.to_bits());
    }
}
