//! loraloom's model crate: everything that touches libtorch.
//!
//! It owns Hugging Face config parsing and safetensors loading ([`config`], [`weights`]), the
//! frozen decoder of the Llama / Mistral / Qwen2 / Qwen3 families ([`decoder`], [`rope`]), and
//! LoRA adapters applied per batch segment ([`lora`]), the Tinker losses ([`loss`]), fused
//! multi-adapter training steps ([`train`]), Adam ([`adam`]), PEFT-layout checkpoints
//! ([`checkpoint`]) and KV-cache sampling batched across adapters ([`sample`], [`kv_cache`]). It knows nothing of HTTP, tenants or queues.

pub mod adam;
pub mod checkpoint;
pub mod config;
pub mod decoder;
pub mod error;
pub mod kv_cache;
pub mod lora;
pub mod loss;
pub mod rng;
pub mod rope;
pub mod sample;
pub mod tokenizer;
pub mod train;
pub mod weights;

pub use adam::{AdamParams, AdamState, StepStats};
pub use config::{Architecture, ModelConfig};
pub use decoder::Decoder;
pub use error::{ModelError, Result};
pub use lora::{LoraAdapter, LoraBatch, LoraSpec, Segment, Target};
pub use loss::{LossFn, LossInputs};
pub use sample::{
    sample, SampleOutput, SampleRequest, SampledSequence, SamplingParams, Stop, StopReason,
};
pub use tokenizer::TextTokenizer;
pub use train::{forward_backward, Datum, DatumOutput, RequestOutput, TrainRequest};

/// libtorch's intra-op thread count as seen by the calling thread.
pub fn intra_op_threads() -> i32 {
    tch::get_num_threads()
}

/// Sets libtorch's intra-op thread count for the calling thread (OpenMP keeps it per thread, so
/// every worker thread must set it).
pub fn set_intra_op_threads(n: i32) {
    tch::set_num_threads(n)
}

/// Picks CUDA when libtorch sees a GPU, else the CPU.
pub fn default_device() -> tch::Device {
    tch::Device::cuda_if_available()
}
