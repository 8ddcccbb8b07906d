//! Keys and values of finished sequences, kept so that a later request whose prompt starts with
//! one of them copies them instead of computing them again: the next turn of a conversation
//! (tinker-cookbook's multi-turn environments send the whole conversation so far as each turn's
//! prompt), or prompts that share a long system prompt or few-shot examples. Bounded by a
//! number of tokens; the least recently used entries leave first.

use crate::error::Result;
use crate::kv_cache::KvCache;
use crate::lora::AdapterIdentity;

/// One kept sequence.
struct Entry {
    /// The scope of the request that made it (see `SampleRequest::share_scope`).
    scope: String,
    /// The adapter that computed it (`None`: the base model).
    adapter: Option<AdapterIdentity>,
    tokens: Vec<i64>,
    /// One row holding exactly `tokens`' keys and values.
    cache: KvCache,
    /// When it was last inserted or used (a tick of [`PrefixCache::clock`]).
    used: u64,
}

/// Kept sequences of a decode loop, at most `budget` tokens in all.
pub struct PrefixCache {
    entries: Vec<Entry>,
    tokens: usize,
    budget: usize,
    clock: u64,
}

/// The number of leading tokens `a` and `b` share.
pub(crate) fn shared_prefix(a: &[i64], b: &[i64]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl PrefixCache {
    /// A cache of at most `budget` tokens (0 keeps nothing).
    pub fn new(budget: usize) -> Self {
        PrefixCache {
            entries: Vec::new(),
            tokens: 0,
            budget,
            clock: 0,
        }
    }

    /// Tokens it may hold.
    pub fn budget(&self) -> usize {
        self.budget
    }

    /// Tokens it holds.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// Sequences it holds.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Drops everything.
    pub fn clear(&mut self) {
        self.entries.clear();
        self.tokens = 0;
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// Keeps the keys and values of `tokens` computed by `adapter` for a request of `scope`,
    /// holding at most `room` tokens (and its budget) in all after; `cache` makes their one-row
    /// copy, only when it is kept. Nothing is kept when `tokens` exceed that limit, or a kept
    /// sequence of the scope and adapter starts with them (that one becomes the most recently
    /// used); kept sequences of the scope and adapter that `tokens` start with leave (this one
    /// covers them), and the least recently used leave until it fits.
    pub(crate) fn insert(
        &mut self,
        scope: &str,
        adapter: Option<AdapterIdentity>,
        tokens: Vec<i64>,
        room: usize,
        cache: impl FnOnce() -> Result<KvCache>,
    ) -> Result<()> {
        let limit = room.min(self.budget);
        if tokens.is_empty() || tokens.len() > limit {
            return Ok(());
        }
        let now = self.tick();
        let covering = self.entries.iter_mut().find(|e| {
            e.scope == scope
                && e.adapter == adapter
                && e.tokens.len() >= tokens.len()
                && e.tokens[..tokens.len()] == tokens[..]
        });
        if let Some(e) = covering {
            e.used = now;
            return Ok(());
        }
        let cache = cache()?;
        self.entries.retain(|e| {
            let covered = e.scope == scope && e.adapter == adapter && tokens.starts_with(&e.tokens);
            !covered
        });
        self.tokens = self.entries.iter().map(|e| e.tokens.len()).sum();
        self.shrink_to(limit - tokens.len());
        self.tokens += tokens.len();
        self.entries.push(Entry {
            scope: scope.to_string(),
            adapter,
            tokens,
            cache,
            used: now,
        });
        Ok(())
    }

    /// Drops the least recently used sequences until at most `tokens` are kept.
    pub(crate) fn shrink_to(&mut self, tokens: usize) {
        while self.tokens > tokens {
            let oldest = self
                .entries
                .iter()
                .enumerate()
                .min_by_key(|(_, e)| e.used)
                .map(|(i, _)| i)
                .expect("entries hold the tokens over the limit");
            self.tokens -= self.entries.swap_remove(oldest).tokens.len();
        }
    }

    /// The kept sequence of `scope` and `adapter` sharing the longest prefix with `prompt`: its
    /// index (for [`PrefixCache::use_prefix`]) and the number of tokens shared, when any are.
    pub(crate) fn longest(
        &self,
        scope: &str,
        adapter: &Option<AdapterIdentity>,
        prompt: &[i64],
    ) -> Option<(usize, usize)> {
        self.entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.scope == scope && &e.adapter == adapter)
            .map(|(i, e)| (i, shared_prefix(&e.tokens, prompt)))
            .filter(|&(_, n)| n > 0)
            .max_by_key(|&(i, n)| (n, std::cmp::Reverse(i)))
    }

    /// The first `n` tokens of entry `index` as a one-row cache of views (see
    /// [`KvCache::row_prefix`]); the entry becomes the most recently used.
    pub(crate) fn use_prefix(&mut self, index: usize, n: i64) -> Result<KvCache> {
        let now = self.tick();
        let entry = &mut self.entries[index];
        entry.used = now;
        entry.cache.row_prefix(0, n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind, Tensor};

    /// Room enough for anything.
    const ALL: usize = usize::MAX;

    /// A one-row cache of `n` columns whose values are its column numbers.
    fn cache(n: i64) -> Result<KvCache> {
        let k = Tensor::arange(n, (Kind::Float, Device::Cpu)).view([1, 1, n, 1]);
        Ok(KvCache::from_prefill(vec![(k.shallow_clone(), k)], vec![0]))
    }

    #[test]
    fn longest_shared_prefix_of_the_same_adapter_and_least_recently_used_leave_first() {
        let mut kept = PrefixCache::new(10);
        kept.insert("t", None, vec![1, 2, 3, 4], ALL, || cache(4))
            .unwrap();
        kept.insert("t", None, vec![1, 2, 9], ALL, || cache(3))
            .unwrap();
        assert_eq!(kept.longest("t", &None, &[1, 2, 3, 7]), Some((0, 3)));
        assert_eq!(kept.longest("t", &None, &[5]), None);
        // Covered: nothing new is kept.
        kept.insert("t", None, vec![1, 2], ALL, || panic!("not copied"))
            .unwrap();
        assert_eq!((kept.len(), kept.tokens()), (2, 7));
        // The covered insert used [1, 2, 3, 4], then [1, 2, 9] is used: the former leaves.
        let _ = kept.use_prefix(1, 2).unwrap();
        kept.insert("t", None, vec![7, 7, 7, 7, 7], ALL, || cache(5))
            .unwrap();
        assert_eq!((kept.len(), kept.tokens()), (2, 8));
        assert_eq!(kept.longest("t", &None, &[1, 2, 3]), Some((0, 2)));
        // A sequence extending a kept one replaces it.
        kept.insert("t", None, vec![1, 2, 9, 4, 4], ALL, || cache(5))
            .unwrap();
        assert_eq!((kept.len(), kept.tokens()), (2, 10));
        let prefix = kept.use_prefix(kept.longest("t", &None, &[1, 2, 9, 4]).unwrap().0, 4);
        assert_eq!(prefix.unwrap().len(), 4);
        // Another scope sees nothing of it.
        assert_eq!(kept.longest("u", &None, &[1, 2, 9, 4]), None);
        // Longer than the budget: not kept.
        kept.insert("t", None, (0..11).collect(), ALL, || panic!("not copied"))
            .unwrap();
        assert_eq!(kept.tokens(), 10);
        // Less room than the budget (live sequences hold the rest): the least recently used
        // leave, and a sequence longer than the room is not kept.
        kept.insert("t", None, vec![8, 8], 7, || cache(2)).unwrap();
        assert_eq!((kept.len(), kept.tokens()), (2, 7));
        assert_eq!(kept.longest("t", &None, &[8, 8]), Some((1, 2)));
        kept.insert("t", None, (20..28).collect(), 7, || panic!("not copied"))
            .unwrap();
        kept.shrink_to(3);
        assert_eq!((kept.len(), kept.tokens()), (1, 2));
        assert_eq!(kept.longest("t", &None, &[8]), Some((0, 1)));
    }
}
