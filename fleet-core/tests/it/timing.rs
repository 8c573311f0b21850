//! A timing oracle on token comparison: `constant_time_eq` (role tokens, the agent's local
//! token, v0 signatures, digests) must take as long for a wrong token that shares all but its
//! last byte with the right one as for one wrong in its first byte. An early-exit comparison
//! leaks the length of the matching prefix, which lets an attacker guess a token byte by byte.
//!
//! The statistic is robust on a loaded machine: tokens are 4 KiB so a leak would be large
//! against the noise, each sample times a batch of comparisons, the two cases are measured
//! interleaved (so load hits both alike), and the medians of many rounds are compared. The
//! same statistic run on an early-exit comparison shows that it does detect a leak.

use std::hint::black_box;
use std::time::Instant;

use fleet_core::signing::constant_time_eq;

const TOKEN_LEN: usize = 4096;
const BATCH: usize = 64;
const ROUNDS: usize = 301;

/// The early-exit comparison a naive `==` on bytes amounts to, as the control.
fn early_exit_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    for (x, y) in a.iter().zip(b) {
        if x != y {
            return false;
        }
    }
    true
}

/// Median nanoseconds per batch for (wrong last byte, wrong first byte), measured interleaved.
fn medians(compare: fn(&[u8], &[u8]) -> bool) -> (f64, f64) {
    let secret: Vec<u8> = (0..TOKEN_LEN).map(|i| (i * 31 % 251) as u8).collect();
    let mut late = secret.clone();
    late[TOKEN_LEN - 1] ^= 1;
    let mut early = secret.clone();
    early[0] ^= 1;
    let time = |guess: &[u8]| {
        let start = Instant::now();
        for _ in 0..BATCH {
            assert!(!compare(black_box(&secret), black_box(guess)));
        }
        start.elapsed().as_nanos() as f64
    };
    // Warm caches and branch predictors before measuring.
    for _ in 0..20 {
        time(&late);
        time(&early);
    }
    let mut late_ns = Vec::with_capacity(ROUNDS);
    let mut early_ns = Vec::with_capacity(ROUNDS);
    for round in 0..ROUNDS {
        // Alternate which case goes first, so neither always runs on a warmer core.
        if round % 2 == 0 {
            late_ns.push(time(&late));
            early_ns.push(time(&early));
        } else {
            early_ns.push(time(&early));
            late_ns.push(time(&late));
        }
    }
    (median(late_ns), median(early_ns))
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

#[test]
fn token_comparison_time_does_not_depend_on_where_the_guess_goes_wrong() {
    let (late, early) = medians(constant_time_eq);
    let ratio = late / early;
    assert!(
        (0.67..=1.5).contains(&ratio),
        "constant_time_eq: median {late} ns with a wrong last byte vs {early} ns with a wrong \
         first byte (ratio {ratio:.2})"
    );
}

#[test]
fn the_same_statistic_catches_an_early_exit_comparison() {
    let (late, early) = medians(early_exit_eq);
    let ratio = late / early;
    assert!(
        ratio > 3.0,
        "an early-exit comparison should be slower with a matching prefix: {late} ns vs \
         {early} ns (ratio {ratio:.2})"
    );
}
