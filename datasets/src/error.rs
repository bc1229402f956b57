//! Errors of the datasets crate: each names the file (and index) and what was expected.

use std::path::PathBuf;

/// A data source could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The file could not be opened or read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file at fault.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file was read but its content is not what the format requires.
    #[error("{}: {msg}", path.display())]
    Format {
        /// The file at fault.
        path: PathBuf,
        /// What was wrong and what was expected.
        msg: String,
    },
}

/// Result alias of the datasets crate.
pub type Result<T> = std::result::Result<T, DataError>;

impl DataError {
    /// Builds a [`DataError::Format`] for `path`.
    pub fn format(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        DataError::Format {
            path: path.into(),
            msg: msg.into(),
        }
    }
}
