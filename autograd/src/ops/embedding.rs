//! Embedding lookup: rows of a table picked by integer ids.
//!
//! Backward is a scatter-add: the gradient row for output position i is added into table row
//! `ids[i]`, so an id that appears several times collects all of its gradients.

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
        OpRecord::new("embedding", &[self])
            .attrs(format!("{} ids", flat.len()))
            .finish(out, move |g, _| {
                let g = g
                    .to_shape((flat.len(), dim))
                    .expect("gradient has the output's size");
                let mut table_grad = Array2::<T>::zeros((vocab, dim));
                for (row, &id) in g.outer_iter().zip(&flat) {
                    let mut dest = table_grad.row_mut(id);
                    dest += &row;
                }
                vec![Some(table_grad.into_dyn())]
            })
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
}
