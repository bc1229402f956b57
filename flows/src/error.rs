//! Errors of the flow crate.

use std::path::PathBuf;

/// Everything that can go wrong building, running or (de)serialising a flow.
#[derive(Debug, thiserror::Error)]
pub enum FlowError {
    /// A tensor operation failed inside candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// The model configuration is inconsistent; names the key and what was expected.
    #[error("invalid model config: {0}")]
    Config(String),
    /// A device cannot be opened or cannot hold what was asked of it; says what to use instead.
    #[error("{0}")]
    Device(String),
    /// An input tensor does not fit the model (shape, channels, labels, NaN…).
    #[error("invalid input: {0}")]
    Input(String),
    /// A checkpoint file is unreadable or does not match the model.
    #[error("checkpoint {}: {msg}", path.display())]
    Checkpoint {
        /// The file at fault.
        path: PathBuf,
        /// What was wrong and what was expected.
        msg: String,
    },
    /// File-system failure, with the path involved.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file at fault.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// Result alias of the flow crate.
pub type Result<T> = std::result::Result<T, FlowError>;

impl FlowError {
    /// Builds a [`FlowError::Checkpoint`] for `path`.
    pub fn checkpoint(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        FlowError::Checkpoint {
            path: path.into(),
            msg: msg.into(),
        }
    }
}
