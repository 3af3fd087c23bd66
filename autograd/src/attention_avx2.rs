//! One attention head of a short sequence (self-attention over T ≤ 256 positions, heads of
//! 16, 32, 48 or 64 channels) in f32 on AVX2, from 6 × 16 register tiles.
//!
//! The AVX2 counterpart of [`crate::attention_avx512`]. At nanogpt-cpu's shape (T = 64,
//! D = 32) a head's six products are a few thousand multiply-adds each, and the general path
//! (a GEMM call per product, packing what it reads, the whole 64 × 64 score square at once)
//! spent more on the calls than on the arithmetic. Here every product is one `tile`
//! function — 6 rows × 16 columns, twelve 8-lane accumulators, the shape of
//! [`crate::sgemm_avx2`]'s kernel — reading its operands in place:
//!
//! ```text
//! forward, per tile of 6 query rows         backward
//!   S  = q·kᵀ·scale  16 keys at a time       ∂v = Pᵀ·∂O   per 6 keys, over the queries that see them
//!   P  = softmax(S, masked)  (the general    per tile of 6 query rows:
//!        path's row loop, on the stored row)   ∂P = ∂O·vᵀ   16 keys at a time
//!   O  = P·v         over the keys the         ∂S = P ⊙ (∂P − rowsum(∂P ⊙ P)) · scale
//!                    tile sees                 ∂q = ∂S·k    over the keys the tile sees
//!                                           ∂k = ∂Sᵀ·q   per 6 keys, as ∂v
//! ```
//! A causal tile stops at the last key its last row sees (scores rounded up to 16 keys), so
//! most of the masked triangle is skipped even at T = 64, where the general path computes it
//! whole (its blocks only pay from T = 128). Sixteen registers do not hold a row of 64 scores
//! (AVX-512's tiles keep them), so scores and ∂P go to the row in memory, which stays in L1.
//! The ∂S rows are the general path's own function ([`crate::ops::attention`]'s
//! `score_gradient_row`) compiled wide; the softmax rows are its `softmax_masked_row` in
//! intrinsics, a tile's rows pass by pass ([`softmax_rows`]), with the same bits.
//!
//! Each accumulator adds its steps in order from zero, as the GEMM kernels do, and no product
//! here is deeper than the kernel's 256-step k block ([`LONGEST`]), so for finite inputs the
//! results are the bits of the general path (the tiles skip products with masked zeros of P
//! that the general path computes, so an infinite or NaN input can differ there).

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

#[cfg(target_arch = "x86_64")]
use crate::attention_avx512::{with_contiguous, with_transposed_by, Head, Rows, RowsMut};

/// Longest sequence taken: the general path's products sum at most 256 steps in one chain
/// (the AVX2 kernel's k block), so up to here the tiles' single chains give its bits.
pub const LONGEST: usize = 256;

/// Rows of a register tile (6 rows × 2 vectors of 8 lanes = 12 accumulators).
const ROWS: usize = 6;

/// Columns of a register tile.
const COLUMNS: usize = 16;

/// Whether [`forward`] and [`backward`] take a head of `d` channels over `tq` queries and `tk`
/// keys: self-attention (`tq == tk`) of at most [`LONGEST`] positions, `d` a multiple of 16 up
/// to 64, where [`crate::sgemm_avx2`]'s kernels run (an AVX2 CPU without AVX-512, not
/// switched off with `TAPELORA_GEMM=matrixmultiply`).
pub fn takes(tq: usize, tk: usize, d: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        tq == tk
            && (1..=LONGEST).contains(&tk)
            && d.is_multiple_of(16)
            && (16..=64).contains(&d)
            && crate::sgemm_avx2::available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (tq, tk, d);
        false
    }
}

/// One head's scaled dot-product attention forward over `t` positions of `d` channels:
/// writes the probabilities `p` (`t × t`, row-major, zero where masked) and the output rows.
///
/// # Safety
/// [`takes`]`(t, t, d)` must hold; `q`, `k`, `v` must hold `t` readable rows of `d` floats,
/// `p` `t·t` writable floats and `out` `t` writable rows of `d`, none overlapping the others.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
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
    with_transposed_by(k, t, d, transpose, |k_t| {
        with_contiguous(v, t, d, |v| {
            for i0 in (0..t).step_by(ROWS) {
                let rows = ROWS.min(t - i0);
                let keys = head.keys(i0 + rows);
                let probs = RowsMut {
                    ptr: p.add(i0 * t),
                    stride: t as isize,
                };
                scores(q.from(i0), rows, k_t, d, probs, (keys, t), scale);
                softmax_rows(p, t, i0, rows, head);
                let probs = Rows {
                    ptr: probs.ptr,
                    stride: t as isize,
                };
                weighted(probs, 1, v, keys, rows, out.from(i0), d);
                flops += 2 * rows * (t.min(keys.next_multiple_of(COLUMNS)) + keys) * d;
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
#[target_feature(enable = "avx2,fma")]
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
    let mut flops = 0;
    // ∂v = Pᵀ·∂O, and at the end ∂k = ∂Sᵀ·q: per 6 keys, the queries that see them.
    let transposed_product = |m: *const f32, x: Rows, out: RowsMut, flops: &mut usize| {
        for j0 in (0..t).step_by(ROWS) {
            let rows = ROWS.min(t - j0);
            let first = if causal { j0 } else { 0 };
            let columns = Rows {
                ptr: m.add(first * t + j0),
                stride: 1,
            };
            weighted(
                columns,
                t as isize,
                x.from(first),
                t - first,
                rows,
                out.from(j0),
                d,
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
    let stride = t.next_multiple_of(COLUMNS);
    let mut dp = [0.0f32; ROWS * LONGEST];
    let dp_rows = RowsMut {
        ptr: dp.as_mut_ptr(),
        stride: stride as isize,
    };
    with_transposed_by(v, t, d, transpose, |v_t| {
        with_contiguous(k, t, d, |k| {
            for i0 in (0..t).step_by(ROWS) {
                let rows = ROWS.min(t - i0);
                let keys = head.keys(i0 + rows);
                scores(g.from(i0), rows, v_t, d, dp_rows, (keys, t), 1.0);
                crate::simd::vectorized(
                    #[inline(always)]
                    || {
                        for r in 0..rows {
                            let i = i0 + r;
                            let seen = crate::ops::attention::row_span(head.visible(i), t);
                            crate::ops::attention::score_gradient_row(
                                std::slice::from_raw_parts_mut(p.add(i * t), seen),
                                std::slice::from_raw_parts(dp_rows.ptr.add(r * stride), seen),
                                scale,
                            );
                        }
                    },
                );
                flops += 2 * rows * t.min(keys.next_multiple_of(COLUMNS)) * d;
                if let Some(dq) = dq {
                    let ds = Rows {
                        ptr: p.add(i0 * t),
                        stride: t as isize,
                    };
                    weighted(ds, 1, k, keys, rows, dq.from(i0), d);
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

/// `acc[r] = Σ_s m(r, s) · y(s)[0..16]` for `s` in `0..steps`, where row `r` of `m` starts
/// at `m.row(r)` (rows past `rows` repeat the last one) and steps `m_step` apart, and
/// `y(s) = y.row(s)`. Each accumulator adds its steps in order from zero, as the GEMM kernels
/// do.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile(m: Rows, m_step: isize, rows: usize, y: Rows, steps: usize) -> [[__m256; 2]; ROWS] {
    let starts: [*const f32; ROWS] = std::array::from_fn(|r| m.row(r.min(rows - 1)));
    let mut acc = [[_mm256_setzero_ps(); 2]; ROWS];
    let mut y_row = y.ptr;
    for s in 0..steps as isize {
        let (y0, y1) = (_mm256_loadu_ps(y_row), _mm256_loadu_ps(y_row.add(8)));
        for r in 0..ROWS {
            let a = _mm256_set1_ps(*starts[r].offset(s * m_step));
            acc[r][0] = _mm256_fmadd_ps(a, y0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(a, y1, acc[r][1]);
        }
        // Wrapping: after the last step the row pointer may point past the buffer (unread).
        y_row = y_row.wrapping_offset(y.stride);
    }
    acc
}

/// `out[r] = Σ_s m(r, s)·x(s)` for `rows` rows of `d` channels, tile by tile.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn weighted(
    m: Rows,
    m_step: isize,
    x: Rows,
    steps: usize,
    rows: usize,
    out: RowsMut,
    d: usize,
) {
    for r0 in (0..rows).step_by(ROWS) {
        let (m, n, out) = (m.from(r0), (rows - r0).min(ROWS), out.from(r0));
        for c0 in (0..d).step_by(COLUMNS) {
            let acc = tile(m, m_step, n, x.shifted(c0), steps);
            for (r, [low, high]) in acc.into_iter().enumerate().take(n) {
                let row = out.ptr.offset(r as isize * out.stride).add(c0);
                _mm256_storeu_ps(row, low);
                _mm256_storeu_ps(row.add(8), high);
            }
        }
    }
}

/// Scaled scores (or ∂P, with `scale` 1) of `rows` rows against the first `keys` columns of
/// `k_t`, 16 at a time, written into `out`'s rows: whole 16-column groups up to `keys`, never
/// past column `t`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn scores(
    a: Rows,
    rows: usize,
    k_t: Rows,
    d: usize,
    out: RowsMut,
    (keys, t): (usize, usize),
    scale: f32,
) {
    let scale = _mm256_set1_ps(scale);
    for j0 in (0..keys).step_by(COLUMNS) {
        let acc = tile(a, 1, rows, k_t.shifted(j0), d);
        for (r, halves) in acc.iter().enumerate().take(rows) {
            let row = out.ptr.offset(r as isize * out.stride).add(j0);
            for (h, x) in halves.iter().enumerate() {
                let lanes = (t - j0).saturating_sub(8 * h).min(8);
                store_first(row.add(8 * h), _mm256_mul_ps(scale, *x), lanes);
            }
        }
    }
}

/// Softmax of each row of a tile in place — row `i0 + r` of `t` entries at `p + (i0 + r)·t`,
/// its first `visible(i0 + r)` entries visible, the rest set to 0 — with the bits of
/// [`crate::ops::attention`]'s `softmax_masked_row` (the same exponential, step for step, and
/// the same sixteen lane sums combined by [`crate::simd::sum_lanes`]), in intrinsics.
///
/// Each pass (maxima, exponentials and sums, scaling) runs over all the tile's rows before
/// the next: a row's passes wait on each other (a horizontal maximum, then each
/// exponential's chain of twenty dependent steps, then a horizontal sum and a division), and
/// one row at a time left the core waiting on them. A T = 64 causal head's rows on one
/// thread: 3.1–3.2 µs pass by pass, 3.9–4.4 µs row by row, 4.7–4.9 µs for the general path's
/// function compiled wide.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_rows(p: *mut f32, t: usize, i0: usize, rows: usize, head: Head) {
    if !t.is_multiple_of(16) {
        // Rows ending in a scalar tail: the general path's function, compiled wide.
        for i in i0..i0 + rows {
            let row = std::slice::from_raw_parts_mut(p.add(i * t), t);
            let span = crate::ops::attention::row_span(head.visible(i), t);
            crate::ops::attention::softmax_masked_row(&mut row[..span], head.visible(i));
            row[span..].fill(0.0);
        }
        return;
    }
    let index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let minus_infinity = _mm256_set1_ps(f32::NEG_INFINITY);
    // Per row: its start, its chunks of 16 with a visible entry, and the last one's mask.
    let shape = |r: usize| {
        let visible = head.visible(i0 + r);
        let chunks = visible.div_ceil(16).min(t / 16);
        let cut = match visible % 16 {
            0 => 16,
            cut => cut as i32,
        };
        let edge = [0, 8].map(|from| {
            _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(cut - from), index))
        });
        (p.add((i0 + r) * t), chunks, edge)
    };
    let mut maxima = [0.0f32; ROWS];
    for (r, max_of_row) in maxima.iter_mut().enumerate().take(rows) {
        let (row, chunks, edge) = shape(r);
        let mut max = [minus_infinity; 2];
        for c in 0..chunks {
            for h in 0..2 {
                let mut x = _mm256_loadu_ps(row.add(16 * c + 8 * h));
                if c + 1 == chunks {
                    x = _mm256_blendv_ps(minus_infinity, x, edge[h]);
                }
                max[h] = _mm256_max_ps(max[h], x);
            }
        }
        *max_of_row = crate::simd::max_lanes(lanes(max));
    }
    let mut inverses = [0.0f32; ROWS];
    for (r, inverse) in inverses.iter_mut().enumerate().take(rows) {
        let (row, chunks, edge) = shape(r);
        let max = _mm256_set1_ps(maxima[r]);
        let mut sum = [_mm256_setzero_ps(); 2];
        for c in 0..chunks {
            let at = row.add(16 * c);
            let e = crate::simd::exp_avx2(
                [0, 8].map(|h| _mm256_sub_ps(_mm256_loadu_ps(at.add(h)), max)),
            );
            for (h, mut e) in e.into_iter().enumerate() {
                if c + 1 == chunks {
                    e = _mm256_and_ps(e, edge[h]);
                }
                _mm256_storeu_ps(at.add(8 * h), e);
                sum[h] = _mm256_add_ps(sum[h], e);
            }
        }
        *inverse = 1.0 / crate::simd::sum_lanes(lanes(sum));
    }
    for (r, &inverse) in inverses.iter().enumerate().take(rows) {
        let (row, chunks, _) = shape(r);
        let inverse = _mm256_set1_ps(inverse);
        for c in 0..chunks {
            for h in 0..2 {
                let at = row.add(16 * c + 8 * h);
                _mm256_storeu_ps(at, _mm256_mul_ps(_mm256_loadu_ps(at), inverse));
            }
        }
        for c in chunks..t / 16 {
            _mm256_storeu_ps(row.add(16 * c), _mm256_setzero_ps());
            _mm256_storeu_ps(row.add(16 * c + 8), _mm256_setzero_ps());
        }
    }
}

/// Two vectors' sixteen lanes, in order.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn lanes(x: [__m256; 2]) -> [f32; 16] {
    let mut lanes = [0.0f32; 16];
    _mm256_storeu_ps(lanes.as_mut_ptr(), x[0]);
    _mm256_storeu_ps(lanes.as_mut_ptr().add(8), x[1]);
    lanes
}

/// Stores the first `lanes` lanes of `x` at `ptr`.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn store_first(ptr: *mut f32, x: __m256, lanes: usize) {
    if lanes >= 8 {
        _mm256_storeu_ps(ptr, x);
    } else if lanes > 0 {
        let index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(lanes as i32), index);
        _mm256_maskstore_ps(ptr, mask, x);
    }
}

/// `x`'s first `t` rows of `d` channels as `out[c][j]`, zero for `t ≤ j < stride` (what the
/// tiles read); 8 × 8 blocks transposed in registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn transpose(x: Rows, t: usize, d: usize, out: *mut f32, stride: usize) {
    for j0 in (0..stride).step_by(8) {
        for c0 in (0..d).step_by(8) {
            let block: [__m256; 8] = std::array::from_fn(|j| {
                if j0 + j < t {
                    _mm256_loadu_ps(x.row(j0 + j).add(c0))
                } else {
                    _mm256_setzero_ps()
                }
            });
            for (c, column) in crate::sgemm_avx2::transpose8(block).iter().enumerate() {
                _mm256_storeu_ps(out.add((c0 + c) * stride + j0), *column);
            }
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use crate::attention_avx512::Head;

    #[test]
    fn eight_lane_exp_has_the_scalar_bits() {
        if !super::takes(16, 16, 16) {
            return;
        }
        use std::arch::x86_64::*;
        let xs: Vec<f32> = (0..4096)
            .map(|i| (i as f32 - 2048.0) * 0.047)
            .chain([
                f32::NAN,
                f32::INFINITY,
                f32::NEG_INFINITY,
                -1e30,
                1e30,
                0.0,
                -0.0,
            ])
            .chain([
                -87.3,
                -87.4,
                88.3,
                88.4,
                1e-30,
                -1e-30,
                f32::MIN_POSITIVE,
                -200.0,
                200.0,
            ])
            .collect();
        for chunk in xs.chunks_exact(16) {
            let mut got = [0.0f32; 16];
            // SAFETY: takes() checked AVX2 and FMA.
            unsafe {
                let e =
                    crate::simd::exp_avx2([0, 8].map(|h| _mm256_loadu_ps(chunk.as_ptr().add(h))));
                _mm256_storeu_ps(got.as_mut_ptr(), e[0]);
                _mm256_storeu_ps(got.as_mut_ptr().add(8), e[1]);
            }
            for (x, y) in chunk.iter().zip(got) {
                let want = crate::element::exp_f32_fused(*x);
                assert!(
                    want.to_bits() == y.to_bits() || (want.is_nan() && y.is_nan()),
                    "exp({x}): {y} vs {want}"
                );
            }
        }
    }

    #[test]
    fn softmax_rows_give_the_general_rows_bits() {
        // Every visible length of rows of 16 … 80 entries (and 37, the scalar tail's
        // fallback), causal and not, tiles of 1 … 6 rows, against the general path's row
        // function; rows holding an infinity or a NaN come out all NaN from both.
        if !super::takes(16, 16, 16) {
            return;
        }
        for t in [16, 32, 37, 64, 80] {
            for causal in [true, false] {
                let head = Head {
                    t,
                    causal,
                    scale: 1.0,
                };
                for rows in 1..=super::ROWS {
                    for i0 in 0..t.saturating_sub(rows - 1) {
                        let mut seed = (t * 1000 + i0 * 7 + rows) as u64;
                        let mut scores: Vec<f32> = (0..rows * t)
                            .map(|_| {
                                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                                ((seed >> 40) as f32 / (1 << 24) as f32 - 0.5) * 40.0
                            })
                            .collect();
                        if i0 % 5 == 1 {
                            scores[0] = [f32::INFINITY, f32::NAN, f32::NEG_INFINITY][i0 % 3];
                        }
                        let mut want = scores.clone();
                        for (r, row) in want.chunks_mut(t).enumerate() {
                            let visible = head.visible(i0 + r);
                            let span = crate::ops::attention::row_span(visible, t);
                            crate::ops::attention::softmax_masked_row(&mut row[..span], visible);
                            row[span..].fill(0.0);
                        }
                        // The rows sit at their place in a t × t matrix, as in the kernel.
                        let mut matrix = vec![f32::NAN; t * t];
                        matrix[i0 * t..(i0 + rows) * t].copy_from_slice(&scores);
                        // SAFETY: takes() checked AVX2 and FMA; the rows are in the matrix.
                        unsafe { super::softmax_rows(matrix.as_mut_ptr(), t, i0, rows, head) };
                        let got = &matrix[i0 * t..(i0 + rows) * t];
                        for (r, (got, want)) in got.chunks(t).zip(want.chunks(t)).enumerate() {
                            let all_nan = |row: &[f32]| row.iter().all(|x| x.is_nan());
                            let same = got
                                .iter()
                                .zip(want)
                                .all(|(a, b)| a.to_bits() == b.to_bits())
                                || (all_nan(got) && all_nan(want));
                            assert!(
                                same,
                                "t={t} causal={causal} row {}: {got:?} vs {want:?}",
                                i0 + r
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn heads_at_the_ends_of_their_buffers_match_an_f64_reference() {
        // The AVX-512 module's check: T = 1 … 256 across every tile and 16-key boundary,
        // exactly sized buffers prefilled with NaN, gradient subsets, causal or not.
        if super::takes(16, 16, 16) {
            use crate::attention_avx512::tests::{
                check_heads_at_the_ends_of_their_buffers, Kernel,
            };
            check_heads_at_the_ends_of_their_buffers(Kernel {
                forward: super::forward,
                backward: super::backward,
                longest: super::LONGEST,
            });
        }
    }
}
