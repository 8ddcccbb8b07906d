//! The job journal: what makes a crash (kill -9, the OOM killer, a power cut after the WAL's
//! last checkpoint aside) lose nothing a client was told was accepted.
//!
//! - Every job is written to the store ([`Store::put_job`]) before its future's id is answered;
//!   its `seq` orders it among all jobs, restarts included.
//! - A job that settles is forgotten, except a `forward_backward` that succeeded: its gradients
//!   live in memory only, so its row is kept (marked done) until an `optim_step`, a load or a
//!   create of its run consumes or replaces them ([`Store::forget_done_jobs`]).
//! - A run's snapshot records its [`Position`]: the last job whose effect its weights and
//!   optimizer hold, that job's result, and (a graceful shutdown's snapshot) the last
//!   `forward_backward` whose gradients it holds.
//! - After a crash ([`recover`]): each job the run's snapshot already holds is forgotten (its
//!   result, if it never reached the store, is taken from the snapshot); the done
//!   `forward_backward`s after it run again, silently ([`Job::replay`]), to rebuild the run's
//!   gradients; every unsettled job is queued again under its own future id, in admission
//!   order, ahead of anything new. A job found running at [`MAX_STARTS`] crashes fails
//!   instead ("server restarted"): one that crashes the server must not do so forever.
//!
//! The journal is kept when runs are snapshotted at every step (`--step-snapshots`, the
//! default): without those snapshots a crash loses steps anyway.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use loraloom_model::train::CustomInputs;
use loraloom_model::{CustomLoss, NamedInput};

use crate::backend::{remove_in, write_marker_in};
use crate::error::{EngineError, Result};
use crate::futures::stored_state;
use crate::futures::FutureState;
use crate::job::{Job, ModelKey, Output, QueueKey, Work};
use crate::registry::{Registry, LOST_MARKER, PENDING_MARKER};
use crate::store::{FutureRow, JobRow, Store};

/// Crashes a job may be running at (started, not settled): a restart that finds it started this
/// often drops it ("server restarted"), for it is what crashes the server.
pub const MAX_STARTS: i64 = 3;

/// Where a run's snapshot stands in the journal (recorded with it, see
/// [`loraloom_model::checkpoint::SaveRequest::note`]).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Position {
    /// The last job whose effect the weights and optimizer hold (create, load, optim_step).
    pub weights: i64,
    /// That job's result.
    pub output: Option<Output>,
    /// The last `forward_backward` whose gradients the run holds (0: none pending).
    pub gradients: i64,
    /// The run's gradients include some no journaled job answers for (restored from a snapshot
    /// written without the journal): a crash before they are consumed loses them.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unjournaled: bool,
}

impl Position {
    /// What a snapshot records: the gradients' position only when it holds them.
    pub fn note(&self, with_gradients: bool) -> serde_json::Value {
        let recorded = Position {
            gradients: if with_gradients { self.gradients } else { 0 },
            unjournaled: with_gradients && self.unjournaled,
            ..self.clone()
        };
        serde_json::to_value(recorded).unwrap_or_default()
    }

    /// Job `seq` (when journaled) replaced or stepped the weights with result `output`; no
    /// gradients are pending after it.
    pub fn applied(&mut self, seq: Option<i64>, output: Output) {
        if let Some(seq) = seq {
            *self = Position {
                weights: seq,
                output: Some(output),
                gradients: 0,
                unjournaled: false,
            };
        }
    }

    /// The position recorded in the snapshot in `dir` (the start of the journal when none is):
    /// its gradients' only while it holds them (a run's first job after a restart takes them
    /// out of it, and from then on the journal answers for them).
    pub fn of_snapshot(dir: &std::path::Path) -> Position {
        let recorded: Position = loraloom_model::checkpoint::read_note(dir)
            .and_then(|v| serde_json::from_value(v).ok())
            .unwrap_or_default();
        let holds_gradients = dir
            .join(loraloom_model::checkpoint::GRADIENTS_FILE)
            .exists();
        Position {
            gradients: if holds_gradients {
                recorded.gradients
            } else {
                0
            },
            unjournaled: holds_gradients && recorded.unjournaled,
            ..recorded
        }
    }
}

/// A job's work as journaled: custom losses by id (they are found again in the store).
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredWork {
    work: Work,
    /// Per datum of a `forward_backward`: its custom loss's id and inputs, if it has one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    custom: Vec<Option<(String, Vec<NamedInput>)>>,
}

/// The row journaling `work` of `queue` under future `id`, submitted by a request of replay key
/// `client_key`.
pub fn row(id: &str, queue: &QueueKey, work: &Work, client_key: Option<&str>) -> Result<JobRow> {
    let custom = match work {
        Work::ForwardBackward { data, .. } if data.iter().any(|d| d.custom.is_some()) => data
            .iter()
            .map(|d| {
                d.custom
                    .as_ref()
                    .map(|c| (c.loss_id.clone(), c.inputs.clone()))
            })
            .collect(),
        _ => Vec::new(),
    };
    let stored = StoredWork {
        work: work.clone(),
        custom,
    };
    Ok(JobRow {
        seq: 0,
        id: id.to_string(),
        tenant: queue.tenant().to_string(),
        queue_json: queue_json(queue),
        work_json: serde_json::to_string(&stored)
            .map_err(|e| EngineError::Internal(format!("journal: {e}")))?,
        done: false,
        starts: 0,
        client_key: client_key.map(str::to_string),
    })
}

/// How a queue is named in the journal.
pub fn queue_json(queue: &QueueKey) -> String {
    serde_json::to_string(queue).unwrap_or_default()
}

/// Forgets the journaled `forward_backward`s of run `key` (its gradients are discarded, or the
/// run is gone): no restart rebuilds them.
pub fn forget_gradients(store: &dyn Store, key: &ModelKey) -> Result<()> {
    store.forget_done_jobs(&queue_json(&QueueKey::Model(key.clone())), i64::MAX)
}

/// The work of a journaled row, its custom losses found in `registry`.
fn work_of(row: &JobRow, registry: &Registry) -> Result<Work> {
    let stored: StoredWork = serde_json::from_str(&row.work_json)
        .map_err(|e| EngineError::Internal(format!("journaled job {}: {e}", row.id)))?;
    let mut work = stored.work;
    if let Work::ForwardBackward { data, .. } = &mut work {
        for (datum, custom) in data.iter_mut().zip(stored.custom) {
            if let Some((loss_id, inputs)) = custom {
                let loss: Arc<CustomLoss> = registry.custom_loss(&row.tenant, &loss_id)?;
                datum.custom = Some(CustomInputs {
                    loss,
                    loss_id,
                    inputs,
                });
            }
        }
    }
    Ok(work)
}

/// What a restart does with the journal ([`recover`]).
#[derive(Default)]
pub struct Recovery {
    /// Jobs to queue, in admission order: unsettled ones, and done `forward_backward`s run again
    /// for their gradients.
    pub jobs: Vec<Job>,
    /// Futures that stay queued (their jobs are in `jobs`); every other unsettled one fails.
    pub requeued: HashSet<String>,
    /// Futures whose job the run's snapshot holds but whose result never reached the store.
    pub settled: Vec<(String, Output)>,
    /// Runs whose unfinished create is queued again (not removed as never created).
    pub creating: HashSet<ModelKey>,
    /// (tenant, replay key) of every journaled job that had one, and its future: a retry after
    /// the crash gets that future instead of doing the work twice.
    pub client_keys: ClientKeys,
}

/// Futures by (tenant, replay key of the request that submitted them).
pub type ClientKeys = HashMap<(String, String), String>;

/// Takes back the replay key of a row that cannot answer a retry (its run is gone, or it cannot
/// be read): the retry runs as a new request.
fn forget_key(recovery: &mut Recovery, row: &JobRow) {
    if let Some(key) = &row.client_key {
        recovery
            .client_keys
            .remove(&(row.tenant.clone(), key.clone()));
    }
}

/// Forgets every journaled job (a restart without the journal: the positions its snapshots
/// record stay where the journal left them, so old rows could not be run again safely once it
/// is kept again). Returns how many.
pub fn discard(store: &dyn Store) -> Result<usize> {
    let seqs: Vec<i64> = store.jobs()?.iter().map(|r| r.seq).collect();
    store.delete_jobs(&seqs)?;
    Ok(seqs.len())
}

/// What a restart does with a journaled job its run's snapshot does not hold.
enum Fate {
    /// Forgotten (settled, or it cannot run again).
    Forget,
    /// Run again for its run's gradients; its future holds its result.
    Rebuild,
    /// Queued again under its future.
    Requeue,
}

/// Plans a restart from the journal in `store`: reads each run's snapshot position, decides
/// each job's fate, forgets the journal rows that are done with, removes the pending-gradients
/// marker of each run whose gradients it rebuilds and marks lost the gradients it cannot
/// rebuild ([`LOST_MARKER`]). `futures`: every stored future. Call it before any job runs.
pub fn recover(store: &dyn Store, registry: &Registry, futures: &[FutureRow]) -> Result<Recovery> {
    let futures: HashMap<&str, Option<FutureState>> = futures
        .iter()
        .map(|r| (r.id.as_str(), stored_state(r)))
        .collect();
    let mut recovery = Recovery::default();
    let mut positions: HashMap<ModelKey, Position> = HashMap::new();
    let mut forget: Vec<i64> = Vec::new();
    // Runs whose acknowledged gradients cannot all be rebuilt.
    let mut broken: HashSet<ModelKey> = HashSet::new();
    let mut planned: Vec<(JobRow, QueueKey, Work, Fate)> = Vec::new();
    for row in store.jobs()? {
        if let Some(key) = &row.client_key {
            recovery
                .client_keys
                .insert((row.tenant.clone(), key.clone()), row.id.clone());
        }
        let Ok(queue) = serde_json::from_str::<QueueKey>(&row.queue_json) else {
            tracing::error!(request_id = %row.id, "unreadable journaled queue");
            forget.push(row.seq);
            continue;
        };
        let future = futures.get(row.id.as_str());
        let acknowledged = row.done || matches!(future, Some(Some(FutureState::Done(_))));
        let exists = match &queue {
            QueueKey::Model(k) => registry.model(&k.tenant, &k.model_id).is_ok(),
            QueueKey::Sampler(k) => registry.sampler(&k.tenant, &k.sampler_id).is_ok(),
        };
        if !exists {
            // Its jobs fail, and its gradients went with it.
            forget.push(row.seq);
            forget_key(&mut recovery, &row);
            continue;
        }
        if let QueueKey::Model(k) = &queue {
            let p = positions
                .entry(k.clone())
                .or_insert_with(|| Position::of_snapshot(&registry.snapshot_dir(k)));
            // What the run's snapshot holds is not run again.
            if row.seq <= p.weights {
                match (future, &p.output) {
                    (Some(None), Some(out)) if p.weights == row.seq => {
                        recovery.settled.push((row.id.clone(), out.clone()))
                    }
                    _ => {}
                }
                forget.push(row.seq);
                continue;
            }
            if row.seq <= p.gradients {
                // In its gradients file: kept for the step that consumes them.
                if !row.done {
                    forget.push(row.seq);
                }
                continue;
            }
        }
        let work = match work_of(&row, registry) {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(request_id = %row.id, error = %e, "a journaled job cannot run again");
                if let (QueueKey::Model(k), true) = (&queue, acknowledged) {
                    broken.insert(k.clone());
                }
                forget.push(row.seq);
                forget_key(&mut recovery, &row);
                continue;
            }
        };
        let accumulates = work.accumulates_gradients();
        let fate = match future {
            _ if accumulates && acknowledged => Fate::Rebuild,
            Some(None) => Fate::Requeue,
            _ => Fate::Forget,
        };
        let fate = match fate {
            // Running at MAX_STARTS crashes: it is what crashes the server.
            Fate::Rebuild | Fate::Requeue if row.starts >= MAX_STARTS => {
                tracing::warn!(request_id = %row.id, starts = row.starts, "a journaled job was running at every crash; it is dropped");
                if let (Fate::Rebuild, QueueKey::Model(k)) = (&fate, &queue) {
                    broken.insert(k.clone());
                }
                Fate::Forget
            }
            fate => fate,
        };
        planned.push((row, queue, work, fate));
    }
    let mut rebuilt: HashSet<ModelKey> = HashSet::new();
    for (row, queue, work, fate) in planned {
        let rebuild = match (fate, &queue) {
            (Fate::Forget, _) => {
                forget.push(row.seq);
                continue;
            }
            (Fate::Rebuild, QueueKey::Model(k)) if !broken.contains(k) => {
                rebuilt.insert(k.clone());
                true
            }
            // A lost run's gradients: forgotten, all of them.
            (Fate::Rebuild, _) => {
                forget.push(row.seq);
                continue;
            }
            (Fate::Requeue, queue) => {
                if let (QueueKey::Model(k), true) = (queue, work.accumulates_gradients()) {
                    // The pending marker may stand for it (written before its future settled).
                    rebuilt.insert(k.clone());
                }
                recovery.requeued.insert(row.id.clone());
                if let (QueueKey::Model(k), Work::Create { .. }) = (&queue, &work) {
                    recovery.creating.insert(k.clone());
                }
                false
            }
        };
        let span = tracing::info_span!(
            "job",
            request_id = %row.id,
            tenant = %row.tenant,
            queue = %queue.id(),
            kind = work.name(),
            replayed = true
        );
        recovery.jobs.push(Job {
            id: row.id,
            queue,
            work,
            enqueued: Instant::now(),
            span,
            seq: Some(row.seq),
            replay: rebuild,
        });
    }
    for key in &rebuilt {
        // The gradients the pending marker stands for are rebuilt before the run's next job.
        remove_in(&registry.snapshot_dir(key), PENDING_MARKER, key);
    }
    for key in &broken {
        // Until the run's next step is refused, whatever later restarts rebuild.
        if let Err(e) = write_marker_in(&registry.snapshot_dir(key), LOST_MARKER) {
            tracing::error!(model_id = %key.model_id, error = %e, "cannot mark lost gradients");
        }
    }
    store.delete_jobs(&forget)?;
    Ok(recovery)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SqliteStore;
    use loraloom_model::checkpoint::{self, SaveRequest};
    use loraloom_model::{AdamParams, LoraAdapter, LoraSpec, LossFn, ModelConfig, StepStats};
    use tch::Device;

    fn fb(backward: bool) -> Work {
        Work::ForwardBackward {
            data: Vec::new(),
            loss: LossFn::CrossEntropy,
            backward,
        }
    }

    fn optim() -> Work {
        Work::OptimStep {
            params: AdamParams::default(),
        }
    }

    /// A rank-2 spec of attention layers.
    fn spec() -> LoraSpec {
        LoraSpec {
            rank: 2,
            alpha: 4.0,
            seed: 0,
            train_attn: true,
            train_mlp: false,
            train_unembed: false,
        }
    }

    /// A run's snapshot in `dir` recording `position`; with `gradients_file`, as if it held
    /// gradients (only the file's presence is read here).
    fn snapshot(dir: &std::path::Path, position: &Position, gradients_file: bool) {
        let config = ModelConfig::from_json(
            r#"{"model_type":"llama","hidden_size":16,"intermediate_size":32,"num_hidden_layers":1,
            "num_attention_heads":2,"num_key_value_heads":1,"vocab_size":32}"#,
        )
        .unwrap();
        let adapter = LoraAdapter::new(spec(), &config, Device::Cpu).unwrap();
        let request = SaveRequest {
            adapter: &adapter,
            optimizer: None,
            base_model: "tiny",
            gradients: false,
            note: Some(position.note(gradients_file)),
        };
        checkpoint::save(&request, dir).unwrap();
        if gradients_file {
            std::fs::write(dir.join(checkpoint::GRADIENTS_FILE), b"").unwrap();
        }
    }

    #[test]
    fn a_restart_queues_again_rebuilds_keeps_settles_or_forgets_each_journaled_job() {
        let data_dir =
            std::env::temp_dir().join(format!("loraloom-journal-{}", uuid::Uuid::new_v4()));
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&data_dir).unwrap());
        let registry = Registry::durable(data_dir.clone(), store.clone()).unwrap();
        let run = |n: u32| {
            let key = ModelKey {
                tenant: "t".into(),
                model_id: format!("s:train:{n}"),
            };
            if n < 9 {
                registry
                    .add_model(key.clone(), "tiny", spec(), serde_json::Value::Null)
                    .unwrap();
            }
            key
        };
        let (main, crashing, stuck, kept, marked) = (run(0), run(1), run(2), run(3), run(4));
        let q = QueueKey::Model(main.clone());
        let crash_q = QueueKey::Model(crashing.clone());
        let stuck_q = QueueKey::Model(stuck.clone());
        let kept_q = QueueKey::Model(kept.clone());
        let marked_q = QueueKey::Model(marked.clone());
        let gone = QueueKey::Model(run(9));
        let done = Some(FutureState::Done(Output::Created {
            model_id: "x".into(),
        }));
        // (queue, work, its future: absent / unsettled / settled, journal row done, starts)
        type Journaled<'a> = (&'a QueueKey, Work, Option<Option<FutureState>>, bool, i64);
        let m = MAX_STARTS;
        let jobs: Vec<Journaled> = vec![
            (&q, optim(), Some(done.clone()), false, 0), // 1: held by the snapshot
            (&q, optim(), Some(None), false, 1),         // 2: held, its result lost
            (&q, fb(true), Some(done.clone()), false, 0), // 3: gradients to rebuild
            (&q, fb(true), None, true, 0),               // 4: the same, its future purged
            (&q, optim(), Some(None), false, 1),         // 5: was running: queued again
            (&q, fb(false), Some(None), false, 0),       // 6: was waiting behind it: the same
            (&gone, optim(), Some(None), false, 0),      // 7: its run is gone
            (&q, fb(false), Some(done.clone()), false, 0), // 8: settled, no gradients
            (&crash_q, fb(true), Some(done.clone()), true, 0), // 9: lost with...
            (&crash_q, fb(true), Some(done.clone()), true, m), // 10: ...this one, running at every crash
            (&stuck_q, optim(), Some(None), false, m),         // 11: the same: dropped
            (&kept_q, fb(true), Some(done.clone()), true, 0),  // 12: in the snapshot's gradients
            (&kept_q, fb(true), Some(done.clone()), true, 0),  // 13: after them: rebuilt
            (&marked_q, fb(true), Some(None), false, 1),       // 14: marked pending, then the crash
        ];
        for (i, (queue, work, future, is_done, starts)) in jobs.iter().enumerate() {
            let id = format!("r{}", i + 1);
            let seq = store
                .put_job(&row(&id, queue, work, None).unwrap())
                .unwrap();
            assert_eq!(seq, i as i64 + 1);
            if *is_done {
                store.settle_job(seq, true).unwrap();
            }
            for _ in 0..*starts {
                store.count_job_starts(&[seq]).unwrap();
            }
            if let Some(state) = future {
                let outcome = state.as_ref().map(|s| serde_json::to_string(s).unwrap());
                store
                    .put_future(
                        &FutureRow {
                            id,
                            tenant: "t".into(),
                            state: if state.is_some() { "done" } else { "queued" }.into(),
                            finished: outcome.as_ref().map(|_| 1.0),
                            outcome_json: outcome,
                            feed_json: None,
                        },
                        &[],
                    )
                    .unwrap();
            }
        }
        // `main`'s snapshot holds jobs up to 2 (its step) and is marked as pending gradients;
        // `kept`'s (a graceful shutdown's) holds the gradients of job 12.
        let stats = Output::OptimStep(StepStats {
            grad_norm: 0.5,
            step: 7,
        });
        let mut position = Position::default();
        position.applied(Some(2), stats.clone());
        let dir = registry.snapshot_dir(&main);
        snapshot(&dir, &position, false);
        std::fs::write(dir.join(PENDING_MARKER), b"").unwrap();
        let holding = Position {
            gradients: 12,
            ..Position::default()
        };
        snapshot(&registry.snapshot_dir(&kept), &holding, true);
        // `marked`: its forward_backward wrote the pending marker, and the server died before
        // its future settled.
        let marked_dir = registry.snapshot_dir(&marked);
        std::fs::create_dir_all(&marked_dir).unwrap();
        std::fs::write(marked_dir.join(PENDING_MARKER), b"").unwrap();

        let recovery = recover(store.as_ref(), &registry, &store.futures().unwrap()).unwrap();
        let planned: Vec<(&str, bool)> = recovery
            .jobs
            .iter()
            .map(|j| (j.id.as_str(), j.replay))
            .collect();
        assert_eq!(
            planned,
            [
                ("r3", true),
                ("r4", true),
                ("r5", false),
                ("r6", false),
                ("r13", true),
                ("r14", false)
            ]
        );
        let requeued = HashSet::from(["r5", "r6", "r14"].map(String::from));
        assert_eq!(recovery.requeued, requeued);
        assert_eq!(recovery.settled, vec![("r2".to_string(), stats)]);
        assert!(recovery.creating.is_empty());
        // What is left journaled: the gradients' jobs and the ones queued again (which count
        // their starts when they start).
        let left: Vec<(i64, bool, i64)> = store
            .jobs()
            .unwrap()
            .iter()
            .map(|r| (r.seq, r.done, r.starts))
            .collect();
        assert_eq!(
            left,
            [
                (3, false, 0),
                (4, true, 0),
                (5, false, 1),
                (6, false, 0),
                (12, true, 0),
                (13, true, 0),
                (14, false, 1)
            ]
        );
        // The gradients `main`'s pending marker stood for are rebuilt. Those of the run whose
        // rebuild ran at every restart are not: they are marked lost, and its next step is
        // refused however later restarts go. A step dropped loses no gradients.
        assert!(!dir.join(PENDING_MARKER).exists());
        assert!(registry.snapshot_dir(&crashing).join(LOST_MARKER).exists());
        assert!(!registry.snapshot_dir(&stuck).join(LOST_MARKER).exists());
        // The job the pending marker may stand for runs again: the marker goes.
        assert!(!marked_dir.join(PENDING_MARKER).exists());
        let _ = std::fs::remove_dir_all(&data_dir);
    }

    #[test]
    fn a_snapshot_records_gradients_no_journal_answers_for_while_it_holds_them() {
        let dir = std::env::temp_dir().join(format!("loraloom-position-{}", uuid::Uuid::new_v4()));
        let position = Position {
            weights: 3,
            output: None,
            gradients: 9,
            unjournaled: true,
        };
        let weights_only = Position {
            gradients: 0,
            unjournaled: false,
            ..position.clone()
        };
        // Written with its gradients (a graceful shutdown's): read back whole while the
        // gradients file is there, without the gradients' part once it is gone.
        snapshot(&dir, &position, true);
        assert_eq!(Position::of_snapshot(&dir), position);
        std::fs::remove_file(dir.join(checkpoint::GRADIENTS_FILE)).unwrap();
        assert_eq!(Position::of_snapshot(&dir), weights_only);
        // Written without them (a step's snapshot): the weights' part only.
        snapshot(&dir, &position, false);
        assert_eq!(Position::of_snapshot(&dir), weights_only);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
