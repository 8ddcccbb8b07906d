//! Metered usage for `AdminClient.get_billing_usage` and
//! `get_current_checkpoint_storage_usage` (`tinker billing usage` and `tinker billing
//! checkpoint-storage`). A tenant is its own organization: it sees its own usage and no one
//! else's. loraloom prices nothing, so every cost and rate is `null`; the quantities are what
//! the engine metered (`loraloom_engine::usage`): tokens per hour by the session that ran them,
//! checkpoints written, and checkpoint storage in gigabyte-hours (10^9 bytes).

use std::collections::BTreeMap;

use time::format_description::well_known::{Iso8601, Rfc3339};
use time::{OffsetDateTime, PrimitiveDateTime};

use super::*;
use crate::responses::{
    BillingUsage, BillingUsageEvent, BillingUsageSession, StorageUsage, StorageUsageItem,
};
use loraloom_engine::usage::HOUR_SECONDS;
use loraloom_engine::{UsageKind, UsageRow};

/// The longest window one request may ask for, as Tinker's API allows.
const MAX_WINDOW_SECONDS: f64 = 14.0 * 24.0 * HOUR_SECONDS;

/// Bytes in the storage unit (a gigabyte).
const GIGABYTE: f64 = 1e9;

/// The query of `GET /api/v1/billing/usage/events`.
#[derive(Deserialize)]
pub(super) struct UsageWindow {
    #[serde(default)]
    starting_on: Option<String>,
    #[serde(default)]
    ending_before: Option<String>,
}

/// An RFC 3339 time on a UTC hour boundary, as unix seconds; one without an offset (what the
/// SDK sends for a naive `datetime`) is UTC. Errors name `field`.
fn hour_boundary(field: &str, text: Option<&str>) -> ApiResult<f64> {
    let text = text.ok_or_else(|| ApiError::invalid(field, "is required (RFC 3339)"))?;
    let time = OffsetDateTime::parse(text, &Rfc3339)
        .or_else(|e| {
            PrimitiveDateTime::parse(text, &Iso8601::DEFAULT)
                .map(PrimitiveDateTime::assume_utc)
                .map_err(|_| e)
        })
        .map_err(|e| ApiError::invalid(field, format!("not an RFC 3339 time: {e}")))?;
    let unix = time.unix_timestamp();
    if time.nanosecond() != 0 || unix.rem_euclid(3600) != 0 {
        return Err(ApiError::invalid(
            field,
            format!("must be on a UTC hour boundary, got {text}"),
        ));
    }
    Ok(unix as f64)
}

/// The project of `tenant`'s session `id`, when the session is known.
fn project_of_session(state: &AppState, tenant: &str, id: Option<&str>) -> Option<String> {
    id.and_then(|id| own_session(state, tenant, id))
        .map(|s| project_of(&s).to_string())
}

/// `GET /api/v1/billing/usage/events?starting_on&ending_before`: the caller's usage in hourly
/// buckets, one event per (hour, kind, session), ordered by bucket, then by quantity (largest
/// first).
pub(super) async fn billing_usage(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    JsonQuery(window): JsonQuery<UsageWindow>,
) -> ApiResult<Json<BillingUsage>> {
    let start = hour_boundary("starting_on", window.starting_on.as_deref())?;
    let end = hour_boundary("ending_before", window.ending_before.as_deref())?;
    let now = loraloom_engine::registry::unix_now();
    if start > now {
        return Err(ApiError::invalid(
            "starting_on",
            "must not be in the future",
        ));
    }
    if end <= start {
        return Err(ApiError::invalid(
            "ending_before",
            "must be after starting_on",
        ));
    }
    if end - start > MAX_WINDOW_SECONDS {
        return Err(ApiError::invalid(
            "ending_before",
            "must be at most 14 days after starting_on",
        ));
    }
    let rows = state
        .engine
        .registry()
        .metered_usage(&tenant, start..end, now)?;
    Ok(Json(usage_response(&state, &tenant, rows)))
}

/// Events from metered rows: summed per (hour, kind, session).
fn usage_response(state: &AppState, tenant: &str, rows: Vec<UsageRow>) -> BillingUsage {
    let mut buckets: BTreeMap<(i64, UsageKind, Option<String>), f64> = BTreeMap::new();
    for row in rows {
        let session = session_of(&row.source).map(str::to_string);
        *buckets.entry((row.hour, row.kind, session)).or_default() += row.amount;
    }
    let base_model = state.engine.base().name.clone();
    let mut sessions = BTreeMap::new();
    let mut data: Vec<(i64, f64, BillingUsageEvent)> = buckets
        .into_iter()
        .map(|((hour, kind, session), amount)| {
            let owned = session
                .as_deref()
                .and_then(|id| own_session(state, tenant, id));
            if let (Some(id), Some(s)) = (&session, &owned) {
                sessions.insert(
                    id.clone(),
                    BillingUsageSession {
                        user_metadata: metadata_strings(&s.details),
                    },
                );
            }
            // The quantity the event reports, which also orders events within an hour.
            let quantity = match kind {
                UsageKind::Storage => amount / GIGABYTE,
                _ => amount.round(),
            };
            let bucket_start = hour as f64 * HOUR_SECONDS;
            let event_info = match kind {
                UsageKind::Training | UsageKind::SamplingSample => {
                    json!({"type": kind.as_str(), "token_count": quantity as u64})
                }
                UsageKind::SamplingPrefill => {
                    json!({"type": kind.as_str(), "cached": false, "token_count": quantity as u64})
                }
                UsageKind::Checkpoint => json!({"type": kind.as_str(), "count": quantity as u64}),
                UsageKind::Storage => {
                    json!({"type": kind.as_str(), "free": false, "gigabyte_hours": quantity})
                }
            };
            let event = BillingUsageEvent {
                bucket_start: iso(bucket_start),
                bucket_end: iso(bucket_start + HOUR_SECONDS),
                base_model: Some(base_model.clone()),
                user_id: Some(tenant.to_string()),
                user_name: Some(tenant.to_string()),
                project_id: owned.map(|s| project_of(&s).to_string()),
                session_id: session,
                estimated_cost_usd: None,
                effective_rate_usd_per_million_tokens: None,
                effective_rate_usd_per_gigabyte_month: None,
                event_info,
            };
            (hour, quantity, event)
        })
        .collect();
    // By bucket, then largest quantity first.
    data.sort_by(|(h, a, _), (k, b, _)| h.cmp(k).then(b.total_cmp(a)));
    BillingUsage {
        data: data.into_iter().map(|(_, _, event)| event).collect(),
        sessions,
        cost_data_through: None,
    }
}

/// The query of `GET /api/v1/billing/usage/checkpoints/current`.
#[derive(Deserialize)]
pub(super) struct StorageQuery {
    #[serde(default)]
    project_id: Option<String>,
}

/// `GET /api/v1/billing/usage/checkpoints/current[?project_id]`: the caller's listed
/// checkpoints now, counted and sized per project (of the session of the run each came from).
pub(super) async fn checkpoint_storage(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    JsonQuery(query): JsonQuery<StorageQuery>,
) -> Json<StorageUsage> {
    let mut projects: BTreeMap<Option<String>, (usize, u64)> = BTreeMap::new();
    for c in state.engine.registry().checkpoints_of(&tenant, None) {
        let project = project_of_session(&state, &tenant, session_of(&c.model_id));
        if query.project_id.is_some() && project != query.project_id {
            continue;
        }
        let (count, bytes) = projects.entry(project).or_default();
        *count += 1;
        *bytes += c.size_bytes;
    }
    Json(StorageUsage {
        effective_rate_usd_per_gigabyte_month: None,
        data: projects
            .into_iter()
            .map(
                |(project_id, (checkpoint_count, size_bytes))| StorageUsageItem {
                    project_id,
                    org_user_urn: Some(tenant.clone()),
                    user_email: None,
                    user_name: Some(tenant.clone()),
                    checkpoint_count,
                    size_bytes,
                    size_gigabytes: size_bytes as f64 / GIGABYTE,
                    estimated_monthly_cost_usd: None,
                },
            )
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_whole_utc_hours() {
        assert_eq!(
            hour_boundary("starting_on", Some("2026-07-13T00:00:00Z")).unwrap(),
            1_783_900_800.0
        );
        // A time without an offset (a naive `datetime`) is UTC.
        assert_eq!(
            hour_boundary("starting_on", Some("2026-07-13T00:00:00")).unwrap(),
            1_783_900_800.0
        );
        // Another offset on an hour boundary of UTC is accepted.
        assert_eq!(
            hour_boundary("starting_on", Some("2026-07-13T02:00:00+02:00")).unwrap(),
            1_783_900_800.0
        );
        for bad in [
            Some("2026-07-13T00:30:00Z"),
            Some("2026-07-13T00:00:00.5Z"),
            Some("2026-07-13T05:00:00+05:30"),
            Some("yesterday"),
            None,
        ] {
            let err = hour_boundary("starting_on", bad).unwrap_err();
            assert!(err.to_string().contains("starting_on"), "{err}");
        }
    }
}
