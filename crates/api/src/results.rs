//! Engine outputs → what the SDK parses: JSON for most results, protobuf for
//! `ForwardBackwardOutput` and `SampleResponse` when the client accepts it.

use axum::http::header::{HeaderName, ACCEPT, CONTENT_TYPE};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use loraloom_engine::Output;
use loraloom_model::{DatumOutput, RequestOutput, SampleOutput, StopReason, TopK};
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

/// A datum's output tensor as JSON: `[N]`, or `[N, K]` for K targets per position.
fn datum_tensor_json(values: &[f32], targets_per_position: Option<usize>) -> Value {
    let shape = match targets_per_position {
        None => vec![values.len()],
        Some(k) => vec![values.len() / k, k],
    };
    json!({"data": values, "dtype": "float32", "shape": shape})
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
        .map(|d| {
            let k = d.targets_per_position;
            json!({"logprobs": datum_tensor_json(&d.logprobs, k), "elementwise_loss": datum_tensor_json(&d.elementwise_loss, k)})
        })
        .collect();
    let metrics: serde_json::Map<String, Value> = request_metrics(out)
        .into_iter()
        .map(|(k, v)| (k, json!(v)))
        .collect();
    json!({
        "loss_fn_output_type": "ArrayRecord",
        "loss_fn_outputs": outputs,
        "metrics": metrics,
    })
}

/// A forward/backward request's metrics: `loss:sum`, and a custom loss's own.
fn request_metrics(out: &RequestOutput) -> Vec<(String, f64)> {
    std::iter::once(("loss:sum".to_string(), out.loss_sum))
        .chain(out.metrics.iter().cloned())
        .collect()
}

/// `ForwardBackwardOutput` as protobuf: one `ArrayRecord` per run of datums with the same
/// number of targets per position (its `trailing_shape`: `[]`, or `[K]`), as the SDK reads
/// ragged outputs.
pub fn forward_backward_proto(out: &RequestOutput) -> Vec<u8> {
    let record = |datums: &[DatumOutput]| {
        let trailing_shape: Vec<i64> = datums[0]
            .targets_per_position
            .map(|k| k as i64)
            .into_iter()
            .collect();
        let batched = |pick: fn(&DatumOutput) -> &Vec<f32>| {
            let mut data = Vec::new();
            let mut offsets = vec![0i64];
            for d in datums {
                data.extend(proto::f32_bytes(pick(d)));
                offsets.push(data.len() as i64);
            }
            proto::BatchedTensor {
                data,
                offsets: proto::i64_bytes(&offsets),
                dtype: proto::dtype::FLOAT32,
                trailing_shape: trailing_shape.clone(),
            }
        };
        let mut fields = std::collections::HashMap::new();
        fields.insert("logprobs".to_string(), batched(|d| &d.logprobs));
        fields.insert(
            "elementwise_loss".to_string(),
            batched(|d| &d.elementwise_loss),
        );
        proto::ArrayRecord {
            type_tag: "ArrayRecord".into(),
            fields,
            num_datums: datums.len() as i64,
        }
    };
    let records = out
        .outputs
        .chunk_by(|a, b| a.targets_per_position == b.targets_per_position)
        .map(record)
        .collect();
    let msg = proto::ForwardBackwardOutput {
        loss_fn_output_type: "ArrayRecord".into(),
        loss_fn_outputs: records,
        metrics: request_metrics(out).into_iter().collect(),
    };
    msg.encode_to_vec()
}

/// Top-k rows as JSON: `[[id, logprob], ...]` per position, `null` where nothing was scored.
fn top_k_json<'a>(rows: impl IntoIterator<Item = Option<&'a TopK>>) -> Value {
    Value::Array(
        rows.into_iter()
            .map(|row| row.map_or(Value::Null, |r| json!(r)))
            .collect(),
    )
}

/// A `[rows, cols]` matrix as the SDK's JSON `TensorData`.
fn matrix_json<T: serde::Serialize>(rows: &[Vec<T>], dtype: &str) -> Value {
    let data: Vec<&T> = rows.iter().flatten().collect();
    json!({"data": data, "dtype": dtype, "shape": [rows.len(), width(rows)]})
}

/// `SampleResponse` as JSON.
pub fn sample_json(out: &SampleOutput) -> Value {
    let sequences: Vec<Value> = out
        .sequences
        .iter()
        .map(|s| {
            let mut seq = json!({"tokens": s.tokens, "logprobs": s.logprobs, "stop_reason": stop_name(s.stop_reason)});
            if let Some(top) = &s.top_k {
                seq["topk_logprobs"] = top_k_json(top.iter().map(Some));
            }
            seq
        })
        .collect();
    let prompt = &out.prompt;
    let mut body =
        json!({"type": "sample", "sequences": sequences, "prompt_logprobs": prompt.logprobs});
    if let Some(top) = &prompt.top_k {
        body["topk_prompt_logprobs"] = top_k_json(top.iter().map(Option::as_ref));
    }
    if let Some(targets) = &prompt.targets {
        body["target_prompt_logprobs"] = match &prompt.targets_layout {
            Some(layout) => json!({
                "data": layout.gather(targets),
                "dtype": "float32",
                "shape": [targets.len(), width(targets)],
                "sparse_crow_indices": layout.crow,
                "sparse_col_indices": layout.col,
            }),
            None => matrix_json(targets, "float32"),
        };
    }
    if let Some(alt) = &prompt.alt {
        body["prompt_alt_tokens"] = json!({
            "tokens": matrix_json(&alt.tokens, "int64"),
            "logprobs": matrix_json(&alt.logprobs, "float32"),
        });
    }
    body
}

/// Top-k rows as the protobuf `TopkLogprobs` (`k` the widest row; padding where shorter).
fn top_k_proto(rows: &[Option<&TopK>]) -> proto::TopkLogprobs {
    let k = rows.iter().flatten().map(|r| r.len()).max().unwrap_or(0);
    let mut ids: Vec<i32> = Vec::with_capacity(rows.len() * k);
    let mut logprobs: Vec<f32> = Vec::with_capacity(rows.len() * k);
    for row in rows {
        let row: &[(i64, f32)] = row.map_or(&[], |r| r.as_slice());
        ids.extend(row.iter().map(|&(t, _)| t as i32));
        logprobs.extend(row.iter().map(|&(_, l)| l));
        ids.extend(std::iter::repeat_n(0, k - row.len()));
        logprobs.extend(std::iter::repeat_n(proto::TOPK_MASK_LOGPROB, k - row.len()));
    }
    proto::TopkLogprobs {
        token_ids: proto::i32_bytes(&ids),
        logprobs: proto::f32_bytes(&logprobs),
        k: k as u32,
        length: rows.len() as u32,
    }
}

/// Columns of a matrix (of its first row).
fn width<T>(rows: &[Vec<T>]) -> usize {
    rows.first().map_or(0, Vec::len)
}

/// A dense `[rows, cols]` protobuf `Tensor`.
fn tensor_proto(bytes: Vec<u8>, dtype: i32, rows: usize, cols: usize) -> proto::Tensor {
    proto::Tensor {
        encoding: Some(proto::Encoding::Dense(bytes)),
        dtype,
        shape: vec![rows as i64, cols as i64],
    }
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
                topk_sampled_logprobs: s
                    .top_k
                    .as_ref()
                    .map(|top| top_k_proto(&top.iter().map(Some).collect::<Vec<_>>())),
            }
        })
        .collect();
    let prompt = &out.prompt;
    let prompt_logprobs = prompt.logprobs.as_ref().map(|lp| {
        let values: Vec<f32> = lp.iter().map(|x| x.unwrap_or(f32::NAN)).collect();
        proto::f32_bytes(&values)
    });
    proto::SampleResponse {
        sequences,
        prompt_logprobs,
        topk_prompt_logprobs: prompt
            .top_k
            .as_ref()
            .map(|top| top_k_proto(&top.iter().map(Option::as_ref).collect::<Vec<_>>())),
        prompt_cache_hit_tokens: 0,
        target_prompt_logprobs: prompt.targets.as_ref().map(|t| {
            let (rows, cols) = (t.len(), width(t));
            match &prompt.targets_layout {
                Some(layout) => proto::Tensor {
                    encoding: Some(proto::Encoding::SparseCsr(proto::SparseCsr {
                        values: proto::f32_bytes(&layout.gather(t)),
                        crow_indices: proto::i64_bytes(&layout.crow),
                        col_indices: proto::i64_bytes(&layout.col),
                    })),
                    dtype: proto::dtype::FLOAT32,
                    shape: vec![rows as i64, cols as i64],
                },
                None => {
                    let values: Vec<f32> = t.iter().flatten().copied().collect();
                    tensor_proto(proto::f32_bytes(&values), proto::dtype::FLOAT32, rows, cols)
                }
            }
        }),
        prompt_alt_tokens: prompt.alt.as_ref().map(|alt| {
            let ids: Vec<i64> = alt.tokens.iter().flatten().copied().collect();
            let lps: Vec<f32> = alt.logprobs.iter().flatten().copied().collect();
            let (rows, k) = (alt.tokens.len(), width(&alt.tokens));
            proto::PromptAltTokens {
                tokens: Some(tensor_proto(
                    proto::i64_bytes(&ids),
                    proto::dtype::INT64,
                    rows,
                    k,
                )),
                logprobs: Some(tensor_proto(
                    proto::f32_bytes(&lps),
                    proto::dtype::FLOAT32,
                    rows,
                    k,
                )),
            }
        }),
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
        Output::CustomLoss { loss_id } => json!({"loss_id": loss_id}),
    }
}
