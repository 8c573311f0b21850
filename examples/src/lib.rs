//! Example programs live beside this file; run them with `cargo run -p fleet-examples --example NAME`.
