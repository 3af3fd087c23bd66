//! Fused multi-head scaled dot-product attention, causal or not.
//!
//! Two entry points share one forward and one backward kernel:
//! * [`attention`]`(q, k, v)` with `q: [B, Tq, C]`, `k, v: [B, Tk, C]`, `C = H·D` — the
//!   KV-cache path, where k and v are the cache;
//! * [`attention_qkv`]`(qkv)` with `qkv: [B, T, 3C]` (GPT-2's fused `c_attn` output): q, k and
//!   v are read in place as column blocks, and backward writes one `[B, T, 3C]` gradient, so
//!   there is no split op and no zero-padded gradient per part to add up.
//!
//! For every (batch, head) pair, in parallel:
//!
//! ```text
//! S = q·kᵀ/√D            [Tq, Tk]
//! P = softmax(S masked)  query i sees keys j ≤ i + (Tk − Tq) when causal
//! O = P·v                [Tq, D]   written straight into the [B, Tq, C] output's head columns
//! ```
//! The probabilities P `[B·H, Tq, Tk]` are saved for backward (llm.c does the same):
//!
//! ```text
//! ∂v = Pᵀ·∂O     ∂P = ∂O·vᵀ     ∂S = P ⊙ (∂P − rowsum(∂P ⊙ P)) / √D
//! ∂q = ∂S·k      ∂k = ∂Sᵀ·q
//! ```
//! With `Tk > Tq` and `causal`, the queries are the last `Tq` positions — the KV-cache case.
//!
//! Causal attention runs in blocks of query rows (and, for ∂v and ∂k, of keys), each reading
//! only the keys (queries) it can see, so most of the masked triangle is never computed.
//! Forward and backward go block by block: scores, softmax and `P·v` (or `∂P`, `∂S` and
//! `∂q`) while the block's rows are in L1. For f32 on the AVX-512 kernel and T ≥ 128, K, V,
//! Q and ∂O are packed once per head ([`PackedRight`]) and blocks are 24 rows; otherwise each
//! block's product packs what it reads, and blocks are 36 rows.
//!
//! In f32 on AVX-512, self-attention over at most 384 positions with heads of 16 to 64
//! channels (nanogpt-cpu's T = 64, D = 32) skips all of that: each head runs in
//! [`crate::attention_avx512`]'s register tiles, with the same bits for finite inputs. On
//! AVX2 without AVX-512, [`crate::attention_avx2`] does the same for at most 256 positions.
//!
//! Token-by-token decoding (one query against the cache) skips it too: all heads at once,
//! reading each cached row whole, half the heads on each thread (`one_query_heads`), with
//! the general path's bits.

use std::mem::MaybeUninit;
use std::ops::Range;

use ndarray::{s, Array3, ArrayView2, ArrayView3, ArrayViewMut2, ArrayViewMut3, Axis, Ix3};
use rayon::prelude::*;

use crate::error::{arg_err, shape_err, Result};
use crate::gemm::PackedRight;
use crate::tape::{OpRecord, Tensor, Var};
use crate::Float;

/// The sizes of one attention call.
#[derive(Clone, Copy, Debug)]
struct Dims {
    batch: usize,
    heads: usize,
    tq: usize,
    tk: usize,
    /// Channels per head.
    d: usize,
    causal: bool,
    /// Whether the per-head products read operands packed once per head ([`PackedRight`]
    /// packs them for f32 on the AVX-512 kernel): then a block of rows costs only its own
    /// rows, and causal blocks are [`PACKED_BLOCK`] rows high.
    packed: bool,
    /// Whether each head runs in [`crate::attention_avx512`]'s register tiles (f32 on
    /// AVX-512, self-attention of at most 384 positions, heads of 16 to 64 channels) or
    /// [`crate::attention_avx2`]'s (on AVX2, at most 256 positions).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    small: bool,
}

impl Dims {
    fn new<T: Float>(
        (batch, heads): (usize, usize),
        (tq, tk): (usize, usize),
        d: usize,
        causal: bool,
    ) -> Self {
        // Only causal attention has blocks, and only long ones gain from them: at T = 64
        // (nanogpt-cpu) 12- or 24-row blocks on packed operands were 3–11 % slower than one
        // block. Token-by-token generation (one query) reads each key once, so packing K and V
        // would copy them for as long as the products take.
        let packed = causal
            && tq >= CAUSAL_BLOCKS_FROM
            && tk.min(d) >= PACKED_MIN_COLUMNS
            && PackedRight::<T>::packs(PACKED_MIN_COLUMNS);
        let small = std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>()
            && (crate::attention_avx512::takes(tq, tk, d)
                || crate::attention_avx2::takes(tq, tk, d));
        Dims {
            batch,
            heads,
            tq,
            tk,
            d,
            causal,
            packed,
            small,
        }
    }

    /// Keys visible to query row `i`.
    fn visible(&self, i: usize) -> usize {
        if self.causal {
            i + 1 + self.tk - self.tq
        } else {
            self.tk
        }
    }

    /// Blocks of query rows, each with the number of keys its last row sees: causal attention
    /// computes scores (and everything after) only for those keys, skipping most of the masked
    /// triangle. Not causal: one block, all keys.
    fn query_blocks(&self) -> Vec<(Range<usize>, usize)> {
        row_blocks(self.tq, self.causal, self.packed)
            .into_iter()
            .map(|rows| {
                let keys = self.visible(rows.end - 1);
                (rows, keys)
            })
            .collect()
    }

    /// Blocks of keys, each with the first query row that sees any of them (rows before it
    /// hold only masked zeros for these keys).
    fn key_blocks(&self) -> Vec<(Range<usize>, usize)> {
        row_blocks(self.tk, self.causal, self.packed)
            .into_iter()
            .map(|keys| {
                let first = if self.causal {
                    keys.start.saturating_sub(self.tk - self.tq)
                } else {
                    0
                };
                (keys, first)
            })
            .collect()
    }

    fn scale<T: Float>(&self) -> T {
        T::from_f64(1.0 / (self.d as f64).sqrt())
    }
}

/// Rows per block when skipping the masked triangle with products that pack their operands
/// for each block (f64, or no AVX-512): three 12-row panels of the GEMM kernel. Smaller
/// blocks skip more of the triangle but make thinner, less efficient products (measured at
/// GPT-2's T = 256: 36 beats 64; both beat no blocks, forward −10 %, backward −20 %).
const CAUSAL_BLOCK: usize = 36;

/// Sequences shorter than this run as one block: at T = 64 (nanogpt-cpu) the extra, narrower
/// products cost more (+10–20 %) than the skipped quarter of the scores saves.
const CAUSAL_BLOCKS_FROM: usize = 128;

/// Rows per causal block when K, V, Q and ∂O are packed once per head: two kernel panels. A
/// block then costs only its own products, so blocks can be finer than [`CAUSAL_BLOCK`]:
/// attention at GPT-2's shape (T = 256, one thread, alternated with the unpacked 36-row
/// blocks in one process) forward 1.11–1.12× with 12 rows, 1.14–1.15× with 24; backward
/// 1.13–1.22× and 1.16–1.19×; at T = 512 and 1024, 24 rows 1.26–1.31× against 1.14–1.28×.
const PACKED_BLOCK: usize = 24;

/// Fewest keys and channels per head for packed operands: one 32-column panel.
const PACKED_MIN_COLUMNS: usize = 32;

/// `0..n` in blocks: not causal, one block; with packed operands, blocks of
/// [`PACKED_BLOCK`]; otherwise blocks of [`CAUSAL_BLOCK`] (a last block shorter than 12 joins
/// the one before), or one block when shorter than [`CAUSAL_BLOCKS_FROM`].
fn row_blocks(n: usize, causal: bool, packed: bool) -> Vec<Range<usize>> {
    let blocks = |size: usize| -> Vec<Range<usize>> {
        (0..n)
            .step_by(size)
            .map(|start| start..(start + size).min(n))
            .collect()
    };
    if !causal || (!packed && n < CAUSAL_BLOCKS_FROM) {
        return std::iter::once(0..n).collect();
    }
    if packed {
        return blocks(PACKED_BLOCK);
    }
    let mut blocks = blocks(CAUSAL_BLOCK);
    if blocks.len() > 1 && blocks[blocks.len() - 1].len() < 12 {
        let last = blocks.pop().expect("two blocks");
        blocks.last_mut().expect("one block").end = last.end;
    }
    blocks
}

/// Writes zeros into the columns `from..` of rows `rows` of an uninitialised matrix.
fn zero_tail<T: Float>(x: &mut ArrayViewMut2<MaybeUninit<T>>, rows: Range<usize>, from: usize) {
    for mut row in x.slice_mut(s![rows, from..]).rows_mut() {
        row.fill(MaybeUninit::new(T::zero()));
    }
}

/// `out = Pᵀ·x` for a `[Tq, Tk]` matrix P (probabilities or ∂S) whose masked entries are
/// zero: each of the [`Dims::key_blocks`] reads only the query rows that see its keys
/// (∂v = Pᵀ·∂O, ∂k = ∂Sᵀ·q).
fn p_transposed_times<T: Float>(
    key_blocks: &[(Range<usize>, usize)],
    tq: usize,
    p: ArrayView2<T>,
    x: &PackedRight<T>,
    mut out: ArrayViewMut2<MaybeUninit<T>>,
) {
    for (keys, first) in key_blocks.iter().cloned() {
        x.multiply(
            T::one(),
            p.slice(s![first.., keys.clone()]).t(),
            first..tq,
            out.slice_mut(s![keys, ..]),
        );
    }
}

/// The (b, h) head slice `[T, D]` of a `[B, T, ·]` tensor whose head columns start at `offset`.
fn head<'a, T: Float>(
    x: ArrayView3<'a, T>,
    b: usize,
    h: usize,
    d: usize,
    offset: usize,
) -> ArrayView2<'a, T> {
    x.slice_move(s![b, .., offset + h * d..offset + (h + 1) * d])
}

/// Splits `[B, T, W]` into its `[T, d]` column blocks, batch-major: for each b, the W/d blocks
/// left to right. Each block is a disjoint mutable view, so each can go to its own thread.
fn column_blocks<A>(x: ArrayViewMut3<'_, A>, d: usize) -> Vec<ArrayViewMut2<'_, A>> {
    let mut blocks = Vec::new();
    for mut rest in x.into_outer_iter_mut() {
        while rest.ncols() > 0 {
            let (block, tail) = rest.split_at(Axis(1), d);
            blocks.push(block);
            rest = tail;
        }
    }
    blocks
}

/// [`column_blocks`] of a gradient, or as many `None`s where the gradient is not needed (then
/// `x` has no rows).
fn optional_blocks<A>(
    x: ArrayViewMut3<'_, A>,
    d: usize,
    need: bool,
) -> Vec<Option<ArrayViewMut2<'_, A>>> {
    column_blocks(x, d)
        .into_iter()
        .map(|b| need.then_some(b))
        .collect()
}

/// Per (b, h), the blocks of ∂q, ∂k, ∂v to write (`None` where `needs` says no; such an
/// array has no rows).
#[allow(clippy::type_complexity)]
fn gradient_blocks<'a, T>(
    [dq, dk, dv]: [&'a mut Array3<MaybeUninit<T>>; 3],
    d: usize,
    needs: &[bool],
) -> Vec<[Option<ArrayViewMut2<'a, MaybeUninit<T>>>; 3]> {
    optional_blocks(dq.view_mut(), d, needs[0])
        .into_iter()
        .zip(optional_blocks(dk.view_mut(), d, needs[1]))
        .zip(optional_blocks(dv.view_mut(), d, needs[2]))
        .map(|((q, k), v)| [q, k, v])
        .collect()
}

fn view3<T: Float>(x: &Tensor<T>) -> ArrayView3<'_, T> {
    x.view()
        .into_dimensionality::<Ix3>()
        .expect("checked rank 3")
}

/// Softmax of the first `visible` entries of a row in place; the masked rest become 0.
/// Inlined so that it is compiled wide inside [`crate::simd::vectorized`].
///
/// Every loop runs over whole 16-lane chunks: causal rows have every length from 1 to T, and a
/// scalar tail of up to 15 exponentials per row had made the softmax half of nanogpt-cpu's
/// attention forward (T = 64). Chunks wholly visible run unmasked; only the chunk the mask
/// cuts through compares lanes. Chunks past it are only zeroed; the lanes it masks may hold
/// anything finite (they are never used). The sixteen lane partials are combined as trees
/// ([`crate::simd::max_lanes`], [`crate::simd::sum_lanes`]): a running fold over them cost a
/// T = 64 row as much as its exponentials.
#[inline(always)]
pub(crate) fn softmax_masked_row<T: Float>(row: &mut [T], visible: usize) {
    let (chunks, tail) = row.as_chunks_mut::<16>();
    let full = (visible / 16).min(chunks.len());
    let (full_chunks, rest) = chunks.split_at_mut(full);
    // Lanes of the chunk after the full ones that are visible (0: no such partial chunk).
    let cut = if rest.is_empty() {
        0
    } else {
        visible - 16 * full
    };
    let (mut edge, dead) = match cut {
        0 => (None, rest),
        _ => {
            let (edge, dead) = rest.split_at_mut(1);
            (edge.first_mut(), dead)
        }
    };
    let tail_start = 16 * (full + usize::from(edge.is_some()) + dead.len());
    let in_tail = |i: usize| tail_start + i < visible;

    let mut max_lanes = [T::neg_infinity(); 16];
    for x in full_chunks.iter() {
        for l in 0..16 {
            max_lanes[l] = max_lanes[l].max(x[l]);
        }
    }
    if let Some(x) = edge.as_deref() {
        for l in 0..16 {
            max_lanes[l] = max_lanes[l].max(if l < cut { x[l] } else { T::neg_infinity() });
        }
    }
    let mut max = crate::simd::max_lanes(max_lanes);
    for (i, &v) in tail.iter().enumerate() {
        if in_tail(i) {
            max = max.max(v);
        }
    }

    let mut sum_lanes = [T::zero(); 16];
    for x in full_chunks.iter_mut() {
        for l in 0..16 {
            let e = (x[l] - max).exp_fused();
            x[l] = e;
            sum_lanes[l] += e;
        }
    }
    if let Some(x) = edge.as_deref_mut() {
        for l in 0..16 {
            let e = (x[l] - max).exp_fused();
            let e = if l < cut { e } else { T::zero() };
            x[l] = e;
            sum_lanes[l] += e;
        }
    }
    let mut sum = crate::simd::sum_lanes(sum_lanes);
    for (i, v) in tail.iter_mut().enumerate() {
        *v = if in_tail(i) {
            (*v - max).exp_fused()
        } else {
            T::zero()
        };
        sum += *v;
    }

    let inv = T::one() / sum;
    for x in full_chunks.iter_mut().chain(edge) {
        for v in x.iter_mut() {
            *v *= inv;
        }
    }
    for v in tail.iter_mut() {
        *v *= inv;
    }
    for x in dead.iter_mut() {
        x.fill(T::zero());
    }
}

/// ∂S = P ⊙ (∂P − rowsum(∂P ⊙ P)) · scale in place of a row of P. Inlined so that it is
/// compiled wide inside [`crate::simd::vectorized`].
#[inline(always)]
pub(crate) fn score_gradient_row<T: Float>(p_row: &mut [T], dp_row: &[T], scale: T) {
    let dot = crate::simd::dot(p_row, dp_row);
    for (p, &dp) in p_row.iter_mut().zip(dp_row) {
        *p = *p * (dp - dot) * scale;
    }
}

/// How much of a score row of `len` entries, `visible` of them unmasked, the row loops take:
/// the visible entries rounded up to whole 16-lane chunks (the entries past `visible` are
/// zero in P), so no row ends in a scalar tail unless the row itself does.
pub(crate) fn row_span(visible: usize, len: usize) -> usize {
    visible.next_multiple_of(16).min(len)
}

/// A head's rows for [`crate::attention_avx512`], when its channels are contiguous (the
/// kernel reads them as vectors) and `T` is f32 (`Dims::small` says so).
#[cfg(target_arch = "x86_64")]
fn rows_of<T: Float>(x: &ArrayView2<T>) -> Option<crate::attention_avx512::Rows> {
    (x.ncols() <= 1 || x.strides()[1] == 1).then(|| crate::attention_avx512::Rows {
        ptr: x.as_ptr().cast::<f32>(),
        stride: x.strides()[0],
    })
}

/// [`rows_of`] for rows to write.
#[cfg(target_arch = "x86_64")]
fn rows_of_mut<T: Float>(
    x: &mut ArrayViewMut2<MaybeUninit<T>>,
) -> Option<crate::attention_avx512::RowsMut> {
    (x.ncols() <= 1 || x.strides()[1] == 1).then(|| crate::attention_avx512::RowsMut {
        ptr: x.as_mut_ptr().cast::<f32>(),
        stride: x.strides()[0],
    })
}

/// Token-by-token decoding's forward (one query against the cached keys): all heads at once,
/// reading the cached key and value rows in order, half the heads (half of every row) on
/// each thread.
///
/// The general path runs two GEMVs per head, each reading the head's 64-float piece of every
/// cached row (3 KiB apart) and allocating its buffers, and the cache comes from memory each
/// token (the weights streamed between tokens evict it). Here K is one sequential pass and V
/// eight side by side. GPT-2, one layer's 12 heads over 140 cached positions, cache cold:
/// 110–113 → 88–89 µs (medians, alternated processes); greedy generation 1.022× and 1.035×
/// (medians of 10 and 16 alternated rounds in one process, the same tokens). The arithmetic is
/// the GEMVs', element by element, so the bits are too: each score is
/// `scale · dot_two_rows(q_h, k_jh)` (the column GEMV's, eight keys per `Float::dot8`), the
/// softmax row is `softmax_masked_row`, and each output is `1·(0 + Σ)` with the sum taken in
/// `gemm::axpy_rows`' order (the row GEMV's single block). `None` — the general path — for
/// more than one query, a GEMV large enough to be split across threads (its partial sums
/// would be added in another order), or channels that are not contiguous.
fn one_query_heads<T: Float>(
    (q3, q_off): (ArrayView3<T>, usize),
    (k3, k_off): (ArrayView3<T>, usize),
    (v3, v_off): (ArrayView3<T>, usize),
    dims: Dims,
) -> Option<(Array3<T>, Array3<T>)> {
    let Dims {
        batch,
        heads,
        tq,
        tk,
        d,
        ..
    } = dims;
    let width = heads * d;
    // Each head's channels contiguous, and every row this reads inside the view.
    let rows_fit = |x: &ArrayView3<T>, off: usize, rows: usize| {
        (x.strides()[2] == 1 || width <= 1)
            && x.shape()[2] >= off + width
            && x.shape()[1] >= rows
            && x.shape()[0] >= batch
    };
    if tq != 1
        || tk == 0
        || !crate::gemm::gemv_runs_whole(tk, d)
        || !(rows_fit(&q3, q_off, 1) && rows_fit(&k3, k_off, tk) && rows_fit(&v3, v_off, tk))
        || one_query_path_off()
    {
        return None;
    }
    // Row t of batch b from its first channel: pointer arithmetic, since slicing a view per
    // row (≈ 300 rows per layer) had cost as much as the arithmetic.
    let row_start = |x: &ArrayView3<T>, b: usize, t: usize, off: usize| -> *const T {
        let strides = x.strides();
        x.as_ptr()
            .wrapping_offset(b as isize * strides[0] + t as isize * strides[1] + off as isize)
    };
    let scale: T = dims.scale();
    let mut probs = Vec::with_capacity(batch * heads * tk);
    let mut out = Vec::with_capacity(batch * width);
    for b in 0..batch {
        // SAFETY (the query's and both closures' rows): `width` contiguous channels from each
        // row's offset in a view of at least `off + width` columns, as checked above; the
        // views outlive this call.
        let query = unsafe { std::slice::from_raw_parts(row_start(&q3, b, 0, q_off), width) };
        let key =
            |t: usize| unsafe { std::slice::from_raw_parts(row_start(&k3, b, t, k_off), width) };
        let value =
            |t: usize| unsafe { std::slice::from_raw_parts(row_start(&v3, b, t, v_off), width) };
        let mut scores = vec![T::zero(); heads * tk];
        let mut sums = vec![T::zero(); width];
        // Half the heads on each thread (half of every row each: still long sequential runs).
        let split = if crate::gemm::split_threads() >= 2 {
            heads / 2
        } else {
            0
        };
        let (scores_low, scores_high) = scores.split_at_mut(split * tk);
        let (sums_low, sums_high) = sums.split_at_mut(split * d);
        let heads_of = |range: Range<usize>, scores: &mut [T], sums: &mut [T]| {
            let channels = range.start * d..range.end * d;
            one_query_part(
                (tk, d, scale, dims.visible(0)),
                &query[channels.clone()],
                |t| &key(t)[channels.clone()],
                |t| &value(t)[channels.clone()],
                scores,
                sums,
            )
        };
        crate::partner::join(
            || heads_of(0..split, scores_low, sums_low),
            || heads_of(split..heads, scores_high, sums_high),
        );
        crate::gemm::count_flops(4 * heads * tk * d);
        probs.extend_from_slice(&scores);
        // The row GEMV's last steps: its one block's sums added onto zeros, then times α = 1.
        out.extend(sums.into_iter().map(|acc| T::one() * (T::zero() + acc)));
    }
    Some((
        Array3::from_shape_vec((batch * heads, 1, tk), probs).expect("B·H × 1 × Tk"),
        Array3::from_shape_vec((batch, 1, width), out).expect("B × 1 × C"),
    ))
}

/// [`one_query_heads`] for some heads: `query`, `key(t)` and `value(t)` hold their channels
/// (`d` per head), `scores` their `[heads, tk]` probabilities and `sums` their outputs' sums.
fn one_query_part<'a, T: Float>(
    (tk, d, scale, visible): (usize, usize, T, usize),
    query: &[T],
    key: impl Fn(usize) -> &'a [T],
    value: impl Fn(usize) -> &'a [T],
    scores: &mut [T],
    sums: &mut [T],
) {
    let heads = query.len() / d;
    if heads == 0 {
        return;
    }
    crate::simd::vectorized(
        #[inline(always)]
        || {
            // Eight keys at a time (`Float::dot8`: the query's channels loaded once for all
            // eight), the rest one by one.
            for j0 in (0..tk / 8 * 8).step_by(8) {
                let k_rows: [&[T]; 8] = std::array::from_fn(|i| key(j0 + i));
                for h in 0..heads {
                    let channels = h * d..(h + 1) * d;
                    let dots = T::dot8(
                        &query[channels.clone()],
                        k_rows.map(|r| &r[channels.clone()]),
                    );
                    for (i, dot) in dots.into_iter().enumerate() {
                        scores[h * tk + j0 + i] = scale * dot;
                    }
                }
            }
            for j in tk / 8 * 8..tk {
                let k_row = key(j);
                for h in 0..heads {
                    let channels = h * d..(h + 1) * d;
                    scores[h * tk + j] = scale
                        * crate::simd::dot_two_rows(&query[channels.clone()], &k_row[channels]);
                }
            }
            for p in scores.chunks_exact_mut(tk) {
                softmax_masked_row(&mut p[..row_span(tk, tk)], visible);
            }
            // Eight runs of rows side by side, as `axpy_rows` reads them, for all heads.
            let runs = tk / 8;
            for t in 0..runs {
                let rows: [&[T]; 8] = std::array::from_fn(|i| value(t + i * runs));
                for h in 0..heads {
                    let p = &scores[h * tk..(h + 1) * tk];
                    let x: [T; 8] = std::array::from_fn(|i| p[t + i * runs]);
                    let channels = h * d..(h + 1) * d;
                    crate::gemm::axpy_step(
                        x,
                        rows.map(|r| &r[channels.clone()]),
                        &mut sums[channels.clone()],
                    );
                }
            }
            for t in 8 * runs..tk {
                let v_row = value(t);
                for h in 0..heads {
                    let x = scores[h * tk + t];
                    let channels = h * d..(h + 1) * d;
                    for (acc, &v) in sums[channels.clone()].iter_mut().zip(&v_row[channels]) {
                        *acc += x * v;
                    }
                }
            }
        },
    );
}

/// Whether tests have switched the one-query path off (to compare it with the general path).
#[cfg(not(test))]
fn one_query_path_off() -> bool {
    false
}

#[cfg(test)]
fn one_query_path_off() -> bool {
    tests::ONE_QUERY_PATH_OFF.with(|flag| flag.get())
}

/// Forward for all heads: q, k, v are `[B, T, ·]` views whose heads start at the given column
/// offsets. Returns the probabilities `[B·H, Tq, Tk]` and the output `[B, Tq, H·D]`.
fn forward_heads<T: Float>(
    (q3, q_off): (ArrayView3<T>, usize),
    (k3, k_off): (ArrayView3<T>, usize),
    (v3, v_off): (ArrayView3<T>, usize),
    dims: Dims,
) -> (Array3<T>, Array3<T>) {
    let Dims {
        batch,
        heads,
        tq,
        tk,
        d,
        ..
    } = dims;
    if let Some(done) = one_query_heads((q3, q_off), (k3, k_off), (v3, v_off), dims) {
        return done;
    }
    let mut probs = Array3::<T>::uninit((batch * heads, tq, tk));
    let mut out = Array3::<T>::uninit((batch, tq, heads * d));
    let out_heads = column_blocks(out.view_mut(), d);
    let query_blocks = dims.query_blocks();
    probs
        .outer_iter_mut()
        .into_par_iter()
        .zip(out_heads.into_par_iter())
        .enumerate()
        .for_each(|(bh, (mut p, mut o))| {
            let (b, h) = (bh / heads, bh % heads);
            let qh = head(q3, b, h, d, q_off);
            #[cfg(target_arch = "x86_64")]
            if dims.small {
                let (kh, vh) = (head(k3, b, h, d, k_off), head(v3, b, h, d, v_off));
                if let (Some(q), Some(k), Some(v), Some(out)) = (
                    rows_of(&qh),
                    rows_of(&kh),
                    rows_of(&vh),
                    rows_of_mut(&mut o),
                ) {
                    // SAFETY: `small` holds only for f32 and what the kernel takes; the views
                    // are this head's t rows of d contiguous channels, P its own t × t block.
                    unsafe {
                        let forward = if crate::sgemm_avx512::available() {
                            crate::attention_avx512::forward
                        } else {
                            crate::attention_avx2::forward
                        };
                        forward(
                            tq,
                            d,
                            dims.causal,
                            dims.scale::<f32>(),
                            (q, k, v),
                            p.as_mut_ptr().cast::<f32>(),
                            out,
                        );
                    }
                    return;
                }
            }
            let k_t = PackedRight::new(head(k3, b, h, d, k_off).reversed_axes(), dims.packed);
            let vh = PackedRight::new(head(v3, b, h, d, v_off), dims.packed);
            // Block by block, so that a block's probabilities are still in L1 for P·v.
            for (rows, keys) in query_blocks.iter().cloned() {
                k_t.multiply(
                    dims.scale(),
                    qh.slice(s![rows.clone(), ..]),
                    0..d,
                    p.slice_mut(s![rows.clone(), ..keys]),
                );
                zero_tail(&mut p, rows.clone(), keys);
                // SAFETY: the product wrote the block's first `keys` columns, zero_tail the rest.
                let mut block = unsafe { p.slice_mut(s![rows.clone(), ..]).assume_init() };
                crate::simd::vectorized(
                    #[inline(always)]
                    || {
                        // Past the block's keys the rows are already zero, so a row may run
                        // on to a whole chunk past them.
                        for (row, i) in block.outer_iter_mut().zip(rows.clone()) {
                            let row = row.into_slice().expect("contiguous rows");
                            softmax_masked_row(&mut row[..row_span(keys, tk)], dims.visible(i));
                        }
                    },
                );
                vh.multiply(
                    T::one(),
                    block.slice(s![.., ..keys]),
                    0..keys,
                    o.slice_mut(s![rows, ..]),
                );
            }
        });
    // SAFETY: every (b, h) block of both was written above.
    unsafe { (probs.assume_init(), out.assume_init()) }
}

/// Backward for all heads. `grads` holds, per (b, h), the blocks to write ∂q, ∂k, ∂v into
/// (`None` where that input needs no gradient). `probs` is overwritten with ∂S.
#[allow(clippy::type_complexity)]
fn backward_heads<T: Float>(
    g3: ArrayView3<T>,
    (q3, q_off): (ArrayView3<T>, usize),
    (k3, k_off): (ArrayView3<T>, usize),
    (v3, v_off): (ArrayView3<T>, usize),
    mut probs: Array3<T>,
    grads: Vec<[Option<ArrayViewMut2<MaybeUninit<T>>>; 3]>,
    dims: Dims,
) {
    let Dims {
        heads, tq, tk, d, ..
    } = dims;
    let scale: T = dims.scale();
    let (query_blocks, key_blocks) = (dims.query_blocks(), dims.key_blocks());
    let rows_per_block = query_blocks.iter().map(|(rows, _)| rows.len()).max();
    probs
        .outer_iter_mut()
        .into_par_iter()
        .zip(grads.into_par_iter())
        .enumerate()
        .for_each(|(bh, (mut p, [dq, dk, dv]))| {
            let (b, h) = (bh / heads, bh % heads);
            let gh = head(g3, b, h, d, 0);
            let (qh, kh, vh) = (
                head(q3, b, h, d, q_off),
                head(k3, b, h, d, k_off),
                head(v3, b, h, d, v_off),
            );
            #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
            let (mut dq, mut dk, mut dv) = (dq, dk, dv);
            #[cfg(target_arch = "x86_64")]
            if dims.small {
                let out = |x: &mut Option<ArrayViewMut2<MaybeUninit<T>>>| match x {
                    Some(x) => rows_of_mut(x).map(Some),
                    None => Some(None),
                };
                if let (Some(g), Some(q), Some(k), Some(v), Some(dq), Some(dk), Some(dv)) = (
                    rows_of(&gh),
                    rows_of(&qh),
                    rows_of(&kh),
                    rows_of(&vh),
                    out(&mut dq),
                    out(&mut dk),
                    out(&mut dv),
                ) {
                    // SAFETY: as in the forward; P holds this head's probabilities, and the
                    // gradient blocks are this head's own rows.
                    unsafe {
                        let backward = if crate::sgemm_avx512::available() {
                            crate::attention_avx512::backward
                        } else {
                            crate::attention_avx2::backward
                        };
                        backward(
                            tq,
                            d,
                            dims.causal,
                            scale.as_f64() as f32,
                            g,
                            (q, k, v),
                            p.as_mut_ptr().cast::<f32>(),
                            (dq, dk, dv),
                        );
                    }
                    return;
                }
            }
            if let Some(dv) = dv {
                p_transposed_times(
                    &key_blocks,
                    tq,
                    p.view(),
                    &PackedRight::new(gh, dims.packed),
                    dv,
                );
            }
            if dq.is_none() && dk.is_none() {
                return;
            }
            // Block by block: ∂P, then ∂S in place of P (P is not needed after this head),
            // then the block's ∂q while its ∂S is in L1.
            let v_t = PackedRight::new(vh.reversed_axes(), dims.packed);
            let kh_packed = dq.as_ref().map(|_| PackedRight::new(kh, dims.packed));
            let mut dp = ndarray::Array2::<T>::uninit((rows_per_block.unwrap_or(0), tk));
            for (rows, keys) in query_blocks.iter().cloned() {
                let mut dp = dp.slice_mut(s![..rows.len(), ..]);
                v_t.multiply(
                    T::one(),
                    gh.slice(s![rows.clone(), ..]),
                    0..d,
                    dp.slice_mut(s![.., ..keys]),
                );
                zero_tail(&mut dp, 0..rows.len(), keys);
                // SAFETY: the product wrote the first `keys` columns, zero_tail the rest.
                let dp = unsafe { dp.assume_init() };
                let mut ds = p.slice_mut(s![rows.clone(), ..]);
                crate::simd::vectorized(
                    #[inline(always)]
                    || {
                        for ((p_row, dp_row), i) in
                            ds.outer_iter_mut().zip(dp.outer_iter()).zip(rows.clone())
                        {
                            // P is 0 past the visible keys (and ∂P finite), so those entries
                            // add nothing to the dot product and stay 0.
                            let seen = row_span(dims.visible(i), tk);
                            score_gradient_row(
                                &mut p_row.into_slice().expect("contiguous rows")[..seen],
                                &dp_row.to_slice().expect("contiguous rows")[..seen],
                                scale,
                            );
                        }
                    },
                );
                if let (Some(kh), Some(dq)) = (&kh_packed, &mut dq) {
                    kh.multiply(
                        T::one(),
                        ds.slice(s![.., ..keys]),
                        0..keys,
                        dq.slice_mut(s![rows, ..]),
                    );
                }
            }
            if let Some(dk) = dk {
                p_transposed_times(
                    &key_blocks,
                    tq,
                    p.view(),
                    &PackedRight::new(qh, dims.packed),
                    dk,
                );
            }
        });
}

/// Checks `c` splits into `n_head` heads and returns the head size.
fn head_size(c: usize, n_head: usize) -> Result<usize> {
    if n_head == 0 || c == 0 || !c.is_multiple_of(n_head) {
        return arg_err(
            "attention",
            format!("{c} channels do not split into {n_head} heads"),
        );
    }
    Ok(c / n_head)
}

/// Scaled dot-product attention over `n_head` heads (see the module docs).
pub fn attention<'t, T: Float>(
    q: &Var<'t, T>,
    k: &Var<'t, T>,
    v: &Var<'t, T>,
    n_head: usize,
    causal: bool,
) -> Result<Var<'t, T>> {
    let (qs, ks) = (q.shape(), k.shape());
    if qs.len() != 3 || ks.len() != 3 || v.shape() != ks || qs[0] != ks[0] || qs[2] != ks[2] {
        return shape_err(
            "attention",
            qs,
            ks,
            format!(
                "need q [B, Tq, C] and k, v [B, Tk, C] (v is {:?})",
                v.shape()
            ),
        );
    }
    let (batch, tq, c, tk) = (qs[0], qs[1], qs[2], ks[1]);
    let d = head_size(c, n_head)?;
    if causal && tq > tk {
        return arg_err(
            "attention",
            format!("causal attention needs at least as many keys ({tk}) as queries ({tq})"),
        );
    }
    let dims = Dims::new::<T>((batch, n_head), (tq, tk), d, causal);
    let (qv, kv, vv) = (q.value().clone(), k.value().clone(), v.value().clone());
    let (probs, out) = forward_heads((view3(&qv), 0), (view3(&kv), 0), (view3(&vv), 0), dims);
    OpRecord::new("attention", &[q, k, v])
        .attrs(format!("heads={n_head} causal={causal}"))
        .saves("q", &qv)
        .saves("k", &kv)
        .saves("v", &vv)
        .saves("probs", &probs)
        .finish(out.into_dyn(), move |g, needs| {
            let g3 = g.into_dimensionality::<Ix3>().expect("output rank 3");
            let rows = |need: bool, t: usize| if need { t } else { 0 };
            let mut dq = Array3::<T>::uninit((batch, rows(needs[0], tq), c));
            let mut dk = Array3::<T>::uninit((batch, rows(needs[1], tk), c));
            let mut dv = Array3::<T>::uninit((batch, rows(needs[2], tk), c));
            let grads = gradient_blocks([&mut dq, &mut dk, &mut dv], d, needs);
            backward_heads(
                g3.view(),
                (view3(&qv), 0),
                (view3(&kv), 0),
                (view3(&vv), 0),
                probs,
                grads,
                dims,
            );
            // SAFETY: every head block of each needed gradient was written.
            let done = |x: Array3<MaybeUninit<T>>, need: bool| {
                need.then(|| unsafe { x.assume_init() }.into_dyn())
            };
            vec![done(dq, needs[0]), done(dk, needs[1]), done(dv, needs[2])]
        })
}

/// Causal (or not) self-attention reading q, k and v in place from a fused `[B, T, 3C]`
/// tensor — columns `0..C`, `C..2C`, `2C..3C` — with one `[B, T, 3C]` gradient (see the module
/// docs). Equal to `attention(qkv.narrow(2, 0, C), qkv.narrow(2, C, C), qkv.narrow(2, 2C, C))`.
pub fn attention_qkv<'t, T: Float>(
    qkv: &Var<'t, T>,
    n_head: usize,
    causal: bool,
) -> Result<Var<'t, T>> {
    let shape = qkv.shape();
    if shape.len() != 3 || !shape[2].is_multiple_of(3) {
        return arg_err(
            "attention_qkv",
            format!("need a fused [B, T, 3C] tensor, got shape {:?}", shape),
        );
    }
    let (batch, t, c) = (shape[0], shape[1], shape[2] / 3);
    let d = head_size(c, n_head)?;
    let dims = Dims::new::<T>((batch, n_head), (t, t), d, causal);
    let x = qkv.value().clone();
    let (probs, out) = forward_heads((view3(&x), 0), (view3(&x), c), (view3(&x), 2 * c), dims);
    OpRecord::new("attention_qkv", &[qkv])
        .attrs(format!("heads={n_head} causal={causal}"))
        .saves("qkv", &x)
        .saves("probs", &probs)
        .finish(out.into_dyn(), move |g, _| {
            let g3 = g.into_dimensionality::<Ix3>().expect("output rank 3");
            let mut dqkv = Array3::<T>::uninit((batch, t, 3 * c));
            // Per batch the blocks run q heads, k heads, v heads, left to right.
            let mut blocks = column_blocks(dqkv.view_mut(), d).into_iter();
            let mut grads = Vec::with_capacity(batch * n_head);
            for _ in 0..batch {
                let q: Vec<_> = blocks.by_ref().take(n_head).collect();
                let k: Vec<_> = blocks.by_ref().take(n_head).collect();
                let v: Vec<_> = blocks.by_ref().take(n_head).collect();
                for ((q, k), v) in q.into_iter().zip(k).zip(v) {
                    grads.push([Some(q), Some(k), Some(v)]);
                }
            }
            let x3 = view3(&x);
            backward_heads(g3.view(), (x3, 0), (x3, c), (x3, 2 * c), probs, grads, dims);
            // SAFETY: the q, k and v blocks of every head cover all of ∂qkv.
            vec![Some(unsafe { dqkv.assume_init() }.into_dyn())]
        })
}

#[cfg(test)]
mod tests {
    use super::{attention, attention_qkv};
    use crate::ops::test_util::{assert_gradcheck, rand_array};
    use crate::Tape;

    thread_local! {
        /// Sends one-query calls on this thread down the general path (`one_query_path_off`).
        pub(super) static ONE_QUERY_PATH_OFF: std::cell::Cell<bool> =
            const { std::cell::Cell::new(false) };
    }

    /// One query against a cache, as decoding calls it: q a narrowed `[B, 1, 3C]` row, k and v
    /// the first `tk` positions of longer caches. The output and the gradients of
    /// `Σ y·w` (w random) for q, k and v, with the one-query path on or off.
    fn one_query<T: crate::Float>(
        (batch, heads, d, tk): (usize, usize, usize, usize),
        causal: bool,
        seed: u64,
        path_off: bool,
    ) -> Vec<ndarray::ArrayD<T>> {
        let c = heads * d;
        let cast = |x: ndarray::ArrayD<f64>| x.mapv(T::from_f64);
        let tape = Tape::<T>::new();
        let qkv = tape.param("qkv", cast(rand_array(&[batch, 1, 3 * c], seed)));
        let k_cache = tape.param("k", cast(rand_array(&[batch, tk + 5, c], seed + 1)));
        let v_cache = tape.param("v", cast(rand_array(&[batch, tk + 5, c], seed + 2)));
        let w = tape.constant(cast(rand_array(&[batch, 1, c], seed + 3)));
        let q = qkv.narrow(2, c, c).unwrap();
        let (k, v) = (
            k_cache.narrow(1, 0, tk).unwrap(),
            v_cache.narrow(1, 0, tk).unwrap(),
        );
        ONE_QUERY_PATH_OFF.with(|flag| flag.set(path_off));
        let y = attention(&q, &k, &v, heads, causal).unwrap();
        ONE_QUERY_PATH_OFF.with(|flag| flag.set(false));
        let loss = y.mul(&w).unwrap().sum(&[0, 1, 2], false).unwrap();
        let grads = tape.backward(&loss).unwrap();
        let mut out = vec![y.value().to_owned()];
        out.extend([&qkv, &k_cache, &v_cache].map(|x| grads.get(x).unwrap().to_owned()));
        out
    }

    #[test]
    fn one_query_path_gives_the_general_paths_bits() {
        // Decoding's path reads whole cached rows for all heads at once; the general path runs
        // two GEMVs per head. Lengths around the eight row runs (1, 7, 8, 9, 37, 140), heads
        // of 8 to 64 channels, batches of 1 and 2, causal or not; f32 and f64.
        let mut seed = 500;
        for shape in [
            (1, 12, 64, 140),
            (1, 12, 64, 1),
            (2, 4, 32, 37),
            (1, 3, 16, 7),
            (1, 2, 48, 8),
            (2, 1, 8, 9),
            (1, 2, 64, 200),
        ] {
            for causal in [true, false] {
                seed += 4;
                let fast = one_query::<f32>(shape, causal, seed, false);
                let general = one_query::<f32>(shape, causal, seed, true);
                for (name, (a, b)) in ["y", "∂qkv", "∂k", "∂v"]
                    .iter()
                    .zip(fast.iter().zip(&general))
                {
                    let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
                    assert!(same, "{shape:?} causal={causal} {name}: not the same bits");
                }
                let fast = one_query::<f64>(shape, causal, seed, false);
                let general = one_query::<f64>(shape, causal, seed, true);
                assert!(fast
                    .iter()
                    .zip(&general)
                    .all(|(a, b)| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())));
            }
        }
    }

    /// The same attention composed from primitive ops, as a reference.
    fn composed<'t>(
        q: &crate::Var<'t, f64>,
        k: &crate::Var<'t, f64>,
        v: &crate::Var<'t, f64>,
        heads: usize,
    ) -> crate::Result<crate::Var<'t, f64>> {
        let (b, tq, c) = (q.shape()[0], q.shape()[1], q.shape()[2]);
        let tk = k.shape()[1];
        let d = c / heads;
        let split =
            |x: &crate::Var<'t, f64>, t| x.reshape(&[b, t, heads, d])?.permute(&[0, 2, 1, 3]);
        let (qh, kh, vh) = (split(q, tq)?, split(k, tk)?, split(v, tk)?);
        let scores = qh
            .matmul(&kh.transpose(2, 3)?)?
            .scale(1.0 / (d as f64).sqrt())?;
        let mask =
            ndarray::Array2::from_shape_fn(
                (tq, tk),
                |(i, j)| if j <= i + tk - tq { 0.0 } else { -1e30 },
            );
        let masked = scores.add(&q.tape().constant(mask.into_dyn()))?;
        let out = masked.softmax()?.matmul(&vh)?;
        out.permute(&[0, 2, 1, 3])?.reshape(&[b, tq, c])
    }

    #[test]
    fn fused_attention_equals_the_composed_ops() {
        let tape = Tape::<f64>::new();
        let q = tape.param("q", rand_array(&[2, 5, 6], 1));
        let k = tape.param("k", rand_array(&[2, 5, 6], 2));
        let v = tape.param("v", rand_array(&[2, 5, 6], 3));
        let fused = attention(&q, &k, &v, 2, true).unwrap();
        let reference = composed(&q, &k, &v, 2).unwrap();
        let diff = (fused.value() - reference.value())
            .mapv(f64::abs)
            .fold(0.0f64, |m, &x| m.max(x));
        assert!(diff < 1e-12, "max diff {diff}");
    }

    #[test]
    fn causal_blocks_skip_only_masked_entries_values_and_gradients() {
        // Long enough for several query and key blocks (140 → 36 + 36 + 36 + 32; 150 → ... +
        // 36 + 42), and a KV-cache shape whose 20 queries are the last of 130 positions; one
        // block with rows of whole 16-lane chunks (64) and with a ragged last chunk (37).
        for (tq, tk, seed) in [
            (140, 140, 20),
            (150, 150, 30),
            (20, 130, 40),
            (64, 64, 50),
            (37, 37, 60),
        ] {
            let tape = Tape::<f64>::new();
            let q = tape.param("q", rand_array(&[2, tq, 8], seed));
            let k = tape.param("k", rand_array(&[2, tk, 8], seed + 1));
            let v = tape.param("v", rand_array(&[2, tk, 8], seed + 2));
            let weights = tape.constant(rand_array(&[2, tq, 8], seed + 3));
            let grads = |y: crate::Var<'_, f64>| {
                let loss = y.mul(&weights).unwrap().sum_all().unwrap();
                let g = tape.backward(&loss).unwrap();
                let value = y.value().to_owned();
                [
                    value,
                    g.get(&q).unwrap().clone(),
                    g.get(&k).unwrap().clone(),
                    g.get(&v).unwrap().clone(),
                ]
            };
            let fused = grads(attention(&q, &k, &v, 2, true).unwrap());
            let reference = grads(composed(&q, &k, &v, 2).unwrap());
            for (name, (a, b)) in ["y", "∂q", "∂k", "∂v"]
                .iter()
                .zip(fused.iter().zip(&reference))
            {
                let diff = (a - b).mapv(f64::abs).fold(0.0f64, |m, &x| m.max(x));
                assert!(diff < 1e-12, "{tq}×{tk} {name}: max diff {diff}");
            }
        }
        assert_eq!(
            super::row_blocks(150, true, false),
            vec![0..36, 36..72, 72..108, 108..150]
        );
        assert_eq!(
            super::row_blocks(140, true, false),
            vec![0..36, 36..72, 72..108, 108..140]
        );
        let whole = |n| std::iter::once(0..n).collect::<Vec<_>>();
        assert_eq!(super::row_blocks(150, false, false), whole(150));
        assert_eq!(super::row_blocks(100, true, false), whole(100));
        assert_eq!(super::row_blocks(150, false, true), whole(150));
        assert_eq!(
            super::row_blocks(130, true, true),
            vec![0..24, 24..48, 48..72, 72..96, 96..120, 120..130]
        );
        // Packed operands only for long causal f32 heads: never for one query against a KV
        // cache (generation), T = 64, f64 or attention without a mask.
        let packed =
            |tq, tk, d, causal| super::Dims::new::<f32>((1, 2), (tq, tk), d, causal).packed;
        assert!(!packed(1, 200, 64, true));
        assert!(!packed(64, 64, 32, true));
        assert!(!packed(200, 200, 64, false));
        assert!(!super::Dims::new::<f64>((1, 2), (200, 200), 64, true).packed);
        assert_eq!(
            packed(200, 200, 64, true),
            crate::gemm::PackedRight::<f32>::packs(32)
        );
    }

    /// Output and ∂q, ∂k, ∂v of Σ (attention ⊙ weights) in element type `T`, as f64.
    fn attention_and_gradients<T: crate::Float>(
        inputs: &[ndarray::ArrayD<f64>; 4],
        heads: usize,
        causal: bool,
    ) -> [ndarray::ArrayD<f64>; 4] {
        let tape = Tape::<T>::new();
        let cast = |x: &ndarray::ArrayD<f64>| x.mapv(T::from_f64);
        let q = tape.param("q", cast(&inputs[0]));
        let k = tape.param("k", cast(&inputs[1]));
        let v = tape.param("v", cast(&inputs[2]));
        let weights = tape.constant(cast(&inputs[3]));
        let y = attention(&q, &k, &v, heads, causal).unwrap();
        let loss = y.mul(&weights).unwrap().sum_all().unwrap();
        let g = tape.backward(&loss).unwrap();
        let wide = |x: ndarray::ArrayViewD<T>| x.mapv(|x| x.as_f64());
        [
            wide(y.value().view()),
            wide(g.get(&q).unwrap().view()),
            wide(g.get(&k).unwrap().view()),
            wide(g.get(&v).unwrap().view()),
        ]
    }

    #[test]
    fn packed_f32_heads_match_f64_values_and_gradients() {
        // With AVX-512, f32 heads from T = 128 read operands packed once per head, in 24-row
        // blocks; f64 runs ordinary products (see `causal_blocks_skip_only_masked_entries…`).
        // Shapes: a ragged last block (140 = 5·24 + 20: a 12-row and an 8-row panel), a
        // partial column panel (48 channels per head), a KV cache (128 queries of 200
        // positions), and 300 queries, whose first key blocks are read by more than 256 (the
        // transposed P is packed then, not read in place).
        for (tq, tk, c, heads, seed) in [
            (140, 140, 128, 2, 70),
            (130, 130, 96, 2, 80),
            (128, 200, 64, 1, 90),
            (300, 300, 64, 1, 100),
        ] {
            let causal = true;
            let inputs = [
                rand_array(&[2, tq, c], seed),
                rand_array(&[2, tk, c], seed + 1),
                rand_array(&[2, tk, c], seed + 2),
                rand_array(&[2, tq, c], seed + 3),
            ];
            let single = attention_and_gradients::<f32>(&inputs, heads, causal);
            let double = attention_and_gradients::<f64>(&inputs, heads, causal);
            for (name, (a, b)) in ["y", "∂q", "∂k", "∂v"]
                .iter()
                .zip(single.iter().zip(&double))
            {
                let diff = (a - b).mapv(f64::abs).fold(0.0f64, |m, &x| m.max(x));
                let scale = b.mapv(f64::abs).fold(0.0f64, |m, &x| m.max(x));
                assert!(
                    diff < 2e-5 * scale.max(1.0),
                    "{tq}×{tk} C={c} causal={causal} {name}: max diff {diff} (max {scale})"
                );
            }
        }
    }

    /// Output, ∂q, ∂k and ∂v (those in `needs`) of every head through `forward_heads` and
    /// `backward_heads`, in f32, with heads run in register tiles or not.
    fn heads_f32(
        inputs: &[ndarray::ArrayD<f64>; 4],
        heads: usize,
        causal: bool,
        small: bool,
        needs: [bool; 3],
    ) -> Vec<Option<ndarray::Array3<f32>>> {
        use super::{backward_heads, forward_heads, gradient_blocks, Dims};
        use ndarray::{Array3, Ix3};
        let [q, k, v, g] = inputs
            .clone()
            .map(|x| x.mapv(|x| x as f32).into_dimensionality::<Ix3>().unwrap());
        let (batch, t, c) = q.dim();
        let d = c / heads;
        let mut dims = Dims::new::<f32>((batch, heads), (t, t), d, causal);
        dims.small = small;
        let (probs, out) = forward_heads((q.view(), 0), (k.view(), 0), (v.view(), 0), dims);
        let mut grads: Vec<_> = needs
            .iter()
            .map(|&need| Array3::<f32>::uninit((batch, if need { t } else { 0 }, c)))
            .collect();
        let [dq, dk, dv] = &mut grads[..] else {
            unreachable!()
        };
        let blocks = gradient_blocks([dq, dk, dv], d, &needs);
        backward_heads(
            g.view(),
            (q.view(), 0),
            (k.view(), 0),
            (v.view(), 0),
            probs,
            blocks,
            dims,
        );
        let mut all = vec![Some(out)];
        for (x, need) in grads.into_iter().zip(needs) {
            // SAFETY: backward_heads wrote every block of a needed gradient.
            all.push(need.then(|| unsafe { x.assume_init() }));
        }
        all
    }

    #[test]
    fn register_tile_heads_give_the_general_paths_bits() {
        // Short self-attention in f32 on AVX-512 (AVX2) runs each head in
        // `attention_avx512`'s (`attention_avx2`'s) register tiles. Against the general path (packed products, softmax over memory),
        // the same bits: 6-row tiles with 1–4 vectors of keys, a last tile of 4 rows at
        // T = 64 and of 2 at 32, ragged rows (T = 1, 5, 37, 50, 77); past 64 keys, scores
        // through memory in 64-column groups, v, k, ∂O and q rows copied side by side
        // (T = 80 … 384). Heads of 16, 32, 48, 64 channels; causal or not; subsets of the
        // gradients the tape may ask for.
        if !crate::attention_avx512::takes(16, 16, 16) && !crate::attention_avx2::takes(16, 16, 16)
        {
            return;
        }
        let mut seed = 200;
        for (t, c, heads) in [
            (64, 128, 4),
            (64, 64, 1),
            (48, 96, 2),
            (32, 48, 1),
            (16, 64, 4),
            (37, 64, 2),
            (50, 128, 2),
            (5, 32, 1),
            (1, 32, 2),
            (100, 64, 1),
            (128, 128, 2),
            (192, 64, 1),
            (77, 96, 2),
            (150, 64, 1),
            (256, 128, 2),
            (300, 64, 1),
            (320, 64, 2),
            (384, 96, 2),
            (80, 64, 4),
            (96, 32, 1),
            (112, 48, 1),
            (144, 32, 2),
            (30, 64, 2),
            (20, 48, 1),
            (24, 128, 4),
        ] {
            let d = c / heads;
            if !crate::attention_avx512::takes(t, t, d) && !crate::attention_avx2::takes(t, t, d) {
                continue;
            }
            for causal in [true, false] {
                for needs in [
                    [true, true, true],
                    [true, false, true],
                    [false, false, true],
                    [false, true, false],
                    [true, false, false],
                    [true, true, false],
                    [false, true, true],
                ] {
                    seed += 4;
                    let inputs = [0, 1, 2, 3].map(|i| rand_array(&[2, t, c], seed + i));
                    let tiles = heads_f32(&inputs, heads, causal, true, needs);
                    let general = heads_f32(&inputs, heads, causal, false, needs);
                    for (name, (a, b)) in ["y", "∂q", "∂k", "∂v"]
                        .iter()
                        .zip(tiles.iter().zip(&general))
                    {
                        let (Some(a), Some(b)) = (a, b) else {
                            assert!(a.is_none() && b.is_none());
                            continue;
                        };
                        let what = format!("T={t} C={c} heads={heads} causal={causal} {name}");
                        let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
                        assert!(same, "{what}: not the same bits");
                    }
                }
            }
        }
        // And against f64 through the op itself (the f32 call takes the tiles).
        let inputs = [0, 1, 2, 3].map(|i| rand_array(&[2, 64, 128], 300 + i));
        let single = attention_and_gradients::<f32>(&inputs, 4, true);
        let double = attention_and_gradients::<f64>(&inputs, 4, true);
        for (a, b) in single.iter().zip(&double) {
            let diff = (a - b).mapv(f64::abs).fold(0.0f64, |m, &x| m.max(x));
            assert!(diff < 2e-5, "f32 tiles against f64: max diff {diff}");
        }
    }

    #[test]
    fn gradcheck_attention_causal_noncausal_and_kv_cache_shapes() {
        let (q, k, v) = (
            rand_array(&[2, 4, 6], 4),
            rand_array(&[2, 4, 6], 5),
            rand_array(&[2, 4, 6], 6),
        );
        assert_gradcheck(
            |x| attention(&x[0], &x[1], &x[2], 3, true),
            &[q.clone(), k.clone(), v.clone()],
        );
        assert_gradcheck(
            |x| attention(&x[0], &x[1], &x[2], 2, false),
            &[q.clone(), k.clone(), v.clone()],
        );
        // Two queries against four cached keys; and q, k, v narrowed out of one fused tensor.
        let q2 = rand_array(&[2, 2, 6], 7);
        assert_gradcheck(|x| attention(&x[0], &x[1], &x[2], 3, true), &[q2, k, v]);
        assert_gradcheck(
            |x| {
                let qkv = &x[0];
                attention(
                    &qkv.narrow(2, 0, 4)?,
                    &qkv.narrow(2, 4, 4)?,
                    &qkv.narrow(2, 8, 4)?,
                    2,
                    true,
                )
            },
            &[rand_array(&[1, 3, 12], 8)],
        );
    }

    #[test]
    fn fused_qkv_equals_attention_on_narrowed_parts_values_and_gradients() {
        // Output and ∂qkv of Σ (attention ⊙ weights), fused or from three narrowed parts.
        let run = |fused: bool| {
            let tape = Tape::<f64>::new();
            let qkv = tape.param("qkv", rand_array(&[2, 5, 12], 9));
            let y = if fused {
                attention_qkv(&qkv, 2, true).unwrap()
            } else {
                let part = |i: usize| qkv.narrow(2, 4 * i, 4).unwrap();
                attention(&part(0), &part(1), &part(2), 2, true).unwrap()
            };
            let weights = tape.constant(rand_array(&[2, 5, 4], 10));
            let loss = y.mul(&weights).unwrap().sum_all().unwrap();
            let grad = tape.backward(&loss).unwrap().get(&qkv).unwrap().clone();
            (y.value().to_owned(), grad)
        };
        let ((y_fused, g_fused), (y_parts, g_parts)) = (run(true), run(false));
        assert_eq!(y_fused, y_parts);
        let diff = (&g_fused - &g_parts)
            .mapv(f64::abs)
            .fold(0.0f64, |m, &x| m.max(x));
        assert!(diff < 1e-14, "max gradient diff {diff}");
        assert_gradcheck(
            |x| attention_qkv(&x[0], 3, true),
            &[rand_array(&[2, 4, 18], 11)],
        );
        assert_gradcheck(
            |x| attention_qkv(&x[0], 2, false),
            &[rand_array(&[1, 3, 12], 12)],
        );
    }

    #[test]
    fn bad_shapes_are_errors() {
        let tape = Tape::<f32>::new();
        let x = tape.constant(ndarray::ArrayD::<f32>::zeros(ndarray::IxDyn(&[1, 3, 6])));
        assert!(attention(&x, &x, &x, 4, true).is_err());
        let short = x.narrow(1, 0, 2).unwrap();
        assert!(attention(&x, &short, &short, 2, true).is_err());
        assert!(attention_qkv(&x, 4, true).is_err()); // 2 channels per part, 4 heads
        let not_fused = tape.constant(ndarray::ArrayD::<f32>::zeros(ndarray::IxDyn(&[1, 3, 7])));
        assert!(attention_qkv(&not_fused, 1, true).is_err());
    }
}
