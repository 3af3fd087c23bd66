//! Wider vector code for the elementwise and row-wise loops, chosen at run time.
//!
//! The crate is built for baseline x86-64 (SSE2, 4 lanes of f32), so a portable binary runs
//! anywhere. [`vectorized`] runs a closure inside a function compiled with AVX-512 (16 lanes)
//! or AVX2 (8 lanes) enabled when the CPU has them; the closure's loops are inlined into that
//! function and vectorised at its width. The same operations run in the same order in every
//! build — Rust never contracts `a * b + c` on its own, and the explicit fused multiply-adds
//! ([`Float::exp_fused`]) are exactly rounded in every build (libm's `fmaf` in the baseline
//! one) — so results do not depend on which build ran. The wide builds enable FMA (every
//! AVX2 CPU we detect as such has it).
//!
//! The reductions here ([`sum_map`], [`sum_zip`], [`dot`]) keep 4 × 16 partial sums, which
//! is what lets a reduction loop vectorise (and not wait on each addition) without letting
//! the compiler reorder floating-point math.

use std::sync::OnceLock;

use crate::Float;

/// The widest instruction set the elementwise loops may use on this CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Width {
    /// Baseline SSE2 (or a non-x86 target).
    Baseline,
    /// AVX2: 8 lanes of f32.
    Avx2,
    /// AVX-512 F/BW/DQ/VL: 16 lanes of f32.
    Avx512,
}

/// The width detected once for this process. `TAPELORA_SIMD=baseline|avx2` caps it, for timing
/// the narrower builds; that every build gives the same bits is tested within one process.
pub fn width() -> Width {
    static WIDTH: OnceLock<Width> = OnceLock::new();
    *WIDTH.get_or_init(|| {
        let detected = detect();
        match std::env::var("TAPELORA_SIMD").as_deref() {
            Ok("baseline") => Width::Baseline,
            Ok("avx2") if detected != Width::Baseline => Width::Avx2,
            _ => detected,
        }
    })
}

fn detect() -> Width {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512dq")
            && std::arch::is_x86_feature_detected!("avx512vl")
        {
            return Width::Avx512;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return Width::Avx2;
        }
    }
    Width::Baseline
}

/// Runs `f` compiled at the widest vector width this CPU supports (see the module docs).
/// `f` should hold the whole hot loop and be marked `#[inline(always)]`: only code inlined
/// into the wide build is compiled wide, and LLVM declines to inline a large closure on its own.
#[inline(always)]
pub fn vectorized<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
        unsafe fn avx512<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        match width() {
            // SAFETY: `width()` reported these features present on this CPU.
            Width::Avx512 => return unsafe { avx512(f) },
            Width::Avx2 => return unsafe { avx2(f) },
            Width::Baseline => {}
        }
    }
    f()
}

/// `Σ f(a[i])` with sixty-four independent accumulators (four rows of sixteen lanes), so the
/// loop vectorises and its additions do not wait on each other (one running sum would
/// serialise every addition; one vector of lanes would wait on the add latency). The partial
/// sums are combined in a fixed order, so the result is the same in every build.
#[inline(always)]
pub fn sum_map<T: Float>(a: &[T], f: impl Fn(T) -> T) -> T {
    let mut acc = [[T::zero(); 16]; 4];
    let (a64, rest) = a.as_chunks::<64>();
    for x in a64 {
        for (r, acc) in acc.iter_mut().enumerate() {
            for l in 0..16 {
                acc[l] += f(x[16 * r + l]);
            }
        }
    }
    let (a16, tail) = rest.as_chunks::<16>();
    for x in a16 {
        for l in 0..16 {
            acc[0][l] += f(x[l]);
        }
    }
    tail.iter().fold(combine(acc), |s, &x| s + f(x))
}

/// The largest element (−∞ for an empty slice; NaNs are skipped, as by `f32::max`), with
/// sixteen lanes so the loop vectorises. A maximum does not depend on the order it is taken in.
#[inline(always)]
pub fn max_of<T: Float>(a: &[T]) -> T {
    let mut lanes = [T::neg_infinity(); 16];
    let (a16, tail) = a.as_chunks::<16>();
    for x in a16 {
        for l in 0..16 {
            lanes[l] = lanes[l].max(x[l]);
        }
    }
    tail.iter().fold(max_lanes(lanes), |m, &v| m.max(v))
}

/// `Σ f(a[i], b[i])` over equal-length slices, like [`sum_map`].
#[inline(always)]
pub fn sum_zip<T: Float>(a: &[T], b: &[T], f: impl Fn(T, T) -> T) -> T {
    assert_eq!(a.len(), b.len(), "sum_zip: slices of different lengths");
    let mut acc = [[T::zero(); 16]; 4];
    let ((a64, a_rest), (b64, b_rest)) = (a.as_chunks::<64>(), b.as_chunks::<64>());
    for (x, y) in a64.iter().zip(b64) {
        for (r, acc) in acc.iter_mut().enumerate() {
            for l in 0..16 {
                acc[l] += f(x[16 * r + l], y[16 * r + l]);
            }
        }
    }
    let ((a16, a_tail), (b16, b_tail)) = (a_rest.as_chunks::<16>(), b_rest.as_chunks::<16>());
    for (x, y) in a16.iter().zip(b16) {
        for l in 0..16 {
            acc[0][l] += f(x[l], y[l]);
        }
    }
    a_tail
        .iter()
        .zip(b_tail)
        .fold(combine(acc), |s, (&x, &y)| s + f(x, y))
}

/// `a · b` (see [`sum_zip`] and [`Float::dot`]).
#[inline(always)]
pub fn dot<T: Float>(a: &[T], b: &[T]) -> T {
    T::dot(a, b)
}

/// `a · b` summed in two rows of sixteen lanes (lane `l` of row `r` takes the products at
/// `i ≡ 16r + l (mod 32)`; a last whole 16 into row 0), the rows combined as by [`sum_zip`]
/// and the tail added in order: the definition [`Float::dot8`] computes eight of at once.
/// Two rows rather than [`dot`]'s four, so that eight dots' sums fit in the registers.
#[inline(always)]
pub fn dot_two_rows<T: Float>(a: &[T], b: &[T]) -> T {
    assert_eq!(a.len(), b.len(), "dot: slices of different lengths");
    let mut acc = [[T::zero(); 16]; 4];
    let ((a32, a_rest), (b32, b_rest)) = (a.as_chunks::<32>(), b.as_chunks::<32>());
    for (x, y) in a32.iter().zip(b32) {
        for (r, acc) in acc.iter_mut().take(2).enumerate() {
            for l in 0..16 {
                acc[l] += x[16 * r + l] * y[16 * r + l];
            }
        }
    }
    let ((a16, a_tail), (b16, b_tail)) = (a_rest.as_chunks::<16>(), b_rest.as_chunks::<16>());
    for (x, y) in a16.iter().zip(b16) {
        for l in 0..16 {
            acc[0][l] += x[l] * y[l];
        }
    }
    a_tail
        .iter()
        .zip(b_tail)
        .fold(combine(acc), |s, (&x, &y)| s + x * y)
}

/// [`dot_two_rows`] of `a` with eight slices at once, with the same bits as eight calls: `a`
/// is loaded once per step and the eight `b`s are read side by side.
///
/// # Safety
/// The CPU must support AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub unsafe fn dot8_avx512(a: &[f32], b: [&[f32]; 8]) -> [f32; 8] {
    use std::arch::x86_64::*;
    for b in b {
        assert_eq!(a.len(), b.len(), "dot8: slices of different lengths");
    }
    let pa = a.as_ptr();
    let pb = b.map(|b| b.as_ptr());
    let mut acc = [[_mm512_setzero_ps(); 2]; 8];
    let full32 = a.len() / 32 * 32;
    let mut i = 0;
    while i < full32 {
        for r in 0..2 {
            let x = _mm512_loadu_ps(pa.add(i + 16 * r));
            for (acc, pb) in acc.iter_mut().zip(pb) {
                let product = _mm512_mul_ps(x, _mm512_loadu_ps(pb.add(i + 16 * r)));
                acc[r] = _mm512_add_ps(acc[r], product);
            }
        }
        i += 32;
    }
    if a.len() - i >= 16 {
        let x = _mm512_loadu_ps(pa.add(i));
        for (acc, pb) in acc.iter_mut().zip(pb) {
            acc[0] = _mm512_add_ps(acc[0], _mm512_mul_ps(x, _mm512_loadu_ps(pb.add(i))));
        }
        i += 16;
    }
    let mut out = [0.0f32; 8];
    let zero = _mm512_setzero_ps();
    for ((out, acc), b) in out.iter_mut().zip(acc).zip(b) {
        *out = a[i..].iter().zip(&b[i..]).fold(
            combine_avx512([acc[0], acc[1], zero, zero]),
            |s, (&x, &y)| s + x * y,
        );
    }
    out
}

/// `Σ x`, reading `x` as several equal parts side by side ([`STREAMS`] with AVX-512,
/// `STREAMS_AVX2` (4) with AVX2): a probe of the memory's
/// streaming rate (one sequential stream per core reads markedly slower than several). Not
/// for results: the order of the additions is whatever is quickest.
pub fn sum_as_streams(x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if width() == Width::Avx512 {
        // SAFETY: the CPU has AVX-512F.
        return unsafe { sum_as_streams_avx512(x) };
    }
    #[cfg(target_arch = "x86_64")]
    if width() == Width::Avx2 {
        // SAFETY: the CPU has AVX2 (and AVX, which the loads need).
        return unsafe { sum_as_streams_avx2(x) };
    }
    // One running sum would wait on every addition and measure the adder, not the memory.
    let mut lanes = [0.0f32; 16];
    let (x16, tail) = x.as_chunks::<16>();
    for x in x16 {
        for l in 0..16 {
            lanes[l] += x[l];
        }
    }
    lanes.iter().sum::<f32>() + tail.iter().sum::<f32>()
}

/// Memory streams [`sum_as_streams`] reads at once with AVX-512.
pub const STREAMS: usize = 16;

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn sum_as_streams_avx512(x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let part = x.len() / STREAMS / 64 * 64;
    let p = x.as_ptr();
    let mut acc = [_mm512_setzero_ps(); STREAMS];
    for i in (0..part).step_by(64) {
        for (s, acc) in acc.iter_mut().enumerate() {
            let line = p.add(s * part + i);
            let pair = |o| {
                _mm512_add_ps(
                    _mm512_loadu_ps(line.add(o)),
                    _mm512_loadu_ps(line.add(o + 16)),
                )
            };
            *acc = _mm512_add_ps(*acc, _mm512_add_ps(pair(0), pair(32)));
        }
    }
    let total = acc
        .iter()
        .fold(_mm512_setzero_ps(), |t, &a| _mm512_add_ps(t, a));
    _mm512_reduce_add_ps(total) + x[STREAMS * part..].iter().sum::<f32>()
}

/// [`sum_as_streams`] with eight-lane vectors: [`STREAMS_AVX2`] parts, 64 floats (four cache
/// lines) of each per turn.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn sum_as_streams_avx2(x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let part = x.len() / STREAMS_AVX2 / 64 * 64;
    let p = x.as_ptr();
    let mut acc = [_mm256_setzero_ps(); STREAMS_AVX2];
    for i in (0..part).step_by(64) {
        for (s, acc) in acc.iter_mut().enumerate() {
            let line = p.add(s * part + i);
            let quad = |o| {
                _mm256_add_ps(
                    _mm256_add_ps(
                        _mm256_loadu_ps(line.add(o)),
                        _mm256_loadu_ps(line.add(o + 8)),
                    ),
                    _mm256_add_ps(
                        _mm256_loadu_ps(line.add(o + 16)),
                        _mm256_loadu_ps(line.add(o + 24)),
                    ),
                )
            };
            *acc = _mm256_add_ps(*acc, _mm256_add_ps(quad(0), quad(32)));
        }
    }
    let total = acc
        .iter()
        .fold(_mm256_setzero_ps(), |t, &a| _mm256_add_ps(t, a));
    let mut lanes = [0.0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), total);
    lanes.iter().sum::<f32>() + x[STREAMS_AVX2 * part..].iter().sum::<f32>()
}

/// Memory streams [`sum_as_streams`] reads at once on AVX2. On a Zen 3 core (AVX2 only) four
/// read at 1.06× the rate of eight, 1.1× that of two and 1.45× that of sixteen.
const STREAMS_AVX2: usize = 4;

/// `a · b` in portable code (see [`sum_zip`]).
#[inline(always)]
pub fn dot_lanes<T: Float>(a: &[T], b: &[T]) -> T {
    sum_zip(a, b, |x, y| x * y)
}

/// [`dot_lanes`] for f32 with four AVX-512 registers as the four rows of sixteen lanes: the
/// same multiplications and additions in the same order, so the same bits.
///
/// # Safety
/// The CPU must support AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub unsafe fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    assert_eq!(a.len(), b.len(), "dot: slices of different lengths");
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let product = |i: usize| _mm512_mul_ps(_mm512_loadu_ps(pa.add(i)), _mm512_loadu_ps(pb.add(i)));
    let mut acc = [_mm512_setzero_ps(); 4];
    let full64 = a.len() / 64 * 64;
    let mut i = 0;
    while i < full64 {
        for (r, acc) in acc.iter_mut().enumerate() {
            *acc = _mm512_add_ps(*acc, product(i + 16 * r));
        }
        i += 64;
    }
    let full16 = a.len() / 16 * 16;
    while i < full16 {
        acc[0] = _mm512_add_ps(acc[0], product(i));
        i += 16;
    }
    a[full16..]
        .iter()
        .zip(&b[full16..])
        .fold(combine_avx512(acc), |s, (&x, &y)| s + x * y)
}

/// [`combine`] on four AVX-512 accumulators in registers: the same additions in the same
/// order (lane-wise, then the upper eight lanes onto the lower, then neighbours, pairs and the
/// two halves), so the same bits, without the round trip through memory and sixty-odd scalar
/// additions, which cost a C = 128 row's dot product more than its multiplies.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn combine_avx512(acc: [std::arch::x86_64::__m512; 4]) -> f32 {
    use std::arch::x86_64::*;
    let lanes = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
    let upper = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(lanes)));
    sum_half(_mm256_add_ps(_mm512_castps512_ps256(lanes), upper))
}

/// [`sum_lanes`]' tree from its eight half sums on: neighbours, pairs, then the two halves.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx")]
unsafe fn sum_half(half: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    // Neighbours: [h0+h1, h1+h0, h2+h3, …]; addition commutes bit for bit.
    let pairs = _mm256_add_ps(half, _mm256_permute_ps::<0b10_11_00_01>(half));
    // (h0+h1)+(h2+h3) in lane 0, (h4+h5)+(h6+h7) in lane 4.
    let quads = _mm256_add_ps(pairs, _mm256_permute_ps::<0b01_00_11_10>(pairs));
    let (low, high) = (
        _mm256_castps256_ps128(quads),
        _mm256_extractf128_ps::<1>(quads),
    );
    _mm_cvtss_f32(_mm_add_ss(low, high))
}

/// [`crate::element::exp_f32_fused`] on `N` vectors of eight lanes, operation for operation
/// (the same bits), each step taken for every vector before the next: the vectors' chains
/// of dependent steps then run side by side.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
pub unsafe fn exp_avx2<const N: usize>(
    x: [std::arch::x86_64::__m256; N],
) -> [std::arch::x86_64::__m256; N] {
    use crate::element::{EXP_LN2_HI, EXP_LN2_LO, EXP_ROUND as ROUND};
    use crate::element::{EXP_TAYLOR_LEADING, EXP_TAYLOR_REST};
    use std::arch::x86_64::*;
    let (low, high) = (_mm256_set1_ps(-87.3), _mm256_set1_ps(88.3));
    let clamped = x.map(|x| _mm256_min_ps(_mm256_max_ps(x, low), high));
    let (log2e, round) = (
        _mm256_set1_ps(std::f32::consts::LOG2_E),
        _mm256_set1_ps(ROUND),
    );
    let shifted = clamped.map(|x| _mm256_fmadd_ps(x, log2e, round));
    let round_bits = _mm256_set1_epi32(ROUND.to_bits() as i32);
    let n_int = shifted.map(|s| _mm256_sub_epi32(_mm256_castps_si256(s), round_bits));
    let n = shifted.map(|s| _mm256_sub_ps(s, round));
    let (ln2_high, ln2_low) = (_mm256_set1_ps(EXP_LN2_HI), _mm256_set1_ps(EXP_LN2_LO));
    let g: [__m256; N] = std::array::from_fn(|i| _mm256_fnmadd_ps(n[i], ln2_high, clamped[i]));
    let g: [__m256; N] = std::array::from_fn(|i| _mm256_fnmadd_ps(n[i], ln2_low, g[i]));
    let mut p = [_mm256_set1_ps(EXP_TAYLOR_LEADING); N];
    for coefficient in EXP_TAYLOR_REST {
        let coefficient = _mm256_set1_ps(coefficient);
        p = std::array::from_fn(|i| _mm256_fmadd_ps(p[i], g[i], coefficient));
    }
    let bias = _mm256_set1_epi32(127);
    std::array::from_fn(|i| {
        let scale = _mm256_slli_epi32::<23>(_mm256_add_epi32(n_int[i], bias));
        let y = _mm256_mul_ps(p[i], _mm256_castsi256_ps(scale));
        _mm256_blendv_ps(y, x[i], _mm256_cmp_ps::<_CMP_UNORD_Q>(x[i], x[i]))
    })
}

/// [`dot_lanes`] with eight-lane AVX2 registers: sixteen-lane row `r` is registers `2r` (lanes
/// 0–7) and `2r + 1` (lanes 8–15); the same multiplications and additions in the same order,
/// so the same bits. Without it `Float::dot` and `Float::dot8` ran the portable code, which
/// outside a [`vectorized`] closure is built for baseline SSE: the tied lm_head of a decoding
/// step read its weights at 15.9 GB/s against the row GEMV's 25.8 (docs/BENCHMARKS.md,
/// session 26).
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_rows_avx2(a, b)
}

/// [`Float::dot8`] on AVX2: three, three and two of the dots side by side
/// (`dots_two_rows_avx2`), each with the bits of its own [`dot_two_rows`] (eight at once
/// would take 32 accumulators, twice the registers). The GEMV itself takes three at a time
/// on AVX2 ([`dot3_avx2`]): three columns read in step streamed GPT-2's tied lm_head at
/// 1.26–1.33× the rate of one column after another on a Zen 3 core.
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub unsafe fn dot8_avx2(a: &[f32], b: [&[f32]; 8]) -> [f32; 8] {
    let [b0, b1, b2, b3, b4, b5, b6, b7] = b;
    let [d0, d1, d2] = dots_two_rows_avx2(a, [b0, b1, b2]);
    let [d3, d4, d5] = dots_two_rows_avx2(a, [b3, b4, b5]);
    let [d6, d7] = dots_two_rows_avx2(a, [b6, b7]);
    [d0, d1, d2, d3, d4, d5, d6, d7]
}

/// [`Float::dot3`] on AVX2 (`dots_two_rows_avx2`): three dots side by side, each with the
/// bits of its own [`dot_two_rows`].
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub unsafe fn dot3_avx2(a: &[f32], b: [&[f32]; 3]) -> [f32; 3] {
    dots_two_rows_avx2(a, b)
}

/// `N` of [`dot_two_rows`] at once in AVX2 registers (four per dot: sixteen-lane row `r` is
/// registers `2r` and `2r + 1`), `a` loaded once per step for all of them.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn dots_two_rows_avx2<const N: usize>(a: &[f32], b: [&[f32]; N]) -> [f32; N] {
    use std::arch::x86_64::*;
    for b in b {
        assert_eq!(a.len(), b.len(), "dot: slices of different lengths");
    }
    let pa = a.as_ptr();
    let pb = b.map(|b| b.as_ptr());
    let mut acc = [[_mm256_setzero_ps(); 4]; N];
    let full32 = a.len() / 32 * 32;
    let mut i = 0;
    while i < full32 {
        for v in 0..4 {
            let x = _mm256_loadu_ps(pa.add(i + 8 * v));
            for (acc, pb) in acc.iter_mut().zip(pb) {
                let product = _mm256_mul_ps(x, _mm256_loadu_ps(pb.add(i + 8 * v)));
                acc[v] = _mm256_add_ps(acc[v], product);
            }
        }
        i += 32;
    }
    if a.len() - i >= 16 {
        for v in 0..2 {
            let x = _mm256_loadu_ps(pa.add(i + 8 * v));
            for (acc, pb) in acc.iter_mut().zip(pb) {
                let product = _mm256_mul_ps(x, _mm256_loadu_ps(pb.add(i + 8 * v)));
                acc[v] = _mm256_add_ps(acc[v], product);
            }
        }
        i += 16;
    }
    let zero = _mm256_setzero_ps();
    std::array::from_fn(|c| {
        let [r0, r1, r2, r3] = acc[c];
        a[i..].iter().zip(&b[c][i..]).fold(
            combine_avx2([r0, r1, r2, r3, zero, zero, zero, zero]),
            |s, (&x, &y)| s + x * y,
        )
    })
}

/// `a · b` in four rows of sixteen lanes (two AVX2 registers each), a last whole 16 at a time
/// into row 0, the rows combined as by [`combine`] and the tail added in order.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn dot_rows_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    assert_eq!(a.len(), b.len(), "dot: slices of different lengths");
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let product = |i: usize| _mm256_mul_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)));
    let mut acc = [_mm256_setzero_ps(); 8];
    let full64 = a.len() / 64 * 64;
    let mut i = 0;
    while i < full64 {
        for (v, acc) in acc.iter_mut().enumerate() {
            *acc = _mm256_add_ps(*acc, product(i + 8 * v));
        }
        i += 64;
    }
    let full16 = a.len() / 16 * 16;
    while i < full16 {
        acc[0] = _mm256_add_ps(acc[0], product(i));
        acc[1] = _mm256_add_ps(acc[1], product(i + 8));
        i += 16;
    }
    a[full16..]
        .iter()
        .zip(&b[full16..])
        .fold(combine_avx2(acc), |s, (&x, &y)| s + x * y)
}

/// [`combine`] on AVX2 registers laid out as in [`dot_avx2`]: the same additions in the same
/// order, so the same bits.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn combine_avx2(acc: [std::arch::x86_64::__m256; 8]) -> f32 {
    use std::arch::x86_64::*;
    let low = _mm256_add_ps(_mm256_add_ps(acc[0], acc[2]), _mm256_add_ps(acc[4], acc[6]));
    let high = _mm256_add_ps(_mm256_add_ps(acc[1], acc[3]), _mm256_add_ps(acc[5], acc[7]));
    sum_half(_mm256_add_ps(low, high))
}

/// Adds the 4 × 16 partial sums in a fixed tree order.
#[inline(always)]
fn combine<T: Float>(acc: [[T; 16]; 4]) -> T {
    let mut lanes = [T::zero(); 16];
    for l in 0..16 {
        lanes[l] = (acc[0][l] + acc[1][l]) + (acc[2][l] + acc[3][l]);
    }
    sum_lanes(lanes)
}

/// The sum of sixteen lanes in a fixed tree order: the upper eight onto the lower, then
/// neighbours, pairs and the two halves. A tree, not a running sum: sixteen additions each
/// waiting on the one before cost a short row (a T = 64 softmax row) more than its exponentials.
#[inline(always)]
pub fn sum_lanes<T: Float>(lanes: [T; 16]) -> T {
    let mut half = [T::zero(); 8];
    for l in 0..8 {
        half[l] = lanes[l] + lanes[l + 8];
    }
    ((half[0] + half[1]) + (half[2] + half[3])) + ((half[4] + half[5]) + (half[6] + half[7]))
}

/// The largest of sixteen lanes, taken as a tree (see [`sum_lanes`]; a maximum's value does
/// not depend on the order).
#[inline(always)]
pub fn max_lanes<T: Float>(lanes: [T; 16]) -> T {
    let mut half = [T::zero(); 8];
    for l in 0..8 {
        half[l] = lanes[l].max(lanes[l + 8]);
    }
    let quad = [0, 1, 2, 3].map(|l| half[l].max(half[l + 4]));
    quad[0].max(quad[2]).max(quad[1].max(quad[3]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_build_computes_the_same_bits() {
        let x: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) * 0.037).collect();
        let f = |x: &[f32]| -> Vec<f32> {
            x.iter()
                .map(|&v| crate::ops::unary::gelu_scalar(v) * 1.5 + v * v)
                .collect()
        };
        let wide = vectorized(|| f(&x));
        assert_eq!(wide, f(&x));
    }

    #[test]
    fn lane_sums_match_plain_sums() {
        let a: Vec<f64> = (0..37).map(|i| i as f64 * 0.5 - 3.0).collect();
        let b: Vec<f64> = (0..37).map(|i| (i % 5) as f64).collect();
        let plain_dot: f64 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((dot(&a, &b) - plain_dot).abs() < 1e-12);
        // The f32 AVX-512 build gives the portable build's bits.
        let (a32, b32): (Vec<f32>, Vec<f32>) = (0..1000)
            .map(|i| ((i as f32 * 0.37).sin(), (i as f32 * 0.11).cos()))
            .unzip();
        for len in [0, 5, 16, 37, 64, 128, 200, 1000] {
            let (x, y) = (&a32[..len], &b32[..len]);
            assert_eq!(
                dot(x, y).to_bits(),
                dot_lanes(x, y).to_bits(),
                "length {len}"
            );
        }
        // Eight dots at once: each with the bits of its own portable call.
        for len in [0, 5, 16, 37, 48, 64, 100, 768] {
            let b: [&[f32]; 8] = std::array::from_fn(|i| &b32[i * 25..i * 25 + len]);
            let eight = f32::dot8(&a32[..len], b);
            for (got, b) in eight.iter().zip(b) {
                let want = dot_two_rows(&a32[..len], b);
                assert_eq!(got.to_bits(), want.to_bits(), "length {len}");
            }
        }
        // Every wide kernel this CPU has, whichever width the process chose.
        #[cfg(target_arch = "x86_64")]
        for len in [0, 5, 16, 37, 48, 64, 100, 128, 200, 768, 1000] {
            let (x, y) = (&a32[..len], &b32[..len]);
            let (four, two) = (dot_lanes(x, y).to_bits(), dot_two_rows(x, y).to_bits());
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: AVX2 is present.
                unsafe {
                    assert_eq!(dot_avx2(x, y).to_bits(), four, "length {len}");
                    let eight = dot8_avx2(x, [y; 8]);
                    assert!(eight.iter().all(|d| d.to_bits() == two), "length {len}");
                    let three = dot3_avx2(x, [y; 3]);
                    assert!(three.iter().all(|d| d.to_bits() == two), "length {len}");
                }
            }
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: AVX-512F is present.
                unsafe {
                    assert_eq!(dot_avx512(x, y).to_bits(), four, "length {len}");
                    let eight = dot8_avx512(x, [y; 8]);
                    assert!(eight.iter().all(|d| d.to_bits() == two), "length {len}");
                }
            }
        }
        let two_rows = dot_two_rows(&a, &b);
        assert!((two_rows - plain_dot).abs() < 1e-12);
        // The streaming probe adds everything once, whatever the length.
        for len in [0, 10, 1023, 1024, 5000] {
            let x: Vec<f32> = (0..len).map(|i| (i % 3) as f32).collect();
            assert_eq!(sum_as_streams(&x), x.iter().sum::<f32>(), "length {len}");
        }
        assert!((sum_map(&a, |x| x * x) - a.iter().map(|x| x * x).sum::<f64>()).abs() < 1e-12);
        assert_eq!(sum_map(&[] as &[f64], |x| x), 0.0);
        assert_eq!(max_of(&a), 15.0);
        assert_eq!(max_of(&[] as &[f64]), f64::NEG_INFINITY);
    }
}
