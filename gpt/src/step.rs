//! One training step's loss and gradients, with a small model's batch cut into groups of
//! sequences that run side by side, each on its own tape and thread.
//!
//! A small model's ops are too short to split across threads well (nanogpt-cpu: 768 × 128
//! activations, 64 × 32 attention heads, ≈ 150 parallel sections per step): each waits for
//! its slower half and wakes the pool again. Recording the batch as `shards` groups of whole
//! sequences instead — each group's forward and backward on its own [`Tape`], the groups side
//! by side on the thread pool — keeps every thread on long runs of its own work: 1.14–1.22×
//! on nanogpt-cpu's forward + backward (full and LoRA, alternated in one process), and no
//! gain on GPT-2 124M at B4×T256, whose products are large enough to split well
//! ([`shards_for`] picks one group there).
//!
//! The loss is the whole batch's mean: each group's mean is weighted by its share of the
//! batch's counted targets (`n_g / N`, targets of −1 are not counted), before backward, so the
//! gradients are summed as they are ([`Gradients::add_named`], in group order: the same bits
//! for the same number of groups).

use ndarray::{s, ArrayD};
use rayon::prelude::*;
use tapelora_autograd::{Gradients, Tape};
use tapelora_nn::Ctx;

use crate::{Gpt, GptConfig, GptError, Result};

/// Multiply-adds of the MLP's first product for the whole batch (tokens × C × 4C) below which
/// a step runs in groups: nanogpt-cpu's B12×T64 is 50 M (grouped: 1.14–1.22×), GPT-2's B4×T256
/// 2.4 G (1.0×, and a copy of the gradients per group).
const GROUPED_MAX_MLP_MACS: usize = 1 << 27;

/// One group's weighted loss and its gradients.
type GroupResult = Result<(f64, Gradients<f32>)>;

/// How many groups of sequences a training step on `batch × block` tokens runs side by side:
/// one per thread of the current pool for a small model (see the module docs), else 1.
pub fn shards_for(config: &GptConfig, batch: usize, block: usize) -> usize {
    let threads = rayon::current_num_threads();
    let mlp_macs = batch
        .saturating_mul(block)
        .saturating_mul(config.n_embd)
        .saturating_mul(config.n_inner);
    if threads < 2 || batch < 2 || mlp_macs >= GROUPED_MAX_MLP_MACS {
        1
    } else {
        threads.min(batch)
    }
}

/// The dropout seed of group `g` (group 0 keeps the step's own seed).
fn group_seed(seed: u64, g: usize) -> u64 {
    seed.wrapping_add((g as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// Mean next-token cross-entropy of `ids [B, T]` against `targets` (B·T of them, −1 =
/// ignored) and its gradients for every trainable parameter, recorded as `shards` groups of
/// sequences side by side (1: one tape, as [`Gpt::forward_loss`] + backward). Dropout masks
/// are drawn from `seed` (group g from a seed derived from it).
pub fn loss_and_gradients(
    model: &Gpt,
    ids: &ArrayD<usize>,
    targets: &[i64],
    seed: u64,
    shards: usize,
) -> Result<(f64, Gradients<f32>)> {
    let (batch, block) = match ids.shape() {
        &[b, t] => (b, t),
        other => {
            return Err(GptError::Input(format!(
                "token ids must be [batch, time], got shape {other:?}"
            )))
        }
    };
    if targets.len() != batch * block {
        return Err(GptError::Input(format!(
            "{} targets for {batch} × {block} token ids",
            targets.len()
        )));
    }
    let n = shards.clamp(1, batch.max(1));
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
    if groups.len() <= 1 || total == 0 {
        let tape = Tape::new();
        let loss = model.forward_loss(&Ctx::train(&tape, seed), ids, targets)?;
        let value = loss.item().map_or(f64::NAN, f64::from);
        return Ok((value, tape.backward(&loss)?));
    }
    let per_group: Vec<Option<GroupResult>> = groups
        .par_iter()
        .with_max_len(1)
        .enumerate()
        .map(|(g, (rows, counted))| {
            // A group with no counted targets adds nothing to the loss or the gradients.
            (*counted > 0).then(|| {
                let tape = Tape::new();
                let ctx = Ctx::train(&tape, group_seed(seed, g));
                let group_ids = ids.slice(s![rows.clone(), ..]).to_owned().into_dyn();
                let group_targets = &targets[rows.start * block..rows.end * block];
                let loss = model.forward_loss(&ctx, &group_ids, group_targets)?;
                let share = *counted as f64 / total as f64;
                let value = loss.item().map_or(f64::NAN, f64::from) * share;
                Ok((value, tape.backward(&loss.scale(share)?)?))
            })
        })
        .collect();
    let mut sum: Option<(f64, Gradients<f32>)> = None;
    for result in per_group.into_iter().flatten() {
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

#[cfg(test)]
mod tests {
    use super::*;
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
    fn bad_batches_are_errors_and_small_models_run_in_groups() {
        let (model, ids, targets) = setup();
        let flat = ArrayD::from_elem(ndarray::IxDyn(&[35]), 0usize);
        assert!(loss_and_gradients(&model, &flat, &targets, 0, 2).is_err());
        assert!(loss_and_gradients(&model, &ids, &targets[1..], 0, 2).is_err());
        let nano = GptConfig::preset("nanogpt-cpu", Some(65)).unwrap();
        let gpt2 = GptConfig::preset("gpt2", None).unwrap();
        let pool = |threads| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
        };
        pool(2).install(|| {
            assert_eq!(shards_for(&nano, 12, 64), 2);
            assert_eq!(shards_for(&nano, 1, 64), 1);
            assert_eq!(shards_for(&gpt2, 4, 256), 1);
        });
        pool(1).install(|| assert_eq!(shards_for(&nano, 12, 64), 1));
    }
}
