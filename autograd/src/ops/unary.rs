//! Elementwise functions: exp, log, sqrt, tanh, relu, and GELU in GPT-2's tanh form.
//!
//! Each saves whichever of its input `x` or output `y` makes the derivative cheapest
//! (exp′ = y, tanh′ = 1 − y², log′ = 1/x, …) and computes the input gradient in the incoming
//! gradient's buffer.

use super::{map, zip_inplace};
use crate::error::Result;
use crate::tape::{OpRecord, Tensor, Var};
use crate::Float;

/// √(2/π), the constant of GPT-2's GELU approximation.
const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
const GELU_CUBIC: f64 = 0.044_715;

/// GELU's gate σ(2z) = (1 + tanh z)/2 for z = √(2/π)·(x + 0.044715·x³), through one `exp`:
/// 1/(1 + e^{−2z}), with the vectorisable [`Float::exp_fused`] (libm's `tanhf` costs several
/// times more, and GELU runs on every MLP activation twice per step). Past an exponent of 80
/// (x below about −9.2, where GELU and its derivative are under 10⁻³²) the gate is exactly 0,
/// as the tanh form's 1 + t is: a gate that went subnormal would cost a microcode assist per
/// lane, and one held at a tiny normal value would let x·s grow with x.
#[inline(always)]
fn gelu_gate<T: Float>(x: T) -> T {
    let minus_two_c = T::from_f64(-2.0 * SQRT_2_OVER_PI);
    let k = T::from_f64(GELU_CUBIC);
    let cap = T::from_f64(80.0);
    let u = minus_two_c * x * (T::one() + k * x * x);
    let gate = T::one() / (T::one() + (if u > cap { cap } else { u }).exp_fused());
    if u > cap {
        T::zero()
    } else {
        gate
    }
}

/// GPT-2's GELU: 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))), computed as x·σ(2z) (the same
/// function, three operations fewer per value).
#[inline(always)]
pub fn gelu_scalar<T: Float>(x: T) -> T {
    x * gelu_gate(x)
}

/// d/dx of [`gelu_scalar`]: s + 2·x·s·(1 − s)·√(2/π)·(1 + 3·0.044715·x²) with s = σ(2z)
/// (the tanh form's 0.5·(1 + t) + 0.5·x·(1 − t²)·z′, as 1 − t² = 4·s·(1 − s)).
#[inline(always)]
pub fn gelu_derivative<T: Float>(x: T) -> T {
    let (two_c, three_k) = (
        T::from_f64(2.0 * SQRT_2_OVER_PI),
        T::from_f64(3.0 * GELU_CUBIC),
    );
    let s = gelu_gate(x);
    s + x * s * (T::one() - s) * two_c * (T::one() + three_k * x * x)
}

/// [`gelu_scalar`] and [`gelu_derivative`] from one evaluation of the gate (the same bits as
/// the two calls). The GEMM's fused store calls it too ([`Var::linear_gelu`]).
#[inline(always)]
pub(crate) fn gelu_and_derivative<T: Float>(x: T) -> (T, T) {
    let (two_c, three_k) = (
        T::from_f64(2.0 * SQRT_2_OVER_PI),
        T::from_f64(3.0 * GELU_CUBIC),
    );
    let s = gelu_gate(x);
    (
        x * s,
        s + x * s * (T::one() - s) * two_c * (T::one() + three_k * x * x),
    )
}

/// [`gelu_scalar`] and [`gelu_derivative`] at every value of `x` (what a GELU forward keeps
/// for backward), with the bits of [`gelu_and_derivative`]. f32 on AVX2 without AVX-512 takes
/// [`gelu_pairs_avx2`]: the compiler's wide build of the scalar function took 1.5–1.7 ns a
/// value there (≈ 35 cycles a vector of eight, each vector waiting on its own chain of
/// dependent steps).
pub(crate) fn gelu_pair<T: Float, S: ndarray::Data<Elem = T>>(
    x: &ndarray::ArrayBase<S, ndarray::IxDyn>,
) -> (ndarray::ArrayD<T>, ndarray::ArrayD<T>) {
    #[cfg(target_arch = "x86_64")]
    if std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>()
        && crate::simd::width() == crate::simd::Width::Avx2
    {
        return super::map_pair_slices(x, |y, d, x| {
            let cast = |s: &mut [std::mem::MaybeUninit<T>]| {
                // SAFETY: T is f32 (checked above), so the slices have the same layout.
                unsafe {
                    std::slice::from_raw_parts_mut(
                        s.as_mut_ptr().cast::<std::mem::MaybeUninit<f32>>(),
                        s.len(),
                    )
                }
            };
            // SAFETY: as above; width() found AVX2 and FMA on this CPU.
            unsafe {
                let x = std::slice::from_raw_parts(x.as_ptr().cast::<f32>(), x.len());
                gelu_pairs_avx2(x, cast(y), cast(d));
            }
        });
    }
    super::map_pair(x, gelu_and_derivative)
}

/// [`gelu_and_derivative`] of each value of `x` into `y` and `d`, in intrinsics with the same
/// operations in the same order (the same bits), four vectors side by side: each step taken
/// for all four before the next, so that their chains of dependent steps (the exponential's
/// polynomial, the division) overlap. The `gelu` op on a nanogpt-cpu group's 384 × 512
/// activations, one thread: 236–287 µs against 332–340 µs with the scalar function compiled
/// wide; at that size the pass then moves about as many bytes a second as one core reads.
///
/// # Safety
/// The CPU must support AVX2 and FMA; `y` and `d` are as long as `x`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gelu_pairs_avx2(
    x: &[f32],
    y: &mut [std::mem::MaybeUninit<f32>],
    d: &mut [std::mem::MaybeUninit<f32>],
) {
    use std::arch::x86_64::*;
    const VECTORS: usize = 4;
    assert!(y.len() == x.len() && d.len() == x.len());
    let one = _mm256_set1_ps(1.0);
    let minus_two_c = _mm256_set1_ps((-2.0 * SQRT_2_OVER_PI) as f32);
    let k = _mm256_set1_ps(GELU_CUBIC as f32);
    let cap = _mm256_set1_ps(80.0);
    let two_c = _mm256_set1_ps((2.0 * SQRT_2_OVER_PI) as f32);
    let three_k = _mm256_set1_ps((3.0 * GELU_CUBIC) as f32);
    let whole = x.len() / (8 * VECTORS) * (8 * VECTORS);
    let (yp, dp) = (y.as_mut_ptr().cast::<f32>(), d.as_mut_ptr().cast::<f32>());
    for i in (0..whole).step_by(8 * VECTORS) {
        let x: [__m256; VECTORS] =
            std::array::from_fn(|v| _mm256_loadu_ps(x.as_ptr().add(i + 8 * v)));
        // gelu_gate: u = −2c·x·(1 + k·x·x), capped at 80, then 1/(1 + eᵘ) (0 past the cap).
        let u = x.map(|x| {
            let cubic = _mm256_add_ps(one, _mm256_mul_ps(_mm256_mul_ps(k, x), x));
            _mm256_mul_ps(_mm256_mul_ps(minus_two_c, x), cubic)
        });
        let over = u.map(|u| _mm256_cmp_ps::<_CMP_GT_OQ>(u, cap));
        let capped: [__m256; VECTORS] =
            std::array::from_fn(|v| _mm256_blendv_ps(u[v], cap, over[v]));
        let e = crate::simd::exp_avx2(capped);
        let gate = e.map(|e| _mm256_div_ps(one, _mm256_add_ps(one, e)));
        let s: [__m256; VECTORS] = std::array::from_fn(|v| _mm256_andnot_ps(over[v], gate[v]));
        for v in 0..VECTORS {
            // y = x·s; d = s + x·s·(1 − s)·2c·(1 + 3k·x·x), multiplied left to right.
            let value = _mm256_mul_ps(x[v], s[v]);
            let slope = _mm256_mul_ps(_mm256_mul_ps(value, _mm256_sub_ps(one, s[v])), two_c);
            let cubic = _mm256_add_ps(one, _mm256_mul_ps(_mm256_mul_ps(three_k, x[v]), x[v]));
            _mm256_storeu_ps(yp.add(i + 8 * v), value);
            _mm256_storeu_ps(
                dp.add(i + 8 * v),
                _mm256_add_ps(s[v], _mm256_mul_ps(slope, cubic)),
            );
        }
    }
    for i in whole..x.len() {
        let (value, slope) = gelu_and_derivative(x[i]);
        y[i].write(value);
        d[i].write(slope);
    }
}

impl<'t, T: Float> Var<'t, T> {
    /// `eᵡ`. ∂/∂x = y·g.
    pub fn exp(&self) -> Result<Var<'t, T>> {
        let y: Tensor<T> = map(self.value(), T::exp).into_shared();
        let saved_y = y.clone();
        OpRecord::new("exp", &[self])
            .saves("y", &y)
            .finish(y, move |g, _| {
                vec![Some(zip_inplace(g, &saved_y, |g, y| g * y))]
            })
    }

    /// Natural log. ∂/∂x = g/x.
    pub fn log(&self) -> Result<Var<'t, T>> {
        let x = self.value().clone();
        OpRecord::new("log", &[self])
            .saves("x", &x)
            .finish(map(&x, T::ln), move |g, _| {
                vec![Some(zip_inplace(g, &x, |g, x| g / x))]
            })
    }

    /// `√x`. ∂/∂x = g/(2y).
    pub fn sqrt(&self) -> Result<Var<'t, T>> {
        let y: Tensor<T> = map(self.value(), T::sqrt).into_shared();
        let saved_y = y.clone();
        let two = T::from_f64(2.0);
        OpRecord::new("sqrt", &[self])
            .saves("y", &y)
            .finish(y, move |g, _| {
                vec![Some(zip_inplace(g, &saved_y, |g, y| g / (two * y)))]
            })
    }

    /// `tanh x`. ∂/∂x = (1 − y²)·g.
    pub fn tanh(&self) -> Result<Var<'t, T>> {
        let y: Tensor<T> = map(self.value(), T::tanh).into_shared();
        let saved_y = y.clone();
        OpRecord::new("tanh", &[self])
            .saves("y", &y)
            .finish(y, move |g, _| {
                vec![Some(zip_inplace(g, &saved_y, |g, y| {
                    g * (T::one() - y * y)
                }))]
            })
    }

    /// `max(x, 0)`. ∂/∂x = g where x > 0, else 0.
    pub fn relu(&self) -> Result<Var<'t, T>> {
        let x = self.value().clone();
        let out = map(&x, |v| if v > T::zero() { v } else { T::zero() });
        OpRecord::new("relu", &[self])
            .saves("x", &x)
            .finish(out, move |g, _| {
                vec![Some(zip_inplace(g, &x, |g, x| {
                    if x > T::zero() {
                        g
                    } else {
                        T::zero()
                    }
                }))]
            })
    }

    /// GELU, tanh approximation (GPT-2's `gelu_new`), fused. When a gradient will be needed,
    /// the forward pass also writes the derivative at each x (the gate it computes anyway,
    /// plus a few multiplies) and saves that instead of x, so backward is one multiply per
    /// value: no second exponential and divide (nanogpt-cpu's GELU backward was 1.2 ms of a
    /// 27 ms step). The saved tensor has x's size, and x itself is no longer kept.
    pub fn gelu(&self) -> Result<Var<'t, T>> {
        let inputs = [self];
        let record = OpRecord::new("gelu", &inputs);
        if !record.keeps_backward() {
            return record.finish(map(self.value(), gelu_scalar), |_, _| vec![None]);
        }
        let (out, derivative) = gelu_pair(self.value());
        let saved: Tensor<T> = derivative.into_shared();
        record.saves("gelu′(x)", &saved).finish(out, move |g, _| {
            vec![Some(zip_inplace(g, &saved, |g, d| g * d))]
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_util::{assert_gradcheck, rand_array};

    #[test]
    fn gelu_pair_has_the_scalar_bits() {
        // Whatever path this CPU takes (four-vector intrinsics on AVX2): every value and
        // derivative as gelu_scalar and gelu_derivative give them, over ±12 in fine steps,
        // the cap's edge (x ≈ −9.2), zeros, tiny and huge values, infinities and NaN, at
        // lengths that end inside and after a block of 32.
        let mut xs: Vec<f32> = (0..20_000)
            .map(|i| (i as f32 - 10_000.0) * 0.0012)
            .collect();
        xs.extend([
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            -1e30,
            1e30,
            0.0,
            -0.0,
        ]);
        xs.extend([
            -9.2,
            -9.25,
            -9.3,
            1e-30,
            -1e-30,
            f32::MIN_POSITIVE,
            3e4,
            -3e4,
        ]);
        xs.extend((0..3000).map(|i| f32::from_bits(0x3000_0000u32.wrapping_add(i * 97_003))));
        for len in [xs.len(), 31, 33, 64, 7] {
            let x = ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[len]), xs[..len].to_vec())
                .expect("a vector");
            let (y, d) = gelu_pair(&x);
            for ((&x, &y), &d) in x.iter().zip(&y).zip(&d) {
                let same =
                    |a: f32, b: f32| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan());
                assert!(
                    same(y, gelu_scalar(x)),
                    "gelu({x}) = {y}, not {}",
                    gelu_scalar(x)
                );
                assert!(
                    same(d, gelu_derivative(x)),
                    "gelu′({x}) = {d}, not {}",
                    gelu_derivative(x)
                );
            }
        }
    }

    #[test]
    fn gradcheck_unary_ops() {
        let x = rand_array(&[2, 3, 4], 11);
        let positive = x.mapv(|v| v.abs() + 0.2);
        let away_from_kink = x.mapv(|v| if v.abs() < 0.05 { 0.3 } else { v });
        assert_gradcheck(|x| x[0].exp(), &[x.clone()]);
        assert_gradcheck(|x| x[0].log(), &[positive.clone()]);
        assert_gradcheck(|x| x[0].sqrt(), &[positive]);
        assert_gradcheck(|x| x[0].tanh(), &[x.clone()]);
        assert_gradcheck(|x| x[0].relu(), &[away_from_kink]);
        assert_gradcheck(|x| x[0].gelu(), &[x.mapv(|v| 3.0 * v)]);
    }

    #[test]
    fn gelu_saves_its_derivative_only_when_a_gradient_is_needed() {
        // Backward multiplies by the derivative the forward pass wrote: the bits of
        // g · gelu_derivative(x), with values from far left (gate 0) to far right.
        let x = rand_array(&[3, 41], 12).mapv(|v| (12.0 * v) as f32);
        let w = rand_array(&[3, 41], 13).mapv(|v| v as f32);
        let tape = crate::Tape::<f32>::new();
        let xv = tape.param("x", x.clone());
        let y = xv.gelu().unwrap();
        for (got, &x) in y.value().iter().zip(&x) {
            assert_eq!(got.to_bits(), gelu_scalar(x).to_bits(), "gelu({x})");
        }
        let loss = y.mul(&tape.constant(w.clone())).unwrap().sum_all().unwrap();
        let grad = tape.backward(&loss).unwrap().get(&xv).unwrap().clone();
        for ((got, &x), &w) in grad.iter().zip(&x).zip(&w) {
            assert_eq!(
                got.to_bits(),
                (w * gelu_derivative(x)).to_bits(),
                "gelu′({x})"
            );
        }
        // A frozen input: no backward rule, nothing saved, the same values.
        let frozen = crate::Tape::<f32>::new();
        let y = frozen.frozen("x", x.clone()).gelu().unwrap();
        assert_eq!(frozen.saved_bytes(), 0);
        assert_eq!(
            y.value(),
            &tape.param("again", x).gelu().unwrap().value().clone()
        );
    }

    #[test]
    fn gelu_matches_known_values() {
        // 0.5·x·(1 + tanh(√(2/π)(x + 0.044715x³))) evaluated in Python at f64.
        for (x, want) in [
            (0.0, 0.0),
            (1.0, 0.841_191_990_608_276_8),
            (-2.0, -0.045_402_305_912_224_94),
        ] {
            assert!((gelu_scalar::<f64>(x) - want).abs() < 1e-12, "gelu({x})");
        }
    }

    #[test]
    fn gelu_in_f32_follows_the_tanh_form_everywhere_and_stays_normal_far_out() {
        let tanh_form = |x: f64| {
            let z = super::SQRT_2_OVER_PI * (x + super::GELU_CUBIC * x * x * x);
            let t = z.tanh();
            let derivative = 0.5 * (1.0 + t)
                + 0.5
                    * x
                    * (1.0 - t * t)
                    * super::SQRT_2_OVER_PI
                    * (1.0 + 3.0 * super::GELU_CUBIC * x * x);
            (0.5 * x * (1.0 + t), derivative)
        };
        for i in -4000..=4000 {
            let x = i as f64 * 0.005; // −20 … 20
            let (want, want_derivative) = tanh_form(x);
            let (got, got_derivative) = (
                gelu_scalar(x as f32) as f64,
                gelu_derivative(x as f32) as f64,
            );
            assert!(
                (got - want).abs() <= 2e-6 * (1.0 + want.abs()),
                "gelu({x}): {got} vs {want}"
            );
            assert!(
                (got_derivative - want_derivative).abs() <= 2e-6 * (1.0 + want_derivative.abs()),
                "gelu′({x}): {got_derivative} vs {want_derivative}"
            );
        }
        for i in 0..2000 {
            let x = -9.0 - i as f32 * 0.01; // the gate's last normal values, then exact zeros
            for v in [gelu_scalar(x), gelu_derivative(x)] {
                assert!(v == 0.0 || v.is_normal(), "{x}: {v}");
                assert!(v.abs() < 1e-26, "{x}: {v}");
            }
        }
        for x in [-1e4f32, -100.0] {
            assert_eq!((gelu_scalar(x), gelu_derivative(x)), (0.0, 0.0));
        }
        assert_eq!(gelu_scalar(1e4f32), 1e4);
        assert_eq!(gelu_derivative(1e4f32), 1.0);
    }
}
