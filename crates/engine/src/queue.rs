//! The scheduler's state: per-queue FIFOs, the round-robin ring of ready queues, admission
//! limits, queue timeouts and cancellation. Pure logic, no threads: the engine wraps it in one
//! mutex and a condition variable.
//!
//! Ordering: a training run's queue is *busy* while one of its jobs runs, so its next job cannot
//! start before the previous one finished: jobs of one run execute strictly in submission order.
//! Fairness: queues take turns in a ring; a batch takes at most one job from each training queue
//! and the queue then goes to the back of the ring, so a deep queue cannot starve a shallow one.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use crate::error::EngineError;
use crate::job::{BatchClass, Job, KvFootprint, QueueKey, RequestId, TenantId, Work};

/// Admission and batching limits.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Jobs one tenant may have queued.
    pub per_tenant: usize,
    /// Jobs all tenants together may have queued.
    pub total: usize,
    /// Token budget of one fused batch (a single larger job still runs, alone).
    pub max_batch_tokens: usize,
    /// Largest `forward_backward` / `forward` request, in tokens (all its datums together):
    /// how long one request may hold a worker (its memory is bounded by `memory_budget`, in
    /// micro-batches).
    pub max_request_tokens: usize,
    /// Activation memory one training or scoring pass may hold, in bytes: a datum that cannot
    /// run within it even with activation checkpointing is refused at submission.
    pub memory_budget: u64,
    /// Jobs waiting longer than this fail.
    pub queue_timeout: Duration,
    /// How long a batch may wait for the rest of its peers (tenants stepping together submit
    /// their next jobs a few milliseconds apart, and an idle worker would otherwise start on the
    /// first arrival alone): a batch smaller than the recent batches of its class, counted from
    /// its oldest job; a training batch while runs of the last training batch have not sent
    /// their next job, counted from when that batch finished. 0 disables the wait.
    pub batch_fill_wait: Duration,
    /// Shortest `ttl_seconds` a checkpoint may be given (the SDK documents one hour).
    pub min_checkpoint_ttl: Duration,
    /// Listed checkpoints one tenant may hold (0 = no limit); saving another is refused.
    pub max_checkpoints_per_tenant: usize,
    /// Bytes of listed checkpoints one tenant may hold (0 = no limit); once reached, saving
    /// another is refused.
    pub max_checkpoint_bytes_per_tenant: u64,
    /// Longest a sampling job may decode (0 = no limit); beyond, it is dropped at the next
    /// token boundary and fails.
    pub max_sample_time: Duration,
    /// Keys and values (tokens) a decode loop may hold, counted as its [`KvFootprint`]
    /// (sequences × the longest `prompt + max_tokens` among them): sampling jobs start a loop or
    /// join it while the footprint fits, the rest wait in their queue. A larger job still runs:
    /// when its turn comes nothing joins, and the drained loop's next batch starts with it.
    pub max_kv_tokens: usize,
    /// Scheduling weights by tenant (absent: 1): a tenant of weight `w` gets `w` turns for
    /// every one of a tenant of weight 1, both to start a batch and to join one.
    pub tenant_weights: HashMap<TenantId, u32>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            per_tenant: 256,
            total: 4096,
            max_batch_tokens: 8192,
            max_request_tokens: 32768,
            memory_budget: loraloom_model::NO_LIMIT,
            queue_timeout: Duration::from_secs(600),
            batch_fill_wait: Duration::from_millis(10),
            max_kv_tokens: 65536,
            max_sample_time: Duration::from_secs(600),
            max_checkpoints_per_tenant: 0,
            min_checkpoint_ttl: Duration::from_secs(3600),
            max_checkpoint_bytes_per_tenant: 0,
            tenant_weights: HashMap::new(),
        }
    }
}

/// The scheduler's bookkeeping.
#[derive(Default)]
pub struct SchedState {
    limits: Limits,
    queues: HashMap<QueueKey, VecDeque<Job>>,
    /// Queues with waiting jobs and nothing running, in turn order.
    ready: VecDeque<QueueKey>,
    /// Training runs' queues with a job running, and the class of its batch.
    busy: HashMap<QueueKey, BatchClass>,
    per_tenant: HashMap<TenantId, usize>,
    total: usize,
    closed: bool,
    paused: bool,
    /// The ring head that the last batches passed over for a larger class, and how many times.
    passed_over: Option<(QueueKey, u32)>,
    /// A sampling job larger than the whole KV budget that a decode loop stopped admitting for
    /// (its queue and id): the next loop starts with it, whichever tenant was served longest
    /// ago, so the loop does not drain for nothing.
    drain_for: Option<(QueueKey, RequestId)>,
    /// How many queues each of the last [`RECENT_BATCHES`] batches of each class drew from,
    /// newest last (queues, not jobs: a batch fill compares it with ready queue heads, and one
    /// sampling session can put several jobs into a batch).
    recent_sizes: Vec<(BatchClass, VecDeque<usize>)>,
    /// Training runs of the last finished batch that had no next job queued when it finished:
    /// their clients are about to send it (tenants stepping in lockstep), so a training batch
    /// waits for them, at most [`Limits::batch_fill_wait`] after that batch finished (however
    /// long its own jobs waited already: tenants that fell out of step rejoin the others). A
    /// run leaves the set when a job of it arrives; the next finished batch replaces the set.
    returning: HashSet<QueueKey>,
    /// When the batch `returning` came from finished.
    returning_since: Option<Instant>,
    /// Sampling jobs in some worker's decode loop.
    decoding: HashSet<RequestId>,
    /// Of those, the ones a client cancelled: their worker drops them at its next token
    /// boundary.
    cancel_requests: HashSet<RequestId>,
    /// Shutdown without finishing the queue: workers drop their sampling jobs at the next token
    /// boundary ("server restarted") instead of decoding them to the end.
    stop_decoding: bool,
    /// When each tenant last used up its turns (a count of turns used up overall); a tenant
    /// of weight `w` uses up its turn every `w` queues taken.
    served: HashMap<TenantId, u64>,
    serve_count: u64,
    /// Queues taken of each tenant since it last used up its turn (below its weight).
    credit: HashMap<TenantId, u32>,
}

/// `ring` reordered tenant by tenant, in rounds: each round takes `weight` queues of every
/// tenant (tenants in order of first appearance, a tenant's queues in ring order); `started`
/// (the tenant whose queue began the batch) already had its first.
fn interleave_by_tenant(
    ring: &[QueueKey],
    started: &str,
    weight: impl Fn(&str) -> u32,
) -> Vec<QueueKey> {
    let mut rank: HashMap<&str, usize> = HashMap::from([(started, 1)]);
    let mut keyed: Vec<(usize, usize, &QueueKey)> = Vec::with_capacity(ring.len());
    let mut tenants: Vec<&str> = Vec::new();
    for key in ring {
        let tenant = key.tenant();
        let nth = rank.entry(tenant).or_insert(0);
        let order = match tenants.iter().position(|t| *t == tenant) {
            Some(i) => i,
            None => {
                tenants.push(tenant);
                tenants.len() - 1
            }
        };
        keyed.push((*nth / weight(tenant) as usize, order, key));
        *nth += 1;
    }
    keyed.sort_by_key(|(nth, order, _)| (*nth, *order));
    keyed.into_iter().map(|(_, _, k)| k.clone()).collect()
}

/// How many batches in a row may pass over the ring head for a class with more ready jobs.
const MAX_PASSES: u32 = 2;

/// How many recent batches of a class set the size a new batch of it waits to reach.
const RECENT_BATCHES: usize = 4;

impl SchedState {
    /// Empty state with `limits`.
    pub fn new(limits: Limits) -> Self {
        SchedState {
            limits,
            ..SchedState::default()
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Jobs waiting (not running), overall.
    pub fn queued(&self) -> usize {
        self.total
    }

    /// Jobs waiting for `tenant`.
    pub fn queued_for(&self, tenant: &str) -> usize {
        self.per_tenant.get(tenant).copied().unwrap_or(0)
    }

    /// Jobs waiting per tenant (tenants with none are omitted), sorted by tenant.
    pub fn queued_by_tenant(&self) -> Vec<(TenantId, usize)> {
        let mut out: Vec<(TenantId, usize)> = self
            .per_tenant
            .iter()
            .map(|(t, n)| (t.clone(), *n))
            .collect();
        out.sort();
        out
    }

    /// Jobs waiting in one queue.
    pub fn queue_depth(&self, key: &QueueKey) -> usize {
        self.queues.get(key).map_or(0, VecDeque::len)
    }

    /// Stops admitting; already queued jobs stay until drained or failed.
    pub fn close(&mut self) {
        self.closed = true;
    }

    /// Holds (or releases) every queued job: no batch starts while paused.
    pub fn set_paused(&mut self, paused: bool) {
        self.paused = paused;
    }

    /// When `tenant` last used up its turn (0: never).
    fn last_served(&self, tenant: &str) -> u64 {
        self.served.get(tenant).copied().unwrap_or(0)
    }

    /// The scheduling weight of `tenant` (at least 1).
    fn weight(&self, tenant: &str) -> u32 {
        self.limits
            .tenant_weights
            .get(tenant)
            .copied()
            .unwrap_or(1)
            .max(1)
    }

    /// Asks workers to drop their sampling jobs at the next token boundary (shutdown).
    pub fn stop_decoding(&mut self) {
        self.stop_decoding = true;
    }

    /// Records sampling jobs that joined a decode loop.
    pub fn mark_decoding(&mut self, ids: impl IntoIterator<Item = RequestId>) {
        self.decoding.extend(ids);
    }

    /// Forgets sampling jobs that left their decode loop.
    pub fn unmark_decoding(&mut self, ids: &[RequestId]) {
        for id in ids {
            self.decoding.remove(id);
            self.cancel_requests.remove(id);
        }
    }

    /// Asks for a running sampling job to be dropped at its worker's next token boundary.
    /// False when `id` is not in a decode loop (a running job of another kind cannot be
    /// cancelled).
    pub fn request_cancel(&mut self, id: &str) -> bool {
        let decoding = self.decoding.contains(id);
        if decoding {
            self.cancel_requests.insert(id.to_string());
        }
        decoding
    }

    /// Which of `live` (a worker's sampling jobs, with the time each started) to drop now, and
    /// why: all of them at shutdown, else those cancelled and those running longer than
    /// [`Limits::max_sample_time`].
    pub fn decoding_to_stop<'a>(
        &mut self,
        live: impl Iterator<Item = (&'a RequestId, Instant)>,
        now: Instant,
    ) -> Vec<(RequestId, EngineError)> {
        let limit = self.limits.max_sample_time;
        let mut stop = Vec::new();
        for (id, started) in live {
            let ran = now.saturating_duration_since(started);
            let why = if self.stop_decoding {
                EngineError::ServerRestarted
            } else if self.cancel_requests.remove(id) {
                EngineError::Cancelled
            } else if !limit.is_zero() && ran > limit {
                EngineError::RanTooLong {
                    ran_s: ran.as_secs_f64(),
                    limit_s: limit.as_secs_f64(),
                }
            } else {
                continue;
            };
            stop.push((id.clone(), why));
        }
        stop
    }

    /// Whether [`SchedState::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Whether nothing is queued or running.
    pub fn is_idle(&self) -> bool {
        self.total == 0 && self.busy.is_empty()
    }

    /// Admits a job at the back of its queue, or refuses it when a limit is reached.
    pub fn push(&mut self, job: Job) -> Result<(), EngineError> {
        if self.closed {
            return Err(EngineError::ShuttingDown);
        }
        let tenant = job.queue.tenant().to_string();
        let mine = self.queued_for(&tenant);
        if mine >= self.limits.per_tenant {
            let msg = format!(
                "{mine} jobs already queued for this tenant (limit {})",
                self.limits.per_tenant
            );
            return Err(EngineError::Overloaded(msg));
        }
        if self.total >= self.limits.total {
            let msg = format!(
                "{} jobs already queued (limit {})",
                self.total, self.limits.total
            );
            return Err(EngineError::Overloaded(msg));
        }
        self.enqueue(job);
        Ok(())
    }

    fn enqueue(&mut self, job: Job) {
        let tenant = job.queue.tenant().to_string();
        let key = job.queue.clone();
        self.returning.remove(&key);
        let queue = self.queues.entry(key.clone()).or_default();
        let was_empty = queue.is_empty();
        queue.push_back(job);
        if was_empty && !self.busy.contains_key(&key) {
            self.ready.push_back(key);
        }
        *self.per_tenant.entry(tenant).or_default() += 1;
        self.total += 1;
    }

    /// Queues a job admitted before a crash ([`crate::journal`]): behind what its queue holds,
    /// whatever the limits (it was within them when admitted).
    pub fn push_recovered(&mut self, job: Job) {
        self.enqueue(job);
    }

    fn pop_job(&mut self, key: &QueueKey) -> Option<Job> {
        let queue = self.queues.get_mut(key)?;
        let job = queue.pop_front()?;
        if queue.is_empty() {
            self.queues.remove(key);
        }
        self.total -= 1;
        if let Some(n) = self.per_tenant.get_mut(key.tenant()) {
            *n -= 1;
            if *n == 0 {
                self.per_tenant.remove(key.tenant());
            }
        }
        Some(job)
    }

    /// Removes a queued job (cancellation). Running jobs cannot be cancelled.
    pub fn cancel(&mut self, id: &str) -> Option<Job> {
        let key = self
            .queues
            .iter()
            .find(|(_, q)| q.iter().any(|j| j.id == id))
            .map(|(k, _)| k.clone())?;
        let queue = self.queues.get_mut(&key)?;
        let pos = queue.iter().position(|j| j.id == id)?;
        let job = queue.remove(pos)?;
        if queue.is_empty() {
            self.queues.remove(&key);
            self.ready.retain(|k| k != &key);
        }
        self.total -= 1;
        if let Some(n) = self.per_tenant.get_mut(key.tenant()) {
            *n -= 1;
            if *n == 0 {
                self.per_tenant.remove(key.tenant());
            }
        }
        Some(job)
    }

    /// Removes every queued job that has waited longer than the queue timeout at `now`.
    pub fn expire(&mut self, now: Instant) -> Vec<Job> {
        let limit = self.limits.queue_timeout;
        let expired: Vec<String> = self
            .queues
            .values()
            .flat_map(|q| q.iter())
            .filter(|j| now.saturating_duration_since(j.enqueued) > limit)
            .map(|j| j.id.clone())
            .collect();
        expired.iter().filter_map(|id| self.cancel(id)).collect()
    }

    /// Removes every queued job (shutdown).
    pub fn drain(&mut self) -> Vec<Job> {
        let ids: Vec<String> = self
            .queues
            .values()
            .flat_map(|q| q.iter().map(|j| j.id.clone()))
            .collect();
        ids.iter().filter_map(|id| self.cancel(id)).collect()
    }

    /// Takes the next batch: the head job of the first ready queue decides the class; heads of
    /// later ready queues of the same class join while the token budget allows. Sampling
    /// queues may contribute several jobs. Training runs' queues taken become busy until
    /// [`SchedState::finish`]; sampling sessions' queues never do ([`SchedState::mark_taken`]).
    pub fn next_batch(&mut self) -> Option<Vec<Job>> {
        self.next_batch_except(None)
    }

    /// [`SchedState::next_batch`] over the ready queues whose head is not of class `except`.
    fn next_batch_except(&mut self, except: Option<BatchClass>) -> Option<Vec<Job>> {
        if self.paused {
            return None;
        }
        let (class, passing) = self.choose_class(except)?;
        self.passed_over = passing;
        // The batch starts with the queue of this class whose tenant used up its turn longest
        // ago (ring order among a tenant's queues and between equals): a tenant with many
        // queues gets no more turns than one with a single queue, a tenant of weight w gets w.
        // A loop that drained for a job starts with it, unless it left its queue's head since
        // (cancelled, expired). Batches of other classes leave the mark for the loop.
        let drained_at = match class {
            BatchClass::Sample => self.drain_for.take().and_then(|(key, id)| {
                let head = self.queues.get(&key)?.front()?;
                (head.id == id)
                    .then(|| self.ready.iter().position(|k| *k == key))
                    .flatten()
            }),
            _ => None,
        };
        let at = match drained_at {
            Some(at) => at,
            None => self
                .ready
                .iter()
                .enumerate()
                .filter(|(_, k)| self.head_class(k) == Some(class))
                .min_by_key(|(i, k)| (self.last_served(k.tenant()), *i))
                .map(|(i, _)| i)?,
        };
        let first = self.ready.remove(at)?;
        let mut room = Room::new(&self.limits);
        let mut batch = Vec::new();
        let mut taken = vec![first.clone()];
        self.take_from(&first, class, &mut room, &mut batch);
        if class != BatchClass::Solo {
            // Other queues join tenant by tenant (each tenant's first ready queue, then each
            // one's second, ...), so one tenant's many queues cannot fill the budget first.
            let ring: Vec<QueueKey> = std::mem::take(&mut self.ready).into();
            let mut skipped: Vec<QueueKey> = Vec::new();
            let weights = |tenant: &str| self.weight(tenant);
            let order = interleave_by_tenant(&ring, first.tenant(), weights);
            for key in order {
                let fits = self
                    .queues
                    .get(&key)
                    .and_then(|q| q.front())
                    .is_some_and(|j| j.work.class() == class && room.fits(&j.work));
                if fits {
                    self.take_from(&key, class, &mut room, &mut batch);
                    taken.push(key);
                } else {
                    skipped.push(key);
                }
            }
            // Queues passed over keep their ring order.
            self.ready = ring.into_iter().filter(|k| skipped.contains(k)).collect();
        }
        for key in &taken {
            let tenant = key.tenant();
            let weight = self.weight(tenant);
            let credit = self.credit.entry(tenant.to_string()).or_insert(0);
            *credit += 1;
            if *credit >= weight {
                *credit = 0;
                self.serve_count += 1;
                self.served.insert(tenant.to_string(), self.serve_count);
            }
        }
        let queues = taken.len();
        self.mark_taken(taken, class);
        let at = match self.recent_sizes.iter().position(|(c, _)| *c == class) {
            Some(at) => at,
            None => {
                self.recent_sizes.push((class, VecDeque::new()));
                self.recent_sizes.len() - 1
            }
        };
        let sizes = &mut self.recent_sizes[at].1;
        if sizes.len() == RECENT_BATCHES {
            sizes.pop_front();
        }
        sizes.push_back(queues);
        Some(batch)
    }

    /// Marks queues whose jobs were taken: a training run's queue is busy until
    /// [`SchedState::finish`]; a sampling session's queue (read-only jobs, which may run in any
    /// number at once) goes back to the ring when jobs remain.
    fn mark_taken(&mut self, taken: Vec<QueueKey>, class: BatchClass) {
        for key in taken {
            match key {
                QueueKey::Sampler(_) => {
                    if self.queues.contains_key(&key) && !self.ready.contains(&key) {
                        self.ready.push_back(key);
                    }
                }
                QueueKey::Model(_) => {
                    self.busy.insert(key, class);
                }
            }
        }
    }

    /// What a worker whose decode loop is running takes at a token boundary, without waiting:
    /// sampling jobs to join the loop while its footprint stays within `kv_budget` tokens
    /// (`decoding`: the jobs in it; `held`: per tenant, its jobs' `num_samples × (prompt +
    /// max_tokens)`, for fairness), and, when `other_due`, the next batch of another class (to
    /// run before the next decode step), either possibly empty.
    ///
    /// Joining is fair between tenants, not queues: the next job always comes from the tenant
    /// holding the least KV in the loop per unit of its weight (ring order among equals), so a
    /// tenant's many sessions get no more room than one session of another. When that job does
    /// not fit, no job joins at this boundary: a tenant holding more may not take the room it
    /// is waiting for. A job larger than the whole budget never fits beside other sequences:
    /// when its turn comes nothing joins, so the loop drains and the job starts the next one
    /// (otherwise steady traffic of smaller jobs would keep the loop busy and it would wait
    /// for its queue timeout).
    pub fn next_at_step_boundary(
        &mut self,
        held: &HashMap<TenantId, usize>,
        decoding: KvFootprint,
        kv_budget: usize,
        other_due: bool,
    ) -> (Vec<Job>, Vec<Job>) {
        if self.paused {
            return (Vec::new(), Vec::new());
        }
        let mut joining = Vec::new();
        let mut footprint = decoding;
        // What joins here, per tenant, on top of `held` (an empty map allocates nothing, so a
        // step at which nothing joins costs no copy of `held`).
        let mut joined: HashMap<TenantId, usize> = HashMap::new();
        loop {
            let next = self
                .ready
                .iter()
                .enumerate()
                .filter(|(_, key)| matches!(key, QueueKey::Sampler(_)))
                .filter_map(|(place, key)| {
                    let head = self.queues.get(key)?.front()?;
                    let need = head.work.kv_footprint();
                    (head.work.class() == BatchClass::Sample).then(|| {
                        let tenant = key.tenant();
                        let holds = held.get(tenant).copied().unwrap_or(0)
                            + joined.get(tenant).copied().unwrap_or(0);
                        let share = holds as u64 * 1000 / u64::from(self.weight(tenant));
                        ((share, place), key.clone(), need, head.id.clone())
                    })
                })
                .min_by_key(|(order, _, _, _)| *order);
            let Some((_, key, need, id)) = next else {
                break;
            };
            let grown = footprint.and(need);
            if grown.tokens() > kv_budget {
                if need.tokens() > kv_budget {
                    self.drain_for = Some((key, id));
                }
                break;
            }
            footprint = grown;
            *joined.entry(key.tenant().to_string()).or_default() += need.tokens();
            joining.push(self.pop_job(&key).expect("a head exists"));
            if !self.queues.contains_key(&key) {
                self.ready.retain(|k| k != &key);
            }
        }
        // Queues that joined go behind the others (in their order), so that among equals the
        // first join at a later boundary is another queue's.
        if !joining.is_empty() {
            let (joined, others): (VecDeque<QueueKey>, VecDeque<QueueKey>) =
                std::mem::take(&mut self.ready)
                    .into_iter()
                    .partition(|k| joining.iter().any(|j| j.queue == *k));
            self.ready = others;
            self.ready.extend(joined);
        }
        let other = if other_due {
            self.next_batch_except(Some(BatchClass::Sample))
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        (joining, other)
    }

    /// [`SchedState::next_batch`], except that a batch that could still grow is held back for
    /// up to [`Limits::batch_fill_wait`]: one smaller than the largest of the recent batches of
    /// its class, until its oldest job has waited that long; a training batch
    /// (forward_backward, forward, optim_step) within its token budget while runs of the last
    /// training batch have not sent their next job, until that long after that batch finished.
    /// `Err(Some(d))` says to look again within `d` (or at the next submission), `Err(None)`
    /// that nothing is ready.
    pub fn next_batch_filled(&mut self, now: Instant) -> Result<Vec<Job>, Option<Duration>> {
        let fill = self.limits.batch_fill_wait;
        if !self.paused && !fill.is_zero() {
            if let Some((class, _)) = self.choose_class(None) {
                let last = self
                    .recent_sizes
                    .iter()
                    .find(|(c, _)| *c == class)
                    .and_then(|(_, sizes)| sizes.iter().max().copied())
                    .unwrap_or(0);
                let (size, tokens, oldest) = self.candidates(class);
                let peers_coming = class.is_training()
                    && !self.returning.is_empty()
                    && tokens < self.limits.max_batch_tokens;
                // The later of the deadlines of the reasons to wait that hold.
                let until = [
                    oldest.filter(|_| size < last),
                    self.returning_since.filter(|_| peers_coming),
                ]
                .into_iter()
                .flatten()
                .max()
                .map(|since| since + fill);
                if let Some(until) = until.filter(|u| *u > now && oldest.is_some()) {
                    return Err(Some(until - now));
                }
            }
        }
        self.next_batch().ok_or(None)
    }

    /// How many ready queues' heads of `class` a batch would take now (within the token and
    /// KV budgets), their tokens, and when the oldest of them was enqueued.
    fn candidates(&self, class: BatchClass) -> (usize, usize, Option<Instant>) {
        let mut room = Room::new(&self.limits);
        let (mut size, mut oldest) = (0, None::<Instant>);
        for key in &self.ready {
            let Some(job) = self.queues.get(key).and_then(|q| q.front()) else {
                continue;
            };
            if job.work.class() != class || (size > 0 && !room.fits(&job.work)) {
                continue;
            }
            size += 1;
            room.take(&job.work);
            oldest = Some(oldest.map_or(job.enqueued, |o| o.min(job.enqueued)));
            if class == BatchClass::Solo {
                break;
            }
        }
        (size, room.tokens, oldest)
    }

    fn head_class(&self, key: &QueueKey) -> Option<BatchClass> {
        self.queues.get(key)?.front().map(|j| j.work.class())
    }

    /// The class of the next batch: the ring head's, unless another class has more ready queues
    /// (then all of that class run together, which keeps tenants that step in lockstep in one
    /// batch instead of splitting each round); the head is passed over at most [`MAX_PASSES`]
    /// times in a row, so no class starves. Queues whose head is of class `except` are ignored.
    fn choose_class(
        &self,
        except: Option<BatchClass>,
    ) -> Option<(BatchClass, Option<(QueueKey, u32)>)> {
        let eligible = |k: &QueueKey| {
            let class = self.head_class(k);
            class.is_some() && class != except
        };
        let head = self.ready.iter().find(|k| eligible(k))?.clone();
        let head_class = self.head_class(&head)?;
        let passes = match &self.passed_over {
            Some((key, n)) if *key == head => *n,
            _ => 0,
        };
        let mut counts: Vec<(BatchClass, usize)> = Vec::new();
        for key in self.ready.iter().filter(|k| eligible(k)) {
            match self.head_class(key) {
                Some(BatchClass::Solo) | None => {}
                Some(c) => match counts.iter_mut().find(|(k, _)| *k == c) {
                    Some((_, n)) => *n += 1,
                    None => counts.push((c, 1)),
                },
            }
        }
        let of = |c: BatchClass| counts.iter().find(|(k, _)| *k == c).map_or(1, |(_, n)| *n);
        let best = counts.iter().max_by_key(|(_, n)| *n).copied();
        match best {
            Some((class, n))
                if class != head_class && n > of(head_class) && passes < MAX_PASSES =>
            {
                Some((class, Some((head, passes + 1))))
            }
            _ => Some((head_class, None)),
        }
    }

    /// Moves the head job of `key` (and, for sampling, following jobs that fit) into `batch`.
    fn take_from(
        &mut self,
        key: &QueueKey,
        class: BatchClass,
        room: &mut Room,
        batch: &mut Vec<Job>,
    ) {
        if let Some(job) = self.pop_job(key) {
            room.take(&job.work);
            batch.push(job);
        }
        if class != BatchClass::Sample || !matches!(key, QueueKey::Sampler(_)) {
            return;
        }
        while let Some(next) = self.queues.get(key).and_then(|q| q.front()) {
            if next.work.class() != class || !room.fits(&next.work) {
                break;
            }
            let job = self.pop_job(key).expect("front exists");
            room.take(&job.work);
            batch.push(job);
        }
    }

    /// Marks the queues of a batch finished at `now` idle again; those with waiting jobs rejoin
    /// the back of the ring. After a training batch (forward_backward, forward, optim_step),
    /// its runs without a next job are expected back (see `returning`); other batches (create,
    /// save, load, sampling) leave that expectation as it was.
    pub fn finish(&mut self, keys: &[QueueKey], now: Instant) {
        let mut returning = HashSet::new();
        let mut training = false;
        for key in keys {
            let Some(class) = self.busy.remove(key) else {
                continue;
            };
            if class.is_training() {
                training = true;
                if !self.queues.contains_key(key) {
                    returning.insert(key.clone());
                }
            }
            if self.queues.contains_key(key) && !self.ready.contains(key) {
                self.ready.push_back(key.clone());
            }
        }
        if training {
            self.returning = returning;
            self.returning_since = Some(now);
        }
    }
}

/// What a batch being formed has taken of its budgets: tokens (`max_batch_tokens`) and, for
/// sampling jobs, which start a decode loop, the loop's footprint (`max_kv_tokens`).
struct Room {
    tokens: usize,
    footprint: KvFootprint,
    max_tokens: usize,
    max_kv_tokens: usize,
}

impl Room {
    fn new(limits: &Limits) -> Self {
        Room {
            tokens: 0,
            footprint: KvFootprint::default(),
            max_tokens: limits.max_batch_tokens,
            max_kv_tokens: limits.max_kv_tokens,
        }
    }

    /// Whether `work` fits beside what was taken (the first job of a batch is taken whatever
    /// its size).
    fn fits(&self, work: &Work) -> bool {
        self.tokens + work.tokens() <= self.max_tokens
            && self.footprint.and(work.kv_footprint()).tokens() <= self.max_kv_tokens
    }

    fn take(&mut self, work: &Work) {
        self.tokens += work.tokens();
        self.footprint = self.footprint.and(work.kv_footprint());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{ModelKey, SamplerKey, Work};
    use loraloom_model::{AdamParams, SamplingParams};

    fn model(tenant: &str, id: &str) -> QueueKey {
        QueueKey::Model(ModelKey {
            tenant: tenant.into(),
            model_id: id.into(),
        })
    }

    fn sampler(tenant: &str, id: &str) -> QueueKey {
        QueueKey::Sampler(SamplerKey {
            tenant: tenant.into(),
            sampler_id: id.into(),
        })
    }

    fn job(id: &str, queue: QueueKey, work: Work) -> Job {
        Job {
            seq: None,
            replay: false,
            id: id.into(),
            queue,
            work,
            enqueued: Instant::now(),
            span: tracing::Span::none(),
        }
    }

    fn optim() -> Work {
        Work::OptimStep {
            params: AdamParams::default(),
        }
    }

    fn sample_work(max_tokens: i64) -> Work {
        Work::Sample {
            prompt: vec![1, 2],
            num_samples: 1,
            params: SamplingParams {
                max_tokens,
                ..SamplingParams::default()
            },
            scoring: loraloom_model::Scoring::prompt_logprobs(false),
            record_stability: false,
            stream: false,
        }
    }

    fn ids(batch: &[Job]) -> Vec<&str> {
        batch.iter().map(|j| j.id.as_str()).collect()
    }

    fn train_work(tokens: usize) -> Work {
        Work::ForwardBackward {
            data: vec![loraloom_model::Datum {
                input_tokens: vec![1; tokens],
                loss_inputs: loraloom_model::LossInputs {
                    target_tokens: vec![1; tokens],
                    weights: None,
                    logprobs: None,
                    advantages: None,
                    sequence_ratio_mask: None,
                    recorded: None,
                    targets_per_position: None,
                },
                custom: None,
            }],
            loss: loraloom_model::LossFn::CrossEntropy,
            backward: true,
        }
    }

    /// Queues one 100-token forward_backward on each of `tenant`'s runs `r0..r{n-1}`, with
    /// job ids `{prefix}0..`.
    fn push_runs(s: &mut SchedState, tenant: &str, prefix: &str, n: usize) {
        for r in 0..n {
            s.push(job(
                &format!("{prefix}{r}"),
                model(tenant, &format!("r{r}")),
                train_work(100),
            ))
            .unwrap();
        }
    }

    #[test]
    fn a_tenant_with_many_queues_delays_another_by_at_most_two_of_its_jobs() {
        // Tenant a floods 8 runs with jobs of the whole batch budget (no two fit together);
        // tenant b then submits one small job.
        let limits = Limits::default();
        let budget = limits.max_batch_tokens;
        let mut s = SchedState::new(limits);
        for r in 0..8 {
            for j in 0..4 {
                let id = format!("a{r}-{j}");
                s.push(job(&id, model("a", &format!("run{r}")), train_work(budget)))
                    .unwrap();
            }
        }
        // a's first batch is running when b's job arrives.
        let running = s.next_batch().unwrap();
        assert_eq!(running.len(), 1);
        s.push(job("b0", model("b", "run"), train_work(16)))
            .unwrap();
        s.finish(&[running[0].queue.clone()], Instant::now());
        let mut a_jobs_before_b = 1;
        loop {
            let batch = s.next_batch().unwrap();
            if batch.iter().any(|j| j.id == "b0") {
                break;
            }
            a_jobs_before_b += batch.len();
            let keys: Vec<QueueKey> = batch.iter().map(|j| j.queue.clone()).collect();
            s.finish(&keys, Instant::now());
        }
        assert!(
            a_jobs_before_b <= 2,
            "b waited for {a_jobs_before_b} of a's jobs"
        );
    }

    #[test]
    fn a_tenant_of_weight_three_gets_three_turns_for_each_of_a_tenant_of_weight_one() {
        // Both tenants flood 4 runs each with jobs of the whole batch budget, so each batch
        // holds one job and the order of batches is the order of turns.
        let mut limits = Limits::default();
        limits.tenant_weights.insert("gold".into(), 3);
        let budget = limits.max_batch_tokens;
        let mut s = SchedState::new(limits);
        for r in 0..4 {
            for j in 0..6 {
                for tenant in ["gold", "plain"] {
                    let id = format!("{tenant}{r}-{j}");
                    s.push(job(
                        &id,
                        model(tenant, &format!("run{r}")),
                        train_work(budget),
                    ))
                    .unwrap();
                }
            }
        }
        let mut turns = String::new();
        for _ in 0..24 {
            let batch = s.next_batch().unwrap();
            assert_eq!(batch.len(), 1);
            turns.push(if batch[0].queue.tenant() == "gold" {
                'G'
            } else {
                'p'
            });
            s.finish(&[batch[0].queue.clone()], Instant::now());
        }
        let gold = turns.matches('G').count();
        assert_eq!(gold, 18, "three of every four turns: {turns}");
        assert!(!turns.contains("GGGG") && !turns.contains("pp"), "{turns}");
    }

    #[test]
    fn batches_of_a_weighted_tenant_take_its_weight_of_queues_per_round() {
        // Budget for four jobs: gold (weight 2) has three queues first in the ring, plain two.
        let mut limits = Limits {
            max_batch_tokens: 400,
            ..Limits::default()
        };
        limits.tenant_weights.insert("gold".into(), 2);
        let mut s = SchedState::new(limits);
        push_runs(&mut s, "gold", "g", 3);
        push_runs(&mut s, "plain", "p", 2);
        assert_eq!(ids(&s.next_batch().unwrap()), ["g0", "g1", "p0", "g2"]);
    }

    #[test]
    fn batches_fill_tenant_by_tenant() {
        // Budget for three jobs: a's four queues come first in the ring, b's one last.
        let limits = Limits {
            max_batch_tokens: 300,
            ..Limits::default()
        };
        let mut s = SchedState::new(limits);
        push_runs(&mut s, "a", "a", 4);
        s.push(job("b0", model("b", "r"), train_work(100))).unwrap();
        let batch = s.next_batch().unwrap();
        assert_eq!(ids(&batch), ["a0", "b0", "a1"]);
    }

    #[test]
    fn the_class_with_more_ready_queues_goes_first_but_never_starves_the_head() {
        let mut s = SchedState::new(Limits::default());
        // The ring head is a lone sampling job; three runs wait with optimizer steps.
        let sampler = sampler("t", "s");
        s.push(job("s0", sampler.clone(), sample_work(4))).unwrap();
        for q in ["a", "b", "c"] {
            s.push(job(&format!("{q}0"), model("t", q), optim()))
                .unwrap();
        }
        let b = s.next_batch().unwrap();
        assert_eq!(ids(&b), ["a0", "b0", "c0"], "the larger class runs first");
        s.finish(
            &[model("t", "a"), model("t", "b"), model("t", "c")],
            Instant::now(),
        );
        for round in 1..=2 {
            for q in ["a", "b", "c"] {
                s.push(job(&format!("{q}{round}"), model("t", q), optim()))
                    .unwrap();
            }
            if round == 1 {
                let b = s.next_batch().unwrap();
                assert_eq!(ids(&b), ["a1", "b1", "c1"], "passed over a second time");
                s.finish(
                    &[model("t", "a"), model("t", "b"), model("t", "c")],
                    Instant::now(),
                );
            }
        }
        assert_eq!(
            ids(&s.next_batch().unwrap()),
            ["s0"],
            "after two passes the head goes first"
        );
    }

    #[test]
    fn a_batch_smaller_than_the_last_waits_briefly_for_its_peers() {
        let mut s = SchedState::new(Limits::default());
        let keys: Vec<QueueKey> = ["a", "b", "c"].iter().map(|q| model("t", q)).collect();
        for k in &keys {
            s.push(job("x", k.clone(), optim())).unwrap();
        }
        let now = Instant::now();
        assert_eq!(s.next_batch_filled(now).unwrap().len(), 3);
        s.finish(&keys, Instant::now());
        s.push(job("a1", keys[0].clone(), optim())).unwrap();
        let wait = s.next_batch_filled(Instant::now()).unwrap_err();
        assert!(wait.is_some_and(|d| d <= Limits::default().batch_fill_wait));
        s.push(job("b1", keys[1].clone(), optim())).unwrap();
        s.push(job("c1", keys[2].clone(), optim())).unwrap();
        assert_eq!(
            ids(&s.next_batch_filled(Instant::now()).unwrap()),
            ["a1", "b1", "c1"]
        );
        s.finish(&keys, Instant::now());
        // A peer that does not come: the lone job goes once it has waited the fill time.
        s.push(job("a2", keys[0].clone(), optim())).unwrap();
        let later = Instant::now() + Limits::default().batch_fill_wait;
        assert_eq!(ids(&s.next_batch_filled(later).unwrap()), ["a2"]);
    }

    #[test]
    fn a_training_batch_waits_for_the_runs_of_the_last_batch_to_come_back() {
        // Each check reads the clock the batch finished at (or one fill time later), so none
        // depends on how fast the test runs.
        let fill = Limits::default().batch_fill_wait;
        let mut s = SchedState::new(Limits::default());
        let keys: Vec<QueueKey> = ["a", "b", "c"].iter().map(|q| model("t", q)).collect();
        for k in &keys {
            s.push(job("o", k.clone(), optim())).unwrap();
        }
        assert_eq!(s.next_batch_filled(Instant::now()).unwrap().len(), 3);
        let t = Instant::now();
        s.finish(&keys, t);
        // No forward_backward batch ran yet (nothing to compare sizes with), but a and b, which
        // stepped with c, have not sent their next job: c's waits for them.
        s.push(job("c1", keys[2].clone(), train_work(10))).unwrap();
        let wait = s.next_batch_filled(t).unwrap_err();
        assert!(wait.is_some_and(|d| d <= fill));
        s.push(job("a1", keys[0].clone(), train_work(10))).unwrap();
        assert!(s.next_batch_filled(t).is_err(), "b is still out");
        s.push(job("b1", keys[1].clone(), train_work(10))).unwrap();
        assert_eq!(ids(&s.next_batch_filled(t).unwrap()), ["c1", "a1", "b1"]);
        let t = Instant::now();
        s.finish(&keys, t);
        // A batch of another kind (create, save, load) finishing meanwhile leaves the
        // expectation as it was.
        let d = model("t", "d");
        let spec = loraloom_model::LoraSpec {
            rank: 4,
            alpha: 8.0,
            seed: 0,
            train_attn: true,
            train_mlp: false,
            train_unembed: false,
        };
        s.push(job("d0", d.clone(), Work::Create { spec, from: None }))
            .unwrap();
        assert_eq!(ids(&s.next_batch_filled(t).unwrap()), ["d0"]);
        s.finish(std::slice::from_ref(&d), t);
        // b does not come back (d, new, does): the others go once the fill time has passed.
        s.push(job("a2", keys[0].clone(), optim())).unwrap();
        s.push(job("c2", keys[2].clone(), optim())).unwrap();
        s.push(job("d1", d.clone(), optim())).unwrap();
        assert!(s.next_batch_filled(t).is_err(), "b may still come");
        let later = Instant::now() + fill;
        assert_eq!(
            ids(&s.next_batch_filled(later).unwrap()),
            ["a2", "c2", "d1"]
        );
        let t = Instant::now();
        s.finish(&[keys[0].clone(), keys[2].clone()], t);
        // Sampling does not wait for returning runs (c is one now)...
        let sampler = sampler("u", "s");
        s.push(job("s1", sampler, sample_work(4))).unwrap();
        assert_eq!(ids(&s.next_batch_filled(t).unwrap()), ["s1"]);
        // ... nor does a batch that fills the token budget already.
        let mut s = SchedState::new(Limits::default());
        for k in &keys {
            s.push(job("o", k.clone(), optim())).unwrap();
        }
        assert_eq!(s.next_batch_filled(Instant::now()).unwrap().len(), 3);
        let t = Instant::now();
        s.finish(&keys, t);
        let budget = Limits::default().max_batch_tokens;
        s.push(job("a1", keys[0].clone(), train_work(budget)))
            .unwrap();
        assert_eq!(ids(&s.next_batch_filled(t).unwrap()), ["a1"]);
        // A run out of step (its job queued long before the last batch finished) waits for
        // the runs of that batch all the same, so the two groups step together again.
        let mut s = SchedState::new(Limits::default());
        for k in &keys[..2] {
            s.push(job("o", k.clone(), optim())).unwrap();
        }
        assert_eq!(s.next_batch_filled(Instant::now()).unwrap().len(), 2);
        let mut late = job("c1", keys[2].clone(), optim());
        late.enqueued -= Duration::from_secs(1);
        s.push(late).unwrap();
        let t = Instant::now();
        s.finish(&keys[..2], t);
        assert!(s.next_batch_filled(t).is_err());
        s.push(job("a1", keys[0].clone(), optim())).unwrap();
        s.push(job("b1", keys[1].clone(), optim())).unwrap();
        assert_eq!(ids(&s.next_batch_filled(t).unwrap()), ["c1", "a1", "b1"]);
    }

    #[test]
    fn several_jobs_of_one_sampling_session_do_not_make_the_next_batch_wait() {
        let mut s = SchedState::new(Limits::default());
        let sampler = sampler("t", "s");
        for i in 0..3 {
            s.push(job(&format!("s{i}"), sampler.clone(), sample_work(4)))
                .unwrap();
        }
        assert_eq!(s.next_batch_filled(Instant::now()).unwrap().len(), 3);
        s.finish(std::slice::from_ref(&sampler), Instant::now());
        s.push(job("s3", sampler.clone(), sample_work(4))).unwrap();
        assert_eq!(
            ids(&s.next_batch_filled(Instant::now()).unwrap()),
            ["s3"],
            "the same session alone is as large as its last batch"
        );
    }

    /// `rows` sequences of at most `longest` tokens in a decode loop.
    fn rows_of(rows: usize, longest: usize) -> KvFootprint {
        KvFootprint { rows, longest }
    }

    #[test]
    fn at_a_token_boundary_sampling_joins_within_the_kv_budget_and_training_comes_along() {
        let mut s = SchedState::new(Limits::default());
        let session = |id: &str| sampler("t", id);
        // Each job is one sequence of at most 2 + 8 = 10 tokens.
        for (i, q) in ["a", "a", "b", "c"].iter().enumerate() {
            s.push(job(&format!("{q}{i}"), session(q), sample_work(8)))
                .unwrap();
        }
        s.push(job("m0", model("t", "m"), optim())).unwrap();
        s.push(job("m1", model("t", "m"), optim())).unwrap();
        // 8 sequences of 10 in a budget of 100: two jobs fit.
        let (joining, other) = s.next_at_step_boundary(&HashMap::new(), rows_of(8, 10), 100, true);
        assert_eq!(
            ids(&joining),
            ["a0", "a1"],
            "a session's jobs need not wait for each other"
        );
        assert_eq!(
            ids(&other),
            ["m0"],
            "a training batch runs before the next step"
        );
        let (joining, other) = s.next_at_step_boundary(&HashMap::new(), rows_of(10, 10), 100, true);
        assert!(
            joining.is_empty() && other.is_empty(),
            "the run is busy; b does not fit"
        );
        s.finish(&[model("t", "m")], Instant::now());
        let (joining, other) = s.next_at_step_boundary(&HashMap::new(), rows_of(8, 10), 100, true);
        assert_eq!((ids(&joining), ids(&other)), (vec!["b2", "c3"], vec!["m1"]));
        assert_eq!(s.queued(), 0);
    }

    #[test]
    fn at_a_token_boundary_the_tenant_holding_the_least_kv_joins_first_and_keeps_its_turn() {
        let mut s = SchedState::new(Limits::default());
        let session = sampler;
        // The flooding tenant has eight sessions ahead of the other's one in the ring; each
        // job is a sequence of 10 tokens, the other's second one of 30.
        for i in 0..8 {
            s.push(job(
                &format!("f{i}"),
                session("flood", &format!("s{i}")),
                sample_work(8),
            ))
            .unwrap();
        }
        s.push(job("o0", session("other", "s"), sample_work(8)))
            .unwrap();
        s.push(job("o1", session("other", "s"), sample_work(28)))
            .unwrap();
        // The loop holds 80 of 100, all the flooder's: the other tenant's job takes the room.
        let held: HashMap<TenantId, usize> = [("flood".to_string(), 80)].into();
        let (joining, _) = s.next_at_step_boundary(&held, rows_of(8, 10), 100, true);
        assert_eq!(
            ids(&joining),
            ["o0"],
            "the least-holding tenant first; o1 then waits for room"
        );
        // o1 (30, padding every row to 30) still waits: the flooder, holding more, may not
        // take the 10 free.
        let held: HashMap<TenantId, usize> =
            [("flood".to_string(), 80), ("other".to_string(), 10)].into();
        let (joining, _) = s.next_at_step_boundary(&held, rows_of(9, 10), 100, true);
        assert!(
            joining.is_empty(),
            "the room is kept for o1: {:?}",
            ids(&joining)
        );
        // With one sequence left, o1 joins (2 × 30), then one of the flooder's (3 × 30).
        let held: HashMap<TenantId, usize> = [("flood".to_string(), 10)].into();
        let (joining, _) = s.next_at_step_boundary(&held, rows_of(1, 10), 100, true);
        assert_eq!(ids(&joining), ["o1", "f0"], "then the flooder's turn");
    }

    #[test]
    fn a_job_larger_than_the_whole_kv_budget_waits_its_turn_then_the_loop_drains_for_it() {
        let mut s = SchedState::new(Limits {
            max_kv_tokens: 100,
            ..Limits::default()
        });
        let session = |tenant: &str| sampler(tenant, "s");
        s.push(job("huge", session("big"), sample_work(198)))
            .unwrap();
        for i in 0..3 {
            s.push(job(&format!("small{i}"), session("other"), sample_work(8)))
                .unwrap();
        }
        // While its tenant holds more of the loop, the others' jobs join before it...
        let held: HashMap<TenantId, usize> =
            [("big".to_string(), 50), ("other".to_string(), 35)].into();
        let (joining, _) = s.next_at_step_boundary(&held, rows_of(5, 10), 100, true);
        assert_eq!(
            ids(&joining),
            ["small0", "small1"],
            "other holds 35, 45, then 55 > 50: big's turn, with 30 entries of 100 free"
        );
        // ...and once its turn comes nothing joins, however much room is free: the loop
        // drains instead of keeping it waiting as long as smaller jobs come.
        let held: HashMap<TenantId, usize> =
            [("big".to_string(), 50), ("other".to_string(), 60)].into();
        let (joining, _) = s.next_at_step_boundary(&held, rows_of(1, 10), 100, true);
        assert!(joining.is_empty(), "{:?}", ids(&joining));
        // The drained loop starts with it, alone (nothing fits beside 200 entries).
        assert_eq!(ids(&s.next_batch().unwrap()), ["huge"]);
        assert_eq!(ids(&s.next_batch().unwrap()), ["small2"]);
    }

    #[test]
    fn the_loop_drained_for_a_job_larger_than_the_kv_budget_starts_with_it() {
        let mut s = SchedState::new(Limits {
            max_kv_tokens: 100,
            ..Limits::default()
        });
        let session = |tenant: &str| sampler(tenant, "s");
        // The other tenant's loop starts; then the big job's tenant trains (served since).
        s.push(job("o0", session("other"), sample_work(8))).unwrap();
        assert_eq!(ids(&s.next_batch().unwrap()), ["o0"]);
        s.push(job("step", model("big", "run"), optim())).unwrap();
        assert_eq!(ids(&s.next_batch().unwrap()), ["step"]);
        s.finish(&[model("big", "run")], Instant::now());
        s.push(job("huge", session("big"), sample_work(198)))
            .unwrap();
        s.push(job("o1", session("other"), sample_work(8))).unwrap();
        s.push(job("step2", model("big", "run"), optim())).unwrap();
        let held: HashMap<TenantId, usize> = [("other".to_string(), 10)].into();
        let (joining, other) = s.next_at_step_boundary(&held, rows_of(1, 10), 100, true);
        assert!(joining.is_empty(), "big holds nothing: its turn");
        // Its tenant's next training step runs at that boundary, as ever.
        assert_eq!(ids(&other), ["step2"]);
        s.finish(&[model("big", "run")], Instant::now());
        // Drained, the next loop starts with it although its tenant was served last.
        assert_eq!(ids(&s.next_batch().unwrap()), ["huge"]);
        assert_eq!(ids(&s.next_batch().unwrap()), ["o1"]);
    }

    #[test]
    fn the_first_batch_of_a_decode_loop_keeps_its_footprint_within_the_kv_budget() {
        let mut s = SchedState::new(Limits {
            max_kv_tokens: 1000,
            ..Limits::default()
        });
        let session = |id: &str| sampler("t", id);
        // One sequence of 2 + 398 tokens, then short ones, each padded to 400 beside it.
        s.push(job("long", session("a"), sample_work(398))).unwrap();
        for i in 0..3 {
            s.push(job(&format!("s{i}"), session("b"), sample_work(2)))
                .unwrap();
        }
        assert_eq!(
            ids(&s.next_batch().unwrap()),
            ["long", "s0"],
            "2 x 400 <= 1000 < 3 x 400"
        );
        assert_eq!(ids(&s.next_batch().unwrap()), ["s1", "s2"]);
        // A job larger than the whole budget still runs, first of its batch.
        s.push(job("huge", session("a"), sample_work(1998)))
            .unwrap();
        s.push(job("s3", session("b"), sample_work(2))).unwrap();
        assert_eq!(ids(&s.next_batch().unwrap()), ["huge"]);
    }

    #[test]
    fn a_long_sequence_counts_every_row_at_its_length() {
        let mut s = SchedState::new(Limits::default());
        let session = sampler("t", "s");
        s.push(job("long", session.clone(), sample_work(48)))
            .unwrap();
        s.push(job("short", session, sample_work(8))).unwrap();
        // Four sequences of at most 10: the 50-token one would pad all five to 50.
        let (joining, _) = s.next_at_step_boundary(&HashMap::new(), rows_of(4, 10), 200, true);
        assert!(joining.is_empty(), "5 x 50 > 200: {:?}", ids(&joining));
        // Two: it fits (3 x 50), and the short one after it (4 x 50).
        let (joining, _) = s.next_at_step_boundary(&HashMap::new(), rows_of(2, 10), 200, true);
        assert_eq!(ids(&joining), ["long", "short"]);
    }

    #[test]
    fn one_queue_runs_one_job_at_a_time_in_order() {
        let mut s = SchedState::new(Limits::default());
        let a = model("t", "a");
        for i in 0..3 {
            s.push(job(&format!("a{i}"), a.clone(), optim())).unwrap();
        }
        let b = s.next_batch().unwrap();
        assert_eq!(ids(&b), ["a0"]);
        assert!(s.next_batch().is_none(), "a is busy until its job finishes");
        s.finish(std::slice::from_ref(&a), Instant::now());
        assert_eq!(ids(&s.next_batch().unwrap()), ["a1"]);
    }

    #[test]
    fn compatible_heads_of_different_queues_share_a_batch_and_take_turns() {
        let mut s = SchedState::new(Limits::default());
        let (a, b, c) = (model("t1", "a"), model("t2", "b"), model("t3", "c"));
        s.push(job("a0", a.clone(), optim())).unwrap();
        s.push(job("a1", a.clone(), optim())).unwrap();
        s.push(job("b0", b.clone(), sample_work(4))).unwrap();
        s.push(job("c0", c.clone(), optim())).unwrap();
        let batch = s.next_batch().unwrap();
        assert_eq!(ids(&batch), ["a0", "c0"]);
        // b's sample job could not join; it is next in line, before a's second job.
        assert_eq!(ids(&s.next_batch().unwrap()), ["b0"]);
        s.finish(&[a.clone(), c], Instant::now());
        assert_eq!(ids(&s.next_batch().unwrap()), ["a1"]);
    }

    #[test]
    fn a_deep_queue_does_not_starve_a_single_job() {
        let mut s = SchedState::new(Limits {
            max_batch_tokens: 4,
            ..Limits::default()
        });
        let deep = sampler("t1", "s");
        let other = model("t2", "x");
        for i in 0..10 {
            s.push(job(&format!("d{i}"), deep.clone(), sample_work(1)))
                .unwrap();
        }
        s.push(job("x0", other.clone(), optim())).unwrap();
        let first = s.next_batch().unwrap();
        assert_eq!(first.len(), 1, "budget 4 tokens: one 3-token sample job");
        let second = s.next_batch().unwrap();
        assert_eq!(ids(&second), ["x0"], "the other tenant goes next");
    }

    #[test]
    fn limits_refuse_with_overloaded() {
        let mut s = SchedState::new(Limits {
            per_tenant: 2,
            total: 3,
            ..Limits::default()
        });
        s.push(job("1", model("t1", "a"), optim())).unwrap();
        s.push(job("2", model("t1", "b"), optim())).unwrap();
        let err = s.push(job("3", model("t1", "a"), optim())).unwrap_err();
        assert_eq!(err.kind(), "overloaded");
        s.push(job("4", model("t2", "c"), optim())).unwrap();
        let err = s.push(job("5", model("t3", "d"), optim())).unwrap_err();
        assert!(err.to_string().contains("limit 3"), "{err}");
        s.close();
        let err = s.push(job("6", model("t4", "e"), optim())).unwrap_err();
        assert_eq!(err.kind(), "shutting_down");
    }

    #[test]
    fn cancel_and_expire_remove_queued_jobs_only() {
        let mut s = SchedState::new(Limits {
            queue_timeout: Duration::from_secs(10),
            ..Limits::default()
        });
        let a = model("t", "a");
        s.push(job("a0", a.clone(), optim())).unwrap();
        s.push(job("a1", a.clone(), optim())).unwrap();
        s.push(job("a2", a.clone(), optim())).unwrap();
        let running = s.next_batch().unwrap();
        assert!(
            s.cancel(&running[0].id).is_none(),
            "a running job is not in a queue"
        );
        assert_eq!(s.cancel("a1").unwrap().id, "a1");
        assert_eq!(s.queued(), 1);
        assert!(s.expire(Instant::now()).is_empty());
        let later = Instant::now() + Duration::from_secs(11);
        assert_eq!(ids(&s.expire(later)), ["a2"]);
        assert_eq!(s.queued(), 0);
        assert_eq!(s.queued_for("t"), 0);
        s.finish(&[a], Instant::now());
        assert!(s.next_batch().is_none());
        assert!(s.is_idle());
    }
}
