//! The pure accounting behind two service limits, with time as a value:
//!
//! - [`RateLimiter`]: a token bucket per key (reports per identity). A
//!   bucket refills at `per_s` tokens a second up to `per_s` (one second's
//!   worth of burst); a call takes one token or is refused. The map is
//!   bounded: a full bucket is the same as none, so idle ones are dropped
//!   when the map is full (and once a minute), and if it is still full the
//!   least recently used goes.
//! - [`Slots`]: counted slots, in total and per key (watch streams per
//!   node and per connection). A key's entry exists only while it holds a
//!   slot, so the map never has more entries than slots in use.
//!
//! Neither knows about tokio or the clock: the service passes `now`.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// The most buckets a [`RateLimiter`] keeps by default: one for every
/// member of the default `max_groups` (2048) groups of at most 32 members.
pub const MAX_RATE_BUCKETS: usize = 65_536;

/// How often idle buckets are dropped even when the map is not full.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// One key's bucket.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    /// When `tokens` was last brought up to date (and the key last seen).
    at: Instant,
}

/// A token bucket per key, bounded in keys.
#[derive(Debug)]
pub struct RateLimiter<K> {
    per_s: f64,
    max_keys: usize,
    buckets: HashMap<K, Bucket>,
    last_sweep: Option<Instant>,
}

impl<K: Hash + Eq + Clone> RateLimiter<K> {
    /// `per_s` calls a second per key (at least 1), with a burst of as
    /// many; at most `max_keys` keys (at least 1) tracked at once.
    pub fn new(per_s: u64, max_keys: usize) -> Self {
        Self { per_s: per_s.max(1) as f64, max_keys: max_keys.max(1), buckets: HashMap::new(), last_sweep: None }
    }

    /// Takes one token from `key`'s bucket at `now`; false if it has none.
    pub fn try_take(&mut self, key: &K, now: Instant) -> bool {
        if self.last_sweep.is_none_or(|t| now.saturating_duration_since(t) >= SWEEP_EVERY) {
            self.sweep(now);
        }
        if let Some(b) = self.buckets.get_mut(key) {
            let tokens = refilled(b, self.per_s, now);
            b.at = b.at.max(now);
            if tokens < 1.0 {
                b.tokens = tokens;
                return false;
            }
            b.tokens = tokens - 1.0;
            return true;
        }
        if self.buckets.len() >= self.max_keys {
            self.sweep(now);
        }
        if self.buckets.len() >= self.max_keys {
            // Every bucket is in use: the least recently seen key starts
            // afresh next time (at worst one more burst for it).
            if let Some(oldest) = self.buckets.iter().min_by_key(|(_, b)| b.at).map(|(k, _)| k.clone()) {
                self.buckets.remove(&oldest);
            }
        }
        self.buckets.insert(key.clone(), Bucket { tokens: self.per_s - 1.0, at: now });
        true
    }

    /// Drops every bucket that has refilled (the same as none).
    fn sweep(&mut self, now: Instant) {
        let per_s = self.per_s;
        self.buckets.retain(|_, b| refilled(b, per_s, now) < per_s);
        self.last_sweep = Some(now);
    }

    /// How many keys are tracked.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// Whether no key is tracked.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// The rate per key.
    pub fn per_s(&self) -> u64 {
        self.per_s as u64
    }
}

/// `b`'s tokens at `now` (a `now` before its last update adds nothing).
fn refilled(b: &Bucket, per_s: f64, now: Instant) -> f64 {
    let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
    (b.tokens + elapsed * per_s).min(per_s)
}

/// Why [`Slots::try_take`] refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotsFull {
    /// Every slot is in use.
    Total { max: usize },
    /// The key holds its most.
    PerKey { max: usize },
}

/// Slots in use, in total and per key.
#[derive(Debug)]
pub struct Slots<K> {
    max_total: usize,
    max_per_key: usize,
    in_use: usize,
    per_key: HashMap<K, usize>,
}

impl<K: Hash + Eq + Clone> Slots<K> {
    pub fn new(max_total: usize, max_per_key: usize) -> Self {
        Self { max_total, max_per_key, in_use: 0, per_key: HashMap::new() }
    }

    /// Takes a slot for `key` (`None`: counted in the total only).
    pub fn try_take(&mut self, key: Option<&K>) -> Result<(), SlotsFull> {
        if self.in_use >= self.max_total {
            return Err(SlotsFull::Total { max: self.max_total });
        }
        if let Some(k) = key {
            let n = self.per_key.get(k).copied().unwrap_or(0);
            if n >= self.max_per_key {
                return Err(SlotsFull::PerKey { max: self.max_per_key });
            }
            self.per_key.insert(k.clone(), n + 1);
        }
        self.in_use += 1;
        Ok(())
    }

    /// Gives back a slot [`Self::try_take`] gave `key`.
    pub fn give_back(&mut self, key: Option<&K>) {
        self.in_use = self.in_use.saturating_sub(1);
        if let Some(k) = key
            && let Some(n) = self.per_key.get_mut(k)
        {
            *n -= 1;
            if *n == 0 {
                self.per_key.remove(k);
            }
        }
    }

    /// Slots in use.
    pub fn in_use(&self) -> usize {
        self.in_use
    }

    /// Slots `key` holds.
    pub fn held_by(&self, key: &K) -> usize {
        self.per_key.get(key).copied().unwrap_or(0)
    }

    /// Keys holding a slot (never more than [`Self::in_use`]).
    pub fn keys(&self) -> usize {
        self.per_key.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(10, 100);
        let k = "a".to_owned();
        for i in 0..10 {
            assert!(r.try_take(&k, t0), "call {i} of the burst");
        }
        assert!(!r.try_take(&k, t0), "the burst is spent");
        assert!(!r.try_take(&k, t0 + ms(50)), "half a token back");
        assert!(r.try_take(&k, t0 + ms(100)), "one token a tenth of a second");
        assert!(!r.try_take(&k, t0 + ms(100)));
        // Refusals take nothing: after a second the whole burst is back.
        for _ in 0..10 {
            assert!(r.try_take(&k, t0 + ms(1_200)));
        }
        assert!(!r.try_take(&k, t0 + ms(1_200)));
    }

    #[test]
    fn keys_have_their_own_buckets() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(1, 100);
        assert!(r.try_take(&"a", t0));
        assert!(!r.try_take(&"a", t0));
        assert!(r.try_take(&"b", t0), "another key is not refused for a's calls");
        assert_eq!(r.len(), 2);
    }

    #[test]
    fn the_map_is_bounded_and_idle_buckets_go_first() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(2, 3);
        for k in 0..3 {
            assert!(r.try_take(&k, t0));
        }
        // Key 0 is idle (refilled) by 2 s later; 1 and 2 were used again.
        assert!(r.try_take(&1, t0 + ms(1_900)));
        assert!(r.try_take(&2, t0 + ms(1_900)));
        assert!(r.try_take(&3, t0 + ms(2_000)));
        assert_eq!(r.len(), 3, "never more than the cap");
        assert!(r.buckets.contains_key(&1) && r.buckets.contains_key(&2) && !r.buckets.contains_key(&0));
        // None idle: a least recently seen key goes (1 or 2, seen at 1.9 s;
        // 3 was seen at 2.0 s).
        assert!(r.try_take(&4, t0 + ms(2_000)));
        assert_eq!(r.len(), 3);
        assert!(r.buckets.contains_key(&3) && r.buckets.contains_key(&4));
    }

    #[test]
    fn idle_buckets_are_swept_once_a_minute() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(5, 100);
        for k in 0..50 {
            r.try_take(&k, t0);
        }
        assert_eq!(r.len(), 50);
        r.try_take(&0, t0 + SWEEP_EVERY + ms(1));
        assert_eq!(r.len(), 1, "only the key just used is left");
    }

    #[test]
    fn a_clock_reading_from_before_takes_nothing_back() {
        let t0 = Instant::now() + Duration::from_secs(10);
        let mut r = RateLimiter::new(1, 10);
        assert!(r.try_take(&"a", t0));
        assert!(!r.try_take(&"a", t0 - ms(5_000)), "no refill from an earlier reading");
    }

    #[test]
    fn slots_count_per_key_and_in_total() {
        let mut s = Slots::new(3, 2);
        let (a, b) = ("a", "b");
        assert_eq!(s.try_take(Some(&a)), Ok(()));
        assert_eq!(s.try_take(Some(&a)), Ok(()));
        assert_eq!(s.try_take(Some(&a)), Err(SlotsFull::PerKey { max: 2 }));
        assert_eq!(s.try_take(Some(&b)), Ok(()));
        assert_eq!(s.try_take(Some(&b)), Err(SlotsFull::Total { max: 3 }));
        assert_eq!(s.try_take(None), Err(SlotsFull::Total { max: 3 }));
        assert_eq!((s.in_use(), s.keys()), (3, 2));
        s.give_back(Some(&a));
        assert_eq!(s.held_by(&a), 1);
        assert_eq!(s.try_take(Some(&a)), Ok(()), "a freed slot is taken again");
        s.give_back(Some(&a));
        s.give_back(Some(&a));
        assert_eq!((s.held_by(&a), s.keys()), (0, 1), "a key at zero leaves the map");
        s.give_back(Some(&b));
        assert_eq!((s.in_use(), s.keys()), (0, 0));
        assert_eq!(s.try_take(None), Ok(()), "no key: counted in the total only");
        assert_eq!((s.in_use(), s.keys()), (1, 0));
    }
}
