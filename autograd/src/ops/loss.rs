//! Fused softmax + cross-entropy from logits with integer targets.
//!
//! Forward keeps only the logits (shared, not copied) and one log-sum-exp per row. Backward
//! recomputes the softmax and subtracts the one-hot target in a single pass — in the logits'
//! own buffer when nothing else holds it — giving ∂loss/∂logits = (softmax − onehot)·g/count.

use ndarray::IxDyn;
use rayon::prelude::*;

use super::PARALLEL_MIN_LEN;
use crate::error::{arg_err, Result};
use crate::tape::{OpRecord, Var};
use crate::Float;

impl<'t, T: Float> Var<'t, T> {
    /// Mean cross-entropy of `self` (logits `[..., vocab]`) against one target class per row.
    ///
    /// Rows whose target equals `ignore_index` contribute nothing and are not counted in the
    /// mean (PyTorch's `ignore_index`, e.g. -100). If every row is ignored the mean is 0/0 = NaN,
    /// as in PyTorch. Returns a 0-dimensional tensor.
    pub fn cross_entropy(&self, targets: &[i64], ignore_index: Option<i64>) -> Result<Var<'t, T>> {
        if self.ndim() == 0 {
            return arg_err("cross_entropy", "logits need a class axis (rank ≥ 1)");
        }
        let vocab = *self.shape().last().expect("rank ≥ 1");
        let rows = self.len() / vocab.max(1);
        if targets.len() != rows {
            return arg_err(
                "cross_entropy",
                format!(
                    "{} targets for {rows} rows of logits {:?}",
                    targets.len(),
                    self.shape()
                ),
            );
        }
        let is_ignored = move |t: i64| ignore_index == Some(t);
        if let Some(&bad) = targets
            .iter()
            .find(|&&t| !is_ignored(t) && (t < 0 || t as usize >= vocab))
        {
            return arg_err(
                "cross_entropy",
                format!("target {bad} is out of range for {vocab} classes"),
            );
        }
        let logits = crate::ops::standard_layout(self.value().clone());
        let x = logits.as_slice().expect("standard layout");
        // One log-sum-exp per row; the row sums keep lane partials so they vectorise.
        let log_sum_exp: Vec<T> = x
            .par_chunks(vocab.max(1))
            .map(|row| {
                crate::simd::vectorized(
                    #[inline(always)]
                    || {
                        let max = crate::simd::max_of(row);
                        crate::simd::sum_map(row, |v| (v - max).exp_fused()).ln() + max
                    },
                )
            })
            .collect();
        let (mut total, mut count) = (0.0f64, 0usize);
        for (r, &t) in targets.iter().enumerate() {
            if !is_ignored(t) {
                total += (log_sum_exp[r] - x[r * vocab + t as usize]).as_f64();
                count += 1;
            }
        }
        let loss = ndarray::arr0(T::from_f64(total / count as f64)).into_dyn();
        let targets = targets.to_vec();
        OpRecord::new("cross_entropy", &[self])
            .attrs(format!("{rows} rows, {count} counted"))
            .saves("logits", &logits)
            .finish(loss, move |g, _| {
                let scale =
                    g.iter().next().copied().unwrap_or_else(T::zero) / T::from_f64(count as f64);
                let shape = logits.shape().to_vec();
                // The logits' own buffer when nothing else holds it, else a copy.
                let mut d = logits.into_owned();
                let d_rows = d.as_slice_mut().expect("standard layout");
                let per_row = |(r, row): (usize, &mut [T])| {
                    if is_ignored(targets[r]) {
                        row.fill(T::zero());
                        return;
                    }
                    let lse = log_sum_exp[r];
                    crate::simd::vectorized(
                        #[inline(always)]
                        || {
                            for v in row.iter_mut() {
                                *v = (*v - lse).exp_fused() * scale;
                            }
                        },
                    );
                    row[targets[r] as usize] -= scale;
                };
                if rows * vocab >= PARALLEL_MIN_LEN {
                    d_rows.par_chunks_mut(vocab).enumerate().for_each(per_row);
                } else {
                    d_rows.chunks_mut(vocab).enumerate().for_each(per_row);
                }
                vec![Some(
                    d.into_shape_with_order(IxDyn(&shape)).expect("same size"),
                )]
            })
    }
}

#[cfg(test)]
mod tests {
    use crate::ops::test_util::{assert_gradcheck, rand_array};
    use crate::Tape;

    #[test]
    fn cross_entropy_matches_log_softmax_and_ignores_rows() {
        let tape = Tape::<f64>::new();
        let logits = tape.param("logits", rand_array(&[2, 3, 5], 4));
        let targets = [0, 4, -100, 2, 2, 1];
        let loss = logits.cross_entropy(&targets, Some(-100)).unwrap();
        let ls = logits.log_softmax().unwrap();
        let mut want = 0.0;
        for (r, &t) in targets.iter().enumerate() {
            if t >= 0 {
                want -= ls.value()[[r / 3, r % 3, t as usize]];
            }
        }
        assert!((loss.item().unwrap() - want / 5.0).abs() < 1e-12);
        assert!(logits.cross_entropy(&[0, 1], None).is_err());
        assert!(logits
            .cross_entropy(&[0, 5, 0, 0, 0, 0], None)
            .unwrap_err()
            .to_string()
            .contains("target 5"));
    }

    #[test]
    fn gradcheck_cross_entropy() {
        let x = rand_array(&[4, 7], 31).mapv(|v| 2.0 * v);
        assert_gradcheck(|x| x[0].cross_entropy(&[3, 0, 6, 6], None), &[x.clone()]);
        assert_gradcheck(
            |x| x[0].cross_entropy(&[3, -1, 6, -1], Some(-1)),
            &[x.clone()],
        );
        assert_gradcheck(
            |x| x[0].reshape(&[2, 2, 7])?.cross_entropy(&[1, 2, 3, 4], None),
            &[x],
        );
    }
}
