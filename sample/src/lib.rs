//! Sampling and scoring front-ends for tarflow; so far the image grid writer.

pub mod grid;
