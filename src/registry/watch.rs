//! The rules every blocking-query loop follows, as Consul documents them for its clients:
//! which index to send next ([`WatchIndex`]), how fast to loop ([`RateLimit`]) and how long to
//! wait after an error ([`Backoff`]); and [`Watch`], the loop that applies them all, so that its
//! users only say what to read and what to do with each new answer.

use std::future::Future;
use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;

use super::{Blocking, Indexed, RegistryError};
use crate::observe::{Observer, WatchKind};

/// First and longest pause between two failed queries of a watch.
pub const WATCH_BACKOFF: (Duration, Duration) =
    (Duration::from_millis(250), Duration::from_secs(10));

/// With a burst of two, the shortest interval between two queries of one watch.
pub const WATCH_MIN_INTERVAL: Duration = Duration::from_millis(50);

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

/// An answer whose index moved: what a watch hands to its owner.
#[derive(Debug)]
pub struct Update<T> {
    /// The data read.
    pub value: T,
    /// Its `X-Consul-Index`.
    pub index: u64,
    /// Since the last update the owner took, the index went backwards (Consul restored or lost
    /// data): this is a fresh read of everything.
    pub after_reset: bool,
}

/// A blocking-query loop on one resource: rate-limited, backing off (with jitter) while Consul
/// fails, reading at once after an error, resetting when the index goes backwards, and logging
/// an outage once when it starts and once when it ends.
#[derive(Debug)]
pub struct Watch {
    subject: String,
    index: WatchIndex,
    backoff: Backoff,
    rate_limit: RateLimit,
    failing: bool,
    after_reset: bool,
    /// Where its errors and restarts are counted.
    observer: Option<(Observer, WatchKind)>,
}

impl Watch {
    /// A watch of `subject` (named in its log lines), starting after `index`.
    pub fn new(subject: String, index: WatchIndex) -> Watch {
        Watch {
            subject,
            index,
            backoff: Backoff::new(WATCH_BACKOFF.0, WATCH_BACKOFF.1),
            rate_limit: RateLimit::new(WATCH_MIN_INTERVAL),
            failing: false,
            after_reset: false,
            observer: None,
        }
    }

    /// The same watch with one query per `interval` after its burst of two (instead of
    /// [`WATCH_MIN_INTERVAL`]).
    pub fn paced(mut self, interval: Duration) -> Watch {
        self.rate_limit = RateLimit::new(interval);
        self
    }

    /// Counts this watch's registry errors and restarts in `observer`, as a watch of `kind`.
    pub fn observed(mut self, observer: Observer, kind: WatchKind) -> Watch {
        self.observer = Some((observer, kind));
        self
    }

    fn count_restart(&self) {
        if let Some((observer, kind)) = &self.observer {
            observer.record_watch_restart(*kind);
        }
    }

    /// Queries with `read` until an answer's index moves, and returns it. Failed queries are
    /// retried with backoff; answers with an unchanged index are skipped.
    pub async fn next<T, Read, Answer>(&mut self, mut read: Read) -> Update<T>
    where
        Read: FnMut(Option<Blocking>) -> Answer,
        Answer: Future<Output = Result<Indexed<T>, RegistryError>>,
    {
        loop {
            self.rate_limit.acquire().await;
            let answer = match read(self.index.next_query()).await {
                Ok(answer) => answer,
                Err(error) => {
                    if let Some((observer, _)) = &self.observer {
                        observer.record_registry_error();
                    }
                    self.index.after_error();
                    let pause = self.backoff.next_pause();
                    if self.failing {
                        tracing::debug!(%error, retry_in = ?pause, "watching {} failed again", self.subject);
                    } else {
                        tracing::warn!(%error, retry_in = ?pause, "watching {} failed", self.subject);
                    }
                    self.failing = true;
                    tokio::time::sleep(pause).await;
                    continue;
                }
            };
            if self.failing {
                tracing::info!("Consul answers again: resyncing {}", self.subject);
                self.failing = false;
                self.backoff.reset();
            }
            match self.index.observe(answer.index) {
                IndexStep::Unchanged => continue,
                IndexStep::Backwards => {
                    tracing::warn!(
                        index = answer.index,
                        "the index of {} went backwards (Consul restored or lost data?): reading everything again",
                        self.subject
                    );
                    self.after_reset = true;
                    self.count_restart();
                    continue;
                }
                IndexStep::Fresh | IndexStep::Forward => {
                    return Update {
                        value: answer.value,
                        index: answer.index,
                        after_reset: self.after_reset,
                    }
                }
            }
        }
    }

    /// The owner took the last update.
    pub fn taken(&mut self) {
        self.after_reset = false;
        self.backoff.reset();
    }

    /// The owner could not use the last update: pause (with backoff), then read everything
    /// again.
    pub async fn retry_later(&mut self, error: impl std::fmt::Display + Send) {
        let pause = self.backoff.next_pause();
        tracing::error!(%error, retry_in = ?pause, "using what was read of {} failed", self.subject);
        self.read_again();
        tokio::time::sleep(pause).await;
    }

    /// The next query reads everything at once (e.g. after the owner wrote to the resource).
    pub fn read_again(&mut self) {
        self.count_restart();
        self.index = WatchIndex::default();
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
    async fn a_watch_skips_unchanged_answers_survives_errors_and_flags_a_reset() {
        use std::collections::VecDeque;
        use std::sync::Mutex;

        let outage = || RegistryError::Unreachable {
            addresses: "consul:8500".into(),
            message: "connection refused".into(),
        };
        let answer = |index: u64, value: &'static str| Ok(Indexed { value, index });
        let script = Mutex::new(VecDeque::from([
            Err(outage()),
            answer(5, "a"),
            answer(5, "a"),
            answer(7, "b"),
            Err(outage()),
            answer(3, "c"),
            answer(3, "c"),
        ]));
        let asked = Mutex::new(Vec::new());
        let read = |blocking: Option<Blocking>| {
            asked
                .lock()
                .expect("asked")
                .push(blocking.map(|query| query.index));
            let next = script.lock().expect("script").pop_front();
            async move { next.expect("the watch reads no more than scripted") }
        };
        let mut watch = Watch::new("the test resource".into(), WatchIndex::default());

        let first = watch.next(read).await;
        assert_eq!(
            (first.value, first.index, first.after_reset),
            ("a", 5, false)
        );
        watch.taken();
        let second = watch.next(read).await;
        assert_eq!(
            (second.value, second.index, second.after_reset),
            ("b", 7, false)
        );
        watch.taken();
        let third = watch.next(read).await;
        assert_eq!((third.value, third.index), ("c", 3));
        assert!(third.after_reset, "the index went from 7 back to 3");
        watch.taken();

        assert_eq!(
            *asked.lock().expect("asked"),
            [None, None, Some(5), Some(5), Some(7), None, None],
            "immediate reads at first, after each error and after the reset; else blocking"
        );
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
