#![doc = include_str!("../README.md")]

mod config;
mod engine;
pub mod metrics;

pub use config::{BatchConfig, OnFull};
pub use engine::{BacklogEvent, BacklogWatch, Batcher, WindowStats};
