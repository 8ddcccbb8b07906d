//! Metered usage: what each tenant's jobs and checkpoints consumed, per UTC hour, for
//! `AdminClient.get_billing_usage` and `tinker billing usage`.
//!
//! A job meters itself when it succeeds, before its future settles (so a result the client saw
//! is never missing from the meter): `forward` and `forward_backward` their input tokens
//! (`training`), `sample` its prompt once (`sampling_prefill`) and every generated token
//! (`sampling_sample`). A checkpoint meters one creation in the hour it was written and its
//! bytes for every second it exists, up to its expiry (`storage`, in byte-hours): a live
//! checkpoint's share is computed from its record when asked; a deleted or replaced one's life
//! ([`CheckpointLife`], one row) is written in the transaction that deletes or replaces its
//! record, and split into hours when asked. Ephemeral checkpoints (one sampling client's
//! weights, not listed, not in the quota) are not metered. Rows are keyed by the run or sampling
//! session they came from, so the API layer attributes them to sessions and projects.

use std::ops::Range;

use crate::job::{Output, Work};
use crate::registry::CheckpointRecord;

/// Seconds in a bucket.
pub const HOUR_SECONDS: f64 = 3600.0;

/// What a usage row counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum UsageKind {
    /// Tokens through `forward` or `forward_backward`.
    Training,
    /// Prompt tokens of `sample` requests.
    SamplingPrefill,
    /// Generated tokens.
    SamplingSample,
    /// Checkpoints written.
    Checkpoint,
    /// Checkpoint bytes held, in byte-hours.
    Storage,
}

impl UsageKind {
    /// The wire name (the SDK's `BillingEventInfo.type`), also the stored one.
    pub fn as_str(self) -> &'static str {
        match self {
            UsageKind::Training => "training",
            UsageKind::SamplingPrefill => "sampling_prefill",
            UsageKind::SamplingSample => "sampling_sample",
            UsageKind::Checkpoint => "checkpoint",
            UsageKind::Storage => "storage",
        }
    }

    /// The kind of a stored name.
    pub fn parse(name: &str) -> Option<Self> {
        [
            UsageKind::Training,
            UsageKind::SamplingPrefill,
            UsageKind::SamplingSample,
            UsageKind::Checkpoint,
            UsageKind::Storage,
        ]
        .into_iter()
        .find(|k| k.as_str() == name)
    }
}

/// An amount of one kind of usage by one tenant's run or sampling session in one UTC hour.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageRow {
    /// Owner.
    pub tenant: String,
    /// The hour: whole hours since the Unix epoch.
    pub hour: i64,
    /// The run or sampling session id it came from (a checkpoint's: its run).
    pub source: String,
    /// What it counts.
    pub kind: UsageKind,
    /// Tokens, checkpoints, or byte-hours.
    pub amount: f64,
}

/// The hour (since the epoch) holding `unix` seconds.
pub fn hour_of(unix: f64) -> i64 {
    (unix / HOUR_SECONDS).floor() as i64
}

/// What a job of `tenant`'s `source` (run or sampling session) that ended with `output` at
/// `now` (unix seconds) metered; nothing for jobs other than `forward`, `forward_backward` and
/// `sample`.
pub fn job_usage(
    tenant: &str,
    source: &str,
    work: &Work,
    output: &Output,
    now: f64,
) -> Vec<UsageRow> {
    let row = |kind, amount: usize| UsageRow {
        tenant: tenant.to_string(),
        hour: hour_of(now),
        source: source.to_string(),
        kind,
        amount: amount as f64,
    };
    match (work, output) {
        (Work::ForwardBackward { .. }, Output::ForwardBackward(_)) => {
            vec![row(UsageKind::Training, work.tokens())]
        }
        (Work::Sample { prompt, .. }, Output::Sample(sample)) => vec![
            row(UsageKind::SamplingPrefill, prompt.len()),
            row(
                UsageKind::SamplingSample,
                sample.sequences.iter().map(|s| s.tokens.len()).sum(),
            ),
        ],
        _ => Vec::new(),
    }
}

/// What one checkpoint held, from its writing until it went (deleted, replaced or expired):
/// everything its usage is computed from. A gone checkpoint's life is stored in the same
/// transaction that deletes or replaces its record; a live one's is read off its record.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointLife {
    /// Owner.
    pub tenant: String,
    /// The run it was saved from.
    pub source: String,
    /// When it was written (unix seconds).
    pub created: f64,
    /// When it went, or (live) now; never past its expiry.
    pub ended: f64,
    /// Bytes on disk.
    pub bytes: u64,
}

impl CheckpointLife {
    /// The life of `record` until `now` (or its expiry, if earlier); `None` for an ephemeral
    /// checkpoint, which is not metered.
    pub fn of(record: &CheckpointRecord, now: f64) -> Option<Self> {
        if record.ephemeral {
            return None;
        }
        let ended = now.min(record.expires_at.unwrap_or(f64::INFINITY));
        Some(CheckpointLife {
            tenant: record.tenant.clone(),
            source: record.model_id.clone(),
            created: record.created,
            ended: ended.max(record.created),
            bytes: record.size_bytes,
        })
    }

    /// What it metered within `span` (unix seconds): one creation if it was written within
    /// `span`, and its byte-hours of each hour of its life inside `span`.
    pub fn usage(&self, span: Range<f64>) -> Vec<UsageRow> {
        let row = |hour, kind, amount| UsageRow {
            tenant: self.tenant.clone(),
            hour,
            source: self.source.clone(),
            kind,
            amount,
        };
        let mut rows = Vec::new();
        if span.contains(&self.created) {
            rows.push(row(hour_of(self.created), UsageKind::Checkpoint, 1.0));
        }
        let (mut from, to) = (self.created.max(span.start), self.ended.min(span.end));
        while from < to {
            let hour = hour_of(from);
            let end = (((hour + 1) as f64) * HOUR_SECONDS).min(to);
            let held = self.bytes as f64 * (end - from) / HOUR_SECONDS;
            if held > 0.0 {
                rows.push(row(hour, UsageKind::Storage, held));
            }
            from = end;
        }
        rows
    }
}

/// `rows` with the amounts of equal (tenant, hour, source, kind) summed, ordered by those.
pub fn merge(mut rows: Vec<UsageRow>) -> Vec<UsageRow> {
    rows.sort_by(|a, b| {
        (a.hour, &a.tenant, &a.source, a.kind).cmp(&(b.hour, &b.tenant, &b.source, b.kind))
    });
    let mut merged: Vec<UsageRow> = Vec::with_capacity(rows.len());
    for row in rows {
        match merged.last_mut() {
            Some(last)
                if (last.hour, &last.tenant, &last.source, last.kind)
                    == (row.hour, &row.tenant, &row.source, row.kind) =>
            {
                last.amount += row.amount
            }
            _ => merged.push(row),
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::CheckpointKind;
    use loraloom_model::LoraSpec;

    fn record(created: f64, size_bytes: u64, ephemeral: bool) -> CheckpointRecord {
        CheckpointRecord {
            tenant: "t".into(),
            model_id: "s:train:0".into(),
            kind: CheckpointKind::State,
            name: "c".into(),
            path: "tinker://s:train:0/weights/c".into(),
            dir: "/nonexistent".into(),
            created,
            size_bytes,
            spec: LoraSpec {
                rank: 1,
                alpha: 1.0,
                seed: 0,
                train_attn: true,
                train_mlp: false,
                train_unembed: false,
            },
            ephemeral,
            expires_at: None,
            user_metadata: None,
            public: false,
            saved_by: None,
        }
    }

    #[test]
    fn a_checkpoint_meters_its_creation_and_its_bytes_per_hour() {
        // Written 30 minutes into hour 10, held until 15 minutes into hour 12.
        let created = 10.5 * HOUR_SECONDS;
        let until = 12.25 * HOUR_SECONDS;
        let life = |ephemeral| CheckpointLife::of(&record(created, 1000, ephemeral), until);
        let rows = life(false).unwrap().usage(f64::MIN..f64::MAX);
        let of = |kind| {
            rows.iter()
                .filter(|r| r.kind == kind)
                .map(|r| (r.hour, r.amount))
                .collect::<Vec<_>>()
        };
        assert_eq!(of(UsageKind::Checkpoint), vec![(10, 1.0)]);
        assert_eq!(
            of(UsageKind::Storage),
            vec![(10, 500.0), (11, 1000.0), (12, 250.0)]
        );
        // A window starting at hour 11 sees neither the creation nor hour 10.
        let rows = life(false)
            .unwrap()
            .usage(11.0 * HOUR_SECONDS..12.0 * HOUR_SECONDS);
        assert_eq!(rows.len(), 1);
        assert_eq!((rows[0].hour, rows[0].amount), (11, 1000.0));
        assert!(
            life(true).is_none(),
            "ephemeral checkpoints are not metered"
        );
        // Storage stops at expiry, however late the reaper (or a restart) deletes it.
        let mut expiring = record(created, 1000, false);
        expiring.expires_at = Some(11.0 * HOUR_SECONDS);
        let held: f64 = CheckpointLife::of(&expiring, 100.0 * HOUR_SECONDS)
            .unwrap()
            .usage(f64::MIN..f64::MAX)
            .iter()
            .filter(|r| r.kind == UsageKind::Storage)
            .map(|r| r.amount)
            .sum();
        assert_eq!(held, 500.0);
    }

    #[test]
    fn merge_sums_equal_keys() {
        let row = |hour, kind, amount| UsageRow {
            tenant: "t".into(),
            hour,
            source: "r".into(),
            kind,
            amount,
        };
        let merged = merge(vec![
            row(2, UsageKind::Training, 5.0),
            row(1, UsageKind::Training, 1.0),
            row(2, UsageKind::Training, 7.0),
            row(2, UsageKind::Storage, 3.0),
        ]);
        assert_eq!(
            merged,
            vec![
                row(1, UsageKind::Training, 1.0),
                row(2, UsageKind::Training, 12.0),
                row(2, UsageKind::Storage, 3.0),
            ]
        );
        assert_eq!(
            UsageKind::parse("sampling_prefill"),
            Some(UsageKind::SamplingPrefill)
        );
        assert_eq!(UsageKind::parse("nope"), None);
    }
}
