//! Strided matrix multiplication, the one kernel every matmul (forward and backward) goes through.
//!
//! matrixmultiply reads any row/column strides, so a transposed operand is just a view with
//! swapped strides: no copy is ever made to transpose. Large products are split into row (or
//! column) blocks that run on rayon's pool — the only thread pool in the process — each block a
//! single-threaded GEMM. The split never changes the order of the inner (k) sum, so results are
//! deterministic for a given thread count.
//!
//! Two global counters (calls and floating-point operations) let tests prove that a gradient
//! nobody needs was never computed, and let benchmarks report FLOP/s.

use std::sync::atomic::{AtomicU64, Ordering};

use ndarray::{ArrayView2, ArrayViewMut2, Axis};
use rayon::prelude::*;

use crate::Float;

static GEMM_CALLS: AtomicU64 = AtomicU64::new(0);
static GEMM_FLOPS: AtomicU64 = AtomicU64::new(0);

/// Products with fewer multiply-adds than this run on the calling thread.
const PARALLEL_MIN_MACS: usize = 1 << 18;

/// Number of GEMM calls made so far by this process (all threads).
pub fn gemm_calls() -> u64 {
    GEMM_CALLS.load(Ordering::Relaxed)
}

/// Floating-point operations (2·m·n·k per call) performed by GEMM so far in this process.
pub fn gemm_flops() -> u64 {
    GEMM_FLOPS.load(Ordering::Relaxed)
}

/// `c ← α·a·b + β·c` for 2-D views of any strides (`a`: m×k, `b`: k×n, `c`: m×n).
///
/// Shapes are checked by the callers (the ops), which know the user-facing shapes; here a
/// mismatch is a bug, hence the assertion.
pub fn gemm<T: Float>(alpha: T, a: ArrayView2<T>, b: ArrayView2<T>, beta: T, c: ArrayViewMut2<T>) {
    let (m, k) = a.dim();
    let (k2, n) = b.dim();
    assert!(
        k == k2 && c.dim() == (m, n),
        "gemm: internal shape bug {:?}·{:?}→{:?}",
        a.dim(),
        b.dim(),
        c.dim()
    );
    GEMM_CALLS.fetch_add(1, Ordering::Relaxed);
    GEMM_FLOPS.fetch_add((2 * m * n * k) as u64, Ordering::Relaxed);
    gemm_split(alpha, a, b, beta, c);
}

/// `c ← α·a·b + β·c` for a single row `a` (`1 × k`): one pass over `b` with no packing, the
/// memory-bound shape of token-by-token generation. `b`'s columns are split across threads; the
/// k-sum of each output is a plain in-order loop, so results do not depend on the split.
fn gemv<T: Float>(alpha: T, a: ArrayView2<T>, b: ArrayView2<T>, beta: T, mut c: ArrayViewMut2<T>) {
    let (k, n) = b.dim();
    let a_row = a.row(0);
    let cols = if k * n >= PARALLEL_MIN_MACS && rayon::current_num_threads() > 1 {
        n.div_ceil(rayon::current_num_threads())
    } else {
        n.max(1)
    };
    let mut c_row = c.row_mut(0);
    let blocks: Vec<_> = b
        .axis_chunks_iter(Axis(1), cols)
        .zip(c_row.axis_chunks_iter_mut(Axis(0), cols))
        .collect();
    blocks.into_par_iter().for_each(|(b, mut c)| {
        let scale = |acc: T, old: T| {
            if beta == T::zero() {
                alpha * acc
            } else {
                alpha * acc + beta * old
            }
        };
        if b.strides()[1] == 1 {
            // Rows of b are contiguous: accumulate a[p]·b[p, :] row by row.
            let mut acc = vec![T::zero(); b.ncols()];
            for (p, b_row) in b.outer_iter().enumerate() {
                let ap = a_row[p];
                let b_row = b_row.as_slice().expect("unit column stride");
                for (acc, &bv) in acc.iter_mut().zip(b_row) {
                    *acc += ap * bv;
                }
            }
            c.iter_mut()
                .zip(acc)
                .for_each(|(c, acc)| *c = scale(acc, *c));
        } else {
            // Columns of b are contiguous (a transposed weight): one dot product per output.
            let a_vec: Vec<T> = a_row.iter().copied().collect();
            for (c, b_col) in c.iter_mut().zip(b.axis_iter(Axis(1))) {
                let acc = match b_col.as_slice() {
                    Some(col) => dot(&a_vec, col),
                    None => b_col
                        .iter()
                        .zip(&a_vec)
                        .fold(T::zero(), |s, (&bv, &av)| s + av * bv),
                };
                *c = scale(acc, *c);
            }
        }
    });
}

/// A dot product with eight independent accumulators, so the compiler can vectorise it (one
/// running sum would serialise every addition). The lanes are combined in a fixed order.
fn dot<T: Float>(a: &[T], b: &[T]) -> T {
    let mut lanes = [T::zero(); 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (a8.remainder(), b8.remainder());
    for (x, y) in a8.zip(b8) {
        for l in 0..8 {
            lanes[l] += x[l] * y[l];
        }
    }
    let mut sum = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3]))
        + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
    for (&x, &y) in ra.iter().zip(rb) {
        sum += x * y;
    }
    sum
}

fn gemm_split<T: Float>(
    alpha: T,
    a: ArrayView2<T>,
    b: ArrayView2<T>,
    beta: T,
    mut c: ArrayViewMut2<T>,
) {
    let (m, k) = a.dim();
    let n = b.ncols();
    if m == 1 && k > 0 && (b.strides()[1] == 1 || b.strides()[0] == 1) {
        return gemv(alpha, a, b, beta, c);
    }
    let threads = rayon::current_num_threads();
    if threads <= 1 || m * n * k < PARALLEL_MIN_MACS || (m < 16 && n < 16) {
        return gemm_serial(alpha, a, b, beta, c);
    }
    if m >= n {
        let rows = m.div_ceil(threads);
        let blocks: Vec<_> = a
            .axis_chunks_iter(Axis(0), rows)
            .zip(c.axis_chunks_iter_mut(Axis(0), rows))
            .collect();
        blocks
            .into_par_iter()
            .for_each(|(a_rows, c_rows)| gemm_serial(alpha, a_rows, b, beta, c_rows));
    } else {
        let cols = n.div_ceil(threads);
        let blocks: Vec<_> = b
            .axis_chunks_iter(Axis(1), cols)
            .zip(c.axis_chunks_iter_mut(Axis(1), cols))
            .collect();
        blocks
            .into_par_iter()
            .for_each(|(b_cols, c_cols)| gemm_serial(alpha, a, b_cols, beta, c_cols));
    }
}

fn gemm_serial<T: Float>(
    alpha: T,
    a: ArrayView2<T>,
    b: ArrayView2<T>,
    beta: T,
    mut c: ArrayViewMut2<T>,
) {
    let (m, k) = a.dim();
    let n = b.ncols();
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        c.mapv_inplace(|x| {
            if beta == T::zero() {
                T::zero()
            } else {
                beta * x
            }
        });
        return;
    }
    let (sa, sb, sc) = (a.strides(), b.strides(), c.strides());
    let (rsc, csc) = (sc[0], sc[1]);
    // SAFETY: the views describe valid matrices of the asserted shapes; `c` is a unique
    // mutable view so it cannot alias `a` or `b`.
    unsafe {
        T::gemm(
            m,
            k,
            n,
            alpha,
            a.as_ptr(),
            sa[0],
            sa[1],
            b.as_ptr(),
            sb[0],
            sb[1],
            beta,
            c.as_mut_ptr(),
            rsc,
            csc,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array2;

    fn naive(a: &Array2<f64>, b: &Array2<f64>) -> Array2<f64> {
        let mut c = Array2::zeros((a.nrows(), b.ncols()));
        for i in 0..a.nrows() {
            for j in 0..b.ncols() {
                c[[i, j]] = (0..a.ncols()).map(|p| a[[i, p]] * b[[p, j]]).sum();
            }
        }
        c
    }

    #[test]
    fn transposed_views_multiply_without_copies() {
        let a = Array2::from_shape_fn((70, 90), |(i, j)| ((i * 7 + j * 3) % 11) as f64 - 5.0);
        let b = Array2::from_shape_fn((70, 80), |(i, j)| ((i * 5 + j) % 13) as f64 - 6.0);
        // aᵀ·b with aᵀ a stride-swapped view.
        let mut c = Array2::zeros((90, 80));
        gemm(1.0, a.t(), b.view(), 0.0, c.view_mut());
        assert_eq!(c, naive(&a.t().to_owned(), &b));
    }

    #[test]
    fn single_rows_take_the_gemv_path_for_both_weight_layouts() {
        let a = Array2::from_shape_fn((1, 300), |(_, j)| (j % 7) as f64 - 3.0);
        let b = Array2::from_shape_fn((300, 1000), |(i, j)| ((i * 3 + j) % 5) as f64 - 2.0);
        let want = naive(&a, &b);
        let mut c = Array2::from_elem((1, 1000), 1.0);
        gemm(1.0, a.view(), b.view(), 0.0, c.view_mut());
        assert_eq!(c, want);
        let bt = b.t().as_standard_layout().into_owned(); // [1000, 300]: use its transpose view
        let mut c2 = Array2::from_elem((1, 1000), 1.0);
        gemm(2.0, a.view(), bt.t(), 1.0, c2.view_mut());
        assert_eq!(c2, want * 2.0 + 1.0);
    }

    #[test]
    fn beta_accumulates_and_large_products_split_across_threads() {
        let a = Array2::from_shape_fn((300, 200), |(i, j)| ((i + 2 * j) % 7) as f64 - 3.0);
        let b = Array2::from_shape_fn((200, 150), |(i, j)| ((3 * i + j) % 5) as f64 - 2.0);
        let mut c = Array2::from_elem((300, 150), 1.0);
        gemm(2.0, a.view(), b.view(), 1.0, c.view_mut());
        assert_eq!(c, naive(&a, &b) * 2.0 + 1.0);
        // A wide, short product takes the column split.
        let a1 = a.slice(ndarray::s![..2, ..]).to_owned();
        let b1 = Array2::from_shape_fn((200, 2000), |(i, j)| ((i + j) % 3) as f64);
        let mut c1 = Array2::zeros((2, 2000));
        gemm(1.0, a1.view(), b1.view(), 0.0, c1.view_mut());
        assert_eq!(c1, naive(&a1, &b1));
    }
}
