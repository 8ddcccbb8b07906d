//! Generation with a KV cache, batched across requests and adapters, with requests joining and
//! leaving at token boundaries ([`Generation`]).
//!
//! Each distinct prompt is prefilled once: a request's `num_samples` sequences share its prefill
//! (the cache rows are repeated), so do requests admitted together with the same prompt and
//! adapter (tinker-cookbook's RL loops send a group's samples as separate requests with one
//! prompt). A prompt that starts with a live sequence's prompt, or with a finished sequence kept
//! in the loop's [`PrefixCache`] (the conversation so far, which multi-turn environments send as
//! each turn's prompt), both of its adapter, starts from a copy of those keys and values and
//! computes only the rest. All live sequences of all requests advance together, one
//! decode step per token, each row with its own adapter (stacked LoRA). A sequence that stops
//! leaves the batch at once. Tokens are chosen on the logits' device ([`choose_tokens`]) by a
//! race on draws from each sequence's own random stream, derived from `(seed, sample index)`,
//! so results do not depend on which other sequences share the batch.

use std::collections::{HashMap, VecDeque};

use tch::{Kind, Tensor};

use crate::config::ModelConfig;
use crate::decoder::Decoder;
use crate::draw::Blocks;
use crate::error::{ModelError, Result};
use crate::kv_cache::KvCache;
use crate::lora::{stack_groups, AdapterStack, LoraAdapter, LoraBatch};
use crate::prefix_cache::{shared_prefix, PrefixCache};
use crate::rng::SplitMix64;
use crate::scoring::{top_k_rows, PromptScorer, PromptScores, Scoring, TopK};
use crate::step_graph::{GraphCounts, StepGraph, StepGraphs};

/// When a sequence stops besides `max_tokens`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Stop {
    /// The model's end-of-sequence tokens (the SDK's `stop: null`).
    Eos,
    /// Never stop early (the SDK's `stop: []`).
    Never,
    /// Any of these token ids.
    Tokens(Vec<i64>),
    /// Any of these strings appearing in the generated text.
    Strings(Vec<String>),
    /// Any of these tokens, or any of these strings appearing in the generated text (OpenAI's
    /// `stop`, with the model's end tokens).
    TokensOrStrings {
        /// Stop tokens.
        tokens: Vec<i64>,
        /// Stop strings.
        strings: Vec<String>,
    },
}

/// The SDK's `SamplingParams`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
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
    /// The most likely tokens at each generated position, when asked (`topk_sample_logprobs`).
    #[serde(default)]
    pub top_k: Option<Vec<TopK>>,
    /// Log-probability of each generated token under the distribution it was drawn from (after
    /// temperature, top-k and top-p; 0 for greedy picks): the behaviour policy that
    /// `stable_reinforce` weighs against. Recorded by the server, never sent to clients.
    #[serde(skip)]
    pub drawn_logprobs: Vec<f32>,
}

/// One sampling request.
#[derive(Clone, Default)]
pub struct SampleRequest<'a> {
    /// Adapter to sample from; `None` for the base model.
    pub adapter: Option<&'a LoraAdapter>,
    /// Prompt tokens.
    pub prompt: Vec<i64>,
    /// Sequences to generate from the prompt.
    pub num_samples: i64,
    /// Sampling parameters.
    pub params: SamplingParams,
    /// What to compute besides the samples (prompt logprobs and the other extras).
    pub scoring: Scoring,
    /// Requests share prompt keys and values (a prefill, a live sequence's prompt, a kept
    /// sequence) only with requests of the same scope: the engine passes the tenant, so that
    /// what one tenant sent never shapes another's work or timing.
    pub share_scope: &'a str,
    /// Report each token its sequences choose in the step that chooses it
    /// ([`StepReport::streamed`]), for a client that reads the completion as it is written.
    pub stream: bool,
}

/// The result of one request.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SampleOutput {
    /// `num_samples` sequences.
    pub sequences: Vec<SampledSequence>,
    /// What was asked about the prompt (its logprobs and the other extras).
    #[serde(flatten)]
    pub prompt: PromptScores,
}

/// Turns token ids into text, for stop strings.
pub type Detokenize<'a> = &'a dyn Fn(&[i64]) -> String;

/// Checks a request before any work starts; errors name the field.
pub fn validate(decoder: &Decoder, r: &SampleRequest) -> Result<()> {
    validate_sampling(decoder.config(), &r.prompt, r.num_samples, &r.params)?;
    r.scoring
        .validate(r.prompt.len(), decoder.config().vocab_size)
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
        Stop::Tokens(ids) if ids.len() > MAX_STOP_SEQUENCES => {
            return Err(too_many_stops(ids.len()))
        }
        Stop::Tokens(ids) => c.check_tokens("sampling_params.stop", ids)?,
        Stop::TokensOrStrings { tokens, strings } => {
            if tokens.len() > MAX_STOP_SEQUENCES {
                return Err(too_many_stops(tokens.len()));
            }
            c.check_tokens("sampling_params.stop", tokens)?;
            check_stop_strings(strings)?;
        }
        Stop::Strings(s) => check_stop_strings(s)?,
        _ => {}
    }
    Ok(())
}

/// Stop strings within their limits: at most [`MAX_STOP_SEQUENCES`], none empty, none longer
/// than [`MAX_STOP_STRING_BYTES`].
fn check_stop_strings(s: &[String]) -> Result<()> {
    if s.len() > MAX_STOP_SEQUENCES {
        return Err(too_many_stops(s.len()));
    }
    if s.iter().any(String::is_empty) {
        return Err(ModelError::invalid(
            "sampling_params.stop",
            "stop strings must not be empty",
        ));
    }
    if s.iter().any(|s| s.len() > MAX_STOP_STRING_BYTES) {
        return Err(ModelError::invalid(
            "sampling_params.stop",
            format!("a stop string may hold at most {MAX_STOP_STRING_BYTES} bytes"),
        ));
    }
    Ok(())
}

/// Stop strings or tokens one request may give: each is checked after every token of every
/// sequence, so their number multiplies the cost of a step.
pub const MAX_STOP_SEQUENCES: usize = 64;

/// Longest stop string, in bytes (the generated text's tail is compared with it every token:
/// [`tail_holds`]).
pub const MAX_STOP_STRING_BYTES: usize = 1024;

fn too_many_stops(n: usize) -> ModelError {
    ModelError::invalid(
        "sampling_params.stop",
        format!("at most {MAX_STOP_SEQUENCES} stop sequences, got {n}"),
    )
}

/// Identifies a request inside a [`Generation`] (the caller's choice, e.g. a job number).
pub type RequestTag = u64;

/// A request whose sequences are being generated.
struct Live {
    params: SamplingParams,
    sequences: Vec<Option<SampledSequence>>,
    unfinished: usize,
    prompt: PromptScores,
    /// The prompt's tokens: a request joining later whose prompt starts with them (and has the
    /// same adapter) starts from a copy of their keys and values
    /// ([`Generation::shared_prefix_of`]).
    prompt_tokens: Vec<i64>,
    /// Its [`SampleRequest::share_scope`].
    scope: String,
    /// How many of the most likely tokens to report at each generated position.
    sample_top_k: usize,
    /// Whether its sequences chose their first tokens yet.
    started: bool,
    /// Its chosen tokens are reported step by step ([`SampleRequest::stream`]).
    stream: bool,
}

/// One sequence: a row of the KV cache and of the pending logits.
struct Row {
    request: RequestTag,
    sample: usize,
    /// Its adapter's stack (index into [`Generation::stacks`]) and member; `None` for the base.
    member: Option<(usize, i64)>,
    /// The sequence stopped, but its row stays in the batch (computed and ignored) so that the
    /// batch's recorded step still serves ([`Generation::parks`]); `tokens` then holds only
    /// the token it is fed.
    parked: bool,
    tokens: Vec<i64>,
    logprobs: Vec<f32>,
    /// See [`SampledSequence::drawn_logprobs`].
    drawn_logprobs: Vec<f32>,
    /// The most likely tokens at each generated position (when its request asks).
    top_k: Vec<TopK>,
    rng: SplitMix64,
}

/// A token one sequence of a streamed request chose ([`SampleRequest::stream`]).
#[derive(Debug, Clone, PartialEq)]
pub struct StreamedToken {
    /// Which of the request's sequences (its index in [`SampleOutput::sequences`]).
    pub sample: usize,
    /// The token.
    pub token: i64,
    /// Its logprob, as [`SampledSequence::logprobs`] holds it.
    pub logprob: f32,
    /// The most likely tokens at its position, when the request asks for them.
    pub top_k: Option<TopK>,
}

/// What one [`Generation::step`] did.
#[derive(Debug, Default)]
pub struct StepReport {
    /// Requests whose every sequence ended this step, with their outputs.
    pub finished: Vec<(RequestTag, SampleOutput)>,
    /// Requests whose sequences chose their first tokens this step.
    pub first_tokens: Vec<RequestTag>,
    /// The tokens streamed requests chose this step, in row order (so a request's sequences'
    /// tokens come in the order of their rows, each sequence's once per step).
    pub streamed: Vec<(RequestTag, StreamedToken)>,
    /// Tokens chosen this step (one per live sequence).
    pub tokens: usize,
    /// Requests whose long prompt failed to prefill (only they fail).
    pub failed: Vec<(RequestTag, ModelError)>,
}

/// A decode loop that requests join and leave at token boundaries (continuous batching).
///
/// [`Generation::admit`] prefills a request's prompt once (its `num_samples` sequences share the
/// prefill: the cache rows are repeated) and adds its sequences to the batch;
/// [`Generation::step`] chooses the next token of every live sequence, retires the sequences
/// that stopped (a request finishes with its last sequence) and runs one decode step for the
/// rest, each row with its own adapter. A prompt longer than the prefill chunk
/// ([`PREFILL_CHUNK`] tokens by default) is prefilled one chunk per step, the first in line,
/// while the batch goes on decoding, and joins when it is complete. Adapters are gathered into
/// owned [`AdapterStack`]s when their first request joins, so the caller need not keep them
/// borrowed between steps. Token
/// choice uses a per-sequence random stream derived from `(seed, sample index)`, so what a
/// sequence draws does not depend on what else shares the batch.
pub struct Generation {
    kind: Kind,
    stacks: Vec<AdapterStack>,
    live: HashMap<RequestTag, Live>,
    rows: Vec<Row>,
    /// Keys and values of `rows`, row-aligned.
    cache: Option<KvCache>,
    /// Next-token logits `[rows, vocab]` of `rows`.
    logits: Option<Tensor>,
    prefills: u64,
    shared_prompts: u64,
    prompt_tokens_reused: u64,
    /// Finished sequences' keys and values, for later prompts that start with them.
    kept: PrefixCache,
    /// Keys and values the loop may hold, kept sequences included
    /// ([`Generation::with_kv_budget`]).
    kv_budget: usize,
    /// Requests whose prompt is longer than `prefill_chunk`, prefilled one chunk per step (the
    /// first one in line) before they join, so a long prompt never stalls the loop for more than
    /// one chunk.
    prefilling: VecDeque<Prefilling>,
    prefill_chunk: usize,
    /// Whether steps are recorded and replayed ([`Generation::with_step_graphs`]).
    graphs: StepGraphs,
    /// The current batch's recorded step, while its rows, adapters and cache buffers last.
    graph: Option<StepGraph>,
    /// Decode steps since the batch's rows last changed (a batch is recorded at its second).
    steady_steps: u64,
    /// A recording of the batch failed: its steps are issued one by one until it changes.
    recording_failed: bool,
    /// Recordings failed since the last that succeeded; at [`MAX_RECORDING_FAILURES`] the loop
    /// stops recording.
    recording_failures: u32,
    graph_counts: GraphCounts,
}

/// Failed recordings in a row after which a decode loop issues every step one by one (a
/// recording fails when, say, another thread synchronises the whole device meanwhile; one that
/// fails every time is a build or driver that cannot record).
const MAX_RECORDING_FAILURES: u32 = 3;

/// A request whose long prompt is being prefilled chunk by chunk: what joins the batch when it
/// is done, and the prompt's progress.
struct Prefilling {
    request: Joining,
    /// Requests admitted meanwhile with the same prompt, scope and adapter that ask nothing
    /// about the prompt: they join with `request`, sharing its prefill.
    followers: Vec<Joining>,
    /// Prompt tokens prefilled so far, and their cache.
    done: usize,
    cache: Option<KvCache>,
}

impl Prefilling {
    /// Where the prompt's next chunk of at most `chunk` tokens ends.
    fn next_chunk_end(&self, chunk: usize) -> usize {
        (self.done + chunk).min(self.request.prompt.len())
    }
}

/// Where a prompt's first keys and values are copied from.
#[derive(Debug, Clone, Copy)]
enum Prefix {
    /// The prompt of a live sequence: its batch row.
    Live(usize),
    /// A kept finished sequence: its index in the [`PrefixCache`].
    Kept(usize),
}

/// Shortest shared prefix copied instead of computed (unless a live sequence has this very
/// prompt): below it a copy and a pass of its own for the rest cost about what they save.
const MIN_SHARED_PREFIX: usize = 16;

/// What requests admitted together share: whether their prompt starts from a shared prefix (or
/// is prefilled), their scope, their adapter's stack and member (`None` for the base model),
/// their prompt.
type SharedPrompt<'a> = (bool, &'a str, Option<(usize, i64)>, &'a [i64]);

/// A request whose prompt is prefilled, about to join the batch.
struct Joining {
    tag: RequestTag,
    prompt: Vec<i64>,
    scope: String,
    params: SamplingParams,
    num_samples: i64,
    member: Option<(usize, i64)>,
    /// What the request asks about its prompt, filled as its chunks are prefilled.
    scorer: PromptScorer,
    /// How many of the most likely tokens to report at each generated position.
    sample_top_k: usize,
    /// See [`SampleRequest::stream`].
    stream: bool,
}

impl Joining {
    /// `request` under `tag`, computed with the adapter `member`.
    fn new(tag: RequestTag, request: &SampleRequest, member: Option<(usize, i64)>) -> Self {
        // Alternative prompt draws use a stream no sample uses.
        let seed = request
            .params
            .seed
            .map_or_else(random_seed, |s| sample_seed(s, usize::MAX));
        Joining {
            tag,
            prompt: request.prompt.clone(),
            scope: request.share_scope.to_string(),
            params: request.params.clone(),
            num_samples: request.num_samples,
            member,
            scorer: PromptScorer::new(&request.scoring, request.params.temperature, seed),
            sample_top_k: request.scoring.sample_top_k,
            stream: request.stream,
        }
    }
}

/// Default [`Generation::with_prefill_chunk`]: prompts up to this long are prefilled in one pass.
pub const PREFILL_CHUNK: usize = 512;

impl Generation {
    /// An empty loop computing adapters in `kind` (the decoder's dtype).
    pub fn new(kind: Kind) -> Self {
        Generation {
            kind,
            stacks: Vec::new(),
            live: HashMap::new(),
            rows: Vec::new(),
            cache: None,
            logits: None,
            prefills: 0,
            shared_prompts: 0,
            prompt_tokens_reused: 0,
            kept: PrefixCache::new(0),
            kv_budget: usize::MAX,
            prefilling: VecDeque::new(),
            prefill_chunk: PREFILL_CHUNK,
            graphs: StepGraphs::Off,
            graph: None,
            steady_steps: 0,
            recording_failed: false,
            recording_failures: 0,
            graph_counts: GraphCounts::default(),
        }
    }

    /// Records a batch's decode step once its rows last two steps and replays it while they
    /// last ([`StepGraphs`]).
    pub fn with_step_graphs(mut self, graphs: StepGraphs) -> Self {
        self.graphs = graphs;
        self
    }

    /// Steps recorded and replayed so far.
    pub fn graph_counts(&self) -> GraphCounts {
        self.graph_counts
    }

    /// The batch's rows, adapters or cache changed: its recording no longer serves.
    fn batch_changed(&mut self) {
        self.graph = None;
        self.steady_steps = 0;
        self.recording_failed = false;
    }

    /// Keeps the keys and values of finished sequences, at most `tokens` in all, for later
    /// requests whose prompts start with them ([`PrefixCache`]; 0, the default, keeps none).
    pub fn with_prefix_cache(mut self, tokens: usize) -> Self {
        self.kept = PrefixCache::new(tokens);
        self
    }

    /// Bounds the keys and values (tokens) the loop holds: what its sequences may come to hold
    /// (rows × the longest `prompt + max_tokens` among them, as the batch's cache pads every
    /// row to the longest: what the engine admits under the same budget) and its kept
    /// sequences together. Kept sequences give way, least recently used first, to the requests
    /// that join; the default is no bound.
    pub fn with_kv_budget(mut self, tokens: usize) -> Self {
        self.kv_budget = tokens;
        self
    }

    /// Keys and values (tokens) the loop's caches hold room for, kept sequences aside: the
    /// batch's rows × its buffers' columns, and the caches of long prompts being prefilled.
    pub fn kv_tokens_held(&self) -> usize {
        let held = |c: &KvCache| c.rows() * c.capacity() as usize;
        self.cache.iter().map(held).sum::<usize>()
            + self
                .prefilling
                .iter()
                .filter_map(|p| p.cache.as_ref())
                .map(held)
                .sum::<usize>()
    }

    /// Tokens of finished sequences kept for later prompts ([`Generation::with_prefix_cache`]).
    pub fn kept_tokens(&self) -> usize {
        self.kept.tokens()
    }

    /// What the loop's requests may come to hold, those decoding and those whose long prompt is
    /// being prefilled: their sequences × the longest `prompt + max_tokens` among them.
    fn reserved_kv(&self) -> usize {
        let live = self.live.values().map(|l| {
            let len = longest_of(l.prompt_tokens.len(), &l.params);
            (l.sequences.len(), len)
        });
        let prefilling = self
            .prefilling
            .iter()
            .flat_map(|p| std::iter::once(&p.request).chain(&p.followers))
            .map(|j| {
                (
                    j.num_samples.max(0) as usize,
                    longest_of(j.prompt.len(), &j.params),
                )
            });
        let (rows, longest) = live
            .chain(prefilling)
            .fold((0, 0), |(rows, longest), (n, len)| {
                (rows + n, longest.max(len))
            });
        rows * longest
    }

    /// The tokens kept sequences may hold beside the requests' reservations.
    fn kept_room(&self) -> usize {
        self.kv_budget.saturating_sub(self.reserved_kv())
    }

    /// Prompt tokens admitted so far whose keys and values were copied (from another request's
    /// prefill, a live sequence or a kept one) instead of computed.
    pub fn prompt_tokens_reused(&self) -> u64 {
        self.prompt_tokens_reused
    }

    /// Prefills prompts longer than `tokens` in chunks of `tokens`, one chunk per step.
    pub fn with_prefill_chunk(mut self, tokens: usize) -> Self {
        self.prefill_chunk = tokens.max(1);
        self
    }

    /// Whether no request is in progress.
    pub fn is_empty(&self) -> bool {
        self.live.is_empty() && self.prefilling.is_empty()
    }

    /// Requests in progress (decoding or still prefilling).
    pub fn requests(&self) -> usize {
        self.live.len() + self.prefilling_tags().count()
    }

    /// The tags of the requests still prefilling (those in line and their followers).
    fn prefilling_tags(&self) -> impl Iterator<Item = RequestTag> + '_ {
        self.prefilling
            .iter()
            .flat_map(|p| std::iter::once(&p.request).chain(&p.followers))
            .map(|j| j.tag)
    }

    /// Live sequences (rows of the decode batch that have not stopped).
    pub fn rows(&self) -> usize {
        self.rows.iter().filter(|r| !r.parked).count()
    }

    /// Tokens the next [`Generation::step`] puts through the model: one per live sequence, plus
    /// the next chunk of the long prompt being prefilled, if any.
    pub fn step_tokens(&self) -> usize {
        let chunk = self
            .prefilling
            .front()
            .map_or(0, |p| p.next_chunk_end(self.prefill_chunk) - p.done);
        self.rows.len() + chunk
    }

    /// Prompts prefilled so far: one per distinct prompt, scope and adapter among the requests
    /// admitted together (whatever their `num_samples`), none for a request that shares a
    /// prefill or starts from a shared prefix ([`Generation::shared_prompts`]).
    pub fn prefills(&self) -> u64 {
        self.prefills
    }

    /// Requests admitted so far that computed no prefill of their whole prompt: they joined a
    /// request with the same prompt, scope and adapter admitted with them (or being prefilled), or
    /// started from a copy of a shared prefix ([`Generation::shared_prefix_of`]).
    pub fn shared_prompts(&self) -> u64 {
        self.shared_prompts
    }

    /// Validates `request`, prefills its prompt and adds its sequences to the batch under
    /// `tag` (unique among the requests in progress). On error nothing changes.
    pub fn admit(
        &mut self,
        decoder: &Decoder,
        tag: RequestTag,
        request: &SampleRequest,
        can_detokenize: bool,
    ) -> Result<()> {
        self.admit_many(decoder, &[(tag, request)], can_detokenize)
            .pop()
            .expect("one result per request")
    }

    /// [`Generation::admit`] for several requests, whose prompts are prefilled together in one
    /// left-padded pass. One result per request; a failed request changes nothing. Kept
    /// sequences then give way to the requests' reservations ([`Generation::with_kv_budget`]).
    pub fn admit_many(
        &mut self,
        decoder: &Decoder,
        requests: &[(RequestTag, &SampleRequest)],
        can_detokenize: bool,
    ) -> Vec<Result<()>> {
        // Kept sequences give way after the prefill (which may copy from them): until then the
        // loop briefly holds them beside the new rows, within the copy that joining makes anyway
        // (which `--max-kv-tokens auto` leaves room for).
        let results = self.admit_all(decoder, requests, can_detokenize);
        let room = self.kept_room();
        self.kept.shrink_to(room);
        results
    }

    fn admit_all(
        &mut self,
        decoder: &Decoder,
        requests: &[(RequestTag, &SampleRequest)],
        can_detokenize: bool,
    ) -> Vec<Result<()>> {
        let mut results: Vec<Result<()>> = requests
            .iter()
            .map(|(tag, r)| self.check(decoder, *tag, r, can_detokenize))
            .collect();
        let mut tags = std::collections::HashSet::new();
        for (i, (tag, _)) in requests.iter().enumerate() {
            if results[i].is_ok() && !tags.insert(*tag) {
                results[i] = Err(ModelError::invalid(
                    "tag",
                    format!("request {tag} appears twice"),
                ));
            }
        }
        // Long prompts are prefilled a chunk per step (unless what is left once a shared prefix
        // is copied fits a chunk); the others together, now.
        let now: Vec<bool> = requests
            .iter()
            .map(|(_, r)| {
                let shared = self.shared_prefix_of(r).map_or(0, |(_, n)| n);
                r.prompt.len() - shared <= self.prefill_chunk
            })
            .collect();
        for (i, (tag, r)) in requests.iter().enumerate() {
            if results[i].is_ok() && !now[i] {
                results[i] = self.queue_long_prompt(*tag, r);
            }
        }
        let valid: Vec<usize> = (0..requests.len())
            .filter(|&i| results[i].is_ok() && now[i])
            .collect();
        if valid.is_empty() {
            return results;
        }
        let batch: Vec<(RequestTag, &SampleRequest)> = valid.iter().map(|&i| requests[i]).collect();
        match tch::no_grad(|| self.prefill_and_join(decoder, &batch)) {
            Ok(()) => {}
            Err(e) if batch.len() == 1 => results[valid[0]] = Err(e),
            Err(e) => {
                // One request must not fail the others: retry each alone.
                tracing::warn!(error = %e, requests = batch.len(), "a joint prefill failed; prefilling alone");
                for (&i, one) in valid.iter().zip(&batch) {
                    results[i] =
                        tch::no_grad(|| self.prefill_and_join(decoder, std::slice::from_ref(one)));
                }
            }
        }
        results
    }

    /// Checks one request before it joins.
    fn check(
        &self,
        decoder: &Decoder,
        tag: RequestTag,
        request: &SampleRequest,
        can_detokenize: bool,
    ) -> Result<()> {
        validate(decoder, request)?;
        let strings = match &request.params.stop {
            Stop::Strings(s) | Stop::TokensOrStrings { strings: s, .. } => !s.is_empty(),
            _ => false,
        };
        if strings && !can_detokenize {
            return Err(ModelError::invalid(
                "sampling_params.stop",
                "stop strings need the model's tokenizer",
            ));
        }
        if self.live.contains_key(&tag) || self.prefilling_tags().any(|t| t == tag) {
            return Err(ModelError::invalid(
                "tag",
                format!("request {tag} is already live"),
            ));
        }
        Ok(())
    }

    /// The stack and member of each adapter (`None` for base-model requests), adding the new
    /// ones to the loop's stacks: one [`AdapterStack::push_many`] per stack with room (and new
    /// stacks for the rest, [`stack_groups`]), so a crowd joining at once rebuilds each stack's
    /// views once.
    fn members_of(
        &mut self,
        adapters: &[Option<&LoraAdapter>],
    ) -> Result<Vec<Option<(usize, i64)>>> {
        let joining = {
            let adapters: Vec<&LoraAdapter> = adapters.iter().flatten().copied().collect();
            stack_groups(&self.stacks, &adapters)
        };
        let existing = self.stacks.len();
        for (i, group) in joining.iter().enumerate() {
            if i < existing {
                if !group.is_empty() {
                    self.stacks[i].push_many(group)?;
                }
            } else {
                self.stacks
                    .push(AdapterStack::new(group, self.kind, false)?);
            }
        }
        Ok(adapters
            .iter()
            .map(|a| {
                a.map(|a| {
                    self.member_of(a)
                        .expect("every adapter is a member of a stack now")
                })
            })
            .collect())
    }

    /// The stack and member index of `adapter`, when it is a member of one of the loop's stacks.
    fn member_of(&self, adapter: &LoraAdapter) -> Option<(usize, i64)> {
        self.stacks
            .iter()
            .enumerate()
            .find_map(|(s, stack)| stack.member(adapter).map(|m| (s, m)))
    }

    /// Queues `r`'s long prompt to be prefilled a chunk per step (after a copy of its shared
    /// prefix, if any: [`Generation::shared_prefix_of`]), or, when `r` asks nothing about its
    /// prompt and a request in line has the same prompt, scope and adapter, makes it a follower
    /// of that request (it joins with it, sharing its prefill).
    fn queue_long_prompt(&mut self, tag: RequestTag, r: &SampleRequest) -> Result<()> {
        let member = self.members_of(&[r.adapter])?[0];
        let joining = Joining::new(tag, r, member);
        let leader = self.prefilling.iter_mut().find(|p| {
            !r.scoring.scores_prompt()
                && p.request.member == member
                && p.request.scope == r.share_scope
                && p.request.prompt == r.prompt
        });
        match leader {
            Some(p) => {
                p.followers.push(joining);
                self.shared_prompts += 1;
                self.prompt_tokens_reused += r.prompt.len() as u64;
            }
            None => {
                // A shared prefix is copied; the chunks start after it.
                let (done, cache) = match self.shared_prefix_of(r) {
                    Some((prefix, n)) => {
                        let view = prefix_view(&self.cache, &mut self.kept, prefix, n)?;
                        // Room for the rest of the prompt: its chunks append there.
                        let rest = (r.prompt.len() - n) as i64;
                        let copy = KvCache::concat_within(vec![view], rest, i64::MAX)?;
                        self.shared_prompts += 1;
                        self.prompt_tokens_reused += n as u64;
                        (n, Some(copy))
                    }
                    None => {
                        self.prefills += 1;
                        (0, None)
                    }
                };
                self.prefilling.push_back(Prefilling {
                    request: joining,
                    followers: Vec::new(),
                    done,
                    cache,
                });
            }
        }
        Ok(())
    }

    /// Where `r`'s prompt keys and values can start from, and how many of its tokens: the
    /// longest prefix its prompt shares with the prompt of a live sequence of its scope and
    /// adapter or with a kept finished sequence of its scope and adapter ([`PrefixCache`]),
    /// short of the prompt's last token (run through for its next-token logits). Only for
    /// requests that ask nothing about their prompt (whose logits the copy does not give), and
    /// for prefixes of [`MIN_SHARED_PREFIX`] tokens or more, unless a live sequence has this
    /// very prompt.
    fn shared_prefix_of(&self, r: &SampleRequest) -> Option<(Prefix, usize)> {
        if r.prompt.len() < 2 || r.scoring.scores_prompt() {
            return None;
        }
        let usable = r.prompt.len() - 1;
        let mut best: Option<(Prefix, usize)> = None;
        let mut consider = |prefix: Prefix, n: usize| {
            let n = n.min(usable);
            if n > best.map_or(0, |(_, b)| b) {
                best = Some((prefix, n));
            }
        };
        // The adapter's member, when it has one: live sequences of it exist only then.
        let member = match r.adapter {
            None => Some(None),
            Some(a) => self.member_of(a).map(Some),
        };
        if let Some(member) = member {
            let mut last = None;
            for (i, row) in self.rows.iter().enumerate() {
                if row.member != member || last == Some(row.request) {
                    continue;
                }
                last = Some(row.request);
                if let Some(live) = self
                    .live
                    .get(&row.request)
                    .filter(|l| l.scope == r.share_scope)
                {
                    consider(
                        Prefix::Live(i),
                        shared_prefix(&live.prompt_tokens, &r.prompt),
                    );
                }
            }
        }
        if let Some((k, n)) =
            self.kept
                .longest(r.share_scope, &r.adapter.map(|a| a.identity()), &r.prompt)
        {
            consider(Prefix::Kept(k), n);
        }
        // A live sequence with this very prompt is shared whatever its length: a group's
        // requests arriving while its first one decodes.
        best.filter(|&(prefix, n)| {
            n >= MIN_SHARED_PREFIX || (matches!(prefix, Prefix::Live(_)) && n == usable)
        })
    }

    /// Adds the (validated) requests' sequences to the batch. Their distinct prompts (per
    /// adapter) are prefilled in one left-padded pass, except those with a shared prefix
    /// ([`Generation::shared_prefix_of`]): a copy of its keys and values, and one pass over the
    /// rest of each of those prompts, start them. Requests with the same prompt and adapter
    /// share that work. On error the batch is unchanged (an unused stack member may stay until
    /// the next compaction).
    fn prefill_and_join(
        &mut self,
        decoder: &Decoder,
        requests: &[(RequestTag, &SampleRequest)],
    ) -> Result<()> {
        let adapters: Vec<Option<&LoraAdapter>> = requests.iter().map(|(_, r)| r.adapter).collect();
        let members = self.members_of(&adapters)?;
        let prefixes: Vec<Option<(Prefix, usize)>> = requests
            .iter()
            .map(|(_, r)| self.shared_prefix_of(r))
            .collect();
        // The requests whose prompt is prefilled and those whose prompt starts from a shared
        // prefix, one per distinct prompt and adapter, and where each request's prompt is
        // among them.
        let mut prefilled: Vec<usize> = Vec::new();
        let mut copied: Vec<usize> = Vec::new();
        let mut sources: Vec<(bool, usize)> = Vec::with_capacity(requests.len());
        let mut distinct: HashMap<SharedPrompt, usize> = HashMap::new();
        for (i, (_, r)) in requests.iter().enumerate() {
            let copy = prefixes[i].is_some();
            let list = if copy { &mut copied } else { &mut prefilled };
            let k = *distinct
                .entry((copy, r.share_scope, members[i], r.prompt.as_slice()))
                .or_insert_with(|| {
                    list.push(i);
                    list.len() - 1
                });
            sources.push((copy, k));
        }
        let mut joining: Vec<Joining> = requests
            .iter()
            .zip(&members)
            .map(|((tag, r), member)| Joining::new(*tag, r, *member))
            .collect();
        let assignment_of = |of: &[usize]| -> Vec<_> {
            of.iter()
                .map(|&i| members[i].map(|(s, k)| (&self.stacks[s], k)))
                .collect()
        };
        let mut caches = Vec::with_capacity(2);
        let mut logits = Vec::with_capacity(2);
        // Prompt tokens put through the model, and distinct prompts computed whole.
        let mut computed = 0;
        let mut whole = prefilled.len();
        if !prefilled.is_empty() {
            let prompts: Vec<&[i64]> = prefilled
                .iter()
                .map(|&i| requests[i].1.prompt.as_slice())
                .collect();
            computed += prompts.iter().map(|p| p.len()).sum::<usize>();
            let seq = prompts.iter().map(|p| p.len()).max().unwrap_or(0) as i64;
            let pads: Vec<i64> = prompts.iter().map(|p| seq - p.len() as i64).collect();
            let mut ids = vec![0i64; prompts.len() * seq as usize];
            for (k, prompt) in prompts.iter().enumerate() {
                let start = k * seq as usize + pads[k] as usize;
                ids[start..start + prompt.len()].copy_from_slice(prompt);
            }
            let ids = Tensor::from_slice(&ids).f_view([prompts.len() as i64, seq])?;
            let assignment = assignment_of(&prefilled);
            let lora = LoraBatch::new(&assignment)?;
            let (hidden, cache) = decoder.prefill_padded(&ids, &pads, Some(&lora))?;
            for (request, &(copy, k)) in joining.iter_mut().zip(&sources) {
                let scored = request.prompt.len() as i64 - 1;
                if copy || !request.scorer.is_needed() || scored <= 0 {
                    continue;
                }
                // Position j predicts prompt token j + 1.
                let own = hidden
                    .f_narrow(0, k as i64, 1)?
                    .f_narrow(1, pads[k], scored)?;
                let one = LoraBatch::new(&assignment[k..k + 1])?;
                let logits = decoder.logits(&own, Some(&one))?.f_get(0)?;
                request.scorer.add(&request.prompt, 0, &logits)?;
            }
            let last = hidden.f_select(1, seq - 1)?;
            logits.push(decoder.logits(&last, Some(&lora))?);
            caches.push(cache);
        }
        if !copied.is_empty() {
            // One pass over the same number of tokens `t` for every prompt: the longest rest
            // after a shared prefix; a prompt whose rest is shorter copies fewer tokens (and
            // computes some of its prefix again), one shorter than `t` is padded instead.
            let lens: Vec<usize> = copied.iter().map(|&i| requests[i].1.prompt.len()).collect();
            let t = copied
                .iter()
                .zip(&lens)
                .map(|(&i, len)| len - prefixes[i].expect("copied").1)
                .max()
                .unwrap_or(1);
            let mut views = Vec::with_capacity(copied.len());
            let mut ids = Vec::with_capacity(copied.len() * t);
            let mut pads = Vec::with_capacity(copied.len());
            for (&i, &len) in copied.iter().zip(&lens) {
                let take = len.saturating_sub(t);
                if take == 0 {
                    whole += 1;
                }
                let (prefix, _) = prefixes[i].expect("copied");
                views.push(prefix_view(&self.cache, &mut self.kept, prefix, take)?);
                let rest = &requests[i].1.prompt[take..];
                pads.push((t - rest.len()) as i64);
                ids.extend(std::iter::repeat_n(0, t - rest.len()));
                ids.extend_from_slice(rest);
                computed += rest.len();
            }
            // Room for the pass over the rests, which appends `t` columns.
            let mut cache = KvCache::concat_within(views, t as i64, i64::MAX)?;
            let assignment = assignment_of(&copied);
            let lora = LoraBatch::new(&assignment)?;
            let hidden = decoder.extend(&ids, &pads, &mut cache, Some(&lora))?;
            let last = hidden.f_select(1, t as i64 - 1)?;
            logits.push(decoder.logits(&last, Some(&lora))?);
            caches.push(cache);
        }
        let cache = match caches.len() {
            1 => caches.pop().expect("one"),
            _ => KvCache::concat(caches)?,
        };
        let logits = Tensor::f_cat(&logits, 0)?;
        let rows: Vec<i64> = sources
            .iter()
            .map(|&(copy, k)| (k + if copy { prefilled.len() } else { 0 }) as i64)
            .collect();
        self.join(cache, logits, joining, &rows)?;
        self.prefills += whole as u64;
        self.shared_prompts += (requests.len() - whole) as u64;
        let prompt_tokens: usize = requests.iter().map(|(_, r)| r.prompt.len()).sum();
        self.prompt_tokens_reused += (prompt_tokens - computed) as u64;
        Ok(())
    }

    /// Adds prefilled requests to the batch: `cache` and `logits` (`[n, vocab]`, the next-token
    /// logits after each prompt) hold the rows of their prompts, `rows[i]` that of
    /// `joining[i]`, repeated here for its `num_samples` sequences. On error the batch is
    /// unchanged.
    fn join(
        &mut self,
        cache: KvCache,
        logits: Tensor,
        joining: Vec<Joining>,
        rows: &[i64],
    ) -> Result<()> {
        let repeat: Vec<i64> = joining
            .iter()
            .zip(rows)
            .flat_map(|(j, &row)| std::iter::repeat_n(row, j.num_samples as usize))
            .collect();
        let cache = cache.keep_rows(&repeat, i64::MAX)?;
        let logits = logits.f_index_select(
            0,
            &Tensor::from_slice(&repeat).f_to_device(logits.device())?,
        )?;
        // Everything that can fail has run; now join the batch.
        // The batch changes: its parked rows leave.
        let longest = joining
            .iter()
            .map(|j| longest_of(j.prompt.len(), &j.params) as i64)
            .fold(self.longest_sequence(), i64::max);
        let (cache, logits) = match (&self.cache, &self.logits) {
            (Some(c), Some(l)) => {
                let (c, l) = self.without_parked(c, l, longest)?;
                (
                    KvCache::concat_within(vec![c, cache], 0, longest)?,
                    Tensor::f_cat(&[&l, &logits], 0)?,
                )
            }
            _ => (cache, logits),
        };
        self.cache = Some(cache);
        self.logits = Some(logits);
        self.rows.retain(|r| !r.parked);
        self.batch_changed();
        for j in joining {
            let seed = j.params.seed.unwrap_or_else(random_seed);
            for s in 0..j.num_samples as usize {
                self.rows.push(Row {
                    request: j.tag,
                    sample: s,
                    member: j.member,
                    parked: false,
                    tokens: Vec::new(),
                    logprobs: Vec::new(),
                    drawn_logprobs: Vec::new(),
                    top_k: Vec::new(),
                    rng: SplitMix64::new(sample_seed(seed, s)),
                });
            }
            self.live.insert(
                j.tag,
                Live {
                    sequences: vec![None; j.num_samples as usize],
                    unfinished: j.num_samples as usize,
                    params: j.params,
                    prompt: j.scorer.finish(),
                    prompt_tokens: j.prompt,
                    scope: j.scope,
                    sample_top_k: j.sample_top_k,
                    started: false,
                    stream: j.stream,
                },
            );
        }
        Ok(())
    }

    /// `cache` and `logits` (the batch's) without the parked rows' rows, the cache with room
    /// for at most `most` columns.
    fn without_parked(
        &self,
        cache: &KvCache,
        logits: &Tensor,
        most: i64,
    ) -> Result<(KvCache, Tensor)> {
        if self.rows.iter().all(|r| !r.parked) {
            return Ok((cache.shallow_clone(), logits.shallow_clone()));
        }
        let keep = self.unparked();
        let cache = cache.keep_rows(&keep, most)?;
        let index = Tensor::from_slice(&keep).f_to_device(logits.device())?;
        Ok((cache, logits.f_index_select(0, &index)?))
    }

    /// Prefills the next chunk of the first long prompt in line; a prompt done joins the batch.
    /// A failure fails that request only (returned).
    fn advance_prefill(&mut self, decoder: &Decoder) -> Vec<(RequestTag, ModelError)> {
        let Some(mut p) = self.prefilling.pop_front() else {
            return Vec::new();
        };
        let tags: Vec<RequestTag> = std::iter::once(&p.request)
            .chain(&p.followers)
            .map(|j| j.tag)
            .collect();
        let outcome = match self.prefill_chunk_of(decoder, &mut p) {
            Ok(None) => {
                self.prefilling.push_front(p);
                return Vec::new();
            }
            Ok(Some((cache, logits))) => {
                let mut joining = vec![p.request];
                joining.append(&mut p.followers);
                let rows = vec![0; joining.len()];
                self.join(cache, logits, joining, &rows)
            }
            Err(e) => Err(e),
        };
        match outcome {
            Ok(()) => Vec::new(),
            // The followers fail with the request whose prefill they share.
            Err(e) => {
                let mut failed: Vec<_> = tags[1..].iter().map(|&t| (t, e.for_another())).collect();
                failed.insert(0, (tags[0], e));
                failed
            }
        }
    }

    /// One chunk of `p`'s prompt; when it was the last, the cache and the last position's logits.
    fn prefill_chunk_of(
        &self,
        decoder: &Decoder,
        p: &mut Prefilling,
    ) -> Result<Option<(KvCache, Tensor)>> {
        let len = p.request.prompt.len();
        let end = p.next_chunk_end(self.prefill_chunk);
        let ids = &p.request.prompt[p.done..end];
        let lora = p
            .request
            .member
            .map(|(s, m)| LoraBatch::one(&self.stacks[s], m, 1))
            .transpose()?;
        let hidden = match &mut p.cache {
            None => {
                let input = Tensor::from_slice(ids).f_view([1, -1])?;
                let (hidden, cache) = decoder.prefill(&input, lora.as_ref())?;
                p.cache = Some(cache);
                hidden
            }
            Some(cache) => {
                // Room for the rest of the prompt and no more (joining copies the cache).
                cache.reserve_within(ids.len() as i64, p.request.prompt.len() as i64)?;
                decoder.extend(ids, &[0], cache, lora.as_ref())?
            }
        };
        if p.request.scorer.is_needed() {
            // Position i of the chunk predicts prompt token done + i + 1.
            let scored = end.min(len - 1) - p.done;
            if scored > 0 {
                let own = hidden.f_narrow(1, 0, scored as i64)?;
                let logits = decoder.logits(&own, lora.as_ref())?.f_get(0)?;
                p.request.scorer.add(&p.request.prompt, p.done, &logits)?;
            }
        }
        p.done = end;
        if end < len {
            return Ok(None);
        }
        let last = hidden.f_select(1, ids.len() as i64 - 1)?;
        let logits = decoder.logits(&last, lora.as_ref())?;
        Ok(Some((p.cache.take().expect("prefilled"), logits)))
    }

    /// Chooses the next token of every live sequence, retires those that stopped and runs one
    /// decode step for the others. After an error the loop is unusable: [`Generation::clear`] it.
    pub fn step(
        &mut self,
        decoder: &Decoder,
        detokenize: Option<Detokenize>,
    ) -> Result<StepReport> {
        tch::no_grad(|| self.step_inner(decoder, detokenize))
    }

    fn step_inner(
        &mut self,
        decoder: &Decoder,
        detokenize: Option<Detokenize>,
    ) -> Result<StepReport> {
        let mut report = StepReport {
            failed: self.advance_prefill(decoder),
            ..StepReport::default()
        };
        let Some(logits) = self.logits.take() else {
            return Ok(report);
        };
        // A parked row's choice is ignored: the cheapest pick.
        let ignored = SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        };
        let vocab = logits.size().last().copied().unwrap_or(1);
        let picks: Vec<Pick> = self
            .rows
            .iter_mut()
            .map(|row| match row.parked {
                true => Pick::new(&ignored, &mut row.rng, vocab),
                false => Pick::new(&self.live[&row.request].params, &mut row.rng, vocab),
            })
            .collect();
        let chosen = choose_tokens(&logits, &picks)?;
        let widest = self
            .rows
            .iter()
            .filter(|row| !row.parked)
            .map(|row| self.live[&row.request].sample_top_k)
            .max()
            .unwrap_or(0);
        let mut top_k = if widest > 0 {
            top_k_rows(&logits, widest)?
        } else {
            Vec::new()
        };
        let mut next_ids: Vec<i64> = Vec::with_capacity(self.rows.len());
        // What kept sequences may hold beside the reservations (those of the requests finishing
        // now included).
        let room = self.kept_room().min(self.kept.budget());
        for (i, row) in self.rows.iter_mut().enumerate() {
            if row.parked {
                next_ids.push(row.tokens[0]);
                continue;
            }
            report.tokens += 1;
            let live = self
                .live
                .get_mut(&row.request)
                .expect("a row's request is live");
            if !live.started {
                live.started = true;
                report.first_tokens.push(row.request);
            }
            let (token, logprob, drawn) = chosen[i];
            row.tokens.push(token);
            row.logprobs.push(logprob);
            row.drawn_logprobs.push(drawn);
            if live.sample_top_k > 0 {
                let mut mine = std::mem::take(&mut top_k[i]);
                mine.truncate(live.sample_top_k);
                row.top_k.push(mine);
            }
            if live.stream {
                report.streamed.push((
                    row.request,
                    StreamedToken {
                        sample: row.sample,
                        token,
                        logprob,
                        top_k: row.top_k.last().filter(|_| live.sample_top_k > 0).cloned(),
                    },
                ));
            }
            next_ids.push(token);
            let Some(reason) = stop_reason(decoder, &live.params, &row.tokens, detokenize) else {
                continue;
            };
            // Kept for a later prompt that starts with it (the next turn of a conversation):
            // what the row's cache holds, the prompt and every token but the one just chosen.
            let fed = live.prompt_tokens.len() + row.tokens.len() - 1;
            if room >= fed && fed >= MIN_SHARED_PREFIX {
                let cache = self.cache.as_ref().expect("live rows have a cache");
                let mut tokens = live.prompt_tokens.clone();
                tokens.extend_from_slice(&row.tokens[..row.tokens.len() - 1]);
                let adapter = row.member.map(|(s, m)| self.stacks[s].identity_of(m));
                let copy = || KvCache::concat(vec![cache.row_prefix(i, fed as i64)?]);
                if let Err(e) = self.kept.insert(&live.scope, adapter, tokens, room, copy) {
                    // Only later prompts lose: they compute what they would have copied.
                    tracing::warn!(error = %e, "a finished sequence could not be kept");
                }
            }
            live.sequences[row.sample] = Some(SampledSequence {
                tokens: std::mem::replace(&mut row.tokens, vec![token]),
                logprobs: std::mem::take(&mut row.logprobs),
                stop_reason: reason,
                top_k: (live.sample_top_k > 0).then(|| std::mem::take(&mut row.top_k)),
                drawn_logprobs: std::mem::take(&mut row.drawn_logprobs),
            });
            row.parked = true;
            live.unfinished -= 1;
            if live.unfinished == 0 {
                let done = self.live.remove(&row.request).expect("live");
                report.finished.push((
                    row.request,
                    SampleOutput {
                        sequences: done
                            .sequences
                            .into_iter()
                            .map(|s| s.expect("every sequence finished"))
                            .collect(),
                        prompt: done.prompt,
                    },
                ));
            }
        }
        let live_rows = self.rows();
        if live_rows == 0 {
            self.rows.clear();
            self.cache = None;
            self.batch_changed();
            if self.prefilling.is_empty() {
                self.stacks.clear();
            }
            return Ok(report);
        }
        let mut cache = self.cache.take().expect("live rows have a cache");
        if live_rows < self.rows.len() && !self.parks(decoder, &cache, live_rows) {
            let keep = self.unparked();
            next_ids = keep.iter().map(|&i| next_ids[i as usize]).collect();
            self.batch_changed();
            cache = cache.keep_rows(&keep, self.longest_sequence())?;
            self.rows.retain(|r| !r.parked);
            self.compact_stacks()?;
        }
        self.logits = Some(self.decode(decoder, &next_ids, &mut cache)?);
        self.cache = Some(cache);
        Ok(report)
    }

    /// Whether rows whose sequences stopped stay in the batch for the next step (parked:
    /// computed and ignored) instead of leaving it: while the batch's step is recorded, a
    /// departure would otherwise end the recording, and on a GPU computing a few more rows of a
    /// recorded step costs less than issuing steps one by one until it is recorded again. They
    /// leave with the next join or removal, once they outnumber the live rows, before a row
    /// would pass the model's context (a reallocation of the cache records the batch again with
    /// them), or when the buffers kept with them would pass twice the live requests' footprint
    /// (their rows × the longest of them, what the KV budget reserves; a finished long prompt
    /// beside a live short one with many tokens left would widen every row). Twice, for as long
    /// as no request joins: the budget is sized for the copy a join makes, and a join is what
    /// the share a finished request gave back admits, and it makes parked rows leave.
    fn parks(&self, decoder: &Decoder, cache: &KvCache, live_rows: usize) -> bool {
        let context = decoder.config().max_position_embeddings;
        let kept = self.rows.len() as i64 * self.window_needed(cache).max(cache.capacity());
        self.graph.as_ref().is_some_and(|g| g.serves(cache))
            && self.rows.len() - live_rows <= live_rows
            && cache.next_positions().iter().all(|&p| p < context)
            && kept <= 2 * live_rows as i64 * self.longest_sequence()
    }

    /// The longest `prompt + max_tokens` among the requests decoding: the cache's window (its
    /// longest row, as rows end in the same column) never needs more columns, so buffers grow
    /// no further and a batch's cache stays within its rows × that.
    fn longest_sequence(&self) -> i64 {
        self.live
            .values()
            .map(|l| longest_of(l.prompt_tokens.len(), &l.params) as i64)
            .max()
            .unwrap_or(0)
    }

    /// The columns the cache's window may need: [`Generation::longest_sequence`], unless parked
    /// rows (finished, kept for a recorded step) are longer than the live ones, when the window
    /// grows with the live ones for as many steps as the longest of them has left.
    fn window_needed(&self, cache: &KvCache) -> i64 {
        let longest = self.longest_sequence();
        if self.rows.iter().all(|r| !r.parked) {
            return longest;
        }
        longest.max(cache.len() + self.live_tokens_left().max(1))
    }

    /// The most tokens a live row has left to draw.
    fn live_tokens_left(&self) -> i64 {
        self.rows
            .iter()
            .filter(|r| !r.parked)
            .map(|r| self.live[&r.request].params.max_tokens - r.tokens.len() as i64)
            .max()
            .unwrap_or(0)
    }

    /// The indices of the rows that are not parked.
    fn unparked(&self) -> Vec<i64> {
        (0..self.rows.len() as i64)
            .filter(|&i| !self.rows[i as usize].parked)
            .collect()
    }

    /// One decode step of the batch (`ids`, one per row) over `cache`: its logits. Issued
    /// operation by operation, or recorded or replayed ([`Generation::with_step_graphs`]).
    fn decode(&mut self, decoder: &Decoder, ids: &[i64], cache: &mut KvCache) -> Result<Tensor> {
        cache.reserve_within(1, self.window_needed(cache))?;
        let stacks = &self.stacks;
        let assignment: Vec<_> = self
            .rows
            .iter()
            .map(|r| r.member.map(|(s, m)| (&stacks[s], m)))
            .collect();
        let mode = self.graphs.on(decoder.device());
        self.steady_steps += 1;
        let eager = |cache: &mut KvCache| -> Result<Tensor> {
            let lora = LoraBatch::new(&assignment)?;
            let hidden = decoder.decode_step(ids, cache, Some(&lora))?;
            decoder.logits(&hidden, Some(&lora))
        };
        if mode == StepGraphs::Off {
            return eager(cache);
        }
        if let Some(graph) = self.graph.as_ref().filter(|g| g.serves(cache)) {
            let host = decoder.static_step_inputs(ids, cache, None)?;
            let lora = match graph.is_emulated() {
                true => Some(LoraBatch::new(&assignment)?),
                false => None,
            };
            let logits = graph.replay(decoder, &host, cache, lora.as_ref())?;
            cache.advance(1);
            self.graph_counts.replayed += 1;
            return Ok(logits);
        }
        // The buffers grew (or the batch is new): what was recorded no longer serves.
        self.graph = None;
        if self.steady_steps < 2 || self.recording_failed {
            return eager(cache);
        }
        let lora = LoraBatch::new(&assignment)?;
        let host = decoder.static_step_inputs(ids, cache, Some(&lora))?;
        match StepGraph::record(mode, decoder, &host, cache, &lora) {
            Ok((graph, logits)) => {
                cache.advance(1);
                self.graph = Some(graph);
                self.graph_counts.recorded += 1;
                self.recording_failures = 0;
                Ok(logits)
            }
            Err(e) if mode == StepGraphs::Cuda => {
                self.recording_failed = true;
                self.recording_failures += 1;
                let last = self.recording_failures >= MAX_RECORDING_FAILURES;
                if last {
                    self.graphs = StepGraphs::Off;
                }
                tracing::warn!(error = %e, failures = self.recording_failures, stops_recording = last,
                    "a decode step could not be recorded as a CUDA graph; it runs operation by operation");
                eager(cache)
            }
            Err(e) => Err(e),
        }
    }

    /// Drops stacks no live request uses and compacts stacks mostly made of departed members.
    fn compact_stacks(&mut self) -> Result<()> {
        let mut used: Vec<Vec<bool>> = self.stacks.iter().map(|s| vec![false; s.len()]).collect();
        let members = self.rows.iter().map(|r| r.member);
        for (s, m) in members
            .chain(self.prefilling.iter().map(|p| p.request.member))
            .flatten()
        {
            used[s][m as usize] = true;
        }
        let mut new_index: Vec<Option<usize>> = Vec::with_capacity(self.stacks.len());
        let mut remaps: Vec<Option<Vec<Option<i64>>>> = Vec::with_capacity(self.stacks.len());
        let mut kept = Vec::with_capacity(self.stacks.len());
        for (mut stack, flags) in std::mem::take(&mut self.stacks).into_iter().zip(&used) {
            let in_use = flags.iter().filter(|&&u| u).count();
            if in_use == 0 {
                new_index.push(None);
                remaps.push(None);
                continue;
            }
            let remap = if stack.len() > 2 * in_use + 4 {
                Some(stack.compact(flags)?)
            } else {
                None
            };
            new_index.push(Some(kept.len()));
            remaps.push(remap);
            kept.push(stack);
        }
        self.stacks = kept;
        let remap = |member: &mut Option<(usize, i64)>| {
            if let Some((s, m)) = *member {
                let stack = new_index[s].expect("a used stack is kept");
                let m = match &remaps[s] {
                    Some(remap) => remap[m as usize].expect("a used member is kept"),
                    None => m,
                };
                *member = Some((stack, m));
            }
        };
        self.rows.iter_mut().for_each(|r| remap(&mut r.member));
        for p in &mut self.prefilling {
            remap(&mut p.request.member);
            p.followers.iter_mut().for_each(|f| remap(&mut f.member));
        }
        Ok(())
    }

    /// Drops the requests `tags` (cancelled, or over their time limit) between steps; the others
    /// go on as if the dropped ones had never joined. Returns the tags that were in progress. On
    /// error the loop is unusable: [`Generation::clear`] it.
    pub fn remove(&mut self, tags: &[RequestTag]) -> Result<Vec<RequestTag>> {
        let mut removed = Vec::new();
        self.prefilling.retain_mut(|p| {
            p.followers.retain(|f| {
                let drop = tags.contains(&f.tag);
                if drop {
                    removed.push(f.tag);
                }
                !drop
            });
            if !tags.contains(&p.request.tag) {
                return true;
            }
            removed.push(p.request.tag);
            // Its first follower goes on with the prefill (and asks nothing about the prompt).
            if p.followers.is_empty() {
                return false;
            }
            p.request = p.followers.remove(0);
            true
        });
        let gone: Vec<RequestTag> = tags
            .iter()
            .copied()
            .filter(|t| self.live.remove(t).is_some())
            .collect();
        if !gone.is_empty() {
            // The batch changes: its parked rows leave too.
            let stays = |r: &Row| !r.parked && !gone.contains(&r.request);
            let keep: Vec<i64> = (0..self.rows.len() as i64)
                .filter(|&i| stays(&self.rows[i as usize]))
                .collect();
            self.rows.retain(stays);
            if self.rows.is_empty() {
                self.cache = None;
                self.logits = None;
            } else {
                if let Some(logits) = self.logits.take() {
                    let index = Tensor::from_slice(&keep).f_to_device(logits.device())?;
                    self.logits = Some(logits.f_index_select(0, &index)?);
                }
                if let Some(cache) = self.cache.take() {
                    self.cache = Some(cache.keep_rows(&keep, self.longest_sequence())?);
                }
            }
            removed.extend(gone);
            self.batch_changed();
        }
        if self.is_empty() {
            self.stacks.clear();
        } else if !removed.is_empty() {
            self.compact_stacks()?;
        }
        Ok(removed)
    }

    /// Drops every request in progress (after a failed step) and returns their tags.
    pub fn clear(&mut self) -> Vec<RequestTag> {
        self.batch_changed();
        // The failure may have been a lack of memory.
        self.kept.clear();
        self.rows.clear();
        self.cache = None;
        self.logits = None;
        self.stacks.clear();
        let mut tags: Vec<RequestTag> = self.prefilling_tags().collect();
        self.prefilling.clear();
        tags.extend(self.live.drain().map(|(tag, _)| tag));
        tags
    }
}

/// The most tokens a sequence of a `prompt`-token prompt may hold in a cache: `prompt +
/// max_tokens`.
fn longest_of(prompt: usize, params: &SamplingParams) -> usize {
    prompt + params.max_tokens.max(0) as usize
}

/// A one-row cache of views of the first `n` tokens of `prefix` (see [`KvCache::row_prefix`]):
/// a row of the batch's cache `batch`, or a sequence kept in `kept`.
fn prefix_view(
    batch: &Option<KvCache>,
    kept: &mut PrefixCache,
    prefix: Prefix,
    n: usize,
) -> Result<KvCache> {
    match prefix {
        Prefix::Live(row) => batch
            .as_ref()
            .expect("live rows have a cache")
            .row_prefix(row, n as i64),
        Prefix::Kept(k) => kept.use_prefix(k, n as i64),
    }
}

/// Generates for every request in one decode loop.
pub fn sample(
    decoder: &Decoder,
    requests: &[SampleRequest],
    detokenize: Option<Detokenize>,
) -> Result<Vec<SampleOutput>> {
    sample_with(
        &mut Generation::new(decoder.kind()),
        decoder,
        requests,
        detokenize,
    )
}

/// [`sample`] in `generation` (an empty loop, configured by the caller, who may read its counts
/// after).
pub fn sample_with(
    generation: &mut Generation,
    decoder: &Decoder,
    requests: &[SampleRequest],
    detokenize: Option<Detokenize>,
) -> Result<Vec<SampleOutput>> {
    let tagged: Vec<(RequestTag, &SampleRequest)> = requests
        .iter()
        .enumerate()
        .map(|(i, r)| (i as RequestTag, r))
        .collect();
    for result in generation.admit_many(decoder, &tagged, detokenize.is_some()) {
        result?;
    }
    let mut outputs: Vec<Option<SampleOutput>> = vec![None; requests.len()];
    while !generation.is_empty() {
        let report = generation.step(decoder, detokenize)?;
        if let Some((_, e)) = report.failed.into_iter().next() {
            return Err(e);
        }
        for (tag, out) in report.finished {
            outputs[tag as usize] = Some(out);
        }
    }
    Ok(outputs
        .into_iter()
        .map(|o| o.expect("every request finishes"))
        .collect())
}

/// Bytes of text a stop check decodes before the last token beyond the longest stop string:
/// a character split at the window's start, or a leading space a tokenizer drops there.
const STOP_WINDOW_SLACK: usize = 8;

/// Whether the text of `tokens` holds one of `strings` where it can first do so: ending in the
/// last token's text (each earlier end was checked at its own token). Decodes only a window of
/// the last tokens whose text before the last one covers the longest string (doubling it when
/// tokens are short); decoding the whole sequence at every token made a long sample's stop
/// check cost its length squared, on the thread every tenant's decode loop shares.
fn tail_holds(detokenize: Detokenize, tokens: &[i64], strings: &[String]) -> bool {
    let longest = strings.iter().map(String::len).max().unwrap_or(0);
    let needed = longest + STOP_WINDOW_SLACK;
    let mut window = (needed + 1).min(tokens.len());
    loop {
        let tail = &tokens[tokens.len() - window..];
        let covered = window == tokens.len() || detokenize(&tail[..window - 1]).len() >= needed;
        if covered {
            let text = detokenize(tail);
            return strings.iter().any(|s| text.contains(s.as_str()));
        }
        window = (window * 2).min(tokens.len());
    }
}

fn stop_reason(
    decoder: &Decoder,
    params: &SamplingParams,
    tokens: &[i64],
    detokenize: Option<Detokenize>,
) -> Option<StopReason> {
    let last = *tokens.last()?;
    let stopped = match &params.stop {
        Stop::Eos => decoder.config().eos_token_ids.contains(&last),
        Stop::Never => false,
        Stop::Tokens(ids) => ids.contains(&last),
        Stop::Strings(strings) => detokenize.is_some_and(|f| tail_holds(f, tokens, strings)),
        Stop::TokensOrStrings {
            tokens: ids,
            strings,
        } => {
            ids.contains(&last)
                || (!strings.is_empty()
                    && detokenize.is_some_and(|f| tail_holds(f, tokens, strings)))
        }
    };
    if stopped {
        Some(StopReason::Stop)
    } else if tokens.len() as i64 >= params.max_tokens {
        Some(StopReason::Length)
    } else {
        None
    }
}

/// The random stream of sample `index` of a request seeded `seed`: it draws exactly like a
/// one-sample request seeded `sample_seed(seed, index)` (sample 0 uses `seed` itself).
pub fn sample_seed(seed: u64, index: usize) -> u64 {
    seed ^ (index as u64).wrapping_mul(0xA076_1D64_78BD_642F)
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

/// Below this temperature a row takes the most likely token (the limit of tempered sampling as
/// the temperature falls), so that `logits / temperature` never overflows f32.
pub const MIN_SAMPLED_TEMPERATURE: f64 = 1e-6;

/// How one row picks its next token: its sampling parameters and, unless greedy, its uniforms
/// from its own random stream (see [`crate::draw`]).
#[derive(Debug, Clone)]
pub struct Pick {
    greedy: bool,
    temperature: f64,
    top_k: i64,
    top_p: f64,
    /// Uniforms in (0, 1): one per block of the vocabulary, then one per token of a block
    /// (none when greedy).
    uniforms: Vec<f32>,
}

impl Pick {
    /// The pick of a row sampled with `p` from a vocabulary of `vocab` tokens; draws from
    /// `rng` unless greedy (the same number of draws every step, so a row's stream does not
    /// depend on what else is in its batch).
    pub fn new(p: &SamplingParams, rng: &mut SplitMix64, vocab: i64) -> Pick {
        let greedy = p.temperature < MIN_SAMPLED_TEMPERATURE || p.top_k == 1;
        let uniforms = match greedy {
            true => Vec::new(),
            false => Blocks::of(vocab).uniforms(rng, 1),
        };
        Pick {
            greedy,
            temperature: p.temperature,
            top_k: p.top_k,
            top_p: p.top_p,
            uniforms,
        }
    }
}

/// Chooses one token per row of `logits` (`[rows, vocab]`) on the logits' device and returns
/// each with its log-probability under the unmodified distribution (temperature 1, before
/// top-k/top-p) and under the distribution it was drawn from (0 for greedy rows): one
/// device-to-host transfer for the whole batch.
///
/// Greedy rows take the argmax (the first one on ties). Sampled rows scale by their temperature,
/// keep the tokens whose logit reaches the row's `top_k`-th largest and then the smallest set of
/// most likely tokens whose mass reaches `top_p` (thresholds, so tokens tied at a threshold are
/// all kept), and draw from what is kept by an exponential race on the row's uniforms
/// ([`crate::draw`]). Every quantity is computed per row, so a row's token does not depend on
/// which other rows share the batch, and a rounding difference in its logits (a batch of
/// another size sums in another order) changes it only where two clocks nearly tie.
pub fn choose_tokens(logits: &Tensor, picks: &[Pick]) -> Result<Vec<(i64, f32, f32)>> {
    let rows = picks.len() as i64;
    let size = logits.size();
    if size.len() != 2 || size[0] != rows {
        return Err(ModelError::invalid(
            "logits",
            format!("expected [{rows}, vocab], got {size:?}"),
        ));
    }
    let vocab = size[1];
    let device = logits.device();
    let logits = logits.f_to_kind(Kind::Float)?;
    let logprobs = logits.f_log_softmax(-1, Kind::Float)?;
    let mut ids = logits.f_argmax(-1, false)?;
    // Greedy rows draw with certainty (log 1 = 0); an all-greedy batch computes nothing more.
    let mut drawn_logprobs = None;
    if picks.iter().any(|p| !p.greedy) {
        // Per row: greedy flag, temperature, top-k (vocab when unlimited), top-p, then the
        // row's uniforms (0.5 for greedy rows, which ignore them).
        let blocks = Blocks::of(vocab);
        let per_draw = blocks.uniforms_per_draw();
        let width = 4 + per_draw;
        let mut packed = Vec::with_capacity(width * picks.len());
        for p in picks {
            packed.push(if p.greedy { 1.0 } else { 0.0 });
            packed.push(if p.greedy { 1.0 } else { p.temperature as f32 });
            packed.push(match p.top_k {
                k if k > 0 => k.min(vocab) as f32,
                _ => vocab as f32,
            });
            packed.push(p.top_p as f32);
            match (p.greedy, p.uniforms.len() == per_draw) {
                (true, _) => packed.extend(std::iter::repeat_n(0.5, per_draw)),
                (false, true) => packed.extend(&p.uniforms),
                (false, false) => {
                    return Err(ModelError::invalid(
                        "picks",
                        format!(
                            "a pick made for another vocabulary ({} uniforms, {vocab} tokens want {per_draw})",
                            p.uniforms.len()
                        ),
                    ))
                }
            }
        }
        let packed = Tensor::from_slice(&packed)
            .f_view([rows, width as i64])?
            .f_to_device(device)?;
        let column = |i: i64| packed.f_narrow(1, i, 1);
        let (greedy, temperature, top_k, top_p) = (
            column(0)?.f_to_kind(Kind::Bool)?,
            column(1)?,
            column(2)?.f_to_kind(Kind::Int64)?,
            column(3)?,
        );
        let mut scaled = logits.f_div(&temperature)?;
        let max_k = picks
            .iter()
            .filter(|p| !p.greedy && p.top_k > 0)
            .map(|p| p.top_k.min(vocab))
            .max();
        if let Some(max_k) = max_k {
            // Each row's k-th largest logit (rows without a limit keep everything).
            let (top, _) = scaled.f_topk(max_k, -1, true, true)?;
            let kth = top.f_gather(1, &top_k.f_clamp_max(max_k)?.f_sub_scalar(1)?, false)?;
            let unlimited = top_k.f_ge(vocab)?;
            let kth = kth.f_masked_fill(&unlimited, f64::NEG_INFINITY)?;
            scaled = scaled.f_masked_fill(&scaled.f_lt_tensor(&kth)?, f64::NEG_INFINITY)?;
        }
        let mut weights = scaled.f_softmax(-1, Kind::Float)?;
        if picks.iter().any(|p| !p.greedy && p.top_p < 1.0) {
            // The nucleus: the most likely tokens until their mass reaches top_p; its least
            // likely member's probability is the row's threshold.
            let (sorted, _) = weights.f_sort(-1, true)?;
            let before = sorted.f_cumsum(-1, Kind::Float)?.f_sub(&sorted)?;
            let size = before.f_lt_tensor(&top_p)?.f_sum_dim_intlist(
                [-1i64].as_slice(),
                true,
                Kind::Int64,
            )?;
            let threshold = sorted.f_gather(1, &size.f_clamp_min(1)?.f_sub_scalar(1)?, false)?;
            let threshold = threshold.f_masked_fill(&top_p.f_ge(1.0)?, 0.0)?;
            weights = weights.f_mul(&weights.f_ge_tensor(&threshold)?)?;
        }
        // One draw per row by the race of `crate::draw` (a kept token always has a positive
        // weight; the others are never drawn).
        let uniforms = packed.f_narrow(1, 4, per_draw as i64)?.f_unsqueeze(1)?;
        let drawn = blocks.race(&weights, &uniforms)?.f_squeeze_dim(1)?;
        ids = drawn.f_where_self(&greedy.f_squeeze_dim(1)?.f_logical_not()?, &ids)?;
        // The drawn token's share of the mass that was kept.
        let kept_mass = weights.f_sum_dim_intlist([-1i64].as_slice(), true, Kind::Float)?;
        drawn_logprobs = Some(
            weights
                .f_gather(1, &ids.f_unsqueeze(1)?, false)?
                .f_div(&kept_mass)?
                .f_log()?
                .f_masked_fill(&greedy, 0.0)?
                .f_squeeze_dim(1)?,
        );
    }
    let chosen = logprobs
        .f_gather(1, &ids.f_unsqueeze(1)?, false)?
        .f_squeeze_dim(1)?;
    // One transfer: ids travel as f64 (exact for any vocabulary), with their log-probabilities.
    let mut rows_out = vec![
        ids.f_to_kind(Kind::Double)?,
        chosen.f_to_kind(Kind::Double)?,
    ];
    if let Some(drawn) = &drawn_logprobs {
        rows_out.push(drawn.f_to_kind(Kind::Double)?);
    }
    let host = Tensor::f_stack(&rows_out, 0)?.f_to_device(tch::Device::Cpu)?;
    let values = Vec::<f64>::try_from(host.f_view([-1])?)?;
    let n = picks.len();
    let drawn = |i: usize| values.get(2 * n + i).map_or(0.0, |&v| v as f32);
    Ok((0..n)
        .map(|i| (values[i] as i64, values[n + i] as f32, drawn(i)))
        .collect())
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

    /// Chooses for `n` copies of `logits`, row `i` with `params[i % params.len()]`, each row
    /// drawing from its own stream.
    fn choose_n(
        logits: &[f32],
        params: &[SamplingParams],
        n: usize,
        seed: u64,
    ) -> Vec<(i64, f32, f32)> {
        let picks: Vec<Pick> = (0..n)
            .map(|i| {
                let mut rng = SplitMix64::new(seed ^ (i as u64).wrapping_mul(0x9E37_79B9));
                Pick::new(&params[i % params.len()], &mut rng, logits.len() as i64)
            })
            .collect();
        let rows: Vec<f32> = (0..n).flat_map(|_| logits.iter().copied()).collect();
        let t = Tensor::from_slice(&rows).view([n as i64, logits.len() as i64]);
        choose_tokens(&t, &picks).unwrap()
    }

    fn count(chosen: &[(i64, f32, f32)], token: i64) -> usize {
        chosen.iter().filter(|(t, _, _)| *t == token).count()
    }

    #[test]
    fn greedy_and_top_k_1_pick_the_argmax_with_its_logprob() {
        let logits = [0.5f32, 3.0, -1.0, 2.9];
        let chosen = choose_n(&logits, &[params(0.0, -1, 1.0), params(0.7, 1, 1.0)], 2, 1);
        let norm: f64 = logits.iter().map(|&x| (x as f64).exp()).sum::<f64>().ln();
        for (t, lp, drawn) in chosen {
            assert_eq!(t, 1);
            assert!((lp as f64 - (3.0 - norm)).abs() < 1e-6);
            // A greedy pick is certain under the distribution it was drawn from.
            assert_eq!(drawn, 0.0);
        }
        // So is one that shares its batch with sampled rows, whose draws are not certain.
        let mixed = choose_n(&logits, &[params(0.0, -1, 1.0), params(1.0, -1, 1.0)], 4, 1);
        for (i, (_, lp, drawn)) in mixed.into_iter().enumerate() {
            let want = if i % 2 == 0 { 0.0 } else { lp };
            assert!((drawn - want).abs() < 1e-6, "row {i}: {drawn} vs {want}");
        }
    }

    #[test]
    fn the_drawn_logprob_is_under_the_tempered_and_truncated_distribution() {
        let logits = [5.0f32, 4.0, 0.0, -2.0, -3.0];
        let log_softmax = |xs: &[f64], i: usize| {
            let norm = xs.iter().map(|x| x.exp()).sum::<f64>().ln();
            xs[i] - norm
        };
        let full: Vec<f64> = logits.iter().map(|&x| f64::from(x)).collect();
        let cold: Vec<f64> = full.iter().map(|x| x / 0.5).collect();
        // p(0) ≈ 0.72 < 0.8 <= p(0) + p(1): top_p 0.8 keeps {0, 1}, as top_k 2 does.
        let cases = [
            (params(1.0, -1, 1.0), full.clone()),
            (params(1.0, 2, 1.0), full[..2].to_vec()),
            (params(1.0, -1, 0.8), full[..2].to_vec()),
            (params(0.5, -1, 1.0), cold),
        ];
        for (p, support) in cases {
            for (t, lp, drawn) in choose_n(&logits, std::slice::from_ref(&p), 50, 9) {
                let t = t as usize;
                assert!((f64::from(lp) - log_softmax(&full, t)).abs() < 1e-5);
                let want = log_softmax(&support, t);
                assert!(
                    (f64::from(drawn) - want).abs() < 1e-5,
                    "{p:?}: {drawn} vs {want}"
                );
            }
        }
    }

    #[test]
    fn top_k_and_top_p_restrict_the_support() {
        let logits = [5.0f32, 4.0, 0.0, -2.0, -3.0];
        // p(0) ≈ 0.72 < 0.8 <= p(0) + p(1): the nucleus is {0, 1}.
        let chosen = choose_n(
            &logits,
            &[params(1.0, 2, 1.0), params(1.0, -1, 0.8)],
            400,
            7,
        );
        assert!(chosen.iter().all(|(t, _, _)| *t < 2));
        assert!(count(&chosen, 1) > 40, "both kept tokens are drawn");
    }

    #[test]
    fn sampling_follows_the_distribution() {
        // p = (0.1, 0.6, 0.3); with top_k 2 the support is {1, 2} with (2/3, 1/3); at
        // temperature 0.5 the probabilities are squared and renormalised: (1/46, 36/46, 9/46).
        let logits = [0.1f32.ln(), 0.6f32.ln(), 0.3f32.ln()];
        let n = 6000;
        let plain = choose_n(&logits, &[params(1.0, -1, 1.0)], n, 3);
        let cut = choose_n(&logits, &[params(1.0, 2, 1.0)], n, 4);
        let cold = choose_n(&logits, &[params(0.5, 0, 1.0)], n, 5);
        let near = |got: usize, p: f64| {
            (got as f64 - p * n as f64).abs() < 4.0 * (p * n as f64).sqrt() + 5.0
        };
        assert!(
            near(count(&plain, 0), 0.1) && near(count(&plain, 1), 0.6),
            "plain"
        );
        assert!(
            count(&cut, 0) == 0 && near(count(&cut, 1), 2.0 / 3.0),
            "top_k"
        );
        assert!(
            near(count(&cold, 0), 1.0 / 46.0) && near(count(&cold, 1), 36.0 / 46.0),
            "temperature"
        );
        // The returned log-probability is the model's, whatever the sampling parameters.
        for (t, lp, _) in cut.iter().chain(&cold) {
            assert!((lp - logits[*t as usize]).abs() < 1e-5);
        }
    }

    #[test]
    fn top_k_and_top_p_over_many_blocks_keep_their_support_and_proportions() {
        // 1,000 tokens (32 blocks of 32, the last padded), logits falling by 0.002 a token.
        let logits: Vec<f32> = (0..1000).map(|i| -0.002 * i as f32).collect();
        let weight = |i: i64| f64::from(logits[i as usize]).exp();
        let n = 4000;
        // top_k 300: tokens 0-299, the first hundred drawn in proportion to the next.
        let cut = choose_n(&logits, &[params(1.0, 300, 1.0)], n, 13);
        assert!(cut.iter().all(|&(t, _, _)| t < 300));
        let share = |range: std::ops::Range<i64>| {
            cut.iter().filter(|(t, _, _)| range.contains(t)).count() as f64
        };
        let want = (0..100).map(weight).sum::<f64>() / (100..200).map(weight).sum::<f64>();
        let got = share(0..100) / share(100..200);
        assert!((got / want - 1.0).abs() < 0.15, "{got} vs {want}");
        // top_p 0.5: the most likely tokens up to half the mass, 0 to 277 here.
        let total: f64 = (0..1000).map(weight).sum();
        let mut mass = 0.0;
        let last = (0..1000)
            .find(|&i| {
                mass += weight(i) / total;
                mass >= 0.5
            })
            .unwrap();
        let nucleus = choose_n(&logits, &[params(1.0, -1, 0.5)], n, 14);
        assert!(nucleus.iter().all(|&(t, _, _)| t <= last));
        assert!(
            nucleus.iter().any(|&(t, _, _)| t > last - 30),
            "the nucleus' end is drawn"
        );
    }

    #[test]
    fn a_draw_survives_rounding_differences_in_its_logits() {
        // 400 rows over a 49,152-token vocabulary (the default model's) of Gaussian logits
        // (standard deviation 3: a few likely tokens and a long tail), then the same logits
        // moved by up to 1e-4, more than summing in another order moves them in a batch of
        // another size (f32): no row changes its token. Inverting the cumulative distribution
        // instead changed 6-14 of the 400 on such logits (three seeds, in PyTorch).
        let vocab = 49_152;
        let mut rng = SplitMix64::new(5);
        let logits: Vec<f32> = (0..vocab)
            .map(|_| {
                let (u, v) = (1.0 - rng.next_f64(), rng.next_f64());
                (3.0 * (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
            })
            .collect();
        let moved: Vec<f32> = logits
            .iter()
            .map(|&x| x + ((rng.next_f64() - 0.5) * 2e-4) as f32)
            .collect();
        let rows = 400;
        let first = choose_n(&logits, &[params(1.0, -1, 1.0)], rows, 8);
        let again = choose_n(&moved, &[params(1.0, -1, 1.0)], rows, 8);
        let changed = first.iter().zip(&again).filter(|(a, b)| a.0 != b.0).count();
        assert_eq!(changed, 0, "of {rows} draws");
    }

    #[test]
    fn a_row_draws_the_same_token_whatever_shares_its_batch() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 37 % 11) as f32) * 0.3).collect();
        let mine = params(0.9, 20, 0.9);
        let alone = choose_n(&logits, std::slice::from_ref(&mine), 1, 11)[0];
        // The same stream as row 0 of a batch with greedy, unlimited and other truncations.
        let crowd = choose_n(
            &logits,
            &[
                mine,
                params(0.0, -1, 1.0),
                params(1.0, -1, 1.0),
                params(1.3, 3, 0.5),
            ],
            8,
            11,
        );
        assert_eq!(crowd[0], alone);
    }

    /// A toy byte-level vocabulary of short tokens: `t % 4` 0 and 1 are the two bytes of
    /// `\u{e9}` (split across tokens, as byte-level tokenizers split characters), the others
    /// `t % 3` letters of `abab` (some empty).
    fn toy_detokenize(tokens: &[i64]) -> String {
        let mut bytes = Vec::new();
        for &t in tokens {
            match t % 4 {
                0 => bytes.push(0xc3),
                1 => bytes.push(0xa9),
                _ => bytes.extend(&b"ab"[..(t % 3) as usize]),
            }
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    #[test]
    fn a_stop_string_is_found_at_the_same_token_in_the_tail_as_in_the_whole_text() {
        let mut rng = crate::rng::SplitMix64::new(5);
        let strings: Vec<String> = ["abababab", "ababab", "\u{e9}ab\u{e9}"]
            .map(String::from)
            .to_vec();
        let mut stopped = 0;
        for _ in 0..300 {
            let tokens: Vec<i64> = (0..200).map(|_| (rng.next_u64() % 40) as i64).collect();
            let whole = (1..=tokens.len()).find(|&n| {
                let text = toy_detokenize(&tokens[..n]);
                strings.iter().any(|s| text.contains(s.as_str()))
            });
            let decoded = std::cell::Cell::new(0);
            let counting = |ids: &[i64]| {
                decoded.set(decoded.get() + ids.len());
                toy_detokenize(ids)
            };
            let tail = (1..=tokens.len()).find(|&n| tail_holds(&counting, &tokens[..n], &strings));
            assert_eq!(tail, whole, "{tokens:?}");
            stopped += usize::from(whole.is_some());
            // Bounded windows: far from the whole prefix at every token (200 * 201 / 2).
            assert!(decoded.get() < 200 * 64, "{} tokens decoded", decoded.get());
        }
        assert!(
            stopped > 100,
            "the strings are found in most sequences: {stopped}"
        );
        let long = (0..300).filter(|_| {
            let tokens: Vec<i64> = (0..200).map(|_| (rng.next_u64() % 40) as i64).collect();
            toy_detokenize(&tokens).contains("abababab")
        });
        assert!(long.count() > 10, "the longest string is found too");
    }
}
