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

/// tanh through one `exp`: tanh(u) = 1 − 2/(e^{2u} + 1), with the vectorisable
/// [`Float::exp_fused`]. libm's `tanhf` costs several times more (it goes through `expm1f`), and
/// GELU calls it for every MLP activation twice per step; the absolute error here is a few
/// ulps of 1, which GELU's 0.5·x·(1 + t) does not amplify. GELU's loops run inside
/// [`crate::simd::vectorized`] (contiguous tensors), where the fused exp is 1.4× quicker for
/// the whole GELU.
#[inline(always)]
fn tanh_via_exp<T: Float>(u: T) -> T {
    let two = T::from_f64(2.0);
    T::one() - two / ((two * u).exp_fused() + T::one())
}

/// GPT-2's GELU: 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))).
#[inline(always)]
pub fn gelu_scalar<T: Float>(x: T) -> T {
    let (c, k, half) = (
        T::from_f64(SQRT_2_OVER_PI),
        T::from_f64(GELU_CUBIC),
        T::from_f64(0.5),
    );
    half * x * (T::one() + tanh_via_exp(c * (x + k * x * x * x)))
}

/// d/dx of [`gelu_scalar`]: 0.5·(1 + t) + 0.5·x·(1 − t²)·√(2/π)·(1 + 3·0.044715·x²).
#[inline(always)]
pub fn gelu_derivative<T: Float>(x: T) -> T {
    let (c, k, half) = (
        T::from_f64(SQRT_2_OVER_PI),
        T::from_f64(GELU_CUBIC),
        T::from_f64(0.5),
    );
    let t = tanh_via_exp(c * (x + k * x * x * x));
    let inner_derivative = c * (T::one() + T::from_f64(3.0) * k * x * x);
    half * (T::one() + t) + half * x * (T::one() - t * t) * inner_derivative
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

    /// GELU, tanh approximation (GPT-2's `gelu_new`), fused: one pass forward, one backward.
    pub fn gelu(&self) -> Result<Var<'t, T>> {
        let x = self.value().clone();
        let out = map(&x, gelu_scalar);
        OpRecord::new("gelu", &[self])
            .saves("x", &x)
            .finish(out, move |g, _| {
                vec![Some(zip_inplace(g, &x, |g, x| g * gelu_derivative(x)))]
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_util::{assert_gradcheck, rand_array};

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
}
