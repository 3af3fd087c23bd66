//! Fused layer norm over the last axis, with weight and bias (llm.c's layernorm pair).
//!
//! Forward, per row of C values: μ, σ² (biased), r = 1/√(σ²+ε), x̂ = (x−μ)·r,
//! y = x̂·w + b. It saves x (shared) and μ, r per row.
//!
//! Backward, per row, with ĝ = g·w: ∂x = r·(ĝ − mean(ĝ) − x̂·mean(ĝ·x̂)); ∂w = Σ_rows g·x̂;
//! ∂b = Σ_rows g. The weight and bias sums are taken over fixed blocks of rows in parallel and
//! the block partials added in order, so the result does not depend on the thread count.

use ndarray::{Array1, Array2, ArrayD, ArrayView1, IxDyn, Zip};
use rayon::prelude::*;

use crate::error::{shape_err, Result};
use crate::tape::{OpRecord, Var};
use crate::Float;

/// Rows per block for the parallel weight/bias gradient sums.
const ROWS_PER_BLOCK: usize = 64;

fn mean_and_rstd<T: Float>(row: ArrayView1<T>, eps: T) -> (T, T) {
    let n = T::from_f64(row.len() as f64);
    let mean = row.sum() / n;
    let var = row.fold(T::zero(), |s, &v| s + (v - mean) * (v - mean)) / n;
    (mean, T::one() / (var + eps).sqrt())
}

impl<'t, T: Float> Var<'t, T> {
    /// Layer norm over the last axis with per-channel `weight` and `bias` (both `[C]`).
    pub fn layer_norm(
        &self,
        weight: &Var<'t, T>,
        bias: &Var<'t, T>,
        eps: f64,
    ) -> Result<Var<'t, T>> {
        let c = self.shape().last().copied().unwrap_or(0);
        if c == 0 || weight.shape() != [c] || bias.shape() != [c] {
            return shape_err(
                "layer_norm",
                self.shape(),
                weight.shape(),
                format!("weight and bias must be [{c}] (bias is {:?})", bias.shape()),
            );
        }
        let eps = T::from_f64(eps);
        let rows = self.len() / c;
        let x = self.value().clone();
        let (w, b) = (weight.value().clone(), bias.value().clone());
        let x2 = x.to_shape((rows, c)).expect("same size");
        let w1 = w.to_shape(c).expect("[C]");
        let b1 = b.to_shape(c).expect("[C]");
        let mut y = Array2::<T>::zeros((rows, c));
        let mut mean = Array1::<T>::zeros(rows);
        let mut rstd = Array1::<T>::zeros(rows);
        Zip::from(y.rows_mut())
            .and(x2.rows())
            .and(&mut mean)
            .and(&mut rstd)
            .par_for_each(|mut y, x, m, r| {
                let (mu, rs) = mean_and_rstd(x, eps);
                (*m, *r) = (mu, rs);
                Zip::from(&mut y)
                    .and(x)
                    .and(&w1)
                    .and(&b1)
                    .for_each(|y, &x, &w, &b| *y = (x - mu) * rs * w + b);
            });
        drop((x2, w1, b1));
        let out = y
            .into_shape_with_order(IxDyn(self.shape()))
            .expect("same size");
        OpRecord::new("layer_norm", &[self, weight, bias])
            .attrs(format!("C={c}"))
            .saves("x", &x)
            .saves("mean", &mean)
            .saves("rstd", &rstd)
            .finish(out, move |g, needs| {
                let g2 = g.to_shape((rows, c)).expect("same size");
                let x2 = x.to_shape((rows, c)).expect("same size");
                let w1 = w.to_shape(c).expect("[C]");
                let inv_c = T::from_f64(1.0 / c as f64);
                let dx =
                    needs[0].then(|| {
                        let mut dx = Array2::<T>::zeros((rows, c));
                        Zip::from(dx.rows_mut())
                            .and(g2.rows())
                            .and(x2.rows())
                            .and(&mean)
                            .and(&rstd)
                            .par_for_each(|mut dx, g, x, &mu, &rs| {
                                let (mut mean_gw, mut mean_gw_xhat) = (T::zero(), T::zero());
                                for ((&g, &x), &w) in g.iter().zip(x).zip(&w1) {
                                    mean_gw += g * w;
                                    mean_gw_xhat += g * w * (x - mu) * rs;
                                }
                                (mean_gw, mean_gw_xhat) = (mean_gw * inv_c, mean_gw_xhat * inv_c);
                                Zip::from(&mut dx).and(g).and(x).and(&w1).for_each(
                                    |dx, &g, &x, &w| {
                                        *dx = rs * (g * w - mean_gw - (x - mu) * rs * mean_gw_xhat);
                                    },
                                );
                            });
                        dx.into_dyn()
                    });
                let (dw, db) = if needs[1] || needs[2] {
                    let partials: Vec<(Array1<T>, Array1<T>)> = (0..rows.div_ceil(ROWS_PER_BLOCK))
                        .into_par_iter()
                        .map(|block| {
                            let span =
                                block * ROWS_PER_BLOCK..((block + 1) * ROWS_PER_BLOCK).min(rows);
                            let (mut dw, mut db) = (Array1::<T>::zeros(c), Array1::<T>::zeros(c));
                            for r in span {
                                let (mu, rs) = (mean[r], rstd[r]);
                                Zip::from(&mut dw)
                                    .and(&mut db)
                                    .and(g2.row(r))
                                    .and(x2.row(r))
                                    .for_each(|dw, db, &g, &x| {
                                        *dw += g * (x - mu) * rs;
                                        *db += g;
                                    });
                            }
                            (dw, db)
                        })
                        .collect();
                    let (mut dw, mut db) = (Array1::<T>::zeros(c), Array1::<T>::zeros(c));
                    for (pw, pb) in &partials {
                        dw += pw;
                        db += pb;
                    }
                    (
                        needs[1].then(|| dw.into_dyn()),
                        needs[2].then(|| db.into_dyn()),
                    )
                } else {
                    (None, None)
                };
                let shape = x.shape().to_vec();
                vec![dx.map(|d| reshape(d, &shape)), dw, db]
            })
    }
}

fn reshape<T: Float>(d: ArrayD<T>, shape: &[usize]) -> ArrayD<T> {
    d.into_shape_with_order(IxDyn(shape)).expect("same size")
}

#[cfg(test)]
mod tests {
    use crate::ops::test_util::{assert_gradcheck, rand_array};
    use crate::Tape;

    #[test]
    fn normalizes_each_row() {
        let tape = Tape::<f64>::new();
        let x = tape.constant(rand_array(&[3, 8], 1).mapv(|v| 5.0 * v + 2.0));
        let w = tape.constant(ndarray::ArrayD::ones(ndarray::IxDyn(&[8])));
        let b = tape.constant(ndarray::ArrayD::zeros(ndarray::IxDyn(&[8])));
        let y = x.layer_norm(&w, &b, 0.0).unwrap();
        for row in y.value().rows() {
            assert!(row.mean().unwrap().abs() < 1e-12);
            assert!((row.mapv(|v| v * v).mean().unwrap() - 1.0).abs() < 1e-10);
        }
        assert!(x.layer_norm(&b.narrow(0, 0, 7).unwrap(), &b, 1e-5).is_err());
    }

    #[test]
    fn gradcheck_layer_norm() {
        let inputs = [
            rand_array(&[2, 3, 6], 41),
            rand_array(&[6], 42).mapv(|v| 1.0 + 0.5 * v),
            rand_array(&[6], 43),
        ];
        assert_gradcheck(|x| x[0].layer_norm(&x[1], &x[2], 1e-5), &inputs);
        // More rows than one block of the weight-gradient sum.
        let many = [
            rand_array(&[70, 4], 44),
            rand_array(&[4], 45),
            rand_array(&[4], 46),
        ];
        assert_gradcheck(|x| x[0].layer_norm(&x[1], &x[2], 1e-5), &many);
    }
}
