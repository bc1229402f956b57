//! Training for tarflow. So far: the AdamW optimizer with saveable state and the learning-rate
//! schedule; the trainer loop, config and run directories arrive with the training issue.

pub mod ema;
pub mod optim;
pub mod schedule;
