//! Response bodies of the REST routes as typed structs mirroring the SDK's `tinker/types` (same
//! field names; `Option` where the SDK's field is optional), so a change of wire shape is a
//! change of type. Times are RFC 3339 strings, as the SDK's datetime fields parse them.

use std::collections::BTreeMap;

use loraloom_engine::{CheckpointKind, CheckpointRecord};
use serde::Serialize;
use serde_json::Value;

/// Unix seconds as an RFC 3339 UTC time, to the microsecond.
pub fn iso(t: f64) -> String {
    let nanos = (t * 1e6).round() as i128 * 1000;
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .and_then(|d| {
            d.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// Free-form metadata as the SDK's `dict[str, str]` (non-string values as their JSON text);
/// `None` unless it is an object.
pub fn string_map(v: &Value) -> Option<BTreeMap<String, String>> {
    match v {
        Value::Object(m) => Some(
            m.iter()
                .map(|(k, v)| {
                    let text = v.as_str().map_or_else(|| v.to_string(), str::to_string);
                    (k.clone(), text)
                })
                .collect(),
        ),
        _ => None,
    }
}

/// `types.Checkpoint`.
#[derive(Debug, Serialize)]
pub struct Checkpoint {
    /// `<kind>/<name>`.
    pub checkpoint_id: String,
    /// `training`, `sampler` or `external`.
    pub checkpoint_type: &'static str,
    /// When it was saved.
    pub time: String,
    /// Its `tinker://` path.
    pub tinker_path: String,
    /// Bytes on disk.
    pub size_bytes: u64,
    /// Published (readable by every tenant).
    pub public: bool,
    /// The client's metadata.
    pub user_metadata: Option<BTreeMap<String, String>>,
    /// When it is deleted.
    pub expires_at: Option<String>,
}

impl From<&CheckpointRecord> for Checkpoint {
    fn from(c: &CheckpointRecord) -> Self {
        Checkpoint {
            checkpoint_id: format!("{}/{}", c.kind.segment(), c.name),
            checkpoint_type: match c.kind {
                CheckpointKind::State => "training",
                CheckpointKind::Sampler => "sampler",
                CheckpointKind::External => "external",
            },
            time: iso(c.created),
            tinker_path: c.path.clone(),
            size_bytes: c.size_bytes,
            public: c.public,
            user_metadata: c.user_metadata.clone(),
            expires_at: c.expires_at.map(iso),
        }
    }
}

/// `types.Cursor` of offset-paged listings.
#[derive(Debug, Serialize)]
pub struct Cursor {
    /// First item of the page.
    pub offset: usize,
    /// Page size.
    pub limit: usize,
    /// Items in all pages.
    pub total_count: usize,
}

/// `types.CheckpointsListResponse`.
#[derive(Debug, Serialize)]
pub struct CheckpointsList {
    /// The page.
    pub checkpoints: Vec<Checkpoint>,
    /// Paging (absent for one run's checkpoints, which come whole).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cursor: Option<Cursor>,
}

/// `types.TrainingRun`.
#[derive(Debug, Serialize)]
pub struct TrainingRun {
    /// The run's id.
    pub training_run_id: String,
    /// Its base model.
    pub base_model: String,
    /// Its tenant.
    pub model_owner: String,
    /// Always a LoRA here.
    pub is_lora: bool,
    /// Never here (a run that fails to load is reported when used).
    pub corrupted: bool,
    /// Its LoRA rank.
    pub lora_rank: i64,
    /// Its last job's end.
    pub last_request_time: String,
    /// Its newest state checkpoint.
    pub last_checkpoint: Option<Checkpoint>,
    /// Its newest sampler checkpoint.
    pub last_sampler_checkpoint: Option<Checkpoint>,
    /// The client's metadata.
    pub user_metadata: Option<BTreeMap<String, String>>,
}

/// `types.TrainingRunsResponse`.
#[derive(Debug, Serialize)]
pub struct TrainingRunsList {
    /// The page.
    pub training_runs: Vec<TrainingRun>,
    /// Paging.
    pub cursor: Cursor,
}

/// `types.ExternalWeightsUrlsResponse`.
#[derive(Debug, Serialize)]
pub struct ExternalWeightsUrls {
    /// A signed URL per file.
    pub urls: BTreeMap<String, String>,
    /// When they stop working.
    pub expires: String,
}

/// `types.CopyWeightsResponse`.
#[derive(Debug, Serialize)]
pub struct CopyWeights {
    /// The copy's path.
    pub tinker_path: String,
}

/// `types.GetSessionResponse`.
#[derive(Debug, Serialize)]
pub struct GetSession {
    /// The session's runs.
    pub training_run_ids: Vec<String>,
    /// Its sampling sessions.
    pub sampler_ids: Vec<String>,
    /// The client's metadata.
    pub user_metadata: Option<BTreeMap<String, String>>,
    /// Its display name.
    pub display_name: Option<String>,
}

/// `types.ListSessionsResponse`.
#[derive(Debug, Serialize)]
pub struct ListSessions {
    /// Session ids, newest first.
    pub sessions: Vec<String>,
}

/// `types.SessionSearchCursor`.
#[derive(Debug, Serialize)]
pub struct SessionSearchCursor {
    /// The page's last session's creation time.
    pub last_created_at: String,
    /// And its id.
    pub last_session_id: String,
}

/// `types.SessionSummary`.
#[derive(Debug, Serialize)]
pub struct SessionSummary {
    /// Its id.
    pub session_id: String,
    /// When it was created.
    pub created_at: String,
    /// Its tenant.
    pub owner: String,
    /// Its project.
    pub project_id: String,
    /// `types.SessionStatus`.
    pub status: Value,
    /// Checkpoints of its runs.
    pub checkpoints_count: u64,
    /// Its display name.
    pub display_name: Option<String>,
    /// The client's metadata.
    pub user_metadata: Option<BTreeMap<String, String>>,
    /// Bytes of its runs' checkpoints.
    pub checkpoint_storage_bytes: u64,
}

/// `types.SessionSearchResponse`.
#[derive(Debug, Serialize)]
pub struct SessionSearch {
    /// The page, newest first.
    pub sessions: Vec<SessionSummary>,
    /// Where the next page starts (`None` after the last).
    pub next_cursor: Option<SessionSearchCursor>,
}

#[cfg(test)]
mod tests {
    use super::iso;

    #[test]
    fn iso_dates() {
        assert_eq!(iso(0.0), "1970-01-01T00:00:00Z");
        assert_eq!(iso(1_764_072_000.0), "2025-11-25T12:00:00Z");
        assert_eq!(iso(1_764_072_000.25), "2025-11-25T12:00:00.25Z");
    }
}

/// `types.BillingUsageResponse`: a tenant's metered usage (see `routes::billing`).
#[derive(Debug, Serialize)]
pub struct BillingUsage {
    /// Hourly events, by bucket, then largest quantity first.
    pub data: Vec<BillingUsageEvent>,
    /// The `user_metadata` of every session in `data`.
    pub sessions: BTreeMap<String, BillingUsageSession>,
    /// Always `null`: nothing is priced.
    pub cost_data_through: Option<String>,
}

/// `types.BillingUsageEvent`: one kind of usage of one session in one UTC hour.
#[derive(Debug, Serialize)]
pub struct BillingUsageEvent {
    /// The hour's start (RFC 3339).
    pub bucket_start: String,
    /// The next hour's start.
    pub bucket_end: String,
    /// The served base model.
    pub base_model: Option<String>,
    /// The tenant.
    pub user_id: Option<String>,
    /// The tenant, again (loraloom has no display names).
    pub user_name: Option<String>,
    /// The session of the run or sampling session the usage came from.
    pub session_id: Option<String>,
    /// That session's project.
    pub project_id: Option<String>,
    /// Always `null`.
    pub estimated_cost_usd: Option<f64>,
    /// Always `null`.
    pub effective_rate_usd_per_million_tokens: Option<f64>,
    /// Always `null`.
    pub effective_rate_usd_per_gigabyte_month: Option<f64>,
    /// `{"type": kind, ...quantity}`, the SDK's `BillingEventInfo`.
    pub event_info: Value,
}

/// `types.BillingUsageSession`.
#[derive(Debug, Serialize)]
pub struct BillingUsageSession {
    /// The session's metadata as strings.
    pub user_metadata: Option<BTreeMap<String, String>>,
}

/// `types.CurrentCheckpointStorageUsageResponse`.
#[derive(Debug, Serialize)]
pub struct StorageUsage {
    /// Always `null`: nothing is priced.
    pub effective_rate_usd_per_gigabyte_month: Option<f64>,
    /// One item per project.
    pub data: Vec<StorageUsageItem>,
}

/// `types.CurrentCheckpointStorageUsageItem`: a tenant's listed checkpoints in one project.
#[derive(Debug, Serialize)]
pub struct StorageUsageItem {
    /// The project of the checkpoints' sessions (`null`: a run outside any known session).
    pub project_id: Option<String>,
    /// The tenant.
    pub org_user_urn: Option<String>,
    /// Always `null`.
    pub user_email: Option<String>,
    /// The tenant.
    pub user_name: Option<String>,
    /// Listed checkpoints.
    pub checkpoint_count: usize,
    /// Their bytes on disk.
    pub size_bytes: u64,
    /// The same in gigabytes (10^9 bytes).
    pub size_gigabytes: f64,
    /// Always `null`.
    pub estimated_monthly_cost_usd: Option<f64>,
}
