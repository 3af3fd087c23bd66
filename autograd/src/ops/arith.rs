//! Elementwise arithmetic with NumPy broadcasting: add, sub, mul, div, and the scalar forms
//! neg, scale, add_scalar, pow.
//!
//! Broadcasting forward means summing backward: a gradient is reduced back to each input's
//! shape over the dims the input lacked or had as size 1 (see `reduce_to_shape`).

use super::{broadcast_shape, map, reduce_to_shape, zip_inplace, zip_map};
use crate::error::Result;
use crate::tape::{OpRecord, Var};
use crate::Float;
use rayon::prelude::*;

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
        let (a, b) = (self.value().clone(), other.value().clone());
        OpRecord::new("mul", &[self, other])
            .saves("a", &a)
            .saves("b", &b)
            .finish(out, move |g, needs| {
                let ga = needs[0]
                    .then(|| reduce_to_shape(zip_map(&shape, &g, &b, |g, b| g * b), a.shape()));
                let gb = needs[1]
                    .then(|| reduce_to_shape(zip_map(&shape, &g, &a, |g, a| g * a), b.shape()));
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

impl<'t, T: Float> Var<'t, T> {
    /// `self` with `scale_i · delta_i` added into last-axis columns `start_i .. start_i + w_i`
    /// (each `delta_i` is `self`'s shape with `w_i` last): LoRA's update of some slices of a
    /// fused projection (q and v of c_attn) without building a zero-padded full-width delta.
    /// ∂self = G; ∂delta_i = scale_i · G[..., start_i .. start_i + w_i]. Takes `self` by value
    /// so that, when nothing else holds its buffer, the sum is written in place.
    pub fn add_scaled_columns(mut self, parts: &[(&Var<'t, T>, usize, f64)]) -> Result<Var<'t, T>> {
        let shape = self.shape().to_vec();
        let Some((&width, lead)) = shape.split_last() else {
            return crate::error::arg_err("add_scaled_columns", "needs at least one axis");
        };
        let rows = lead.iter().product::<usize>();
        let mut spans = Vec::with_capacity(parts.len());
        for (delta, start, scale) in parts {
            let ds = delta.shape();
            let w = ds.last().copied().unwrap_or(0);
            if ds.len() != shape.len() || &ds[..ds.len() - 1] != lead || start + w > width {
                return crate::error::shape_err(
                    "add_scaled_columns",
                    &shape,
                    ds,
                    format!("a delta must match on the leading dims and fit in columns {start}..{width}"),
                );
            }
            spans.push((*start, w, T::from_f64(*scale)));
        }
        let mut out = self.take_value();
        {
            let deltas: Vec<_> = parts
                .iter()
                .map(|(delta, _, _)| crate::ops::standard_layout(delta.value().clone()))
                .collect();
            let deltas: Vec<&[T]> = deltas
                .iter()
                .map(|d| d.as_slice().expect("standard layout"))
                .collect();
            let out_rows = out
                .as_slice_mut()
                .expect("owned arrays are standard layout");
            // Row by row, each delta row added into its column span: contiguous slices, wide
            // and in parallel over blocks of rows.
            let rows_per_block = (crate::ops::PARALLEL_MIN_LEN / width.max(1)).max(1);
            out_rows
                .par_chunks_mut(rows_per_block * width)
                .enumerate()
                .for_each(|(block, out)| {
                    crate::simd::vectorized(
                        #[inline(always)]
                        || {
                            for (i, row) in out.chunks_exact_mut(width).enumerate() {
                                let r = block * rows_per_block + i;
                                for (d, &(start, w, scale)) in deltas.iter().zip(&spans) {
                                    let d = &d[r * w..(r + 1) * w];
                                    for (o, &d) in row[start..start + w].iter_mut().zip(d) {
                                        *o += scale * d;
                                    }
                                }
                            }
                        },
                    )
                });
        }
        let mut inputs = vec![&self];
        inputs.extend(parts.iter().map(|p| p.0));
        OpRecord::new("add_scaled_columns", &inputs)
            .attrs(
                spans
                    .iter()
                    .map(|(s, w, _)| format!("{s}..{}", s + w))
                    .collect::<Vec<_>>()
                    .join(","),
            )
            .finish(out, move |g, needs| {
                let g2 = g
                    .to_shape((rows, width))
                    .expect("gradient has the output's size");
                let mut grads: Vec<Option<ndarray::ArrayD<T>>> = vec![None];
                for (i, &(start, w, scale)) in spans.iter().enumerate() {
                    grads.push(needs[i + 1].then(|| {
                        let mut lead_w = shape[..shape.len() - 1].to_vec();
                        lead_w.push(w);
                        g2.slice(ndarray::s![.., start..start + w])
                            .mapv(|v| v * scale)
                            .into_shape_with_order(ndarray::IxDyn(&lead_w))
                            .expect("same size")
                    }));
                }
                drop(g2);
                if needs[0] {
                    grads[0] = Some(g);
                }
                grads
            })
    }
}

#[cfg(test)]
mod tests {
    use crate::ops::test_util::{assert_gradcheck, rand_array};
    use crate::{AutogradError, Tape};
    use ndarray::{arr1, arr2};

    #[test]
    fn add_scaled_columns_equals_the_zero_padded_sum_and_passes_gradcheck() {
        let tape = Tape::<f64>::new();
        let base = tape.constant(rand_array(&[2, 3, 9], 1));
        let dq = tape.constant(rand_array(&[2, 3, 3], 2));
        let dv = tape.constant(rand_array(&[2, 3, 3], 3));
        let y = base
            .clone()
            .add_scaled_columns(&[(&dq, 0, 0.5), (&dv, 6, 2.0)])
            .unwrap();
        for ((i, j, c), &v) in y
            .value()
            .view()
            .into_dimensionality::<ndarray::Ix3>()
            .unwrap()
            .indexed_iter()
        {
            let mut want = base.value()[[i, j, c]];
            if c < 3 {
                want += 0.5 * dq.value()[[i, j, c]];
            } else if c >= 6 {
                want += 2.0 * dv.value()[[i, j, c - 6]];
            }
            assert!((v - want).abs() < 1e-12);
        }
        assert!(base.clone().add_scaled_columns(&[(&dq, 7, 1.0)]).is_err());
        // Enough rows for several parallel blocks.
        let (big, big_dv) = (rand_array(&[4000, 9], 7), rand_array(&[4000, 3], 8));
        let y = tape
            .constant(big.clone())
            .add_scaled_columns(&[(&tape.constant(big_dv.clone()), 6, 2.0)])
            .unwrap();
        let mut want = big;
        want.slice_mut(ndarray::s![.., 6..9])
            .scaled_add(2.0, &big_dv);
        assert_eq!(y.value().to_owned(), want);
        // Under no_grad the base's buffer is taken instead of copied when nothing else holds
        // it; a clone that does hold it keeps its value.
        tape.no_grad(|| {
            let product = base.mul(&base).unwrap();
            let kept = product.clone();
            let sum = product.add_scaled_columns(&[(&dq, 0, 1.0)]).unwrap();
            let want = &kept.value().slice(ndarray::s![.., .., 0..3]).into_dyn() + dq.value();
            assert_eq!(
                sum.value().slice(ndarray::s![.., .., 0..3]).into_dyn(),
                want
            );
            assert_eq!(kept.value().to_owned(), base.value() * base.value());
        });
        assert_gradcheck(
            |x| {
                x[0].clone()
                    .add_scaled_columns(&[(&x[1], 0, 0.5), (&x[2], 6, -1.5)])
            },
            &[
                rand_array(&[2, 3, 9], 4),
                rand_array(&[2, 3, 3], 5),
                rand_array(&[2, 3, 3], 6),
            ],
        );
    }

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
