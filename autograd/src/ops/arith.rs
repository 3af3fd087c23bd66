//! Elementwise arithmetic with NumPy broadcasting: add, sub, mul, div, and the scalar forms
//! neg, scale, add_scalar, pow.
//!
//! Broadcasting forward means summing backward: a gradient is reduced back to each input's
//! shape over the dims the input lacked or had as size 1 (see `reduce_to_shape`).

use super::{broadcast_shape, map, reduce_to_shape, zip_inplace, zip_map};
use crate::error::Result;
use crate::tape::{OpRecord, Var};
use crate::Float;

impl<'t, T: Float> Var<'t, T> {
    /// `self + other`, broadcasting. ∂/∂a = g, ∂/∂b = g (each reduced to its input's shape).
    pub fn add(&self, other: &Var<'t, T>) -> Result<Var<'t, T>> {
        let shape = broadcast_shape("add", self.shape(), other.shape())?;
        let out = zip_map(&shape, self.value(), other.value(), |a, b| a + b);
        let (sa, sb) = (self.shape().to_vec(), other.shape().to_vec());
        OpRecord::new("add", &[self, other]).finish(out, move |g, needs| {
            match (needs[0], needs[1]) {
                (true, true) => vec![
                    Some(reduce_to_shape(g.clone(), &sa)),
                    Some(reduce_to_shape(g, &sb)),
                ],
                (true, false) => vec![Some(reduce_to_shape(g, &sa)), None],
                (false, _) => vec![None, Some(reduce_to_shape(g, &sb))],
            }
        })
    }

    /// `self - other`, broadcasting. ∂/∂a = g, ∂/∂b = −g.
    pub fn sub(&self, other: &Var<'t, T>) -> Result<Var<'t, T>> {
        let shape = broadcast_shape("sub", self.shape(), other.shape())?;
        let out = zip_map(&shape, self.value(), other.value(), |a, b| a - b);
        let (sa, sb) = (self.shape().to_vec(), other.shape().to_vec());
        OpRecord::new("sub", &[self, other]).finish(out, move |g, needs| {
            let ga = needs[0].then(|| reduce_to_shape(g.clone(), &sa));
            let gb = needs[1].then(|| reduce_to_shape(map(&g, |v| -v), &sb));
            vec![ga, gb]
        })
    }

    /// `self * other` elementwise, broadcasting. ∂/∂a = g·b, ∂/∂b = g·a.
    pub fn mul(&self, other: &Var<'t, T>) -> Result<Var<'t, T>> {
        let shape = broadcast_shape("mul", self.shape(), other.shape())?;
        let out = zip_map(&shape, self.value(), other.value(), |a, b| a * b);
        // ∂a reads only b and ∂b only a: each kept only while the other's gradient can be
        // asked for (a product with a constant keeps none of the other side).
        let (a_shape, b_shape) = (self.shape().to_vec(), other.shape().to_vec());
        let a = other.requires_grad().then(|| self.value().clone());
        let b = self.requires_grad().then(|| other.value().clone());
        OpRecord::new("mul", &[self, other])
            .saves_kept("a", a.as_ref())
            .saves_kept("b", b.as_ref())
            .finish(out, move |g, needs| {
                let ga = needs[0].then(|| {
                    let b = b.as_ref().expect(super::KEPT_FOR_GRADIENT);
                    reduce_to_shape(zip_map(&shape, &g, b, |g, b| g * b), &a_shape)
                });
                let gb = needs[1].then(|| {
                    let a = a.as_ref().expect(super::KEPT_FOR_GRADIENT);
                    reduce_to_shape(zip_map(&shape, &g, a, |g, a| g * a), &b_shape)
                });
                vec![ga, gb]
            })
    }

    /// `self / other` elementwise, broadcasting. ∂/∂a = g/b, ∂/∂b = −g·a/b².
    pub fn div(&self, other: &Var<'t, T>) -> Result<Var<'t, T>> {
        let shape = broadcast_shape("div", self.shape(), other.shape())?;
        let out = zip_map(&shape, self.value(), other.value(), |a, b| a / b);
        let (a, b) = (self.value().clone(), other.value().clone());
        OpRecord::new("div", &[self, other])
            .saves("a", &a)
            .saves("b", &b)
            .finish(out, move |g, needs| {
                let ga = needs[0]
                    .then(|| reduce_to_shape(zip_map(&shape, &g, &b, |g, b| g / b), a.shape()));
                let gb = needs[1].then(|| {
                    let g_over_b2 = zip_map(&shape, &g, &b, |g, b| g / (b * b));
                    reduce_to_shape(zip_map(&shape, &g_over_b2, &a, |q, a| -q * a), b.shape())
                });
                vec![ga, gb]
            })
    }

    /// `−self`.
    pub fn neg(&self) -> Result<Var<'t, T>> {
        let out = map(self.value(), |v| -v);
        OpRecord::new("neg", &[self]).finish(out, |g, _| vec![Some(g.mapv_into(|v| -v))])
    }

    /// `c · self` for a constant `c`. ∂/∂x = c·g.
    pub fn scale(&self, c: f64) -> Result<Var<'t, T>> {
        let c = T::from_f64(c);
        let out = map(self.value(), |v| v * c);
        OpRecord::new("scale", &[self])
            .attrs(format!("c={c}"))
            .finish(out, move |g, _| vec![Some(g.mapv_into(|v| v * c))])
    }

    /// `self + c` for a constant `c`. ∂/∂x = g.
    pub fn add_scalar(&self, c: f64) -> Result<Var<'t, T>> {
        let c = T::from_f64(c);
        let out = map(self.value(), |v| v + c);
        OpRecord::new("add_scalar", &[self])
            .attrs(format!("c={c}"))
            .finish(out, |g, _| vec![Some(g)])
    }

    /// `self^p` for a constant exponent `p`. ∂/∂x = p·x^(p−1)·g.
    pub fn pow(&self, p: f64) -> Result<Var<'t, T>> {
        let pt = T::from_f64(p);
        let out = map(self.value(), |v| v.powf(pt));
        let x = self.value().clone();
        OpRecord::new("pow", &[self])
            .attrs(format!("p={p}"))
            .saves("x", &x)
            .finish(out, move |g, _| {
                let pm1 = pt - T::one();
                vec![Some(zip_inplace(g, &x, |g, x| g * pt * x.powf(pm1)))]
            })
    }
}

#[cfg(test)]
mod tests {
    use crate::ops::test_util::{assert_gradcheck, rand_array};
    use crate::{AutogradError, Tape};
    use ndarray::{arr1, arr2};

    #[test]
    fn add_broadcasts_and_reduces_gradients_back() {
        let tape = Tape::<f64>::new();
        let a = tape.param("a", arr2(&[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]).into_dyn());
        let b = tape.param("b", arr1(&[10.0, 20.0, 30.0]).into_dyn());
        let y = a.add(&b).unwrap();
        assert_eq!(
            y.value(),
            &arr2(&[[11.0, 22.0, 33.0], [14.0, 25.0, 36.0]])
                .into_dyn()
                .into_shared()
        );
        let grads = tape.backward(&y.sum_all().unwrap()).unwrap();
        assert_eq!(grads.get(&b).unwrap(), &arr1(&[2.0, 2.0, 2.0]).into_dyn());
        assert_eq!(
            grads.get(&a).unwrap(),
            &ndarray::ArrayD::ones(ndarray::IxDyn(&[2, 3]))
        );
    }

    #[test]
    fn shape_errors_name_the_op_and_both_shapes() {
        let tape = Tape::<f32>::new();
        let a = tape.constant(ndarray::ArrayD::zeros(ndarray::IxDyn(&[2, 3])));
        let b = tape.constant(ndarray::ArrayD::zeros(ndarray::IxDyn(&[4])));
        let err = a.mul(&b).unwrap_err();
        assert!(matches!(
            err,
            AutogradError::ShapeMismatch { op: "mul", .. }
        ));
        assert!(
            err.to_string().contains("[2, 3]") && err.to_string().contains("[4]"),
            "{err}"
        );
    }

    #[test]
    fn mul_keeps_each_operand_only_for_the_other_ones_gradient() {
        // x ⊙ c with c a constant: ∂x = g ⊙ c needs c, not x, so x is not kept; with both
        // trainable both are. ∂x (summed over c's broadcast axis) is the same either way.
        let (x, c) = (rand_array(&[2, 1, 4], 1), rand_array(&[3, 1], 2));
        let mut gx = Vec::new();
        for c_trains in [false, true] {
            let tape = Tape::<f64>::new();
            let xv = tape.param("x", x.clone());
            let cv = if c_trains {
                tape.param("c", c.clone())
            } else {
                tape.constant(c.clone())
            };
            let y = xv.mul(&cv).unwrap();
            let grads = tape.backward(&y.sum_all().unwrap()).unwrap();
            let nodes = tape.nodes();
            let saved: Vec<_> = nodes[y.id().unwrap()]
                .saved
                .iter()
                .map(|s| s.name)
                .collect();
            let want: &[&str] = if c_trains { &["a", "b"] } else { &["b"] };
            assert_eq!(saved, want, "c trains: {c_trains}");
            gx.push(grads.get(&xv).unwrap().clone());
        }
        assert_eq!(gx[0], gx[1]);
        assert_eq!(gx[0].shape(), &[2, 1, 4]);
    }

    #[test]
    fn gradcheck_binary_ops_with_broadcasting_and_size_one_dims() {
        let (a, b) = (rand_array(&[2, 1, 4], 1), rand_array(&[3, 1], 2));
        assert_gradcheck(|x| x[0].add(&x[1]), &[a.clone(), b.clone()]);
        assert_gradcheck(|x| x[0].sub(&x[1]), &[a.clone(), b.clone()]);
        assert_gradcheck(|x| x[0].mul(&x[1]), &[a.clone(), b.clone()]);
        let b_away_from_zero = b.mapv(|v| v.signum() * (0.5 + v.abs()));
        assert_gradcheck(|x| x[0].div(&x[1]), &[a, b_away_from_zero]);
    }

    #[test]
    fn gradcheck_scalar_ops() {
        let x = rand_array(&[3, 4], 3);
        assert_gradcheck(|x| x[0].neg(), &[x.clone()]);
        assert_gradcheck(|x| x[0].scale(-2.5), &[x.clone()]);
        assert_gradcheck(|x| x[0].add_scalar(0.7), &[x.clone()]);
        let positive = x.mapv(|v| v.abs() + 0.5);
        assert_gradcheck(|x| x[0].pow(2.5), &[positive.clone()]);
        assert_gradcheck(|x| x[0].pow(-1.0), &[positive]);
    }

    #[test]
    fn a_value_used_twice_accumulates_both_gradients() {
        let tape = Tape::<f64>::new();
        let x = tape.param("x", arr1(&[3.0]).into_dyn());
        let y = x.mul(&x).unwrap().add(&x).unwrap(); // x² + x → 2x + 1 = 7
        let grads = tape.backward(&y.sum_all().unwrap()).unwrap();
        assert_eq!(grads.get(&x).unwrap()[[0]], 7.0);
    }
}
