//! Periodic work: open `offline` alerts, time out restore verifications with no report,
//! forget old v1 message ids and expired dashboard sessions, drop time-series rows, job
//! failures, finished alert deliveries and the output of ended commands past their
//! retention.

use std::sync::Weak;

use crate::AppState;

/// Runs until the control plane is dropped.
pub(crate) fn spawn(state: Weak<AppState>) {
    let listening_since = std::time::Instant::now();
    tokio::spawn(async move {
        loop {
            let Some(interval) = state.upgrade().map(|s| s.settings.sweep_interval) else {
                return;
            };
            tokio::time::sleep(interval).await;
            let Some(state) = state.upgrade() else { return };
            let now = fleet_core::unix_now();
            let settings = &state.settings;
            let cutoff = now - settings.offline_after.as_secs() as i64;
            let forward = state.webhook_configured;
            // Silence counts only while this control plane was there to hear it: after an
            // outage of its own, every agent gets the offline threshold to come back (and
            // deliver its outbox) before an offline alert pages anyone.
            if listening_since.elapsed() >= settings.offline_after {
                match state.store.mark_offline(cutoff, now, forward).await {
                    Ok(opened) => state.metrics.offline(opened),
                    Err(err) => tracing::warn!(error = %err, "offline sweep failed"),
                }
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
