//! A bounded record of finished jobs (whose, on which run or sampling session, what, when), from
//! which a session's timeline is exported (`RestClient.export_session_trace`). In memory: a
//! restart starts it afresh.

use std::collections::VecDeque;
use std::sync::Mutex;

/// One finished job.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRecord {
    /// Its tenant.
    pub tenant: String,
    /// Its run or sampling session.
    pub queue_id: String,
    /// Its future's id.
    pub request_id: String,
    /// What it did (`forward_backward`, `sample`, ...).
    pub kind: &'static str,
    /// When it was submitted (unix seconds).
    pub enqueued: f64,
    /// When it finished.
    pub finished: f64,
    /// Whether it succeeded.
    pub ok: bool,
}

/// The last [`Timeline::capacity`] finished jobs of every tenant, oldest first.
pub struct Timeline {
    capacity: usize,
    records: Mutex<VecDeque<JobRecord>>,
}

impl Timeline {
    /// Keeps the last `capacity` jobs.
    pub fn new(capacity: usize) -> Self {
        Timeline {
            capacity,
            records: Mutex::new(VecDeque::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<JobRecord>> {
        self.records.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a finished job (dropping the oldest beyond the capacity).
    pub fn push(&self, record: JobRecord) {
        let mut records = self.lock();
        if records.len() >= self.capacity {
            records.pop_front();
        }
        records.push_back(record);
    }

    /// The tenant's recorded jobs whose run or session `belongs` says, oldest first.
    pub fn of(&self, tenant: &str, belongs: impl Fn(&str) -> bool) -> Vec<JobRecord> {
        self.lock()
            .iter()
            .filter(|r| r.tenant == tenant && belongs(&r.queue_id))
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_jobs_and_only_the_tenants_own() {
        let timeline = Timeline::new(2);
        for (i, tenant) in ["a", "b", "a"].into_iter().enumerate() {
            timeline.push(JobRecord {
                tenant: tenant.into(),
                queue_id: format!("s:train:{i}"),
                request_id: i.to_string(),
                kind: "optim_step",
                enqueued: i as f64,
                finished: i as f64 + 0.5,
                ok: true,
            });
        }
        let mine = timeline.of("a", |q| q.starts_with("s:"));
        assert_eq!(mine.len(), 1, "the oldest was dropped");
        assert_eq!(mine[0].request_id, "2");
        assert!(timeline.of("c", |_| true).is_empty());
    }
}
