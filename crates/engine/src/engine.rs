//! The engine handle: admission, the worker pool and stats.
//!
//! Submitting locks the scheduler state briefly, pushes the job and wakes a worker; it never
//! waits for compute, so it is safe on tokio threads. Workers are OS threads: each takes a
//! batch under the scheduler lock, releases the lock, runs the batch on its own backend, then
//! records results and frees the batch's queues. A panic inside a batch is caught; the batch's
//! jobs are retried one by one so only the culprit fails.

use std::collections::{BTreeMap, HashMap};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use loraloom_model::sample::validate_sampling;
use loraloom_model::train::validate_request;
use loraloom_model::{LoraSpec, StreamedToken};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::backend::{check_checkpoint, snapshot, write_marker, Backend, KvHeld};
use crate::base::BaseModelInfo;
use crate::error::{EngineError, Result};
use crate::futures::{FeedKey, FeedPoll, FutureState, FutureStore};
use crate::job::{
    BatchClass, Job, KvFootprint, ModelKey, Output, QueueKey, RequestId, SamplerKey, TenantId, Work,
};
use crate::queue::{Limits, SchedState};
use crate::registry::{unix_now, CheckpointRecord, Registry, SamplerSource, LOST_MARKER};
use crate::store::{SampleRow, Store};

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Queue and batch limits.
    pub limits: Limits,
    /// How long finished results are kept.
    pub future_ttl: Duration,
    /// The served base model.
    pub base: BaseModelInfo,
    /// Training runs one tenant may have (0 = unlimited).
    pub max_runs_per_tenant: usize,
    /// Training runs all tenants may have together (0 = unlimited).
    pub max_runs: usize,
    /// Sampled sequences recorded for `stable_reinforce` one tenant keeps (least recently used
    /// forgotten first).
    pub max_recorded_samples_per_tenant: usize,
    /// How long a worker must have found nothing to do, with no job queued or running anywhere,
    /// before it asks the C allocator to give its free memory back to the system
    /// ([`loraloom_heap::release_free_memory`]), once per stretch of work; None: never.
    pub release_memory_after_idle: Option<Duration>,
    /// Journal every job in the registry's durable store so that a crash loses none
    /// ([`crate::journal`]); for runs snapshotted at every step (`--step-snapshots`). Without a
    /// durable store there is nothing to journal in.
    pub journal: bool,
}

/// How long a recorded sampled sequence is kept after it was sampled or last trained on (the
/// day Tinker documents).
pub const RECORDED_SAMPLE_TTL: Duration = Duration::from_secs(24 * 3600);
/// How long a tenant's audit log keeps an entry (`GET /api/v1/audit`).
pub const AUDIT_KEPT: Duration = Duration::from_secs(365 * 24 * 3600);

/// Counters of one queue (a run or a sampling session).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QueueStats {
    /// Owner.
    pub tenant: String,
    /// Run or session id.
    pub id: String,
    /// Jobs finished successfully.
    pub done: u64,
    /// Jobs failed (timeouts and cancellations included).
    pub failed: u64,
    /// Tokens put through the model.
    pub tokens: u64,
    /// Last time a job finished (unix seconds).
    pub last_access: f64,
}

/// A snapshot of the engine's counters.
#[derive(Debug, Clone, Default)]
pub struct StatsSnapshot {
    /// Jobs waiting.
    pub queued: usize,
    /// Jobs waiting, per tenant.
    pub queued_by_tenant: Vec<(String, usize)>,
    /// Jobs running.
    pub running: u64,
    /// Jobs finished successfully.
    pub done: u64,
    /// Jobs failed.
    pub failed: u64,
    /// Jobs refused at submission because a queue limit was reached (HTTP 429).
    pub refused: u64,
    /// Batches executed.
    pub batches: u64,
    /// Jobs executed in batches (for the mean batch size).
    pub batched_jobs: u64,
    /// Largest batch so far.
    pub max_batch: u64,
    /// Tokens put through the model.
    pub tokens: u64,
    /// Failures by error kind.
    pub failures_by_kind: HashMap<String, u64>,
    /// Per queue.
    pub queues: Vec<QueueStats>,
    /// Training runs registered.
    pub models: usize,
    /// Sampling prompts prefilled: one per distinct prompt and sampler among requests admitted
    /// together (whatever their `num_samples`).
    pub prefills: u64,
    /// Sampling requests that joined without a prefill of their own (their prompt and sampler
    /// were another's, admitted with them or still decoding) or from a shared prefix.
    pub shared_prompts: u64,
    /// Sampling prompt tokens whose keys and values were copied instead of computed.
    pub prompt_tokens_reused: u64,
    /// Keys and values (tokens) the sampling jobs in the decode loops may come to hold, all
    /// workers together: per loop its [`KvFootprint`] (its sequences × the longest `prompt +
    /// max_tokens` among them, as a batch's cache pads its rows to the longest).
    pub kv_tokens_reserved: u64,
    /// What one worker's decode loop may reserve (`--max-kv-tokens`).
    pub kv_budget_tokens: u64,
    /// Keys and values (tokens) the decode loops' caches hold room for at their last steps,
    /// kept sequences aside, all workers together.
    pub kv_tokens_held: u64,
    /// Tokens of finished sequences the decode loops keep for later prompts (prefix caches),
    /// at their last steps, all workers together.
    pub kept_tokens: u64,
    /// Bytes of resident adapters (runs and sampling sessions) of all tenants that no worker
    /// is using right now.
    pub resident_bytes: u64,
    /// `--max-resident-bytes` (0 = no limit).
    pub resident_bytes_limit: u64,
    /// Decode steps run.
    pub decode_steps: u64,
    /// Tokens sampled (`decode_tokens / decode_steps` is the mean decode batch occupancy).
    pub decode_tokens: u64,
    /// Seconds spent in decode steps.
    pub decode_seconds: f64,
    /// Decode steps recorded as CUDA graphs (`--step-graphs cuda`).
    pub decode_steps_recorded: u64,
    /// Decode steps replayed from a recording (one launch each).
    pub decode_steps_replayed: u64,
    /// Sampling jobs that sampled a first token.
    pub first_tokens: u64,
    /// Their summed time from admission to first token (seconds).
    pub first_token_seconds: f64,
    /// Times the allocator's free memory was given back when idle
    /// (`EngineConfig::release_memory_after_idle`).
    pub memory_releases: u64,
    /// The fall of the resident size over those releases, summed (bytes).
    pub memory_released_bytes: u64,
}

#[derive(Default)]
struct Counters {
    running: AtomicU64,
    done: AtomicU64,
    failed: AtomicU64,
    refused: AtomicU64,
    batches: AtomicU64,
    batched_jobs: AtomicU64,
    max_batch: AtomicU64,
    tokens: AtomicU64,
    per_queue: Mutex<HashMap<QueueKey, QueueStats>>,
    failures: Mutex<HashMap<String, u64>>,
    prefills: AtomicU64,
    shared_prompts: AtomicU64,
    prompt_tokens_reused: AtomicU64,
    kv_tokens_reserved: AtomicU64,
    kv_tokens_held: AtomicU64,
    kept_tokens: AtomicU64,
    decode_steps: AtomicU64,
    decode_tokens: AtomicU64,
    decode_ns: AtomicU64,
    decode_steps_recorded: AtomicU64,
    decode_steps_replayed: AtomicU64,
    first_tokens: AtomicU64,
    first_token_ns: AtomicU64,
    memory_releases: AtomicU64,
    memory_released_bytes: AtomicU64,
}

/// Finished jobs kept for session traces (all tenants; 64 bytes each, allocated at start).
const TIMELINE_JOBS: usize = 100_000;

struct Inner {
    sched: Mutex<SchedState>,
    wake: Condvar,
    futures: FutureStore,
    registry: Arc<Registry>,
    counters: Counters,
    /// Finished jobs, for session traces.
    timeline: crate::timeline::Timeline,
    base: BaseModelInfo,
    /// (per tenant, overall) run limits, 0 = unlimited.
    run_limits: (usize, usize),
    workers: Mutex<Vec<JoinHandle<()>>>,
    /// `max_recorded_samples_per_tenant`.
    max_recorded_samples: usize,
    /// Records, per queue, the order jobs were admitted and started in (tests of ordering).
    order_log: Option<Mutex<OrderLog>>,
    /// `EngineConfig::release_memory_after_idle`.
    release_memory_after_idle: Option<Duration>,
    /// Where jobs are journaled (`EngineConfig::journal`, with a durable store).
    journal: Option<Arc<dyn Store>>,
    /// Held by a submission from its journal row to its place in the queue, so that the
    /// journal's order is the queues' (a restart queues jobs again in journal order).
    admission: Mutex<()>,
    /// The futures of the jobs the journal held at start, by (tenant, replay key): a client
    /// retrying a request whose answer the crash cut off gets that future again.
    journaled_keys: Mutex<(crate::journal::ClientKeys, Instant)>,
}

/// What one tenant holds, against its limits (0 = no limit).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TenantUsage {
    /// Training runs.
    pub runs: usize,
    /// `--max-runs-per-tenant`.
    pub runs_limit: usize,
    /// Sampling sessions.
    pub sampling_sessions: usize,
    /// Listed checkpoints.
    pub checkpoints: usize,
    /// `--max-checkpoints-per-tenant`.
    pub checkpoints_limit: usize,
    /// Bytes of listed checkpoints.
    pub checkpoint_bytes: u64,
    /// `--max-checkpoint-bytes-per-tenant`.
    pub checkpoint_bytes_limit: u64,
    /// Jobs waiting.
    pub queued_jobs: usize,
    /// `--max-queued-per-tenant`.
    pub queued_jobs_limit: usize,
    /// Bytes of resident adapters (runs and sampling sessions) no worker is using right now.
    pub resident_bytes: u64,
    /// `--max-resident-bytes-per-tenant` (0 = no limit).
    pub resident_bytes_limit: u64,
}

/// Per queue: request ids in admission order and in start order.
#[derive(Debug, Clone, Default)]
pub struct OrderLog {
    /// Admission order.
    pub admitted: HashMap<QueueKey, Vec<RequestId>>,
    /// Start order.
    pub started: HashMap<QueueKey, Vec<RequestId>>,
}

/// Cloneable handle to the engine.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Engine {
    /// Starts one worker thread per backend.
    pub fn start(
        config: EngineConfig,
        registry: Arc<Registry>,
        backends: Vec<Box<dyn Backend>>,
    ) -> Engine {
        Self::start_inner(config, registry, backends, false)
    }

    /// Like [`Engine::start`], also recording the order in which each queue's jobs start.
    pub fn start_recording_order(
        config: EngineConfig,
        registry: Arc<Registry>,
        backends: Vec<Box<dyn Backend>>,
    ) -> Engine {
        Self::start_inner(config, registry, backends, true)
    }

    fn start_inner(
        config: EngineConfig,
        registry: Arc<Registry>,
        backends: Vec<Box<dyn Backend>>,
        record: bool,
    ) -> Engine {
        let futures = match registry.store() {
            Some(store) => FutureStore::durable(config.future_ttl, store.clone()),
            None => FutureStore::new(config.future_ttl),
        };
        let journal = registry.store().filter(|_| config.journal).cloned();
        registry.set_checkpoint_limits(
            config.limits.max_checkpoints_per_tenant,
            config.limits.max_checkpoint_bytes_per_tenant,
        );
        let inner = Arc::new(Inner {
            sched: Mutex::new(SchedState::new(config.limits)),
            max_recorded_samples: config.max_recorded_samples_per_tenant,
            wake: Condvar::new(),
            futures,
            registry,
            counters: Counters::default(),
            timeline: crate::timeline::Timeline::new(TIMELINE_JOBS),
            base: config.base,
            run_limits: (config.max_runs_per_tenant, config.max_runs),
            workers: Mutex::new(Vec::new()),
            order_log: record.then(|| Mutex::new(OrderLog::default())),
            release_memory_after_idle: config.release_memory_after_idle,
            journal,
            admission: Mutex::new(()),
            journaled_keys: Mutex::new((HashMap::new(), Instant::now())),
        });
        let handles = backends
            .into_iter()
            .enumerate()
            .map(|(i, backend)| {
                let inner = inner.clone();
                std::thread::Builder::new()
                    .name(format!("loraloom-worker-{i}"))
                    .spawn(move || worker_loop(inner, backend))
                    .expect("spawning a worker thread")
            })
            .collect();
        *lock(&inner.workers) = handles;
        let reaper = Arc::downgrade(&inner);
        std::thread::Builder::new()
            .name("loraloom-reaper".into())
            .spawn(move || reap_checkpoints(reaper))
            .expect("spawning the checkpoint reaper");
        Engine { inner }
    }

    /// The served base model.
    pub fn base(&self) -> &BaseModelInfo {
        &self.inner.base
    }

    /// Runs, sessions and checkpoints.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.inner.registry
    }

    /// The futures store.
    pub fn futures(&self) -> &FutureStore {
        &self.inner.futures
    }

    /// The tenant's sampled sequences recorded for `stable_reinforce` among `ids` (unknown or
    /// expired ids are absent), each marked used now (which restarts its day).
    pub fn use_recorded_samples(
        &self,
        tenant: &str,
        ids: &[String],
    ) -> Result<HashMap<String, SampleRow>> {
        Ok(self
            .inner
            .registry
            .db()
            .use_samples(tenant, ids, unix_now())?
            .into_iter()
            .map(|row| (row.id.clone(), row))
            .collect())
    }

    /// Queues `work` on `queue`; returns the request id of its future.
    pub fn submit(&self, queue: QueueKey, work: Work) -> Result<RequestId> {
        self.submit_reporting(queue, work, None)
    }

    /// [`Engine::submit`]; with `clone`, a sampling session's request reports its completion to
    /// the feed of that SDK client of the session (0: the original; see
    /// [`Engine::poll_completions`]).
    pub fn submit_reporting(
        &self,
        queue: QueueKey,
        work: Work,
        clone: Option<u64>,
    ) -> Result<RequestId> {
        self.submit_keyed(queue, work, clone, None)
    }

    /// The future a journaled job submitted by a request of replay key `client_key` (a retry's
    /// first attempt, before a crash) has, if the journal held one at start.
    pub fn journaled(&self, tenant: &str, client_key: Option<&str>) -> Option<RequestId> {
        let key = (tenant.to_string(), client_key?.to_string());
        let mut keys = lock(&self.inner.journaled_keys);
        if keys.1.elapsed() > JOURNALED_KEYS_KEPT {
            // Retries come within seconds; the map goes with the first submission after.
            keys.0.clear();
        }
        keys.0.get(&key).cloned()
    }

    /// [`Engine::submit_reporting`] for a request of replay key `client_key` (its route and
    /// idempotency key or body digest, see the API's idempotency layer), which the journal
    /// keeps with the job: a retry of a request whose job the journal held at start gets that
    /// job's future, and the work is not done twice.
    pub fn submit_keyed(
        &self,
        queue: QueueKey,
        work: Work,
        clone: Option<u64>,
        client_key: Option<&str>,
    ) -> Result<RequestId> {
        if let Some(id) = self.journaled(queue.tenant(), client_key) {
            return Ok(id);
        }
        Ok(self.admit_job(queue, work, clone, client_key)?.0)
    }

    /// [`Engine::submit`] for a sampling job whose tokens stream: the receiver gets the tokens
    /// each decode step chose for it, and ends when the job settles (its result, read as any
    /// other's, then holds every token).
    pub fn submit_streaming(
        &self,
        queue: QueueKey,
        mut work: Work,
    ) -> Result<(RequestId, UnboundedReceiver<Vec<StreamedToken>>)> {
        let Work::Sample { stream, .. } = &mut work else {
            return Err(EngineError::invalid(
                "stream",
                "only sampling streams its tokens",
            ));
        };
        *stream = true;
        match self.admit_job(queue, work, None, None)? {
            (id, Some(receiver)) => Ok((id, receiver)),
            (id, None) => Err(EngineError::Internal(format!(
                "the streamed job {id} has no stream"
            ))),
        }
    }

    /// Checks `work`, journals it and queues it; its id, and the receiver of its tokens when it
    /// streams.
    fn admit_job(
        &self,
        queue: QueueKey,
        work: Work,
        clone: Option<u64>,
        client_key: Option<&str>,
    ) -> Result<(RequestId, Option<UnboundedReceiver<Vec<StreamedToken>>>)> {
        let run = match &queue {
            QueueKey::Model(k) => Some(self.inner.registry.model(&k.tenant, &k.model_id)?),
            QueueKey::Sampler(k) => {
                // Counts as a use: a session with queued work is never removed to make room.
                let entry = self.inner.registry.sampler(&k.tenant, &k.sampler_id)?;
                entry.last_access.touch();
                None
            }
        };
        // Refuse what can never run before it takes a place in a queue.
        let config = &self.inner.base.config;
        match &work {
            Work::Load { path, .. } => {
                check_checkpoint(&self.inner.registry, queue.tenant(), path)?
            }
            Work::ForwardBackward {
                data,
                loss,
                backward,
                ..
            } => {
                validate_request(config, loss, data)?;
                let lengths: Vec<usize> = data.iter().map(|d| d.input_tokens.len()).collect();
                let tokens: usize = lengths.iter().sum();
                // What the run's adapter holds throughout a pass besides activations.
                let cost = &self.inner.base.pass_cost;
                let held = run
                    .as_ref()
                    .map_or(0, |r| r.spec.held_elements(config) * cost.element_bytes());
                let (limit, budget) = {
                    let sched = lock(&self.inner.sched);
                    (
                        sched.limits().max_request_tokens,
                        sched.limits().memory_budget,
                    )
                };
                loraloom_model::memory::check_fits(
                    &lengths,
                    *backward,
                    cost,
                    budget.saturating_sub(held),
                )?;
                if tokens > limit {
                    return Err(EngineError::invalid(
                        "data",
                        format!(
                            "{} datums hold {tokens} tokens, more than this server's limit of {limit} per request (--max-request-tokens); split them into several calls (the SDK does so itself, told the limit by the client config)",
                            data.len()
                        ),
                    ));
                }
            }
            Work::Sample {
                prompt,
                num_samples,
                params,
                scoring,
                ..
            } => {
                validate_sampling(config, prompt, *num_samples, params)?;
                scoring.validate(prompt.len(), config.vocab_size)?;
            }
            Work::OptimStep { params } => params.validate()?,
            Work::Save {
                name,
                kind,
                sampler,
                options,
            } => {
                self.check_ttl(options.ttl_seconds)?;
                crate::export::parse_recipients(&options.encrypt_to)?;
                if let QueueKey::Model(k) = &queue {
                    let path = crate::registry::checkpoint_path(&k.model_id, *kind, name);
                    self.inner
                        .registry
                        .check_overwrite(&k.tenant, &path, options.overwrite)?;
                }
                if sampler.is_none() {
                    self.inner.registry.check_checkpoint_quota(queue.tenant())?;
                }
            }
            Work::Create { .. } => {}
        }
        let id = uuid::Uuid::new_v4().to_string();
        let tenant = queue.tenant().to_string();
        // Journaled before the client hears of it: a crash from here on queues it again.
        let _admitting = self
            .inner
            .journal
            .as_ref()
            .map(|_| lock(&self.inner.admission));
        // Not a streamed job: its reader is one connection, which a restart ends, so running it
        // again would serve nobody; a shutdown fails it instead, and its stream says so.
        let streamed = matches!(work, Work::Sample { stream: true, .. });
        let seq = match &self.inner.journal {
            Some(store) if !streamed => {
                Some(store.put_job(&crate::journal::row(&id, &queue, &work, client_key)?)?)
            }
            _ => None,
        };
        // One span per job, carried to the worker: tenant (its configured name, never a key),
        // run or session, request id and kind.
        let span = tracing::info_span!(
            "job",
            request_id = %id,
            tenant = %tenant,
            queue = %queue.id(),
            kind = work.name()
        );
        let job = Job {
            id: id.clone(),
            queue,
            work,
            enqueued: Instant::now(),
            span,
            seq,
            replay: false,
        };
        let feed = match (&job.queue, clone) {
            (QueueKey::Sampler(k), Some(clone)) => Some(FeedKey {
                tenant: tenant.clone(),
                sampler_id: k.sampler_id.clone(),
                clone,
            }),
            _ => None,
        };
        let receiver = match &job.work {
            Work::Sample { stream: true, .. } => {
                Some(self.inner.futures.insert_streaming(&id, &tenant, feed))
            }
            _ => {
                self.inner.futures.insert_in_feed(&id, &tenant, feed);
                None
            }
        };
        let key = job.queue.clone();
        let pushed = {
            let mut st = lock(&self.inner.sched);
            let pushed = st.push(job);
            if let (Ok(()), Some(log)) = (&pushed, &self.inner.order_log) {
                lock(log).admitted.entry(key).or_default().push(id.clone());
            }
            pushed
        };
        if let Err(err) = pushed {
            // The client gets the refusal, never the id.
            self.inner.futures.forget(&id);
            if let (Some(store), Some(seq)) = (&self.inner.journal, seq) {
                if let Err(e) = store.delete_jobs(&[seq]) {
                    tracing::warn!(request_id = %id, error = %e, "cannot forget a refused job");
                }
            }
            if matches!(err, EngineError::Overloaded(_)) {
                self.inner.counters.refused.fetch_add(1, Ordering::Relaxed);
            }
            return Err(err);
        }
        self.inner.wake.notify_one();
        Ok((id, receiver))
    }

    /// A future for work the caller has already done (creating a custom loss): done with `out`
    /// at once, retrieved like any other.
    pub fn settled(&self, tenant: &str, out: Output) -> RequestId {
        let id = uuid::Uuid::new_v4().to_string();
        self.inner.futures.insert(&id, tenant);
        self.inner.futures.set(&id, FutureState::Done(out));
        id
    }

    /// Registers a run for `tenant` and queues its creation (fresh, or from a checkpoint).
    pub fn create_model(
        &self,
        key: ModelKey,
        spec: LoraSpec,
        user_metadata: serde_json::Value,
        from: Option<(String, bool)>,
    ) -> Result<RequestId> {
        self.create_model_keyed(key, spec, user_metadata, from, None)
    }

    /// [`Engine::create_model`] for a request of replay key `client_key` (see
    /// [`Engine::submit_keyed`]).
    pub fn create_model_keyed(
        &self,
        key: ModelKey,
        spec: LoraSpec,
        user_metadata: serde_json::Value,
        from: Option<(String, bool)>,
        client_key: Option<&str>,
    ) -> Result<RequestId> {
        if let Some(id) = self.journaled(&key.tenant, client_key) {
            return Ok(id);
        }
        if let Some((path, _)) = &from {
            check_checkpoint(&self.inner.registry, &key.tenant, path)?;
        }
        spec.validate(&self.inner.base.config)?;
        let resident = spec.resident_bytes(&self.inner.base.config);
        let registry = &self.inner.registry;
        // The server's limit first: the tenant's is the same figure unless set apart.
        for (limit, who, flag) in [
            (
                registry.max_resident_bytes(),
                "all tenants together",
                "--max-resident-bytes",
            ),
            (
                registry.max_resident_bytes_per_tenant(),
                "this tenant",
                "--max-resident-bytes-per-tenant",
            ),
        ] {
            if limit > 0 && resident > limit {
                return Err(EngineError::LimitReached(format!(
                    "a run of rank {} holds {} in memory, more than {who} may hold ({flag} {}); \
                     use a lower rank",
                    spec.rank,
                    loraloom_model::human_bytes(resident),
                    loraloom_model::human_bytes(limit)
                )));
            }
        }
        let (per_tenant, overall) = self.inner.run_limits;
        let mine = self.inner.registry.models_of(&key.tenant).len();
        if per_tenant > 0 && mine >= per_tenant {
            return Err(EngineError::LimitReached(format!(
                "this tenant has {mine} training runs (limit {per_tenant}) and none is \
                 abandoned (its session finished by ServiceClient.close, or silent for \
                 --session-timeout-secs); close a ServiceClient or unload a run first"
            )));
        }
        let all = self.inner.registry.model_count();
        if overall > 0 && all >= overall {
            return Err(EngineError::LimitReached(format!(
                "the server holds {all} training runs (limit {overall}) and none is abandoned \
                 (its session finished by ServiceClient.close, or silent for \
                 --session-timeout-secs)"
            )));
        }
        self.inner.registry.add_model(
            key.clone(),
            &self.inner.base.name,
            spec.clone(),
            user_metadata,
        )?;
        let submitted = self.submit_keyed(
            QueueKey::Model(key.clone()),
            Work::Create { spec, from },
            None,
            client_key,
        );
        if submitted.is_err() {
            let _ = self.inner.registry.remove_model(&key.tenant, &key.model_id);
        }
        submitted
    }

    /// Checks a checkpoint lifetime: from `--min-checkpoint-ttl-secs` to ten years.
    fn check_ttl(&self, ttl_seconds: Option<u64>) -> Result<()> {
        const TEN_YEARS: u64 = 10 * 365 * 86_400;
        let min = lock(&self.inner.sched)
            .limits()
            .min_checkpoint_ttl
            .as_secs();
        match ttl_seconds {
            Some(ttl) if ttl < min || ttl > TEN_YEARS => Err(EngineError::invalid(
                "ttl_seconds",
                format!("must be between {min} and {TEN_YEARS} seconds (ten years), got {ttl}"),
            )),
            _ => Ok(()),
        }
    }

    /// Sets the lifetime of a checkpoint of `tenant` from now (`None`: kept until deleted).
    pub fn set_checkpoint_ttl(
        &self,
        tenant: &str,
        path: &str,
        ttl_seconds: Option<u64>,
    ) -> Result<()> {
        self.check_ttl(ttl_seconds)?;
        let expires_at = ttl_seconds.map(|ttl| crate::registry::unix_now() + ttl as f64);
        self.inner
            .registry
            .set_checkpoint_expiry(tenant, path, expires_at)
    }

    /// Copies a checkpoint `tenant` may read (its own, or a published one) to its run
    /// `model_id` (`copy_weights`), within its checkpoint quota; files are shared, not
    /// duplicated, where the filesystem allows.
    pub fn copy_checkpoint(
        &self,
        tenant: &str,
        source: &str,
        model_id: &str,
        ttl_seconds: Option<u64>,
    ) -> Result<CheckpointRecord> {
        self.check_ttl(ttl_seconds)?;
        self.inner.registry.check_checkpoint_quota(tenant)?;
        if self.inner.registry.model(tenant, model_id).is_ok() {
            return Err(EngineError::invalid(
                "model_seq_id",
                format!("`{model_id}` is a training run; copies go to a slot of their own"),
            ));
        }
        let expires_at = ttl_seconds.map(|ttl| crate::registry::unix_now() + ttl as f64);
        self.inner
            .registry
            .copy_checkpoint(tenant, source, model_id, expires_at)
    }

    /// The tenant's recently finished jobs on the runs and sampling sessions `belongs` accepts,
    /// oldest first (the last 100,000 jobs of the server are kept, in memory).
    pub fn timeline(
        &self,
        tenant: &str,
        belongs: impl Fn(&str) -> bool,
    ) -> Vec<crate::timeline::JobRecord> {
        self.inner.timeline.of(tenant, belongs)
    }

    /// The tenant's usage against its limits, for `/api/model-stats`.
    pub fn usage(&self, tenant: &str) -> TenantUsage {
        let (limits, queued_jobs) = {
            let sched = lock(&self.inner.sched);
            (sched.limits().clone(), sched.queued_for(tenant))
        };
        let (checkpoints, checkpoint_bytes) = self.inner.registry.checkpoint_usage(tenant);
        TenantUsage {
            runs: self.inner.registry.models_of(tenant).len(),
            runs_limit: self.inner.run_limits.0,
            sampling_sessions: self.inner.registry.sampler_count(tenant),
            checkpoints,
            checkpoints_limit: limits.max_checkpoints_per_tenant,
            checkpoint_bytes,
            checkpoint_bytes_limit: limits.max_checkpoint_bytes_per_tenant,
            queued_jobs,
            queued_jobs_limit: limits.per_tenant,
            resident_bytes: self.inner.registry.resident_bytes(Some(tenant)),
            resident_bytes_limit: self.inner.registry.max_resident_bytes_per_tenant(),
        }
    }

    /// Registers a sampling session over the base model or one of the tenant's checkpoints.
    pub fn create_sampler(&self, key: SamplerKey, source: SamplerSource) -> Result<()> {
        if let SamplerSource::Checkpoint(path) = &source {
            check_checkpoint(&self.inner.registry, &key.tenant, path)?;
        }
        self.inner
            .registry
            .add_sampler(key, source, &self.inner.base.name)?;
        Ok(())
    }

    /// Long-polls the completion feed of `tenant`'s sampling session `sampler_id` as seen by
    /// its SDK client `clone` (the SDK's `retrieve_futures` poller) for up to `timeout`: the
    /// requests of that client finished after `prev_cursor`. The finished requests in
    /// `retrieved` (their results fetched) are forgotten first.
    pub async fn poll_completions(
        &self,
        feed: &FeedKey,
        prev_cursor: u64,
        retrieved: &[String],
        timeout: Duration,
    ) -> Result<FeedPoll> {
        // A session removed (made room for) still answers what its feed holds: its client's
        // poller fails every waiter at a 404.
        if let Err(e) = self.inner.registry.sampler(&feed.tenant, &feed.sampler_id) {
            if !self.inner.futures.has_feed(feed) {
                return Err(e);
            }
        }
        Ok(self
            .inner
            .futures
            .poll_feed(feed, prev_cursor, retrieved, timeout)
            .await)
    }

    /// Long-polls a future for up to `timeout`.
    pub async fn wait(&self, tenant: &str, id: &str, timeout: Duration) -> Result<FutureState> {
        self.inner.futures.wait(tenant, id, timeout).await
    }

    /// Cancels a job of `tenant`: a queued one at once, a sampling job in a decode loop at its
    /// worker's next token boundary (its future then fails "cancelled"; one that ends in the
    /// same step keeps its result). Other running and finished jobs are not affected (false).
    pub fn cancel(&self, tenant: &str, id: &str) -> Result<bool> {
        // The future is looked up for its owner; its state only rules out finished jobs. Where
        // the job is is read under the scheduler lock: a worker takes a sampling job off its
        // queue and into its decode loop under that lock (before marking its future running),
        // so a job that has not finished is found in one or the other.
        let state = self.inner.futures.get(tenant, id)?;
        if !matches!(state, FutureState::Queued | FutureState::Running) {
            return Ok(false);
        }
        let job = {
            let mut st = lock(&self.inner.sched);
            match st.cancel(id) {
                Some(job) => job,
                None => return Ok(st.request_cancel(id)),
            }
        };
        self.record_failure(&job, EngineError::Cancelled);
        Ok(true)
    }

    /// Stops admitting work and lets the jobs already queued or running finish for at most
    /// `drain` (`Duration::ZERO`: none; `Duration::MAX`: all of them), then leaves what is left
    /// to the restarted server in the job journal, or without one fails it with "server
    /// restarted" ([`Engine::end_drain`]), and writes every run's snapshot. Returns
    /// once the workers have finished. A restart thus loses nothing its clients were waiting
    /// for when the queue drains in time: the results wait in the store for the restarted
    /// server to answer.
    pub fn shutdown(&self, drain: Duration) {
        if drain.is_zero() {
            // Before the pause is lifted, so that no queued job starts.
            self.end_drain();
        }
        {
            let mut st = lock(&self.inner.sched);
            st.close();
            st.set_paused(false);
        }
        self.inner.wake.notify_all();
        let handles = std::mem::take(&mut *lock(&self.inner.workers));
        let deadline = Instant::now().checked_add(drain);
        while !handles.iter().all(JoinHandle::is_finished) {
            if deadline.is_some_and(|d| Instant::now() >= d) {
                self.end_drain();
                break;
            }
            std::thread::sleep(DRAIN_POLL);
        }
        for h in handles {
            let _ = h.join();
        }
        if self.inner.registry.store().is_some() {
            self.snapshot_all();
        }
    }

    /// Ends a shutdown's drain now (a second signal, or its time is up): queued jobs leave the
    /// queues and sampling jobs stop at their next token, unsettled in the job journal for the
    /// restarted server (without one, they fail with "server restarted"); the batches running
    /// finish. Also stops admitting work, so it may come before
    /// [`Engine::shutdown`].
    pub fn end_drain(&self) {
        let drained = {
            let mut st = lock(&self.inner.sched);
            st.close();
            st.stop_decoding();
            st.drain()
        };
        for job in drained {
            self.record_failure(&job, EngineError::ServerRestarted);
        }
        self.inner.wake.notify_all();
    }

    /// Writes every resident run's state to its snapshot directory (graceful shutdown).
    pub fn snapshot_all(&self) {
        for entry in self.inner.registry.all_models() {
            let state = entry.lock();
            if let Err(e) = snapshot(&self.inner.registry, &entry, &state) {
                tracing::error!(model_id = %entry.key.model_id, error = %e, "cannot snapshot a run");
                continue;
            }
            // Gradients waiting for a step are in the snapshot; ones already lost stay lost.
            if state.gradients_lost {
                if let Err(e) = write_marker(&self.inner.registry, &entry, LOST_MARKER) {
                    tracing::error!(model_id = %entry.key.model_id, error = %e, "cannot mark pending gradients");
                }
            }
        }
    }

    /// After a restart, before the server takes requests (and after interrupted saves were
    /// cleaned up): with the journal, queues again the jobs that were queued or running, ahead
    /// of anything new, and rebuilds the gradients runs held ([`crate::journal`]), then removes
    /// runs whose create never finished and is not queued again; fails the futures of the
    /// jobs that are not queued again ("server restarted"). Returns how many failed. Runs need
    /// nothing more here: the registry reloads them as evicted, so each run's first job reads
    /// its latest snapshot under its own mutex, in its FIFO order.
    pub fn restore(&self) -> Result<usize> {
        // Read once, for the journal and the futures store.
        let futures = match self.inner.registry.store() {
            Some(store) => store.futures()?,
            None => Vec::new(),
        };
        let recovery = match (&self.inner.journal, self.inner.registry.store()) {
            (Some(store), _) => {
                crate::journal::recover(store.as_ref(), &self.inner.registry, &futures)?
            }
            (None, Some(store)) => {
                // Rows of a time the journal was kept (see `journal::discard`).
                crate::journal::discard(store.as_ref())?;
                Default::default()
            }
            (None, None) => Default::default(),
        };
        *lock(&self.inner.journaled_keys) = (recovery.client_keys, Instant::now());
        let mut kept = recovery.requeued.clone();
        kept.extend(recovery.settled.iter().map(|(id, _)| id.clone()));
        let restarted = self.inner.futures.restore(futures, &kept)?;
        for (id, out) in recovery.settled {
            self.inner.futures.set(&id, FutureState::Done(out));
        }
        if self.inner.journal.is_some() {
            let unfinished = self
                .inner
                .registry
                .remove_unfinished_runs(&recovery.creating);
            if !unfinished.is_empty() {
                tracing::info!(
                    runs = unfinished.len(),
                    "removed runs whose create never finished (a retry creates them again)"
                );
            }
        }
        if !recovery.jobs.is_empty() {
            let rebuilding = recovery.jobs.iter().filter(|j| j.replay).count();
            tracing::info!(
                queued_again = recovery.jobs.len() - rebuilding,
                rebuilding_gradients = rebuilding,
                "journaled jobs queued again after a crash"
            );
            let mut st = lock(&self.inner.sched);
            for job in recovery.jobs {
                st.push_recovered(job);
            }
        }
        self.inner.wake.notify_all();
        Ok(restarted)
    }

    /// Admission and start order per queue (when recording was enabled).
    pub fn order_log(&self) -> OrderLog {
        self.inner
            .order_log
            .as_ref()
            .map(|m| lock(m).clone())
            .unwrap_or_default()
    }

    /// Holds every queued job (`true`) or lets batches start again (`false`).
    pub fn set_paused(&self, paused: bool) {
        lock(&self.inner.sched).set_paused(paused);
        self.inner.wake.notify_all();
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> StatsSnapshot {
        let c = &self.inner.counters;
        let mut queues: Vec<QueueStats> = lock(&c.per_queue).values().cloned().collect();
        queues.sort_by(|a, b| (&a.tenant, &a.id).cmp(&(&b.tenant, &b.id)));
        let (queued, queued_by_tenant, kv_budget) = {
            let st = lock(&self.inner.sched);
            (
                st.queued(),
                st.queued_by_tenant(),
                st.limits().max_kv_tokens,
            )
        };
        StatsSnapshot {
            queued,
            queued_by_tenant,
            running: c.running.load(Ordering::Relaxed),
            done: c.done.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
            refused: c.refused.load(Ordering::Relaxed),
            batches: c.batches.load(Ordering::Relaxed),
            batched_jobs: c.batched_jobs.load(Ordering::Relaxed),
            max_batch: c.max_batch.load(Ordering::Relaxed),
            tokens: c.tokens.load(Ordering::Relaxed),
            failures_by_kind: lock(&c.failures).clone(),
            queues,
            models: self.inner.registry.model_count(),
            prefills: c.prefills.load(Ordering::Relaxed),
            shared_prompts: c.shared_prompts.load(Ordering::Relaxed),
            prompt_tokens_reused: c.prompt_tokens_reused.load(Ordering::Relaxed),
            kv_tokens_reserved: c.kv_tokens_reserved.load(Ordering::Relaxed),
            kv_budget_tokens: kv_budget as u64,
            kv_tokens_held: c.kv_tokens_held.load(Ordering::Relaxed),
            kept_tokens: c.kept_tokens.load(Ordering::Relaxed),
            resident_bytes: self.inner.registry.resident_bytes(None),
            resident_bytes_limit: self.inner.registry.max_resident_bytes(),
            decode_steps: c.decode_steps.load(Ordering::Relaxed),
            decode_tokens: c.decode_tokens.load(Ordering::Relaxed),
            decode_seconds: c.decode_ns.load(Ordering::Relaxed) as f64 / 1e9,
            decode_steps_recorded: c.decode_steps_recorded.load(Ordering::Relaxed),
            decode_steps_replayed: c.decode_steps_replayed.load(Ordering::Relaxed),
            memory_releases: c.memory_releases.load(Ordering::Relaxed),
            memory_released_bytes: c.memory_released_bytes.load(Ordering::Relaxed),
            first_tokens: c.first_tokens.load(Ordering::Relaxed),
            first_token_seconds: c.first_token_ns.load(Ordering::Relaxed) as f64 / 1e9,
        }
    }

    /// Training runs one tenant, and the server, may hold (`--max-runs-per-tenant`,
    /// `--max-runs`; 0 = no limit).
    pub fn run_limits(&self) -> (usize, usize) {
        self.inner.run_limits
    }

    /// Most tokens one forward_backward or forward request may hold (`--max-request-tokens`).
    pub fn max_request_tokens(&self) -> usize {
        lock(&self.inner.sched).limits().max_request_tokens
    }

    /// Most jobs one tenant may have queued (`--max-queued-per-tenant`, or `--max-queued` when
    /// that is smaller): more are refused with "overloaded".
    pub fn max_queued_per_tenant(&self) -> usize {
        let st = lock(&self.inner.sched);
        st.limits().per_tenant.min(st.limits().total)
    }

    /// Jobs waiting in one queue.
    pub fn queue_depth(&self, key: &QueueKey) -> usize {
        lock(&self.inner.sched).queue_depth(key)
    }

    fn record_failure(&self, job: &Job, err: EngineError) {
        record(&self.inner, job, Err(err));
    }
}

fn record(inner: &Inner, job: &Job, result: Result<Output>) {
    if matches!(result, Err(EngineError::ServerRestarted)) && job.seq.is_some() {
        // A shutdown's drain ended before it: its future stays unsettled and its journal row
        // in place, and the restarted server runs it.
        tracing::info!(request_id = %job.id, kind = job.work.name(), "left in the journal for the restarted server");
        return;
    }
    if job.replay {
        rebuilt(inner, job, result.err());
        return;
    }
    let result = result.and_then(|out| record_samples(inner, job, out));
    let usage = match &result {
        Ok(out) => usage_of(job, out),
        Err(_) => Vec::new(),
    };
    let c = &inner.counters;
    let mut per_queue = lock(&c.per_queue);
    let q = per_queue
        .entry(job.queue.clone())
        .or_insert_with(|| QueueStats {
            tenant: job.queue.tenant().to_string(),
            id: job.queue.id().to_string(),
            ..QueueStats::default()
        });
    q.last_access = unix_now();
    let waited = job.enqueued.elapsed().as_secs_f64();
    metrics::histogram!(crate::metric::JOB_SECONDS).record(waited);
    let now = unix_now();
    inner.timeline.push(
        job.queue.tenant(),
        job.queue.id(),
        &job.id,
        job.work.name(),
        now - waited,
        now,
        result.is_ok(),
    );
    match &result {
        Ok(_) => {
            q.done += 1;
            q.tokens += job.work.tokens() as u64;
            c.done.fetch_add(1, Ordering::Relaxed);
        }
        Err(e) => {
            q.failed += 1;
            c.failed.fetch_add(1, Ordering::Relaxed);
            *lock(&c.failures).entry(e.kind().to_string()).or_default() += 1;
        }
    }
    drop(per_queue);
    let succeeded = result.is_ok();
    let state = match result {
        Ok(out) => FutureState::Done(out),
        Err(e) => FutureState::Failed(e),
    };
    if !inner.futures.settle_metered(&job.id, state, &usage) && !usage.is_empty() {
        // No durable future to write it with (or the future was settled already, cancelled).
        if let Err(e) = inner.registry.db().add_usage(&usage) {
            tracing::warn!(request_id = %job.id, error = %e, "cannot meter a job's usage");
        }
    }
    // After the future: a crash in between finds the job settled, never a settled job's row
    // gone while its future says nothing.
    if let (Some(store), Some(seq)) = (&inner.journal, job.seq) {
        settle_journaled(store.as_ref(), job, seq, succeeded);
    }
}

/// Updates the journal for a settled job: a `forward_backward` that succeeded is kept (its
/// gradients are in memory only) until a job that consumes or replaces its run's gradients
/// (optim_step, load, create) succeeds; every other job is forgotten. (A step that discards
/// them instead, refused or rolled back, forgets them itself.)
fn settle_journaled(store: &dyn Store, job: &Job, seq: i64, succeeded: bool) {
    let keep = succeeded && job.work.accumulates_gradients();
    let mut settled = store.settle_job(seq, keep);
    if succeeded && job.work.replaces_gradients() {
        let queue = crate::journal::queue_json(&job.queue);
        settled = settled.and_then(|()| store.forget_done_jobs(&queue, seq));
    }
    if let Err(e) = settled {
        tracing::warn!(request_id = %job.id, error = %e, "cannot settle a journaled job");
    }
}

/// A `forward_backward` run again after a crash to rebuild its run's gradients finished: its
/// row is done, its restarts count from 0 again. One that failed leaves them partial: the
/// run's next step is refused (`gradients_lost`), as without the journal.
fn rebuilt(inner: &Inner, job: &Job, failed: Option<EngineError>) {
    let Some(err) = failed else {
        if let (Some(store), Some(seq)) = (&inner.journal, job.seq) {
            if let Err(e) = store.settle_job(seq, true) {
                tracing::warn!(request_id = %job.id, error = %e, "cannot settle a journaled job");
            }
        }
        return;
    };
    tracing::error!(request_id = %job.id, error = %err, "a journaled forward_backward failed to run again; its run's gradients are lost");
    let QueueKey::Model(k) = &job.queue else {
        return;
    };
    if let Ok(entry) = inner.registry.model(&k.tenant, &k.model_id) {
        entry.lock().gradients_lost = true;
        if let Err(e) = write_marker(&inner.registry, &entry, LOST_MARKER) {
            tracing::warn!(model_id = %k.model_id, error = %e, "cannot mark pending gradients");
        }
    }
}

/// What a job that succeeded metered (see [`crate::usage`]), written with its future's outcome.
/// A store that refuses it is logged: the client's result matters more than its meter.
fn usage_of(job: &Job, out: &Output) -> Vec<crate::usage::UsageRow> {
    crate::usage::job_usage(
        job.queue.tenant(),
        job.queue.id(),
        &job.work,
        out,
        unix_now(),
    )
}

/// Records the sequences of a finished sampling job that asked for it (`record_stability_info`)
/// before its future settles, so any sequence id the client sees can be trained on.
fn record_samples(inner: &Inner, job: &Job, out: Output) -> Result<Output> {
    let (
        Work::Sample {
            prompt,
            record_stability: true,
            ..
        },
        Output::Sample(sample),
    ) = (&job.work, &out)
    else {
        return Ok(out);
    };
    let now = unix_now();
    let rows: Vec<SampleRow> = sample
        .sequences
        .iter()
        .enumerate()
        .map(|(i, seq)| SampleRow {
            tenant: job.queue.tenant().to_string(),
            id: format!("{}:{i}", job.id),
            sampler: job.queue.id().to_string(),
            prompt: prompt.clone(),
            tokens: seq.tokens.clone(),
            // The behaviour policy: what each token was drawn from (temperature, top-k, top-p).
            logprobs: seq.drawn_logprobs.clone(),
            used: now,
        })
        .collect();
    inner.registry.db().put_samples(job.queue.tenant(), &rows)?;
    Ok(out)
}

/// How long after a restart a retry finds its first attempt's job by its replay key (the
/// idempotency layer's own memory of responses lasts as long).
const JOURNALED_KEYS_KEPT: Duration = Duration::from_secs(15 * 60);

/// How often a shutdown looks whether the workers have drained the queue.
const DRAIN_POLL: Duration = Duration::from_millis(20);

/// How often (in reaper rounds) recorded samples past their day or their tenant's limit are
/// forgotten: every minute.
const PURGE_SAMPLES_EVERY: u32 = 12;

/// How often expired checkpoints are looked for.
const REAP_EVERY: Duration = Duration::from_secs(5);

/// Deletes expired checkpoints every [`REAP_EVERY`] and forgets recorded samples past their
/// day or their tenant's limit every [`PURGE_SAMPLES_EVERY`] rounds, on its own thread (workers
/// may be idle for hours, and deleting files is no scheduler work), until the engine is dropped
/// or closed.
fn reap_checkpoints(inner: std::sync::Weak<Inner>) {
    for round in 1u32.. {
        std::thread::sleep(REAP_EVERY);
        let Some(inner) = inner.upgrade() else {
            return;
        };
        if lock(&inner.sched).is_closed() {
            return;
        }
        let _ = catch_unwind(AssertUnwindSafe(|| {
            let now = crate::registry::unix_now();
            inner.registry.expire_checkpoints(now);
            if round % PURGE_SAMPLES_EVERY == 0 {
                let expired = now - RECORDED_SAMPLE_TTL.as_secs_f64();
                if let Err(e) = inner
                    .registry
                    .db()
                    .purge_samples(expired, inner.max_recorded_samples)
                {
                    tracing::warn!(error = %e, "could not forget recorded samples");
                }
                let too_old = now - AUDIT_KEPT.as_secs_f64();
                if let Err(e) = inner.registry.db().purge_audit(too_old) {
                    tracing::warn!(error = %e, "could not forget old audit entries");
                }
            }
        }));
    }
}

/// Runs a batch, containing panics: after a panic every job is retried alone.
fn run_contained(backend: &mut dyn Backend, batch: &[Job]) -> Vec<Result<Output>> {
    match catch_unwind(AssertUnwindSafe(|| backend.run(batch))) {
        Ok(results) if results.len() == batch.len() => results,
        _ => {
            tracing::error!(
                jobs = batch.len(),
                "batch panicked; retrying its jobs alone"
            );
            batch
                .iter()
                .map(|job| {
                    catch_unwind(AssertUnwindSafe(|| backend.run(std::slice::from_ref(job))))
                        .ok()
                        .and_then(|mut r| r.pop())
                        .unwrap_or_else(|| Err(EngineError::Internal("the job panicked".into())))
                })
                .collect()
        }
    }
}

/// Sampling jobs in a worker's decode loop.
#[derive(Default)]
struct LiveJobs {
    /// Each job, with when it joined the loop.
    jobs: HashMap<RequestId, (Job, Instant)>,
    /// Their sequences (rows).
    rows: usize,
    /// How many of them may grow to each length (`prompt + max_tokens`): the longest gives the
    /// loop's [`KvFootprint`].
    lengths: BTreeMap<usize, usize>,
    /// Their footprints' tokens (`num_samples × (prompt + max_tokens)` each) per tenant
    /// (tenants with none are absent), for fairness.
    kv_by_tenant: HashMap<TenantId, usize>,
    /// Jobs that left the loop since the scheduler last heard of it.
    ended: Vec<RequestId>,
    /// What the backend last said its loop holds ([`Backend::kv_tokens`]), as counted in the
    /// engine's totals.
    reported: KvHeld,
}

impl LiveJobs {
    /// Counts what `backend`'s loop holds now in `counters`' totals, in place of what it held
    /// when last asked.
    fn report_kv(&mut self, backend: &dyn Backend, counters: &Counters) {
        let now = backend.kv_tokens();
        let was = std::mem::replace(&mut self.reported, now);
        replace_share(&counters.kv_tokens_held, was.held, now.held);
        replace_share(&counters.kept_tokens, was.kept, now.kept);
    }

    /// What the loop's sequences may come to hold.
    fn footprint(&self) -> KvFootprint {
        KvFootprint {
            rows: self.rows,
            longest: self.lengths.last_key_value().map_or(0, |(n, _)| *n),
        }
    }

    /// Applies `change` to the jobs, moving the footprint counted in `counters` with it.
    fn changing<T>(&mut self, counters: &Counters, change: impl FnOnce(&mut Self) -> T) -> T {
        let before = self.footprint().tokens();
        let out = change(self);
        replace_share(
            &counters.kv_tokens_reserved,
            before,
            self.footprint().tokens(),
        );
        out
    }

    /// Adds `job`, counting its footprint in `counters` too.
    fn insert(&mut self, job: Job, counters: &Counters) {
        self.changing(counters, |live| live.add(job));
    }

    fn add(&mut self, job: Job) {
        let need = job.work.kv_footprint();
        self.rows += need.rows;
        *self.lengths.entry(need.longest).or_default() += 1;
        *self
            .kv_by_tenant
            .entry(job.queue.tenant().to_string())
            .or_default() += need.tokens();
        self.jobs.insert(job.id.clone(), (job, Instant::now()));
    }

    /// Removes job `id`, releasing its footprint in `counters` too.
    fn remove(&mut self, id: &RequestId, counters: &Counters) -> Option<Job> {
        self.changing(counters, |live| live.take(id))
    }

    fn take(&mut self, id: &RequestId) -> Option<Job> {
        let (job, _) = self.jobs.remove(id)?;
        let need = job.work.kv_footprint();
        self.rows -= need.rows;
        if let Some(n) = self.lengths.get_mut(&need.longest) {
            *n -= 1;
            if *n == 0 {
                self.lengths.remove(&need.longest);
            }
        }
        if let Some(held) = self.kv_by_tenant.get_mut(job.queue.tenant()) {
            *held -= need.tokens();
            if *held == 0 {
                self.kv_by_tenant.remove(job.queue.tenant());
            }
        }
        self.ended.push(id.clone());
        Some(job)
    }
}

/// Replaces one worker's share `was` of a total over all workers with `now` (added first, so the
/// total never drops below the other workers' shares).
fn replace_share(total: &AtomicU64, was: usize, now: usize) {
    total.fetch_add(now as u64, Ordering::Relaxed);
    total.fetch_sub(was as u64, Ordering::Relaxed);
}

/// A worker: takes batches from the scheduler and runs them on its backend. While its decode
/// loop holds sampling jobs it never waits: at each token boundary it lets waiting sampling jobs
/// join the loop, runs at most one batch of another class, then advances the loop one step.
fn worker_loop(inner: Arc<Inner>, mut backend: Box<dyn Backend>) {
    let mut last_purge = Instant::now();
    let mut live = LiveJobs::default();
    let mut idle = IdleRelease::new(inner.release_memory_after_idle);
    let mut share = TimeShare::default();
    loop {
        // Expired results are dropped between batches (outside the scheduler lock), so a busy
        // server purges as regularly as an idle one.
        if last_purge.elapsed() > Duration::from_secs(10) {
            inner.futures.purge(tokio::time::Instant::now());
            last_purge = Instant::now();
        }
        let mut release = false;
        let (joining, batch, stopping) = {
            let mut st = lock(&inner.sched);
            st.unmark_decoding(&std::mem::take(&mut live.ended));
            let stopping = st.decoding_to_stop(
                live.jobs.iter().map(|(id, (_, started))| (id, *started)),
                Instant::now(),
            );
            let (joining, batch) = loop {
                let limit = st.limits().queue_timeout;
                for job in st.expire(Instant::now()) {
                    let waited = job.enqueued.elapsed();
                    record(
                        &inner,
                        &job,
                        Err(EngineError::TimedOut {
                            waited_s: waited.as_secs_f64(),
                            limit_s: limit.as_secs_f64(),
                        }),
                    );
                }
                if !live.jobs.is_empty() {
                    let budget = st.limits().max_kv_tokens;
                    let other_due = share.other_due();
                    break st.next_at_step_boundary(
                        &live.kv_by_tenant,
                        live.footprint(),
                        budget,
                        other_due,
                    );
                }
                let wait = match st.next_batch_filled(Instant::now()) {
                    Ok(batch) if batch[0].work.class() == BatchClass::Sample => {
                        break (batch, Vec::new())
                    }
                    Ok(batch) => break (Vec::new(), batch),
                    Err(fill) => fill.map_or(Duration::from_millis(250), |d| {
                        d.min(Duration::from_millis(250))
                    }),
                };
                if st.is_closed() && st.queued() == 0 {
                    return;
                }
                // Jobs waiting (a batch filling up) or running on other workers count as work:
                // their tensors are about to be or being allocated.
                let busy = st.queued() > 0 || inner.counters.running.load(Ordering::Relaxed) > 0;
                if idle.due(Instant::now(), busy) {
                    release = true;
                    break (Vec::new(), Vec::new());
                }
                st = inner
                    .wake
                    .wait_timeout(st, wait)
                    .map(|(g, _)| g)
                    .unwrap_or_else(|e| e.into_inner().0);
            };
            st.mark_decoding(joining.iter().map(|j| j.id.clone()));
            (joining, batch, stopping)
        };
        if release {
            debug_assert!(joining.is_empty() && batch.is_empty() && stopping.is_empty());
            release_free_memory(&inner.counters);
            idle.released();
            continue;
        }
        let decoding = !stopping.is_empty() || !joining.is_empty() || !live.jobs.is_empty();
        idle.worked();
        if !stopping.is_empty() {
            stop_decoding(&inner, backend.as_mut(), &mut live, stopping);
        }
        if !joining.is_empty() {
            admit(&inner, backend.as_mut(), joining, &mut live);
        }
        if !batch.is_empty() {
            let started = Instant::now();
            run_batch(&inner, backend.as_mut(), batch);
            share.other_ran(started.elapsed(), !live.jobs.is_empty());
        }
        if !live.jobs.is_empty() {
            let started = Instant::now();
            decode_step(&inner, backend.as_mut(), &mut live);
            share.decode_ran(started.elapsed());
        }
        if decoding {
            live.report_kv(backend.as_ref(), &inner.counters);
        }
    }
}

/// How a worker whose decode loop is busy shares its time with other work (training, optimizer
/// steps, checkpoint I/O): after a batch of other work, the loop decodes for as long as that
/// batch took before the next one starts, so under steady load of both each gets half the
/// worker. One batch per token (as before) let a tenant training with one-second batches hold
/// every other tenant's samples to a token a second, and push them past `--max-sample-secs`.
#[derive(Default)]
struct TimeShare {
    /// Decode time still owed to the loop for the last batch of other work.
    owed: Duration,
}

impl TimeShare {
    /// Whether a batch of other work may run at this token boundary.
    fn other_due(&self) -> bool {
        self.owed.is_zero()
    }

    /// A batch of other work took `took`; `decoding`: the loop has sequences waiting on it.
    fn other_ran(&mut self, took: Duration, decoding: bool) {
        self.owed = if decoding { took } else { Duration::ZERO };
    }

    /// A decode step took `took`.
    fn decode_ran(&mut self, took: Duration) {
        self.owed = self.owed.saturating_sub(took);
    }
}

/// When a worker gives the C allocator's free memory back: once after each stretch of work,
/// when it has waited with nothing to do for `after` (tensors freed by a training step or a
/// decode batch otherwise stay resident in glibc's arenas until the next burst reuses them).
/// Work that starts sooner keeps its memory: the next step would fault the pages back in.
struct IdleRelease {
    after: Option<Duration>,
    /// Work ran since the last release.
    worked: bool,
    /// When this worker last found nothing to do with no other worker's job running.
    idle_since: Option<Instant>,
}

impl IdleRelease {
    fn new(after: Option<Duration>) -> Self {
        IdleRelease {
            after,
            worked: false,
            idle_since: None,
        }
    }

    /// The worker is about to run something (or a decode step).
    fn worked(&mut self) {
        self.worked = true;
        self.idle_since = None;
    }

    /// The worker has nothing to do at `now` (`busy`: jobs are queued, or running on another
    /// worker); whether memory is to be released now.
    fn due(&mut self, now: Instant, busy: bool) -> bool {
        let Some(after) = self.after.filter(|_| self.worked) else {
            return false;
        };
        if busy {
            self.idle_since = None;
            return false;
        }
        now.duration_since(*self.idle_since.get_or_insert(now)) >= after
    }

    /// Memory was released; the next release waits for more work.
    fn released(&mut self) {
        self.worked = false;
        self.idle_since = None;
    }
}

/// Gives the C allocator's free memory back to the system; counts and logs how much went.
fn release_free_memory(counters: &Counters) {
    let started = Instant::now();
    let before = loraloom_heap::resident_bytes();
    let gave = loraloom_heap::release_free_memory();
    let after = loraloom_heap::resident_bytes();
    let released = match (before, after) {
        (Some(b), Some(a)) => b.saturating_sub(a),
        _ => 0,
    };
    counters.memory_releases.fetch_add(1, Ordering::Relaxed);
    counters
        .memory_released_bytes
        .fetch_add(released, Ordering::Relaxed);
    tracing::debug!(
        gave,
        released_mib = released as f64 / (1u64 << 20) as f64,
        took_ms = started.elapsed().as_secs_f64() * 1e3,
        "idle: gave the allocator's free memory back"
    );
}

/// Marks a batch's jobs running (and logs their start order).
fn start_jobs(inner: &Inner, batch: &[Job]) {
    if let Some(store) = &inner.journal {
        // A job that crashes the server is found started at the restart (see
        // `journal::MAX_STARTS`).
        let seqs: Vec<i64> = batch.iter().filter_map(|j| j.seq).collect();
        if let Err(e) = store.count_job_starts(&seqs) {
            tracing::warn!(jobs = seqs.len(), error = %e, "cannot count journaled jobs' starts");
        }
    }
    inner
        .counters
        .running
        .fetch_add(batch.len() as u64, Ordering::Relaxed);
    for job in batch {
        inner.futures.set(&job.id, FutureState::Running);
        if let Some(log) = &inner.order_log {
            lock(log)
                .started
                .entry(job.queue.clone())
                .or_default()
                .push(job.id.clone());
        }
    }
}

/// Counts a batch's jobs and tokens.
fn count_batch(inner: &Inner, batch: &[Job], started: Instant) {
    let c = &inner.counters;
    metrics::histogram!(crate::metric::BATCH_SECONDS).record(started.elapsed().as_secs_f64());
    c.batches.fetch_add(1, Ordering::Relaxed);
    c.batched_jobs
        .fetch_add(batch.len() as u64, Ordering::Relaxed);
    c.max_batch.fetch_max(batch.len() as u64, Ordering::Relaxed);
    c.tokens.fetch_add(
        batch.iter().map(|j| j.work.tokens() as u64).sum(),
        Ordering::Relaxed,
    );
}

/// Records one job's outcome (and logs it).
fn finish_job(inner: &Inner, job: &Job, result: Result<Output>) {
    job.span.in_scope(|| match &result {
        Ok(_) => tracing::debug!(seconds = job.enqueued.elapsed().as_secs_f64(), "job done"),
        Err(e) => tracing::debug!(seconds = job.enqueued.elapsed().as_secs_f64(), error = %e, "job failed"),
    });
    record(inner, job, result);
    inner.counters.running.fetch_sub(1, Ordering::Relaxed);
}

/// Runs a batch of a class other than sampling to completion.
fn run_batch(inner: &Inner, backend: &mut dyn Backend, batch: Vec<Job>) {
    start_jobs(inner, &batch);
    let span = tracing::info_span!(
        "batch",
        kind = batch[0].work.name(),
        jobs = batch.len(),
        tokens = batch.iter().map(|j| j.work.tokens()).sum::<usize>()
    );
    let started = Instant::now();
    let results = span.in_scope(|| run_contained(backend, &batch));
    count_batch(inner, &batch, started);
    let mut keys: Vec<QueueKey> = Vec::with_capacity(batch.len());
    for (job, result) in batch.iter().zip(results) {
        finish_job(inner, job, result);
        if !keys.contains(&job.queue) {
            keys.push(job.queue.clone());
        }
    }
    lock(&inner.sched).finish(&keys, Instant::now());
    inner.wake.notify_all();
}

/// Adds sampling jobs to the worker's decode loop (prefilling their prompts).
fn admit(inner: &Inner, backend: &mut dyn Backend, jobs: Vec<Job>, live: &mut LiveJobs) {
    start_jobs(inner, &jobs);
    let span = tracing::info_span!("admit", jobs = jobs.len());
    let started = Instant::now();
    let admitted = span.in_scope(|| catch_unwind(AssertUnwindSafe(|| backend.admit(&jobs))));
    count_batch(inner, &jobs, started);
    let c = &inner.counters;
    let admitted = match admitted {
        Ok(a) if a.results.len() == jobs.len() => a,
        _ => {
            tracing::error!(jobs = jobs.len(), "admitting sampling jobs panicked");
            abort_decoding(inner, backend, live);
            for job in &jobs {
                // Marked decoding when they joined: unmarked with the loop's other ended jobs.
                live.ended.push(job.id.clone());
                finish_job(
                    inner,
                    job,
                    Err(EngineError::Internal("the job panicked".into())),
                );
            }
            return;
        }
    };
    c.prefills.fetch_add(admitted.prefills, Ordering::Relaxed);
    c.shared_prompts
        .fetch_add(admitted.shared_prompts, Ordering::Relaxed);
    c.prompt_tokens_reused
        .fetch_add(admitted.prompt_tokens_reused, Ordering::Relaxed);
    for (job, result) in jobs.into_iter().zip(admitted.results) {
        match result {
            Some(result) => {
                live.ended.push(job.id.clone());
                finish_job(inner, &job, result);
            }
            None => live.insert(job, c),
        }
    }
}

/// Advances the decode loop one token and records the jobs that ended.
fn decode_step(inner: &Inner, backend: &mut dyn Backend, live: &mut LiveJobs) {
    let started = Instant::now();
    let step = match catch_unwind(AssertUnwindSafe(|| backend.step())) {
        Ok(step) => step,
        Err(_) => {
            tracing::error!(jobs = live.jobs.len(), "a decode step panicked");
            abort_decoding(inner, backend, live);
            return;
        }
    };
    let c = &inner.counters;
    let took = started.elapsed();
    metrics::histogram!(crate::metric::DECODE_STEP_SECONDS).record(took.as_secs_f64());
    c.decode_ns
        .fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
    c.decode_steps.fetch_add(1, Ordering::Relaxed);
    c.decode_tokens
        .fetch_add(step.tokens as u64, Ordering::Relaxed);
    c.decode_steps_recorded
        .fetch_add(step.graphs.recorded, Ordering::Relaxed);
    c.decode_steps_replayed
        .fetch_add(step.graphs.replayed, Ordering::Relaxed);
    for id in &step.first_tokens {
        if let Some((job, _)) = live.jobs.get(id) {
            let waited = job.enqueued.elapsed();
            metrics::histogram!(crate::metric::FIRST_TOKEN_SECONDS).record(waited.as_secs_f64());
            c.first_tokens.fetch_add(1, Ordering::Relaxed);
            c.first_token_ns
                .fetch_add(waited.as_nanos() as u64, Ordering::Relaxed);
        }
    }
    // Before the jobs that ended settle: a stream closes with its job's last tokens in it.
    inner.futures.stream(step.streamed);
    for (id, result) in step.finished {
        if let Some(job) = live.remove(&id, &inner.counters) {
            finish_job(inner, &job, result);
        }
    }
    if backend.decoding() == 0 && !live.jobs.is_empty() {
        // The backend lost track of jobs (it must report every one it ends).
        abort_decoding(inner, backend, live);
    }
}

/// Drops sampling jobs from the decode loop between two steps (cancelled, over the time limit,
/// or shutdown) and fails each with its reason; the others go on decoding.
fn stop_decoding(
    inner: &Inner,
    backend: &mut dyn Backend,
    live: &mut LiveJobs,
    stopping: Vec<(RequestId, EngineError)>,
) {
    let ids: Vec<RequestId> = stopping.iter().map(|(id, _)| id.clone()).collect();
    let dropped = match catch_unwind(AssertUnwindSafe(|| backend.drop_decoding(&ids))) {
        Ok(dropped) => dropped,
        Err(_) => {
            tracing::error!(jobs = live.jobs.len(), "dropping sampling jobs panicked");
            abort_decoding(inner, backend, live);
            return;
        }
    };
    for id in dropped {
        let Some(job) = live.remove(&id, &inner.counters) else {
            continue;
        };
        let why = stopping
            .iter()
            .find(|(stopped, _)| *stopped == id)
            .map(|(_, why)| why.clone())
            // The backend gave up its whole loop (a failed removal).
            .unwrap_or_else(|| EngineError::Internal("sampling failed".into()));
        job.span
            .in_scope(|| tracing::info!(reason = why.kind(), "sampling job stopped"));
        finish_job(inner, &job, Err(why));
    }
}

/// Fails every job of the decode loop (after a panic, or jobs the backend lost).
fn abort_decoding(inner: &Inner, backend: &mut dyn Backend, live: &mut LiveJobs) {
    let _ = catch_unwind(AssertUnwindSafe(|| backend.abort_decoding()));
    let ids: Vec<RequestId> = live.jobs.keys().cloned().collect();
    for id in ids {
        if let Some(job) = live.remove(&id, &inner.counters) {
            finish_job(
                inner,
                &job,
                Err(EngineError::Internal("sampling failed".into())),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_is_released_once_per_stretch_of_work_after_the_idle_wait() {
        let second = Duration::from_secs(1);
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut idle = IdleRelease::new(Some(second));
        // Nothing ran yet: nothing to give back, however long the wait.
        assert!(!idle.due(at(0), false) && !idle.due(at(5_000), false));
        idle.worked();
        assert!(!idle.due(at(6_000), false), "the idle clock starts now");
        assert!(!idle.due(at(6_900), false));
        // Jobs queued or running elsewhere restart the clock.
        assert!(!idle.due(at(7_100), true));
        assert!(!idle.due(at(7_200), false));
        assert!(!idle.due(at(8_100), false));
        assert!(idle.due(at(8_200), false));
        idle.released();
        assert!(!idle.due(at(20_000), false), "once per stretch of work");
        idle.worked();
        assert!(!idle.due(at(21_000), false));
        assert!(idle.due(at(22_000), false));
        // Never, when not configured.
        let mut never = IdleRelease::new(None);
        never.worked();
        assert!(!never.due(at(0), false) && !never.due(at(100_000), false));
    }
}
