//! Provenance spans (`Datum.model_input_spans` / `loss_fn_input_spans`): which sampled sequence
//! each token of a datum came from, as runs that tile the model input and the targets.
//!
//! Every loss checks the tiling. `stable_reinforce` also resolves the spans against the sequences
//! the server recorded when it sampled them (`record_stability_info`): each covered token must be
//! the recorded one, advantages must be 0 off the sampled tokens, and the sampler
//! log-probabilities the loss uses are the recorded ones, whatever `logprobs` the client sent.

use std::collections::HashMap;

use loraloom_engine::{Engine, SampleRow};
use loraloom_model::Datum;
use serde::Deserialize;

use crate::error::{ApiError, ApiResult};
use crate::proto;

/// Which tokens of a recorded sequence a run reproduces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The sampling request's prompt.
    Prompt,
    /// The tokens the sequence sampled.
    Sampled,
}

/// One run: `length` tokens from position `offset` of a recorded sequence's prompt or sample.
#[derive(Debug, Clone, PartialEq)]
pub struct Span {
    /// Prompt or sampled tokens.
    pub source: Source,
    /// `SampledSequence.sequence_id`.
    pub sequence_id: String,
    /// Start within the source.
    pub offset: usize,
    /// Tokens covered.
    pub length: usize,
}

/// A datum's provenance: runs tiling its model input and its targets.
#[derive(Debug, Clone, PartialEq)]
pub struct Provenance {
    /// Runs over `model_input`.
    pub model_input: Vec<Span>,
    /// Runs over `loss_fn_inputs.target_tokens`.
    pub targets: Vec<Span>,
}

/// The JSON form of a span: `{"prompt_tokens": {..}}` or `{"sampled_tokens": {..}}`, as the
/// protobuf oneof names them.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum JsonSpan {
    /// A prompt run.
    PromptTokens(JsonRun),
    /// A sampled run.
    SampledTokens(JsonRun),
}

/// The fields of a JSON span.
#[derive(Debug, Deserialize)]
pub struct JsonRun {
    /// `SampledSequence.sequence_id`.
    pub sequence_id: String,
    /// Start within the source.
    #[serde(default)]
    pub offset: i64,
    /// Tokens covered.
    pub length: i64,
}

fn run(
    field: &str,
    source: Source,
    sequence_id: String,
    offset: i64,
    length: i64,
) -> ApiResult<Span> {
    if sequence_id.is_empty() {
        return Err(ApiError::invalid(
            format!("{field}.sequence_id"),
            "must not be empty",
        ));
    }
    let count = |name: &str, v: i64| {
        usize::try_from(v).map_err(|_| {
            ApiError::invalid(format!("{field}.{name}"), format!("must be >= 0, got {v}"))
        })
    };
    Ok(Span {
        source,
        sequence_id,
        offset: count("offset", offset)?,
        length: count("length", length)?,
    })
}

/// Converts protobuf spans; `field` names the list.
pub fn from_proto(field: &str, spans: Vec<proto::ProvenanceSpan>) -> ApiResult<Vec<Span>> {
    spans
        .into_iter()
        .enumerate()
        .map(|(j, s)| {
            let f = format!("{field}[{j}]");
            match s.span {
                Some(proto::SpanKind::PromptTokens(r)) => {
                    run(&f, Source::Prompt, r.sequence_id, r.offset, r.length)
                }
                Some(proto::SpanKind::SampledTokens(r)) => {
                    run(&f, Source::Sampled, r.sequence_id, r.offset, r.length)
                }
                None => Err(ApiError::invalid(
                    f,
                    "names neither prompt_tokens nor sampled_tokens",
                )),
            }
        })
        .collect()
}

/// Converts JSON spans; `field` names the list.
pub fn from_json(field: &str, spans: Vec<JsonSpan>) -> ApiResult<Vec<Span>> {
    spans
        .into_iter()
        .enumerate()
        .map(|(j, s)| {
            let f = format!("{field}[{j}]");
            match s {
                JsonSpan::PromptTokens(r) => {
                    run(&f, Source::Prompt, r.sequence_id, r.offset, r.length)
                }
                JsonSpan::SampledTokens(r) => {
                    run(&f, Source::Sampled, r.sequence_id, r.offset, r.length)
                }
            }
        })
        .collect()
}

/// Datum `index`'s provenance from its two span lists (both empty: none), checked to tile its
/// model input and targets.
pub fn check(
    index: usize,
    datum: &Datum,
    model_input: Vec<Span>,
    targets: Vec<Span>,
) -> ApiResult<Option<Provenance>> {
    let field = |name: &str| format!("data[{index}].{name}");
    if datum.loss_inputs.targets_per_position.is_some() && !targets.is_empty() {
        return Err(ApiError::invalid(
            field("loss_fn_input_spans"),
            "provenance needs one target per position; this datum's target_tokens are 2-D [N, K]",
        ));
    }
    match (model_input.is_empty(), targets.is_empty()) {
        (true, true) => return Ok(None),
        (false, false) => {}
        (true, false) => {
            return Err(ApiError::invalid(
                field("model_input_spans"),
                "provenance comes as a pair: loss_fn_input_spans is set, model_input_spans is not",
            ))
        }
        (false, true) => {
            return Err(ApiError::invalid(
                field("loss_fn_input_spans"),
                "provenance comes as a pair: model_input_spans is set, loss_fn_input_spans is not",
            ))
        }
    }
    for (name, spans, len) in [
        ("model_input_spans", &model_input, datum.input_tokens.len()),
        (
            "loss_fn_input_spans",
            &targets,
            datum.loss_inputs.target_tokens.len(),
        ),
    ] {
        // Runs of length 0 are allowed, but not without bound.
        if spans.len() > len + 16 {
            return Err(ApiError::invalid(
                field(name),
                format!("{} runs for {len} tokens", spans.len()),
            ));
        }
        let covered = spans
            .iter()
            .try_fold(0usize, |sum, s| sum.checked_add(s.length));
        if covered != Some(len) {
            let covered = covered.map_or("more than 2^64".to_string(), |c| c.to_string());
            return Err(ApiError::invalid(
                field(name),
                format!("runs cover {covered} tokens but the field has {len}; they must tile it"),
            ));
        }
    }
    Ok(Some(Provenance {
        model_input,
        targets,
    }))
}

/// The client session an id belongs to (`<session>:train:..`, `<session>:sample:..`). Samplers
/// named by model path (`direct:..`) and sessions created without a client session
/// (`sampler-<hex>`) belong to none, and are not checked.
fn session_of(id: &str) -> Option<&str> {
    match id.split_once(':') {
        Some(("direct", _)) | None => None,
        Some((session, _)) => Some(session),
    }
}

/// Fills each datum's `logprobs` and `recorded` from the sequences its provenance names, for
/// `stable_reinforce` on run `model_id` of `tenant`. Errors name the datum and span.
pub fn resolve(
    engine: &Engine,
    tenant: &str,
    model_id: &str,
    data: &mut [Datum],
    provenance: &[Option<Provenance>],
) -> ApiResult<()> {
    let mut ids: Vec<String> = provenance
        .iter()
        .flatten()
        .flat_map(|p| p.model_input.iter().chain(&p.targets))
        .map(|s| s.sequence_id.clone())
        .collect();
    ids.sort();
    ids.dedup();
    let records = Records {
        rows: engine.use_recorded_samples(tenant, &ids)?,
        model_id,
    };
    for (i, datum) in data.iter_mut().enumerate() {
        let Some(Some(prov)) = provenance.get(i) else {
            return Err(ApiError::invalid(
                format!("data[{i}].loss_fn_input_spans"),
                "stable_reinforce needs provenance on every datum: sample with record_stability_info=True and attach the sequence ids with Datum.with_provenance",
            ));
        };
        let mut at = 0;
        for (j, span) in prov.model_input.iter().enumerate() {
            let field = format!("data[{i}].model_input_spans[{j}]");
            records.reproduced(&field, "model_input", &datum.input_tokens, at, span)?;
            at += span.length;
        }
        let inputs = &mut datum.loss_inputs;
        let n = inputs.target_tokens.len();
        let mut logprobs = vec![0.0f32; n];
        let mut mask = vec![0.0f32; n];
        let advantages = inputs.advantages.as_deref().unwrap_or(&[]);
        let mut at = 0;
        for (j, span) in prov.targets.iter().enumerate() {
            let field = format!("data[{i}].loss_fn_input_spans[{j}]");
            let what = "loss_fn_inputs.target_tokens";
            let record = records.reproduced(&field, what, &inputs.target_tokens, at, span)?;
            let run = at..at + span.length;
            match span.source {
                Source::Sampled => {
                    let q = record
                        .logprobs
                        .get(span.offset..span.offset + span.length)
                        .ok_or_else(|| {
                            ApiError::Engine(loraloom_engine::EngineError::Internal(format!(
                                "recorded sequence `{}` has {} logprobs for {} tokens",
                                span.sequence_id,
                                record.logprobs.len(),
                                record.tokens.len()
                            )))
                        })?;
                    logprobs[run.clone()].copy_from_slice(q);
                    mask[run].fill(1.0);
                }
                Source::Prompt => {
                    if let Some(p) = run
                        .into_iter()
                        .find(|&p| advantages.get(p).is_some_and(|&a| a != 0.0))
                    {
                        return Err(ApiError::invalid(
                            format!("data[{i}].loss_fn_inputs.advantages"),
                            format!("position {p} is a prompt token ({field}); stable_reinforce trains only sampled tokens, so its advantage must be 0"),
                        ));
                    }
                }
            }
            at += span.length;
        }
        inputs.logprobs = Some(logprobs);
        inputs.recorded = Some(mask);
    }
    Ok(())
}

/// The tenant's recorded sequences a request names, for run `model_id`.
struct Records<'a> {
    rows: HashMap<String, SampleRow>,
    model_id: &'a str,
}

impl Records<'_> {
    /// The record `span` names, once `tokens[at..]` (the span's run of a datum field, `what`,
    /// whose spans are checked to tile it) is shown to be the tokens it names. `field` names the
    /// span in errors.
    fn reproduced(
        &self,
        field: &str,
        what: &str,
        tokens: &[i64],
        at: usize,
        span: &Span,
    ) -> ApiResult<&SampleRow> {
        let record = self.named(field, span)?;
        let (source, kind) = match span.source {
            Source::Prompt => (&record.prompt, "prompt"),
            Source::Sampled => (&record.tokens, "sampled"),
        };
        let end = span.offset + span.length;
        let Some(want) = source.get(span.offset..end) else {
            return Err(ApiError::invalid(
                field,
                format!(
                    "positions {}..{end} are outside the {} {kind} tokens of sequence `{}`",
                    span.offset,
                    source.len(),
                    span.sequence_id
                ),
            ));
        };
        if tokens[at..at + span.length] != *want {
            return Err(ApiError::invalid(
                field,
                format!(
                    "{what} positions {at}..{} are not the tokens at {}..{end} of sequence `{}` as sampled",
                    at + span.length,
                    span.offset,
                    span.sequence_id
                ),
            ));
        }
        Ok(record)
    }

    /// The record a span names, if the tenant has it and it was sampled in the run's session.
    fn named(&self, field: &str, span: &Span) -> ApiResult<&SampleRow> {
        let record = self.rows.get(&span.sequence_id).ok_or_else(|| {
            ApiError::invalid(
                format!("{field}.sequence_id"),
                format!(
                    "no recorded sequence `{}`: sample with record_stability_info=True (records last a day after their last use)",
                    span.sequence_id
                ),
            )
        })?;
        if let (Some(sampled), Some(training)) =
            (session_of(&record.sampler), session_of(self.model_id))
        {
            if sampled != training {
                return Err(ApiError::invalid(
                    format!("{field}.sequence_id"),
                    format!(
                        "sequence `{}` was sampled in session `{sampled}`, not in this run's session `{training}`",
                        span.sequence_id
                    ),
                ));
            }
        }
        Ok(record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use loraloom_model::LossInputs;

    fn datum(len: usize) -> Datum {
        Datum {
            input_tokens: vec![1; len],
            loss_inputs: LossInputs {
                target_tokens: vec![2; len],
                weights: None,
                logprobs: None,
                advantages: None,
                sequence_ratio_mask: None,
                recorded: None,
                targets_per_position: None,
            },
            custom: None,
        }
    }

    fn span(source: Source, length: usize) -> Span {
        Span {
            source,
            sequence_id: "r:0".into(),
            offset: 0,
            length,
        }
    }

    #[test]
    fn spans_must_come_in_pairs_and_tile_their_field() {
        let d = datum(5);
        let tiling = || vec![span(Source::Prompt, 2), span(Source::Sampled, 3)];
        assert!(check(0, &d, vec![], vec![]).unwrap().is_none());
        assert!(check(0, &d, tiling(), tiling()).unwrap().is_some());
        let err = check(0, &d, tiling(), vec![]).unwrap_err().to_string();
        assert!(err.contains("data[0].loss_fn_input_spans"), "{err}");
        let short = vec![span(Source::Prompt, 2)];
        let err = check(3, &d, tiling(), short).unwrap_err().to_string();
        assert!(
            err.contains("data[3].loss_fn_input_spans") && err.contains("cover 2"),
            "{err}"
        );
        // Lengths that overflow when summed are an error, not a panic.
        let huge = vec![span(Source::Sampled, usize::MAX / 2 + 1); 2];
        let err = check(0, &d, tiling(), huge).unwrap_err().to_string();
        assert!(err.contains("more than 2^64"), "{err}");
        // Empty runs are allowed, but not without bound.
        let many = vec![span(Source::Prompt, 0); 100];
        let err = check(0, &d, many, tiling()).unwrap_err().to_string();
        assert!(err.contains("100 runs"), "{err}");
    }

    #[test]
    fn sessions_come_from_ids_that_have_one() {
        assert_eq!(session_of("session-1:train:0"), Some("session-1"));
        assert_eq!(session_of("session-1:train:0:sample:2"), Some("session-1"));
        assert_eq!(session_of("direct:tinker://x/sampler_weights/y"), None);
        assert_eq!(session_of("sampler-00ff"), None);
    }

    #[test]
    fn negative_offsets_and_lengths_name_the_field() {
        let bad = proto::ProvenanceSpan {
            span: Some(proto::SpanKind::SampledTokens(proto::SpanRun {
                sequence_id: "r:0".into(),
                offset: -1,
                length: 2,
            })),
        };
        let err = from_proto("data[0].model_input_spans", vec![bad])
            .unwrap_err()
            .to_string();
        assert!(err.contains("data[0].model_input_spans[0].offset"), "{err}");
        let err = from_proto("x", vec![proto::ProvenanceSpan { span: None }])
            .unwrap_err()
            .to_string();
        assert!(err.contains("x[0]"), "{err}");
    }
}
