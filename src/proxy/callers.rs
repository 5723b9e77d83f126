//! The API changes in flight (a reconfigure, a remove, a certificate…), counted so that the
//! background readers of Consul can let a caller's change go first: on a machine with few
//! cores, the instance follower's listings (every node's instances, to tell which service an
//! unexplained catalog move concerns) cost as much CPU, in flow-proxy and in Consul, as the
//! change a caller waits for. A background reader waits until no caller waits, at most a
//! bounded time, so following never starves under a steady stream of calls.

use std::time::Duration;

use tokio::sync::watch;

/// Counts the API changes in flight; clones count together.
#[derive(Debug, Clone)]
pub(super) struct CallersInFlight(watch::Sender<usize>);

impl CallersInFlight {
    pub fn new() -> CallersInFlight {
        CallersInFlight(watch::channel(0).0)
    }

    /// Counts one change in flight until the returned guard is dropped.
    pub fn enter(&self) -> InFlight {
        self.0.send_modify(|count| *count += 1);
        InFlight(self.0.clone())
    }

    /// Returns once no API change is in flight, or after `longest`.
    pub async fn wait_until_idle(&self, longest: Duration) {
        let mut count = self.0.subscribe();
        // The sender lives in `self`: `wait_for` fails only once it is gone.
        let _ = tokio::time::timeout(longest, count.wait_for(|count| *count == 0)).await;
    }
}

/// One API change in flight (see [`CallersInFlight::enter`]).
#[derive(Debug)]
pub(super) struct InFlight(watch::Sender<usize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.send_modify(|count| *count = count.saturating_sub(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_background_reader_waits_for_the_callers_but_not_longer_than_told() {
        let callers = CallersInFlight::new();
        let started = tokio::time::Instant::now();
        callers.wait_until_idle(Duration::from_secs(1)).await;
        assert_eq!(started.elapsed(), Duration::ZERO, "nobody in flight");

        let first = callers.enter();
        let second = callers.enter();
        let waiting = {
            let callers = callers.clone();
            tokio::spawn(async move {
                let started = tokio::time::Instant::now();
                callers.wait_until_idle(Duration::from_secs(10)).await;
                started.elapsed()
            })
        };
        tokio::time::sleep(Duration::from_millis(30)).await;
        drop(first);
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(second);
        assert_eq!(
            waiting.await.expect("the waiter runs"),
            Duration::from_millis(50),
            "it goes once the last caller is answered"
        );

        let _stuck = callers.enter();
        let started = tokio::time::Instant::now();
        callers.wait_until_idle(Duration::from_millis(100)).await;
        assert_eq!(started.elapsed(), Duration::from_millis(100));
    }
}
