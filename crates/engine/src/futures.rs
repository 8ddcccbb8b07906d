//! The futures store: one entry per request id with its lifecycle and result.
//!
//! A handle over `Mutex<Entries>`; the mutex is a std mutex held only for short, `await`-free
//! sections. Waiters long-poll on a per-entry [`tokio::sync::Notify`] (no busy loops). Finished
//! entries are purged `ttl` after they finished, or as soon as their client reports them
//! retrieved ([`FutureStore::poll_feed`]).
//!
//! A request may report to a completion feed (a sampling session's, per SDK clone: the SDK's
//! `retrieve_futures` poller): when it finishes, an event with the next cursor is appended to
//! its feed, and one long poll of the feed learns of every request of that client that finished.
//!
//! A sampling request may also stream ([`FutureStore::insert_streaming`]): the tokens its
//! sequences choose go to a channel as they are chosen, and the channel closes when the request
//! settles (its result, with every token, is then read as any other's).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use loraloom_model::StreamedToken;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::error::{EngineError, Result};
use crate::job::{Output, RequestId, TenantId};
use crate::registry::unix_now;
use crate::store::{FutureRow, Store};
use crate::usage::UsageRow;

/// Where a request is in its life.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum FutureState {
    /// Waiting in its queue.
    Queued,
    /// In a batch on a worker.
    Running,
    /// Finished with a result.
    Done(Output),
    /// Finished with an error (timeouts, cancellation and restarts included).
    Failed(EngineError),
}

impl FutureState {
    /// Whether the state can no longer change.
    pub fn is_terminal(&self) -> bool {
        matches!(self, FutureState::Done(_) | FutureState::Failed(_))
    }

    /// Short name for stats.
    pub fn name(&self) -> &'static str {
        match self {
            FutureState::Queued => "queued",
            FutureState::Running => "running",
            FutureState::Done(_) => "done",
            FutureState::Failed(EngineError::Cancelled) => "cancelled",
            FutureState::Failed(_) => "failed",
        }
    }
}

/// A completion feed: one sampling session of one tenant, as seen by one SDK client of it (the
/// original is clone 0; unpickled copies get theirs from `join_sampling_session`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FeedKey {
    /// Owner.
    pub tenant: TenantId,
    /// The sampling session.
    pub sampler_id: String,
    /// The SDK client of it (`seq_id / 1e9` of its requests).
    pub clone: u64,
}

/// A feed as stored with its futures (the row holds the tenant).
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredFeed {
    sampler_id: String,
    clone: u64,
}

/// A request of a feed that finished.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// Its place in the feed: larger than every earlier completion's, across restarts too.
    pub cursor: u64,
    /// The request.
    pub request_id: RequestId,
    /// Whether it failed (its error is read with `retrieve_future`, as a result is).
    pub failed: bool,
    at: Instant,
}

/// What one poll of a feed found.
#[derive(Debug, Clone, PartialEq)]
pub struct FeedPoll {
    /// Completions after the poll's cursor, oldest first.
    pub completions: Vec<Completion>,
    /// The cursor to send next: the last completion's, or the one sent when there is none.
    pub cursor: u64,
}

#[derive(Default)]
struct Feed {
    completions: VecDeque<Completion>,
    notify: Arc<Notify>,
}

impl Feed {
    /// Nothing to hand out and no poll waiting on it (each waiting poll holds a clone of
    /// `notify`): dropping it loses nothing, as later completions make it again, at later
    /// cursors.
    fn idle(&self) -> bool {
        self.completions.is_empty() && Arc::strong_count(&self.notify) == 1
    }
}

struct Entry {
    tenant: TenantId,
    state: FutureState,
    finished_at: Option<Instant>,
    notify: Arc<Notify>,
    feed: Option<FeedKey>,
    /// Where a streamed request's tokens go until it settles (dropped then, which closes it).
    stream: Option<UnboundedSender<Vec<StreamedToken>>>,
}

/// Feed cursors: microseconds since the epoch (from the process's start, on a monotonic clock),
/// strictly increasing. So a cursor tells a client nothing of other feeds but the time, a feed
/// dropped while empty and made again goes on above the cursors it gave out, and cursors after
/// a restart are larger than any before it: the store keeps a ceiling a block above the last
/// cursor given out, and a restarted process starts above it even if the wall clock went back.
struct CursorClock {
    base: u64,
    started: std::time::Instant,
    last: u64,
    /// Cursors below this may be given out without writing a new ceiling to the store.
    reserved: u64,
}

/// How far above the last cursor the stored ceiling is set (about 17 minutes of microseconds:
/// one write to the store per 17 minutes of feeds in use).
const CURSOR_BLOCK: u64 = 1_000_000_000;

impl CursorClock {
    fn starting_above(floor: u64) -> Self {
        let base = ((unix_now() * 1e6) as u64).max(floor);
        CursorClock {
            base,
            started: std::time::Instant::now(),
            last: base,
            reserved: 0,
        }
    }

    /// The next cursor, and a new ceiling the caller must store before handing it out.
    fn next(&mut self) -> (u64, Option<u64>) {
        let now = self.base + self.started.elapsed().as_micros() as u64;
        self.last = now.max(self.last + 1);
        if self.last < self.reserved {
            return (self.last, None);
        }
        self.reserved = self.last + CURSOR_BLOCK;
        (self.last, Some(self.reserved))
    }
}

/// What the store's mutex guards: the entries, the feeds and the feed cursor clock.
struct Entries {
    entries: HashMap<RequestId, Entry>,
    feeds: HashMap<FeedKey, Feed>,
    clock: CursorClock,
}

impl Entries {
    /// Appends `id`'s completion to its feed, if it reports to one, waking the feed's pollers;
    /// stores a new cursor ceiling first when one is due (a leaf: the store's mutex inside
    /// this one, as `FutureStore::set` persists).
    fn report(&mut self, id: &str, durable: Option<&Arc<dyn Store>>) {
        let Some(entry) = self.entries.get(id) else {
            return;
        };
        let Some(key) = entry.feed.clone() else {
            return;
        };
        let failed = matches!(entry.state, FutureState::Failed(_));
        let (cursor, ceiling) = self.clock.next();
        if let (Some(store), Some(ceiling)) = (durable, ceiling) {
            if let Err(e) = store.put_feed_cursor_ceiling(ceiling) {
                tracing::error!(error = %e, "cannot store the feed cursor ceiling");
            }
        }
        let now = Instant::now();
        let feed = self.feeds.entry(key).or_default();
        feed.completions.push_back(Completion {
            cursor,
            request_id: id.to_string(),
            failed,
            at: now,
        });
        feed.notify.notify_waiters();
    }
}

/// Shared handle to the store.
#[derive(Clone)]
pub struct FutureStore {
    inner: Arc<Mutex<Entries>>,
    ttl: Duration,
    durable: Option<Arc<dyn Store>>,
}

/// The settled state a stored future holds (`None`: it was queued or running).
pub(crate) fn stored_state(row: &FutureRow) -> Option<FutureState> {
    row.outcome_json
        .as_deref()
        .and_then(|j| serde_json::from_str::<FutureState>(j).ok())
        .filter(FutureState::is_terminal)
}

fn row(id: &str, tenant: &str, state: &FutureState, feed: Option<&FeedKey>) -> FutureRow {
    let terminal = state.is_terminal();
    FutureRow {
        id: id.to_string(),
        tenant: tenant.to_string(),
        state: state.name().to_string(),
        outcome_json: terminal.then(|| serde_json::to_string(state).unwrap_or_default()),
        finished: terminal.then(unix_now),
        feed_json: feed.and_then(|f| {
            serde_json::to_string(&StoredFeed {
                sampler_id: f.sampler_id.clone(),
                clone: f.clone,
            })
            .ok()
        }),
    }
}

impl FutureStore {
    /// An empty store keeping finished results for `ttl`.
    pub fn new(ttl: Duration) -> Self {
        FutureStore {
            inner: Arc::new(Mutex::new(Entries {
                entries: HashMap::new(),
                feeds: HashMap::new(),
                clock: CursorClock::starting_above(0),
            })),
            ttl,
            durable: None,
        }
    }

    /// Like [`FutureStore::new`], writing every admission and outcome through to `durable`.
    pub fn durable(ttl: Duration, durable: Arc<dyn Store>) -> Self {
        FutureStore {
            durable: Some(durable),
            ..FutureStore::new(ttl)
        }
    }

    /// Writes the future through to the durable store, with the usage its job metered (one
    /// transaction). Returns whether it was written.
    fn persist(
        &self,
        id: &str,
        tenant: &str,
        state: &FutureState,
        feed: Option<&FeedKey>,
        usage: &[UsageRow],
    ) -> bool {
        let Some(store) = &self.durable else {
            return false;
        };
        match store.put_future(&row(id, tenant, state, feed), usage) {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(error = %e, request_id = id, "cannot persist a future");
                false
            }
        }
    }

    /// Reloads futures (`rows`, every one the durable store holds) after a restart: finished
    /// ones keep their outcome; ones that were queued or running fail with "server restarted",
    /// except those in `requeued` (their jobs are queued again, see [`crate::journal`]).
    /// Returns how many were failed. Every reloaded future of a feed is reported to it again,
    /// with cursors above every cursor handed out before: its client may not have heard of it (one
    /// never heard of would leave it waiting). Those it had heard of are the ones it fetched
    /// but had not yet reported retrieved; each costs it a few bytes for its lifetime.
    pub fn restore(
        &self,
        rows: Vec<FutureRow>,
        requeued: &std::collections::HashSet<String>,
    ) -> Result<usize> {
        let Some(store) = &self.durable else {
            return Ok(0);
        };
        self.lock().clock = CursorClock::starting_above(store.feed_cursor_ceiling()?);
        let mut restarted = 0;
        for r in rows {
            let state = stored_state(&r);
            let feed = r
                .feed_json
                .as_deref()
                .and_then(|j| serde_json::from_str::<StoredFeed>(j).ok())
                .map(|f| FeedKey {
                    tenant: r.tenant.clone(),
                    sampler_id: f.sampler_id,
                    clone: f.clone,
                });
            let state = match state {
                Some(s) => s,
                None if requeued.contains(&r.id) => FutureState::Queued,
                None => {
                    restarted += 1;
                    let failed = FutureState::Failed(EngineError::ServerRestarted);
                    self.persist(&r.id, &r.tenant, &failed, feed.as_ref(), &[]);
                    failed
                }
            };
            // A job queued again reports to its feed when it settles, like any other.
            let settled = state.is_terminal();
            let mut map = self.lock();
            map.entries.insert(
                r.id.clone(),
                Entry {
                    tenant: r.tenant,
                    state,
                    finished_at: settled.then(Instant::now),
                    notify: Arc::new(Notify::new()),
                    feed,
                    stream: None,
                },
            );
            if settled {
                map.report(&r.id, self.durable.as_ref());
            }
        }
        Ok(restarted)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a new request of `tenant` as queued.
    pub fn insert(&self, id: &str, tenant: &str) {
        self.insert_in_feed(id, tenant, None);
    }

    /// Registers a new request of `tenant` as queued, reporting its completion to `feed` (whose
    /// tenant is `tenant`).
    pub fn insert_in_feed(&self, id: &str, tenant: &str, feed: Option<FeedKey>) {
        self.insert_entry(id, tenant, feed, None);
    }

    /// [`FutureStore::insert_in_feed`] for a request whose tokens stream: the receiver gets each
    /// step's tokens ([`FutureStore::stream`]) and ends when the request settles.
    pub fn insert_streaming(
        &self,
        id: &str,
        tenant: &str,
        feed: Option<FeedKey>,
    ) -> UnboundedReceiver<Vec<StreamedToken>> {
        let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
        self.insert_entry(id, tenant, feed, Some(sender));
        receiver
    }

    fn insert_entry(
        &self,
        id: &str,
        tenant: &str,
        feed: Option<FeedKey>,
        stream: Option<UnboundedSender<Vec<StreamedToken>>>,
    ) {
        self.persist(id, tenant, &FutureState::Queued, feed.as_ref(), &[]);
        self.lock().entries.insert(
            id.to_string(),
            Entry {
                tenant: tenant.to_string(),
                state: FutureState::Queued,
                finished_at: None,
                notify: Arc::new(Notify::new()),
                feed,
                stream,
            },
        );
    }

    /// Sends each streamed request its tokens of one decode step (one lock for the step). A
    /// request that does not stream, or whose reader is gone, is passed over.
    pub fn stream(&self, tokens: Vec<(RequestId, Vec<StreamedToken>)>) {
        if tokens.is_empty() {
            return;
        }
        let mut map = self.lock();
        for (id, tokens) in tokens {
            let Some(entry) = map.entries.get_mut(&id) else {
                continue;
            };
            if let Some(sender) = &entry.stream {
                if sender.send(tokens).is_err() {
                    entry.stream = None;
                }
            }
        }
    }

    /// Forgets a request that was never admitted (its submission was refused, so no client holds
    /// its id): kept, refused submissions would fill the store at the rate they are sent.
    pub fn forget(&self, id: &str) {
        let Some(entry) = self.lock().entries.remove(id) else {
            return;
        };
        entry.notify.notify_waiters();
        if let Some(store) = &self.durable {
            if let Err(e) = store.delete_futures(&[id.to_string()]) {
                tracing::error!(error = %e, request_id = id, "cannot forget a refused future");
            }
        }
    }

    /// Moves a request to `state`, waking its waiters. Terminal states are final.
    pub fn set(&self, id: &str, state: FutureState) {
        self.settle_metered(id, state, &[]);
    }

    /// [`FutureStore::set`], writing `usage` (what the request's job metered) in the transaction
    /// that makes a terminal state durable, so that a job run again after a crash is metered
    /// exactly once. Returns whether `usage` was written: not when there is no durable store,
    /// or the request is unknown or already settled; the caller meters it elsewhere then.
    pub fn settle_metered(&self, id: &str, state: FutureState, usage: &[UsageRow]) -> bool {
        let mut map = self.lock();
        let Some(entry) = map.entries.get_mut(id) else {
            return false;
        };
        if entry.state.is_terminal() {
            return false;
        }
        let terminal = state.is_terminal();
        let mut metered = false;
        if terminal {
            entry.finished_at = Some(Instant::now());
            entry.stream = None;
            // Durable before any waiter sees it: an acknowledged result survives a crash.
            metered = self.persist(id, &entry.tenant, &state, entry.feed.as_ref(), usage);
        }
        entry.state = state;
        entry.notify.notify_waiters();
        if terminal {
            map.report(id, self.durable.as_ref());
        }
        metered
    }

    /// The state of `id` if it belongs to `tenant` (another tenant's id is "not found").
    pub fn get(&self, tenant: &str, id: &str) -> Result<FutureState> {
        let map = self.lock();
        match map.entries.get(id) {
            Some(e) if e.tenant == tenant => Ok(e.state.clone()),
            _ => Err(EngineError::NotFound {
                what: "request".into(),
                id: id.to_string(),
            }),
        }
    }

    /// Waits up to `timeout` for `id` to finish; returns the state then (possibly not final).
    pub async fn wait(&self, tenant: &str, id: &str, timeout: Duration) -> Result<FutureState> {
        let deadline = Instant::now() + timeout;
        loop {
            let notify = {
                let map = self.lock();
                match map.entries.get(id) {
                    Some(e) if e.tenant == tenant => {
                        if e.state.is_terminal() {
                            return Ok(e.state.clone());
                        }
                        e.notify.clone()
                    }
                    _ => {
                        return Err(EngineError::NotFound {
                            what: "request".into(),
                            id: id.to_string(),
                        })
                    }
                }
            };
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // Re-check after registering, so a completion between the two is not missed.
            let state = self.get(tenant, id)?;
            if state.is_terminal() {
                return Ok(state);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.get(tenant, id);
            }
        }
    }

    /// Long-polls `feed` for up to `timeout`: answers as soon as it holds completions after
    /// `prev_cursor` (those at or before it are seen, and dropped), or when the time is up.
    /// First forgets the requests of that feed in `retrieved` that have finished: their client
    /// has their results, so they need not wait out the TTL.
    pub async fn poll_feed(
        &self,
        feed: &FeedKey,
        prev_cursor: u64,
        retrieved: &[String],
        timeout: Duration,
    ) -> FeedPoll {
        self.forget_retrieved(feed, retrieved);
        let deadline = Instant::now() + timeout;
        loop {
            let notify = {
                let mut map = self.lock();
                let f = map.feeds.entry(feed.clone()).or_default();
                while f
                    .completions
                    .front()
                    .is_some_and(|c| c.cursor <= prev_cursor)
                {
                    f.completions.pop_front();
                }
                if !f.completions.is_empty() || Instant::now() >= deadline {
                    let completions: Vec<Completion> = f.completions.iter().cloned().collect();
                    let cursor = completions.last().map_or(prev_cursor, |c| c.cursor);
                    if f.idle() {
                        // Polls of made-up clone ids leave nothing behind.
                        map.feeds.remove(feed);
                    }
                    return FeedPoll {
                        completions,
                        cursor,
                    };
                }
                f.notify.clone()
            };
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // Re-check after registering, so a completion between the two is not missed.
            let appended = self
                .lock()
                .feeds
                .get(feed)
                .is_some_and(|f| f.completions.back().is_some_and(|c| c.cursor > prev_cursor));
            if !appended {
                let _ = tokio::time::timeout_at(deadline, notified).await;
            }
        }
    }

    /// Whether `feed` holds completions or pollers.
    pub fn has_feed(&self, feed: &FeedKey) -> bool {
        self.lock().feeds.contains_key(feed)
    }

    /// Forgets the finished requests among `ids` that report to `feed` (others are left alone:
    /// an id of another client or tenant, or one still running, is not this caller's to drop).
    fn forget_retrieved(&self, feed: &FeedKey, ids: &[String]) {
        if ids.is_empty() {
            return;
        }
        let forgotten: Vec<String> = {
            let mut map = self.lock();
            let forgotten: Vec<String> = ids
                .iter()
                .filter(|id| {
                    map.entries
                        .get(id.as_str())
                        .is_some_and(|e| e.state.is_terminal() && e.feed.as_ref() == Some(feed))
                })
                .cloned()
                .collect();
            for id in &forgotten {
                map.entries.remove(id);
            }
            let gone: std::collections::HashSet<&str> =
                forgotten.iter().map(String::as_str).collect();
            if let Some(f) = map.feeds.get_mut(feed) {
                f.completions
                    .retain(|c| !gone.contains(c.request_id.as_str()));
            }
            forgotten
        };
        if let (Some(store), false) = (&self.durable, forgotten.is_empty()) {
            if let Err(e) = store.delete_futures(&forgotten) {
                tracing::error!(error = %e, "cannot forget retrieved futures");
            }
        }
    }

    /// Drops entries finished more than the TTL before `now`, with their completions, and feeds
    /// left idle; returns how many entries.
    pub fn purge(&self, now: Instant) -> usize {
        let mut map = self.lock();
        let before = map.entries.len();
        let ttl = self.ttl;
        let fresh = |t: Instant| now.saturating_duration_since(t) <= ttl;
        map.entries.retain(|_, e| e.finished_at.is_none_or(fresh));
        let purged = before - map.entries.len();
        map.feeds.retain(|_, f| {
            f.completions.retain(|c| fresh(c.at));
            !f.idle()
        });
        drop(map);
        if let Some(store) = &self.durable {
            if let Err(e) = store.purge_futures(unix_now() - ttl.as_secs_f64()) {
                tracing::error!(error = %e, "cannot purge stored futures");
            }
        }
        purged
    }

    /// Counts of entries by state name.
    pub fn counts(&self) -> HashMap<&'static str, usize> {
        let mut out = HashMap::new();
        for e in self.lock().entries.values() {
            *out.entry(e.state.name()).or_default() += 1;
        }
        out
    }

    /// Ids of requests not yet finished (for shutdown bookkeeping).
    pub fn unfinished(&self) -> Vec<RequestId> {
        self.lock()
            .entries
            .iter()
            .filter(|(_, e)| !e.state.is_terminal())
            .map(|(id, _)| id.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn done() -> FutureState {
        FutureState::Done(Output::Saved {
            path: "tinker://m/weights/x".into(),
            sampler_id: None,
        })
    }

    #[tokio::test(start_paused = true)]
    async fn wait_returns_when_done_and_times_out_otherwise() {
        let store = FutureStore::new(Duration::from_secs(60));
        store.insert("r1", "alice");
        let s = store
            .wait("alice", "r1", Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(s, FutureState::Queued, "timed out, still queued");
        let s2 = store.clone();
        let waiter =
            tokio::spawn(async move { s2.wait("alice", "r1", Duration::from_secs(30)).await });
        tokio::time::sleep(Duration::from_secs(1)).await;
        store.set("r1", FutureState::Running);
        store.set("r1", done());
        assert_eq!(waiter.await.unwrap().unwrap(), done());
        // Terminal states are final.
        store.set("r1", FutureState::Failed(EngineError::Cancelled));
        assert_eq!(store.get("alice", "r1").unwrap(), done());
    }

    #[tokio::test(start_paused = true)]
    async fn other_tenants_ids_are_not_found() {
        let store = FutureStore::new(Duration::from_secs(60));
        store.insert("r1", "alice");
        assert_eq!(store.get("bob", "r1").unwrap_err().kind(), "not_found");
        assert!(store
            .wait("bob", "r1", Duration::from_secs(1))
            .await
            .is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn finished_entries_are_purged_after_the_ttl() {
        let store = FutureStore::new(Duration::from_secs(60));
        store.insert("done", "a");
        store.insert("pending", "a");
        store.set("done", done());
        assert_eq!(store.purge(Instant::now() + Duration::from_secs(59)), 0);
        tokio::time::advance(Duration::from_secs(61)).await;
        assert_eq!(store.purge(Instant::now()), 1);
        assert!(store.get("a", "done").is_err());
        assert_eq!(store.get("a", "pending").unwrap(), FutureState::Queued);
    }

    fn feed(tenant: &str, clone: u64) -> FeedKey {
        FeedKey {
            tenant: tenant.into(),
            sampler_id: "sess:sample:0".into(),
            clone,
        }
    }

    fn ids(poll: &FeedPoll) -> Vec<(&str, bool)> {
        poll.completions
            .iter()
            .map(|c| (c.request_id.as_str(), c.failed))
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_feed_reports_its_clients_requests_once_each_in_order() {
        let store = FutureStore::new(Duration::from_secs(60));
        let (mine, other) = (feed("a", 1), feed("a", 2));
        store.insert_in_feed("r1", "a", Some(mine.clone()));
        store.insert_in_feed("r2", "a", Some(mine.clone()));
        store.insert_in_feed("r3", "a", Some(other.clone()));
        store.insert("r4", "a");
        // Nothing finished: a poll waits out its timeout and answers the cursor it was sent.
        let empty = store.poll_feed(&mine, 0, &[], Duration::from_secs(3)).await;
        assert_eq!((empty.completions.len(), empty.cursor), (0, 0));
        // A long poll wakes at the first completion.
        let s2 = store.clone();
        let waiting = mine.clone();
        let poll = tokio::spawn(async move {
            s2.poll_feed(&waiting, 0, &[], Duration::from_secs(30))
                .await
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        store.set("r2", FutureState::Failed(EngineError::Cancelled));
        store.set("r4", done());
        store.set("r3", done());
        let first = poll.await.unwrap();
        assert_eq!(ids(&first), [("r2", true)]);
        store.set("r1", done());
        // Completions after the cursor sent; those at or before it are dropped.
        let second = store
            .poll_feed(&mine, first.cursor, &[], Duration::ZERO)
            .await;
        assert_eq!(ids(&second), [("r1", false)]);
        assert!(second.cursor > first.cursor);
        let again = store.poll_feed(&mine, 0, &[], Duration::ZERO).await;
        assert_eq!(ids(&again), [("r1", false)], "r2 was acknowledged");
        // The other clone's feed holds its own request only; a plain request reports nowhere.
        let theirs = store.poll_feed(&other, 0, &[], Duration::ZERO).await;
        assert_eq!(ids(&theirs), [("r3", false)]);
        // Another tenant's feed of the same name is another feed.
        let bobs = store.poll_feed(&feed("b", 1), 0, &[], Duration::ZERO).await;
        assert!(bobs.completions.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn retrieved_requests_are_forgotten_only_when_finished_and_of_that_feed() {
        let store = FutureStore::new(Duration::from_secs(60));
        let mine = feed("a", 0);
        store.insert_in_feed("done", "a", Some(mine.clone()));
        store.insert_in_feed("queued", "a", Some(mine.clone()));
        store.insert_in_feed("theirs", "a", Some(feed("a", 3)));
        store.set("done", done());
        store.set("theirs", done());
        let retrieved = ["done", "queued", "theirs", "unknown"].map(String::from);
        let poll = store.poll_feed(&mine, 0, &retrieved, Duration::ZERO).await;
        assert!(
            poll.completions.is_empty(),
            "done's completion went with it"
        );
        assert!(store.get("a", "done").is_err());
        assert_eq!(store.get("a", "queued").unwrap(), FutureState::Queued);
        assert_eq!(store.get("a", "theirs").unwrap(), done());
    }

    #[tokio::test(start_paused = true)]
    async fn a_restart_reports_every_stored_request_of_a_feed_after_the_old_cursors() {
        let db: Arc<dyn Store> = Arc::new(crate::store::SqliteStore::in_memory().unwrap());
        let mine = feed("a", 1);
        let before = FutureStore::durable(Duration::from_secs(60), db.clone());
        before.insert_in_feed("finished", "a", Some(mine.clone()));
        before.insert_in_feed("running", "a", Some(mine.clone()));
        before.insert_in_feed("retrieved", "a", Some(mine.clone()));
        before.insert_in_feed("journaled", "a", Some(mine.clone()));
        before.set("finished", done());
        before.set("retrieved", done());
        before.set("running", FutureState::Running);
        let seen = before
            .poll_feed(&mine, 0, &["retrieved".to_string()], Duration::ZERO)
            .await;
        assert_eq!(ids(&seen), [("finished", false)]);
        assert!(db.feed_cursor_ceiling().unwrap() > seen.cursor);
        // The process ends; a new one reloads the store. Its cursors are larger than any before,
        // even if the wall clock went back: as if the old process's clock had been far ahead,
        // with its client's cursor (and the stored ceiling) up there.
        let ahead = seen.cursor + 4_000_000_000_000;
        db.put_feed_cursor_ceiling(ahead + 1).unwrap();
        tokio::time::advance(Duration::from_secs(1)).await;
        let after = FutureStore::durable(Duration::from_secs(60), db.clone());
        let requeued = std::collections::HashSet::from(["journaled".to_string()]);
        assert_eq!(after.restore(db.futures().unwrap(), &requeued).unwrap(), 1);
        let poll = after.poll_feed(&mine, ahead, &[], Duration::ZERO).await;
        let mut got = ids(&poll);
        got.sort();
        // The job queued again (see `crate::journal`) is reported when it settles.
        assert_eq!(got, [("finished", false), ("running", true)]);
        assert_eq!(after.get("a", "journaled").unwrap(), FutureState::Queued);
        after.set("journaled", done());
        let poll = after
            .poll_feed(&mine, poll.cursor, &[], Duration::ZERO)
            .await;
        assert_eq!(ids(&poll), [("journaled", false)]);
        assert!(after.get("a", "retrieved").is_err(), "forgotten for good");
        assert_eq!(
            after.get("a", "running").unwrap(),
            FutureState::Failed(EngineError::ServerRestarted)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_empty_feed_polled_leaves_nothing_and_cursors_keep_rising() {
        let store = FutureStore::new(Duration::from_secs(60));
        let mine = feed("a", 7);
        store.insert_in_feed("r1", "a", Some(mine.clone()));
        store.set("r1", done());
        let first = store.poll_feed(&mine, 0, &[], Duration::ZERO).await;
        let empty = store
            .poll_feed(&mine, first.cursor, &[], Duration::ZERO)
            .await;
        assert!(empty.completions.is_empty());
        for clone in 100..110 {
            store
                .poll_feed(&feed("a", clone), 0, &[], Duration::ZERO)
                .await;
        }
        assert!(store.lock().feeds.is_empty(), "no feed kept for nothing");
        // Made again, the feed answers above the cursor its client last saw.
        store.insert_in_feed("r2", "a", Some(mine.clone()));
        store.set("r2", done());
        let next = store
            .poll_feed(&mine, first.cursor, &[], Duration::ZERO)
            .await;
        assert_eq!(ids(&next), [("r2", false)]);
    }

    #[tokio::test(start_paused = true)]
    async fn completions_and_idle_feeds_go_after_the_ttl() {
        let store = FutureStore::new(Duration::from_secs(60));
        let mine = feed("a", 0);
        store.insert_in_feed("r", "a", Some(mine.clone()));
        store.set("r", done());
        tokio::time::advance(Duration::from_secs(61)).await;
        assert_eq!(store.purge(Instant::now()), 1);
        assert!(store.lock().feeds.is_empty());
    }
}
