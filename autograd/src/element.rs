//! The element types a tape can hold.
//!
//! Training runs in `f32`; gradient checking runs the very same op code in `f64`, so every op is
//! generic over [`Float`]. The trait adds to `num_traits::Float` the two things the ops need that
//! the standard traits do not give: conversion from `f64` literals and a strided GEMM kernel
//! (matrixmultiply's `sgemm`/`dgemm`), so that transposed views never have to be copied.

use std::fmt::{Debug, Display};
use std::iter::Sum;
use std::ops::{AddAssign, DivAssign, MulAssign, SubAssign};

use ndarray::{LinalgScalar, ScalarOperand};

/// A floating-point element type usable on a [`Tape`](crate::Tape): `f32` or `f64`.
pub trait Float:
    num_traits::Float
    + LinalgScalar
    + ScalarOperand
    + AddAssign
    + SubAssign
    + MulAssign
    + DivAssign
    + Sum
    + Default
    + Debug
    + Display
    + Send
    + Sync
    + 'static
{
    /// `"f32"` or `"f64"`, for printing.
    const DTYPE: &'static str;

    /// Converts an `f64` constant (a literal, a statistic) to this type.
    fn from_f64(x: f64) -> Self;

    /// Widens to `f64` (norms and statistics are accumulated in `f64`).
    fn as_f64(self) -> f64;

    /// `eˣ` for activations (GELU, softmax, cross-entropy). For `f32` a branch-free polynomial
    /// that the compiler vectorises (libm's `expf` is a scalar call per element), within a
    /// couple of ulps; for `f64` (gradient checks) the exact `exp`.
    fn exp_fast(self) -> Self;

    /// [`Float::exp_fast`] with its polynomial in fused multiply-adds (one rounding per step
    /// instead of two; same accuracy, different low bits), ≈ 1.8× quicker where the CPU has
    /// FMA. Only for loops inside [`crate::simd::vectorized`], whose wide builds enable FMA:
    /// elsewhere on x86-64 each step would be a call to libm's `fmaf` (still the same bits,
    /// since a fused multiply-add is exactly rounded everywhere).
    #[inline(always)]
    fn exp_fused(self) -> Self {
        self.exp_fast()
    }

    /// `a · b` in 4 × 16 lanes combined in a fixed order ([`crate::simd::dot_lanes`]). `f32`
    /// uses AVX-512 instructions for the same operations where the CPU has them (the compiler
    /// does not vectorise the lane loop well on its own); the bits are the same either way.
    #[inline(always)]
    fn dot(a: &[Self], b: &[Self]) -> Self {
        crate::simd::dot_lanes(a, b)
    }

    /// `[a·b₀, a·b₁, a·b₂]`, each with the bits of [`crate::simd::dot_two_rows`], read side by
    /// side: what a GEMV against a transposed weight takes per pass on AVX2, where eight dots
    /// do not fit in the sixteen registers (see [`crate::gemm`]'s `dot_columns`).
    #[inline(always)]
    fn dot3(a: &[Self], b: [&[Self]; 3]) -> [Self; 3] {
        b.map(|b| crate::simd::dot_two_rows(a, b))
    }

    /// `[a·b₀, …, a·b₇]`, each with the bits of [`crate::simd::dot_two_rows`]: one pass
    /// reads the eight `b`s side by side (eight memory streams instead of one, which a GEMV
    /// against a transposed weight needs to approach the memory's streaming rate).
    #[inline(always)]
    fn dot8(a: &[Self], b: [&[Self]; 8]) -> [Self; 8] {
        b.map(|b| crate::simd::dot_two_rows(a, b))
    }

    /// `C ← α·A·B + β·C` on strided memory (matrixmultiply's kernel for this type).
    ///
    /// # Safety
    /// The pointers and strides must describe valid `m×k`, `k×n` and `m×n` matrices, and `c`
    /// must not alias `a` or `b`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm(
        m: usize,
        k: usize,
        n: usize,
        alpha: Self,
        a: *const Self,
        rsa: isize,
        csa: isize,
        b: *const Self,
        rsb: isize,
        csb: isize,
        beta: Self,
        c: *mut Self,
        rsc: isize,
        csc: isize,
    );

    /// [`Float::gemm`] on all of rayon's threads, if this type has a parallel kernel for
    /// products of this shape (f32 with AVX-512: [`crate::sgemm_avx512::sgemm_parallel`]; with
    /// AVX2 but not AVX-512: `sgemm_avx2::sgemm_parallel`);
    /// `false` (nothing done) otherwise, and the caller splits the product itself.
    ///
    /// # Safety
    /// As for [`Float::gemm`].
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm_parallel(
        _m: usize,
        _k: usize,
        _n: usize,
        _alpha: Self,
        _a: *const Self,
        _rsa: isize,
        _csa: isize,
        _b: *const Self,
        _rsb: isize,
        _csb: isize,
        _beta: Self,
        _c: *mut Self,
        _rsc: isize,
        _csc: isize,
    ) -> bool {
        false
    }

    /// `C ← A·B + bias` (bias added to every row) on the calling thread, C possibly
    /// uninitialised: the bias rows written first, then the product accumulated onto them
    /// (β = 1). f32 with AVX-512 or AVX2 adds the bias as its kernel stores the tiles instead
    /// ([`crate::sgemm_avx512::sgemm_bias`], `sgemm_avx2::sgemm_bias`), with the same bits.
    ///
    /// # Safety
    /// As for [`Float::gemm`], and `bias` must point at `n` values.
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm_bias(
        m: usize,
        k: usize,
        n: usize,
        a: *const Self,
        rsa: isize,
        csa: isize,
        b: *const Self,
        rsb: isize,
        csb: isize,
        bias: *const Self,
        c: *mut Self,
        rsc: isize,
        csc: isize,
    ) {
        gemm_bias_two_pass(m, k, n, a, rsa, csa, b, rsb, csb, bias, c, rsc, csc)
    }

    /// `C ← A·B + bias` (bias added to every row) on all of rayon's threads with the bias
    /// added as the kernel stores its tiles (f32 with AVX-512:
    /// [`crate::sgemm_avx512::sgemm_parallel_bias`]); `false` (nothing done) otherwise.
    ///
    /// # Safety
    /// As for [`Float::gemm`], and `bias` must point at `n` values.
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm_parallel_bias(
        _m: usize,
        _k: usize,
        _n: usize,
        _a: *const Self,
        _rsa: isize,
        _csa: isize,
        _b: *const Self,
        _rsb: isize,
        _csb: isize,
        _bias: *const Self,
        _c: *mut Self,
        _rsc: isize,
        _csc: isize,
    ) -> bool {
        false
    }

    /// [`crate::gemm::gemm_new_low_rank`]'s kernel: `C ← A·B + bias + Σ parts`, then the
    /// epilogue, with the low-rank parts summed inside the tiles and the epilogue (a residual
    /// added, or GELU) applied as they are stored (f32 with AVX-512:
    /// [`crate::sgemm_avx512::sgemm_low_rank`]; with AVX2, all but GELU:
    /// `sgemm_avx2::sgemm_low_rank`), in `threads` fixed parts or, with `dynamic`, in
    /// shrinking chunks; `false` (nothing done) where it does not apply.
    ///
    /// # Safety
    /// `c` points at a row-major `m × n` output that aliases no input.
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm_low_rank(
        _a: ndarray::ArrayView2<Self>,
        _b: ndarray::ArrayView2<Self>,
        _bias: Option<&[Self]>,
        _u: crate::gemm::LowRankU<Self>,
        _parts: &[crate::gemm::LowRankPart<Self>],
        _epilogue: crate::gemm::Epilogue<Self>,
        _c: *mut Self,
        _threads: usize,
        _dynamic: bool,
    ) -> bool {
        false
    }
}

impl Float for f32 {
    const DTYPE: &'static str = "f32";
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    #[inline(always)]
    fn as_f64(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn exp_fast(self) -> Self {
        exp_f32(self)
    }
    #[inline(always)]
    fn exp_fused(self) -> Self {
        exp_f32_fused(self)
    }
    #[inline(always)]
    fn dot(a: &[Self], b: &[Self]) -> Self {
        #[cfg(target_arch = "x86_64")]
        if crate::simd::width() == crate::simd::Width::Avx512 {
            // SAFETY: the CPU has AVX-512F.
            return unsafe { crate::simd::dot_avx512(a, b) };
        }
        #[cfg(target_arch = "x86_64")]
        if crate::simd::width() == crate::simd::Width::Avx2 {
            // SAFETY: the CPU has AVX2.
            return unsafe { crate::simd::dot_avx2(a, b) };
        }
        crate::simd::dot_lanes(a, b)
    }
    #[inline(always)]
    fn dot3(a: &[Self], b: [&[Self]; 3]) -> [Self; 3] {
        #[cfg(target_arch = "x86_64")]
        if crate::simd::width() == crate::simd::Width::Avx2 {
            // SAFETY: the CPU has AVX2.
            return unsafe { crate::simd::dot3_avx2(a, b) };
        }
        b.map(|b| crate::simd::dot_two_rows(a, b))
    }
    #[inline(always)]
    fn dot8(a: &[Self], b: [&[Self]; 8]) -> [Self; 8] {
        #[cfg(target_arch = "x86_64")]
        if crate::simd::width() == crate::simd::Width::Avx512 {
            // SAFETY: the CPU has AVX-512F.
            return unsafe { crate::simd::dot8_avx512(a, b) };
        }
        #[cfg(target_arch = "x86_64")]
        if crate::simd::width() == crate::simd::Width::Avx2 {
            // SAFETY: the CPU has AVX2.
            return unsafe { crate::simd::dot8_avx2(a, b) };
        }
        b.map(|b| crate::simd::dot_two_rows(a, b))
    }
    unsafe fn gemm(
        m: usize,
        k: usize,
        n: usize,
        alpha: Self,
        a: *const Self,
        rsa: isize,
        csa: isize,
        b: *const Self,
        rsb: isize,
        csb: isize,
        beta: Self,
        c: *mut Self,
        rsc: isize,
        csc: isize,
    ) {
        use crate::sgemm_avx512::{self as fast, THIN_MAX};
        if fast::available() {
            if m.min(n) >= 32 {
                return fast::sgemm(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc);
            }
            // LoRA's rank-r side: at most 16 columns (or rows: Cᵀ = Bᵀ·Aᵀ, so the thin side
            // becomes the columns by swapping the operands and every pair of strides).
            if n <= THIN_MAX && n <= m {
                return fast::sgemm_thin(
                    m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc,
                );
            }
            if m <= THIN_MAX {
                return fast::sgemm_thin(
                    n, k, m, alpha, b, csb, rsb, a, csa, rsa, beta, c, csc, rsc,
                );
            }
        }
        // Without AVX-512 but with AVX2: LoRA's rank side read in place, as above, its
        // rank-r updates of wide outputs in one sweep, and from 32 wide the 6×16 kernel.
        #[cfg(target_arch = "x86_64")]
        {
            use crate::sgemm_avx2::{self as avx2, THIN_MAX};
            if avx2::available() && k > 0 {
                if n <= THIN_MAX && n <= m {
                    return avx2::sgemm_thin(
                        m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc,
                    );
                }
                if m <= THIN_MAX {
                    // From 9 rows against at least 32 columns (a 16-token prompt's layers,
                    // LoRA's ∂A = ∂uᵀ·x with q and v side by side), the 6×16 kernel's two or
                    // three row tiles beat the thin kernel, which reads its wide operand once
                    // per 8 rows (docs/BENCHMARKS.md, session 29).
                    if m > avx2::THIN_ONLY_MAX_ROWS && n >= 32 && k > avx2::SHALLOW_MAX {
                        return avx2::sgemm(
                            m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc,
                        );
                    }
                    return avx2::sgemm_thin(
                        n, k, m, alpha, b, csb, rsb, a, csa, rsa, beta, c, csc, rsc,
                    );
                }
                // LoRA's rank-r updates of a wide output.
                if k <= avx2::SHALLOW_MAX {
                    return avx2::sgemm_shallow(
                        m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc,
                    );
                }
                // The 6×16 kernel from 32 wide, as the AVX-512 one.
                if m.min(n) >= 32 {
                    return avx2::sgemm(
                        m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc,
                    );
                }
            }
        }
        // Products 17–31 wide: the 12×32 kernel would pad them to a full panel, and
        // matrixmultiply's 16×16 tiles waste less (17–31 wide without AVX-512 too).
        matrixmultiply::sgemm(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc)
    }
    unsafe fn gemm_parallel(
        m: usize,
        k: usize,
        n: usize,
        alpha: Self,
        a: *const Self,
        rsa: isize,
        csa: isize,
        b: *const Self,
        rsb: isize,
        csb: isize,
        beta: Self,
        c: *mut Self,
        rsc: isize,
        csc: isize,
    ) -> bool {
        use crate::sgemm_avx512 as fast;
        // Where [`Float::gemm`] would take the 6×16 kernel (CPUs with AVX2 but not AVX-512).
        #[cfg(target_arch = "x86_64")]
        if crate::sgemm_avx2::available() && m.min(n) >= 32 {
            return crate::sgemm_avx2::sgemm_parallel(
                m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc,
            );
        }
        if !fast::available() || m.min(n) < 32 {
            return false;
        }
        fast::sgemm_parallel(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc)
    }
    unsafe fn gemm_parallel_bias(
        m: usize,
        k: usize,
        n: usize,
        a: *const Self,
        rsa: isize,
        csa: isize,
        b: *const Self,
        rsb: isize,
        csb: isize,
        bias: *const Self,
        c: *mut Self,
        rsc: isize,
        csc: isize,
    ) -> bool {
        use crate::sgemm_avx512 as fast;
        if !fast::available() || m.min(n) < 32 {
            return false;
        }
        fast::sgemm_parallel_bias(m, k, n, a, rsa, csa, b, rsb, csb, bias, c, rsc, csc)
    }
    unsafe fn gemm_low_rank(
        a: ndarray::ArrayView2<Self>,
        b: ndarray::ArrayView2<Self>,
        bias: Option<&[Self]>,
        u: crate::gemm::LowRankU<Self>,
        parts: &[crate::gemm::LowRankPart<Self>],
        epilogue: crate::gemm::Epilogue<Self>,
        c: *mut Self,
        threads: usize,
        dynamic: bool,
    ) -> bool {
        use crate::sgemm_avx512 as fast;
        // Where [`Float::gemm`] would take the 6×16 kernel (AVX2 but not AVX-512) ...
        #[cfg(target_arch = "x86_64")]
        if crate::sgemm_avx2::available() {
            if a.nrows().min(b.ncols()) < 32 || a.ncols() <= crate::sgemm_avx2::SHALLOW_MAX {
                return false;
            }
            return crate::sgemm_avx2::sgemm_low_rank(
                a, b, bias, u, parts, epilogue, c, threads, dynamic,
            );
        }
        // ... or the 12×32 kernel.
        if !fast::available() || a.nrows().min(b.ncols()) < 32 {
            return false;
        }
        let n = b.ncols() as isize;
        fast::sgemm_low_rank(a, b, bias, u, parts, epilogue, c, (n, 1), threads, dynamic)
    }
    unsafe fn gemm_bias(
        m: usize,
        k: usize,
        n: usize,
        a: *const Self,
        rsa: isize,
        csa: isize,
        b: *const Self,
        rsb: isize,
        csb: isize,
        bias: *const Self,
        c: *mut Self,
        rsc: isize,
        csc: isize,
    ) {
        use crate::sgemm_avx512 as fast;
        // Where [`Float::gemm`] would take the 12×32 kernel anyway ...
        if fast::available() && m.min(n) >= 32 && k > 0 {
            return fast::sgemm_bias(m, k, n, a, rsa, csa, b, rsb, csb, bias, c, rsc, csc);
        }
        // ... or the 6×16 one (deeper than the shallow kernel takes).
        #[cfg(target_arch = "x86_64")]
        {
            use crate::sgemm_avx2 as avx2;
            if avx2::available() && m.min(n) >= 32 && k > avx2::SHALLOW_MAX {
                return avx2::sgemm_bias(m, k, n, a, rsa, csa, b, rsb, csb, bias, c, rsc, csc);
            }
        }
        gemm_bias_two_pass(m, k, n, a, rsa, csa, b, rsb, csb, bias, c, rsc, csc)
    }
}

/// [`Float::gemm_bias`] as two passes: the bias rows into C, then `C ← A·B + 1·C`.
///
/// # Safety
/// As for [`Float::gemm_bias`].
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_bias_two_pass<T: Float>(
    m: usize,
    k: usize,
    n: usize,
    a: *const T,
    rsa: isize,
    csa: isize,
    b: *const T,
    rsb: isize,
    csb: isize,
    bias: *const T,
    c: *mut T,
    rsc: isize,
    csc: isize,
) {
    for i in 0..m {
        for j in 0..n {
            c.offset(i as isize * rsc + j as isize * csc)
                .write(*bias.add(j));
        }
    }
    // With k = 0 the product adds nothing (and the kernels' k loops need a step).
    if k > 0 {
        T::gemm(
            m,
            k,
            n,
            T::one(),
            a,
            rsa,
            csa,
            b,
            rsb,
            csb,
            T::one(),
            c,
            rsc,
            csc,
        )
    }
}

impl Float for f64 {
    const DTYPE: &'static str = "f64";
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        x
    }
    #[inline(always)]
    fn as_f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn exp_fast(self) -> Self {
        self.exp()
    }
    unsafe fn gemm(
        m: usize,
        k: usize,
        n: usize,
        alpha: Self,
        a: *const Self,
        rsa: isize,
        csa: isize,
        b: *const Self,
        rsb: isize,
        csb: isize,
        beta: Self,
        c: *mut Self,
        rsc: isize,
        csc: isize,
    ) {
        matrixmultiply::dgemm(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc)
    }
}

/// [`exp_f32`]'s constants, shared with its vector copies ([`crate::simd::exp_avx2`],
/// `attention_avx512`'s `exp`) so that every copy computes the same bits: adding `EXP_ROUND`
/// (1.5·2²³) rounds to an integer; ln2 split in two (Cody–Waite) so x − n·ln2 is exact
/// enough (n·`EXP_LN2_HI` has few bits); the degree-7 Taylor polynomial's leading
/// coefficient and the rest in Horner's order.
pub(crate) const EXP_ROUND: f32 = 12_582_912.0;
pub(crate) const EXP_LN2_HI: f32 = 0.693_145_75;
pub(crate) const EXP_LN2_LO: f32 = 1.428_606_8e-6;
pub(crate) const EXP_TAYLOR_LEADING: f32 = 1.0 / 5040.0;
pub(crate) const EXP_TAYLOR_REST: [f32; 7] = [
    1.0 / 720.0,
    1.0 / 120.0,
    1.0 / 24.0,
    1.0 / 6.0,
    0.5,
    1.0,
    1.0,
];

/// eˣ = 2ⁿ·eᵍ with n = round(x·log₂e) and g = x − n·ln2, |g| ≤ ln2/2: eᵍ by its degree-7
/// Taylor polynomial (truncation error below 1e-8 there), 2ⁿ by writing the exponent bits. No branches
/// and no table, so a loop of these vectorises. Inputs are clamped to [-87.3, 88.3] (eˣ stays a
/// normal f32); NaN stays NaN. Multiplies and adds separately (see [`exp_f32_fused`]).
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    exp_f32_with(x, |a, b, c| a * b + c)
}

/// [`exp_f32`] with every multiply-add fused ([`Float::exp_fused`] says where to use it).
#[inline(always)]
pub fn exp_f32_fused(x: f32) -> f32 {
    exp_f32_with(x, f32::mul_add)
}

/// [`exp_f32`]'s steps, with `multiply_add(a, b, c) = a·b + c` rounded once or twice.
#[inline(always)]
fn exp_f32_with(x: f32, multiply_add: impl Fn(f32, f32, f32) -> f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // Rounds to nearest without SSE4.1's roundps: adding 1.5·2²³ pushes the fraction out.
    const ROUND: f32 = EXP_ROUND;
    // ln2 split in two (Cody–Waite) so x − n·ln2 is exact enough: n·LN2_HI has few bits.
    const LN2_HI: f32 = EXP_LN2_HI;
    const LN2_LO: f32 = EXP_LN2_LO;
    let xc = x.clamp(-87.3, 88.3);
    let shifted = multiply_add(xc, LOG2E, ROUND);
    // n as an integer straight from the bits (|n| ≤ 128 sits in the low mantissa bits); an
    // `as i32` cast would be a saturating conversion that stops the loop from vectorising.
    let n_int = (shifted.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let n = shifted - ROUND;
    let g = multiply_add(-n, LN2_LO, multiply_add(-n, LN2_HI, xc)); // in about [-ln2/2, ln2/2]
    let mut p = EXP_TAYLOR_LEADING;
    for coefficient in EXP_TAYLOR_REST {
        p = multiply_add(p, g, coefficient);
    }
    let scale = f32::from_bits(((n_int + 127) as u32) << 23);
    let y = p * scale;
    if x.is_nan() {
        x
    } else {
        y
    }
}

#[cfg(test)]
mod exp_tests {
    #[test]
    fn exp_f32_is_within_a_few_ulps_of_libm_everywhere_it_matters() {
        for (name, exp) in [
            ("exp_f32", super::exp_f32 as fn(f32) -> f32),
            ("exp_f32_fused", super::exp_f32_fused),
        ] {
            let mut worst = 0.0f64;
            let mut x = -87.0f32;
            while x < 88.0 {
                let (got, want) = (exp(x) as f64, (x as f64).exp());
                worst = worst.max(((got - want) / want).abs());
                x += 0.001_3;
            }
            assert!(
                worst < 4.0 * f32::EPSILON as f64,
                "{name}: max relative error {worst:e}"
            );
            assert_eq!(exp(-1000.0), exp(-87.3), "{name}");
            assert!(exp(-1000.0) > 0.0, "{name}");
            assert!(exp(1000.0).is_finite(), "{name}");
            assert!(exp(f32::NAN).is_nan(), "{name}");
            assert_eq!(exp(0.0), 1.0, "{name}");
        }
    }
}
