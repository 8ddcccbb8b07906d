//! The durable store: sessions, training runs, sampling sessions, the checkpoint index, every
//! future with its result, and the sampled sequences recorded for `stable_reinforce`. [`Store`] is the contract (a PostgreSQL implementation can follow for
//! several servers sharing state); [`SqliteStore`] is the embedded default, one file in the data
//! directory. Checkpoint and run-snapshot files live beside it.

use std::collections::HashSet;
use std::ops::Range;
use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension};

use crate::error::{EngineError, Result};
use crate::usage::{CheckpointLife, UsageKind, UsageRow};

/// A client session.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionRow {
    /// Session id.
    pub id: String,
    /// Owner.
    pub tenant: String,
    /// Creation time (unix seconds).
    pub created: f64,
    /// What the client said about it and what became of it, as JSON (the API layer's shape).
    pub details_json: String,
}

/// A training run (its weights live in snapshot and checkpoint files).
#[derive(Debug, Clone, PartialEq)]
pub struct ModelRow {
    /// Owner.
    pub tenant: String,
    /// Run id.
    pub model_id: String,
    /// Base model name.
    pub base_model: String,
    /// LoRA spec as JSON.
    pub spec_json: String,
    /// Client metadata as JSON.
    pub metadata_json: String,
    /// Creation time (unix seconds).
    pub created: f64,
}

/// A sampling session.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplerRow {
    /// Owner.
    pub tenant: String,
    /// Session id.
    pub sampler_id: String,
    /// Checkpoint path, or `None` for the base model.
    pub checkpoint: Option<String>,
    /// Base model name.
    pub base_model: String,
    /// The run whose inflight saves it follows (`kind="inflight"`), if any.
    pub inflight_of: Option<String>,
}

/// A checkpoint in the index.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointRow {
    /// Owner.
    pub tenant: String,
    /// `tinker://` path.
    pub path: String,
    /// The record as JSON.
    pub record_json: String,
}

/// A future: its state name and, once finished, its outcome as JSON.
#[derive(Debug, Clone, PartialEq)]
pub struct FutureRow {
    /// Request id.
    pub id: String,
    /// Owner.
    pub tenant: String,
    /// `queued`, `done` or `failed`.
    pub state: String,
    /// Output or error as JSON when finished.
    pub outcome_json: Option<String>,
    /// Finish time (unix seconds).
    pub finished: Option<f64>,
    /// The completion feed it reports to (a sampling session's, as JSON), if any.
    pub feed_json: Option<String>,
}

/// A sampled sequence recorded at sampling time (`record_stability_info`), which
/// `stable_reinforce` training requests name by its id.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleRow {
    /// Owner.
    pub tenant: String,
    /// `SampledSequence.sequence_id` (`<request id>:<index>`).
    pub id: String,
    /// The sampling session that drew it.
    pub sampler: String,
    /// The request's prompt.
    pub prompt: Vec<i64>,
    /// The sampled tokens.
    pub tokens: Vec<i64>,
    /// Each sampled token's log-probability under the distribution it was drawn from.
    pub logprobs: Vec<f32>,
    /// When it was sampled or last named by a training request (unix seconds).
    pub used: f64,
}

/// A custom loss a session uploaded (`create_custom_loss`).
#[derive(Debug, Clone, PartialEq)]
pub struct CustomLossRow {
    /// `<session>:loss:<seq>`.
    pub id: String,
    /// Owner.
    pub tenant: String,
    /// The loss's name.
    pub name: String,
    /// Its parameters as JSON.
    pub params_json: String,
    /// Its graph as JSON, as uploaded.
    pub graph_json: String,
    /// Creation time (unix seconds).
    pub created: f64,
}

/// One entry of a tenant's audit log (`GET /api/v1/audit`).
#[derive(Debug, Clone, PartialEq)]
pub struct AuditRow {
    /// Whose log it is in (the owner of what the event is about).
    pub tenant: String,
    /// When (unix seconds).
    pub at: f64,
    /// `<resource>_<action>`, e.g. `checkpoint_read`.
    pub event: String,
    /// Who did it and what it was about, as a JSON object.
    pub details_json: String,
}

/// The audit event of an API key that came into force (in its tenant's log; details: its
/// public `key_id`, never the key).
pub const API_KEY_ADDED: &str = "organization_api_key_added";
/// The audit event of an API key no longer in force (revoked or rotated out).
pub const API_KEY_REVOKED: &str = "organization_api_key_revoked";

/// Where loraloom keeps what must survive a restart.
pub trait Store: Send + Sync {
    /// Records a session.
    fn put_session(&self, row: &SessionRow) -> Result<()>;
    /// Forgets a session.
    fn delete_session(&self, id: &str) -> Result<()>;
    /// Every session.
    fn sessions(&self) -> Result<Vec<SessionRow>>;
    /// Records (or replaces) a run.
    fn put_model(&self, row: &ModelRow) -> Result<()>;
    /// Forgets a run.
    fn delete_model(&self, tenant: &str, model_id: &str) -> Result<()>;
    /// Every run.
    fn models(&self) -> Result<Vec<ModelRow>>;
    /// Records a sampling session.
    fn put_sampler(&self, row: &SamplerRow) -> Result<()>;
    /// Every sampling session.
    fn samplers(&self) -> Result<Vec<SamplerRow>>;
    /// Forgets a sampling session.
    fn delete_sampler(&self, tenant: &str, sampler_id: &str) -> Result<()>;
    /// Records (or replaces) a checkpoint; `replaced`: the life of the one it replaces, stored
    /// in the same transaction.
    fn put_checkpoint(&self, row: &CheckpointRow, replaced: Option<&CheckpointLife>) -> Result<()>;
    /// Every checkpoint.
    fn checkpoints(&self) -> Result<Vec<CheckpointRow>>;
    /// Forgets a checkpoint; `ended`: its life, stored in the same transaction.
    fn delete_checkpoint(
        &self,
        tenant: &str,
        path: &str,
        ended: Option<&CheckpointLife>,
    ) -> Result<()>;
    /// Records (or updates) a future, and the usage its job metered, in one transaction: a crash
    /// keeps both or neither, so a job the journal runs again is metered once.
    fn put_future(&self, row: &FutureRow, usage: &[UsageRow]) -> Result<()>;
    /// Every future.
    fn futures(&self) -> Result<Vec<FutureRow>>;
    /// Forgets futures finished before `unix_time`; returns how many.
    fn purge_futures(&self, unix_time: f64) -> Result<usize>;
    /// Forgets futures (in one transaction).
    fn delete_futures(&self, ids: &[String]) -> Result<()>;
    /// The next clone id of a sampling session (`join_sampling_session`: 1, 2, ...; the
    /// original client is 0), counted in the store so none is handed out twice, restarts
    /// included.
    fn next_sampler_clone(&self, tenant: &str, sampler_id: &str) -> Result<u64>;
    /// Records sampled sequences of one tenant (in one transaction).
    fn put_samples(&self, tenant: &str, rows: &[SampleRow]) -> Result<()>;
    /// The tenant's recorded sequences among `ids` (unknown ids are absent), each marked used
    /// at `now`.
    fn use_samples(&self, tenant: &str, ids: &[String], now: f64) -> Result<Vec<SampleRow>>;
    /// Forgets recorded sequences unused since `unix_time`, then each tenant's least recently
    /// used ones beyond `keep_per_tenant`; returns how many.
    fn purge_samples(&self, unix_time: f64, keep_per_tenant: usize) -> Result<usize>;
    /// Adds metered usage (in one transaction): each row's amount is added to what its
    /// (tenant, hour, source, kind) already holds.
    fn add_usage(&self, rows: &[UsageRow]) -> Result<()>;
    /// The tenant's metered usage in `hours` (hours since the epoch).
    fn usage(&self, tenant: &str, hours: Range<i64>) -> Result<Vec<UsageRow>>;
    /// The lives of the tenant's gone checkpoints that were written or held within `span`
    /// (unix seconds).
    fn checkpoint_lives(&self, tenant: &str, span: Range<f64>) -> Result<Vec<CheckpointLife>>;
    /// Records a custom loss unless one with its id exists; returns the row stored under its
    /// id (the existing one, when there was one).
    fn put_custom_loss(&self, row: &CustomLossRow) -> Result<CustomLossRow>;
    /// The custom loss `id` of `tenant`, if it exists.
    fn custom_loss(&self, tenant: &str, id: &str) -> Result<Option<CustomLossRow>>;
    /// The ceiling stored by [`Store::put_feed_cursor_ceiling`] (0 when none).
    fn feed_cursor_ceiling(&self) -> Result<u64>;
    /// Records that no completion feed cursor at or above `ceiling` was handed out.
    fn put_feed_cursor_ceiling(&self, ceiling: u64) -> Result<()>;
    /// Appends an entry to a tenant's audit log.
    fn add_audit(&self, row: &AuditRow) -> Result<()>;
    /// The tenant's audit entries within `span` (unix seconds), oldest first.
    fn audit(&self, tenant: &str, span: Range<f64>) -> Result<Vec<AuditRow>>;
    /// Forgets audit entries older than `unix_time`; returns how many.
    fn purge_audit(&self, unix_time: f64) -> Result<usize>;
    /// Records `in_force` (key id, tenant) as the API keys in force and, in the same
    /// transaction, writes an audit entry in its tenant's log for every key that is new since
    /// the last call ([`API_KEY_ADDED`]) and every key gone since ([`API_KEY_REVOKED`]), at
    /// `at`, with `details` added to each entry's. Returns how many entries it wrote.
    fn replace_api_keys(
        &self,
        in_force: &[(u64, String)],
        at: f64,
        details: &serde_json::Value,
    ) -> Result<usize>;
    /// Journals a job (its `seq`, `done` and `starts` are ignored); returns its seq.
    fn put_job(&self, row: &JobRow) -> Result<i64>;
    /// Every journaled job, in admission order.
    fn jobs(&self) -> Result<Vec<JobRow>>;
    /// A journaled job finished: kept, marked done (`keep`; its starts count from 0 again),
    /// or forgotten.
    fn settle_job(&self, seq: i64, keep: bool) -> Result<()>;
    /// Forgets the finished jobs of queue `queue_json` admitted before `seq`.
    fn forget_done_jobs(&self, queue_json: &str, seq: i64) -> Result<()>;
    /// Counts a start of each of the jobs `seqs` (in one transaction).
    fn count_job_starts(&self, seqs: &[i64]) -> Result<()>;
    /// Forgets journaled jobs (in one transaction).
    fn delete_jobs(&self, seqs: &[i64]) -> Result<()>;
}

/// A journaled job (see [`crate::journal`]): admitted and not yet settled, or a
/// `forward_backward` whose gradients no snapshot of its run holds yet.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRow {
    /// Admission order, increasing over the store's life (never reused, restarts included).
    pub seq: i64,
    /// Its future's id.
    pub id: String,
    /// Owner.
    pub tenant: String,
    /// The queue it waits in, as JSON.
    pub queue_json: String,
    /// What it does, as JSON.
    pub work_json: String,
    /// It finished (a `forward_backward` kept for its gradients).
    pub done: bool,
    /// Times it started without settling since it was admitted or last done (each one a
    /// crash, or a drain that stopped it, while it ran).
    pub starts: i64,
    /// The submitting request's replay key (its route and idempotency key or body digest), by
    /// which a client's retry after a crash finds the job instead of submitting it twice.
    pub client_key: Option<String>,
}

/// SQLite in one file (WAL journal: a killed process loses no committed row).
pub struct SqliteStore {
    conn: Mutex<Connection>,
}

fn db_err(e: rusqlite::Error) -> EngineError {
    EngineError::Internal(format!("store: {e}"))
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS sessions (id TEXT PRIMARY KEY, tenant TEXT NOT NULL, created REAL NOT NULL,
  details TEXT NOT NULL DEFAULT '{}');
CREATE TABLE IF NOT EXISTS models (tenant TEXT NOT NULL, model_id TEXT NOT NULL, base_model TEXT NOT NULL,
  spec TEXT NOT NULL, metadata TEXT NOT NULL, created REAL NOT NULL, PRIMARY KEY (tenant, model_id));
CREATE TABLE IF NOT EXISTS samplers (tenant TEXT NOT NULL, sampler_id TEXT NOT NULL, checkpoint TEXT,
  base_model TEXT NOT NULL, inflight_of TEXT, PRIMARY KEY (tenant, sampler_id));
CREATE TABLE IF NOT EXISTS checkpoints (tenant TEXT NOT NULL, path TEXT NOT NULL, record TEXT NOT NULL,
  PRIMARY KEY (tenant, path));
CREATE TABLE IF NOT EXISTS futures (id TEXT PRIMARY KEY, tenant TEXT NOT NULL, state TEXT NOT NULL,
  outcome TEXT, finished REAL, feed TEXT);
CREATE INDEX IF NOT EXISTS futures_finished ON futures (finished);
CREATE TABLE IF NOT EXISTS samples (tenant TEXT NOT NULL, id TEXT NOT NULL, sampler TEXT NOT NULL,
  prompt BLOB NOT NULL, tokens BLOB NOT NULL, logprobs BLOB NOT NULL, used REAL NOT NULL,
  PRIMARY KEY (tenant, id));
CREATE INDEX IF NOT EXISTS samples_used ON samples (tenant, used);
CREATE INDEX IF NOT EXISTS samples_age ON samples (used);
CREATE TABLE IF NOT EXISTS usage (tenant TEXT NOT NULL, hour INTEGER NOT NULL, source TEXT NOT NULL,
  kind TEXT NOT NULL, amount REAL NOT NULL, PRIMARY KEY (tenant, hour, source, kind));
CREATE TABLE IF NOT EXISTS checkpoint_lives (tenant TEXT NOT NULL, source TEXT NOT NULL,
  created REAL NOT NULL, ended REAL NOT NULL, bytes INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS checkpoint_lives_tenant ON checkpoint_lives (tenant, created);
CREATE TABLE IF NOT EXISTS sampler_clones (tenant TEXT NOT NULL, sampler_id TEXT NOT NULL,
  clones INTEGER NOT NULL, PRIMARY KEY (tenant, sampler_id));
CREATE TABLE IF NOT EXISTS feed_cursor (id INTEGER PRIMARY KEY CHECK (id = 0),
  ceiling INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS audit (tenant TEXT NOT NULL, at REAL NOT NULL, event TEXT NOT NULL,
  details TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS audit_tenant ON audit (tenant, at);
CREATE TABLE IF NOT EXISTS api_keys (key_id INTEGER NOT NULL, tenant TEXT NOT NULL,
  PRIMARY KEY (key_id, tenant));
CREATE TABLE IF NOT EXISTS custom_losses (id TEXT PRIMARY KEY, tenant TEXT NOT NULL, name TEXT NOT NULL,
  params TEXT NOT NULL, graph TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL,
  tenant TEXT NOT NULL, queue TEXT NOT NULL, work TEXT NOT NULL, done INTEGER NOT NULL DEFAULT 0,
  starts INTEGER NOT NULL DEFAULT 0, client_key TEXT);
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs (queue, seq);
";

impl SqliteStore {
    /// Opens (creating when absent) `loraloom.db` in `data_dir`.
    pub fn open(data_dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(data_dir)
            .map_err(|e| EngineError::Internal(format!("store: {e}")))?;
        Self::from_connection(Connection::open(data_dir.join("loraloom.db")).map_err(db_err)?)
    }

    /// A private in-memory database (tests).
    pub fn in_memory() -> Result<Self> {
        Self::from_connection(Connection::open_in_memory().map_err(db_err)?)
    }

    fn from_connection(conn: Connection) -> Result<Self> {
        conn.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA busy_timeout=5000;",
        )
        .map_err(db_err)?;
        conn.execute_batch(SCHEMA).map_err(db_err)?;
        migrate(&conn).map_err(db_err)?;
        Ok(SqliteStore {
            conn: Mutex::new(conn),
        })
    }

    /// Runs `sql` (one parameter, `?1`) once for each of `keys`, in one transaction.
    fn execute_each<K: rusqlite::ToSql>(&self, sql: &str, keys: &[K]) -> Result<()> {
        let mut conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        let tx = conn.transaction().map_err(db_err)?;
        {
            let mut st = tx.prepare_cached(sql).map_err(db_err)?;
            for key in keys {
                st.execute(params![key]).map_err(db_err)?;
            }
        }
        tx.commit().map_err(db_err)
    }

    fn with<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T> {
        let conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        f(&conn).map_err(db_err)
    }

    /// Runs `f` in one transaction, committed when it succeeds.
    fn in_transaction(
        &self,
        f: impl FnOnce(&rusqlite::Transaction) -> rusqlite::Result<()>,
    ) -> Result<()> {
        let mut conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        let tx = conn.transaction().map_err(db_err)?;
        f(&tx).map_err(db_err)?;
        tx.commit().map_err(db_err)
    }
}

/// Adds each row's amount to what its (tenant, hour, source, kind) already holds.
fn insert_usage(tx: &rusqlite::Transaction, rows: &[UsageRow]) -> rusqlite::Result<()> {
    let mut st = tx.prepare_cached(
        "INSERT INTO usage (tenant, hour, source, kind, amount) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (tenant, hour, source, kind) DO UPDATE SET amount = amount + excluded.amount",
    )?;
    for r in rows {
        st.execute(params![
            r.tenant,
            r.hour,
            r.source,
            r.kind.as_str(),
            r.amount
        ])?;
    }
    Ok(())
}

/// Brings a database written by an older loraloom up to [`SCHEMA`]: columns added since.
fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    add_column(conn, "sessions", "details", "TEXT NOT NULL DEFAULT '{}'")?;
    add_column(conn, "samplers", "inflight_of", "TEXT")?;
    add_column(conn, "futures", "feed", "TEXT")
}

/// Adds `column` (of `definition`) to `table` unless it has it.
fn add_column(
    conn: &Connection,
    table: &str,
    column: &str,
    definition: &str,
) -> rusqlite::Result<()> {
    let present = conn
        .prepare("SELECT 1 FROM pragma_table_info(?1) WHERE name = ?2")?
        .exists(params![table, column])?;
    if !present {
        conn.execute_batch(&format!(
            "ALTER TABLE {table} ADD COLUMN {column} {definition}"
        ))?;
    }
    Ok(())
}

impl Store for SqliteStore {
    fn put_session(&self, r: &SessionRow) -> Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT OR REPLACE INTO sessions (id, tenant, created, details) VALUES (?1, ?2, ?3, ?4)",
                params![r.id, r.tenant, r.created, r.details_json],
            )
            .map(|_| ())
        })
    }

    fn delete_session(&self, id: &str) -> Result<()> {
        self.with(|c| {
            c.execute("DELETE FROM sessions WHERE id = ?1", params![id])
                .map(|_| ())
        })
    }

    fn sessions(&self) -> Result<Vec<SessionRow>> {
        self.with(|c| {
            let mut st = c.prepare("SELECT id, tenant, created, details FROM sessions")?;
            let rows = st.query_map([], |r| {
                Ok(SessionRow {
                    id: r.get(0)?,
                    tenant: r.get(1)?,
                    created: r.get(2)?,
                    details_json: r.get(3)?,
                })
            })?;
            rows.collect()
        })
    }

    fn put_model(&self, r: &ModelRow) -> Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT OR REPLACE INTO models (tenant, model_id, base_model, spec, metadata, created)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![r.tenant, r.model_id, r.base_model, r.spec_json, r.metadata_json, r.created],
            )
            .map(|_| ())
        })
    }

    fn delete_model(&self, tenant: &str, model_id: &str) -> Result<()> {
        self.with(|c| {
            c.execute(
                "DELETE FROM models WHERE tenant = ?1 AND model_id = ?2",
                params![tenant, model_id],
            )
            .map(|_| ())
        })
    }

    fn models(&self) -> Result<Vec<ModelRow>> {
        self.with(|c| {
            let mut st =
                c.prepare("SELECT tenant, model_id, base_model, spec, metadata, created FROM models ORDER BY created")?;
            let rows = st.query_map([], |r| {
                Ok(ModelRow {
                    tenant: r.get(0)?,
                    model_id: r.get(1)?,
                    base_model: r.get(2)?,
                    spec_json: r.get(3)?,
                    metadata_json: r.get(4)?,
                    created: r.get(5)?,
                })
            })?;
            rows.collect()
        })
    }

    fn put_sampler(&self, r: &SamplerRow) -> Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT OR REPLACE INTO samplers (tenant, sampler_id, checkpoint, base_model, inflight_of) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![r.tenant, r.sampler_id, r.checkpoint, r.base_model, r.inflight_of],
            )
            .map(|_| ())
        })
    }

    fn samplers(&self) -> Result<Vec<SamplerRow>> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT tenant, sampler_id, checkpoint, base_model, inflight_of FROM samplers",
            )?;
            let rows = st.query_map([], |r| {
                Ok(SamplerRow {
                    tenant: r.get(0)?,
                    sampler_id: r.get(1)?,
                    checkpoint: r.get(2)?,
                    base_model: r.get(3)?,
                    inflight_of: r.get(4)?,
                })
            })?;
            rows.collect()
        })
    }

    fn put_checkpoint(&self, r: &CheckpointRow, replaced: Option<&CheckpointLife>) -> Result<()> {
        self.with(|c| {
            let tx = c.unchecked_transaction()?;
            tx.execute(
                "INSERT OR REPLACE INTO checkpoints (tenant, path, record) VALUES (?1, ?2, ?3)",
                params![r.tenant, r.path, r.record_json],
            )?;
            if let Some(life) = replaced {
                put_life(&tx, life)?;
            }
            tx.commit()
        })
    }

    fn checkpoints(&self) -> Result<Vec<CheckpointRow>> {
        self.with(|c| {
            let mut st = c.prepare("SELECT tenant, path, record FROM checkpoints")?;
            let rows = st.query_map([], |r| {
                Ok(CheckpointRow {
                    tenant: r.get(0)?,
                    path: r.get(1)?,
                    record_json: r.get(2)?,
                })
            })?;
            rows.collect()
        })
    }

    fn delete_sampler(&self, tenant: &str, sampler_id: &str) -> Result<()> {
        self.with(|c| {
            c.execute(
                "DELETE FROM samplers WHERE tenant = ?1 AND sampler_id = ?2",
                params![tenant, sampler_id],
            )
            .map(|_| ())
        })
    }

    fn delete_checkpoint(
        &self,
        tenant: &str,
        path: &str,
        ended: Option<&CheckpointLife>,
    ) -> Result<()> {
        self.with(|c| {
            let tx = c.unchecked_transaction()?;
            tx.execute(
                "DELETE FROM checkpoints WHERE tenant = ?1 AND path = ?2",
                params![tenant, path],
            )?;
            if let Some(life) = ended {
                put_life(&tx, life)?;
            }
            tx.commit()
        })
    }

    fn put_future(&self, r: &FutureRow, usage: &[UsageRow]) -> Result<()> {
        self.in_transaction(|tx| {
            tx.execute(
                "INSERT OR REPLACE INTO futures (id, tenant, state, outcome, finished, feed) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![r.id, r.tenant, r.state, r.outcome_json, r.finished, r.feed_json],
            )?;
            insert_usage(tx, usage)
        })
    }

    fn futures(&self) -> Result<Vec<FutureRow>> {
        self.with(|c| {
            let mut st =
                c.prepare("SELECT id, tenant, state, outcome, finished, feed FROM futures")?;
            let rows = st.query_map([], |r| {
                Ok(FutureRow {
                    id: r.get(0)?,
                    tenant: r.get(1)?,
                    state: r.get(2)?,
                    outcome_json: r.get(3)?,
                    finished: r.get(4)?,
                    feed_json: r.get(5)?,
                })
            })?;
            rows.collect()
        })
    }

    fn purge_futures(&self, unix_time: f64) -> Result<usize> {
        self.with(|c| {
            c.execute(
                "DELETE FROM futures WHERE finished IS NOT NULL AND finished < ?1",
                params![unix_time],
            )
        })
    }

    fn delete_futures(&self, ids: &[String]) -> Result<()> {
        self.execute_each("DELETE FROM futures WHERE id = ?1", ids)
    }

    fn next_sampler_clone(&self, tenant: &str, sampler_id: &str) -> Result<u64> {
        self.with(|c| {
            c.query_row(
                "INSERT INTO sampler_clones (tenant, sampler_id, clones) VALUES (?1, ?2, 1)
                 ON CONFLICT (tenant, sampler_id) DO UPDATE SET clones = clones + 1
                 RETURNING clones",
                params![tenant, sampler_id],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n.max(0) as u64)
        })
    }

    fn put_samples(&self, tenant: &str, rows: &[SampleRow]) -> Result<()> {
        let mut conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        let tx = conn.transaction().map_err(db_err)?;
        {
            let mut st = tx
                .prepare(
                    "INSERT OR REPLACE INTO samples (tenant, id, sampler, prompt, tokens, logprobs, used)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                )
                .map_err(db_err)?;
            for r in rows {
                let logprobs: Vec<u8> = r.logprobs.iter().flat_map(|x| x.to_le_bytes()).collect();
                st.execute(params![
                    tenant,
                    r.id,
                    r.sampler,
                    token_blob(&r.prompt),
                    token_blob(&r.tokens),
                    logprobs,
                    r.used
                ])
                .map_err(db_err)?;
            }
        }
        tx.commit().map_err(db_err)
    }

    fn use_samples(&self, tenant: &str, ids: &[String], now: f64) -> Result<Vec<SampleRow>> {
        self.with(|c| {
            // One transaction: a request may name thousands of sequences.
            let tx = c.unchecked_transaction()?;
            let mut get = tx.prepare_cached(
                "SELECT sampler, prompt, tokens, logprobs FROM samples WHERE tenant = ?1 AND id = ?2",
            )?;
            let mut touch =
                tx.prepare_cached("UPDATE samples SET used = ?3 WHERE tenant = ?1 AND id = ?2")?;
            let mut rows = Vec::new();
            for id in ids {
                let row = get
                    .query_row(params![tenant, id], |r| {
                        Ok(SampleRow {
                            tenant: tenant.to_string(),
                            id: id.clone(),
                            sampler: r.get(0)?,
                            prompt: blob_tokens(&r.get::<_, Vec<u8>>(1)?),
                            tokens: blob_tokens(&r.get::<_, Vec<u8>>(2)?),
                            logprobs: blob_floats(&r.get::<_, Vec<u8>>(3)?),
                            used: now,
                        })
                    })
                    .optional()?;
                if let Some(row) = row {
                    touch.execute(params![tenant, id, now])?;
                    rows.push(row);
                }
            }
            drop((get, touch));
            tx.commit()?;
            Ok(rows)
        })
    }

    fn purge_samples(&self, unix_time: f64, keep_per_tenant: usize) -> Result<usize> {
        self.with(|c| {
            let mut gone = c.execute("DELETE FROM samples WHERE used < ?1", params![unix_time])?;
            let keep = i64::try_from(keep_per_tenant).unwrap_or(i64::MAX);
            let over: Vec<(String, i64)> = c
                .prepare(
                    "SELECT tenant, COUNT(*) FROM samples GROUP BY tenant HAVING COUNT(*) > ?1",
                )?
                .query_map(params![keep], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<rusqlite::Result<_>>()?;
            for (tenant, held) in over {
                gone += c.execute(
                    "DELETE FROM samples WHERE rowid IN
                       (SELECT rowid FROM samples WHERE tenant = ?1 ORDER BY used LIMIT ?2)",
                    params![tenant, held - keep],
                )?;
            }
            Ok(gone)
        })
    }

    fn add_usage(&self, rows: &[UsageRow]) -> Result<()> {
        self.in_transaction(|tx| insert_usage(tx, rows))
    }

    fn usage(&self, tenant: &str, hours: Range<i64>) -> Result<Vec<UsageRow>> {
        self.with(|c| {
            let mut st = c.prepare_cached(
                "SELECT hour, source, kind, amount FROM usage
                 WHERE tenant = ?1 AND hour >= ?2 AND hour < ?3 ORDER BY hour, source, kind",
            )?;
            let rows = st.query_map(params![tenant, hours.start, hours.end], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, f64>(3)?,
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (hour, source, kind, amount) = row?;
                // A kind a newer loraloom wrote is skipped, not an error.
                if let Some(kind) = UsageKind::parse(&kind) {
                    out.push(UsageRow {
                        tenant: tenant.to_string(),
                        hour,
                        source,
                        kind,
                        amount,
                    });
                }
            }
            Ok(out)
        })
    }

    fn checkpoint_lives(&self, tenant: &str, span: Range<f64>) -> Result<Vec<CheckpointLife>> {
        self.with(|c| {
            let mut st = c.prepare_cached(
                "SELECT source, created, ended, bytes FROM checkpoint_lives
                 WHERE tenant = ?1 AND created < ?3 AND ended >= ?2 ORDER BY created",
            )?;
            let rows = st.query_map(params![tenant, span.start, span.end], |r| {
                Ok(CheckpointLife {
                    tenant: tenant.to_string(),
                    source: r.get(0)?,
                    created: r.get(1)?,
                    ended: r.get(2)?,
                    bytes: r.get::<_, i64>(3)? as u64,
                })
            })?;
            rows.collect()
        })
    }

    fn put_custom_loss(&self, row: &CustomLossRow) -> Result<CustomLossRow> {
        self.with(|c| {
            c.execute(
                "INSERT OR IGNORE INTO custom_losses (id, tenant, name, params, graph, created)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    row.id,
                    row.tenant,
                    row.name,
                    row.params_json,
                    row.graph_json,
                    row.created
                ],
            )?;
            c.query_row(
                "SELECT id, tenant, name, params, graph, created FROM custom_losses WHERE id = ?1",
                params![row.id],
                custom_loss_row,
            )
        })
    }

    fn custom_loss(&self, tenant: &str, id: &str) -> Result<Option<CustomLossRow>> {
        self.with(|c| {
            c.query_row(
                "SELECT id, tenant, name, params, graph, created FROM custom_losses
                 WHERE id = ?1 AND tenant = ?2",
                params![id, tenant],
                custom_loss_row,
            )
            .optional()
        })
    }

    fn feed_cursor_ceiling(&self) -> Result<u64> {
        self.with(|c| {
            c.query_row("SELECT ceiling FROM feed_cursor WHERE id = 0", [], |r| {
                r.get::<_, i64>(0)
            })
            .optional()
            .map(|n| n.map_or(0, |n| n.max(0) as u64))
        })
    }

    fn put_feed_cursor_ceiling(&self, ceiling: u64) -> Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT INTO feed_cursor (id, ceiling) VALUES (0, ?1)
                 ON CONFLICT (id) DO UPDATE SET ceiling = max(ceiling, excluded.ceiling)",
                params![ceiling as i64],
            )
            .map(|_| ())
        })
    }

    fn add_audit(&self, r: &AuditRow) -> Result<()> {
        self.with(|c| {
            c.prepare_cached(
                "INSERT INTO audit (tenant, at, event, details) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![r.tenant, r.at, r.event, r.details_json])
            .map(|_| ())
        })
    }

    fn audit(&self, tenant: &str, span: Range<f64>) -> Result<Vec<AuditRow>> {
        self.with(|c| {
            let mut st = c.prepare_cached(
                "SELECT tenant, at, event, details FROM audit
                 WHERE tenant = ?1 AND at >= ?2 AND at < ?3 ORDER BY at, rowid",
            )?;
            let rows = st.query_map(params![tenant, span.start, span.end], |r| {
                Ok(AuditRow {
                    tenant: r.get(0)?,
                    at: r.get(1)?,
                    event: r.get(2)?,
                    details_json: r.get(3)?,
                })
            })?;
            rows.collect()
        })
    }

    fn purge_audit(&self, unix_time: f64) -> Result<usize> {
        self.with(|c| c.execute("DELETE FROM audit WHERE at < ?1", params![unix_time]))
    }

    fn replace_api_keys(
        &self,
        in_force: &[(u64, String)],
        at: f64,
        details: &serde_json::Value,
    ) -> Result<usize> {
        let mut written = 0;
        self.in_transaction(|tx| {
            let stored: HashSet<(u64, String)> = tx
                .prepare("SELECT key_id, tenant FROM api_keys")?
                .query_map([], |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)))?
                .collect::<rusqlite::Result<_>>()?;
            let now: HashSet<(u64, String)> = in_force.iter().cloned().collect();
            let changes = now
                .difference(&stored)
                .map(|k| (k, API_KEY_ADDED))
                .chain(stored.difference(&now).map(|k| (k, API_KEY_REVOKED)));
            let mut audit = tx.prepare_cached(
                "INSERT INTO audit (tenant, at, event, details) VALUES (?1, ?2, ?3, ?4)",
            )?;
            for ((key_id, tenant), event) in changes {
                let mut entry = details.clone();
                entry["key_id"] = serde_json::json!(key_id);
                audit.execute(params![tenant, at, event, entry.to_string()])?;
                written += 1;
            }
            tx.execute("DELETE FROM api_keys", [])?;
            let mut insert =
                tx.prepare_cached("INSERT INTO api_keys (key_id, tenant) VALUES (?1, ?2)")?;
            for (key_id, tenant) in &now {
                insert.execute(params![*key_id as i64, tenant])?;
            }
            Ok(())
        })?;
        Ok(written)
    }

    fn put_job(&self, r: &JobRow) -> Result<i64> {
        self.with(|c| {
            c.execute(
                "INSERT INTO jobs (id, tenant, queue, work, client_key) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![r.id, r.tenant, r.queue_json, r.work_json, r.client_key],
            )?;
            Ok(c.last_insert_rowid())
        })
    }

    fn jobs(&self) -> Result<Vec<JobRow>> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT seq, id, tenant, queue, work, done, starts, client_key FROM jobs ORDER BY seq",
            )?;
            let rows = st.query_map([], |r| {
                Ok(JobRow {
                    seq: r.get(0)?,
                    id: r.get(1)?,
                    tenant: r.get(2)?,
                    queue_json: r.get(3)?,
                    work_json: r.get(4)?,
                    done: r.get(5)?,
                    starts: r.get(6)?,
                    client_key: r.get(7)?,
                })
            })?;
            rows.collect()
        })
    }

    fn settle_job(&self, seq: i64, keep: bool) -> Result<()> {
        let sql = match keep {
            true => "UPDATE jobs SET done = 1, starts = 0 WHERE seq = ?1",
            false => "DELETE FROM jobs WHERE seq = ?1",
        };
        self.with(|c| c.execute(sql, params![seq]).map(|_| ()))
    }

    fn forget_done_jobs(&self, queue_json: &str, seq: i64) -> Result<()> {
        self.with(|c| {
            c.execute(
                "DELETE FROM jobs WHERE queue = ?1 AND seq < ?2 AND done = 1",
                params![queue_json, seq],
            )
            .map(|_| ())
        })
    }

    fn count_job_starts(&self, seqs: &[i64]) -> Result<()> {
        self.execute_each("UPDATE jobs SET starts = starts + 1 WHERE seq = ?1", seqs)
    }

    fn delete_jobs(&self, seqs: &[i64]) -> Result<()> {
        self.execute_each("DELETE FROM jobs WHERE seq = ?1", seqs)
    }
}

/// Stores a gone checkpoint's life.
fn custom_loss_row(r: &rusqlite::Row) -> rusqlite::Result<CustomLossRow> {
    Ok(CustomLossRow {
        id: r.get(0)?,
        tenant: r.get(1)?,
        name: r.get(2)?,
        params_json: r.get(3)?,
        graph_json: r.get(4)?,
        created: r.get(5)?,
    })
}

fn put_life(c: &Connection, life: &CheckpointLife) -> rusqlite::Result<()> {
    c.execute(
        "INSERT INTO checkpoint_lives (tenant, source, created, ended, bytes) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![life.tenant, life.source, life.created, life.ended, life.bytes as i64],
    )
    .map(|_| ())
}

/// Token ids as little-endian i32s (ids are vocabulary indices).
fn token_blob(tokens: &[i64]) -> Vec<u8> {
    tokens
        .iter()
        .flat_map(|&t| (t as i32).to_le_bytes())
        .collect()
}

fn blob_tokens(bytes: &[u8]) -> Vec<i64> {
    bytes
        .chunks_exact(4)
        .map(|c| i64::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]])))
        .collect()
}

fn blob_floats(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Whether a store row exists (used by tests).
pub fn has_future(store: &SqliteStore, id: &str) -> Result<bool> {
    store.with(|c| {
        c.query_row("SELECT 1 FROM futures WHERE id = ?1", params![id], |_| {
            Ok(())
        })
        .optional()
        .map(|o| o.is_some())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage_row(tenant: &str, hour: i64, kind: UsageKind, amount: f64) -> UsageRow {
        UsageRow {
            tenant: tenant.into(),
            hour,
            source: "s:train:0".into(),
            kind,
            amount,
        }
    }

    #[test]
    fn rows_round_trip_and_survive_reopening() {
        let dir = std::env::temp_dir().join(format!("loraloom-store-{}", uuid::Uuid::new_v4()));
        {
            let s = SqliteStore::open(&dir).unwrap();
            s.put_session(&SessionRow {
                id: "s".into(),
                tenant: "t".into(),
                created: 1.0,
                details_json: "{\"display_name\": \"d\"}".into(),
            })
            .unwrap();
            let m = ModelRow {
                tenant: "t".into(),
                model_id: "m".into(),
                base_model: "b".into(),
                spec_json: "{}".into(),
                metadata_json: "null".into(),
                created: 2.0,
            };
            s.put_model(&m).unwrap();
            s.put_future(
                &FutureRow {
                    id: "f".into(),
                    tenant: "t".into(),
                    state: "queued".into(),
                    outcome_json: None,
                    finished: None,
                    feed_json: None,
                },
                &[],
            )
            .unwrap();
            s.put_future(
                &FutureRow {
                    id: "g".into(),
                    tenant: "t".into(),
                    state: "done".into(),
                    outcome_json: Some("{}".into()),
                    finished: Some(5.0),
                    feed_json: None,
                },
                &[usage_row("t", 0, UsageKind::Training, 7.0)],
            )
            .unwrap();
        }
        let s = SqliteStore::open(&dir).unwrap();
        assert_eq!(
            s.sessions().unwrap()[0].details_json,
            "{\"display_name\": \"d\"}"
        );
        assert_eq!(s.models().unwrap()[0].model_id, "m");
        assert_eq!(s.futures().unwrap().len(), 2);
        // A future's outcome and its job's usage were written together.
        assert_eq!(
            s.usage("t", 0..1).unwrap(),
            [usage_row("t", 0, UsageKind::Training, 7.0)]
        );
        assert_eq!(s.purge_futures(10.0).unwrap(), 1);
        assert!(has_future(&s, "f").unwrap());
        s.delete_model("t", "m").unwrap();
        assert!(s.models().unwrap().is_empty());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn each_api_key_added_or_revoked_is_audited_once_in_its_tenants_log() {
        let dir = std::env::temp_dir().join(format!("loraloom-keys-{}", uuid::Uuid::new_v4()));
        let s = SqliteStore::open(&dir).unwrap();
        let keys = |ks: &[(u64, &str)]| -> Vec<(u64, String)> {
            ks.iter().map(|(id, t)| (*id, t.to_string())).collect()
        };
        let by = serde_json::json!({"applied_by": "test"});
        assert_eq!(
            s.replace_api_keys(&keys(&[(1, "a"), (2, "b")]), 10.0, &by)
                .unwrap(),
            2
        );
        assert_eq!(
            s.replace_api_keys(&keys(&[(1, "a"), (2, "b")]), 11.0, &by)
                .unwrap(),
            0
        );
        // b's key rotated, and a key moved from a to c.
        assert_eq!(
            s.replace_api_keys(&keys(&[(1, "c"), (3, "b")]), 12.0, &by)
                .unwrap(),
            4
        );
        let log = |tenant: &str| -> Vec<(f64, String, serde_json::Value)> {
            s.audit(tenant, 0.0..100.0)
                .unwrap()
                .into_iter()
                .map(|r| {
                    (
                        r.at,
                        r.event,
                        serde_json::from_str(&r.details_json).unwrap(),
                    )
                })
                .collect()
        };
        let entry = |at: f64, event: &str, key_id: u64| {
            (
                at,
                event.to_string(),
                serde_json::json!({"applied_by": "test", "key_id": key_id}),
            )
        };
        assert_eq!(
            log("a"),
            [
                entry(10.0, API_KEY_ADDED, 1),
                entry(12.0, API_KEY_REVOKED, 1)
            ]
        );
        let mut b = log("b");
        b.sort_by(|x, y| (x.0, &x.1).partial_cmp(&(y.0, &y.1)).unwrap());
        assert_eq!(
            b,
            [
                entry(10.0, API_KEY_ADDED, 2),
                entry(12.0, API_KEY_ADDED, 3),
                entry(12.0, API_KEY_REVOKED, 2),
            ]
        );
        assert_eq!(log("c"), [entry(12.0, API_KEY_ADDED, 1)]);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn usage_adds_up_per_key_and_stays_with_its_tenant() {
        let dir = std::env::temp_dir().join(format!("loraloom-usage-{}", uuid::Uuid::new_v4()));
        let row = usage_row;
        {
            let s = SqliteStore::open(&dir).unwrap();
            s.add_usage(&[
                row("t", 5, UsageKind::Training, 128.0),
                row("t", 6, UsageKind::Training, 1.0),
                row("u", 5, UsageKind::Training, 7.0),
            ])
            .unwrap();
            s.add_usage(&[row("t", 5, UsageKind::Training, 64.0)])
                .unwrap();
        }
        // Reopened: what was added survived, summed per key, and each tenant sees its own.
        let s = SqliteStore::open(&dir).unwrap();
        assert_eq!(
            s.usage("t", 0..100).unwrap(),
            vec![
                row("t", 5, UsageKind::Training, 192.0),
                row("t", 6, UsageKind::Training, 1.0),
            ]
        );
        assert_eq!(
            s.usage("t", 6..7).unwrap(),
            vec![row("t", 6, UsageKind::Training, 1.0)]
        );
        assert_eq!(
            s.usage("u", 0..100).unwrap(),
            vec![row("u", 5, UsageKind::Training, 7.0)]
        );
        // A checkpoint's life is stored with the change of its row: replaced, then deleted.
        let life = |created: f64, ended: f64| CheckpointLife {
            tenant: "t".into(),
            source: "s:train:0".into(),
            created,
            ended,
            bytes: 10,
        };
        let ckpt = CheckpointRow {
            tenant: "t".into(),
            path: "tinker://s:train:0/weights/c".into(),
            record_json: "{}".into(),
        };
        s.put_checkpoint(&ckpt, None).unwrap();
        s.put_checkpoint(&ckpt, Some(&life(100.0, 200.0))).unwrap();
        s.delete_checkpoint("t", &ckpt.path, Some(&life(200.0, 300.0)))
            .unwrap();
        assert!(s.checkpoints().unwrap().is_empty());
        assert_eq!(
            s.checkpoint_lives("t", 0.0..1000.0).unwrap(),
            vec![life(100.0, 200.0), life(200.0, 300.0)]
        );
        // Only lives written or held within the span, and only the tenant's.
        assert_eq!(
            s.checkpoint_lives("t", 250.0..260.0).unwrap(),
            vec![life(200.0, 300.0)]
        );
        assert!(s.checkpoint_lives("t", 300.5..400.0).unwrap().is_empty());
        assert!(s.checkpoint_lives("u", 0.0..1000.0).unwrap().is_empty());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn recorded_samples_are_per_tenant_bounded_and_expire_unless_used() {
        let s = SqliteStore::in_memory().unwrap();
        let row = |id: &str, used: f64| SampleRow {
            tenant: "t".into(),
            id: id.into(),
            sampler: "sess:sample:0".into(),
            prompt: vec![1, 2, 3],
            tokens: vec![70_000, 5],
            logprobs: vec![-0.5, -1.25],
            used,
        };
        s.put_samples("t", &[row("a", 1.0), row("b", 2.0)]).unwrap();
        // Another tenant cannot read them.
        assert!(s.use_samples("u", &["a".into()], 3.0).unwrap().is_empty());
        let got = s.use_samples("t", &["a".into(), "zz".into()], 5.0).unwrap();
        assert_eq!(got, vec![row("a", 5.0)]);
        // Over the limit, the least recently used ("b", not the just-used "a") goes.
        s.put_samples("t", &[row("c", 3.0)]).unwrap();
        s.put_samples("u", &[row("d", 3.0)]).unwrap();
        assert_eq!(s.purge_samples(0.0, 2).unwrap(), 1);
        let ids = ["a", "b", "c"].map(String::from);
        let left: Vec<String> = s
            .use_samples("t", &ids, 6.0)
            .unwrap()
            .into_iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(left, ["a", "c"]);
        // Then by age: everything unused since 6.5 (the other tenant's too).
        assert_eq!(s.purge_samples(6.5, 2).unwrap(), 3);
    }

    #[test]
    fn a_database_from_before_session_details_inflight_samplers_and_feeds_gains_the_columns() {
        let dir = std::env::temp_dir().join(format!("loraloom-store-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        {
            let c = Connection::open(dir.join("loraloom.db")).unwrap();
            c.execute_batch(
                "CREATE TABLE sessions (id TEXT PRIMARY KEY, tenant TEXT NOT NULL, created REAL NOT NULL);
                 INSERT INTO sessions VALUES ('old', 't', 1.0);
                 CREATE TABLE samplers (tenant TEXT NOT NULL, sampler_id TEXT NOT NULL, checkpoint TEXT,
                   base_model TEXT NOT NULL, PRIMARY KEY (tenant, sampler_id));
                 INSERT INTO samplers VALUES ('t', 's', NULL, 'base');
                 CREATE TABLE futures (id TEXT PRIMARY KEY, tenant TEXT NOT NULL, state TEXT NOT NULL,
                   outcome TEXT, finished REAL);
                 INSERT INTO futures VALUES ('f', 't', 'queued', NULL, NULL);",
            )
            .unwrap();
        }
        let s = SqliteStore::open(&dir).unwrap();
        assert_eq!(s.sessions().unwrap()[0].details_json, "{}");
        assert_eq!(s.samplers().unwrap()[0].inflight_of, None);
        assert_eq!(s.futures().unwrap()[0].feed_json, None);
        let follower = SamplerRow {
            tenant: "t".into(),
            sampler_id: "f".into(),
            checkpoint: Some("tinker://run/sampler_weights/w".into()),
            base_model: "base".into(),
            inflight_of: Some("run".into()),
        };
        s.put_sampler(&follower).unwrap();
        assert!(s.samplers().unwrap().contains(&follower));
        // Clone ids count per session, and outlive it (a session made again under its id
        // must not hand out its ids again).
        assert_eq!(s.next_sampler_clone("t", "f").unwrap(), 1);
        assert_eq!(s.next_sampler_clone("t", "f").unwrap(), 2);
        assert_eq!(s.next_sampler_clone("t", "s").unwrap(), 1);
        s.delete_sampler("t", "f").unwrap();
        assert_eq!(s.next_sampler_clone("t", "f").unwrap(), 3);
        // The feed cursor ceiling only rises.
        assert_eq!(s.feed_cursor_ceiling().unwrap(), 0);
        s.put_feed_cursor_ceiling(7).unwrap();
        s.put_feed_cursor_ceiling(5).unwrap();
        assert_eq!(s.feed_cursor_ceiling().unwrap(), 7);
        drop(s);
        // Opening again finds the column and leaves it be.
        assert_eq!(
            SqliteStore::open(&dir).unwrap().sessions().unwrap().len(),
            1
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}
