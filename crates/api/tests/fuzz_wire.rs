//! Bounded fuzzing of wire decoding and validation: random and mutated bodies must produce
//! values or named errors, never panics. `make test` runs a short pass; set
//! `LORALOOM_FUZZ_CASES=1000000` for a long one.

use loraloom_api::extract::parse_json;
use loraloom_api::proto::{self, ForwardBackwardRequest};
use loraloom_api::wire::{proto_train_input, JsonForwardBackwardRequest};
use loraloom_model::rng::SplitMix64;
use prost::Message;

/// No custom losses exist in these tests.
fn no_custom(
    id: &str,
) -> loraloom_api::error::ApiResult<std::sync::Arc<loraloom_model::CustomLoss>> {
    Err(loraloom_api::error::ApiError::invalid(
        "loss_fn_config.loss_id",
        format!("no loss {id}"),
    ))
}

fn cases() -> usize {
    std::env::var("LORALOOM_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000)
}

const VALID_JSON: &str = r#"{"model_id":"m","forward_backward_input":{"loss_fn":"ppo","loss_fn_config":{"clip_low_threshold":0.7},
"data":[{"model_input":{"chunks":[{"type":"encoded_text","tokens":[1,2,3]}]},"loss_fn_inputs":{
"target_tokens":{"data":[2,3,4],"dtype":"int64","shape":[3]},"logprobs":{"data":[-1,-2,-3],"dtype":"float32"},
"advantages":{"data":[0.5,0.1,-1],"dtype":"float32","shape":[3]}}}]}}"#;

/// A provenance run over `length` tokens of sequence `s:0`.
fn span(prompt: bool, offset: i64, length: i64) -> proto::ProvenanceSpan {
    let run = proto::SpanRun {
        sequence_id: "s:0".into(),
        offset,
        length,
    };
    proto::ProvenanceSpan {
        span: Some(if prompt {
            proto::SpanKind::PromptTokens(run)
        } else {
            proto::SpanKind::SampledTokens(run)
        }),
    }
}

fn valid_proto() -> Vec<u8> {
    let tensor = |dtype, bytes: Vec<u8>, n| proto::Tensor {
        encoding: Some(proto::Encoding::Dense(bytes)),
        dtype,
        shape: vec![n],
    };
    let datum = proto::Datum {
        model_input: vec![proto::Chunk {
            chunk: Some(proto::ChunkKind::EncodedText(proto::EncodedTextChunk {
                tokens: proto::i32_bytes(&[1, 2, 3]),
            })),
        }],
        loss_fn_inputs: [
            (
                "target_tokens".to_string(),
                tensor(proto::dtype::INT64, proto::i64_bytes(&[2, 3, 4]), 3),
            ),
            (
                "weights".to_string(),
                tensor(proto::dtype::FLOAT32, proto::f32_bytes(&[1.0, 0.5, 0.0]), 3),
            ),
        ]
        .into_iter()
        .collect(),
        model_input_spans: vec![span(true, 0, 1), span(false, 0, 2)],
        loss_fn_input_spans: vec![span(true, 1, 0), span(false, 0, 3)],
    };
    ForwardBackwardRequest {
        model_id: "m".into(),
        seq_id: 1,
        data: vec![datum],
        loss_fn: "cross_entropy".into(),
        ..Default::default()
    }
    .encode_to_vec()
}

fn mutate(rng: &mut SplitMix64, base: &[u8]) -> Vec<u8> {
    let mut out = base.to_vec();
    for _ in 0..1 + rng.next_u64() % 4 {
        if out.is_empty() {
            break;
        }
        let i = (rng.next_u64() as usize) % out.len();
        match rng.next_u64() % 3 {
            0 => out[i] = rng.next_u64() as u8,
            1 => {
                out.remove(i);
            }
            _ => out.insert(i, rng.next_u64() as u8),
        }
    }
    out
}

fn exercise(bytes: &[u8]) {
    if let Ok(req) = ForwardBackwardRequest::decode(bytes) {
        let _ = proto_train_input(req, &no_custom);
    }
    if let Ok(req) = parse_json::<JsonForwardBackwardRequest>(bytes) {
        let _ = req.into_input(false, &no_custom);
    }
}

#[test]
fn the_valid_seeds_decode() {
    let json = parse_json::<JsonForwardBackwardRequest>(VALID_JSON.as_bytes()).unwrap();
    let input = json.into_input(false, &no_custom).unwrap();
    assert_eq!(input.data[0].input_tokens, vec![1, 2, 3]);
    let proto = ForwardBackwardRequest::decode(valid_proto().as_slice()).unwrap();
    let input = proto_train_input(proto, &no_custom).unwrap();
    assert_eq!(input.data[0].loss_inputs.target_tokens, vec![2, 3, 4]);
    let spans = input.provenance[0].as_ref().expect("the spans decode");
    assert_eq!((spans.model_input.len(), spans.targets.len()), (2, 2));
}

#[test]
fn random_and_mutated_bodies_never_panic() {
    let mut rng = SplitMix64::new(0x5EED);
    let seeds = [VALID_JSON.as_bytes().to_vec(), valid_proto()];
    for i in 0..cases() {
        let bytes = if i % 4 == 0 {
            let len = (rng.next_u64() % 200) as usize;
            (0..len).map(|_| rng.next_u64() as u8).collect()
        } else {
            mutate(&mut rng, &seeds[i % 2])
        };
        exercise(&bytes);
    }
}
