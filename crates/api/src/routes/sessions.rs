//! Client sessions: create, heartbeat, finish.

use super::*;

pub(super) async fn create_session(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    _body: RawBody,
) -> ApiResult<Json<Value>> {
    let id = new_id("session");
    let session = Session {
        tenant,
        created: loraloom_engine::registry::unix_now(),
    };
    if let Some(store) = state.engine.registry().store() {
        store.put_session(&loraloom_engine::SessionRow {
            id: id.clone(),
            tenant: session.tenant.clone(),
            created: session.created,
        })?;
    }
    state.sessions.insert(id.clone(), session);
    Ok(Json(json!({"session_id": id, "type": "create_session"})))
}

/// The session `id` if the tenant owns it.
pub(super) fn session(state: &AppState, tenant: &str, id: &str) -> ApiResult<Session> {
    match state.sessions.get(id) {
        Some(s) if s.tenant == tenant => Ok(s.clone()),
        _ => Err(ApiError::Engine(EngineError::NotFound {
            what: "session".into(),
            id: id.to_string(),
        })),
    }
}

#[derive(Deserialize)]
pub(super) struct SessionRef {
    session_id: String,
}

pub(super) async fn heartbeat(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    JsonBody(body): JsonBody<SessionRef>,
) -> ApiResult<Json<Value>> {
    session(&state, &tenant, &body.session_id)?;
    Ok(Json(json!({"type": "session_heartbeat"})))
}

pub(super) async fn finish_session(Tenant(_tenant): Tenant, _body: RawBody) -> Json<Value> {
    Json(json!({}))
}
