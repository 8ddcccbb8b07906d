//! The checkpoint's `tokenizer.json`, for turning text into ids and back (stop strings, CLI).

use std::path::Path;

use crate::error::{ModelError, Result};

/// A Hugging Face fast tokenizer.
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
}

impl TextTokenizer {
    /// Loads `tokenizer.json` from a checkpoint directory.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(ModelError::MissingFile {
                path,
                reason: "no tokenizer.json".into(),
            });
        }
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", path.display())))?;
        Ok(TextTokenizer { inner })
    }

    /// Token ids of `text` (no special tokens added).
    pub fn encode(&self, text: &str) -> Result<Vec<i64>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().iter().map(|&i| i as i64).collect())
    }

    /// Token ids of `text` with the tokenizer's special tokens added (a BOS where its
    /// post-processor adds one), as `tokenizer(text)` and vLLM's completions encode a prompt.
    pub fn encode_with_special(&self, text: &str) -> Result<Vec<i64>> {
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().iter().map(|&i| i as i64).collect())
    }

    /// Text of `ids` (special tokens kept).
    pub fn decode(&self, ids: &[i64]) -> Result<String> {
        self.decode_with(ids, false)
    }

    /// Text of `ids`, without its special tokens when `skip_special`.
    pub fn decode_with(&self, ids: &[i64], skip_special: bool) -> Result<String> {
        let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
        self.inner
            .decode(&ids, skip_special)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))
    }

    /// The id of token `text` (a special token's, such as `<|im_end|>`), if it is one.
    pub fn token_id(&self, text: &str) -> Option<i64> {
        self.inner.token_to_id(text).map(i64::from)
    }
}
