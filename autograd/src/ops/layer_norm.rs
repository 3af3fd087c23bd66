//! Fused layer norm over the last axis, with weight and bias (llm.c's layernorm pair).
//!
//! Forward, per row of C values: μ, σ² (biased), r = 1/√(σ²+ε), x̂ = (x−μ)·r,
//! y = x̂·w + b. It saves x (shared) and μ, r per row.
//!
//! Backward, per row, with ĝ = g·w: ∂x = r·(ĝ − mean(ĝ) − x̂·mean(ĝ·x̂)); ∂w = Σ_rows g·x̂;
//! ∂b = Σ_rows g. The weight and bias sums are taken over fixed blocks of rows in parallel and
//! the block partials added in order, so the result does not depend on the thread count.

use ndarray::{ArrayD, IxDyn};
use rayon::prelude::*;

use crate::error::{shape_err, Result};
use crate::simd::vectorized;
use crate::tape::{OpRecord, Var};
use crate::Float;

/// Rows per parallel task, forward and backward. The weight/bias gradient sums are taken per
/// block of this many rows and the block partials added in order, so results do not depend on
/// the thread count.
const ROWS_PER_BLOCK: usize = 64;

/// μ and σ² of one row, with `x − μ` left in `deviation` (as long as the row) and `ones` a
/// row of ones. The sums are [`Float::dot`]s — Σx as x·1, Σ(x − μ)² as a dot of the
/// deviations with themselves: the bits of [`crate::simd::sum_map`] (the same products, added
/// in the same order), but on f32 with AVX-512 through explicit wide registers, where the
/// compiler had turned the short (C = 128) rows' sums into 128-bit shuffles.
#[inline(always)]
fn mean_and_variance<T: Float>(row: &[T], ones: &[T], deviation: &mut [T]) -> (T, T) {
    let n = T::from_f64(row.len() as f64);
    let mean = T::dot(row, ones) / n;
    for (d, &x) in deviation.iter_mut().zip(row) {
        *d = x - mean;
    }
    (mean, T::dot(deviation, deviation) / n)
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
        let x = crate::ops::standard_layout(self.value().clone());
        // Copied as slices: an element iterator over a dynamic-rank array took ≈ 3 ns a value,
        // most of a decoding step's layer norm (one row of 768: 7 µs).
        let to_vec = |t: &crate::tape::Tensor<T>| {
            t.as_slice()
                .map_or_else(|| t.iter().copied().collect(), <[T]>::to_vec)
        };
        let (w, b) = (to_vec(weight.value()), to_vec(bias.value()));
        let xs = x.as_slice().expect("standard layout");
        let mut y = Vec::with_capacity(rows * c);
        let mut mean = vec![T::zero(); rows];
        let mut rstd = vec![T::zero(); rows];
        y.spare_capacity_mut()[..rows * c]
            .par_chunks_mut(ROWS_PER_BLOCK * c)
            .zip(xs.par_chunks(ROWS_PER_BLOCK * c))
            .zip(mean.par_chunks_mut(ROWS_PER_BLOCK))
            .zip(rstd.par_chunks_mut(ROWS_PER_BLOCK))
            .for_each(|(((y, x), mean), rstd)| {
                let (ones, mut deviation) = (vec![T::one(); c], vec![T::zero(); c]);
                // Three passes over the block: every row's μ and σ² (independent rows, so
                // the out-of-order core overlaps one row's sums with the next row's instead of
                // waiting on each row's chain of sums, square root and division); then r for
                // the whole block at once (one vector square root and division per 16 rows);
                // then the outputs. Each value is computed as in one pass, so the bits are too.
                vectorized(
                    #[inline(always)]
                    || {
                        for ((x, m), v) in
                            x.chunks_exact(c).zip(mean.iter_mut()).zip(rstd.iter_mut())
                        {
                            (*m, *v) = mean_and_variance(x, &ones, &mut deviation);
                        }
                        for r in rstd.iter_mut() {
                            *r = T::one() / (*r + eps).sqrt();
                        }
                        for (((y, x), &mu), &rs) in y
                            .chunks_exact_mut(c)
                            .zip(x.chunks_exact(c))
                            .zip(mean.iter())
                            .zip(rstd.iter())
                        {
                            for (((y, &x), &w), &b) in y.iter_mut().zip(x).zip(&w).zip(&b) {
                                y.write((x - mu) * rs * w + b);
                            }
                        }
                    },
                )
            });
        // SAFETY: every row of y was written above.
        unsafe { y.set_len(rows * c) };
        let out = ArrayD::from_shape_vec(IxDyn(self.shape()), y).expect("same size");
        OpRecord::new("layer_norm", &[self, weight, bias])
            .attrs(format!("C={c}"))
            .saves("x", &x)
            .saves("mean", &ndarray::aview1(&mean))
            .saves("rstd", &ndarray::aview1(&rstd))
            .finish_folding(out, move |g, needs, mut partial| {
                let g = crate::ops::standard_layout(g.into_shared());
                let gs = g.as_slice().expect("standard layout");
                let xs = x.as_slice().expect("standard layout");
                let inv_c = T::from_f64(1.0 / c as f64);
                let blocks = || {
                    gs.par_chunks(ROWS_PER_BLOCK * c)
                        .zip(xs.par_chunks(ROWS_PER_BLOCK * c))
                        .zip(mean.par_chunks(ROWS_PER_BLOCK))
                        .zip(rstd.par_chunks(ROWS_PER_BLOCK))
                };
                // One pass over the blocks of rows computes ∂x and the blocks' partial weight
                // and bias sums together: g and x are read once, in one parallel section.
                let need_dx = needs[0];
                let need_wb = needs[1] || needs[2];
                // ∂x is added straight into the gradient x has gathered so far (on the residual
                // stream: the residual add after this layer norm handed its gradient on) when
                // that is a row-major buffer, in the same pass that computes it — no new
                // tensor for the tape to add, which costs a write into fresh memory and a pass
                // over three tensors. Each value is `partial + ∂x`, the tape's own sum.
                let fold = need_dx && partial.as_mut().is_some_and(|p| p.as_slice_mut().is_some());
                let mut dx = Vec::with_capacity(if need_dx && !fold { rows * c } else { 0 });
                let dx_blocks: Vec<&mut [std::mem::MaybeUninit<T>]> = if fold {
                    let p = partial
                        .as_mut()
                        .and_then(|p| p.as_slice_mut())
                        .expect("checked");
                    // SAFETY: MaybeUninit<T> has T's layout, and every value read back through
                    // it below is one of p's own (initialised) values.
                    let p: &mut [std::mem::MaybeUninit<T>] =
                        unsafe { std::slice::from_raw_parts_mut(p.as_mut_ptr().cast(), p.len()) };
                    p.chunks_mut(ROWS_PER_BLOCK * c).collect()
                } else if need_dx {
                    dx.spare_capacity_mut()[..rows * c]
                        .chunks_mut(ROWS_PER_BLOCK * c)
                        .collect()
                } else {
                    (0..rows.div_ceil(ROWS_PER_BLOCK))
                        .map(|_| &mut [][..])
                        .collect()
                };
                let partials: Vec<(Vec<T>, Vec<T>)> = dx_blocks
                    .into_par_iter()
                    .zip(blocks())
                    .map(|(dx, (((g, x), mean), rstd))| {
                        let (mut dw, mut db) = if need_wb {
                            (vec![T::zero(); c], vec![T::zero(); c])
                        } else {
                            (Vec::new(), Vec::new())
                        };
                        let (mut gw, mut xhat) = (vec![T::zero(); c], vec![T::zero(); c]);
                        let ones = vec![T::one(); c];
                        vectorized(
                            #[inline(always)]
                            || {
                                for (row, ((g, x), (&mu, &rs))) in g
                                    .chunks_exact(c)
                                    .zip(x.chunks_exact(c))
                                    .zip(mean.iter().zip(rstd))
                                    .enumerate()
                                {
                                    for (xhat, &x) in xhat.iter_mut().zip(x) {
                                        *xhat = (x - mu) * rs;
                                    }
                                    if need_wb {
                                        for (((dw, db), &g), &xhat) in
                                            dw.iter_mut().zip(db.iter_mut()).zip(g).zip(&xhat)
                                        {
                                            *dw += g * xhat;
                                            *db += g;
                                        }
                                    }
                                    if !need_dx {
                                        continue;
                                    }
                                    for ((gw, &g), &w) in gw.iter_mut().zip(g).zip(&w) {
                                        *gw = g * w;
                                    }
                                    // Σĝ and Σĝ·x̂ as dot products (see `mean_and_variance`).
                                    let mean_gw = T::dot(&gw, &ones) * inv_c;
                                    let mean_gw_xhat = T::dot(&gw, &xhat) * inv_c;
                                    let dx = &mut dx[row * c..(row + 1) * c];
                                    let parts = dx.iter_mut().zip(&gw).zip(&xhat);
                                    if fold {
                                        for ((dx, &gw), &xhat) in parts {
                                            // SAFETY: folding, dx holds the partial gradient.
                                            let so_far = unsafe { dx.assume_init_read() };
                                            dx.write(
                                                so_far + rs * (gw - mean_gw - xhat * mean_gw_xhat),
                                            );
                                        }
                                    } else {
                                        for ((dx, &gw), &xhat) in parts {
                                            dx.write(rs * (gw - mean_gw - xhat * mean_gw_xhat));
                                        }
                                    }
                                }
                            },
                        );
                        (dw, db)
                    })
                    .collect();
                let dx = if need_dx && !fold {
                    // SAFETY: every row of dx was written above.
                    unsafe { dx.set_len(rows * c) };
                    let dx = ArrayD::from_shape_vec(IxDyn(x.shape()), dx).expect("same size");
                    // Nothing so far, or a partial gradient in another layout: as the tape adds.
                    crate::tape::accumulate(&mut partial, dx);
                    partial
                } else {
                    partial
                };
                let (dw, db) = if need_wb {
                    let (mut dw, mut db) = (vec![T::zero(); c], vec![T::zero(); c]);
                    for (pw, pb) in &partials {
                        dw.iter_mut().zip(pw).for_each(|(a, &p)| *a += p);
                        db.iter_mut().zip(pb).for_each(|(a, &p)| *a += p);
                    }
                    let vector = |v: Vec<T>| ArrayD::from_shape_vec(IxDyn(&[c]), v).expect("[C]");
                    (needs[1].then(|| vector(dw)), needs[2].then(|| vector(db)))
                } else {
                    (None, None)
                };
                vec![dx, dw, db]
            })
    }
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
    fn x_gradient_is_added_into_what_x_already_has_with_the_tapes_bits() {
        // x [40, 48] feeds a later op too — an add (its gradient handed on row-major, as the
        // residual stream's is) or a transpose (handed on as a transposed view) — whose
        // gradient reaches x first: layer norm then adds its ∂x into that one (folded, or as
        // the tape adds). Either way ∂x must be the later op's gradient + layer norm's own, the
        // sum the tape makes of two separate gradients, to the bit; and ∂w, ∂b unchanged.
        let (x0, w0, b0) = (
            rand_array(&[40, 48], 1).mapv(|v| 2.0 * v as f32),
            rand_array(&[48], 2).mapv(|v| 1.0 + v as f32),
            rand_array(&[48], 3).mapv(|v| v as f32),
        );
        let (g_ln, g_other) = (
            rand_array(&[40, 48], 4).mapv(|v| v as f32),
            rand_array(&[40, 48], 5).mapv(|v| v as f32),
        );
        for transposed in [false, true] {
            let tape = Tape::<f32>::new();
            let (x, w, b) = (
                tape.param("x", x0.clone()),
                tape.param("w", w0.clone()),
                tape.param("b", b0.clone()),
            );
            let ln_part = x
                .layer_norm(&w, &b, 1e-5)
                .unwrap()
                .mul(&tape.constant(g_ln.clone()))
                .unwrap();
            let other_part = if transposed {
                let g_t = g_other.t().to_owned();
                x.transpose(0, 1).unwrap().mul(&tape.constant(g_t)).unwrap()
            } else {
                x.mul(&tape.constant(g_other.clone())).unwrap()
            };
            let loss = ln_part
                .sum_all()
                .unwrap()
                .add(&other_part.sum_all().unwrap());
            let grads = tape.backward(&loss.unwrap()).unwrap();
            // Layer norm's gradients alone, on a tape of its own.
            let alone = Tape::<f32>::new();
            let (xa, wa, ba) = (
                alone.param("x", x0.clone()),
                alone.param("w", w0.clone()),
                alone.param("b", b0.clone()),
            );
            let y = xa.layer_norm(&wa, &ba, 1e-5).unwrap();
            let ga = alone
                .backward(
                    &y.mul(&alone.constant(g_ln.clone()))
                        .unwrap()
                        .sum_all()
                        .unwrap(),
                )
                .unwrap();
            let want_x = &g_other + ga.get(&xa).unwrap();
            assert_eq!(grads.get(&x).unwrap(), &want_x, "transposed: {transposed}");
            assert_eq!(grads.get(&w), ga.get(&wa));
            assert_eq!(grads.get(&b), ga.get(&ba));
            let nodes = tape.nodes();
            let node = nodes.iter().find(|n| n.op == "layer_norm").unwrap();
            assert_eq!(node.input_grads[0], crate::GradStatus::Computed);
        }
    }

    #[test]
    fn each_row_and_its_gradient_have_the_bits_of_the_one_pass_formulas() {
        // f32, C = 128 (the AVX-512 dot) and C = 37 (a scalar tail); 150 rows: three blocks,
        // the last one partial.
        use crate::Float;
        for c in [128, 37] {
            let tape = Tape::<f32>::new();
            let x0 = rand_array(&[150, c], 61).mapv(|v| 3.0 * v as f32 + 0.5);
            let w0 = rand_array(&[c], 62).mapv(|v| 1.0 + 0.5 * v as f32);
            let b0 = rand_array(&[c], 63).mapv(|v| v as f32);
            let y = tape
                .constant(x0.clone())
                .layer_norm(&tape.constant(w0.clone()), &tape.constant(b0.clone()), 1e-5)
                .unwrap();
            let ones = vec![1.0f32; c];
            // μ and r of a row as the op computes them.
            let stats = |row: &[f32]| {
                let mean = f32::dot(row, &ones) / c as f32;
                let dev: Vec<f32> = row.iter().map(|&x| x - mean).collect();
                (mean, 1.0 / (f32::dot(&dev, &dev) / c as f32 + 1e-5).sqrt())
            };
            // ∂x of Σ y·g0 for a fixed g0, against the formula row by row.
            let tape_b = Tape::<f32>::new();
            let g0 = rand_array(&[150, c], 64).mapv(|v| v as f32);
            let xb = tape_b.param("x", x0.clone());
            let yb = xb
                .layer_norm(
                    &tape_b.constant(w0.clone()),
                    &tape_b.constant(b0.clone()),
                    1e-5,
                )
                .unwrap();
            let loss = yb
                .mul(&tape_b.constant(g0.clone()))
                .unwrap()
                .sum_all()
                .unwrap();
            let dx = tape_b
                .backward(&loss)
                .unwrap()
                .get_by_name("x")
                .unwrap()
                .clone();
            for ((row, g), dx) in x0.rows().into_iter().zip(g0.rows()).zip(dx.rows()) {
                let row = row.to_vec();
                let (mean, rstd) = stats(&row);
                let xhat: Vec<f32> = row.iter().map(|&x| (x - mean) * rstd).collect();
                let gw: Vec<f32> = g.iter().zip(w0.iter()).map(|(&g, &w)| g * w).collect();
                let (mg, mgx) = (
                    f32::dot(&gw, &ones) * (1.0 / c as f64) as f32,
                    f32::dot(&gw, &xhat) * (1.0 / c as f64) as f32,
                );
                for j in 0..c {
                    let want = rstd * (gw[j] - mg - xhat[j] * mgx);
                    assert_eq!(dx[j], want, "∂x, C = {c}, column {j}");
                }
            }
            for (row, got) in x0.rows().into_iter().zip(y.value().rows()) {
                let row = row.to_vec();
                let (mean, rstd) = stats(&row);
                for (j, &g) in got.iter().enumerate() {
                    let want = (row[j] - mean) * rstd * w0[j] + b0[j];
                    assert_eq!(g, want, "C = {c}, column {j}");
                }
            }
        }
    }

    #[test]
    fn each_gradient_is_the_same_whichever_others_are_needed() {
        // 150 rows: three blocks, the last one partial.
        let (x0, w0, b0) = (
            rand_array(&[150, 24], 51),
            rand_array(&[24], 52).mapv(|v| 1.0 + 0.5 * v),
            rand_array(&[24], 53),
        );
        let grads = |x_param: bool, wb_param: bool| {
            let tape = Tape::<f64>::new();
            let leaf = |param: bool, name: &str, v: &ndarray::ArrayD<f64>| {
                if param {
                    tape.param(name, v.clone())
                } else {
                    tape.frozen(name, v.clone())
                }
            };
            let (x, w, b) = (
                leaf(x_param, "x", &x0),
                leaf(wb_param, "w", &w0),
                leaf(wb_param, "b", &b0),
            );
            let y = x.layer_norm(&w, &b, 1e-5).unwrap();
            let loss = y.mul(&y).unwrap().sum_all().unwrap();
            let g = tape.backward(&loss).unwrap();
            ["x", "w", "b"].map(|name| g.get_by_name(name).cloned())
        };
        let all = grads(true, true);
        let x_only = grads(true, false);
        let wb_only = grads(false, true);
        assert!(all.iter().all(Option::is_some));
        assert_eq!(x_only, [all[0].clone(), None, None]);
        assert_eq!(wb_only, [None, all[1].clone(), all[2].clone()]);
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
