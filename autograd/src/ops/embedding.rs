//! Embedding lookup: rows of a table picked by integer ids.
//!
//! Backward is a scatter-add: the gradient row for output position i is added into table row
//! `ids[i]`, so an id that appears several times collects all of its gradients. The tape does
//! the adding, in place into the table's gradient (which for GPT-2's tied wte already holds
//! the lm_head's dense gradient), so no `[vocab, dim]` table of zeros is ever built.

use ndarray::{Array2, ArrayD, Axis, IxDyn};

use crate::error::{arg_err, shape_err, Result};
use crate::tape::{OpRecord, Var};
use crate::Float;

impl<'t, T: Float> Var<'t, T> {
    /// Looks up `ids` (any shape) in the table `self` of shape `[vocab, dim]`; the output has
    /// shape `[ids.shape()…, dim]`.
    pub fn embedding(&self, ids: &ArrayD<usize>) -> Result<Var<'t, T>> {
        if self.ndim() != 2 {
            return shape_err(
                "embedding",
                self.shape(),
                ids.shape(),
                "the table must be 2-D [vocab, dim]",
            );
        }
        let (vocab, dim) = (self.shape()[0], self.shape()[1]);
        let flat: Vec<usize> = ids.iter().copied().collect();
        if let Some(&bad) = flat.iter().find(|&&id| id >= vocab) {
            return arg_err(
                "embedding",
                format!("id {bad} is out of range for a table of {vocab} rows"),
            );
        }
        let table = self.value();
        let mut out = Array2::zeros((flat.len(), dim));
        for (mut row, &id) in out.outer_iter_mut().zip(&flat) {
            row.assign(&table.index_axis(Axis(0), id));
        }
        let mut out_shape = ids.shape().to_vec();
        out_shape.push(dim);
        let out = out
            .into_shape_with_order(IxDyn(&out_shape))
            .expect("same size");
        // Backward hands the tape one gradient row per id, which it adds into those rows of the
        // table's gradient in place (see `OpRecord::scatters_rows`): no dense [vocab, dim] table.
        OpRecord::new("embedding", &[self])
            .attrs(format!("{} ids", flat.len()))
            .scatters_rows(flat)
            .finish(out, move |g, _| vec![Some(g)])
    }
}

#[cfg(test)]
mod tests {
    use crate::ops::test_util::{assert_gradcheck, rand_array};
    use crate::Tape;
    use ndarray::{arr2, ArrayD, IxDyn};

    #[test]
    fn repeated_ids_accumulate_their_gradients() {
        let tape = Tape::<f64>::new();
        let table = tape.param(
            "wte",
            arr2(&[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]).into_dyn(),
        );
        let ids = ArrayD::from_shape_vec(IxDyn(&[2, 2]), vec![2, 0, 2, 2]).unwrap();
        let out = table.embedding(&ids).unwrap();
        assert_eq!(out.shape(), &[2, 2, 2]);
        assert_eq!(out.value()[[0, 0, 1]], 6.0);
        let grads = tape.backward(&out.sum_all().unwrap()).unwrap();
        assert_eq!(
            grads.get(&table).unwrap(),
            &arr2(&[[1.0, 1.0], [0.0, 0.0], [3.0, 3.0]]).into_dyn()
        );
        let too_big = ArrayD::from_shape_vec(IxDyn(&[1]), vec![3]).unwrap();
        assert!(table
            .embedding(&too_big)
            .unwrap_err()
            .to_string()
            .contains("id 3"));
    }

    #[test]
    fn gradcheck_embedding_with_repeats() {
        let ids = ArrayD::from_shape_vec(IxDyn(&[2, 3]), vec![1, 1, 0, 3, 1, 3]).unwrap();
        assert_gradcheck(
            move |x| x[0].embedding(&ids)?.tanh(),
            &[rand_array(&[4, 5], 3)],
        );
    }

    #[test]
    fn a_table_used_also_densely_gets_both_gradients_in_either_order() {
        // GPT-2's tied wte: looked up by ids and multiplied (transposed) as the output layer.
        // Embedding first: its rows are added into the dense gradient the output layer left
        // (which a transposed use leaves strided); embedding last: the dense gradient is added
        // to the rows the scatter put into a zero table.
        let ids = ArrayD::from_shape_vec(IxDyn(&[2, 3]), vec![1, 1, 0, 3, 1, 3]).unwrap();
        let (ids_a, ids_b) = (ids.clone(), ids);
        assert_gradcheck(
            move |x| {
                let looked_up = x[0].embedding(&ids_a)?.tanh()?;
                let dense = x[1].matmul(&x[0].transpose(0, 1)?)?;
                looked_up.sum_all()?.add(&dense.tanh()?.sum_all()?)
            },
            &[rand_array(&[4, 5], 3), rand_array(&[2, 5], 4)],
        );
        assert_gradcheck(
            move |x| {
                let dense = x[1].matmul(&x[0].transpose(0, 1)?)?;
                let looked_up = x[0].embedding(&ids_b)?.tanh()?;
                dense.tanh()?.sum_all()?.add(&looked_up.sum_all()?)
            },
            &[rand_array(&[4, 5], 5), rand_array(&[2, 5], 6)],
        );
        // The dense gradient a transpose hands back is a column-major view of the table.
        let ids = ArrayD::from_shape_vec(IxDyn(&[3]), vec![2, 0, 2]).unwrap();
        assert_gradcheck(
            move |x| {
                let looked_up = x[0].embedding(&ids)?.tanh()?;
                let transposed = x[0].transpose(0, 1)?.tanh()?;
                looked_up.sum_all()?.add(&transposed.sum_all()?)
            },
            &[rand_array(&[4, 5], 7)],
        );
    }
}
