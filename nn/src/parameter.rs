//! A named tensor of a model, trainable or frozen.

use ndarray::ArrayD;
use tapelora_autograd::{Tape, Tensor, Var};

/// One parameter: its full hierarchical name (`h.0.attn.c_attn.weight`), its value, and whether
/// the optimizer trains it. A frozen parameter enters the tape as a `frozen` leaf, so no
/// gradient is ever computed for it.
#[derive(Clone, Debug)]
pub struct Parameter {
    pub name: String,
    pub value: Tensor<f32>,
    pub trainable: bool,
}

impl Parameter {
    pub fn new(name: impl Into<String>, value: ArrayD<f32>) -> Self {
        Parameter {
            name: name.into(),
            value: value.into_shared(),
            trainable: true,
        }
    }

    /// The parameter as a leaf on `tape` (shares the buffer; nothing is copied).
    pub fn on<'t>(&self, tape: &'t Tape<f32>) -> Var<'t, f32> {
        if self.trainable {
            tape.param(self.name.clone(), self.value.clone())
        } else {
            tape.frozen(self.name.clone(), self.value.clone())
        }
    }

    pub fn numel(&self) -> usize {
        self.value.len()
    }

    pub fn shape(&self) -> &[usize] {
        self.value.shape()
    }

    /// Mutable access to the values, for optimizers and loaders. Copies the buffer only if
    /// something else (a live tape) still shares it.
    pub fn value_mut(&mut self) -> ndarray::ArrayViewMutD<'_, f32> {
        self.value.view_mut()
    }
}
