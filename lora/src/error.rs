//! Typed errors of the lora crate.

use std::path::PathBuf;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum LoraError {
    #[error(transparent)]
    Gpt(#[from] tapelora_gpt::GptError),
    #[error(transparent)]
    Nn(#[from] tapelora_nn::NnError),
    #[error(transparent)]
    Autograd(#[from] tapelora_autograd::AutogradError),
    /// A configuration value is out of range or cannot be honoured.
    #[error("{field}: {msg}")]
    Config { field: String, msg: String },
    /// An adapter file or folder is not what was expected.
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },
    /// An operation on adapters that does not apply (unknown name, already merged, …).
    #[error("{0}")]
    Adapter(String),
}

pub type Result<T> = std::result::Result<T, LoraError>;

pub(crate) fn config_err<T>(field: &str, msg: impl Into<String>) -> Result<T> {
    Err(LoraError::Config {
        field: field.into(),
        msg: msg.into(),
    })
}
