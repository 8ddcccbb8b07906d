//! `ServiceClient.create_custom_loss`: a session uploads a traced loss once, and its training
//! clients then name it in `forward_backward` (`loss_fn` `custom`, `loss_fn_config.loss_id`),
//! which runs it on the server (see `loraloom_model::custom_loss`).

use axum::extract::State;
use axum::Json;
use loraloom_engine::Output;
use loraloom_model::LossParam;
use serde::Deserialize;
use serde_json::Value;

use super::{promise, session};
use crate::error::ApiResult;
use crate::extract::{JsonBody, Tenant};
use crate::state::AppState;
use crate::wire::Promise;

/// One input of the loss as the SDK sends it.
#[derive(Deserialize)]
pub(super) struct WireLossInput {
    name: String,
    rank: u8,
}

#[derive(Deserialize)]
pub(super) struct CreateCustomLossRequest {
    session_id: String,
    custom_loss_seq_id: u64,
    name: String,
    inputs: Vec<WireLossInput>,
    graph: Value,
}

/// Validates the graph against loraloom's operations, stores the loss and answers a future
/// that is already done: `{"loss_id": "<session>:loss:<seq>"}`.
pub(super) async fn create_custom_loss(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    JsonBody(body): JsonBody<CreateCustomLossRequest>,
) -> ApiResult<Json<Promise>> {
    session(&state, &tenant, &body.session_id)?;
    let params = body
        .inputs
        .into_iter()
        .map(|i| LossParam {
            name: i.name,
            rank: i.rank,
        })
        .collect();
    let loss_id = state.engine.registry().create_custom_loss(
        &tenant,
        &body.session_id,
        body.custom_loss_seq_id,
        &body.name,
        params,
        &body.graph,
    )?;
    let id = state
        .engine
        .settled(&tenant, Output::CustomLoss { loss_id });
    Ok(promise(id, None))
}
