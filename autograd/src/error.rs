//! Typed errors of the autograd engine. Every message names the op and the shapes involved.

use thiserror::Error;

/// Everything that can go wrong while recording or differentiating a tape.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum AutogradError {
    /// Two operands' shapes do not fit together.
    #[error("{op}: incompatible shapes {lhs:?} and {rhs:?}: {why}")]
    ShapeMismatch {
        op: &'static str,
        lhs: Vec<usize>,
        rhs: Vec<usize>,
        why: String,
    },
    /// An argument other than a shape is out of range (an axis, a probability, an index).
    #[error("{op}: {msg}")]
    InvalidArgument { op: &'static str, msg: String },
    /// Anomaly mode found a NaN or infinity.
    #[error("anomaly: op #{index} `{op}` produced a non-finite value in {place}")]
    NonFinite {
        op: &'static str,
        index: usize,
        place: String,
    },
    /// `backward` was called on something that is not a single number.
    #[error("backward: the loss must hold exactly one element, got shape {shape:?}")]
    LossNotScalar { shape: Vec<usize> },
    /// `backward` was called on a value no trainable leaf reaches.
    #[error("backward: the loss does not require grad (no trainable leaf reaches it)")]
    LossNeedsNoGrad,
    /// Operands were recorded on different tapes.
    #[error("{op}: operands belong to different tapes")]
    TapeMismatch { op: &'static str },
}

/// Result type of the autograd crate.
pub type Result<T> = std::result::Result<T, AutogradError>;

pub(crate) fn shape_err<T>(
    op: &'static str,
    lhs: &[usize],
    rhs: &[usize],
    why: impl Into<String>,
) -> Result<T> {
    Err(AutogradError::ShapeMismatch {
        op,
        lhs: lhs.to_vec(),
        rhs: rhs.to_vec(),
        why: why.into(),
    })
}

pub(crate) fn arg_err<T>(op: &'static str, msg: impl Into<String>) -> Result<T> {
    Err(AutogradError::InvalidArgument {
        op,
        msg: msg.into(),
    })
}
