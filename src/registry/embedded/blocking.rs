//! Blocking queries: parsing `?index=` and `?wait=` the way Consul does (Go durations, 5 min
//! default, 10 min cap, up to wait/16 jitter added) and the wait loop that re-evaluates a query
//! on every write until its result index passes the requested one.

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::store::{State, Store};

/// Wait used when `?wait` is absent or not positive.
const DEFAULT_WAIT: Duration = Duration::from_secs(300);
/// The longest wait a client may ask for.
const MAX_WAIT: Duration = Duration::from_secs(600);

/// A parsed blocking request: `min_index` 0 means answer at once.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Blocking {
    pub min_index: u64,
    pub wait: Duration,
}

/// Why `?index`/`?wait` were rejected; the text is Consul's 400 body.
#[derive(Debug, thiserror::Error, PartialEq)]
pub(crate) enum BlockingError {
    #[error("Invalid wait time")]
    Wait,
    #[error("Invalid index")]
    Index,
}

impl Blocking {
    /// Parses the raw `index` and `wait` query values.
    pub fn parse(index: Option<&str>, wait: Option<&str>) -> Result<Blocking, BlockingError> {
        let wait = match wait {
            Some(text) => parse_go_duration(text).ok_or(BlockingError::Wait)?,
            None => None,
        };
        let min_index = match index {
            Some(text) => text.parse::<u64>().map_err(|_| BlockingError::Index)?,
            None => 0,
        };
        let wait = match wait {
            Some(d) if !d.is_zero() => d.min(MAX_WAIT),
            _ => DEFAULT_WAIT,
        };
        Ok(Blocking { min_index, wait })
    }

    /// Waits until the query's result index (`index_of`) exceeds the requested one, the wait
    /// (plus jitter) runs out, or the registry shuts down; then reads its body with `read`, in
    /// the same look at the state as the index it answers with. Each write re-evaluates only
    /// the index: a blocked query costs nothing per write that does not concern it.
    pub async fn run<T>(
        &self,
        store: &Store,
        mut shutdown: watch::Receiver<bool>,
        index_of: impl Fn(&State) -> u64,
        read: impl FnOnce(&State) -> T,
    ) -> (u64, T) {
        let mut changes = store.subscribe();
        if self.min_index == 0 || store.read(&index_of) > self.min_index {
            return store.read(|state| (index_of(state), read(state)));
        }
        let jitter_cap = (self.wait.as_millis() / 16) as u64;
        let jitter = if jitter_cap == 0 {
            0
        } else {
            rand::random_range(0..jitter_cap)
        };
        let deadline = Instant::now() + self.wait + Duration::from_millis(jitter);
        loop {
            changes.borrow_and_update();
            if store.read(&index_of) > self.min_index || *shutdown.borrow() {
                break;
            }
            tokio::select! {
                result = changes.changed() => {
                    if result.is_err() {
                        break;
                    }
                }
                _ = shutdown.changed() => break,
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        store.read(|state| (index_of(state), read(state)))
    }
}

/// Go's `time.ParseDuration`: an optional sign, then one or more decimal numbers each with a
/// unit (`ns`, `us`, `µs`, `ms`, `s`, `m`, `h`); `"0"` alone is allowed. Returns `None` for bad
/// input and `Some(None)` for a negative duration (treated as "not given").
pub(crate) fn parse_go_duration(text: &str) -> Option<Option<Duration>> {
    let (negative, mut rest) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    if rest == "0" {
        return Some(Some(Duration::ZERO));
    }
    if rest.is_empty() {
        return None;
    }
    let mut total_nanos: f64 = 0.0;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number = &rest[..number_len];
        if number.is_empty() || number == "." {
            return None;
        }
        let value: f64 = number.parse().ok()?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1.0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total_nanos += value * scale;
    }
    if !total_nanos.is_finite() || total_nanos > u64::MAX as f64 {
        return None;
    }
    if negative {
        return Some(None);
    }
    Some(Some(Duration::from_nanos(total_nanos as u64)))
}

/// A Go-duration field value (check intervals, TTLs) in milliseconds; negatives count as 0.
pub(crate) fn duration_ms(text: &str) -> Option<u64> {
    parse_go_duration(text).map(|d| d.map_or(0, |d| d.as_millis() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        let ms = |t: &str| parse_go_duration(t).map(|d| d.map(|d| d.as_millis()));
        assert_eq!(ms("1m30s"), Some(Some(90_000)));
        assert_eq!(ms("500ms"), Some(Some(500)));
        assert_eq!(ms("1.5s"), Some(Some(1_500)));
        assert_eq!(ms("2h"), Some(Some(7_200_000)));
        assert_eq!(ms("0"), Some(Some(0)));
        assert_eq!(ms("-5s"), Some(None));
        assert_eq!(ms("10"), None);
        assert_eq!(ms("abc"), None);
        assert_eq!(ms(""), None);
        assert_eq!(ms("5x"), None);
    }

    #[test]
    fn wait_defaults_and_cap() {
        let b = Blocking::parse(None, None).unwrap();
        assert_eq!((b.min_index, b.wait), (0, DEFAULT_WAIT));
        let b = Blocking::parse(Some("7"), Some("30m")).unwrap();
        assert_eq!((b.min_index, b.wait), (7, MAX_WAIT));
        assert_eq!(
            Blocking::parse(Some("x"), None).unwrap_err(),
            BlockingError::Index
        );
        assert_eq!(
            Blocking::parse(None, Some("10")).unwrap_err(),
            BlockingError::Wait
        );
    }
}
