//! loraloom's engine: the shared base model, the registry of training runs, sampling sessions
//! and checkpoints, per-queue FIFOs, the scheduler that fuses different tenants' jobs into one
//! batch, the bounded pool of worker threads, and the futures store. It knows nothing of HTTP
//! or JSON; see `CONCURRENCY.md` for every lock and thread.

pub mod backend;
pub mod base;
pub mod engine;
pub mod error;
pub mod export;
pub mod futures;
pub mod job;
pub mod journal;
pub mod metric;
pub mod queue;
pub mod registry;
pub mod store;
pub mod timeline;
pub mod usage;

pub use backend::{Admitted, Backend, DecodeStep, KvHeld, ModelWorker};
pub use base::{BaseModel, BaseModelInfo};
pub use engine::{Engine, EngineConfig, OrderLog, QueueStats, StatsSnapshot, TenantUsage};
pub use error::{EngineError, Result};
pub use futures::{Completion, FeedKey, FeedPoll, FutureState, FutureStore};
pub use job::{
    CheckpointKind, KvFootprint, ModelKey, Output, QueueKey, RequestId, SamplerKey, SaveOptions,
    TenantId, Work,
};
pub use queue::Limits;
pub use registry::{CheckpointRecord, Registry, SamplerSource};
pub use store::{AuditRow, SampleRow, SessionRow, SqliteStore, Store};
pub use usage::{UsageKind, UsageRow};
