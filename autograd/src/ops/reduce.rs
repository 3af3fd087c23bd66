//! Reductions: sum and mean over chosen axes (keepdim or not), and over everything.
//!
//! Backward broadcasts the incoming gradient back over the reduced axes (÷ count for mean).

use ndarray::{ArrayD, Axis, IxDyn};

use super::check_axis;
use crate::error::{arg_err, Result};
use crate::tape::{OpRecord, Var};
use crate::Float;

/// Sorted, de-duplicated, range-checked axes.
fn normalize_axes(op: &'static str, axes: &[usize], ndim: usize) -> Result<Vec<usize>> {
    let mut sorted = axes.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    if sorted.len() != axes.len() {
        return arg_err(op, format!("axis listed twice in {axes:?}"));
    }
    for &a in &sorted {
        check_axis(op, a, ndim)?;
    }
    Ok(sorted)
}

/// Sums `x` over `axes` (ascending); the result keeps those axes as size 1 when `keepdim`.
fn sum_axes<T: Float>(x: &ndarray::ArcArray<T, IxDyn>, axes: &[usize], keepdim: bool) -> ArrayD<T> {
    let mut r = x.to_owned();
    for &a in axes.iter().rev() {
        r = r.sum_axis(Axis(a));
        if keepdim {
            r = r.insert_axis(Axis(a));
        }
    }
    r
}

/// Broadcasts a reduced gradient back to `input_shape`, multiplied by `factor`.
fn expand_back<T: Float>(
    g: ArrayD<T>,
    axes: &[usize],
    keepdim: bool,
    input_shape: &[usize],
    factor: T,
) -> ArrayD<T> {
    let mut g = g;
    if !keepdim {
        for &a in axes {
            g = g.insert_axis(Axis(a));
        }
    }
    let b = g
        .broadcast(IxDyn(input_shape))
        .expect("reduced shape broadcasts back");
    if factor == T::one() {
        b.to_owned()
    } else {
        b.mapv(|v| v * factor)
    }
}

impl<'t, T: Float> Var<'t, T> {
    /// Sum over `axes`. ∂/∂x = g broadcast back over the summed axes.
    pub fn sum(&self, axes: &[usize], keepdim: bool) -> Result<Var<'t, T>> {
        let axes = normalize_axes("sum", axes, self.ndim())?;
        let out = sum_axes(self.value(), &axes, keepdim);
        let shape = self.shape().to_vec();
        OpRecord::new("sum", &[self])
            .attrs(format!("axes={axes:?} keepdim={keepdim}"))
            .finish(out, move |g, _| {
                vec![Some(expand_back(g, &axes, keepdim, &shape, T::one()))]
            })
    }

    /// Mean over `axes`. ∂/∂x = g/n broadcast back, n the number of elements averaged.
    pub fn mean(&self, axes: &[usize], keepdim: bool) -> Result<Var<'t, T>> {
        let axes = normalize_axes("mean", axes, self.ndim())?;
        let count: usize = axes.iter().map(|&a| self.shape()[a]).product();
        if count == 0 {
            return arg_err(
                "mean",
                format!("mean over zero elements (shape {:?})", self.shape()),
            );
        }
        let inv = T::from_f64(1.0 / count as f64);
        let out = sum_axes(self.value(), &axes, keepdim).mapv_into(|v| v * inv);
        let shape = self.shape().to_vec();
        OpRecord::new("mean", &[self])
            .attrs(format!("axes={axes:?} keepdim={keepdim}"))
            .finish(out, move |g, _| {
                vec![Some(expand_back(g, &axes, keepdim, &shape, inv))]
            })
    }

    /// Sum of all elements, as a 0-dimensional tensor.
    pub fn sum_all(&self) -> Result<Var<'t, T>> {
        let axes: Vec<usize> = (0..self.ndim()).collect();
        self.sum(&axes, false)
    }

    /// Mean of all elements, as a 0-dimensional tensor.
    pub fn mean_all(&self) -> Result<Var<'t, T>> {
        let axes: Vec<usize> = (0..self.ndim()).collect();
        self.mean(&axes, false)
    }
}

#[cfg(test)]
mod tests {
    use crate::ops::test_util::{assert_gradcheck, rand_array};
    use crate::Tape;
    use ndarray::{arr2, ArrayD};

    #[test]
    fn sum_and_mean_values() {
        let tape = Tape::<f64>::new();
        let x = tape.constant(arr2(&[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]).into_dyn());
        assert_eq!(x.sum(&[0], false).unwrap().value().shape(), &[3]);
        assert_eq!(
            x.sum(&[1], true).unwrap().value(),
            &arr2(&[[6.0], [15.0]]).into_dyn().into_shared()
        );
        assert_eq!(x.mean_all().unwrap().item(), Some(3.5));
        assert!(x.sum(&[2], false).is_err());
        assert!(x.sum(&[1, 1], false).is_err());
    }

    #[test]
    fn gradcheck_reductions_over_axes() {
        let x: ArrayD<f64> = rand_array(&[2, 3, 4], 5);
        for keepdim in [false, true] {
            for axes in [vec![0], vec![1], vec![2], vec![0, 2], vec![0, 1, 2]] {
                let a = axes.clone();
                assert_gradcheck(move |x| x[0].sum(&a, keepdim), &[x.clone()]);
                let a = axes.clone();
                assert_gradcheck(move |x| x[0].mean(&a, keepdim), &[x.clone()]);
            }
        }
    }
}
