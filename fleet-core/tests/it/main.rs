//! fleet-core integration tests: the shared vectors, property tests and a timing oracle.

mod properties;
mod schemas;
mod timing;
mod vectors;
