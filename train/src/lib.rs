//! tarflow-train: the training loop and everything it keeps.
//!
//! Read in order: [`config`] (the TOML file) → [`trainer`] (the loop) → [`optim`], [`schedule`],
//! [`ema`] (one update) → [`checkpoints`] (writing and resuming a run) → [`metrics`], [`plot`] (what a run
//! shows); [`run`] reads a run directory back for analysis.

pub mod autoencoder;
pub mod checkpoints;
pub mod config;
pub mod data;
pub mod dist;
pub mod ema;
pub mod error;
pub mod evaluate;
pub mod grads;
mod inplace;
pub mod metrics;
pub mod optim;
pub mod overrides;
pub mod plot;
pub mod run;
pub mod schedule;
pub mod trainer;

pub use config::TrainConfig;
pub use error::{Result, TrainError};
pub use trainer::{Event, Outcome, Summary, Trainer};
