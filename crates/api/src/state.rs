//! State shared by every handler.

use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use loraloom_engine::Engine;

use crate::auth::Auth;

/// A client session (`create_session`).
#[derive(Debug, Clone)]
pub struct Session {
    /// Owner.
    pub tenant: String,
    /// Creation time (unix seconds).
    pub created: f64,
}

/// Handler state (cheap to clone).
#[derive(Clone)]
pub struct AppState {
    /// The engine.
    pub engine: Engine,
    /// API keys.
    pub auth: Arc<Auth>,
    /// Sessions by id.
    pub sessions: Arc<DashMap<String, Session>>,
    /// How long one `retrieve_future` waits before answering "try again".
    pub long_poll: Duration,
    /// Largest accepted body.
    pub max_body_bytes: usize,
    /// How long a request body may take to arrive.
    pub body_timeout: Duration,
    /// `/metrics` answers without a key (and shows no tenant's series).
    pub public_metrics: bool,
    /// Where the model runs, for stats.
    pub device: String,
    /// What the SDK loads the tokenizer from (a directory or a Hugging Face name).
    pub tokenizer_id: String,
}
