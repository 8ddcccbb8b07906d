//! Checkpoints: saves, loads' sources, listing, deletion, time to live, weights info.

use crate::downloads::{Grant, URL_LIFETIME_SECS};
use crate::responses::{Checkpoint, CheckpointsList, CopyWeights, Cursor, ExternalWeightsUrls};
use crate::routes::sessions::{create_copy_session, session_trace, TRACE_PREFIX};

use super::*;

#[derive(Deserialize)]
pub(super) struct SaveRequest {
    model_id: String,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    sampling_session_seq_id: Option<i64>,
    #[serde(default)]
    ttl_seconds: Option<u64>,
    #[serde(default)]
    overwrite: Option<bool>,
    #[serde(default)]
    user_metadata: Option<std::collections::BTreeMap<String, String>>,
    /// `snapshot` (fixed weights) or `inflight` (follows the run's later inflight saves).
    #[serde(default)]
    kind: Option<String>,
}

impl SaveRequest {
    /// The save's options; `overwrite` defaults to `overwrite_by_default` when the request does
    /// not say (the SDK's `save_state` always does; `save_weights_for_sampler` has no such flag
    /// and replaces).
    fn options(&self, overwrite_by_default: bool) -> SaveOptions {
        SaveOptions {
            ttl_seconds: self.ttl_seconds,
            overwrite: self.overwrite.unwrap_or(overwrite_by_default),
            user_metadata: self.user_metadata.clone(),
            encrypt_to: Vec::new(),
            inflight: self.kind.as_deref() == Some("inflight"),
        }
    }
}

fn checkpoint_name(given: Option<String>, prefix: &str) -> ApiResult<String> {
    let name = given.unwrap_or_else(|| new_id(prefix));
    validate_name(&name)?;
    Ok(name)
}

pub(super) async fn save_weights(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    JsonBody(body): JsonBody<SaveRequest>,
) -> ApiResult<Json<Promise>> {
    let options = body.options(false);
    let name = checkpoint_name(body.path, "state")?;
    let work = Work::Save {
        name,
        kind: CheckpointKind::State,
        sampler: None,
        options,
    };
    let id = state.submit(model_queue(&tenant, &body.model_id), work)?;
    Ok(promise(id, Some(body.model_id)))
}

pub(super) async fn save_weights_for_sampler(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    JsonBody(body): JsonBody<SaveRequest>,
) -> ApiResult<Json<Promise>> {
    if let Some(kind) = body.kind.as_deref() {
        if !["snapshot", "inflight"].contains(&kind) {
            return Err(ApiError::invalid(
                "kind",
                format!("`{kind}` is neither `snapshot` nor `inflight`"),
            ));
        }
    }
    // Without a name (save_weights_and_get_sampling_client) the result must carry a session.
    let sampler = body.path.is_none().then(|| SamplerKey {
        tenant: tenant.clone(),
        sampler_id: match body.sampling_session_seq_id {
            Some(n) => format!(
                "{}:sample:{n}:{}",
                body.model_id,
                uuid::Uuid::new_v4().simple()
            ),
            None => new_id("sampler"),
        },
    });
    let options = body.options(true);
    let name = checkpoint_name(body.path, "sampler")?;
    let work = Work::Save {
        name,
        kind: CheckpointKind::Sampler,
        sampler,
        options,
    };
    let id = state.submit(model_queue(&tenant, &body.model_id), work)?;
    Ok(promise(id, Some(body.model_id)))
}

pub(super) async fn list_run_checkpoints(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> ApiResult<Json<CheckpointsList>> {
    let checkpoints = state.engine.registry().checkpoints_of(&tenant, Some(&id));
    if checkpoints.is_empty() {
        state.engine.registry().model(&tenant, &id)?;
    }
    Ok(Json(CheckpointsList {
        checkpoints: checkpoints.iter().map(Checkpoint::from).collect(),
        cursor: None,
    }))
}

/// `RestClient.delete_checkpoint(run, "weights/NAME")` (and `..._from_tinker_path`).
pub(super) async fn delete_checkpoint(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(route): Path<(String, String, String)>,
) -> ApiResult<Json<Value>> {
    let path = routed_path(route);
    state.engine.registry().delete_checkpoint(&tenant, &path)?;
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
pub(super) struct TtlRequest {
    #[serde(default)]
    ttl_seconds: Option<u64>,
}

/// `set_checkpoint_ttl_from_tinker_path`: the checkpoint expires `ttl_seconds` from now, or
/// never with `null`.
pub(super) async fn set_checkpoint_ttl(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(route): Path<(String, String, String)>,
    JsonBody(body): JsonBody<TtlRequest>,
) -> ApiResult<Json<Value>> {
    let path = routed_path(route);
    state
        .engine
        .set_checkpoint_ttl(&tenant, &path, body.ttl_seconds)?;
    Ok(Json(json!({})))
}

pub(super) async fn list_checkpoints(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    JsonQuery(page): JsonQuery<Page>,
) -> Json<CheckpointsList> {
    // Newest first, as the SDK documents `list_user_checkpoints`.
    let all = state.engine.registry().checkpoints_of(&tenant, None);
    let total_count = all.len();
    let checkpoints = all
        .iter()
        .rev()
        .skip(page.offset)
        .take(page.limit.max(1))
        .map(Checkpoint::from)
        .collect();
    Json(CheckpointsList {
        checkpoints,
        cursor: Some(Cursor {
            offset: page.offset,
            limit: page.limit,
            total_count,
        }),
    })
}

#[derive(Deserialize)]
pub(super) struct WeightsInfoRequest {
    tinker_path: String,
}

pub(super) async fn weights_info(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    JsonBody(body): JsonBody<WeightsInfoRequest>,
) -> ApiResult<Json<Value>> {
    let c = state
        .engine
        .registry()
        .read_checkpoint(&tenant, &body.tinker_path, "weights_info")?;
    Ok(Json(json!({
        "base_model": state.engine.base().name,
        "is_lora": true,
        "lora_rank": c.spec.rank,
        "train_unembed": c.spec.train_unembed,
        "train_mlp": c.spec.train_mlp,
        "train_attn": c.spec.train_attn,
    })))
}

#[derive(Deserialize)]
pub(super) struct SaveExternalRequest {
    model_id: String,
    path: String,
    #[serde(default)]
    ttl_seconds: Option<u64>,
    #[serde(default)]
    age_encryption_recipients: Option<Vec<String>>,
}

/// `TrainingClient.save_weights_external`: the adapter in PEFT's layout, for download, each file
/// encrypted to the `age` recipients when the request names some. A name in use is replaced
/// (the SDK's CLI exports every download as `download`).
pub(super) async fn save_weights_external(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    JsonBody(body): JsonBody<SaveExternalRequest>,
) -> ApiResult<Json<Promise>> {
    let work = Work::Save {
        name: checkpoint_name(Some(body.path), "external")?,
        kind: CheckpointKind::External,
        sampler: None,
        options: SaveOptions {
            ttl_seconds: body.ttl_seconds,
            overwrite: true,
            user_metadata: None,
            encrypt_to: body.age_encryption_recipients.unwrap_or_default(),
            inflight: false,
        },
    };
    let id = state.submit(model_queue(&tenant, &body.model_id), work)?;
    Ok(promise(id, Some(body.model_id)))
}

/// The base of URLs given to the client: `--public-url`, or the scheme and host it reached us by.
pub(super) fn public_base(state: &AppState, headers: &HeaderMap) -> String {
    if let Some(url) = &state.public_url {
        return url.trim_end_matches('/').to_string();
    }
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let scheme = header("x-forwarded-proto").unwrap_or("http");
    let host = header("x-forwarded-host")
        .or_else(|| header("host"))
        .unwrap_or("127.0.0.1");
    format!("{scheme}://{host}")
}

/// The files of a checkpoint directory (names, sorted; no staging files).
fn files_of(dir: &std::path::Path) -> ApiResult<Vec<String>> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| EngineError::Internal(format!("listing {}: {e}", dir.display())))?;
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| !n.starts_with('.'))
        .collect();
    names.sort();
    Ok(names)
}

/// `RestClient.get_external_weights_urls`: one signed URL per file of an export, valid for an
/// hour, fetchable without credentials.
pub(super) async fn external_weights_urls(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    headers: HeaderMap,
    Path(route): Path<(String, String, String)>,
) -> ApiResult<Json<ExternalWeightsUrls>> {
    let path = routed_path(route);
    if parse_checkpoint_path(&path)?.1 != CheckpointKind::External {
        return Err(ApiError::invalid(
            "checkpoint_id",
            "only external weights (save_weights_external) have download URLs",
        ));
    }
    let record = state.engine.registry().checkpoint(&tenant, &path)?;
    let expires = loraloom_engine::registry::unix_now() as u64 + URL_LIFETIME_SECS;
    let base = public_base(&state, &headers);
    let urls = files_of(&record.dir)?
        .into_iter()
        .map(|file| {
            let token = state.downloads.sign(&Grant {
                tenant: tenant.clone(),
                path: path.clone(),
                file: file.clone(),
                expires,
            });
            let url = format!("{base}/api/v1/downloads/{token}/{file}");
            (file, url)
        })
        .collect();
    Ok(Json(ExternalWeightsUrls {
        urls,
        expires: iso(expires as f64),
    }))
}

/// A file of an export, by a signed URL (no API key: the signature is the credential). A
/// checkpoint deleted or expired since is gone.
pub(super) async fn download(
    State(state): State<AppState>,
    Path((token, file)): Path<(String, String)>,
) -> ApiResult<Response> {
    let grant = state
        .downloads
        .verify(&token, loraloom_engine::registry::unix_now() as u64)?;
    // A tenant whose keys were all revoked loses its links with them.
    if grant.file != file || !state.auth.knows_tenant(&grant.tenant) {
        return Err(ApiError::Forbidden(
            "this download link is not valid".into(),
        ));
    }
    if let Some(session) = grant.path.strip_prefix(TRACE_PREFIX) {
        let trace = session_trace(&state, &grant.tenant, session);
        return Ok(Json(trace).into_response());
    }
    let record = state
        .engine
        .registry()
        .checkpoint(&grant.tenant, &grant.path)?;
    // Signed names come from the directory listing; never a path.
    let gone = || {
        ApiError::Engine(EngineError::NotFound {
            what: "file".into(),
            id: file.clone(),
        })
    };
    if file.contains('/') || file.starts_with('.') {
        return Err(gone());
    }
    let opened = tokio::fs::File::open(record.dir.join(&file))
        .await
        .map_err(|_| gone())?;
    let length = opened.metadata().await.map_err(|_| gone())?.len();
    let body = axum::body::Body::from_stream(tokio_util::io::ReaderStream::new(opened));
    Ok((
        [
            (
                axum::http::header::CONTENT_TYPE,
                "application/octet-stream".to_string(),
            ),
            (axum::http::header::CONTENT_LENGTH, length.to_string()),
        ],
        body,
    )
        .into_response())
}

/// `RestClient.publish_checkpoint_from_tinker_path` (POST) and `unpublish_...` (DELETE): a
/// published checkpoint is readable by every tenant (loaded, sampled, copied), never changed by
/// any but its owner. 409 when it already is in that state.
pub(super) async fn publish_checkpoint(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(route): Path<(String, String, String)>,
    _body: RawBody,
) -> ApiResult<Json<Value>> {
    let path = routed_path(route);
    state
        .engine
        .registry()
        .set_checkpoint_public(&tenant, &path, true)?;
    Ok(Json(json!({})))
}

/// See [`publish_checkpoint`].
pub(super) async fn unpublish_checkpoint(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(route): Path<(String, String, String)>,
) -> ApiResult<Json<Value>> {
    let path = routed_path(route);
    state
        .engine
        .registry()
        .set_checkpoint_public(&tenant, &path, false)?;
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
pub(super) struct CopyRequest {
    source_path: String,
    #[serde(default)]
    session_id: Option<String>,
    #[serde(default)]
    model_seq_id: Option<i64>,
    #[serde(default)]
    destination_project_id: Option<String>,
    #[serde(default)]
    ttl_seconds: Option<u64>,
}

/// `RestClient.copy_weights`: a copy of a checkpoint the caller may read (its own or a
/// published one) in a run slot of its own that is never trained: `model_seq_id` of
/// `session_id`, or a new session in `destination_project_id`. Same kind and name; files are
/// shared with the source where the filesystem allows, and deleting either leaves the other.
pub(super) async fn copy_weights(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    JsonBody(body): JsonBody<CopyRequest>,
) -> ApiResult<Json<CopyWeights>> {
    // Before a destination session is made for it.
    state
        .engine
        .registry()
        .readable_checkpoint(&tenant, &body.source_path)?;
    let model_id = match (
        &body.session_id,
        body.model_seq_id,
        &body.destination_project_id,
    ) {
        (Some(session_id), Some(seq), _) => {
            session(&state, &tenant, session_id)?;
            format!("{session_id}:train:{seq}")
        }
        (None, None, Some(project)) => {
            let session_id = create_copy_session(&state, &tenant, project, &body.source_path)?;
            format!("{session_id}:train:0")
        }
        _ => {
            return Err(ApiError::invalid(
                "destination_project_id",
                "give a destination project, or both session_id and model_seq_id",
            ))
        }
    };
    let engine = state.engine.clone();
    let record = tokio::task::spawn_blocking(move || {
        engine.copy_checkpoint(&tenant, &body.source_path, &model_id, body.ttl_seconds)
    })
    .await
    .map_err(|e| EngineError::Internal(format!("copy task: {e}")))??;
    Ok(Json(CopyWeights {
        tinker_path: record.path,
    }))
}

/// The `tinker://` path of the checkpoint a route names
/// (`/training_runs/{id}/checkpoints/{kind}/{name}`), as the client wrote it (parsing, and
/// refusing what is not a checkpoint path, is the registry's).
fn routed_path((id, kind, name): (String, String, String)) -> String {
    format!("tinker://{id}/{kind}/{name}")
}
