//! `AdminClient.get_audit_log` (`GET /api/v1/audit?event_type&day`): the caller's audit log for
//! one UTC day. A tenant is its own organization and sees only its own log. Entries are
//! written by the registry as things happen (`Registry::audit`): checkpoints created, deleted
//! (at the owner's request or on expiry), published, unpublished, given a TTL, and read by
//! another tenant (a published checkpoint loaded, copied or inspected, naming the reader);
//! sessions assigned to a project; and, a tenant being its own organization, its API keys added
//! and revoked (by public id, as the operator's keys file changes or at a start that finds them
//! changed). loraloom has no teams to log.

use time::{Date, Month, OffsetDateTime, Time};

use super::*;
use crate::responses::iso;

/// The query of `GET /api/v1/audit`.
#[derive(Deserialize)]
pub(super) struct AuditQuery {
    #[serde(default)]
    event_type: Option<String>,
    #[serde(default)]
    day: Option<String>,
}

/// The start of the UTC day `text` (`YYYY-MM-DD`; today when absent), as unix seconds.
fn day_start(text: Option<&str>) -> ApiResult<f64> {
    let date = match text {
        None => OffsetDateTime::now_utc().date(),
        Some(text) => parse_day(text).ok_or_else(|| {
            ApiError::invalid("day", format!("not a date as YYYY-MM-DD: {text:?}"))
        })?,
    };
    Ok(date.with_time(Time::MIDNIGHT).assume_utc().unix_timestamp() as f64)
}

fn parse_day(text: &str) -> Option<Date> {
    let mut parts = text.splitn(3, '-');
    let year: i32 = parts.next()?.parse().ok()?;
    let month: u8 = parts.next()?.parse().ok()?;
    let day: u8 = parts.next()?.parse().ok()?;
    Date::from_calendar_date(year, Month::try_from(month).ok()?, day).ok()
}

/// Whether an event is of the kind `event_type` asks for.
fn of_kind(event_type: &str, event: &str) -> bool {
    match event_type {
        "all" => true,
        "checkpoints" => event.starts_with("checkpoint_"),
        "projects" => event.starts_with("project_"),
        "organizations" => event.starts_with("organization_"),
        // "teams": loraloom logs none.
        _ => false,
    }
}

pub(super) async fn audit_log(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    JsonQuery(query): JsonQuery<AuditQuery>,
) -> ApiResult<Json<Value>> {
    let event_type = query.event_type.as_deref().unwrap_or("all");
    if !["all", "checkpoints", "projects", "teams", "organizations"].contains(&event_type) {
        return Err(ApiError::invalid(
            "event_type",
            format!(
                "{event_type:?} is not one of all, checkpoints, projects, teams, organizations"
            ),
        ));
    }
    let start = day_start(query.day.as_deref())?;
    let rows = state
        .engine
        .registry()
        .db()
        .audit(&tenant, start..start + 86_400.0)?;
    let entries: Vec<Value> = rows
        .into_iter()
        .filter(|r| of_kind(event_type, &r.event))
        .map(|r| {
            let details: Value = serde_json::from_str(&r.details_json).unwrap_or(json!({}));
            // The SDK's deprecated top-level fields, on checkpoint events.
            let field = |name: &str| {
                r.event
                    .starts_with("checkpoint_")
                    .then(|| details.get(name).cloned())
                    .flatten()
            };
            json!({
                "timestamp": iso(r.at),
                "event": r.event,
                "model_id": field("model_id"),
                "tinker_path": field("tinker_path"),
                "purpose": field("purpose"),
                "event_details": details,
            })
        })
        .collect();
    Ok(Json(json!({ "entries": entries })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_are_whole_utc_days_and_bad_ones_are_refused() {
        assert_eq!(day_start(Some("2026-01-15")).unwrap(), 1_768_435_200.0);
        assert_eq!(day_start(Some("1970-01-01")).unwrap(), 0.0);
        for bad in ["2026-02-30", "2026-13-01", "yesterday", "2026-01", ""] {
            assert!(day_start(Some(bad)).is_err(), "{bad}");
        }
        let today = day_start(None).unwrap();
        assert_eq!(today % 86_400.0, 0.0);
    }

    #[test]
    fn kinds_select_their_events() {
        assert!(of_kind("checkpoints", "checkpoint_read"));
        assert!(!of_kind("checkpoints", "project_session_assigned"));
        assert!(of_kind("projects", "project_session_assigned"));
        assert!(of_kind("all", "checkpoint_created"));
        assert!(!of_kind("teams", "checkpoint_created"));
    }
}
