//! Typed errors of the gpt crate.

use std::path::PathBuf;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum GptError {
    #[error(transparent)]
    Nn(#[from] tapelora_nn::NnError),
    #[error(transparent)]
    Autograd(#[from] tapelora_autograd::AutogradError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file or folder exists but is not what was expected.
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },
    /// A configuration value or option is out of range.
    #[error("{field}: {msg}")]
    Config { field: String, msg: String },
    /// Bad model input (token ids, lengths).
    #[error("{0}")]
    Input(String),
}

pub type Result<T> = std::result::Result<T, GptError>;

pub(crate) fn io_err(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> GptError + '_ {
    move |source| GptError::Io {
        path: path.to_path_buf(),
        source,
    }
}
