//! Starts the pipeline pollers (update, plugin, restore) beside the agent's other tasks.

use std::sync::Arc;

use fleet_core::Signer;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::Result;
use crate::agent::Shared;
use crate::job_state::JobState;
use crate::pipeline::{ControlPlaneClient, ShellRunner, StepRunner};
use crate::updates::{INSTALLED_VERSION, UpdatePipeline};

/// Opens the pipeline state (in `AGENT_STATE_PATH`), restores the installed version, and
/// spawns each enabled poller into `tasks`.
pub(crate) async fn spawn(
    shared: &Arc<Shared>,
    tasks: &mut JoinSet<()>,
    stop: &watch::Receiver<bool>,
) -> Result<()> {
    let c = &shared.config;
    let restore_on = c.restore.enabled && c.restore.verify_cmd.is_some();
    if !c.update.enabled && !c.plugin.enabled && !restore_on {
        return Ok(());
    }
    let state = Arc::new(
        JobState::open(&c.state_path)
            .await
            .map_err(|err| err.opening_state(&c.state_path))?,
    );
    // The running version: what the last update installed, else INSTANCE_VERSION.
    let version = state
        .value(INSTALLED_VERSION)
        .await?
        .or_else(|| c.version.clone());
    *shared
        .installed_version
        .lock()
        .unwrap_or_else(|p| p.into_inner()) = version;
    let client = ControlPlaneClient::new(
        shared.http.clone(),
        &c.control_plane_url,
        Signer::new(c.secret.clone()),
        c.signature_scheme,
    );
    let runner: Arc<dyn StepRunner> = Arc::new(ShellRunner);
    if c.update.enabled {
        let pipeline = UpdatePipeline::new(
            &c.instance_id,
            c.update.clone(),
            c.metrics_url.clone(),
            client.clone(),
            shared.http.clone(),
            state.clone(),
            runner.clone(),
            shared.installed_version.clone(),
        );
        tasks.spawn(crate::updates::run_loop(
            pipeline,
            shared.poll_now.clone(),
            stop.clone(),
        ));
    }
    if c.plugin.enabled {
        let pipeline = crate::plugins::PluginPipeline::new(
            &c.instance_id,
            c.plugin.clone(),
            client.clone(),
            state.clone(),
            runner.clone(),
        );
        tasks.spawn(crate::plugins::run_loop(
            pipeline,
            shared.poll_now.clone(),
            stop.clone(),
        ));
    }
    if restore_on {
        let restorer = crate::restores::RestoreRunner::new(
            &c.instance_id,
            c.restore.clone(),
            client.clone(),
            state.clone(),
            runner.clone(),
        );
        tasks.spawn(crate::restores::run_loop(
            restorer,
            shared.poll_now.clone(),
            stop.clone(),
        ));
    }
    Ok(())
}
