//! The bf16 path (what a GPU runs by default, and `--dtype bf16` anywhere) against peft and
//! transformers on the same weights and inputs, on the CPU.
//!
//! bf16 keeps 8 bits of mantissa, so its results differ from f32 by far more than any two f32
//! implementations do, and the two bf16 implementations round at different places (peft keeps
//! LoRA weights in f32 and computes the delta in f32; loraloom casts them to bf16 for compute).
//! So the oracle is comparative: the f32 pass is the exact answer, and loraloom in bf16 must be
//! no further from it than `SLACK` times what peft on transformers in bf16 is (plus a floor of
//! a few bf16 steps for quantities peft happens to round well). A wrong scale, a missing
//! adapter, a gradient lost in a cast or a dtype mix-up is far outside that: those errors are of
//! the size of the values themselves.

mod common;

use std::collections::HashMap;

use common::*;
use loraloom_model::checkpoint;
use loraloom_model::{
    forward_backward, sample, AdapterStack, Datum, Decoder, Field, LoraAdapter, LoraBatch,
    LoraSpec, LossFn, LossInputs, SampleRequest, SamplingParams, Scoring, Stop, TrainRequest,
    NO_LIMIT,
};
use tch::{Device, Kind, Tensor};

/// How much further from f32 than peft's bf16 loraloom's bf16 may be: loraloom computes the
/// LoRA delta in bf16 where peft computes it in f32, which on the oracle's large random
/// adapters (0.3 standard deviation) adds about as much error as the base model's bf16 does.
const SLACK: f64 = 2.0;

/// `‖got − want‖ / ‖want‖` over the given rows' real positions.
fn rel_error(got: &Tensor, want: &Tensor) -> f64 {
    let diff = (got - want).norm().double_value(&[]);
    diff / want.norm().double_value(&[]).max(1e-12)
}

/// The real positions of a right-padded `[rows, len, ...]` tensor, rows concatenated.
fn real(t: &Tensor, lengths: &[i64]) -> Tensor {
    let rows: Vec<Tensor> = lengths
        .iter()
        .enumerate()
        .map(|(i, &n)| t.get(i as i64).narrow(0, 0, n))
        .collect();
    Tensor::cat(&rows, 0).to_kind(Kind::Float)
}

/// The oracle's batch as cross-entropy datums (real positions only).
fn datums(expected: &HashMap<String, Tensor>) -> Vec<Datum> {
    let lengths = vec_i64(&expected["lengths"]);
    lengths
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let row = |name: &str| expected[name].get(i as i64).narrow(0, 0, n);
            Datum {
                input_tokens: vec_i64(&row("input_ids")),
                loss_inputs: LossInputs {
                    target_tokens: vec_i64(&row("targets")),
                    weights: Some(vec_f32(&row("weights"))),
                    logprobs: None,
                    advantages: None,
                    sequence_ratio_mask: None,
                    recorded: None,
                },
            }
        })
        .collect()
}

/// Asserts that loraloom's error (`ours`, against the f32 answer) is within [`SLACK`] times
/// the reference's (`theirs`: peft's in bf16 unless `reference` says otherwise) plus `floor`,
/// and prints both so a failure shows the figures.
fn assert_as_close(what: &str, ours: f64, theirs: f64, floor: f64) {
    assert_as_close_as(what, ours, "peft bf16", theirs, floor)
}

fn assert_as_close_as(what: &str, ours: f64, reference: &str, theirs: f64, floor: f64) {
    eprintln!("{what}: loraloom bf16 {ours:.3e}, {reference} {theirs:.3e} (relative to f32)");
    assert!(
        ours <= SLACK * theirs + floor,
        "{what}: loraloom in bf16 is {ours:.3e} from f32, {reference} {theirs:.3e} (allowed {SLACK} x + {floor})"
    );
}

/// Log-probabilities of `ids[1..]` under one forward pass of `decoder` with `adapter`.
fn forward_logprobs(decoder: &Decoder, adapter: &LoraAdapter, ids: &[i64]) -> Tensor {
    let stack = AdapterStack::new(&[adapter], decoder.kind(), false).unwrap();
    let lora = LoraBatch::one(&stack, 0, 1).unwrap();
    let input = Tensor::from_slice(ids).view([1, -1]);
    let logits = tch::no_grad(|| decoder.forward(&input, Some(&lora))).unwrap();
    let next = Tensor::from_slice(&ids[1..]).view([-1, 1]);
    logits
        .get(0)
        .narrow(0, 0, ids.len() as i64 - 1)
        .log_softmax(-1, Kind::Float)
        .gather(1, &next, false)
        .view([-1])
}

#[test]
fn bf16_logits_loss_and_gradients_are_as_close_to_f32_as_peft_in_bf16() {
    let dir = TempDir::new("bf16-model");
    oracle(
        "tiny_models.py",
        &["make", "llama", dir.path().to_str().unwrap()],
    );
    let decoder = Decoder::load(dir.path(), Device::Cpu, Some(Kind::BFloat16)).unwrap();
    assert_eq!(decoder.kind(), Kind::BFloat16);
    let out = TempDir::new("bf16-out");
    oracle(
        "lora_oracle.py",
        &[
            "peft-grads",
            dir.path().to_str().unwrap(),
            out.path().to_str().unwrap(),
        ],
    );
    let e = read_tensors(&out.path().join("expected.safetensors"));
    let adapter = checkpoint::load(&out.path().join("adapter"), decoder.config(), Device::Cpu)
        .unwrap()
        .adapter;
    // Adapters stay f32 whatever the model computes in.
    assert_eq!(
        adapter.row().view(Field::Params).unwrap().kind(),
        Kind::Float
    );
    let lengths = vec_i64(&e["lengths"]);
    let exact = |name: &str| real(&e[name], &lengths);
    let peft = |name: &str| real(&e[&format!("bf16.{name}")], &lengths);

    // Logits of a plain forward pass, the adapter cast to bf16 for compute.
    let stack = AdapterStack::new(&[&adapter], Kind::BFloat16, false).unwrap();
    let ids = &e["input_ids"];
    let lora = LoraBatch::one(&stack, 0, ids.size()[0]).unwrap();
    let logits = tch::no_grad(|| decoder.forward(ids, Some(&lora))).unwrap();
    assert_eq!(logits.kind(), Kind::BFloat16);
    assert_as_close(
        "logits",
        rel_error(&real(&logits, &lengths), &exact("logits")),
        rel_error(&peft("logits"), &exact("logits")),
        4e-3,
    );

    // forward_backward: per-token logprobs, the loss and every A's and B's gradient.
    let data = datums(&e);
    let request = TrainRequest {
        adapter: Some(&adapter),
        loss: LossFn::CrossEntropy,
        data: &data,
    };
    let result = forward_backward(&decoder, &[request], true, NO_LIMIT)
        .unwrap()
        .remove(0);
    let logprobs: Vec<f32> = result
        .outputs
        .iter()
        .flat_map(|o| o.logprobs.iter().copied())
        .collect();
    assert_as_close(
        "logprobs",
        rel_error(&Tensor::from_slice(&logprobs), &exact("logprobs")),
        rel_error(&peft("logprobs"), &exact("logprobs")),
        4e-3,
    );
    let loss = e["loss"].double_value(&[0]);
    assert_as_close(
        "loss",
        (result.loss_sum - loss).abs() / loss.abs(),
        (e["bf16.loss"].double_value(&[0]) - loss).abs() / loss.abs(),
        4e-3,
    );
    let mut checked = 0;
    for (module, pair) in adapter.named_field_pairs(Field::Grads).unwrap() {
        for (half, got) in [("A", &pair.a), ("B", &pair.b)] {
            let key = format!("grad.base_model.model.{module}.lora_{half}.weight");
            assert_eq!(
                got.kind(),
                Kind::Float,
                "{key}: gradients accumulate in f32"
            );
            assert_as_close(
                &key,
                rel_error(got, &e[&key]),
                rel_error(&e[&format!("bf16.{key}")], &e[&key]),
                1e-2,
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 2 * (2 * 7 + 1));
}

/// Decoding in bf16 (prefill, then one token at a time from a bf16 key/value cache, prompt
/// logprobs, seeded draws) against one forward pass over the same tokens: the cached path is
/// no further from the f32 answer than a bf16 forward pass is, and a seeded request draws the
/// same tokens each time it runs in the same company.
#[test]
fn bf16_decoding_is_as_close_to_f32_as_a_bf16_forward_pass() {
    let dir = TempDir::new("bf16-decode");
    oracle(
        "tiny_models.py",
        &["make", "llama", dir.path().to_str().unwrap()],
    );
    let exact = Decoder::load(dir.path(), Device::Cpu, Some(Kind::Float)).unwrap();
    let bf16 = Decoder::load(dir.path(), Device::Cpu, Some(Kind::BFloat16)).unwrap();
    let spec = LoraSpec {
        rank: 4,
        alpha: 16.0,
        seed: 3,
        train_attn: true,
        train_mlp: true,
        train_unembed: true,
    };
    let adapter = LoraAdapter::new(spec, exact.config(), Device::Cpu).unwrap();
    perturb(&adapter, 11, 0.1);
    let prompt = vec![3, 14, 15, 92, 65, 35, 89, 79];
    let request = || SampleRequest {
        share_scope: "",
        adapter: Some(&adapter),
        prompt: prompt.clone(),
        num_samples: 3,
        params: SamplingParams {
            max_tokens: 48,
            temperature: 1.0,
            seed: Some(21),
            stop: Stop::Never,
            ..SamplingParams::default()
        },
        scoring: Scoring::prompt_logprobs(true),
    };
    let out = sample(&bf16, &[request()], None).unwrap().remove(0);
    let again = sample(&bf16, &[request()], None).unwrap().remove(0);
    for (seq, same) in out.sequences.iter().zip(&again.sequences) {
        assert_eq!(
            seq.tokens, same.tokens,
            "a seeded draw repeats in the same company"
        );
        assert_eq!(seq.logprobs, same.logprobs);
    }

    // Prompt logprobs.
    let got = Tensor::from_slice(
        &out.prompt.logprobs.as_ref().unwrap()[1..]
            .iter()
            .map(|lp| lp.unwrap())
            .collect::<Vec<f32>>(),
    );
    let want = forward_logprobs(&exact, &adapter, &prompt);
    let forward = forward_logprobs(&bf16, &adapter, &prompt);
    assert_as_close_as(
        "prompt logprobs",
        rel_error(&got, &want),
        "a bf16 forward pass",
        rel_error(&forward, &want),
        4e-3,
    );

    // Each sequence's sampled logprobs.
    for (i, seq) in out.sequences.iter().enumerate() {
        assert_eq!(seq.tokens.len(), 48);
        let ids: Vec<i64> = prompt.iter().chain(&seq.tokens).copied().collect();
        let tail = |t: Tensor| t.narrow(0, prompt.len() as i64 - 1, seq.tokens.len() as i64);
        let want = tail(forward_logprobs(&exact, &adapter, &ids));
        let forward = tail(forward_logprobs(&bf16, &adapter, &ids));
        assert_as_close_as(
            &format!("sequence {i}'s logprobs"),
            rel_error(&Tensor::from_slice(&seq.logprobs), &want),
            "a bf16 forward pass",
            rel_error(&forward, &want),
            4e-3,
        );
    }
}
