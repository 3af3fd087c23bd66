//! Optimizers (AdamW, SGD with momentum) and gradient clipping by global norm.
//!
//! An optimizer is built from the parameters it should train and allocates state for the
//! trainable ones only — frozen weights cost no optimizer memory, which is half of LoRA's
//! memory saving. Updates are written in place into the parameters' buffers.

use std::collections::BTreeMap;

use ndarray::{ArrayD, Zip};
use rayon::prelude::*;
use tapelora_autograd::Gradients;

use crate::parameter::Parameter;
use crate::{NnError, Result};

/// Elementwise updates over at least this many elements run on rayon's pool.
const PARALLEL_MIN_LEN: usize = 1 << 15;

/// What every optimizer offers.
pub trait Optimizer {
    /// Updates each trainable parameter that has a gradient in `grads` (looked up by name).
    fn step(
        &mut self,
        params: &mut [&mut Parameter],
        grads: &Gradients<f32>,
        lr: f64,
    ) -> Result<()>;
    /// Bytes of optimizer state held (moment buffers, step counters).
    fn state_bytes(&self) -> usize;
    /// The state as named tensors, for checkpoints.
    fn state_tensors(&self) -> Vec<(String, ArrayD<f32>)>;
    /// Restores state saved by [`Optimizer::state_tensors`].
    fn load_state_tensors(&mut self, tensors: &BTreeMap<String, ArrayD<f32>>) -> Result<()>;
}

/// Which parameters AdamW applies weight decay to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecayFilter {
    /// Tensors of rank ≥ 2 (weight matrices, embeddings), not biases or norms (nanoGPT's rule).
    MatricesOnly,
    All,
}

#[derive(Clone, Copy, Debug)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub decay: DecayFilter,
}

impl Default for AdamWConfig {
    /// PyTorch's defaults with nanoGPT's decay rule: β = (0.9, 0.999), ε = 1e-8, λ = 0.01.
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            decay: DecayFilter::MatricesOnly,
        }
    }
}

#[derive(Debug)]
struct AdamState {
    m: ArrayD<f32>,
    v: ArrayD<f32>,
    t: u64,
    decay: bool,
}

/// AdamW (Loshchilov & Hutter) as in PyTorch: decoupled decay p ← p − lr·λ·p, then the
/// bias-corrected Adam step p ← p − lr·m̂/(√v̂ + ε).
#[derive(Debug)]
pub struct AdamW {
    pub config: AdamWConfig,
    state: BTreeMap<String, AdamState>,
}

fn check_grad(p: &Parameter, g: &ArrayD<f32>) -> Result<()> {
    if g.shape() != p.shape() {
        return Err(NnError::Tensor {
            name: p.name.clone(),
            msg: format!(
                "gradient shape {:?} does not match the parameter's {:?}",
                g.shape(),
                p.shape()
            ),
        });
    }
    Ok(())
}

impl AdamW {
    /// State for every trainable parameter among `params`; frozen ones are ignored.
    pub fn new<'a>(params: impl IntoIterator<Item = &'a Parameter>, config: AdamWConfig) -> Self {
        let state = params
            .into_iter()
            .filter(|p| p.trainable)
            .map(|p| {
                let decay = match config.decay {
                    DecayFilter::MatricesOnly => p.value.ndim() >= 2,
                    DecayFilter::All => true,
                };
                let zeros = ArrayD::zeros(p.value.raw_dim());
                (
                    p.name.clone(),
                    AdamState {
                        m: zeros.clone(),
                        v: zeros,
                        t: 0,
                        decay,
                    },
                )
            })
            .collect();
        AdamW { config, state }
    }

    /// Names of the parameters this optimizer trains.
    pub fn param_names(&self) -> impl Iterator<Item = &str> {
        self.state.keys().map(String::as_str)
    }
}

/// Matching chunks of a weight, its two moments and its gradient, as rayon's zips pair them.
type ZippedChunks<'a> = (((&'a mut [f32], &'a mut [f32]), &'a mut [f32]), &'a [f32]);

/// One AdamW step's constants, applied element by element.
#[derive(Clone, Copy)]
struct AdamWRule {
    b1: f32,
    b2: f32,
    eps: f32,
    inv_sqrt_bias2: f32,
    step_size: f32,
    decay: f32,
}

impl AdamWRule {
    #[inline(always)]
    fn apply(self, w: &mut f32, m: &mut f32, v: &mut f32, g: f32) {
        *m = self.b1 * *m + (1.0 - self.b1) * g;
        *v = self.b2 * *v + (1.0 - self.b2) * g * g;
        *w = *w * self.decay - self.step_size * *m / ((*v).sqrt() * self.inv_sqrt_bias2 + self.eps);
    }

    #[inline(always)]
    fn apply_slices(self, w: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32]) {
        for (((w, m), v), &g) in w.iter_mut().zip(m).zip(v).zip(g) {
            self.apply(w, m, v, g);
        }
    }
}

impl Optimizer for AdamW {
    fn step(
        &mut self,
        params: &mut [&mut Parameter],
        grads: &Gradients<f32>,
        lr: f64,
    ) -> Result<()> {
        let c = self.config;
        let mut states: BTreeMap<&str, &mut AdamState> = self
            .state
            .iter_mut()
            .map(|(name, s)| (name.as_str(), s))
            .collect();
        // Every parameter's chunks go to the pool in one parallel pass: a pass per parameter
        // forked the pool once per large weight with single-thread work in between, long
        // enough for the idle worker to fall asleep (rayon's sleep after ≈ 5–8 µs idle), so
        // nearly every fork waited 10–30 µs for a wake-up.
        let mut chunks: Vec<(AdamWRule, ZippedChunks)> = Vec::new();
        let mut total = 0;
        for p in params.iter_mut() {
            let (Some(g), Some(s)) = (grads.get_by_name(&p.name), states.remove(p.name.as_str()))
            else {
                continue;
            };
            check_grad(p, g)?;
            s.t += 1;
            let bias1 = 1.0 - c.beta1.powi(s.t as i32);
            let bias2 = 1.0 - c.beta2.powi(s.t as i32);
            let rule = AdamWRule {
                b1: c.beta1 as f32,
                b2: c.beta2 as f32,
                eps: c.eps as f32,
                inv_sqrt_bias2: (1.0 / bias2.sqrt()) as f32,
                step_size: (lr / bias1) as f32,
                decay: if s.decay {
                    (1.0 - lr * c.weight_decay) as f32
                } else {
                    1.0
                },
            };
            let AdamState { m, v, .. } = s;
            let mut w = p.value_mut();
            let contiguous = w.is_standard_layout()
                && m.is_standard_layout()
                && v.is_standard_layout()
                && g.is_standard_layout();
            if !contiguous {
                // A gradient in another layout (∂B of a LoRA term is a transposed view):
                // elementwise through ndarray, on its own.
                let update =
                    |w: &mut f32, m: &mut f32, v: &mut f32, g: &f32| rule.apply(w, m, v, *g);
                let zip = Zip::from(&mut w).and(&mut **m).and(&mut **v).and(g);
                if g.len() >= PARALLEL_MIN_LEN {
                    zip.par_for_each(update);
                } else {
                    zip.for_each(update);
                }
                continue;
            }
            let (Some(w), Some(m), Some(v), Some(g)) = (
                w.into_slice(),
                m.as_slice_mut(),
                v.as_slice_mut(),
                g.as_slice(),
            ) else {
                unreachable!("standard layout checked");
            };
            total += w.len();
            for chunk in w
                .chunks_mut(PARALLEL_MIN_LEN)
                .zip(m.chunks_mut(PARALLEL_MIN_LEN))
                .zip(v.chunks_mut(PARALLEL_MIN_LEN))
                .zip(g.chunks(PARALLEL_MIN_LEN))
            {
                chunks.push((rule, chunk));
            }
        }
        // Contiguous buffers: plain slice loops compiled at the CPU's vector width (through
        // ndarray's Zip the square root and division ran one lane at a time, which made this
        // memory-bound pass compute-bound).
        let run = |(rule, (((w, m), v), g)): (AdamWRule, ZippedChunks)| {
            tapelora_autograd::simd::vectorized(
                #[inline(always)]
                || rule.apply_slices(w, m, v, g),
            )
        };
        if total >= PARALLEL_MIN_LEN {
            chunks.into_par_iter().for_each(run);
        } else {
            chunks.into_iter().for_each(run);
        }
        Ok(())
    }

    fn state_bytes(&self) -> usize {
        self.state
            .values()
            .map(|s| (s.m.len() + s.v.len()) * 4 + 8)
            .sum()
    }

    fn state_tensors(&self) -> Vec<(String, ArrayD<f32>)> {
        let mut out = Vec::new();
        for (name, s) in &self.state {
            out.push((format!("adamw.m.{name}"), s.m.clone()));
            out.push((format!("adamw.v.{name}"), s.v.clone()));
            // The step count as f32 is exact up to 2^24 steps.
            out.push((
                format!("adamw.t.{name}"),
                ndarray::arr1(&[s.t as f32]).into_dyn(),
            ));
        }
        out
    }

    fn load_state_tensors(&mut self, tensors: &BTreeMap<String, ArrayD<f32>>) -> Result<()> {
        for (name, s) in self.state.iter_mut() {
            let get = |kind: &str| {
                let key = format!("adamw.{kind}.{name}");
                tensors.get(&key).ok_or_else(|| NnError::Tensor {
                    name: key.clone(),
                    msg: "missing from the optimizer state".into(),
                })
            };
            let (m, v, t) = (get("m")?, get("v")?, get("t")?);
            if m.shape() != s.m.shape() || v.shape() != s.v.shape() || t.len() != 1 {
                return Err(NnError::Tensor {
                    name: name.clone(),
                    msg: format!(
                        "optimizer state shapes {:?}/{:?} do not match the parameter's {:?}",
                        m.shape(),
                        v.shape(),
                        s.m.shape()
                    ),
                });
            }
            s.m = m.clone();
            s.v = v.clone();
            s.t = t.iter().next().copied().unwrap_or(0.0) as u64;
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug)]
pub struct SgdConfig {
    pub momentum: f64,
    /// L2 penalty added to the gradient (PyTorch's SGD `weight_decay`).
    pub weight_decay: f64,
}

/// SGD with (heavy-ball) momentum, as PyTorch: buf ← μ·buf + g (buf = g at the first step),
/// p ← p − lr·buf.
#[derive(Debug)]
pub struct Sgd {
    pub config: SgdConfig,
    momentum: BTreeMap<String, Option<ArrayD<f32>>>,
}

impl Sgd {
    pub fn new<'a>(params: impl IntoIterator<Item = &'a Parameter>, config: SgdConfig) -> Self {
        let momentum = params
            .into_iter()
            .filter(|p| p.trainable)
            .map(|p| (p.name.clone(), None))
            .collect();
        Sgd { config, momentum }
    }
}

impl Optimizer for Sgd {
    fn step(
        &mut self,
        params: &mut [&mut Parameter],
        grads: &Gradients<f32>,
        lr: f64,
    ) -> Result<()> {
        let (mu, wd, lr) = (
            self.config.momentum as f32,
            self.config.weight_decay as f32,
            lr as f32,
        );
        for p in params.iter_mut() {
            let (Some(buf), Some(g)) = (self.momentum.get_mut(&p.name), grads.get_by_name(&p.name))
            else {
                continue;
            };
            check_grad(p, g)?;
            let mut d = g.clone();
            if wd != 0.0 {
                d.zip_mut_with(&p.value, |d, &w| *d += wd * w);
            }
            if mu != 0.0 {
                match buf {
                    Some(b) => {
                        b.zip_mut_with(&d, |b, &d| *b = mu * *b + d);
                        d.assign(b);
                    }
                    None => *buf = Some(d.clone()),
                }
            }
            p.value_mut().zip_mut_with(&d, |w, &d| *w -= lr * d);
        }
        Ok(())
    }

    fn state_bytes(&self) -> usize {
        self.momentum.values().flatten().map(|b| b.len() * 4).sum()
    }

    fn state_tensors(&self) -> Vec<(String, ArrayD<f32>)> {
        self.momentum
            .iter()
            .filter_map(|(n, b)| b.as_ref().map(|b| (format!("sgd.momentum.{n}"), b.clone())))
            .collect()
    }

    fn load_state_tensors(&mut self, tensors: &BTreeMap<String, ArrayD<f32>>) -> Result<()> {
        for (name, buf) in self.momentum.iter_mut() {
            *buf = tensors.get(&format!("sgd.momentum.{name}")).cloned();
        }
        Ok(())
    }
}

/// Scales the gradients of `names` so that their global L2 norm is at most `max_norm`
/// (PyTorch's `clip_grad_norm_`: factor max_norm/(norm + 1e-6) when norm > max_norm).
/// Returns the norm before clipping. Summed in a fixed order, in f64.
pub fn clip_grad_norm<'a>(
    grads: &mut Gradients<f32>,
    names: impl IntoIterator<Item = &'a str>,
    max_norm: f64,
) -> f64 {
    let names: Vec<&str> = names.into_iter().collect();
    let total = names
        .iter()
        .filter_map(|n| grads.get_by_name(n))
        .map(|g| g.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>())
        .sum::<f64>()
        .sqrt();
    if total > max_norm {
        let factor = (max_norm / (total + 1e-6)) as f32;
        for n in &names {
            if let Some(g) = grads.get_mut_by_name(n) {
                g.mapv_inplace(|v| v * factor);
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use tapelora_autograd::Tape;

    fn grads_of(
        p: &Parameter,
        loss_of: impl for<'t> Fn(&tapelora_autograd::Var<'t, f32>) -> tapelora_autograd::Var<'t, f32>,
    ) -> Gradients<f32> {
        let tape = Tape::new();
        let v = p.on(&tape);
        let loss = loss_of(&v);
        tape.backward(&loss).unwrap()
    }

    #[test]
    fn adamw_matches_a_hand_computed_first_step() {
        let mut w = Parameter::new("w", ndarray::arr2(&[[1.0f32, -2.0]]).into_dyn());
        let mut b = Parameter::new("b", ndarray::arr1(&[0.5f32]).into_dyn());
        let mut frozen = Parameter::new("f", ndarray::arr1(&[7.0f32]).into_dyn());
        frozen.trainable = false;
        let cfg = AdamWConfig {
            weight_decay: 0.1,
            ..AdamWConfig::default()
        };
        let mut opt = AdamW::new([&w, &b, &frozen], cfg);
        assert_eq!(
            opt.state_bytes(),
            (2 * 2 + 2) * 4 + 16,
            "no state for the frozen parameter"
        );
        let gw = grads_of(&w, |v| v.mul(v).unwrap().sum_all().unwrap()); // g = 2w
        opt.step(&mut [&mut w], &gw, 0.01).unwrap();
        // First Adam step moves each weight by lr·sign(g) (m̂ = g, √v̂ = |g|), after decay.
        let want = [
            1.0 * (1.0 - 0.01 * 0.1) - 0.01,
            -2.0 * (1.0 - 0.01 * 0.1) + 0.01,
        ];
        for (got, want) in w.value.iter().zip(want) {
            assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        }
        let gb = grads_of(&b, |v| v.sum_all().unwrap());
        opt.step(&mut [&mut b], &gb, 0.01).unwrap();
        assert!(
            (b.value[[0]] - 0.49).abs() < 1e-6,
            "1-D params are not decayed"
        );
    }

    #[test]
    fn adamw_slice_path_and_strided_path_give_the_same_bits() {
        // 240 × 300 is above the parallel threshold: chunked slices on one side, ndarray's
        // Zip over a column-major gradient on the other.
        let init = ndarray::Array2::from_shape_fn((240, 300), |(i, j)| {
            ((i * 31 + j * 17) % 23) as f32 * 0.1 - 1.1
        })
        .into_dyn();
        let mut contiguous = Parameter::new("w", init.clone());
        let mut strided = Parameter::new("w", init);
        let cfg = AdamWConfig {
            weight_decay: 0.1,
            ..AdamWConfig::default()
        };
        let (mut opt_a, mut opt_b) = (AdamW::new([&contiguous], cfg), AdamW::new([&strided], cfg));
        for step in 0..3 {
            let ga = grads_of(&contiguous, |v| v.mul(v).unwrap().sum_all().unwrap());
            let mut gb = grads_of(&strided, |v| v.mul(v).unwrap().sum_all().unwrap());
            let g = gb.get_mut_by_name("w").unwrap();
            let mut column_major = ndarray::Array2::zeros((300, 240));
            column_major.assign(&g.view().into_dimensionality::<ndarray::Ix2>().unwrap().t());
            *g = column_major.reversed_axes().into_dyn();
            assert!(g.as_slice().is_none(), "the second gradient is strided");
            opt_a.step(&mut [&mut contiguous], &ga, 0.01).unwrap();
            opt_b.step(&mut [&mut strided], &gb, 0.01).unwrap();
            assert_eq!(contiguous.value, strided.value, "step {step}");
        }
    }

    #[test]
    fn adamw_steps_several_parameters_together_as_each_alone() {
        // One parallel pass over every parameter's chunks: a large weight (several chunks),
        // a bias (no decay), one with a strided gradient, and one that gets no gradient in the
        // first step (so its bias corrections differ): each with its own rule and buffers.
        let value = |rows: usize, cols: usize, seed: usize| {
            ndarray::Array2::from_shape_fn((rows, cols), |(i, j)| {
                ((i * 31 + j * 17 + seed) % 23) as f32 * 0.1 - 1.1
            })
            .into_dyn()
        };
        let params = || {
            vec![
                Parameter::new("big", value(300, 400, 1)),
                Parameter::new(
                    "bias",
                    ndarray::Array1::linspace(-1.0f32, 1.0, 7).into_dyn(),
                ),
                Parameter::new("strided", value(60, 50, 3)),
                Parameter::new("late", value(3, 3, 4)),
            ]
        };
        let grads = |ps: &[Parameter], step: usize| {
            // Σ w² over the parameters with a gradient this step, on one tape.
            let tape = Tape::new();
            let mut loss: Option<tapelora_autograd::Var<'_, f32>> = None;
            for p in ps.iter().filter(|p| p.name != "late" || step > 0) {
                let v = p.on(&tape);
                let term = v.mul(&v).unwrap().sum_all().unwrap();
                loss = Some(match loss {
                    None => term,
                    Some(l) => l.add(&term).unwrap(),
                });
            }
            let mut all = tape.backward(&loss.unwrap()).unwrap();
            let g = all.get_mut_by_name("strided").unwrap();
            let mut columns = ndarray::Array2::zeros((50, 60));
            columns.assign(&g.view().into_dimensionality::<ndarray::Ix2>().unwrap().t());
            *g = columns.reversed_axes().into_dyn();
            all
        };
        let (mut together, mut alone) = (params(), params());
        let mut opt = AdamW::new(together.iter(), AdamWConfig::default());
        let mut opts: Vec<AdamW> = alone
            .iter()
            .map(|p| AdamW::new([p], AdamWConfig::default()))
            .collect();
        for step in 0..3 {
            let g = grads(&together, step);
            opt.step(&mut together.iter_mut().collect::<Vec<_>>(), &g, 0.01)
                .unwrap();
            let g = grads(&alone, step);
            for (p, opt) in alone.iter_mut().zip(&mut opts) {
                opt.step(&mut [p], &g, 0.01).unwrap();
            }
        }
        for (a, b) in together.iter().zip(&alone) {
            assert_eq!(a.value, b.value, "{}", a.name);
            assert_ne!(
                a.value,
                params().iter().find(|p| p.name == a.name).unwrap().value
            );
        }
    }

    #[test]
    fn adamw_state_round_trips() {
        let mut w = Parameter::new("w", ndarray::arr1(&[1.0f32, 2.0]).into_dyn());
        let mut opt = AdamW::new([&w], AdamWConfig::default());
        let g = grads_of(&w, |v| v.mul(v).unwrap().sum_all().unwrap());
        opt.step(&mut [&mut w], &g, 0.1).unwrap();
        let saved: BTreeMap<_, _> = opt.state_tensors().into_iter().collect();
        let mut fresh = AdamW::new([&w], AdamWConfig::default());
        fresh.load_state_tensors(&saved).unwrap();
        let (mut w1, mut w2) = (w.clone(), w.clone());
        opt.step(&mut [&mut w1], &g, 0.1).unwrap();
        fresh.step(&mut [&mut w2], &g, 0.1).unwrap();
        assert_eq!(w1.value, w2.value);
        assert!(fresh.load_state_tensors(&BTreeMap::new()).is_err());
    }

    #[test]
    fn sgd_momentum_and_clipping() {
        let mut w = Parameter::new("w", ndarray::arr1(&[3.0f32, 4.0]).into_dyn());
        let mut opt = Sgd::new(
            [&w],
            SgdConfig {
                momentum: 0.9,
                weight_decay: 0.0,
            },
        );
        let mut g = grads_of(&w, |v| {
            v.mul(v).unwrap().sum_all().unwrap().scale(0.5).unwrap()
        }); // g = w
        assert!((clip_grad_norm(&mut g, ["w"], 1.0) - 5.0).abs() < 1e-9);
        let clipped = g.get_by_name("w").unwrap().clone();
        assert!((clipped[[0]] - 0.6).abs() < 1e-5 && (clipped[[1]] - 0.8).abs() < 1e-5);
        opt.step(&mut [&mut w], &g, 1.0).unwrap(); // buf = g
        opt.step(&mut [&mut w], &g, 1.0).unwrap(); // buf = 0.9g + g
        assert!((w.value[[0]] - (3.0 - 0.6 - 1.9 * 0.6)).abs() < 1e-5);
        assert_eq!(opt.state_bytes(), 8);
    }
}
