//! Jobs: what a client asked for, which queue it waits in, and what it produces.

use std::time::Instant;

use loraloom_model::{
    AdamParams, Datum, LoraSpec, LossFn, RequestOutput, SampleOutput, SamplingParams, StepStats,
};

/// A tenant: the owner of every id it creates (derived from an API key, never the key itself).
pub type TenantId = String;

/// Identifies a request and its future.
pub type RequestId = String;

/// A training run (one LoRA adapter) of one tenant.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct ModelKey {
    /// Owner.
    pub tenant: TenantId,
    /// The run's id (`<session>:train:<n>`).
    pub model_id: String,
}

/// A sampling session of one tenant.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct SamplerKey {
    /// Owner.
    pub tenant: TenantId,
    /// The session's id.
    pub sampler_id: String,
}

/// The FIFO queue a job waits in: one per training run, one per sampling session.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum QueueKey {
    /// A training run's queue: its jobs run strictly one at a time, in submission order.
    Model(ModelKey),
    /// A sampling session's queue: read-only jobs, several may share a batch.
    Sampler(SamplerKey),
}

impl QueueKey {
    /// The tenant owning the queue.
    pub fn tenant(&self) -> &str {
        match self {
            QueueKey::Model(k) => &k.tenant,
            QueueKey::Sampler(k) => &k.tenant,
        }
    }

    /// The model or sampler id, for stats and logs.
    pub fn id(&self) -> &str {
        match self {
            QueueKey::Model(k) => &k.model_id,
            QueueKey::Sampler(k) => &k.sampler_id,
        }
    }
}

/// Which checkpoint files to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum CheckpointKind {
    /// Adapter + optimizer (`save_state`; `tinker://<run>/weights/<name>`).
    State,
    /// Adapter only (`save_weights_for_sampler`; `tinker://<run>/sampler_weights/<name>`).
    Sampler,
    /// Adapter only, for download (`save_weights_external`;
    /// `tinker://<run>/external_weights/<name>`), perhaps encrypted; never loaded back.
    External,
}

impl CheckpointKind {
    /// The path segment of the kind.
    pub fn segment(self) -> &'static str {
        match self {
            CheckpointKind::State => "weights",
            CheckpointKind::Sampler => "sampler_weights",
            CheckpointKind::External => "external_weights",
        }
    }
}

/// How a checkpoint is saved.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SaveOptions {
    /// Seconds until the checkpoint is deleted (`None`: kept until deleted).
    pub ttl_seconds: Option<u64>,
    /// Replace a checkpoint of the same name (otherwise saving over one is refused).
    pub overwrite: bool,
    /// The client's metadata, returned with the checkpoint.
    pub user_metadata: Option<std::collections::BTreeMap<String, String>>,
    /// `age` recipients an export's files are encrypted to (none: plaintext).
    pub encrypt_to: Vec<String>,
    /// The sampling session follows the run's inflight weights (`kind="inflight"`): later
    /// inflight saves of the run move it, and the run's other inflight sessions, onto theirs.
    pub inflight: bool,
}

/// The work of a job.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum Work {
    /// Initialise a fresh adapter (or, with `from`, one loaded from a checkpoint).
    Create {
        /// Rank, alpha, seed, targets.
        spec: LoraSpec,
        /// Load weights (and optionally the optimizer) from this checkpoint path instead.
        from: Option<(String, bool)>,
    },
    /// `forward_backward` (`backward`) or `forward`.
    ForwardBackward {
        /// The datums.
        data: Vec<Datum>,
        /// The loss.
        loss: LossFn,
        /// Accumulate gradients.
        backward: bool,
    },
    /// One Adam step.
    OptimStep {
        /// Hyper-parameters.
        params: AdamParams,
    },
    /// Write a checkpoint named `name`.
    Save {
        /// Checkpoint name (unique per run and kind).
        name: String,
        /// Which files.
        kind: CheckpointKind,
        /// Also open a sampling session with this key over the saved weights.
        sampler: Option<SamplerKey>,
        /// Lifetime, replacement and metadata.
        options: SaveOptions,
    },
    /// Replace the adapter's weights (and optionally optimizer) from a checkpoint path.
    Load {
        /// `tinker://<run>/<kind>/<name>`.
        path: String,
        /// Also restore the optimizer state.
        with_optimizer: bool,
    },
    /// Generate from a sampling session.
    Sample {
        /// Prompt tokens.
        prompt: Vec<i64>,
        /// Sequences to generate.
        num_samples: i64,
        /// Sampling parameters.
        params: SamplingParams,
        /// What to compute besides the samples (prompt logprobs and the other extras).
        scoring: loraloom_model::Scoring,
        /// Record each sampled sequence for `stable_reinforce` (`record_stability_info`).
        record_stability: bool,
        /// Report each token as it is chosen (set by [`crate::Engine::submit_streaming`]).
        #[serde(default)]
        stream: bool,
    },
}

/// Jobs that may share one batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchClass {
    /// forward_backward (true) or forward (false) of several runs, one fused pass.
    Train(bool),
    /// Optimizer steps of several runs.
    Optim,
    /// Sampling of several sessions, one decode loop.
    Sample,
    /// Runs alone (create, save, load).
    Solo,
}

impl BatchClass {
    /// forward_backward, forward and optim_step: the work of training runs, whose tenants step
    /// in lockstep (a batch of them waits for its runs' next jobs, see `SchedState`).
    pub fn is_training(self) -> bool {
        matches!(self, BatchClass::Train(_) | BatchClass::Optim)
    }
}

impl Work {
    /// The batch class of the work.
    pub fn class(&self) -> BatchClass {
        match self {
            Work::ForwardBackward { backward, .. } => BatchClass::Train(*backward),
            Work::OptimStep { .. } => BatchClass::Optim,
            Work::Sample { .. } => BatchClass::Sample,
            Work::Create { .. } | Work::Save { .. } | Work::Load { .. } => BatchClass::Solo,
        }
    }

    /// Adds to its run's gradients, which live in memory until a step consumes them
    /// (`forward_backward`).
    pub fn accumulates_gradients(&self) -> bool {
        matches!(self, Work::ForwardBackward { backward: true, .. })
    }

    /// Once it succeeds, its run's earlier gradients are consumed or replaced (`optim_step`,
    /// a load, a create).
    pub fn replaces_gradients(&self) -> bool {
        matches!(
            self,
            Work::OptimStep { .. } | Work::Load { .. } | Work::Create { .. }
        )
    }

    /// Tokens the job puts through the model (for the batch budget and stats).
    pub fn tokens(&self) -> usize {
        match self {
            Work::ForwardBackward { data, .. } => data.iter().map(|d| d.input_tokens.len()).sum(),
            Work::Sample {
                prompt,
                num_samples,
                params,
                ..
            } => prompt.len() + (*num_samples as usize) * params.max_tokens.max(0) as usize,
            _ => 0,
        }
    }

    /// Prompt tokens of a sampling job (0 for other jobs).
    pub fn prompt_tokens(&self) -> usize {
        match self {
            Work::Sample { prompt, .. } => prompt.len(),
            _ => 0,
        }
    }

    /// The job's sequences in a decode loop: `num_samples` rows of at most `prompt +
    /// max_tokens` tokens (none for jobs that do not decode).
    pub fn kv_footprint(&self) -> KvFootprint {
        match self {
            Work::Sample {
                prompt,
                num_samples,
                params,
                ..
            } => KvFootprint {
                rows: (*num_samples).max(0) as usize,
                longest: prompt.len() + params.max_tokens.max(0) as usize,
            },
            _ => KvFootprint::default(),
        }
    }

    /// Short name for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Work::Create { .. } => "create_model",
            Work::ForwardBackward { backward: true, .. } => "forward_backward",
            Work::ForwardBackward {
                backward: false, ..
            } => "forward",
            Work::OptimStep { .. } => "optim_step",
            Work::Save {
                kind: CheckpointKind::State,
                ..
            } => "save_state",
            Work::Save {
                kind: CheckpointKind::Sampler,
                ..
            } => "save_weights_for_sampler",
            Work::Save {
                kind: CheckpointKind::External,
                ..
            } => "save_weights_external",
            Work::Load { .. } => "load_state",
            Work::Sample { .. } => "sample",
        }
    }
}

/// A job's result.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Output {
    /// The run exists and is ready.
    Created {
        /// Its id.
        model_id: String,
    },
    /// Per-datum outputs and the loss sum.
    ForwardBackward(RequestOutput),
    /// Gradient norm and step count.
    OptimStep(StepStats),
    /// The checkpoint's `tinker://` path.
    Saved {
        /// `tinker://<run>/<kind>/<name>`.
        path: String,
        /// The sampling session opened over it, when asked.
        sampler_id: Option<String>,
    },
    /// Weights replaced from a checkpoint.
    Loaded {
        /// The checkpoint's path.
        path: String,
    },
    /// Generated sequences.
    Sample(SampleOutput),
    /// A custom loss was created (`create_custom_loss`).
    CustomLoss {
        /// Its id, for `forward_backward`'s `loss_fn_config.loss_id`.
        loss_id: String,
    },
}

/// A queued job.
#[derive(Debug)]
pub struct Job {
    /// Its future's id.
    pub id: RequestId,
    /// The queue it waits in.
    pub queue: QueueKey,
    /// What to do.
    pub work: Work,
    /// When it was admitted.
    pub enqueued: Instant,
    /// The submitting request's span, entered on the worker.
    pub span: tracing::Span,
    /// Its place in the journal ([`crate::journal`]); `None` when not journaled.
    pub seq: Option<i64>,
    /// A `forward_backward` run again after a crash only to rebuild its run's gradients: its
    /// future already holds its result, which is neither replaced nor metered again.
    pub replay: bool,
}

/// What sequences in one decode loop may come to hold in keys and values. A batch's cache pads
/// every row to its longest one, so sequences take `rows × longest` tokens together, `longest`
/// being the largest `prompt + max_tokens` among them, however short the others are.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KvFootprint {
    /// Sequences (rows of the batch).
    pub rows: usize,
    /// The longest a sequence may grow (prompt and sampled tokens).
    pub longest: usize,
}

impl KvFootprint {
    /// Tokens of keys and values: `rows × longest`.
    pub fn tokens(&self) -> usize {
        self.rows * self.longest
    }

    /// These sequences and `other`'s in one loop.
    pub fn and(self, other: KvFootprint) -> KvFootprint {
        KvFootprint {
            rows: self.rows + other.rows,
            longest: self.longest.max(other.longest),
        }
    }
}
