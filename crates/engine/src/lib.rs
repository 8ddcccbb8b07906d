//! loraloom's engine: owns the one shared copy of the base model and, as the project grows, the
//! adapter registry, per-adapter FIFO queues, the scheduler and the futures store.
//! It knows nothing of HTTP or JSON.

pub mod base;

pub use base::{BaseModel, BaseModelInfo};
