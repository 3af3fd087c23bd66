//! softmax and log_softmax over the last axis, computed row by row with the max subtracted.

use ndarray::{Array2, ArrayView1, ArrayViewMut1, IxDyn, Zip};

use super::PARALLEL_MIN_LEN;
use crate::error::{arg_err, Result};
use crate::tape::{OpRecord, Tensor, Var};
use crate::Float;

/// Applies `f(input_row, output_row)` to every row of the last axis (rayon for large inputs).
/// Returns the output in the input's shape, row-major.
pub(crate) fn map_rows<T: Float>(
    x: &Tensor<T>,
    f: impl Fn(ArrayView1<T>, ArrayViewMut1<T>) + Sync + Send,
) -> ndarray::ArrayD<T> {
    let cols = *x.shape().last().expect("rank ≥ 1");
    let rows = x.len() / cols.max(1);
    let x2 = x.to_shape((rows, cols)).expect("same size");
    let mut out = Array2::zeros((rows, cols));
    let zip = Zip::from(out.rows_mut()).and(x2.rows());
    if x.len() >= PARALLEL_MIN_LEN {
        zip.par_for_each(|o, x| f(x, o));
    } else {
        zip.for_each(|o, x| f(x, o));
    }
    out.into_shape_with_order(IxDyn(x.shape()))
        .expect("same size")
}

/// Like [`map_rows`] but rewriting the rows of `g` in place, given the matching rows of `y`.
pub(crate) fn update_rows<T: Float>(
    g: ndarray::ArrayD<T>,
    y: &Tensor<T>,
    f: impl Fn(ArrayViewMut1<T>, ArrayView1<T>) + Sync + Send,
) -> ndarray::ArrayD<T> {
    let shape = g.shape().to_vec();
    let cols = *shape.last().expect("rank ≥ 1");
    let rows = g.len() / cols.max(1);
    let mut g2 = g
        .as_standard_layout()
        .into_owned()
        .into_shape_with_order((rows, cols))
        .expect("same size");
    let y2 = y.to_shape((rows, cols)).expect("same size");
    let parallel = g2.len() >= PARALLEL_MIN_LEN;
    let zip = Zip::from(g2.rows_mut()).and(y2.rows());
    if parallel {
        zip.par_for_each(&f);
    } else {
        zip.for_each(f);
    }
    g2.into_shape_with_order(IxDyn(&shape)).expect("same size")
}

fn softmax_row<T: Float>(x: ArrayView1<T>, mut out: ArrayViewMut1<T>) {
    let max = x.fold(T::neg_infinity(), |m, &v| m.max(v));
    let mut sum = T::zero();
    for (o, &v) in out.iter_mut().zip(x) {
        *o = (v - max).exp_fast();
        sum += *o;
    }
    out.mapv_inplace(|o| o / sum);
}

fn check_rank<T: Float>(op: &'static str, x: &Var<'_, T>) -> Result<()> {
    if x.ndim() == 0 {
        return arg_err(op, "needs a tensor of rank ≥ 1 (it works on the last axis)");
    }
    Ok(())
}

impl<'t, T: Float> Var<'t, T> {
    /// softmax over the last axis. ∂/∂x = y ⊙ (g − Σ g⊙y), per row.
    pub fn softmax(&self) -> Result<Var<'t, T>> {
        check_rank("softmax", self)?;
        let y: Tensor<T> = map_rows(self.value(), softmax_row).into_shared();
        let saved_y = y.clone();
        OpRecord::new("softmax", &[self])
            .saves("y", &y)
            .finish(y, move |g, _| {
                vec![Some(update_rows(g, &saved_y, |mut g, y| {
                    let dot = g.iter().zip(y).fold(T::zero(), |s, (&g, &y)| s + g * y);
                    Zip::from(&mut g)
                        .and(y)
                        .for_each(|g, &y| *g = y * (*g - dot));
                }))]
            })
    }

    /// log(softmax) over the last axis, computed stably. ∂/∂x = g − softmax·Σg, per row.
    pub fn log_softmax(&self) -> Result<Var<'t, T>> {
        check_rank("log_softmax", self)?;
        let y: Tensor<T> = map_rows(self.value(), |x, mut out| {
            let max = x.fold(T::neg_infinity(), |m, &v| m.max(v));
            let log_sum = x.fold(T::zero(), |s, &v| s + (v - max).exp_fast()).ln();
            Zip::from(&mut out)
                .and(x)
                .for_each(|o, &v| *o = (v - max) - log_sum);
        })
        .into_shared();
        let saved_y = y.clone();
        OpRecord::new("log_softmax", &[self])
            .saves("y", &y)
            .finish(y, move |g, _| {
                vec![Some(update_rows(g, &saved_y, |mut g, y| {
                    let sum = g.sum();
                    Zip::from(&mut g)
                        .and(y)
                        .for_each(|g, &y| *g -= y.exp_fast() * sum);
                }))]
            })
    }
}

#[cfg(test)]
mod tests {
    use crate::ops::test_util::{assert_gradcheck, rand_array};
    use crate::Tape;

    #[test]
    fn softmax_rows_sum_to_one_even_for_large_logits() {
        let tape = Tape::<f32>::new();
        let x = tape
            .constant(ndarray::arr2(&[[1000.0f32, 1001.0, 1002.0], [-5.0, 0.0, 5.0]]).into_dyn());
        let y = x.softmax().unwrap();
        for row in y.value().rows() {
            assert!((row.sum() - 1.0).abs() < 1e-6);
        }
        let ls = x.log_softmax().unwrap();
        assert!((ls.value()[[0, 2]] - (-0.407_605_96)).abs() < 1e-5);
    }

    #[test]
    fn gradcheck_softmax_family() {
        let x = rand_array(&[2, 3, 5], 21).mapv(|v| 3.0 * v);
        assert_gradcheck(|x| x[0].softmax(), &[x.clone()]);
        assert_gradcheck(|x| x[0].log_softmax(), &[x.clone()]);
        // On a non-contiguous view too.
        assert_gradcheck(|x| x[0].transpose(1, 2)?.softmax(), &[x]);
    }
}
