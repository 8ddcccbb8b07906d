//! Runs no client can use any more, unloaded when a new run needs their room under
//! `--max-runs-per-tenant` or `--max-runs`. A run's id names its session, and the SDK trains a
//! run only through the session that created it: once that session is finished
//! (`ServiceClient.close`), or its client has been silent for `--session-timeout-secs` while
//! the run ran no job, the run is abandoned. Without this every run ever created counted
//! against the limits, and a tenant's 65th run was refused for good (the SDK has no call that
//! unloads one). Unloading keeps the run's checkpoints.

use loraloom_engine::registry::{unix_now, ModelEntry};

use super::sessions::{own_session, session_of};
use super::*;

/// Whether `run` is abandoned at `now` (unix seconds): no job of it waits or runs, and its
/// session was finished by its client, or has been silent for the session timeout while the
/// run ran no job for as long (a run whose session is gone: the latter alone).
fn abandoned(state: &AppState, run: &ModelEntry, now: f64) -> bool {
    // Asked last (it takes the scheduler's lock and the run's): most runs are not candidates.
    let idle = || {
        state.engine.queue_depth(&QueueKey::Model(run.key.clone())) == 0 && run.try_lock().is_some()
    };
    let timed_out = |silent: f64| {
        state.session_timeout.is_some_and(|timeout| {
            let timeout = timeout.as_secs_f64();
            silent >= timeout && now - run.last_access() >= timeout
        })
    };
    let session = session_of(&run.key.model_id)
        .and_then(|id| own_session(state, &run.key.tenant, id))
        .map(|s| (s.details.finished.is_some(), s.silent_for()));
    let gone = match session {
        Some((finished, silent)) => finished || timed_out(silent),
        None => timed_out(f64::INFINITY),
    };
    gone && idle()
}

/// Unloads abandoned runs, least recently used first, until `tenant` may create one more run
/// within its limit (from its own runs) and the server within its limit (from any tenant's).
/// Does nothing while there is room; when there is still none after it, the engine refuses
/// the run, naming the limit.
pub(super) fn make_room_for_run(state: &AppState, tenant: &str) -> ApiResult<()> {
    let (per_tenant, overall) = state.engine.run_limits();
    let registry = state.engine.registry();
    let mine = registry.models_of(tenant);
    unload_abandoned(state, mine, per_tenant)?;
    unload_abandoned(state, registry.all_models(), overall)
}

/// Unloads enough of `runs`' abandoned ones (least recently used first) for one more run to
/// fit under `limit` (0: no limit).
fn unload_abandoned(state: &AppState, runs: Vec<Arc<ModelEntry>>, limit: usize) -> ApiResult<()> {
    let excess = (runs.len() + 1).saturating_sub(limit);
    if limit == 0 || excess == 0 {
        return Ok(());
    }
    let now = unix_now();
    let mut candidates: Vec<Arc<ModelEntry>> = runs
        .into_iter()
        .filter(|run| abandoned(state, run, now))
        .collect();
    candidates.sort_by(|a, b| a.last_access().total_cmp(&b.last_access()));
    for run in candidates.into_iter().take(excess) {
        let key = &run.key;
        match state
            .engine
            .registry()
            .remove_model(&key.tenant, &key.model_id)
        {
            // Unloaded meanwhile by its owner or by a concurrent creation: room either way.
            Ok(()) | Err(EngineError::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        tracing::info!(
            tenant = %key.tenant,
            model_id = %key.model_id,
            "unloaded an abandoned run to make room for a new one"
        );
    }
    Ok(())
}
