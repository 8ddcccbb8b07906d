//! Errors of the model crate.

use std::path::PathBuf;

/// Everything that can go wrong while loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file the checkpoint needs is missing or unreadable.
    #[error("cannot read {path}: {reason}")]
    MissingFile {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        reason: String,
    },
    /// `config.json` is malformed or inconsistent.
    #[error("{0}")]
    Config(String),
    /// `model_type` names a family loraloom does not implement.
    #[error("unsupported architecture `{0}` (supported: llama, mistral, qwen2, qwen3, qwen3_moe, mixtral, gpt_oss)")]
    UnsupportedArchitecture(String),
    /// A tensor the architecture needs is absent from the checkpoint.
    #[error("checkpoint is missing tensor `{0}`")]
    MissingTensor(String),
    /// A tensor has the wrong shape for the configuration.
    #[error("tensor `{name}` has shape {found:?}, expected {expected:?}")]
    WrongShape {
        /// Tensor name.
        name: String,
        /// Shape in the file.
        found: Vec<i64>,
        /// Shape the config implies.
        expected: Vec<i64>,
    },
    /// An optimizer step left the run's weights non-finite; the step was not counted and the
    /// gradients were discarded, but the row holds the bad values until the caller restores it.
    #[error("the optimizer step made the weights non-finite (NaN or infinite)")]
    NonFiniteStep,
    /// Input that cannot be run (bad token ids, mismatched lengths, ...); names the field.
    #[error("invalid `{field}`: {reason}")]
    InvalidInput {
        /// The offending field.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The tokenizer could not be loaded or used.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// An error raised inside libtorch.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    /// A decode step could not be recorded or replayed as a CUDA graph.
    #[error("{0}")]
    Graph(#[from] loraloom_cuda_graph::GraphError),
    /// Packed MXFP4 weights could not be read or multiplied.
    #[error("{0}")]
    Mxfp4(#[from] loraloom_mxfp4::Mxfp4Error),
    /// Filesystem error while writing or reading checkpoints.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

impl ModelError {
    /// Shorthand for [`ModelError::InvalidInput`].
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        ModelError::InvalidInput {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// This failure, for another request that shared the work that failed (the error itself
    /// is not `Clone`: libtorch's and I/O errors are not): an invalid input stays one, any other
    /// becomes a libtorch error with this one's message.
    pub fn for_another(&self) -> Self {
        match self {
            ModelError::InvalidInput { field, reason } => ModelError::invalid(field, reason),
            other => ModelError::Torch(tch::TchError::Torch(other.to_string())),
        }
    }
}

/// Result alias of the model crate.
pub type Result<T> = std::result::Result<T, ModelError>;
