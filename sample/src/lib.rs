//! Sampling and scoring front-ends for tarflow (filled by the sampling issue).
