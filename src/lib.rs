//! tarflow: transformer autoregressive normalizing flows (TarFlow, STARFlow) on candle.
//!
//! One facade over the workspace crates, so a notebook needs a single `:dep`.

/// candle's tensors, devices and dtypes, at the version the crates use.
pub use candle_core as candle;
pub use tarflow_datasets as datasets;
pub use tarflow_flows as flows;
pub use tarflow_sample as sample;
pub use tarflow_train as train;

pub mod experiment;
pub mod fd;
#[doc(hidden)]
pub mod fuzzing;
pub mod latent;
pub mod report;

pub use tarflow_flows::{Checkpoint, Cond, ModelConfig, ReverseOptions, TarFlow};
