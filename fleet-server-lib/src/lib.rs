#![doc = include_str!("../README.md")]

pub mod alerts;
mod error;
pub mod store;

pub use error::{Error, Result};
