//! The health-check runner: one tokio task per HTTP, TCP or TTL check, writing results back into
//! the store (a status change is a write that wakes health watchers), plus the reaper behind
//! `DeregisterCriticalServiceAfter`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio::task::AbortHandle;

use super::store::{CheckDefinition, CheckKind, Store, CRITICAL, PASSING, WARNING};

/// Consul keeps at most this many bytes of a probe's output.
const OUTPUT_MAX: usize = 4096;
/// How often critical services are considered for `DeregisterCriticalServiceAfter`.
pub(crate) const REAP_INTERVAL: Duration = Duration::from_secs(30);
/// The smallest `DeregisterCriticalServiceAfter` Consul honours.
const MIN_DEREGISTER_AFTER: Duration = Duration::from_secs(60);
/// Consul's `checks.MinInterval`: shorter HTTP/TCP intervals are raised to it (with a warning),
/// so a check cannot hammer its target.
pub(crate) const MIN_INTERVAL: Duration = Duration::from_secs(1);

/// The pause between two probes of an HTTP or TCP check: its interval, at least [`MIN_INTERVAL`]
/// (this also holds for checks restored from a state written before the floor existed).
fn probe_interval(definition: &CheckDefinition) -> Duration {
    Duration::from_millis(definition.interval_ms).max(MIN_INTERVAL)
}

struct Running {
    task: AbortHandle,
    /// TTL checks: poked on every pass/warn/fail to restart the TTL timer.
    ttl_reset: Option<Arc<Notify>>,
}

/// Owns the probe tasks; shared by the HTTP handlers (start/stop on register/deregister, TTL
/// updates) and the registry handle (stop all at shutdown).
pub(crate) struct Runner {
    store: Arc<Store>,
    client: reqwest::Client,
    running: Mutex<HashMap<String, Running>>,
}

impl Runner {
    /// A runner with no tasks yet.
    pub fn new(store: Arc<Store>) -> Runner {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::limited(10))
            .build()
            .unwrap_or_else(|_| reqwest::Client::new());
        Runner {
            store,
            client,
            running: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Running>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// (Re)starts the probe for a check, replacing any earlier task for the same ID.
    pub fn start(&self, check_id: &str, definition: &CheckDefinition) {
        self.stop(check_id);
        let store = self.store.clone();
        let id = check_id.to_string();
        let running = match &definition.kind {
            CheckKind::Http {
                url,
                method,
                header,
                body,
            } => {
                let probe = HttpProbe {
                    client: self.client.clone(),
                    url: url.clone(),
                    method: method.clone(),
                    header: header.clone(),
                    body: body.clone(),
                    timeout: Duration::from_millis(definition.timeout_ms),
                };
                let interval = probe_interval(definition);
                let task = tokio::spawn(async move {
                    loop {
                        let (status, output) = probe.run().await;
                        record(&store, &id, status, output);
                        tokio::time::sleep(interval).await;
                    }
                });
                Running {
                    task: task.abort_handle(),
                    ttl_reset: None,
                }
            }
            CheckKind::Tcp { address } => {
                let address = address.clone();
                let timeout = Duration::from_millis(definition.timeout_ms);
                let interval = probe_interval(definition);
                let task = tokio::spawn(async move {
                    loop {
                        let (status, output) = tcp_probe(&address, timeout).await;
                        record(&store, &id, status, output);
                        tokio::time::sleep(interval).await;
                    }
                });
                Running {
                    task: task.abort_handle(),
                    ttl_reset: None,
                }
            }
            CheckKind::Ttl => {
                let reset = Arc::new(Notify::new());
                let ttl = Duration::from_millis(definition.ttl_ms.max(1));
                let wake = reset.clone();
                let task = tokio::spawn(async move {
                    loop {
                        if tokio::time::timeout(ttl, wake.notified()).await.is_ok() {
                            continue;
                        }
                        let last = store.read(|s| s.checks.get(&id).map(|c| c.output.clone()));
                        let Some(last) = last else { return };
                        let last = last
                            .strip_prefix(TTL_EXPIRED)
                            .map(str::to_string)
                            .unwrap_or(last);
                        record(&store, &id, CRITICAL, format!("{TTL_EXPIRED}{last}"));
                        wake.notified().await;
                    }
                });
                Running {
                    task: task.abort_handle(),
                    ttl_reset: Some(reset),
                }
            }
            CheckKind::Unprobed { .. } => return,
        };
        self.lock().insert(check_id.to_string(), running);
    }

    /// Stops the probe of one check, if any.
    pub fn stop(&self, check_id: &str) {
        if let Some(running) = self.lock().remove(check_id) {
            running.task.abort();
        }
    }

    /// Stops every probe (shutdown).
    pub fn stop_all(&self) {
        for (_, running) in self.lock().drain() {
            running.task.abort();
        }
    }

    /// Restarts the TTL timer of a check after a pass/warn/fail update.
    pub fn ttl_touched(&self, check_id: &str) {
        if let Some(reset) = self.lock().get(check_id).and_then(|r| r.ttl_reset.clone()) {
            reset.notify_one();
        }
    }

    /// Starts probes for every check in the store (after loading persisted state).
    pub fn start_all(&self) {
        let checks: Vec<(String, CheckDefinition)> = self.store.read(|s| {
            s.checks
                .values()
                .map(|c| (c.check_id.clone(), c.definition.clone()))
                .collect()
        });
        for (id, definition) in checks {
            self.start(&id, &definition);
        }
    }

    /// One reaper pass: deregisters services that have a check critical for longer than its
    /// `DeregisterCriticalServiceAfter` (at least one minute).
    pub fn reap(&self, now: Instant) {
        let doomed: Vec<String> = self.store.read(|s| {
            s.checks
                .values()
                .filter(|c| c.definition.deregister_after_ms > 0 && c.status == CRITICAL)
                .filter(|c| {
                    let after = Duration::from_millis(c.definition.deregister_after_ms)
                        .max(MIN_DEREGISTER_AFTER);
                    c.critical_since
                        .is_some_and(|since| now.saturating_duration_since(since) >= after)
                })
                .map(|c| c.service_id.clone())
                .collect()
        });
        for service_id in doomed {
            let result = self.store.write(|s, index| {
                let removed = s.deregister_service(&service_id, index);
                let changed = removed.is_some();
                (removed.unwrap_or_default(), changed)
            });
            match result {
                Ok(removed) => {
                    tracing::info!(%service_id, "check for service has been critical for too long; deregistered service");
                    for id in removed {
                        self.stop(&id);
                    }
                }
                Err(error) => tracing::warn!(%error, "reaping critical service"),
            }
        }
    }
}

const TTL_EXPIRED: &str = "TTL expired (last output before timeout follows): ";

fn record(store: &Store, check_id: &str, status: &str, output: String) {
    let result = store.write(|s, index| {
        let changed = s.update_check(check_id, status, output, index) == Some(true);
        ((), changed)
    });
    if let Err(error) = result {
        tracing::warn!(%error, check_id, "recording check result");
    }
}

struct HttpProbe {
    client: reqwest::Client,
    url: String,
    method: String,
    header: std::collections::BTreeMap<String, Vec<String>>,
    body: String,
    timeout: Duration,
}

impl HttpProbe {
    /// One probe: 2xx passing, 429 warning, anything else critical.
    async fn run(&self) -> (&'static str, String) {
        let method = match reqwest::Method::from_bytes(self.method.as_bytes()) {
            Ok(method) => method,
            Err(error) => {
                return (
                    CRITICAL,
                    format!("invalid method {:?}: {error}", self.method),
                )
            }
        };
        let mut request = self
            .client
            .request(method.clone(), &self.url)
            .timeout(self.timeout)
            .header("User-Agent", "Consul Health Check")
            .header("Accept", "text/plain, text/*, */*");
        for (name, values) in &self.header {
            for value in values {
                request = request.header(name.as_str(), value.as_str());
            }
        }
        if !self.body.is_empty() {
            request = request.body(self.body.clone());
        }
        let response = match request.send().await {
            Ok(response) => response,
            Err(error) => {
                let verb = go_verb(method.as_str());
                return (CRITICAL, format!("{verb} \"{}\": {error}", self.url));
            }
        };
        let code = response.status();
        let body = match response.bytes().await {
            Ok(bytes) => truncate(&String::from_utf8_lossy(&bytes)),
            Err(error) => error.to_string(),
        };
        let status = if code.is_success() {
            PASSING
        } else if code.as_u16() == 429 {
            WARNING
        } else {
            CRITICAL
        };
        let reason = code.canonical_reason().unwrap_or("");
        let output = format!(
            "HTTP {method} {}: {} {reason} Output: {body}",
            self.url,
            code.as_u16()
        );
        (status, output)
    }
}

/// Go's net/http error prefix: `Get`, `Post`, … (method with only its first letter upper-case).
fn go_verb(method: &str) -> String {
    let lower = method.to_ascii_lowercase();
    let mut chars = lower.chars();
    match chars.next() {
        Some(first) => first.to_ascii_uppercase().to_string() + chars.as_str(),
        None => String::new(),
    }
}

fn truncate(text: &str) -> String {
    if text.len() <= OUTPUT_MAX {
        return text.to_string();
    }
    let mut end = OUTPUT_MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

/// One TCP probe: a completed connect is passing.
async fn tcp_probe(address: &str, timeout: Duration) -> (&'static str, String) {
    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(address)).await {
        Ok(Ok(_)) => (PASSING, format!("TCP connect {address}: Success")),
        Ok(Err(error)) => (CRITICAL, format!("dial tcp {address}: {error}")),
        Err(_) => (CRITICAL, format!("dial tcp {address}: i/o timeout")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::embedded::store::{NewCheck, Service, Weights};

    fn service(id: &str) -> Service {
        Service {
            id: id.into(),
            name: "web".into(),
            tags: vec![],
            address: String::new(),
            meta: None,
            port: 80,
            tagged_addresses: Default::default(),
            weights: Weights::default(),
            enable_tag_override: false,
            kind: String::new(),
            create_index: 0,
            modify_index: 0,
        }
    }

    #[test]
    fn probes_never_run_more_often_than_once_a_second() {
        let definition = |interval_ms| CheckDefinition {
            kind: CheckKind::Tcp {
                address: "127.0.0.1:9".into(),
            },
            interval_ms,
            timeout_ms: 10_000,
            ttl_ms: 0,
            deregister_after_ms: 0,
        };
        // A state written before the floor existed may hold a 1 ms interval.
        assert_eq!(probe_interval(&definition(1)), Duration::from_secs(1));
        assert_eq!(probe_interval(&definition(0)), Duration::from_secs(1));
        assert_eq!(
            probe_interval(&definition(2_500)),
            Duration::from_millis(2_500)
        );
    }

    #[tokio::test]
    async fn reaper_removes_services_critical_for_too_long() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let check = |after_ms| NewCheck {
            check_id: "c".into(),
            name: "c".into(),
            notes: String::new(),
            initial_status: CRITICAL.into(),
            definition: CheckDefinition {
                kind: CheckKind::Unprobed {
                    type_name: "alias".into(),
                },
                interval_ms: 0,
                timeout_ms: 0,
                ttl_ms: 0,
                deregister_after_ms: after_ms,
            },
        };
        store
            .write(|s, i| {
                s.register_service(service("a"), vec![check(2_000)], false, i);
                ((), true)
            })
            .unwrap();
        let runner = Runner::new(store.clone());
        // 2 s is raised to the one-minute minimum.
        runner.reap(Instant::now() + Duration::from_secs(30));
        assert!(store.read(|s| s.services.contains_key("a")));
        runner.reap(Instant::now() + Duration::from_secs(61));
        assert!(store.read(|s| s.services.is_empty() && s.checks.is_empty()));
    }
}
