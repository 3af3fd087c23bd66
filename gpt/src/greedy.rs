//! Greedy decoding's lm_head at half the bytes, with the same token as the full product.
//!
//! At batch 1 a decoding step is bound by reading the weights, and GPT-2's tied lm_head (the
//! `[V, C]` token table, 154 MB of its 497) is a third of them. Greedy search needs only the
//! position of the largest logit, so [`GreedyHead`] reads a bfloat16 copy of the table (half
//! the bytes) for an estimate `ã_v` of every logit, with a proven bound `m_v` on how far the
//! float32 logit `l_v` of the full product can be from it:
//!
//! * rounding a weight to bfloat16 moves it by at most 2⁻⁸ of itself, and float32 sums of
//!   `C` products are within γ_C = C·2⁻²⁴/(1 − C·2⁻²⁴) of exact (twice: the estimate and the
//!   full product), so `|ã_v − l_v| ≤ (2⁻⁸ + 3γ_C)·Σ|h_i·w_vi|`, and that sum is at most
//!   both ‖h‖₂·‖w_v‖₂ (Cauchy–Schwarz) and ‖h‖₁·max|w_v| — the first the tighter for a state
//!   spread over many entries, the second for one with a few large entries, as trained
//!   models' final states have. The margin `m_v` is the smaller, padded by 1 % and a tiny
//!   absolute term for underflow; the rows' norms and largest entries are found with the copy;
//! * with `τ = max_v (ã_v − m_v)`, every row whose `ã_v + m_v < τ` has `l_v < τ ≤ l_u` for
//!   the row `u` attaining τ, so it cannot be the argmax; the few rows left (the candidates)
//!   get their float32 logits from the same product as the full lm_head — the same op on
//!   their rows, element by element the same bits — and the first largest of those is the
//!   token the full product would have picked.
//!
//! When the bound cannot be used (a non-finite hidden state or estimate, or more than
//! [`MAX_CANDIDATES`] candidates), [`GreedyHead::argmax`] computes every logit as the full
//! lm_head does. The copy costs 2 bytes per table entry while generating and one pass over
//! the table to make, so [`crate::generate::generate`] builds it only for greedy runs of
//! at least [`MIN_NEW_TOKENS`] tokens.

use ndarray::{ArrayD, ArrayView1, Axis, IxDyn};
use rayon::prelude::*;
use tapelora_autograd::{Tape, Tensor};

use crate::model::Gpt;
use crate::Result;

/// Greedy runs shorter than this compute every logit (the copy would cost more than it saves).
pub const MIN_NEW_TOKENS: usize = 16;

/// More candidates than this (nearly equal logits everywhere) and every logit is computed.
pub const MAX_CANDIDATES: usize = 4096;

/// Rows per rayon task of the estimate pass (≈ 1.5 MB of GPT-2's bfloat16 table).
const ROWS_PER_TASK: usize = 1024;

/// A bfloat16 copy of a tied lm_head's table.
pub struct GreedyHead {
    /// The float32 table itself (shared with the model, not copied): `[V, C]`.
    table: Tensor<f32>,
    table_bf16: Vec<u16>,
    /// Each row's ‖w_v‖₂ and max|w_v|, for the bound.
    row_norms: Vec<(f64, f64)>,
    /// Searches that computed every logit (the bound did not narrow them enough).
    fallbacks: std::cell::Cell<usize>,
}

impl GreedyHead {
    /// The copy of `model`'s token table, or `None` where the head does not apply: an adapter
    /// on the table (its output has a term of its own), or a weight that is not finite or
    /// would not be in bfloat16.
    pub fn new(model: &Gpt) -> Option<GreedyHead> {
        if model.wte.adapter.is_some() {
            return None;
        }
        let table = model.wte.weight.value.clone();
        let (&[vocab, dim], Some(flat)) = (table.shape(), table.as_slice()) else {
            return None;
        };
        if vocab == 0 || dim == 0 {
            return None;
        }
        let mut table_bf16 = vec![0u16; flat.len()];
        let mut row_norms = vec![(0.0, 0.0); vocab];
        let not_finite: usize = table_bf16
            .par_chunks_mut(ROWS_PER_TASK * dim)
            .zip(row_norms.par_chunks_mut(ROWS_PER_TASK))
            .zip(flat.par_chunks(ROWS_PER_TASK * dim))
            .map(|((out, norms), rows)| {
                tapelora_autograd::simd::vectorized(
                    #[inline(always)]
                    || {
                        let mut not_finite = 0;
                        for ((out, norms), row) in out
                            .chunks_exact_mut(dim)
                            .zip(norms.iter_mut())
                            .zip(rows.chunks_exact(dim))
                        {
                            for (b, &w) in out.iter_mut().zip(row) {
                                *b = to_bf16(w);
                                not_finite += usize::from(*b & 0x7f80 == 0x7f80);
                            }
                            *norms = norms_f64(row);
                        }
                        not_finite
                    },
                )
            })
            .sum();
        (not_finite == 0).then_some(GreedyHead {
            table,
            table_bf16,
            row_norms,
            fallbacks: std::cell::Cell::new(0),
        })
    }

    /// Bytes one decoding step reads from the table through this head (the bfloat16 copy).
    pub fn bytes_per_step(&self) -> usize {
        2 * self.table_bf16.len()
    }

    /// The first position of the largest logit `hidden · table[v]`, as the full lm_head's
    /// float32 product and the greedy argmax of [`crate::generate::sample`] give it.
    pub fn argmax(&self, hidden: ArrayView1<f32>) -> Result<usize> {
        match self.candidates(hidden) {
            Some(rows) => {
                let logits = self.exact_logits(hidden, Some(&rows))?;
                Ok(rows[first_max(&logits)])
            }
            None => {
                self.fallbacks.set(self.fallbacks.get() + 1);
                Ok(first_max(&self.exact_logits(hidden, None)?))
            }
        }
    }

    /// How many searches so far computed every logit after all (each then cost the estimate
    /// pass on top of the full product).
    pub fn fallbacks(&self) -> usize {
        self.fallbacks.get()
    }

    /// The rows the bound cannot rule out, in increasing order; `None` if it cannot be used.
    fn candidates(&self, hidden: ArrayView1<f32>) -> Option<Vec<usize>> {
        let dim = self.table.shape()[1];
        let h = hidden.as_standard_layout();
        let h = h.as_slice().expect("standard layout");
        if h.len() != dim || !h.iter().all(|v| v.is_finite()) {
            return None;
        }
        let estimates = self.estimates(h);
        if !estimates.iter().all(|e| e.is_finite()) {
            return None;
        }
        let h_l1 = h.iter().map(|&v| f64::from(v.abs())).sum::<f64>();
        let h_l2 = norms_f64(h).0;
        let unit = dim as f64 * f64::from(f32::EPSILON) / 2.0;
        let gamma = unit / (1.0 - unit);
        let factor = (2f64.powi(-8) + 3.0 * gamma) * 1.01;
        let bounds = |v: usize| {
            let (l2, max) = self.row_norms[v];
            let margin = factor * (h_l2 * l2).min(h_l1 * max) + 1e-30;
            let e = f64::from(estimates[v]);
            (e - margin, e + margin)
        };
        let floor = (0..self.row_norms.len())
            .map(|v| bounds(v).0)
            .fold(f64::NEG_INFINITY, f64::max);
        let rows: Vec<usize> = (0..self.row_norms.len())
            .filter(|&v| bounds(v).1 >= floor)
            .collect();
        (rows.len() <= MAX_CANDIDATES).then_some(rows)
    }

    /// `ã_v = h · bf16(table[v])` for every row, in float32.
    fn estimates(&self, h: &[f32]) -> Vec<f32> {
        let dim = h.len();
        let mut out = vec![0.0f32; self.row_norms.len()];
        out.par_chunks_mut(ROWS_PER_TASK)
            .zip(self.table_bf16.par_chunks(ROWS_PER_TASK * dim))
            .for_each(|(out, rows)| {
                tapelora_autograd::simd::vectorized(
                    #[inline(always)]
                    || {
                        // Four rows a quarter of the block apart per pass: four sequential
                        // streams keep more of the memory's bandwidth busy than one.
                        let q = out.len() / 4;
                        let row = |i: usize| &rows[i * dim..(i + 1) * dim];
                        for t in 0..q {
                            let dots =
                                dot4_bf16(h, [row(t), row(t + q), row(t + 2 * q), row(t + 3 * q)]);
                            for (k, dot) in dots.into_iter().enumerate() {
                                out[t + k * q] = dot;
                            }
                        }
                        for (i, o) in out.iter_mut().enumerate().skip(4 * q) {
                            *o = dot4_bf16(h, [row(i); 4])[0];
                        }
                    },
                )
            });
        out
    }

    /// The full lm_head's logits for `rows` (all rows if `None`): the op the model's tied
    /// output runs, `h · Wᵀ` on the tape, on those rows of the table.
    fn exact_logits(&self, hidden: ArrayView1<f32>, rows: Option<&[usize]>) -> Result<ArrayD<f32>> {
        let dim = self.table.shape()[1];
        let table = match rows {
            Some(rows) => self.table.select(Axis(0), rows).into_shared(),
            None => self.table.clone(),
        };
        let tape = Tape::<f32>::new();
        tape.no_grad(|| -> Result<ArrayD<f32>> {
            let h = tape.constant(
                hidden
                    .to_owned()
                    .into_shape_with_order(IxDyn(&[1, 1, dim]))
                    .expect("1×1×C"),
            );
            let w = tape.constant(table);
            let logits = h.matmul(&w.transpose(0, 1)?)?;
            let n = logits.value().len();
            Ok(logits
                .value()
                .to_owned()
                .into_shape_with_order(IxDyn(&[n]))
                .expect("flat"))
        })
    }
}

/// The first position of the largest value (NaN never wins): greedy sampling's pick.
pub(crate) fn first_max<'a>(values: impl IntoIterator<Item = &'a f32>) -> usize {
    values
        .into_iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
            if v > best.1 {
                (i, v)
            } else {
                best
            }
        })
        .0
}

/// float32 → bfloat16, rounding to nearest even (so |error| ≤ 2⁻⁸·|w|).
fn to_bf16(w: f32) -> u16 {
    let bits = w.to_bits();
    if w.is_nan() {
        return 0x7fc0;
    }
    let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1));
    (rounded >> 16) as u16
}

#[inline(always)]
fn from_bf16(b: u16) -> f32 {
    f32::from_bits(u32::from(b) << 16)
}

/// `(‖a‖₂, max|a|)`, the squares summed in eight float64 lanes (none underflows).
#[inline(always)]
fn norms_f64(a: &[f32]) -> (f64, f64) {
    let mut lanes = [0.0f64; 8];
    let (a8, a_tail) = a.as_chunks::<8>();
    for x in a8 {
        for l in 0..8 {
            lanes[l] += f64::from(x[l]) * f64::from(x[l]);
        }
    }
    let squares = a_tail.iter().fold(lanes.iter().sum::<f64>(), |s, &x| {
        s + f64::from(x) * f64::from(x)
    });
    let max = a.iter().fold(0.0f32, |m, &x| m.max(x.abs()));
    (squares.sqrt(), f64::from(max))
}

/// `h · w` for four rows `w` in bfloat16 at once, each in sixteen float32 lanes.
#[inline(always)]
fn dot4_bf16(h: &[f32], w: [&[u16]; 4]) -> [f32; 4] {
    let (mut a0, mut a1, mut a2, mut a3) = ([0.0f32; 16], [0.0f32; 16], [0.0f32; 16], [0.0f32; 16]);
    let (h16, h_tail) = h.as_chunks::<16>();
    let [w0, w1, w2, w3] = w.map(|w| w.as_chunks::<16>().0);
    for ((((x, y0), y1), y2), y3) in h16.iter().zip(w0).zip(w1).zip(w2).zip(w3) {
        for l in 0..16 {
            a0[l] += x[l] * from_bf16(y0[l]);
            a1[l] += x[l] * from_bf16(y1[l]);
            a2[l] += x[l] * from_bf16(y2[l]);
            a3[l] += x[l] * from_bf16(y3[l]);
        }
    }
    let lanes = [a0, a1, a2, a3];
    std::array::from_fn(|k| {
        let tail = &w[k][h16.len() * 16..];
        h_tail
            .iter()
            .zip(tail)
            .fold(lanes[k].iter().sum::<f32>(), |s, (&x, &y)| {
                s + x * from_bf16(y)
            })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::GptConfig;
    use ndarray::ArrayView2;
    use rand::{Rng, SeedableRng};

    fn model(vocab: usize, dim: usize, seed: u64) -> Gpt {
        let cfg = GptConfig {
            n_layer: 1,
            n_head: 2,
            n_embd: dim,
            n_positions: 64,
            vocab_size: vocab,
            n_inner: 4 * dim,
            layer_norm_epsilon: 1e-5,
            bias: true,
            dropout: 0.0,
        };
        Gpt::new(cfg, &mut rand_chacha::ChaCha8Rng::seed_from_u64(seed)).unwrap()
    }

    #[test]
    fn bf16_rounding_is_to_nearest_and_within_its_bound() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        for _ in 0..10_000 {
            let w: f32 = rng.random_range(-3.0..3.0) * 10f32.powi(rng.random_range(-20..20));
            let b = from_bf16(to_bf16(w));
            assert!((b - w).abs() <= w.abs() * 2f32.powi(-8), "{w} → {b}");
        }
        assert_eq!(from_bf16(to_bf16(1.0)), 1.0);
        assert_eq!(
            to_bf16(1.0 + 2f32.powi(-8)),
            to_bf16(1.0),
            "a tie rounds to even"
        );
    }

    #[test]
    fn candidate_logits_have_the_bits_of_the_full_lm_head() {
        // Whatever rows are picked, each logit is the full product's, bit for bit.
        for (vocab, dim) in [(50, 16), (301, 48), (2000, 64)] {
            let m = model(vocab, dim, 3);
            let head = GreedyHead::new(&m).unwrap();
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(vocab as u64);
            let hidden = ndarray::Array1::from_shape_fn(dim, |_| rng.random_range(-2.0f32..2.0));
            let all = head.exact_logits(hidden.view(), None).unwrap();
            let rows: Vec<usize> = (0..vocab).filter(|v| v % 7 == 3 || v % 11 == 0).collect();
            let some = head.exact_logits(hidden.view(), Some(&rows)).unwrap();
            for (i, &v) in rows.iter().enumerate() {
                assert_eq!(
                    some[i].to_bits(),
                    all[v].to_bits(),
                    "row {v} of {vocab}×{dim}"
                );
            }
            // And the full product is the model's own lm_head on this hidden state.
            let tape = Tape::new();
            let ctx = tapelora_nn::Ctx::eval(&tape);
            let x = tape.constant(
                hidden
                    .clone()
                    .into_shape_with_order(IxDyn(&[1, 1, dim]))
                    .unwrap(),
            );
            let own = m.wte.forward_tied_output(&ctx, &x).unwrap();
            let own: Vec<u32> = own.value().iter().map(|v| v.to_bits()).collect();
            assert_eq!(own, all.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
        }
    }

    #[test]
    fn argmax_is_the_full_products_even_for_near_ties() {
        let (vocab, dim) = (3000, 64);
        let mut m = model(vocab, dim, 7);
        // Rows 10, 11 and 2999 equal to row 500 but for a last-bit change: estimates that
        // cannot tell them apart, logits that can.
        {
            let mut table = m.wte.weight.value.to_owned();
            let base = table.index_axis(Axis(0), 500).to_owned();
            for (row, bump) in [(10, 1i32), (11, -1), (2999, 2)] {
                let mut copy = base.clone();
                copy[5] = f32::from_bits((copy[5].to_bits() as i32 + bump) as u32);
                table.index_axis_mut(Axis(0), row).assign(&copy);
            }
            m.wte.weight.value = table.into_shared();
        }
        let head = GreedyHead::new(&m).unwrap();
        let table: ArrayView2<f32> = m.wte.weight.value.view().into_dimensionality().unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let mut narrowed = 0;
        for trial in 0..200 {
            // Half the trials point the hidden state at row 500's neighbourhood.
            let hidden = if trial % 2 == 0 {
                table
                    .row(500)
                    .mapv(|w| w * 40.0 + rng.random_range(-1e-3..1e-3))
            } else {
                ndarray::Array1::from_shape_fn(dim, |_| rng.random_range(-3.0f32..3.0))
            };
            let logits = head.exact_logits(hidden.view(), None).unwrap();
            let expected = first_max(&logits);
            assert_eq!(
                head.argmax(hidden.view()).unwrap(),
                expected,
                "trial {trial}"
            );
            if let Some(rows) = head.candidates(hidden.view()) {
                assert!(rows.contains(&expected));
                narrowed += usize::from(rows.len() < vocab / 10);
            }
            // The estimates stay within their bound of the full logits.
            let estimates = head.estimates(hidden.as_slice().unwrap());
            for (v, &estimate) in estimates.iter().enumerate() {
                let gap = (f64::from(estimate) - f64::from(logits[v])).abs();
                let exact_abs_sum = hidden
                    .iter()
                    .zip(table.row(v))
                    .map(|(&h, &w)| f64::from(h).abs() * f64::from(w).abs())
                    .sum::<f64>();
                assert!(gap <= 2f64.powi(-8) * 1.01 * exact_abs_sum + 1e-6);
            }
        }
        assert!(
            narrowed >= 150,
            "the bound narrows most searches: {narrowed} of 200"
        );
    }

    #[test]
    fn a_non_finite_hidden_state_falls_back_to_every_logit() {
        let m = model(40, 16, 2);
        let head = GreedyHead::new(&m).unwrap();
        let mut hidden = ndarray::Array1::from_elem(16, 0.5f32);
        hidden[3] = f32::NAN;
        assert!(head.candidates(hidden.view()).is_none());
        assert_eq!(
            head.argmax(hidden.view()).unwrap(),
            first_max(&head.exact_logits(hidden.view(), None).unwrap())
        );
        assert_eq!(head.fallbacks(), 1);
        // So does a table of more than MAX_CANDIDATES equal rows: every logit is a candidate.
        let mut wide = model(MAX_CANDIDATES + 10, 16, 2);
        wide.wte.weight.value =
            ArrayD::from_elem(IxDyn(&[MAX_CANDIDATES + 10, 16]), 0.25).into_shared();
        let head = GreedyHead::new(&wide).unwrap();
        let hidden = ndarray::Array1::from_elem(16, 0.5f32);
        assert!(head.candidates(hidden.view()).is_none());
        assert_eq!(
            head.argmax(hidden.view()).unwrap(),
            0,
            "the first of equal logits"
        );
        assert_eq!(head.fallbacks(), 1);
    }
}
