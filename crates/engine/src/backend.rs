//! Executing a batch of jobs. [`Backend`] is the contract between the scheduler and the compute;
//! [`ModelWorker`] is the libtorch implementation. Each worker thread owns one `ModelWorker`
//! whose decoder shares the base weights with every other worker (shallow clones).

use std::collections::{BTreeMap, HashMap};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, MutexGuard};

use loraloom_model::checkpoint::{self, SaveRequest};
use loraloom_model::sample::Detokenize;
use loraloom_model::train::{check_custom_losses, validate_request};
use loraloom_model::{
    forward_backward, step_many, AdamState, Decoder, Device, Generation, GraphCounts, LoraAdapter,
    ModelError, RequestTag, SampleRequest, StepGraphs, StepJob, StreamedToken, TextTokenizer,
    TrainRequest,
};

use crate::error::{EngineError, Result};
use crate::job::{BatchClass, CheckpointKind, Job, ModelKey, Output, QueueKey, RequestId, Work};
use crate::journal::Position;
use crate::registry::{
    checkpoint_path, parse_checkpoint_path, unix_now, CheckpointRecord, Holder, ModelEntry,
    Registry, ResidentAdapter, RunState, SamplerSource, LOST_MARKER, PENDING_MARKER,
};

/// Runs batches of compatible jobs. Results come back in job order.
///
/// Sampling goes through a continuous decode loop instead: [`Backend::admit`] adds sampling
/// jobs to it at a token boundary and [`Backend::step`] advances every job in it by one token,
/// returning those that ended. The defaults run admitted jobs to completion at once (backends
/// without a decode loop).
pub trait Backend: Send {
    /// Executes `jobs` (all of one [`BatchClass`]), one result per job.
    fn run(&mut self, jobs: &[Job]) -> Vec<Result<Output>>;

    /// Adds sampling jobs to the decode loop. Per job: its result when it already ended (it
    /// failed validation, say), `None` when it is in progress.
    fn admit(&mut self, jobs: &[Job]) -> Admitted {
        Admitted {
            results: self.run(jobs).into_iter().map(Some).collect(),
            ..Admitted::default()
        }
    }

    /// One decode step of the jobs in progress.
    fn step(&mut self) -> DecodeStep {
        DecodeStep::default()
    }

    /// Sampling jobs in progress.
    fn decoding(&self) -> usize {
        0
    }

    /// Keys and values (tokens) the decode loop's caches hold room for, and those of finished
    /// sequences it keeps for later prompts.
    fn kv_tokens(&self) -> KvHeld {
        KvHeld::default()
    }

    /// Abandons every sampling job in progress (after a panic) and returns their ids.
    fn abort_decoding(&mut self) -> Vec<RequestId> {
        Vec::new()
    }

    /// Drops the sampling jobs `ids` from the decode loop between two steps, the others going
    /// on unchanged; returns the ids dropped (every job in progress when the loop had to be
    /// abandoned instead).
    fn drop_decoding(&mut self, ids: &[RequestId]) -> Vec<RequestId> {
        let _ = ids;
        Vec::new()
    }
}

/// What [`Backend::admit`] did.
#[derive(Debug, Default)]
pub struct Admitted {
    /// Per job: its result when it already ended, `None` when it is decoding.
    pub results: Vec<Option<Result<Output>>>,
    /// Prompts prefilled: one per distinct prompt and sampler among the jobs that joined
    /// (whatever their `num_samples`), none for a job that shared another's.
    pub prefills: u64,
    /// Jobs that joined without a prefill of their own (their prompt and sampler were those of
    /// another job that joined with them or of a live sequence) or from a shared prefix.
    pub shared_prompts: u64,
    /// Prompt tokens whose keys and values were copied instead of computed.
    pub prompt_tokens_reused: u64,
}

/// What one [`Backend::step`] did.
#[derive(Debug, Default)]
pub struct DecodeStep {
    /// Jobs that ended this step, with their results.
    pub finished: Vec<(RequestId, Result<Output>)>,
    /// Jobs whose first tokens were chosen this step.
    pub first_tokens: Vec<RequestId>,
    /// The tokens streamed jobs ([`Work::Sample`]'s `stream`) chose this step, per job.
    pub streamed: Vec<(RequestId, Vec<StreamedToken>)>,
    /// Tokens chosen (one per live sequence).
    pub tokens: usize,
    /// Whether the step was recorded or replayed as a CUDA graph (`--step-graphs`).
    pub graphs: GraphCounts,
}

/// What a decode loop holds in keys and values ([`Backend::kv_tokens`]).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct KvHeld {
    /// Tokens its caches hold room for, kept sequences aside.
    pub held: usize,
    /// Tokens of finished sequences it keeps for later prompts (its prefix cache).
    pub kept: usize,
}

/// Forward-pass floating-point operations per decoder layer under which a batch's CPU ops run
/// on the worker's thread alone. Below it the ops are too small for libtorch's intra-op threads
/// to pay: they are woken for every op and spin between ops, taking cores from the HTTP server
/// and from clients on the same machine, for little or no speed-up. Measured on 2 cores (the
/// tiny 4-layer model of `make bench`, and SmolLM2-135M): a decode step of 32 sequences of the
/// tiny model (3.5 MFLOP a layer) ran 11% faster on two threads in-process but its sampling
/// over HTTP 1.4x slower; a 135M decode step of one sequence (9 MFLOP a layer) took the same
/// time on one thread or two; of eight (72 MFLOP a layer) 25% less on two.
pub const SERIAL_BELOW_LAYER_FLOPS: f64 = 32e6;

/// The intra-op thread count for a batch of `layer_flops` forward-pass operations per decoder
/// layer on `device`, out of `all`: one below [`SERIAL_BELOW_LAYER_FLOPS`] on the CPU, else
/// `all` (on a GPU the threads serve only the few ops left on the CPU).
fn threads_for(layer_flops: f64, device: Device, all: i32) -> i32 {
    if device == Device::Cpu && layer_flops < SERIAL_BELOW_LAYER_FLOPS {
        1
    } else {
        all
    }
}

/// The decode loop of a [`ModelWorker`]: the generation and which job each request is.
struct Decoding {
    generation: Generation,
    jobs: HashMap<RequestTag, RequestId>,
    next_tag: RequestTag,
}

/// The libtorch backend.
pub struct ModelWorker {
    decoder: Decoder,
    registry: Arc<Registry>,
    tokenizer: Option<Arc<TextTokenizer>>,
    snapshot_every_step: bool,
    /// libtorch's intra-op thread count, read on the creating thread. OpenMP's setting is per
    /// thread: a fresh worker thread would otherwise run every op on one core.
    intra_op_threads: i32,
    /// The count this worker's thread runs with now (0: not set yet); see [`threads_for`].
    threads_now: i32,
    /// Floating-point operations of a forward pass per token and layer (twice the base's
    /// parameters over its layers): how big a batch's ops are, for [`SERIAL_BELOW_LAYER_FLOPS`].
    layer_flops_per_token: f64,
    max_resident: usize,
    max_resident_samplers: usize,
    /// Activation memory one training or scoring pass may hold, in bytes.
    memory_budget: u64,
    decoding: Decoding,
}

impl ModelWorker {
    /// A worker over its own (shallow) copy of the decoder.
    pub fn new(
        decoder: Decoder,
        registry: Arc<Registry>,
        tokenizer: Option<Arc<TextTokenizer>>,
    ) -> Self {
        let kind = decoder.kind();
        let layer_flops_per_token =
            2.0 * decoder.active_parameters() as f64 / decoder.config().num_layers.max(1) as f64;
        ModelWorker {
            decoder,
            registry,
            tokenizer,
            snapshot_every_step: false,
            intra_op_threads: loraloom_model::intra_op_threads(),
            threads_now: 0,
            layer_flops_per_token,
            max_resident: 0,
            max_resident_samplers: 0,
            memory_budget: loraloom_model::NO_LIMIT,
            decoding: Decoding {
                generation: Generation::new(kind),
                jobs: HashMap::new(),
                next_tag: 0,
            },
        }
    }

    /// Also writes each run's state (adapter + optimizer) to its snapshot directory after every
    /// optimizer step, before the step is acknowledged, so a crash loses no acknowledged step.
    pub fn with_step_snapshots(mut self, on: bool) -> Self {
        self.snapshot_every_step = on;
        self
    }

    /// Keeps at most `n` runs' weights in memory (0 = no limit): after each batch the least
    /// recently used idle runs are written to their snapshots and dropped; their next job reloads
    /// them.
    pub fn with_max_resident(mut self, n: usize) -> Self {
        self.max_resident = n;
        self
    }

    /// Runs each `forward_backward` / `forward` batch in micro-batches whose activations fit
    /// `bytes` (see [`loraloom_model::memory`]); the default never splits.
    pub fn with_memory_budget(mut self, bytes: u64) -> Self {
        self.memory_budget = bytes;
        self
    }

    /// Keeps at most `n` sampling sessions' checkpoint weights loaded (0 = no limit): after each
    /// batch the least recently used idle ones are dropped; their next sample reloads them.
    pub fn with_max_resident_samplers(mut self, n: usize) -> Self {
        self.max_resident_samplers = n;
        self
    }

    /// Records and replays decode steps as CUDA graphs ([`StepGraphs`]); the default issues
    /// them operation by operation.
    pub fn with_step_graphs(mut self, graphs: StepGraphs) -> Self {
        self.configure_generation(|g| g.with_step_graphs(graphs));
        self
    }

    /// Keeps the keys and values of up to `tokens` tokens of finished sequences for later
    /// prompts that start with them (the next turn of a conversation); 0 keeps none.
    pub fn with_prefix_cache(mut self, tokens: usize) -> Self {
        self.configure_generation(|g| g.with_prefix_cache(tokens));
        self
    }

    /// Bounds the keys and values (tokens) the decode loop holds, its kept sequences included:
    /// the engine's `max_kv_tokens`, under which it admits requests by the loop's footprint.
    pub fn with_kv_budget(mut self, tokens: usize) -> Self {
        self.configure_generation(|g| g.with_kv_budget(tokens));
        self
    }

    /// Applies `configure` to the (empty) decode loop.
    fn configure_generation(&mut self, configure: impl FnOnce(Generation) -> Generation) {
        let empty = Generation::new(self.decoder.kind());
        let generation = std::mem::replace(&mut self.decoding.generation, empty);
        self.decoding.generation = configure(generation);
    }

    /// Drops the loaded weights of the least recently used idle sampling sessions beyond
    /// `max_resident_samplers` (sessions locked by another worker stay).
    fn evict_idle_samplers(&self) {
        if self.max_resident_samplers == 0 {
            return;
        }
        let mut loaded: Vec<Arc<crate::registry::SamplerEntry>> = self
            .registry
            .all_samplers()
            .into_iter()
            // Only weights that can be reloaded: a deleted checkpoint's sessions keep theirs.
            .filter(|e| self.sampler_reloadable(e))
            .filter(|e| e.try_lock().is_some_and(|slot| slot.is_some()))
            .collect();
        if loaded.len() <= self.max_resident_samplers {
            return;
        }
        loaded.sort_by(|a, b| a.last_access.get().total_cmp(&b.last_access.get()));
        let excess = loaded.len() - self.max_resident_samplers;
        for entry in loaded.into_iter().take(excess) {
            if let Some(mut slot) = entry.try_lock() {
                *slot = None;
            }
        }
    }

    /// Reloads an evicted run's weights before a job uses them (after a restart every run starts
    /// evicted). A snapshot marked as holding unconsumed gradients means they were lost.
    fn make_resident(&self, entry: &ModelEntry, state: &mut RunState) -> Result<()> {
        if state.adapter.is_none() && state.evicted {
            let (adapter, optimizer) = self.snapshot_or_fresh(entry)?;
            state.adapter = Some(adapter);
            state.optimizer = optimizer;
            state.evicted = false;
            let dir = self.registry.snapshot_dir(&entry.key);
            state.position = Position::of_snapshot(&dir);
            let marked = dir.join(PENDING_MARKER).exists();
            state.pending_marked = marked;
            // A pending marker the journal did not answer for (it removes those whose gradients
            // it rebuilds) or a lost one.
            state.gradients_lost = marked || dir.join(LOST_MARKER).exists();
            let restored = state
                .adapter
                .as_ref()
                .is_some_and(LoraAdapter::has_pending_gradients);
            // Lost for good: no later restart's journal answers for them (nor for gradients
            // restored from a snapshot no journal position covers, once their file is gone:
            // the position remembers them until a step consumes them, through graceful
            // restarts too).
            let unjournaled =
                restored && (state.position.gradients == 0 || state.position.unjournaled);
            state.position.unjournaled = unjournaled;
            if self.snapshot_every_step && (marked || unjournaled) {
                if let Err(e) = write_marker(&self.registry, entry, LOST_MARKER) {
                    tracing::warn!(model_id = %entry.key.model_id, error = %e, "cannot mark lost gradients");
                }
            }
            if restored {
                // Gradients a graceful shutdown saved are in memory now, where later jobs add to
                // or consume them: on disk they stand for them no longer. Marked first (durable
                // mode), so a crash from here on refuses the next step instead of stepping on
                // stale gradients.
                if !marked {
                    self.mark_pending(entry, state);
                }
                forget_saved_gradients(&self.registry, entry);
            }
        }
        Ok(())
    }

    /// Records in the run's snapshot directory, before a `forward_backward` is acknowledged, that
    /// the run holds gradients no optimizer step has consumed (durable mode only).
    fn mark_pending(&self, entry: &ModelEntry, state: &mut RunState) {
        if !self.snapshot_every_step || state.pending_marked {
            return;
        }
        match write_marker(&self.registry, entry, PENDING_MARKER) {
            Ok(()) => state.pending_marked = true,
            Err(e) => {
                tracing::warn!(model_id = %entry.key.model_id, error = %e, "cannot mark pending gradients")
            }
        }
    }

    /// Evicts least recently used idle runs until at most `max_resident` hold weights. Runs with
    /// gradients waiting for an optimizer step, or locked by another worker, stay.
    fn evict_idle(&self) {
        if self.max_resident == 0 {
            return;
        }
        let mut resident: Vec<Arc<ModelEntry>> = self
            .registry
            .all_models()
            .into_iter()
            .filter(|e| e.try_lock().is_some_and(|s| s.adapter.is_some()))
            .collect();
        if resident.len() <= self.max_resident {
            return;
        }
        resident.sort_by(|a, b| a.last_access().total_cmp(&b.last_access()));
        let excess = resident.len() - self.max_resident;
        for entry in resident.into_iter().take(excess) {
            self.evict_run(&entry);
        }
    }

    /// Writes an idle run to its snapshot and drops its weights and optimizer state; its next
    /// job reloads them. Runs with gradients waiting for an optimizer step, or locked by another
    /// worker, stay. Whether it was evicted.
    fn evict_run(&self, entry: &ModelEntry) -> bool {
        let Some(mut state) = entry.try_lock() else {
            return false;
        };
        let Some(adapter) = state.adapter.as_ref() else {
            return false;
        };
        if adapter.has_pending_gradients() || state.gradients_lost {
            return false;
        }
        match snapshot(&self.registry, entry, &state) {
            Ok(()) => {
                state.adapter = None;
                state.optimizer = None;
                state.evicted = true;
                tracing::debug!(model_id = %entry.key.model_id, "evicted an idle run to disk");
                true
            }
            Err(e) => {
                tracing::warn!(model_id = %entry.key.model_id, error = %e, "cannot evict a run");
                false
            }
        }
    }

    /// Evicts idle runs and sampling sessions while resident adapters take more than the
    /// limits: first each tenant's least recently used beyond `--max-resident-bytes-per-tenant`,
    /// then, while all tenants together hold more than `--max-resident-bytes`, the least
    /// recently used of the tenant holding the most (the next tenant's only when that one has
    /// nothing idle left to evict). In the first pass a session whose checkpoint was deleted
    /// is dropped as well: its next sample then fails not-found (nothing can reload it),
    /// instead of it holding its tenant's memory for good; the second pass keeps such sessions.
    fn evict_over_resident_limits(&self) {
        let per_tenant = self.registry.max_resident_bytes_per_tenant();
        let overall = self.registry.max_resident_bytes();
        if per_tenant == 0 && overall == 0 {
            return;
        }
        // Per tenant: what it holds and its adapters not yet tried, least recently used last
        // (popped first).
        let mut by_tenant: BTreeMap<String, (u64, Vec<ResidentAdapter>)> = BTreeMap::new();
        for adapter in self.registry.resident_adapters() {
            let (held, adapters) = by_tenant.entry(adapter.tenant.clone()).or_default();
            *held += adapter.bytes;
            adapters.push(adapter);
        }
        for (_, adapters) in by_tenant.values_mut() {
            adapters.sort_by(|a, b| b.last_access.total_cmp(&a.last_access));
        }
        if per_tenant > 0 {
            for (tenant, (held, adapters)) in &mut by_tenant {
                while *held > per_tenant {
                    let Some(adapter) = adapters.pop() else {
                        tracing::debug!(%tenant, held, per_tenant, "a tenant's busy adapters stay above its resident limit");
                        break;
                    };
                    if self.evict_adapter(&adapter) {
                        *held -= adapter.bytes;
                    }
                }
            }
        }
        let mut total: u64 = by_tenant.values().map(|(held, _)| held).sum();
        while overall > 0 && total > overall {
            // Among tenants holding as much, the one with the least recently used adapter.
            let most = by_tenant
                .values_mut()
                .filter_map(|(held, adapters)| {
                    let oldest = adapters.last()?.last_access;
                    Some((held, adapters, oldest))
                })
                .max_by(|a, b| a.0.cmp(&b.0).then(b.2.total_cmp(&a.2)))
                .map(|(held, adapters, _)| (held, adapters));
            let Some((held, adapters)) = most else {
                tracing::debug!(
                    total,
                    overall,
                    "busy adapters stay above the resident limit"
                );
                break;
            };
            let adapter = adapters.pop().expect("not empty");
            // Another tenant's load never drops a session for good.
            if self.reloadable(&adapter) && self.evict_adapter(&adapter) {
                *held -= adapter.bytes;
                total -= adapter.bytes;
            }
        }
    }

    /// Whether an evicted `adapter` can come back: a run from its snapshot, a session from its
    /// checkpoint while that exists.
    fn reloadable(&self, adapter: &ResidentAdapter) -> bool {
        match &adapter.holder {
            Holder::Run(_) => true,
            Holder::Sampler(entry) => self.sampler_reloadable(entry),
        }
    }

    /// Whether a sampling session's weights can be loaded again: its checkpoint exists.
    fn sampler_reloadable(&self, entry: &crate::registry::SamplerEntry) -> bool {
        match &entry.source {
            SamplerSource::Checkpoint(path) => self
                .registry
                .readable_checkpoint(&entry.key.tenant, path)
                .is_ok(),
            SamplerSource::Base => false,
        }
    }

    /// Evicts one idle resident adapter (a run to its snapshot, a session's weights dropped);
    /// whether it was.
    fn evict_adapter(&self, adapter: &ResidentAdapter) -> bool {
        match &adapter.holder {
            Holder::Run(entry) => self.evict_run(entry),
            Holder::Sampler(entry) => entry
                .try_lock()
                .is_some_and(|mut slot| slot.take().is_some()),
        }
    }

    /// The run's latest snapshot, or a fresh adapter from its seed when it has none.
    fn snapshot_or_fresh(&self, entry: &ModelEntry) -> Result<(LoraAdapter, Option<AdamState>)> {
        let dir = self.registry.snapshot_dir(&entry.key);
        checkpoint::recover(&dir)?;
        Ok(if dir.join("adapter_config.json").exists() {
            let loaded = checkpoint::load(&dir, self.decoder.config(), self.decoder.device())?;
            (loaded.adapter, loaded.optimizer)
        } else {
            let fresh = LoraAdapter::new(
                entry.spec.clone(),
                self.decoder.config(),
                self.decoder.device(),
            )?;
            (fresh, None)
        })
    }

    /// Each job's run, after `check`; a job whose check or lookup fails gets its error in
    /// `results` and no run.
    fn runs_of(
        &self,
        jobs: &[Job],
        results: &mut [Option<Result<Output>>],
        check: impl Fn(&Job) -> Result<()>,
    ) -> Vec<Option<Arc<ModelEntry>>> {
        jobs.iter()
            .enumerate()
            .map(|(i, j)| match check(j).and_then(|()| self.model_of(j)) {
                Ok(e) => Some(e),
                Err(err) => {
                    results[i] = Some(Err(err));
                    None
                }
            })
            .collect()
    }

    fn model_of(&self, job: &Job) -> Result<Arc<ModelEntry>> {
        match &job.queue {
            QueueKey::Model(k) => self.registry.model(&k.tenant, &k.model_id),
            QueueKey::Sampler(k) => Err(EngineError::invalid(
                "model_id",
                format!("`{}` is a sampling session", k.sampler_id),
            )),
        }
    }

    fn train(&self, jobs: &[Job], backward: bool) -> Vec<Result<Output>> {
        let mut results: Vec<Option<Result<Output>>> = jobs.iter().map(|_| None).collect();
        let entries = self.runs_of(jobs, &mut results, |_| Ok(()));
        let mut guards = lock_all(&entries);
        for (i, (entry, guard)) in entries.iter().zip(guards.iter_mut()).enumerate() {
            if let (Some(entry), Some(guard)) = (entry, guard) {
                if let Err(e) = self.make_resident(entry, guard) {
                    results[i] = Some(Err(e));
                }
            }
        }
        let mut runnable = Vec::new();
        for (i, job) in jobs.iter().enumerate() {
            if results[i].is_some() {
                continue;
            }
            let (Some(guard), Work::ForwardBackward { data, loss, .. }) = (&guards[i], &job.work)
            else {
                continue;
            };
            let Some(adapter) = guard.adapter.as_ref() else {
                results[i] = Some(Err(EngineError::invalid(
                    "model_id",
                    "the run is not initialised",
                )));
                continue;
            };
            let checked = validate_request(self.decoder.config(), loss, data)
                .and_then(|()| check_custom_losses(data));
            match checked {
                Ok(()) => runnable.push((
                    i,
                    TrainRequest {
                        adapter: Some(adapter),
                        loss: *loss,
                        data,
                    },
                )),
                Err(e) => results[i] = Some(Err(e.into())),
            }
        }
        fused_or_alone(
            &runnable,
            &mut results,
            |reqs| forward_backward(&self.decoder, reqs, backward, self.memory_budget),
            Output::ForwardBackward,
        );
        let ran: Vec<usize> = runnable.into_iter().map(|(i, _)| i).collect();
        if backward {
            for i in ran {
                if let (Some(Ok(_)), Some(entry), Some(guard)) =
                    (&results[i], &entries[i], &mut guards[i])
                {
                    self.mark_pending(entry, guard);
                    if let Some(seq) = jobs[i].seq {
                        guard.position.gradients = guard.position.gradients.max(seq);
                    }
                }
            }
        }
        drop(guards);
        finish_runs(&entries, results)
    }

    /// One fused AdamW step for every run of the batch (each with its own hyperparameters);
    /// each run's snapshot is written before its step is acknowledged.
    fn optim(&self, jobs: &[Job]) -> Vec<Result<Output>> {
        let mut results: Vec<Option<Result<Output>>> = jobs.iter().map(|_| None).collect();
        let entries = self.runs_of(jobs, &mut results, |j| match &j.work {
            Work::OptimStep { params } => Ok(params.validate()?),
            _ => unreachable!("optim batch holds optim jobs"),
        });
        let mut guards = lock_all(&entries);
        let mut stepping = Vec::new();
        for (i, (entry, guard)) in entries.iter().zip(guards.iter_mut()).enumerate() {
            let (Some(entry), Some(state)) = (entry, guard) else {
                continue;
            };
            match self.prepare_step(entry, state) {
                Ok(()) => stepping.push(i),
                Err(e) => results[i] = Some(Err(e)),
            }
        }
        let outcomes = {
            let mut step_jobs: Vec<StepJob> = Vec::with_capacity(stepping.len());
            let mut states: Vec<&mut RunState> = guards
                .iter_mut()
                .enumerate()
                .filter(|(i, _)| stepping.contains(i))
                .map(|(_, g)| &mut **g.as_mut().expect("locked above"))
                .collect();
            for (state, &i) in states.iter_mut().zip(&stepping) {
                let Work::OptimStep { params } = &jobs[i].work else {
                    unreachable!("optim batch holds optim jobs")
                };
                let RunState {
                    adapter, optimizer, ..
                } = &mut **state;
                step_jobs.push(StepJob {
                    adapter: adapter.as_ref().expect("prepared"),
                    state: optimizer.as_mut().expect("prepared"),
                    params: *params,
                });
            }
            // A panic must fail these steps, not re-run them (the engine retries panicked
            // batches job by job).
            catch_unwind(AssertUnwindSafe(|| step_many(&mut step_jobs))).unwrap_or_else(|_| {
                tracing::error!(runs = step_jobs.len(), "the fused optimizer step panicked");
                step_jobs
                    .iter()
                    .map(|_| Err(ModelError::invalid("optimizer", "the step panicked")))
                    .collect()
            })
        };
        let mut stepped = Vec::new();
        for (i, outcome) in stepping.into_iter().zip(outcomes) {
            match outcome {
                Ok(stats) => {
                    let state = guards[i].as_mut().expect("stepping runs are locked");
                    state
                        .position
                        .applied(jobs[i].seq, Output::OptimStep(stats));
                    stepped.push((i, stats));
                }
                Err(ModelError::NonFiniteStep) => {
                    let entry = entries[i].as_ref().expect("stepping runs have entries");
                    let state = guards[i].as_mut().expect("stepping runs are locked");
                    results[i] = Some(Err(self.roll_back(entry, state)));
                }
                Err(e) => results[i] = Some(Err(e.into())),
            }
        }
        // Every stepped run's snapshot, written together and made durable before any step is
        // acknowledged.
        let saved: Vec<Result<()>> = if self.snapshot_every_step {
            let dirs: Vec<_> = stepped
                .iter()
                .map(|(i, _)| {
                    let entry = entries[*i].as_ref().expect("stepped runs have entries");
                    self.registry.snapshot_dir(&entry.key)
                })
                .collect();
            let requests: Vec<(SaveRequest, &std::path::Path)> = stepped
                .iter()
                .zip(&dirs)
                .map(|((i, _), dir)| {
                    let entry = entries[*i].as_ref().expect("stepped runs have entries");
                    let state = guards[*i].as_ref().expect("stepped runs are locked");
                    let request =
                        snapshot_request(entry, state).expect("stepped runs are resident");
                    (request, dir.as_path())
                })
                .collect();
            let saved = checkpoint::save_all(&requests);
            for (i, _) in &stepped {
                let entry = entries[*i].as_ref().expect("stepped runs have entries");
                self.registry.discard_if_removed(entry);
            }
            saved
                .into_iter()
                .map(|r| r.map_err(EngineError::from))
                .collect()
        } else {
            stepped.iter().map(|_| Ok(())).collect()
        };
        for ((i, stats), saved) in stepped.into_iter().zip(saved) {
            if self.snapshot_every_step && saved.is_ok() {
                guards[i]
                    .as_mut()
                    .expect("stepped runs are locked")
                    .pending_marked = false;
            }
            results[i] = Some(saved.map(|()| Output::OptimStep(stats)));
        }
        drop(guards);
        finish_runs(&entries, results)
    }

    /// Undoes a step that made the run's weights non-finite. With step snapshots the run's
    /// snapshot holds its state from before the step: the weights are dropped and its next job
    /// reloads that state (the gradients the step consumed are gone, and so is their pending
    /// marker). Without, nothing holds that state, and the error says what to do instead.
    fn roll_back(&self, entry: &ModelEntry, state: &mut RunState) -> EngineError {
        if !self.snapshot_every_step {
            return EngineError::invalid(
                "adam_params",
                "the step made the weights non-finite (NaN or infinite) and cannot be undone \
                 without --step-snapshots; load the run's last checkpoint",
            );
        }
        *state = RunState {
            evicted: true,
            ..RunState::default()
        };
        forget_pending_on_disk(&self.registry, entry);
        tracing::warn!(model_id = %entry.key.model_id, "a step made the weights non-finite; rolled back");
        EngineError::invalid(
            "adam_params",
            "the step made the weights non-finite (NaN or infinite): it was refused, the run is \
             back at its state before the step and its gradients were discarded; lower \
             learning_rate or raise eps",
        )
    }

    /// Makes a run ready for an optimizer step: resident, with an optimizer. Fails (and clears
    /// the condition) when a crash lost its gradients.
    fn prepare_step(&self, entry: &ModelEntry, state: &mut RunState) -> Result<()> {
        self.make_resident(entry, state)?;
        let adapter = state
            .adapter
            .as_ref()
            .ok_or_else(|| EngineError::invalid("model_id", "the run is not initialised"))?;
        if state.gradients_lost {
            adapter.zero_grad()?;
            forget_pending_on_disk(&self.registry, entry);
            state.gradients_lost = false;
            state.pending_marked = false;
            state.position.gradients = 0;
            state.position.unjournaled = false;
            return Err(EngineError::GradientsLost);
        }
        if state.optimizer.is_none() {
            state.optimizer = Some(AdamState::new(adapter)?);
        }
        Ok(())
    }

    fn create(&self, job: &Job) -> Result<Output> {
        let Work::Create { spec, from } = &job.work else {
            unreachable!("create job")
        };
        let entry = self.model_of(job)?;
        let (adapter, optimizer) = match from {
            None => (
                LoraAdapter::new(spec.clone(), self.decoder.config(), self.decoder.device())?,
                None,
            ),
            Some((path, with_optimizer)) => {
                let loaded = self.load_checkpoint(&entry.key.tenant, path)?;
                (
                    loaded.adapter,
                    if *with_optimizer {
                        loaded.optimizer
                    } else {
                        None
                    },
                )
            }
        };
        let mut guard = entry.lock();
        *guard = RunState {
            adapter: Some(adapter),
            optimizer,
            ..RunState::default()
        };
        let created = Output::Created {
            model_id: entry.key.model_id.clone(),
        };
        guard.position.applied(job.seq, created.clone());
        if self.snapshot_every_step {
            // A run loaded from a checkpoint must come back as loaded after a crash.
            snapshot(&self.registry, &entry, &guard)?;
        } else {
            // A reused run id must not come back with an unloaded run's snapshot.
            let stale = self.registry.snapshot_dir(&entry.key);
            if stale.exists() {
                std::fs::remove_dir_all(&stale)
                    .map_err(|e| EngineError::Internal(format!("{}: {e}", stale.display())))?;
            }
        }
        Ok(created)
    }

    fn load_checkpoint(&self, tenant: &str, path: &str) -> Result<checkpoint::Loaded> {
        let record = self.registry.read_checkpoint(tenant, path, "load")?;
        Ok(checkpoint::load(
            &record.dir,
            self.decoder.config(),
            self.decoder.device(),
        )?)
    }

    fn save(&self, job: &Job) -> Result<Output> {
        let Work::Save {
            name,
            kind,
            sampler,
            options,
        } = &job.work
        else {
            unreachable!("save job")
        };
        let entry = self.model_of(job)?;
        let mut guard = entry.lock();
        self.make_resident(&entry, &mut guard)?;
        let adapter = guard
            .adapter
            .as_ref()
            .ok_or_else(|| EngineError::invalid("model_id", "the run is not initialised"))?;
        let tenant = &entry.key.tenant;
        let model_id = &entry.key.model_id;
        let path = checkpoint_path(model_id, *kind, name);
        // A save the journal runs again after a crash may have landed before it: its
        // checkpoint is then this job's own, and only what followed the save is left to do.
        let landed = self
            .registry
            .checkpoint(tenant, &path)
            .is_ok_and(|record| record.saved_by.as_deref() == Some(job.id.as_str()));
        if !landed {
            self.write_checkpoint(job, &entry, adapter, guard.optimizer.as_ref(), &path)?;
        }
        // An inflight session is registered again all the same: the crash may have come before
        // the run's earlier inflight sessions were moved onto the new checkpoint.
        let registered = sampler.as_ref().is_some_and(|key| {
            landed
                && !options.inflight
                && self.registry.sampler(&key.tenant, &key.sampler_id).is_ok()
        });
        if let Some(key) = sampler.as_ref().filter(|_| !registered) {
            let added = if options.inflight {
                self.registry
                    .add_inflight_sampler(key.clone(), &path, &entry.base_model, model_id)
            } else {
                self.registry
                    .add_sampler(
                        key.clone(),
                        SamplerSource::Checkpoint(path.clone()),
                        &entry.base_model,
                    )
                    .map(|_| ())
            };
            if let Err(e) = added {
                // The checkpoint existed only for this session.
                let _ = self.registry.remove_checkpoint(tenant, &path);
                return Err(e);
            }
        }
        entry.touch();
        Ok(Output::Saved {
            path,
            sampler_id: sampler.as_ref().map(|k| k.sampler_id.clone()),
        })
    }

    /// Writes the checkpoint at `path` that the save `job` asks for and records it, once the
    /// tenant may save there (no checkpoint in the way unless overwriting, within quota).
    fn write_checkpoint(
        &self,
        job: &Job,
        entry: &ModelEntry,
        adapter: &LoraAdapter,
        optimizer: Option<&AdamState>,
        path: &str,
    ) -> Result<()> {
        let Work::Save {
            name,
            kind,
            sampler,
            options,
        } = &job.work
        else {
            unreachable!("save job")
        };
        let tenant = &entry.key.tenant;
        let model_id = &entry.key.model_id;
        self.registry
            .check_overwrite(tenant, path, options.overwrite)?;
        if sampler.is_none() {
            // Again: saves queued while the tenant was under its limit may have filled it.
            self.registry.check_checkpoint_quota(tenant)?;
        }
        let dir = self.registry.checkpoint_dir(tenant, model_id, *kind, name);
        let optimizer_slot;
        let optimizer = match kind {
            CheckpointKind::State => {
                // A state saved before the first step still restores as a fresh optimizer.
                optimizer_slot = match optimizer {
                    Some(_) => None,
                    None => Some(AdamState::new(adapter)?),
                };
                optimizer.or(optimizer_slot.as_ref())
            }
            CheckpointKind::Sampler | CheckpointKind::External => None,
        };
        let request = SaveRequest {
            adapter,
            optimizer,
            base_model: &entry.base_model,
            gradients: false,
            note: None,
        };
        if options.encrypt_to.is_empty() {
            checkpoint::save(&request, &dir)?;
        } else {
            // Encrypted where no URL reaches it, then moved into place: the export's path
            // never holds plaintext.
            let recipients = crate::export::parse_recipients(&options.encrypt_to)?;
            crate::export::save_encrypted(&request, &dir, &recipients)?;
        }
        let created = unix_now();
        self.registry.add_saved_checkpoint(CheckpointRecord {
            tenant: tenant.clone(),
            model_id: model_id.clone(),
            kind: *kind,
            name: name.clone(),
            path: path.to_string(),
            size_bytes: dir_size(&dir),
            dir,
            created,
            spec: adapter.spec().clone(),
            ephemeral: sampler.is_some(),
            expires_at: options.ttl_seconds.map(|ttl| created + ttl as f64),
            user_metadata: options.user_metadata.clone(),
            public: false,
            saved_by: Some(job.id.clone()),
        })
    }

    fn load(&self, job: &Job) -> Result<Output> {
        let Work::Load {
            path,
            with_optimizer,
        } = &job.work
        else {
            unreachable!("load job")
        };
        let entry = self.model_of(job)?;
        let loaded = self.load_checkpoint(&entry.key.tenant, path)?;
        let mut guard = entry.lock();
        *guard = RunState {
            adapter: Some(loaded.adapter),
            optimizer: loaded.optimizer.filter(|_| *with_optimizer),
            ..RunState::default()
        };
        let out = Output::Loaded { path: path.clone() };
        guard.position.applied(job.seq, out.clone());
        if self.snapshot_every_step {
            snapshot(&self.registry, &entry, &guard)?;
        }
        entry.touch();
        Ok(out)
    }

    /// Adds sampling jobs to the decode loop. Each session is locked (and its weights reloaded
    /// when evicted) only while its jobs join: the loop keeps its own copy of the weights.
    fn admit_samples(&mut self, jobs: &[Job]) -> Admitted {
        let prompts = jobs.iter().map(|j| j.work.prompt_tokens()).sum();
        self.set_threads_for(prompts, 1.0);
        let mut results: Vec<Option<Result<Output>>> = jobs.iter().map(|_| None).collect();
        // Resolve each distinct session once.
        let mut sessions: HashMap<QueueKey, Arc<crate::registry::SamplerEntry>> = HashMap::new();
        for (i, job) in jobs.iter().enumerate() {
            let QueueKey::Sampler(k) = &job.queue else {
                results[i] = Some(Err(EngineError::invalid(
                    "sampling_session_id",
                    "not a sampling session",
                )));
                continue;
            };
            if sessions.contains_key(&job.queue) {
                continue;
            }
            match self.registry.sampler(&k.tenant, &k.sampler_id) {
                Ok(entry) => {
                    sessions.insert(job.queue.clone(), entry);
                }
                Err(e) => results[i] = Some(Err(e)),
            }
        }
        let mut guards = HashMap::new();
        let mut unloadable: HashMap<&QueueKey, EngineError> = HashMap::new();
        for (key, entry) in &sessions {
            let mut slot = entry.lock();
            if let (None, SamplerSource::Checkpoint(path)) = (&*slot, &entry.source) {
                match self.load_checkpoint(&entry.key.tenant, path) {
                    Ok(loaded) => *slot = Some(loaded.adapter),
                    Err(e) => {
                        unloadable.insert(key, e);
                        continue;
                    }
                }
            }
            entry.last_access.touch();
            guards.insert(key, slot);
        }
        let can_detokenize = self.tokenizer.is_some();
        let d = &mut self.decoding;
        let g = &d.generation;
        let before = (g.prefills(), g.shared_prompts(), g.prompt_tokens_reused());
        let mut joining: Vec<(usize, RequestTag, SampleRequest)> = Vec::new();
        for (i, job) in jobs.iter().enumerate() {
            if results[i].is_some() {
                continue;
            }
            if let Some(e) = unloadable.get(&job.queue) {
                results[i] = Some(Err(e.clone()));
                continue;
            }
            let Some(guard) = guards.get(&job.queue) else {
                let sid = job.queue.id().to_string();
                results[i] = Some(Err(EngineError::NotFound {
                    what: "sampling session".into(),
                    id: sid,
                }));
                continue;
            };
            let Work::Sample {
                prompt,
                num_samples,
                params,
                scoring,
                stream,
                ..
            } = &job.work
            else {
                results[i] = Some(Err(EngineError::invalid("work", "not a sample job")));
                continue;
            };
            let request = SampleRequest {
                adapter: guard.as_ref(),
                prompt: prompt.clone(),
                num_samples: *num_samples,
                params: params.clone(),
                scoring: scoring.clone(),
                share_scope: job.queue.tenant(),
                stream: *stream,
            };
            let tag = d.next_tag;
            d.next_tag += 1;
            joining.push((i, tag, request));
        }
        let tagged: Vec<(RequestTag, &SampleRequest)> =
            joining.iter().map(|(_, tag, r)| (*tag, r)).collect();
        let joined = d
            .generation
            .admit_many(&self.decoder, &tagged, can_detokenize);
        for ((i, tag, _), result) in joining.iter().zip(joined) {
            match result {
                Ok(()) => {
                    d.jobs.insert(*tag, jobs[*i].id.clone());
                }
                Err(e) => results[*i] = Some(Err(e.into())),
            }
        }
        Admitted {
            results,
            prefills: d.generation.prefills() - before.0,
            shared_prompts: d.generation.shared_prompts() - before.1,
            prompt_tokens_reused: d.generation.prompt_tokens_reused() - before.2,
        }
    }

    /// One step of the decode loop; a failed step fails every job in it.
    fn decode_step(&mut self) -> DecodeStep {
        self.set_threads_for(self.decoding.generation.step_tokens(), 1.0);
        let tokenizer = self.tokenizer.clone();
        let detok = move |ids: &[i64]| {
            tokenizer
                .as_ref()
                .and_then(|t| t.decode(ids).ok())
                .unwrap_or_default()
        };
        let detokenize: Option<Detokenize> = if self.tokenizer.is_some() {
            Some(&detok)
        } else {
            None
        };
        let d = &mut self.decoding;
        let before = d.generation.graph_counts();
        match d.generation.step(&self.decoder, detokenize) {
            Ok(report) => {
                let id = |tag: &RequestTag| d.jobs.get(tag).cloned().unwrap_or_default();
                let first_tokens = report.first_tokens.iter().map(id).collect();
                // A job's rows are contiguous, so its tokens group as they come.
                let mut streamed: Vec<(RequestTag, Vec<StreamedToken>)> = Vec::new();
                for (tag, token) in report.streamed {
                    match streamed.last_mut() {
                        Some((last, tokens)) if *last == tag => tokens.push(token),
                        _ => streamed.push((tag, vec![token])),
                    }
                }
                let streamed = streamed
                    .into_iter()
                    .map(|(tag, tokens)| (id(&tag), tokens))
                    .collect();
                let mut finished: Vec<(RequestId, Result<Output>)> = report
                    .finished
                    .into_iter()
                    .map(|(tag, out)| {
                        let job = d.jobs.remove(&tag).unwrap_or_default();
                        (job, Ok(Output::Sample(out)))
                    })
                    .collect();
                for (tag, e) in report.failed {
                    let job = d.jobs.remove(&tag).unwrap_or_default();
                    finished.push((job, Err(e.into())));
                }
                DecodeStep {
                    finished,
                    first_tokens,
                    streamed,
                    tokens: report.tokens,
                    graphs: d.generation.graph_counts().since(before),
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, jobs = d.jobs.len(), "a decode step failed; failing its jobs");
                let err = EngineError::from(e);
                let finished = d
                    .generation
                    .clear()
                    .into_iter()
                    .filter_map(|tag| d.jobs.remove(&tag))
                    .map(|job| (job, Err(err.clone())))
                    .collect();
                d.jobs.clear();
                DecodeStep {
                    finished,
                    ..DecodeStep::default()
                }
            }
        }
    }

    /// Runs sampling jobs to completion (a backend used without the engine's decode loop).
    fn sample(&mut self, jobs: &[Job]) -> Vec<Result<Output>> {
        let admitted = self.admit_samples(jobs);
        let mut by_id: HashMap<RequestId, Result<Output>> = HashMap::new();
        while !self.decoding.jobs.is_empty() {
            by_id.extend(self.decode_step().finished);
        }
        jobs.iter()
            .zip(admitted.results)
            .map(|(job, r)| {
                r.or_else(|| by_id.remove(&job.id))
                    .unwrap_or_else(|| Err(EngineError::Internal("sampling lost the job".into())))
            })
            .collect()
    }
}

/// Runs the `runnable` requests as one fused call; if that fails, runs each alone, so one
/// request's failure cannot fail the others. Each outcome lands in `results[index]`.
fn fused_or_alone<R: Clone, O>(
    runnable: &[(usize, R)],
    results: &mut [Option<Result<Output>>],
    run: impl Fn(&[R]) -> loraloom_model::Result<Vec<O>>,
    wrap: impl Fn(O) -> Output,
) {
    let requests: Vec<R> = runnable.iter().map(|(_, r)| r.clone()).collect();
    match run(&requests) {
        Ok(outputs) => {
            for ((i, _), out) in runnable.iter().zip(outputs) {
                results[*i] = Some(Ok(wrap(out)));
            }
        }
        Err(batch_err) => {
            tracing::warn!(error = %batch_err, jobs = runnable.len(), "fused batch failed; retrying jobs alone");
            for (i, req) in runnable {
                let out = run(std::slice::from_ref(req))
                    .map(|mut o| wrap(o.remove(0)))
                    .map_err(EngineError::from);
                results[*i] = Some(out);
            }
        }
    }
}

fn dir_size(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|it| {
            it.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

impl Backend for ModelWorker {
    fn run(&mut self, jobs: &[Job]) -> Vec<Result<Output>> {
        let Some(first) = jobs.first() else {
            return Vec::new();
        };
        let results = match first.work.class() {
            BatchClass::Train(backward) => {
                let tokens = jobs.iter().map(|j| j.work.tokens()).sum();
                self.set_threads_for(tokens, if backward { 3.0 } else { 1.0 });
                self.train(jobs, backward)
            }
            // Admitting and each decode step set their own thread count.
            BatchClass::Sample => self.sample(jobs),
            BatchClass::Optim => {
                self.set_threads(self.intra_op_threads);
                self.optim(jobs)
            }
            BatchClass::Solo => {
                self.set_threads(self.intra_op_threads);
                jobs.iter()
                    .map(|j| {
                        contained(|| match &j.work {
                            Work::Create { .. } => self.create(j),
                            Work::Save { .. } => self.save(j),
                            Work::Load { .. } => self.load(j),
                            _ => unreachable!("solo jobs are create/save/load"),
                        })
                    })
                    .collect()
            }
        };
        self.evict_after_batch();
        results
    }

    fn admit(&mut self, jobs: &[Job]) -> Admitted {
        let admitted = self.admit_samples(jobs);
        self.evict_after_batch();
        admitted
    }

    fn step(&mut self) -> DecodeStep {
        self.decode_step()
    }

    fn decoding(&self) -> usize {
        self.decoding.jobs.len()
    }

    fn kv_tokens(&self) -> KvHeld {
        let g = &self.decoding.generation;
        KvHeld {
            held: g.kv_tokens_held(),
            kept: g.kept_tokens(),
        }
    }

    fn abort_decoding(&mut self) -> Vec<RequestId> {
        self.decoding.generation.clear();
        self.decoding.jobs.drain().map(|(_, id)| id).collect()
    }

    fn drop_decoding(&mut self, ids: &[RequestId]) -> Vec<RequestId> {
        let tags: Vec<RequestTag> = self
            .decoding
            .jobs
            .iter()
            .filter(|(_, id)| ids.contains(id))
            .map(|(tag, _)| *tag)
            .collect();
        match self.decoding.generation.remove(&tags) {
            Ok(removed) => removed
                .iter()
                .filter_map(|tag| self.decoding.jobs.remove(tag))
                .collect(),
            Err(error) => {
                tracing::error!(%error, "dropping sampling jobs failed; abandoning the decode loop");
                self.abort_decoding()
            }
        }
    }
}

impl ModelWorker {
    /// Sets this thread's intra-op thread count for a batch putting `tokens` through the model
    /// `passes` times over (1: a forward pass; 3: forward and backward), per
    /// [`SERIAL_BELOW_LAYER_FLOPS`]. Only the CPU's ops use these threads.
    fn set_threads_for(&mut self, tokens: usize, passes: f64) {
        let layer_flops = tokens as f64 * passes * self.layer_flops_per_token;
        let threads = threads_for(layer_flops, self.decoder.device(), self.intra_op_threads);
        self.set_threads(threads);
    }

    fn set_threads(&mut self, threads: i32) {
        if self.threads_now != threads {
            loraloom_model::set_intra_op_threads(threads);
            self.threads_now = threads;
        }
    }

    /// Evicts idle runs and sampling sessions beyond their limits. Runs after results exist: a
    /// panic here must not re-run jobs that already succeeded.
    fn evict_after_batch(&self) {
        let evicted = catch_unwind(AssertUnwindSafe(|| {
            self.evict_over_resident_limits();
            self.evict_idle();
            self.evict_idle_samplers();
        }));
        if evicted.is_err() {
            tracing::error!("evicting idle runs or samplers panicked; they stay resident");
        }
    }
}

/// Marks a batch's runs as used (for eviction) and unwraps every job's result.
fn finish_runs(
    entries: &[Option<Arc<ModelEntry>>],
    results: Vec<Option<Result<Output>>>,
) -> Vec<Result<Output>> {
    for e in entries.iter().flatten() {
        e.touch();
    }
    results
        .into_iter()
        .map(|r| r.expect("every job has a result"))
        .collect()
}

/// Locks every run of a batch (runs of one batch are distinct: no two workers want one run).
fn lock_all(entries: &[Option<Arc<ModelEntry>>]) -> Vec<Option<MutexGuard<'_, RunState>>> {
    entries
        .iter()
        .map(|e| e.as_ref().map(|e| e.lock()))
        .collect()
}

/// Runs one job's work, turning a panic into that job's failure.
fn contained(work: impl FnOnce() -> Result<Output>) -> Result<Output> {
    catch_unwind(AssertUnwindSafe(work))
        .unwrap_or_else(|_| Err(EngineError::Internal("the job panicked".into())))
}

/// Writes a run's adapter and optimizer to its snapshot directory (atomically; the new directory
/// holds no [`PENDING_MARKER`]), with the gradients no step has consumed (a graceful shutdown
/// between a `forward_backward` and its `optim_step`) unless they were already lost. A run
/// without weights has nothing to write.
pub fn snapshot(registry: &Registry, entry: &ModelEntry, state: &RunState) -> Result<()> {
    let Some(request) = snapshot_request(entry, state) else {
        return Ok(());
    };
    let saved = checkpoint::save(&request, &registry.snapshot_dir(&entry.key));
    registry.discard_if_removed(entry);
    saved?;
    Ok(())
}

/// What a run's snapshot holds: its adapter, optimizer and pending gradients (see
/// [`snapshot`]); `None` without weights.
fn snapshot_request<'a>(entry: &'a ModelEntry, state: &'a RunState) -> Option<SaveRequest<'a>> {
    let adapter = state.adapter.as_ref()?;
    let gradients = adapter.has_pending_gradients() && !state.gradients_lost;
    Some(SaveRequest {
        adapter,
        optimizer: state.optimizer.as_ref(),
        base_model: &entry.base_model,
        gradients,
        note: Some(state.position.note(gradients)),
    })
}

/// Deletes the gradients a graceful shutdown saved in the run's snapshot, once they are in
/// memory or discarded: the snapshot must not give them back again.
fn forget_saved_gradients(registry: &Registry, entry: &ModelEntry) {
    remove_from_snapshot(registry, entry, checkpoint::GRADIENTS_FILE);
}

/// Forgets what the run's snapshot and the job journal say of gradients no step consumed,
/// once they are discarded (a step refused for lost gradients, a rollback): the saved
/// gradients, both markers and the journaled `forward_backward`s (a crash must not rebuild
/// what the client was told is gone).
fn forget_pending_on_disk(registry: &Registry, entry: &ModelEntry) {
    // The journal first: a crash before the markers go finds the run still marked.
    if let Some(store) = registry.store() {
        if let Err(e) = crate::journal::forget_gradients(store.as_ref(), &entry.key) {
            // A crash before the run's next step would rebuild them: the markers stay.
            tracing::error!(model_id = %entry.key.model_id, error = %e, "cannot forget discarded gradients' journaled jobs");
            return;
        }
    }
    forget_saved_gradients(registry, entry);
    remove_from_snapshot(registry, entry, PENDING_MARKER);
    remove_from_snapshot(registry, entry, LOST_MARKER);
}

/// Deletes the file `name` of the run's snapshot directory, if it is there.
fn remove_from_snapshot(registry: &Registry, entry: &ModelEntry, name: &str) {
    remove_in(&registry.snapshot_dir(&entry.key), name, &entry.key);
}

/// Deletes the file `name` of run `key`'s snapshot directory `dir`, if it is there (a failure
/// is logged).
pub fn remove_in(dir: &std::path::Path, name: &str, key: &ModelKey) {
    if let Err(e) = std::fs::remove_file(dir.join(name)) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(model_id = %key.model_id, error = %e, file = name, "cannot remove a file of the run's snapshot");
        }
    }
}

/// Creates the marker `name` ([`PENDING_MARKER`] or [`LOST_MARKER`]) in the run's snapshot
/// directory durably.
pub fn write_marker(registry: &Registry, entry: &ModelEntry, name: &str) -> std::io::Result<()> {
    let synced = write_marker_in(&registry.snapshot_dir(&entry.key), name);
    registry.discard_if_removed(entry);
    synced
}

/// Creates the marker `name` in snapshot directory `dir` durably.
pub fn write_marker_in(dir: &std::path::Path, name: &str) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::File::create(dir.join(name))?.sync_all()?;
    std::fs::File::open(dir)?.sync_all()
}

/// Checks a checkpoint path refers to one of the tenant's checkpoints (for submit-time errors).
pub fn check_checkpoint(registry: &Registry, tenant: &str, path: &str) -> Result<()> {
    if parse_checkpoint_path(path)?.1 == CheckpointKind::External {
        return Err(EngineError::invalid(
            "path",
            "external weights are for download only; load the run's state (weights) or sampler weights",
        ));
    }
    registry.readable_checkpoint(tenant, path).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Forward FLOPs per token and layer of the models the threshold was measured on.
    const TINY_LAYER_FLOPS: f64 = 2.0 * 213_000.0 / 4.0;
    const SMOLLM_135M_LAYER_FLOPS: f64 = 2.0 * 134_500_000.0 / 30.0;

    #[test]
    fn small_cpu_batches_run_on_one_thread_and_large_or_gpu_ones_on_all() {
        let cpu = Device::Cpu;
        // Decode steps of the tiny model, even with many sequences, run on one thread.
        assert_eq!(threads_for(32.0 * TINY_LAYER_FLOPS, cpu, 2), 1);
        assert_eq!(threads_for(64.0 * TINY_LAYER_FLOPS, cpu, 16), 1);
        // A 135M step of one sequence too; of eight, or any training batch, every thread.
        assert_eq!(threads_for(SMOLLM_135M_LAYER_FLOPS, cpu, 2), 1);
        assert_eq!(threads_for(8.0 * SMOLLM_135M_LAYER_FLOPS, cpu, 2), 2);
        assert_eq!(threads_for(3.0 * 2.0 * SMOLLM_135M_LAYER_FLOPS, cpu, 2), 2);
        assert_eq!(threads_for(3.0 * 512.0 * TINY_LAYER_FLOPS, cpu, 8), 8);
        // On a GPU the setting is left as configured.
        assert_eq!(threads_for(1.0, Device::Cuda(0), 4), 4);
    }
}
