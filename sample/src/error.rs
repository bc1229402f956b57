//! Errors of the sampling and scoring front-ends: each names the file or option at fault.

use std::path::PathBuf;

/// Everything that can go wrong sampling or scoring.
#[derive(Debug, thiserror::Error)]
pub enum SampleError {
    /// The model or a checkpoint failed.
    #[error(transparent)]
    Flow(#[from] tarflow_flows::FlowError),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A grid could not be written.
    #[error(transparent)]
    Grid(#[from] crate::grid::GridError),
    /// A file is unreadable or does not fit the model; names it and what was expected.
    #[error("{}: {msg}", path.display())]
    File {
        /// The file at fault.
        path: PathBuf,
        /// What was wrong and what was expected.
        msg: String,
    },
    /// An option is invalid for this model.
    #[error("{0}")]
    Option(String),
}

/// Result alias of the sampling crate.
pub type Result<T> = std::result::Result<T, SampleError>;

impl SampleError {
    /// A [`SampleError::File`] for `path`.
    pub fn file(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Self::File {
            path: path.into(),
            msg: msg.into(),
        }
    }
}
