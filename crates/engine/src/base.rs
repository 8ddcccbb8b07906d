//! The frozen base model every tenant shares.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use loraloom_model::{Decoder, ModelConfig, ModelError, Mxfp4Policy, PassCost, TextTokenizer};

/// What clients may know about the served model.
#[derive(Debug, Clone, PartialEq)]
pub struct BaseModelInfo {
    /// The name clients pass as `base_model`.
    pub name: String,
    /// Longest context (prompt + generated tokens).
    pub max_context_length: i64,
    /// Vocabulary size.
    pub vocab_size: i64,
    /// One-line description (architecture, parameters, dtype, device).
    pub summary: String,
    /// Bytes the model's weights take on its device.
    pub weight_bytes: u64,
    /// The base model's compute dtype as users write it (`f32`, `bf16`).
    pub dtype: String,
    /// The model's configuration (for validating LoRA specs at submission).
    pub config: ModelConfig,
    /// What a training pass of it holds per token (for refusing what no memory budget fits).
    pub pass_cost: PassCost,
}

/// The base model: loaded once. libtorch tensors are `Send` but not `Sync`, so each worker
/// thread owns a shallow clone of the decoder (same storage, one copy of the weights); other
/// threads see only [`BaseModelInfo`].
pub struct BaseModel {
    info: BaseModelInfo,
    dir: PathBuf,
    decoder: Decoder,
    tokenizer: Arc<TextTokenizer>,
}

impl BaseModel {
    /// Loads the checkpoint in `dir` on `device` in `kind` (`None`: f32 on the CPU, bf16 on a
    /// GPU), its MXFP4 weights as `mxfp4` says, and names it `name`.
    pub fn load(
        name: &str,
        dir: &Path,
        device: loraloom_model::Device,
        kind: Option<loraloom_model::Kind>,
        mxfp4: Mxfp4Policy,
    ) -> Result<Self, ModelError> {
        let decoder = Decoder::load_with(dir, device, kind, mxfp4)?;
        let tokenizer = TextTokenizer::from_dir(dir)?;
        let info = BaseModelInfo {
            name: name.to_string(),
            max_context_length: decoder.config().max_position_embeddings,
            vocab_size: decoder.config().vocab_size,
            summary: decoder.summary(),
            weight_bytes: decoder.weight_bytes(),
            dtype: loraloom_model::dtype_name(decoder.kind()),
            config: decoder.config().clone(),
            pass_cost: PassCost::new(decoder.config(), decoder.kind())
                .with_dequantized_weights(decoder.dequantized_weight_bytes()),
        };
        Ok(BaseModel {
            info,
            dir: dir.to_path_buf(),
            decoder,
            tokenizer: Arc::new(tokenizer),
        })
    }

    /// Public facts about the model.
    pub fn info(&self) -> &BaseModelInfo {
        &self.info
    }

    /// The checkpoint directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The decoder.
    pub fn decoder(&self) -> &Decoder {
        &self.decoder
    }

    /// The model's tokenizer.
    pub fn tokenizer(&self) -> &Arc<TextTokenizer> {
        &self.tokenizer
    }
}
