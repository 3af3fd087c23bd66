//! Greedy decoding's lm_head from an int8 copy of the table, with the same token as the
//! full product.
//!
//! At batch 1 a decoding step is bound by reading the weights, and GPT-2's tied lm_head (the
//! `[V, C]` token table, 154 MB of its 497) is a third of them. Greedy search needs only the
//! position of the largest logit, so [`GreedyHead`] reads an 8-bit copy of the table (a
//! quarter of the bytes) for an estimate `ã_v` of every logit, with a proven bound `m_v` on
//! how far the float32 logit `l_v` of the full product can be from it:
//!
//! * each entry is stored as `w_vi ≈ w̃_vi = s_v·c_i·q_vi` with an integer `q_vi ∈ [−127, 127]`,
//!   a scale `c_i` per column (the column's largest magnitude in a sample of rows: trained
//!   token tables have a few channels much larger than the rest, which would otherwise set
//!   every row's step) and a scale `s_v` per row. The copy keeps, per row, the quantisation
//!   error `e_v = w_v − w̃_v`'s ‖e_v‖₂ and `max_i |e_vi|/c_i` (computed in float64, within
//!   2⁻⁵² of exact), so `|Σ h_i·e_vi|` is at most
//!   `S_e = min(‖h‖₂·‖e_v‖₂, ‖h∘c‖₁·max_i |e_vi|/c_i)`;
//! * the estimate is `ã_v = s_v · Σ (h_i·c_i)·q_vi` in float32. Float32 sums of `C` products
//!   are within γ_C = C·2⁻²⁴/(1 − C·2⁻²⁴) of exact, for the estimate and for the full product,
//!   and the two extra roundings (`h_i·c_i`, `s_v·…`) are within 2⁻²⁴ each, so
//!   `|ã_v − l_v| ≤ S_e + 3γ_C·(S_w + S_e)` with `S_w = min(‖h‖₂·‖w_v‖₂, ‖h‖₁·max|w_v|)`
//!   (Cauchy–Schwarz, and the bound for a state with a few large entries, as trained models'
//!   final states have). The margin `m_v` is that, padded by 1 % (for the float64 work of the
//!   statistics and norms) and a tiny absolute term for underflow;
//! * with `τ = max_v (ã_v − m_v)`, every row whose `ã_v + m_v < τ` has `l_v < τ ≤ l_u` for
//!   the row `u` attaining τ, so it cannot be the argmax; the few rows left (the candidates)
//!   get their float32 logits from the same product as the full lm_head — the same op on
//!   their rows, element by element the same bits — and the first largest of those is the
//!   token the full product would have picked.
//!
//! When the bound cannot be used (a non-finite hidden state or estimate, or more than
//! [`MAX_CANDIDATES`] candidates), [`GreedyHead::argmax`] computes every logit as the full
//! lm_head does. The copy costs a byte per table entry while generating and a pass over the
//! table to make (≈ 60 ms for GPT-2 on two threads), so [`crate::generate::generate`] builds it only for greedy runs of at
//! least [`MIN_NEW_TOKENS`] tokens.

use ndarray::{ArrayD, ArrayView1, Axis, IxDyn};
use std::sync::atomic::{AtomicUsize, Ordering};

use rayon::prelude::*;
use tapelora_autograd::{Tape, Tensor};

use crate::model::Gpt;
use crate::Result;

/// Greedy runs shorter than this compute every logit (the copy would cost more than it saves).
pub const MIN_NEW_TOKENS: usize = 16;

/// More candidates than this (nearly equal logits everywhere) and every logit is computed.
pub const MAX_CANDIDATES: usize = 4096;

/// Rows per rayon task of the estimate pass (≈ 0.8 MB of GPT-2's int8 table).
const ROWS_PER_TASK: usize = 1024;

/// The column scales are taken from every this-many-th row (a sixteenth of the reading).
const COLUMN_SAMPLE: usize = 16;

/// The largest code: symmetric, so −127…127.
const CODE_MAX: f64 = 127.0;

/// What the bound needs of one row `w_v` and its error `e_v = w_v − w̃_v`.
#[derive(Clone, Copy, Default)]
struct RowStats {
    w_l2: f64,
    w_max: f64,
    e_l2: f64,
    /// `max_i |e_vi| / c_i`.
    e_max_per_column_scale: f64,
}

/// An int8 copy of a tied lm_head's table.
pub struct GreedyHead {
    /// The float32 table itself (shared with the model, not copied): `[V, C]`.
    table: Tensor<f32>,
    /// `q_vi`, row-major `[V, C]`.
    codes: Vec<i8>,
    /// `s_v`.
    row_scales: Vec<f32>,
    /// `c_i`.
    column_scales: Vec<f32>,
    row_stats: Vec<RowStats>,
    /// Searches that computed every logit (the bound did not narrow them enough).
    fallbacks: AtomicUsize,
}

impl GreedyHead {
    /// The copy of `model`'s token table, or `None` where the head does not apply: an adapter
    /// on the table (its output has a term of its own), or a weight that is not finite.
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
        // Each column's scale: its largest magnitude over every COLUMN_SAMPLE-th row (any
        // positive scales give a valid code and bound; the row scales absorb the rest), 1 for
        // a column of zeros or of subnormal numbers, so every reciprocal below is finite.
        let column_scales: Vec<f32> = tapelora_autograd::simd::vectorized(
            #[inline(always)]
            || {
                let mut max = vec![0.0f32; dim];
                for row in flat.chunks_exact(dim).step_by(COLUMN_SAMPLE) {
                    for (m, &w) in max.iter_mut().zip(row) {
                        *m = m.max(w.abs());
                    }
                }
                max
            },
        )
        .into_iter()
        .map(|c| if c.is_normal() { c } else { 1.0 })
        .collect();
        let inverse_columns: Vec<f32> = column_scales.iter().map(|&c| 1.0 / c).collect();
        let mut codes = vec![0i8; flat.len()];
        let mut row_scales = vec![0.0f32; vocab];
        let mut row_stats = vec![RowStats::default(); vocab];
        let finite = codes
            .par_chunks_mut(ROWS_PER_TASK * dim)
            .zip(row_scales.par_chunks_mut(ROWS_PER_TASK))
            .zip(row_stats.par_chunks_mut(ROWS_PER_TASK))
            .zip(flat.par_chunks(ROWS_PER_TASK * dim))
            .map(|(((codes, scales), stats), rows)| {
                let mut levels = vec![0.0f32; dim];
                tapelora_autograd::simd::vectorized(
                    #[inline(always)]
                    || {
                        let mut finite = true;
                        for (((codes, scale), stats), row) in codes
                            .chunks_exact_mut(dim)
                            .zip(scales.iter_mut())
                            .zip(stats.iter_mut())
                            .zip(rows.chunks_exact(dim))
                        {
                            match quantize_row(
                                row,
                                &column_scales,
                                &inverse_columns,
                                codes,
                                &mut levels,
                            ) {
                                Some(quantized) => (*scale, *stats) = quantized,
                                None => finite = false,
                            }
                        }
                        finite
                    },
                )
            })
            .reduce(|| true, |a, b| a && b);
        finite.then_some(GreedyHead {
            table,
            codes,
            row_scales,
            column_scales,
            row_stats,
            fallbacks: AtomicUsize::new(0),
        })
    }

    /// Bytes one decoding step reads through this head (the codes and the row scales).
    pub fn bytes_per_step(&self) -> usize {
        self.codes.len() + 4 * self.row_scales.len()
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
                self.fallbacks.fetch_add(1, Ordering::Relaxed);
                Ok(first_max(&self.exact_logits(hidden, None)?))
            }
        }
    }

    /// How many searches so far computed every logit after all (each then cost the estimate
    /// pass on top of the full product).
    pub fn fallbacks(&self) -> usize {
        self.fallbacks.load(Ordering::Relaxed)
    }

    /// The rows the bound cannot rule out, in increasing order; `None` if it cannot be used.
    fn candidates(&self, hidden: ArrayView1<f32>) -> Option<Vec<usize>> {
        let h = hidden.as_standard_layout();
        let h = h.as_slice().expect("standard layout");
        let (estimates, margins) = self.estimates_and_margins(h)?;
        let floor = estimates
            .iter()
            .zip(&margins)
            .map(|(&e, &m)| f64::from(e) - m)
            .fold(f64::NEG_INFINITY, f64::max);
        let rows: Vec<usize> = (0..estimates.len())
            .filter(|&v| f64::from(estimates[v]) + margins[v] >= floor)
            .collect();
        (rows.len() <= MAX_CANDIDATES).then_some(rows)
    }

    /// Every row's estimate `ã_v` and margin `m_v ≥ |ã_v − l_v|` (see the module docs), or
    /// `None` for a state or estimate that is not finite (the bound needs finite numbers).
    fn estimates_and_margins(&self, h: &[f32]) -> Option<(Vec<f32>, Vec<f64>)> {
        let dim = self.column_scales.len();
        if h.len() != dim || !h.iter().all(|v| v.is_finite()) {
            return None;
        }
        let scaled: Vec<f32> = h
            .iter()
            .zip(&self.column_scales)
            .map(|(&x, &c)| x * c)
            .collect();
        let h_l1 = h.iter().map(|&v| f64::from(v.abs())).sum::<f64>();
        let h_l2 = l2_norm_f64(h);
        let hc_l1 = h
            .iter()
            .zip(&self.column_scales)
            .map(|(&v, &c)| f64::from(v.abs()) * f64::from(c))
            .sum::<f64>();
        let unit = dim as f64 * f64::from(f32::EPSILON) / 2.0;
        let gamma = unit / (1.0 - unit);
        let margin = |r: &RowStats| {
            let error = (h_l2 * r.e_l2).min(hc_l1 * r.e_max_per_column_scale);
            let weights = (h_l2 * r.w_l2).min(h_l1 * r.w_max);
            1.01 * (error + 3.0 * gamma * (weights + error)) + 1e-30
        };
        let (estimates, margins) = self.estimates(&scaled, margin);
        estimates
            .iter()
            .all(|e| e.is_finite())
            .then_some((estimates, margins))
    }

    /// `ã_v = s_v · Σ_i scaled_i·q_vi` for every row, in float32 (`scaled = h∘c`), and
    /// `margin` of each row's statistics, in the same parallel pass.
    fn estimates(
        &self,
        scaled: &[f32],
        margin: impl Fn(&RowStats) -> f64 + Sync,
    ) -> (Vec<f32>, Vec<f64>) {
        let dim = scaled.len();
        // Block `c` of ROWS_PER_TASK rows: their estimates and margins.
        let block = |c: usize, out: &mut [f32], margins: &mut [f64]| {
            let rows = &self.codes[c * ROWS_PER_TASK * dim..][..out.len() * dim];
            let scales = &self.row_scales[c * ROWS_PER_TASK..][..out.len()];
            let stats = &self.row_stats[c * ROWS_PER_TASK..][..out.len()];
            tapelora_autograd::simd::vectorized(
                #[inline(always)]
                || {
                    // Four rows a quarter of the block apart per pass: four sequential
                    // streams keep more of the memory's bandwidth busy than one.
                    let q = out.len() / 4;
                    let row = |i: usize| &rows[i * dim..(i + 1) * dim];
                    for t in 0..q {
                        let dots =
                            dot4_i8(scaled, [row(t), row(t + q), row(t + 2 * q), row(t + 3 * q)]);
                        for (k, dot) in dots.into_iter().enumerate() {
                            out[t + k * q] = scales[t + k * q] * dot;
                        }
                    }
                    for (i, o) in out.iter_mut().enumerate().skip(4 * q) {
                        *o = scales[i] * dot4_i8(scaled, [row(i); 4])[0];
                    }
                },
            );
            for (m, r) in margins.iter_mut().zip(stats) {
                *m = margin(r);
            }
        };
        // Through decoding's spinning partner when there is one (`partner::map`).
        let len = self.row_scales.len();
        let blocks = tapelora_autograd::partner::map(len.div_ceil(ROWS_PER_TASK), |c| {
            let rows = ROWS_PER_TASK.min(len - c * ROWS_PER_TASK);
            let (mut out, mut margins) = (vec![0.0f32; rows], vec![0.0f64; rows]);
            block(c, &mut out, &mut margins);
            (out, margins)
        });
        let (mut out, mut margins) = (Vec::with_capacity(len), Vec::with_capacity(len));
        for (block_out, block_margins) in blocks {
            out.extend(block_out);
            margins.extend(block_margins);
        }
        (out, margins)
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

/// One finite row's codes (written into `codes`), its scale `s_v`, and the statistics of it
/// and of its error `w − s_v·c∘q` that the bound needs. Codes are `w_i/(s_v·c_i)` rounded to
/// the nearest integer (found through reciprocals: a code off by one at a tie would only
/// loosen the bound, which is taken from the codes as stored); the error is computed in
/// float64 from the float32 scales the estimate uses (`s_v·c_i·q_vi` has up to 55 bits, so
/// within 2⁻⁵² of exact). A row too small for a normal float32 scale gets
/// `s_v = 1` (codes of 0, so its error is the row itself, and the bound says so).
#[inline(always)]
fn quantize_row(
    row: &[f32],
    column_scales: &[f32],
    inverse_columns: &[f32],
    codes: &mut [i8],
    levels: &mut [f32],
) -> Option<(f32, RowStats)> {
    // Eight lanes of the running maximum, so the loop vectorises.
    let (w8, w_tail) = row.as_chunks::<8>();
    let (inv8, inv_tail) = inverse_columns.as_chunks::<8>();
    let mut lanes = [0.0f32; 8];
    let mut finite = true;
    for (w, inv) in w8.iter().zip(inv8) {
        for l in 0..8 {
            // NaN fails the comparison.
            finite &= w[l].abs() <= f32::MAX;
            lanes[l] = lanes[l].max(w[l].abs() * inv[l]);
        }
    }
    finite &= w_tail.iter().all(|w| w.is_finite());
    if !finite {
        return None;
    }
    let largest = w_tail.iter().zip(inv_tail).fold(
        lanes.iter().fold(0.0f32, |m, &x| m.max(x)),
        |m, (&w, &inv)| m.max(w.abs() * inv),
    );
    let scale = (f64::from(largest) / CODE_MAX) as f32;
    let scale = if scale.is_normal() { scale } else { 1.0 };
    let inverse_scale = 1.0 / scale;
    // Codes first: adding 1.5·2²³ rounds to the nearest integer and leaves it in the low
    // bits (the code straight from the bits, where a float-to-integer cast would be a
    // saturating one that stops the loop vectorising). `levels` keeps each code as a float.
    const ROUND: f32 = 12_582_912.0;
    for ((code, level), (&w, &inv)) in codes
        .iter_mut()
        .zip(levels.iter_mut())
        .zip(row.iter().zip(inverse_columns))
    {
        let shifted = (w * inv * inverse_scale).clamp(-CODE_MAX as f32, CODE_MAX as f32) + ROUND;
        *level = shifted - ROUND;
        *code = shifted.to_bits().wrapping_sub(ROUND.to_bits()) as i8;
    }
    // Then the error of each entry, exactly, in float64, in four lanes: each running sum and
    // maximum fits one register (with eight lanes they spilled to the stack, and the copy
    // took 1.2–1.3× as long). Maxima by comparison: `f64::max`'s NaN rule costs a compare and
    // blend per lane, and nothing here is NaN.
    const L: usize = 4;
    let (mut w_squares, mut e_squares) = ([0.0f64; L], [0.0f64; L]);
    let (mut w_max, mut e_max) = ([0.0f64; L], [0.0f64; L]);
    let scale64 = f64::from(scale);
    let (w4, w_tail) = row.as_chunks::<L>();
    let (c4, c_tail) = column_scales.as_chunks::<L>();
    let (inv4, inv_tail) = inverse_columns.as_chunks::<L>();
    let (q4, q_tail) = levels.as_chunks::<L>();
    for (((w, c), inv), q) in w4.iter().zip(c4).zip(inv4).zip(q4) {
        for l in 0..L {
            let (w, q) = (f64::from(w[l]), f64::from(q[l]));
            let e = w - scale64 * f64::from(c[l]) * q;
            let e_per_c = e.abs() * f64::from(inv[l]);
            w_squares[l] += w * w;
            e_squares[l] += e * e;
            w_max[l] = if w.abs() > w_max[l] {
                w.abs()
            } else {
                w_max[l]
            };
            e_max[l] = if e_per_c > e_max[l] {
                e_per_c
            } else {
                e_max[l]
            };
        }
    }
    for (((&w, &c), &inv), &q) in w_tail.iter().zip(c_tail).zip(inv_tail).zip(q_tail) {
        let (w, q) = (f64::from(w), f64::from(q));
        let e = w - scale64 * f64::from(c) * q;
        w_squares[0] += w * w;
        e_squares[0] += e * e;
        w_max[0] = w_max[0].max(w.abs());
        e_max[0] = e_max[0].max(e.abs() * f64::from(inv));
    }
    let stats = RowStats {
        w_l2: w_squares.iter().sum::<f64>().sqrt(),
        w_max: w_max.iter().fold(0.0f64, |m, &x| m.max(x)),
        e_l2: e_squares.iter().sum::<f64>().sqrt(),
        // |e|/c against |e|·fl(1/c), which is within 2⁻²⁴ of it: padded so it stays a bound.
        e_max_per_column_scale: e_max.iter().fold(0.0f64, |m, &x| m.max(x)) * (1.0 + 1e-6),
    };
    Some((scale, stats))
}

/// ‖a‖₂, the squares summed in eight float64 lanes (none underflows).
#[inline(always)]
fn l2_norm_f64(a: &[f32]) -> f64 {
    let mut lanes = [0.0f64; 8];
    let (a8, a_tail) = a.as_chunks::<8>();
    for x in a8 {
        for l in 0..8 {
            lanes[l] += f64::from(x[l]) * f64::from(x[l]);
        }
    }
    a_tail
        .iter()
        .fold(lanes.iter().sum::<f64>(), |s, &x| {
            s + f64::from(x) * f64::from(x)
        })
        .sqrt()
}

/// `h · q` for four rows of codes `q` at once, each in sixteen float32 lanes.
#[inline(always)]
fn dot4_i8(h: &[f32], w: [&[i8]; 4]) -> [f32; 4] {
    let (mut a0, mut a1, mut a2, mut a3) = ([0.0f32; 16], [0.0f32; 16], [0.0f32; 16], [0.0f32; 16]);
    let (h16, h_tail) = h.as_chunks::<16>();
    let [w0, w1, w2, w3] = w.map(|w| w.as_chunks::<16>().0);
    for ((((x, y0), y1), y2), y3) in h16.iter().zip(w0).zip(w1).zip(w2).zip(w3) {
        for l in 0..16 {
            a0[l] += x[l] * f32::from(y0[l]);
            a1[l] += x[l] * f32::from(y1[l]);
            a2[l] += x[l] * f32::from(y2[l]);
            a3[l] += x[l] * f32::from(y3[l]);
        }
    }
    let lanes = [a0, a1, a2, a3];
    std::array::from_fn(|k| {
        let tail = &w[k][h16.len() * 16..];
        h_tail
            .iter()
            .zip(tail)
            .fold(lanes[k].iter().sum::<f32>(), |s, (&x, &y)| {
                s + x * f32::from(y)
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
        let cfg = GptConfig::small(1, dim, 64, vocab);
        Gpt::new(cfg, &mut rand_chacha::ChaCha8Rng::seed_from_u64(seed)).unwrap()
    }

    #[test]
    fn quantized_rows_come_back_within_their_recorded_error() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        // Not a multiple of the four lanes: the last two entries take the tail loop.
        let dim = 50;
        // Column scales as a trained table's: most near 0.1, two channels 30× larger.
        let columns: Vec<f32> = (0..dim)
            .map(|i| {
                if i == 5 || i == 31 {
                    3.0
                } else {
                    rng.random_range(0.05..0.15)
                }
            })
            .collect();
        let mut rows: Vec<Vec<f32>> = (0..300)
            .map(|_| {
                columns
                    .iter()
                    .map(|&c| {
                        c * rng.random_range(-1.0f32..1.0) * 10f32.powi(rng.random_range(-3..1))
                    })
                    .collect()
            })
            .collect();
        rows.push(vec![0.0; dim]);
        let inverse: Vec<f32> = columns.iter().map(|&c| 1.0 / c).collect();
        rows.push((0..dim).map(|i| if i == 7 { 1e-42 } else { 0.0 }).collect());
        for row in &rows {
            let mut codes = vec![0i8; dim];
            let (scale, stats) =
                quantize_row(row, &columns, &inverse, &mut codes, &mut vec![0.0; dim]).unwrap();
            assert!(scale.is_normal() && scale > 0.0);
            let (mut e_squares, mut w_squares) = (0.0f64, 0.0f64);
            for i in 0..dim {
                assert!(codes[i] != i8::MIN, "codes stay within ±127");
                let step = f64::from(scale) * f64::from(columns[i]);
                let e = f64::from(row[i]) - step * f64::from(codes[i]);
                // Rounded to the nearest step, unless the row is too small for a scale.
                if row.iter().any(|w| w.abs() > 1e-30) {
                    assert!(
                        e.abs() <= 0.5 * step * (1.0 + 1e-4),
                        "{e} against a step of {step}"
                    );
                }
                assert!(
                    e.abs() <= stats.e_max_per_column_scale * f64::from(columns[i]) * (1.0 + 1e-12)
                );
                e_squares += e * e;
                w_squares += f64::from(row[i]).powi(2);
            }
            assert!((e_squares.sqrt() - stats.e_l2).abs() <= 1e-12 * stats.e_l2.max(1e-300));
            assert!((w_squares.sqrt() - stats.w_l2).abs() <= 1e-12 * stats.w_l2.max(1e-300));
            assert_eq!(
                stats.w_max,
                row.iter().fold(0.0f64, |m, &w| m.max(f64::from(w.abs())))
            );
        }
        // The error is about a 250th of the row's size, not of the two large channels'.
        let mut codes = vec![0i8; dim];
        let typical: Vec<f32> = columns.iter().map(|&c| 0.8 * c).collect();
        let (_, stats) = quantize_row(
            &typical,
            &columns,
            &inverse,
            &mut codes,
            &mut vec![0.0; dim],
        )
        .unwrap();
        assert!(
            stats.e_l2 <= stats.w_l2 / 200.0,
            "{} against {}",
            stats.e_l2,
            stats.w_l2
        );
        // A row with a NaN or an infinity has no codes (and a table with one, no head).
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            for at in [0, 13, dim - 1] {
                let mut row = typical.clone();
                row[at] = bad;
                assert!(
                    quantize_row(&row, &columns, &inverse, &mut codes, &mut vec![0.0; dim])
                        .is_none()
                );
            }
        }
        let mut m = model(40, 16, 5);
        let mut table = m.wte.weight.value.to_owned();
        table[[39, 15]] = f32::NAN;
        m.wte.weight.value = table.into_shared();
        assert!(GreedyHead::new(&m).is_none());
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
            // The estimates stay within their margins of the full logits.
            let (estimates, margins) = head
                .estimates_and_margins(hidden.as_slice().unwrap())
                .unwrap();
            for (v, (&estimate, &margin)) in estimates.iter().zip(&margins).enumerate() {
                let gap = (f64::from(estimate) - f64::from(logits[v])).abs();
                assert!(gap <= margin, "row {v}: {gap} > {margin}");
            }
        }
        assert!(
            narrowed >= 150,
            "the bound narrows most searches: {narrowed} of 200"
        );
    }

    #[test]
    fn a_table_with_large_channels_still_narrows_the_search() {
        // Like trained token tables (and final states): a few channels far larger than the
        // rest. Per-column scales keep the codes' step at the scale of each channel.
        let (vocab, dim) = (4000, 64);
        let mut m = model(vocab, dim, 11);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(12);
        let large = [3usize, 40];
        m.wte.weight.value = ndarray::Array2::from_shape_fn((vocab, dim), |(_, i)| {
            let spread = if large.contains(&i) { 2.0 } else { 0.1 };
            spread * rng.random_range(-1.0f32..1.0)
        })
        .into_dyn()
        .into_shared();
        let head = GreedyHead::new(&m).unwrap();
        let mut narrowed = 0;
        for trial in 0..100 {
            let hidden = ndarray::Array1::from_shape_fn(dim, |i| {
                let spread = if i == large[trial % 2] { 20.0 } else { 1.0 };
                spread * rng.random_range(-1.0f32..1.0)
            });
            let logits = head.exact_logits(hidden.view(), None).unwrap();
            assert_eq!(
                head.argmax(hidden.view()).unwrap(),
                first_max(&logits),
                "trial {trial}"
            );
            let rows = head.candidates(hidden.view()).unwrap();
            narrowed += usize::from(rows.len() <= 20);
        }
        assert_eq!(head.fallbacks(), 0);
        assert!(
            narrowed >= 90,
            "few candidates in most searches: {narrowed} of 100"
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
