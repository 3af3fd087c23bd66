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
//! * the hidden state becomes integers too: `h_i·c_i` (exact in float64) `= σ·h̃_i + δ_i`,
//!   with a power-of-two step `σ` and `|h̃_i|` within 15 bits (fewer past 4 128 channels,
//!   so the AVX2 kernel's 32-bit lanes cannot overflow). The estimate is
//!   `ã_v = s_v·σ·D_v` with `D_v = Σ h̃_i·q_vi` summed exactly in integers (on AVX2 by
//!   `vpmaddwd`, three instructions per 16 entries where a float32 estimate took eight), and
//!   `Σ h_i·w̃_vi = s_v·(σ·D_v + Σ δ_i·q_vi)`, the last term at most `s_v·‖δ‖₂·‖q_v‖₂`;
//! * the float32 sum of `C` products in the full product is within
//!   γ_C = C·2⁻²⁴/(1 − C·2⁻²⁴) of exact, relative to `Σ |h_i·w_vi| ≤ S_w` with
//!   `S_w = min(‖h‖₂·‖w_v‖₂, ‖h‖₁·max|w_v|)` (Cauchy–Schwarz, and the bound for a state with
//!   a few large entries, as trained models' final states have). So
//!   `|ã_v − l_v| ≤ S_e + s_v·‖δ‖₂·‖q_v‖₂ + γ_C·S_w`; the margin `m_v` takes `3γ_C·(S_w + S_e)`
//!   for the last term (room for the one float64 rounding of `ã_v`), padded by 1 % (for the
//!   float64 work of the statistics and norms) and a tiny absolute term for underflow;
//! * with `τ = max_v (ã_v − m_v)`, every row whose `ã_v + m_v < τ` has `l_v < τ ≤ l_u` for
//!   the row `u` attaining τ, so it cannot be the argmax; the few rows left (the candidates)
//!   get their float32 logits from the same product as the full lm_head — the same op on
//!   their rows, element by element the same bits — and the first largest of those is the
//!   token the full product would have picked.
//!
//! When the bound cannot be used (a non-finite hidden state or estimate, or more than
//! [`MAX_CANDIDATES`] candidates), [`GreedyHead::argmax`] computes every logit as the full
//! lm_head does. The copy costs a byte per table entry while generating and a pass over the
//! table to make (≈ 50 ms for GPT-2 on two threads), so [`crate::generate::generate`] builds it only for greedy runs of at
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
    /// `‖q_v‖₂`, the codes' norm (exact: a sum of squared small integers).
    q_l2: f64,
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
    ///
    /// Each block of rows keeps only the rows whose upper end `ã_v + m_v` reaches its own
    /// floor `max (ã_u − m_u)` over the block (the search's floor is at least that), so no
    /// vector of every row's bounds is made; the survivors are then held to the search's floor.
    fn candidates(&self, hidden: ArrayView1<f32>) -> Option<Vec<usize>> {
        let h = hidden.as_standard_layout();
        let bounds = self.bounds(h.as_slice().expect("standard layout"))?;
        let blocks = tapelora_autograd::partner::map(self.blocks(), |c| {
            let mut rows = Vec::new();
            let mut floor = f64::NEG_INFINITY;
            let finite = bounds.block(c, |v, estimate, margin| {
                let upper = estimate + margin;
                if estimate - margin > floor {
                    floor = estimate - margin;
                    rows.retain(|&(_, u)| u >= floor);
                }
                if upper >= floor {
                    rows.push((v, upper));
                }
            });
            finite.then_some((floor, rows))
        });
        let blocks: Vec<(f64, Vec<(usize, f64)>)> = blocks.into_iter().collect::<Option<_>>()?;
        let floor = blocks.iter().map(|b| b.0).fold(f64::NEG_INFINITY, f64::max);
        let rows: Vec<usize> = blocks
            .iter()
            .flat_map(|b| &b.1)
            .filter(|&&(_, upper)| upper >= floor)
            .map(|&(v, _)| v)
            .collect();
        (rows.len() <= MAX_CANDIDATES).then_some(rows)
    }

    /// Blocks of [`ROWS_PER_TASK`] rows.
    fn blocks(&self) -> usize {
        self.row_scales.len().div_ceil(ROWS_PER_TASK)
    }

    /// What the estimates and margins of a hidden state need (see [`Bounds`]), or `None` for a
    /// state that is not finite (the bound needs finite numbers).
    fn bounds(&self, h: &[f32]) -> Option<Bounds<'_>> {
        let dim = self.column_scales.len();
        if h.len() != dim || !h.iter().all(|v| v.is_finite()) {
            return None;
        }
        let unit = dim as f64 * f64::from(f32::EPSILON) / 2.0;
        Some(Bounds {
            head: self,
            state: QuantizedState::new(h, &self.column_scales),
            h_l1: h.iter().map(|&v| f64::from(v.abs())).sum::<f64>(),
            h_l2: l2_norm_f64(h),
            hc_l1: h
                .iter()
                .zip(&self.column_scales)
                .map(|(&v, &c)| f64::from(v.abs()) * f64::from(c))
                .sum::<f64>(),
            gamma: unit / (1.0 - unit),
            dot4: integer_dot4(),
        })
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
    // Then the error of each entry, exactly, in float64, in four lanes.
    let scale64 = f64::from(scale);
    let [mut w_squares, mut e_squares, mut w_max, mut e_max] =
        error_lanes(row, column_scales, inverse_columns, levels, scale64);
    let tail = row.len() / ERROR_LANES * ERROR_LANES;
    let (w_tail, c_tail) = (&row[tail..], &column_scales[tail..]);
    let (inv_tail, q_tail) = (&inverse_columns[tail..], &levels[tail..]);
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
        q_l2: (codes
            .iter()
            .map(|&q| i64::from(q) * i64::from(q))
            .sum::<i64>() as f64)
            .sqrt(),
    };
    Some((scale, stats))
}

/// Lanes of [`error_lanes`]: entry `i` goes to lane `i mod 4`.
const ERROR_LANES: usize = 4;

/// Per lane, over the first `4·⌊C/4⌋` entries of a row: `Σ w²`, `Σ e²`, `max |w|` and
/// `max |e|·fl(1/c)`, with `e = w − s·c·q` in float64. The AVX2 kernel and the portable loop
/// take the same steps in the same order, so they give the same bits.
type ErrorLanes = [[f64; ERROR_LANES]; 4];

#[inline(always)]
fn error_lanes(
    row: &[f32],
    column_scales: &[f32],
    inverse_columns: &[f32],
    levels: &[f32],
    scale: f64,
) -> ErrorLanes {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 was detected just above.
        return unsafe { error_lanes_avx2(row, column_scales, inverse_columns, levels, scale) };
    }
    error_lanes_portable(row, column_scales, inverse_columns, levels, scale)
}

/// The portable [`error_lanes`]. Maxima by comparison: `f64::max`'s NaN rule costs a compare
/// and blend per lane, and nothing here is NaN.
#[inline(always)]
fn error_lanes_portable(
    row: &[f32],
    column_scales: &[f32],
    inverse_columns: &[f32],
    levels: &[f32],
    scale: f64,
) -> ErrorLanes {
    const L: usize = ERROR_LANES;
    let (mut w_squares, mut e_squares) = ([0.0f64; L], [0.0f64; L]);
    let (mut w_max, mut e_max) = ([0.0f64; L], [0.0f64; L]);
    let w4 = row.as_chunks::<L>().0;
    let c4 = column_scales.as_chunks::<L>().0;
    let inv4 = inverse_columns.as_chunks::<L>().0;
    let q4 = levels.as_chunks::<L>().0;
    for (((w, c), inv), q) in w4.iter().zip(c4).zip(inv4).zip(q4) {
        for l in 0..L {
            let (w, q) = (f64::from(w[l]), f64::from(q[l]));
            let e = w - scale * f64::from(c[l]) * q;
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
    [w_squares, e_squares, w_max, e_max]
}

/// [`error_lanes`] on AVX2: four entries per step in one register each way. LLVM had turned
/// the portable loop into scalar conversions and shuffles: GPT-2's copy took 63–68 ms to build
/// on two threads, 48–55 ms with this kernel.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline(never)] // its own registers: inlined into the row's loop, a running sum spilled
unsafe fn error_lanes_avx2(
    row: &[f32],
    column_scales: &[f32],
    inverse_columns: &[f32],
    levels: &[f32],
    scale: f64,
) -> ErrorLanes {
    use std::arch::x86_64::*;
    let n = row.len() / ERROR_LANES * ERROR_LANES;
    assert!(
        [column_scales, inverse_columns, levels]
            .iter()
            .all(|x| x.len() >= n),
        "a scale and a level per entry"
    );
    let load = |x: &[f32], i: usize| {
        // SAFETY: i + 4 ≤ n ≤ x.len() (asserted above).
        _mm256_cvtps_pd(unsafe { _mm_loadu_ps(x.as_ptr().add(i)) })
    };
    let scale = _mm256_set1_pd(scale);
    let magnitude = _mm256_castsi256_pd(_mm256_set1_epi64x(i64::MAX));
    let (mut w_squares, mut e_squares) = (_mm256_setzero_pd(), _mm256_setzero_pd());
    let (mut w_max, mut e_max) = (_mm256_setzero_pd(), _mm256_setzero_pd());
    for i in (0..n).step_by(ERROR_LANES) {
        let (w, q) = (load(row, i), load(levels, i));
        let e = _mm256_sub_pd(
            w,
            _mm256_mul_pd(_mm256_mul_pd(scale, load(column_scales, i)), q),
        );
        let e_per_c = _mm256_mul_pd(_mm256_and_pd(e, magnitude), load(inverse_columns, i));
        w_squares = _mm256_add_pd(w_squares, _mm256_mul_pd(w, w));
        e_squares = _mm256_add_pd(e_squares, _mm256_mul_pd(e, e));
        // `maxpd(a, b)` is `a > b ? a : b`, the portable loop's comparison.
        w_max = _mm256_max_pd(_mm256_and_pd(w, magnitude), w_max);
        e_max = _mm256_max_pd(e_per_c, e_max);
    }
    let mut out = [[0.0f64; ERROR_LANES]; 4];
    for (out, lanes) in out.iter_mut().zip([w_squares, e_squares, w_max, e_max]) {
        // SAFETY: `out` holds four float64 values.
        unsafe { _mm256_storeu_pd(out.as_mut_ptr(), lanes) };
    }
    out
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

/// One hidden state's side of the bound: its integer codes and the norms the margins take.
struct Bounds<'a> {
    head: &'a GreedyHead,
    state: QuantizedState,
    h_l1: f64,
    h_l2: f64,
    /// `‖h∘c‖₁`.
    hc_l1: f64,
    /// `γ_C`, the relative error bound of a float32 sum of `C` products.
    gamma: f64,
    dot4: IntegerDot4,
}

impl Bounds<'_> {
    /// Calls `row(v, ã_v, m_v)` for every row `v` of block `c`, in increasing order:
    /// `ã_v = s_v·σ·D_v` with `D_v = Σ_i h̃_i·q_vi` summed exactly in integers, and the
    /// margin `m_v ≥ |ã_v − l_v|` (see the module docs). False if an estimate is not finite.
    fn block(&self, c: usize, mut row: impl FnMut(usize, f64, f64)) -> bool {
        let head = self.head;
        let dim = self.state.codes.len();
        let first = c * ROWS_PER_TASK;
        let n = ROWS_PER_TASK.min(head.row_scales.len() - first);
        let codes = &head.codes[first * dim..][..n * dim];
        let scales = &head.row_scales[first..][..n];
        let stats = &head.row_stats[first..][..n];
        let codes_of = |i: usize| &codes[i * dim..(i + 1) * dim];
        // Four rows a quarter of the block apart per pass: four sequential streams keep more
        // of the memory's bandwidth busy than one.
        let mut dots = vec![0i64; n];
        let q = n / 4;
        for t in 0..q {
            let rows = [t, t + q, t + 2 * q, t + 3 * q];
            let four = (self.dot4)(&self.state.codes, rows.map(codes_of));
            for (i, dot) in rows.into_iter().zip(four) {
                dots[i] = dot;
            }
        }
        for (i, dot) in dots.iter_mut().enumerate().skip(4 * q) {
            *dot = (self.dot4)(&self.state.codes, [codes_of(i); 4])[0];
        }
        // Estimates and margins in one loop of their own, which vectorises.
        let mut margins = vec![0.0f64; n];
        let estimates: Vec<f64> = tapelora_autograd::simd::vectorized(
            #[inline(always)]
            || {
                for ((m, &s), r) in margins.iter_mut().zip(scales).zip(stats) {
                    let error = (self.h_l2 * r.e_l2).min(self.hc_l1 * r.e_max_per_column_scale);
                    let state_error = f64::from(s) * self.state.error_l2 * r.q_l2;
                    let weights = (self.h_l2 * r.w_l2).min(self.h_l1 * r.w_max);
                    *m =
                        1.01 * (error + state_error + 3.0 * self.gamma * (weights + error)) + 1e-30;
                }
                dots.iter()
                    .zip(scales)
                    .map(|(&dot, &s)| f64::from(s) * self.state.step * dot as f64)
                    .collect()
            },
        );
        for (i, (&estimate, &margin)) in estimates.iter().zip(&margins).enumerate() {
            row(first + i, estimate, margin);
        }
        estimates.iter().all(|e| e.is_finite())
    }
}

/// The hidden state as integers for the estimate pass: `h_i·c_i ≈ σ·h̃_i`, with a step `σ`
/// that is a power of two and codes `|h̃_i| ≤` [`state_code_max`]`(C)`.
struct QuantizedState {
    /// `h̃`.
    codes: Vec<i16>,
    /// `σ`.
    step: f64,
    /// `‖h∘c − σ·h̃‖₂` (each term exact in float64, the norm within 2⁻⁵⁰ of exact).
    error_l2: f64,
}

impl QuantizedState {
    fn new(h: &[f32], column_scales: &[f32]) -> Self {
        // A float32 product has at most 48 significant bits: exact in float64.
        let scaled: Vec<f64> = h
            .iter()
            .zip(column_scales)
            .map(|(&x, &c)| f64::from(x) * f64::from(c))
            .collect();
        let largest = scaled.iter().fold(0.0f64, |m, &x| m.max(x.abs()));
        let code_max = f64::from(state_code_max(h.len()));
        // The smallest power of two that keeps every code within ±code_max (dividing by it
        // is exact, so each code is its value rounded once).
        let mut step = if largest > 0.0 {
            2.0f64.powi((largest / code_max).log2().ceil() as i32)
        } else {
            1.0
        };
        while largest / step > code_max {
            step *= 2.0;
        }
        let codes: Vec<i16> = scaled.iter().map(|&x| (x / step).round() as i16).collect();
        let error_l2 = scaled
            .iter()
            .zip(&codes)
            .map(|(&x, &q)| {
                let e = x - step * f64::from(q);
                e * e
            })
            .sum::<f64>()
            .sqrt();
        QuantizedState {
            codes,
            step,
            error_l2,
        }
    }
}

/// The largest state code for a width `C`: small enough that the AVX2 kernel's 32-bit lanes
/// cannot overflow. Each lane adds two products per 16 entries, each at most 127 × the code:
/// `2·⌈C/16⌉·127·code ≤ 2³¹ − 1`; GPT-2's 768 channels get the full 15 bits (32 767).
fn state_code_max(dim: usize) -> i16 {
    let products_per_lane = 2 * dim.div_ceil(16).max(1);
    let limit = i32::MAX as usize / (products_per_lane * CODE_MAX as usize);
    limit.clamp(1, i16::MAX as usize) as i16
}

/// `Σ_i h̃_i·q_i` for four rows of codes `q` at once, exactly.
type IntegerDot4 = fn(&[i16], [&[i8]; 4]) -> [i64; 4];

/// The quickest exact kernel this CPU runs: widened 16-bit multiply-adds on AVX2 (three
/// instructions per 16 entries, where the float32 estimate took eight: that pass ran at about
/// two thirds of the table's streaming rate, this one close to it), else plain integers. The
/// sums are the same integers either way.
fn integer_dot4() -> IntegerDot4 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        return |h, rows| {
            // SAFETY: AVX2 was detected just above.
            unsafe { dot4_i16_i8_avx2(h, rows) }
        };
    }
    dot4_i16_i8
}

/// The portable kernel: each row's products summed in 64-bit integers.
fn dot4_i16_i8(h: &[i16], rows: [&[i8]; 4]) -> [i64; 4] {
    rows.map(|row| dot_i16_i8(h, row))
}

fn dot_i16_i8(h: &[i16], row: &[i8]) -> i64 {
    h.iter()
        .zip(row)
        .map(|(&x, &q)| i64::from(x) * i64::from(q))
        .sum()
}

/// The AVX2 kernel: per 16 entries, the codes widened to 16 bits (`vpmovsxbw`), multiplied by
/// the state's and added in pairs into eight 32-bit lanes (`vpmaddwd`, which [`state_code_max`]
/// keeps from overflowing); the lanes and the last `C mod 16` products summed in 64 bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dot4_i16_i8_avx2(h: &[i16], rows: [&[i8]; 4]) -> [i64; 4] {
    use std::arch::x86_64::*;
    let whole = h.len() / 16 * 16;
    assert!(
        rows.iter().all(|r| r.len() >= h.len()),
        "a row per state entry"
    );
    let mut lanes = [_mm256_setzero_si256(); 4];
    for i in (0..whole).step_by(16) {
        // SAFETY: i + 16 ≤ whole ≤ h.len() ≤ each row's length.
        let state = unsafe { _mm256_loadu_si256(h.as_ptr().add(i).cast()) };
        for (lane, row) in lanes.iter_mut().zip(rows) {
            let codes = unsafe { _mm_loadu_si128(row.as_ptr().add(i).cast()) };
            let products = _mm256_madd_epi16(state, _mm256_cvtepi8_epi16(codes));
            *lane = _mm256_add_epi32(*lane, products);
        }
    }
    let mut sums = [0i64; 4];
    for ((sum, lane), row) in sums.iter_mut().zip(lanes).zip(rows) {
        let mut parts = [0i32; 8];
        // SAFETY: `parts` holds 8 × 32 bits.
        unsafe { _mm256_storeu_si256(parts.as_mut_ptr().cast(), lane) };
        *sum = parts.iter().map(|&p| i64::from(p)).sum::<i64>()
            + dot_i16_i8(&h[whole..], &row[whole..]);
    }
    sums
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
            let bounds = head.bounds(hidden.as_slice().unwrap()).unwrap();
            let mut seen = 0;
            for c in 0..head.blocks() {
                assert!(bounds.block(c, |v, estimate, margin| {
                    assert_eq!(v, seen);
                    seen += 1;
                    let gap = (estimate - f64::from(logits[v])).abs();
                    assert!(gap <= margin, "row {v}: {gap} > {margin}");
                }));
            }
            assert_eq!(seen, vocab);
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
    fn the_error_statistics_kernels_give_the_same_bits() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(23);
        for dim in [4, 50, 768] {
            let spread = |rng: &mut rand_chacha::ChaCha8Rng| 10f32.powi(rng.random_range(-30..30));
            let row: Vec<f32> = (0..dim)
                .map(|_| spread(&mut rng) * rng.random_range(-1.0f32..1.0))
                .collect();
            let columns: Vec<f32> = (0..dim).map(|_| spread(&mut rng)).collect();
            let inverse: Vec<f32> = columns.iter().map(|&c| 1.0 / c).collect();
            let levels: Vec<f32> = (0..dim)
                .map(|_| rng.random_range(-127..=127) as f32)
                .collect();
            let scale = f64::from(spread(&mut rng));
            let bits = |lanes: ErrorLanes| lanes.map(|l| l.map(f64::to_bits));
            let portable = error_lanes_portable(&row, &columns, &inverse, &levels, scale);
            assert_eq!(
                bits(error_lanes(&row, &columns, &inverse, &levels, scale)),
                bits(portable),
                "{dim}"
            );
            // And the lanes are what they say: entry i in lane i mod 4.
            let w_max = (0..dim / 4 * 4)
                .filter(|i| i % 4 == 1)
                .map(|i| f64::from(row[i].abs()))
                .fold(0.0f64, f64::max);
            assert_eq!(portable[2][1], w_max);
        }
    }

    #[test]
    fn the_integer_kernels_agree_exactly_even_at_the_largest_codes() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(21);
        // Tails of 0, 1, 15 and 2 entries; 4 128 is the widest state with 15-bit codes, and
        // 5 000 needs smaller ones (the 32-bit lanes would overflow otherwise).
        for dim in [16, 17, 31, 50, 768, 4128, 5000] {
            let code = state_code_max(dim);
            assert_eq!(code == i16::MAX, dim <= 4128, "{dim}");
            // The worst case: every product as large as it can be, all of one sign.
            let h = vec![code; dim];
            let largest = vec![127i8; dim];
            let lowest = vec![-127i8; dim];
            let random: Vec<Vec<i8>> = (0..2)
                .map(|_| (0..dim).map(|_| rng.random_range(-127..=127)).collect())
                .collect();
            let rows = [&largest[..], &lowest[..], &random[0][..], &random[1][..]];
            let want = rows.map(|row| dot_i16_i8(&h, row));
            assert_eq!(want[0], dim as i64 * 127 * i64::from(code));
            assert_eq!(integer_dot4()(&h, rows), want, "{dim}");
            let mixed: Vec<i16> = (0..dim).map(|_| rng.random_range(-code..=code)).collect();
            let want = rows.map(|row| dot_i16_i8(&mixed, row));
            assert_eq!(integer_dot4()(&mixed, rows), want, "{dim}");
        }
    }

    #[test]
    fn the_state_codes_use_their_range_and_record_their_error() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(22);
        for (dim, spread) in [(64, 1.0f32), (768, 1e-20), (5000, 3e4)] {
            // A few large channels, as trained final states have, and some exact zeros.
            let h: Vec<f32> = (0..dim)
                .map(|i| match i % 97 {
                    0 => 50.0 * spread,
                    1 => 0.0,
                    _ => spread * rng.random_range(-1.0f32..1.0),
                })
                .collect();
            let scales: Vec<f32> = (0..dim).map(|_| rng.random_range(0.01f32..2.0)).collect();
            let state = QuantizedState::new(&h, &scales);
            let code_max = state_code_max(dim);
            assert_eq!(state.step.log2().fract(), 0.0, "σ is a power of two");
            assert!(state.codes.iter().all(|q| q.abs() <= code_max));
            // The smallest such step: half of it would not fit the largest entry.
            let largest = state.codes.iter().map(|q| q.abs()).max().unwrap();
            assert!(
                2 * i32::from(largest) > i32::from(code_max),
                "{dim}: {largest}"
            );
            let mut squares = 0.0f64;
            for ((&x, &c), &q) in h.iter().zip(&scales).zip(&state.codes) {
                let error = f64::from(x) * f64::from(c) - state.step * f64::from(q);
                assert!(error.abs() <= state.step / 2.0);
                squares += error * error;
            }
            assert!((squares.sqrt() - state.error_l2).abs() <= 1e-12 * state.error_l2);
        }
        let zeros = QuantizedState::new(&[0.0; 8], &[1.0; 8]);
        assert!(zeros.codes.iter().all(|&q| q == 0) && zeros.error_l2 == 0.0);
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
