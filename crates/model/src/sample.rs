//! Generation with a KV cache, batched across requests and adapters.
//!
//! Each request's prompt is prefilled once; its `num_samples` sequences share that prefill
//! (the cache rows are repeated). All sequences of all requests then advance together, one
//! decode step per token, each row with its own adapter (segmented LoRA). A sequence that stops
//! leaves the batch. Token choice happens on the CPU from each row's logits with a per-sequence
//! random stream derived from `(seed, sample index)`, so results do not depend on which other
//! sequences share the batch.

use tch::{Kind, Tensor};

use crate::config::ModelConfig;
use crate::decoder::Decoder;
use crate::error::{ModelError, Result};
use crate::kv_cache::KvCache;
use crate::lora::{LoraAdapter, LoraBatch, StackSet};
use crate::rng::SplitMix64;

/// When a sequence stops besides `max_tokens`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// The model's end-of-sequence tokens (the SDK's `stop: null`).
    Eos,
    /// Never stop early (the SDK's `stop: []`).
    Never,
    /// Any of these token ids.
    Tokens(Vec<i64>),
    /// Any of these strings appearing in the generated text.
    Strings(Vec<String>),
}

/// The SDK's `SamplingParams`.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Tokens to generate at most (≥ 1).
    pub max_tokens: i64,
    /// Softmax temperature; 0 means greedy.
    pub temperature: f64,
    /// Keep the `k` most likely tokens; -1 (or 0) for no limit.
    pub top_k: i64,
    /// Nucleus mass in `(0, 1]`.
    pub top_p: f64,
    /// Random seed; `None` draws one.
    pub seed: Option<u64>,
    /// Early stop condition.
    pub stop: Stop,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            max_tokens: 16,
            temperature: 1.0,
            top_k: -1,
            top_p: 1.0,
            seed: None,
            stop: Stop::Eos,
        }
    }
}

/// Largest `num_samples` of one request.
pub const MAX_NUM_SAMPLES: i64 = 128;

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum StopReason {
    /// A stop token or string.
    Stop,
    /// `max_tokens` reached.
    Length,
}

/// One generated sequence.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SampledSequence {
    /// Generated tokens (the stop token included when one ended it).
    pub tokens: Vec<i64>,
    /// Model log-probability of each generated token (temperature 1, before top-k/top-p).
    pub logprobs: Vec<f32>,
    /// Why it ended.
    pub stop_reason: StopReason,
}

/// One sampling request.
#[derive(Clone)]
pub struct SampleRequest<'a> {
    /// Adapter to sample from; `None` for the base model.
    pub adapter: Option<&'a LoraAdapter>,
    /// Prompt tokens.
    pub prompt: Vec<i64>,
    /// Sequences to generate from the prompt.
    pub num_samples: i64,
    /// Sampling parameters.
    pub params: SamplingParams,
    /// Also return the log-probability of each prompt token given its prefix.
    pub prompt_logprobs: bool,
}

/// The result of one request.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SampleOutput {
    /// `num_samples` sequences.
    pub sequences: Vec<SampledSequence>,
    /// Per prompt token (`None` for the first), when asked.
    pub prompt_logprobs: Option<Vec<Option<f32>>>,
}

/// Turns token ids into text, for stop strings.
pub type Detokenize<'a> = &'a dyn Fn(&[i64]) -> String;

/// Checks a request before any work starts; errors name the field.
pub fn validate(decoder: &Decoder, r: &SampleRequest) -> Result<()> {
    validate_sampling(decoder.config(), &r.prompt, r.num_samples, &r.params)
}

/// Checks a sampling request against the model's configuration (usable before queueing).
pub fn validate_sampling(
    c: &ModelConfig,
    prompt: &[i64],
    num_samples: i64,
    p: &SamplingParams,
) -> Result<()> {
    if prompt.is_empty() {
        return Err(ModelError::invalid(
            "prompt",
            "must hold at least one token",
        ));
    }
    c.check_tokens("prompt", prompt)?;
    if !(1..=MAX_NUM_SAMPLES).contains(&num_samples) {
        return Err(ModelError::invalid(
            "num_samples",
            format!("must be between 1 and {MAX_NUM_SAMPLES}, got {num_samples}"),
        ));
    }
    let context = c.max_position_embeddings;
    if p.max_tokens < 1 || p.max_tokens > context {
        return Err(ModelError::invalid(
            "sampling_params.max_tokens",
            format!(
                "must be between 1 and the model's context of {context}, got {}",
                p.max_tokens
            ),
        ));
    }
    if prompt.len() as i64 + p.max_tokens > context {
        return Err(ModelError::invalid(
            "sampling_params.max_tokens",
            format!(
                "prompt of {} tokens + max_tokens {} exceeds the model's context of {context}",
                prompt.len(),
                p.max_tokens
            ),
        ));
    }
    if !p.temperature.is_finite() || p.temperature < 0.0 {
        return Err(ModelError::invalid(
            "sampling_params.temperature",
            format!("must be a finite number >= 0, got {}", p.temperature),
        ));
    }
    if !(p.top_p > 0.0 && p.top_p <= 1.0) {
        return Err(ModelError::invalid(
            "sampling_params.top_p",
            format!("must be in (0, 1], got {}", p.top_p),
        ));
    }
    if p.top_k < -1 {
        return Err(ModelError::invalid(
            "sampling_params.top_k",
            format!("must be -1 (no limit) or >= 0, got {}", p.top_k),
        ));
    }
    match &p.stop {
        Stop::Tokens(ids) => c.check_tokens("sampling_params.stop", ids)?,
        Stop::Strings(s) if s.iter().any(String::is_empty) => {
            return Err(ModelError::invalid(
                "sampling_params.stop",
                "stop strings must not be empty",
            ))
        }
        _ => {}
    }
    Ok(())
}

/// One live sequence in the decode batch.
struct Row {
    request: usize,
    tokens: Vec<i64>,
    logprobs: Vec<f32>,
    rng: SplitMix64,
}

/// Generates for every request in one decode loop.
pub fn sample(
    decoder: &Decoder,
    requests: &[SampleRequest],
    detokenize: Option<Detokenize>,
) -> Result<Vec<SampleOutput>> {
    for r in requests {
        validate(decoder, r)?;
        if matches!(r.params.stop, Stop::Strings(_)) && detokenize.is_none() {
            return Err(ModelError::invalid(
                "sampling_params.stop",
                "stop strings need the model's tokenizer",
            ));
        }
    }
    tch::no_grad(|| run(decoder, requests, detokenize))
}

fn run(
    decoder: &Decoder,
    requests: &[SampleRequest],
    detokenize: Option<Detokenize>,
) -> Result<Vec<SampleOutput>> {
    let mut outputs: Vec<SampleOutput> = requests
        .iter()
        .map(|_| SampleOutput {
            sequences: Vec::new(),
            prompt_logprobs: None,
        })
        .collect();
    let mut finished: Vec<Vec<Option<SampledSequence>>> = requests
        .iter()
        .map(|r| vec![None; r.num_samples as usize])
        .collect();
    let mut rows: Vec<Row> = Vec::new();
    let mut sample_index: Vec<usize> = Vec::new();
    let mut caches = Vec::with_capacity(requests.len());
    let mut next_logits: Vec<Tensor> = Vec::new();

    // Every distinct adapter gathered once (a stack per layout), for prefill and every step.
    let adapters: Vec<Option<&LoraAdapter>> = requests.iter().map(|r| r.adapter).collect();
    let stacks = StackSet::new(&adapters, decoder.kind(), false)?;
    let slot_of_request = requests
        .iter()
        .map(|r| r.adapter.map(|a| stacks.member(a)).transpose())
        .collect::<Result<Vec<_>>>()?;

    // Prefill each prompt once; its samples share the cache rows.
    for (ri, r) in requests.iter().enumerate() {
        let ids = Tensor::from_slice(&r.prompt).f_view([1, -1])?;
        let lora = slot_of_request[ri]
            .map(|(stack, member)| LoraBatch::one(stack, member, 1))
            .transpose()?;
        let (hidden, cache) = decoder.prefill(&ids, lora.as_ref())?;
        if r.prompt_logprobs {
            let logits = decoder.logits(&hidden, lora.as_ref())?.f_get(0)?;
            outputs[ri].prompt_logprobs = Some(prompt_logprobs(&logits, &r.prompt)?);
        }
        let last = hidden
            .f_narrow(1, r.prompt.len() as i64 - 1, 1)?
            .f_squeeze_dim(1)?;
        let logits = decoder.logits(&last, lora.as_ref())?;
        caches.push(cache.repeat_rows(r.num_samples)?);
        let seed = r.params.seed.unwrap_or_else(random_seed);
        for s in 0..r.num_samples as usize {
            rows.push(Row {
                request: ri,
                tokens: Vec::new(),
                logprobs: Vec::new(),
                rng: SplitMix64::new(seed ^ (s as u64).wrapping_mul(0xA076_1D64_78BD_642F)),
            });
            sample_index.push(s);
            next_logits.push(logits.shallow_clone());
        }
    }
    let mut cache = KvCache::concat(caches)?;
    let mut logits = Tensor::f_cat(&next_logits, 0)?;

    loop {
        // Choose the next token of every live row.
        let host = logits
            .f_to_kind(Kind::Float)?
            .f_to_device(tch::Device::Cpu)?;
        let vocab = host.size()[1] as usize;
        let flat = Vec::<f32>::try_from(host.f_view([-1])?)?;
        let mut keep: Vec<i64> = Vec::with_capacity(rows.len());
        let mut next_ids: Vec<i64> = Vec::with_capacity(rows.len());
        for (i, row) in rows.iter_mut().enumerate() {
            let r = &requests[row.request];
            let (token, logprob) =
                choose(&flat[i * vocab..(i + 1) * vocab], &r.params, &mut row.rng);
            row.tokens.push(token);
            row.logprobs.push(logprob);
            match stop_reason(decoder, r, &row.tokens, detokenize) {
                Some(reason) => {
                    finished[row.request][sample_index[i]] = Some(SampledSequence {
                        tokens: std::mem::take(&mut row.tokens),
                        logprobs: std::mem::take(&mut row.logprobs),
                        stop_reason: reason,
                    });
                }
                None => {
                    keep.push(i as i64);
                    next_ids.push(token);
                }
            }
        }
        if keep.is_empty() {
            break;
        }
        if keep.len() < rows.len() {
            cache = cache.select(&keep)?;
            let mut kept_rows = Vec::with_capacity(keep.len());
            let mut kept_index = Vec::with_capacity(keep.len());
            for (i, row) in rows.into_iter().enumerate() {
                if keep.binary_search(&(i as i64)).is_ok() {
                    kept_rows.push(row);
                    kept_index.push(sample_index[i]);
                }
            }
            rows = kept_rows;
            sample_index = kept_index;
        }
        let assignment: Vec<_> = rows.iter().map(|r| slot_of_request[r.request]).collect();
        let lora = LoraBatch::new(&assignment)?;
        let hidden = decoder.decode_step(&next_ids, &mut cache, Some(&lora))?;
        logits = decoder.logits(&hidden, Some(&lora))?;
    }
    for (ri, out) in outputs.iter_mut().enumerate() {
        out.sequences = finished[ri]
            .iter_mut()
            .map(|s| s.take().expect("every sample finishes"))
            .collect();
    }
    Ok(outputs)
}

fn stop_reason(
    decoder: &Decoder,
    r: &SampleRequest,
    tokens: &[i64],
    detokenize: Option<Detokenize>,
) -> Option<StopReason> {
    let last = *tokens.last()?;
    let stopped = match &r.params.stop {
        Stop::Eos => decoder.config().eos_token_ids.contains(&last),
        Stop::Never => false,
        Stop::Tokens(ids) => ids.contains(&last),
        Stop::Strings(strings) => match detokenize {
            Some(f) => {
                let text = f(tokens);
                strings.iter().any(|s| text.contains(s.as_str()))
            }
            None => false,
        },
    };
    if stopped {
        Some(StopReason::Stop)
    } else if tokens.len() as i64 >= r.params.max_tokens {
        Some(StopReason::Length)
    } else {
        None
    }
}

fn prompt_logprobs(logits: &Tensor, prompt: &[i64]) -> Result<Vec<Option<f32>>> {
    let n = prompt.len() as i64;
    let mut out = vec![None];
    if n > 1 {
        let lp = crate::loss::target_logprobs(&logits.f_narrow(0, 0, n - 1)?, &prompt[1..])?;
        out.extend(
            Vec::<f32>::try_from(&lp.f_to_device(tch::Device::Cpu)?)?
                .into_iter()
                .map(Some),
        );
    }
    Ok(out)
}

fn random_seed() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    nanos
        ^ COUNTER
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// Picks a token from raw logits; returns it with its log-probability under the unmodified
/// model distribution.
pub fn choose(logits: &[f32], p: &SamplingParams, rng: &mut SplitMix64) -> (i64, f32) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let log_norm = max as f64
        + logits
            .iter()
            .map(|&x| ((x - max) as f64).exp())
            .sum::<f64>()
            .ln();
    let logprob = |t: usize| (logits[t] as f64 - log_norm) as f32;
    let greedy = p.temperature == 0.0 || p.top_k == 1;
    if greedy {
        let best = argmax(logits);
        return (best as i64, logprob(best));
    }
    // Candidates sorted by logit, cut to top_k.
    let mut order: Vec<usize> = (0..logits.len()).collect();
    let k = if p.top_k > 0 {
        (p.top_k as usize).min(logits.len())
    } else {
        logits.len()
    };
    let by_logit = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b));
    if k < order.len() {
        order.select_nth_unstable_by(k - 1, by_logit);
        order.truncate(k);
    }
    order.sort_unstable_by(by_logit);
    let t = p.temperature;
    let weights: Vec<f64> = order
        .iter()
        .map(|&i| (((logits[i] - max) as f64) / t).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    // Nucleus: the smallest prefix whose mass reaches top_p.
    let mut keep = weights.len();
    if p.top_p < 1.0 {
        let mut mass = 0.0;
        for (i, w) in weights.iter().enumerate() {
            mass += w / total;
            if mass >= p.top_p {
                keep = i + 1;
                break;
            }
        }
    }
    let kept_total: f64 = weights[..keep].iter().sum();
    let mut u = rng.next_f64() * kept_total;
    for (i, w) in weights[..keep].iter().enumerate() {
        if u < *w {
            return (order[i] as i64, logprob(order[i]));
        }
        u -= w;
    }
    let last = order[keep - 1];
    (last as i64, logprob(last))
}

fn argmax(xs: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f64, top_k: i64, top_p: f64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k,
            top_p,
            ..SamplingParams::default()
        }
    }

    #[test]
    fn greedy_and_top_k_1_pick_the_argmax_with_its_logprob() {
        let logits = [0.5f32, 3.0, -1.0, 2.9];
        let mut rng = SplitMix64::new(1);
        let (t, lp) = choose(&logits, &params(0.0, -1, 1.0), &mut rng);
        assert_eq!(t, 1);
        let norm: f64 = logits.iter().map(|&x| (x as f64).exp()).sum::<f64>().ln();
        assert!((lp as f64 - (3.0 - norm)).abs() < 1e-6);
        assert_eq!(choose(&logits, &params(0.7, 1, 1.0), &mut rng).0, 1);
    }

    #[test]
    fn top_k_and_top_p_restrict_the_support() {
        let logits = [5.0f32, 4.0, 0.0, -2.0, -3.0];
        let mut rng = SplitMix64::new(7);
        for _ in 0..200 {
            assert!(choose(&logits, &params(1.0, 2, 1.0), &mut rng).0 < 2);
            // p(0) ≈ 0.72 < 0.8 <= p(0) + p(1): the nucleus is {0, 1}.
            assert!(choose(&logits, &params(1.0, -1, 0.8), &mut rng).0 < 2);
        }
    }

    #[test]
    fn sampling_follows_the_distribution() {
        let logits = [0.0f32, (3.0f32).ln()];
        let mut rng = SplitMix64::new(3);
        let ones = (0..4000)
            .filter(|_| choose(&logits, &params(1.0, -1, 1.0), &mut rng).0 == 1)
            .count();
        assert!(
            (2800..3200).contains(&ones),
            "{ones} of 4000, expected ~3000"
        );
    }
}
