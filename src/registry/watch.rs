//! The rules every blocking-query loop follows, as Consul documents them for its clients:
//! which index to send next ([`WatchIndex`]), how fast to loop ([`RateLimit`]) and how long to
//! wait after an error ([`Backoff`]). The loops themselves live with their owners.

use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;

use super::Blocking;

/// How long Consul may hold one blocking query. Shorter than Consul's default of 5 minutes, so
/// that a Consul replaced by an empty one without any failed query (its index from then on lower
/// than the one a watch waits for) is noticed within about a minute.
pub const BLOCKING_WAIT: Duration = Duration::from_secs(60);

/// What an answer's index says about the watched resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IndexStep {
    /// The first answer, or the first after a reset: the data is the whole current state.
    Fresh,
    /// The index moved forward: the data may have changed ("no guarantee of a change").
    Forward,
    /// The index did not move: the query timed out, nothing changed.
    Unchanged,
    /// The index went backwards (snapshot restore, a reset Consul, a removed highest key): the
    /// next query starts over without blocking.
    Backwards,
}

/// The index a blocking-query loop sends next.
#[derive(Debug, Clone, Copy, Default)]
pub struct WatchIndex {
    last: u64,
    resync: bool,
}

impl WatchIndex {
    /// The query to send next: none (an immediate read) at first, after a reset and after an
    /// error, else a blocking query on the last index.
    pub fn next_query(&self) -> Option<Blocking> {
        (self.last > 0 && !self.resync).then_some(Blocking {
            index: self.last,
            wait: BLOCKING_WAIT,
        })
    }

    /// After a failed query: the next one reads at once instead of blocking. Consul may have
    /// come back changed, or without its data, and then a blocking query on an index from
    /// before would wait its full time before showing it.
    pub fn after_error(&mut self) {
        self.resync = true;
    }

    /// Takes in the index of an answer and says what it means.
    pub fn observe(&mut self, index: u64) -> IndexStep {
        self.resync = false;
        let previous = self.last;
        if previous > 0 && index < previous {
            // "Reset the index if it goes backwards": read everything afresh.
            self.last = 0;
            return IndexStep::Backwards;
        }
        // "It is always safe to use an index of 1": never send 0, which would not block.
        self.last = index.max(1);
        match previous {
            0 => IndexStep::Fresh,
            _ if index == previous => IndexStep::Unchanged,
            _ => IndexStep::Forward,
        }
    }
}

/// A token bucket with a burst of 2, so that a query answering at once again and again (which
/// Consul says can happen) cannot turn into a busy loop.
#[derive(Debug)]
pub struct RateLimit {
    interval: Duration,
    recent: [Option<Instant>; 2],
}

impl RateLimit {
    /// At most two queries in a row, then one per `interval`.
    pub fn new(interval: Duration) -> RateLimit {
        RateLimit {
            interval,
            recent: [None, None],
        }
    }

    /// Waits until the next query may be sent, and counts it.
    pub async fn acquire(&mut self) {
        if let Some(older) = self.recent[0] {
            tokio::time::sleep_until(older + self.interval * 2).await;
        }
        self.recent = [self.recent[1], Some(Instant::now())];
    }
}

/// Capped exponential backoff with jitter, for retrying after a failed query.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    cap: Duration,
    next: Duration,
}

impl Backoff {
    /// Starts at `first`, doubles after each failure, never exceeds `cap`.
    pub fn new(first: Duration, cap: Duration) -> Backoff {
        Backoff {
            first,
            cap,
            next: first,
        }
    }

    /// The pause before the next attempt: the current step with jitter (between half and all of
    /// it, so that many watchers do not retry in step), then the step doubles up to the cap.
    pub fn next_pause(&mut self) -> Duration {
        let step = self.next;
        self.next = (step * 2).min(self.cap);
        let half = step / 2;
        half + half.mul_f64(rand::rng().random::<f64>())
    }

    /// Back to the first step after a success.
    pub fn reset(&mut self) {
        self.next = self.first;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_query_does_not_block_and_later_ones_block_on_the_last_index() {
        let mut index = WatchIndex::default();
        assert_eq!(index.next_query(), None);
        assert_eq!(index.observe(12), IndexStep::Fresh);
        assert_eq!(index.next_query().map(|query| query.index), Some(12));
        assert_eq!(index.observe(12), IndexStep::Unchanged);
        assert_eq!(index.observe(15), IndexStep::Forward);
        assert_eq!(index.next_query().map(|query| query.index), Some(15));
    }

    #[test]
    fn an_index_going_backwards_resets_to_an_immediate_read() {
        let mut index = WatchIndex::default();
        index.observe(40);
        assert_eq!(index.observe(7), IndexStep::Backwards);
        assert_eq!(index.next_query(), None, "the next read starts over");
        assert_eq!(index.observe(7), IndexStep::Fresh);
        assert_eq!(index.next_query().map(|query| query.index), Some(7));
    }

    #[test]
    fn after_an_error_the_next_read_does_not_block_and_still_detects_a_reset() {
        let mut index = WatchIndex::default();
        index.observe(40);
        index.after_error();
        assert_eq!(index.next_query(), None, "read at once after an error");
        assert_eq!(
            index.observe(40),
            IndexStep::Unchanged,
            "nothing changed meanwhile"
        );
        assert_eq!(index.next_query().map(|query| query.index), Some(40));
        index.after_error();
        assert_eq!(
            index.observe(3),
            IndexStep::Backwards,
            "Consul came back with less"
        );
    }

    #[test]
    fn index_zero_is_never_sent() {
        let mut index = WatchIndex::default();
        index.observe(0);
        assert_eq!(index.next_query().map(|query| query.index), Some(1));
    }

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap_and_resets() {
        let first = Duration::from_millis(100);
        let cap = Duration::from_millis(800);
        let mut backoff = Backoff::new(first, cap);
        let mut steps = Vec::new();
        for _ in 0..6 {
            steps.push(backoff.next_pause());
        }
        let expected = [100, 200, 400, 800, 800, 800];
        for (pause, step) in steps.iter().zip(expected) {
            let step = Duration::from_millis(step);
            assert!(
                *pause >= step / 2 && *pause <= step,
                "{pause:?} within [{:?}, {step:?}]",
                step / 2
            );
        }
        backoff.reset();
        assert!(backoff.next_pause() <= first, "back to the first step");
    }

    #[tokio::test(start_paused = true)]
    async fn the_rate_limit_lets_two_queries_through_then_one_per_interval() {
        let interval = Duration::from_millis(50);
        let mut limit = RateLimit::new(interval);
        let start = Instant::now();
        limit.acquire().await;
        limit.acquire().await;
        assert_eq!(start.elapsed(), Duration::ZERO, "a burst of two is free");
        limit.acquire().await;
        assert_eq!(start.elapsed(), interval * 2);
    }
}
