//! loraloom's model crate: everything that touches libtorch.
//!
//! It owns Hugging Face config parsing and safetensors loading ([`config`], [`weights`]), the
//! frozen decoder of the Llama / Mistral / Qwen2 / Qwen3 families ([`decoder`], [`rope`]) with
//! the Qwen3-MoE and Mixtral mixtures of experts ([`moe`]), and
//! LoRA adapters stored stacked in per-layout slabs ([`slab`]) and applied to a batch of many
//! adapters with a fixed number of kernels per layer ([`lora`]), the Tinker losses ([`loss`]),
//! fused multi-adapter training steps split to fit a memory budget ([`train`], [`memory`]), one
//! fused AdamW step over many runs ([`adam`]), PEFT-layout checkpoints ([`checkpoint`]) and
//! KV-cache sampling batched across adapters ([`sample`], [`kv_cache`]). It knows nothing of
//! HTTP, tenants or queues.

pub mod adam;
pub mod chat_template;
pub mod checkpoint;
pub mod config;
pub mod custom_loss;
pub mod custom_ops;
pub mod decoder;
pub mod draw;
pub mod error;
pub mod kv_cache;
pub mod lora;
pub mod loss;
pub mod memory;
pub mod moe;
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
pub use chat_template::ChatTemplate;
pub use config::{Architecture, ModelConfig, MoeConfig};
pub use custom_loss::{CustomLoss, DatumLoss, InputValues, LossParam, NamedInput};
pub use decoder::{Decoder, Mxfp4Policy};
pub use error::{ModelError, Result};
pub use lora::{
    held_bytes, AdapterIdentity, AdapterStack, LoraAdapter, LoraBatch, LoraPair, LoraSpec, Target,
};
pub use loss::{LossFn, LossInputs, MAX_TARGETS_PER_POSITION};
pub use memory::{human_bytes, parse_bytes, PassCost, NO_LIMIT};
pub use sample::{
    sample, sample_with, Generation, RequestTag, SampleOutput, SampleRequest, SampledSequence,
    SamplingParams, StepReport, Stop, StopReason, StreamedToken,
};
pub use scoring::{AltTokens, CsrLayout, PromptScores, Scoring, TopK, MAX_SCORED_WIDTH};
pub use slab::Field;
pub use step_graph::{GraphCounts, StepGraphs};
/// The device type of every tensor (re-exported so that callers need not depend on `tch`).
pub use tch::Device;
/// The dtype of a tensor (re-exported so that callers need not depend on `tch`).
pub use tch::Kind;
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

/// Resolves a compute dtype choice for the base model: `auto` (`None`: f32 on the CPU, bf16 on a
/// GPU), `f32` or `bf16`. Adapters, their gradients and Adam's moments stay f32 whatever it is.
pub fn parse_dtype(choice: &str) -> Result<Option<tch::Kind>> {
    match choice.trim() {
        "auto" => Ok(None),
        "f32" | "float32" => Ok(Some(tch::Kind::Float)),
        "bf16" | "bfloat16" => Ok(Some(tch::Kind::BFloat16)),
        _ => Err(ModelError::invalid(
            "dtype",
            format!("`{choice}` is not one of auto, f32, bf16"),
        )),
    }
}

/// A compute dtype as users write it (`f32`, `bf16`).
pub fn dtype_name(kind: tch::Kind) -> String {
    match kind {
        tch::Kind::Float => "f32".into(),
        tch::Kind::BFloat16 => "bf16".into(),
        tch::Kind::Half => "f16".into(),
        other => format!("{other:?}").to_lowercase(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_and_dtypes_parse_as_users_write_them() {
        assert_eq!(parse_device("cpu").unwrap(), tch::Device::Cpu);
        let beyond = format!("cuda:{}", tch::Cuda::device_count());
        let err = parse_device(&beyond).unwrap_err().to_string();
        assert!(err.contains("device") && err.contains(&beyond), "{err}");
        assert!(parse_device("gpu").is_err());
        assert_eq!(parse_dtype("auto").unwrap(), None);
        assert_eq!(parse_dtype("f32").unwrap(), Some(tch::Kind::Float));
        assert_eq!(parse_dtype(" bf16 ").unwrap(), Some(tch::Kind::BFloat16));
        assert_eq!(parse_dtype("bfloat16").unwrap(), Some(tch::Kind::BFloat16));
        let err = parse_dtype("fp8").unwrap_err().to_string();
        assert!(
            err.contains("dtype") && err.contains("auto, f32, bf16"),
            "{err}"
        );
        assert_eq!(dtype_name(tch::Kind::BFloat16), "bf16");
        assert_eq!(dtype_name(tch::Kind::Float), "f32");
    }
}
