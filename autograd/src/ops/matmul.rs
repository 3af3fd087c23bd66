//! Matrix multiplication, forward and backward, through the strided GEMM kernel.
//!
//! Three forms:
//! * `[m, k] · [k, n] → [m, n]`;
//! * activations times a shared weight, `[..., m, k] · [k, n] → [..., m, n]`: the leading dims
//!   are merged into rows (a view when contiguous) so the whole batch is **one** GEMM, and the
//!   weight gradient is one GEMM summing over all rows;
//! * batched, `[..., m, k] · [..., k, n]` with equal leading dims: one GEMM per batch entry,
//!   spread over rayon.
//!
//! `linear` is the layer form with its bias fused in: the output starts as the bias broadcast
//! over rows and the GEMM accumulates onto it (β = 1), so no separate add pass is made;
//! backward adds ∂bias = Σ_rows G. Its fused variants do one more thing as the GEMM stores its
//! tiles: `linear_residual` adds the residual stream, `linear_gelu` applies GELU (saving its
//! derivative), `linear_low_rank` / `linear_lora` add LoRA's terms.
//!
//! Backward: ∂A = G·Bᵀ and ∂B = Aᵀ·G, each computed only if that input needs it — this is where
//! a frozen weight saves a whole GEMM. Bᵀ and Aᵀ are stride-swapped views, never copies.

use ndarray::{Array2, Array3, ArrayD, ArrayView2, ArrayView3, ArrayViewMut2, Ix2, IxDyn};
use rayon::prelude::*;

use super::KEPT_FOR_GRADIENT;
use crate::error::{shape_err, Result};
use crate::gemm::{
    gemm, gemm_new, gemm_new_bias, gemm_new_gelu, gemm_new_lora, gemm_new_low_rank, gemm_new_pair,
    gemm_side_by_side, gemm_write, LowRankPart, Product,
};
use crate::tape::{OpRecord, Tensor, Var};
use crate::Float;

/// The tensor as a matrix of `rows × cols` (row-major); a view when the layout allows.
fn as_matrix<T: Float>(x: &Tensor<T>, rows: usize, cols: usize) -> ndarray::CowArray<'_, T, Ix2> {
    x.to_shape((rows, cols)).expect("element count checked")
}

/// Whether `x` is a 2-D column-major matrix, i.e. the transposed view of a row-major one.
fn is_transposed_matrix<T: Float>(x: &Tensor<T>) -> bool {
    x.ndim() == 2 && !x.is_standard_layout() && x.t().is_standard_layout()
}

fn as_batches<T: Float>(
    x: &Tensor<T>,
    batch: usize,
    rows: usize,
    cols: usize,
) -> ndarray::CowArray<'_, T, ndarray::Ix3> {
    x.to_shape((batch, rows, cols))
        .expect("element count checked")
}

fn matmul_2d<T: Float>(a: ArrayView2<T>, b: ArrayView2<T>) -> Array2<T> {
    gemm_new(T::one(), a, b)
}

/// `c[i] = a[i] · b[i]` for every batch entry `i`, in parallel over entries.
fn matmul_batched<T: Float>(
    a: ArrayView3<T>,
    b: ArrayView3<T>,
    transpose_a: bool,
    transpose_b: bool,
) -> Array3<T> {
    let m = if transpose_a { a.dim().2 } else { a.dim().1 };
    let n = if transpose_b { b.dim().1 } else { b.dim().2 };
    let mut c = Array3::uninit((a.dim().0, m, n));
    let work: Vec<_> = a
        .outer_iter()
        .zip(b.outer_iter())
        .zip(c.outer_iter_mut())
        .collect();
    work.into_par_iter().for_each(|((a, b), c)| {
        let a = if transpose_a { a.reversed_axes() } else { a };
        let b = if transpose_b { b.reversed_axes() } else { b };
        gemm_write(T::one(), a, b, c);
    });
    // SAFETY: every entry's GEMM wrote all of its block.
    unsafe { c.assume_init() }
}

fn to_shape<T: Float>(
    x: ndarray::ArrayBase<impl ndarray::Data<Elem = T>, impl ndarray::Dimension>,
    shape: &[usize],
) -> ArrayD<T> {
    x.into_owned()
        .into_shape_with_order(IxDyn(shape))
        .expect("standard layout, equal size")
}

impl<'t, T: Float> Var<'t, T> {
    /// Matrix product over the last two axes (see the module docs for the accepted forms).
    pub fn matmul(&self, other: &Var<'t, T>) -> Result<Var<'t, T>> {
        let (a_shape, b_shape) = (self.shape().to_vec(), other.shape().to_vec());
        let (ad, bd) = (a_shape.len(), b_shape.len());
        if ad < 2 || bd < 2 {
            return shape_err(
                "matmul",
                &a_shape,
                &b_shape,
                "both operands need at least 2 dims",
            );
        }
        let (m, k, n) = (a_shape[ad - 2], a_shape[ad - 1], b_shape[bd - 1]);
        if b_shape[bd - 2] != k {
            return shape_err(
                "matmul",
                &a_shape,
                &b_shape,
                format!("inner dims differ ({k} vs {})", b_shape[bd - 2]),
            );
        }
        let mut out_shape = a_shape[..ad - 1].to_vec();
        out_shape.push(n);
        let (a, b) = (self.value().clone(), other.value().clone());
        let inputs = [self, other];
        // ∂a = G·bᵀ reads only b and ∂b = aᵀ·G only a: each is kept only while the other
        // operand's gradient can be asked for (a frozen tied lm_head keeps no activations).
        let kept_a = other.requires_grad().then(|| a.clone());
        let kept_b = self.requires_grad().then(|| b.clone());
        let record = OpRecord::new("matmul", &inputs)
            .saves_kept("a", kept_a.as_ref())
            .saves_kept("b", kept_b.as_ref());

        if bd == 2 {
            // Activations [..., m, k] times a shared weight [k, n]: all rows in one GEMM.
            let rows = a_shape[..ad - 1].iter().product::<usize>();
            let c = matmul_2d(as_matrix(&a, rows, k).view(), as_matrix(&b, k, n).view());
            let out = to_shape(c, &out_shape);
            // b a transposed view of a row-major weight (a tied embedding as the output
            // layer): ∂bᵀ = Gᵀ·a is computed row-major, so that the gradient reaching the
            // weight has the weight's own layout (the optimizer's contiguous fast path; same
            // GEMM, same cost).
            let b_transposed = is_transposed_matrix(&b);
            return record
                .attrs(format!("[{rows}×{k}]·[{k}×{n}]"))
                .finish(out, move |g, needs| {
                    let g2 = g
                        .to_shape((rows, n))
                        .expect("gradient has the output's size");
                    let a2 = needs[1]
                        .then(|| as_matrix(kept_a.as_ref().expect(KEPT_FOR_GRADIENT), rows, k));
                    let b2 = needs[0]
                        .then(|| as_matrix(kept_b.as_ref().expect(KEPT_FOR_GRADIENT), k, n));
                    let gb_product = a2.as_ref().map(|a2| {
                        if b_transposed {
                            (g2.t(), a2.view())
                        } else {
                            (a2.t(), g2.view())
                        }
                    });
                    let (ga, gb) =
                        gemm_new_pair(b2.as_ref().map(|b2| (g2.view(), b2.t())), gb_product);
                    let gb = gb.map(|gb| {
                        if b_transposed {
                            gb.reversed_axes().into_dyn()
                        } else {
                            gb.into_dyn()
                        }
                    });
                    vec![ga.map(|ga| to_shape(ga, &a_shape)), gb]
                });
        }
        if a_shape[..ad - 2] != b_shape[..bd - 2] {
            return shape_err(
                "matmul",
                &a_shape,
                &b_shape,
                "batch dims must be equal (or the right operand 2-D)",
            );
        }
        let batch = a_shape[..ad - 2].iter().product::<usize>();
        let c = matmul_batched(
            as_batches(&a, batch, m, k).view(),
            as_batches(&b, batch, k, n).view(),
            false,
            false,
        );
        let out = to_shape(c, &out_shape);
        record
            .attrs(format!("{batch}×[{m}×{k}]·[{k}×{n}]"))
            .finish(out, move |g, needs| {
                let g3 = g
                    .to_shape((batch, m, n))
                    .expect("gradient has the output's size");
                let ga = needs[0].then(|| {
                    let b3 = as_batches(kept_b.as_ref().expect(KEPT_FOR_GRADIENT), batch, k, n);
                    to_shape(matmul_batched(g3.view(), b3.view(), false, true), &a_shape)
                });
                let gb = needs[1].then(|| {
                    let a3 = as_batches(kept_a.as_ref().expect(KEPT_FOR_GRADIENT), batch, m, k);
                    to_shape(matmul_batched(a3.view(), g3.view(), true, false), &b_shape)
                });
                vec![ga, gb]
            })
    }
}

/// `rows` copies of `row` (the bias a linear's GEMM starts from), written in parallel for
/// large outputs: ndarray's copy of a broadcast view runs on one thread (0.7 ms of c_fc's
/// 18 ms forward in GPT-2).
fn rows_of<T: Float>(row: ndarray::ArrayView1<T>, rows: usize) -> Array2<T> {
    let row = row.to_vec();
    let n = row.len();
    let mut out = Vec::with_capacity(rows * n);
    let fill = |chunk: &mut [std::mem::MaybeUninit<T>]| {
        for dst in chunk.chunks_mut(n.max(1)) {
            for (d, &v) in dst.iter_mut().zip(&row) {
                d.write(v);
            }
        }
    };
    let spare = &mut out.spare_capacity_mut()[..rows * n];
    if rows * n >= super::PARALLEL_MIN_LEN && n > 0 {
        // Whole rows per task, at least PARALLEL_MIN_LEN values each.
        let per_task = super::PARALLEL_MIN_LEN.div_ceil(n) * n;
        spare.par_chunks_mut(per_task).for_each(fill);
    } else {
        fill(spare);
    }
    // SAFETY: every element below rows · n was written above.
    unsafe { out.set_len(rows * n) };
    Array2::from_shape_vec((rows, n), out).expect("rows · n values")
}

/// The input `x` of `x·w` as a product's backward keeps it: only for ∂w = xᵀ·G, so only while
/// `w` can have a gradient. A frozen weight's product (every base layer under LoRA, a
/// frozen tied lm_head) keeps none, so its input is freed once the forward pass is done with
/// it instead of living until backward: GPT-2's MLP activation alone is 12.6 MB per layer at
/// B4×T256.
fn kept_for_weight<T: Float>(x: &Tensor<T>, w: &Var<'_, T>) -> Option<Tensor<T>> {
    w.requires_grad().then(|| x.clone())
}

/// A linear layer's shapes: `x [..., k] · w [k, n] (+ bias [n])` → (rows, k, n, output shape).
fn linear_shapes<T: Float>(
    op: &'static str,
    x: &Var<'_, T>,
    w: &Var<'_, T>,
    bias: Option<&Var<'_, T>>,
) -> Result<(usize, usize, usize, Vec<usize>)> {
    let (x_shape, w_shape) = (x.shape(), w.shape());
    if x_shape.is_empty() || w_shape.len() != 2 || x_shape[x_shape.len() - 1] != w_shape[0] {
        return shape_err(op, x_shape, w_shape, "need x [..., k] and a weight [k, n]");
    }
    let (k, n) = (w_shape[0], w_shape[1]);
    if let Some(b) = bias {
        if b.shape() != [n] {
            return shape_err(op, b.shape(), w_shape, format!("the bias must be [{n}]"));
        }
    }
    let lead = &x_shape[..x_shape.len() - 1];
    let mut out_shape = lead.to_vec();
    out_shape.push(n);
    Ok((lead.iter().product(), k, n, out_shape))
}

/// `x·w + bias` (`rows × n`), the bias added as the kernel stores its tiles where it can.
fn linear_value<T: Float>(
    x2: ArrayView2<T>,
    w2: ArrayView2<T>,
    bias: Option<&Tensor<T>>,
) -> Array2<T> {
    let Some(b) = bias else {
        return gemm_new(T::one(), x2, w2);
    };
    let b = b
        .view()
        .into_dimensionality::<ndarray::Ix1>()
        .expect("checked");
    let fused = b.as_slice().and_then(|bias| gemm_new_bias(x2, w2, bias));
    fused.unwrap_or_else(|| {
        let mut c = rows_of(b, x2.nrows());
        gemm(T::one(), x2, w2, T::one(), c.view_mut());
        c
    })
}

/// A linear layer's backward, each gradient only if needed (`needs`: x, w, then the bias if
/// `has_bias`): ∂x = G·wᵀ and ∂w = xᵀ·G side by side, ∂bias = Σ_rows G. `x` is the input the
/// op kept ([`kept_for_weight`]): there whenever ∂w can be asked for.
fn linear_grads<T: Float>(
    g2: ArrayView2<T>,
    x: Option<&Tensor<T>>,
    w: &Tensor<T>,
    x_shape: &[usize],
    has_bias: bool,
    needs: &[bool],
) -> Vec<Option<ArrayD<T>>> {
    let (rows, n) = g2.dim();
    let k = w.shape()[0];
    let w2 = as_matrix(w, k, n);
    let x2 = needs[1].then(|| as_matrix(x.expect(KEPT_FOR_GRADIENT), rows, k));
    let (gx, gw) = gemm_new_pair(
        needs[0].then(|| (g2, w2.t())),
        x2.as_ref().map(|x2| (x2.t(), g2)),
    );
    let mut grads = vec![
        gx.map(|gx| to_shape(gx, x_shape)),
        gw.map(|gw| gw.into_dyn()),
    ];
    if has_bias {
        grads.push(needs[2].then(|| g2.sum_axis(ndarray::Axis(0)).into_dyn()));
    }
    grads
}

/// Where one low-rank part goes: (output start, u's first column, rank, output width, scale).
type LowRankSpan<T> = (usize, usize, usize, usize, T);

/// Checks the low-rank parts against an output of `shape` and `u`: each `(v [r, w], start,
/// scale)` takes the next r of u's columns (which they must use up) into output columns
/// `start .. start + w`.
fn low_rank_spans<T: Float>(
    op: &'static str,
    shape: &[usize],
    us: &[usize],
    parts: &[(&Var<'_, T>, usize, f64)],
) -> Result<Vec<LowRankSpan<T>>> {
    let Some((&width, lead)) = shape.split_last() else {
        return crate::error::arg_err(op, "needs at least one axis");
    };
    if us.len() != shape.len() || &us[..us.len() - 1] != lead {
        let lead_text = lead
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        return shape_err(
            op,
            shape,
            us,
            format!("u must be [{lead_text}, r₁ + r₂ + …]"),
        );
    }
    let u_width = us[us.len() - 1];
    let mut spans = Vec::with_capacity(parts.len());
    let mut u_from = 0;
    for (v, start, scale) in parts {
        let vs = v.shape();
        if vs.len() != 2 || u_from + vs[0] > u_width || start + vs[1] > width {
            return shape_err(
                op,
                us,
                vs,
                format!(
                    "need v [r, w] with r among u's columns {u_from}..{u_width} and {start} + w ≤ {width}"
                ),
            );
        }
        spans.push((*start, u_from, vs[0], vs[1], T::from_f64(*scale)));
        u_from += vs[0];
    }
    if u_from != u_width {
        return shape_err(
            op,
            us,
            &[u_from],
            "the parts' ranks must add up to u's last dim",
        );
    }
    Ok(spans)
}

/// `out[.., span] += scale · u[.., cols] · v` for each part: one GEMM each, accumulating
/// (β = 1) into a strided view of the output's columns — no `[..., w]` delta is built.
fn add_low_rank_parts<T: Float>(
    mut out2: ArrayViewMut2<T>,
    u2: ArrayView2<T>,
    vs: &[Tensor<T>],
    spans: &[LowRankSpan<T>],
) {
    // Part after part, each split in the fixed row halves of the product that wrote the base
    // (c_attn's): each thread adds to the rows in its own cache. Run side by side, each part
    // whole on one thread, the same forward was 2–3 % slower (nanogpt-cpu).
    for (v, &(start, from, r, w, scale)) in vs.iter().zip(spans) {
        gemm(
            scale,
            u2.slice(ndarray::s![.., from..from + r]),
            as_matrix(v, r, w).view(),
            T::one(),
            out2.slice_mut(ndarray::s![.., start..start + w]),
        );
    }
}

/// The low-rank parts' backward: ∂u (`[..., Σ r]`, shaped `u_shape`) and each part's ∂v, each
/// only if needed: ∂u[.., cols] = scale·G[.., span]·vᵀ, ∂v = scale·u[.., cols]ᵀ·G[.., span].
/// All are independent products, run side by side.
fn low_rank_grads<T: Float>(
    g2: ArrayView2<T>,
    u: &Tensor<T>,
    vs: &[Tensor<T>],
    spans: &[LowRankSpan<T>],
    need_u: bool,
    need_v: &[bool],
) -> (Option<ArrayD<T>>, Vec<Option<ArrayD<T>>>) {
    let rows = g2.nrows();
    let u_width = u.shape()[u.ndim() - 1];
    let u2 = as_matrix(u, rows, u_width);
    let mut gu = need_u.then(|| Array2::<T>::uninit((rows, u_width)));
    let mut gv: Vec<_> = spans
        .iter()
        .zip(need_v)
        .map(|(&(_, _, r, w, _), &need)| need.then(|| Array2::uninit((r, w))))
        .collect();
    let v2 = low_rank_matrices(vs, spans);
    // The parts take u's columns in order, so ∂u's blocks are consecutive disjoint views.
    let mut products = Vec::with_capacity(2 * spans.len());
    let mut gu_rest = gu.as_mut().map(|gu| gu.view_mut());
    for ((v, gv), &(start, from, r, w, scale)) in v2.iter().zip(&mut gv).zip(spans) {
        let g_span = g2.slice(ndarray::s![.., start..start + w]);
        if let Some(rest) = gu_rest.take() {
            let (block, tail) = rest.split_at(ndarray::Axis(1), r);
            products.push(Product::write(scale, g_span, v.t(), block));
            gu_rest = Some(tail);
        }
        if let Some(gv) = gv {
            let u_cols = u2.slice(ndarray::s![.., from..from + r]).reversed_axes();
            products.push(Product::write(scale, u_cols, g_span, gv.view_mut()));
        }
    }
    gemm_side_by_side(products);
    // SAFETY: each product wrote its block: ∂v whole, and the parts' column blocks cover all
    // of ∂u's columns (checked by `low_rank_spans`).
    let gv = gv
        .into_iter()
        .map(|gv| gv.map(|gv| unsafe { gv.assume_init() }.into_dyn()))
        .collect();
    let gu = gu.map(|gu| to_shape(unsafe { gu.assume_init() }, u.shape()));
    (gu, gv)
}

/// `x·w + bias` plus the low-rank parts, summed inside the GEMM's tiles where the fused kernel
/// takes the shapes, otherwise by one accumulating product per part.
fn linear_low_rank_value<T: Float>(
    x2: ArrayView2<T>,
    w2: ArrayView2<T>,
    bias: Option<&Var<'_, T>>,
    u2: ArrayView2<T>,
    vs: &[Tensor<T>],
    spans: &[LowRankSpan<T>],
) -> Array2<T> {
    let v2 = low_rank_matrices(vs, spans);
    let bias_value = bias.map(|b| b.value());
    let bias_slice = bias_value.map(|b| b.as_slice());
    let fused = match bias_slice {
        Some(None) => None,
        Some(Some(_)) | None => gemm_new_low_rank(
            x2,
            w2,
            bias_slice.flatten(),
            u2,
            &low_rank_kernel_parts(&v2, spans),
            None,
        ),
    };
    fused.unwrap_or_else(|| {
        let mut c = linear_value(x2, w2, bias_value);
        add_low_rank_parts(c.view_mut(), u2, vs, spans);
        c
    })
}

/// A LoRA linear's ∂x = G·wᵀ + ∂u·a (and ∂w = xᵀ·G when `need_w`, from `x2`, which is there
/// then). Alone, ∂x is one GEMM with ∂u·a summed inside its tiles as a low-rank term over all
/// of its columns; with ∂w (both trained) the two big products run side by side and ∂u·a is
/// accumulated after.
fn lora_input_grad<T: Float>(
    g2: ArrayView2<T>,
    w2: ArrayView2<T>,
    x2: Option<ArrayView2<T>>,
    gu2: ArrayView2<T>,
    a2: ArrayView2<T>,
    need_w: bool,
) -> (Option<Array2<T>>, Option<Array2<T>>) {
    let term = [LowRankPart {
        v: a2,
        start: 0,
        u_from: 0,
        scale: T::one(),
    }];
    let fused = (!need_w)
        .then(|| gemm_new_low_rank(g2, w2.t(), None, gu2, &term, None))
        .flatten();
    if let Some(gx) = fused {
        return (Some(gx), None);
    }
    let gw_product = need_w.then(|| (x2.expect(KEPT_FOR_GRADIENT).reversed_axes(), g2));
    let (gx, gw) = gemm_new_pair(Some((g2, w2.t())), gw_product);
    let mut gx = gx.expect("asked for");
    gemm(T::one(), gu2, a2, T::one(), gx.view_mut());
    (Some(gx), gw)
}

/// One LoRA term of [`Var::linear_lora`]: `scale · (x·aᵀ)·bᵀ` added to the output columns
/// `start .. start + w`, with `a` `[r, in]` and `b` `[w, r]` (LoRA's A and B as stored).
#[derive(Clone, Copy)]
pub struct LoraTerm<'a, 't, T: Float> {
    pub a: &'a Var<'t, T>,
    pub b: &'a Var<'t, T>,
    pub start: usize,
    pub scale: f64,
}

/// `[rᵢ, cols]` matrices stacked by rows into one `[Σ rᵢ, cols]` tensor (the one matrix
/// itself, uncopied, when there is one).
fn stack_rows<T: Float>(values: &[Tensor<T>]) -> Tensor<T> {
    match values {
        [one] => one.clone(),
        _ => super::shape::concat_values(&values.iter().collect::<Vec<_>>(), 0).into_shared(),
    }
}

/// Each low-rank part's v as an `r × w` matrix (a view when its layout allows).
fn low_rank_matrices<'a, T: Float>(
    vs: &'a [Tensor<T>],
    spans: &[LowRankSpan<T>],
) -> Vec<ndarray::CowArray<'a, T, Ix2>> {
    // A 2-D v is read in place whatever its strides (Bᵀ as a view of B): copying it into
    // row-major order would be a pass on one thread before the product splits.
    vs.iter()
        .zip(spans)
        .map(
            |(v, &(_, _, r, w, _))| match v.view().into_dimensionality::<Ix2>() {
                Ok(v2) => ndarray::CowArray::from(v2),
                Err(_) => as_matrix(v, r, w),
            },
        )
        .collect()
}

/// Each low-rank part with its place in the output, as the fused kernel takes them.
fn low_rank_kernel_parts<'a, T: Float>(
    v2: &'a [ndarray::CowArray<'a, T, Ix2>],
    spans: &[LowRankSpan<T>],
) -> Vec<LowRankPart<'a, T>> {
    v2.iter()
        .zip(spans)
        .map(|(v, &(start, u_from, _, _, scale))| LowRankPart {
            v: v.view(),
            start,
            u_from,
            scale,
        })
        .collect()
}

fn low_rank_attrs<T>(spans: &[LowRankSpan<T>]) -> String {
    spans
        .iter()
        .map(|(s, _, r, w, _)| format!("{s}..{} (rank {r})", s + w))
        .collect::<Vec<_>>()
        .join(", ")
}

impl<'t, T: Float> Var<'t, T> {
    /// `self · w + bias` for activations `[..., k]`, a 2-D weight `[k, n]` (any strides: a
    /// transposed view is free) and an optional bias `[n]` — one GEMM onto the broadcast bias.
    /// ∂x = G·wᵀ, ∂w = xᵀ·G, ∂bias = Σ_rows G; each only if needed.
    pub fn linear(&self, w: &Var<'t, T>, bias: Option<&Var<'t, T>>) -> Result<Var<'t, T>> {
        let (rows, k, n, out_shape) = linear_shapes("linear", self, w, bias)?;
        let x_shape = self.shape().to_vec();
        let (x, wv) = (self.value().clone(), w.value().clone());
        let c = linear_value(
            as_matrix(&x, rows, k).view(),
            as_matrix(&wv, k, n).view(),
            bias.map(|b| b.value()),
        );
        let out = to_shape(c, &out_shape);
        let mut inputs = vec![self, w];
        inputs.extend(bias);
        let x = kept_for_weight(&x, w);
        OpRecord::new("linear", &inputs)
            .attrs(format!(
                "[{rows}×{k}]·[{k}×{n}]{}",
                if bias.is_some() { "+b" } else { "" }
            ))
            .saves_kept("x", x.as_ref())
            .saves("w", &wv)
            .finish(out, move |g, needs| {
                let g2 = g
                    .to_shape((rows, n))
                    .expect("gradient has the output's size");
                linear_grads(
                    g2.view(),
                    x.as_ref(),
                    &wv,
                    &x_shape,
                    needs.len() == 3,
                    needs,
                )
            })
    }

    /// `residual + self · w + bias`: a layer's output projection added to the residual stream
    /// it feeds (GPT-2's attention and MLP `c_proj`). The value has the bits of
    /// `residual.add(&self.linear(w, bias))`; with f32 on AVX-512 the residual is added as the
    /// GEMM's last k block stores its tiles, so no separate pass reads the output back. In
    /// backward the upstream gradient *is* ∂residual: it is handed on after ∂x, ∂w and ∂bias
    /// are computed from it (as [`Var::linear`]'s), where an add would have copied it.
    pub fn linear_residual(
        &self,
        w: &Var<'t, T>,
        bias: Option<&Var<'t, T>>,
        residual: &Var<'t, T>,
    ) -> Result<Var<'t, T>> {
        const OP: &str = "linear_residual";
        let (rows, k, n, out_shape) = linear_shapes(OP, self, w, bias)?;
        if residual.shape() != out_shape.as_slice() {
            return shape_err(
                OP,
                residual.shape(),
                &out_shape,
                "the residual must have the output's shape",
            );
        }
        let x_shape = self.shape().to_vec();
        let (x, wv) = (self.value().clone(), w.value().clone());
        let c = {
            let (x2, w2) = (as_matrix(&x, rows, k), as_matrix(&wv, k, n));
            let r2 = as_matrix(residual.value(), rows, n);
            let bias_value = bias.map(|b| b.value());
            let bias_slice = bias_value.map(|b| b.as_slice());
            let no_u = ArrayView2::from_shape((rows, 0), &[]).expect("an empty matrix");
            let fused = match bias_slice {
                Some(None) => None,
                Some(Some(_)) | None => gemm_new_low_rank(
                    x2.view(),
                    w2.view(),
                    bias_slice.flatten(),
                    no_u,
                    &[],
                    Some(r2.view()),
                ),
            };
            fused.unwrap_or_else(|| {
                let mut c = linear_value(x2.view(), w2.view(), bias_value);
                c += &r2;
                c
            })
        };
        let out = to_shape(c, &out_shape);
        let mut inputs = vec![self, w];
        inputs.extend(bias);
        inputs.push(residual);
        let has_bias = bias.is_some();
        let x = kept_for_weight(&x, w);
        OpRecord::new(OP, &inputs)
            .attrs(format!(
                "r + [{rows}×{k}]·[{k}×{n}]{}",
                if has_bias { "+b" } else { "" }
            ))
            .saves_kept("x", x.as_ref())
            .saves("w", &wv)
            .finish(out, move |g, needs| {
                let (linear_needs, need_residual) = needs.split_at(needs.len() - 1);
                let mut grads = {
                    let g2 = g
                        .to_shape((rows, n))
                        .expect("gradient has the output's size");
                    linear_grads(g2.view(), x.as_ref(), &wv, &x_shape, has_bias, linear_needs)
                };
                grads.push(need_residual[0].then_some(g));
                grads
            })
    }

    /// `gelu(self · w + bias)`: an MLP's first projection and its activation (GPT-2's
    /// `c_fc` then `gelu_new`), with the bits of `self.linear(w, bias)?.gelu()`. With f32 on
    /// AVX-512 GELU is applied as the GEMM's last k block stores its tiles, and when a
    /// gradient will be needed its derivative at each pre-activation is written beside it
    /// (as [`Var::gelu`] saves it): the pre-activation is never written out or read back.
    /// Backward: G ← G ⊙ gelu′ in place, then [`Var::linear`]'s rule.
    pub fn linear_gelu(&self, w: &Var<'t, T>, bias: Option<&Var<'t, T>>) -> Result<Var<'t, T>> {
        const OP: &str = "linear_gelu";
        let (rows, k, n, out_shape) = linear_shapes(OP, self, w, bias)?;
        let x_shape = self.shape().to_vec();
        let (x, wv) = (self.value().clone(), w.value().clone());
        let mut inputs = vec![self, w];
        inputs.extend(bias);
        let record = OpRecord::new(OP, &inputs);
        let keeps_backward = record.keeps_backward();
        let (c, derivative) = {
            let (x2, w2) = (as_matrix(&x, rows, k), as_matrix(&wv, k, n));
            let bias_value = bias.map(|b| b.value());
            let bias_slice = bias_value.map(|b| b.as_slice());
            let fused = match bias_slice {
                Some(None) => None,
                Some(Some(_)) | None => {
                    gemm_new_gelu(x2.view(), w2.view(), bias_slice.flatten(), keeps_backward)
                        .map(|(y, d)| (y.into_dyn(), d.map(|d| d.into_dyn())))
                }
            };
            fused.unwrap_or_else(|| {
                let pre = linear_value(x2.view(), w2.view(), bias_value).into_dyn();
                if keeps_backward {
                    let (y, d) = super::unary::gelu_pair(&pre);
                    (y, Some(d))
                } else {
                    (super::map(&pre, super::unary::gelu_scalar), None)
                }
            })
        };
        let out = to_shape(c, &out_shape);
        let has_bias = bias.is_some();
        let record = record.attrs(format!(
            "gelu([{rows}×{k}]·[{k}×{n}]{})",
            if has_bias { "+b" } else { "" }
        ));
        let Some(derivative) = derivative else {
            let arity = inputs.len();
            return record.finish(out, move |_, _| vec![None; arity]);
        };
        let saved: Tensor<T> = to_shape(derivative, &out_shape).into_shared();
        let x = kept_for_weight(&x, w);
        record
            .saves_kept("x", x.as_ref())
            .saves("w", &wv)
            .saves("gelu′(x·w+b)", &saved)
            .finish(out, move |g, needs| {
                let g = super::zip_inplace(g, &saved, |g, d| g * d);
                let g2 = g
                    .to_shape((rows, n))
                    .expect("gradient has the output's size");
                linear_grads(g2.view(), x.as_ref(), &wv, &x_shape, has_bias, needs)
            })
    }

    /// `self · w + bias` plus LoRA's low-rank terms in one op: for each part `(v, start,
    /// scale)`, `scale · u[..., cols] · v` in the output's columns `start .. start + w`, as
    /// [`Var::add_low_rank_columns`] adds them to a [`Var::linear`]. With f32 on AVX-512 and
    /// parts on 32-column boundaries (c_attn's q and v), the terms are summed inside the
    /// linear's GEMM tiles ([`crate::gemm::gemm_new_low_rank`]), so the output is written once
    /// instead of being read back and rewritten by one product per part: the unmerged
    /// adapter's forward overhead is then the thin `u = x·Aᵀ` and these few extra steps of k.
    /// Elsewhere the same value is computed in those separate products. Backward is the two
    /// ops' rules: ∂x, ∂w, ∂bias as [`Var::linear`]'s, ∂u and ∂v as
    /// [`Var::add_low_rank_columns`]'s, each only if needed.
    pub fn linear_low_rank(
        &self,
        w: &Var<'t, T>,
        bias: Option<&Var<'t, T>>,
        u: &Var<'t, T>,
        parts: &[(&Var<'t, T>, usize, f64)],
    ) -> Result<Var<'t, T>> {
        const OP: &str = "linear_low_rank";
        let (rows, k, n, out_shape) = linear_shapes(OP, self, w, bias)?;
        let spans = low_rank_spans(OP, &out_shape, u.shape(), parts)?;
        let x_shape = self.shape().to_vec();
        let (x, wv, u_value) = (self.value().clone(), w.value().clone(), u.value().clone());
        let vs: Vec<Tensor<T>> = parts.iter().map(|p| p.0.value().clone()).collect();
        let c = {
            let u2 = as_matrix(&u_value, rows, u_value.shape()[u_value.ndim() - 1]);
            let (x2, w2) = (as_matrix(&x, rows, k), as_matrix(&wv, k, n));
            linear_low_rank_value(x2.view(), w2.view(), bias, u2.view(), &vs, &spans)
        };
        let out = to_shape(c, &out_shape);
        let mut inputs = vec![self, w];
        inputs.extend(bias);
        inputs.push(u);
        inputs.extend(parts.iter().map(|p| p.0));
        let has_bias = bias.is_some();
        let x = kept_for_weight(&x, w);
        OpRecord::new(OP, &inputs)
            .attrs(format!(
                "[{rows}×{k}]·[{k}×{n}]{} + {}",
                if has_bias { "+b" } else { "" },
                low_rank_attrs(&spans)
            ))
            .saves_kept("x", x.as_ref())
            .saves("w", &wv)
            .saves("u", &u_value)
            .finish(out, move |g, needs| {
                let g2 = g
                    .to_shape((rows, n))
                    .expect("gradient has the output's size");
                let u_at = if has_bias { 3 } else { 2 };
                let mut grads = linear_grads(g2.view(), x.as_ref(), &wv, &x_shape, has_bias, needs);
                let (gu, gv) = low_rank_grads(
                    g2.view(),
                    &u_value,
                    &vs,
                    &spans,
                    needs[u_at],
                    &needs[u_at + 1..],
                );
                grads.push(gu);
                grads.extend(gv);
                grads
            })
    }

    /// A LoRA linear whole: `self · w + bias` plus, for each term, `scale · (self·aᵀ)·bᵀ` in
    /// the output columns `start .. start + w` (`a` is `[r, k]` and `b` `[w, r]`, as LoRA keeps
    /// them: c_attn's q and v are two terms). The value is [`Var::linear_low_rank`]'s with
    /// `u = self·[a₁; a₂; …]ᵀ` and the parts `(bᵢᵀ, startᵢ, scaleᵢ)`, to the bit. Taking the
    /// A's and B's as they are keeps the stacking and the transposes out of the tape (and out
    /// of the single-threaded stretch before the product: an idle rayon worker falls asleep
    /// after ≈ 5–8 µs and takes 10–30 µs to wake). Holding both uses of x in one op changes
    /// backward: ∂x = G·wᵀ + ∂u·A is one GEMM with `∂u·A` as a low-rank term of its tiles
    /// ([`crate::gemm::gemm_new_low_rank`], r more steps of k) instead of a separate `[..., k]`
    /// product that the tape then adds to the first. ∂w = xᵀ·G, ∂bias = Σ_rows G, the A's are
    /// the row blocks of ∂u_allᵀ·x, ∂bᵢ = (scaleᵢ·uᵢᵀ·G[.., spanᵢ])ᵀ, each only if needed.
    pub fn linear_lora(
        &self,
        w: &Var<'t, T>,
        bias: Option<&Var<'t, T>>,
        terms: &[LoraTerm<'_, 't, T>],
    ) -> Result<Var<'t, T>> {
        const OP: &str = "linear_lora";
        let (rows, k, n, out_shape) = linear_shapes(OP, self, w, bias)?;
        let mut spans: Vec<LowRankSpan<T>> = Vec::with_capacity(terms.len());
        let mut rank = 0;
        for term in terms {
            let (a_shape, b_shape) = (term.a.shape(), term.b.shape());
            let r = a_shape.first().copied().unwrap_or(0);
            let fits = a_shape.len() == 2
                && a_shape[1] == k
                && b_shape.len() == 2
                && b_shape[1] == r
                && term.start + b_shape[0] <= n;
            if !fits {
                return shape_err(
                    OP,
                    a_shape,
                    b_shape,
                    format!("need A [r, {k}] and B [w, r] with {} + w ≤ {n}", term.start),
                );
            }
            spans.push((term.start, rank, r, b_shape[0], T::from_f64(term.scale)));
            rank += r;
        }
        let x_shape = self.shape().to_vec();
        let (x, wv) = (self.value().clone(), w.value().clone());
        let a_values: Vec<Tensor<T>> = terms.iter().map(|t| t.a.value().clone()).collect();
        // Each part's v = Bᵀ, a view.
        let vs: Vec<Tensor<T>> = terms
            .iter()
            .map(|t| t.b.value().clone().reversed_axes())
            .collect();
        let (x2, w2) = (as_matrix(&x, rows, k), as_matrix(&wv, k, n));
        // u made inside the linear's own product where the kernel can (each thread makes its
        // rows of u from the A's in place just before its tiles need them), else as a thin
        // product of its own.
        let fused = match bias.map(|b| b.value().as_slice()) {
            Some(None) => None,
            bias_slice => {
                let a2s: Vec<_> = a_values
                    .iter()
                    .zip(&spans)
                    .map(|(a, &(_, _, r, _, _))| as_matrix(a, r, k))
                    .collect();
                let ats: Vec<ArrayView2<T>> = a2s.iter().map(|a| a.t()).collect();
                let v2 = low_rank_matrices(&vs, &spans);
                gemm_new_lora(
                    x2.view(),
                    w2.view(),
                    bias_slice.flatten(),
                    &ats,
                    &low_rank_kernel_parts(&v2, &spans),
                )
            }
        };
        let (c, u) = match fused {
            Some((c, u)) => (c, u.into_dyn().into_shared()),
            None => {
                let stacked = stack_rows(&a_values);
                let u: Tensor<T> = gemm_new(T::one(), x2.view(), as_matrix(&stacked, rank, k).t())
                    .into_dyn()
                    .into_shared();
                let c = linear_low_rank_value(
                    x2.view(),
                    w2.view(),
                    bias,
                    as_matrix(&u, rows, rank).view(),
                    &vs,
                    &spans,
                );
                (c, u)
            }
        };
        let out = to_shape(c, &out_shape);
        let mut inputs = vec![self, w];
        inputs.extend(bias);
        for term in terms {
            inputs.extend([term.a, term.b]);
        }
        let has_bias = bias.is_some();
        // x is read by ∂w = xᵀ·G and ∂A = ∂uᵀ·x only.
        let trains_a = terms.iter().any(|t| t.a.requires_grad());
        let x = (w.requires_grad() || trains_a).then_some(x);
        let mut record = OpRecord::new(OP, &inputs)
            .attrs(format!(
                "[{rows}×{k}]·[{k}×{n}]{} + (x·Aᵀ)·Bᵀ, A's [{rank}×{k}] in all: {}",
                if has_bias { "+b" } else { "" },
                low_rank_attrs(&spans)
            ))
            .saves_kept("x", x.as_ref())
            .saves("w", &wv);
        for a in &a_values {
            record = record.saves("a", a);
        }
        record.saves("u", &u).finish(out, move |g, needs| {
            let g2 = g
                .to_shape((rows, n))
                .expect("gradient has the output's size");
            // Each term's A and B follow x, w (and the bias).
            let first = if has_bias { 3 } else { 2 };
            let need_a: Vec<bool> = (0..spans.len()).map(|i| needs[first + 2 * i]).collect();
            let need_b: Vec<bool> = (0..spans.len()).map(|i| needs[first + 2 * i + 1]).collect();
            let (need_x, any_a) = (needs[0], need_a.iter().any(|&need| need));
            let (gu, gv) = low_rank_grads(g2.view(), &u, &vs, &spans, need_x || any_a, &need_b);
            let av = stack_rows(&a_values);
            let (w2, a2) = (as_matrix(&wv, k, n), as_matrix(&av, rank, k));
            let x2 = (needs[1] || any_a)
                .then(|| as_matrix(x.as_ref().expect(KEPT_FOR_GRADIENT), rows, k));
            let x2 = x2.as_ref().map(|x2| x2.view());
            let gu2 = gu
                .as_ref()
                .map(|gu| gu.to_shape((rows, rank)).expect("∂u has u's size"));
            let (gx, gw) = match (need_x, &gu2) {
                (true, Some(gu2)) => {
                    lora_input_grad(g2.view(), w2.view(), x2, gu2.view(), a2.view(), needs[1])
                }
                _ => (
                    None,
                    x2.filter(|_| needs[1])
                        .map(|x2| gemm_new(T::one(), x2.t(), g2.view())),
                ),
            };
            let mut grads = vec![
                gx.map(|gx| to_shape(gx, &x_shape)),
                gw.map(|gw| gw.into_dyn()),
            ];
            if has_bias {
                grads.push(needs[2].then(|| g2.sum_axis(ndarray::Axis(0)).into_dyn()));
            }
            // ∂[A₁; A₂; …] = ∂uᵀ·x in one product; each A its block of rows (a lone A the
            // whole product, uncopied).
            let mut ga = match (any_a, &gu2) {
                (true, Some(gu2)) => x2.map(|x2| gemm_new(T::one(), gu2.t(), x2)),
                _ => None,
            };
            for ((&(_, from, r, _, _), gv), &need) in spans.iter().zip(gv).zip(&need_a) {
                let block = match need {
                    false => None,
                    true if spans.len() == 1 => ga.take().map(|ga| ga.into_dyn()),
                    true => ga.as_ref().map(|ga| {
                        ga.slice(ndarray::s![from..from + r, ..])
                            .to_owned()
                            .into_dyn()
                    }),
                };
                grads.push(block);
                // ∂B is ∂(Bᵀ) transposed: a view of the same buffer.
                grads.push(gv.map(|gv| gv.reversed_axes()));
            }
            grads
        })
    }

    /// `self` plus, for each part `(v, start, scale)`, `scale · u[..., cols] · v` added into
    /// the last-axis columns `start .. start + w` (`v` is `[r, w]`; `cols` is the part's block
    /// of `u`'s columns: the parts take `u`'s `[..., r₁ + r₂ + …]` columns in order). This is
    /// LoRA's `s·(x·Aᵀ)·Bᵀ` for every part of an adapter at once, added to a base output that
    /// is already computed ([`Var::linear_low_rank`] fuses it into the base's product):
    /// `u = x·[A_q; A_v]ᵀ` is one thin product (one pass over x), and each part's product
    /// with Bᵀ lands straight in its q or v columns.
    ///
    /// Each part is one GEMM accumulating (β = 1, α = scale) into a strided view of the output's
    /// columns, so no `[..., w]` delta is ever built and no separate add pass reads it.
    /// Backward reads the gradient's columns in place the same way: ∂self = G,
    /// ∂u[..., cols] = scale·G[..., span]·vᵀ, ∂v = scale·u[..., cols]ᵀ·G[..., span] (each only
    /// if needed). Takes `self` by value so that, when nothing else holds its buffer (always
    /// under `no_grad`), the sum is written in place.
    pub fn add_low_rank_columns(
        mut self,
        u: &Var<'t, T>,
        parts: &[(&Var<'t, T>, usize, f64)],
    ) -> Result<Var<'t, T>> {
        const OP: &str = "add_low_rank_columns";
        let shape = self.shape().to_vec();
        let spans = low_rank_spans(OP, &shape, u.shape(), parts)?;
        let (width, rows) = (
            shape[shape.len() - 1],
            shape[..shape.len() - 1].iter().product(),
        );
        let mut out = self.take_value();
        let u_value = u.value().clone();
        let vs: Vec<Tensor<T>> = parts.iter().map(|p| p.0.value().clone()).collect();
        {
            let out2 = out
                .view_mut()
                .into_shape_with_order((rows, width))
                .expect("owned arrays are standard layout");
            let u2 = as_matrix(&u_value, rows, u_value.shape()[u_value.ndim() - 1]);
            add_low_rank_parts(out2, u2.view(), &vs, &spans);
        }
        let mut inputs = vec![&self, u];
        inputs.extend(parts.iter().map(|p| p.0));
        OpRecord::new(OP, &inputs)
            .attrs(low_rank_attrs(&spans))
            .finish(out, move |g, needs| {
                let (gu, gv) = {
                    let g2 = g
                        .to_shape((rows, width))
                        .expect("gradient has the output's size");
                    low_rank_grads(g2.view(), &u_value, &vs, &spans, needs[1], &needs[2..])
                };
                let mut grads = vec![needs[0].then_some(g), gu];
                grads.extend(gv);
                grads
            })
    }
}

#[cfg(test)]
mod tests {
    use crate::ops::test_util::{assert_gradcheck, rand_array};
    use crate::Tape;
    use ndarray::{arr2, Axis};

    #[test]
    fn matmul_values() {
        let tape = Tape::<f64>::new();
        let a = tape.constant(arr2(&[[1.0, 2.0], [3.0, 4.0]]).into_dyn());
        let b = tape.constant(arr2(&[[5.0, 6.0], [7.0, 8.0]]).into_dyn());
        let c = a.matmul(&b).unwrap();
        assert_eq!(
            c.value(),
            &arr2(&[[19.0, 22.0], [43.0, 50.0]]).into_dyn().into_shared()
        );
        // x·Wᵀ through a transposed view.
        let ct = a.matmul(&b.transpose(0, 1).unwrap()).unwrap();
        assert_eq!(
            ct.value(),
            &arr2(&[[17.0, 23.0], [39.0, 53.0]]).into_dyn().into_shared()
        );
        assert!(a
            .matmul(&tape.constant(ndarray::ArrayD::zeros(ndarray::IxDyn(&[3, 2]))))
            .is_err());
    }

    #[test]
    fn add_low_rank_columns_equals_the_padded_sum_of_products_and_passes_gradcheck() {
        let tape = Tape::<f64>::new();
        let base = tape.constant(rand_array(&[2, 3, 9], 1));
        // u holds both parts' columns: rank 2 for q (into columns 0..3), rank 1 for v (6..9).
        let u = rand_array(&[2, 3, 3], 2);
        let (vq, vv) = (rand_array(&[2, 3], 3), rand_array(&[1, 3], 5));
        let (cu, cvq, cvv) = (
            tape.constant(u.clone()),
            tape.constant(vq.clone()),
            tape.constant(vv.clone()),
        );
        let y = base
            .clone()
            .add_low_rank_columns(&cu, &[(&cvq, 0, 0.5), (&cvv, 6, 2.0)])
            .unwrap();
        let u2 = u.into_shape_with_order((6, 3)).unwrap();
        let (vq2, vv2) = (
            vq.into_dimensionality::<ndarray::Ix2>().unwrap(),
            vv.into_dimensionality::<ndarray::Ix2>().unwrap(),
        );
        let (uq2, uv2) = (
            u2.slice(ndarray::s![.., 0..2]).to_owned(),
            u2.slice(ndarray::s![.., 2..3]).to_owned(),
        );
        let mut want = base
            .value()
            .to_owned()
            .into_shape_with_order((6, 9))
            .unwrap();
        want.slice_mut(ndarray::s![.., 0..3])
            .scaled_add(0.5, &uq2.dot(&vq2));
        want.slice_mut(ndarray::s![.., 6..9])
            .scaled_add(2.0, &uv2.dot(&vv2));
        let got = y.value().to_shape((6, 9)).unwrap();
        let diff = (&got - &want)
            .mapv(f64::abs)
            .fold(0.0, |m: f64, &v| m.max(v));
        assert!(diff < 1e-12, "{diff}");
        // Wrong leading dims of u, ranks not adding up to u's columns, columns past the end.
        assert!(base
            .clone()
            .add_low_rank_columns(&cvq, &[(&cvq, 0, 1.0)])
            .is_err());
        assert!(base
            .clone()
            .add_low_rank_columns(&cu, &[(&cvq, 0, 1.0)])
            .is_err());
        assert!(base
            .clone()
            .add_low_rank_columns(&cu, &[(&cvq, 0, 1.0), (&cvv, 7, 1.0)])
            .is_err());
        // Under no_grad the base's buffer is taken instead of copied when nothing else holds
        // it; a clone that does hold it keeps its value.
        tape.no_grad(|| {
            let product = base.mul(&base).unwrap();
            let kept = product.clone();
            let sum = product
                .add_low_rank_columns(&cu, &[(&cvq, 0, 1.0), (&cvv, 6, 1.0)])
                .unwrap();
            assert_eq!(kept.value().to_owned(), base.value() * base.value());
            let sum = sum.value().to_shape((6, 9)).unwrap().to_owned();
            let mut want = kept.value().to_shape((6, 9)).unwrap().to_owned();
            want.slice_mut(ndarray::s![.., 0..3])
                .scaled_add(1.0, &uq2.dot(&vq2));
            want.slice_mut(ndarray::s![.., 6..9])
                .scaled_add(1.0, &uv2.dot(&vv2));
            let diff = (&sum - &want)
                .mapv(f64::abs)
                .fold(0.0, |m: f64, &v| m.max(v));
            assert!(diff < 1e-12, "{diff}");
        });
        // v as a transposed view (LoRA passes Bᵀ); one part and two.
        assert_gradcheck(
            |x| {
                let vt = x[3].transpose(0, 1)?;
                x[0].clone()
                    .add_low_rank_columns(&x[1], &[(&x[2], 0, 0.5), (&vt, 6, -1.5)])
            },
            &[
                rand_array(&[2, 3, 9], 6),
                rand_array(&[2, 3, 4], 7),
                rand_array(&[2, 3], 8),
                rand_array(&[3, 2], 10),
            ],
        );
        assert_gradcheck(
            |x| x[0].clone().add_low_rank_columns(&x[1], &[(&x[2], 4, 0.5)]),
            &[
                rand_array(&[3, 7], 11),
                rand_array(&[3, 2], 12),
                rand_array(&[2, 3], 13),
            ],
        );
        // Overlapping parts (column 2 in both) accumulate one after the other.
        assert_gradcheck(
            |x| {
                x[0].clone()
                    .add_low_rank_columns(&x[1], &[(&x[2], 0, 0.5), (&x[3], 2, 2.0)])
            },
            &[
                rand_array(&[3, 7], 14),
                rand_array(&[3, 4], 15),
                rand_array(&[2, 3], 16),
                rand_array(&[2, 3], 17),
            ],
        );
        // f32, large enough for the parallel and AVX-512 kernels.
        let tape = Tape::<f32>::new();
        let (m, width, r) = (300, 200, 8);
        let base = rand_array(&[m, width], 11).mapv(|v| v as f32);
        let u = rand_array(&[m, 2 * r], 12).mapv(|v| v as f32);
        let v = rand_array(&[r, 64], 13).mapv(|v| v as f32);
        let cv = tape.constant(v.clone());
        let y = tape
            .constant(base.clone())
            .add_low_rank_columns(&tape.constant(u.clone()), &[(&cv, 100, 2.0), (&cv, 0, 1.0)])
            .unwrap();
        let (u2, v2) = (
            u.into_dimensionality::<ndarray::Ix2>().unwrap(),
            v.into_dimensionality::<ndarray::Ix2>().unwrap(),
        );
        let mut want = base.into_dimensionality::<ndarray::Ix2>().unwrap();
        want.slice_mut(ndarray::s![.., 100..164])
            .scaled_add(2.0, &u2.slice(ndarray::s![.., 0..r]).dot(&v2));
        want.slice_mut(ndarray::s![.., 0..64])
            .scaled_add(1.0, &u2.slice(ndarray::s![.., r..]).dot(&v2));
        let diff = (&y.value().to_shape((m, width)).unwrap() - &want)
            .mapv(f32::abs)
            .fold(0.0, |m: f32, &v| m.max(v));
        assert!(diff < 1e-4, "{diff}");
    }

    #[test]
    fn linear_equals_matmul_plus_bias_and_passes_gradcheck() {
        let tape = Tape::<f64>::new();
        let x = tape.constant(rand_array(&[2, 3, 4], 11));
        let w = tape
            .constant(rand_array(&[5, 4], 12))
            .transpose(0, 1)
            .unwrap();
        let b = tape.constant(rand_array(&[5], 13));
        let fused = x.linear(&w, Some(&b)).unwrap();
        let composed = x.matmul(&w).unwrap().add(&b).unwrap();
        let diff = (fused.value() - composed.value())
            .mapv(f64::abs)
            .fold(0.0, |m: f64, &v| m.max(v));
        assert!(diff < 1e-12, "{diff}");
        // An output large enough that the bias rows are written in parallel (odd width).
        let (xl, wl, bl) = (
            tape.constant(rand_array(&[70, 3], 21)),
            tape.constant(rand_array(&[3, 501], 22)),
            tape.constant(rand_array(&[501], 23)),
        );
        let fused = xl.linear(&wl, Some(&bl)).unwrap();
        let composed = xl.matmul(&wl).unwrap().add(&bl).unwrap();
        assert!(fused.value().len() >= super::super::PARALLEL_MIN_LEN);
        let diff = (fused.value() - composed.value())
            .mapv(f64::abs)
            .fold(0.0, |m: f64, &v| m.max(v));
        assert!(diff < 1e-12, "{diff}");
        assert!(x.linear(&w, Some(&x)).is_err());
        // f32 and large enough (2²⁶ multiply-adds) for the kernel to add the bias as it stores.
        let tape32 = Tape::<f32>::new();
        let f32_of = |shape: &[usize], seed| rand_array(shape, seed).mapv(|v| v as f32);
        let (x32, w32, b32) = (
            tape32.constant(f32_of(&[2, 300, 500], 31)),
            tape32.constant(f32_of(&[500, 450], 32)),
            tape32.constant(f32_of(&[450], 33)),
        );
        let fused = x32.linear(&w32, Some(&b32)).unwrap();
        let composed = x32.matmul(&w32).unwrap().add(&b32).unwrap();
        let diff = (fused.value() - composed.value())
            .mapv(f32::abs)
            .fold(0.0, |m: f32, &v| m.max(v));
        assert!(diff < 1e-4, "{diff}");
        assert!(x.linear(&b, None).is_err());
        assert_gradcheck(
            |v| v[0].linear(&v[1].transpose(0, 1)?, Some(&v[2])),
            &[
                rand_array(&[2, 3, 4], 14),
                rand_array(&[5, 4], 15),
                rand_array(&[5], 16),
            ],
        );
        assert_gradcheck(
            |v| v[0].linear(&v[1], None),
            &[rand_array(&[3, 4], 17), rand_array(&[4, 2], 18)],
        );
    }

    #[test]
    fn linear_low_rank_is_linear_plus_add_low_rank_columns_and_passes_gradcheck() {
        // f32, shapes the fused kernel takes (parts on 32-column boundaries, 40 rows): same
        // value as the two ops up to rounding, and the same gradients to the bit (the same
        // products of the same upstream gradient).
        let mut results = Vec::new();
        for fused in [true, false] {
            let tape = Tape::<f32>::new();
            let f32_param = |name: &str, shape: &[usize], seed| {
                tape.param(name, rand_array(shape, seed).mapv(|v| v as f32))
            };
            let x = f32_param("x", &[2, 20, 40], 1);
            let w = f32_param("w", &[40, 96], 2);
            let bias = f32_param("bias", &[96], 3);
            let u = f32_param("u", &[2, 20, 10], 4);
            let vq = f32_param("vq", &[4, 32], 5);
            let b_v = f32_param("b_v", &[32, 6], 6);
            let weights = tape.constant(rand_array(&[2, 20, 96], 7).mapv(|v| v as f32));
            let vv = b_v.transpose(0, 1).unwrap();
            let parts = [(&vq, 0, 0.5), (&vv, 64, -2.0)];
            let y = if fused {
                x.linear_low_rank(&w, Some(&bias), &u, &parts).unwrap()
            } else {
                x.linear(&w, Some(&bias))
                    .unwrap()
                    .add_low_rank_columns(&u, &parts)
                    .unwrap()
            };
            let grads = tape
                .backward(&y.mul(&weights).unwrap().sum_all().unwrap())
                .unwrap();
            let grads: Vec<_> = [&x, &w, &bias, &u, &vq, &b_v]
                .iter()
                .map(|v| grads.get(v).unwrap().clone())
                .collect();
            results.push((y.value().to_owned(), grads));
        }
        let ((fused, fused_grads), (separate, separate_grads)) = (&results[0], &results[1]);
        let worst = (fused - separate)
            .iter()
            .zip(separate)
            .map(|(d, s)| d.abs() / (1.0 + s.abs()))
            .fold(0.0f32, f32::max);
        assert!(worst < 1e-5, "{worst}");
        assert_eq!(fused_grads, separate_grads);
        // In f64 (the separate products' path) the op's gradients against central differences:
        // with and without a bias, a Bᵀ view, and overlapping parts.
        assert_gradcheck(
            |x| {
                let vt = x[5].transpose(0, 1)?;
                x[0].linear_low_rank(
                    &x[1],
                    Some(&x[2]),
                    &x[3],
                    &[(&x[4], 0, 0.5), (&vt, 3, -1.5)],
                )
            },
            &[
                rand_array(&[2, 3, 4], 8),
                rand_array(&[4, 6], 9),
                rand_array(&[6], 10),
                rand_array(&[2, 3, 3], 11),
                rand_array(&[2, 3], 12),
                rand_array(&[3, 1], 13),
            ],
        );
        assert_gradcheck(
            |x| x[0].linear_low_rank(&x[1], None, &x[2], &[(&x[3], 1, 0.5), (&x[4], 2, 2.0)]),
            &[
                rand_array(&[3, 4], 14),
                rand_array(&[4, 5], 15),
                rand_array(&[3, 3], 16),
                rand_array(&[2, 3], 17),
                rand_array(&[1, 3], 18),
            ],
        );
        // Shape errors name the op.
        let t = Tape::<f64>::new();
        let c = |shape: &[usize]| t.constant(rand_array(shape, 19));
        let (x, w, u, v) = (c(&[3, 4]), c(&[4, 5]), c(&[3, 2]), c(&[2, 3]));
        // An empty batch is an empty output.
        let y = c(&[0, 4])
            .linear_low_rank(&w, None, &c(&[0, 2]), &[(&v, 0, 1.0)])
            .unwrap();
        assert_eq!(y.shape(), &[0, 5]);
        for result in [
            x.linear_low_rank(&c(&[5, 4]), None, &u, &[(&v, 0, 1.0)]),
            x.linear_low_rank(&w, Some(&c(&[4])), &u, &[(&v, 0, 1.0)]),
            x.linear_low_rank(&w, None, &c(&[2, 2]), &[(&v, 0, 1.0)]),
            x.linear_low_rank(&w, None, &u, &[(&v, 3, 1.0)]),
            x.linear_low_rank(&w, None, &c(&[3, 3]), &[(&v, 0, 1.0)]),
        ] {
            let message = result.unwrap_err().to_string();
            assert!(message.contains("linear_low_rank"), "{message}");
        }
    }

    #[test]
    fn linear_residual_has_the_bits_of_a_linear_then_an_add_and_passes_gradcheck() {
        // f32 where the kernel adds the residual as it stores (40 rows, 64 columns) and where
        // it does not (3 × 5), with and without a bias: value and every gradient to the bit.
        for (rows, k, n) in [(40, 24, 64), (3, 4, 5)] {
            for with_bias in [true, false] {
                let mut results = Vec::new();
                for fused in [true, false] {
                    let tape = Tape::<f32>::new();
                    let value = |shape: &[usize], seed| rand_array(shape, seed).mapv(|v| v as f32);
                    let x = tape.param("x", value(&[2, rows, k], 1));
                    let w = tape.param("w", value(&[k, n], 2));
                    let bias = with_bias.then(|| tape.param("bias", value(&[n], 3)));
                    let r = tape.param("r", value(&[2, rows, n], 4));
                    let weights = tape.constant(value(&[2, rows, n], 5));
                    let y = if fused {
                        x.linear_residual(&w, bias.as_ref(), &r).unwrap()
                    } else {
                        r.add(&x.linear(&w, bias.as_ref()).unwrap()).unwrap()
                    };
                    let grads = tape
                        .backward(&y.mul(&weights).unwrap().sum_all().unwrap())
                        .unwrap();
                    let mut leaves = vec![&x, &w, &r];
                    leaves.extend(&bias);
                    let grads: Vec<_> = leaves
                        .iter()
                        .map(|v| grads.get(v).unwrap().clone())
                        .collect();
                    results.push((y.value().to_owned(), grads));
                }
                assert_eq!(results[0], results[1], "{rows}×{k}×{n}, bias {with_bias}");
            }
        }
        assert_gradcheck(
            |x| x[0].linear_residual(&x[1], Some(&x[2]), &x[3]),
            &[
                rand_array(&[2, 3, 4], 6),
                rand_array(&[4, 5], 7),
                rand_array(&[5], 8),
                rand_array(&[2, 3, 5], 9),
            ],
        );
        assert_gradcheck(
            |x| x[0].linear_residual(&x[1], None, &x[2]),
            &[
                rand_array(&[3, 4], 10),
                rand_array(&[4, 2], 11),
                rand_array(&[3, 2], 12),
            ],
        );
        let t = Tape::<f64>::new();
        let c = |shape: &[usize]| t.constant(rand_array(shape, 13));
        let message = c(&[3, 4])
            .linear_residual(&c(&[4, 5]), None, &c(&[3, 4]))
            .unwrap_err()
            .to_string();
        assert!(message.contains("linear_residual"), "{message}");
    }

    #[test]
    fn linear_gelu_has_the_bits_of_a_linear_then_gelu_and_passes_gradcheck() {
        // f32 where the kernel applies GELU as it stores (40 rows, 64 columns; values out to
        // GELU's flat left tail) and where it does not (3 × 5), with and without a bias, the
        // weight trained or frozen, and under no_grad: value and every gradient to the bit.
        for (rows, k, n) in [(40, 24, 64), (3, 4, 5)] {
            for (with_bias, train_w) in [(true, true), (false, true), (true, false)] {
                let mut results = Vec::new();
                for fused in [true, false] {
                    let tape = Tape::<f32>::new();
                    let value = |shape: &[usize], seed| rand_array(shape, seed).mapv(|v| v as f32);
                    let x = tape.param("x", value(&[2, rows, k], 1).mapv(|v| 2.0 * v));
                    let w = if train_w {
                        tape.param("w", value(&[k, n], 2))
                    } else {
                        tape.frozen("w", value(&[k, n], 2))
                    };
                    let bias = with_bias.then(|| tape.param("bias", value(&[n], 3)));
                    let weights = tape.constant(value(&[2, rows, n], 5));
                    let forward = || {
                        if fused {
                            x.linear_gelu(&w, bias.as_ref()).unwrap()
                        } else {
                            x.linear(&w, bias.as_ref()).unwrap().gelu().unwrap()
                        }
                    };
                    let inference = tape.no_grad(forward);
                    let y = forward();
                    assert_eq!(y.value(), inference.value());
                    let grads = tape
                        .backward(&y.mul(&weights).unwrap().sum_all().unwrap())
                        .unwrap();
                    let mut leaves = vec![&x];
                    leaves.extend(train_w.then_some(&w));
                    leaves.extend(&bias);
                    let grads: Vec<_> = leaves
                        .iter()
                        .map(|v| grads.get(v).unwrap().clone())
                        .collect();
                    results.push((y.value().to_owned(), grads));
                }
                let case = format!("{rows}×{k}×{n}, bias {with_bias}, w trained {train_w}");
                assert!(
                    results[0].0.iter().any(|&v| v < -0.1),
                    "{case}: reaches GELU's dip"
                );
                assert_eq!(results[0], results[1], "{case}");
            }
        }
        assert_gradcheck(
            |x| x[0].linear_gelu(&x[1], Some(&x[2])),
            &[
                rand_array(&[2, 3, 4], 6),
                rand_array(&[4, 5], 7),
                rand_array(&[5], 8),
            ],
        );
        assert_gradcheck(
            |x| x[0].linear_gelu(&x[1], None),
            &[rand_array(&[3, 4], 10), rand_array(&[4, 2], 11)],
        );
        let t = Tape::<f64>::new();
        let c = |shape: &[usize]| t.constant(rand_array(shape, 13));
        let message = c(&[3, 4])
            .linear_gelu(&c(&[5, 4]), None)
            .unwrap_err()
            .to_string();
        assert!(message.contains("linear_gelu"), "{message}");
    }

    #[test]
    fn linear_lora_is_linear_low_rank_of_x_times_a_transposed_and_passes_gradcheck() {
        use super::LoraTerm;
        // f32 at shapes the fused kernel takes (∂x with ∂u·A inside its tiles when the weight
        // is frozen; ∂x and ∂w side by side, then ∂u·A added, when it is trained) against
        // linear_low_rank fed u = x·[A_q; A_v]ᵀ by a concat and a matmul and the parts Bᵀ by
        // transposes: the same value to the bit, ∂x and the ∂A's within rounding (summed in
        // another order), every other gradient to the bit.
        for frozen_w in [true, false] {
            let mut results = Vec::new();
            for whole in [true, false] {
                let tape = Tape::<f32>::new();
                let f32_value = |shape: &[usize], seed| rand_array(shape, seed).mapv(|v| v as f32);
                let x = tape.param("x", f32_value(&[2, 20, 64], 1));
                let w = if frozen_w {
                    tape.frozen("w", f32_value(&[64, 96], 2))
                } else {
                    tape.param("w", f32_value(&[64, 96], 2))
                };
                let bias = tape.param("bias", f32_value(&[96], 3));
                let a_q = tape.param("a_q", f32_value(&[4, 64], 4));
                let a_v = tape.param("a_v", f32_value(&[6, 64], 8));
                let b_q = tape.param("b_q", f32_value(&[32, 4], 5));
                let b_v = tape.param("b_v", f32_value(&[32, 6], 6));
                let weights = tape.constant(f32_value(&[2, 20, 96], 7));
                let y = if whole {
                    let terms = [
                        LoraTerm {
                            a: &a_q,
                            b: &b_q,
                            start: 0,
                            scale: 0.5,
                        },
                        LoraTerm {
                            a: &a_v,
                            b: &b_v,
                            start: 64,
                            scale: -2.0,
                        },
                    ];
                    x.linear_lora(&w, Some(&bias), &terms).unwrap()
                } else {
                    let a = crate::concat(&[&a_q, &a_v], 0).unwrap();
                    let u = x.matmul(&a.transpose(0, 1).unwrap()).unwrap();
                    let (vq, vv) = (b_q.transpose(0, 1).unwrap(), b_v.transpose(0, 1).unwrap());
                    let parts = [(&vq, 0, 0.5), (&vv, 64, -2.0)];
                    x.linear_low_rank(&w, Some(&bias), &u, &parts).unwrap()
                };
                let grads = tape
                    .backward(&y.mul(&weights).unwrap().sum_all().unwrap())
                    .unwrap();
                let grads: Vec<_> = [&x, &w, &bias, &a_q, &a_v, &b_q, &b_v]
                    .iter()
                    .map(|v| grads.get(v).cloned())
                    .collect();
                results.push((y.value().to_owned(), grads));
            }
            let ((whole, whole_grads), (separate, separate_grads)) = (&results[0], &results[1]);
            assert_eq!(whole, separate);
            for (i, (got, want)) in whole_grads.iter().zip(separate_grads).enumerate() {
                let (Some(got), Some(want)) = (got, want) else {
                    assert!(got.is_none() && want.is_none() && i == 1 && frozen_w);
                    continue;
                };
                if [0, 3, 4].contains(&i) {
                    let worst = (got - want)
                        .iter()
                        .zip(want)
                        .map(|(d, s)| d.abs() / (1.0 + s.abs()))
                        .fold(0.0f32, f32::max);
                    assert!(worst < 1e-5, "gradient {i}: {worst}");
                } else {
                    assert_eq!(got, want, "gradient {i}");
                }
            }
        }
        // In f64 (the separate products' path), against central differences: with and without
        // a bias, a B that is a transposed view, one term, and overlapping terms.
        assert_gradcheck(
            |x| {
                let b_v = x[7].transpose(0, 1)?;
                let terms = [
                    LoraTerm {
                        a: &x[3],
                        b: &x[4],
                        start: 0,
                        scale: 0.5,
                    },
                    LoraTerm {
                        a: &x[5],
                        b: &x[6],
                        start: 3,
                        scale: -1.5,
                    },
                    LoraTerm {
                        a: &x[5],
                        b: &b_v,
                        start: 1,
                        scale: 2.0,
                    },
                ];
                x[0].linear_lora(&x[1], Some(&x[2]), &terms)
            },
            &[
                rand_array(&[2, 3, 4], 8),
                rand_array(&[4, 6], 9),
                rand_array(&[6], 10),
                rand_array(&[2, 4], 11),
                rand_array(&[3, 2], 12),
                rand_array(&[1, 4], 13),
                rand_array(&[3, 1], 20),
                rand_array(&[1, 5], 21),
            ],
        );
        assert_gradcheck(
            |x| {
                let terms = [LoraTerm {
                    a: &x[2],
                    b: &x[3],
                    start: 1,
                    scale: 0.5,
                }];
                x[0].linear_lora(&x[1], None, &terms)
            },
            &[
                rand_array(&[3, 4], 14),
                rand_array(&[4, 5], 15),
                rand_array(&[3, 4], 16),
                rand_array(&[4, 3], 17),
            ],
        );
        // Shape errors name the op.
        let t = Tape::<f64>::new();
        let c = |shape: &[usize]| t.constant(rand_array(shape, 19));
        let (x, w, a, b) = (c(&[3, 4]), c(&[4, 5]), c(&[2, 4]), c(&[3, 2]));
        let term = |a, b, start| {
            [LoraTerm {
                a,
                b,
                start,
                scale: 1.0,
            }]
        };
        let y = c(&[0, 4]).linear_lora(&w, None, &term(&a, &b, 0)).unwrap();
        assert_eq!(y.shape(), &[0, 5]);
        for result in [
            x.linear_lora(&c(&[5, 4]), None, &term(&a, &b, 0)),
            x.linear_lora(&w, None, &term(&c(&[2, 3]), &b, 0)),
            x.linear_lora(&w, None, &term(&a, &c(&[3, 3]), 0)),
            x.linear_lora(&w, None, &term(&a, &c(&[2, 3]), 0)),
            x.linear_lora(&w, None, &term(&a, &b, 3)),
        ] {
            let message = result.unwrap_err().to_string();
            assert!(message.contains("linear_lora"), "{message}");
        }
    }

    #[test]
    fn a_frozen_weight_keeps_no_input_and_the_input_gradient_is_unchanged() {
        // Every product op, its weight trained and frozen: frozen, the op's record lists no
        // saved input (so nothing holds it until backward), trained it does; ∂x (and the other
        // trained gradients) are the same bits either way. A LoRA linear keeps x while its A's
        // train (∂A = ∂uᵀ·x), and not when they are frozen too.
        use super::LoraTerm;
        type Forward = for<'t> fn(&[crate::Var<'t, f32>]) -> crate::Var<'t, f32>;
        let lora: Forward = |v| {
            let term = LoraTerm {
                a: &v[3],
                b: &v[4],
                start: 32,
                scale: 2.0,
            };
            v[0].linear_lora(&v[1], Some(&v[2]), &[term]).unwrap()
        };
        let low_rank: Forward = |v| {
            let u = v[0].matmul(&v[3].transpose(0, 1).unwrap()).unwrap();
            let vt = v[4].transpose(0, 1).unwrap();
            v[0].linear_low_rank(&v[1], Some(&v[2]), &u, &[(&vt, 32, 2.0)])
                .unwrap()
        };
        let cases: [(&str, &str, Forward); 6] = [
            ("linear", "x", |v| v[0].linear(&v[1], Some(&v[2])).unwrap()),
            ("linear_residual", "x", |v| {
                v[0].linear_residual(&v[1], Some(&v[2]), &v[5]).unwrap()
            }),
            ("linear_gelu", "x", |v| {
                v[0].linear_gelu(&v[1], Some(&v[2])).unwrap()
            }),
            ("linear_low_rank", "x", low_rank),
            ("linear_lora", "x", lora),
            ("matmul", "a", |v| v[0].matmul(&v[1]).unwrap()),
        ];
        let value = |shape: &[usize], seed| rand_array(shape, seed).mapv(|v| v as f32);
        for (op, input, forward) in cases {
            // (w trained, A trained): x is kept exactly when one of them is (A only for LoRA).
            for (train_w, train_a) in [(true, true), (false, true), (false, false)] {
                let tape = Tape::<f32>::new();
                let leaf = |name: &str, v, train: bool| {
                    if train {
                        tape.param(name, v)
                    } else {
                        tape.frozen(name, v)
                    }
                };
                let vars = [
                    tape.param("x", value(&[2, 20, 48], 1)),
                    leaf("w", value(&[48, 64], 2), train_w),
                    tape.param("bias", value(&[64], 3)),
                    leaf("a", value(&[4, 48], 4), train_a),
                    tape.param("b", value(&[32, 4], 5)),
                    tape.param("residual", value(&[2, 20, 64], 6)),
                ];
                let y = forward(&vars);
                let weights = tape.constant(value(&[2, 20, 64], 7));
                let grads = tape
                    .backward(&y.mul(&weights).unwrap().sum_all().unwrap())
                    .unwrap();
                let nodes = tape.nodes();
                let node = nodes.iter().rfind(|n| n.op == op).expect("the op's record");
                let kept = node.saved.iter().any(|s| s.name == input);
                let needs_x = train_w || (op == "linear_lora" && train_a);
                assert_eq!(
                    kept, needs_x,
                    "{op}, w trained {train_w}, A trained {train_a}"
                );
                let gx = grads.get(&vars[0]).expect("∂x").clone();
                // The reference: the same op with every weight trained.
                let tape = Tape::<f32>::new();
                let all: Vec<_> = ["x", "w", "bias", "a", "b", "residual"]
                    .iter()
                    .zip(&vars)
                    .map(|(name, v)| tape.param(*name, v.value().clone()))
                    .collect();
                let y = forward(&all);
                let weights = tape.constant(value(&[2, 20, 64], 7));
                let want = tape
                    .backward(&y.mul(&weights).unwrap().sum_all().unwrap())
                    .unwrap();
                assert_eq!(&gx, want.get(&all[0]).unwrap(), "{op}: ∂x");
                if train_w {
                    assert_eq!(grads.get(&vars[1]), want.get(&all[1]), "{op}: ∂w");
                }
            }
        }
    }

    #[test]
    fn a_weight_used_transposed_gets_a_row_major_gradient() {
        // The tied lm_head: logits = x · wteᵀ. The gradient must come back in wte's own
        // layout, or every consumer (accumulation, the optimizer) takes a strided slow path.
        let tape = Tape::<f64>::new();
        let x = tape.param("x", rand_array(&[2, 3, 4], 1));
        let w = tape.param("w", rand_array(&[5, 4], 2));
        let y = x.matmul(&w.transpose(0, 1).unwrap()).unwrap();
        let grads = tape.backward(&y.sum_all().unwrap()).unwrap();
        let gw = grads.get(&w).unwrap();
        assert!(gw.is_standard_layout(), "strides {:?}", gw.strides());
        // ∂w[j, :] = Σ_rows x[row, :] for every j (the upstream gradient is all ones).
        let column_sums = x.value().sum_axis(Axis(0)).sum_axis(Axis(0));
        for row in gw.outer_iter() {
            for (g, want) in row.iter().zip(&column_sums) {
                assert!((g - want).abs() < 1e-12);
            }
        }
    }

    #[test]
    fn gradcheck_matmul_forms() {
        assert_gradcheck(
            |x| x[0].matmul(&x[1]),
            &[rand_array(&[3, 4], 1), rand_array(&[4, 5], 2)],
        );
        // Activations times a shared weight, and times a transposed weight view.
        assert_gradcheck(
            |x| x[0].matmul(&x[1]),
            &[rand_array(&[2, 3, 4], 3), rand_array(&[4, 5], 4)],
        );
        assert_gradcheck(
            |x| x[0].matmul(&x[1].transpose(0, 1)?),
            &[rand_array(&[2, 3, 4], 5), rand_array(&[5, 4], 6)],
        );
        // Batched, with a non-contiguous (permuted) left operand.
        assert_gradcheck(
            |x| x[0].permute(&[0, 2, 1])?.matmul(&x[1]),
            &[rand_array(&[2, 4, 3], 7), rand_array(&[2, 4, 2], 8)],
        );
        assert_gradcheck(
            |x| x[0].matmul(&x[1]),
            &[rand_array(&[2, 2, 3, 4], 9), rand_array(&[2, 2, 4, 3], 10)],
        );
    }
}
