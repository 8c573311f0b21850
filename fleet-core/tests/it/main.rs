//! fleet-core integration tests: the shared vectors and property tests.

mod properties;
mod vectors;
