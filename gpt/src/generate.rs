//! Text generation: sampling (temperature, top-k, top-p) with a KV cache.

use ndarray::{ArrayD, ArrayView1, IxDyn};
use rand::{Rng, SeedableRng};

use crate::greedy::{self, GreedyHead};
use crate::model::{Gpt, KvCache};
use crate::{GptError, Result};

#[derive(Clone, Debug)]
pub struct SamplingConfig {
    pub max_new_tokens: usize,
    /// 0 means greedy (argmax).
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    pub seed: u64,
    /// Stop after emitting this token (GPT-2's end-of-text).
    pub stop_token: Option<u32>,
    /// Reuse keys and values of earlier positions (off: recompute the whole context each step).
    pub use_cache: bool,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        SamplingConfig {
            max_new_tokens: 100,
            temperature: 1.0,
            top_k: None,
            top_p: None,
            seed: 0,
            stop_token: None,
            use_cache: true,
        }
    }
}

impl SamplingConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, msg: String| {
            Err(GptError::Config {
                field: field.into(),
                msg,
            })
        };
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad(
                "--temperature",
                format!("must be ≥ 0, got {}", self.temperature),
            );
        }
        if self.top_k == Some(0) {
            return bad("--top-k", "must be at least 1".into());
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return bad("--top-p", format!("must be in (0, 1], got {p}"));
            }
        }
        Ok(())
    }
}

/// Picks the next token from one row of logits.
pub fn sample(logits: ArrayView1<f32>, cfg: &SamplingConfig, rng: &mut impl Rng) -> usize {
    if cfg.temperature == 0.0 {
        return greedy::first_max(logits);
    }
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if let Some(k) = cfg.top_k {
        order.truncate(k.max(1));
    }
    let max = logits[order[0]] as f64;
    let mut probs: Vec<f64> = order
        .iter()
        .map(|&i| ((logits[i] as f64 - max) / cfg.temperature).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if let Some(top_p) = cfg.top_p {
        // Keep the smallest prefix whose mass reaches top_p (always at least one token).
        let mut mass = 0.0;
        let keep = probs.iter().position(|p| {
            mass += p;
            mass >= top_p
        });
        let keep = keep.map_or(probs.len(), |i| i + 1);
        order.truncate(keep);
        probs.truncate(keep);
    }
    let total: f64 = probs.iter().sum();
    let mut u = rng.random::<f64>() * total;
    for (i, p) in order.iter().zip(&probs) {
        if u < *p {
            return *i;
        }
        u -= p;
    }
    *order.last().expect("at least one candidate")
}

/// The int8 lm_head [`generate`] searches with ([`GreedyHead`]: the same tokens as every
/// logit's argmax, for a quarter of the table's bytes), where it applies: greedy runs of at least
/// [`greedy::MIN_NEW_TOKENS`] new tokens on a model whose token table has no adapter.
pub fn greedy_head_for(model: &Gpt, cfg: &SamplingConfig) -> Option<GreedyHead> {
    (cfg.temperature == 0.0 && cfg.max_new_tokens >= greedy::MIN_NEW_TOKENS)
        .then(|| GreedyHead::new(model))
        .flatten()
}

/// Continues `prompt` by up to `max_new_tokens` tokens; returns only the new tokens.
pub fn generate(model: &Gpt, prompt: &[u32], cfg: &SamplingConfig) -> Result<Vec<u32>> {
    cfg.validate()?;
    if prompt.is_empty() {
        return Err(GptError::Input(
            "the prompt is empty (give at least one token)".into(),
        ));
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(cfg.seed);
    let context = model.config.n_positions;
    let mut tokens: Vec<u32> = prompt.to_vec();
    let mut out = Vec::new();
    let mut cache = KvCache::new(&model.config, 1);
    // Tokens already in the cache are tokens[fed_from .. fed_from + cache.len()].
    let mut pending: Vec<u32> = tokens[tokens.len().saturating_sub(context)..].to_vec();
    let mut greedy_head = greedy_head_for(model, cfg);
    let mut pacer = tapelora_autograd::partner::Pacer::new();
    for step in 1..=cfg.max_new_tokens {
        if !cfg.use_cache {
            cache = KvCache::new(&model.config, 1);
            pending = tokens[tokens.len().saturating_sub(context)..].to_vec();
        } else if cache.len() + pending.len() > context {
            // The window is full: start a new cache from the last half of the context.
            cache = KvCache::new(&model.config, 1);
            pending = tokens[tokens
                .len()
                .saturating_sub(context / 2)
                .max(tokens.len().saturating_sub(context))..]
                .to_vec();
        }
        let ids = ArrayD::from_shape_vec(
            IxDyn(&[1, pending.len()]),
            pending.iter().map(|&t| t as usize).collect(),
        )
        .expect("1×T");
        let mut step_token = || -> Result<u32> {
            Ok(match &greedy_head {
                Some(head) => head.argmax(model.forward_cached_hidden(&ids, &mut cache)?.row(0))?,
                None => sample(
                    model.forward_cached(&ids, &mut cache)?.row(0),
                    cfg,
                    &mut rng,
                ),
            } as u32)
        };
        // A one-token step is ≈ 60 short parallel sections: the pool's other thread spins
        // through it instead of falling asleep between them, unless one thread alone has
        // been quicker lately (a prompt's products are large enough for rayon).
        let next = if pending.len() == 1 {
            pacer.run(step_token)?
        } else {
            step_token()?
        };
        // Where the bound rarely narrows the search (logits nearly equal everywhere), the
        // estimates are extra reading: stop making them.
        if greedy_head
            .as_ref()
            .is_some_and(|head| head.fallbacks() >= 8 && 2 * head.fallbacks() > step)
        {
            greedy_head = None;
        }
        tokens.push(next);
        out.push(next);
        pending = vec![next];
        if cfg.stop_token == Some(next) {
            break;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::GptConfig;

    #[test]
    fn sampling_rules() {
        let logits = ndarray::arr1(&[0.1f32, 3.0, 2.9, -5.0]);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let greedy = SamplingConfig {
            temperature: 0.0,
            ..Default::default()
        };
        assert_eq!(sample(logits.view(), &greedy, &mut rng), 1);
        let top1 = SamplingConfig {
            top_k: Some(1),
            ..Default::default()
        };
        assert!((0..50).all(|_| sample(logits.view(), &top1, &mut rng) == 1));
        let top2 = SamplingConfig {
            top_k: Some(2),
            ..Default::default()
        };
        assert!((0..200).all(|_| matches!(sample(logits.view(), &top2, &mut rng), 1 | 2)));
        let nucleus = SamplingConfig {
            top_p: Some(0.4),
            ..Default::default()
        };
        assert!((0..50).all(|_| sample(logits.view(), &nucleus, &mut rng) == 1));
        assert!(SamplingConfig {
            top_p: Some(0.0),
            ..Default::default()
        }
        .validate()
        .is_err());
    }

    #[test]
    fn greedy_generation_with_the_int8_head_picks_every_logits_argmax() {
        let cfg = GptConfig::small(2, 32, 64, 700);
        let model = Gpt::new(cfg, &mut rand_chacha::ChaCha8Rng::seed_from_u64(11)).unwrap();
        let greedy = SamplingConfig {
            max_new_tokens: 40,
            temperature: 0.0,
            ..Default::default()
        };
        assert!(greedy_head_for(&model, &greedy).is_some());
        let with_head = generate(&model, &[5, 600, 7], &greedy).unwrap();
        // Every logit, token by token, as before the head existed.
        let mut cache = KvCache::new(&model.config, 1);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let mut pending = vec![5usize, 600, 7];
        let mut every_logit = Vec::new();
        for _ in 0..40 {
            let ids = ArrayD::from_shape_vec(IxDyn(&[1, pending.len()]), pending).unwrap();
            let logits = model.forward_cached(&ids, &mut cache).unwrap();
            let next = sample(logits.row(0), &greedy, &mut rng);
            every_logit.push(next as u32);
            pending = vec![next];
        }
        assert_eq!(with_head, every_logit);
        // Sampling and short runs compute every logit.
        let sampled = SamplingConfig {
            temperature: 0.8,
            ..greedy.clone()
        };
        assert!(greedy_head_for(&model, &sampled).is_none());
        let short = SamplingConfig {
            max_new_tokens: greedy::MIN_NEW_TOKENS - 1,
            ..greedy
        };
        assert!(greedy_head_for(&model, &short).is_none());
    }

    #[test]
    fn one_token_steps_give_the_same_tokens_alone_as_paced() {
        // Wide enough that the one-token steps' GEMVs run in blocks, shared with the partner
        // whenever the pacer keeps it (2 threads).
        let cfg = GptConfig::small(2, 256, 64, 500);
        let model = Gpt::new(cfg, &mut rand_chacha::ChaCha8Rng::seed_from_u64(13)).unwrap();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        for temperature in [0.0, 0.8] {
            let cfg = SamplingConfig {
                max_new_tokens: 40,
                temperature,
                ..Default::default()
            };
            let run = || generate(&model, &[5, 400, 7], &cfg).unwrap();
            let (paced, alone) = pool.install(|| (run(), tapelora_autograd::partner::alone(run)));
            assert_eq!(paced, alone, "temperature {temperature}");
        }
    }

    #[test]
    fn cached_and_uncached_generation_agree_even_past_the_context() {
        let cfg = GptConfig::small(2, 8, 10, 13);
        let model = Gpt::new(cfg, &mut rand_chacha::ChaCha8Rng::seed_from_u64(5)).unwrap();
        let base = SamplingConfig {
            max_new_tokens: 6,
            temperature: 0.0,
            ..Default::default()
        };
        let cached = generate(&model, &[1, 2, 3], &base).unwrap();
        let full = generate(
            &model,
            &[1, 2, 3],
            &SamplingConfig {
                use_cache: false,
                ..base.clone()
            },
        )
        .unwrap();
        assert_eq!(cached, full);
        // Past the 10-token context the cached path restarts from the last half, the
        // uncached path slides the window — both stay valid, neither errors.
        let long = SamplingConfig {
            max_new_tokens: 25,
            ..base
        };
        assert_eq!(generate(&model, &[1, 2, 3], &long).unwrap().len(), 25);
        assert!(generate(&model, &[], &long).is_err());
    }
}
