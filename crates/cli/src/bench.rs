//! `loraloom bench`: throughput of loraloom's own paths on a checkpoint, printed as JSON lines
//! (`scripts/bench` runs it beside the Python baselines and prints the ratios).

use std::path::Path;
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use loraloom_engine::{
    Backend, BaseModel, BaseModelInfo, Engine, EngineConfig, FutureState, Limits, ModelKey,
    ModelWorker, QueueKey, Registry, Work,
};
use loraloom_model::rng::SplitMix64;
use loraloom_model::sample::{choose_tokens, Pick};
use loraloom_model::{
    forward_backward, sample, sample_with, step_many, AdamParams, AdamState, AdapterStack, Datum,
    Decoder, Generation, LoraAdapter, LoraBatch, LoraSpec, LossFn, LossInputs, ModelConfig,
    PassCost, SampleRequest, SampledSequence, SamplingParams, StepGraphs, StepJob, Stop,
    TrainRequest, NO_LIMIT,
};
use serde_json::json;
use tch::{Kind, Tensor};

/// A fresh adapter of [`spec`] on `decoder`'s model.
fn new_adapter(seed: u64, decoder: &Decoder) -> loraloom_model::Result<LoraAdapter> {
    LoraAdapter::new(
        spec(seed, decoder.config()),
        decoder.config(),
        decoder.device(),
    )
}

/// The benchmarks' adapter: every target, but no experts on a mixture of experts, which the
/// baseline (peft on transformers 5's fused experts) cannot adapt: both sides adapt the same.
fn spec(seed: u64, config: &ModelConfig) -> LoraSpec {
    LoraSpec {
        rank: 16,
        alpha: 32.0,
        seed,
        train_attn: true,
        train_mlp: config.moe.is_none(),
        train_unembed: true,
    }
}

fn datum(seed: usize, len: usize, vocab: i64) -> Datum {
    let toks: Vec<i64> = (0..=len)
        .map(|j| ((seed * 7919 + j * 104_729) as i64) % (vocab - 200) + 100)
        .collect();
    Datum {
        input_tokens: toks[..len].to_vec(),
        loss_inputs: LossInputs {
            target_tokens: toks[1..].to_vec(),
            weights: Some(vec![1.0; len]),
            logprobs: None,
            advantages: None,
            sequence_ratio_mask: None,
            recorded: None,
            targets_per_position: None,
        },
        custom: None,
    }
}

fn emit(what: &str, value: serde_json::Value) {
    let mut v = value;
    v["what"] = json!(what);
    println!("{v}");
}

/// Runs `f` on a thread of its own and waits for it to end.
///
/// libtorch's OpenMP runtime (libgomp) keeps a pool of helper threads per thread that ran
/// parallel work, until that thread exits, and lets idle helpers spin (cheap wake-ups) only
/// while the process holds no more such threads than cores; beyond that every parallel region
/// pays a sleeping wake-up. Measured here: a train step on a fresh thread took 1.24 s while the
/// thread that loaded the model was alive, 0.82-0.86 s once it had exited. So the load and each
/// measurement run on a thread that then ends, and no measurement pays for another's pool.
pub fn isolated<T: Send>(f: impl FnOnce() -> anyhow::Result<T> + Send) -> anyhow::Result<T> {
    std::thread::scope(|s| {
        s.spawn(f)
            .join()
            .map_err(|_| anyhow::anyhow!("benchmark thread panicked"))?
    })
}

/// Seconds per call of `f`, the median of `iters` timed runs after one warm-up.
fn time_it(iters: usize, f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    Ok(time_first_and_median(iters, f)?.1)
}

/// The seconds of `f`'s first (warm-up) call, and the median of `iters` calls after it.
fn time_first_and_median(
    iters: usize,
    mut f: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<(f64, f64)> {
    let t = Instant::now();
    f()?;
    let first = t.elapsed().as_secs_f64();
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok((first, times[times.len() / 2]))
}

/// Dense f32 matmul throughput of this machine through libtorch (the roofline).
pub fn roofline(iters: usize) -> anyhow::Result<()> {
    let n = 2048;
    let a = Tensor::randn([n, n], (Kind::Float, tch::Device::Cpu));
    let b = Tensor::randn([n, n], (Kind::Float, tch::Device::Cpu));
    let secs = time_it(iters, || {
        let _ = a.f_matmul(&b)?;
        Ok(())
    })?;
    let flops = 2.0 * (n as f64).powi(3) / secs;
    emit("matmul_roofline", json!({"gflops": flops / 1e9, "n": n}));
    Ok(())
}

/// Forward (no grad) of batch × len tokens on the base model.
pub fn forward(decoder: &Decoder, batch: usize, len: usize, iters: usize) -> anyhow::Result<()> {
    let vocab = decoder.config().vocab_size;
    let ids: Vec<i64> = (0..batch)
        .flat_map(|b| datum(b, len, vocab).input_tokens)
        .collect();
    let ids = Tensor::from_slice(&ids).view([batch as i64, len as i64]);
    let secs = time_it(iters, || {
        let _logits = tch::no_grad(|| decoder.forward(&ids, None))?;
        Ok(())
    })?;
    emit(
        "forward",
        json!({"batch": batch, "len": len, "seconds": secs, "tokens_per_s": (batch * len) as f64 / secs}),
    );
    Ok(())
}

/// forward_backward + optim_step on batch × len tokens, the datums split evenly over `adapters`
/// adapters (rank 16, all targets) in one fused pass and one fused optimizer step, as the engine
/// runs a batch of tenants: against `adapters` 1, what mixing adapters costs.
pub fn train(
    decoder: &Decoder,
    batch: usize,
    len: usize,
    adapters: usize,
    iters: usize,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        adapters > 0 && batch.is_multiple_of(adapters),
        "--train-adapters must divide the batch ({batch} datums, {adapters} adapters)"
    );
    let vocab = decoder.config().vocab_size;
    let data: Vec<Datum> = (0..batch).map(|b| datum(b, len, vocab)).collect();
    let owned: Vec<LoraAdapter> = (0..adapters)
        .map(|i| new_adapter(i as u64, decoder))
        .collect::<Result<_, _>>()?;
    let mut states: Vec<AdamState> = owned.iter().map(AdamState::new).collect::<Result<_, _>>()?;
    let hp = AdamParams::default();
    let per = batch / adapters;
    let (first, secs) = time_first_and_median(iters, || {
        let requests: Vec<TrainRequest> = owned
            .iter()
            .zip(data.chunks(per))
            .map(|(adapter, data)| TrainRequest {
                adapter: Some(adapter),
                loss: LossFn::CrossEntropy,
                data,
            })
            .collect();
        forward_backward(decoder, &requests, true, NO_LIMIT)?;
        step_all(&owned, &mut states, hp, decoder.device())
    })?;
    let params = decoder.active_parameters() as f64;
    emit(
        "train_step",
        json!({"batch": batch, "len": len, "adapters": adapters, "seconds": secs,
               "first_seconds": first, "tokens_per_s": (batch * len) as f64 / secs,
               "flops_per_token": 4.0 * params}),
    );
    Ok(())
}

/// forward_backward of one datum of `len` tokens (rank 16, all targets) within `budget` bytes
/// of activations: seconds, how the pass was split, and the process's resident memory before
/// and at its peak (`VmHWM`: run it as the only benchmark of its process).
pub fn long_datum(decoder: &Decoder, len: usize, budget: u64) -> anyhow::Result<()> {
    let vocab = decoder.config().vocab_size;
    let data = vec![datum(0, len, vocab)];
    let adapter = new_adapter(0, decoder)?;
    let cost = PassCost::new(decoder.config(), decoder.kind());
    let plan = loraloom_model::memory::plan(&[len], true, &cost, budget)?;
    let rss_before = loraloom_heap::resident_bytes().unwrap_or(0) / 1024;
    let start = Instant::now();
    let req = TrainRequest {
        adapter: Some(&adapter),
        loss: LossFn::CrossEntropy,
        data: &data,
    };
    forward_backward(decoder, &[req], true, budget)?;
    emit(
        "long_datum",
        json!({"len": len, "seconds": start.elapsed().as_secs_f64(),
               "budget_bytes": budget, "mode": format!("{:?}", plan.micro_batches[0].mode),
               "loss_chunk": plan.loss_chunk,
               "rss_before_kib": rss_before, "peak_rss_kib": loraloom_heap::peak_resident_bytes().unwrap_or(0) / 1024}),
    );
    Ok(())
}

/// How the `decode` benchmark decodes.
#[derive(Clone, Copy)]
pub struct DecodeHow {
    /// Tokens per sequence.
    pub new_tokens: i64,
    /// Timed repetitions.
    pub iters: usize,
    /// 0: greedy; else seeded draws.
    pub temperature: f64,
    /// Whether steps are recorded and replayed; when they are, the outputs are also compared
    /// with steps issued one by one (`recorded_vs_eager`).
    pub graphs: StepGraphs,
    /// Whether the requests end at different steps (request `i` of `n` asks for
    /// `new_tokens × (n + i) / 2n` tokens, as an RL group's sequences stop at different
    /// lengths, so rows leave the batch one by one) instead of all after `new_tokens`.
    pub staggered: bool,
}

/// Decode of `sequences` sequences over `adapters` adapters (0 = base model): one request per
/// adapter with its share of the sequences as `num_samples` or, `interleaved`, one request per
/// sequence, sequence `i` on adapter `i % adapters` (rows of mixed adapters, as concurrent users
/// make them).
pub fn decode(
    decoder: &Decoder,
    sequences: usize,
    adapters: usize,
    interleaved: bool,
    how: DecodeHow,
) -> anyhow::Result<()> {
    let DecodeHow {
        new_tokens,
        iters,
        temperature,
        graphs,
        staggered,
    } = how;
    let vocab = decoder.config().vocab_size;
    let owned: Vec<LoraAdapter> = (0..adapters)
        .map(|i| new_adapter(i as u64, decoder))
        .collect::<Result<_, _>>()?;
    let prompt = datum(1, 16, vocab).input_tokens;
    let params = SamplingParams {
        max_tokens: new_tokens,
        temperature,
        seed: Some(0),
        stop: Stop::Never,
        ..SamplingParams::default()
    };
    let mut requests: Vec<SampleRequest> = match sequences.checked_div(adapters) {
        Some(_) if interleaved => (0..sequences)
            .map(|i| SampleRequest {
                share_scope: "",
                stream: false,
                adapter: Some(&owned[i % adapters]),
                prompt: prompt.clone(),
                num_samples: 1,
                params: params.clone(),
                scoring: loraloom_model::Scoring::prompt_logprobs(false),
            })
            .collect(),
        None => vec![SampleRequest {
            share_scope: "",
            stream: false,
            adapter: None,
            prompt: prompt.clone(),
            num_samples: sequences as i64,
            params: params.clone(),
            scoring: loraloom_model::Scoring::prompt_logprobs(false),
        }],
        Some(per) => owned
            .iter()
            .map(|a| SampleRequest {
                share_scope: "",
                stream: false,
                adapter: Some(a),
                prompt: prompt.clone(),
                num_samples: per as i64,
                params: params.clone(),
                scoring: loraloom_model::Scoring::prompt_logprobs(false),
            })
            .collect(),
    };
    let count = requests.len() as i64;
    if staggered {
        for (i, request) in requests.iter_mut().enumerate() {
            request.params.max_tokens = (new_tokens * (count + i as i64) / (2 * count)).max(1);
        }
    }
    let generation = || Generation::new(decoder.kind()).with_step_graphs(graphs);
    let secs = time_it(iters, || {
        sample_with(&mut generation(), decoder, &requests, None)?;
        Ok(())
    })?;
    let tokens: i64 = requests
        .iter()
        .map(|r| r.num_samples * r.params.max_tokens)
        .sum();
    let tokens = tokens as f64;
    let mut line = json!({"sequences": sequences, "adapters": adapters,
        "interleaved": interleaved, "new_tokens": new_tokens, "staggered": staggered,
        "seconds": secs,
        "tokens_per_s": tokens / secs, "step_graphs": format!("{graphs:?}")});
    if graphs != StepGraphs::Off {
        line["recorded_vs_eager"] = recorded_vs_eager(decoder, &requests, generation())?;
    }
    emit("decode", line);
    Ok(())
}

/// Whether seeded draws depend on their company: `count` seeded requests (temperature 1, one
/// sequence each, prompts of different lengths, over `adapters` fresh adapters, whose LoRA
/// paths run and add nothing) sampled each alone, then all in one decode batch. Prints how
/// many drew the same tokens both ways, for the others the first step that differs, and the
/// largest difference of the log-probabilities of the common prefixes: a batch of another size
/// rounds differently, which moves a draw only where two clocks nearly tie (rare in f32).
pub fn seeded_crowd(
    decoder: &Decoder,
    count: usize,
    adapters: usize,
    new_tokens: i64,
) -> anyhow::Result<()> {
    let vocab = decoder.config().vocab_size;
    let owned: Vec<LoraAdapter> = (0..adapters.max(1))
        .map(|i| new_adapter(i as u64, decoder))
        .collect::<Result<_, _>>()?;
    let requests: Vec<SampleRequest> = (0..count)
        .map(|i| SampleRequest {
            share_scope: "",
            stream: false,
            adapter: Some(&owned[i % owned.len()]),
            prompt: datum(i, 8 + i % 9, vocab).input_tokens,
            num_samples: 1,
            params: SamplingParams {
                max_tokens: new_tokens,
                temperature: 1.0,
                seed: Some(i as u64),
                stop: Stop::Never,
                ..SamplingParams::default()
            },
            scoring: loraloom_model::Scoring::prompt_logprobs(false),
        })
        .collect();
    let alone: Vec<SampledSequence> = requests
        .iter()
        .map(|r| {
            Ok(sample(decoder, std::slice::from_ref(r), None)?
                .remove(0)
                .sequences
                .remove(0))
        })
        .collect::<anyhow::Result<_>>()?;
    let crowd = sample(decoder, &requests, None)?;
    let (mut same, mut first_different_steps, mut largest) = (0, Vec::new(), 0f32);
    for (alone, crowded) in alone.iter().zip(&crowd) {
        let (common, diff) = common_prefix(alone, &crowded.sequences[0]);
        largest = largest.max(diff);
        if common == alone.tokens.len() {
            same += 1;
        } else {
            first_different_steps.push(common);
        }
    }
    emit(
        "seeded_crowd",
        json!({"requests": count, "adapters": adapters, "new_tokens": new_tokens,
               "dtype": loraloom_model::dtype_name(decoder.kind()), "same_as_alone": same,
               "first_different_steps": first_different_steps,
               "max_logprob_diff": largest}),
    );
    Ok(())
}

/// How many leading tokens two sequences share, and the largest difference of their
/// log-probabilities over those tokens.
fn common_prefix(x: &SampledSequence, y: &SampledSequence) -> (usize, f32) {
    let common = x
        .tokens
        .iter()
        .zip(&y.tokens)
        .take_while(|(s, t)| s == t)
        .count();
    let largest = (0..common)
        .map(|i| (x.logprobs[i] - y.logprobs[i]).abs())
        .fold(0f32, f32::max);
    (common, largest)
}

/// `requests` decoded in `generation` (recording its steps) against steps issued one by one:
/// how many sequences agree token for token, the largest difference of the log-probabilities of
/// their common prefixes, and the loop's recorded and replayed steps.
fn recorded_vs_eager(
    decoder: &Decoder,
    requests: &[SampleRequest],
    mut generation: Generation,
) -> anyhow::Result<serde_json::Value> {
    let eager = sample(decoder, requests, None)?;
    let recorded = sample_with(&mut generation, decoder, requests, None)?;
    let (mut same, mut total, mut largest) = (0, 0, 0f32);
    for (a, b) in eager.iter().zip(&recorded) {
        for (x, y) in a.sequences.iter().zip(&b.sequences) {
            total += 1;
            same += usize::from(x.tokens == y.tokens);
            largest = largest.max(common_prefix(x, y).1);
        }
    }
    let counts = generation.graph_counts();
    Ok(
        json!({"same_sequences": same, "sequences": total, "max_logprob_diff": largest,
              "recorded_steps": counts.recorded, "replayed_steps": counts.replayed}),
    )
}

/// Where a decode step's time goes, at the model level: `rows` rows of one adapter, greedy,
/// 16-token prompts, `steps` steps, the median of `iters` runs after a warm-up.
///
/// `host_ids`: as the decode loop runs, each step's tokens reach the host before the next step
/// is issued; per step, `issue_ms` is the host's time issuing the decode and logits (on a GPU:
/// launching their kernels while the device trails) and `choose_ms` the time choosing the
/// tokens takes (on a GPU: the device finishing the step, the sampling kernels, one transfer).
/// `device_ids`: each step reads the previous step's argmax on the device and nothing returns
/// to the host until the last step, the floor for a loop that issues steps ahead of their
/// tokens. On the CPU both run the same arithmetic.
pub fn decode_phases(
    decoder: &Decoder,
    rows: i64,
    steps: usize,
    iters: usize,
) -> anyhow::Result<()> {
    let vocab = decoder.config().vocab_size;
    let adapter = new_adapter(0, decoder)?;
    let stack = AdapterStack::new(&[&adapter], decoder.kind(), false)?;
    let lora = LoraBatch::one(&stack, 0, rows)?;
    let prompt = datum(1, 16, vocab).input_tokens.repeat(rows as usize);
    let prompts = Tensor::from_slice(&prompt).f_view([rows, 16])?;
    let greedy = SamplingParams {
        temperature: 0.0,
        ..SamplingParams::default()
    };
    let picks = vec![Pick::new(&greedy, &mut SplitMix64::new(0), vocab); rows as usize];
    // Seconds of the whole loop, of issuing steps and of choosing tokens, and (tokens brought
    // to the host) row 0's tokens with their log-probabilities.
    type Run = (f64, f64, f64, Vec<(i64, f32)>);
    let run = |on_device: bool| -> anyhow::Result<Run> {
        tch::no_grad(|| {
            let (hidden, mut cache) = decoder.prefill(&prompts, Some(&lora))?;
            let mut logits = decoder.logits(&hidden.f_select(1, -1)?, Some(&lora))?;
            choose_tokens(&logits, &picks)?;
            let (mut issue, mut choose) = (0.0, 0.0);
            let mut row0 = Vec::with_capacity(steps + 1);
            let start = Instant::now();
            for _ in 0..steps {
                let next = if on_device {
                    None
                } else {
                    let t = Instant::now();
                    let chosen = choose_tokens(&logits, &picks)?;
                    choose += t.elapsed().as_secs_f64();
                    row0.push((chosen[0].0, chosen[0].1));
                    Some(chosen.iter().map(|c| c.0).collect::<Vec<i64>>())
                };
                let t = Instant::now();
                let hidden = match next {
                    Some(ids) => decoder.decode_step(&ids, &mut cache, Some(&lora))?,
                    None => {
                        let ids = logits.f_argmax(-1, false)?;
                        decoder.decode_step_on_device(&ids, &mut cache, Some(&lora))?
                    }
                };
                logits = decoder.logits(&hidden, Some(&lora))?;
                issue += t.elapsed().as_secs_f64();
            }
            let t = Instant::now();
            let last = choose_tokens(&logits, &picks)?;
            choose += t.elapsed().as_secs_f64();
            row0.push((last[0].0, last[0].1));
            Ok((start.elapsed().as_secs_f64(), issue, choose, row0))
        })
    };
    // The oracle: row 0's prompt and tokens through one pass without a cache (the scoring
    // path); the largest difference between a decoded token's log-probability and that pass's,
    // and how many of the decoded tokens are not that pass's argmax.
    let check = |row0: &[(i64, f32)]| -> anyhow::Result<(f64, usize)> {
        let mut ids = prompt[..16].to_vec();
        ids.extend(row0[..steps].iter().map(|t| t.0));
        let input = Tensor::from_slice(&ids).f_view([1, -1])?;
        let one = LoraBatch::one(&stack, 0, 1)?;
        let logits = tch::no_grad(|| decoder.forward(&input, Some(&one)))?;
        let logprobs = logits
            .f_narrow(1, 15, steps as i64 + 1)?
            .f_log_softmax(-1, Kind::Float)?
            .f_squeeze_dim(0)?
            .f_to_device(tch::Device::Cpu)?;
        let chosen = Tensor::from_slice(&row0.iter().map(|t| t.0).collect::<Vec<_>>());
        let want = Vec::<f32>::try_from(
            logprobs
                .f_gather(1, &chosen.f_unsqueeze(1)?, false)?
                .f_view([-1])?,
        )?;
        let argmax = Vec::<i64>::try_from(logprobs.f_argmax(-1, false)?)?;
        let diff = row0
            .iter()
            .zip(&want)
            .map(|(got, want)| (got.1 - want).abs() as f64)
            .fold(0.0, f64::max);
        let mismatches = row0.iter().zip(&argmax).filter(|(t, a)| t.0 != **a).count();
        Ok((diff, mismatches))
    };
    // What the host spends issuing one small operation (an add of two `[rows, hidden]`
    // tensors; on a GPU, without waiting for it): decode's floor per operation.
    let x = Tensor::f_zeros(
        [rows, decoder.config().hidden_size],
        (decoder.kind(), decoder.device()),
    )?;
    let ops = 2000;
    let t = Instant::now();
    for _ in 0..ops {
        let _ = x.f_add(&x)?;
    }
    let issue_op_us = 1e6 * t.elapsed().as_secs_f64() / ops as f64;
    sync(decoder.device());
    for (tag, on_device) in [("host_ids", false), ("device_ids", true)] {
        run(on_device)?;
        let mut runs = (0..iters.max(1))
            .map(|_| run(on_device))
            .collect::<anyhow::Result<Vec<_>>>()?;
        runs.sort_by(|a, b| a.0.total_cmp(&b.0));
        let (total, issue, choose, row0) = &runs[runs.len() / 2];
        let (total, issue, choose) = (*total, *issue, *choose);
        let (logprob_diff, argmax_mismatches) = if on_device {
            (None, None)
        } else {
            let (diff, mismatches) = check(row0)?;
            (Some(diff), Some(mismatches))
        };
        let per_step = |s: f64| 1e3 * s / steps as f64;
        emit(
            "decode_phases",
            json!({"rows": rows, "steps": steps, "ids": tag, "step_ms": per_step(total),
                   "logprob_max_diff_vs_one_pass": logprob_diff,
                   "tokens_not_one_pass_argmax": argmax_mismatches,
                   "issue_ms": per_step(issue), "choose_ms": per_step(choose),
                   "issue_op_us": issue_op_us,
                   "tokens_per_s": (rows as f64 * steps as f64) / total}),
        );
    }
    Ok(())
}

/// One fused optimizer step over `runs` runs (rank 16, all targets), against one run's step.
pub fn optim(decoder: &Decoder, runs: &[usize], iters: usize) -> anyhow::Result<()> {
    let hp = AdamParams::default();
    let mut one_run = None;
    for &n in runs {
        let adapters: Vec<LoraAdapter> = (0..n)
            .map(|i| new_adapter(i as u64, decoder))
            .collect::<Result<_, _>>()?;
        let mut states: Vec<AdamState> = adapters
            .iter()
            .map(AdamState::new)
            .collect::<Result<_, _>>()?;
        let secs = time_it(iters, || {
            step_all(&adapters, &mut states, hp, decoder.device())
        })?;
        let base = *one_run.get_or_insert(if n == 1 { secs } else { f64::NAN });
        emit(
            "optim_step",
            json!({"runs": n, "seconds": secs, "vs_one_run": secs / base,
                   "parameters_per_run": adapters[0].num_parameters()}),
        );
    }
    Ok(())
}

/// One fused optimizer step of every adapter with its state, then waits for the device.
fn step_all(
    adapters: &[LoraAdapter],
    states: &mut [AdamState],
    params: AdamParams,
    device: tch::Device,
) -> anyhow::Result<()> {
    let mut jobs: Vec<StepJob> = adapters
        .iter()
        .zip(states.iter_mut())
        .map(|(adapter, state)| StepJob {
            adapter,
            state,
            params,
        })
        .collect();
    for outcome in step_many(&mut jobs) {
        outcome?;
    }
    sync(device);
    Ok(())
}

/// Waits for the device's queued work (timings on a GPU would otherwise measure launches only).
fn sync(device: tch::Device) {
    if let tch::Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

fn wait_done(
    engine: &Engine,
    rt: &tokio::runtime::Runtime,
    tenant: &str,
    id: &str,
) -> anyhow::Result<()> {
    loop {
        match rt.block_on(engine.wait(tenant, id, Duration::from_secs(600)))? {
            FutureState::Done(_) => return Ok(()),
            FutureState::Failed(e) => anyhow::bail!("job failed: {e}"),
            _ => continue,
        }
    }
}

/// Engine throughput: `tenants` clients each doing `steps` × (forward_backward 1×len + optim_step),
/// against (a) one tenant sending the same tokens as one batch and (b) the seed design.
pub fn engine(
    info: &BaseModelInfo,
    decoder: &Decoder,
    tenants: usize,
    len: usize,
    steps: usize,
) -> anyhow::Result<()> {
    let tokens = (tenants * len * steps) as f64;
    let d = decoder.shallow_clone();
    let (engine_secs, mean_batch) = isolated(move || through_engine(info, d, tenants, len, steps))?;
    let d = decoder.shallow_clone();
    let one_batch_secs = isolated(move || one_batch(&d, tenants, len, steps))?;
    let d = decoder.shallow_clone();
    let seed_secs = isolated(move || seed_design(&d, tenants, len, steps))?;
    emit(
        "engine",
        json!({
            "tenants": tenants, "len": len, "steps": steps,
            "loraloom_tokens_per_s": tokens / engine_secs,
            "one_batch_tokens_per_s": tokens / one_batch_secs,
            "seed_design_tokens_per_s": tokens / seed_secs,
            "vs_one_batch": one_batch_secs / engine_secs,
            "vs_seed_design": seed_secs / engine_secs,
            "mean_batch_size": mean_batch,
        }),
    );
    Ok(())
}

/// loraloom: tenants on their own threads through the engine (one worker). Returns the seconds
/// and the mean batch size.
fn through_engine(
    info: &BaseModelInfo,
    decoder: Decoder,
    tenants: usize,
    len: usize,
    steps: usize,
) -> anyhow::Result<(f64, f64)> {
    let vocab = decoder.config().vocab_size;
    let registry = Arc::new(Registry::new(
        std::env::temp_dir().join(format!("loraloom-bench-{}", std::process::id())),
    ));
    let worker = ModelWorker::new(decoder, registry.clone(), None);
    let config = EngineConfig {
        limits: Limits::default(),
        future_ttl: Duration::from_secs(600),
        base: info.clone(),
        max_runs_per_tenant: 0,
        max_runs: 0,
        max_recorded_samples_per_tenant: 1000,
        // Benchmarks time work back to back; between phases (baselines in Python) the engine
        // idles, and a release there would charge page faults to the next phase's first round.
        release_memory_after_idle: None,
        journal: false,
    };
    let engine = Engine::start(config, registry, vec![Box::new(worker) as Box<dyn Backend>]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()?;
    for t in 0..tenants {
        let key = ModelKey {
            tenant: format!("t{t}"),
            model_id: "run".into(),
        };
        let id = engine.create_model(
            key,
            spec(t as u64, &info.config),
            serde_json::Value::Null,
            None,
        )?;
        wait_done(&engine, &rt, &format!("t{t}"), &id)?;
    }
    // Warm-up: two untimed rounds of every tenant at once, then the timed rounds. The first
    // round splits by the order the runs were created in; the second runs them together, in
    // the batch shapes the timed rounds use, as the one-batch baseline's warm-up step does for
    // its shape: what a first batch shape costs (cuDNN attention plans on a GPU, see
    // `deprioritize_cudnn_attention` in main.rs) is not what this measures.
    step_tenants(&engine, tenants, len, 2, vocab, 1_000_000)?;
    let warm = engine.stats();
    let started = step_tenants(&engine, tenants, len, steps, vocab, 0)?;
    let engine_secs = started.elapsed().as_secs_f64();
    let stats = engine.stats();
    let (batches, batched) = (
        stats.batches - warm.batches,
        stats.batched_jobs - warm.batched_jobs,
    );
    engine.shutdown(Duration::MAX);
    Ok((engine_secs, batched as f64 / batches.max(1) as f64))
}

/// `tenants` clients, each on a thread of its own, doing `steps` × (forward_backward of one
/// datum of `len` tokens + optim_step) on its run `t{i}/run`, each waiting for its step before
/// the next (datum seeds from `seed`). Returns when the clock started: once every thread is up,
/// as a real client is already running.
fn step_tenants(
    engine: &Engine,
    tenants: usize,
    len: usize,
    steps: usize,
    vocab: i64,
    seed: usize,
) -> anyhow::Result<Instant> {
    let hp = AdamParams::default();
    let ready = Barrier::new(tenants + 1);
    std::thread::scope(|s| -> anyhow::Result<Instant> {
        let handles: Vec<_> = (0..tenants)
            .map(|t| {
                let ready = &ready;
                s.spawn(move || -> anyhow::Result<()> {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_time()
                        .build();
                    ready.wait();
                    let rt = rt?;
                    let tenant = format!("t{t}");
                    let q = QueueKey::Model(ModelKey {
                        tenant: tenant.clone(),
                        model_id: "run".into(),
                    });
                    for step in 0..steps {
                        let fb = Work::ForwardBackward {
                            data: vec![datum(seed + t * 1000 + step, len, vocab)],
                            loss: LossFn::CrossEntropy,
                            backward: true,
                        };
                        engine.submit(q.clone(), fb)?;
                        let id = engine.submit(q.clone(), Work::OptimStep { params: hp })?;
                        wait_done(engine, &rt, &tenant, &id)?;
                    }
                    Ok(())
                })
            })
            .collect();
        ready.wait();
        let started = Instant::now();
        for h in handles {
            h.join()
                .map_err(|_| anyhow::anyhow!("tenant thread panicked"))??;
        }
        Ok(started)
    })
}

/// (a) one tenant, the same tokens as one batch per step. Returns the seconds.
fn one_batch(decoder: &Decoder, tenants: usize, len: usize, steps: usize) -> anyhow::Result<f64> {
    let vocab = decoder.config().vocab_size;
    let hp = AdamParams::default();
    let single = new_adapter(0, decoder)?;
    let mut opt = AdamState::new(&single)?;
    // Warm-up: one untimed step of the same shape, as the engine's tenants get.
    let warmup: Vec<Datum> = (0..tenants)
        .map(|t| datum(1_000_000 + t * 1000, len, vocab))
        .collect();
    forward_backward(
        decoder,
        &[TrainRequest {
            adapter: Some(&single),
            loss: LossFn::CrossEntropy,
            data: &warmup,
        }],
        true,
        NO_LIMIT,
    )?;
    opt.step(&single, &hp)?;
    let started = Instant::now();
    for step in 0..steps {
        let data: Vec<Datum> = (0..tenants)
            .map(|t| datum(t * 1000 + step, len, vocab))
            .collect();
        let req = TrainRequest {
            adapter: Some(&single),
            loss: LossFn::CrossEntropy,
            data: &data,
        };
        forward_backward(decoder, &[req], true, NO_LIMIT)?;
        opt.step(&single, &hp)?;
    }
    Ok(started.elapsed().as_secs_f64())
}

/// (b) the seed design: a thread per job, a lock per adapter, no batching (each thread with
/// libtorch's full intra-op thread count, as the engine's worker has). Returns the seconds.
fn seed_design(decoder: &Decoder, tenants: usize, len: usize, steps: usize) -> anyhow::Result<f64> {
    let vocab = decoder.config().vocab_size;
    let hp = AdamParams::default();
    let threads = tch::get_num_threads();
    let adapters: Vec<Arc<Mutex<(LoraAdapter, AdamState)>>> = (0..tenants)
        .map(|t| -> anyhow::Result<_> {
            let a = new_adapter(t as u64, decoder)?;
            let o = AdamState::new(&a)?;
            Ok(Arc::new(Mutex::new((a, o))))
        })
        .collect::<anyhow::Result<_>>()?;
    let ready = Barrier::new(tenants + 1);
    let started = std::thread::scope(|s| -> anyhow::Result<Instant> {
        let handles: Vec<_> = (0..tenants)
            .map(|t| {
                let slot = adapters[t].clone();
                let dec = decoder.shallow_clone();
                let ready = &ready;
                s.spawn(move || -> anyhow::Result<()> {
                    tch::set_num_threads(threads);
                    ready.wait();
                    for step in 0..steps {
                        let guard = slot.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
                        let (adapter, _) = &*guard;
                        let data = vec![datum(t * 1000 + step, len, vocab)];
                        let req = TrainRequest {
                            adapter: Some(adapter),
                            loss: LossFn::CrossEntropy,
                            data: &data,
                        };
                        forward_backward(&dec, &[req], true, NO_LIMIT)?;
                        drop(guard);
                        let mut guard = slot.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
                        let (adapter, opt) = &mut *guard;
                        opt.step(adapter, &hp)?;
                    }
                    Ok(())
                })
            })
            .collect();
        ready.wait();
        let started = Instant::now();
        for h in handles {
            h.join().map_err(|_| anyhow::anyhow!("thread panicked"))??;
        }
        Ok(started)
    })?;
    Ok(started.elapsed().as_secs_f64())
}

/// One line on the loaded model: what it is and what its weights take.
pub fn describe(base: &BaseModel) {
    let info = base.info();
    emit(
        "model",
        json!({"summary": info.summary, "weight_bytes": info.weight_bytes,
               "dequantized_weight_bytes": base.decoder().dequantized_weight_bytes()}),
    );
}

/// Loads the model for a bench run.
pub fn load(
    dir: &Path,
    device: tch::Device,
    kind: Option<tch::Kind>,
    mxfp4: loraloom_model::Mxfp4Policy,
) -> anyhow::Result<BaseModel> {
    BaseModel::load("bench", dir, device, kind, mxfp4)
        .with_context(|| format!("loading {}", dir.display()))
}
