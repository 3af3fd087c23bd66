//! Inverted dropout: in training each element is zeroed with probability p and the survivors
//! scaled by 1/(1−p), so eval (identity) needs no rescaling. The mask comes from the caller's
//! seeded RNG and is saved for backward.

use ndarray::{ArrayD, IxDyn};
use rand::Rng;

use super::zip_inplace;
use crate::error::{arg_err, Result};
use crate::tape::{OpRecord, Var};
use crate::Float;

impl<'t, T: Float> Var<'t, T> {
    /// Dropout with probability `p` when `training`; the identity (no record) otherwise or
    /// when `p == 0`.
    pub fn dropout(&self, p: f64, training: bool, rng: &mut impl Rng) -> Result<Var<'t, T>> {
        if !(0.0..1.0).contains(&p) {
            return arg_err("dropout", format!("probability must be in [0, 1), got {p}"));
        }
        if !training || p == 0.0 {
            return Ok(self.clone());
        }
        let keep = T::from_f64(1.0 / (1.0 - p));
        let mask: ArrayD<T> = ArrayD::from_shape_simple_fn(IxDyn(self.shape()), || {
            if rng.random::<f64>() < p {
                T::zero()
            } else {
                keep
            }
        });
        let out = &mask * self.value();
        OpRecord::new("dropout", &[self])
            .attrs(format!("p={p}"))
            .saves("mask", &mask)
            .finish(out, move |g, _| {
                vec![Some(zip_inplace(g, &mask, |g, m| g * m))]
            })
    }
}

#[cfg(test)]
mod tests {
    use crate::ops::test_util::{assert_gradcheck, rand_array};
    use crate::Tape;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn dropout_is_seeded_scaled_and_identity_in_eval() {
        let tape = Tape::<f64>::new();
        let x = tape.constant(ndarray::ArrayD::ones(ndarray::IxDyn(&[1000])));
        let a = x
            .dropout(0.25, true, &mut ChaCha8Rng::seed_from_u64(1))
            .unwrap();
        let b = x
            .dropout(0.25, true, &mut ChaCha8Rng::seed_from_u64(1))
            .unwrap();
        assert_eq!(a.value(), b.value());
        let zeros = a.value().iter().filter(|&&v| v == 0.0).count();
        assert!((200..300).contains(&zeros), "{zeros} of 1000 dropped");
        assert!(a
            .value()
            .iter()
            .all(|&v| v == 0.0 || (v - 4.0 / 3.0).abs() < 1e-12));
        let eval = x
            .dropout(0.25, false, &mut ChaCha8Rng::seed_from_u64(1))
            .unwrap();
        assert_eq!(eval.value(), x.value());
        assert!(x
            .dropout(1.0, true, &mut ChaCha8Rng::seed_from_u64(1))
            .is_err());
    }

    #[test]
    fn gradcheck_dropout() {
        assert_gradcheck(
            |x| x[0].dropout(0.4, true, &mut ChaCha8Rng::seed_from_u64(7)),
            &[rand_array(&[3, 5], 9)],
        );
    }
}
