//! `/metrics` (Prometheus text, rendered by the `metrics` crate's Prometheus exporter) and
//! `/api/model-stats` (JSON), both read from one engine snapshot so they always agree.
//!
//! Two recorders feed `/metrics`. Histograms are recorded by the engine through the `metrics`
//! facade as jobs finish, into the process's global recorder ([`install_recorder`]). Counters
//! and gauges are the engine's own atomics: each scrape writes them into a fresh local recorder,
//! so a series labelled by tenant is only ever rendered for the caller and never goes stale.

use std::sync::OnceLock;
use std::time::Duration;

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::http::HeaderMap;
use axum::response::IntoResponse;
use axum::Json;
use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde_json::{json, Value};

use crate::error::ApiResult;
use crate::extract::Tenant;
use crate::state::AppState;
use loraloom_engine::{metric, StatsSnapshot};

/// Upper bounds (seconds) of every histogram's buckets.
const SECONDS_BUCKETS: [f64; 12] = [
    0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// How often the histograms' recent samples are folded into their buckets (without it they
/// pile up between scrapes).
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// Installs the global Prometheus recorder that receives the engine's histograms, once per
/// process, with a thread folding samples into buckets every few seconds. Later calls return
/// the same handle. Call it at start: histograms recorded before it are dropped.
pub fn install_recorder() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets(&SECONDS_BUCKETS)
            .expect("the bucket list is not empty")
            .build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("another metrics recorder is installed; /metrics has no histograms");
        }
        describe_histogram!(
            metric::JOB_SECONDS,
            Unit::Seconds,
            "Job latency from admission to outcome."
        );
        describe_histogram!(
            metric::BATCH_SECONDS,
            Unit::Seconds,
            "Worker time per batch other than decode steps."
        );
        describe_histogram!(
            metric::DECODE_STEP_SECONDS,
            Unit::Seconds,
            "Time per decode step over every sequence decoding then."
        );
        describe_histogram!(
            metric::FIRST_TOKEN_SECONDS,
            Unit::Seconds,
            "Time from a sampling request's admission to its first sampled token."
        );
        let upkeep = handle.clone();
        let spawned = std::thread::Builder::new()
            .name("metrics-upkeep".into())
            .spawn(move || loop {
                std::thread::sleep(UPKEEP_EVERY);
                upkeep.run_upkeep();
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "no metrics upkeep thread; histograms are folded at scrapes");
        }
        handle
    })
}

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
    let snapshot = state.engine.stats();
    let recorder = PrometheusBuilder::new().build_recorder();
    metrics::with_local_recorder(&recorder, || counters(&snapshot, caller.as_deref()));
    let histograms = install_recorder();
    histograms.run_upkeep();
    let mut out = recorder.handle().render();
    out.push_str(&histograms.render());
    Ok(([(CONTENT_TYPE, "text/plain; version=0.0.4")], out))
}

/// Writes a snapshot's counters and gauges into the current recorder; the series labelled by
/// tenant only for `caller` (tenants are labelled by their configured name, never their key).
fn counters(s: &StatsSnapshot, caller: Option<&str>) {
    let count = |name: &'static str, help: &'static str, value: u64| {
        describe_counter!(name, help);
        counter!(name).absolute(value);
    };
    let level = |name: &'static str, help: &'static str, value: f64| {
        describe_gauge!(name, help);
        gauge!(name).set(value);
    };
    level(
        "loraloom_jobs_queued",
        "Jobs waiting in queues.",
        s.queued as f64,
    );
    level(
        "loraloom_jobs_running",
        "Jobs in batches on workers.",
        s.running as f64,
    );
    describe_counter!("loraloom_jobs_total", "Jobs finished, by outcome.");
    counter!("loraloom_jobs_total", "outcome" => "done").absolute(s.done);
    counter!("loraloom_jobs_total", "outcome" => "failed").absolute(s.failed);
    describe_counter!("loraloom_job_failures_total", "Failed jobs by error type.");
    for (kind, n) in &s.failures_by_kind {
        counter!("loraloom_job_failures_total", "error_type" => kind.clone()).absolute(*n);
    }
    count(
        "loraloom_jobs_refused_total",
        "Requests refused with 429 because a queue limit was reached (--max-queued-per-tenant, --max-queued).",
        s.refused,
    );
    count("loraloom_batches_total", "Batches executed.", s.batches);
    count(
        "loraloom_batch_jobs_total",
        "Jobs executed in batches (sum of batch sizes).",
        s.batched_jobs,
    );
    level(
        "loraloom_batch_size_max",
        "Largest batch so far.",
        s.max_batch as f64,
    );
    count(
        "loraloom_tokens_total",
        "Tokens put through the model.",
        s.tokens,
    );
    level(
        "loraloom_models",
        "Training runs registered.",
        s.models as f64,
    );
    describe_gauge!("loraloom_tenant_jobs_queued", "Jobs waiting, per tenant.");
    if let Some(caller) = caller {
        let n = s
            .queued_by_tenant
            .iter()
            .find(|(t, _)| t == caller)
            .map_or(0, |(_, n)| *n);
        gauge!("loraloom_tenant_jobs_queued", "tenant" => caller.to_string()).set(n as f64);
    }
    count(
        "loraloom_sample_prefills_total",
        "Sampling prompts prefilled (one per distinct prompt and sampler among requests admitted together, whatever their num_samples).",
        s.prefills,
    );
    count(
        "loraloom_sample_prompts_shared_total",
        "Sampling requests that joined without a prefill of their own (another request with the same prompt and sampler joined with them or was decoding) or from a shared prefix.",
        s.shared_prompts,
    );
    count(
        "loraloom_sample_prompt_tokens_reused_total",
        "Sampling prompt tokens whose keys and values were copied (from another request, a live sequence or a kept finished one) instead of computed.",
        s.prompt_tokens_reused,
    );
    level(
        "loraloom_sample_kv_tokens_reserved",
        "Keys and values (tokens) the sampling jobs in the decode loops may come to hold: per loop its sequences x the longest prompt + max_tokens among them (a batch's cache pads rows to its longest), all workers together.",
        s.kv_tokens_reserved as f64,
    );
    level(
        "loraloom_sample_kv_budget_tokens",
        "Keys and values (tokens) one worker's decode loop may reserve (--max-kv-tokens); kept prefixes fit in what reservations leave.",
        s.kv_budget_tokens as f64,
    );
    level(
        "loraloom_sample_kv_tokens_held",
        "Keys and values (tokens) the decode loops' caches hold room for, at their last steps.",
        s.kv_tokens_held as f64,
    );
    level(
        "loraloom_resident_adapter_bytes",
        "Bytes of adapters (training runs' weights, gradients and Adam moments; sampling sessions' weights) resident in memory, all tenants, those no worker is using this instant.",
        s.resident_bytes as f64,
    );
    level(
        "loraloom_resident_adapter_bytes_limit",
        "Bytes of adapters all tenants together may keep resident (--max-resident-bytes; 0 = no limit).",
        s.resident_bytes_limit as f64,
    );
    level(
        "loraloom_sample_kept_tokens",
        "Tokens of finished sequences the decode loops keep for later prompts (prefix caches).",
        s.kept_tokens as f64,
    );
    count(
        "loraloom_decode_steps_recorded_total",
        "Decode steps recorded as CUDA graphs (--step-graphs cuda).",
        s.decode_steps_recorded,
    );
    count(
        "loraloom_decode_steps_replayed_total",
        "Decode steps replayed from a CUDA graph recording (one launch each).",
        s.decode_steps_replayed,
    );
    count(
        "loraloom_memory_releases_total",
        "Times the allocator's free memory was given back when idle (--release-memory-after-idle-secs).",
        s.memory_releases,
    );
    count(
        "loraloom_memory_released_bytes_total",
        "Fall of the resident size over those releases, summed.",
        s.memory_released_bytes,
    );
    count(
        "loraloom_decode_tokens_total",
        "Tokens sampled; divided by loraloom_decode_step_seconds_count, the mean decode batch occupancy.",
        s.decode_tokens,
    );
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
        "dtype": base.dtype,
        "weight_bytes": base.weight_bytes,
        "models_loaded": s.models,
        "queued": s.queued,
        "running": s.running,
        "done": s.done,
        "failed": s.failed,
        "refused": s.refused,
        "batches": s.batches,
        "mean_batch_size": mean_batch,
        "max_batch_size": s.max_batch,
        "tokens": s.tokens,
        "resident_adapter_bytes": s.resident_bytes,
        "resident_adapter_bytes_limit": s.resident_bytes_limit,
        "memory_releases": s.memory_releases,
        "memory_released_bytes": s.memory_released_bytes,
        "sampling": {
            "prefills": s.prefills,
            "prompts_shared": s.shared_prompts,
            "prompt_tokens_reused": s.prompt_tokens_reused,
            "kv_tokens_reserved": s.kv_tokens_reserved,
            "kv_budget_tokens": s.kv_budget_tokens,
            "kv_tokens_held": s.kv_tokens_held,
            "kept_tokens": s.kept_tokens,
            "decode_steps": s.decode_steps,
            "decode_steps_recorded": s.decode_steps_recorded,
            "decode_steps_replayed": s.decode_steps_replayed,
            "decode_tokens": s.decode_tokens,
            "mean_decode_batch": ratio(s.decode_tokens as f64, s.decode_steps as f64),
            "decode_tokens_per_s": ratio(s.decode_tokens as f64, s.decode_seconds),
            "mean_time_to_first_token_s": ratio(s.first_token_seconds, s.first_tokens as f64),
        },
        "your_models": runs,
        "your_queues": mine,
        "your_usage": usage(&state, &tenant),
    })))
}

/// The tenant's usage against its limits: the engine's, plus its client sessions.
fn usage(state: &AppState, tenant: &str) -> Value {
    let mut usage = json!(state.engine.usage(tenant));
    usage["sessions"] = json!(state.sessions.iter().filter(|s| s.tenant == tenant).count());
    usage["sessions_limit"] = json!(state.max_sessions_per_tenant);
    usage
}

/// `a / b`, 0 when `b` is 0.
fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(s: &StatsSnapshot, caller: Option<&str>) -> String {
        let recorder = PrometheusBuilder::new().build_recorder();
        metrics::with_local_recorder(&recorder, || counters(s, caller));
        recorder.handle().render()
    }

    #[test]
    fn counters_come_from_the_snapshot_and_tenant_series_only_for_the_caller() {
        let s = StatsSnapshot {
            done: 7,
            failed: 2,
            failures_by_kind: [("time_limit".to_string(), 2)].into(),
            queued_by_tenant: vec![("alice".into(), 2), ("bob".into(), 3)],
            ..StatsSnapshot::default()
        };
        let alice = render(&s, Some("alice"));
        assert!(
            alice.contains("loraloom_jobs_total{outcome=\"done\"} 7"),
            "{alice}"
        );
        assert!(alice.contains("loraloom_job_failures_total{error_type=\"time_limit\"} 2"));
        assert!(alice.contains("# TYPE loraloom_jobs_total counter"));
        assert!(alice.contains("loraloom_tenant_jobs_queued{tenant=\"alice\"} 2"));
        assert!(!alice.contains("bob"), "{alice}");
        let carol = render(&s, Some("carol"));
        assert!(carol.contains("loraloom_tenant_jobs_queued{tenant=\"carol\"} 0"));
        assert!(!carol.contains("alice") && !carol.contains("bob"));
        let public = render(&s, None);
        assert!(!public.contains("tenant="), "{public}");
    }
}
