//! Training: optimizer, schedules, gradient clipping and the Block-AP block trainer.
pub mod adamw;
pub mod block_ap;
pub mod calib;
pub mod clip;
pub mod device;
#[cfg(feature = "cuda")]
pub mod device_store;
pub mod e2e_data;
pub mod e2e_qp;
mod early_stop;
pub mod instruct;
pub mod job;
pub mod mrem;
pub mod pipeline;
pub mod schedule;
pub mod store;
pub mod stream;
