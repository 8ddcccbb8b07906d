//! Futures: retrieve (long poll) and cancel.

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
