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
//! backward adds ∂bias = Σ_rows G.
//!
//! Backward: ∂A = G·Bᵀ and ∂B = Aᵀ·G, each computed only if that input needs it — this is where
//! a frozen weight saves a whole GEMM. Bᵀ and Aᵀ are stride-swapped views, never copies.

use ndarray::{Array2, Array3, ArrayD, ArrayView2, ArrayView3, Ix2, IxDyn};
use rayon::prelude::*;

use crate::error::{shape_err, Result};
use crate::gemm::{gemm, gemm_new, gemm_write};
use crate::tape::{OpRecord, Tensor, Var};
use crate::Float;

/// The tensor as a matrix of `rows × cols` (row-major); a view when the layout allows.
fn as_matrix<T: Float>(x: &Tensor<T>, rows: usize, cols: usize) -> ndarray::CowArray<'_, T, Ix2> {
    x.to_shape((rows, cols)).expect("element count checked")
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
        let record = OpRecord::new("matmul", &inputs)
            .saves("a", &a)
            .saves("b", &b);

        if bd == 2 {
            // Activations [..., m, k] times a shared weight [k, n]: all rows in one GEMM.
            let rows = a_shape[..ad - 1].iter().product::<usize>();
            let c = matmul_2d(as_matrix(&a, rows, k).view(), as_matrix(&b, k, n).view());
            let out = to_shape(c, &out_shape);
            return record
                .attrs(format!("[{rows}×{k}]·[{k}×{n}]"))
                .finish(out, move |g, needs| {
                    let g2 = g
                        .to_shape((rows, n))
                        .expect("gradient has the output's size");
                    let b2 = as_matrix(&b, k, n);
                    let ga = needs[0].then(|| to_shape(matmul_2d(g2.view(), b2.t()), &a_shape));
                    let gb = needs[1]
                        .then(|| matmul_2d(as_matrix(&a, rows, k).t(), g2.view()).into_dyn());
                    vec![ga, gb]
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
                    let b3 = as_batches(&b, batch, k, n);
                    to_shape(matmul_batched(g3.view(), b3.view(), false, true), &a_shape)
                });
                let gb = needs[1].then(|| {
                    let a3 = as_batches(&a, batch, m, k);
                    to_shape(matmul_batched(a3.view(), g3.view(), true, false), &b_shape)
                });
                vec![ga, gb]
            })
    }
}

impl<'t, T: Float> Var<'t, T> {
    /// `self · w + bias` for activations `[..., k]`, a 2-D weight `[k, n]` (any strides: a
    /// transposed view is free) and an optional bias `[n]` — one GEMM onto the broadcast bias.
    /// ∂x = G·wᵀ, ∂w = xᵀ·G, ∂bias = Σ_rows G; each only if needed.
    pub fn linear(&self, w: &Var<'t, T>, bias: Option<&Var<'t, T>>) -> Result<Var<'t, T>> {
        let (x_shape, w_shape) = (self.shape().to_vec(), w.shape().to_vec());
        if x_shape.is_empty() || w_shape.len() != 2 || x_shape[x_shape.len() - 1] != w_shape[0] {
            return shape_err(
                "linear",
                &x_shape,
                &w_shape,
                "need x [..., k] and a weight [k, n]",
            );
        }
        let (k, n) = (w_shape[0], w_shape[1]);
        if let Some(b) = bias {
            if b.shape() != [n] {
                return shape_err(
                    "linear",
                    b.shape(),
                    &w_shape,
                    format!("the bias must be [{n}]"),
                );
            }
        }
        let rows = x_shape[..x_shape.len() - 1].iter().product::<usize>();
        let mut out_shape = x_shape[..x_shape.len() - 1].to_vec();
        out_shape.push(n);
        let (x, wv) = (self.value().clone(), w.value().clone());
        let (x2, w2) = (as_matrix(&x, rows, k), as_matrix(&wv, k, n));
        let c = match bias {
            Some(b) => {
                let b = b
                    .value()
                    .view()
                    .into_dimensionality::<ndarray::Ix1>()
                    .expect("checked");
                let mut c = b.broadcast((rows, n)).expect("checked").to_owned();
                gemm(T::one(), x2.view(), w2.view(), T::one(), c.view_mut());
                c
            }
            None => gemm_new(T::one(), x2.view(), w2.view()),
        };
        let out = to_shape(c, &out_shape);
        let mut inputs = vec![self, w];
        inputs.extend(bias);
        OpRecord::new("linear", &inputs)
            .attrs(format!(
                "[{rows}×{k}]·[{k}×{n}]{}",
                if bias.is_some() { "+b" } else { "" }
            ))
            .saves("x", &x)
            .saves("w", &wv)
            .finish(out, move |g, needs| {
                let g2 = g
                    .to_shape((rows, n))
                    .expect("gradient has the output's size");
                let gx = needs[0]
                    .then(|| to_shape(matmul_2d(g2.view(), as_matrix(&wv, k, n).t()), &x_shape));
                let gw =
                    needs[1].then(|| matmul_2d(as_matrix(&x, rows, k).t(), g2.view()).into_dyn());
                let mut grads = vec![gx, gw];
                if needs.len() == 3 {
                    grads.push(needs[2].then(|| g2.sum_axis(ndarray::Axis(0)).into_dyn()));
                }
                grads
            })
    }
}

#[cfg(test)]
mod tests {
    use crate::ops::test_util::{assert_gradcheck, rand_array};
    use crate::Tape;
    use ndarray::arr2;

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
        assert!(x.linear(&w, Some(&x)).is_err());
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
