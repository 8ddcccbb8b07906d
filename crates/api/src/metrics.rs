//! `/metrics` (Prometheus text) and `/api/model-stats` (JSON), both rendered from one engine
//! snapshot so they always agree.

use std::fmt::Write;

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::http::HeaderMap;
use axum::response::IntoResponse;
use axum::Json;
use serde_json::{json, Value};

use crate::error::ApiResult;
use crate::extract::Tenant;
use crate::state::AppState;
use loraloom_engine::{Histogram, LATENCY_BUCKETS};

/// Prometheus text exposition of the engine's counters. It needs an API key, and the series
/// labelled by tenant show only the caller's own; with `--public-metrics` it needs none and
/// shows no tenant's.
pub async fn prometheus(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> ApiResult<impl IntoResponse> {
    let caller = if state.public_metrics {
        None
    } else {
        Some(state.auth.tenant(&headers)?)
    };
    let s = state.engine.stats();
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, f64)]| {
        let _ = writeln!(out, "# HELP loraloom_{name} {help}");
        let _ = writeln!(out, "# TYPE loraloom_{name} {kind}");
        for (labels, v) in samples {
            let _ = writeln!(out, "loraloom_{name}{labels} {v}");
        }
    };
    metric(
        "jobs_queued",
        "gauge",
        "Jobs waiting in queues.",
        &[(String::new(), s.queued as f64)],
    );
    metric(
        "jobs_running",
        "gauge",
        "Jobs in batches on workers.",
        &[(String::new(), s.running as f64)],
    );
    metric(
        "jobs_total",
        "counter",
        "Jobs finished, by outcome.",
        &[
            ("{outcome=\"done\"}".into(), s.done as f64),
            ("{outcome=\"failed\"}".into(), s.failed as f64),
        ],
    );
    let mut failures: Vec<(String, f64)> = s
        .failures_by_kind
        .iter()
        .map(|(k, v)| (format!("{{error_type=\"{k}\"}}"), *v as f64))
        .collect();
    failures.sort_by(|a, b| a.0.cmp(&b.0));
    metric(
        "job_failures_total",
        "counter",
        "Failed jobs by error type.",
        &failures,
    );
    metric(
        "batches_total",
        "counter",
        "Batches executed.",
        &[(String::new(), s.batches as f64)],
    );
    metric(
        "batch_jobs_total",
        "counter",
        "Jobs executed in batches (sum of batch sizes).",
        &[(String::new(), s.batched_jobs as f64)],
    );
    metric(
        "batch_size_max",
        "gauge",
        "Largest batch so far.",
        &[(String::new(), s.max_batch as f64)],
    );
    metric(
        "tokens_total",
        "counter",
        "Tokens put through the model.",
        &[(String::new(), s.tokens as f64)],
    );
    metric(
        "worker_busy_seconds_total",
        "counter",
        "Seconds workers spent computing.",
        &[(String::new(), s.busy_seconds)],
    );
    metric(
        "models",
        "gauge",
        "Training runs registered.",
        &[(String::new(), s.models as f64)],
    );
    // Tenants are labelled by their configured name, never by their key.
    let by_tenant: Vec<(String, f64)> = s
        .queued_by_tenant
        .iter()
        .filter(|(t, _)| caller.as_deref() == Some(t.as_str()))
        .map(|(t, n)| (format!("{{tenant=\"{}\"}}", t.replace('"', "'")), *n as f64))
        .collect();
    metric(
        "tenant_jobs_queued",
        "gauge",
        "Jobs waiting, per tenant.",
        &by_tenant,
    );
    metric(
        "job_duration_seconds",
        "histogram",
        "Job latency from admission to outcome.",
        &histogram(&s.latency),
    );
    metric(
        "sample_prefills_total",
        "counter",
        "Sampling prompts prefilled (one per request, whatever its num_samples).",
        &[(String::new(), s.prefills as f64)],
    );
    metric(
        "decode_steps_total",
        "counter",
        "Decode steps run.",
        &[(String::new(), s.decode_steps as f64)],
    );
    metric(
        "decode_tokens_total",
        "counter",
        "Tokens sampled; divided by decode_steps_total, the mean decode batch occupancy.",
        &[(String::new(), s.decode_tokens as f64)],
    );
    metric(
        "decode_seconds_total",
        "counter",
        "Seconds spent in decode steps.",
        &[(String::new(), s.decode_seconds)],
    );
    metric(
        "time_to_first_token_seconds",
        "histogram",
        "Time from a sampling request's admission to its first sampled token.",
        &histogram(&s.first_token),
    );
    Ok(([(CONTENT_TYPE, "text/plain; version=0.0.4")], out))
}

/// The samples of a histogram metric (`_bucket`s, `_sum`, `_count`).
fn histogram(h: &Histogram) -> Vec<(String, f64)> {
    let mut samples: Vec<(String, f64)> = LATENCY_BUCKETS
        .iter()
        .zip(h.buckets)
        .map(|(le, n)| (format!("_bucket{{le=\"{le}\"}}"), n as f64))
        .collect();
    samples.push(("_bucket{le=\"+Inf\"}".into(), h.count as f64));
    samples.push(("_sum".into(), h.sum));
    samples.push(("_count".into(), h.count as f64));
    samples
}

/// Usage per model for the caller's tenant, plus server-wide counters.
pub async fn model_stats(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
) -> ApiResult<Json<Value>> {
    let s = state.engine.stats();
    let base = state.engine.base();
    let mine: Vec<Value> = s
        .queues
        .iter()
        .filter(|q| q.tenant == tenant)
        .map(|q| json!({"id": q.id, "done": q.done, "failed": q.failed, "tokens": q.tokens, "last_access": q.last_access}))
        .collect();
    let runs: Vec<Value> = state
        .engine
        .registry()
        .models_of(&tenant)
        .iter()
        .map(|e| json!({"model_id": e.key.model_id, "lora_rank": e.spec.rank, "last_access": e.last_access()}))
        .collect();
    let mean_batch = ratio(s.batched_jobs as f64, s.batches as f64);
    Ok(Json(json!({
        "base_model": base.name,
        "summary": base.summary,
        "device": state.device,
        "models_loaded": s.models,
        "queued": s.queued,
        "running": s.running,
        "done": s.done,
        "failed": s.failed,
        "batches": s.batches,
        "mean_batch_size": mean_batch,
        "max_batch_size": s.max_batch,
        "tokens": s.tokens,
        "sampling": {
            "prefills": s.prefills,
            "decode_steps": s.decode_steps,
            "decode_tokens": s.decode_tokens,
            "mean_decode_batch": ratio(s.decode_tokens as f64, s.decode_steps as f64),
            "decode_tokens_per_s": ratio(s.decode_tokens as f64, s.decode_seconds),
            "mean_time_to_first_token_s": ratio(s.first_token.sum, s.first_token.count as f64),
        },
        "your_models": runs,
        "your_queues": mine,
        "your_usage": state.engine.usage(&tenant),
    })))
}

/// `a / b`, 0 when `b` is 0.
fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}
