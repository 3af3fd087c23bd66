//! Weighted combination of adapters into a new one (PEFT's `add_weighted_adapter`).
//!
//! With ΔWᵢ = sᵢ·Bᵢ·Aᵢ and weights wᵢ, per layer:
//! * `linear` — equal ranks: A = Σ √(wᵢsᵢ)·Aᵢ, B = Σ √(wᵢsᵢ)·Bᵢ (per q/k/v slice), scale 1
//!   (PEFT's rule; exact only when the adapters share A or B — it mixes factors, not products);
//! * `cat` — A stacks √(wᵢsᵢ)·Aᵢ, B concatenates √(wᵢsᵢ)·Bᵢ: rank Σrᵢ, exactly Σ wᵢ·ΔWᵢ;
//! * `svd` — the best rank-r approximation of Σ wᵢ·ΔWᵢ: B = U_r·Σ_r, A = V_rᵀ, scale 1.

use ndarray::{concatenate, s, Array2, Axis};

use crate::analysis::delta_w;
use crate::config::LoraConfig;
use crate::error::{LoraError, Result};
use crate::layer::LoraPart;
use crate::model::LoraModel;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Combination {
    Linear,
    Cat,
    Svd { rank: usize },
}

fn to2(p: &tapelora_nn::Parameter) -> Array2<f32> {
    p.value
        .view()
        .into_dimensionality()
        .expect("2-D")
        .to_owned()
}

/// Per-layer (A, B) of the combination, with scale 1.
fn combine_layer(
    parts_by_adapter: &[(Vec<LoraPart>, f64)],
    delta: Option<Array2<f64>>,
    how: Combination,
    module: &str,
    out: usize,
) -> Result<(Array2<f32>, Array2<f32>)> {
    let full = |p: &LoraPart, out: usize| {
        // B placed in the full output rows (q/k/v slices padded with zeros).
        let mut b = Array2::<f32>::zeros((out, p.r));
        b.slice_mut(s![p.slice.start..p.slice.start + p.slice.len, ..])
            .assign(&to2(&p.b));
        b
    };
    match how {
        Combination::Svd { rank } => {
            let delta = delta.expect("computed for svd");
            let (rows, cols) = delta.dim();
            let m = nalgebra::DMatrix::from_fn(rows, cols, |i, j| delta[[i, j]]);
            let svd = m.svd(true, true);
            let (u, vt) = (svd.u.expect("requested"), svd.v_t.expect("requested"));
            let mut order: Vec<usize> = (0..svd.singular_values.len()).collect();
            order.sort_by(|&a, &b| svd.singular_values[b].total_cmp(&svd.singular_values[a]));
            let k = rank.min(order.len());
            let b = Array2::from_shape_fn((rows, k), |(i, j)| {
                (u[(i, order[j])] * svd.singular_values[order[j]]) as f32
            });
            let a = Array2::from_shape_fn((k, cols), |(j, c)| vt[(order[j], c)] as f32);
            Ok((a, b))
        }
        Combination::Linear | Combination::Cat => {
            let mut a_list = Vec::new();
            let mut b_list = Vec::new();
            for (parts, weight) in parts_by_adapter {
                for p in parts {
                    let k = (weight * p.scaling()).abs().sqrt() as f32;
                    let sign = if weight * p.scaling() < 0.0 {
                        -1.0
                    } else {
                        1.0
                    };
                    a_list.push(to2(&p.a) * k);
                    b_list.push(full(p, out) * (k * sign));
                }
            }
            if how == Combination::Cat {
                let a_views: Vec<_> = a_list.iter().map(|a| a.view()).collect();
                let b_views: Vec<_> = b_list.iter().map(|b| b.view()).collect();
                return Ok((
                    concatenate(Axis(0), &a_views).expect("same in"),
                    concatenate(Axis(1), &b_views).expect("same out"),
                ));
            }
            // linear: sum the factors slice by slice (q with q, v with v), then stack the slices.
            let mut slices: Vec<usize> = parts_by_adapter
                .iter()
                .flat_map(|(p, _)| p.iter().map(|p| p.slice.start))
                .collect();
            slices.sort_unstable();
            slices.dedup();
            let per_adapter_parts = parts_by_adapter
                .iter()
                .map(|(p, _)| p.len())
                .collect::<Vec<_>>();
            if per_adapter_parts.iter().any(|&n| n != slices.len()) {
                return Err(LoraError::Adapter(format!("`linear` combination needs the same q/k/v slices in every adapter at `{module}`")));
            }
            let (mut a_stack, mut b_stack) = (Vec::new(), Vec::new());
            for start in slices {
                let picked: Vec<usize> = parts_by_adapter
                    .iter()
                    .map(|(parts, _)| {
                        parts
                            .iter()
                            .position(|p| p.slice.start == start)
                            .expect("same slices")
                    })
                    .collect();
                let mut index = 0;
                let mut sum_a: Option<Array2<f32>> = None;
                let mut sum_b: Option<Array2<f32>> = None;
                for ((parts, _), &j) in parts_by_adapter.iter().zip(&picked) {
                    let r = parts[j].r;
                    let (a, b) = (&a_list[index + j], &b_list[index + j]);
                    index += parts.len();
                    if sum_a.as_ref().is_some_and(|s| s.nrows() != r) {
                        return Err(LoraError::Adapter(format!("`linear` combination needs equal ranks at `{module}`; use `cat` or `svd`")));
                    }
                    sum_a = Some(sum_a.map_or_else(|| a.clone(), |s| s + a));
                    sum_b = Some(sum_b.map_or_else(|| b.clone(), |s| s + b));
                }
                a_stack.push(sum_a.expect("at least one adapter"));
                b_stack.push(sum_b.expect("at least one adapter"));
            }
            let a_views: Vec<_> = a_stack.iter().map(|a| a.view()).collect();
            let b_views: Vec<_> = b_stack.iter().map(|b| b.view()).collect();
            Ok((
                concatenate(Axis(0), &a_views).expect("same in"),
                concatenate(Axis(1), &b_views).expect("same out"),
            ))
        }
    }
}

impl LoraModel {
    /// Adds adapter `new_name` combining `(adapter, weight)` pairs; every input adapter must
    /// adapt the same modules. The new adapter has scale 1 (α = r) and is made active.
    pub fn add_weighted_adapter(
        &mut self,
        new_name: &str,
        inputs: &[(String, f64)],
        how: Combination,
    ) -> Result<()> {
        if inputs.is_empty() {
            return Err(LoraError::Adapter(
                "name at least one adapter to combine".into(),
            ));
        }
        for (n, w) in inputs {
            if !self.configs.contains_key(n) {
                return Err(LoraError::Adapter(format!("no adapter named `{n}`")));
            }
            if !w.is_finite() {
                return Err(LoraError::Adapter(format!(
                    "weight of `{n}` must be finite, got {w}"
                )));
            }
        }
        if let Combination::Svd { rank: 0 } = how {
            return Err(LoraError::Config {
                field: "rank".into(),
                msg: "must be at least 1".into(),
            });
        }
        let mut per_layer: Vec<(String, Array2<f32>, Array2<f32>)> = Vec::new();
        for layer in self.lora_layers() {
            let present: Vec<_> = inputs
                .iter()
                .filter(|(n, _)| layer.adapters.contains_key(n))
                .collect();
            if present.is_empty() {
                continue;
            }
            if present.len() != inputs.len() {
                return Err(LoraError::Adapter(format!("adapters to combine must adapt the same modules; `{}` is adapted by only some of them", layer.module)));
            }
            let parts: Vec<(Vec<LoraPart>, f64)> = present
                .iter()
                .map(|(n, w)| (layer.adapters[n].parts.clone(), *w))
                .collect();
            let delta = matches!(how, Combination::Svd { .. }).then(|| {
                present
                    .iter()
                    .map(|(n, w)| delta_w(layer, n).expect("present") * *w)
                    .fold(
                        Array2::zeros((layer.out_features, layer.in_features)),
                        |acc, d| acc + d,
                    )
            });
            let (a, b) = combine_layer(&parts, delta, how, &layer.module, layer.out_features)?;
            per_layer.push((layer.module.clone(), a, b));
        }
        let r = per_layer
            .iter()
            .map(|(_, a, _)| a.nrows())
            .max()
            .unwrap_or(1);
        let first = &self.configs[&inputs[0].0];
        let mut config = LoraConfig {
            r,
            lora_alpha: r as f64,
            use_rslora: false,
            random_b: false,
            rank_pattern: Vec::new(),
            alpha_pattern: Vec::new(),
            ..first.clone()
        };
        // Exact module list and per-module ranks (so each gets α = r, scale 1).
        config.target_modules = per_layer.iter().map(|(m, ..)| m.clone()).collect();
        config.layers_to_transform = None;
        for (m, a, _) in &per_layer {
            config.rank_pattern.push((m.clone(), a.nrows()));
            config.alpha_pattern.push((m.clone(), a.nrows() as f64));
        }
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(0);
        self.add_adapter(new_name, &config, &mut rng)?;
        let values: std::collections::BTreeMap<String, (Array2<f32>, Array2<f32>)> =
            per_layer.into_iter().map(|(m, a, b)| (m, (a, b))).collect();
        tapelora_nn::Module::visit_mut(&mut self.model, &mut |p| {
            for (m, (a, b)) in &values {
                if p.name == format!("{m}.lora_A.{new_name}.weight") {
                    p.value = a.clone().into_dyn().into_shared();
                } else if p.name == format!("{m}.lora_B.{new_name}.weight") {
                    p.value = b.clone().into_dyn().into_shared();
                }
            }
        });
        Ok(())
    }
}
