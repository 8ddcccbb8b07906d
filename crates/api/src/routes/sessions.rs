//! Client sessions: create, heartbeat, finish, read, list, search, move between projects.
//!
//! A session groups what one `ServiceClient` made: its runs are `{session}:train:{n}` and its
//! sampling sessions `{session}:sample:...` or `{run}:sample:...`, so the session of either is
//! the prefix of its id. Sessions are stored (the `sessions` table) and survive restarts.

use std::collections::BTreeMap;

use serde_json::Map;

use super::*;
use crate::responses::{
    GetSession, ListSessions, SessionSearch, SessionSearchCursor, SessionSummary,
};
use crate::routes::checkpoints::public_base;
use crate::state::{SessionDetails, SessionFinish};

/// The project of sessions created without one.
pub(super) const DEFAULT_PROJECT: &str = "default";
/// Longest display name, project id, tag or finish detail, in characters.
const MAX_LABEL_CHARS: usize = 256;
/// Most tags on one session.
const MAX_TAGS: usize = 64;
/// Largest `user_metadata`, as JSON.
const MAX_METADATA_BYTES: usize = 16 * 1024;
/// Longest finish detail, in characters.
const MAX_DETAIL_CHARS: usize = 4096;
/// Page size of a search when the request names none, and the most it may name.
const SEARCH_LIMIT: (i64, i64) = (50, 200);

#[derive(Deserialize, Default)]
pub(super) struct CreateSessionRequest {
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    user_metadata: Option<Map<String, Value>>,
    #[serde(default)]
    project_id: Option<String>,
    #[serde(default)]
    display_name: Option<String>,
}

/// Refuses a label (name, project, tag) that is empty, too long or holds control characters.
fn check_label(field: &str, value: &str) -> ApiResult<()> {
    if value.is_empty() || value.chars().count() > MAX_LABEL_CHARS {
        return Err(ApiError::invalid(
            field,
            format!("must be 1 to {MAX_LABEL_CHARS} characters"),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(ApiError::invalid(field, "must not hold control characters"));
    }
    Ok(())
}

impl CreateSessionRequest {
    /// The session's details, when every field is within bounds. Blank tags are dropped: the
    /// SDK splits `TINKER_TAGS` on commas, so `"a,"` or an empty variable sends `""`.
    fn details(mut self) -> ApiResult<SessionDetails> {
        self.tags.retain(|tag| !tag.trim().is_empty());
        if self.tags.len() > MAX_TAGS {
            return Err(ApiError::invalid(
                "tags",
                format!("at most {MAX_TAGS} tags"),
            ));
        }
        for (i, tag) in self.tags.iter().enumerate() {
            check_label(&format!("tags[{i}]"), tag)?;
        }
        if let Some(name) = &self.display_name {
            check_label("display_name", name)?;
        }
        if let Some(project) = &self.project_id {
            check_label("project_id", project)?;
        }
        if let Some(metadata) = &self.user_metadata {
            if Value::Object(metadata.clone()).to_string().len() > MAX_METADATA_BYTES {
                return Err(ApiError::invalid(
                    "user_metadata",
                    format!("larger than {MAX_METADATA_BYTES} bytes as JSON"),
                ));
            }
        }
        Ok(SessionDetails {
            tags: self.tags,
            user_metadata: self.user_metadata,
            display_name: self.display_name,
            project_id: self.project_id,
            finished: None,
        })
    }
}

pub(super) async fn create_session(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    RawBody(body): RawBody,
) -> ApiResult<Json<Value>> {
    // The SDK always sends a body; a bare POST (curl) creates a session with no details.
    let request: CreateSessionRequest = if body.iter().all(u8::is_ascii_whitespace) {
        CreateSessionRequest::default()
    } else {
        parse_json(&body)?
    };
    let id = register(&state, &tenant, request.details()?)?;
    Ok(Json(json!({"session_id": id, "type": "create_session"})))
}

/// Creates a session of `tenant` with `details`, stored; returns its id.
fn register(state: &AppState, tenant: &str, details: SessionDetails) -> ApiResult<String> {
    make_room(state, tenant)?;
    let id = new_id("session");
    let session = Session::new(
        tenant.to_string(),
        loraloom_engine::registry::unix_now(),
        details,
    );
    persist(state, &id, &session)?;
    state.sessions.insert(id.clone(), session);
    Ok(id)
}

/// A session for a copy made into `project` (`copy_weights` without a session), finished at
/// once: it only gives the copy's run slot a project.
pub(super) fn create_copy_session(
    state: &AppState,
    tenant: &str,
    project: &str,
    source: &str,
) -> ApiResult<String> {
    check_label("destination_project_id", project)?;
    let details = SessionDetails {
        display_name: Some(format!(
            "copy of {}",
            source.chars().take(200).collect::<String>()
        )),
        project_id: Some(project.to_string()),
        finished: Some(SessionFinish {
            reason: "success".into(),
            detail: Some("copy_weights".into()),
            at: loraloom_engine::registry::unix_now(),
        }),
        ..SessionDetails::default()
    };
    register(state, tenant, details)
}

/// Writes a session's row (when the server keeps a store).
fn persist(state: &AppState, id: &str, session: &Session) -> ApiResult<()> {
    if let Some(store) = state.engine.registry().store() {
        let details_json = serde_json::to_string(&session.details)
            .map_err(|e| EngineError::Internal(format!("session details: {e}")))?;
        store.put_session(&loraloom_engine::SessionRow {
            id: id.to_string(),
            tenant: session.tenant.clone(),
            created: session.created,
            details_json,
        })?;
    }
    Ok(())
}

fn no_session(id: &str) -> ApiError {
    ApiError::Engine(EngineError::NotFound {
        what: "session".into(),
        id: id.to_string(),
    })
}

/// The session `id` if the tenant owns it, finished or not.
fn owned(state: &AppState, tenant: &str, id: &str) -> ApiResult<Session> {
    match state.sessions.get(id) {
        Some(s) if s.tenant == tenant => Ok(s.clone()),
        _ => Err(no_session(id)),
    }
}

/// The session `id` if the tenant owns it and its client has not finished it: what new runs
/// and sampling sessions are created in, and what heartbeats keep alive.
pub(super) fn session(state: &AppState, tenant: &str, id: &str) -> ApiResult<Session> {
    let session = owned(state, tenant, id)?;
    match &session.details.finished {
        Some(finish) => Err(ApiError::SessionFinished(format!(
            "session {id} was finished by its client ({}); create a new ServiceClient",
            finish.reason
        ))),
        None => {
            session.heard_from.touch();
            Ok(session)
        }
    }
}

/// Applies `change` to the tenant's session `id` and stores the result, under the session's
/// map entry (so two changes of one session are stored in the order they were made).
fn update(
    state: &AppState,
    tenant: &str,
    id: &str,
    change: impl FnOnce(&mut SessionDetails),
) -> ApiResult<()> {
    let mut entry = match state.sessions.get_mut(id) {
        Some(entry) if entry.tenant == tenant => entry,
        _ => return Err(no_session(id)),
    };
    let mut changed = entry.clone();
    change(&mut changed.details);
    persist(state, id, &changed)?;
    *entry = changed;
    Ok(())
}

#[derive(Deserialize)]
pub(super) struct SessionRef {
    session_id: String,
}

/// A heartbeat of a finished session answers 410, which ends the SDK's heartbeat loop.
pub(super) async fn heartbeat(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    JsonBody(body): JsonBody<SessionRef>,
) -> ApiResult<Json<Value>> {
    session(&state, &tenant, &body.session_id)?;
    Ok(Json(json!({"type": "session_heartbeat"})))
}

#[derive(Deserialize)]
pub(super) struct FinishRequest {
    reason: Tagged,
    #[serde(default)]
    detail: Option<String>,
}

/// A `{"type": ...}` object.
#[derive(Deserialize)]
pub(super) struct Tagged {
    #[serde(rename = "type")]
    kind: String,
}

const FINISH_REASONS: [&str; 3] = ["success", "errored", "interrupted"];

/// `ServiceClient.close(status, detail)`: the first finish is kept; later ones change nothing.
pub(super) async fn finish_session(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<FinishRequest>,
) -> ApiResult<Json<Value>> {
    if !FINISH_REASONS.contains(&body.reason.kind.as_str()) {
        return Err(ApiError::invalid(
            "reason.type",
            format!("must be one of {FINISH_REASONS:?}"),
        ));
    }
    if let Some(detail) = &body.detail {
        if detail.chars().count() > MAX_DETAIL_CHARS {
            return Err(ApiError::invalid(
                "detail",
                format!("at most {MAX_DETAIL_CHARS} characters"),
            ));
        }
    }
    update(&state, &tenant, &id, |details| {
        details.finished.get_or_insert(SessionFinish {
            reason: body.reason.kind,
            detail: body.detail,
            at: loraloom_engine::registry::unix_now(),
        });
    })?;
    Ok(Json(json!({})))
}

/// Keeps `tenant` within `--max-sessions-per-tenant`: at the limit, its finished sessions, then
/// its oldest, that hold nothing (no training run, sampling session or checkpoint of theirs exists) are
/// forgotten, row and all, to make room for one more; when every session holds something the
/// request is refused, naming the flag. Concurrent creations may pass the limit by a few.
fn make_room(state: &AppState, tenant: &str) -> ApiResult<()> {
    let limit = state.max_sessions_per_tenant;
    if limit == 0 {
        return Ok(());
    }
    // Finished sessions go first, then the oldest.
    let mut mine: Vec<(bool, f64, String)> = state
        .sessions
        .iter()
        .filter(|e| e.tenant == tenant)
        .map(|e| (e.details.finished.is_none(), e.created, e.key().clone()))
        .collect();
    if mine.len() < limit {
        return Ok(());
    }
    mine.sort_by(|a, b| {
        (a.0, a.1)
            .partial_cmp(&(b.0, b.1))
            .unwrap_or(std::cmp::Ordering::Equal)
            .then_with(|| a.2.cmp(&b.2))
    });
    let mut excess = mine.len() + 1 - limit;
    let registry = state.engine.registry();
    let runs: Vec<String> = registry
        .models_of(tenant)
        .iter()
        .map(|e| e.key.model_id.clone())
        .chain(
            registry
                .samplers_of(tenant)
                .iter()
                .map(|e| e.key.sampler_id.clone()),
        )
        .chain(
            registry
                .checkpoints_of(tenant, None)
                .into_iter()
                .map(|c| c.model_id),
        )
        .collect();
    for (_, _, id) in mine {
        if excess == 0 {
            break;
        }
        if runs.iter().any(|child| belongs_to(child, &id)) {
            continue;
        }
        // The map entry first: a change of the session racing this one then finds no session
        // instead of writing its row back after the delete.
        state.sessions.remove(&id);
        if let Some(store) = registry.store() {
            store.delete_session(&id)?;
        }
        excess -= 1;
    }
    if excess > 0 {
        return Err(ApiError::Engine(EngineError::LimitReached(format!(
            "this tenant holds {limit} sessions, each with a training run, sampling session or \
             checkpoint (--max-sessions-per-tenant {limit}); unload runs or delete checkpoints first"
        ))));
    }
    Ok(())
}

/// Whether a run or sampling session id belongs to session `id`.
pub(super) fn belongs_to(child_id: &str, id: &str) -> bool {
    child_id
        .strip_prefix(id)
        .is_some_and(|rest| rest.starts_with(':'))
}

/// The session a run or sampling session id belongs to: runs are `{session}:train:{n}`,
/// sampling sessions `{session}:sample:...` or `{run}:sample:...`. Sampling sessions made
/// without one (`direct:{checkpoint path}` for `/api/v1/sample`, which may name another
/// tenant's published checkpoint) belong to none.
pub(super) fn session_of(id: &str) -> Option<&str> {
    if id.starts_with("direct:") {
        return None;
    }
    let cut = [":train:", ":sample:"]
        .iter()
        .filter_map(|marker| id.find(marker))
        .min()?;
    Some(&id[..cut])
}

/// The session `id` when it is `tenant`'s.
pub(super) fn own_session(state: &AppState, tenant: &str, id: &str) -> Option<Session> {
    state
        .sessions
        .get(id)
        .filter(|s| s.tenant == tenant)
        .map(|s| s.clone())
}

/// The project of a session.
pub(super) fn project_of(session: &Session) -> &str {
    session
        .details
        .project_id
        .as_deref()
        .unwrap_or(DEFAULT_PROJECT)
}

/// `RestClient.get_session`: the session's runs and sampling sessions.
pub(super) async fn get_session(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> ApiResult<Json<GetSession>> {
    let session = owned(&state, &tenant, &id)?;
    let registry = state.engine.registry();
    let mut runs: Vec<String> = registry
        .models_of(&tenant)
        .iter()
        .map(|e| e.key.model_id.clone())
        .filter(|m| belongs_to(m, &id))
        .collect();
    runs.sort();
    let mut samplers: Vec<String> = registry
        .samplers_of(&tenant)
        .iter()
        .filter(|e| belongs_to(&e.key.sampler_id, &id))
        .map(|e| e.key.sampler_id.clone())
        .collect();
    samplers.sort();
    Ok(Json(GetSession {
        training_run_ids: runs,
        sampler_ids: samplers,
        user_metadata: metadata_strings(&session.details),
        display_name: session.details.display_name,
    }))
}

/// The metadata as the SDK's `dict[str, str]`.
pub(super) fn metadata_strings(details: &SessionDetails) -> Option<BTreeMap<String, String>> {
    details
        .user_metadata
        .as_ref()
        .and_then(|m| string_map(&Value::Object(m.clone())))
}

/// The tenant's sessions, newest first (ties by id, descending).
fn sessions_of(state: &AppState, tenant: &str) -> Vec<(String, Session)> {
    let mut mine: Vec<(String, Session)> = state
        .sessions
        .iter()
        .filter(|s| s.tenant == tenant)
        .map(|s| (s.key().clone(), s.value().clone()))
        .collect();
    mine.sort_by(|a, b| {
        micros(b.1.created)
            .cmp(&micros(a.1.created))
            .then_with(|| b.0.cmp(&a.0))
    });
    mine
}

/// Unix seconds in whole microseconds: the precision of the times the API reports, so that a
/// time read back from a cursor compares equal to the session it came from.
fn micros(t: f64) -> i64 {
    (t * 1e6).round() as i64
}

/// `RestClient.list_sessions`: ids, newest first.
pub(super) async fn list_sessions(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    JsonQuery(page): JsonQuery<Page>,
) -> Json<ListSessions> {
    let sessions = sessions_of(&state, &tenant)
        .into_iter()
        .skip(page.offset)
        .take(page.limit)
        .map(|(id, _)| id)
        .collect();
    Json(ListSessions { sessions })
}

#[derive(Deserialize)]
pub(super) struct ProjectRequest {
    #[serde(default)]
    project_id: Option<String>,
}

/// `RestClient.assign_session_project`: moves the session (its runs and sampling sessions
/// with it) into a project. There is no way back to no project, as the SDK documents.
pub(super) async fn assign_project(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<ProjectRequest>,
) -> ApiResult<Json<Value>> {
    let project = body
        .project_id
        .ok_or_else(|| ApiError::invalid("project_id", "required"))?;
    check_label("project_id", &project)?;
    update(&state, &tenant, &id, |details| {
        details.project_id = Some(project.clone());
    })?;
    state.engine.registry().audit(
        &tenant,
        "project_session_assigned",
        json!({"actor": tenant, "session_id": id, "project_id": project}),
    );
    Ok(Json(json!({})))
}

/// Whose sessions a search covers. Every owner but the caller is invisible here: "accessible"
/// means the caller's own, and a list of owners matches only when it names the caller.
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(super) enum SearchOwner {
    Own,
    Accessible,
    User { owner_urns: Vec<String> },
}

/// A status a search matches.
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(super) enum StatusQuery {
    Active,
    Cancelled,
    Failed,
    ClientFinished {
        #[serde(default)]
        reasons: Option<Vec<String>>,
    },
}

impl StatusQuery {
    fn matches(&self, finished: Option<&SessionFinish>) -> bool {
        match (self, finished) {
            (StatusQuery::Active, None) => true,
            (StatusQuery::ClientFinished { reasons }, Some(f)) => {
                reasons.as_ref().is_none_or(|r| r.contains(&f.reason))
            }
            // Nothing cancels or fails a whole session here.
            _ => false,
        }
    }
}

#[derive(Deserialize)]
pub(super) struct SearchCursor {
    last_created_at: String,
    last_session_id: String,
}

#[derive(Deserialize)]
pub(super) struct SearchRequest {
    #[serde(default)]
    session_id: Option<String>,
    #[serde(default)]
    project_ids: Option<Vec<String>>,
    #[serde(default)]
    user_metadata: BTreeMap<String, String>,
    #[serde(default)]
    display_name: Option<String>,
    #[serde(default)]
    owner: Option<SearchOwner>,
    #[serde(default)]
    statuses: Option<Vec<StatusQuery>>,
    #[serde(default)]
    limit: Option<i64>,
    #[serde(default)]
    cursor: Option<SearchCursor>,
}

impl SearchRequest {
    /// Whether `session` (of `tenant`) matches every filter.
    fn matches(&self, tenant: &str, id: &str, session: &Session) -> bool {
        let details = &session.details;
        let name_matches = |query: &str| {
            let name = details.display_name.as_deref().unwrap_or("").to_lowercase();
            query
                .split_whitespace()
                .all(|word| name.contains(&word.to_lowercase()))
        };
        let named = match (&self.session_id, &self.display_name) {
            (None, None) => true,
            (Some(sid), None) => sid == id,
            (None, Some(q)) => name_matches(q),
            (Some(sid), Some(q)) => sid == id || name_matches(q),
        };
        let owner = match &self.owner {
            None | Some(SearchOwner::Own | SearchOwner::Accessible) => true,
            Some(SearchOwner::User { owner_urns }) => owner_urns.iter().any(|u| u == tenant),
        };
        let project = self
            .project_ids
            .as_ref()
            .is_none_or(|p| p.iter().any(|p| p == project_of(session)));
        let metadata = self.user_metadata.iter().all(|(k, v)| {
            details
                .user_metadata
                .as_ref()
                .and_then(|m| m.get(k))
                .is_some_and(|x| x.as_str().map_or_else(|| x.to_string(), str::to_string) == *v)
        });
        let status = self
            .statuses
            .as_ref()
            .is_none_or(|s| s.iter().any(|q| q.matches(details.finished.as_ref())));
        named && owner && project && metadata && status
    }
}

/// A session's status as the SDK's `SessionStatus`.
fn status_json(finished: Option<&SessionFinish>) -> Value {
    match finished {
        None => json!({"type": "active"}),
        Some(f) => json!({
            "type": "client_finished",
            "reason": {"type": f.reason},
            "detail": f.detail,
        }),
    }
}

/// `RestClient.search_sessions`: one page of the caller's matching sessions, newest first.
pub(super) async fn search_sessions(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    JsonBody(request): JsonBody<SearchRequest>,
) -> ApiResult<Json<SessionSearch>> {
    let limit = request.limit.unwrap_or(SEARCH_LIMIT.0);
    if !(1..=SEARCH_LIMIT.1).contains(&limit) {
        return Err(ApiError::invalid(
            "limit",
            format!("must be 1 to {}", SEARCH_LIMIT.1),
        ));
    }
    if let Some(name) = &request.display_name {
        check_label("display_name", name)?;
    }
    if request.statuses.as_ref().is_some_and(Vec::is_empty) {
        return Err(ApiError::invalid(
            "statuses",
            "must not be empty (omit it to match every status)",
        ));
    }
    let after = match &request.cursor {
        None => None,
        Some(c) => {
            let at = time::OffsetDateTime::parse(
                &c.last_created_at,
                &time::format_description::well_known::Rfc3339,
            )
            .map_err(|e| ApiError::invalid("cursor.last_created_at", e.to_string()))?;
            let at = i64::try_from(at.unix_timestamp_nanos() / 1000)
                .map_err(|_| ApiError::invalid("cursor.last_created_at", "out of range"))?;
            Some((at, c.last_session_id.as_str()))
        }
    };
    let checkpoints = state.engine.registry().checkpoints_of(&tenant, None);
    let mut matching = sessions_of(&state, &tenant)
        .into_iter()
        .filter(|(id, s)| {
            after.is_none_or(|(at, last)| (micros(s.created), id.as_str()) < (at, last))
        })
        .filter(|(id, s)| request.matches(&tenant, id, s));
    let page: Vec<(String, Session)> = matching.by_ref().take(limit as usize).collect();
    let more = matching.next().is_some();
    let next_cursor = match (more, page.last()) {
        (true, Some((id, s))) => Some(SessionSearchCursor {
            last_created_at: iso(s.created),
            last_session_id: id.clone(),
        }),
        _ => None,
    };
    let sessions = page
        .iter()
        .map(|(id, s)| {
            let (count, bytes) = checkpoints
                .iter()
                .filter(|c| belongs_to(&c.model_id, id))
                .fold((0u64, 0u64), |(n, b), c| (n + 1, b + c.size_bytes));
            SessionSummary {
                session_id: id.clone(),
                created_at: iso(s.created),
                owner: tenant.clone(),
                project_id: project_of(s).to_string(),
                status: status_json(s.details.finished.as_ref()),
                checkpoints_count: count,
                display_name: s.details.display_name.clone(),
                user_metadata: metadata_strings(&s.details),
                checkpoint_storage_bytes: bytes,
            }
        })
        .collect();
    Ok(Json(SessionSearch {
        sessions,
        next_cursor,
    }))
}

/// The grant path of a session's trace (download URLs name it instead of a checkpoint).
pub(super) const TRACE_PREFIX: &str = "trace:";

/// `RestClient.export_session_trace`: a download URL of the session's timeline, built when
/// fetched, so it is always ready (the SDK polls until it is).
pub(super) async fn trace_export(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    owned(&state, &tenant, &id)?;
    let expires =
        loraloom_engine::registry::unix_now() as u64 + crate::downloads::URL_LIFETIME_SECS;
    let file = format!("{id}.json");
    let token = state.downloads.sign(&crate::downloads::Grant {
        tenant,
        path: format!("{TRACE_PREFIX}{id}"),
        file: file.clone(),
        expires,
    });
    let url = format!(
        "{}/api/v1/downloads/{token}/{file}",
        public_base(&state, &headers)
    );
    Ok(Json(json!({"status": "ready", "url": url})))
}

/// The session's jobs as a Chrome trace (JSON, which Perfetto opens): one track per run or
/// sampling session, one slice per job from submission to outcome.
pub(super) fn session_trace(state: &AppState, tenant: &str, id: &str) -> Value {
    let jobs = state.engine.timeline(tenant, |queue| belongs_to(queue, id));
    let mut tracks: Vec<&str> = jobs.iter().map(|j| &*j.queue_id).collect();
    tracks.sort();
    tracks.dedup();
    let track = |queue: &str| tracks.binary_search(&queue).unwrap_or(0) + 1;
    let mut events: Vec<Value> = tracks
        .iter()
        .map(|q| json!({"name": "thread_name", "ph": "M", "pid": 1, "tid": track(q), "args": {"name": q}}))
        .collect();
    events.push(json!({"name": "process_name", "ph": "M", "pid": 1, "args": {"name": format!("session {id}")}}));
    events.extend(jobs.iter().map(|j| {
        json!({
            "name": j.kind,
            "cat": "job",
            "ph": "X",
            "pid": 1,
            "tid": track(&j.queue_id),
            "ts": micros(j.enqueued),
            "dur": micros(j.finished) - micros(j.enqueued),
            "args": {"request_id": j.request_id.to_string(), "ok": j.ok},
        })
    }));
    json!({"traceEvents": events, "displayTimeUnit": "ms"})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_and_sampling_sessions_belong_to_their_session() {
        assert_eq!(session_of("s1:train:0"), Some("s1"));
        assert_eq!(session_of("s1:sample:3"), Some("s1"));
        assert_eq!(session_of("s1:train:0:sample:2"), Some("s1"));
        assert_eq!(session_of("loose"), None);
        assert_eq!(
            session_of("direct:tinker://s1:train:0/sampler_weights/w"),
            None
        );
    }
}
