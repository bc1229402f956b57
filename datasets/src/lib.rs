//! Image datasets for tarflow: sources, transforms and the batch loader (filled by the datasets issue).
