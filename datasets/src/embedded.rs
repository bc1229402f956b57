//! The embedded default dataset: 10,000 real MNIST digits (28×28, labels 0–9) compiled into
//! the crate, so the main command runs on a fresh machine with no download.

use crate::error::Result;
use crate::ImageSet;
use std::path::Path;

const IMAGES: &[u8] = include_bytes!("../data/mnist10k/mnist10k-images-idx3-ubyte.gz");
const LABELS: &[u8] = include_bytes!("../data/mnist10k/mnist10k-labels-idx1-ubyte.gz");

/// Loads the embedded MNIST digits (provenance in `datasets/data/mnist10k/SOURCE.md`).
pub fn mnist10k() -> Result<ImageSet> {
    crate::idx::image_set_from_bytes(
        IMAGES.to_vec(),
        Path::new("<embedded>/mnist10k-images-idx3-ubyte.gz"),
        Some((
            LABELS.to_vec(),
            Path::new("<embedded>/mnist10k-labels-idx1-ubyte.gz"),
        )),
    )
}
