//! Training for tarflow: config, trainer loop, optimizer, checkpoints (filled by the training issue).
