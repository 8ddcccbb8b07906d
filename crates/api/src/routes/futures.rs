//! Futures: retrieve (long poll), a sampling client's completions (one long poll for all its
//! requests) and cancel.

use super::*;

#[derive(Deserialize)]
pub(super) struct FutureRef {
    request_id: String,
}

pub(super) async fn retrieve_future(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    headers: HeaderMap,
    JsonBody(body): JsonBody<FutureRef>,
) -> ApiResult<Response> {
    let proto_ok = accepts_protobuf(&headers);
    let state_now = state
        .engine
        .wait(&tenant, &body.request_id, state.long_poll)
        .await?;
    Ok(match state_now {
        FutureState::Done(out) => output_response(&out, proto_ok),
        FutureState::Failed(e) => {
            let category = if e.is_user_error() { "user" } else { "server" };
            let err = ApiError::from(e);
            let mut body = err.body();
            body["category"] = json!(category);
            Json(body).into_response()
        }
        FutureState::Queued | FutureState::Running => Json(json!({
            "type": "try_again",
            "request_id": body.request_id,
            "queue_state": "active",
        }))
        .into_response(),
    })
}

pub(super) async fn cancel_future(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    JsonBody(body): JsonBody<FutureRef>,
) -> ApiResult<Json<Value>> {
    let cancelled = state.engine.cancel(&tenant, &body.request_id)?;
    Ok(Json(
        json!({"request_id": body.request_id, "cancelled": cancelled}),
    ))
}

/// Most request ids one `retrieve_futures` may report retrieved (the SDK reports those
/// fetched since its last poll: at most its requests in flight).
const MAX_RETRIEVED_IDS: usize = 100_000;

#[derive(Deserialize)]
pub(super) struct FeedTarget {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    sampling_session_id: String,
    #[serde(default)]
    cloned_sampler_id: i64,
}

#[derive(Deserialize)]
pub(super) struct RetrieveFuturesRequest {
    target: FeedTarget,
    #[serde(default)]
    prev_cursor: i64,
    #[serde(default)]
    timeout: Option<f64>,
    #[serde(default)]
    retrieved_request_ids: Vec<String>,
}

/// The SDK's session poller (`sample_use_retrieve_futures`): one long poll per sampling client
/// instead of one per request. Answers the client's requests that finished after
/// `prev_cursor` (`{state: finished|failed, request_id}`; results and errors are then read
/// with `retrieve_future`) and the cursor to send next, waiting up to `timeout` seconds
/// (`--long-poll-secs` at most, and when absent) for one to finish. Requests in
/// `retrieved_request_ids` that have finished are forgotten at once.
pub(super) async fn retrieve_futures(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    JsonBody(body): JsonBody<RetrieveFuturesRequest>,
) -> ApiResult<Json<Value>> {
    if let Some(kind) = body
        .target
        .kind
        .as_deref()
        .filter(|k| *k != "sampling_session")
    {
        return Err(ApiError::invalid(
            "target.type",
            format!("{kind:?} is not a poll target this server knows (\"sampling_session\")"),
        ));
    }
    let clone = u64::try_from(body.target.cloned_sampler_id)
        .ok()
        .filter(|c| *c < SAMPLER_CLONES)
        .ok_or_else(|| {
            ApiError::invalid(
                "target.cloned_sampler_id",
                format!("must be in [0, {SAMPLER_CLONES})"),
            )
        })?;
    let prev_cursor = u64::try_from(body.prev_cursor)
        .map_err(|_| ApiError::invalid("prev_cursor", "must not be negative"))?;
    let timeout = match body.timeout {
        None => state.long_poll,
        Some(t) if t >= 0.0 => {
            Duration::try_from_secs_f64(t).map_or(state.long_poll, |t| state.long_poll.min(t))
        }
        Some(_) => {
            return Err(ApiError::invalid(
                "timeout",
                "must be a non-negative number of seconds",
            ))
        }
    };
    if body.retrieved_request_ids.len() > MAX_RETRIEVED_IDS {
        return Err(ApiError::invalid(
            "retrieved_request_ids",
            format!("at most {MAX_RETRIEVED_IDS} ids per poll"),
        ));
    }
    let feed = FeedKey {
        tenant,
        sampler_id: body.target.sampling_session_id,
        clone,
    };
    let poll = state
        .engine
        .poll_completions(&feed, prev_cursor, &body.retrieved_request_ids, timeout)
        .await?;
    let completions: Vec<Value> = poll
        .completions
        .iter()
        .map(|c| {
            let state = if c.failed { "failed" } else { "finished" };
            json!({"state": state, "request_id": c.request_id})
        })
        .collect();
    Ok(Json(
        json!({"completions": completions, "cursor": poll.cursor}),
    ))
}
