//! The embedded Consul-compatible registry: the server side of the Consul HTTP API subset that
//! flow-proxy and Registrator use (agent, catalog, health, KV, blocking queries) and that the
//! Consul tools read (`consul members`/`info`/`catalog`/`kv`/`watch`, consul-template), persisted
//! under the data directory. It is the dev default and the test fixture; production uses real Consul.
//!
//! Layout:
//! - [`store`]: the state and its indexes; a write is logged durably before it is visible.
//! - [`persist`]: the snapshot (`<data_dir>/registry/state.json`) and the change log beside it.
//! - [`http`]: routing, handlers, headers and Consul's error answers; `http/tools.rs` holds the
//!   endpoints only the Consul tools read (agent self/members, catalog nodes, health by state).
//! - [`register`]: decoding and validating agent service registrations.
//! - [`blocking`]: `?index`/`?wait` parsing and the blocking-query loop.
//! - [`checks`]: the HTTP/TCP/TTL check runner and the critical-service reaper.
//!
//! One datacenter (`dc1`), one node (the machine's hostname at `127.0.0.1`), no ACLs: tokens
//! are accepted and ignored.

mod blocking;
mod checks;
mod http;
mod persist;
mod register;
mod store;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How long shutdown waits for in-flight requests before dropping them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The embedded registry could not start.
#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    /// Binding the listen address failed.
    #[error("embedded registry cannot listen on {address}: {source}")]
    Bind {
        address: SocketAddr,
        source: std::io::Error,
    },
    /// The persisted state could not be read.
    #[error("embedded registry state {path}: {message}")]
    State { path: String, message: String },
}

/// A failure mode the registry can be told to simulate, so clients' error paths can be tested
/// against the answers a real Consul gives in those situations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// No raft leader: KV, catalog and health answer `500 No cluster leader` (with
    /// `X-Consul-KnownLeader: false`); `/v1/status/leader` answers `""`. Agent calls still work.
    NoLeader,
    /// A token without rights: KV and agent writes answer `403 Permission denied`; catalog and
    /// health reads answer empty (`{}`/`[]`), as Consul filters them.
    PermissionDenied,
    /// A token that lost `service:read` but may still read nodes and KV: catalog, health and
    /// agent reads leave out every service entry (and every service's checks), as Consul's ACL
    /// filter does; node entries, KV and writes (another client's, e.g. Registrator's) work.
    ServiceReadDenied,
}

/// A running embedded registry.
pub struct EmbeddedRegistry {
    address: SocketAddr,
    app: Arc<http::App>,
    stop: watch::Sender<bool>,
    server: JoinHandle<()>,
    reaper: JoinHandle<()>,
    requests: RequestCounts,
}

/// How many requests each path (without its query) was sent since start: what it costs its
/// clients to follow it, e.g. per instance change.
#[derive(Debug, Clone, Default)]
struct RequestCounts(Arc<Mutex<BTreeMap<String, u64>>>);

impl RequestCounts {
    fn count(&self, path: &str) {
        let mut counts = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match counts.get_mut(path) {
            Some(count) => *count += 1,
            None => {
                counts.insert(path.to_string(), 1);
            }
        }
    }
}

impl EmbeddedRegistry {
    /// Loads the state persisted in `data_dir` and starts serving on `address` (port 0 picks one).
    /// Checks restored from disk start probing again at once.
    pub async fn start(
        address: SocketAddr,
        data_dir: &Path,
    ) -> Result<EmbeddedRegistry, EmbeddedError> {
        let store = Arc::new(store::Store::open(&data_dir.join("registry"))?);
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .map_err(|source| EmbeddedError::Bind { address, source })?;
        let bound = listener
            .local_addr()
            .map_err(|source| EmbeddedError::Bind { address, source })?;

        let runner = Arc::new(checks::Runner::new(store.clone()));
        runner.start_all();
        let (stop, stopped) = watch::channel(false);
        let app = Arc::new(http::App {
            store,
            runner: runner.clone(),
            node_name: hostname(),
            fault: Mutex::new(None),
            shutdown: stopped.clone(),
        });

        let mut server_stop = stopped.clone();
        let requests = RequestCounts::default();
        let counted = requests.clone();
        let router = http::router(app.clone()).layer(axum::middleware::from_fn(
            move |request: axum::extract::Request, next: axum::middleware::Next| {
                counted.count(request.uri().path());
                next.run(request)
            },
        ));
        let server = tokio::spawn(async move {
            let graceful = async move {
                let _ = server_stop.wait_for(|stop| *stop).await;
            };
            if let Err(error) = axum::serve(listener, router)
                .with_graceful_shutdown(graceful)
                .await
            {
                tracing::error!(%error, "embedded registry server failed");
            }
        });
        let reaper = tokio::spawn(async move {
            let mut tick = tokio::time::interval(checks::REAP_INTERVAL);
            loop {
                tick.tick().await;
                runner.reap(std::time::Instant::now());
            }
        });
        tracing::info!(address = %bound, "embedded Consul-compatible registry listening");
        Ok(EmbeddedRegistry {
            address: bound,
            app,
            stop,
            server,
            reaper,
            requests,
        })
    }

    /// How many requests each path (without its query) was sent since start.
    pub fn request_counts(&self) -> BTreeMap<String, u64> {
        self.requests
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The address it actually listens on.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Makes every following request fail the way Consul does in that situation (`None` heals).
    /// Meant for tests of clients' error handling.
    pub fn set_fault(&self, fault: Option<Fault>) {
        *self.app.fault.lock().unwrap_or_else(|e| e.into_inner()) = fault;
    }

    /// Stops serving (blocking queries answer at once), stops the check probes and the reaper,
    /// and folds the change log into a final snapshot (which also keeps the latest check output).
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        self.reaper.abort();
        self.app.runner.stop_all();
        let abort = self.server.abort_handle();
        if tokio::time::timeout(SHUTDOWN_GRACE, self.server)
            .await
            .is_err()
        {
            abort.abort();
        }
        if let Err(error) = self.app.store.flush() {
            tracing::warn!(%error, "embedded registry: final state write failed");
        }
    }
}

/// The machine's hostname (the node name), `flow-proxy` when it cannot be read.
fn hostname() -> String {
    let mut buffer = [0u8; 256];
    // SAFETY: the pointer and length describe `buffer`, which outlives the call.
    let result = unsafe { libc::gethostname(buffer.as_mut_ptr().cast(), buffer.len()) };
    if result != 0 {
        return "flow-proxy".into();
    }
    let end = buffer.iter().position(|b| *b == 0).unwrap_or(buffer.len());
    match std::str::from_utf8(&buffer[..end]) {
        Ok(name) if !name.is_empty() => name.to_string(),
        _ => "flow-proxy".into(),
    }
}
