//! Streamed OpenAI completions (`"stream": true`), as OpenAI and vLLM send them: server-sent
//! events, each a JSON chunk (`text_completion` or `chat.completion.chunk`) of one choice, then
//! `data: [DONE]`.
//!
//! - A chat stream opens each choice with its role (`delta: {"role": "assistant"}`); an echoing
//!   completion opens it with the prompt's text.
//! - Each decode step that adds text to a choice sends it, with the logprobs of the tokens the
//!   step chose when they are asked for (a step may send logprobs and no text: a character still
//!   incomplete, or text held back).
//! - Text that might begin a stop string is held back until it cannot (at most the longest stop
//!   string's length less one character), so nothing past a stop string is ever sent.
//! - When a choice's job ends, the rest of its text goes out, then its `finish_reason`. The
//!   streamed text of a choice is exactly the text the same request without `stream` answers.
//! - `stream_options.include_usage` adds `"usage": null` to every chunk and a last chunk with
//!   no choices and the usage.
//!
//! A job that fails midway sends an error in OpenAI's shape (`data: {"error": {...}}`) and ends
//! the stream. A client that hangs up cancels the jobs left.

use std::collections::BTreeMap;
use std::convert::Infallible;

use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::stream::{self, StreamExt};
use loraloom_model::StreamedToken;
use tokio::sync::mpsc;

use super::openai::{
    chat_logprobs, completion, decode, generated_rows, legacy_logprobs, unix_seconds, usage, Row,
    TokenTexts,
};
use super::*;
use crate::error::OpenAiError;

/// Events a stream keeps ready for a slow reader before its decode-step tokens wait.
const EVENTS_BUFFERED: usize = 64;

/// Most tokens a choice's incremental decoding looks at for one new token: a character is at
/// most 4 bytes, so a window this wide that still makes no text never will.
const MAX_DECODE_WINDOW: usize = 16;

/// A streamed sampling job: its id and the receiver of the tokens each decode step chose.
pub(super) struct StreamedJob {
    pub(super) id: String,
    pub(super) tokens: tokio::sync::mpsc::UnboundedReceiver<Vec<StreamedToken>>,
}

/// Which route a stream answers.
pub(super) enum StreamedRoute {
    /// `/completions`: per prompt, the text each of its choices opens with (its echo, or
    /// nothing); `keep_tokens` false when `max_tokens` is 0 (the prompt echoed, nothing
    /// generated).
    Completions {
        echoed: Vec<String>,
        keep_tokens: bool,
    },
    /// `/chat/completions`.
    Chat,
}

/// What a stream sends, besides the tokens.
pub(super) struct StreamPlan {
    pub(super) route: StreamedRoute,
    /// The request's `model`, echoed in every chunk.
    pub(super) model: String,
    /// Choices per prompt (`n`).
    pub(super) n: usize,
    /// Alternatives per token when logprobs are asked for.
    pub(super) logprobs: Option<usize>,
    /// Stop strings: text ends before the first.
    pub(super) stops: Vec<String>,
    /// `stream_options.include_usage`.
    pub(super) include_usage: bool,
    /// Prompt tokens, for the usage.
    pub(super) prompt_tokens: usize,
}

/// The answer to a streamed request whose jobs are submitted: the events, written by a task
/// that reads the jobs' tokens.
pub(super) fn stream_response(
    state: AppState,
    tenant: String,
    jobs: Vec<StreamedJob>,
    plan: StreamPlan,
) -> Response {
    let (sender, events) = mpsc::channel::<Event>(EVENTS_BUFFERED);
    tokio::spawn(async move {
        let mut pending = CancelOnDrop::new(&state, &tenant);
        pending.ids = jobs.iter().map(|j| j.id.clone()).collect();
        let mut out = Chunks::new(&plan, sender);
        match write_stream(&state, &tenant, jobs, &plan, &mut out).await {
            Ok(()) => pending.ids.clear(),
            Err(Ended::Gone) => {}
            Err(Ended::Failed(e)) => {
                // The jobs left are cancelled as `pending` drops.
                let _ = out.send(&OpenAiError(e).body()).await;
                let _ = out.done().await;
            }
        }
    });
    let mut events = events;
    let events =
        stream::poll_fn(move |cx| events.poll_recv(cx).map(|e| e.map(Ok::<_, Infallible>)));
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// Why a stream ended early.
enum Ended {
    /// The client hung up.
    Gone,
    /// A job failed (or its text could not be decoded).
    Failed(ApiError),
}

impl From<ApiError> for Ended {
    fn from(e: ApiError) -> Self {
        Ended::Failed(e)
    }
}

/// Reads every job's tokens and writes the choices' chunks, until every job has ended.
async fn write_stream(
    state: &AppState,
    tenant: &str,
    jobs: Vec<StreamedJob>,
    plan: &StreamPlan,
    out: &mut Chunks<'_>,
) -> Result<(), Ended> {
    let mut choices: Vec<ChoiceText> = (0..jobs.len() * plan.n)
        .map(|_| ChoiceText::default())
        .collect();
    let mut texts = TokenTexts::new(state);
    let hold = plan
        .stops
        .iter()
        .map(|s| s.chars().count().saturating_sub(1))
        .max()
        .unwrap_or(0);
    for index in 0..choices.len() {
        match &plan.route {
            StreamedRoute::Chat => out.opening(index).await?,
            StreamedRoute::Completions { echoed, .. } if !echoed[index / plan.n].is_empty() => {
                out.text(index, &echoed[index / plan.n], Value::Null, None)
                    .await?
            }
            StreamedRoute::Completions { .. } => {}
        }
    }
    let keep_tokens = !matches!(
        plan.route,
        StreamedRoute::Completions {
            keep_tokens: false,
            ..
        }
    );
    let ids: Vec<String> = jobs.iter().map(|j| j.id.clone()).collect();
    // Each job's tokens, then `None` once it ended.
    let mut steps = stream::select_all(jobs.into_iter().enumerate().map(|(p, mut job)| {
        stream::poll_fn(move |cx| job.tokens.poll_recv(cx))
            .map(move |step| (p, Some(step)))
            .chain(stream::once(std::future::ready((p, None))))
    }));
    let mut generated = 0;
    loop {
        let next = tokio::select! {
            _ = out.sender.closed() => return Err(Ended::Gone),
            next = steps.next() => next,
        };
        match next {
            None => break,
            Some((_, Some(_))) if !keep_tokens => {}
            Some((p, Some(step))) => {
                let mut chosen: BTreeMap<usize, Vec<StreamedToken>> = BTreeMap::new();
                for token in step {
                    chosen
                        .entry(p * plan.n + token.sample)
                        .or_default()
                        .push(token);
                }
                for (index, tokens) in chosen {
                    let choice = &mut choices[index];
                    for t in &tokens {
                        choice.push(t.token, |ids| decode(state, ids, true))?;
                    }
                    let text = choice.take_ready(&plan.stops, hold);
                    let rows: Vec<Row> = tokens
                        .iter()
                        .map(|t| (t.token, Some(t.logprob), t.top_k.as_ref()))
                        .collect();
                    let logprobs = out.logprobs(&mut texts, choice, &rows)?;
                    if !text.is_empty() || !logprobs.is_null() {
                        out.text(index, &text, logprobs, None).await?;
                    }
                }
            }
            Some((p, None)) => {
                let result = wait_sample(state, tenant, &ids[p]).await?;
                let stops: Vec<&str> = plan.stops.iter().map(String::as_str).collect();
                for (s, seq) in result.sequences.iter().enumerate() {
                    let index = p * plan.n + s;
                    let mut whole = completion(state, seq, &stops)?;
                    let kept = if keep_tokens { seq.tokens.len() } else { 0 };
                    if !keep_tokens {
                        whole.text.clear();
                        whole.finish_reason = "length";
                    }
                    generated += kept;
                    let choice = &mut choices[index];
                    let rest = choice.take_rest(&whole.text);
                    // Tokens the steps did not report (none, unless the job ran outside the
                    // decode loop).
                    let rows = generated_rows(seq, kept);
                    let unreported = &rows[choice.reported.min(rows.len())..];
                    let logprobs = out.logprobs(&mut texts, choice, unreported)?;
                    if !rest.is_empty() || !logprobs.is_null() {
                        out.text(index, &rest, logprobs, None).await?;
                    }
                    out.finish(index, whole.finish_reason).await?;
                }
            }
        }
    }
    if plan.include_usage {
        out.usage(usage(plan.prompt_tokens, generated)).await?;
    }
    out.done().await
}

/// One choice's text as its tokens come. Tokens are decoded the way text-generation servers
/// stream (TGI's and vLLM's incremental detokenization): each new token's text is the decoding
/// of a short window of the last tokens less the decoding of that window without it, so a
/// character split across tokens goes out whole and a tokenizer that drops a leading space at
/// the start of a text still spaces words.
#[derive(Default)]
struct ChoiceText {
    tokens: Vec<i64>,
    /// Where the window decoded for the next token starts.
    window: usize,
    /// Where the tokens not yet in `text` start.
    read: usize,
    /// The text decoded so far.
    text: String,
    /// Bytes of `text` sent.
    sent: usize,
    /// A stop string was found: nothing more is sent before the end.
    stopped: bool,
    /// Tokens whose logprobs were sent.
    reported: usize,
    /// Characters of their texts (the next legacy `text_offset`).
    offset: usize,
}

impl ChoiceText {
    /// Adds a generated token, extending the text when the token completes some; `decode`
    /// gives the text of tokens (special tokens left out).
    fn push(&mut self, token: i64, decode: impl Fn(&[i64]) -> ApiResult<String>) -> ApiResult<()> {
        self.tokens.push(token);
        let before = decode(&self.tokens[self.window..self.read])?;
        let now = decode(&self.tokens[self.window..])?;
        // Tokens that add no text (special tokens, bytes of no character) would otherwise widen
        // the window, and the work of each token with it, for as long as they come.
        let stuck = self.tokens.len() - self.window > MAX_DECODE_WINDOW;
        // A character whose bytes are not all there yet waits for the tokens that finish it.
        if now.ends_with(char::REPLACEMENT_CHARACTER) && !stuck {
            return Ok(());
        }
        let new = now.strip_prefix(before.as_str());
        if let Some(new) = new.filter(|n| !n.is_empty() || stuck) {
            self.text.push_str(new);
            self.window = self.read;
            self.read = self.tokens.len();
        } else if stuck {
            // The window's text is not its older part's and more (not seen with the tokenizers
            // tested): start afresh from the newest token, leaving the text to the final check.
            self.window = self.tokens.len() - 1;
            self.read = self.window;
        }
        Ok(())
    }

    /// The text that may go out now: up to the first stop string, less the last `hold`
    /// characters while none is found (they might begin one).
    fn take_ready(&mut self, stops: &[String], hold: usize) -> String {
        if self.stopped {
            return String::new();
        }
        // A stop string starts at or after `sent`: what was sent ended `hold` characters before
        // the text of its time, and a stop string within that text would have been found then.
        let unsent = &self.text[self.sent..];
        let cut = stops.iter().filter_map(|s| unsent.find(s.as_str())).min();
        let end = match cut {
            Some(at) => {
                self.stopped = true;
                self.sent + at
            }
            None if hold == 0 => self.text.len(),
            None => self
                .text
                .char_indices()
                .rev()
                .nth(hold - 1)
                .map_or(0, |(i, _)| i)
                .max(self.sent),
        };
        let ready = self.text[self.sent..end].to_string();
        self.sent = end;
        ready
    }

    /// The rest of the choice's text once its sequence ended, `whole` being all of it (as the
    /// same request without a stream answers it).
    fn take_rest(&mut self, whole: &str) -> String {
        let sent = &self.text[..self.sent];
        match whole.strip_prefix(sent) {
            Some(rest) => {
                self.sent = self.text.len();
                rest.to_string()
            }
            None => {
                // Not seen with the tokenizers tested; the client has what was sent.
                tracing::warn!(
                    sent = sent.len(),
                    "a streamed choice's text is not a prefix of its whole text"
                );
                String::new()
            }
        }
    }
}

/// Writes a stream's chunks.
struct Chunks<'a> {
    plan: &'a StreamPlan,
    sender: mpsc::Sender<Event>,
    id: String,
    created: u64,
}

impl<'a> Chunks<'a> {
    fn new(plan: &'a StreamPlan, sender: mpsc::Sender<Event>) -> Self {
        let prefix = match plan.route {
            StreamedRoute::Chat => "chatcmpl",
            StreamedRoute::Completions { .. } => "cmpl",
        };
        Chunks {
            plan,
            sender,
            id: format!("{prefix}-{}", uuid::Uuid::new_v4().simple()),
            created: unix_seconds(),
        }
    }

    /// Sends one event's JSON.
    async fn send(&self, data: &Value) -> Result<(), Ended> {
        self.sender
            .send(Event::default().data(data.to_string()))
            .await
            .map_err(|_| Ended::Gone)
    }

    /// Sends a chunk of `choices` with `usage` (when the stream includes it).
    async fn chunk(&self, choices: Value, usage: Value) -> Result<(), Ended> {
        let object = match self.plan.route {
            StreamedRoute::Chat => "chat.completion.chunk",
            StreamedRoute::Completions { .. } => "text_completion",
        };
        let mut chunk = json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.plan.model,
            "system_fingerprint": null,
            "choices": choices,
        });
        if self.plan.include_usage {
            chunk["usage"] = usage;
        }
        self.send(&chunk).await
    }

    /// A chat choice's first chunk: its role.
    async fn opening(&self, index: usize) -> Result<(), Ended> {
        self.chunk(
            json!([{
                "index": index,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": null,
                "finish_reason": null,
            }]),
            Value::Null,
        )
        .await
    }

    /// A chunk of choice `index`: `text`, the logprobs of its tokens, and `finish_reason`.
    async fn text(
        &self,
        index: usize,
        text: &str,
        logprobs: Value,
        finish_reason: Option<&str>,
    ) -> Result<(), Ended> {
        let choice = match self.plan.route {
            StreamedRoute::Chat => json!({
                "index": index,
                "delta": {"content": text},
                "logprobs": logprobs,
                "finish_reason": finish_reason,
            }),
            StreamedRoute::Completions { .. } => json!({
                "index": index,
                "text": text,
                "logprobs": logprobs,
                "finish_reason": finish_reason,
            }),
        };
        self.chunk(json!([choice]), Value::Null).await
    }

    /// Choice `index`'s last chunk: why it ended.
    async fn finish(&self, index: usize, finish_reason: &str) -> Result<(), Ended> {
        match self.plan.route {
            StreamedRoute::Chat => {
                self.chunk(
                    json!([{
                        "index": index,
                        "delta": {},
                        "logprobs": null,
                        "finish_reason": finish_reason,
                    }]),
                    Value::Null,
                )
                .await
            }
            StreamedRoute::Completions { .. } => {
                self.text(index, "", Value::Null, Some(finish_reason)).await
            }
        }
    }

    /// The logprobs of a choice's `rows` in the route's shape, `null` when not asked for (or
    /// there are none); counts them as reported.
    fn logprobs(
        &self,
        texts: &mut TokenTexts,
        choice: &mut ChoiceText,
        rows: &[Row],
    ) -> ApiResult<Value> {
        let Some(top) = self.plan.logprobs else {
            return Ok(Value::Null);
        };
        if rows.is_empty() {
            return Ok(Value::Null);
        }
        choice.reported += rows.len();
        match self.plan.route {
            StreamedRoute::Chat => Ok(json!({"content": chat_logprobs(texts, rows, top > 0)?})),
            StreamedRoute::Completions { .. } => legacy_logprobs(texts, rows, &mut choice.offset),
        }
    }

    /// The last chunk when `include_usage`: no choices, the usage.
    async fn usage(&self, usage: Value) -> Result<(), Ended> {
        self.chunk(json!([]), usage).await
    }

    /// The stream's end: `data: [DONE]`.
    async fn done(&self) -> Result<(), Ended> {
        self.sender
            .send(Event::default().data("[DONE]"))
            .await
            .map_err(|_| Ended::Gone)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A choice whose decoded text grew to `text` (as `push` makes it grow).
    fn grown(choice: &mut ChoiceText, text: &str) {
        choice.text.push_str(text);
    }

    /// A byte-level tokenizer: token `b` (0 to 255) is the byte `b`, token 1000 a special token
    /// (no text); invalid bytes read as U+FFFD, as tokenizers decode them.
    fn bytes(ids: &[i64]) -> ApiResult<String> {
        let raw: Vec<u8> = ids.iter().filter(|&&t| t < 256).map(|&t| t as u8).collect();
        Ok(String::from_utf8_lossy(&raw).into_owned())
    }

    fn pushed(choice: &mut ChoiceText, text: &[u8]) {
        for &b in text {
            choice.push(b as i64, bytes).unwrap();
        }
    }

    #[test]
    fn a_character_split_across_tokens_joins_the_text_whole() {
        let mut c = ChoiceText::default();
        let smile = "🙂".as_bytes();
        pushed(&mut c, b"hi ");
        pushed(&mut c, &smile[..3]);
        assert_eq!(
            c.text, "hi ",
            "three of its four bytes make no character yet"
        );
        pushed(&mut c, &smile[3..]);
        pushed(&mut c, " é".as_bytes());
        assert_eq!(c.text, "hi 🙂 é");
    }

    #[test]
    fn tokens_that_make_no_text_keep_the_decoded_window_narrow() {
        let mut c = ChoiceText::default();
        pushed(&mut c, b"a");
        for _ in 0..100 {
            c.push(1000, bytes).unwrap();
            assert!(c.tokens.len() - c.window <= MAX_DECODE_WINDOW + 1);
        }
        pushed(&mut c, b"b");
        // Lone continuation bytes never make a character: they go out as replacement
        // characters once the window is full, as the whole text decodes them.
        pushed(&mut c, &[0x80; 40]);
        assert!(c.tokens.len() - c.window <= MAX_DECODE_WINDOW + 1);
        pushed(&mut c, b"c");
        let all: Vec<i64> = c.tokens.clone();
        assert_eq!(c.text, bytes(&all).unwrap());
    }

    #[test]
    fn text_that_might_begin_a_stop_string_waits_and_nothing_past_one_goes_out() {
        let stops = vec!["END".to_string(), "!?".to_string()];
        let mut c = ChoiceText::default();
        // The longest stop string is 3 characters: the last 2 wait.
        grown(&mut c, "Hello E");
        assert_eq!(c.take_ready(&stops, 2), "Hello");
        grown(&mut c, "N");
        assert_eq!(c.take_ready(&stops, 2), " ");
        grown(&mut c, "Dless");
        assert_eq!(c.take_ready(&stops, 2), "");
        assert!(c.stopped);
        grown(&mut c, " more");
        assert_eq!(c.take_ready(&stops, 2), "");
        // The whole text, cut at the stop string, is what was sent: nothing is left.
        assert_eq!(c.take_rest("Hello "), "");
    }

    #[test]
    fn held_characters_are_counted_in_characters_and_go_out_at_the_end() {
        let stops = vec!["ééé".to_string()];
        let mut c = ChoiceText::default();
        grown(&mut c, "aéé");
        assert_eq!(c.take_ready(&stops, 2), "a");
        grown(&mut c, "b");
        assert_eq!(c.take_ready(&stops, 2), "é");
        assert_eq!(c.take_rest("aéébc"), "ébc");
        // Without stop strings everything goes at once.
        let mut free = ChoiceText::default();
        grown(&mut free, "xyz");
        assert_eq!(free.take_ready(&[], 0), "xyz");
        assert_eq!(free.take_rest("xyz"), "");
    }

    #[test]
    fn a_whole_text_that_does_not_extend_what_was_sent_adds_nothing() {
        let mut c = ChoiceText::default();
        grown(&mut c, "abc");
        assert_eq!(c.take_ready(&[], 0), "abc");
        assert_eq!(c.take_rest("abd"), "");
    }
}
