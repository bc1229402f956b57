//! tarflow-sample: the user-facing ends of a trained flow. [`resolve`] finds the weights
//! ([`default_model`] when none are named),
//! [`generate`] draws samples, [`score`] gives exact likelihoods of image files ([`inputs`]
//! reads them, skipping the unreadable), [`heatmap`]
//! draws where the bits go, [`text`] reads text embeddings, [`grid`] tiles images into a PNG, [`display`] shows pictures inline
//! in notebooks.

pub mod classes;
pub mod confusion;
pub mod default_model;
pub mod display;
pub mod error;
pub mod font;
pub mod generate;
pub mod grid;
pub mod heatmap;
pub mod inputs;
pub mod ood;
pub mod quantize;
pub mod resolve;
pub mod safetensors_file;
pub mod score;
pub mod stats;
pub mod tensors;
pub mod text;

pub use error::{Result, SampleError};
