//! State shared by every handler.

use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use loraloom_engine::registry::LastAccess;
use loraloom_engine::{Engine, EngineError, ModelKey, QueueKey, RequestId, Work};
use loraloom_model::LoraSpec;
use serde::{Deserialize, Serialize};

use crate::auth::Auth;

/// A client session (`create_session`).
#[derive(Debug, Clone)]
pub struct Session {
    /// Owner.
    pub tenant: String,
    /// Creation time (unix seconds).
    pub created: f64,
    /// What the client said about it and what became of it (stored as JSON).
    pub details: SessionDetails,
    /// When its client was last heard from: a heartbeat, or a run or sampling session created
    /// in it (not stored: a restart counts as hearing from every client, so downtime never
    /// makes a session look abandoned). Clones share it.
    pub heard_from: Arc<LastAccess>,
}

impl Session {
    /// A session of `tenant` created at `created` (unix seconds), heard from now.
    pub fn new(tenant: String, created: f64, details: SessionDetails) -> Self {
        Session {
            tenant,
            created,
            details,
            heard_from: Arc::new(LastAccess::now()),
        }
    }

    /// Seconds since its client was last heard from.
    pub fn silent_for(&self) -> f64 {
        loraloom_engine::registry::unix_now() - self.heard_from.get()
    }
}

/// A session's description and fate: everything about it but its owner and creation time.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SessionDetails {
    /// Tags the SDK sends.
    #[serde(default)]
    pub tags: Vec<String>,
    /// The client's metadata.
    #[serde(default)]
    pub user_metadata: Option<serde_json::Map<String, serde_json::Value>>,
    /// A name for display and search.
    #[serde(default)]
    pub display_name: Option<String>,
    /// The project it belongs to (none: the default project).
    #[serde(default)]
    pub project_id: Option<String>,
    /// How its client finished it (`ServiceClient.close`); a finished session takes no new
    /// runs or sampling sessions.
    #[serde(default)]
    pub finished: Option<SessionFinish>,
}

/// A client's report that it is done with a session.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionFinish {
    /// `success`, `errored` or `interrupted`.
    pub reason: String,
    /// The client's explanation.
    pub detail: Option<String>,
    /// When (unix seconds).
    pub at: f64,
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
    /// SDK sampling clients poll one completion feed each (`--sample-poller`).
    pub sample_poller: bool,
    /// Largest accepted body.
    pub max_body_bytes: usize,
    /// How long a request body may take to arrive.
    pub body_timeout: Duration,
    /// Sessions one tenant may hold (`--max-sessions-per-tenant`, 0 = no limit).
    pub max_sessions_per_tenant: usize,
    /// How long a session's client may go unheard, with none of its runs used, before its runs
    /// count as abandoned (`--session-timeout-secs`; `None`: never).
    pub session_timeout: Option<Duration>,
    /// `/metrics` answers without a key (and shows no tenant's series).
    pub public_metrics: bool,
    /// Where the model runs, for stats.
    pub device: String,
    /// What the SDK loads the tokenizer from (a directory or a Hugging Face name).
    pub tokenizer_id: String,
    /// The model's tokenizer (the OpenAI-compatible routes take and answer text).
    pub tokenizer: Arc<loraloom_model::TextTokenizer>,
    /// The model's chat template, if it has one (`/oai/api/v1/chat/completions`).
    pub chat_template: Option<Arc<loraloom_model::ChatTemplate>>,
    /// The tokens an OpenAI-compatible completion stops at
    /// ([`loraloom_model::chat_template::end_tokens`]).
    pub end_tokens: Vec<i64>,
    /// Signs the download URLs of exported weights.
    pub downloads: Arc<crate::downloads::Signer>,
    /// The base of URLs handed to clients (`--public-url`); `None`: the request's own host.
    pub public_url: Option<String>,
}

impl AppState {
    /// Queues `work` on `queue` for the request being served: its replay key goes into the job
    /// journal with the job, so that its retry after a crash gets the same future
    /// ([`Engine::submit_keyed`], [`crate::idempotency::client_key`]).
    pub fn submit(&self, queue: QueueKey, work: Work) -> Result<RequestId, EngineError> {
        self.submit_reporting(queue, work, None)
    }

    /// [`AppState::submit`], reporting to a sampling client's feed ([`Engine::submit_reporting`]).
    pub fn submit_reporting(
        &self,
        queue: QueueKey,
        work: Work,
        clone: Option<u64>,
    ) -> Result<RequestId, EngineError> {
        let key = crate::idempotency::client_key();
        self.engine.submit_keyed(queue, work, clone, key.as_deref())
    }

    /// Whether the request being served is the retry of one whose job the journal held at start
    /// (its first attempt's answer was cut off by a crash): its submission will get that job's
    /// future, so what a new job needs first (room for a new run) is not needed.
    pub fn is_journaled_retry(&self, tenant: &str) -> bool {
        let client_key = crate::idempotency::client_key();
        self.engine
            .journaled(tenant, client_key.as_deref())
            .is_some()
    }

    /// [`Engine::create_model`] for the request being served (see [`AppState::submit`]).
    pub fn create_model(
        &self,
        key: ModelKey,
        spec: LoraSpec,
        user_metadata: serde_json::Value,
        from: Option<(String, bool)>,
    ) -> Result<RequestId, EngineError> {
        let client_key = crate::idempotency::client_key();
        self.engine
            .create_model_keyed(key, spec, user_metadata, from, client_key.as_deref())
    }
}
