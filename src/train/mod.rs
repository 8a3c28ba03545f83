//! Training: optimizer, schedules, gradient clipping (Block-AP and E2E-QP drivers land in a later issue).
pub mod adamw;
pub mod clip;
pub mod schedule;
