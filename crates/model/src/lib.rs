//! loraloom's model crate: everything that touches libtorch.
//!
//! It owns Hugging Face config parsing and safetensors loading ([`config`], [`weights`]), the
//! frozen decoder of the Llama / Mistral / Qwen2 / Qwen3 families ([`decoder`], [`rope`]), and
//! LoRA adapters applied per batch segment ([`lora`]). It knows nothing of HTTP, tenants or
//! queues.

pub mod config;
pub mod decoder;
pub mod error;
pub mod lora;
pub mod rope;
pub mod tokenizer;
pub mod weights;

pub use config::{Architecture, ModelConfig};
pub use decoder::Decoder;
pub use error::{ModelError, Result};
pub use lora::{LoraAdapter, LoraBatch, LoraSpec, Segment, Target};
pub use tokenizer::TextTokenizer;

/// Picks CUDA when libtorch sees a GPU, else the CPU.
pub fn default_device() -> tch::Device {
    tch::Device::cuda_if_available()
}
