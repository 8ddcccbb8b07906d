//! An OpenAI-compatible inference API, as Tinker serves one: any OpenAI client (the `openai`
//! SDK, evaluation harnesses) samples the base model or one of the tenant's sampler checkpoints
//! with `base_url` `http://HOST:PORT/oai/api/v1` and an API key (`Authorization: Bearer`).
//! `model` is the base model's name, a checkpoint path (`tinker://…/sampler_weights/…`), or
//! `<base model>;<checkpoint path>`. A request runs as ordinary sampling jobs of the caller's
//! tenant (one shared sampling session per model, as `/api/v1/sample`'s), batched with every
//! other tenant's decoding. Its answer waits for the whole completion, or with `"stream": true`
//! comes as server-sent events while the tokens are chosen ([`super::openai_stream`]); a client
//! that hangs up cancels its jobs.
//!
//! - `POST /completions`: `prompt` (a string or token ids, or a list of either: one job per
//!   prompt, choices numbered prompt by prompt), `max_tokens` (16; 0 only with `echo`),
//!   `temperature` (1), `top_p`, `top_k`, `n`, `stop`, `seed`, `logprobs` (alternatives per
//!   token, at most [`MAX_TOP_LOGPROBS`]) and `echo` (the prompt's text, and with `logprobs` its
//!   tokens' logprobs: what evaluation harnesses score continuations with). A text prompt is
//!   encoded with the tokenizer's special tokens (a BOS where the model has one), as vLLM does.
//! - `POST /chat/completions`: `messages` rendered with the model's chat template, as
//!   transformers' `apply_chat_template(..., add_generation_prompt=True, tokenize=True)` renders
//!   and encodes them; `max_completion_tokens` or `max_tokens` (default: what the context
//!   leaves, at most [`DEFAULT_CHAT_MAX_TOKENS`]), `logprobs`, `top_logprobs`, and the sampling
//!   fields above.
//! - `GET /models`: the base model.
//!
//! Generation stops at the model's end tokens (`config.json`'s and `generation_config.json`'s
//! `eos_token_id`, and the tokenizer's `eos_token`) or a `stop` string, else at the token limit
//! (`finish_reason` `length`). The text leaves out special tokens and ends before the stop
//! string, as OpenAI's and vLLM's do; logprobs and usage count every generated token. Errors
//! answer in OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`).

use std::collections::HashMap;

use loraloom_model::sample::{MAX_NUM_SAMPLES, MAX_STOP_SEQUENCES};
use loraloom_model::{
    SampleOutput, SampledSequence, SamplingParams, Scoring, Stop, StopReason, TopK,
};

use super::openai_stream::{stream_response, StreamPlan, StreamedJob, StreamedRoute};
use super::*;
use crate::error::OpenAiError;

/// Most alternatives a token's logprobs may list (OpenAI's `top_logprobs` limit).
pub const MAX_TOP_LOGPROBS: i64 = 20;

/// A chat completion's token limit when the request gives none: what the context leaves, up
/// to this. A decode batch reserves keys and values for each sequence's whole limit
/// (`--max-kv-tokens`), so a default of the whole context would have every such request
/// decode alone.
pub const DEFAULT_CHAT_MAX_TOKENS: i64 = 2048;

/// Most logprob entries (a token, or one of its alternatives) one answer may hold: the answer
/// is built in memory, `n` times the prompt when echoed.
pub const MAX_LOGPROB_ENTRIES: usize = 1 << 20;

type OaiResult<T> = Result<T, OpenAiError>;

/// One prompt or several: text, or token ids.
#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum PromptField {
    Text(String),
    Tokens(Vec<i64>),
    Texts(Vec<String>),
    TokenLists(Vec<Vec<i64>>),
}

/// `stop`: one string or several.
#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum StopField {
    One(String),
    Many(Vec<String>),
}

/// The sampling fields both routes take.
#[derive(Deserialize)]
pub(super) struct SamplingFields {
    model: String,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_p: Option<f64>,
    #[serde(default)]
    top_k: Option<i64>,
    #[serde(default)]
    n: Option<i64>,
    #[serde(default)]
    stop: Option<StopField>,
    #[serde(default)]
    seed: Option<i64>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<Value>,
    #[serde(default)]
    presence_penalty: Option<f64>,
    #[serde(default)]
    frequency_penalty: Option<f64>,
    #[serde(default)]
    logit_bias: Option<serde_json::Map<String, Value>>,
    #[serde(default)]
    response_format: Option<Value>,
    #[serde(default)]
    best_of: Option<i64>,
}

impl SamplingFields {
    /// Refuses what loraloom does not do, naming the field, rather than ignore it.
    fn check_supported(&self) -> ApiResult<()> {
        self.include_usage()?;
        for (field, value) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if value.is_some_and(|v| v != 0.0) {
                return Err(ApiError::invalid(
                    field,
                    "is not supported (send 0 or omit it)",
                ));
            }
        }
        if self.logit_bias.as_ref().is_some_and(|b| !b.is_empty()) {
            return Err(ApiError::invalid("logit_bias", "is not supported"));
        }
        let plain_text = |f: &Value| f.get("type").and_then(Value::as_str) == Some("text");
        if self
            .response_format
            .as_ref()
            .is_some_and(|f| !f.is_null() && !plain_text(f))
        {
            return Err(ApiError::invalid(
                "response_format",
                "only {\"type\": \"text\"} is supported (no constrained decoding)",
            ));
        }
        if self.best_of.is_some_and(|b| Some(b) != self.n && b != 1) {
            return Err(ApiError::invalid("best_of", "is not supported (ask for n)"));
        }
        Ok(())
    }

    /// The engine's parameters for up to `max_tokens` tokens, stopping at `end_tokens`.
    fn params(&self, max_tokens: i64, end_tokens: &[i64]) -> ApiResult<SamplingParams> {
        let temperature = self.temperature.unwrap_or(1.0);
        if !temperature.is_finite() || temperature < 0.0 {
            return Err(ApiError::invalid("temperature", "must be a number >= 0"));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::invalid("top_p", "must be in (0, 1]"));
        }
        let top_k = self.top_k.unwrap_or(-1);
        if top_k < -1 {
            return Err(ApiError::invalid("top_k", "must be -1 (no limit) or >= 0"));
        }
        let strings = self.stop_strings();
        if strings.len() > MAX_STOP_SEQUENCES {
            return Err(ApiError::invalid(
                "stop",
                format!("at most {MAX_STOP_SEQUENCES} stop strings"),
            ));
        }
        if strings.iter().any(|s| s.is_empty()) {
            return Err(ApiError::invalid("stop", "stop strings must not be empty"));
        }
        Ok(SamplingParams {
            max_tokens,
            temperature,
            top_k,
            top_p,
            // Any integer, as OpenAI and the wire's own seeds take (a negative one wraps).
            seed: self.seed.map(|s| s as u64),
            stop: Stop::TokensOrStrings {
                tokens: end_tokens.to_vec(),
                strings: strings.iter().map(|s| s.to_string()).collect(),
            },
        })
    }

    /// How many completions (`n`) of each of `prompts` prompts.
    fn n(&self, prompts: usize) -> ApiResult<i64> {
        let n = self.n.unwrap_or(1);
        if !(1..=MAX_NUM_SAMPLES).contains(&n) {
            return Err(ApiError::invalid(
                "n",
                format!("must be from 1 to {MAX_NUM_SAMPLES}"),
            ));
        }
        if n as usize * prompts > MAX_NUM_SAMPLES as usize {
            return Err(ApiError::invalid(
                "prompt",
                format!("{prompts} prompts of n = {n}: at most {MAX_NUM_SAMPLES} completions per request"),
            ));
        }
        Ok(n)
    }

    /// Whether the answer streams (`stream`).
    fn streams(&self) -> bool {
        self.stream == Some(true)
    }

    /// Whether a stream ends with a chunk of the usage (`stream_options.include_usage`), checked.
    fn include_usage(&self) -> ApiResult<bool> {
        let Some(options) = self.stream_options.as_ref().filter(|o| !o.is_null()) else {
            return Ok(false);
        };
        if !self.streams() {
            return Err(ApiError::invalid(
                "stream_options",
                "is only allowed when stream is true",
            ));
        }
        match options.get("include_usage") {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(ApiError::invalid(
                "stream_options.include_usage",
                "must be a boolean",
            )),
        }
    }

    /// What a stream of `route` sends besides its tokens: `n` choices per prompt, `logprobs`
    /// alternatives per token when asked, the usage of `prompt_tokens` when asked.
    fn stream_plan(
        &self,
        route: StreamedRoute,
        n: i64,
        logprobs: Option<usize>,
        prompt_tokens: usize,
    ) -> ApiResult<StreamPlan> {
        Ok(StreamPlan {
            route,
            model: self.model.clone(),
            n: n as usize,
            logprobs,
            stops: self.stop_strings().iter().map(|s| s.to_string()).collect(),
            include_usage: self.include_usage()?,
            prompt_tokens,
        })
    }

    /// The stop strings, to cut the text at.
    fn stop_strings(&self) -> Vec<&str> {
        match &self.stop {
            None => Vec::new(),
            Some(StopField::One(s)) => vec![s.as_str()],
            Some(StopField::Many(s)) => s.iter().map(String::as_str).collect(),
        }
    }
}

#[derive(Deserialize)]
pub(super) struct CompletionRequest {
    prompt: PromptField,
    #[serde(default)]
    max_tokens: Option<i64>,
    #[serde(default)]
    logprobs: Option<i64>,
    #[serde(default)]
    echo: Option<bool>,
    #[serde(default)]
    suffix: Option<String>,
    #[serde(flatten)]
    sampling: SamplingFields,
}

#[derive(Deserialize)]
pub(super) struct ChatRequest {
    messages: Vec<Value>,
    #[serde(default)]
    max_tokens: Option<i64>,
    #[serde(default)]
    max_completion_tokens: Option<i64>,
    #[serde(default)]
    logprobs: Option<bool>,
    #[serde(default)]
    top_logprobs: Option<i64>,
    #[serde(default)]
    tools: Option<Value>,
    #[serde(default)]
    tool_choice: Option<Value>,
    #[serde(flatten)]
    sampling: SamplingFields,
}

/// Where `model` samples from: the base model, or a checkpoint (checked when its sampling
/// session is made; another tenant's is not found unless published).
fn model_source(state: &AppState, model: &str) -> ApiResult<SamplerSource> {
    let (base, path) = match model.split_once(';') {
        Some((base, path)) => (Some(base), Some(path)),
        None if model.starts_with("tinker://") => (None, Some(model)),
        None => (Some(model), None),
    };
    if let Some(base) = base {
        let served = &state.engine.base().name;
        if base != served {
            return Err(ApiError::Engine(EngineError::NotFound {
                what: "model".into(),
                id: format!("{base} (this server serves {served})"),
            }));
        }
    }
    match path {
        Some(path) => {
            parse_checkpoint_path(path).map_err(|e| match e {
                EngineError::InvalidInput { reason, .. } => ApiError::invalid("model", reason),
                other => other.into(),
            })?;
            Ok(SamplerSource::Checkpoint(path.to_string()))
        }
        None => Ok(SamplerSource::Base),
    }
}

/// A `logprobs` or `top_logprobs` width, checked.
fn top_width(field: &str, k: Option<i64>) -> ApiResult<usize> {
    match k {
        None => Ok(0),
        Some(k) if (0..=MAX_TOP_LOGPROBS).contains(&k) => Ok(k as usize),
        Some(_) => Err(ApiError::invalid(
            field,
            format!("must be from 0 to {MAX_TOP_LOGPROBS}"),
        )),
    }
}

/// Refuses an answer whose logprobs would hold more than [`MAX_LOGPROB_ENTRIES`] entries.
fn check_logprob_entries(rows: usize, top: usize, field: &str) -> ApiResult<()> {
    if rows.saturating_mul(top + 1) > MAX_LOGPROB_ENTRIES {
        return Err(ApiError::invalid(
            field,
            format!(
                "the answer would list {rows} tokens' logprobs with {top} alternatives each: at most {MAX_LOGPROB_ENTRIES} entries (ask for fewer completions, a shorter echo or fewer alternatives)"
            ),
        ));
    }
    Ok(())
}

/// The sampling jobs of one request: their queue (the tenant's shared session of `source`) and
/// one job's work per prompt.
fn prompt_jobs(
    state: &AppState,
    tenant: &str,
    source: SamplerSource,
    prompts: &[Vec<i64>],
    num_samples: i64,
    params: &SamplingParams,
    scoring: &Scoring,
) -> ApiResult<(QueueKey, Vec<Work>)> {
    let sampler_id = direct_sampler(state, tenant, source)?;
    let queue = QueueKey::Sampler(SamplerKey {
        tenant: tenant.to_string(),
        sampler_id,
    });
    let work = prompts
        .iter()
        .map(|prompt| Work::Sample {
            prompt: prompt.clone(),
            num_samples,
            params: params.clone(),
            scoring: scoring.clone(),
            record_stability: false,
            stream: false,
        })
        .collect();
    Ok((queue, work))
}

/// Runs the jobs of `work` on `queue` (of `tenant`), and waits for them all; a client that hangs
/// up meanwhile cancels them.
async fn sample_all(
    state: &AppState,
    tenant: &str,
    queue: QueueKey,
    work: Vec<Work>,
) -> ApiResult<Vec<SampleOutput>> {
    let mut jobs = CancelOnDrop::new(state, tenant);
    for work in work {
        jobs.ids.push(state.submit(queue.clone(), work)?);
    }
    let mut outs = Vec::with_capacity(jobs.ids.len());
    for id in jobs.ids.clone() {
        outs.push(wait_sample(state, tenant, &id).await?);
    }
    jobs.ids.clear();
    Ok(outs)
}

/// Submits the jobs of `work` on `queue` (of `tenant`) as streamed jobs: each job's id and the
/// receiver of its tokens. A refused submission cancels those made before it.
fn submit_streams(
    state: &AppState,
    tenant: &str,
    queue: QueueKey,
    work: Vec<Work>,
) -> ApiResult<Vec<StreamedJob>> {
    let mut submitted = CancelOnDrop::new(state, tenant);
    let mut jobs = Vec::with_capacity(work.len());
    for work in work {
        let (id, tokens) = state.engine.submit_streaming(queue.clone(), work)?;
        submitted.ids.push(id.clone());
        jobs.push(StreamedJob { id, tokens });
    }
    submitted.ids.clear();
    Ok(jobs)
}

/// The text of tokens, one token at a time (each decoded once per answer).
pub(super) struct TokenTexts<'a> {
    state: &'a AppState,
    cache: HashMap<i64, String>,
}

impl<'a> TokenTexts<'a> {
    pub(super) fn new(state: &'a AppState) -> Self {
        TokenTexts {
            state,
            cache: HashMap::new(),
        }
    }

    pub(super) fn get(&mut self, token: i64) -> ApiResult<String> {
        if let Some(text) = self.cache.get(&token) {
            return Ok(text.clone());
        }
        let text = decode(self.state, &[token], false)?;
        self.cache.insert(token, text.clone());
        Ok(text)
    }
}

/// A generated sequence as OpenAI answers it: its text without special tokens and cut before
/// the first stop string.
pub(super) struct Completion {
    pub(super) text: String,
    pub(super) finish_reason: &'static str,
}

pub(super) fn completion(
    state: &AppState,
    seq: &SampledSequence,
    stops: &[&str],
) -> ApiResult<Completion> {
    let mut text = decode(state, &seq.tokens, true)?;
    let mut finish_reason = match seq.stop_reason {
        StopReason::Stop => "stop",
        StopReason::Length => "length",
    };
    if let Some(cut) = stops.iter().filter_map(|s| text.find(s)).min() {
        text.truncate(cut);
        finish_reason = "stop";
    }
    Ok(Completion {
        text,
        finish_reason,
    })
}

/// The text of `tokens`, without special tokens when `skip_special`.
pub(super) fn decode(state: &AppState, tokens: &[i64], skip_special: bool) -> ApiResult<String> {
    state
        .tokenizer
        .decode_with(tokens, skip_special)
        .map_err(|e| ApiError::Engine(EngineError::Internal(e.to_string())))
}

pub(super) fn usage(prompt: usize, completions: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completions, "total_tokens": prompt + completions})
}

pub(super) fn unix_seconds() -> u64 {
    loraloom_engine::registry::unix_now() as u64
}

/// One token of a legacy `logprobs` answer: its id, logprob (`None` for a prompt's first) and
/// most likely alternatives.
pub(super) type Row<'a> = (i64, Option<f32>, Option<&'a TopK>);

/// OpenAI's legacy `logprobs` of `rows`: each token's text, logprob, alternatives (a dict that
/// also holds the token itself; `null` for a prompt's first) and character offset, counted
/// from `offset` (which moves past the rows' texts: a stream's next chunk goes on from there).
pub(super) fn legacy_logprobs(
    texts: &mut TokenTexts,
    rows: &[Row],
    offset: &mut usize,
) -> ApiResult<Value> {
    let mut tokens = Vec::with_capacity(rows.len());
    let mut token_logprobs = Vec::with_capacity(rows.len());
    let mut top_logprobs = Vec::with_capacity(rows.len());
    let mut text_offset = Vec::with_capacity(rows.len());
    for &(token, lp, top) in rows {
        let text = texts.get(token)?;
        text_offset.push(*offset);
        *offset += text.chars().count();
        top_logprobs.push(match lp {
            None => Value::Null,
            Some(lp) => {
                let mut alternatives = serde_json::Map::new();
                // Most likely first: a text two tokens share keeps the higher logprob.
                for &(id, alt) in top.into_iter().flatten() {
                    alternatives.entry(texts.get(id)?).or_insert(json!(alt));
                }
                alternatives.entry(text.clone()).or_insert(json!(lp));
                Value::Object(alternatives)
            }
        });
        tokens.push(text);
        token_logprobs.push(lp);
    }
    Ok(json!({
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": text_offset,
    }))
}

/// A prompt's rows for an echoed `logprobs` answer.
fn prompt_rows<'a>(prompt: &[i64], out: &'a SampleOutput) -> Vec<Row<'a>> {
    let lps = out.prompt.logprobs.as_deref().unwrap_or_default();
    let tops = out.prompt.top_k.as_deref().unwrap_or_default();
    prompt
        .iter()
        .enumerate()
        .map(|(i, &token)| {
            let lp = lps.get(i).copied().flatten();
            (token, lp, tops.get(i).and_then(Option::as_ref))
        })
        .collect()
}

/// A sequence's generated rows (the first `len` tokens).
pub(super) fn generated_rows(seq: &SampledSequence, len: usize) -> Vec<Row<'_>> {
    (0..len.min(seq.tokens.len()))
        .map(|i| {
            let top = seq.top_k.as_ref().and_then(|t| t.get(i));
            (seq.tokens[i], seq.logprobs.get(i).copied(), top)
        })
        .collect()
}

/// `POST /oai/api/v1/completions`.
pub(super) async fn completions(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    JsonBody(body): JsonBody<CompletionRequest>,
) -> OaiResult<Response> {
    let fields = &body.sampling;
    fields.check_supported()?;
    if body.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid("suffix", "is not supported").into());
    }
    let echo = body.echo.unwrap_or(false);
    let encode = |text: &str| {
        state
            .tokenizer
            .encode_with_special(text)
            .map_err(|e| ApiError::invalid("prompt", e.to_string()))
    };
    // Each prompt's ids, and its text as given (what `echo` answers).
    let prompts: Vec<(Vec<i64>, Option<&str>)> = match &body.prompt {
        PromptField::Text(text) => vec![(encode(text)?, Some(text.as_str()))],
        PromptField::Tokens(tokens) => vec![(tokens.clone(), None)],
        PromptField::Texts(texts) => texts
            .iter()
            .map(|t| Ok((encode(t)?, Some(t.as_str()))))
            .collect::<ApiResult<_>>()?,
        PromptField::TokenLists(lists) => lists.iter().map(|t| (t.clone(), None)).collect(),
    };
    if prompts.is_empty() || prompts.iter().any(|(ids, _)| ids.is_empty()) {
        return Err(ApiError::invalid("prompt", "must not be empty").into());
    }
    let max_tokens = body.max_tokens.unwrap_or(16);
    if max_tokens < 0 || (max_tokens == 0 && !echo) {
        return Err(ApiError::invalid(
            "max_tokens",
            "must be at least 1 (0 only with echo, to score the prompt)",
        )
        .into());
    }
    let top = top_width("logprobs", body.logprobs)?;
    let want_logprobs = body.logprobs.is_some();
    let n = fields.n(prompts.len())?;
    if want_logprobs {
        let echoed: usize = if echo {
            prompts.iter().map(|(ids, _)| ids.len()).sum()
        } else {
            0
        };
        let rows = (echoed + prompts.len() * max_tokens as usize) * n as usize;
        check_logprob_entries(rows, top, "logprobs")?;
    }
    // `max_tokens` 0 (a prompt scored, nothing generated) still runs one decode step.
    let params = fields.params(max_tokens.max(1), &state.end_tokens)?;
    let scoring = Scoring {
        prompt_logprobs: echo && want_logprobs,
        prompt_top_k: if echo { top } else { 0 },
        sample_top_k: top,
        ..Scoring::default()
    };
    let source = model_source(&state, &fields.model)?;
    let ids: Vec<Vec<i64>> = prompts.iter().map(|(ids, _)| ids.clone()).collect();
    let prompt_tokens = ids.iter().map(Vec::len).sum();
    let (queue, work) = prompt_jobs(&state, &tenant, source, &ids, n, &params, &scoring)?;
    if fields.streams() {
        if echo && want_logprobs {
            return Err(ApiError::invalid(
                "logprobs",
                "a stream does not score its prompt: send stream=false to echo the prompt with its logprobs",
            )
            .into());
        }
        let echoed = prompts
            .iter()
            .map(|(ids, given)| match (echo, given) {
                (false, _) => Ok(String::new()),
                (true, Some(text)) => Ok(text.to_string()),
                (true, None) => decode(&state, ids, false),
            })
            .collect::<ApiResult<Vec<String>>>()?;
        let jobs = submit_streams(&state, &tenant, queue, work)?;
        let route = StreamedRoute::Completions {
            echoed,
            keep_tokens: max_tokens > 0,
        };
        let plan = fields.stream_plan(route, n, want_logprobs.then_some(top), prompt_tokens)?;
        return Ok(stream_response(state.clone(), tenant, jobs, plan));
    }
    let outs = sample_all(&state, &tenant, queue, work).await?;
    let stops = fields.stop_strings();
    let mut texts = TokenTexts::new(&state);
    let mut generated = 0;
    let mut choices = Vec::new();
    for ((prompt, given), out) in prompts.iter().zip(&outs) {
        let prompt_text = match (echo, given) {
            (false, _) => String::new(),
            (true, Some(text)) => text.to_string(),
            (true, None) => decode(&state, prompt, false)?,
        };
        let echoed = if echo && want_logprobs {
            prompt_rows(prompt, out)
        } else {
            Vec::new()
        };
        for seq in &out.sequences {
            let mut c = completion(&state, seq, &stops)?;
            let kept = if max_tokens == 0 {
                c.text.clear();
                c.finish_reason = "length";
                0
            } else {
                seq.tokens.len()
            };
            generated += kept;
            let logprobs = if want_logprobs {
                let mut rows = echoed.clone();
                rows.extend(generated_rows(seq, kept));
                legacy_logprobs(&mut texts, &rows, &mut 0)?
            } else {
                Value::Null
            };
            choices.push(json!({
                "index": choices.len(),
                "text": format!("{prompt_text}{}", c.text),
                "logprobs": logprobs,
                "finish_reason": c.finish_reason,
            }));
        }
    }
    Ok(Json(json!({
        "id": format!("cmpl-{}", uuid::Uuid::new_v4().simple()),
        "object": "text_completion",
        "created": unix_seconds(),
        "model": fields.model,
        "system_fingerprint": null,
        "choices": choices,
        "usage": usage(prompt_tokens, generated),
    }))
    .into_response())
}

/// A message as the chat template reads it: its fields, `content` a string when given as text
/// parts (joined by newlines, as vLLM joins them).
fn message_for_template(index: usize, message: &Value) -> ApiResult<Value> {
    let field = |name: &str| format!("messages[{index}].{name}");
    let Value::Object(fields) = message else {
        return Err(ApiError::invalid(
            format!("messages[{index}]"),
            "must be an object with a role and a content",
        ));
    };
    if !fields.get("role").is_some_and(Value::is_string) {
        return Err(ApiError::invalid(field("role"), "must be a string"));
    }
    let mut fields = fields.clone();
    if let Some(Value::Array(parts)) = fields.get("content") {
        let mut texts = Vec::with_capacity(parts.len());
        for (j, part) in parts.iter().enumerate() {
            match (
                part.get("type").and_then(Value::as_str),
                part.get("text").and_then(Value::as_str),
            ) {
                (Some("text"), Some(t)) => texts.push(t),
                _ => {
                    return Err(ApiError::invalid(
                        field(&format!("content[{j}]")),
                        "only text parts ({\"type\": \"text\", \"text\": ...}) are supported",
                    ))
                }
            }
        }
        fields.insert("content".into(), Value::String(texts.join("\n")));
    }
    Ok(Value::Object(fields))
}

/// `POST /oai/api/v1/chat/completions`.
pub(super) async fn chat_completions(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    JsonBody(body): JsonBody<ChatRequest>,
) -> OaiResult<Response> {
    let fields = &body.sampling;
    fields.check_supported()?;
    for (field, value) in [("tools", &body.tools), ("tool_choice", &body.tool_choice)] {
        let none = value
            .as_ref()
            .is_none_or(|v| v.is_null() || v.as_array().is_some_and(Vec::is_empty) || v == "none");
        if !none {
            return Err(ApiError::invalid(field, "tool calling is not supported").into());
        }
    }
    let template = state.chat_template.clone().ok_or_else(|| {
        ApiError::invalid(
            "messages",
            "this model has no chat template (chat_template.jinja or tokenizer_config.json); use /completions",
        )
    })?;
    if body.messages.is_empty() {
        return Err(ApiError::invalid("messages", "must not be empty").into());
    }
    let messages = body
        .messages
        .iter()
        .enumerate()
        .map(|(i, m)| message_for_template(i, m))
        .collect::<ApiResult<Vec<Value>>>()?;
    // Rendering and encoding a long conversation is CPU work: off the async threads.
    let tokenizer = state.tokenizer.clone();
    let prompt = tokio::task::spawn_blocking(move || -> ApiResult<Vec<i64>> {
        let text = template
            .render(&Value::Array(messages), true)
            .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
        tokenizer
            .encode(&text)
            .map_err(|e| ApiError::invalid("messages", e.to_string()))
    })
    .await
    .map_err(|e| ApiError::Engine(EngineError::Internal(e.to_string())))??;
    let context = state.engine.base().max_context_length;
    let room = context - prompt.len() as i64;
    if room < 1 {
        return Err(ApiError::invalid(
            "messages",
            format!(
                "the conversation is {} tokens: it leaves no room in the model's context of {context}",
                prompt.len(),
            ),
        )
        .into());
    }
    let (limit_field, limit) = match (body.max_completion_tokens, body.max_tokens) {
        (Some(m), _) => ("max_completion_tokens", Some(m)),
        (None, m) => ("max_tokens", m),
    };
    let max_tokens = match limit {
        Some(m) if m < 1 => return Err(ApiError::invalid(limit_field, "must be at least 1").into()),
        Some(m) => m,
        None => room.min(DEFAULT_CHAT_MAX_TOKENS),
    };
    let want_logprobs = body.logprobs.unwrap_or(false);
    if body.top_logprobs.is_some_and(|k| k > 0) && !want_logprobs {
        return Err(ApiError::invalid("top_logprobs", "needs logprobs set to true").into());
    }
    let top = top_width("top_logprobs", body.top_logprobs)?;
    let n = fields.n(1)?;
    if want_logprobs {
        check_logprob_entries(max_tokens as usize * n as usize, top, "top_logprobs")?;
    }
    let params = fields.params(max_tokens, &state.end_tokens)?;
    let scoring = Scoring {
        sample_top_k: top,
        ..Scoring::default()
    };
    let source = model_source(&state, &fields.model)?;
    let prompts = std::slice::from_ref(&prompt);
    let (queue, work) = prompt_jobs(&state, &tenant, source, prompts, n, &params, &scoring)?;
    if fields.streams() {
        let jobs = submit_streams(&state, &tenant, queue, work)?;
        let logprobs = want_logprobs.then_some(top);
        let plan = fields.stream_plan(StreamedRoute::Chat, n, logprobs, prompt.len())?;
        return Ok(stream_response(state.clone(), tenant, jobs, plan));
    }
    let outs = sample_all(&state, &tenant, queue, work).await?;
    let stops = fields.stop_strings();
    let mut texts = TokenTexts::new(&state);
    let mut generated = 0;
    let mut choices = Vec::new();
    for seq in outs.iter().flat_map(|out| &out.sequences) {
        let c = completion(&state, seq, &stops)?;
        generated += seq.tokens.len();
        let logprobs = if want_logprobs {
            let rows = generated_rows(seq, seq.tokens.len());
            json!({"content": chat_logprobs(&mut texts, &rows, top > 0)?})
        } else {
            Value::Null
        };
        choices.push(json!({
            "index": choices.len(),
            "message": {"role": "assistant", "content": c.text},
            "logprobs": logprobs,
            "finish_reason": c.finish_reason,
        }));
    }
    Ok(Json(json!({
        "id": format!("chatcmpl-{}", uuid::Uuid::new_v4().simple()),
        "object": "chat.completion",
        "created": unix_seconds(),
        "model": fields.model,
        "system_fingerprint": null,
        "choices": choices,
        "usage": usage(prompt.len(), generated),
    }))
    .into_response())
}

/// A chat completion's `logprobs.content` of generated `rows`: each token's text, bytes, logprob
/// and (when asked) most likely alternatives.
pub(super) fn chat_logprobs(
    texts: &mut TokenTexts,
    rows: &[Row],
    with_top: bool,
) -> ApiResult<Vec<Value>> {
    let mut entry = |token: i64, lp: f32| -> ApiResult<Value> {
        let text = texts.get(token)?;
        Ok(json!({"bytes": text.as_bytes(), "logprob": lp, "token": text}))
    };
    let mut content = Vec::with_capacity(rows.len());
    for &(token, lp, top) in rows {
        let mut e = entry(token, lp.unwrap_or(f32::NAN))?;
        let alternatives = match top {
            Some(top) if with_top => top
                .iter()
                .map(|&(id, lp)| entry(id, lp))
                .collect::<ApiResult<Vec<Value>>>()?,
            _ => Vec::new(),
        };
        e["top_logprobs"] = json!(alternatives);
        content.push(e);
    }
    Ok(content)
}

/// `GET /oai/api/v1/models`: the base model (a checkpoint path is a model too, not listed).
pub(super) async fn models(State(state): State<AppState>, _tenant: Tenant) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{"id": state.engine.base().name, "object": "model", "created": 0, "owned_by": "loraloom"}],
    }))
}
