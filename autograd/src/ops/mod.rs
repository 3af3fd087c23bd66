//! The ops, one file per family. Each op computes its output and defines its backward rule in
//! the same function, side by side (micrograd's layout), and each file carries its own tests.
//!
//! | file | ops |
//! |---|---|
//! | `arith.rs` | add, sub, mul, div (NumPy broadcasting), neg, scale, add_scalar, pow |
//! | `unary.rs` | exp, log, sqrt, tanh, relu, gelu (GPT-2's tanh form) |
//! | `reduce.rs` | sum, mean over axes (keepdim or not), sum_all, mean_all |
//! | `shape.rs` | reshape, permute, transpose, narrow (slice), concat |
//! | `matmul.rs` | matmul (2-D, batched, activations × shared weight); linear and its fused forms: + residual, + GELU, + LoRA's low-rank terms |
//! | `embedding.rs` | embedding lookup (scatter-add backward) |
//! | `softmax.rs` | softmax, log_softmax on the last axis |
//! | `loss.rs` | fused cross-entropy from logits with integer targets and an ignore index |
//! | `layer_norm.rs` | fused layer norm with weight and bias |
//! | `attention.rs` | fused multi-head scaled dot-product attention, causal or not |
//! | `dropout.rs` | seeded inverted dropout (identity in eval) |
//!
//! The helpers below are shared by the ops: broadcasting rules, reducing a gradient back to
//! an input's shape, and elementwise loops that switch to rayon above a size threshold.

mod arith;
pub mod attention;
mod dropout;
mod embedding;
mod layer_norm;
mod loss;
mod matmul;
mod reduce;
mod shape;
mod softmax;
pub mod unary;

pub use matmul::LoraTerm;
pub use shape::concat;
pub(crate) use unary::gelu_and_derivative;

use std::mem::MaybeUninit;

use ndarray::{ArrayBase, ArrayD, Axis, Data, IxDyn, Zip};
use rayon::prelude::*;

use crate::error::{shape_err, Result};
use crate::Float;

/// Elementwise loops over at least this many elements run on rayon's pool.
pub const PARALLEL_MIN_LEN: usize = 1 << 15;

/// Why a tensor a backward rule keeps only for one input's gradient is there when that
/// gradient is asked for: an op keeps it iff that input required a gradient when the op was
/// recorded, and the tape asks for exactly those (`needs` is the inputs' `requires_grad`).
pub(crate) const KEPT_FOR_GRADIENT: &str =
    "an operand is kept whenever the gradient that reads it can be asked for";

/// NumPy's broadcasting rule: align shapes on the right; each pair of dims must be equal or 1.
pub(crate) fn broadcast_shape(op: &'static str, a: &[usize], b: &[usize]) -> Result<Vec<usize>> {
    let n = a.len().max(b.len());
    let mut out = vec![0; n];
    for i in 0..n {
        let da = if i + a.len() >= n {
            a[i + a.len() - n]
        } else {
            1
        };
        let db = if i + b.len() >= n {
            b[i + b.len() - n]
        } else {
            1
        };
        out[i] = match (da, db) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => {
                return shape_err(
                    op,
                    a,
                    b,
                    format!("dimension {i} differs ({da} vs {db}) and neither is 1"),
                )
            }
        };
    }
    Ok(out)
}

/// Sums a gradient of the broadcast shape back down to an input's `shape`: over the leading
/// dims the input did not have, and over the dims where the input had size 1.
pub(crate) fn reduce_to_shape<T: Float>(g: ArrayD<T>, shape: &[usize]) -> ArrayD<T> {
    if g.shape() == shape {
        return g;
    }
    let mut r = g;
    while r.ndim() > shape.len() {
        r = r.sum_axis(Axis(0));
    }
    for (axis, &size) in shape.iter().enumerate() {
        if size == 1 && r.shape()[axis] != 1 {
            r = r.sum_axis(Axis(axis)).insert_axis(Axis(axis));
        }
    }
    r
}

/// Elements per rayon task in the contiguous elementwise loops: large enough that a task's
/// overhead is noise, small enough that both cores get work.
const CHUNK: usize = 1 << 14;

/// `out[i] = f(out[i], src[i])` over contiguous slices, wide-vectorised and in parallel when
/// large.
fn zip_slice<T: Float>(out: &mut [T], src: &[T], f: &(impl Fn(T, T) -> T + Sync)) {
    let run = |out: &mut [T], src: &[T]| {
        crate::simd::vectorized(
            #[inline(always)]
            || {
                for (o, &x) in out.iter_mut().zip(src) {
                    *o = f(*o, x);
                }
            },
        )
    };
    if src.len() >= PARALLEL_MIN_LEN {
        out.par_chunks_mut(CHUNK)
            .zip(src.par_chunks(CHUNK))
            .for_each(|(o, s)| run(o, s));
    } else {
        run(out, src);
    }
}

/// `f(a[i], b[i])` into a new vector, wide-vectorised and in parallel when large. Each output
/// element is written once: the buffer is not zeroed first.
fn zip_new<T: Float>(a: &[T], b: &[T], f: &(impl Fn(T, T) -> T + Sync)) -> Vec<T> {
    debug_assert_eq!(a.len(), b.len());
    let mut out = Vec::with_capacity(a.len());
    let run = |out: &mut [MaybeUninit<T>], a: &[T], b: &[T]| {
        crate::simd::vectorized(
            #[inline(always)]
            || {
                for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
                    o.write(f(x, y));
                }
            },
        )
    };
    let spare = &mut out.spare_capacity_mut()[..a.len()];
    if a.len() >= PARALLEL_MIN_LEN {
        spare
            .par_chunks_mut(CHUNK)
            .zip(a.par_chunks(CHUNK))
            .zip(b.par_chunks(CHUNK))
            .for_each(|((o, a), b)| run(o, a, b));
    } else {
        run(spare, a, b);
    }
    // SAFETY: the loops above wrote every element below a.len().
    unsafe { out.set_len(a.len()) };
    out
}

/// `f` applied to every element, in parallel for large arrays.
pub(crate) fn map<T: Float, S: Data<Elem = T>>(
    a: &ArrayBase<S, IxDyn>,
    f: impl Fn(T) -> T + Sync + Send,
) -> ArrayD<T> {
    if let Some(src) = a.as_slice() {
        let out = zip_new(src, src, &|x, _| f(x));
        return ArrayD::from_shape_vec(a.raw_dim(), out).expect("same size");
    }
    if a.len() >= PARALLEL_MIN_LEN {
        Zip::from(a).par_map_collect(|&x| f(x))
    } else {
        a.mapv(f)
    }
}

/// `f(a)` elementwise into two new arrays of `a`'s shape (a value and a derivative from one
/// pass), wide-vectorised and in parallel when large.
pub(crate) fn map_pair<T: Float, S: Data<Elem = T>>(
    a: &ArrayBase<S, IxDyn>,
    f: impl Fn(T) -> (T, T) + Sync + Send,
) -> (ArrayD<T>, ArrayD<T>) {
    map_pair_slices(a, |x, y, a| {
        crate::simd::vectorized(
            #[inline(always)]
            || {
                for ((x, y), &v) in x.iter_mut().zip(y.iter_mut()).zip(a) {
                    let (u, w) = f(v);
                    x.write(u);
                    y.write(w);
                }
            },
        )
    })
}

/// [`map_pair`] with the loop given: `run(first, second, a)` writes every element of both
/// outputs for a chunk of the input (chunks in parallel from [`PARALLEL_MIN_LEN`] up).
pub(crate) fn map_pair_slices<T: Float, S: Data<Elem = T>>(
    a: &ArrayBase<S, IxDyn>,
    run: impl Fn(&mut [MaybeUninit<T>], &mut [MaybeUninit<T>], &[T]) + Sync + Send,
) -> (ArrayD<T>, ArrayD<T>) {
    let a = a.as_standard_layout();
    let src = a.as_slice().expect("standard layout");
    let (mut first, mut second) = (Vec::with_capacity(src.len()), Vec::with_capacity(src.len()));
    let (x, y) = (
        &mut first.spare_capacity_mut()[..src.len()],
        &mut second.spare_capacity_mut()[..src.len()],
    );
    if src.len() >= PARALLEL_MIN_LEN {
        x.par_chunks_mut(CHUNK)
            .zip(y.par_chunks_mut(CHUNK))
            .zip(src.par_chunks(CHUNK))
            .for_each(|((x, y), a)| run(x, y, a));
    } else {
        run(x, y, src);
    }
    // SAFETY: the loops above wrote every element of both below src.len().
    unsafe {
        first.set_len(src.len());
        second.set_len(src.len());
    }
    let shape = a.raw_dim();
    (
        ArrayD::from_shape_vec(shape.clone(), first).expect("same size"),
        ArrayD::from_shape_vec(shape, second).expect("same size"),
    )
}

/// `f(a, b)` elementwise over the broadcast `shape`.
pub(crate) fn zip_map<T: Float, S1: Data<Elem = T>, S2: Data<Elem = T>>(
    shape: &[usize],
    a: &ArrayBase<S1, IxDyn>,
    b: &ArrayBase<S2, IxDyn>,
    f: impl Fn(T, T) -> T + Sync + Send,
) -> ArrayD<T> {
    if a.shape() == shape && b.shape() == shape {
        if let (Some(x), Some(y)) = (a.as_slice(), b.as_slice()) {
            let out = zip_new(x, y, &f);
            return ArrayD::from_shape_vec(IxDyn(shape), out).expect("same size");
        }
    }
    let a = a.broadcast(IxDyn(shape)).expect("checked broadcast");
    let b = b.broadcast(IxDyn(shape)).expect("checked broadcast");
    let zip = Zip::from(&a).and(&b);
    if a.len() >= PARALLEL_MIN_LEN {
        zip.par_map_collect(|&x, &y| f(x, y))
    } else {
        zip.map_collect(|&x, &y| f(x, y))
    }
}

/// `g ← f(g, x)` elementwise, reusing the gradient's buffer (`x` has `g`'s shape).
pub(crate) fn zip_inplace<T: Float, S: Data<Elem = T>>(
    mut g: ArrayD<T>,
    x: &ArrayBase<S, IxDyn>,
    f: impl Fn(T, T) -> T + Sync + Send,
) -> ArrayD<T> {
    if let (Some(out), Some(src)) = (g.as_slice_mut(), x.as_slice()) {
        zip_slice(out, src, &f);
        return g;
    }
    let zip = Zip::from(&mut g).and(x);
    if x.len() >= PARALLEL_MIN_LEN {
        zip.par_for_each(|g, &x| *g = f(*g, x));
    } else {
        zip.for_each(|g, &x| *g = f(*g, x));
    }
    g
}

/// `acc += g` in place (gradient accumulation when a value feeds several ops).
pub(crate) fn add_assign_into<T: Float>(acc: &mut ArrayD<T>, g: &ArrayD<T>) {
    if let (Some(out), Some(src)) = (acc.as_slice_mut(), g.as_slice()) {
        return zip_slice(out, src, &|a, b| a + b);
    }
    let zip = Zip::from(acc).and(g);
    if g.len() >= PARALLEL_MIN_LEN {
        zip.par_for_each(|a, &b| *a += b);
    } else {
        zip.for_each(|a, &b| *a += b);
    }
}

/// The tensor itself when it is already row-major (a cheap clone of a shared buffer), else a
/// row-major copy: for loops that walk rows as slices.
pub(crate) fn standard_layout<T: Float>(x: crate::tape::Tensor<T>) -> crate::tape::Tensor<T> {
    if x.is_standard_layout() {
        x
    } else {
        x.as_standard_layout().into_owned().into_shared()
    }
}

/// Checks an axis argument against a rank.
pub(crate) fn check_axis(op: &'static str, axis: usize, ndim: usize) -> Result<()> {
    if axis >= ndim {
        return crate::error::arg_err(
            op,
            format!("axis {axis} is out of range for a tensor of rank {ndim}"),
        );
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod test_util {
    //! Helpers for the per-op tests: deterministic inputs and a one-line gradcheck assertion.
    use ndarray::ArrayD;
    use rand::{Rng, SeedableRng};

    use crate::gradcheck::{gradcheck, CheckedFn, GradcheckOptions};
    use crate::{Result, Var};

    /// Uniform values in [-1, 1) of the given shape, from a fixed seed.
    pub fn rand_array(shape: &[usize], seed: u64) -> ArrayD<f64> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        ArrayD::from_shape_simple_fn(ndarray::IxDyn(shape), || rng.random_range(-1.0..1.0))
    }

    /// Asserts that the tape's gradients of `f` match central differences.
    pub fn assert_gradcheck<F>(f: F, inputs: &[ArrayD<f64>])
    where
        F: for<'t> Fn(&[Var<'t, f64>]) -> Result<Var<'t, f64>>,
    {
        assert_gradcheck_dyn(&f, inputs)
    }

    // Not generic, so the tests compile one copy of it instead of one per closure.
    fn assert_gradcheck_dyn(f: &CheckedFn<'_>, inputs: &[ArrayD<f64>]) {
        let report = gradcheck(f, inputs, &GradcheckOptions::default()).expect("op runs");
        assert!(report.passed, "gradcheck failed: {report:?}");
    }
}
