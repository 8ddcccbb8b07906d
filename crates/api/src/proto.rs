//! The protobuf messages of the SDK's `tinker_public` package that loraloom reads or writes
//! (field numbers from `tinker/proto/tinker_public_pb2.py`, see `docs/protocol.md`), declared
//! with prost's derive so no code generator runs at build time. Byte fields are little-endian
//! packed arrays.

use std::collections::HashMap;

/// `DType` enum values.
pub mod dtype {
    /// float32.
    pub const FLOAT32: i32 = 1;
    /// int64.
    pub const INT64: i32 = 2;
    /// int32.
    pub const INT32: i32 = 3;
}

/// `StopReason` enum values.
pub mod stop_reason {
    /// A stop condition matched.
    pub const STOP: i32 = 0;
    /// `max_tokens` reached.
    pub const LENGTH: i32 = 1;
}

/// `SparseCsr`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SparseCsr {
    /// Values.
    #[prost(bytes = "vec", tag = "1")]
    pub values: Vec<u8>,
    /// int64 row pointers.
    #[prost(bytes = "vec", tag = "2")]
    pub crow_indices: Vec<u8>,
    /// int64 column indices.
    #[prost(bytes = "vec", tag = "3")]
    pub col_indices: Vec<u8>,
}

/// `Tensor.encoding` oneof.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Encoding {
    /// Dense little-endian values.
    #[prost(bytes, tag = "1")]
    Dense(Vec<u8>),
    /// Sparse CSR.
    #[prost(message, tag = "2")]
    SparseCsr(SparseCsr),
}

/// `Tensor`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Tensor {
    /// Dense or sparse values.
    #[prost(oneof = "Encoding", tags = "1, 2")]
    pub encoding: Option<Encoding>,
    /// [`dtype`] value.
    #[prost(int32, tag = "3")]
    pub dtype: i32,
    /// Shape.
    #[prost(int64, repeated, tag = "4")]
    pub shape: Vec<i64>,
}

/// `BatchedTensor`: every datum's values concatenated, with int64 *byte* offsets.
#[derive(Clone, PartialEq, prost::Message)]
pub struct BatchedTensor {
    /// Values.
    #[prost(bytes = "vec", tag = "1")]
    pub data: Vec<u8>,
    /// `num_datums + 1` int64 byte offsets.
    #[prost(bytes = "vec", tag = "2")]
    pub offsets: Vec<u8>,
    /// [`dtype`] value.
    #[prost(int32, tag = "3")]
    pub dtype: i32,
    /// Shape after the first dimension.
    #[prost(int64, repeated, tag = "4")]
    pub trailing_shape: Vec<i64>,
}

/// `ArrayRecord`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ArrayRecord {
    /// Free text.
    #[prost(string, tag = "1")]
    pub type_tag: String,
    /// Output name → values of every datum.
    #[prost(map = "string, message", tag = "2")]
    pub fields: HashMap<String, BatchedTensor>,
    /// Datums.
    #[prost(int64, tag = "3")]
    pub num_datums: i64,
}

/// `ForwardBackwardOutput`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ForwardBackwardOutput {
    /// Output type name.
    #[prost(string, tag = "1")]
    pub loss_fn_output_type: String,
    /// Per-datum outputs.
    #[prost(message, repeated, tag = "2")]
    pub loss_fn_outputs: Vec<ArrayRecord>,
    /// `name:reduction` → value.
    #[prost(map = "string, double", tag = "3")]
    pub metrics: HashMap<String, f64>,
}

/// `LossConfigValue.value` oneof.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum ConfigValue {
    /// A number.
    #[prost(double, tag = "1")]
    Number(f64),
    /// A string.
    #[prost(string, tag = "2")]
    Text(String),
}

/// `LossConfigValue`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LossConfigValue {
    /// The value.
    #[prost(oneof = "ConfigValue", tags = "1, 2")]
    pub value: Option<ConfigValue>,
}

/// `EncodedTextChunk`: int32 tokens.
#[derive(Clone, PartialEq, prost::Message)]
pub struct EncodedTextChunk {
    /// int32 little-endian tokens.
    #[prost(bytes = "vec", tag = "1")]
    pub tokens: Vec<u8>,
}

/// `Chunk.chunk` oneof (images and audio are recognised only to be refused clearly).
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum ChunkKind {
    /// Tokens.
    #[prost(message, tag = "1")]
    EncodedText(EncodedTextChunk),
    /// An image (not supported by text models).
    #[prost(bytes, tag = "2")]
    Image(Vec<u8>),
    /// Audio (not supported).
    #[prost(bytes, tag = "3")]
    Dmel(Vec<u8>),
}

/// `Chunk`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Chunk {
    /// The chunk.
    #[prost(oneof = "ChunkKind", tags = "1, 2, 3")]
    pub chunk: Option<ChunkKind>,
}

/// `Datum`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Datum {
    /// The model input.
    #[prost(message, repeated, tag = "1")]
    pub model_input: Vec<Chunk>,
    /// Loss inputs by name.
    #[prost(map = "string, message", tag = "2")]
    pub loss_fn_inputs: HashMap<String, Tensor>,
    /// Where each model input token came from (runs tiling the input).
    #[prost(message, repeated, tag = "3")]
    pub model_input_spans: Vec<ProvenanceSpan>,
    /// Where each target token came from (runs tiling `target_tokens`).
    #[prost(message, repeated, tag = "4")]
    pub loss_fn_input_spans: Vec<ProvenanceSpan>,
}

/// `PromptProvenanceSpan` and `SampledProvenanceSpan` (the same fields).
#[derive(Clone, PartialEq, prost::Message)]
pub struct SpanRun {
    /// `SampledSequence.sequence_id`.
    #[prost(string, tag = "1")]
    pub sequence_id: String,
    /// Position of the run in the sequence's prompt or sampled tokens.
    #[prost(int64, tag = "2")]
    pub offset: i64,
    /// Tokens covered.
    #[prost(int64, tag = "3")]
    pub length: i64,
}

/// `ProvenanceSpan.span` oneof.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum SpanKind {
    /// Tokens of a sampling request's prompt.
    #[prost(message, tag = "1")]
    PromptTokens(SpanRun),
    /// Tokens a sampled sequence produced.
    #[prost(message, tag = "2")]
    SampledTokens(SpanRun),
}

/// `ProvenanceSpan`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ProvenanceSpan {
    /// The run.
    #[prost(oneof = "SpanKind", tags = "1, 2")]
    pub span: Option<SpanKind>,
}

/// `ForwardBackwardRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ForwardBackwardRequest {
    /// The run.
    #[prost(string, tag = "1")]
    pub model_id: String,
    /// Client sequence number.
    #[prost(int32, tag = "2")]
    pub seq_id: i32,
    /// The datums.
    #[prost(message, repeated, tag = "3")]
    pub data: Vec<Datum>,
    /// Loss name.
    #[prost(string, tag = "4")]
    pub loss_fn: String,
    /// Numeric loss configuration (legacy).
    #[prost(map = "string, double", tag = "5")]
    pub loss_fn_config: HashMap<String, f64>,
    /// `forward` instead of `forward_backward`.
    #[prost(bool, tag = "6")]
    pub forward_only: bool,
    /// Loss configuration (numbers and strings).
    #[prost(map = "string, message", tag = "7")]
    pub loss_fn_config_v2: HashMap<String, LossConfigValue>,
}

/// `SampledSequence`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SampledSequence {
    /// [`stop_reason`] value.
    #[prost(int32, tag = "1")]
    pub stop_reason: i32,
    /// int32 tokens.
    #[prost(bytes = "vec", tag = "2")]
    pub tokens: Vec<u8>,
    /// float32 logprobs.
    #[prost(bytes = "vec", optional, tag = "3")]
    pub logprobs: Option<Vec<u8>>,
    /// The most likely tokens at each generated position, when asked.
    #[prost(message, optional, tag = "4")]
    pub topk_sampled_logprobs: Option<TopkLogprobs>,
}

/// `TopkLogprobs`: two `[length, k]` row-major matrices; short rows are padded with token 0 and
/// logprob [`TOPK_MASK_LOGPROB`], and a position with nothing is all padding.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TopkLogprobs {
    /// int32 token ids.
    #[prost(bytes = "vec", tag = "1")]
    pub token_ids: Vec<u8>,
    /// float32 logprobs.
    #[prost(bytes = "vec", tag = "2")]
    pub logprobs: Vec<u8>,
    /// Entries per position.
    #[prost(uint32, tag = "3")]
    pub k: u32,
    /// Positions.
    #[prost(uint32, tag = "4")]
    pub length: u32,
}

/// The logprob of `TopkLogprobs` padding (the SDK's `MASK_LOGPROB`).
pub const TOPK_MASK_LOGPROB: f32 = -99999.0;

/// `PromptAltTokens`: `[len - 1, k]` ids (int64) and their logprobs (float32).
#[derive(Clone, PartialEq, prost::Message)]
pub struct PromptAltTokens {
    /// Drawn ids.
    #[prost(message, optional, tag = "1")]
    pub tokens: Option<Tensor>,
    /// Their logprobs.
    #[prost(message, optional, tag = "2")]
    pub logprobs: Option<Tensor>,
}

/// `SampleResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SampleResponse {
    /// Sequences.
    #[prost(message, repeated, tag = "1")]
    pub sequences: Vec<SampledSequence>,
    /// float32 per prompt token, NaN where absent.
    #[prost(bytes = "vec", optional, tag = "2")]
    pub prompt_logprobs: Option<Vec<u8>>,
    /// The most likely tokens at each prompt position, when asked.
    #[prost(message, optional, tag = "3")]
    pub topk_prompt_logprobs: Option<TopkLogprobs>,
    /// Prompt tokens served from a cache.
    #[prost(int32, tag = "4")]
    pub prompt_cache_hit_tokens: i32,
    /// float32 `[len - 1, K]` logprobs of the requested ids, when asked.
    #[prost(message, optional, tag = "5")]
    pub target_prompt_logprobs: Option<Tensor>,
    /// Alternative draws at each prompt position, when asked.
    #[prost(message, optional, tag = "6")]
    pub prompt_alt_tokens: Option<PromptAltTokens>,
}

/// Little-endian bytes of `f32`s.
pub fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Little-endian bytes of `i32`s.
pub fn i32_bytes(values: &[i32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Little-endian bytes of `i64`s.
pub fn i64_bytes(values: &[i64]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Decodes packed little-endian values of `N` bytes each; `None` if the length is ragged.
pub fn unpack<const N: usize, T>(bytes: &[u8], from: fn([u8; N]) -> T) -> Option<Vec<T>> {
    if !bytes.len().is_multiple_of(N) {
        return None;
    }
    Some(
        bytes
            .chunks_exact(N)
            .map(|c| from(c.try_into().expect("exact chunk")))
            .collect(),
    )
}
