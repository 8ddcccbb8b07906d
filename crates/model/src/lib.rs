//! loraloom's model crate: everything that touches libtorch.
//!
//! It owns Hugging Face config parsing and safetensors loading ([`config`], [`weights`]), the
//! frozen decoder of the Llama / Mistral / Qwen2 / Qwen3 families ([`decoder`], [`rope`]), and
//! LoRA adapters stored stacked in per-layout slabs ([`slab`]) and applied to a batch of many
//! adapters with a fixed number of kernels per layer ([`lora`]), the Tinker losses ([`loss`]),
//! fused multi-adapter training steps split to fit a memory budget ([`train`], [`memory`]), one
//! fused AdamW step over many runs ([`adam`]), PEFT-layout checkpoints ([`checkpoint`]) and
//! KV-cache sampling batched across adapters ([`sample`], [`kv_cache`]). It knows nothing of
//! HTTP, tenants or queues.

pub mod adam;
pub mod checkpoint;
pub mod config;
pub mod decoder;
pub mod error;
pub mod kv_cache;
pub mod lora;
pub mod loss;
pub mod memory;
pub mod prefix_cache;
pub mod rng;
pub mod rope;
pub mod sample;
pub mod scoring;
pub mod slab;
pub mod step_graph;
pub mod tokenizer;
pub mod train;
pub mod weights;

pub use adam::{step_many, AdamParams, AdamState, StepJob, StepStats};
pub use config::{Architecture, ModelConfig};
pub use decoder::Decoder;
pub use error::{ModelError, Result};
pub use lora::{AdapterIdentity, AdapterStack, LoraAdapter, LoraBatch, LoraPair, LoraSpec, Target};
pub use loss::{LossFn, LossInputs};
pub use memory::{human_bytes, parse_bytes, PassCost, NO_LIMIT};
pub use sample::{
    sample, sample_with, Generation, RequestTag, SampleOutput, SampleRequest, SampledSequence,
    SamplingParams, StepReport, Stop, StopReason,
};
pub use scoring::{AltTokens, CsrLayout, PromptScores, Scoring, TopK, MAX_SCORED_WIDTH};
pub use slab::Field;
pub use step_graph::{GraphCounts, StepGraphs};
/// The device type of every tensor (re-exported so that callers need not depend on `tch`).
pub use tch::Device;
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

/// Resolves a device choice: `auto` (the first GPU when libtorch sees one, else the CPU), `cpu`,
/// `cuda` (the first GPU) or `cuda:N`. Asking for a GPU libtorch cannot see is an error, never a
/// silent fallback to the CPU.
pub fn parse_device(choice: &str) -> Result<tch::Device> {
    let gpus = tch::Cuda::device_count();
    let cuda = |index: i64| -> Result<tch::Device> {
        if index < gpus {
            Ok(tch::Device::Cuda(index as usize))
        } else {
            Err(ModelError::invalid(
                "device",
                format!(
                    "`{choice}` asks for GPU {index}, but libtorch sees {gpus} GPU(s){}",
                    if gpus == 0 {
                        " (is this libtorch built with CUDA, and is a driver installed?)"
                    } else {
                        ""
                    }
                ),
            ))
        }
    };
    match choice.trim() {
        "auto" => Ok(if gpus > 0 {
            tch::Device::Cuda(0)
        } else {
            tch::Device::Cpu
        }),
        "cpu" => Ok(tch::Device::Cpu),
        "cuda" => cuda(0),
        other => match other.strip_prefix("cuda:").map(str::parse::<i64>) {
            Some(Ok(index)) if index >= 0 => cuda(index),
            _ => Err(ModelError::invalid(
                "device",
                format!("`{choice}` is not one of auto, cpu, cuda, cuda:N"),
            )),
        },
    }
}

/// A device as users write it (`cpu`, `cuda:0`).
pub fn device_name(device: tch::Device) -> String {
    match device {
        tch::Device::Cpu => "cpu".into(),
        tch::Device::Cuda(i) => format!("cuda:{i}"),
        other => format!("{other:?}").to_lowercase(),
    }
}
