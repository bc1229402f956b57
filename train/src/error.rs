//! Errors of the training crate: each names the file, key or step at fault.

use std::path::PathBuf;

/// Everything that can stop a training run.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The config is invalid; the message names the key and the allowed values.
    #[error("config {origin}: {msg}")]
    Config {
        /// The file (or `--set` override) at fault.
        origin: String,
        /// What was wrong and what was expected.
        msg: String,
    },
    /// A file-system operation failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory at fault.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The loss became NaN or infinite.
    #[error("step {step}: the loss is {loss}; stopped. {last_good}")]
    NonFinite {
        /// The optimizer step (1-based) whose loss was not finite.
        step: u64,
        /// The value seen.
        loss: f64,
        /// Where the last good checkpoint is.
        last_good: String,
    },
    /// A training batch held NaN/Inf inputs (a data or augmentation bug), caught before the
    /// forward pass so no weight is touched.
    #[error("step {step}: the input batch holds {count} NaN/Inf value(s) (a data or augmentation bug); stopped. {last_good}")]
    NonFiniteInput {
        /// The optimizer step (1-based) the batch was for.
        step: u64,
        /// Non-finite values in the batch.
        count: usize,
        /// Where the last good checkpoint is.
        last_good: String,
    },
    /// A checkpoint could not be written (disk full, unwritable folder); the partial one is removed.
    #[error("step {step}: cannot write the checkpoint ({msg}); training stopped. {last_good}")]
    CheckpointWrite {
        /// The step being saved.
        step: u64,
        /// The file-system error, with its path.
        msg: String,
        /// Where the last good checkpoint is.
        last_good: String,
    },
    /// A run directory's content is missing or inconsistent.
    #[error("run {}: {msg}", path.display())]
    Run {
        /// The run directory or file at fault.
        path: PathBuf,
        /// What was wrong.
        msg: String,
    },
    /// The model or a checkpoint failed.
    #[error(transparent)]
    Flow(#[from] tarflow_flows::FlowError),
    /// A data source failed.
    #[error(transparent)]
    Data(#[from] tarflow_datasets::DataError),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// Sampling, scoring or a picture failed.
    #[error(transparent)]
    Sample(#[from] tarflow_sample::SampleError),
    /// A sample grid could not be written.
    #[error(transparent)]
    Grid(#[from] tarflow_sample::grid::GridError),
}

/// Result alias of the training crate.
pub type Result<T> = std::result::Result<T, TrainError>;

impl TrainError {
    /// A [`TrainError::Config`] from `origin` (file or override).
    pub fn config(origin: impl Into<String>, msg: impl Into<String>) -> Self {
        Self::Config {
            origin: origin.into(),
            msg: msg.into(),
        }
    }

    /// A [`TrainError::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}
