//! The axum router.

use std::sync::Arc;

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use loraloom_engine::BaseModelInfo;
use serde::Serialize;

/// Shared state of every handler.
#[derive(Clone)]
pub struct AppState {
    /// Public facts about the served base model.
    pub base: Arc<BaseModelInfo>,
}

#[derive(Serialize)]
struct Health {
    status: &'static str,
}

#[derive(Serialize)]
struct SupportedModel {
    model_name: String,
    max_context_length: i64,
    trainable: bool,
    sampleable: bool,
}

#[derive(Serialize)]
struct Capabilities {
    supported_models: Vec<SupportedModel>,
}

async fn healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}

async fn capabilities(State(state): State<AppState>) -> Json<Capabilities> {
    let info = &state.base;
    Json(Capabilities {
        supported_models: vec![SupportedModel {
            model_name: info.name.clone(),
            max_context_length: info.max_context_length,
            trainable: true,
            sampleable: true,
        }],
    })
}

/// Every route loraloom serves.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/api/v1/healthz", get(healthz))
        .route("/api/v1/get_server_capabilities", get(capabilities))
        .with_state(state)
}
