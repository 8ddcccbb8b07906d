//! Sampling against transformers/peft `generate(do_sample=False)` on the same weights.
//!
//! Greedy tokens must be identical. Logprobs (log-softmax of the raw logits at the chosen token)
//! agree to 1e-4 max-abs in f32; the cached decode path sums attention in a different order than
//! transformers' cache, which stays far below that.

mod common;

use common::*;
use loraloom_model::checkpoint;
use loraloom_model::rng::SplitMix64;
use loraloom_model::sample::sample_seed;
use loraloom_model::{
    sample, sample_with, Decoder, Generation, LoraAdapter, LoraSpec, Mxfp4Policy, SampleOutput,
    SampleRequest, SamplingParams, Scoring, StepGraphs, Stop, StopReason, TopK,
};
use std::collections::HashMap;
use tch::{Device, Kind};

fn greedy(max_tokens: i64) -> SamplingParams {
    SamplingParams {
        max_tokens,
        temperature: 0.0,
        stop: Stop::Never,
        ..SamplingParams::default()
    }
}

fn close(a: &[f32], b: &[f32], tol: f32) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= tol)
}

/// Runs all oracle prompts in ONE batched `sample` call and compares each with transformers.
/// A greedy request of `new_tokens` tokens for each of the oracle's prompts (`prompt.{i}`), with
/// or without prompt logprobs.
fn oracle_requests<'a>(
    e: &HashMap<String, tch::Tensor>,
    adapter: Option<&'a LoraAdapter>,
    new_tokens: i64,
    prompt_logprobs: bool,
) -> Vec<SampleRequest<'a>> {
    let n = e.keys().filter(|k| k.starts_with("prompt.")).count();
    (0..n)
        .map(|i| SampleRequest {
            share_scope: "",
            stream: false,
            adapter,
            prompt: vec_i64(&e[&format!("prompt.{i}")]),
            num_samples: 1,
            params: greedy(new_tokens),
            scoring: Scoring::prompt_logprobs(prompt_logprobs),
        })
        .collect()
}

fn check_against_oracle(
    decoder: &Decoder,
    adapter: Option<&LoraAdapter>,
    oracle_file: &std::path::Path,
    new_tokens: i64,
) {
    let e = read_tensors(oracle_file);
    let requests = oracle_requests(&e, adapter, new_tokens, true);
    let out = sample(decoder, &requests, None).unwrap();
    for (i, o) in out.iter().enumerate() {
        let seq = &o.sequences[0];
        assert_eq!(
            seq.tokens,
            vec_i64(&e[&format!("tokens.{i}")]),
            "prompt {i}: greedy tokens differ"
        );
        assert_eq!(seq.stop_reason, StopReason::Length);
        let want = vec_f32(&e[&format!("logprobs.{i}")]);
        assert!(
            close(&seq.logprobs, &want, 1e-4),
            "prompt {i}: logprobs {:?} vs {want:?}",
            seq.logprobs
        );
        let plp = o.prompt.logprobs.as_ref().unwrap();
        assert_eq!(plp[0], None);
        let got: Vec<f32> = plp[1..].iter().map(|x| x.unwrap()).collect();
        assert!(
            close(&got, &vec_f32(&e[&format!("prompt_logprobs.{i}")]), 1e-4),
            "prompt {i}: prompt logprobs"
        );
    }
}

#[test]
fn greedy_equals_transformers_on_tiny_models_batched() {
    for arch in [
        "llama",
        "qwen3",
        "qwen2",
        "mistral",
        "qwen3_moe",
        "mixtral",
        "mistral_window",
        "qwen2_window",
        "llama_yarn",
        "gpt_oss",
    ] {
        let dir = TempDir::new(arch);
        oracle(
            "tiny_models.py",
            &["make", arch, dir.path().to_str().unwrap()],
        );
        let file = dir.path().join("greedy.safetensors");
        oracle(
            "sample_oracle.py",
            &[
                "greedy",
                dir.path().to_str().unwrap(),
                file.to_str().unwrap(),
                "20",
            ],
        );
        let decoder = Decoder::load(dir.path(), Device::Cpu, Some(Kind::Float)).unwrap();
        check_against_oracle(&decoder, None, &file, 20);
        if ["qwen3_moe", "mistral_window", "qwen2_window", "gpt_oss"].contains(&arch) {
            // The static step a CUDA graph records (no host reads), run on the CPU.
            check_recorded_steps_against_oracle(&decoder, &file, 20);
        }
        if arch.ends_with("_window") || arch == "gpt_oss" {
            // Prompts prefilled 4 tokens a step, each chunk attending to its row's cached keys
            // within the window.
            let g = Generation::new(decoder.kind()).with_prefill_chunk(4);
            check_generation_against_oracle(&decoder, &file, 20, g);
        }
    }
}

#[test]
fn greedy_with_mxfp4_experts_kept_packed_equals_transformers() {
    // transformers dequantizes the experts at load; loraloom keeps them packed. Prefills route
    // more token-expert pairs than the 8 experts (every expert dequantized at once); decode
    // steps of the 3 prompts route 6 (one expert dequantized per pair), and of each prompt
    // alone 2.
    let dir = TempDir::new("gpt_oss_mxfp4");
    let tiny = dir.path().to_str().unwrap();
    oracle("tiny_models.py", &["make", "gpt_oss_mxfp4", tiny]);
    let file = dir.path().join("greedy.safetensors");
    oracle(
        "sample_oracle.py",
        &["greedy", tiny, file.to_str().unwrap(), "20"],
    );
    let packed = Mxfp4Policy::Packed;
    let decoder = Decoder::load_with(dir.path(), Device::Cpu, Some(Kind::Float), packed).unwrap();
    assert!(decoder.dequantized_weight_bytes() > 0);
    check_against_oracle(&decoder, None, &file, 20);
    check_recorded_steps_against_oracle(&decoder, &file, 20);
    let e = read_tensors(&file);
    for (i, request) in oracle_requests(&e, None, 20, false).iter().enumerate() {
        let out = sample(&decoder, std::slice::from_ref(request), None).unwrap();
        assert_eq!(
            out[0].sequences[0].tokens,
            vec_i64(&e[&format!("tokens.{i}")]),
            "prompt {i} alone"
        );
    }
}

/// The oracle's prompts decoded together by a [`Generation`] whose steps take the recorded
/// path ([`StepGraphs::Emulate`]) give transformers' greedy tokens.
fn check_recorded_steps_against_oracle(
    decoder: &Decoder,
    oracle_file: &std::path::Path,
    new_tokens: i64,
) {
    let g = Generation::new(decoder.kind()).with_step_graphs(StepGraphs::Emulate);
    let g = check_generation_against_oracle(decoder, oracle_file, new_tokens, g);
    assert!(g.graph_counts().replayed > 0, "{:?}", g.graph_counts());
}

/// The oracle's prompts decoded together by `g` give transformers' greedy tokens; returns `g`.
fn check_generation_against_oracle(
    decoder: &Decoder,
    oracle_file: &std::path::Path,
    new_tokens: i64,
    mut g: Generation,
) -> Generation {
    let e = read_tensors(oracle_file);
    let requests = oracle_requests(&e, None, new_tokens, false);
    let n = requests.len();
    for (i, request) in requests.iter().enumerate() {
        g.admit(decoder, i as u64, request, false).unwrap();
    }
    let mut done = HashMap::new();
    while !g.is_empty() {
        done.extend(g.step(decoder, None).unwrap().finished);
    }
    for i in 0..n {
        assert_eq!(
            done[&(i as u64)].sequences[0].tokens,
            vec_i64(&e[&format!("tokens.{i}")]),
            "prompt {i}"
        );
    }
    g
}

#[test]
fn greedy_with_an_adapter_equals_peft_generate() {
    let dir = TempDir::new("sample-peft");
    let p = dir.path();
    oracle("tiny_models.py", &["make", "llama", p.to_str().unwrap()]);
    oracle(
        "lora_oracle.py",
        &[
            "peft-grads",
            p.to_str().unwrap(),
            p.join("peft").to_str().unwrap(),
        ],
    );
    let adapter_dir = p.join("peft/adapter");
    let file = p.join("greedy.safetensors");
    oracle(
        "sample_oracle.py",
        &[
            "greedy",
            p.to_str().unwrap(),
            file.to_str().unwrap(),
            "16",
            adapter_dir.to_str().unwrap(),
        ],
    );
    let decoder = Decoder::load(p, Device::Cpu, Some(Kind::Float)).unwrap();
    let adapter = checkpoint::load(&adapter_dir, decoder.config(), Device::Cpu)
        .unwrap()
        .adapter;
    check_against_oracle(&decoder, Some(&adapter), &file, 16);
    check_continuous_against_oracle(&decoder, &adapter, &file, 16, StepGraphs::Off);
    check_continuous_against_oracle(&decoder, &adapter, &file, 16, StepGraphs::Emulate);
}

/// The oracle's prompts join a running decode loop at different steps, with different
/// `max_tokens`, among seeded sampled requests of three other adapters (other ranks and
/// targets: other stacks) that join and leave around them. Every oracle sequence must still be
/// peft's greedy continuation (a prefix of it), and every seeded request must draw what it draws
/// alone. With `graphs`, steps of a batch that keeps its rows are recorded and replayed
/// ([`StepGraphs::Emulate`]: the static step of a CUDA graph, run on the CPU).
fn check_continuous_against_oracle(
    decoder: &Decoder,
    adapter: &LoraAdapter,
    oracle_file: &std::path::Path,
    new_tokens: i64,
    graphs: StepGraphs,
) {
    let e = read_tensors(oracle_file);
    let n = e.keys().filter(|k| k.starts_with("prompt.")).count();
    let others = adapters(decoder, 3);
    let oracle_request = |i: usize| SampleRequest {
        share_scope: "",
        stream: false,
        adapter: Some(adapter),
        prompt: vec_i64(&e[&format!("prompt.{i}")]),
        num_samples: 1,
        params: greedy(new_tokens - 3 * i as i64),
        scoring: Scoring::prompt_logprobs(true),
    };
    let other_request = |j: usize| SampleRequest {
        share_scope: "",
        stream: false,
        adapter: Some(&others[j]),
        prompt: (0..(2 + 3 * j as i64))
            .map(|t| (t * 7 + j as i64) % 100 + 1)
            .collect(),
        num_samples: 2,
        params: SamplingParams {
            max_tokens: 3 + 4 * j as i64,
            temperature: 1.0,
            top_k: 20,
            seed: Some(77 + j as u64),
            stop: Stop::Never,
            ..SamplingParams::default()
        },
        scoring: Scoring::prompt_logprobs(false),
    };
    // Oracle prompt 0 again, asking nothing about the prompt: it starts from a copy of the
    // first request's prompt keys and values.
    let again = || SampleRequest {
        share_scope: "",
        stream: false,
        scoring: Scoring::prompt_logprobs(false),
        params: greedy(new_tokens - 4),
        ..oracle_request(0)
    };
    // (step, tag): oracle prompt i joins at step 2i (tag i); other j at step 3j + 1 (tag 100+j);
    // two join together at step 4; prompt 0 again at step 3 (tag 200).
    let mut joins: Vec<(usize, u64)> = (0..n).map(|i| (2 * i, i as u64)).collect();
    joins.extend((0..3).map(|j| (3 * j + 1, 100 + j as u64)));
    joins.push((3, 200));
    let request_of = |tag: u64| match tag {
        200 => again(),
        100.. => other_request(tag as usize - 100),
        _ => oracle_request(tag as usize),
    };
    let mut g = Generation::new(decoder.kind()).with_step_graphs(graphs);
    let mut done: HashMap<u64, SampleOutput> = HashMap::new();
    for step in 0.. {
        let joining: Vec<(u64, SampleRequest)> = joins
            .iter()
            .filter(|(at, _)| *at == step)
            .map(|&(_, tag)| (tag, request_of(tag)))
            .collect();
        let tagged: Vec<(u64, &SampleRequest)> = joining.iter().map(|(t, r)| (*t, r)).collect();
        for r in g.admit_many(decoder, &tagged, false) {
            r.unwrap();
        }
        if g.is_empty() && joins.iter().all(|(at, _)| *at <= step) {
            break;
        }
        done.extend(g.step(decoder, None).unwrap().finished);
    }
    assert_eq!(done.len(), n + 4);
    assert_eq!(
        g.shared_prompts(),
        1,
        "prompt 0 again shares the first one's"
    );
    let m = (new_tokens - 4) as usize;
    let want = vec_i64(&e["tokens.0"]);
    assert_eq!(done[&200].sequences[0].tokens, want[..m].to_vec());
    assert!(close(
        &done[&200].sequences[0].logprobs,
        &vec_f32(&e["logprobs.0"])[..m],
        1e-4
    ));
    let counts = g.graph_counts();
    if graphs == StepGraphs::Emulate {
        // Batches that kept their rows were recorded and replayed between the joins.
        assert!(counts.recorded > 0 && counts.replayed > 0, "{counts:?}");
    } else {
        assert_eq!(counts.recorded + counts.replayed, 0);
    }
    for i in 0..n {
        let out = &done[&(i as u64)];
        let m = (new_tokens - 3 * i as i64) as usize;
        let seq = &out.sequences[0];
        let want = vec_i64(&e[&format!("tokens.{i}")]);
        assert_eq!(
            seq.tokens,
            want[..m].to_vec(),
            "prompt {i}: greedy tokens differ"
        );
        let want_lp = vec_f32(&e[&format!("logprobs.{i}")]);
        assert!(
            close(&seq.logprobs, &want_lp[..m], 1e-4),
            "prompt {i}: logprobs"
        );
        let plp: Vec<f32> = out.prompt.logprobs.as_ref().unwrap()[1..]
            .iter()
            .map(|x| x.unwrap())
            .collect();
        assert!(
            close(&plp, &vec_f32(&e[&format!("prompt_logprobs.{i}")]), 1e-4),
            "prompt {i}: prompt logprobs"
        );
    }
    for j in 0..3 {
        let alone = sample(decoder, &[other_request(j)], None)
            .unwrap()
            .remove(0);
        let crowded = &done[&(100 + j as u64)];
        for (a, b) in alone.sequences.iter().zip(&crowded.sequences) {
            assert_eq!(a.tokens, b.tokens, "seeded request {j} alone vs crowded");
            assert!(close(&a.logprobs, &b.logprobs, 1e-4));
        }
    }
}

#[test]
fn num_samples_equal_separate_requests_with_their_sample_seeds() {
    let (_dir, decoder) = tiny_llama("num-samples");
    let adapter = &adapters(&decoder, 1)[0];
    let request = |num_samples: i64, seed: u64| SampleRequest {
        share_scope: "",
        stream: false,
        adapter: Some(adapter),
        prompt: vec![9, 8, 7, 6],
        num_samples,
        params: SamplingParams {
            max_tokens: 8,
            temperature: 1.2,
            top_p: 0.9,
            seed: Some(seed),
            stop: Stop::Never,
            ..SamplingParams::default()
        },
        scoring: Scoring::prompt_logprobs(true),
    };
    let mut g = Generation::new(decoder.kind());
    g.admit(&decoder, 0, &request(4, 123), false).unwrap();
    assert_eq!(g.prefills(), 1, "one prefill for four samples");
    let mut together = None;
    while !g.is_empty() {
        together = g.step(&decoder, None).unwrap().finished.pop().or(together);
    }
    let together = together.unwrap().1;
    let separate = sample(
        &decoder,
        &(0..4)
            .map(|i| request(1, sample_seed(123, i)))
            .collect::<Vec<_>>(),
        None,
    )
    .unwrap();
    for (i, (a, b)) in together.sequences.iter().zip(&separate).enumerate() {
        assert_eq!(a.tokens, b.sequences[0].tokens, "sample {i}");
        assert!(close(&a.logprobs, &b.sequences[0].logprobs, 1e-4));
        let lps = |o: &SampleOutput| -> Vec<f32> {
            o.prompt.logprobs.as_ref().unwrap()[1..]
                .iter()
                .map(|x| x.unwrap())
                .collect()
        };
        assert!(
            close(&lps(&together), &lps(b), 1e-4),
            "prompt logprobs once"
        );
    }
}

#[test]
fn greedy_on_the_default_model_equals_transformers_for_32_tokens() {
    let model_dir = default_model_dir();
    let out = TempDir::new("sample-default");
    let file = out.path().join("greedy.safetensors");
    oracle(
        "sample_oracle.py",
        &[
            "greedy",
            model_dir.to_str().unwrap(),
            file.to_str().unwrap(),
            "32",
        ],
    );
    let decoder = Decoder::load(&model_dir, Device::Cpu, Some(Kind::Float)).unwrap();
    check_against_oracle(&decoder, None, &file, 32);
}

/// On the default model's 49,152-token vocabulary, 24 seeded requests (temperature 1, prompts
/// of different lengths, some with top-p) sampled together draw what each draws alone. A batch
/// of another size sums in another order, so the logits differ by float rounding (up to ~4e-5
/// in a logprob); a draw that inverted the cumulative distribution over the vocabulary moved on
/// such differences (with it, request 6 here drew differently together), where the race of
/// `loraloom_model::draw` moves only on a near-tie of two clocks.
#[test]
fn seeded_requests_on_the_default_model_draw_alike_alone_and_together() {
    let decoder = Decoder::load(&default_model_dir(), Device::Cpu, Some(Kind::Float)).unwrap();
    let requests: Vec<SampleRequest> = (0..24i64)
        .map(|i| SampleRequest {
            share_scope: "",
            stream: false,
            adapter: None,
            prompt: (0..6 + i % 9)
                .map(|j| 100 + (i * 7919 + j * 104_729) % 40_000)
                .collect(),
            num_samples: 1,
            params: SamplingParams {
                max_tokens: 24,
                temperature: 1.0,
                top_p: if i % 3 == 0 { 0.95 } else { 1.0 },
                seed: Some(1000 + i as u64),
                stop: Stop::Never,
                ..SamplingParams::default()
            },
            scoring: Scoring::prompt_logprobs(false),
        })
        .collect();
    let together = sample(&decoder, &requests, None).unwrap();
    for (i, (request, got)) in requests.iter().zip(&together).enumerate() {
        assert_as_alone(&decoder, request, got, &format!("request {i}"));
    }
}

/// Checks that `got` holds what `request` samples alone (tokens equal, logprobs within 1e-4,
/// as above) and returns that.
fn assert_as_alone(
    decoder: &Decoder,
    request: &SampleRequest,
    got: &SampleOutput,
    what: &str,
) -> SampleOutput {
    let alone = sample(decoder, std::slice::from_ref(request), None)
        .unwrap()
        .remove(0);
    assert_eq!(alone.sequences.len(), got.sequences.len(), "{what}");
    for (a, b) in alone.sequences.iter().zip(&got.sequences) {
        assert_eq!(a.tokens, b.tokens, "{what}: alone vs here");
        let (x, y) = (&a.logprobs, &b.logprobs);
        assert!(close(x, y, 1e-4), "{what}: {x:?} vs {y:?}");
    }
    alone
}

fn adapters(decoder: &Decoder, n: usize) -> Vec<LoraAdapter> {
    (0..n)
        .map(|i| {
            let spec = LoraSpec {
                rank: 2 + 2 * i as i64,
                alpha: 32.0,
                seed: i as u64,
                train_attn: true,
                train_mlp: i % 2 == 0,
                train_unembed: i == 1,
            };
            let a = LoraAdapter::new(spec, decoder.config(), Device::Cpu).unwrap();
            perturb(&a, 100 + i as i64, 0.1);
            a
        })
        .collect()
}

#[test]
fn eight_sequences_over_four_adapters_equal_each_alone() {
    let (_dir, decoder) = tiny_llama("mixed");
    let adapters = adapters(&decoder, 4);
    let params = |seed| SamplingParams {
        max_tokens: 12,
        temperature: 0.9,
        top_p: 0.95,
        seed: Some(seed),
        stop: Stop::Tokens(vec![5]),
        ..SamplingParams::default()
    };
    let prompts: Vec<Vec<i64>> = (0..4)
        .map(|i| {
            (0..(3 + 2 * i))
                .map(|j| (i * 17 + j * 5 + 1) % 128)
                .collect()
        })
        .collect();
    let request = |i: usize| SampleRequest {
        share_scope: "",
        stream: false,
        adapter: Some(&adapters[i]),
        prompt: prompts[i].clone(),
        num_samples: 2,
        params: params(40 + i as u64),
        scoring: Scoring::prompt_logprobs(false),
    };
    let together = sample(&decoder, &(0..4).map(request).collect::<Vec<_>>(), None).unwrap();
    for (i, mixed) in together.iter().enumerate() {
        let alone = sample(&decoder, &[request(i)], None).unwrap().remove(0);
        for (s, (a, b)) in alone.sequences.iter().zip(&mixed.sequences).enumerate() {
            assert_eq!(a.tokens, b.tokens, "adapter {i} sample {s}");
            // A joint prefill pads prompts and attends under an explicit mask (another kernel
            // than a lone prompt's causal one): f32 rounding moves logprobs of size ~5 by up to
            // ~2e-5, so the bound is the transformers oracle's 1e-4.
            assert!(
                close(&a.logprobs, &b.logprobs, 1e-4),
                "adapter {i} sample {s}: {:?} vs {:?}",
                a.logprobs,
                b.logprobs
            );
            assert_eq!(a.stop_reason, b.stop_reason);
        }
        // The two samples of one prompt draw from different streams.
        assert_ne!(mixed.sequences[0].tokens, mixed.sequences[1].tokens);
    }
}

#[test]
fn expert_adapters_past_a_stacks_capacity_decode_as_alone() {
    // 400 experts: a decode loop's stack holds two expert adapters (a stack's expert deltas are
    // grouped matmuls of one group per member and expert, at most 1023 groups on a GPU).
    let dir = TempDir::new("moe-wide-decode");
    oracle(
        "tiny_models.py",
        &["make", "qwen3_moe_wide", dir.path().to_str().unwrap()],
    );
    let decoder = Decoder::load(dir.path(), Device::Cpu, Some(Kind::Float)).unwrap();
    let adapters: Vec<LoraAdapter> = (0..5)
        .map(|i| {
            let spec = LoraSpec {
                rank: 4,
                alpha: 32.0,
                seed: i,
                train_attn: true,
                train_mlp: true,
                train_unembed: false,
            };
            let a = LoraAdapter::new(spec, decoder.config(), Device::Cpu).unwrap();
            perturb(&a, 200 + i as i64, 0.1);
            a
        })
        .collect();
    assert_eq!(adapters[0].layout().stack_capacity(), 2);
    // Requests 0-4 of one adapter each, request 5 of the base model.
    let request = |i: usize| SampleRequest {
        share_scope: "",
        stream: false,
        adapter: adapters.get(i),
        prompt: (0..3 + i as i64)
            .map(|j| (i as i64 * 13 + j * 7 + 1) % 128)
            .collect(),
        num_samples: 1,
        params: SamplingParams {
            max_tokens: 10,
            temperature: 0.8,
            seed: Some(60 + i as u64),
            ..SamplingParams::default()
        },
        scoring: Scoring::prompt_logprobs(false),
    };
    let requests: Vec<SampleRequest> = (0..6).map(request).collect();
    for graphs in [StepGraphs::Off, StepGraphs::Emulate] {
        // Adapter 0 and the base model first; two steps later the other four join at once:
        // one into the room adapter 0's stack has left, the rest into two new stacks.
        let mut g = Generation::new(decoder.kind()).with_step_graphs(graphs);
        let mut done = HashMap::new();
        for i in [0, 5] {
            g.admit(&decoder, i as u64, &requests[i], false).unwrap();
        }
        for _ in 0..2 {
            done.extend(g.step(&decoder, None).unwrap().finished);
        }
        let joining: Vec<(u64, &SampleRequest)> =
            (1..5).map(|i| (i as u64, &requests[i])).collect();
        for admitted in g.admit_many(&decoder, &joining, false) {
            admitted.unwrap();
        }
        while !g.is_empty() {
            done.extend(g.step(&decoder, None).unwrap().finished);
        }
        for (i, request) in requests.iter().enumerate() {
            assert_as_alone(
                &decoder,
                request,
                &done[&(i as u64)],
                &format!("{graphs:?}: request {i}"),
            );
        }
    }
}

/// Recorded and replayed steps (the static step a CUDA graph records, emulated on the CPU:
/// attention over the whole cache buffers under a mask made on the device, the keys and values
/// written at a column read on the device) choose what steps issued one by one choose: mixed
/// adapters, seeded draws, sequences stopping at different steps (parked in the batch, then
/// leaving it, which is recorded again), and 90 tokens, past the cache's first reallocation
/// (the buffers move and the recording with them).
#[test]
fn recorded_steps_equal_steps_issued_one_by_one() {
    let (_dir, decoder) = tiny_llama("recorded");
    let adapters = adapters(&decoder, 3);
    let request = |i: usize| SampleRequest {
        share_scope: "",
        stream: false,
        adapter: (i < 3).then(|| &adapters[i]),
        prompt: (0..(2 + 3 * i as i64))
            .map(|j| (j * 11 + i as i64) % 120 + 1)
            .collect(),
        num_samples: 2,
        params: SamplingParams {
            max_tokens: 90 - 20 * i as i64,
            temperature: if i == 0 { 0.0 } else { 0.8 },
            top_k: 40,
            seed: Some(500 + i as u64),
            stop: Stop::Never,
            ..SamplingParams::default()
        },
        scoring: Scoring::prompt_logprobs(false),
    };
    let requests: Vec<SampleRequest> = (0..4).map(request).collect();
    let eager = sample(&decoder, &requests, None).unwrap();
    let mut g = Generation::new(decoder.kind()).with_step_graphs(StepGraphs::Emulate);
    let recorded = sample_with(&mut g, &decoder, &requests, None).unwrap();
    for (i, (a, b)) in eager.iter().zip(&recorded).enumerate() {
        for (s, (x, y)) in a.sequences.iter().zip(&b.sequences).enumerate() {
            assert_eq!(x.tokens, y.tokens, "request {i} sample {s}");
            // Attention over the whole buffer sums the same terms (the masked ones are exact
            // zeros) in another blocking: f32 rounding, far under the oracles' 1e-4.
            assert!(
                close(&x.logprobs, &y.logprobs, 1e-5),
                "request {i} sample {s}: {:?} vs {:?}",
                x.logprobs,
                y.logprobs
            );
        }
    }
    // The recording path ran: a batch is recorded at its second step after every change and
    // replayed otherwise. Sequences that stop stay parked in the batch while they do not
    // outnumber the live ones and the buffers kept stay within twice the live requests'
    // footprint, so the first departure does not change it: four recordings (five if every
    // departure did; the second is over twice the footprint by its prompt padding, the third
    // leaves six parked beside two live).
    let counts = g.graph_counts();
    assert!(counts.recorded <= 4, "{counts:?}");
    assert!(counts.replayed >= 80, "{counts:?}");
}

#[test]
fn top_k_1_is_greedy_and_seeds_reproduce() {
    let (_dir, decoder) = tiny_llama("seeds");
    let run = |params: SamplingParams| {
        let req = SampleRequest {
            share_scope: "",
            stream: false,
            adapter: None,
            prompt: vec![3, 1, 4, 1, 5],
            num_samples: 3,
            params,
            scoring: Scoring::prompt_logprobs(false),
        };
        sample(&decoder, &[req], None).unwrap().remove(0).sequences
    };
    let top1 = run(SamplingParams {
        top_k: 1,
        temperature: 1.0,
        seed: Some(9),
        stop: Stop::Never,
        max_tokens: 10,
        ..SamplingParams::default()
    });
    let g = run(greedy(10));
    assert!(top1.iter().all(|s| s.tokens == g[0].tokens));
    let seeded = |seed| {
        run(SamplingParams {
            max_tokens: 10,
            seed: Some(seed),
            stop: Stop::Never,
            ..SamplingParams::default()
        })
    };
    assert_eq!(seeded(1), seeded(1));
    assert_ne!(seeded(1)[0].tokens, seeded(2)[0].tokens);
}

#[test]
fn stop_tokens_end_sequences_and_limits_are_checked_first() {
    let (_dir, decoder) = tiny_llama("limits");
    let req = |params: SamplingParams, prompt: Vec<i64>| SampleRequest {
        share_scope: "",
        stream: false,
        adapter: None,
        prompt,
        num_samples: 1,
        params,
        scoring: Scoring::prompt_logprobs(false),
    };
    // Stop on the greedy continuation's third token.
    let g = sample(&decoder, &[req(greedy(6), vec![1, 2, 3])], None)
        .unwrap()
        .remove(0)
        .sequences
        .remove(0);
    let stop_on = g.tokens[2];
    let first = g.tokens.iter().position(|&t| t == stop_on).unwrap();
    let mut p = greedy(6);
    p.stop = Stop::Tokens(vec![stop_on]);
    let s = sample(&decoder, &[req(p, vec![1, 2, 3])], None)
        .unwrap()
        .remove(0)
        .sequences
        .remove(0);
    assert_eq!(s.tokens, g.tokens[..=first].to_vec());
    assert_eq!(s.stop_reason, StopReason::Stop);

    let err = |params: SamplingParams, prompt: Vec<i64>| {
        sample(&decoder, &[req(params, prompt)], None)
            .unwrap_err()
            .to_string()
    };
    let e = err(greedy(200), vec![1, 2, 3]);
    assert!(
        e.contains("sampling_params.max_tokens") && e.contains("128"),
        "{e}"
    );
    let e = err(greedy(0), vec![1]);
    assert!(e.contains("max_tokens"), "{e}");
    let e = err(greedy(4), vec![]);
    assert!(e.contains("prompt"), "{e}");
    let e = err(greedy(4), vec![1, 999]);
    assert!(e.contains("prompt") && e.contains("999"), "{e}");
    let mut p = greedy(4);
    p.temperature = f64::NAN;
    assert!(err(p, vec![1]).contains("temperature"));
    let mut p = greedy(4);
    p.top_p = 0.0;
    assert!(err(p, vec![1]).contains("top_p"));
    let mut p = greedy(4);
    p.stop = Stop::Strings(vec!["x".into()]);
    assert!(err(p, vec![1]).contains("tokenizer"));
}

/// Sampled tokens' logprobs equal one forward pass (no cache) over the prompt and the sampled
/// tokens. 110 tokens outgrow the cache's first allocation (window + 64 free columns), so its
/// reallocation, and rows of one request leaving at different steps, are covered too.
#[test]
fn sampled_logprobs_equal_a_forward_pass_over_the_same_tokens() {
    let (_dir, decoder) = tiny_llama("forward-check");
    let adapter = &adapters(&decoder, 1)[0];
    let prompt = vec![11, 12, 13, 14, 15];
    let request = SampleRequest {
        share_scope: "",
        stream: false,
        adapter: Some(adapter),
        prompt: prompt.clone(),
        num_samples: 3,
        params: SamplingParams {
            max_tokens: 110,
            temperature: 1.0,
            // A seed whose samples run long enough (most stop within 70 tokens).
            seed: Some(4),
            // Stops end the samples at different steps.
            stop: Stop::Tokens(vec![7, 8]),
            ..SamplingParams::default()
        },
        scoring: Scoring::prompt_logprobs(false),
    };
    let out = sample(&decoder, &[request], None).unwrap().remove(0);
    assert!(
        out.sequences.iter().any(|s| s.tokens.len() > 70),
        "long enough to grow the cache"
    );
    let stack = loraloom_model::AdapterStack::new(&[adapter], Kind::Float, false).unwrap();
    for seq in &out.sequences {
        let mut ids = prompt.clone();
        ids.extend(&seq.tokens);
        let input = tch::Tensor::from_slice(&ids).view([1, -1]);
        let lora = loraloom_model::LoraBatch::one(&stack, 0, 1).unwrap();
        let logits = tch::no_grad(|| decoder.forward(&input, Some(&lora)).unwrap()).get(0);
        let lp = logits.log_softmax(-1, Kind::Float);
        let want: Vec<f32> = seq
            .tokens
            .iter()
            .enumerate()
            .map(|(i, &t)| lp.double_value(&[(prompt.len() + i - 1) as i64, t]) as f32)
            .collect();
        assert!(
            close(&seq.logprobs, &want, 1e-4),
            "{:?} vs {want:?}",
            seq.logprobs
        );
    }
}

/// A prompt longer than the prefill chunk is prefilled a chunk per step while another request
/// decodes, then joins: its tokens, logprobs and prompt logprobs equal a one-pass prefill (which
/// the transformers oracles above check), and the other request is unaffected.
#[test]
fn long_prompts_prefilled_in_chunks_equal_one_pass() {
    let (_dir, decoder) = tiny_llama("chunks");
    let adapter = &adapters(&decoder, 1)[0];
    let long = SampleRequest {
        share_scope: "",
        stream: false,
        adapter: Some(adapter),
        prompt: (0..40).map(|i| (i * 13 + 7) % 120 + 1).collect(),
        num_samples: 2,
        params: SamplingParams {
            max_tokens: 10,
            temperature: 0.7,
            seed: Some(3),
            stop: Stop::Never,
            ..SamplingParams::default()
        },
        scoring: Scoring {
            prompt_logprobs: true,
            prompt_top_k: 4,
            prompt_last_n: None,
            prompt_targets: Some((0..39).map(|i| vec![i % 120, -1, 7]).collect()),
            prompt_targets_layout: None,
            prompt_alt_k: 3,
            sample_top_k: 3,
        },
    };
    let short = SampleRequest {
        share_scope: "",
        stream: false,
        adapter: None,
        prompt: vec![4, 5, 6],
        num_samples: 1,
        params: greedy(12),
        scoring: Scoring::prompt_logprobs(false),
    };
    let mut g = Generation::new(decoder.kind()).with_prefill_chunk(16);
    g.admit(&decoder, 0, &short, false).unwrap();
    g.admit(&decoder, 1, &long, false).unwrap();
    assert_eq!(g.requests(), 2);
    let mut done: HashMap<u64, SampleOutput> = HashMap::new();
    let mut steps_before_join = 0;
    while !g.is_empty() {
        let report = g.step(&decoder, None).unwrap();
        assert!(report.failed.is_empty());
        if g.rows() < 3 && !done.contains_key(&0) {
            steps_before_join += 1;
        }
        done.extend(report.finished);
    }
    assert!(
        steps_before_join >= 2,
        "40 tokens in chunks of 16 take three steps to prefill"
    );
    let one_pass = sample(&decoder, &[long.clone(), short.clone()], None).unwrap();
    for (tag, want) in [(1u64, &one_pass[0]), (0, &one_pass[1])] {
        let got = &done[&tag];
        for (a, b) in got.sequences.iter().zip(&want.sequences) {
            assert_eq!(a.tokens, b.tokens, "request {tag}");
            assert!(close(&a.logprobs, &b.logprobs, 1e-4), "request {tag}");
        }
    }
    let lps = |o: &SampleOutput| -> Vec<f32> {
        o.prompt.logprobs.as_ref().unwrap()[1..]
            .iter()
            .map(|x| x.unwrap())
            .collect()
    };
    assert_eq!(done[&1].prompt.logprobs.as_ref().unwrap().len(), 40);
    assert!(
        close(&lps(&done[&1]), &lps(&one_pass[0]), 1e-4),
        "prompt logprobs"
    );
    // Every extra, computed a chunk at a time, equals one pass.
    let (chunked, whole) = (&done[&1], &one_pass[0]);
    let same_top_k = |a: &TopK, b: &TopK| {
        a.len() == b.len()
            && a.iter()
                .zip(b)
                .all(|(x, y)| x.0 == y.0 && (x.1 - y.1).abs() <= 1e-4)
    };
    let (a, b) = (
        chunked.prompt.top_k.as_ref().unwrap(),
        whole.prompt.top_k.as_ref().unwrap(),
    );
    assert_eq!(a.len(), 40);
    assert!(a[0].is_none() && a[1..].iter().all(Option::is_some));
    assert!(a.iter().zip(b).all(|(x, y)| match (x, y) {
        (Some(x), Some(y)) => x.len() == 4 && same_top_k(x, y),
        (x, y) => x.is_none() && y.is_none(),
    }));
    let flat = |m: &Vec<Vec<f32>>| m.concat();
    let (a, b) = (
        chunked.prompt.targets.as_ref().unwrap(),
        whole.prompt.targets.as_ref().unwrap(),
    );
    assert_eq!(a.len(), 39);
    assert!(a.iter().all(|row| row[1] == 0.0), "-1 cells are 0.0");
    assert!(close(&flat(a), &flat(b), 1e-4), "target logprobs");
    let (a, b) = (
        chunked.prompt.alt.as_ref().unwrap(),
        whole.prompt.alt.as_ref().unwrap(),
    );
    assert_eq!(a.tokens, b.tokens, "seeded alternative draws");
    assert!(a.tokens.len() == 39 && a.tokens.iter().all(|r| r.len() == 3));
    assert!(close(&flat(&a.logprobs), &flat(&b.logprobs), 1e-4));
    for (x, y) in chunked.sequences.iter().zip(&whole.sequences) {
        let (x, y) = (x.top_k.as_ref().unwrap(), y.top_k.as_ref().unwrap());
        assert_eq!(x.len(), 10);
        assert!(x
            .iter()
            .zip(y)
            .all(|(p, q)| p.len() == 3 && same_top_k(p, q)));
    }
    assert!(
        done[&0].sequences[0].top_k.is_none(),
        "not asked, not computed"
    );
}

/// A request dropped between steps (cancelled, or over its time limit) leaves the others as if
/// it had never joined: their tokens equal a run without it, logprobs within the 1e-4 of the
/// test above (a joint prefill pads prompts).
#[test]
fn removing_a_request_between_steps_leaves_the_others_unchanged() {
    let (_dir, decoder) = tiny_llama("remove");
    let adapters = adapters(&decoder, 3);
    let request = |i: usize| SampleRequest {
        share_scope: "",
        stream: false,
        adapter: Some(&adapters[i]),
        prompt: (0..(4 + 3 * i as i64))
            .map(|j| (j * 11 + i as i64 * 7 + 2) % 120 + 1)
            .collect(),
        num_samples: 2,
        params: SamplingParams {
            max_tokens: if i == 2 { 4 } else { 10 },
            temperature: 0.8,
            seed: Some(70 + i as u64),
            stop: Stop::Never,
            ..SamplingParams::default()
        },
        scoring: Scoring::prompt_logprobs(false),
    };
    let without = sample(&decoder, &[request(0), request(2)], None).unwrap();
    // With recorded steps, request 2's rows are parked when it finishes (step 4) and leave with
    // request 1's.
    for graphs in [StepGraphs::Off, StepGraphs::Emulate] {
        let mut g = Generation::new(decoder.kind()).with_step_graphs(graphs);
        for i in 0..3 {
            g.admit(&decoder, i as u64, &request(i), false).unwrap();
        }
        let mut done: HashMap<u64, SampleOutput> = HashMap::new();
        for _ in 0..5 {
            done.extend(g.step(&decoder, None).unwrap().finished);
        }
        assert!(done.contains_key(&2), "{graphs:?}");
        assert_eq!(g.remove(&[1, 9]).unwrap(), vec![1]);
        assert_eq!((g.requests(), g.rows()), (1, 2), "{graphs:?}");
        while !g.is_empty() {
            done.extend(g.step(&decoder, None).unwrap().finished);
        }
        assert!(!done.contains_key(&1));
        for (tag, want) in [(0u64, &without[0]), (2, &without[1])] {
            for (a, b) in done[&tag].sequences.iter().zip(&want.sequences) {
                assert_eq!(a.tokens, b.tokens, "request {tag}, {graphs:?}");
                assert!(close(&a.logprobs, &b.logprobs, 1e-4), "request {tag}");
            }
        }
        let counts = g.graph_counts();
        assert_eq!(
            counts.replayed > 0,
            graphs == StepGraphs::Emulate,
            "{counts:?}"
        );
    }
    // Removing the last requests empties the loop.
    let mut g = Generation::new(decoder.kind());
    g.admit(&decoder, 5, &request(0), false).unwrap();
    g.step(&decoder, None).unwrap();
    assert_eq!(g.remove(&[5]).unwrap(), vec![5]);
    assert!(g.is_empty() && g.rows() == 0);
}

/// Requests with one prompt and adapter share its prefill: admitted together, or joining while a
/// sequence of that prompt decodes (a copy of its prompt keys and values and a step over the
/// last prompt token), or while its long prompt is prefilled in chunks. Each request samples
/// what it samples alone; requests of another adapter, or asking about the prompt after it was
/// prefilled, prefill their own.
#[test]
fn requests_with_one_prompt_share_its_prefill_and_sample_as_if_alone() {
    let (_dir, decoder) = tiny_llama("shared-prompts");
    let ads = adapters(&decoder, 2);
    let prompt: Vec<i64> = (0..9).map(|i| (i * 11 + 5) % 120 + 1).collect();
    let long: Vec<i64> = (0..14).map(|i| (i * 7 + 3) % 120 + 1).collect();
    let request = |adapter: Option<usize>, prompt: &[i64], seed: u64, scores: bool| SampleRequest {
        share_scope: "",
        stream: false,
        adapter: adapter.map(|i| &ads[i]),
        prompt: prompt.to_vec(),
        num_samples: 1 + (seed % 2) as i64,
        params: SamplingParams {
            max_tokens: 6 + seed as i64 % 5,
            temperature: if seed.is_multiple_of(3) { 0.0 } else { 0.9 },
            top_k: 30,
            seed: Some(seed),
            stop: Stop::Never,
            ..SamplingParams::default()
        },
        scoring: Scoring::prompt_logprobs(scores),
    };
    let other_tenant = SampleRequest {
        share_scope: "another tenant",
        stream: false,
        ..request(None, &prompt, 14, false)
    };
    // (step, tag, request, prefills and shared prompts once it is admitted with the others of
    // its step).
    let plan: Vec<(usize, u64, SampleRequest, (u64, u64))> = vec![
        (0, 1, request(Some(0), &prompt, 1, false), (3, 2)),
        (0, 2, request(Some(0), &prompt, 2, false), (3, 2)),
        (0, 3, request(Some(0), &prompt, 3, true), (3, 2)), // asks about the prompt: shares it
        (0, 4, request(Some(1), &prompt, 4, false), (3, 2)), // another adapter
        (0, 5, request(None, &prompt, 5, false), (3, 2)),   // the base model
        (2, 6, request(Some(0), &prompt, 6, false), (6, 4)), // from a live sequence
        (2, 7, request(None, &prompt, 7, false), (6, 4)),   // from a live sequence
        (2, 8, request(Some(0), &prompt, 8, true), (6, 4)), // asks about the prompt: prefills
        (2, 9, request(Some(1), &prompt[1..], 9, false), (6, 4)), // another prompt
        (2, 14, other_tenant, (6, 4)), // the base model's prompt, of another scope
        (3, 10, request(Some(1), &long, 10, false), (7, 5)), // chunked, then a follower
        (3, 11, request(Some(1), &long, 11, false), (7, 5)),
        (4, 12, request(Some(1), &long, 12, true), (8, 5)), // asks about the prompt: in line
        (6, 13, request(Some(1), &long, 13, false), (8, 6)), // from a live sequence, unchunked
    ];
    let mut g = Generation::new(decoder.kind()).with_prefill_chunk(10);
    let mut done: HashMap<u64, SampleOutput> = HashMap::new();
    for step in 0.. {
        let joining: Vec<(u64, &SampleRequest)> = plan
            .iter()
            .filter(|(at, ..)| *at == step)
            .map(|(_, tag, r, _)| (*tag, r))
            .collect();
        for r in g.admit_many(&decoder, &joining, false) {
            r.unwrap();
        }
        if let Some((.., want)) = plan.iter().rev().find(|(at, ..)| *at == step) {
            assert_eq!(
                (g.prefills(), g.shared_prompts()),
                *want,
                "prefills and shared prompts after step {step}'s admissions"
            );
        }
        if g.is_empty() && plan.iter().all(|(at, ..)| *at <= step) {
            break;
        }
        done.extend(g.step(&decoder, None).unwrap().finished);
    }
    assert_eq!((g.prefills(), g.shared_prompts()), (8, 6));
    for (_, tag, r, _) in &plan {
        let shared = &done[tag];
        let alone = assert_as_alone(&decoder, r, shared, &format!("request {tag}"));
        assert_eq!(
            alone.prompt.logprobs.is_some(),
            shared.prompt.logprobs.is_some()
        );
        if let (Some(a), Some(b)) = (&alone.prompt.logprobs, &shared.prompt.logprobs) {
            let a: Vec<f32> = a[1..].iter().map(|x| x.unwrap()).collect();
            let b: Vec<f32> = b[1..].iter().map(|x| x.unwrap()).collect();
            assert!(close(&a, &b, 1e-4), "request {tag}: prompt logprobs");
        }
    }
}

/// A prompt that starts with a finished sequence of its adapter (the next turn of a
/// conversation) copies that sequence's keys and values from the prefix cache and computes
/// only the rest; prompts sharing less, asking about the prompt, or of another adapter compute
/// theirs. Every request samples what it samples alone, in a loop that keeps nothing.
#[test]
fn prompts_starting_with_a_finished_sequence_reuse_its_keys_and_values() {
    let (_dir, decoder) = tiny_llama("prefix-cache");
    let ads = adapters(&decoder, 2);
    let first: Vec<i64> = (0..20).map(|i| (i * 13 + 5) % 120 + 1).collect();
    let request =
        |adapter: Option<usize>, prompt: Vec<i64>, seed: u64, scores: bool| SampleRequest {
            share_scope: "",
            stream: false,
            adapter: adapter.map(|i| &ads[i]),
            prompt,
            num_samples: 1,
            params: SamplingParams {
                max_tokens: 6 + seed as i64 % 3,
                temperature: if seed.is_multiple_of(2) { 0.0 } else { 0.8 },
                seed: Some(seed),
                stop: Stop::Never,
                ..SamplingParams::default()
            },
            scoring: Scoring::prompt_logprobs(scores),
        };
    let mut g = Generation::new(decoder.kind()).with_prefix_cache(1000);
    // Turn one: three sequences of the same prompt, by two adapters and the base model.
    let turn_one = [
        request(Some(0), first.clone(), 2, false),
        request(Some(1), first.clone(), 3, false),
        request(None, first.clone(), 4, false),
    ];
    let one = sample_with(&mut g, &decoder, &turn_one, None).unwrap();
    let (prefills, reused) = (g.prefills(), g.prompt_tokens_reused());
    assert_eq!((prefills, reused), (3, 0));
    let said = |i: usize| one[i].sequences[0].tokens.clone();
    // Turn two of adapter 0's conversation: everything it computed is reused.
    let next_turn: Vec<i64> = [first.clone(), said(0), vec![7, 8, 9, 10, 11]].concat();
    let turn_two = [
        request(Some(0), next_turn.clone(), 6, false),
        request(Some(1), (50..70).collect(), 7, false), // nothing shared
        request(Some(0), next_turn.clone(), 8, true),   // asks about its prompt
    ];
    let tagged: Vec<(u64, &SampleRequest)> = (10..).zip(turn_two.iter()).collect();
    for r in g.admit_many(&decoder, &tagged, false) {
        r.unwrap();
    }
    let kept = (first.len() + said(0).len() - 1) as u64;
    assert_eq!(
        (g.prefills(), g.prompt_tokens_reused()),
        (prefills + 2, kept),
        "one copy of turn one's {kept} tokens"
    );
    let mut done: HashMap<u64, SampleOutput> = HashMap::new();
    done.extend(g.step(&decoder, None).unwrap().finished);
    // Joining at once: prompts with rests after their shared prefix of different lengths (a
    // shorter rest computes part of its prefix again; a prompt shorter than the longest rest
    // is padded), and the base model's turn two of its own conversation.
    let joining = [
        request(None, [first.clone(), said(2), vec![3]].concat(), 9, false),
        request(Some(1), [first.clone(), vec![99, 98]].concat(), 10, false),
        request(None, first[..17].to_vec(), 11, false),
        request(
            Some(0),
            [next_turn.clone(), (1..30).collect()].concat(),
            12,
            false,
        ),
    ];
    let tagged: Vec<(u64, &SampleRequest)> = (20..).zip(joining.iter()).collect();
    for r in g.admit_many(&decoder, &tagged, false) {
        r.unwrap();
    }
    assert!(g.prompt_tokens_reused() > kept, "turn two reused more");
    while !g.is_empty() {
        done.extend(g.step(&decoder, None).unwrap().finished);
    }
    for (tag, r) in (10..).zip(&turn_two).chain((20..).zip(&joining)) {
        assert_as_alone(&decoder, r, &done[&tag], &format!("request {tag}"));
    }
}

/// A long prompt whose rest after a kept prefix is still longer than a prefill chunk is
/// prefilled in chunks from a copy of that prefix, and samples what it samples alone.
#[test]
fn a_long_rest_after_a_kept_prefix_is_prefilled_in_chunks_from_its_copy() {
    let (_dir, decoder) = tiny_llama("prefix-chunks");
    let adapter = &adapters(&decoder, 1)[0];
    let request = |prompt: Vec<i64>, seed: u64| SampleRequest {
        share_scope: "",
        stream: false,
        adapter: Some(adapter),
        prompt,
        num_samples: 1,
        params: SamplingParams {
            max_tokens: 6,
            temperature: 0.9,
            seed: Some(seed),
            stop: Stop::Never,
            ..SamplingParams::default()
        },
        scoring: Scoring::prompt_logprobs(false),
    };
    let first: Vec<i64> = (0..20).map(|i| (i * 7 + 2) % 120 + 1).collect();
    let mut g = Generation::new(decoder.kind())
        .with_prefill_chunk(8)
        .with_prefix_cache(500);
    let said = sample_with(&mut g, &decoder, &[request(first.clone(), 1)], None).unwrap()[0]
        .sequences[0]
        .tokens
        .clone();
    let turn_two = request(
        [first.clone(), said.clone(), (30..42).collect()].concat(),
        2,
    );
    let before = (g.prefills(), g.shared_prompts());
    let out = sample_with(&mut g, &decoder, std::slice::from_ref(&turn_two), None).unwrap();
    assert_eq!((g.prefills(), g.shared_prompts()), (before.0, before.1 + 1));
    assert_eq!(
        g.prompt_tokens_reused(),
        (first.len() + said.len() - 1) as u64
    );
    assert_as_alone(&decoder, &turn_two, &out[0], "turn two");
}

/// One request of [`random_crowds_sample_as_if_each_request_were_alone`]'s scenario.
struct Planned<'a> {
    tag: u64,
    request: SampleRequest<'a>,
    /// Removed before it finishes (between steps), if it is still in progress then.
    removed_at: Option<usize>,
}

/// A random prompt of a scenario: an earlier request's prompt again (a group), the next turn of
/// a finished conversation (its prompt, what it sampled and a reply), a stem (a shared system
/// prompt) with a random rest, or fresh tokens; with the tag of the request it continues, if
/// any. `earlier` and `finished` hold (tag, tokens). Lengths stay under the tiny model's 128
/// positions with room for 12 sampled tokens.
fn random_prompt(
    rng: &mut SplitMix64,
    stems: &[Vec<i64>],
    earlier: &[(u64, Vec<i64>)],
    finished: &[(u64, Vec<i64>)],
) -> (Vec<i64>, Option<u64>) {
    fn below(rng: &mut SplitMix64, n: usize) -> usize {
        (rng.next_u64() % n as u64) as usize
    }
    fn fresh(rng: &mut SplitMix64, n: usize) -> Vec<i64> {
        (0..n).map(|_| 1 + below(rng, 120) as i64).collect()
    }
    let (prompt, from) = match below(rng, 4) {
        0 if !earlier.is_empty() => {
            let (tag, prompt) = &earlier[below(rng, earlier.len())];
            (prompt.clone(), Some(*tag))
        }
        1 if !finished.is_empty() => {
            let (tag, turn) = &finished[below(rng, finished.len())];
            let reply = 1 + below(rng, 6);
            ([turn.clone(), fresh(rng, reply)].concat(), Some(*tag))
        }
        2 => {
            let n = 1 + below(rng, 30);
            (fresh(rng, n), None)
        }
        _ => {
            let stem = &stems[below(rng, stems.len())];
            let rest = below(rng, 12);
            ([stem.clone(), fresh(rng, rest)].concat(), None)
        }
    };
    (prompt[prompt.len().saturating_sub(100)..].to_vec(), from)
}

/// Random crowds: requests of three adapters and the base model, of two scopes, with prompts
/// that repeat, extend finished sequences (conversations) or share stems, arriving at random
/// steps, some removed midway, some asking about their prompt, in loops with small prefill
/// chunks (long prompts in chunks, with followers), a small prefix cache (kept sequences
/// evicted and copied) and, in some scenarios, recorded steps. Every request that finishes
/// samples what it samples alone (tokens equal, logprobs within the 1e-4 above, prompt
/// logprobs likewise), a streamed request reported each of its tokens in the step that chose
/// it, and the sharing counters show that the scenarios shared prompts and reused kept
/// sequences.
#[test]
fn random_crowds_sample_as_if_each_request_were_alone() {
    let (_dir, decoder) = tiny_llama("random-crowds");
    let ads = adapters(&decoder, 3);
    let (mut shared, mut reused) = (0, 0);
    for scenario in 0..6u64 {
        let mut rng = SplitMix64::new(9000 + scenario);
        let stems: Vec<Vec<i64>> = (0..3)
            .map(|s| {
                (0..(16 + 8 * s))
                    .map(|i| (i * 7 + s * 31) % 120 + 1)
                    .collect()
            })
            .collect();
        let chunk = 8 + (rng.next_u64() % 17) as usize;
        let graphs = if scenario % 3 == 2 {
            StepGraphs::Emulate
        } else {
            StepGraphs::Off
        };
        // Some scenarios bound the loop's keys and values: kept sequences give way.
        let kv_budget = match scenario % 2 {
            1 => 300 + (rng.next_u64() % 600) as usize,
            _ => usize::MAX,
        };
        let mut g = Generation::new(decoder.kind())
            .with_prefill_chunk(chunk)
            .with_prefix_cache(60 + (rng.next_u64() % 200) as usize)
            .with_kv_budget(kv_budget)
            .with_step_graphs(graphs);
        let kv = match kv_budget {
            usize::MAX => "no".to_string(),
            n => n.to_string(),
        };
        let what = format!("scenario {scenario} (chunk {chunk}, {graphs:?}, {kv} KV budget)");
        // The requests in progress may come to hold rows × the longest prompt + max_tokens: the
        // caches never hold more (unless recorded steps keep finished rows in the batch), and
        // kept tokens stay within what that leaves of the budget.
        let within_budget = |g: &Generation, plan: &[Planned], over: &[u64]| {
            let (rows, longest) = plan
                .iter()
                .filter(|p| !over.contains(&p.tag))
                .map(|p| &p.request)
                .fold((0, 0), |(rows, longest), r| {
                    let len = r.prompt.len() + r.params.max_tokens as usize;
                    (rows + r.num_samples as usize, longest.max(len))
                });
            let footprint = rows * longest;

            (graphs != StepGraphs::Off || g.kv_tokens_held() <= footprint)
                && g.kept_tokens() <= kv_budget.saturating_sub(footprint)
        };
        let mut plan: Vec<Planned> = Vec::new();
        let mut done: HashMap<u64, SampleOutput> = HashMap::new();
        let mut finished_turns: Vec<(u64, Vec<i64>)> = Vec::new();
        let mut removed: Vec<u64> = Vec::new();
        let mut streamed: HashMap<(u64, usize), Vec<(i64, f32)>> = HashMap::new();
        for step in 0..60 {
            let arrivals = if step < 40 { rng.next_u64() % 4 } else { 0 };
            let first = plan.len();
            for _ in 0..arrivals {
                let earlier: Vec<(u64, Vec<i64>)> = plan
                    .iter()
                    .map(|p| (p.tag, p.request.prompt.clone()))
                    .collect();
                let (prompt, from) = random_prompt(&mut rng, &stems, &earlier, &finished_turns);
                let r = rng.next_u64();
                let seed = rng.next_u64();
                // Mostly the sampler and scope of the request it continues, if any.
                let (share_scope, adapter) = match from {
                    Some(tag) if !r.is_multiple_of(4) => {
                        let q = &plan[tag as usize].request;
                        (q.share_scope, q.adapter)
                    }
                    _ => (
                        if (r >> 2).is_multiple_of(5) {
                            "other"
                        } else {
                            ""
                        },
                        match (r >> 3) % 4 {
                            3 => None,
                            i => Some(&ads[i as usize]),
                        },
                    ),
                };
                let request = SampleRequest {
                    share_scope,
                    stream: (r >> 30).is_multiple_of(2),
                    adapter,
                    num_samples: 1 + ((r >> 5) % 3) as i64,
                    params: SamplingParams {
                        max_tokens: 1 + ((r >> 7) % 12) as i64,
                        temperature: [0.0, 0.7, 1.0][((r >> 11) % 3) as usize],
                        top_k: if (r >> 13).is_multiple_of(2) { -1 } else { 20 },
                        top_p: if (r >> 14).is_multiple_of(2) {
                            1.0
                        } else {
                            0.9
                        },
                        seed: Some(seed),
                        stop: if (r >> 15).is_multiple_of(3) {
                            Stop::Tokens(vec![5, 17])
                        } else {
                            Stop::Never
                        },
                    },
                    scoring: Scoring::prompt_logprobs((r >> 17).is_multiple_of(6)),
                    prompt,
                };
                plan.push(Planned {
                    tag: plan.len() as u64,
                    request,
                    removed_at: (r >> 20)
                        .is_multiple_of(10)
                        .then(|| step + 1 + (r >> 24) as usize % 6),
                });
            }
            let joining: Vec<(u64, &SampleRequest)> =
                plan[first..].iter().map(|p| (p.tag, &p.request)).collect();
            for result in g.admit_many(&decoder, &joining, false) {
                result.unwrap();
            }
            let over: Vec<u64> = done.keys().chain(&removed).copied().collect();
            assert!(within_budget(&g, &plan, &over), "{what}: step {step}");
            let leaving: Vec<u64> = plan
                .iter()
                .filter(|p| p.removed_at == Some(step) && !done.contains_key(&p.tag))
                .map(|p| p.tag)
                .collect();
            removed.extend(g.remove(&leaving).unwrap());
            if g.is_empty() {
                continue;
            }
            let report = g.step(&decoder, None).unwrap();
            assert!(report.failed.is_empty(), "{what}");
            collect_streamed(&mut streamed, report.streamed);
            for (tag, out) in report.finished {
                let p = &plan[tag as usize];
                for s in &out.sequences {
                    let turn = [p.request.prompt.clone(), s.tokens.clone()].concat();
                    finished_turns.push((tag, turn));
                }
                done.insert(tag, out);
            }
            let over: Vec<u64> = done.keys().chain(&removed).copied().collect();
            assert!(within_budget(&g, &plan, &over), "{what}: after step {step}");
        }
        while !g.is_empty() {
            let report = g.step(&decoder, None).unwrap();
            collect_streamed(&mut streamed, report.streamed);
            done.extend(report.finished);
        }
        assert_eq!(done.len() + removed.len(), plan.len(), "{what}");
        for p in &plan {
            let Some(got) = done.get(&p.tag) else {
                continue;
            };
            // A streamed request reported each token, with its logprob, in the step that chose
            // it; another reported none.
            for (s, seq) in got.sequences.iter().enumerate() {
                let reported = streamed.get(&(p.tag, s)).cloned().unwrap_or_default();
                let want: Vec<(i64, f32)> = match p.request.stream {
                    true => seq
                        .tokens
                        .iter()
                        .copied()
                        .zip(seq.logprobs.clone())
                        .collect(),
                    false => Vec::new(),
                };
                assert_eq!(reported, want, "{what}, {} sequence {s}", p.tag);
            }
            let alone = assert_as_alone(&decoder, &p.request, got, &format!("{what}, {}", p.tag));
            let scores = |o: &SampleOutput| -> Option<Vec<f32>> {
                let l = o.prompt.logprobs.as_ref()?;
                Some(l[1..].iter().map(|x| x.unwrap()).collect())
            };
            match (scores(&alone), scores(got)) {
                (Some(a), Some(b)) => assert!(close(&a, &b, 1e-4), "{what}, {}", p.tag),
                (a, b) => assert_eq!(a.is_some(), b.is_some(), "{what}, {}", p.tag),
            }
        }
        eprintln!(
            "{what}: {} requests, {} removed, prefills {}, shared {}, reused {}",
            plan.len(),
            removed.len(),
            g.prefills(),
            g.shared_prompts(),
            g.prompt_tokens_reused()
        );
        shared += g.shared_prompts();
        reused += g.prompt_tokens_reused();
    }
    assert!(
        shared > 20 && reused > 200,
        "shared {shared}, reused {reused}"
    );
}

/// Appends the tokens a step streamed to each sequence's.
fn collect_streamed(
    streamed: &mut HashMap<(u64, usize), Vec<(i64, f32)>>,
    report: Vec<(u64, loraloom_model::StreamedToken)>,
) {
    for (tag, t) in report {
        assert!(t.top_k.is_none(), "no request asked for alternatives");
        streamed
            .entry((tag, t.sample))
            .or_default()
            .push((t.token, t.logprob));
    }
}

/// Rows parked for a recorded step keep at most twice the live requests' footprint (what the
/// KV budget reserves for them): a finished request with a long prompt beside a live one with a
/// short prompt and many tokens left leaves the batch instead of growing every row to its
/// prompt plus the other's remaining tokens (2 x 200 tokens against 1 x 104). The tokens are
/// those of steps issued one by one.
#[test]
fn parked_rows_stay_within_the_live_requests_footprint() {
    let (_dir, decoder) = tiny_llama("parked-footprint");
    let request = |prompt_len: i64, max_tokens: i64, seed: u64| SampleRequest {
        share_scope: "",
        stream: false,
        adapter: None,
        prompt: (0..prompt_len).map(|j| (j * 7 + 3) % 120 + 1).collect(),
        num_samples: 1,
        params: SamplingParams {
            max_tokens,
            temperature: 0.8,
            seed: Some(seed),
            stop: Stop::Never,
            ..SamplingParams::default()
        },
        scoring: Scoring::prompt_logprobs(false),
    };
    let (long_prompt, long_run) = (request(100, 4, 1), request(4, 100, 2));
    let mut g = Generation::new(decoder.kind()).with_step_graphs(StepGraphs::Emulate);
    g.admit(&decoder, 0, &long_prompt, false).unwrap();
    g.admit(&decoder, 1, &long_run, false).unwrap();
    let mut done: HashMap<u64, SampleOutput> = HashMap::new();
    while !g.is_empty() {
        done.extend(g.step(&decoder, None).unwrap().finished);
        if !done.contains_key(&1) && g.rows() > 0 {
            // At most twice the live rows x the longest live request (104 tokens either way).
            assert!(
                g.kv_tokens_held() <= 2 * g.rows() * 104,
                "{} held after {} finished requests",
                g.kv_tokens_held(),
                done.len()
            );
        }
    }
    let alone = sample(&decoder, &[long_prompt, long_run], None).unwrap();
    for (tag, want) in [(0u64, &alone[0]), (1, &alone[1])] {
        assert_eq!(
            done[&tag].sequences[0].tokens, want.sequences[0].tokens,
            "request {tag}"
        );
    }
}
