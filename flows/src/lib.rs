//! tarflow-flows: TarFlow (transformer autoregressive normalizing flow) on candle.
//!
//! The model, in the order it is built: [`config`] → [`patch`] → [`rope`] → [`layers`] → [`affine`] (the
//! flow's per-token map) → [`block`] → [`model`]; [`engine`] says which engine runs a block,
//! [`params`] names and initialises the weights, [`checkpoint`] stores them (with [`quant`] and
//! [`gguf`] for reduced-precision files), [`device`] keeps the device rules. [`kernels`] is the
//! CPU engine under the model: a leaf the blocks call on the CPU in f32.

pub mod affine;
pub mod autoencoder;
pub mod block;
pub mod checkpoint;
pub mod cond;
pub mod config;
pub mod denoiser;
pub mod device;
pub mod engine;
pub mod error;
pub mod gguf;
pub mod import;
pub mod kernels;
pub mod layers;
pub mod model;
pub mod packing;
pub mod params;
pub mod patch;
pub mod pickle_guard;
pub mod quant;
pub mod rng;
pub mod rope;
pub mod rundir;
pub mod starflow_args;

pub use block::Cond;
pub use checkpoint::Checkpoint;
pub use config::ModelConfig;
pub use error::{FlowError, Result};
pub use model::{
    BlockSolve, BpdConvention, FlowOutput, GuidanceRule, GuideWhat, JacobiInit, JacobiOptions,
    ReverseOptions, TarFlow,
};
