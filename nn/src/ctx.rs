//! The forward context: the tape being recorded, train/eval mode, and the dropout RNG.

use std::cell::RefCell;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tapelora_autograd::{Tape, Var};

use crate::Result;

/// Passed to every `forward`: where to record, whether dropout is active, and a seeded RNG so
/// that a training run is reproducible.
pub struct Ctx<'t> {
    pub tape: &'t Tape<f32>,
    pub train: bool,
    rng: RefCell<ChaCha8Rng>,
}

impl<'t> Ctx<'t> {
    /// Training mode: dropout active, masks drawn from an RNG seeded with `seed`.
    pub fn train(tape: &'t Tape<f32>, seed: u64) -> Self {
        Ctx {
            tape,
            train: true,
            rng: RefCell::new(ChaCha8Rng::seed_from_u64(seed)),
        }
    }

    /// Evaluation mode: dropout is the identity.
    pub fn eval(tape: &'t Tape<f32>) -> Self {
        Ctx {
            tape,
            train: false,
            rng: RefCell::new(ChaCha8Rng::seed_from_u64(0)),
        }
    }

    /// Dropout with probability `p` in training mode, identity otherwise.
    pub fn dropout(&self, x: &Var<'t, f32>, p: f64) -> Result<Var<'t, f32>> {
        Ok(x.dropout(p, self.train, &mut *self.rng.borrow_mut())?)
    }
}
