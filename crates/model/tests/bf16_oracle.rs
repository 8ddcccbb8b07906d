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

use common::*;
use loraloom_model::checkpoint;
use loraloom_model::{
    forward_backward, sample, AdapterStack, Datum, Decoder, Field, LoraAdapter, LoraBatch,
    LoraSpec, LossFn, SampleRequest, SamplingParams, Scoring, Stop, TrainRequest, NO_LIMIT,
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

/// A tiny random llama checkpoint and its decoders in f32 (the exact answer) and in bf16.
fn tiny_llama_in_both(tag: &str) -> (TempDir, Decoder, Decoder) {
    let dir = tiny_llama_dir(tag);
    let exact = Decoder::load(dir.path(), Device::Cpu, Some(Kind::Float)).unwrap();
    let bf16 = Decoder::load(dir.path(), Device::Cpu, Some(Kind::BFloat16)).unwrap();
    (dir, exact, bf16)
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

/// Log-probabilities of `ids[1..]` under one forward pass of `decoder` (`lora`: with it).
fn logprobs_of(decoder: &Decoder, lora: Option<&LoraBatch>, ids: &[i64]) -> Tensor {
    let input = Tensor::from_slice(ids).view([1, -1]);
    let logits = tch::no_grad(|| decoder.forward(&input, lora)).unwrap();
    let next = Tensor::from_slice(&ids[1..]).view([-1, 1]);
    logits
        .get(0)
        .narrow(0, 0, ids.len() as i64 - 1)
        .log_softmax(-1, Kind::Float)
        .gather(1, &next, false)
        .view([-1])
}

/// [`logprobs_of`] with `adapter`, cast to the decoder's dtype as a batch would.
fn forward_logprobs(decoder: &Decoder, adapter: &LoraAdapter, ids: &[i64]) -> Tensor {
    let stack = AdapterStack::new(&[adapter], decoder.kind(), false).unwrap();
    logprobs_of(decoder, Some(&LoraBatch::one(&stack, 0, 1).unwrap()), ids)
}

/// [`logprobs_of`] of the base model.
fn base_logprobs(decoder: &Decoder, ids: &[i64]) -> Tensor {
    logprobs_of(decoder, None, ids)
}

#[test]
fn bf16_logits_loss_and_gradients_are_as_close_to_f32_as_peft_in_bf16() {
    let dir = tiny_llama_dir("bf16-model");
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
    let (_dir, exact, bf16) = tiny_llama_in_both("bf16-decode");
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
        stream: false,
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

/// Request `i` of a batch: run `i` (`None`: the base model) on `data[i]`, cross-entropy.
fn cross_entropy<'a>(
    runs: &'a [Option<LoraAdapter>],
    data: &'a [Vec<Datum>],
    i: usize,
) -> TrainRequest<'a> {
    TrainRequest {
        adapter: runs[i].as_ref(),
        loss: LossFn::CrossEntropy,
        data: &data[i],
    }
}

/// Runs of several tenants fused in one bf16 pass (mixed ranks, a run without MLP targets, a
/// base-model request; uneven datum counts gather each row's adapter, equal ones go by blocks)
/// are no further from each run's f32 answer than that run alone in bf16 is.
#[test]
fn a_fused_bf16_batch_is_as_close_to_f32_as_each_run_alone_in_bf16() {
    let (_dir, exact, bf16) = tiny_llama_in_both("bf16-fused");
    let cfg = exact.config();
    let mixed = vec![
        Some(spec(2, 11)),
        Some(spec(3, 12)),
        None,
        Some(spec(4, 13)),
        Some(with_targets(spec(8, 14), true, false, true)),
    ];
    let one_layout: Vec<_> = (0..4).map(|i| Some(spec(4, 20 + i))).collect();
    for (name, specs, counts) in [
        ("gathered", mixed, vec![1, 2, 1, 3, 1]),
        ("blocks", one_layout, vec![2; 4]),
    ] {
        let fused = perturbed(&specs, cfg, 0);
        let alone = copies(&fused, cfg);
        let f32_runs = copies(&fused, cfg);
        let data: Vec<Vec<Datum>> = counts
            .iter()
            .enumerate()
            .map(|(i, &n)| train_data(i as i64, n, 5 + 3 * (i % 3)))
            .collect();
        let all: Vec<TrainRequest> = (0..specs.len())
            .map(|i| cross_entropy(&fused, &data, i))
            .collect();
        let fused_out = forward_backward(&bf16, &all, true, NO_LIMIT).unwrap();
        for i in 0..specs.len() {
            let one = |decoder: &Decoder, runs: &[Option<LoraAdapter>]| {
                forward_backward(decoder, &[cross_entropy(runs, &data, i)], true, NO_LIMIT)
                    .unwrap()
                    .remove(0)
            };
            let want = one(&exact, &f32_runs).loss_sum;
            let by_itself = one(&bf16, &alone).loss_sum;
            assert_as_close_as(
                &format!("{name}: request {i}'s loss"),
                (fused_out[i].loss_sum - want).abs() / want.abs(),
                "alone in bf16",
                (by_itself - want).abs() / want.abs(),
                4e-3,
            );
            if let (Some(f), Some(a), Some(x)) = (&fused[i], &alone[i], &f32_runs[i]) {
                let want = row_of(x, Field::Grads);
                assert!(want.abs().max().double_value(&[]) > 0.0);
                assert_as_close_as(
                    &format!("{name}: run {i}'s gradients"),
                    rel_error(&row_of(f, Field::Grads), &want),
                    "alone in bf16",
                    rel_error(&row_of(a, Field::Grads), &want),
                    1e-2,
                );
            }
        }
    }
}

/// Sequences of four adapters (three sharing a slab, one of other targets) and of the base
/// model in one bf16 decode batch: each one's sampled logprobs are no further from an f32 forward pass over its
/// tokens than a bf16 forward pass is.
#[test]
fn a_bf16_decode_batch_of_several_adapters_is_as_close_to_f32_as_a_bf16_forward_pass() {
    let (_dir, exact, bf16) = tiny_llama_in_both("bf16-crowd");
    // Ranks 4, 4 and 3 share one slab (three members of one stack), rank 8 of other targets
    // has a stack of its own, and one request runs the base model.
    let specs = vec![
        Some(spec(4, 31)),
        Some(spec(4, 32)),
        None,
        Some(spec(3, 33)),
        Some(with_targets(spec(8, 34), false, true, true)),
    ];
    let adapters = perturbed(&specs, exact.config(), 40);
    let requests: Vec<SampleRequest> = adapters
        .iter()
        .enumerate()
        .map(|(i, adapter)| SampleRequest {
            share_scope: "",
            stream: false,
            adapter: adapter.as_ref(),
            prompt: (0..4 + i as i64).map(|t| 5 + 9 * t).collect(),
            num_samples: 1 + i as i64 % 2,
            params: SamplingParams {
                max_tokens: 12 + 6 * i as i64,
                temperature: 1.0,
                seed: Some(50 + i as u64),
                stop: Stop::Never,
                ..SamplingParams::default()
            },
            scoring: Scoring::prompt_logprobs(false),
        })
        .collect();
    let outs = sample(&bf16, &requests, None).unwrap();
    // Over all sequences (single tokens of low probability dominate one short sequence's
    // figure), then each request alone with twice the slack: an adapter whose delta went
    // wrong in the crowd would be off by the delta itself, far beyond either.
    let (mut sampled, mut exact_all, mut forward_all) = (Vec::new(), Vec::new(), Vec::new());
    for (i, (request, out)) in requests.iter().zip(&outs).enumerate() {
        for seq in &out.sequences {
            let ids: Vec<i64> = request.prompt.iter().chain(&seq.tokens).copied().collect();
            let (start, n) = (request.prompt.len() as i64 - 1, seq.tokens.len() as i64);
            let logprobs = |decoder: &Decoder| match request.adapter {
                Some(a) => forward_logprobs(decoder, a, &ids).narrow(0, start, n),
                None => base_logprobs(decoder, &ids).narrow(0, start, n),
            };
            let (got, want, forward) = (
                Tensor::from_slice(&seq.logprobs),
                logprobs(&exact),
                logprobs(&bf16),
            );
            let (ours, theirs) = (rel_error(&got, &want), rel_error(&forward, &want));
            eprintln!("request {i}: loraloom bf16 {ours:.3e}, a bf16 forward pass {theirs:.3e}");
            assert!(
                ours <= 2.0 * SLACK * theirs + 4e-3,
                "request {i}: sampled logprobs {ours:.3e} from f32, a bf16 forward pass {theirs:.3e}"
            );
            sampled.push(got);
            exact_all.push(want);
            forward_all.push(forward);
        }
    }
    let want = Tensor::cat(&exact_all, 0);
    assert_as_close_as(
        "every sampled logprob",
        rel_error(&Tensor::cat(&sampled, 0), &want),
        "a bf16 forward pass",
        rel_error(&Tensor::cat(&forward_all, 0), &want),
        2e-3,
    );
}

#[test]
fn gpt_oss_in_bf16_is_as_close_to_f32_as_transformers_in_bf16() {
    // Attention sinks on augmented operands, the experts' biases and clamped SwiGLU, and the
    // norms kept in f32 (rounded once, as transformers' GPT-OSS norm rounds) in bf16.
    let dir = TempDir::new("gpt-oss-bf16");
    let p = dir.path();
    oracle("tiny_models.py", &["make", "gpt_oss", p.to_str().unwrap()]);
    let theirs_file = p.join("bf16.safetensors");
    oracle(
        "tiny_models.py",
        &["bf16", p.to_str().unwrap(), theirs_file.to_str().unwrap()],
    );
    let expected = read_tensors(&p.join("expected.safetensors"));
    let theirs = &read_tensors(&theirs_file)["logits"];
    let lengths = vec_i64(&expected["lengths"]);
    let exact = real(&expected["logits"], &lengths);
    let bf16 = Decoder::load(p, Device::Cpu, Some(Kind::BFloat16)).unwrap();
    let ours = tch::no_grad(|| bf16.forward(&expected["input_ids"], None)).unwrap();
    assert_as_close_as(
        "GPT-OSS logits",
        rel_error(&real(&ours, &lengths), &exact),
        "transformers bf16",
        rel_error(&real(theirs, &lengths), &exact),
        1e-2,
    );
}
