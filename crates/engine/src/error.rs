//! Errors of the engine, each with a stable kind the API maps to an HTTP status.

use loraloom_model::ModelError;

/// Everything a submission or a job can fail with.
#[derive(Debug, Clone, PartialEq, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum EngineError {
    /// An id that does not exist for this tenant (another tenant's ids are reported the same way).
    #[error("{what} `{id}` not found")]
    NotFound {
        /// What kind of id.
        what: String,
        /// The id as given.
        id: String,
    },
    /// Bad input; names the field.
    #[error("invalid `{field}`: {reason}")]
    InvalidInput {
        /// The offending field.
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// A queue or resource limit is full: try again later.
    #[error("server busy: {0}; try again later")]
    Overloaded(String),
    /// A resource limit (runs per tenant, runs overall) is reached; retrying will not help
    /// until something is released.
    #[error("limit reached: {0}")]
    LimitReached(String),
    /// The job waited in its queue longer than the queue timeout.
    #[error("job waited {waited_s:.1}s in the queue (limit {limit_s:.1}s) and was dropped")]
    TimedOut {
        /// Seconds waited.
        waited_s: f64,
        /// The limit.
        limit_s: f64,
    },
    /// A sampling job decoded longer than the server's limit and was stopped.
    #[error("sampling ran {ran_s:.1}s, over this server's limit of {limit_s:.1}s per request (--max-sample-secs); ask for fewer samples or tokens")]
    RanTooLong {
        /// Seconds it ran.
        ran_s: f64,
        /// The limit.
        limit_s: f64,
    },
    /// The request conflicts with the current state (e.g. publishing what is already public).
    #[error("{0}")]
    Conflict(String),
    /// The job was cancelled (queued, or a sampling job between two tokens).
    #[error("job was cancelled")]
    Cancelled,
    /// The server stopped (or restarted) before the job finished.
    #[error("server restarted before the job finished")]
    ServerRestarted,
    /// Gradients accumulated by `forward_backward` before a restart were lost, so the optimizer
    /// step that would have used them is refused (and the partial gradients discarded).
    #[error("gradients accumulated before the server restarted were lost; run forward_backward again, then optim_step")]
    GradientsLost,
    /// The server is shutting down and admits no new work.
    #[error("server is shutting down")]
    ShuttingDown,
    /// A failure inside the model or the filesystem (details logged, message kept short).
    #[error("internal error: {0}")]
    Internal(String),
}

impl EngineError {
    /// Shorthand for [`EngineError::InvalidInput`].
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        EngineError::InvalidInput {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// Stable snake_case tag (also the metric label).
    pub fn kind(&self) -> &'static str {
        match self {
            EngineError::NotFound { .. } => "not_found",
            EngineError::InvalidInput { .. } => "invalid_input",
            EngineError::Overloaded(_) => "overloaded",
            EngineError::LimitReached(_) => "limit_reached",
            EngineError::TimedOut { .. } => "timed_out",
            EngineError::RanTooLong { .. } => "time_limit",
            EngineError::Cancelled => "cancelled",
            EngineError::Conflict(_) => "conflict",
            EngineError::ServerRestarted => "server_restarted",
            EngineError::GradientsLost => "gradients_lost",
            EngineError::ShuttingDown => "shutting_down",
            EngineError::Internal(_) => "internal",
        }
    }

    /// Whether the client caused it (as opposed to the server).
    pub fn is_user_error(&self) -> bool {
        matches!(
            self,
            EngineError::NotFound { .. }
                | EngineError::InvalidInput { .. }
                | EngineError::Cancelled
                | EngineError::Conflict(_)
                | EngineError::RanTooLong { .. }
                | EngineError::LimitReached(_)
                | EngineError::GradientsLost
        )
    }
}

impl From<ModelError> for EngineError {
    fn from(e: ModelError) -> Self {
        match e {
            ModelError::InvalidInput { field, reason } => {
                EngineError::InvalidInput { field, reason }
            }
            ModelError::NonFiniteStep => EngineError::invalid("adam_params", e.to_string()),
            ModelError::MissingTensor(_)
            | ModelError::WrongShape { .. }
            | ModelError::Config(_) => EngineError::invalid("checkpoint", e.to_string()),
            other => EngineError::Internal(other.to_string()),
        }
    }
}

/// Result alias of the engine.
pub type Result<T> = std::result::Result<T, EngineError>;
