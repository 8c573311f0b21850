//! Periodic work: open `offline` alerts, time out restore verifications with no report,
//! forget old v1 message ids and expired dashboard sessions, drop time-series rows, job
//! failures, finished alert deliveries and the output of ended commands past their
//! retention.

use std::sync::Weak;

use crate::AppState;

/// Runs until the control plane is dropped.
pub(crate) fn spawn(state: Weak<AppState>) {
    let listening_since = std::time::Instant::now();
    let started_at = fleet_core::unix_now();
    tokio::spawn(async move {
        // Read at once, as the server starts taking heartbeats: the fleet's silence up to
        // now was (at least in part) this control plane's own.
        let unheard = match state.upgrade() {
            Some(state) => match state.store.last_heard().await {
                Ok(last_heard) => unheard_before(last_heard, started_at),
                Err(err) => {
                    tracing::warn!(error = %err, "cannot read when the fleet was last heard");
                    0
                }
            },
            None => return,
        };
        loop {
            let Some(interval) = state.upgrade().map(|s| s.settings.sweep_interval) else {
                return;
            };
            tokio::time::sleep(interval).await;
            let Some(state) = state.upgrade() else { return };
            let now = fleet_core::unix_now();
            let settings = &state.settings;
            let forward = state.webhook_configured;
            // Silence counts only while the control plane was there to hear it.
            let cutoff = offline_cutoff(
                now - settings.offline_after.as_secs() as i64,
                unheard,
                listening_since.elapsed() >= settings.offline_after,
            );
            match state.store.mark_offline(cutoff, now, forward).await {
                Ok(opened) => state.metrics.offline(opened),
                Err(err) => tracing::warn!(error = %err, "offline sweep failed"),
            }
            let restore_timeout = settings.restore_timeout.as_secs().min(i64::MAX as u64) as i64;
            match state
                .store
                .time_out_restores(restore_timeout, now, forward)
                .await
            {
                Ok(0) => {}
                Ok(timed_out) => tracing::warn!(timed_out, "restore verifications timed out"),
                Err(err) => tracing::warn!(error = %err, "timing out restore verifications failed"),
            }
            let before = now - settings.message_retention.as_secs() as i64;
            if let Err(err) = state.store.prune_messages(before).await {
                tracing::warn!(error = %err, "pruning message ids failed");
            }
            if let Err(err) = state.store.prune_sessions(now).await {
                tracing::warn!(error = %err, "pruning expired dashboard sessions failed");
            }
            if let Some(retention) = settings.heartbeat_retention {
                let before = now - retention.as_secs().min(i64::MAX as u64) as i64;
                match state.store.prune_heartbeats(before).await {
                    Ok(0) => {}
                    Ok(pruned) => tracing::debug!(pruned, "time series pruned"),
                    Err(err) => tracing::warn!(error = %err, "pruning the time series failed"),
                }
                match state.store.prune_records(before).await {
                    Ok(0) => {}
                    Ok(pruned) => tracing::debug!(pruned, "job failures and deliveries pruned"),
                    Err(err) => {
                        tracing::warn!(error = %err, "pruning job failures and deliveries failed")
                    }
                }
            }
            if let Some(retention) = state.live.settings.output_retention
                && let Some(commands) = state.store.commands()
            {
                let ended_before = now - retention.as_secs().min(i64::MAX as u64) as i64;
                match commands.prune_output(ended_before, now).await {
                    Ok(0) => {}
                    Ok(pruned) => tracing::debug!(pruned, "command output pruned"),
                    Err(err) => tracing::warn!(error = %err, "pruning command output failed"),
                }
            }
        }
    });
}

/// How long the fleet went unheard before this control plane started at `started_at`, when
/// its newest heartbeat arrived at `last_heard`: an outage of the control plane (all of it,
/// when no other replica was taking heartbeats meanwhile) or a new database (0).
fn unheard_before(last_heard: Option<i64>, started_at: i64) -> i64 {
    last_heard.map_or(0, |last| started_at.saturating_sub(last).max(0))
}

/// The offline sweep's cutoff: installations last seen before it have been silent for the
/// offline threshold (`cutoff` is now less the threshold). Until the threshold has passed
/// since the start, the silence of an installation last heard before the start does not
/// count the `unheard` seconds no one was listening: after the control plane's own outage,
/// every agent gets the threshold to come back (and deliver its outbox) before anyone is
/// paged, while one silent since long before is still declared at once. (One heard since
/// the start cannot be silent for the threshold before the threshold has passed.)
fn offline_cutoff(cutoff: i64, unheard: i64, threshold_passed_since_start: bool) -> i64 {
    if threshold_passed_since_start {
        cutoff
    } else {
        cutoff.saturating_sub(unheard)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_control_planes_own_silence_does_not_count_until_the_threshold_has_passed() {
        // Down from 1,000 to 5,000; the threshold is 900 s.
        let unheard = unheard_before(Some(1_000), 5_000);
        assert_eq!(unheard, 4_000);
        // At 5,100: only installations silent for 900 s before the outage are offline.
        assert_eq!(offline_cutoff(5_100 - 900, unheard, false), 200);
        // Once the threshold has passed since the start, silence counts as usual.
        assert_eq!(offline_cutoff(5_900 - 900, unheard, true), 5_000);
        // A restart in a few seconds, or another replica hearing all along: nearly no grace.
        assert_eq!(
            offline_cutoff(5_100 - 900, unheard_before(Some(4_995), 5_000), false),
            4_195
        );
        // A new database; a clock that stepped back.
        assert_eq!(unheard_before(None, 5_000), 0);
        assert_eq!(unheard_before(Some(6_000), 5_000), 0);
    }
}
