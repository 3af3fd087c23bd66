//! Typed errors of the nn crate.

use std::path::PathBuf;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum NnError {
    #[error(transparent)]
    Autograd(#[from] tapelora_autograd::AutogradError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file exists but its contents are not what was expected.
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },
    /// A tensor is missing, extra, or of the wrong shape or dtype.
    #[error("tensor `{name}`: {msg}")]
    Tensor { name: String, msg: String },
    /// An option or hyper-parameter is out of range.
    #[error("{field}: {msg}")]
    Config { field: String, msg: String },
}

pub type Result<T> = std::result::Result<T, NnError>;

pub(crate) fn io_err(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> NnError + '_ {
    move |source| NnError::Io {
        path: path.to_path_buf(),
        source,
    }
}
