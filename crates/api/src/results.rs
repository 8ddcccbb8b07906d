//! Engine outputs → what the SDK parses: JSON for most results, protobuf for
//! `ForwardBackwardOutput` and `SampleResponse` when the client accepts it.

use axum::http::header::{HeaderName, ACCEPT, CONTENT_TYPE};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use loraloom_engine::Output;
use loraloom_model::{RequestOutput, SampleOutput, StopReason};
use prost::Message;
use serde_json::{json, Value};

use crate::proto;

/// Content type of protobuf bodies.
pub const PROTOBUF: &str = "application/x-protobuf";

/// Whether `headers` name protobuf in `name`.
fn names_protobuf(headers: &HeaderMap, name: HeaderName) -> bool {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains(PROTOBUF))
}

/// Whether a request body is protobuf (by its content type).
pub fn is_protobuf(headers: &HeaderMap) -> bool {
    names_protobuf(headers, CONTENT_TYPE)
}

/// Whether the client accepts a protobuf answer.
pub fn accepts_protobuf(headers: &HeaderMap) -> bool {
    names_protobuf(headers, ACCEPT)
}

fn tensor_json(values: &[f32]) -> Value {
    json!({"data": values, "dtype": "float32", "shape": [values.len()]})
}

fn stop_name(r: StopReason) -> &'static str {
    match r {
        StopReason::Stop => "stop",
        StopReason::Length => "length",
    }
}

/// `ForwardBackwardOutput` as JSON.
pub fn forward_backward_json(out: &RequestOutput) -> Value {
    let outputs: Vec<Value> = out
        .outputs
        .iter()
        .map(|d| json!({"logprobs": tensor_json(&d.logprobs), "elementwise_loss": tensor_json(&d.elementwise_loss)}))
        .collect();
    json!({
        "loss_fn_output_type": "ArrayRecord",
        "loss_fn_outputs": outputs,
        "metrics": {"loss:sum": out.loss_sum},
    })
}

/// `ForwardBackwardOutput` as protobuf.
pub fn forward_backward_proto(out: &RequestOutput) -> Vec<u8> {
    let batched = |pick: fn(&loraloom_model::DatumOutput) -> &Vec<f32>| {
        let mut data = Vec::new();
        let mut offsets = vec![0i64];
        for d in &out.outputs {
            data.extend(proto::f32_bytes(pick(d)));
            offsets.push(data.len() as i64);
        }
        proto::BatchedTensor {
            data,
            offsets: proto::i64_bytes(&offsets),
            dtype: proto::dtype::FLOAT32,
            trailing_shape: Vec::new(),
        }
    };
    let mut fields = std::collections::HashMap::new();
    fields.insert("logprobs".to_string(), batched(|d| &d.logprobs));
    fields.insert(
        "elementwise_loss".to_string(),
        batched(|d| &d.elementwise_loss),
    );
    let msg = proto::ForwardBackwardOutput {
        loss_fn_output_type: "ArrayRecord".into(),
        loss_fn_outputs: vec![proto::ArrayRecord {
            type_tag: "ArrayRecord".into(),
            fields,
            num_datums: out.outputs.len() as i64,
        }],
        metrics: [("loss:sum".to_string(), out.loss_sum)]
            .into_iter()
            .collect(),
    };
    msg.encode_to_vec()
}

/// `SampleResponse` as JSON.
pub fn sample_json(out: &SampleOutput) -> Value {
    let sequences: Vec<Value> = out
        .sequences
        .iter()
        .map(|s| json!({"tokens": s.tokens, "logprobs": s.logprobs, "stop_reason": stop_name(s.stop_reason)}))
        .collect();
    json!({"type": "sample", "sequences": sequences, "prompt_logprobs": out.prompt_logprobs})
}

/// `SampleResponse` as protobuf (absent prompt logprobs are NaN, as the SDK expects).
pub fn sample_proto(out: &SampleOutput) -> Vec<u8> {
    let sequences = out
        .sequences
        .iter()
        .map(|s| {
            let tokens: Vec<i32> = s.tokens.iter().map(|&t| t as i32).collect();
            proto::SampledSequence {
                stop_reason: match s.stop_reason {
                    StopReason::Stop => proto::stop_reason::STOP,
                    StopReason::Length => proto::stop_reason::LENGTH,
                },
                tokens: proto::i32_bytes(&tokens),
                logprobs: Some(proto::f32_bytes(&s.logprobs)),
            }
        })
        .collect();
    let prompt_logprobs = out.prompt_logprobs.as_ref().map(|lp| {
        let values: Vec<f32> = lp.iter().map(|x| x.unwrap_or(f32::NAN)).collect();
        proto::f32_bytes(&values)
    });
    proto::SampleResponse {
        sequences,
        prompt_logprobs,
        prompt_cache_hit_tokens: 0,
    }
    .encode_to_vec()
}

fn protobuf(bytes: Vec<u8>) -> Response {
    ([(CONTENT_TYPE, PROTOBUF)], bytes).into_response()
}

/// The success body of a finished future. `proto` when the client accepts protobuf.
pub fn output_response(out: &Output, proto_ok: bool) -> Response {
    match out {
        Output::ForwardBackward(r) if proto_ok => protobuf(forward_backward_proto(r)),
        Output::ForwardBackward(r) => Json(forward_backward_json(r)).into_response(),
        Output::Sample(s) if proto_ok => protobuf(sample_proto(s)),
        Output::Sample(s) => Json(sample_json(s)).into_response(),
        other => Json(output_json(other)).into_response(),
    }
}

/// JSON of a result. No `type` tags: the SDK validates a present tag against the type it
/// expects, and one job kind can answer two request types (create_model, load_weights).
pub fn output_json(out: &Output) -> Value {
    match out {
        Output::Created { model_id } => json!({"model_id": model_id}),
        // Not `step`: tinker-cookbook merges these metrics into its own rows, whose `step` is
        // the loop's integer step.
        Output::OptimStep(s) => {
            json!({"metrics": {"grad_norm": s.grad_norm, "optimizer_step": s.step as f64}})
        }
        Output::Saved { path, sampler_id } => match sampler_id {
            Some(id) => json!({"path": path, "sampling_session_id": id}),
            None => json!({"path": path}),
        },
        Output::Loaded { path } => json!({"path": path}),
        Output::ForwardBackward(r) => forward_backward_json(r),
        Output::Sample(s) => sample_json(s),
    }
}
