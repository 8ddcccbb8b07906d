//! The registry: training runs, sampling sessions and checkpoints, each owned by one tenant.
//!
//! Runs and sessions live in `DashMap`s; each entry's mutable state sits behind its own mutex,
//! so work on one run never waits on another run's lock.

use std::collections::HashSet;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use loraloom_model::{AdamState, CustomLoss, LoraAdapter, LoraSpec, LossParam};
use serde_json::json;

use crate::error::{EngineError, Result};
use crate::job::{CheckpointKind, ModelKey, SamplerKey};
use crate::store::{AuditRow, CheckpointRow, CustomLossRow, ModelRow, SamplerRow, Store};
use crate::usage::{hour_of, merge, CheckpointLife, UsageRow};

/// Seconds since the epoch.
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The trainable state of a run; `adapter` is `None` until its create job ran.
#[derive(Default)]
pub struct RunState {
    /// LoRA weights (and gradients).
    pub adapter: Option<LoraAdapter>,
    /// Adam moments, created at the first step.
    pub optimizer: Option<AdamState>,
    /// The weights were moved to the run's snapshot to free memory; the next job reloads them.
    pub evicted: bool,
    /// The run's snapshot is marked as holding unconsumed gradients (see [`PENDING_MARKER`]).
    pub pending_marked: bool,
    /// Gradients acknowledged before a restart were lost: the next optimizer step is refused.
    pub gradients_lost: bool,
    /// Where its state stands in the job journal, recorded with its snapshots.
    pub position: crate::journal::Position,
}

/// A file in a run's snapshot directory saying that `forward_backward` accumulated gradients
/// which no optimizer step has consumed. Gradients are persisted only by a graceful shutdown's
/// snapshot, so when a restarted run finds this marker (a crash) its next `optim_step` fails
/// instead of stepping with partial gradients.
pub const PENDING_MARKER: &str = "pending_gradients";

/// A file in a run's snapshot directory saying that gradients acknowledged before a restart
/// could not be given back (the job journal could not rebuild them, or they were lost before
/// the snapshot a graceful shutdown wrote): the run's next optimizer step is refused, which
/// removes it. Unlike [`PENDING_MARKER`], the journal's recovery never removes it; a snapshot
/// that replaces the directory carries the state on (a graceful shutdown's writes it again, or
/// its position says which gradients no journal answers for).
pub const LOST_MARKER: &str = "lost_gradients";

/// A training run.
pub struct ModelEntry {
    /// Owner and id.
    pub key: ModelKey,
    /// The base model's public name.
    pub base_model: String,
    /// The LoRA configuration it was created with.
    pub spec: LoraSpec,
    /// Free-form metadata from the client.
    pub user_metadata: serde_json::Value,
    /// Creation time (unix seconds).
    pub created: f64,
    /// Last time a job of this run finished.
    last_access: LastAccess,
    /// Set when the run is unloaded (before its snapshot is deleted): a job of it still running
    /// then deletes whatever snapshot it writes (see [`Registry::discard_if_removed`]).
    removed: std::sync::atomic::AtomicBool,
    state: Mutex<RunState>,
}

/// A last-access time (unix seconds, stored as bits so it updates without a lock).
#[derive(Debug)]
pub struct LastAccess(std::sync::atomic::AtomicU64);

impl LastAccess {
    /// Now.
    pub fn now() -> Self {
        LastAccess(std::sync::atomic::AtomicU64::new(unix_now().to_bits()))
    }

    /// Records an access now.
    pub fn touch(&self) {
        self.0
            .store(unix_now().to_bits(), std::sync::atomic::Ordering::Relaxed);
    }

    /// The last access (unix seconds).
    pub fn get(&self) -> f64 {
        f64::from_bits(self.0.load(std::sync::atomic::Ordering::Relaxed))
    }
}

/// `mutex`'s guard if no other thread holds it (a poisoned lock is taken over: its holder
/// panicked inside a contained job and the state is still the last consistent one).
fn try_lock<T>(mutex: &Mutex<T>) -> Option<MutexGuard<'_, T>> {
    match mutex.try_lock() {
        Ok(g) => Some(g),
        Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
        Err(std::sync::TryLockError::WouldBlock) => None,
    }
}

impl ModelEntry {
    /// Locks the run's state (held only by the worker running its job).
    pub fn lock(&self) -> MutexGuard<'_, RunState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The run's state if no other thread holds it.
    pub fn try_lock(&self) -> Option<MutexGuard<'_, RunState>> {
        try_lock(&self.state)
    }

    /// Records an access now.
    pub fn touch(&self) {
        self.last_access.touch()
    }

    /// Last access (unix seconds).
    pub fn last_access(&self) -> f64 {
        self.last_access.get()
    }
}

/// Where a sampling session's weights come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SamplerSource {
    /// The base model alone.
    Base,
    /// A checkpoint path (`tinker://<run>/<kind>/<name>`).
    Checkpoint(String),
}

/// A sampling session; its adapter is loaded on first use, and may be dropped again when idle
/// (the next use reloads it from its checkpoint).
pub struct SamplerEntry {
    /// Owner and id.
    pub key: SamplerKey,
    /// What it samples from.
    pub source: SamplerSource,
    /// Base model name.
    pub base_model: String,
    /// Last time it sampled.
    pub last_access: LastAccess,
    /// The run whose inflight weights it follows (`kind="inflight"`): each later inflight save
    /// of that run repoints it (stored, so it goes on following after a restart).
    pub inflight_of: Option<String>,
    state: Mutex<Option<LoraAdapter>>,
}

impl SamplerEntry {
    /// Locks the loaded adapter slot.
    pub fn lock(&self) -> MutexGuard<'_, Option<LoraAdapter>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The loaded adapter slot if no other thread holds it.
    pub fn try_lock(&self) -> Option<MutexGuard<'_, Option<LoraAdapter>>> {
        try_lock(&self.state)
    }
}

/// A saved checkpoint.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CheckpointRecord {
    /// Owner.
    pub tenant: String,
    /// The run it was saved from.
    pub model_id: String,
    /// State or sampler weights.
    pub kind: CheckpointKind,
    /// Its name within the run.
    pub name: String,
    /// `tinker://<run>/<kind>/<name>`.
    pub path: String,
    /// Directory on disk.
    pub dir: PathBuf,
    /// Creation time (unix seconds).
    pub created: f64,
    /// Bytes on disk.
    pub size_bytes: u64,
    /// The adapter's LoRA configuration.
    pub spec: LoraSpec,
    /// Saved for one sampling session (`save_weights_and_get_sampling_client`): not listed,
    /// not counted against checkpoint quotas, deleted with its session.
    #[serde(default)]
    pub ephemeral: bool,
    /// When it is deleted (unix seconds; `None`: kept until deleted).
    #[serde(default)]
    pub expires_at: Option<f64>,
    /// The client's metadata.
    #[serde(default)]
    pub user_metadata: Option<std::collections::BTreeMap<String, String>>,
    /// Published: every tenant may read it (load, sample, copy); only its owner changes it.
    #[serde(default)]
    pub public: bool,
    /// The save job that wrote it, so that the same save run again after a crash (which came
    /// before its future settled) finds its work done instead of "already exists".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub saved_by: Option<String>,
}

/// Fills `to` (absent) with the files of `from`: hard links, or copies where linking fails
/// (another filesystem). Written under a staging name and renamed, so `to` is whole or absent.
fn link_or_copy_dir(from: &Path, to: &Path) -> Result<()> {
    let io = |e: std::io::Error| EngineError::Internal(format!("copying a checkpoint: {e}"));
    let parent = to
        .parent()
        .ok_or_else(|| EngineError::Internal("a checkpoint directory has no parent".into()))?;
    std::fs::create_dir_all(parent).map_err(io)?;
    let staging = parent.join(format!(".copy-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir(&staging).map_err(io)?;
    let filled = (|| {
        for entry in std::fs::read_dir(from)? {
            let entry = entry?;
            if !entry.file_type()?.is_file() {
                continue;
            }
            let target = staging.join(entry.file_name());
            if std::fs::hard_link(entry.path(), &target).is_err() {
                std::fs::copy(entry.path(), &target)?;
                std::fs::File::open(&target)?.sync_all()?;
            }
        }
        // Durable before the record that points at it is written.
        std::fs::File::open(&staging)?.sync_all()?;
        std::fs::rename(&staging, to)?;
        std::fs::File::open(parent)?.sync_all()
    })();
    if let Err(e) = filled {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(io(e));
    }
    Ok(())
}

/// The path of a checkpoint, `tinker://<run>/<kind>/<name>` (what [`parse_checkpoint_path`]
/// reads).
pub fn checkpoint_path(model_id: &str, kind: CheckpointKind, name: &str) -> String {
    format!("tinker://{model_id}/{}/{name}", kind.segment())
}

/// The parts of a `tinker://<run>/<kind>/<name>` path.
pub fn parse_checkpoint_path(path: &str) -> Result<(String, CheckpointKind, String)> {
    let bad = || {
        EngineError::invalid(
            "path",
            format!("`{path}` is not a checkpoint path of the form tinker://<run>/(weights|sampler_weights|external_weights)/<name>"),
        )
    };
    let rest = path.strip_prefix("tinker://").ok_or_else(bad)?;
    let parts: Vec<&str> = rest.split('/').collect();
    let [run, kind, name] = parts.as_slice() else {
        return Err(bad());
    };
    let kind = match *kind {
        "weights" => CheckpointKind::State,
        "sampler_weights" => CheckpointKind::Sampler,
        "external_weights" => CheckpointKind::External,
        _ => return Err(bad()),
    };
    if run.is_empty() || name.is_empty() {
        return Err(bad());
    }
    Ok((run.to_string(), kind, name.to_string()))
}

/// Checks a client-chosen checkpoint name.
pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if ok {
        Ok(())
    } else {
        Err(EngineError::invalid(
            "path",
            format!("checkpoint name `{name}` must be 1-128 characters of [A-Za-z0-9_.-], not starting with '.'"),
        ))
    }
}

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

/// Every run, session and checkpoint; with a durable store, every change is written through.
pub struct Registry {
    data_dir: PathBuf,
    models: DashMap<ModelKey, Arc<ModelEntry>>,
    samplers: DashMap<SamplerKey, Arc<SamplerEntry>>,
    checkpoints: DashMap<(String, String), CheckpointRecord>,
    durable: Option<Arc<dyn Store>>,
    /// The database: the durable store, or a private in-memory one. Checkpoint rows, metered
    /// usage and recorded samples go here.
    db: Arc<dyn Store>,
    /// Sampling sessions one tenant may hold (0 = no limit).
    max_samplers_per_tenant: std::sync::atomic::AtomicUsize,
    /// Listed checkpoints one tenant may hold, and their bytes (0 = no limit).
    checkpoint_limits: std::sync::atomic::AtomicUsize,
    checkpoint_byte_limits: std::sync::atomic::AtomicU64,
    /// Seconds a session must have been unused before it is removed to make room.
    sampler_min_idle_s: std::sync::atomic::AtomicU64,
    /// Bytes of resident adapters (runs and sampling sessions) one tenant may hold (0 = no
    /// limit); workers evict beyond it after each batch.
    max_resident_bytes_per_tenant: std::sync::atomic::AtomicU64,
    /// Bytes of resident adapters all tenants together may hold (0 = no limit); workers evict
    /// beyond it after each batch, from the tenant holding the most first.
    max_resident_bytes: std::sync::atomic::AtomicU64,
    /// Checkpoints inflight sessions moved off while a worker still held those sessions
    /// (loading from them): deleted by [`Registry::sweep_left_checkpoints`] once nothing holds
    /// or uses them.
    left_behind: Mutex<Vec<LeftBehind>>,
    /// Custom losses in use, by id, with their owner (the database holds every one created).
    custom_losses: DashMap<String, (String, Arc<CustomLoss>)>,
}

/// A sampling session with nothing loaded yet, used now.
fn sampler_entry(
    key: SamplerKey,
    source: SamplerSource,
    base_model: &str,
    inflight_of: Option<&str>,
) -> Arc<SamplerEntry> {
    Arc::new(SamplerEntry {
        key,
        source,
        base_model: base_model.to_string(),
        last_access: LastAccess::now(),
        inflight_of: inflight_of.map(str::to_string),
        state: Mutex::new(None),
    })
}

/// A checkpoint inflight sessions moved off: (tenant, path, the sessions as they were).
type LeftBehind = (String, String, Vec<std::sync::Weak<SamplerEntry>>);

/// A resident adapter (see [`Registry::resident_adapters`]).
pub struct ResidentAdapter {
    /// Its owner.
    pub tenant: String,
    /// Bytes it holds ([`loraloom_model::LoraAdapter::resident_bytes`]).
    pub bytes: u64,
    /// Last time it was used (unix seconds).
    pub last_access: f64,
    /// The run or sampling session holding it.
    pub holder: Holder,
}

/// What holds a resident adapter.
pub enum Holder {
    /// A training run.
    Run(Arc<ModelEntry>),
    /// A sampling session.
    Sampler(Arc<SamplerEntry>),
}

/// Clone ids a sampling session hands out, the original's 0 included: the SDK numbers a clone's
/// requests from `1e9 * clone`, which must stay within an `i64`.
pub const SAMPLER_CLONES: u64 = 1_000_000_000;

/// A sampling session used this recently is never removed to make room for another.
pub const SAMPLER_MIN_IDLE: std::time::Duration = std::time::Duration::from_secs(60);

fn to_json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

impl Registry {
    /// An empty, in-memory registry keeping checkpoints under `data_dir/checkpoints`.
    pub fn new(data_dir: PathBuf) -> Self {
        Registry {
            data_dir,
            models: DashMap::new(),
            samplers: DashMap::new(),
            checkpoints: DashMap::new(),
            durable: None,
            db: Arc::new(
                crate::store::SqliteStore::in_memory().expect("an in-memory SQLite database"),
            ),
            max_samplers_per_tenant: std::sync::atomic::AtomicUsize::new(0),
            checkpoint_limits: std::sync::atomic::AtomicUsize::new(0),
            checkpoint_byte_limits: std::sync::atomic::AtomicU64::new(0),
            max_resident_bytes_per_tenant: std::sync::atomic::AtomicU64::new(0),
            max_resident_bytes: std::sync::atomic::AtomicU64::new(0),
            sampler_min_idle_s: std::sync::atomic::AtomicU64::new(SAMPLER_MIN_IDLE.as_secs()),
            left_behind: Mutex::new(Vec::new()),
            custom_losses: DashMap::new(),
        }
    }

    /// Limits the sampling sessions of each tenant to `n` (0 = no limit): registering one more
    /// first removes the tenant's least recently used idle sessions (unused for
    /// [`SAMPLER_MIN_IDLE`], not being loaded), with their ephemeral checkpoints.
    pub fn set_max_samplers_per_tenant(&self, n: usize) {
        self.max_samplers_per_tenant
            .store(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// Limits the bytes of resident adapters each tenant holds to `n` (0 = no limit): a run
    /// larger than that alone is refused at creation, and workers evict a tenant's least
    /// recently used idle runs and sessions beyond it after each batch.
    pub fn set_max_resident_bytes_per_tenant(&self, n: u64) {
        self.max_resident_bytes_per_tenant
            .store(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// See [`Registry::set_max_resident_bytes_per_tenant`].
    pub fn max_resident_bytes_per_tenant(&self) -> u64 {
        self.max_resident_bytes_per_tenant
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Limits the bytes of resident adapters all tenants together hold to `n` (0 = no limit):
    /// a run larger than that alone is refused at creation, and beyond it workers evict idle
    /// runs and sessions after each batch, the least recently used of the tenant holding the
    /// most first, so a tenant holding little keeps its adapters while others hold more.
    pub fn set_max_resident_bytes(&self, n: u64) {
        self.max_resident_bytes
            .store(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// See [`Registry::set_max_resident_bytes`].
    pub fn max_resident_bytes(&self) -> u64 {
        self.max_resident_bytes
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Every resident adapter no worker is using this instant: (tenant, bytes, last access,
    /// which). Entries a worker holds are skipped: they are in use and cannot be evicted.
    pub fn resident_adapters(&self) -> Vec<ResidentAdapter> {
        self.resident_adapters_of(None)
    }

    /// [`Registry::resident_adapters`] of one tenant, or of all (`None`); other tenants'
    /// entries are never locked.
    fn resident_adapters_of(&self, tenant: Option<&str>) -> Vec<ResidentAdapter> {
        let mine = |owner: &str| tenant.is_none_or(|t| t == owner);
        let runs = self
            .all_models()
            .into_iter()
            .filter(|e| mine(&e.key.tenant))
            .filter_map(|e| {
                let bytes = e.try_lock()?.adapter.as_ref()?.resident_bytes();
                Some(ResidentAdapter {
                    tenant: e.key.tenant.clone(),
                    bytes,
                    last_access: e.last_access(),
                    holder: Holder::Run(e),
                })
            });
        let samplers = self
            .all_samplers()
            .into_iter()
            .filter(|e| mine(&e.key.tenant))
            .filter_map(|e| {
                let bytes = e.try_lock()?.as_ref()?.resident_bytes();
                Some(ResidentAdapter {
                    tenant: e.key.tenant.clone(),
                    bytes,
                    last_access: e.last_access.get(),
                    holder: Holder::Sampler(e),
                })
            });
        runs.chain(samplers).collect()
    }

    /// Bytes of `tenant`'s resident adapters (all tenants' with `None`) that no worker is
    /// using this instant.
    pub fn resident_bytes(&self, tenant: Option<&str>) -> u64 {
        self.resident_adapters_of(tenant)
            .iter()
            .map(|r| r.bytes)
            .sum()
    }

    /// How long a session must have been unused before it may be removed to make room
    /// (default [`SAMPLER_MIN_IDLE`]).
    pub fn set_sampler_min_idle(&self, idle: std::time::Duration) {
        self.sampler_min_idle_s
            .store(idle.as_secs(), std::sync::atomic::Ordering::Relaxed);
    }

    /// A registry backed by `store`, reloaded from it (runs come back evicted: each run's first
    /// job reads its latest snapshot, or rebuilds it from its seed when it has none).
    pub fn durable(data_dir: PathBuf, store: Arc<dyn Store>) -> Result<Self> {
        let registry = Registry {
            durable: Some(store.clone()),
            db: store.clone(),
            ..Registry::new(data_dir)
        };
        for row in store.checkpoints()? {
            match serde_json::from_str::<CheckpointRecord>(&row.record_json) {
                Ok(record) => {
                    registry.checkpoints.insert((row.tenant, row.path), record);
                }
                Err(e) => {
                    tracing::error!(path = %row.path, error = %e, "unreadable checkpoint record")
                }
            }
        }
        for row in store.samplers()? {
            let source = row
                .checkpoint
                .map_or(SamplerSource::Base, SamplerSource::Checkpoint);
            let key = SamplerKey {
                tenant: row.tenant,
                sampler_id: row.sampler_id,
            };
            let inflight_of = row.inflight_of.as_deref();
            let entry = sampler_entry(key.clone(), source, &row.base_model, inflight_of);
            registry.samplers.insert(key, entry);
        }
        for row in store.models()? {
            let spec: LoraSpec = match serde_json::from_str(&row.spec_json) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(model_id = %row.model_id, error = %e, "unreadable run record");
                    continue;
                }
            };
            let key = ModelKey {
                tenant: row.tenant,
                model_id: row.model_id,
            };
            let metadata =
                serde_json::from_str(&row.metadata_json).unwrap_or(serde_json::Value::Null);
            let entry = Self::entry(key.clone(), &row.base_model, spec, metadata, row.created);
            entry.lock().evicted = true;
            registry.models.insert(key, entry);
        }
        Ok(registry)
    }

    /// Creates the custom loss `<session>:loss:<seq>` of `tenant` from the SDK's upload (see
    /// [`loraloom_model::custom_loss`]) and stores it before answering, so it survives a
    /// restart. Sent again with the same sequence number (a retry) it answers the same id; a
    /// different loss under a used sequence number is a conflict.
    pub fn create_custom_loss(
        &self,
        tenant: &str,
        session_id: &str,
        seq: u64,
        name: &str,
        params: Vec<LossParam>,
        graph: &serde_json::Value,
    ) -> Result<String> {
        let params_json =
            serde_json::to_string(&params).map_err(|e| EngineError::Internal(e.to_string()))?;
        let loss = CustomLoss::parse(name, params, graph)?;
        let id = format!("{session_id}:loss:{seq}");
        let row = CustomLossRow {
            id: id.clone(),
            tenant: tenant.to_string(),
            name: name.to_string(),
            params_json,
            graph_json: graph.to_string(),
            created: unix_now(),
        };
        let stored = self.db.put_custom_loss(&row)?;
        if (
            &stored.tenant,
            &stored.name,
            &stored.params_json,
            &stored.graph_json,
        ) != (&row.tenant, &row.name, &row.params_json, &row.graph_json)
        {
            return Err(EngineError::Conflict(format!(
                "custom_loss_seq_id {seq} of session {session_id} already names another loss"
            )));
        }
        self.custom_losses
            .insert(id.clone(), (tenant.to_string(), Arc::new(loss)));
        Ok(id)
    }

    /// The custom loss `id` of `tenant` (another tenant's is not found), read back from the
    /// database after a restart.
    pub fn custom_loss(&self, tenant: &str, id: &str) -> Result<Arc<CustomLoss>> {
        let not_found = || EngineError::NotFound {
            what: "custom loss".into(),
            id: id.to_string(),
        };
        if let Some(entry) = self.custom_losses.get(id) {
            return match entry.0 == tenant {
                true => Ok(entry.1.clone()),
                false => Err(not_found()),
            };
        }
        let row = self.db.custom_loss(tenant, id)?.ok_or_else(not_found)?;
        let params: Vec<LossParam> = serde_json::from_str(&row.params_json)
            .map_err(|e| EngineError::Internal(format!("stored custom loss {id}: {e}")))?;
        let graph: serde_json::Value = serde_json::from_str(&row.graph_json)
            .map_err(|e| EngineError::Internal(format!("stored custom loss {id}: {e}")))?;
        let loss = Arc::new(CustomLoss::parse(&row.name, params, &graph)?);
        self.custom_losses
            .insert(id.to_string(), (tenant.to_string(), loss.clone()));
        Ok(loss)
    }

    /// The durable store, if any.
    pub fn store(&self) -> Option<&Arc<dyn Store>> {
        self.durable.as_ref()
    }

    /// The database (the durable store, or the private in-memory one): where metered usage
    /// (see [`crate::usage`]) and recorded samples are written.
    pub fn db(&self) -> &Arc<dyn Store> {
        &self.db
    }

    /// The tenant's metered usage within `span` (unix seconds; whole hours): its jobs' usage,
    /// the lives of its gone checkpoints and those of its live ones until `now`, summed per
    /// hour, source and kind. A checkpoint that goes between the two reads is missing from this
    /// answer (never counted twice).
    pub fn metered_usage(&self, tenant: &str, span: Range<f64>, now: f64) -> Result<Vec<UsageRow>> {
        let mut rows = self
            .db
            .usage(tenant, hour_of(span.start)..hour_of(span.end))?;
        for life in self.db.checkpoint_lives(tenant, span.clone())? {
            rows.extend(life.usage(span.clone()));
        }
        for record in self.checkpoints.iter().filter(|r| r.tenant == tenant) {
            if let Some(life) = CheckpointLife::of(&record, now) {
                rows.extend(life.usage(span.clone()));
            }
        }
        Ok(merge(rows))
    }

    fn entry(
        key: ModelKey,
        base_model: &str,
        spec: LoraSpec,
        user_metadata: serde_json::Value,
        created: f64,
    ) -> Arc<ModelEntry> {
        Arc::new(ModelEntry {
            key,
            base_model: base_model.to_string(),
            spec,
            user_metadata,
            created,
            last_access: LastAccess::now(),
            removed: std::sync::atomic::AtomicBool::new(false),
            state: Mutex::new(RunState::default()),
        })
    }

    /// Every run (all tenants).
    pub fn all_models(&self) -> Vec<Arc<ModelEntry>> {
        self.models.iter().map(|e| e.value().clone()).collect()
    }

    /// Removes every run without a snapshot, except those in `creating` (their create is
    /// queued again), and returns them. Call it at start, after
    /// interrupted snapshot writes were recovered, when runs are snapshotted at every step: a
    /// run's create writes its first snapshot before it is acknowledged, so a run without one
    /// is a create that never finished (a crash while it was queued). Left registered, it would
    /// come back with fresh weights (not the checkpoint it was created from), and the client's
    /// retry would fail "already exists".
    pub fn remove_unfinished_runs(&self, creating: &HashSet<ModelKey>) -> Vec<ModelKey> {
        let unfinished: Vec<ModelKey> = self
            .models
            .iter()
            .filter(|e| !creating.contains(e.key()) && !self.snapshot_dir(e.key()).exists())
            .map(|e| e.key().clone())
            .collect();
        unfinished
            .into_iter()
            .filter(|key| match self.remove_model(&key.tenant, &key.model_id) {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(model_id = %key.model_id, error = %e, "cannot remove a run whose create never finished");
                    false
                }
            })
            .collect()
    }

    /// Where a run's latest state is kept between steps and across restarts.
    pub fn snapshot_dir(&self, key: &ModelKey) -> PathBuf {
        self.data_dir
            .join("runs")
            .join(hex(&key.tenant))
            .join(hex(&key.model_id))
    }

    /// Registers a new run (its adapter is built by its create job).
    pub fn add_model(
        &self,
        key: ModelKey,
        base_model: &str,
        spec: LoraSpec,
        user_metadata: serde_json::Value,
    ) -> Result<Arc<ModelEntry>> {
        let entry = Self::entry(key.clone(), base_model, spec, user_metadata, unix_now());
        match self.models.entry(key) {
            dashmap::mapref::entry::Entry::Occupied(o) => {
                return Err(EngineError::invalid(
                    "model_id",
                    format!("run `{}` already exists", o.key().model_id),
                ))
            }
            dashmap::mapref::entry::Entry::Vacant(v) => {
                v.insert(entry.clone());
            }
        }
        if let Some(store) = &self.durable {
            let row = ModelRow {
                tenant: entry.key.tenant.clone(),
                model_id: entry.key.model_id.clone(),
                base_model: entry.base_model.clone(),
                spec_json: to_json(&entry.spec),
                metadata_json: to_json(&entry.user_metadata),
                created: entry.created,
            };
            if let Err(e) = store.put_model(&row) {
                self.models.remove(&entry.key);
                return Err(e);
            }
        }
        Ok(entry)
    }

    /// The run `model_id` of `tenant`.
    pub fn model(&self, tenant: &str, model_id: &str) -> Result<Arc<ModelEntry>> {
        let key = ModelKey {
            tenant: tenant.to_string(),
            model_id: model_id.to_string(),
        };
        self.models
            .get(&key)
            .map(|e| e.value().clone())
            .ok_or_else(|| EngineError::NotFound {
                what: "model".into(),
                id: model_id.to_string(),
            })
    }

    /// Removes a run and its snapshot (its checkpoints stay).
    pub fn remove_model(&self, tenant: &str, model_id: &str) -> Result<()> {
        let key = ModelKey {
            tenant: tenant.to_string(),
            model_id: model_id.to_string(),
        };
        let (_, entry) = self
            .models
            .remove(&key)
            .ok_or_else(|| EngineError::NotFound {
                what: "model".into(),
                id: model_id.to_string(),
            })?;
        // Before the snapshot goes: a job of the run still running sees it after writing one.
        entry
            .removed
            .store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(store) = &self.durable {
            store.delete_model(tenant, model_id)?;
            // Its journaled gradients go with it (its unsettled jobs fail, and settle, alone).
            if let Err(e) = crate::journal::forget_gradients(store.as_ref(), &key) {
                tracing::warn!(model_id, error = %e, "cannot forget an unloaded run's journaled jobs");
            }
        }
        self.remove_snapshot(&key);
        Ok(())
    }

    /// Deletes an unloaded run's snapshot directory (a failure is logged: the run is gone
    /// either way).
    fn remove_snapshot(&self, key: &ModelKey) {
        let dir = self.snapshot_dir(key);
        if dir.exists() {
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                tracing::warn!(model_id = %key.model_id, error = %e, "cannot remove an unloaded run's snapshot");
            }
        }
    }

    /// Deletes the snapshot a job just wrote for `entry` if the run was unloaded meanwhile, so
    /// an unloaded run never leaves one behind (the unload marks the run before deleting its
    /// snapshot, and a writer checks the mark after writing: whichever comes second deletes).
    pub fn discard_if_removed(&self, entry: &ModelEntry) {
        // A run created again under the same id owns the directory now.
        if entry.removed.load(std::sync::atomic::Ordering::SeqCst)
            && !self.models.contains_key(&entry.key)
        {
            self.remove_snapshot(&entry.key);
        }
    }

    /// The tenant's runs, oldest first.
    pub fn models_of(&self, tenant: &str) -> Vec<Arc<ModelEntry>> {
        let mut out: Vec<Arc<ModelEntry>> = self
            .models
            .iter()
            .filter(|e| e.key().tenant == tenant)
            .map(|e| e.value().clone())
            .collect();
        out.sort_by(|a, b| a.created.total_cmp(&b.created).then(a.key.cmp(&b.key)));
        out
    }

    /// Number of runs (all tenants).
    pub fn model_count(&self) -> usize {
        self.models.len()
    }

    /// Registers a sampling session, within the tenant's limit (see
    /// [`Registry::set_max_samplers_per_tenant`]).
    pub fn add_sampler(
        &self,
        key: SamplerKey,
        source: SamplerSource,
        base_model: &str,
    ) -> Result<Arc<SamplerEntry>> {
        self.register_sampler(key, source, base_model, None)
    }

    /// [`Registry::add_sampler`], following run `inflight_of`'s inflight saves when given.
    fn register_sampler(
        &self,
        key: SamplerKey,
        source: SamplerSource,
        base_model: &str,
        inflight_of: Option<&str>,
    ) -> Result<Arc<SamplerEntry>> {
        self.make_room_for_sampler(&key.tenant)?;
        self.store_sampler(&key, &source, base_model, inflight_of)?;
        let entry = sampler_entry(key.clone(), source, base_model, inflight_of);
        self.samplers.insert(key, entry.clone());
        Ok(entry)
    }

    /// Writes a sampling session's row (when the registry keeps a store).
    fn store_sampler(
        &self,
        key: &SamplerKey,
        source: &SamplerSource,
        base_model: &str,
        inflight_of: Option<&str>,
    ) -> Result<()> {
        if let Some(store) = &self.durable {
            let checkpoint = match source {
                SamplerSource::Base => None,
                SamplerSource::Checkpoint(p) => Some(p.clone()),
            };
            store.put_sampler(&SamplerRow {
                tenant: key.tenant.clone(),
                sampler_id: key.sampler_id.clone(),
                checkpoint,
                base_model: base_model.to_string(),
                inflight_of: inflight_of.map(str::to_string),
            })?;
        }
        Ok(())
    }

    /// Registers an inflight sampling session of run `model_id` on the checkpoint just saved
    /// at `path`, and moves every earlier inflight session of that run onto it: they load it
    /// at their next sample (a sample already decoding finishes on the weights it began with).
    /// Checkpoints saved for those sessions alone, now unused, are deleted.
    pub fn add_inflight_sampler(
        &self,
        key: SamplerKey,
        path: &str,
        base_model: &str,
        model_id: &str,
    ) -> Result<()> {
        let following: Vec<Arc<SamplerEntry>> = self
            .samplers
            .iter()
            .filter(|e| {
                e.key().tenant == key.tenant
                    && e.inflight_of.as_deref() == Some(model_id)
                    && *e.key() != key
            })
            .map(|e| e.value().clone())
            .collect();
        let source = SamplerSource::Checkpoint(path.to_string());
        self.register_sampler(key.clone(), source.clone(), base_model, Some(model_id))?;
        let mut left: Vec<(String, std::sync::Weak<SamplerEntry>)> = Vec::new();
        for old in following {
            // Only a session still registered as it was (not removed meanwhile) moves.
            let Some(mut slot) = self.samplers.get_mut(&old.key) else {
                continue;
            };
            if !Arc::ptr_eq(&slot, &old) {
                continue;
            }
            self.store_sampler(&old.key, &source, base_model, Some(model_id))?;
            *slot = sampler_entry(old.key.clone(), source.clone(), base_model, Some(model_id));
            drop(slot);
            if let SamplerSource::Checkpoint(before) = &old.source {
                left.push((before.clone(), Arc::downgrade(&old)));
            }
        }
        if !left.is_empty() {
            let mut left_behind = self.left_behind.lock().unwrap_or_else(|e| e.into_inner());
            for (before, holder) in left {
                match left_behind
                    .iter_mut()
                    .find(|(t, p, _)| *t == key.tenant && *p == before)
                {
                    Some((_, _, holders)) => holders.push(holder),
                    None => left_behind.push((key.tenant.clone(), before, vec![holder])),
                }
            }
        }
        self.sweep_left_checkpoints();
        Ok(())
    }

    /// Deletes the checkpoints inflight sessions moved off, once no worker still holds one of
    /// those sessions and no session uses them (called at each inflight save and by the
    /// reaper).
    pub fn sweep_left_checkpoints(&self) {
        let ready: Vec<(String, String)> = {
            let mut left_behind = self.left_behind.lock().unwrap_or_else(|e| e.into_inner());
            let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut *left_behind)
                .into_iter()
                .partition(|(_, _, holders)| holders.iter().all(|h| h.strong_count() == 0));
            *left_behind = waiting;
            ready.into_iter().map(|(t, p, _)| (t, p)).collect()
        };
        for (_, path) in ready {
            if let Err(e) = self.remove_unused_ephemeral(&path) {
                tracing::warn!(%path, error = %e, "cannot delete a checkpoint inflight sessions left");
            }
        }
    }

    /// Deletes the checkpoint at `path` if it was saved for sampling sessions alone and none
    /// uses it any more. Its owner may be another tenant than the last session's: a published
    /// checkpoint is sampled by others, and the last of them to go deletes it.
    fn remove_unused_ephemeral(&self, path: &str) -> Result<()> {
        let owner = self
            .checkpoints
            .iter()
            .find(|r| r.ephemeral && r.path == path)
            .map(|r| r.tenant.clone());
        let Some(owner) = owner else {
            return Ok(());
        };
        let used = self
            .samplers
            .iter()
            .any(|e| matches!(&e.source, SamplerSource::Checkpoint(p) if p == path));
        if !used {
            self.remove_checkpoint(&owner, path)?;
        }
        Ok(())
    }

    /// Removes the tenant's least recently used idle sessions until one more fits its limit.
    fn make_room_for_sampler(&self, tenant: &str) -> Result<()> {
        let limit = self
            .max_samplers_per_tenant
            .load(std::sync::atomic::Ordering::Relaxed);
        if limit == 0 {
            return Ok(());
        }
        let mut mine: Vec<Arc<SamplerEntry>> = self
            .samplers
            .iter()
            .filter(|e| e.key().tenant == tenant)
            .map(|e| e.value().clone())
            .collect();
        if mine.len() < limit {
            return Ok(());
        }
        mine.sort_by(|a, b| a.last_access.get().total_cmp(&b.last_access.get()));
        let min_idle = self
            .sampler_min_idle_s
            .load(std::sync::atomic::Ordering::Relaxed);
        let idle_before = unix_now() - min_idle as f64;
        let mut excess = mine.len() + 1 - limit;
        for entry in mine {
            if excess == 0 {
                break;
            }
            if entry.last_access.get() > idle_before {
                break;
            }
            // A session a worker is loading or gathering right now stays.
            let Some(guard) = entry.try_lock() else {
                continue;
            };
            drop(guard);
            self.remove_sampler(&entry)?;
            excess -= 1;
        }
        if excess > 0 {
            return Err(EngineError::LimitReached(format!(
                "this tenant has {} sampling sessions, all used in the last {min_idle} s (limit {limit}, --max-samplers-per-tenant)",
                self.sampler_count(tenant),
            )));
        }
        Ok(())
    }

    /// Forgets a sampling session, and deletes its checkpoint when that was saved for it alone.
    fn remove_sampler(&self, entry: &SamplerEntry) -> Result<()> {
        if let Some(store) = &self.durable {
            store.delete_sampler(&entry.key.tenant, &entry.key.sampler_id)?;
        }
        self.samplers.remove(&entry.key);
        if let SamplerSource::Checkpoint(path) = &entry.source {
            // Inflight sessions share one: deleted with the last of them.
            self.remove_unused_ephemeral(path)?;
        }
        tracing::debug!(tenant = %entry.key.tenant, sampler_id = %entry.key.sampler_id, "removed an idle sampling session");
        Ok(())
    }

    /// Refuses to save over the checkpoint at `path` of `tenant` unless `overwrite`: checked when
    /// a save is submitted, and again when it runs (an earlier save of the same name may have
    /// been queued in between).
    pub fn check_overwrite(&self, tenant: &str, path: &str, overwrite: bool) -> Result<()> {
        if !overwrite && self.checkpoint(tenant, path).is_ok() {
            return Err(EngineError::invalid(
                "path",
                format!(
                    "checkpoint `{path}` already exists; save with overwrite=True to replace it"
                ),
            ));
        }
        Ok(())
    }

    /// How many listed checkpoints the tenant holds, and their bytes on disk.
    pub fn checkpoint_usage(&self, tenant: &str) -> (usize, u64) {
        let mine = self.checkpoints_of(tenant, None);
        (mine.len(), mine.iter().map(|c| c.size_bytes).sum())
    }

    /// Limits each tenant's listed checkpoints to `count` and `bytes` (0 = no limit), checked
    /// by [`Registry::check_checkpoint_quota`].
    pub fn set_checkpoint_limits(&self, count: usize, bytes: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        self.checkpoint_limits.store(count, Relaxed);
        self.checkpoint_byte_limits.store(bytes, Relaxed);
    }

    /// Refuses a listed save when the tenant's listed checkpoints reach their count or byte
    /// limit. Checked when a save is submitted and again when it runs, so saves queued while
    /// the tenant was under its limit do not all land past it.
    pub fn check_checkpoint_quota(&self, tenant: &str) -> Result<()> {
        use std::sync::atomic::Ordering::Relaxed;
        let count_limit = self.checkpoint_limits.load(Relaxed);
        let bytes_limit = self.checkpoint_byte_limits.load(Relaxed);
        if count_limit == 0 && bytes_limit == 0 {
            return Ok(());
        }
        let (count, bytes) = self.checkpoint_usage(tenant);
        if count_limit > 0 && count >= count_limit {
            return Err(EngineError::LimitReached(format!(
                "this tenant has {count} checkpoints (limit {count_limit}, --max-checkpoints-per-tenant); delete some first"
            )));
        }
        if bytes_limit > 0 && bytes >= bytes_limit {
            return Err(EngineError::LimitReached(format!(
                "this tenant's checkpoints hold {bytes} bytes (limit {bytes_limit}, --max-checkpoint-bytes-per-tenant); delete some first"
            )));
        }
        Ok(())
    }

    /// Sets (or, with `None`, clears) when the checkpoint at `path` of `tenant` expires.
    pub fn set_checkpoint_expiry(
        &self,
        tenant: &str,
        path: &str,
        expires_at: Option<f64>,
    ) -> Result<()> {
        let record = self.update_checkpoint(tenant, path, |record| {
            record.expires_at = expires_at;
            Ok(())
        })?;
        self.audit_checkpoint(
            &record,
            "checkpoint_ttl_set",
            tenant,
            json!({"expires_at": expires_at}),
        );
        Ok(())
    }

    /// Applies `change` to the checkpoint at `path` of `tenant` and stores the result, all
    /// under the record's map entry, so changes of one checkpoint (and its deletion) never
    /// overwrite each other.
    fn update_checkpoint(
        &self,
        tenant: &str,
        path: &str,
        change: impl FnOnce(&mut CheckpointRecord) -> Result<()>,
    ) -> Result<CheckpointRecord> {
        parse_checkpoint_path(path)?;
        let key = (tenant.to_string(), path.to_string());
        let mut entry = self
            .checkpoints
            .get_mut(&key)
            .ok_or_else(|| EngineError::NotFound {
                what: "checkpoint".into(),
                id: path.to_string(),
            })?;
        let mut record = entry.clone();
        change(&mut record)?;
        self.store_checkpoint(&record, None)?;
        *entry = record.clone();
        Ok(record)
    }

    /// Records a checkpoint just saved; one saved over a published checkpoint stays published
    /// (decided under the record's map entry, so a concurrent unpublish is not undone).
    pub fn add_saved_checkpoint(&self, record: CheckpointRecord) -> Result<()> {
        self.insert_checkpoint(record, true, None)
    }

    /// Deletes every checkpoint whose expiry is at or before `now` (unix seconds); returns how
    /// many.
    pub fn expire_checkpoints(&self, now: f64) -> usize {
        self.sweep_left_checkpoints();
        let expired: Vec<(String, String)> = self
            .checkpoints
            .iter()
            .filter(|r| r.expires_at.is_some_and(|t| t <= now))
            .map(|r| r.key().clone())
            .collect();
        let mut removed = 0;
        for (tenant, path) in expired {
            match self.remove_checkpoint(&tenant, &path) {
                Ok(record) => {
                    removed += 1;
                    self.audit_checkpoint(
                        &record,
                        "checkpoint_deleted",
                        "loraloom",
                        json!({"reason": "expired"}),
                    );
                    tracing::info!(%tenant, %path, "checkpoint expired and was deleted");
                }
                // Deleted meanwhile (by its owner, or another worker's sweep).
                Err(EngineError::NotFound { .. }) => {}
                Err(e) => tracing::warn!(%path, error = %e, "cannot delete an expired checkpoint"),
            }
        }
        removed
    }

    /// The tenant's sampling sessions.
    pub fn sampler_count(&self, tenant: &str) -> usize {
        self.samplers
            .iter()
            .filter(|e| e.key().tenant == tenant)
            .count()
    }

    /// The sampling sessions of `tenant`.
    pub fn samplers_of(&self, tenant: &str) -> Vec<Arc<SamplerEntry>> {
        self.samplers
            .iter()
            .filter(|e| e.key().tenant == tenant)
            .map(|e| e.value().clone())
            .collect()
    }

    /// Every sampling session (all tenants).
    pub fn all_samplers(&self) -> Vec<Arc<SamplerEntry>> {
        self.samplers.iter().map(|e| e.value().clone()).collect()
    }

    /// A new clone id of `tenant`'s sampling session `sampler_id` (an unpickled SDK client's,
    /// `join_sampling_session`): unique among its clients, restarts included.
    pub fn join_sampler(&self, tenant: &str, sampler_id: &str) -> Result<u64> {
        self.sampler(tenant, sampler_id)?;
        let clone = self.db.next_sampler_clone(tenant, sampler_id)?;
        if clone >= SAMPLER_CLONES {
            return Err(EngineError::LimitReached(format!(
                "sampling session {sampler_id} has handed out all {} clone ids; create another",
                SAMPLER_CLONES - 1
            )));
        }
        Ok(clone)
    }

    /// The session `sampler_id` of `tenant`.
    pub fn sampler(&self, tenant: &str, sampler_id: &str) -> Result<Arc<SamplerEntry>> {
        let key = SamplerKey {
            tenant: tenant.to_string(),
            sampler_id: sampler_id.to_string(),
        };
        self.samplers
            .get(&key)
            .map(|e| e.value().clone())
            .ok_or_else(|| EngineError::NotFound {
                what: "sampling session".into(),
                id: sampler_id.to_string(),
            })
    }

    /// Where a checkpoint of `tenant` lives on disk.
    pub fn checkpoint_dir(
        &self,
        tenant: &str,
        model_id: &str,
        kind: CheckpointKind,
        name: &str,
    ) -> PathBuf {
        self.data_dir
            .join("checkpoints")
            .join(hex(tenant))
            .join(hex(model_id))
            .join(kind.segment())
            .join(name)
    }

    /// Stores `record`'s row, with the life of the checkpoint it replaces (in one transaction).
    fn store_checkpoint(
        &self,
        record: &CheckpointRecord,
        replaced: Option<&CheckpointLife>,
    ) -> Result<()> {
        let row = CheckpointRow {
            tenant: record.tenant.clone(),
            path: record.path.clone(),
            record_json: to_json(record),
        };
        self.db.put_checkpoint(&row, replaced)
    }

    /// Records a written checkpoint (replacing one with the same path).
    pub fn add_checkpoint(&self, record: CheckpointRecord) -> Result<()> {
        self.insert_checkpoint(record, false, None)
    }

    /// Stores and records `record`, under its map entry; one it replaces keeps its `public`
    /// flag when `keep_public`, and its life is stored with the new row. Audited as created
    /// (a copy of `copied_from`, when given).
    fn insert_checkpoint(
        &self,
        mut record: CheckpointRecord,
        keep_public: bool,
        copied_from: Option<&str>,
    ) -> Result<()> {
        let key = (record.tenant.clone(), record.path.clone());
        let replaced = match self.checkpoints.entry(key) {
            dashmap::mapref::entry::Entry::Occupied(mut slot) => {
                if keep_public {
                    record.public = slot.get().public;
                }
                let replaced = CheckpointLife::of(slot.get(), unix_now());
                self.store_checkpoint(&record, replaced.as_ref())?;
                slot.insert(record.clone());
                true
            }
            dashmap::mapref::entry::Entry::Vacant(slot) => {
                self.store_checkpoint(&record, None)?;
                slot.insert(record.clone());
                false
            }
        };
        self.audit_checkpoint(
            &record,
            "checkpoint_created",
            &record.tenant,
            json!({"replaced": replaced, "copied_from": copied_from}),
        );
        Ok(())
    }

    /// The checkpoint at `path` if it belongs to `tenant`.
    pub fn checkpoint(&self, tenant: &str, path: &str) -> Result<CheckpointRecord> {
        parse_checkpoint_path(path)?;
        self.checkpoints
            .get(&(tenant.to_string(), path.to_string()))
            .map(|r| r.value().clone())
            .ok_or_else(|| EngineError::NotFound {
                what: "checkpoint".into(),
                id: path.to_string(),
            })
    }

    /// Appends an event to `owner`'s audit log (`GET /api/v1/audit`). An entry that cannot be
    /// stored is logged, and does not fail what it records.
    pub fn audit(&self, owner: &str, event: &str, details: serde_json::Value) {
        let row = AuditRow {
            tenant: owner.to_string(),
            at: unix_now(),
            event: event.to_string(),
            details_json: details.to_string(),
        };
        if let Err(e) = self.db.add_audit(&row) {
            tracing::error!(error = %e, tenant = owner, event, "cannot store an audit entry");
        }
    }

    /// Audits a checkpoint event of `record`'s owner, done by `actor`, with `extra` details.
    fn audit_checkpoint(
        &self,
        record: &CheckpointRecord,
        event: &str,
        actor: &str,
        extra: serde_json::Value,
    ) {
        if record.ephemeral {
            // Saved for one sampling session and deleted with it: not a listed checkpoint.
            return;
        }
        let mut details = json!({
            "actor": actor,
            "tinker_path": record.path,
            "model_id": record.model_id,
        });
        if let (Some(d), serde_json::Value::Object(more)) = (details.as_object_mut(), extra) {
            d.extend(more);
        }
        self.audit(&record.tenant, event, details);
    }

    /// [`Registry::readable_checkpoint`] for reading its weights (`purpose`: `load`, `copy`,
    /// `weights_info`): a read of a checkpoint another tenant published goes in its owner's
    /// audit log, naming the reader.
    pub fn read_checkpoint(
        &self,
        tenant: &str,
        path: &str,
        purpose: &str,
    ) -> Result<CheckpointRecord> {
        let record = self.readable_checkpoint(tenant, path)?;
        if record.tenant != tenant {
            self.audit_checkpoint(
                &record,
                "checkpoint_read",
                tenant,
                json!({"purpose": purpose}),
            );
        }
        Ok(record)
    }

    /// Deletes the checkpoint at `path` of `tenant` at its owner's request (audited).
    pub fn delete_checkpoint(&self, tenant: &str, path: &str) -> Result<()> {
        let record = self.remove_checkpoint(tenant, path)?;
        self.audit_checkpoint(
            &record,
            "checkpoint_deleted",
            tenant,
            json!({"reason": "requested"}),
        );
        Ok(())
    }

    /// The checkpoint at `path` if `tenant` may read it: its own, or one its owner published.
    pub fn readable_checkpoint(&self, tenant: &str, path: &str) -> Result<CheckpointRecord> {
        self.checkpoint(tenant, path).or_else(|e| {
            self.checkpoints
                .iter()
                .find(|r| r.public && r.path == path)
                .map(|r| r.value().clone())
                .ok_or(e)
        })
    }

    /// Publishes (or makes private again) the checkpoint at `path` of `tenant`; 409 when it
    /// already is.
    pub fn set_checkpoint_public(&self, tenant: &str, path: &str, public: bool) -> Result<()> {
        let record = self.update_checkpoint(tenant, path, |record| {
            if record.public == public {
                return Err(EngineError::Conflict(format!(
                    "checkpoint `{path}` is already {}",
                    if public { "public" } else { "private" }
                )));
            }
            record.public = public;
            Ok(())
        })?;
        let event = if public {
            "checkpoint_published"
        } else {
            "checkpoint_unpublished"
        };
        self.audit_checkpoint(&record, event, tenant, json!({}));
        Ok(())
    }

    /// Copies the checkpoint `source` (one `tenant` may read) to run `model_id` of `tenant`,
    /// same kind and name, as hard links where the filesystem allows (no bytes duplicated;
    /// deleting either leaves the other whole), expiring at `expires_at`.
    pub fn copy_checkpoint(
        &self,
        tenant: &str,
        source: &str,
        model_id: &str,
        expires_at: Option<f64>,
    ) -> Result<CheckpointRecord> {
        let from = self.read_checkpoint(tenant, source, "copy")?;
        let path = checkpoint_path(model_id, from.kind, &from.name);
        if self.checkpoint(tenant, &path).is_ok() {
            // Not a 409: the SDK retries those for minutes.
            return Err(EngineError::invalid(
                "model_seq_id",
                format!("checkpoint `{path}` already exists; copy into another slot"),
            ));
        }
        let dir = self.checkpoint_dir(tenant, model_id, from.kind, &from.name);
        link_or_copy_dir(&from.dir, &dir)?;
        let record = CheckpointRecord {
            tenant: tenant.to_string(),
            model_id: model_id.to_string(),
            path,
            dir,
            created: unix_now(),
            ephemeral: false,
            expires_at,
            public: false,
            saved_by: None,
            ..from
        };
        self.insert_checkpoint(record.clone(), false, Some(source))?;
        Ok(record)
    }

    /// Deletes the checkpoint at `path` of `tenant`: its record, then its files, and answers
    /// the record. Sampling sessions that already loaded it keep their weights; others can no
    /// longer load it.
    pub fn remove_checkpoint(&self, tenant: &str, path: &str) -> Result<CheckpointRecord> {
        parse_checkpoint_path(path)?;
        let key = (tenant.to_string(), path.to_string());
        let (_, record) = self
            .checkpoints
            .remove(&key)
            .ok_or_else(|| EngineError::NotFound {
                what: "checkpoint".into(),
                id: path.to_string(),
            })?;
        let ended = CheckpointLife::of(&record, unix_now());
        if let Err(e) = self.db.delete_checkpoint(tenant, path, ended.as_ref()) {
            self.checkpoints.insert(key, record);
            return Err(e);
        }
        if let Err(e) = std::fs::remove_dir_all(&record.dir) {
            tracing::warn!(path, error = %e, "cannot remove a deleted checkpoint's files");
        }
        Ok(record)
    }

    /// The tenant's listed checkpoints (of one run when given; ephemeral ones excluded), oldest
    /// first.
    pub fn checkpoints_of(&self, tenant: &str, model_id: Option<&str>) -> Vec<CheckpointRecord> {
        let mut out: Vec<CheckpointRecord> = self
            .checkpoints
            .iter()
            .filter(|r| {
                r.tenant == tenant && !r.ephemeral && model_id.is_none_or(|m| r.model_id == m)
            })
            .map(|r| r.value().clone())
            .collect();
        out.sort_by(|a, b| a.created.total_cmp(&b.created).then(a.path.cmp(&b.path)));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_paths_parse_like_the_sdk() {
        let (run, kind, name) =
            parse_checkpoint_path("tinker://s1:train:0/weights/step-3").unwrap();
        assert_eq!(
            (run.as_str(), kind, name.as_str()),
            ("s1:train:0", CheckpointKind::State, "step-3")
        );
        assert!(parse_checkpoint_path("tinker://a/b").is_err());
        assert!(parse_checkpoint_path("tinker://a/other/x").is_err());
        assert!(parse_checkpoint_path("file:///a/weights/x").is_err());
        assert!(validate_name("ok-name_1.0").is_ok());
        assert!(validate_name("../etc").is_err());
        assert!(validate_name("a/b").is_err());
    }

    /// A rank-2 spec of attention and MLP layers.
    fn small_spec() -> LoraSpec {
        LoraSpec {
            rank: 2,
            alpha: 4.0,
            seed: 0,
            train_attn: true,
            train_mlp: true,
            train_unembed: false,
        }
    }

    fn record(dir: &std::path::Path, name: &str, ephemeral: bool) -> CheckpointRecord {
        let dir = dir.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        CheckpointRecord {
            tenant: "t".into(),
            model_id: "run".into(),
            kind: CheckpointKind::Sampler,
            name: name.into(),
            path: format!("tinker://run/sampler_weights/{name}"),
            dir,
            created: unix_now(),
            size_bytes: 1,
            expires_at: None,
            user_metadata: None,
            spec: small_spec(),
            ephemeral,
            public: false,
            saved_by: None,
        }
    }

    #[test]
    fn a_replaced_or_deleted_checkpoint_keeps_what_it_metered() {
        use crate::usage::UsageKind;
        let dir = std::env::temp_dir().join(format!("loraloom-meter-{}", uuid::Uuid::new_v4()));
        let registry = Registry::new(dir.clone());
        let count = |kind| {
            let now = unix_now();
            registry
                .metered_usage("t", now - 7200.0..now + 3600.0, now)
                .unwrap()
                .iter()
                .filter(|r| r.kind == kind)
                .map(|r| r.amount)
                .sum::<f64>()
        };
        let mut one = record(&dir, "one", false);
        one.created -= 60.0;
        one.size_bytes = 3600;
        registry.add_checkpoint(one.clone()).unwrap();
        // A minute of 3600 bytes: 60 byte-hours, computed from the live record.
        assert!((count(UsageKind::Storage) - 60.0).abs() < 1.0);
        // Saved again under the same path: the first one's minute is settled, the second starts.
        registry
            .add_saved_checkpoint(record(&dir, "one", false))
            .unwrap();
        assert_eq!(count(UsageKind::Checkpoint), 2.0);
        assert!((count(UsageKind::Storage) - 60.0).abs() < 1.0);
        registry.remove_checkpoint("t", &one.path).unwrap();
        assert_eq!(count(UsageKind::Checkpoint), 2.0);
        // Unlisted checkpoints are not metered, and no one else sees the tenant's usage.
        registry.add_checkpoint(record(&dir, "eph", true)).unwrap();
        assert_eq!(count(UsageKind::Checkpoint), 2.0);
        let now = unix_now();
        assert!(registry
            .metered_usage("u", 0.0..now + 3600.0, now)
            .unwrap()
            .is_empty());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn expiry_is_audited_and_unlisted_checkpoints_are_not() {
        let dir = std::env::temp_dir().join(format!("loraloom-audit-{}", uuid::Uuid::new_v4()));
        let registry = Registry::new(dir.clone());
        let listed = record(&dir, "one", false);
        registry.add_checkpoint(listed.clone()).unwrap();
        registry.add_checkpoint(record(&dir, "eph", true)).unwrap();
        registry
            .set_checkpoint_expiry("t", &listed.path, Some(1.0))
            .unwrap();
        assert_eq!(registry.expire_checkpoints(2.0), 1);
        let log: Vec<(String, serde_json::Value)> = registry
            .db()
            .audit("t", 0.0..unix_now() + 1.0)
            .unwrap()
            .into_iter()
            .map(|r| (r.event, serde_json::from_str(&r.details_json).unwrap()))
            .collect();
        let events: Vec<&str> = log.iter().map(|(e, _)| e.as_str()).collect();
        assert_eq!(
            events,
            [
                "checkpoint_created",
                "checkpoint_ttl_set",
                "checkpoint_deleted"
            ]
        );
        assert_eq!(log[1].1["expires_at"], 1.0);
        assert_eq!(log[2].1["reason"], "expired");
        assert_eq!(log[2].1["tinker_path"], listed.path.as_str());
        assert!(registry
            .db()
            .audit("u", 0.0..unix_now() + 1.0)
            .unwrap()
            .is_empty());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_snapshot_written_after_its_run_was_unloaded_is_deleted() {
        let dir = std::env::temp_dir().join(format!("loraloom-unload-{}", uuid::Uuid::new_v4()));
        let registry = Registry::new(dir.clone());
        let key = ModelKey {
            tenant: "t".into(),
            model_id: "run".into(),
        };
        let spec = small_spec();
        let entry = registry
            .add_model(key.clone(), "base", spec, serde_json::Value::Null)
            .unwrap();
        let snapshot = registry.snapshot_dir(&key);
        std::fs::create_dir_all(&snapshot).unwrap();
        registry.discard_if_removed(&entry);
        assert!(snapshot.exists(), "a live run keeps its snapshot");
        registry.remove_model("t", "run").unwrap();
        assert!(!snapshot.exists());
        // A job of the run that was still running writes its snapshot after the unload.
        std::fs::create_dir_all(&snapshot).unwrap();
        std::fs::write(snapshot.join("adapter_model.safetensors"), b"late").unwrap();
        registry.discard_if_removed(&entry);
        assert!(!snapshot.exists(), "the late snapshot is deleted");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn an_inflight_save_moves_the_runs_inflight_sessions_and_frees_what_they_left() {
        let dir = std::env::temp_dir().join(format!("loraloom-inflight-{}", uuid::Uuid::new_v4()));
        let registry = Registry::new(dir.clone());
        let key = |id: &str| SamplerKey {
            tenant: "t".into(),
            sampler_id: id.into(),
        };
        let (w1, w2) = (record(&dir, "w1", true), record(&dir, "w2", true));
        registry.add_checkpoint(w1.clone()).unwrap();
        registry
            .add_inflight_sampler(key("a"), &w1.path, "base", "run")
            .unwrap();
        registry.add_checkpoint(w2.clone()).unwrap();
        registry
            .add_inflight_sampler(key("b"), &w2.path, "base", "run")
            .unwrap();
        for id in ["a", "b"] {
            let entry = registry.sampler("t", id).unwrap();
            assert_eq!(
                entry.source,
                SamplerSource::Checkpoint(w2.path.clone()),
                "{id}"
            );
            assert_eq!(entry.inflight_of.as_deref(), Some("run"));
        }
        assert!(
            registry.checkpoint("t", &w1.path).is_err(),
            "nothing uses w1 any more"
        );
        assert!(!w1.dir.exists());
        assert!(registry.checkpoint("t", &w2.path).is_ok());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_published_checkpoint_is_readable_by_all_and_copies_share_its_files() {
        let dir = std::env::temp_dir().join(format!("loraloom-publish-{}", uuid::Uuid::new_v4()));
        let registry = Registry::new(dir.clone());
        let one = record(&dir.join("src"), "one", false);
        std::fs::write(one.dir.join("adapter_model.safetensors"), b"weights").unwrap();
        registry.add_checkpoint(one.clone()).unwrap();
        assert!(registry.readable_checkpoint("u", &one.path).is_err());
        assert!(registry
            .set_checkpoint_public("u", &one.path, true)
            .is_err());
        registry
            .set_checkpoint_public("t", &one.path, true)
            .unwrap();
        assert!(matches!(
            registry.set_checkpoint_public("t", &one.path, true),
            Err(EngineError::Conflict(_))
        ));
        assert_eq!(
            registry.readable_checkpoint("u", &one.path).unwrap().tenant,
            "t"
        );
        assert!(
            registry.checkpoint("u", &one.path).is_err(),
            "readable, not owned"
        );
        let copy = registry
            .copy_checkpoint("u", &one.path, "u-run", None)
            .unwrap();
        assert_eq!((copy.tenant.as_str(), copy.public), ("u", false));
        assert_eq!(copy.path, "tinker://u-run/sampler_weights/one");
        registry.remove_checkpoint("t", &one.path).unwrap();
        let copied = std::fs::read(copy.dir.join("adapter_model.safetensors")).unwrap();
        assert_eq!(copied, b"weights", "the copy outlives its source");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn beyond_its_limit_a_tenant_loses_its_least_recently_used_idle_sessions() {
        let dir = std::env::temp_dir().join(format!("loraloom-reg-{}", uuid::Uuid::new_v4()));
        let registry = Registry::new(dir.clone());
        registry.set_max_samplers_per_tenant(2);
        registry.set_sampler_min_idle(std::time::Duration::ZERO);
        let session = |name: &str, checkpoint: &CheckpointRecord| {
            let key = SamplerKey {
                tenant: "t".into(),
                sampler_id: name.into(),
            };
            registry.add_checkpoint(checkpoint.clone()).unwrap();
            let source = SamplerSource::Checkpoint(checkpoint.path.clone());
            registry.add_sampler(key, source, "base").unwrap();
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        let (one, two, three) = (
            record(&dir, "one", true),
            record(&dir, "two", false),
            record(&dir, "three", true),
        );
        session("s1", &one);
        session("s2", &two);
        // Another tenant's sessions count only against its own limit.
        registry
            .add_sampler(
                SamplerKey {
                    tenant: "u".into(),
                    sampler_id: "x".into(),
                },
                SamplerSource::Base,
                "base",
            )
            .unwrap();
        session("s3", &three);
        assert_eq!(registry.sampler_count("t"), 2);
        assert!(registry.sampler("t", "s1").is_err(), "the oldest went");
        assert!(!one.dir.exists(), "with the checkpoint saved for it alone");
        assert!(registry.checkpoint("t", &one.path).is_err());
        assert_eq!(registry.sampler_count("u"), 1);
        // Ephemeral checkpoints are not listed.
        let listed: Vec<String> = registry
            .checkpoints_of("t", None)
            .into_iter()
            .map(|c| c.name)
            .collect();
        assert_eq!(listed, ["two"]);
        // s2's named checkpoint stays when s2 goes.
        session("s4", &record(&dir, "four", true));
        assert!(registry.sampler("t", "s2").is_err() && two.dir.exists());
        // Sessions used within the idle window are never removed: the limit refuses instead.
        registry.set_sampler_min_idle(std::time::Duration::from_secs(3600));
        let key = SamplerKey {
            tenant: "t".into(),
            sampler_id: "s5".into(),
        };
        let Err(err) = registry.add_sampler(key, SamplerSource::Base, "base") else {
            panic!("a sixth session fits a limit of 2 with none idle")
        };
        assert!(
            err.to_string().contains("--max-samplers-per-tenant"),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_published_ephemeral_checkpoint_goes_with_the_last_session_of_any_tenant() {
        let dir = std::env::temp_dir().join(format!("loraloom-eph-{}", uuid::Uuid::new_v4()));
        let registry = Registry::new(dir.clone());
        registry.set_max_samplers_per_tenant(1);
        registry.set_sampler_min_idle(std::time::Duration::ZERO);
        let key = |tenant: &str, id: &str| SamplerKey {
            tenant: tenant.into(),
            sampler_id: id.into(),
        };
        let shared = record(&dir, "shared", true);
        registry.add_checkpoint(shared.clone()).unwrap();
        registry
            .set_checkpoint_public("t", &shared.path, true)
            .unwrap();
        let source = SamplerSource::Checkpoint(shared.path.clone());
        registry
            .add_sampler(key("t", "own"), source.clone(), "base")
            .unwrap();
        registry
            .add_sampler(key("u", "other"), source, "base")
            .unwrap();
        // The owner's session goes first: u's session still samples the checkpoint.
        registry
            .add_sampler(key("t", "next"), SamplerSource::Base, "base")
            .unwrap();
        assert!(registry.sampler("t", "own").is_err() && shared.dir.exists());
        // The last session goes (another tenant's): so does the checkpoint.
        registry
            .add_sampler(key("u", "next"), SamplerSource::Base, "base")
            .unwrap();
        assert!(registry.sampler("u", "other").is_err());
        assert!(registry.checkpoint("t", &shared.path).is_err());
        assert!(!shared.dir.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
