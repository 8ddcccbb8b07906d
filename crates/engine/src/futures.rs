//! The futures store: one entry per request id with its lifecycle and result.
//!
//! A handle over `Mutex<State>`; the mutex is a std mutex held only for short, `await`-free
//! sections. Waiters long-poll on a per-entry [`tokio::sync::Notify`] (no busy loops). Finished
//! entries are purged `ttl` after they finished, whether or not they were retrieved.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::error::{EngineError, Result};
use crate::job::{Output, RequestId, TenantId};
use crate::registry::unix_now;
use crate::store::{FutureRow, Store};

/// Where a request is in its life.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum FutureState {
    /// Waiting in its queue.
    Queued,
    /// In a batch on a worker.
    Running,
    /// Finished with a result.
    Done(Output),
    /// Finished with an error (timeouts, cancellation and restarts included).
    Failed(EngineError),
}

impl FutureState {
    /// Whether the state can no longer change.
    pub fn is_terminal(&self) -> bool {
        matches!(self, FutureState::Done(_) | FutureState::Failed(_))
    }

    /// Short name for stats.
    pub fn name(&self) -> &'static str {
        match self {
            FutureState::Queued => "queued",
            FutureState::Running => "running",
            FutureState::Done(_) => "done",
            FutureState::Failed(EngineError::Cancelled) => "cancelled",
            FutureState::Failed(_) => "failed",
        }
    }
}

struct Entry {
    tenant: TenantId,
    state: FutureState,
    finished_at: Option<Instant>,
    notify: Arc<Notify>,
}

/// Shared handle to the store.
#[derive(Clone)]
pub struct FutureStore {
    inner: Arc<Mutex<HashMap<RequestId, Entry>>>,
    ttl: Duration,
    durable: Option<Arc<dyn Store>>,
}

fn row(id: &str, tenant: &str, state: &FutureState) -> FutureRow {
    let terminal = state.is_terminal();
    FutureRow {
        id: id.to_string(),
        tenant: tenant.to_string(),
        state: state.name().to_string(),
        outcome_json: terminal.then(|| serde_json::to_string(state).unwrap_or_default()),
        finished: terminal.then(unix_now),
    }
}

impl FutureStore {
    /// An empty store keeping finished results for `ttl`.
    pub fn new(ttl: Duration) -> Self {
        FutureStore {
            inner: Arc::new(Mutex::new(HashMap::new())),
            ttl,
            durable: None,
        }
    }

    /// Like [`FutureStore::new`], writing every admission and outcome through to `durable`.
    pub fn durable(ttl: Duration, durable: Arc<dyn Store>) -> Self {
        FutureStore {
            durable: Some(durable),
            ..FutureStore::new(ttl)
        }
    }

    fn persist(&self, id: &str, tenant: &str, state: &FutureState) {
        if let Some(store) = &self.durable {
            if let Err(e) = store.put_future(&row(id, tenant, state)) {
                tracing::error!(error = %e, request_id = id, "cannot persist a future");
            }
        }
    }

    /// Reloads futures from the durable store after a restart: finished ones keep their
    /// outcome; ones that were queued or running fail with "server restarted". Returns how
    /// many were failed that way.
    pub fn restore(&self) -> Result<usize> {
        let Some(store) = &self.durable else {
            return Ok(0);
        };
        let mut restarted = 0;
        for r in store.futures()? {
            let state = r
                .outcome_json
                .as_deref()
                .and_then(|j| serde_json::from_str::<FutureState>(j).ok())
                .filter(FutureState::is_terminal);
            let state = match state {
                Some(s) => s,
                None => {
                    restarted += 1;
                    let failed = FutureState::Failed(EngineError::ServerRestarted);
                    self.persist(&r.id, &r.tenant, &failed);
                    failed
                }
            };
            let mut map = self.lock();
            map.insert(
                r.id.clone(),
                Entry {
                    tenant: r.tenant,
                    state,
                    finished_at: Some(Instant::now()),
                    notify: Arc::new(Notify::new()),
                },
            );
        }
        Ok(restarted)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<RequestId, Entry>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a new request of `tenant` as queued.
    pub fn insert(&self, id: &str, tenant: &str) {
        self.persist(id, tenant, &FutureState::Queued);
        self.lock().insert(
            id.to_string(),
            Entry {
                tenant: tenant.to_string(),
                state: FutureState::Queued,
                finished_at: None,
                notify: Arc::new(Notify::new()),
            },
        );
    }

    /// Forgets a request that was never admitted (its submission was refused, so no client holds
    /// its id): kept, refused submissions would fill the store at the rate they are sent.
    pub fn forget(&self, id: &str) {
        let Some(entry) = self.lock().remove(id) else {
            return;
        };
        entry.notify.notify_waiters();
        if let Some(store) = &self.durable {
            if let Err(e) = store.delete_future(id) {
                tracing::error!(error = %e, request_id = id, "cannot forget a refused future");
            }
        }
    }

    /// Moves a request to `state`, waking its waiters. Terminal states are final.
    pub fn set(&self, id: &str, state: FutureState) {
        let mut map = self.lock();
        if let Some(entry) = map.get_mut(id) {
            if entry.state.is_terminal() {
                return;
            }
            if state.is_terminal() {
                entry.finished_at = Some(Instant::now());
                // Durable before any waiter sees it: an acknowledged result survives a crash.
                self.persist(id, &entry.tenant, &state);
            }
            entry.state = state;
            entry.notify.notify_waiters();
        }
    }

    /// The state of `id` if it belongs to `tenant` (another tenant's id is "not found").
    pub fn get(&self, tenant: &str, id: &str) -> Result<FutureState> {
        let map = self.lock();
        match map.get(id) {
            Some(e) if e.tenant == tenant => Ok(e.state.clone()),
            _ => Err(EngineError::NotFound {
                what: "request".into(),
                id: id.to_string(),
            }),
        }
    }

    /// Waits up to `timeout` for `id` to finish; returns the state then (possibly not final).
    pub async fn wait(&self, tenant: &str, id: &str, timeout: Duration) -> Result<FutureState> {
        let deadline = Instant::now() + timeout;
        loop {
            let notify = {
                let map = self.lock();
                match map.get(id) {
                    Some(e) if e.tenant == tenant => {
                        if e.state.is_terminal() {
                            return Ok(e.state.clone());
                        }
                        e.notify.clone()
                    }
                    _ => {
                        return Err(EngineError::NotFound {
                            what: "request".into(),
                            id: id.to_string(),
                        })
                    }
                }
            };
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // Re-check after registering, so a completion between the two is not missed.
            let state = self.get(tenant, id)?;
            if state.is_terminal() {
                return Ok(state);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.get(tenant, id);
            }
        }
    }

    /// Drops entries finished more than the TTL before `now`; returns how many.
    pub fn purge(&self, now: Instant) -> usize {
        let mut map = self.lock();
        let before = map.len();
        let ttl = self.ttl;
        map.retain(|_, e| {
            e.finished_at
                .is_none_or(|t| now.saturating_duration_since(t) <= ttl)
        });
        let purged = before - map.len();
        drop(map);
        if let Some(store) = &self.durable {
            if let Err(e) = store.purge_futures(unix_now() - ttl.as_secs_f64()) {
                tracing::error!(error = %e, "cannot purge stored futures");
            }
        }
        purged
    }

    /// Counts of entries by state name.
    pub fn counts(&self) -> HashMap<&'static str, usize> {
        let mut out = HashMap::new();
        for e in self.lock().values() {
            *out.entry(e.state.name()).or_default() += 1;
        }
        out
    }

    /// Ids of requests not yet finished (for shutdown bookkeeping).
    pub fn unfinished(&self) -> Vec<RequestId> {
        self.lock()
            .iter()
            .filter(|(_, e)| !e.state.is_terminal())
            .map(|(id, _)| id.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn done() -> FutureState {
        FutureState::Done(Output::Saved {
            path: "tinker://m/weights/x".into(),
            sampler_id: None,
        })
    }

    #[tokio::test(start_paused = true)]
    async fn wait_returns_when_done_and_times_out_otherwise() {
        let store = FutureStore::new(Duration::from_secs(60));
        store.insert("r1", "alice");
        let s = store
            .wait("alice", "r1", Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(s, FutureState::Queued, "timed out, still queued");
        let s2 = store.clone();
        let waiter =
            tokio::spawn(async move { s2.wait("alice", "r1", Duration::from_secs(30)).await });
        tokio::time::sleep(Duration::from_secs(1)).await;
        store.set("r1", FutureState::Running);
        store.set("r1", done());
        assert_eq!(waiter.await.unwrap().unwrap(), done());
        // Terminal states are final.
        store.set("r1", FutureState::Failed(EngineError::Cancelled));
        assert_eq!(store.get("alice", "r1").unwrap(), done());
    }

    #[tokio::test(start_paused = true)]
    async fn other_tenants_ids_are_not_found() {
        let store = FutureStore::new(Duration::from_secs(60));
        store.insert("r1", "alice");
        assert_eq!(store.get("bob", "r1").unwrap_err().kind(), "not_found");
        assert!(store
            .wait("bob", "r1", Duration::from_secs(1))
            .await
            .is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn finished_entries_are_purged_after_the_ttl() {
        let store = FutureStore::new(Duration::from_secs(60));
        store.insert("done", "a");
        store.insert("pending", "a");
        store.set("done", done());
        assert_eq!(store.purge(Instant::now() + Duration::from_secs(59)), 0);
        tokio::time::advance(Duration::from_secs(61)).await;
        assert_eq!(store.purge(Instant::now()), 1);
        assert!(store.get("a", "done").is_err());
        assert_eq!(store.get("a", "pending").unwrap(), FutureState::Queued);
    }
}
