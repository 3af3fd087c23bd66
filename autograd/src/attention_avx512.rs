//! One attention head of a short sequence (self-attention over T ≤ 384 positions, heads of
//! 16, 32, 48 or 64 channels) in f32 on AVX-512, from register tiles: for T ≤ 64 a block of
//! query rows' scores, softmax and ∂S never leave registers.
//!
//! At nanogpt-cpu's shape (T = 64, D = 32) every product of a head is a few thousand
//! multiply-adds, and going through the GEMM (pack, 12×32 tiles, store, then a softmax pass
//! over memory) cost more than the arithmetic. Here each step of [`forward`] and [`backward`]
//! is one register tile of 6 rows × up to four 16-lane vectors, all from one `tile` function:
//!
//! ```text
//! forward, per block of 12 query rows       backward
//!   S  = q·kᵀ        tile over D            ∂v = Pᵀ·∂O    tile over the queries that see the keys
//!   P  = softmax(S·scale, masked)           per block of 12 query rows:
//!   O  = P·v         tile over the keys       ∂P = ∂O·vᵀ   tile over D
//!                    the block sees           ∂S = P ⊙ (∂P − rowsum(∂P ⊙ P)) · scale
//!                                             ∂q = ∂S·k    tile over the keys the block sees
//!                                           ∂k = ∂Sᵀ·q
//! ```
//! Scores and ∂S are taken 6 rows at a time (6 × 4 vectors = 24 accumulators); the products
//! over keys 12 rows at a time for heads of up to 32 channels. Causal blocks stop at the last
//! key their last row sees, rounded up to 16 lanes: the masked triangle is mostly skipped.
//! Rows that see more than 64 keys ([`MAX_T`] < T ≤ [`LONGEST`]) have their scores and ∂P
//! written to memory 64 columns at a time and their softmax and ∂S computed over the stored
//! row. kᵀ and vᵀ are transposed once per head (16×16 blocks in registers) into a buffer kept
//! by the thread; everything else is read in place.
//!
//! The additions happen in the general path's order (each product sums its steps in order
//! from zero; softmax's sums and ∂S's dot products use [`crate::simd`]'s lane trees, a row's
//! last partial chunk added one by one), so for finite inputs the results are the bits of
//! [`crate::ops::attention`]'s general path. (The tiles skip products with masked zeros of P
//! that the general path may compute, so an infinite or NaN input can differ there.)

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Runs `f::<V>(args)` for `V` = `$n` (1 to 4 vectors of 16 lanes).
macro_rules! with_vectors {
    ($n:expr, $f:ident($($arg:expr),* $(,)?)) => {
        match $n {
            1 => $f::<1>($($arg),*),
            2 => $f::<2>($($arg),*),
            3 => $f::<3>($($arg),*),
            _ => $f::<4>($($arg),*),
        }
    };
}

/// Most keys a row's scores can hold in registers (four 16-lane vectors).
pub const MAX_T: usize = 64;

/// Longest sequence taken at all: past [`MAX_T`] keys a block's scores (and ∂P) go through
/// memory in groups of 64 columns, and the softmax (∂S) runs over the stored rows. Against
/// the general path's packed 24-row blocks (GPT-2's 12 heads of 64, alternated in one
/// process; one thread unless said): T = 96 1.41× forward, 1.35× backward; 128 1.21×,
/// 1.18×; 256 1.08×, 1.07–1.09× (B = 4 on two threads 1.11–1.12×, 1.03–1.14×); 320
/// 1.04–1.07×, 1.02–1.06×; 384 1.09×, 1.05×; 512 1.04–1.06×, 0.94–0.96× — so 384.
pub const LONGEST: usize = 384;

/// Rows of a register tile: 6 rows × 4 vectors = 24 accumulators.
const ROWS: usize = 6;

/// Query rows (or keys) per block: the scores and ∂S of two 6-row tiles, then one product
/// over the block (one 12-row tile for heads of up to 32 channels).
const BLOCK: usize = 2 * ROWS;

/// Whether [`forward`] and [`backward`] take a head of `d` channels over `tq` queries and `tk`
/// keys: self-attention (`tq == tk`) of at most [`LONGEST`] positions, `d` a multiple of 16 up
/// to 64, on a CPU with AVX-512 (and the AVX-512 GEMM not switched off).
pub fn takes(tq: usize, tk: usize, d: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        tq == tk
            && (1..=LONGEST).contains(&tk)
            && d.is_multiple_of(16)
            && (16..=64).contains(&d)
            && crate::sgemm_avx512::available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (tq, tk, d);
        false
    }
}

/// Rows of `d` contiguous floats, row `i` at `ptr + i·stride`.
#[derive(Clone, Copy, Debug)]
pub struct Rows {
    pub ptr: *const f32,
    pub stride: isize,
}

/// [`Rows`] to write (memory that need not be initialised).
#[derive(Clone, Copy, Debug)]
pub struct RowsMut {
    pub ptr: *mut f32,
    pub stride: isize,
}

impl Rows {
    /// The same rows from column `j` on.
    pub(crate) fn shifted(self, j: usize) -> Rows {
        Rows {
            ptr: self.ptr.wrapping_add(j),
            stride: self.stride,
        }
    }

    pub(crate) fn row(self, i: usize) -> *const f32 {
        self.ptr.wrapping_offset(i as isize * self.stride)
    }

    pub(crate) fn from(self, i: usize) -> Rows {
        Rows {
            ptr: self.row(i),
            stride: self.stride,
        }
    }
}

impl RowsMut {
    pub(crate) fn from(self, i: usize) -> RowsMut {
        RowsMut {
            ptr: self.ptr.wrapping_offset(i as isize * self.stride),
            stride: self.stride,
        }
    }
}

thread_local! {
    /// A head's kᵀ or vᵀ ([`transpose`]), kept between heads on this thread.
    static TRANSPOSED: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
    /// A head's v, k, ∂O or q rows side by side ([`with_contiguous`]).
    static CONTIGUOUS: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Runs `f` with `x`'s first `t` rows of `d` copied side by side when they are far apart and
/// many (the products over keys read one row per step: rows a fused qkv's 3C apart, past 64
/// of them, each step lands in another page), else with `x` itself.
#[cfg(target_arch = "x86_64")]
pub(crate) unsafe fn with_contiguous<R>(
    x: Rows,
    t: usize,
    d: usize,
    f: impl FnOnce(Rows) -> R,
) -> R {
    if t <= MAX_T || x.stride == d as isize {
        return f(x);
    }
    let mut buffer = CONTIGUOUS.take();
    buffer.clear();
    for i in 0..t {
        buffer.extend_from_slice(std::slice::from_raw_parts(x.row(i), d));
    }
    let result = f(Rows {
        ptr: buffer.as_ptr(),
        stride: d as isize,
    });
    CONTIGUOUS.set(buffer);
    result
}

/// Runs `f` with `x`'s first `t` rows transposed ([`transpose`]) into this thread's buffer.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn with_transposed<R>(x: Rows, t: usize, d: usize, f: impl FnOnce(Rows) -> R) -> R {
    with_transposed_by(x, t, d, transpose, f)
}

/// A transpose of `t` rows of `d` channels into `d` rows of `stride` (zero past `t`).
pub(crate) type Transpose = unsafe fn(Rows, usize, usize, *mut f32, usize);

/// Runs `f` with `x`'s first `t` rows transposed by `transpose` into this thread's buffer
/// (rows `stride = t` rounded up to 16 apart).
#[cfg(target_arch = "x86_64")]
pub(crate) unsafe fn with_transposed_by<R>(
    x: Rows,
    t: usize,
    d: usize,
    transpose: Transpose,
    f: impl FnOnce(Rows) -> R,
) -> R {
    let stride = t.next_multiple_of(16);
    let mut buffer = TRANSPOSED.take();
    buffer.clear();
    buffer.reserve(d * stride);
    transpose(x, t, d, buffer.as_mut_ptr(), stride);
    let result = f(Rows {
        ptr: buffer.as_ptr(),
        stride: stride as isize,
    });
    TRANSPOSED.set(buffer);
    result
}

/// One head's scaled dot-product attention forward over `t` positions of `d` channels:
/// writes the probabilities `p` (`t × t`, row-major, zero where masked) and the output rows.
///
/// # Safety
/// [`takes`]`(t, t, d)` must hold; `q`, `k`, `v` must hold `t` readable rows of `d` floats,
/// `p` `t·t` writable floats and `out` `t` writable rows of `d`, none overlapping the others.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn forward(
    t: usize,
    d: usize,
    causal: bool,
    scale: f32,
    (q, k, v): (Rows, Rows, Rows),
    p: *mut f32,
    out: RowsMut,
) {
    let mut flops = 0;
    let head = Head { t, causal, scale };
    with_transposed(k, t, d, |k_t| {
        with_contiguous(v, t, d, |v| {
            for i0 in (0..t).step_by(BLOCK) {
                let rows = BLOCK.min(t - i0);
                for s0 in (i0..i0 + rows).step_by(ROWS) {
                    let n = ROWS.min(i0 + rows - s0);
                    let keys = head.keys(s0 + n);
                    if keys <= MAX_T {
                        with_vectors!(keys.div_ceil(16), softmax_block(head, q, k_t, d, s0, n, p));
                    } else {
                        let scores = RowsMut {
                            ptr: p.add(s0 * t),
                            stride: t as isize,
                        };
                        scores_in_groups(q.from(s0), n, k_t, d, scores, (keys, t), scale);
                        for i in s0..s0 + n {
                            softmax_row(p.add(i * t), head.visible(i), t);
                        }
                    }
                    flops += 2 * n * t.min(keys.next_multiple_of(16)) * d;
                }
                let keys = head.keys(i0 + rows);
                let probs = Rows {
                    ptr: p.add(i0 * t),
                    stride: t as isize,
                };
                weighted(probs, 1, v, keys, rows, out.from(i0), d / 16);
                flops += 2 * rows * keys * d;
            }
        })
    });
    crate::gemm::count_flops(flops);
}

/// One head's backward: from the output's gradient `g` and the probabilities `p` saved by
/// [`forward`], writes whichever of ∂q, ∂k, ∂v is asked for. `p` is overwritten with ∂S.
///
/// # Safety
/// As for [`forward`]; `p` must hold [`forward`]'s probabilities for these q, k.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn backward(
    t: usize,
    d: usize,
    causal: bool,
    scale: f32,
    g: Rows,
    (q, k, v): (Rows, Rows, Rows),
    p: *mut f32,
    (dq, dk, dv): (Option<RowsMut>, Option<RowsMut>, Option<RowsMut>),
) {
    let vectors = d / 16;
    let mut flops = 0;
    // ∂v = Pᵀ·∂O, and at the end ∂k = ∂Sᵀ·q: per block of keys, the queries that see them.
    let transposed_product = |m: *const f32, x: Rows, out: RowsMut, flops: &mut usize| {
        for j0 in (0..t).step_by(BLOCK) {
            let rows = BLOCK.min(t - j0);
            let first = if causal { j0 } else { 0 };
            let columns = Rows {
                ptr: m.add(first * t + j0),
                stride: 1,
            };
            let x = x.from(first);
            weighted(
                columns,
                t as isize,
                x,
                t - first,
                rows,
                out.from(j0),
                vectors,
            );
            *flops += 2 * rows * (t - first) * d;
        }
    };
    if let Some(dv) = dv {
        with_contiguous(g, t, d, |g| transposed_product(p, g, dv, &mut flops));
    }
    if dq.is_none() && dk.is_none() {
        crate::gemm::count_flops(flops);
        return;
    }
    let head = Head { t, causal, scale };
    let stride = t.next_multiple_of(16);
    let mut dp = if t > MAX_T {
        vec![0.0f32; ROWS * stride]
    } else {
        Vec::new()
    };
    with_transposed(v, t, d, |v_t| {
        with_contiguous(k, t, d, |k| {
            for i0 in (0..t).step_by(BLOCK) {
                let rows = BLOCK.min(t - i0);
                for s0 in (i0..i0 + rows).step_by(ROWS) {
                    let n = ROWS.min(i0 + rows - s0);
                    let keys = head.keys(s0 + n);
                    if keys <= MAX_T {
                        with_vectors!(
                            keys.div_ceil(16),
                            score_gradient_block(head, g, v_t, d, s0, n, p)
                        );
                    } else {
                        let dp_rows = RowsMut {
                            ptr: dp.as_mut_ptr(),
                            stride: stride as isize,
                        };
                        scores_in_groups(g.from(s0), n, v_t, d, dp_rows, (keys, t), 1.0);
                        for r in 0..n {
                            let i = s0 + r;
                            let seen = head.visible(i).next_multiple_of(16).min(t);
                            score_gradient_row(
                                p.add(i * t),
                                dp.as_ptr().add(r * stride),
                                seen,
                                scale,
                            );
                        }
                    }
                    flops += 2 * n * t.min(keys.next_multiple_of(16)) * d;
                }
                if let Some(dq) = dq {
                    let keys = head.keys(i0 + rows);
                    let ds = Rows {
                        ptr: p.add(i0 * t),
                        stride: t as isize,
                    };
                    weighted(ds, 1, k, keys, rows, dq.from(i0), vectors);
                    flops += 2 * rows * keys * d;
                }
            }
        })
    });
    if let Some(dk) = dk {
        with_contiguous(q, t, d, |q| transposed_product(p, q, dk, &mut flops));
    }
    crate::gemm::count_flops(flops);
}

/// One head's length, mask and score scale.
#[derive(Clone, Copy)]
pub(crate) struct Head {
    pub(crate) t: usize,
    pub(crate) causal: bool,
    pub(crate) scale: f32,
}

impl Head {
    /// Keys that rows before `end` see.
    pub(crate) fn keys(self, end: usize) -> usize {
        if self.causal {
            end
        } else {
            self.t
        }
    }

    /// Keys row `i` sees.
    pub(crate) fn visible(self, i: usize) -> usize {
        if self.causal {
            i + 1
        } else {
            self.t
        }
    }
}

/// `acc[r][v] = Σ_s m(r, s) · y(s)[16v..16v + 16]` for `s` in `0..steps`, where row `r` of
/// `m` starts at `m.row(r)` (rows past `rows` repeat the last one) and steps `m_step` apart,
/// and `y(s) = y.row(s)`. Each accumulator adds its steps in order from zero, as the GEMM
/// kernels do.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn tile<const R: usize, const V: usize>(
    m: Rows,
    m_step: isize,
    rows: usize,
    y: Rows,
    steps: usize,
) -> [[__m512; V]; R] {
    let starts: [*const f32; R] = std::array::from_fn(|r| m.row(r.min(rows - 1)));
    let mut acc = [[_mm512_setzero_ps(); V]; R];
    let mut y_row = y.ptr;
    for s in 0..steps as isize {
        let ys: [__m512; V] = std::array::from_fn(|v| _mm512_loadu_ps(y_row.add(16 * v)));
        for r in 0..R {
            let a = _mm512_set1_ps(*starts[r].offset(s * m_step));
            for v in 0..V {
                acc[r][v] = _mm512_fmadd_ps(a, ys[v], acc[r][v]);
            }
        }
        // Wrapping: after the last step the row pointer may point past the buffer (unread).
        y_row = y_row.wrapping_offset(y.stride);
    }
    acc
}

/// Lanes `16v..16v + 16` that are below `n`.
#[cfg(target_arch = "x86_64")]
fn lanes_below(n: usize, v: usize) -> __mmask16 {
    let count = n.saturating_sub(16 * v).min(16);
    ((1u32 << count) - 1) as __mmask16
}

/// `out[r] = Σ_s m(r, s)·x(s)` for `rows` rows of `16·vectors` channels: tiles of 12 rows
/// for heads of up to 32 channels (24 accumulators), else of 6.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn weighted(
    m: Rows,
    m_step: isize,
    x: Rows,
    steps: usize,
    rows: usize,
    out: RowsMut,
    vectors: usize,
) {
    let tall = if vectors <= 2 { 2 * ROWS } else { ROWS };
    for r0 in (0..rows).step_by(tall) {
        let (m, n, out) = (m.from(r0), (rows - r0).min(tall), out.from(r0));
        match vectors {
            1 => weighted_rows::<{ 2 * ROWS }, 1>(m, m_step, x, steps, n, out),
            2 => weighted_rows::<{ 2 * ROWS }, 2>(m, m_step, x, steps, n, out),
            3 => weighted_rows::<ROWS, 3>(m, m_step, x, steps, n, out),
            _ => weighted_rows::<ROWS, 4>(m, m_step, x, steps, n, out),
        }
    }
}

/// [`weighted`] for one tile of at most `R` rows.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn weighted_rows<const R: usize, const V: usize>(
    m: Rows,
    m_step: isize,
    x: Rows,
    steps: usize,
    rows: usize,
    out: RowsMut,
) {
    let acc = tile::<R, V>(m, m_step, rows, x, steps);
    for (r, acc) in acc.iter().enumerate().take(rows) {
        let row = out.ptr.offset(r as isize * out.stride);
        for (v, value) in acc.iter().enumerate() {
            _mm512_storeu_ps(row.add(16 * v), *value);
        }
    }
}

/// Scores of query rows `i0..i0 + rows` against the first `16·V` keys, their masked softmax,
/// written as rows of `p` (zero where masked and up to the row's end).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn softmax_block<const V: usize>(
    head: Head,
    q: Rows,
    k_t: Rows,
    d: usize,
    i0: usize,
    rows: usize,
    p: *mut f32,
) {
    let t = head.t;
    let acc = tile::<ROWS, V>(q.from(i0), 1, rows, k_t, d);
    let scale = _mm512_set1_ps(head.scale);
    // Lanes before this index add lane-wise; a last partial chunk of the row (T not a
    // multiple of 16) adds one by one after them, as the general path's scalar tail does.
    let chunked = t / 16 * 16;
    for (r, acc) in acc.iter().enumerate().take(rows) {
        let i = i0 + r;
        let visible = head.visible(i);
        let scores: [__m512; V] = std::array::from_fn(|v| _mm512_mul_ps(scale, acc[v]));
        let mut max = _mm512_set1_ps(f32::NEG_INFINITY);
        for (v, s) in scores.iter().enumerate() {
            max = _mm512_mask_max_ps(max, lanes_below(visible, v), max, *s);
        }
        let max = _mm512_set1_ps(_mm512_reduce_max_ps(max));
        let mut sum_lanes = _mm512_setzero_ps();
        let mut exps = [_mm512_setzero_ps(); V];
        for (v, s) in scores.iter().enumerate() {
            exps[v] = _mm512_maskz_mov_ps(lanes_below(visible, v), exp(_mm512_sub_ps(*s, max)));
            if 16 * v < chunked {
                sum_lanes = _mm512_add_ps(sum_lanes, exps[v]);
            }
        }
        let mut sum = sum_of_lanes(sum_lanes);
        if 16 * V > chunked {
            let mut last = [0.0f32; 16];
            _mm512_storeu_ps(last.as_mut_ptr(), exps[chunked / 16]);
            for &x in &last[..t - chunked] {
                sum += x;
            }
        }
        let inv = _mm512_set1_ps(1.0 / sum);
        let row = p.add(i * t);
        for (v, e) in exps.iter().enumerate() {
            _mm512_mask_storeu_ps(row.add(16 * v), lanes_below(t, v), _mm512_mul_ps(*e, inv));
        }
        for v in V..t.div_ceil(16) {
            _mm512_mask_storeu_ps(row.add(16 * v), lanes_below(t, v), _mm512_setzero_ps());
        }
    }
}

/// ∂P of query rows `i0..i0 + rows` against the first `16·V` keys, then ∂S in place of
/// their probabilities in `p` (only where P may be non-zero, as the general path does).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn score_gradient_block<const V: usize>(
    head: Head,
    g: Rows,
    v_t: Rows,
    d: usize,
    i0: usize,
    rows: usize,
    p: *mut f32,
) {
    let t = head.t;
    let acc = tile::<ROWS, V>(g.from(i0), 1, rows, v_t, d);
    for (r, dp) in acc.iter().enumerate().take(rows) {
        let i = i0 + r;
        // P is zero past the visible keys; whole chunks up to them, as the general path.
        let seen = head.visible(i).next_multiple_of(16).min(t);
        let mut dp_row = [0.0f32; MAX_T];
        for (v, x) in dp.iter().enumerate() {
            _mm512_storeu_ps(dp_row.as_mut_ptr().add(16 * v), *x);
        }
        score_gradient_row(p.add(i * t), dp_row.as_ptr(), seen, head.scale);
    }
}

/// ∂S = P ⊙ (∂P − rowsum(∂P ⊙ P)) · scale in place of one row of P, over its first `seen`
/// entries (P is zero past them).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn score_gradient_row(row: *mut f32, dp: *const f32, seen: usize, scale: f32) {
    let p_row = std::slice::from_raw_parts(row, seen);
    let dot = _mm512_set1_ps(crate::simd::dot_avx512(
        p_row,
        std::slice::from_raw_parts(dp, seen),
    ));
    let scale = _mm512_set1_ps(scale);
    for v in 0..seen.div_ceil(16) {
        let mask = lanes_below(seen, v);
        let probs = _mm512_maskz_loadu_ps(mask, row.add(16 * v));
        let dp = _mm512_maskz_loadu_ps(mask, dp.add(16 * v));
        let ds = _mm512_mul_ps(_mm512_mul_ps(probs, _mm512_sub_ps(dp, dot)), scale);
        _mm512_mask_storeu_ps(row.add(16 * v), mask, ds);
    }
}

/// Scaled scores (or ∂P, with `scale` 1) of `rows` rows against the first `keys` columns of
/// `k_t`, 64 at a time, written into `out`'s rows (each `t` long; whole 16-lane chunks up to
/// `keys`, never past `t`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn scores_in_groups(
    a: Rows,
    rows: usize,
    k_t: Rows,
    d: usize,
    out: RowsMut,
    (keys, t): (usize, usize),
    scale: f32,
) {
    for g0 in (0..keys).step_by(MAX_T) {
        let out = RowsMut {
            ptr: out.ptr.add(g0),
            stride: out.stride,
        };
        with_vectors!(
            (keys - g0).div_ceil(16).min(4),
            scores_block(a, rows, k_t.shifted(g0), d, out, t - g0, scale)
        );
    }
}

/// Scaled scores (or ∂P, with `scale` 1) of `rows` rows against the 16·V columns of `k_t`,
/// the first `limit` of them stored as rows of `out`.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn scores_block<const V: usize>(
    a: Rows,
    rows: usize,
    k_t: Rows,
    d: usize,
    out: RowsMut,
    limit: usize,
    scale: f32,
) {
    let acc = tile::<ROWS, V>(a, 1, rows, k_t, d);
    let scale = _mm512_set1_ps(scale);
    for (r, acc) in acc.iter().enumerate().take(rows) {
        let row = out.ptr.offset(r as isize * out.stride);
        for (v, x) in acc.iter().enumerate() {
            _mm512_mask_storeu_ps(
                row.add(16 * v),
                lanes_below(limit, v),
                _mm512_mul_ps(scale, *x),
            );
        }
    }
}

/// The masked softmax of a row of `t` scores in memory, `visible` of them unmasked: zero
/// from there to the row's end. Sums as [`softmax_block`] (the general path's order).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn softmax_row(row: *mut f32, visible: usize, t: usize) {
    let chunks = visible.div_ceil(16);
    let mut max = _mm512_set1_ps(f32::NEG_INFINITY);
    for v in 0..chunks {
        // Masked loads: the last row of the last head's P ends its buffer.
        let x = _mm512_maskz_loadu_ps(lanes_below(t, v), row.add(16 * v));
        max = _mm512_mask_max_ps(max, lanes_below(visible, v), max, x);
    }
    let max = _mm512_set1_ps(_mm512_reduce_max_ps(max));
    let chunked = t / 16 * 16;
    let mut sum_lanes = _mm512_setzero_ps();
    let mut last = _mm512_setzero_ps();
    for v in 0..chunks {
        let x = _mm512_maskz_loadu_ps(lanes_below(t, v), row.add(16 * v));
        let e = _mm512_maskz_mov_ps(lanes_below(visible, v), exp(_mm512_sub_ps(x, max)));
        if 16 * v < chunked {
            sum_lanes = _mm512_add_ps(sum_lanes, e);
        } else {
            last = e;
        }
        _mm512_mask_storeu_ps(row.add(16 * v), lanes_below(t, v), e);
    }
    let mut sum = sum_of_lanes(sum_lanes);
    if 16 * chunks > chunked {
        let mut values = [0.0f32; 16];
        _mm512_storeu_ps(values.as_mut_ptr(), last);
        for &x in &values[..t - chunked] {
            sum += x;
        }
    }
    let inv = _mm512_set1_ps(1.0 / sum);
    for v in 0..chunks {
        let mask = lanes_below(t, v);
        let e = _mm512_maskz_loadu_ps(mask, row.add(16 * v));
        _mm512_mask_storeu_ps(row.add(16 * v), mask, _mm512_mul_ps(e, inv));
    }
    for v in chunks..t.div_ceil(16) {
        _mm512_mask_storeu_ps(row.add(16 * v), lanes_below(t, v), _mm512_setzero_ps());
    }
}

/// `x`'s first `t` rows of `d` channels as `out[c][j]`, zero for `t ≤ j` up to the next
/// multiple of 16 (what the tiles read); 16×16 blocks transposed in registers. The rest of
/// the buffer stays uninitialised: zeroing all 16 KiB cost as much as the transposes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transpose(x: Rows, t: usize, d: usize, out: *mut f32, stride: usize) {
    for j0 in (0..t).step_by(16) {
        for c0 in (0..d).step_by(16) {
            let block: [__m512; 16] = std::array::from_fn(|j| {
                if j0 + j < t {
                    _mm512_loadu_ps(x.row(j0 + j).add(c0))
                } else {
                    _mm512_setzero_ps()
                }
            });
            for (c, column) in crate::sgemm_avx512::transpose16(block).iter().enumerate() {
                _mm512_storeu_ps(out.add((c0 + c) * stride + j0), *column);
            }
        }
    }
}

/// The sixteen lanes' sum in [`crate::simd::sum_lanes`]'s order (the same bits).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn sum_of_lanes(x: __m512) -> f32 {
    let mut lanes = [0.0f32; 16];
    _mm512_storeu_ps(lanes.as_mut_ptr(), x);
    crate::simd::sum_lanes(lanes)
}

/// [`crate::element::exp_f32_fused`] on sixteen lanes: the same operations in the same
/// order, so the same bits.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn exp(x: __m512) -> __m512 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    use crate::element::{EXP_LN2_HI as LN2_HI, EXP_LN2_LO as LN2_LO, EXP_ROUND as ROUND};
    let xc = _mm512_min_ps(
        _mm512_max_ps(x, _mm512_set1_ps(-87.3)),
        _mm512_set1_ps(88.3),
    );
    let shifted = _mm512_fmadd_ps(xc, _mm512_set1_ps(LOG2E), _mm512_set1_ps(ROUND));
    let n_int = _mm512_sub_epi32(
        _mm512_castps_si512(shifted),
        _mm512_set1_epi32(ROUND.to_bits() as i32),
    );
    let n = _mm512_sub_ps(shifted, _mm512_set1_ps(ROUND));
    let g = _mm512_fnmadd_ps(
        n,
        _mm512_set1_ps(LN2_LO),
        _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), xc),
    );
    let mut p = _mm512_set1_ps(crate::element::EXP_TAYLOR_LEADING);
    for c in crate::element::EXP_TAYLOR_REST {
        p = _mm512_fmadd_ps(p, g, _mm512_set1_ps(c));
    }
    let scale = _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(
        n_int,
        _mm512_set1_epi32(127),
    )));
    let y = _mm512_mul_ps(p, scale);
    // NaN in, NaN out (the clamp above would have turned it into a number).
    let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x);
    _mm512_mask_mov_ps(y, nan, x)
}

#[cfg(all(test, target_arch = "x86_64"))]
pub(crate) mod tests {
    use super::{Rows, RowsMut};

    /// A head kernel's entry points (this module's or [`crate::attention_avx2`]'s) and the
    /// longest sequence it takes, for the checks both modules run.
    #[derive(Clone, Copy)]
    pub(crate) struct Kernel {
        pub(crate) forward: Forward,
        pub(crate) backward: Backward,
        pub(crate) longest: usize,
    }

    /// The signature of the kernels' `forward`.
    type Forward = unsafe fn(usize, usize, bool, f32, (Rows, Rows, Rows), *mut f32, RowsMut);

    /// The gradients `backward` may write (∂q, ∂k, ∂v).
    type Outputs = (Option<RowsMut>, Option<RowsMut>, Option<RowsMut>);

    /// The signature of the kernels' `backward`.
    type Backward = unsafe fn(usize, usize, bool, f32, Rows, (Rows, Rows, Rows), *mut f32, Outputs);

    /// One head, the last in every buffer it reads or writes (q, k, v in a fused `[t, 3C]`
    /// array, C = 2d; the output, ∂O and P exactly sized), its outputs and P prefilled with
    /// NaN. Returns P, the output, ∂q, ∂k, ∂v (NaN where not asked for) and the inputs q, k,
    /// v, ∂O as `[t, d]` blocks.
    #[allow(clippy::type_complexity)]
    fn run_last_head(
        kernel: Kernel,
        t: usize,
        d: usize,
        causal: bool,
        needs: [bool; 3],
        inputs: Option<u64>,
    ) -> ([Vec<f32>; 5], [Vec<f64>; 4]) {
        let (c, nan) = (2 * d, f32::NAN);
        let w = 3 * c;
        let random = |len: usize, seed: u64| -> Vec<f32> {
            match inputs {
                Some(base) => crate::ops::test_util::rand_array(&[len], base + seed)
                    .iter()
                    .map(|&x| x as f32)
                    .collect(),
                None => vec![nan; len],
            }
        };
        let (qkv, g) = (random(t * w, 0), random(t * c, 7));
        let rows = |x: &[f32], offset: usize, stride: usize| Rows {
            ptr: x[offset..].as_ptr(),
            stride: stride as isize,
        };
        let (q, k, v) = (
            rows(&qkv, d, w),
            rows(&qkv, c + d, w),
            rows(&qkv, 2 * c + d, w),
        );
        let (mut p, mut out, mut dqkv) = (vec![nan; t * t], vec![nan; t * c], vec![nan; t * w]);
        let scale = 1.0 / (d as f32).sqrt();
        let base = dqkv.as_mut_ptr();
        let grad = |i: usize| {
            needs[i].then(|| RowsMut {
                ptr: base.wrapping_add(i * c + d),
                stride: w as isize,
            })
        };
        // SAFETY: takes() was checked by the caller; every view is inside its buffer.
        let probs = unsafe {
            let out = RowsMut {
                ptr: out[d..].as_mut_ptr(),
                stride: c as isize,
            };
            (kernel.forward)(t, d, causal, scale, (q, k, v), p.as_mut_ptr(), out);
            let probs = p.clone();
            let g = rows(&g, d, c);
            (kernel.backward)(
                t,
                d,
                causal,
                scale,
                g,
                (q, k, v),
                p.as_mut_ptr(),
                (grad(0), grad(1), grad(2)),
            );
            probs
        };
        let block = |x: &[f32], offset: usize, stride: usize| -> Vec<f32> {
            (0..t)
                .flat_map(|i| x[i * stride + offset..i * stride + offset + d].to_vec())
                .collect()
        };
        let wide = |x: Vec<f32>| x.iter().map(|&v| v as f64).collect::<Vec<f64>>();
        (
            [
                probs,
                block(&out, d, c),
                block(&dqkv, d, w),
                block(&dqkv, c + d, w),
                block(&dqkv, 2 * c + d, w),
            ],
            [
                wide(block(&qkv, d, w)),
                wide(block(&qkv, c + d, w)),
                wide(block(&qkv, 2 * c + d, w)),
                wide(block(&g, d, c)),
            ],
        )
    }

    #[test]
    fn heads_at_the_ends_of_their_buffers_match_an_f64_reference() {
        if super::takes(16, 16, 16) {
            check_heads_at_the_ends_of_their_buffers(Kernel {
                forward: super::forward,
                backward: super::backward,
                longest: super::LONGEST,
            });
        }
    }

    /// Every T up to `kernel.longest` (from 1 to 384) that changes a block, tile or chunk
    /// boundary, heads of 16 to 64 channels, causal or not, each gradient subset (past T = 130
    /// only all three), against an f64 reference; outputs and P start as NaN and the
    /// per-thread buffers hold NaN from a previous head, so anything read before it is
    /// written shows. Gradients not asked for stay unwritten; masked probabilities are
    /// exactly +0.
    pub(crate) fn check_heads_at_the_ends_of_their_buffers(kernel: Kernel) {
        for causal in [true, false] {
            run_last_head(kernel, kernel.longest, 64, causal, [true; 3], None);
        }
        let mut seed = 1000;
        let lengths = [
            1, 2, 5, 6, 7, 11, 12, 13, 15, 16, 17, 18, 31, 33, 47, 63, 64, 65, 66, 70, 79, 80, 96,
            112, 127, 128, 129, 191, 200, 255, 256, 257, 320, 383, 384,
        ];
        for t in lengths.into_iter().filter(|&t| t <= kernel.longest) {
            for d in [16, 32, 48, 64] {
                for causal in [true, false] {
                    for needs in [
                        [true, true, true],
                        [true, false, false],
                        [false, true, false],
                        [false, false, true],
                        [true, true, false],
                        [false, true, true],
                    ] {
                        if t > 130 && needs != [true; 3] {
                            continue;
                        }
                        seed += 10;
                        let ([p, out, dq, dk, dv], [q, k, v, g]) =
                            run_last_head(kernel, t, d, causal, needs, Some(seed));
                        let at = |x: &[f64], i: usize, c: usize| x[i * d + c];
                        let scale = 1.0 / (d as f64).sqrt();
                        let visible = |i: usize| if causal { i + 1 } else { t };
                        let mut probs = vec![0.0f64; t * t];
                        for i in 0..t {
                            let s: Vec<f64> = (0..visible(i))
                                .map(|j| {
                                    (0..d).map(|c| at(&q, i, c) * at(&k, j, c)).sum::<f64>() * scale
                                })
                                .collect();
                            let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                            let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
                            let sum: f64 = e.iter().sum();
                            for (j, e) in e.iter().enumerate() {
                                probs[i * t + j] = e / sum;
                            }
                        }
                        let mut ds = vec![0.0f64; t * t];
                        let mut want = [
                            vec![0.0f64; t * d],
                            vec![0.0; t * d],
                            vec![0.0; t * d],
                            vec![0.0; t * d],
                        ];
                        for i in 0..t {
                            let dp: Vec<f64> = (0..t)
                                .map(|j| (0..d).map(|c| at(&g, i, c) * at(&v, j, c)).sum())
                                .collect();
                            let dot: f64 = (0..t).map(|j| dp[j] * probs[i * t + j]).sum();
                            for j in 0..t {
                                ds[i * t + j] = probs[i * t + j] * (dp[j] - dot) * scale;
                            }
                        }
                        for i in 0..t {
                            for c in 0..d {
                                let sum = |f: &dyn Fn(usize) -> f64| (0..t).map(f).sum::<f64>();
                                want[0][i * d + c] = sum(&|j| probs[i * t + j] * at(&v, j, c));
                                want[1][i * d + c] = sum(&|j| ds[i * t + j] * at(&k, j, c));
                                want[2][i * d + c] = sum(&|j| ds[j * t + i] * at(&q, j, c));
                                want[3][i * d + c] = sum(&|j| probs[j * t + i] * at(&g, j, c));
                            }
                        }
                        let what = format!("T={t} d={d} causal={causal} needs={needs:?}");
                        let close = |name: &str, got: &[f32], want: &[f64]| {
                            for (index, (a, b)) in got.iter().zip(want).enumerate() {
                                let diff = (*a as f64 - b).abs();
                                assert!(diff < 1e-4, "{what} {name}[{index}]: {a} against {b}");
                            }
                        };
                        close("P", &p, &probs);
                        close("y", &out, &want[0]);
                        for ((name, got), (need, want)) in ["∂q", "∂k", "∂v"]
                            .iter()
                            .zip([&dq, &dk, &dv])
                            .zip(needs.iter().zip(&want[1..]))
                        {
                            if *need {
                                close(name, got, want);
                            } else {
                                assert!(got.iter().all(|x| x.is_nan()), "{what}: {name} written");
                            }
                        }
                        if causal {
                            for i in 0..t {
                                for j in i + 1..t {
                                    assert_eq!(p[i * t + j].to_bits(), 0, "{what}: P[{i}][{j}]");
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn sixteen_lane_exp_has_the_scalar_bits() {
        if !super::takes(16, 16, 16) {
            return;
        }
        use std::arch::x86_64::*;
        let xs: Vec<f32> = (0..4096)
            .map(|i| (i as f32 - 2048.0) * 0.047)
            .chain([f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -1e30, 1e30, 0.0])
            .chain(std::iter::repeat_n(0.5, 10))
            .collect();
        for chunk in xs.chunks_exact(16) {
            let mut got = [0.0f32; 16];
            // SAFETY: takes() checked AVX-512F.
            unsafe {
                _mm512_storeu_ps(
                    got.as_mut_ptr(),
                    super::exp(_mm512_loadu_ps(chunk.as_ptr())),
                )
            };
            for (x, y) in chunk.iter().zip(got) {
                let want = crate::element::exp_f32_fused(*x);
                assert!(
                    want.to_bits() == y.to_bits() || (want.is_nan() && y.is_nan()),
                    "exp({x}): {y} vs {want}"
                );
            }
        }
    }
}
