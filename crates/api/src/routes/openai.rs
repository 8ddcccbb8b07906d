//! An OpenAI-compatible inference API, as Tinker serves one: any OpenAI client (the `openai`
//! SDK, evaluation harnesses) samples the base model or one of the tenant's sampler checkpoints
//! with `base_url` `http://HOST:PORT/oai/api/v1` and an API key (`Authorization: Bearer`).
//! `model` is the base model's name, a checkpoint path (`tinker://…/sampler_weights/…`), or
//! `<base model>;<checkpoint path>`. A request runs as an ordinary sampling job of the caller's
//! tenant (one shared sampling session per model, as `/api/v1/sample`'s), batched with every
//! other tenant's decoding, and its answer waits for the whole completion (no streaming).
//!
//! - `POST /completions`: `prompt` (a string or token ids, one prompt per request),
//!   `max_tokens` (16; 0 only with `echo`), `temperature` (1), `top_p`, `top_k`, `n`, `stop`,
//!   `seed`, `logprobs` (alternatives per token, at most [`MAX_TOP_LOGPROBS`]) and `echo`
//!   (the prompt's text, and with `logprobs` its tokens' logprobs: what evaluation harnesses
//!   score continuations with).
//! - `POST /chat/completions`: `messages` rendered with the model's chat template, as
//!   transformers' `apply_chat_template(..., add_generation_prompt=True)` renders them;
//!   `max_completion_tokens` or `max_tokens` (default: what the context leaves, at most
//!   [`DEFAULT_CHAT_MAX_TOKENS`]), `logprobs`,
//!   `top_logprobs`, and the sampling fields above.
//! - `GET /models`: the base model.
//!
//! Generation stops at the model's end-of-sequence tokens or a `stop` string (excluded from the
//! text, as OpenAI does), or at the token limit (`finish_reason` `length`).

use loraloom_model::sample::MAX_NUM_SAMPLES;
use loraloom_model::{
    SampleOutput, SampledSequence, SamplingParams, Scoring, Stop, StopReason, TopK,
};

use super::*;

/// Most alternatives a token's logprobs may list (OpenAI's `top_logprobs` limit).
pub const MAX_TOP_LOGPROBS: i64 = 20;

/// A chat completion's token limit when the request gives none: what the context leaves, up
/// to this. A decode batch reserves keys and values for each sequence's whole limit
/// (`--max-kv-tokens`), so a default of the whole context would have every such request
/// decode alone.
pub const DEFAULT_CHAT_MAX_TOKENS: i64 = 2048;

/// One prompt: text, or token ids (a list of one of either is taken too).
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
    presence_penalty: Option<f64>,
    #[serde(default)]
    frequency_penalty: Option<f64>,
    #[serde(default)]
    logit_bias: Option<serde_json::Map<String, Value>>,
}

impl SamplingFields {
    /// The engine's parameters for up to `max_tokens` tokens; refuses what loraloom does not
    /// do (streaming, penalties, logit biases), naming the field.
    fn params(&self, max_tokens: i64) -> ApiResult<SamplingParams> {
        if self.stream == Some(true) {
            return Err(ApiError::invalid(
                "stream",
                "streaming is not supported: send stream=false (the answer comes whole)",
            ));
        }
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
        let seed = match self.seed {
            Some(s) if s < 0 => return Err(ApiError::invalid("seed", "must not be negative")),
            s => s.map(|s| s as u64),
        };
        let stop = match &self.stop {
            None => Stop::Eos,
            Some(StopField::One(s)) => Stop::EosOrStrings(vec![s.clone()]),
            Some(StopField::Many(s)) if s.is_empty() => Stop::Eos,
            Some(StopField::Many(s)) => Stop::EosOrStrings(s.clone()),
        };
        if let Stop::EosOrStrings(strings) = &stop {
            if strings.iter().any(String::is_empty) {
                return Err(ApiError::invalid("stop", "stop strings must not be empty"));
            }
        }
        Ok(SamplingParams {
            max_tokens,
            temperature,
            top_k,
            top_p,
            seed,
            stop,
        })
    }

    /// How many completions (`n`).
    fn n(&self) -> ApiResult<i64> {
        let n = self.n.unwrap_or(1);
        if !(1..=MAX_NUM_SAMPLES).contains(&n) {
            return Err(ApiError::invalid(
                "n",
                format!("must be from 1 to {MAX_NUM_SAMPLES}"),
            ));
        }
        Ok(n)
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
    echo: bool,
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
    logprobs: bool,
    #[serde(default)]
    top_logprobs: Option<i64>,
    #[serde(flatten)]
    sampling: SamplingFields,
}

/// Where `model` samples from: the base model, or a checkpoint (checked when its sampling
/// session is made; another tenant's is not found).
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

/// Runs one sampling job of `tenant` on `source` and waits for it.
async fn sample(
    state: &AppState,
    tenant: &str,
    source: SamplerSource,
    prompt: Vec<i64>,
    num_samples: i64,
    params: SamplingParams,
    scoring: Scoring,
) -> ApiResult<SampleOutput> {
    let sampler_id = direct_sampler(state, tenant, source)?;
    let work = Work::Sample {
        prompt,
        num_samples,
        params,
        scoring,
        record_stability: false,
    };
    let queue = QueueKey::Sampler(SamplerKey {
        tenant: tenant.to_string(),
        sampler_id,
    });
    let id = state.submit(queue, work)?;
    wait_sample(state, tenant, &id).await
}

/// A generated sequence as OpenAI answers it: its tokens without the end-of-sequence token
/// that stopped it, and its text cut before the first stop string.
struct Completion<'a> {
    seq: &'a SampledSequence,
    /// How many of `seq.tokens` are answered.
    kept: usize,
    text: String,
    finish_reason: &'static str,
}

fn completion<'a>(
    state: &AppState,
    seq: &'a SampledSequence,
    stops: &[&str],
) -> ApiResult<Completion<'a>> {
    let eos = &state.engine.base().config.eos_token_ids;
    let ended_by_eos =
        seq.stop_reason == StopReason::Stop && seq.tokens.last().is_some_and(|t| eos.contains(t));
    let kept = seq.tokens.len() - usize::from(ended_by_eos);
    let mut text = decode(state, &seq.tokens[..kept])?;
    let mut finish_reason = match seq.stop_reason {
        StopReason::Stop => "stop",
        StopReason::Length => "length",
    };
    if let Some(cut) = stops.iter().filter_map(|s| text.find(s)).min() {
        text.truncate(cut);
        finish_reason = "stop";
    }
    Ok(Completion {
        seq,
        kept,
        text,
        finish_reason,
    })
}

fn decode(state: &AppState, tokens: &[i64]) -> ApiResult<String> {
    state
        .tokenizer
        .decode(tokens)
        .map_err(|e| ApiError::Engine(EngineError::Internal(e.to_string())))
}

fn usage(prompt: usize, completions: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completions, "total_tokens": prompt + completions})
}

fn unix_seconds() -> u64 {
    loraloom_engine::registry::unix_now() as u64
}

/// `POST /oai/api/v1/completions`.
pub(super) async fn completions(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    JsonBody(body): JsonBody<CompletionRequest>,
) -> ApiResult<Json<Value>> {
    let one = |what: &str| {
        ApiError::invalid(
            "prompt",
            format!("one prompt per request ({what}); send several requests, they are batched"),
        )
    };
    let encode = |text: &str| {
        state
            .tokenizer
            .encode(text)
            .map_err(|e| ApiError::invalid("prompt", e.to_string()))
    };
    let prompt = match &body.prompt {
        PromptField::Text(text) => encode(text)?,
        PromptField::Tokens(tokens) => tokens.clone(),
        PromptField::Texts(texts) if texts.len() == 1 => encode(&texts[0])?,
        PromptField::TokenLists(lists) if lists.len() == 1 => lists[0].clone(),
        PromptField::Texts(_) => return Err(one("a list of texts")),
        PromptField::TokenLists(_) => return Err(one("a list of token lists")),
    };
    if prompt.is_empty() {
        return Err(ApiError::invalid("prompt", "must not be empty"));
    }
    let max_tokens = body.max_tokens.unwrap_or(16);
    if max_tokens < 0 || (max_tokens == 0 && !body.echo) {
        return Err(ApiError::invalid(
            "max_tokens",
            "must be at least 1 (0 only with echo, to score the prompt)",
        ));
    }
    let top = top_width("logprobs", body.logprobs)?;
    let want_logprobs = body.logprobs.is_some();
    let fields = &body.sampling;
    let n = fields.n()?;
    // `max_tokens` 0 (a prompt scored, nothing generated) still runs one decode step.
    let params = fields.params(max_tokens.max(1))?;
    let scoring = Scoring {
        prompt_logprobs: body.echo && want_logprobs,
        prompt_top_k: if body.echo { top } else { 0 },
        sample_top_k: top,
        ..Scoring::default()
    };
    let source = model_source(&state, &fields.model)?;
    let out = sample(&state, &tenant, source, prompt.clone(), n, params, scoring).await?;
    let stops = fields.stop_strings();
    let prompt_text = if body.echo {
        decode(&state, &prompt)?
    } else {
        String::new()
    };
    let mut generated = 0;
    let mut choices = Vec::new();
    for (index, seq) in out.sequences.iter().enumerate() {
        let mut c = completion(&state, seq, &stops)?;
        if max_tokens == 0 {
            c.kept = 0;
            c.text.clear();
            c.finish_reason = "length";
        }
        generated += c.kept;
        let logprobs = if want_logprobs {
            completion_logprobs(&state, &out, &prompt, body.echo, &c)?
        } else {
            Value::Null
        };
        choices.push(json!({
            "index": index,
            "text": format!("{prompt_text}{}", c.text),
            "logprobs": logprobs,
            "finish_reason": c.finish_reason,
        }));
    }
    Ok(Json(json!({
        "id": format!("cmpl-{}", uuid::Uuid::new_v4().simple()),
        "object": "text_completion",
        "created": unix_seconds(),
        "model": fields.model,
        "choices": choices,
        "usage": usage(prompt.len(), generated),
    })))
}

/// A completion's `logprobs` (OpenAI's legacy shape): each token's text, logprob, most likely
/// alternatives and character offset, the prompt's first (its first token has no logprob)
/// when echoed.
fn completion_logprobs(
    state: &AppState,
    out: &SampleOutput,
    prompt: &[i64],
    echo: bool,
    c: &Completion,
) -> ApiResult<Value> {
    // (token, its logprob, its most likely alternatives)
    let mut rows: Vec<(i64, Option<f32>, Option<&TopK>)> = Vec::new();
    if echo {
        let lps = out.prompt.logprobs.as_deref().unwrap_or_default();
        let tops = out.prompt.top_k.as_deref().unwrap_or_default();
        for (i, &token) in prompt.iter().enumerate() {
            let lp = lps.get(i).copied().flatten();
            let top = tops.get(i).and_then(Option::as_ref);
            rows.push((token, lp, top));
        }
    }
    for i in 0..c.kept {
        let top = c.seq.top_k.as_ref().and_then(|t| t.get(i));
        rows.push((c.seq.tokens[i], Some(c.seq.logprobs[i]), top));
    }
    let mut tokens = Vec::new();
    let mut token_logprobs = Vec::new();
    let mut top_logprobs = Vec::new();
    let mut text_offset = Vec::new();
    let mut offset = 0;
    for (token, lp, top) in rows {
        let text = decode(state, &[token])?;
        text_offset.push(offset);
        offset += text.len();
        tokens.push(text);
        token_logprobs.push(lp);
        top_logprobs.push(match top {
            Some(top) => {
                let mut alternatives = serde_json::Map::new();
                for &(id, lp) in top {
                    alternatives.insert(decode(state, &[id])?, json!(lp));
                }
                Value::Object(alternatives)
            }
            None => Value::Null,
        });
    }
    Ok(json!({
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": text_offset,
    }))
}

/// A message's `content` as the chat template reads it: a string (a list of text parts is
/// joined).
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
        let mut text = String::new();
        for (j, part) in parts.iter().enumerate() {
            match (
                part.get("type").and_then(Value::as_str),
                part.get("text").and_then(Value::as_str),
            ) {
                (Some("text"), Some(t)) => text.push_str(t),
                _ => {
                    return Err(ApiError::invalid(
                        field(&format!("content[{j}]")),
                        "only text parts ({\"type\": \"text\", \"text\": ...}) are supported",
                    ))
                }
            }
        }
        fields.insert("content".into(), Value::String(text));
    }
    Ok(Value::Object(fields))
}

/// `POST /oai/api/v1/chat/completions`.
pub(super) async fn chat_completions(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    JsonBody(body): JsonBody<ChatRequest>,
) -> ApiResult<Json<Value>> {
    let template = state.chat_template.as_ref().ok_or_else(|| {
        ApiError::invalid(
            "messages",
            "this model has no chat template (chat_template.jinja or tokenizer_config.json); use /completions",
        )
    })?;
    if body.messages.is_empty() {
        return Err(ApiError::invalid("messages", "must not be empty"));
    }
    let messages = body
        .messages
        .iter()
        .enumerate()
        .map(|(i, m)| message_for_template(i, m))
        .collect::<ApiResult<Vec<Value>>>()?;
    let text = template
        .render(&Value::Array(messages), true)
        .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
    let prompt = state
        .tokenizer
        .encode(&text)
        .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
    let room = state.engine.base().max_context_length - prompt.len() as i64;
    if room < 1 {
        return Err(ApiError::invalid(
            "messages",
            format!(
                "the conversation is {} tokens: it leaves no room in the model's context of {}",
                prompt.len(),
                state.engine.base().max_context_length
            ),
        ));
    }
    let (limit_field, limit) = match (body.max_completion_tokens, body.max_tokens) {
        (Some(m), _) => ("max_completion_tokens", Some(m)),
        (None, m) => ("max_tokens", m),
    };
    let max_tokens = match limit {
        Some(m) if m < 1 => return Err(ApiError::invalid(limit_field, "must be at least 1")),
        Some(m) => m,
        None => room.min(DEFAULT_CHAT_MAX_TOKENS),
    };
    if body.top_logprobs.is_some() && !body.logprobs {
        return Err(ApiError::invalid(
            "top_logprobs",
            "needs logprobs set to true",
        ));
    }
    let top = top_width("top_logprobs", body.top_logprobs)?;
    let fields = &body.sampling;
    let n = fields.n()?;
    let params = fields.params(max_tokens)?;
    let scoring = Scoring {
        sample_top_k: top,
        ..Scoring::default()
    };
    let source = model_source(&state, &fields.model)?;
    let out = sample(&state, &tenant, source, prompt.clone(), n, params, scoring).await?;
    let stops = fields.stop_strings();
    let mut generated = 0;
    let mut choices = Vec::new();
    for (index, seq) in out.sequences.iter().enumerate() {
        let c = completion(&state, seq, &stops)?;
        generated += c.kept;
        let logprobs = if body.logprobs {
            json!({"content": chat_logprobs(&state, &c, top > 0)?})
        } else {
            Value::Null
        };
        choices.push(json!({
            "index": index,
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
        "choices": choices,
        "usage": usage(prompt.len(), generated),
    })))
}

/// A chat completion's `logprobs.content`: each generated token's text, bytes, logprob and
/// (when asked) most likely alternatives.
fn chat_logprobs(state: &AppState, c: &Completion, with_top: bool) -> ApiResult<Vec<Value>> {
    let entry = |token: i64, lp: f32| -> ApiResult<Value> {
        let text = decode(state, &[token])?;
        Ok(json!({"token": text, "logprob": lp, "bytes": text.as_bytes()}))
    };
    (0..c.kept)
        .map(|i| {
            let mut e = entry(c.seq.tokens[i], c.seq.logprobs[i])?;
            let top = match c.seq.top_k.as_ref().and_then(|t| t.get(i)) {
                Some(top) if with_top => top
                    .iter()
                    .map(|&(id, lp)| entry(id, lp))
                    .collect::<ApiResult<Vec<Value>>>()?,
                _ => Vec::new(),
            };
            e["top_logprobs"] = json!(top);
            Ok(e)
        })
        .collect()
}

/// `GET /oai/api/v1/models`: the base model (a checkpoint path is a model too, not listed).
pub(super) async fn models(State(state): State<AppState>, _tenant: Tenant) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{"id": state.engine.base().name, "object": "model", "created": 0, "owned_by": "loraloom"}],
    }))
}
