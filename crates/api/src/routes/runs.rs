//! Training runs: create (fresh or from a checkpoint), info, unload, forward/backward passes,
//! optimizer steps, listing.

use crate::responses::{Checkpoint, Cursor, TrainingRun, TrainingRunsList};

use super::*;

#[derive(Deserialize)]
pub(super) struct CreateModelRequest {
    session_id: String,
    #[serde(default)]
    model_seq_id: Option<i64>,
    base_model: String,
    #[serde(default)]
    user_metadata: Option<Value>,
    #[serde(default)]
    lora_config: Option<LoraConfig>,
    #[serde(default)]
    optimizer_config: Option<OptimizerFamily>,
}

/// The optimizer family a run or a step names (`optimizer_config`, `optimizer_params`).
#[derive(Deserialize)]
pub(super) struct OptimizerFamily {
    #[serde(rename = "type")]
    family: String,
}

impl OptimizerFamily {
    /// Refuses any family but AdamW, naming `field`.
    fn check(&self, field: &str) -> ApiResult<()> {
        if self.family == "adamw" {
            return Ok(());
        }
        Err(ApiError::invalid(
            format!("{field}.type"),
            format!(
                "optimizer `{}` is not supported; this server trains with AdamW (`adamw`)",
                self.family
            ),
        ))
    }
}

fn run_id(session_id: &str, seq: Option<i64>) -> String {
    match seq {
        Some(n) => format!("{session_id}:train:{n}"),
        None => format!("{session_id}:train:{}", uuid::Uuid::new_v4().simple()),
    }
}

pub(super) async fn create_model(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    JsonBody(body): JsonBody<CreateModelRequest>,
) -> ApiResult<Json<Promise>> {
    session(&state, &tenant, &body.session_id)?;
    check_base_model(&state, &body.base_model)?;
    if let Some(optimizer) = &body.optimizer_config {
        optimizer.check("optimizer_config")?;
    }
    let lora = body.lora_config.unwrap_or(LoraConfig {
        rank: 32,
        seed: None,
        train_mlp: true,
        train_attn: true,
        train_unembed: true,
    });
    let spec = LoraSpec {
        rank: lora.rank,
        alpha: LORA_ALPHA,
        seed: lora.seed.unwrap_or_else(rand_seed),
        train_attn: lora.train_attn,
        train_mlp: lora.train_mlp,
        train_unembed: lora.train_unembed,
    };
    if !state.is_journaled_retry(&tenant) {
        make_room_for_run(&state, &tenant)?;
    }
    let model_id = run_id(&body.session_id, body.model_seq_id);
    let key = ModelKey {
        tenant,
        model_id: model_id.clone(),
    };
    let id = state.create_model(key, spec, body.user_metadata.unwrap_or(Value::Null), None)?;
    Ok(promise(id, Some(model_id)))
}

fn rand_seed() -> u64 {
    let u = uuid::Uuid::new_v4();
    u.as_u64_pair().0
}

#[derive(Deserialize)]
pub(super) struct ModelRef {
    model_id: String,
}

pub(super) async fn get_info(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    JsonBody(body): JsonBody<ModelRef>,
) -> ApiResult<Json<Value>> {
    let entry = state.engine.registry().model(&tenant, &body.model_id)?;
    let base = state.engine.base();
    Ok(Json(json!({
        "type": "get_info",
        "model_id": body.model_id,
        "model_data": {"arch": base.config.architecture.name(), "model_name": entry.base_model, "tokenizer_id": state.tokenizer_id},
        "is_lora": true,
        "lora_rank": entry.spec.rank,
        "model_name": entry.base_model,
    })))
}

pub(super) async fn unload_model(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    JsonBody(body): JsonBody<ModelRef>,
) -> ApiResult<Json<Value>> {
    state
        .engine
        .registry()
        .remove_model(&tenant, &body.model_id)?;
    Ok(Json(
        json!({"model_id": body.model_id, "type": "unload_model"}),
    ))
}

fn submit_train(
    state: &AppState,
    tenant: &str,
    mut input: wire::TrainInput,
) -> ApiResult<Json<Promise>> {
    if input.loss.needs_recorded_samples() {
        crate::provenance::resolve(
            &state.engine,
            tenant,
            &input.model_id,
            &mut input.data,
            &input.provenance,
        )?;
    }
    let work = Work::ForwardBackward {
        data: input.data,
        loss: input.loss,
        backward: input.backward,
    };
    let id = state.submit(model_queue(tenant, &input.model_id), work)?;
    Ok(promise(id, Some(input.model_id)))
}

pub(super) async fn forward_backward(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> ApiResult<Json<Promise>> {
    let custom = custom_losses(&state, &tenant);
    let input = if is_protobuf(&headers) {
        let req = crate::proto::ForwardBackwardRequest::decode(body.as_ref()).map_err(|e| {
            ApiError::BadRequest(format!("malformed protobuf ForwardBackwardRequest: {e}"))
        })?;
        wire::proto_train_input(req, &custom)?
    } else {
        parse_json::<wire::JsonForwardBackwardRequest>(&body)?.into_input(false, &custom)?
    };
    submit_train(&state, &tenant, input)
}

pub(super) async fn forward(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    JsonBody(body): JsonBody<wire::JsonForwardBackwardRequest>,
) -> ApiResult<Json<Promise>> {
    let input = body.into_input(true, &custom_losses(&state, &tenant))?;
    submit_train(&state, &tenant, input)
}

/// The tenant's custom losses by id (`create_custom_loss`), for a training request.
fn custom_losses<'a>(
    state: &'a AppState,
    tenant: &'a str,
) -> impl Fn(&str) -> ApiResult<std::sync::Arc<loraloom_model::CustomLoss>> + 'a {
    move |id| Ok(state.engine.registry().custom_loss(tenant, id)?)
}

#[derive(Deserialize)]
pub(super) struct OptimStepRequest {
    model_id: String,
    #[serde(default)]
    adam_params: Option<WireAdamParams>,
    /// What the SDK sends instead of `adam_params` for another optimizer family.
    #[serde(default)]
    optimizer_params: Option<OptimizerFamily>,
}

pub(super) async fn optim_step(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    JsonBody(body): JsonBody<OptimStepRequest>,
) -> ApiResult<Json<Promise>> {
    if let Some(other) = &body.optimizer_params {
        other.check("optimizer_params")?;
    }
    let params = body
        .adam_params
        .ok_or_else(|| ApiError::invalid("adam_params", "missing field `adam_params`"))?
        .into_params()?;
    let id = state.submit(
        model_queue(&tenant, &body.model_id),
        Work::OptimStep { params },
    )?;
    Ok(promise(id, Some(body.model_id)))
}

#[derive(Deserialize)]
pub(super) struct LoadRequest {
    #[serde(default)]
    model_id: Option<String>,
    path: String,
    #[serde(default)]
    optimizer: bool,
    #[serde(default)]
    session_id: Option<String>,
    #[serde(default)]
    model_seq_id: Option<i64>,
    #[serde(default)]
    user_metadata: Option<Value>,
    /// The optimizer of a run created from a checkpoint's weights: AdamW or refused.
    #[serde(default)]
    optimizer_config: Option<OptimizerFamily>,
    /// A run created from a checkpoint may name its base model: this server's or refused.
    #[serde(default)]
    base_model: Option<String>,
}

pub(super) async fn load_weights(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    JsonBody(body): JsonBody<LoadRequest>,
) -> ApiResult<Json<Promise>> {
    parse_checkpoint_path(&body.path)?;
    if let Some(optimizer) = &body.optimizer_config {
        optimizer.check("optimizer_config")?;
    }
    if let Some(base_model) = &body.base_model {
        check_base_model(&state, base_model)?;
    }
    if let Some(model_id) = body.model_id {
        let work = Work::Load {
            path: body.path,
            with_optimizer: body.optimizer,
        };
        let id = state.submit(model_queue(&tenant, &model_id), work)?;
        return Ok(promise(id, Some(model_id)));
    }
    // create_training_client_from_state: a new run in the session, initialised from the path.
    let session_id = body.session_id.ok_or_else(|| {
        ApiError::invalid("model_id", "either model_id or session_id is required")
    })?;
    session(&state, &tenant, &session_id)?;
    let record: CheckpointRecord = state
        .engine
        .registry()
        .readable_checkpoint(&tenant, &body.path)?;
    if !state.is_journaled_retry(&tenant) {
        make_room_for_run(&state, &tenant)?;
    }
    let model_id = run_id(&session_id, body.model_seq_id);
    let key = ModelKey {
        tenant,
        model_id: model_id.clone(),
    };
    let id = state.create_model(
        key,
        record.spec,
        body.user_metadata.unwrap_or(Value::Null),
        Some((body.path, body.optimizer)),
    )?;
    Ok(promise(id, Some(model_id)))
}

fn training_run(
    state: &AppState,
    tenant: &str,
    entry: &loraloom_engine::registry::ModelEntry,
) -> TrainingRun {
    let checkpoints = state
        .engine
        .registry()
        .checkpoints_of(tenant, Some(&entry.key.model_id));
    let last = |kind| {
        checkpoints
            .iter()
            .rev()
            .find(|c| c.kind == kind)
            .map(Checkpoint::from)
    };
    TrainingRun {
        training_run_id: entry.key.model_id.clone(),
        base_model: entry.base_model.clone(),
        model_owner: tenant.to_string(),
        is_lora: true,
        corrupted: false,
        lora_rank: entry.spec.rank,
        last_request_time: iso(entry.last_access()),
        last_checkpoint: last(CheckpointKind::State),
        last_sampler_checkpoint: last(CheckpointKind::Sampler),
        user_metadata: string_map(&entry.user_metadata),
    }
}

pub(super) async fn list_runs(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    JsonQuery(page): JsonQuery<Page>,
) -> Json<TrainingRunsList> {
    let mut runs = state.engine.registry().models_of(&tenant);
    if let Some(project) = &page.project_id {
        // A run belongs to its session's project.
        runs.retain(|e| {
            session_of(&e.key.model_id)
                .and_then(|id| state.sessions.get(id))
                .is_some_and(|s| project_of(&s) == project)
        });
    }
    let total_count = runs.len();
    let training_runs = runs
        .iter()
        .skip(page.offset)
        .take(page.limit)
        .map(|e| training_run(&state, &tenant, e))
        .collect();
    Json(TrainingRunsList {
        training_runs,
        cursor: Cursor {
            offset: page.offset,
            limit: page.limit,
            total_count,
        },
    })
}

pub(super) async fn get_run(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> ApiResult<Json<TrainingRun>> {
    let entry = state.engine.registry().model(&tenant, &id)?;
    Ok(Json(training_run(&state, &tenant, &entry)))
}
