//! A bounded record of finished jobs (whose, on which run or sampling session, what, when), from
//! which a session's timeline is exported (`RestClient.export_session_trace`). In memory: a
//! restart starts it afresh.
//!
//! The ring is allocated once, whole, and a record holds no allocation of its own (tenants and
//! queues are interned, request ids kept as their 16 bytes), so recording a job leaves no
//! long-lived small allocation among the workers' large tensor allocations (which can keep an
//! allocator from returning freed memory).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

/// One finished job.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRecord {
    /// Its tenant.
    pub tenant: Arc<str>,
    /// Its run or sampling session.
    pub queue_id: Arc<str>,
    /// Its future's id.
    pub request_id: uuid::Uuid,
    /// What it did (`forward_backward`, `sample`, ...).
    pub kind: &'static str,
    /// When it was submitted (unix seconds).
    pub enqueued: f64,
    /// When it finished.
    pub finished: f64,
    /// Whether it succeeded.
    pub ok: bool,
}

/// Most distinct tenants and queues interned before the table is started afresh.
const MAX_INTERNED: usize = 100_000;

struct Ring {
    records: VecDeque<JobRecord>,
    interned: HashMap<String, Arc<str>>,
}

impl Ring {
    fn intern(&mut self, text: &str) -> Arc<str> {
        if let Some(shared) = self.interned.get(text) {
            return shared.clone();
        }
        if self.interned.len() >= MAX_INTERNED {
            self.interned.clear();
        }
        let shared: Arc<str> = Arc::from(text);
        self.interned.insert(text.to_string(), shared.clone());
        shared
    }
}

/// The last [`Timeline::new`]`(capacity)` finished jobs of every tenant, oldest first.
pub struct Timeline {
    capacity: usize,
    ring: Mutex<Ring>,
}

impl Timeline {
    /// Keeps the last `capacity` jobs (their ring allocated now).
    pub fn new(capacity: usize) -> Self {
        Timeline {
            capacity,
            ring: Mutex::new(Ring {
                records: VecDeque::with_capacity(capacity),
                interned: HashMap::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a finished job (dropping the oldest beyond the capacity). A request id that is
    /// not a UUID is recorded as the nil UUID.
    #[allow(clippy::too_many_arguments)]
    pub fn push(
        &self,
        tenant: &str,
        queue_id: &str,
        request_id: &str,
        kind: &'static str,
        enqueued: f64,
        finished: f64,
        ok: bool,
    ) {
        let mut ring = self.lock();
        if ring.records.len() >= self.capacity {
            ring.records.pop_front();
        }
        let record = JobRecord {
            tenant: ring.intern(tenant),
            queue_id: ring.intern(queue_id),
            request_id: uuid::Uuid::parse_str(request_id).unwrap_or_default(),
            kind,
            enqueued,
            finished,
            ok,
        };
        ring.records.push_back(record);
    }

    /// The tenant's recorded jobs whose run or session `belongs` says, oldest first.
    pub fn of(&self, tenant: &str, belongs: impl Fn(&str) -> bool) -> Vec<JobRecord> {
        self.lock()
            .records
            .iter()
            .filter(|r| &*r.tenant == tenant && belongs(&r.queue_id))
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
        let ids: Vec<String> = (0..3).map(|_| uuid::Uuid::new_v4().to_string()).collect();
        for (i, tenant) in ["a", "b", "a"].into_iter().enumerate() {
            let queue = format!("s:train:{i}");
            timeline.push(
                tenant,
                &queue,
                &ids[i],
                "optim_step",
                i as f64,
                i as f64 + 0.5,
                true,
            );
        }
        let mine = timeline.of("a", |q| q.starts_with("s:"));
        assert_eq!(mine.len(), 1, "the oldest was dropped");
        assert_eq!(mine[0].request_id.to_string(), ids[2]);
        assert!(timeline.of("c", |_| true).is_empty());
    }
}
