//! Fused multi-head scaled dot-product attention, causal or not.
//!
//! Inputs are in the model's layout, `q: [B, Tq, C]`, `k, v: [B, Tk, C]` with `C = H·D` — they
//! may be strided views (e.g. narrowed out of GPT-2's fused `c_attn` output), which are read in
//! place. For every (batch, head) pair, in parallel:
//!
//! ```text
//! S = q·kᵀ/√D            [Tq, Tk]
//! P = softmax(S masked)  query i sees keys j ≤ i + (Tk − Tq) when causal
//! O = P·v                [Tq, D]
//! ```
//! The probabilities P `[B, H, Tq, Tk]` are saved for backward (llm.c does the same):
//!
//! ```text
//! ∂v = Pᵀ·∂O     ∂P = ∂O·vᵀ     ∂S = P ⊙ (∂P − rowsum(∂P ⊙ P)) / √D
//! ∂q = ∂S·k      ∂k = ∂Sᵀ·q
//! ```
//! With `Tk > Tq` and `causal`, the queries are the last `Tq` positions — the KV-cache case.

use ndarray::{s, Array3, Array4, ArrayD, ArrayView2, ArrayViewMut2, Axis, Ix3, IxDyn};
use rayon::prelude::*;

use crate::error::{arg_err, shape_err, Result};
use crate::gemm::gemm;
use crate::tape::{OpRecord, Tensor, Var};
use crate::Float;

/// The (b, h) head slice `[T, D]` of a `[B, T, C]` tensor, as a strided view.
fn head<T: Float>(
    x: ndarray::ArrayView3<'_, T>,
    b: usize,
    h: usize,
    d: usize,
) -> ArrayView2<'_, T> {
    x.slice_move(s![b, .., h * d..(h + 1) * d])
}

/// `[B·H, T, D]` per-head blocks → `[B, T, H·D]` (one copy, row-major).
fn heads_to_model_layout<T: Float>(x: Array3<T>, batch: usize, heads: usize) -> ArrayD<T> {
    let (_, t, d) = x.dim();
    let x4: Array4<T> = x
        .into_shape_with_order((batch, heads, t, d))
        .expect("same size");
    let merged = x4
        .permuted_axes([0, 2, 1, 3])
        .as_standard_layout()
        .into_owned();
    merged
        .into_shape_with_order(IxDyn(&[batch, t, heads * d]))
        .expect("same size")
}

fn softmax_masked_row<T: Float>(row: &mut ndarray::ArrayViewMut1<'_, T>, visible: usize) {
    let max = row
        .slice(s![..visible])
        .fold(T::neg_infinity(), |m, &v| m.max(v));
    let mut sum = T::zero();
    for v in row.slice_mut(s![..visible]).iter_mut() {
        *v = (*v - max).exp_fast();
        sum += *v;
    }
    let inv = T::one() / sum;
    row.slice_mut(s![..visible]).mapv_inplace(|v| v * inv);
    row.slice_mut(s![visible..]).fill(T::zero());
}

fn view3<T: Float>(x: &Tensor<T>) -> ndarray::ArrayView3<'_, T> {
    x.view()
        .into_dimensionality::<Ix3>()
        .expect("checked rank 3")
}

/// Scaled dot-product attention over `n_head` heads (see the module docs).
pub fn attention<'t, T: Float>(
    q: &Var<'t, T>,
    k: &Var<'t, T>,
    v: &Var<'t, T>,
    n_head: usize,
    causal: bool,
) -> Result<Var<'t, T>> {
    let (qs, ks) = (q.shape(), k.shape());
    if qs.len() != 3 || ks.len() != 3 || v.shape() != ks || qs[0] != ks[0] || qs[2] != ks[2] {
        return shape_err(
            "attention",
            qs,
            ks,
            format!(
                "need q [B, Tq, C] and k, v [B, Tk, C] (v is {:?})",
                v.shape()
            ),
        );
    }
    let (batch, tq, c, tk) = (qs[0], qs[1], qs[2], ks[1]);
    if n_head == 0 || c % n_head != 0 {
        return arg_err(
            "attention",
            format!("{c} channels do not split into {n_head} heads"),
        );
    }
    if causal && tq > tk {
        return arg_err(
            "attention",
            format!("causal attention needs at least as many keys ({tk}) as queries ({tq})"),
        );
    }
    let d = c / n_head;
    let scale = T::from_f64(1.0 / (d as f64).sqrt());
    let visible = move |i: usize| if causal { i + 1 + tk - tq } else { tk };
    let (qv, kv, vv) = (q.value().clone(), k.value().clone(), v.value().clone());

    let mut probs = Array3::<T>::zeros((batch * n_head, tq, tk));
    let mut heads_out = Array3::<T>::zeros((batch * n_head, tq, d));
    {
        let (q3, k3, v3) = (view3(&qv), view3(&kv), view3(&vv));
        probs
            .outer_iter_mut()
            .into_par_iter()
            .zip(heads_out.outer_iter_mut().into_par_iter())
            .enumerate()
            .for_each(|(bh, (mut p, o))| {
                let (b, h) = (bh / n_head, bh % n_head);
                let kh = head(k3, b, h, d);
                gemm(scale, head(q3, b, h, d), kh.t(), T::zero(), p.view_mut());
                for (i, mut row) in p.axis_iter_mut(Axis(0)).enumerate() {
                    softmax_masked_row(&mut row, visible(i));
                }
                gemm(T::one(), p.view(), head(v3, b, h, d), T::zero(), o);
            });
    }
    let out = heads_to_model_layout(heads_out, batch, n_head);
    OpRecord::new("attention", &[q, k, v])
        .attrs(format!("heads={n_head} causal={causal}"))
        .saves("q", &qv)
        .saves("k", &kv)
        .saves("v", &vv)
        .saves("probs", &probs)
        .finish(out, move |g, needs| {
            let g3 = g.into_dimensionality::<Ix3>().expect("output rank 3");
            let (q3, k3, v3) = (view3(&qv), view3(&kv), view3(&vv));
            let mut dq = Array3::<T>::zeros((batch * n_head, if needs[0] { tq } else { 0 }, d));
            let mut dk = Array3::<T>::zeros((batch * n_head, if needs[1] { tk } else { 0 }, d));
            let mut dv = Array3::<T>::zeros((batch * n_head, if needs[2] { tk } else { 0 }, d));
            probs
                .outer_iter_mut()
                .into_par_iter()
                .zip(dq.outer_iter_mut().into_par_iter())
                .zip(dk.outer_iter_mut().into_par_iter())
                .zip(dv.outer_iter_mut().into_par_iter())
                .enumerate()
                .for_each(|(bh, (((mut p, dq), dk), dv))| {
                    let (b, h) = (bh / n_head, bh % n_head);
                    let gh = head(g3.view(), b, h, d);
                    if needs[2] {
                        gemm(T::one(), p.t(), gh, T::zero(), dv);
                    }
                    if !(needs[0] || needs[1]) {
                        return;
                    }
                    // ∂P, then ∂S in place of P (P is not needed after this head).
                    let mut dp = ndarray::Array2::<T>::zeros((tq, tk));
                    gemm(
                        T::one(),
                        gh,
                        head(v3, b, h, d).t(),
                        T::zero(),
                        dp.view_mut(),
                    );
                    for (mut p_row, dp_row) in p.axis_iter_mut(Axis(0)).zip(dp.axis_iter(Axis(0))) {
                        let dot = p_row
                            .iter()
                            .zip(dp_row)
                            .fold(T::zero(), |s, (&p, &dp)| s + p * dp);
                        p_row.zip_mut_with(&dp_row, |p, &dp| *p = *p * (dp - dot) * scale);
                    }
                    let ds: ArrayViewMut2<T> = p;
                    if needs[0] {
                        gemm(T::one(), ds.view(), head(k3, b, h, d), T::zero(), dq);
                    }
                    if needs[1] {
                        gemm(T::one(), ds.t(), head(q3, b, h, d), T::zero(), dk);
                    }
                });
            vec![
                needs[0].then(|| heads_to_model_layout(dq, batch, n_head)),
                needs[1].then(|| heads_to_model_layout(dk, batch, n_head)),
                needs[2].then(|| heads_to_model_layout(dv, batch, n_head)),
            ]
        })
}

#[cfg(test)]
mod tests {
    use super::attention;
    use crate::ops::test_util::{assert_gradcheck, rand_array};
    use crate::Tape;

    /// The same attention composed from primitive ops, as a reference.
    fn composed<'t>(
        q: &crate::Var<'t, f64>,
        k: &crate::Var<'t, f64>,
        v: &crate::Var<'t, f64>,
        heads: usize,
    ) -> crate::Result<crate::Var<'t, f64>> {
        let (b, tq, c) = (q.shape()[0], q.shape()[1], q.shape()[2]);
        let tk = k.shape()[1];
        let d = c / heads;
        let split =
            |x: &crate::Var<'t, f64>, t| x.reshape(&[b, t, heads, d])?.permute(&[0, 2, 1, 3]);
        let (qh, kh, vh) = (split(q, tq)?, split(k, tk)?, split(v, tk)?);
        let scores = qh
            .matmul(&kh.transpose(2, 3)?)?
            .scale(1.0 / (d as f64).sqrt())?;
        let mask =
            ndarray::Array2::from_shape_fn(
                (tq, tk),
                |(i, j)| if j <= i + tk - tq { 0.0 } else { -1e30 },
            );
        let masked = scores.add(&q.tape().constant(mask.into_dyn()))?;
        let out = masked.softmax()?.matmul(&vh)?;
        out.permute(&[0, 2, 1, 3])?.reshape(&[b, tq, c])
    }

    #[test]
    fn fused_attention_equals_the_composed_ops() {
        let tape = Tape::<f64>::new();
        let q = tape.param("q", rand_array(&[2, 5, 6], 1));
        let k = tape.param("k", rand_array(&[2, 5, 6], 2));
        let v = tape.param("v", rand_array(&[2, 5, 6], 3));
        let fused = attention(&q, &k, &v, 2, true).unwrap();
        let reference = composed(&q, &k, &v, 2).unwrap();
        let diff = (fused.value() - reference.value())
            .mapv(f64::abs)
            .fold(0.0f64, |m, &x| m.max(x));
        assert!(diff < 1e-12, "max diff {diff}");
    }

    #[test]
    fn gradcheck_attention_causal_noncausal_and_kv_cache_shapes() {
        let (q, k, v) = (
            rand_array(&[2, 4, 6], 4),
            rand_array(&[2, 4, 6], 5),
            rand_array(&[2, 4, 6], 6),
        );
        assert_gradcheck(
            |x| attention(&x[0], &x[1], &x[2], 3, true),
            &[q.clone(), k.clone(), v.clone()],
        );
        assert_gradcheck(
            |x| attention(&x[0], &x[1], &x[2], 2, false),
            &[q.clone(), k.clone(), v.clone()],
        );
        // Two queries against four cached keys; and q, k, v narrowed out of one fused tensor.
        let q2 = rand_array(&[2, 2, 6], 7);
        assert_gradcheck(|x| attention(&x[0], &x[1], &x[2], 3, true), &[q2, k, v]);
        assert_gradcheck(
            |x| {
                let qkv = &x[0];
                attention(
                    &qkv.narrow(2, 0, 4)?,
                    &qkv.narrow(2, 4, 4)?,
                    &qkv.narrow(2, 8, 4)?,
                    2,
                    true,
                )
            },
            &[rand_array(&[1, 3, 12], 8)],
        );
    }

    #[test]
    fn bad_shapes_are_errors() {
        let tape = Tape::<f32>::new();
        let x = tape.constant(ndarray::ArrayD::<f32>::zeros(ndarray::IxDyn(&[1, 3, 6])));
        assert!(attention(&x, &x, &x, 4, true).is_err());
        let short = x.narrow(1, 0, 2).unwrap();
        assert!(attention(&x, &short, &short, 2, true).is_err());
    }
}
