//! Sampling sessions and sample requests.

use loraloom_model::Scoring;

use super::*;

#[derive(Deserialize)]
pub(super) struct CreateSamplingSessionRequest {
    session_id: String,
    #[serde(default)]
    sampling_session_seq_id: Option<i64>,
    #[serde(default)]
    base_model: Option<String>,
    #[serde(default)]
    model_path: Option<String>,
}

fn sampler_source(
    state: &AppState,
    base_model: Option<&str>,
    model_path: Option<String>,
) -> ApiResult<SamplerSource> {
    match (model_path, base_model) {
        (Some(path), _) => {
            parse_checkpoint_path(&path)?;
            Ok(SamplerSource::Checkpoint(path))
        }
        (None, Some(name)) => {
            check_base_model(state, name)?;
            Ok(SamplerSource::Base)
        }
        (None, None) => Err(ApiError::invalid(
            "base_model",
            "either base_model or model_path is required",
        )),
    }
}

pub(super) async fn create_sampling_session(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    JsonBody(body): JsonBody<CreateSamplingSessionRequest>,
) -> ApiResult<Json<Value>> {
    session(&state, &tenant, &body.session_id)?;
    let source = sampler_source(&state, body.base_model.as_deref(), body.model_path)?;
    let sampler_id = match body.sampling_session_seq_id {
        Some(n) => format!("{}:sample:{n}", body.session_id),
        None => new_id("sampler"),
    };
    state.engine.create_sampler(
        SamplerKey {
            tenant,
            sampler_id: sampler_id.clone(),
        },
        source,
    )?;
    Ok(Json(
        json!({"sampling_session_id": sampler_id, "type": "create_sampling_session"}),
    ))
}

#[derive(Deserialize)]
pub(super) struct JoinSamplingSessionRequest {
    sampling_session_id: String,
}

/// An unpickled SDK `SamplingClient` (`sample_join_sampling_session`) asks for its clone id
/// before its first sample: it numbers its requests from `1e9 * id`, so clones of one session
/// never share a `seq_id` (nor a completion feed). Ids count from 1 (the original is 0) in the
/// database, so none is handed out twice, restarts included.
pub(super) async fn join_sampling_session(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    JsonBody(body): JsonBody<JoinSamplingSessionRequest>,
) -> ApiResult<Json<Value>> {
    let clone = state
        .engine
        .registry()
        .join_sampler(&tenant, &body.sampling_session_id)?;
    Ok(Json(
        json!({"type": "join_sampling_session", "client_counter": clone}),
    ))
}

pub(super) async fn get_sampler(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let entry = state.engine.registry().sampler(&tenant, &id)?;
    let path = match &entry.source {
        SamplerSource::Base => None,
        SamplerSource::Checkpoint(p) => Some(p.clone()),
    };
    Ok(Json(
        json!({"sampler_id": id, "base_model": entry.base_model, "model_path": path}),
    ))
}

#[derive(Deserialize)]
pub(super) struct SampleRequest {
    #[serde(default)]
    sampling_session_id: Option<String>,
    /// The SDK client's request number: `1e9 * clone + n` (see [`join_sampling_session`]).
    #[serde(default)]
    seq_id: Option<i64>,
    #[serde(default)]
    base_model: Option<String>,
    #[serde(default)]
    model_path: Option<String>,
    prompt: ModelInput,
    #[serde(default = "one")]
    num_samples: i64,
    sampling_params: WireSamplingParams,
    #[serde(default)]
    prompt_logprobs: bool,
    #[serde(default)]
    topk_prompt_logprobs: i64,
    #[serde(default)]
    topk_sample_logprobs: i64,
    #[serde(default)]
    target_prompt_logprobs: Option<wire::TensorData>,
    #[serde(default)]
    prompt_alt_tokens_k: i64,
    #[serde(default)]
    prompt_logprobs_last_n: Option<i64>,
    /// Record each sequence for `stable_reinforce`, under its `sequence_id`.
    #[serde(default)]
    record_stability_info: Option<bool>,
}

impl SampleRequest {
    /// The extras asked for besides the samples, for a prompt of `prompt_len` tokens (bounds
    /// against the vocabulary are checked at submission).
    fn scoring(&mut self, prompt_len: usize) -> ApiResult<Scoring> {
        let width = |field: &str, n: i64| {
            usize::try_from(n).map_err(|_| ApiError::invalid(field, "must not be negative"))
        };
        let prompt_last_n = match self.prompt_logprobs_last_n {
            Some(n) if n < 1 => {
                return Err(ApiError::invalid(
                    "prompt_logprobs_last_n",
                    "must be at least 1",
                ))
            }
            n => n.map(|n| n as usize),
        };
        let (prompt_targets, prompt_targets_layout) = match self.target_prompt_logprobs.take() {
            Some(t) => {
                let (ids, layout) =
                    t.into_id_matrix("target_prompt_logprobs", -1, prompt_len.saturating_sub(1))?;
                (Some(ids), layout)
            }
            None => (None, None),
        };
        Ok(Scoring {
            prompt_logprobs: self.prompt_logprobs,
            prompt_top_k: width("topk_prompt_logprobs", self.topk_prompt_logprobs)?,
            prompt_last_n,
            prompt_targets,
            prompt_targets_layout,
            prompt_alt_k: width("prompt_alt_tokens_k", self.prompt_alt_tokens_k)?,
            sample_top_k: width("topk_sample_logprobs", self.topk_sample_logprobs)?,
        })
    }
}

fn one() -> i64 {
    1
}

/// Submits a sampling job; returns its request id and sample count. With `report`, a request
/// of a sampling session reports its completion to its SDK client's feed.
fn submit_sample(
    state: &AppState,
    tenant: &str,
    mut body: SampleRequest,
    report: bool,
) -> ApiResult<(String, i64)> {
    let prompt = body.prompt.tokens("prompt")?;
    let scoring = body.scoring(prompt.len())?;
    // The SDK client that sent it, whose completion feed it reports to (sampling sessions
    // only: a request naming its model directly has no session to poll). Clone `c` numbers its
    // requests from `c * 1e9`, as many as there are clone ids.
    let clone = body
        .seq_id
        .map_or(0, |seq| seq.max(0) as u64 / SAMPLER_CLONES);
    let feed = (report && body.sampling_session_id.is_some()).then_some(clone);
    let sampler_id = match body.sampling_session_id {
        Some(id) => id,
        None => {
            let source = sampler_source(state, body.base_model.as_deref(), body.model_path)?;
            direct_sampler(state, tenant, source)?
        }
    };
    let work = Work::Sample {
        prompt,
        num_samples: body.num_samples,
        params: body.sampling_params.into_params(),
        scoring,
        record_stability: body.record_stability_info.unwrap_or(false),
        stream: false,
    };
    let queue = QueueKey::Sampler(SamplerKey {
        tenant: tenant.to_string(),
        sampler_id,
    });
    let id = state.submit_reporting(queue, work, feed)?;
    Ok((id, body.num_samples))
}

pub(super) async fn asample(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    JsonBody(body): JsonBody<SampleRequest>,
) -> ApiResult<Json<Promise>> {
    let (id, n) = submit_sample(&state, &tenant, body, true)?;
    let sequence_ids = (0..n.max(0)).map(|i| format!("{id}:{i}")).collect();
    Ok(Json(Promise {
        request_id: id,
        model_id: None,
        sample_sequence_ids: Some(sequence_ids),
    }))
}

/// The sampling session of requests that name their model directly (`/api/v1/sample`, the
/// OpenAI-compatible routes): one per tenant and source, made at its first request, so that
/// repeated calls do not accumulate sessions.
pub(super) fn direct_sampler(
    state: &AppState,
    tenant: &str,
    source: SamplerSource,
) -> ApiResult<String> {
    let id = match &source {
        SamplerSource::Base => "direct:base".to_string(),
        SamplerSource::Checkpoint(path) => format!("direct:{path}"),
    };
    if state.engine.registry().sampler(tenant, &id).is_err() {
        state.engine.create_sampler(
            SamplerKey {
                tenant: tenant.to_string(),
                sampler_id: id.clone(),
            },
            source,
        )?;
    }
    Ok(id)
}

/// The seed's synchronous sampling route: waits for the result and answers JSON.
pub(super) async fn sample_sync(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    JsonBody(body): JsonBody<SampleRequest>,
) -> ApiResult<Response> {
    let (id, _) = submit_sample(&state, &tenant, body, false)?;
    let mut job = CancelOnDrop::new(&state, &tenant);
    job.ids.push(id.clone());
    let out = wait_sample(&state, &tenant, &id).await?;
    job.ids.clear();
    Ok(Json(sample_json(&out)).into_response())
}

/// Sampling jobs a handler waits for, cancelled if the handler is dropped before they finish
/// (its client hung up): no decode runs on for an answer nobody will read.
pub(super) struct CancelOnDrop<'a> {
    state: &'a AppState,
    tenant: &'a str,
    /// The jobs not yet answered; cleared once they are.
    pub(super) ids: Vec<String>,
}

impl<'a> CancelOnDrop<'a> {
    pub(super) fn new(state: &'a AppState, tenant: &'a str) -> Self {
        CancelOnDrop {
            state,
            tenant,
            ids: Vec::new(),
        }
    }
}

impl Drop for CancelOnDrop<'_> {
    fn drop(&mut self) {
        for id in &self.ids {
            if let Ok(true) = self.state.engine.cancel(self.tenant, id) {
                tracing::debug!(request_id = %id, "sampling job cancelled: its client hung up");
            }
        }
    }
}

/// The result of sampling request `id` of `tenant`, once it is done.
pub(super) async fn wait_sample(
    state: &AppState,
    tenant: &str,
    id: &str,
) -> ApiResult<loraloom_model::SampleOutput> {
    loop {
        match state
            .engine
            .wait(tenant, id, Duration::from_secs(60))
            .await?
        {
            FutureState::Done(loraloom_engine::Output::Sample(out)) => return Ok(out),
            FutureState::Done(_) => {
                return Err(ApiError::Engine(EngineError::Internal(
                    "unexpected result".into(),
                )))
            }
            FutureState::Failed(e) => return Err(e.into()),
            FutureState::Queued | FutureState::Running => continue,
        }
    }
}
