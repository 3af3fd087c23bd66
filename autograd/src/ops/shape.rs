//! Shape ops: reshape, permute/transpose, narrow (slice) and concat.
//!
//! permute, transpose and narrow return *views*: the output shares the input's buffer with
//! different strides (an `ArcArray` clone), so they cost nothing; reshape is free too when the
//! input is contiguous. Downstream ops, matmul included, read any strides.

use ndarray::{ArrayD, Axis, IxDyn, Slice};

use super::check_axis;
use crate::error::{arg_err, shape_err, Result};
use crate::tape::{OpRecord, Tensor, Var};
use crate::Float;

/// Reshapes (row-major order) without copying when the layout allows it.
pub(crate) fn reshape_tensor<T: Float>(x: Tensor<T>, shape: &[usize]) -> Tensor<T> {
    if x.is_standard_layout() {
        x.into_shape_with_order(IxDyn(shape))
            .expect("contiguous reshape with equal size")
    } else {
        x.as_standard_layout()
            .into_owned()
            .into_shape_with_order(IxDyn(shape))
            .expect("contiguous reshape with equal size")
            .into_shared()
    }
}

fn reshape_array<T: Float>(g: ArrayD<T>, shape: &[usize]) -> ArrayD<T> {
    let g = if g.is_standard_layout() {
        g
    } else {
        g.as_standard_layout().into_owned()
    };
    g.into_shape_with_order(IxDyn(shape))
        .expect("contiguous reshape with equal size")
}

impl<'t, T: Float> Var<'t, T> {
    /// The same elements in row-major order under a new shape of equal size.
    pub fn reshape(&self, shape: &[usize]) -> Result<Var<'t, T>> {
        if shape.iter().product::<usize>() != self.len() {
            return shape_err("reshape", self.shape(), shape, "element counts differ");
        }
        let out = reshape_tensor(self.value().clone(), shape);
        let old = self.shape().to_vec();
        OpRecord::new("reshape", &[self])
            .attrs(format!("{shape:?}"))
            .finish(out, move |g, _| vec![Some(reshape_array(g, &old))])
    }

    /// Reorders the axes: output axis i is input axis `axes[i]`. A view, no copy.
    pub fn permute(&self, axes: &[usize]) -> Result<Var<'t, T>> {
        let mut seen = vec![false; self.ndim()];
        if axes.len() != self.ndim()
            || axes
                .iter()
                .any(|&a| a >= self.ndim() || std::mem::replace(&mut seen[a], true))
        {
            return arg_err(
                "permute",
                format!(
                    "{axes:?} is not a permutation of the {} axes of {:?}",
                    self.ndim(),
                    self.shape()
                ),
            );
        }
        let out = self.value().clone().permuted_axes(IxDyn(axes));
        let mut inverse = vec![0; axes.len()];
        for (i, &a) in axes.iter().enumerate() {
            inverse[a] = i;
        }
        OpRecord::new("permute", &[self])
            .attrs(format!("{axes:?}"))
            .finish(out, move |g, _| {
                vec![Some(g.permuted_axes(IxDyn(&inverse)))]
            })
    }

    /// Swaps two axes. A view, no copy.
    pub fn transpose(&self, a: usize, b: usize) -> Result<Var<'t, T>> {
        check_axis("transpose", a, self.ndim())?;
        check_axis("transpose", b, self.ndim())?;
        let mut axes: Vec<usize> = (0..self.ndim()).collect();
        axes.swap(a, b);
        self.permute(&axes)
    }

    /// Elements `start .. start+len` along `axis`. A view, no copy; backward writes the
    /// gradient into a zero tensor of the input's shape.
    pub fn narrow(&self, axis: usize, start: usize, len: usize) -> Result<Var<'t, T>> {
        check_axis("narrow", axis, self.ndim())?;
        let size = self.shape()[axis];
        if start + len > size {
            return arg_err(
                "narrow",
                format!(
                    "range {start}..{} exceeds size {size} of axis {axis} in {:?}",
                    start + len,
                    self.shape()
                ),
            );
        }
        let mut out = self.value().clone();
        out.slice_axis_inplace(Axis(axis), Slice::from(start..start + len));
        let shape = self.shape().to_vec();
        OpRecord::new("narrow", &[self])
            .attrs(format!("axis={axis} {start}..{}", start + len))
            .finish(out, move |g, _| {
                let mut full = ArrayD::zeros(IxDyn(&shape));
                full.slice_axis_mut(Axis(axis), Slice::from(start..start + len))
                    .assign(&g);
                vec![Some(full)]
            })
    }
}

/// Joins tensors along `axis`; all other dims must match.
pub fn concat<'t, T: Float>(vars: &[&Var<'t, T>], axis: usize) -> Result<Var<'t, T>> {
    let Some(first) = vars.first() else {
        return arg_err("concat", "needs at least one tensor");
    };
    check_axis("concat", axis, first.ndim())?;
    for v in &vars[1..] {
        let same_rank = v.ndim() == first.ndim();
        if !same_rank || (0..first.ndim()).any(|d| d != axis && v.shape()[d] != first.shape()[d]) {
            return shape_err(
                "concat",
                first.shape(),
                v.shape(),
                format!("all dims but axis {axis} must match"),
            );
        }
    }
    let values: Vec<_> = vars.iter().map(|v| v.value()).collect();
    let out = concat_values(&values, axis);
    let sizes: Vec<usize> = vars.iter().map(|v| v.shape()[axis]).collect();
    OpRecord::new("concat", vars)
        .attrs(format!("axis={axis}"))
        .finish(out, move |g, needs| {
            let mut start = 0;
            sizes
                .iter()
                .zip(needs)
                .map(|(&n, &need)| {
                    let part = need.then(|| {
                        g.slice_axis(Axis(axis), Slice::from(start..start + n))
                            .to_owned()
                    });
                    start += n;
                    part
                })
                .collect()
        })
}

/// Tensors joined along `axis` (their shapes agree but on it): `concat`'s value, and the
/// stack of LoRA's A's that `linear_lora`'s backward reads. Row-major inputs are copied as
/// whole blocks (along axis 0, each input is one block): ndarray's element-wise
/// `concatenate` took 5–9 µs to stack two 8 × 128 A's.
pub(super) fn concat_values<T: Float>(vars: &[&Tensor<T>], axis: usize) -> ArrayD<T> {
    let mut shape = vars[0].shape().to_vec();
    shape[axis] = vars.iter().map(|v| v.shape()[axis]).sum();
    let blocks: Option<Vec<&[T]>> = vars.iter().map(|v| v.as_slice()).collect();
    let Some(blocks) = blocks else {
        let views: Vec<_> = vars.iter().map(|v| v.view()).collect();
        return ndarray::concatenate(Axis(axis), &views).expect("shapes checked");
    };
    // Each input is `outer` runs of `shape[axis..]`-sized blocks; the output interleaves them.
    let outer: usize = shape[..axis].iter().product();
    let mut flat = Vec::with_capacity(shape.iter().product());
    for i in 0..outer {
        for (v, block) in vars.iter().zip(&blocks) {
            let run = v.shape()[axis..].iter().product::<usize>();
            flat.extend_from_slice(&block[i * run..(i + 1) * run]);
        }
    }
    ArrayD::from_shape_vec(IxDyn(&shape), flat).expect("sizes add up")
}

#[cfg(test)]
mod tests {
    use super::concat;
    use crate::ops::test_util::{assert_gradcheck, rand_array};
    use crate::Tape;

    #[test]
    fn views_share_the_buffer() {
        let tape = Tape::<f32>::new();
        let x = tape.constant(ndarray::ArrayD::<f32>::zeros(ndarray::IxDyn(&[4, 6])));
        let t = x.transpose(0, 1).unwrap();
        let n = x.narrow(1, 2, 3).unwrap();
        assert_eq!(t.shape(), &[6, 4]);
        assert_eq!(n.shape(), &[4, 3]);
        assert_eq!(t.value().as_ptr(), x.value().as_ptr());
        assert_eq!(n.value().as_ptr(), unsafe { x.value().as_ptr().add(2) });
    }

    #[test]
    fn gradcheck_shape_ops() {
        let x = rand_array(&[2, 3, 4], 7);
        assert_gradcheck(|x| x[0].reshape(&[4, 6]), &[x.clone()]);
        assert_gradcheck(|x| x[0].permute(&[2, 0, 1]), &[x.clone()]);
        assert_gradcheck(|x| x[0].transpose(0, 2), &[x.clone()]);
        // Reshape of a non-contiguous view must copy in row-major order.
        assert_gradcheck(|x| x[0].transpose(1, 2)?.reshape(&[2, 12]), &[x.clone()]);
        assert_gradcheck(|x| x[0].narrow(2, 1, 2), &[x.clone()]);
        let y = rand_array(&[2, 5, 4], 8);
        assert_gradcheck(|x| concat(&[&x[0], &x[1]], 1), &[x, y]);
    }

    #[test]
    fn concat_gives_ndarrays_concatenation_on_every_axis_and_layout() {
        let tape = Tape::<f64>::new();
        let x = tape.constant(rand_array(&[2, 3, 4], 1));
        let y = tape.constant(rand_array(&[2, 3, 4], 2));
        // Transposed back, a view is row-major again (the block path); z is not (element-wise).
        let yt = y.transpose(0, 2).unwrap().transpose(0, 2).unwrap();
        let z = tape
            .constant(rand_array(&[4, 3, 2], 3))
            .transpose(0, 2)
            .unwrap();
        for axis in 0..3 {
            for other in [&y, &yt, &z] {
                let got = concat(&[&x, other, &x], axis).unwrap();
                let want = ndarray::concatenate(
                    ndarray::Axis(axis),
                    &[x.value().view(), other.value().view(), x.value().view()],
                )
                .unwrap();
                assert_eq!(got.value().view(), want.view(), "axis {axis}");
            }
        }
    }

    #[test]
    fn bad_arguments_are_errors() {
        let tape = Tape::<f32>::new();
        let x = tape.constant(ndarray::ArrayD::<f32>::zeros(ndarray::IxDyn(&[2, 3])));
        assert!(x.reshape(&[4, 2]).is_err());
        assert!(x.permute(&[0, 0]).is_err());
        assert!(x.narrow(1, 2, 2).is_err());
        let y = tape.constant(ndarray::ArrayD::<f32>::zeros(ndarray::IxDyn(&[3, 3])));
        assert!(concat(&[&x, &y], 1).is_err());
        assert!(concat(&[&x, &y], 0).is_ok());
    }
}
